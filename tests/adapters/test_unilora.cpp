// Uni-LoRA: parity with HuggingFace PEFT 0.21 on tests/data/peft/unilora (save_indices, r 4,
// theta_d_length 200, proj_seed 42) and unilora_regen (PEFT's default save_indices = false, r 3,
// theta_d_length 97, proj_seed 2025: the indices rebuilt by make_unilora_layers): each layer's
// output and dx, the network's y and dL/dx, theta_d's gradient (summed over both layers), merged
// weights; numpy's generator and generate_index against tests/data/unilora_index; theta_d shared
// and saved once; save round trips; the codec's and constructors' errors.
#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "peft/adapters/unilora.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/numpy_generator.hpp"
#include "peft/io/peft/unilora.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_unilora {

namespace {

namespace fs = std::filesystem;
using peft::index;

template <class T>
using golden_case = peft_test::golden_case<peft::unilora<T>>;

const std::string theta_grad_key = "grad.base_model.model.up.unilora_theta_d.default";

/// The records of tests/data/unilora_index/reference.txt (kind, then its integers).
std::vector<std::pair<std::string, std::vector<std::uint64_t>>> index_reference() {
  std::ifstream in(fs::path(PEFT_TEST_DATA_DIR) / "unilora_index" / "reference.txt");
  REQUIRE(in.good());
  std::vector<std::pair<std::string, std::vector<std::uint64_t>>> out;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ss(line);
    std::pair<std::string, std::vector<std::uint64_t>> r;
    ss >> r.first;
    for (std::uint64_t v; ss >> v;) r.second.push_back(v);
    out.push_back(std::move(r));
  }
  return out;
}

/// The two layers of case `name` with adapters rebuilt from its config and theta_d by
/// make_unilora_layers (the modules in PEFT's order: up, then down).
template <class T>
struct rebuilt_case {
  using layer_type = peft::adapted_linear<peft::dense<float>, peft::unilora<T>>;
  peft::io::safetensors_file base, reference;
  peft::io::adapter_config config;
  layer_type up, down;

  explicit rebuilt_case(const std::string& name)
      : base(peft::io::safetensors_file::open(peft_test::golden_dir(name) / "base_model.safetensors")),
        reference(peft::io::safetensors_file::open(peft_test::golden_dir(name) / "reference.safetensors")),
        config(peft::io::adapter_config::load(peft_test::golden_dir(name) / "adapter")),
        up(peft_test::load_base(base, "up")),
        down(peft_test::load_base(base, "down")) {
    const auto f = peft::io::safetensors_file::open(peft_test::golden_dir(name) / "adapter" / "adapter_model.safetensors");
    const auto values = f.read<T>("base_model.unilora_theta_d");
    auto theta = std::make_shared<peft::unilora_theta<T>>(peft::matrix<T>(1, static_cast<index>(values.size()), values));
    const peft::unilora_options opt{.rank = config.r,
                                    .theta_d_length = config.integer("theta_d_length", 256, "test"),
                                    .proj_seed = static_cast<std::uint64_t>(config.integer("proj_seed", 42, "test"))};
    auto layers = peft::make_unilora_layers<T>({{up.in_features(), up.out_features()},
                                                {down.in_features(), down.out_features()}},
                                               opt, theta);
    REQUIRE(layers.size() == 2);
    up.add_adapter("default", layers[0]);
    down.add_adapter("default", layers[1]);
  }
  peft::matrix<double> ref(const std::string& n) const { return reference.read_matrix<double>(n); }
  peft::matrix<T> ref_t(const std::string& n) const { return reference.read_matrix<T>(n); }
  layer_type& layer(const std::string& n) { return n == "up" ? up : down; }
};

/// y = down(relu(up(x))) and dL/dx, both layers' gradients zeroed first (any case type).
template <class Case, class T>
std::pair<peft::matrix<T>, peft::matrix<T>> network(Case& c, const peft::matrix<T>& x, const peft::matrix<T>& gy) {
  peft::matrix<T> h(x.rows(), c.up.out_features()), a(h.rows(), h.cols()), y(x.rows(), c.down.out_features());
  c.up.forward(x, h);
  for (index i = 0; i < h.rows(); ++i)
    for (index j = 0; j < h.cols(); ++j) a(i, j) = h(i, j) > 0 ? h(i, j) : T{0};
  c.down.forward(a, y);
  peft::matrix<T> da(a.rows(), a.cols()), dx(x.rows(), x.cols());
  c.up.zero_grad();
  c.down.zero_grad();
  c.down.backward(a, gy, da);
  for (index i = 0; i < da.rows(); ++i)
    for (index j = 0; j < da.cols(); ++j) da(i, j) = h(i, j) > 0 ? da(i, j) : T{0};
  c.up.backward(x, da, dx);
  return {std::move(y), std::move(dx)};
}

