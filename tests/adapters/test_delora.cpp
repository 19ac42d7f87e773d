// DeLoRA: parity with HuggingFace PEFT 0.21 (tests/data/peft/delora, delora_lambda: r 8, and r 4
// with rank_pattern / lambda_pattern giving the down layer r 6), the passes against a double
// reference of B diag(c) A diag(w) written from the definition, the gradient's structure (lambda,
// the scale invariance of A's rows and B's columns, the 1e-4 floor), PEFT's init from the base,
// saving and loading, and the errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/delora.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft/delora.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_delora {

using ix = peft::index;

namespace {

using peft_test::message_of;
using peft_test::rel_error;
using peft_test::tolerance;

/// dW = B diag(c) A diag(w) in double, c_i = (lambda / r) / (max(|A_i|, 1e-4) max(|B^i|, 1e-4)).
template <class T>
peft::matrix<double> delta_of(const peft::delora<T>& a) {
  const ix r = a.rank(), in = a.in_features(), out = a.out_features();
  const auto A = peft_test::to_double(a.A()), B = peft_test::to_double(a.B()), w = peft_test::to_double(a.w_norm());
  peft::matrix<double> d(out, in);
  for (ix i = 0; i < r; ++i) {
    double na = 0, nb = 0;
    for (ix j = 0; j < in; ++j) na += A(i, j) * A(i, j);
    for (ix o = 0; o < out; ++o) nb += B(o, i) * B(o, i);
    const double c = static_cast<double>(a.lambda()) / static_cast<double>(r) /
                     (std::max(std::sqrt(na), 1e-4) * std::max(std::sqrt(nb), 1e-4));
    for (ix o = 0; o < out; ++o)
      for (ix j = 0; j < in; ++j) d(o, j) += B(o, i) * c * A(i, j) * w(0, j);
  }
  return d;
}

template <class T>
peft::matrix<double> grad_of(peft::delora<T>& a, const std::string& name) {
  for (auto& p : a.parameters())
    if (p.name == name) return peft_test::to_double(p.grad);
  FAIL("no parameter " << name);
  return {};
}

template <class A>
void check_layers(peft_test::golden_case<A>& c, double tol) {
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    peft_test::check_layer_outputs(c, name, tol);
    CHECK(c.reference_gradients(name) == 3);  // delora_A, delora_B, delora_lambda; w_norm is a buffer
    peft_test::check_trainable_gradients(c, name, tol);
  }
}

peft::io::adapter_config delora_config(ix r, const std::string& extra = "") {
  return peft::io::adapter_config::parse(R"({"peft_type": "DELORA", "target_modules": ["layer"], "r": )" +
                                         std::to_string(r) + extra + "}");
}

}  // namespace

TEMPLATE_TEST_CASE("delora reproduces PEFT: layers, network, merged weights", "[delora][golden]", float, double) {
  using A = peft::delora<TestType>;
  for (const std::string name : {"delora", "delora_lambda"}) {
    peft_test::check_golden<A>(name, check_layers<A>, peft_test::check_network_trainable<A>, peft_test::check_merge<A>);
  }
}

TEST_CASE("delora golden checkpoints: ranks, lambda and the saved column norms of W0", "[delora][golden]") {
  auto ck = peft::io::load_checkpoint_as<peft::delora<double>>(peft_test::golden_dir("delora_lambda") / "adapter");
  CHECK(ck.find("up.weight")->adapter.rank() == 4);
  CHECK(ck.find("down.weight")->adapter.rank() == 6);  // rank_pattern {"down": 6}
  const auto base = peft::io::safetensors_file::open(peft_test::golden_dir("delora_lambda") / "base_model.safetensors");
  for (const std::string name : {"up", "down"}) {
    INFO(name);
    const auto& a = ck.find(name + ".weight")->adapter;
    REQUIRE(std::abs(a.lambda()) > 0.1);  // trained (random) lambda, not lambda_pattern's initial 5 or 3
    CHECK(a.lambda() != 5.0);
    // PEFT's delora_w_norm is W0's column norms at creation: the base of the case.
    const peft::dense<double> w(base.read_matrix<double>(name + ".weight"));
    const peft::delora<double> fresh(w, {.rank = a.rank()});
    CHECK(rel_error(a.w_norm(), fresh.w_norm()) < 1e-7);  // saved as f32
  }
}

