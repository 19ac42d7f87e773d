// FRoD: parity with HuggingFace PEFT 0.21.2 (tests/data/peft/frod_*, made by
// scripts/make_frod_golden.py: two fc layers sharing one category's V and S indices, a head of
// another category, sparse rates 0.1 / 0.5 / the default 0.01, a Conv1D model): forward, dx,
// every gradient, U (derived from the SAVED V and W0) and the merged weights; the passes against
// a double reference of U (S + diag(lambda_l)) V^T written from the definition; PEFT's init;
// merge and unmerge; saving and loading; and the errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "peft/adapters/frod.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/io/merge.hpp"
#include "peft/io/peft/frod.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"
#include "support/traits_frod.hpp"

namespace test_frod {

using ix = peft::index;

namespace {

using peft_test::message_of;
using peft_test::rel_error;
using peft_test::tolerance;

const std::vector<std::string> cases = {"frod_basic", "frod_dense_s", "frod_default_rate", "frod_conv1d"};
const std::vector<std::string> layers = {"layers.0.fc", "layers.1.fc", "head"};

bool is_conv(const std::string& name) { return name == "frod_conv1d"; }

/// The frozen layer `name` of a case as nn.Linear's (out, in), Conv1D's (in, out) transposed.
peft::dense<float> base_layer(const peft::io::safetensors_file& f, const std::string& name, bool conv) {
  auto w = f.read_matrix<float>(name + ".weight");
  if (conv) {
    peft::matrix<float> t(w.cols(), w.rows());
    for (ix i = 0; i < w.rows(); ++i)
      for (ix j = 0; j < w.cols(); ++j) t(j, i) = w(i, j);
    w = std::move(t);
  }
  return peft::dense<float>(std::move(w), f.read<float>(name + ".bias"));
}

/// W0 (out, in) of the case's base model in double, for the loader (PEFT's U needs it).
peft::io::base_weight_fn base_weights(const std::filesystem::path& base_file, bool conv) {
  return [base_file, conv](const std::string& module) -> std::optional<peft::matrix<double>> {
    const auto f = peft::io::safetensors_file::open(base_file);
    return peft::dequantized_weight<double>(base_layer(f, module, conv));
  };
}

template <class A>
peft::io::basic_peft_checkpoint<A> load_case(const std::string& name, const std::string& adapter = "adapter") {
  const auto dir = peft_test::golden_dir(name);
  return peft::io::load_checkpoint_as<A>(dir / adapter, {}, base_weights(dir / "base_model.safetensors", is_conv(name)));
}

/// U (S + diag(lambda_l)) V^T in double, written from the definition.
template <class T>
peft::matrix<double> w_eff_of(const peft::frod<T>& a) {
  const ix in = a.in_features(), out = a.out_features();
  peft::matrix<double> s(in, in);
  for (ix i = 0; i < in; ++i) s(i, i) = static_cast<double>(a.lambda_l()(0, i));
  const auto& idx = *a.shared_indices();
  for (ix k = 0; k < a.nnz(); ++k) {
    s(static_cast<ix>(idx(0, k)), static_cast<ix>(idx(1, k))) += static_cast<double>(a.s_values()(0, k));
  }
  const auto& v = *a.shared_V();
  peft::matrix<double> sv(in, in), w(out, in);
  for (ix i = 0; i < in; ++i)
    for (ix j = 0; j < in; ++j) {
      double acc = 0;
      for (ix l = 0; l < in; ++l) acc += s(i, l) * static_cast<double>(v(j, l));
      sv(i, j) = acc;
    }
  for (ix o = 0; o < out; ++o)
    for (ix j = 0; j < in; ++j) {
      double acc = 0;
      for (ix l = 0; l < in; ++l) acc += static_cast<double>(a.U()(o, l)) * sv(l, j);
      w(o, j) = acc;
    }
  return w;
}

}  // namespace

TEMPLATE_TEST_CASE("frod reproduces PEFT: layers, U, gradients, merged weights", "[frod][golden]", float, double) {
  using T = TestType;
  using A = peft::frod<T>;
  const double tol = tolerance<T>();
  for (const auto& name : cases) {
    INFO("case " << name);
    const bool conv = is_conv(name);
    const auto dir = peft_test::golden_dir(name);
    const auto base = peft::io::safetensors_file::open(dir / "base_model.safetensors");
    const auto ref = peft::io::safetensors_file::open(dir / "reference.safetensors");
    auto ck = load_case<A>(name);
    REQUIRE(ck.modules.size() == 3);
    CHECK(ck.config.fan_in_fan_out == conv);
    // The two fc layers share their category's tensors; head has its own.
    const A& fc0 = ck.find("layers.0.fc.weight")->adapter;
    const A& fc1 = ck.find("layers.1.fc.weight")->adapter;
    const A& head = ck.find("head.weight")->adapter;
    CHECK(fc0.category() == "fc");
    CHECK(head.category() == "head");
    CHECK(fc0.shared_V() == fc1.shared_V());
    CHECK(fc0.shared_indices() == fc1.shared_indices());
    CHECK(fc0.shared_V() != head.shared_V());
    for (const auto& l : layers) {
      INFO("layer " << l);
      peft::adapted_linear<peft::dense<float>, A> layer(base_layer(base, l, conv));
      layer.add_adapter("default", ck.find(l + ".weight")->adapter);
      const A& a = layer.adapter("default");
      REQUIRE(a.nnz() > 0);
      // U from the saved V and W0 equals PEFT's (float32 values: exact up to the solve's last bit).
      CHECK(rel_error(a.U(), ref.read_matrix<double>("frod_U." + l)) < 1e-12);
      const auto x = ref.read_matrix<T>("layer." + l + ".input");
      const auto g = ref.read_matrix<T>("layer." + l + ".grad_output");
      REQUIRE(peft_test::count_nonzero(x) > x.size() / 4);  // relu outputs for the later layers
      REQUIRE(peft_test::count_nonzero(g) > g.size() / 4);
      peft::matrix<T> y(x.rows(), layer.out_features()), dx(x.rows(), layer.in_features());
      layer.forward(x, y);
      layer.zero_grad();
      layer.backward(x, g, dx);
      CHECK(rel_error(y, ref.read_matrix<double>("layer." + l + ".output")) < tol);
      CHECK(rel_error(dx, ref.read_matrix<double>("layer." + l + ".grad_input")) < tol);
      auto params = layer.adapter("default").parameters();
      int trained = 0;
      for (auto& p : params) {
        if (!p.trainable) continue;
        INFO(p.name);
        const auto want = ref.read_matrix<double>("grad.base_model.model." + l + "." + p.name + ".default");
        REQUIRE(peft_test::count_nonzero(want) == want.size());
        CHECK(rel_error(p.grad, want) < tol);
        ++trained;
      }
      CHECK(trained == 2);
      // W0 + dW against PEFT's merged weight (Conv1D: stored (in, out))
      const auto& w = layer.base();
      peft::matrix<T> dw(a.out_features(), a.in_features());
      a.delta_weight(w, dw.view());
      auto mt = ref.read_matrix<double>("merged." + l + ".weight");
      peft::matrix<double> merged(a.out_features(), a.in_features());
      for (ix o = 0; o < a.out_features(); ++o)
        for (ix i = 0; i < a.in_features(); ++i) {
          merged(o, i) = static_cast<double>(w.weight()(o, i)) + static_cast<double>(dw(o, i));
        }
      peft::matrix<double> want(a.out_features(), a.in_features());
      for (ix o = 0; o < a.out_features(); ++o)
        for (ix i = 0; i < a.in_features(); ++i) want(o, i) = conv ? mt(i, o) : mt(o, i);
      CHECK(rel_error(merged, want) < tol);
      CHECK(rel_error(ref.read_matrix<double>("merged." + l + ".bias"), peft::matrix<double>(1, a.out_features(), base.read<double>(l + ".bias"))) == 0);
    }
  }
}

TEST_CASE("frod's init over PEFT's V: lambda_l = the column norms of W0 V^-T, S = 0, W' = W0 to float32", "[frod][golden]") {
  for (const auto& name : cases) {
    INFO("case " << name);
    const auto dir = peft_test::golden_dir(name);
    const auto base = peft::io::safetensors_file::open(dir / "base_model.safetensors");
    const auto ref = peft::io::safetensors_file::open(dir / "reference.safetensors");
    auto ck = load_case<peft::frod<double>>(name);
    for (const auto& l : layers) {
      INFO("layer " << l);
      const auto& loaded = ck.find(l + ".weight")->adapter;
      const auto w = base_layer(base, l, is_conv(name));
      const peft::frod<double> fresh(w, loaded.shared_V(), loaded.shared_indices(), loaded.category());
      CHECK(rel_error(fresh.U(), ref.read_matrix<double>("frod_U." + l)) < 1e-12);
      CHECK(peft_test::count_nonzero(fresh.s_values()) == 0);
      // the golden lambda_l is PEFT's init times 1 + 0.3 N(0, 1): within a factor 3 of it
      for (ix j = 0; j < fresh.in_features(); ++j) {
        CHECK(fresh.lambda_l()(0, j) > 0);
        CHECK(std::abs(loaded.lambda_l()(0, j)) < 3 * fresh.lambda_l()(0, j));
      }
      const auto weff = w_eff_of(fresh);
      CHECK(rel_error(weff, w.weight()) < 1e-6);
      CHECK(rel_error(weff, w.weight()) > 0);  // U is float32: not exactly W0 (as in PEFT)
    }
  }
}

TEMPLATE_TEST_CASE("frod passes equal a double reference of U (S + diag(lambda_l)) V^T", "[frod]", float, double) {
  using T = TestType;
  peft::rng g(3);
  for (auto [in, out] : std::vector<std::pair<ix, ix>>{{6, 4}, {3, 9}, {12, 12}}) {
    INFO("in " << in << " out " << out);
    auto a = peft_test::adapter_traits<peft::frod<T>>::make_random(in, out, g);
    const auto w = peft_test::random_dense<float>(in, out, g);
    const auto dW = peft_test::add(w_eff_of(a), w.weight(), -1.0);
    const auto x = peft_test::random_matrix<T>(5, in, g);
    const auto gy = peft_test::random_matrix<T>(5, out, g);
    REQUIRE(peft_test::nontrivial(x));
    peft_test::check_against_delta(a, w, x, gy, dW, tolerance<T>());
  }
}

TEST_CASE("frod gradients equal finite differences in double (lambda_l, S values, x)", "[frod]") {
  peft::rng g(5);
  auto a = peft_test::adapter_traits<peft::frod<double>>::make_random(7, 4, g);
  const auto w = peft_test::random_dense<double>(7, 4, g);
  const auto x = peft_test::random_matrix<double>(3, 7, g);
  const auto gy = peft_test::random_matrix<double>(3, 4, g);
  auto loss = [&] {
    peft::frod<double>::cache_type c;
    peft::matrix<double> y(3, 4);
    a.forward(w, x.view(), y.view(), c);
    double s = 0;
    for (ix i = 0; i < y.rows(); ++i)
      for (ix j = 0; j < y.cols(); ++j) s += y(i, j) * gy(i, j);
    return s;
  };
  peft::frod<double>::cache_type c;
  peft::matrix<double> dx(3, 7);
  a.zero_grad();
  a.backward(w, x.view(), gy.view(), dx.view(), c);
  CHECK(rel_error(a.grad_lambda_l(), peft_test::fd_gradient(a.lambda_l(), 1e-6, loss)) < 1e-8);
  CHECK(rel_error(a.grad_s_values(), peft_test::fd_gradient(a.s_values(), 1e-6, loss)) < 1e-8);
  auto xm = x;
  auto loss_x = [&] {
    peft::frod<double>::cache_type cc;
    peft::matrix<double> y(3, 4);
    a.forward(w, xm.view(), y.view(), cc);
    double s = 0;
    for (ix i = 0; i < y.rows(); ++i)
      for (ix j = 0; j < y.cols(); ++j) s += y(i, j) * gy(i, j);
    return s;
  };
  CHECK(rel_error(dx, peft_test::fd_gradient(xm.view(), 1e-6, loss_x)) < 1e-8);
}

TEMPLATE_TEST_CASE("frod merge and unmerge are exact; the merged weight alone cannot be unmerged", "[frod]", float,
                   double) {
  using T = TestType;
  peft::rng g(7);
  auto a = peft_test::adapter_traits<peft::frod<T>>::make_random(9, 5, g);
  const auto w0 = peft_test::random_dense<double>(9, 5, g);
  peft::adapted_linear<peft::dense<double>, peft::frod<T>> layer(w0);
  layer.add_adapter("a", a);
  const auto x = peft_test::random_matrix<T>(4, 9, g);
  peft::matrix<T> before(4, 5), after(4, 5);
  layer.forward(x, before);
  layer.merge("a");
  CHECK(rel_error(layer.base().weight(), w_eff_of(a)) < tolerance<T>());
  layer.forward(x, after);
  CHECK(rel_error(after, before) < tolerance<T>());
  layer.unmerge("a");
  CHECK(rel_error(layer.base().weight(), w0.weight()) < 1e-13);
  // without the merge's record
  peft::matrix<T> dw(5, 9);
  CHECK(message_of([&] { a.unmerge_delta(w0, dw.view()); }).starts_with("[frod::unmerge_delta] the merged weight"));
}

TEST_CASE("frod_category is PEFT's _category_from_key", "[frod]") {
  CHECK(peft::frod_category("model.layers.3.q_proj") == "q_proj");
  CHECK(peft::frod_category("h.0.attn.c_attn") == "attn_c_attn");
  CHECK(peft::frod_category("encoder.layer.0.attention.self.query") == "self_query");
  CHECK(peft::frod_category("encoder.layer.0.attention.output.dense") == "attention_output");
  CHECK(peft::frod_category("encoder.layer.0.output.dense") == "output_dense");
  CHECK(peft::frod_category("head") == "head");
  CHECK(peft::frod_category("layers.0.fc") == "fc");
}

TEST_CASE("frod golden checkpoints save and load back: tensors, shared categories, config", "[frod][golden]") {
  namespace fs = std::filesystem;
  for (const auto& name : cases) {
    INFO("case " << name);
    auto ck = load_case<peft::frod<double>>(name);
    const auto dir = peft_test::scratch_path("peft_frod_save_" + name);
    fs::remove_all(dir);
    peft::io::save_peft_checkpoint(dir, ck);
    const auto base_file = peft_test::golden_dir(name) / "base_model.safetensors";
    auto back = peft::io::load_checkpoint_as<peft::frod<double>>(dir, {}, base_weights(base_file, is_conv(name)));
    CHECK(back.config.peft_type == "FROD");
    CHECK(back.config.raw["save_projection"] == true);
    CHECK(back.config.raw["sparse_rate"] == ck.config.raw["sparse_rate"]);
    REQUIRE(back.modules.size() == 3);
    const auto f = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
    CHECK(f.info("base_model.frod_V.fc").shape == std::vector<std::int64_t>{f.info("base_model.frod_V.fc").shape[0],
                                                                             f.info("base_model.frod_V.fc").shape[0]});
    CHECK(f.info("base_model.frod_s_size.head").shape == std::vector<std::int64_t>{2});
    for (auto& m : ck.modules) {
      auto pa = m.adapter.parameters();
      auto pb = back.find(m.weight_name)->adapter.parameters();
      REQUIRE(pa.size() == pb.size());
      for (std::size_t i = 0; i < pa.size(); ++i) {
        CHECK(pa[i].name == pb[i].name);
        CHECK(rel_error(pb[i].value, pa[i].value) == 0);  // float32 values, stored as f32
      }
      CHECK(rel_error(back.find(m.weight_name)->adapter.U(), m.adapter.U()) == 0);
    }
    CHECK(back.parameter_count() == ck.parameter_count());
    fs::remove_all(dir);
  }
}

TEST_CASE("frod checkpoints: config fields honoured or refused by name", "[frod]") {
  namespace fs = std::filesystem;
  const auto dir = peft_test::scratch_path("peft_frod_fields");
  const auto base_file = peft_test::golden_dir("frod_basic") / "base_model.safetensors";
  auto load_with = [&](const char* key, nlohmann::ordered_json v) {
    fs::remove_all(dir);
    peft_test::rewrite_adapter("frod_basic", dir, [&](nlohmann::ordered_json& c) { c[key] = v; });
    return message_of([&] { peft::io::load_checkpoint_as<peft::frod<double>>(dir, {}, base_weights(base_file, false)); });
  };
  CHECK(load_with("frod_dropout", 0.1).empty());  // training only
  CHECK(load_with("runtime_offload_base_weight", true).empty());  // memory only
  CHECK(load_with("regularization_alpha", 0.5).empty());  // V is saved
  CHECK(load_with("projection_prng_key", 3).empty());     // the indices are saved
  CHECK(load_with("progressbar", true).empty());
  CHECK(load_with("init_weights", false).empty());
  CHECK(load_with("save_projection", false)
            .starts_with("[frod::from_checkpoint] the adapter was saved with save_projection=false"));
  CHECK(load_with("sparse_rate", 0.2).find("'sparse_rate' = 0.2") != std::string::npos);
  CHECK(load_with("sparse_rate", 1.5).find("'sparse_rate' = 1.5") != std::string::npos);
  CHECK(load_with("bias", "all").starts_with("[frod::from_checkpoint] adapter_config.json: 'bias'"));
  CHECK(load_with("bias", "frod_only").starts_with("[frod::from_checkpoint] adapter_config.json: 'bias'"));
  CHECK(load_with("use_dora", true).starts_with("[frod::from_checkpoint] adapter_config.json: 'use_dora' = true"));
  // no base weight: U cannot be derived
  CHECK(message_of([&] { peft::io::load_checkpoint_as<peft::frod<double>>(peft_test::golden_dir("frod_basic") / "adapter"); })
            .find("FRoD's U = colnorm(W0 V^-T) is never saved") != std::string::npos);
  // a missing shared tensor
  fs::remove_all(dir);
  peft_test::rewrite_adapter("frod_basic", dir, [](nlohmann::ordered_json&) {}, {}, {"base_model.frod_V.head"});
  CHECK(message_of([&] { peft::io::load_checkpoint_as<peft::frod<double>>(dir, {}, base_weights(base_file, false)); })
            .find("no base_model.frod_V.head") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("frod merges into a quantized base are refused; merge_model over f32 matches PEFT", "[frod][golden]") {
  namespace fs = std::filesystem;
  const auto dir = peft_test::golden_dir("frod_basic");
  const fs::path out = peft_test::scratch_path("peft_frod_q.safetensors");
  peft::io::merge_options opt;
  opt.quantized_base = "int8";
  CHECK(message_of([&] { peft::io::merge_model(dir / "base_model.safetensors", dir / "adapter", out, opt); })
            .find("FRoD); merging it into a quantized base (int8) is not supported") != std::string::npos);
  CHECK(!fs::exists(out));
}

TEMPLATE_TEST_CASE("frod rejects bad shapes and inputs with clear errors", "[frod]", float, double) {
  using T = TestType;
  peft::rng g(11);
  const peft::dense<double> w(peft_test::random_matrix<double>(4, 5, g));
  auto v = peft_test::frod_random_v<T>(5, g);
  auto idx = peft_test::frod_random_indices<T>(5, 3, g);
  CHECK(message_of([&] { peft::frod<T>(w, peft_test::frod_random_v<T>(4, g), idx, "fc"); })
            .starts_with("[frod_basis_of] frod_V is (4, 4)"));
  auto bad = std::make_shared<peft::matrix<T>>(*idx);
  (*bad)(0, 1) = 5;
  CHECK(message_of([&] { peft::frod<T>(w, v, bad, "fc"); }).starts_with("[frod::frod] frod_s_indices entry 1"));
  CHECK(message_of([&] { peft::frod<T>(w, v, idx, nullptr, "fc", std::vector<T>(4, T{1}), {}); })
            .starts_with("[frod::frod] frod_lambda_l has 4 values"));
  auto singular = std::make_shared<peft::matrix<T>>(5, 5);
  CHECK(message_of([&] { peft::frod<T>(w, singular, idx, "fc"); }).starts_with("[frod_basis_of] frod_V is singular"));
  peft::frod<T> a(w, v, idx, "fc");
  peft::matrix<T> x(2, 4), y(2, 4);
  typename peft::frod<T>::cache_type c;
  CHECK_THROWS_AS(a.forward(w, x.view(), y.view(), c), peft::shape_error);
  peft_test::check_unset_rejected<peft::frod<T>, peft::error>(w);
}

TEST_CASE("frod save from C++: one sparse_rate for every module, or refused", "[frod]") {
  namespace fs = std::filesystem;
  peft::rng g(13);
  peft::io::basic_peft_checkpoint<peft::frod<double>> ck;
  ck.config = peft::io::adapter_config::lora(8, 8.0, {});  // a LoRA config: its fields go
  ck.config.targets_kind = peft::io::target_kind::none;
  const peft::dense<double> w1(peft_test::random_matrix<double>(6, 10, g)), w2(peft_test::random_matrix<double>(3, 10, g));
  auto v = peft_test::frod_random_v<double>(10, g);
  for (auto& e : v->storage()) e = static_cast<double>(static_cast<float>(e));  // saved as f32 exactly
  auto idx = peft_test::frod_random_indices<double>(10, 10, g);  // sparse_rate 0.1 for in 10
  ck.modules.push_back({"model.layers.0.q", "model.layers.0.q.weight", peft::frod<double>(w1, v, idx, "q")});
  ck.modules.push_back({"model.layers.1.q", "model.layers.1.q.weight", peft::frod<double>(w2, v, idx, "q")});
  const auto dir = peft_test::scratch_path("peft_frod_cpp");
  fs::remove_all(dir);
  peft::io::save_peft_checkpoint(dir, ck);
  CHECK(!ck.config.raw.contains("r"));
  CHECK(!ck.config.raw.contains("lora_alpha"));
  const double rate = ck.config.raw["sparse_rate"].get<double>();
  CHECK(static_cast<long long>(100 * rate) == 10);
  auto back = peft::io::load_checkpoint_as<peft::frod<double>>(dir, {}, [&](const std::string& m) {
    return std::optional<peft::matrix<double>>(peft::dequantized_weight<double>(m == "model.layers.0.q" ? w1 : w2));
  });
  REQUIRE(back.modules.size() == 2);
  CHECK(back.modules[0].adapter.shared_V() == back.modules[1].adapter.shared_V());
  for (auto& m : ck.modules) CHECK(rel_error(back.find(m.weight_name)->adapter.U(), m.adapter.U()) == 0);
  fs::remove_all(dir);
  // another module of in 10 with 20 entries: no one sparse_rate fits both
  ck.modules.push_back({"model.layers.2.k", "model.layers.2.k.weight",
                        peft::frod<double>(w1, v, peft_test::frod_random_indices<double>(10, 20, g), "k")});
  CHECK(message_of([&] { peft::io::save_peft_checkpoint(dir, ck); })
            .starts_with("[frod::describe_in] module 'model.layers.2.k' has 20 S entries"));
  fs::remove_all(dir);
}

}  // namespace test_frod