/// Network, theta_d's gradient, each layer alone and merge_and_unload against PEFT (any case).
template <class Case>
void check_case(Case& c, double tol) {
  using T = typename Case::layer_type::scalar;
  const auto x = c.ref_t("x");
  const auto gy = c.ref_t("grad_y");
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(gy));
  const auto [y, dx] = network<Case, T>(c, x, gy);
  CHECK(peft_test::rel_error(y, c.ref("y")) < tol);
  CHECK(peft_test::rel_error(dx, c.ref("grad_x")) < tol);
  const auto& theta = *c.up.adapter("default").theta();
  REQUIRE(c.down.adapter("default").theta().get() == &theta);
  const auto g_ref = c.ref(theta_grad_key);
  REQUIRE(peft_test::count_nonzero(g_ref) == g_ref.size());
  CHECK(peft_test::rel_error(theta.grad, g_ref) < tol);
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto& layer = c.layer(name);
    const auto xi = c.ref_t("layer." + name + ".input");
    const auto gi = c.ref_t("layer." + name + ".grad_output");
    REQUIRE(peft_test::count_nonzero(xi) > xi.size() / 4);
    peft::matrix<T> yi(xi.rows(), layer.out_features()), yb(xi.rows(), layer.out_features()),
        dxi(xi.rows(), layer.in_features());
    layer.forward(xi, yi);
    layer.zero_grad();
    layer.backward(xi, gi, dxi);
    layer.base().matmul(peft::matrix_view<const T>(xi.view()), yb.view());
    const auto y_ref = c.ref("layer." + name + ".output");
    CHECK(peft_test::rel_error(yi, y_ref) < tol);
    REQUIRE(peft_test::rel_error(yb, y_ref) > 1e-3);  // the adapter is not a no-op
    CHECK(peft_test::rel_error(dxi, c.ref("layer." + name + ".grad_input")) < tol);
    // merge_and_unload: the delta on the exact double base, then into the f32 base.
    const auto w0 = c.base.template read_matrix<double>(name + ".weight");
    const auto w_ref = c.ref("merged." + name + ".weight");
    REQUIRE(peft_test::rel_error(w0, w_ref) > 1e-3);
    const peft::dense<double> exact(w0, c.base.template read<double>(name + ".bias"));
    peft::matrix<T> dw(layer.out_features(), layer.in_features());
    const auto& a = layer.adapter("default");
    a.delta_weight(exact, dw.view());
    CHECK(peft_test::rel_error(peft_test::add(w0, dw), w_ref) < tol);
    std::vector<T> db(static_cast<std::size_t>(layer.out_features()));
    CHECK_FALSE(a.delta_bias(exact, db.data()));
    layer.merge("default");
    CHECK(peft_test::rel_error(layer.base().weight(), w_ref) < 1e-6);
    const peft::matrix<float> b(1, layer.out_features(), layer.base().bias());
    CHECK(peft_test::exactly_equal(b, c.ref("merged." + name + ".bias")));
  }
}

}  // namespace