TEST_CASE("delora golden checkpoints save and load back: tensors and config fields", "[delora][golden]") {
  for (const std::string name : {"delora", "delora_lambda"}) {
    INFO("case " << name);
    auto ck = peft::io::load_checkpoint_as<peft::delora<double>>(peft_test::golden_dir(name) / "adapter");
    auto back = peft_test::save_and_load(ck, "peft_delora_golden_" + name);
    CHECK(back.config.peft_type == "DELORA");
    for (const char* k : {"r", "rank_pattern", "delora_lambda", "lambda_pattern", "module_dropout", "init_weights"}) {
      INFO(k);
      CHECK(back.config.raw.value(k, nlohmann::ordered_json()) == ck.config.raw.value(k, nlohmann::ordered_json()));
    }
    REQUIRE(back.modules.size() == 2);
    for (auto& m : ck.modules) {
      INFO(m.weight_name);
      auto pa = m.adapter.parameters();
      auto pb = back.find(m.weight_name)->adapter.parameters();
      REQUIRE(pa.size() == 4);
      REQUIRE(pb.size() == 4);
      for (std::size_t i = 0; i < pa.size(); ++i) {
        INFO(pa[i].name);
        CHECK(pb[i].name == pa[i].name);
        CHECK(pb[i].shape == pa[i].shape);
        CHECK(pb[i].trainable == pa[i].trainable);
        CHECK(rel_error(pb[i].value, pa[i].value) == 0.0);  // f32 values saved as f32
      }
    }
  }
}

