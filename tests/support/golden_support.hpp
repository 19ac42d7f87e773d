// tests/support/golden_support.hpp — parity with HuggingFace PEFT 0.21 on the golden cases
// (tests/data/peft/<case>: the two-layer MLP y = down(relu(up(x))), up 64 -> 96, down 96 -> 48,
// with base_model.safetensors, the saved adapter and reference.safetensors), shared by the
// adapter tests and tests/io/test_peft_golden.cpp. Header-only; unlike test_support.hpp it uses
// Catch2 (REQUIRE, CHECK, INFO).
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/layer/adapted_linear.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/checkpoint_tensors.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/file_support.hpp"
#include "support/test_support.hpp"

namespace peft_test {

// ---- loading a case ----------------------------------------------------------------------------

/// tests/data/peft/<name>: the directory of one golden case.
inline std::filesystem::path golden_dir(const std::string& name) {
  return std::filesystem::path(PEFT_TEST_DATA_DIR) / "peft" / name;
}

/// The frozen layer `name` ("up", "down") of a case's base model, with its bias.
inline peft::dense<float> load_base(const peft::io::safetensors_file& f, const std::string& name) {
  return peft::dense<float>(f.read_matrix<float>(name + ".weight"), f.read<float>(name + ".bias"));
}

/// load_checkpoint_as<A>, then each module given its base layer's shape where A takes it through
/// set_features (the checkpoint does not determine it: IA3's unknown side, VeRA, RandLoRA).
template <class A>
peft::io::basic_peft_checkpoint<A> load_bound(const std::filesystem::path& dir, const peft::io::safetensors_file& base) {
  auto ck = peft::io::load_checkpoint_as<A>(dir);
  for (auto& m : ck.modules) {
    const auto& s = base.info(m.weight_name).shape;
    if constexpr (requires { m.adapter.set_features(peft::index{}, peft::index{}); }) {
      m.adapter.set_features(static_cast<peft::index>(s[1]), static_cast<peft::index>(s[0]));
    }
  }
  return ck;
}

/// A case's checkpoint (`adapter`: its directory in the case) loaded as A, each module added as
/// "default" on its frozen f32 layer, and the reference tensors.
template <class A>
struct golden_case {
  using T = typename A::scalar;
  using layer_type = peft::adapted_linear<peft::dense<float>, A>;
  peft::io::safetensors_file base;
  peft::io::safetensors_file reference;
  peft::io::basic_peft_checkpoint<A> checkpoint;
  layer_type up;
  layer_type down;