TEST_CASE("unilora: numpy's default_rng, choice without replacement and generate_index match numpy",
          "[unilora][numpy_generator]") {
  const auto records = index_reference();
  int raw = 0, choice = 0, idx = 0;
  for (const auto& [kind, v] : records) {
    INFO(kind << " seed/size " << v[0] << " " << v[1]);
    if (kind == "raw") {
      peft::numpy_generator g(v[0]);
      for (std::uint64_t k = 0; k < v[1]; ++k) CHECK(g.next_uint64() == v[2 + k]);
      ++raw;
    } else if (kind == "choice") {
      peft::numpy_generator g(v[0]);
      const auto got = g.choice_without_replacement(static_cast<std::int64_t>(v[1]), static_cast<std::int64_t>(v[2]));
      REQUIRE(got.size() == v[2]);
      for (std::size_t k = 0; k < got.size(); ++k) CHECK(static_cast<std::uint64_t>(got[k]) == v[3 + k]);
      ++choice;
    } else if (kind == "index") {
      const auto got = peft::unilora_generate_index(static_cast<std::int64_t>(v[0]), static_cast<std::int64_t>(v[1]), v[2]);
      REQUIRE(got.size() == v[0]);
      std::uint64_t sum = 0;
      for (std::size_t k = 0; k < got.size(); ++k) sum += (k + 1) * static_cast<std::uint64_t>(got[k]);
      CHECK(sum == v[4]);
      for (std::size_t k = 0; k < v[3]; ++k) CHECK(static_cast<std::uint64_t>(got[k]) == v[5 + k]);
      ++idx;
    }
  }
  CHECK(raw == 6);
  CHECK(choice == 6);  // Floyd's algorithm and the tail shuffle
  CHECK(idx == 8);
  // Every index value is used floor(D / d) or ceil(D / d) times.
  const auto v = peft::unilora_generate_index(1000, 300, 5);
  std::vector<int> counts(300);
  for (const auto i : v) ++counts[static_cast<std::size_t>(i)];
  CHECK(std::count(counts.begin(), counts.end(), 4) == 100);
  CHECK(std::count(counts.begin(), counts.end(), 3) == 200);
  CHECK_THROWS_AS(peft::unilora_generate_index(10, 0, 1), peft::shape_error);
  peft::numpy_generator g(1);
  CHECK_THROWS_AS(g.choice_without_replacement(3, 4), peft::shape_error);
}

TEMPLATE_TEST_CASE("unilora golden: layers, network, theta_d's gradient and merge match PEFT (save_indices)",
                   "[unilora][golden]", float, double) {
  using T = TestType;
  golden_case<T> c("unilora");
  const auto& up = c.up.adapter("default");
  REQUIRE(peft_test::nontrivial(up.theta()->value));
  CHECK(up.rank() == 4);
  CHECK(up.theta_d_length() == 200);
  check_case(c, peft_test::tolerance<T>());
}

TEMPLATE_TEST_CASE("unilora golden: make_unilora_layers redraws PEFT's indices and scales exactly",
                   "[unilora][golden]", float, double) {
  using T = TestType;
  golden_case<T> c("unilora");
  const auto layers = peft::make_unilora_layers<T>({{64, 96}, {96, 48}}, {.rank = 4, .theta_d_length = 200, .proj_seed = 42},
                                                   c.up.adapter("default").theta());
  for (std::size_t k = 0; k < 2; ++k) {
    const auto& stored = k == 0 ? c.up.adapter("default") : c.down.adapter("default");
    INFO("layer " << k);
    CHECK(layers[k].indices_A() == stored.indices_A());
    CHECK(layers[k].indices_B() == stored.indices_B());
    CHECK(peft_test::exactly_equal(layers[k].scales_A(), stored.scales_A()));
    CHECK(peft_test::exactly_equal(layers[k].scales_B(), stored.scales_B()));
  }
  // PEFT's scales: 1/sqrt of how often the index is used over both layers (1216 uses of 200).
  std::vector<int> n(200);
  for (const auto& l : layers) {
    for (const auto i : l.indices_A()) ++n[static_cast<std::size_t>(i)];
    for (const auto i : l.indices_B()) ++n[static_cast<std::size_t>(i)];
  }
  CHECK(std::count(n.begin(), n.end(), 7) == 16);
  CHECK(std::count(n.begin(), n.end(), 6) == 184);
  CHECK(layers[0].scales_A()(0, 0) == static_cast<T>(1.0f / std::sqrt(static_cast<float>(n[static_cast<std::size_t>(
                                                            layers[0].indices_A()[0])]))));
}

TEMPLATE_TEST_CASE("unilora golden: PEFT's default save_indices = false, the layers rebuilt from proj_seed",
                   "[unilora][golden][regen]", float, double) {
  using T = TestType;
  // The loader refuses it: the file holds theta_d only.
  const auto msg = peft_test::message_of(
      [] { peft::io::load_checkpoint_as<peft::unilora<T>>(peft_test::golden_dir("unilora_regen") / "adapter"); });
  CHECK(msg.rfind("[unilora::from_checkpoint] adapter_config.json: 'save_indices' = false", 0) == 0);
  CHECK(msg.find("make_unilora_layers") != std::string::npos);
  CHECK_THROWS_AS(peft::io::load_peft_checkpoint<T>(peft_test::golden_dir("unilora_regen") / "adapter"),
                  peft::unsupported_error);
  rebuilt_case<T> c("unilora_regen");
  CHECK(c.up.adapter("default").rank() == 3);
  CHECK(c.up.adapter("default").theta_d_length() == 97);
  check_case(c, peft_test::tolerance<T>());
}