TEMPLATE_TEST_CASE("delora passes equal a double reference of B diag(c) A diag(w)", "[delora]", float, double) {
  using T = TestType;
  peft::rng g(23);
  const ix batch = 3;
  for (const auto& [in, out, r] : std::vector<std::tuple<ix, ix, ix>>{{12, 8, 3}, {5, 9, 1}, {16, 16, 4}}) {
    INFO("in " << in << ", out " << out << ", r " << r);
    std::vector<T> w(static_cast<std::size_t>(in));
    for (auto& v : w) v = static_cast<T>(g.uniform(0.5, 1.5));
    peft::delora<T> a(peft_test::random_matrix<T>(r, in, g), peft_test::random_matrix<T>(out, r, g), T(1.7), w);
    const peft::dense<double> base(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
    const auto x = peft_test::random_matrix<T>(batch, in, g);
    const auto gy = peft_test::random_matrix<T>(batch, out, g);
    REQUIRE(peft_test::nontrivial(x));
    a.zero_grad();
    const auto dw = delta_of(a);
    peft_test::check_against_delta(a, base, x, gy, dw, tolerance<T>());

    // The term is linear in lambda: dL/dlambda = sum(gy * term) / lambda.
    const auto term = peft_test::ref_nt(peft_test::to_double(x), dw);
    double expect = 0;
    for (ix i = 0; i < batch; ++i)
      for (ix o = 0; o < out; ++o) expect += static_cast<double>(gy(i, o)) * term(i, o);
    const auto dl = grad_of(a, "delora_lambda");
    CHECK(std::abs(dl(0, 0) - expect / 1.7) < tolerance<T>() * std::abs(expect));

    // Scaling A's row i or B's column i leaves the term unchanged: the gradient is orthogonal to it.
    const auto dA = grad_of(a, "delora_A"), dB = grad_of(a, "delora_B");
    const auto A = peft_test::to_double(a.A()), B = peft_test::to_double(a.B());
    for (ix i = 0; i < r; ++i) {
      double sa = 0, na = 0, ga = 0, sb = 0, nb = 0, gb = 0;
      for (ix j = 0; j < in; ++j) sa += dA(i, j) * A(i, j), na += A(i, j) * A(i, j), ga += dA(i, j) * dA(i, j);
      for (ix o = 0; o < out; ++o) sb += dB(o, i) * B(o, i), nb += B(o, i) * B(o, i), gb += dB(o, i) * dB(o, i);
      REQUIRE(ga > 0);
      REQUIRE(gb > 0);
      CHECK(std::abs(sa) < 10 * tolerance<T>() * std::sqrt(na * ga));
      CHECK(std::abs(sb) < 10 * tolerance<T>() * std::sqrt(nb * gb));
    }
  }
}

TEMPLATE_TEST_CASE("delora at PEFT's init: B = 0 below the norm floor, only B and nothing else learns", "[delora]", float,
                   double) {
  using T = TestType;
  peft::rng g(7);
  const ix in = 10, out = 6, r = 3, batch = 4;
  const auto w = peft_test::random_dense<T>(in, out, g);
  peft::delora<T> a(w, {.rank = r, .lambda = 15.0, .seed = 2});
  CHECK(peft_test::max_abs(a.B()) == 0.0);
  CHECK(a.lambda() == T(15));
  CHECK(peft_test::max_abs(a.A()) <= 1.0 / std::sqrt(10.0));
  CHECK(peft_test::count_nonzero(a.A()) == a.A().size());
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  peft_test::check_output_is_base(a, w, x);
  peft_test::check_identity_at_init(a, batch, g);
  // With B = 0 its norms sit at the floor, which passes no gradient: dB = g^T ((x * w) A^T * c),
  // c = (15 / r) / (|A_i| 1e-4); A and lambda get none.
  a.zero_grad();
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  peft::matrix<T> y(batch, out), dx(batch, in);
  typename peft::delora<T>::cache_type cache;
  a.forward(w, x.view(), y.view(), cache);
  a.backward(w, x.view(), gy.view(), dx.view(), cache);
  CHECK(peft_test::max_abs(grad_of(a, "delora_A")) == 0.0);
  CHECK(grad_of(a, "delora_lambda")(0, 0) == 0.0);
  const auto A = peft_test::to_double(a.A()), wn = peft_test::to_double(a.w_norm());
  peft::matrix<double> p(batch, r);
  for (ix i = 0; i < r; ++i) {
    double na = 0;
    for (ix j = 0; j < in; ++j) na += A(i, j) * A(i, j);
    const double c = 15.0 / r / (std::sqrt(na) * 1e-4);
    for (ix b = 0; b < batch; ++b)
      for (ix j = 0; j < in; ++j) p(b, i) += static_cast<double>(x(b, j)) * wn(0, j) * A(i, j) * c;
  }
  CHECK(rel_error(grad_of(a, "delora_B"), peft_test::ref_tn(peft_test::to_double(gy), p)) < tolerance<T>());

  // w = W0's column norms; init_weights false draws B too (U(+-1/sqrt(r))).
  const auto W = peft_test::to_double(w.weight());
  for (ix j = 0; j < in; ++j) {
    double s = 0;
    for (ix o = 0; o < out; ++o) s += W(o, j) * W(o, j);
    CHECK(std::abs(static_cast<double>(a.w_norm()(0, j)) - std::sqrt(s)) < tolerance<T>() * std::sqrt(s));
  }
  const peft::delora<T> both(w, {.rank = r, .init_weights = false, .seed = 2});
  CHECK(peft_test::count_nonzero(both.B()) == both.B().size());
  CHECK(peft_test::max_abs(both.B()) <= 1.0 / std::sqrt(3.0));
  peft_test::check_not_base(both, w, x, 1e-3);
}

TEST_CASE("delora save and load: rank_pattern entries for modules of other ranks", "[delora]") {
  peft::rng g(9);
  peft::io::basic_peft_checkpoint<peft::delora<double>> ck;
  ck.config = peft::io::adapter_config::lora(8, 8.0, {});  // a LoRA config: its fields go
  ck.config.targets_kind = peft::io::target_kind::none;
  const auto w1 = peft_test::random_dense<double>(12, 8, g), w2 = peft_test::random_dense<double>(6, 10, g);
  ck.modules.push_back({"model.a", "model.a.weight", peft::delora<double>(w1, {.rank = 2, .init_weights = false, .seed = 1})});
  ck.modules.push_back({"model.b", "model.b.weight", peft::delora<double>(w2, {.rank = 5, .init_weights = false, .seed = 2})});
  auto back = peft_test::save_and_load(ck, "peft_delora_roundtrip");
  CHECK(back.config.peft_type == "DELORA");
  CHECK(back.config.raw["r"] == 2);
  CHECK(back.config.raw["rank_pattern"] == nlohmann::ordered_json{{"model.b", 5}});
  CHECK(!back.config.raw.contains("lora_alpha"));
  REQUIRE(back.modules.size() == 2);
  for (auto& m : ck.modules) {
    INFO(m.weight_name);
    auto pa = m.adapter.parameters();
    auto pb = back.find(m.weight_name)->adapter.parameters();
    REQUIRE(pa.size() == pb.size());
    for (std::size_t i = 0; i < pa.size(); ++i) CHECK(rel_error(pb[i].value, pa[i].value) < 1e-7);  // stored as f32
  }
}

TEMPLATE_TEST_CASE("delora rejects bad shapes and bad checkpoints with clear errors", "[delora]", float, double) {
  using T = TestType;
  using peft_test::arg;
  using peft_test::pass;
  peft::rng g(3);
  const auto w = peft_test::random_dense<T>(12, 8, g);
  peft::delora<T> a(w, {.rank = 2, .init_weights = false, .seed = 1});
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 8, 16, "[delora::forward] base weight is (8, 16)"},
                                 {pass::forward, arg::x, 2, 11},
                                 {pass::backward, arg::dx, 2, 11},
                                 {pass::delta_weight, arg::dw, 8, 11, "[delora::delta_weight]"}});
  CHECK(message_of([&] { peft::delora<T>(w, {.rank = 0}); }).starts_with("[delora::delora] rank must be >= 1"));
  CHECK_THROWS_AS(peft::delora<T>(peft::matrix<T>(2, 12), peft::matrix<T>(8, 3), T(1), std::vector<T>(12)), peft::shape_error);
  CHECK(message_of([] { peft::delora<T>(peft::matrix<T>(2, 12), peft::matrix<T>(8, 2), T(1), std::vector<T>(11)); })
            .starts_with("[delora::delora] delora_w_norm has 11 values"));

  const peft::io::checkpoint_tensors<T> none;
  auto tensors = [&](ix r, ix in, ix out, std::vector<std::int64_t> lambda, ix wn) {
    return peft_test::random_tensors<T>(
        "layer", {{"delora_A", {r, in}}, {"delora_B", {out, r}}, {"delora_lambda", lambda}, {"delora_w_norm", {wn}}}, g);
  };
  const auto ok = peft::io::from_checkpoint<peft::delora<T>>(delora_config(2), tensors(2, 12, 8, {1}, 12), none);
  CHECK(ok.rank() == 2);
  CHECK(message_of([&] { peft::io::from_checkpoint<peft::delora<T>>(delora_config(4), tensors(2, 12, 8, {1}, 12), none); })
            .starts_with("[delora::from_checkpoint] module 'layer' has rank 2 (delora_A) but adapter_config.json gives 4"));
  CHECK(peft::io::from_checkpoint<peft::delora<T>>(delora_config(4, R"(, "rank_pattern": {"layer": 2})"),
                                                   tensors(2, 12, 8, {1}, 12), none)
            .rank() == 2);
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::delora<T>>(delora_config(2), tensors(2, 12, 8, {2}, 12), none),
                  peft::format_error);
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::delora<T>>(delora_config(2), tensors(2, 12, 8, {1}, 11), none),
                  peft::format_error);
  auto wrong_base = tensors(2, 12, 8, {1}, 12);
  wrong_base.set_base_shape(std::pair<ix, ix>{8, 13});
  CHECK(message_of([&] { peft::io::from_checkpoint<peft::delora<T>>(delora_config(2), wrong_base, none); })
            .find("the base is (8, 13)") != std::string::npos);
  auto no_norm = peft_test::random_tensors<T>(
      "layer", {{"delora_A", {2, 12}}, {"delora_B", {8, 2}}, {"delora_lambda", {1}}}, g);
  CHECK(message_of([&] { peft::io::from_checkpoint<peft::delora<T>>(delora_config(2), no_norm, none); })
            .find("has no tensor 'delora_w_norm'") != std::string::npos);
}