  explicit golden_case(const std::string& name, const std::string& adapter = "adapter")
      : base(peft::io::safetensors_file::open(golden_dir(name) / "base_model.safetensors")),
        reference(peft::io::safetensors_file::open(golden_dir(name) / "reference.safetensors")),
        checkpoint(load_bound<A>(golden_dir(name) / adapter, base)),
        up(load_base(base, "up")),
        down(load_base(base, "down")) {
    REQUIRE(checkpoint.modules.size() == 2);
    up.add_adapter("default", checkpoint.find("up.weight")->adapter);
    down.add_adapter("default", checkpoint.find("down.weight")->adapter);
  }
  /// The layer "up" or "down".
  layer_type& layer(const std::string& n) { return n == "up" ? up : down; }
  /// A reference tensor in double (what the results are compared with); an n-D tensor (BOFT's
  /// boft_R gradient (N, D, H, H)) as (d0 ... d(n-2), d(n-1)) rows, the layout of its parameter.
  peft::matrix<double> ref(const std::string& n) const { return read_rows<double>(n); }
  /// A reference tensor in the compute type (what the layers are fed).
  peft::matrix<T> ref_t(const std::string& n) const { return read_rows<T>(n); }
  template <class U>
  peft::matrix<U> read_rows(const std::string& n) const {
    const auto& shape = reference.info(n).shape;
    if (shape.size() <= 2) return reference.read_matrix<U>(n);
    std::vector<U> values = reference.read<U>(n);
    const auto cols = static_cast<peft::index>(shape.back());
    const auto rows = static_cast<peft::index>(values.size()) / cols;
    return peft::matrix<U>(rows, cols, std::move(values));
  }
  /// How many gradients the reference holds for a layer.
  std::size_t reference_gradients(const std::string& n) const {
    std::size_t k = 0;
    for (const auto& t : reference.tensors()) k += t.name.starts_with("grad.base_model.model." + n + ".") ? 1 : 0;
    return k;
  }
};

// ---- running the layers ------------------------------------------------------------------------

/// One layer's outputs: with the adapter, of the frozen base alone, and dL/dinput.
template <class T>
struct layer_run {
  peft::matrix<T> y, y_base, dx;
};

/// One layer alone on the reference's input and grad_output (REQUIREd not mostly zero), its
/// gradients zeroed before the backward pass.
template <class A>
layer_run<typename A::scalar> run_layer(golden_case<A>& c, const std::string& name) {
  using T = typename A::scalar;
  auto& layer = c.layer(name);
  const auto x = c.ref_t("layer." + name + ".input");
  const auto g = c.ref_t("layer." + name + ".grad_output");
  REQUIRE(count_nonzero(x) > x.size() / 4);  // the down input is a relu output
  REQUIRE(count_nonzero(g) > g.size() / 4);
  layer_run<T> r{peft::matrix<T>(x.rows(), layer.out_features()), peft::matrix<T>(x.rows(), layer.out_features()),
                 peft::matrix<T>(x.rows(), layer.in_features())};
  layer.forward(x, r.y);
  layer.base().matmul(peft::matrix_view<const T>(x.view()), r.y_base.view());
  layer.zero_grad();
  layer.backward(x, g, r.dx);
  return r;
}

/// The network's output y and dL/dx.
template <class T>
struct network_run {
  peft::matrix<T> y, dx;
};

/// The network y = down(relu(up(x))) forward and back from dL/dy = gy, both layers' gradients
/// zeroed first.
template <class A>
network_run<typename A::scalar> run_network(golden_case<A>& c, const peft::matrix<typename A::scalar>& x,
                                            const peft::matrix<typename A::scalar>& gy) {
  using T = typename A::scalar;
  peft::matrix<T> h(x.rows(), c.up.out_features()), a(h.rows(), h.cols());
  network_run<T> r{peft::matrix<T>(x.rows(), c.down.out_features()), peft::matrix<T>(x.rows(), x.cols())};
  c.up.forward(x, h);
  for (peft::index i = 0; i < h.rows(); ++i)
    for (peft::index j = 0; j < h.cols(); ++j) a(i, j) = h(i, j) > 0 ? h(i, j) : T{0};
  c.down.forward(a, r.y);
  peft::matrix<T> da(a.rows(), a.cols());
  c.up.zero_grad();
  c.down.zero_grad();
  c.down.backward(a, gy, da);
  for (peft::index i = 0; i < da.rows(); ++i)
    for (peft::index j = 0; j < da.cols(); ++j) da(i, j) = h(i, j) > 0 ? da(i, j) : T{0};
  c.up.backward(x, da, r.dx);
  return r;
}

// ---- the checks --------------------------------------------------------------------------------

/// Every parameter gradient of the layer's adapter against PEFT's; all of PEFT's are covered.
template <class A>
void check_gradients(golden_case<A>& c, const std::string& name, double tol) {
  std::size_t checked = 0;
  for (const auto& p : c.layer(name).adapter("default").parameters()) {
    INFO("gradient of " << p.name);
    const auto ref = c.ref("grad.base_model.model." + name + "." + p.name + ".default");
    REQUIRE(count_nonzero(ref) > ref.size() / 2);
    CHECK(rel_error(p.grad, ref) < tol);
    ++checked;
  }
  CHECK(checked == c.reference_gradients(name));
}

/// Layer `name` alone: its output and dL/dinput against PEFT's, the adapter's term a visible part
/// of the output (the gradients are left in the adapter for the caller).
template <class A>
void check_layer_outputs(golden_case<A>& c, const std::string& name, double tol) {
  const auto r = run_layer(c, name);
  const auto y_ref = c.ref("layer." + name + ".output");
  CHECK(rel_error(r.y, y_ref) < tol);
  REQUIRE(rel_error(r.y_base, y_ref) > 1e-3);  // the adapter is not a no-op
  CHECK(rel_error(r.dx, c.ref("layer." + name + ".grad_input")) < tol);
}

/// Each layer alone: output, dL/dinput, every parameter gradient.
template <class A>
void check_layers(golden_case<A>& c, double tol) {
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    check_layer_outputs(c, name, tol);
    check_gradients(c, name, tol);
  }
}