TEST_CASE("unilora: theta_d is shared by the modules, counted and saved once", "[unilora][shared][io]") {
  golden_case<double> c("unilora");
  auto& up = c.checkpoint.find("up.weight")->adapter;
  auto& down = c.checkpoint.find("down.weight")->adapter;
  REQUIRE(up.theta() != nullptr);
  CHECK(up.theta().get() == down.theta().get());
  CHECK(c.up.adapter("default").theta().get() == up.theta().get());  // a copy shares it
  CHECK(c.checkpoint.parameter_count() == 200);                      // PEFT's count: theta_d once
  for (auto& p : up.parameters()) {
    INFO(p.name);
    CHECK(p.trainable == (p.name == "unilora_theta_d"));
    CHECK(p.shared == (p.name == "unilora_theta_d"));
    CHECK(p.integer == p.name.starts_with("unilora_indices_"));
  }
  // Zeroing theta_d through one module zeroes the other's term.
  const auto w = peft_test::load_base(c.base, "down");
  const auto x = c.ref_t("layer.down.input");
  CHECK(peft_test::rel_error(peft_test::run_forward(down, w, x), peft_test::base_output(w, x)) > 1e-3);
  for (auto& p : up.parameters()) {
    if (p.name != "unilora_theta_d") continue;
    for (index j = 0; j < p.value.cols(); ++j) p.value(0, j) = 0.0;
  }
  CHECK(peft_test::rel_error(peft_test::run_forward(down, w, x), peft_test::base_output(w, x)) < 1e-15);
}

TEST_CASE("unilora: save round trips; rebuilt layers save with save_indices", "[unilora][io]") {
  const auto dir = peft_test::scratch_path("peft_unilora_roundtrip");
  {
    golden_case<double> c("unilora");
    fs::remove_all(dir);
    peft::io::save_peft_checkpoint(dir, c.checkpoint);
    const auto saved = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
    const auto original =
        peft::io::safetensors_file::open(peft_test::golden_dir("unilora") / "adapter" / "adapter_model.safetensors");
    std::vector<std::string> names, expected;
    for (const auto& t : saved.tensors()) names.push_back(t.name);
    for (const auto& t : original.tensors()) expected.push_back(t.name);
    std::sort(names.begin(), names.end());
    std::sort(expected.begin(), expected.end());
    CHECK(names == expected);
    for (const auto& n : expected) {
      INFO(n);
      CHECK(saved.info(n).shape == original.info(n).shape);
      CHECK(saved.read<double>(n) == original.read<double>(n));
    }
    const auto cfg = peft::io::adapter_config::load(dir);
    CHECK(cfg.peft_type == "UNILORA");
    CHECK(cfg.r == 4);
    CHECK(cfg.raw["theta_d_length"] == 200);
    CHECK(cfg.raw["proj_seed"] == 42);
    CHECK(cfg.raw["save_indices"] == true);
    auto back = peft::io::load_checkpoint_as<peft::unilora<double>>(dir);
    CHECK(back.find("up.weight")->adapter.theta().get() == back.find("down.weight")->adapter.theta().get());
    for (const std::string layer : {"up", "down"}) {
      const auto w = peft_test::load_base(c.base, layer);
      const auto x = c.ref_t("layer." + layer + ".input");
      CHECK(peft_test::exactly_equal(peft_test::run_forward(back.find(layer + ".weight")->adapter, w, x),
                                     peft_test::run_forward(c.checkpoint.find(layer + ".weight")->adapter, w, x)));
    }
  }
  {
    // A save_indices = false checkpoint converted: rebuilt, saved with its indices, loaded back.
    rebuilt_case<double> c("unilora_regen");
    peft::io::basic_peft_checkpoint<peft::unilora<double>> ck;
    ck.config = c.config;
    ck.add("up", c.up.adapter("default"));
    ck.add("down", c.down.adapter("default"));
    fs::remove_all(dir);
    peft::io::save_peft_checkpoint(dir, ck);
    const auto cfg = peft::io::adapter_config::load(dir);
    CHECK(cfg.raw["save_indices"] == true);
    CHECK(cfg.raw["proj_seed"] == 2025);
    auto back = peft::io::load_checkpoint_as<peft::unilora<double>>(dir);
    const auto x = c.ref_t("layer.up.input");
    CHECK(peft_test::rel_error(peft_test::run_forward(back.find("up.weight")->adapter, c.up.base(), x),
                               c.ref("layer.up.output")) < 1e-12);
    // Fresh layers carry their numbers into the config.
    auto fresh = peft::make_unilora_layers<double>({{6, 4}, {4, 5}}, {.rank = 2, .theta_d_length = 9, .proj_seed = 3});
    peft::io::basic_peft_checkpoint<peft::unilora<double>> f;
    f.add("a", fresh[0]);
    f.add("b", fresh[1]);
    auto fb = peft_test::save_and_load(f, "peft_unilora_fresh");
    CHECK(fb.config.raw["theta_d_length"] == 9);
    CHECK(fb.config.raw["proj_seed"] == 3);
    CHECK(fb.config.r == 2);
    CHECK(fb.find("a.weight")->adapter.indices_A() == fresh[0].indices_A());
  }
  fs::remove_all(dir);
}