TEST_CASE("delora checkpoints: config fields honoured or refused by name", "[delora]") {
  namespace fs = std::filesystem;
  const auto dir = peft_test::scratch_path("peft_delora_fields");
  auto load_with = [&](const char* key, nlohmann::ordered_json v) {
    fs::remove_all(dir);
    peft_test::rewrite_adapter("delora", dir, [&](nlohmann::ordered_json& c) { c[key] = v; });
    return message_of([&] { peft::io::load_checkpoint_as<peft::delora<double>>(dir); });
  };
  CHECK(load_with("delora_lambda", 3).empty());  // lambda's initial value; the tensor holds the trained one
  CHECK(load_with("lambda_pattern", nlohmann::ordered_json{{"up", 2}}).empty());
  CHECK(load_with("init_weights", false).empty());
  CHECK(load_with("module_dropout", 0.1).empty());  // dropout on the input while training only
  CHECK(load_with("bias", "delora_only").starts_with("[delora::from_checkpoint] adapter_config.json: 'bias'"));
  CHECK(load_with("use_dora", true).starts_with("[delora::from_checkpoint] adapter_config.json: 'use_dora' = true"));
  CHECK(load_with("r", 4).starts_with("[delora::from_checkpoint] module 'down' has rank 8 (delora_A)"));
  fs::remove_all(dir);
}

}  // namespace test_delora