/// The network's y and dL/dx against PEFT's, on inputs REQUIREd non-trivial (gradients left to
/// the caller).
template <class A>
void check_network_outputs(golden_case<A>& c, double tol) {
  const auto x = c.ref_t("x");
  const auto gy = c.ref_t("grad_y");
  REQUIRE(nontrivial(x));
  REQUIRE(nontrivial(gy));
  const auto r = run_network(c, x, gy);
  CHECK(rel_error(r.y, c.ref("y")) < tol);
  CHECK(rel_error(r.dx, c.ref("grad_x")) < tol);
}

/// The network y = down(relu(up(x))) and dL/dx, with every gradient.
template <class A>
void check_network(golden_case<A>& c, double tol) {
  check_network_outputs(c, tol);
  check_gradients(c, "up", tol);
  check_gradients(c, "down", tol);
}

/// Every trainable parameter's gradient of layer `name` against PEFT's (frozen tensors, such as
/// shared projections or a mask's indices, have none).
template <class A>
void check_trainable_gradients(golden_case<A>& c, const std::string& name, double tol) {
  const std::string key = "grad.base_model.model." + name + ".";
  for (const auto& p : c.layer(name).adapter("default").parameters()) {
    if (p.trainable) CHECK(rel_error(p.grad, c.ref(key + p.name + ".default")) < tol);
  }
}

/// The two-layer network's output and dL/dx, and every trainable gradient, against PEFT's.
template <class A>
void check_network_trainable(golden_case<A>& c, double tol) {
  check_network_outputs(c, tol);
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    check_trainable_gradients(c, name, tol);
  }
}

/// adapted_linear::merge of layer `name` into its f32 base against PEFT's merged weight (rounded
/// to f32: 1e-6) and bias (`bias_tol`).
template <class A>
void check_merged_base(golden_case<A>& c, const std::string& name, double bias_tol) {
  auto& layer = c.layer(name);
  layer.merge("default");
  CHECK(rel_error(layer.base().weight(), c.ref("merged." + name + ".weight")) < 1e-6);
  const peft::matrix<float> b(1, layer.out_features(), layer.base().bias());
  CHECK(rel_error(b, c.ref("merged." + name + ".bias")) < bias_tol);  // a 1-D tensor reads as (1, n)
}

/// merge_and_unload: the delta in double on a double base (1e-12), and adapted_linear::merge
/// into the f32 base (rounded to f32: 1e-6), weights and biases.
template <class A>
void check_merge(golden_case<A>& c) {
  using T = typename A::scalar;
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto& layer = c.layer(name);
    const auto w_ref = c.ref("merged." + name + ".weight");
    const peft::matrix<double> b_ref(1, layer.out_features(), c.reference.template read<double>("merged." + name + ".bias"));
    const auto w0 = c.base.template read_matrix<double>(name + ".weight");
    REQUIRE(rel_error(w0, w_ref) > 1e-3);
    {
      const peft::dense<double> exact(w0, c.base.template read<double>(name + ".bias"));
      const A& a = layer.adapter("default");
      peft::matrix<T> dw(layer.out_features(), layer.in_features());
      a.delta_weight(exact, dw.view());
      CHECK(rel_error(add(w0, dw), w_ref) < tolerance<T>());
      std::vector<T> db(static_cast<std::size_t>(layer.out_features()));
      peft::matrix<double> b(1, layer.out_features(), exact.bias());
      if (a.delta_bias(exact, db.data())) b = add(b, peft::matrix<T>(1, layer.out_features(), db));
      CHECK(rel_error(b, b_ref) < tolerance<T>());
    }
    check_merged_base(c, name, 1e-6);
  }
}

/// Case `name` checked as A: `layers(c, tol)`, `network(c, tol)` and `merge(c)`, each on a
/// freshly loaded case.
template <class A, class Layers, class Network, class Merge>
void check_golden(const std::string& name, Layers layers, Network network, Merge merge) {
  INFO("case " << name);
  const double tol = tolerance<typename A::scalar>();
  {
    golden_case<A> c(name);
    layers(c, tol);
  }
  {
    golden_case<A> c(name);
    network(c, tol);
  }
  {
    golden_case<A> c(name);
    merge(c);
  }
}