TEST_CASE("unilora: malformed checkpoints and unsupported fields are rejected", "[unilora][errors][io]") {
  const auto dir = peft_test::scratch_path("peft_unilora_malformed");
  auto keep = [](auto&) {};
  auto load = [&] { peft::io::load_checkpoint_as<peft::unilora<double>>(dir); };
  auto rejects = [&](const std::function<void(nlohmann::ordered_json&)>& edit,
                     const std::map<std::string, std::pair<std::vector<std::int64_t>, std::vector<float>>>& tensors,
                     const std::vector<std::string>& drop, const std::string& expected) {
    fs::remove_all(dir);
    peft_test::rewrite_adapter("unilora", dir, edit, tensors, drop);
    const auto msg = peft_test::message_of(load);
    INFO(msg);
    CHECK(msg.find(expected) != std::string::npos);
  };
  rejects([](auto& j) { j["theta_d_length"] = 201; }, {}, {}, "theta_d_length = 201");
  rejects([](auto& j) { j["r"] = 3; }, {}, {}, "r = 3");
  rejects([](auto& j) { j["proj_seed"] = -1; }, {}, {}, "proj_seed = -1");
  rejects([](auto& j) { j["save_indices"] = false; }, {}, {}, "'save_indices' = false");
  rejects([](auto& j) { j["bias"] = "unilora_only"; }, {}, {}, "'bias'");
  rejects([](auto& j) { j["use_magic"] = true; }, {}, {}, "'use_magic'");
  rejects(keep, {}, {"base_model.unilora_theta_d"}, "no base_model.unilora_theta_d");
  rejects(keep, {}, {"base_model.model.up.unilora_scales_B"}, "unilora_scales_B");
  rejects(keep, {{"base_model.model.up.unilora_scales_A", {{4, 63}, std::vector<float>(4 * 63, 0.5f)}}}, {},
          "unilora_scales_A");
  rejects(keep, {{"base_model.model.up.unilora_indices_A", {{4, 64}, std::vector<float>(4 * 64, 200.0f)}}}, {},
          "not an index in [0, theta_d_length = 200)");
  rejects(keep, {{"base_model.model.up.unilora_indices_A", {{4, 64}, std::vector<float>(4 * 64, 1.5f)}}}, {},
          "holds 1.5");
  rejects(keep, {{"base_model.model.up.unilora_indices_B", {{96, 3}, std::vector<float>(96 * 3, 1.0f)}}}, {},
          "are not (r, in) and (out, r)");
  rejects(keep, {{"base_model.unilora_theta_d", {{10, 20}, std::vector<float>(200, 0.1f)}}}, {}, "expected 1 dimensions");
  // The training-only fields pass.
  fs::remove_all(dir);
  peft_test::rewrite_adapter("unilora", dir, [](auto& j) {
    j["unilora_dropout"] = 0.1;
    j["init_theta_d_bound"] = 0.5;
    j["init_weights"] = false;
  });
  CHECK_NOTHROW(load());
  // Modules that disagree on r cannot be saved under one UniLoraConfig.
  {
    auto a = peft::make_unilora_layers<double>({{6, 4}}, {.rank = 2, .theta_d_length = 9});
    auto b = peft::make_unilora_layers<double>({{6, 4}}, {.rank = 3, .theta_d_length = 9});
    peft::io::basic_peft_checkpoint<peft::unilora<double>> ck;
    ck.add("a", a[0]);
    ck.add("b", b[0]);
    const auto msg = peft_test::message_of([&] { peft::io::save_peft_checkpoint(dir, ck); });
    CHECK(msg.rfind("[unilora::describe_in]", 0) == 0);
    CHECK(msg.find("r = 3") != std::string::npos);
  }
  fs::remove_all(dir);
}

TEST_CASE("unilora: constructor errors and the passes' shape checks", "[unilora][errors]") {
  auto theta = peft::make_unilora_theta<double>(10, 0.5, true, 1);
  CHECK(theta->length() == 10);
  CHECK(peft_test::nontrivial(theta->value));
  const std::vector<std::int64_t> ia(2 * 3, 1), ib(4 * 2, 2);
  const peft::matrix<double> sa(2, 3), sb(4, 2);
  CHECK_NOTHROW(peft::unilora<double>(theta, 2, 3, 4, ia, ib, sa, sb));
  CHECK_THROWS_AS(peft::unilora<double>(nullptr, 2, 3, 4, ia, ib, sa, sb), peft::shape_error);
  CHECK_THROWS_AS(peft::unilora<double>(theta, 0, 3, 4, {}, {}, peft::matrix<double>(), peft::matrix<double>()),
                  peft::shape_error);
  CHECK_THROWS_AS(peft::unilora<double>(theta, 2, 3, 4, std::vector<std::int64_t>(5, 1), ib, sa, sb), peft::shape_error);
  CHECK_THROWS_AS(peft::unilora<double>(theta, 2, 3, 4, ia, ib, peft::matrix<double>(3, 2), sb), peft::shape_error);
  auto bad = ib;
  bad[3] = 10;
  const auto msg = peft_test::message_of([&] { peft::unilora<double>(theta, 2, 3, 4, ia, bad, sa, sb); });
  CHECK(msg == "[unilora::unilora] unilora_indices_B holds 10, not an index in [0, theta_d_length = 10)");
  CHECK_THROWS_AS(peft::make_unilora_layers<double>({{3, 4}}, {.theta_d_length = 11}, theta), peft::shape_error);
  CHECK_THROWS_AS(peft::make_unilora_layers<double>({{0, 4}}, {}), peft::shape_error);
  CHECK_THROWS_AS(peft::make_unilora_theta<double>(0), peft::shape_error);
  peft::unilora<double> empty;
  CHECK(empty.parameters().empty());
  CHECK_THROWS_AS(empty.lora_matrices(), peft::error);
  // The adapter's term is (x A^T) B^T with A, B gathered from theta_d.
  peft::unilora<double> a(theta, 2, 3, 4, {0, 1, 2, 3, 4, 5}, {9, 8, 7, 6, 5, 4, 3, 2},
                          peft::matrix<double>(2, 3, {1, 2, 3, 4, 5, 6}), peft::matrix<double>(4, 2, 0.5));
  const auto [am, bm] = a.lora_matrices();
  CHECK(am(1, 2) == theta->value(0, 5) * 6);
  CHECK(bm(0, 1) == theta->value(0, 8) * 0.5);
  using peft_test::arg;
  using peft_test::pass;
  peft::rng g(3);
  const auto w = peft_test::random_dense<double>(3, 4, g);
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::x, 2, 5},
                                 {pass::forward, arg::y, 2, 7},
                                 {pass::backward, arg::dx, 2, 4},
                                 {pass::delta_weight, arg::dw, 3, 4},
                                 {pass::forward, arg::base, 5, 3, "[unilora::forward] base weight is (5, 3)",
                                  peft_test::match::prefix}});
  peft_test::check_unset_rejected<peft::unilora<double>, peft::error>(w);
  // forward, dx and delta_weight against the materialised delta B A.
  const auto x = peft_test::random_matrix<double>(5, 3, g);
  const auto gy = peft_test::random_matrix<double>(5, 4, g);
  const std::vector<std::int64_t> ja{0, 1, 2, 3, 4, 5}, jb{9, 8, 7, 6, 5, 4, 3, 2};
  peft::matrix<double> dW(4, 3);
  for (index i = 0; i < 4; ++i)
    for (index j = 0; j < 3; ++j)
      for (index q = 0; q < 2; ++q)
        dW(i, j) += theta->value(0, jb[static_cast<std::size_t>(i * 2 + q)]) * 0.5 *
                    theta->value(0, ja[static_cast<std::size_t>(q * 3 + j)]) * static_cast<double>(q * 3 + j + 1);
  peft_test::check_against_delta(a, w, x, gy, dW, 1e-13);
}

}  // namespace test_unilora