/// Case `name` checked as A with the checks above: every parameter gradient, the delta and merge.
template <class A>
void check_golden(const std::string& name) {
  check_golden<A>(name, check_layers<A>, check_network<A>, check_merge<A>);
}

// ---- building and editing checkpoints ----------------------------------------------------------

/// A path of this process's scratch directory (support/file_support.hpp: the unit shards run
/// concurrently, so fixed names under <temp> would collide).
inline std::filesystem::path scratch_path(const std::string& stem) { return temp_path(stem); }

/// A stored tensor of the given shape (n-D flattened to (d0, d1*...*dn)), uniform in [lo, hi).
template <class T>
peft::io::stored_tensor<T> stored(std::vector<std::int64_t> shape, peft::rng& g, double lo = -1.0, double hi = 1.0) {
  index rows = shape.empty() ? 1 : static_cast<index>(shape[0]), cols = 1;
  for (std::size_t i = 1; i < shape.size(); ++i) cols *= static_cast<index>(shape[i]);
  peft::io::stored_tensor<T> s;
  s.shape = std::move(shape);
  s.data = std::make_shared<peft::matrix<T>>(random_matrix<T>(rows, cols, g, lo, hi));
  return s;
}

/// A module's checkpoint tensors (as from_checkpoint receives them): each (name, shape) stored
/// with values uniform in [lo, hi), drawn in the order given.
template <class T>
peft::io::checkpoint_tensors<T> random_tensors(
    const std::string& module, const std::vector<std::pair<std::string, std::vector<std::int64_t>>>& tensors,
    peft::rng& g, double lo = -1.0, double hi = 1.0) {
  peft::io::checkpoint_tensors<T> m(module);
  for (const auto& [name, shape] : tensors) m.add(name, stored<T>(shape, g, lo, hi));
  return m;
}

/// An adapter_config of `peft_type` targeting `targets` (a JSON list), as a saved config reads.
inline peft::io::adapter_config config_of(const std::string& peft_type, const std::string& targets = R"(["layer"])") {
  return peft::io::adapter_config::parse(R"({"peft_type": ")" + peft_type + R"(", "target_modules": )" + targets + "}");
}

/// `ck` saved (tensors as f32) to a scratch directory named after `stem` and loaded back as A;
/// the directory is removed.
template <class A>
peft::io::basic_peft_checkpoint<A> save_and_load(peft::io::basic_peft_checkpoint<A>& ck, const std::string& stem) {
  const auto dir = scratch_path(stem);
  std::filesystem::remove_all(dir);
  peft::io::save_peft_checkpoint(dir, ck);
  auto back = peft::io::load_checkpoint_as<A>(dir);
  std::filesystem::remove_all(dir);
  return back;
}

/// Copies case `name`'s adapter to `dst`, letting `edit_config` change adapter_config.json,
/// `edit_tensors` replace tensors (name -> (shape, values)) and `drop` leave tensors out.
inline void rewrite_adapter(const std::string& name, const std::filesystem::path& dst,
                            const std::function<void(nlohmann::ordered_json&)>& edit_config,
                            const std::map<std::string, std::pair<std::vector<std::int64_t>, std::vector<float>>>& edit_tensors = {},
                            const std::vector<std::string>& drop = {}) {
  const auto src = golden_dir(name) / "adapter";
  std::filesystem::create_directories(dst);
  std::ifstream in(src / "adapter_config.json");
  auto cfg = nlohmann::ordered_json::parse(in);
  edit_config(cfg);
  std::ofstream(dst / "adapter_config.json") << cfg.dump(2);
  const auto f = peft::io::safetensors_file::open(src / "adapter_model.safetensors");
  peft::io::safetensors_writer w;
  for (const auto& t : f.tensors()) {
    if (std::find(drop.begin(), drop.end(), t.name) != drop.end()) continue;
    auto it = edit_tensors.find(t.name);
    if (it == edit_tensors.end()) {
      w.add(t.name, t.type, t.shape, f.bytes(t.name));
    } else {
      w.add(t.name, it->second.first, std::span<const float>(it->second.second));
    }
  }
  w.write(dst / "adapter_model.safetensors");
}

/// The message of the exception f throws, or "" if it throws none.
inline std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return {};
}

}  // namespace peft_test
