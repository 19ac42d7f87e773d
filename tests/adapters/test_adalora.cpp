// AdaLoRA: parity with HuggingFace PEFT 0.21 (tests/data/peft/adalora), ranknum and scaling as
// PEFT sets them at load, rank_pattern budget masks, rank 0, the gradients against double loops,
// initialisation, saving and loading, and the errors.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "peft/io/peft/adalora.hpp"
#include "peft/adapters/adalora.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_adalora {

using ix = peft::index;

namespace {

using peft_test::rel_error;
using peft_test::stored;
using peft_test::tolerance;

// ---- AdaLoRA helpers ---------------------------------------------------------------------------

/// An AdaLoRA config; `masks` is the rank_pattern object (JSON text) or empty.
peft::io::adapter_config adalora_config(ix init_r, double alpha, const std::string& masks = "") {
  auto c = peft::io::adapter_config::parse(R"({"peft_type": "ADALORA", "target_modules": ["layer"], "r": 8})");
  c.raw["init_r"] = init_r;
  c.raw["target_r"] = 2;
  c.raw["total_step"] = 10;
  c.lora_alpha = alpha;
  if (!masks.empty()) c.raw["rank_pattern"] = peft::io::ordered_json::parse(masks);
  return c;
}

template <class T>
peft::io::checkpoint_tensors<T> adalora_tensors(ix in, ix out, ix r, peft::rng& g) {
  return peft_test::random_tensors<T>("layer", {{"lora_A", {r, in}}, {"lora_B", {out, r}}, {"lora_E", {r, 1}}}, g);
}

}  // namespace

TEMPLATE_TEST_CASE("adalora reproduces PEFT: layers, network, merged weights", "[adalora][golden]", float, double) {
  peft_test::check_golden<peft::adalora<TestType>>("adalora");
}

TEST_CASE("adalora golden checkpoint: ranknum is init_r, scaling is lora_alpha", "[adalora][golden]") {
  auto ck = peft::io::load_checkpoint_as<peft::adalora<double>>(peft_test::golden_dir("adalora") / "adapter");
  for (const auto& m : ck.modules) {
    CHECK(m.adapter.rank() == 8);
    CHECK(m.adapter.ranknum() == 8.0);   // float(init_r), a buffer the checkpoint does not hold
    CHECK(m.adapter.scaling() == 16.0);  // lora_alpha, not lora_alpha / r
    CHECK(m.adapter.factor() == 16.0 / (8.0 + 1e-5));
  }
}

TEST_CASE("adalora rank_pattern masks: shrunk modules keep ranknum = init_r", "[adalora]") {
  peft::rng g(6);
  peft::io::checkpoint_tensors<double> none;
  const auto c = adalora_config(6, 12.0, R"({"layer.lora_E": [true, false, true, false, false, false],
                                             "other.lora_E": [1, 1, 1, 1, 1, 0]})");
  CHECK(peft::io::peft_codec<peft::adalora<double>>::rank_for(c, "layer") == 2);
  CHECK(peft::io::peft_codec<peft::adalora<double>>::rank_for(c, "other") == 5);
  CHECK(peft::io::peft_codec<peft::adalora<double>>::rank_for(c, "elsewhere") == 6);
  const auto a = peft::io::from_checkpoint<peft::adalora<double>>(c, adalora_tensors<double>(7, 5, 2, g), none);
  CHECK(a.rank() == 2);
  CHECK(a.ranknum() == 6.0);
  CHECK(a.factor() == 12.0 / (6.0 + 1e-5));
  // lora_alpha <= 0: PEFT's scaling is the module's (resized) rank.
  const auto z = peft::io::from_checkpoint<peft::adalora<double>>(adalora_config(6, 0.0, R"({"layer.lora_E": [1, 0, 1, 0, 0, 0]})"),
                                                        adalora_tensors<double>(7, 5, 2, g), none);
  CHECK(z.scaling() == 2.0);
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::adalora<double>>(c, adalora_tensors<double>(7, 5, 3, g), none),
                    Catch::Contains("has rank 3 but adapter_config.json gives 2"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::adalora<double>>(adalora_config(6, 1.0, R"({"layer.lora_E": [true]})"),
                                                           adalora_tensors<double>(7, 5, 1, g), none),
                    Catch::Contains("list of init_r = 6 booleans"));
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::adalora<double>>(adalora_config(6, 1.0, R"({"layer.lora_E": [2, 0, 0, 0, 0, 0]})"),
                                                         adalora_tensors<double>(7, 5, 1, g), none),
                  peft::format_error);
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::adalora<double>>(adalora_config(6, 1.0, R"([1, 2])"),
                                                         adalora_tensors<double>(7, 5, 6, g), none),
                  peft::format_error);
}

TEMPLATE_TEST_CASE("adalora with rank 0 (allowed by PEFT) is the base layer", "[adalora]", float, double) {
  using T = TestType;
  peft::rng g(9);
  peft::io::checkpoint_tensors<T> none;
  const auto a = peft::io::from_checkpoint<peft::adalora<T>>(adalora_config(3, 4.0, R"({"layer.lora_E": [false, false, false]})"),
                                                   adalora_tensors<T>(7, 5, 0, g), none);
  REQUIRE(a.rank() == 0);
  const peft::dense<T> w(peft_test::random_matrix<T>(5, 7, g), peft_test::random_vector<T>(5, g));
  const auto x = peft_test::random_matrix<T>(2, 7, g);
  const auto gy = peft_test::random_matrix<T>(2, 5, g);
  peft::matrix<T> h(2, 5), y(2, 5), dx(2, 7), dx0(2, 7), dw(5, 7, T{1});
  w.matmul(x.view(), h.view());
  w.matmul_t(gy.view(), dx0.view());
  auto b = a;
  typename peft::adalora<T>::cache_type cache;
  b.forward(w, x.view(), y.view(), cache);
  CHECK(peft_test::exactly_equal(y, h));
  b.backward(w, x.view(), gy.view(), dx.view(), cache);
  CHECK(peft_test::exactly_equal(dx, dx0));
  b.delta_weight(w, dw.view());
  CHECK(peft_test::max_abs(dw) == 0.0);
}

TEMPLATE_TEST_CASE("adalora forward, dx, delta and the gradients of A, E, B equal double loops", "[adalora]", float,
                   double) {
  using T = TestType;
  peft::rng g(12);
  const ix in = 11, out = 6, batch = 3, r = 4;
  peft::adalora<T> a(in, out, {.rank = r, .alpha = 5.0, .init = peft::adalora_init::random, .seed = 4});
  const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(a.E()));
  const double f = 5.0 / (4.0 + 1e-5);
  peft::matrix<double> ae(r, in);  // A * E
  for (ix k = 0; k < r; ++k)
    for (ix j = 0; j < in; ++j) ae(k, j) = peft_test::at(a.A(), k, j) * peft_test::at(a.E(), k, 0);
  const auto dW = peft_test::scaled(peft_test::ref_nn(a.B(), ae), f);
  peft_test::check_against_delta(a, w, x, gy, dW, tolerance<T>());
  // D = g^T x = dL/d(dW): dB = f D (A*E)^T, d(A*E) = f B^T D, dA = d(A*E) * E, dE_k = sum_j d(A*E)_kj A_kj.
  const auto D = peft_test::ref_tn(gy, x);
  const auto dAE = peft_test::scaled(peft_test::ref_tn(a.B(), D), f);
  peft::matrix<double> dA(r, in), dE(r, 1);
  for (ix k = 0; k < r; ++k)
    for (ix j = 0; j < in; ++j) {
      dA(k, j) = dAE(k, j) * peft_test::at(a.E(), k, 0);
      dE(k, 0) += dAE(k, j) * peft_test::at(a.A(), k, j);
    }
  CHECK(rel_error(a.grad_B(), peft_test::scaled(peft_test::ref_nt(D, ae), f)) < tolerance<T>());
  CHECK(rel_error(a.grad_A(), dA) < tolerance<T>());
  CHECK(rel_error(a.grad_E(), dE) < tolerance<T>());
  // backward without a forward (empty cache) gives the same.
  peft::adalora<T> b = a;
  b.zero_grad();
  typename peft::adalora<T>::cache_type fresh;
  peft::matrix<T> dx(batch, in);
  b.backward(w, x.view(), gy.view(), dx.view(), fresh);
  CHECK(rel_error(b.grad_E(), dE) < tolerance<T>());
}

TEMPLATE_TEST_CASE("adalora init: PEFT's default has E = 0 (a no-op), A and B ~ N(0, 0.02^2)", "[adalora]", float,
                   double) {
  using T = TestType;
  peft::rng g(1);
  const ix in = 64, out = 48, r = 8;
  const auto w = peft_test::random_dense<T>(in, out, g);
  const auto x = peft_test::random_matrix<T>(2, in, g);
  const peft::adalora<T> a(in, out, {.rank = r, .alpha = 32.0, .seed = 5});
  peft_test::check_output_is_base(a, w, x);
  CHECK(peft_test::max_abs(a.E()) == 0.0);
  const double sd_a = peft_test::frobenius(a.A()) / std::sqrt(static_cast<double>(r * in));
  const double sd_b = peft_test::frobenius(a.B()) / std::sqrt(static_cast<double>(out * r));
  CHECK(sd_a == Approx(0.02).epsilon(0.1));
  CHECK(sd_b == Approx(0.02).epsilon(0.1));
  CHECK(a.ranknum() == 8.0);
  CHECK(a.scaling() == 32.0);
  peft::adalora<T> zero_alpha(in, out, {.rank = r, .alpha = 0.0});
  CHECK(zero_alpha.scaling() == 8.0);  // PEFT: lora_alpha if > 0 else r
  peft::adalora<T> rnd(in, out, {.rank = r, .alpha = 32.0, .init = peft::adalora_init::random, .seed = 5});
  peft_test::check_not_base(rnd, w, x, 1e-3);
  CHECK(peft_test::frobenius(rnd.A()) / std::sqrt(static_cast<double>(r * in)) == Approx(1.0).epsilon(0.1));
}

TEST_CASE("adalora describe_in: init_r, lora_alpha, total_step and rank masks; save and load", "[adalora]") {
  peft::rng g(3);
  peft::io::checkpoint_tensors<double> none;
  // Modules of rank < init_r need a mask; loading with the described config gives them back.
  peft::io::adapter_config c;
  c.targets_kind = peft::io::target_kind::list;
  c.target_modules = {"layer"};
  const auto full = peft::io::from_checkpoint<peft::adalora<double>>(adalora_config(6, 12.0), adalora_tensors<double>(7, 5, 6, g), none);
  const auto shrunk = peft::io::from_checkpoint<peft::adalora<double>>(
      adalora_config(6, 12.0, R"({"layer.lora_E": [1, 1, 0, 0, 0, 0]})"), adalora_tensors<double>(7, 5, 2, g), none);
  peft::io::describe_in(full, c, "full");
  peft::io::describe_in(shrunk, c, "layer");
  CHECK(c.peft_type == "ADALORA");
  CHECK(c.raw["init_r"] == 6);
  CHECK(c.lora_alpha == 12.0);
  CHECK(c.raw["total_step"] == 1);
  CHECK(c.raw["rank_pattern"]["layer.lora_E"] ==
        peft::io::ordered_json::parse("[true, true, false, false, false, false]"));
  CHECK(peft::io::peft_codec<peft::adalora<double>>::rank_for(c, "layer") == 2);
  // Another ranknum or scaling cannot share the config.
  const peft::adalora<double> other_r(7, 5, {.rank = 4, .alpha = 12.0});
  CHECK_THROWS_AS(peft::io::describe_in(other_r, c, "x"), peft::unsupported_error);
  const peft::adalora<double> other_alpha(7, 5, {.rank = 6, .alpha = 3.0});
  CHECK_THROWS_AS(peft::io::describe_in(other_alpha, c, "y"), peft::unsupported_error);

  // A save/load round trip of full-rank modules.
  peft::io::basic_peft_checkpoint<peft::adalora<double>> ck;
  ck.config.targets_kind = peft::io::target_kind::none;
  ck.modules.push_back({"m.a", "m.a.weight", peft::adalora<double>(7, 5, {.rank = 3, .alpha = 6.0, .init = peft::adalora_init::random, .seed = 1})});
  ck.modules.push_back({"m.b", "m.b.weight", peft::adalora<double>(4, 9, {.rank = 3, .alpha = 6.0, .init = peft::adalora_init::random, .seed = 2})});
  auto back = peft_test::save_and_load(ck, "peft_adalora_roundtrip");
  CHECK(back.config.peft_type == "ADALORA");
  REQUIRE(back.modules.size() == 2);
  for (auto& m : ck.modules) {
    auto& b = back.find(m.weight_name)->adapter;
    CHECK(b.rank() == 3);
    CHECK(b.ranknum() == 3.0);
    CHECK(b.factor() == m.adapter.factor());
    CHECK(rel_error(b.E(), m.adapter.E()) < 1e-7);  // stored as f32
    CHECK(rel_error(b.B(), m.adapter.B()) < 1e-7);
  }
}

TEMPLATE_TEST_CASE("adalora rejects bad shapes and bad checkpoints with clear errors", "[adalora]", float, double) {
  using T = TestType;
  peft::rng g(14);
  peft::adalora<T> a(7, 5, {.rank = 2, .init = peft::adalora_init::random});
  const peft::dense<T> w(peft_test::random_matrix<T>(5, 7, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 5, 8, "[adalora::forward] base weight is (5, 8)"},
                                 {pass::forward, arg::y, 3, 5},
                                 {pass::backward, arg::dy, 3, 5}});
  CHECK_THROWS_AS(peft::adalora<T>(7, 5, {.rank = -1}), peft::shape_error);
  CHECK_THROWS_AS(peft::adalora<T>(peft::matrix<T>(2, 7), peft::matrix<T>(5, 2), peft::matrix<T>(2, 2), 1.0, 2.0),
                  peft::shape_error);
  CHECK_THROWS_AS(peft::adalora<T>(peft::matrix<T>(2, 7), peft::matrix<T>(5, 2), peft::matrix<T>(2, 1), 1.0, -1e-5),
                  peft::shape_error);

  peft::io::checkpoint_tensors<T> none;
  const auto c = adalora_config(2, 4.0);
  REQUIRE_NOTHROW(peft::io::from_checkpoint<peft::adalora<T>>(c, adalora_tensors<T>(7, 5, 2, g), none));
  {
    auto m = adalora_tensors<T>(7, 5, 2, g);
    m.add("lora_E", stored<T>({2}, g));  // a vector, not (r, 1)
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::adalora<T>>(c, m, none), peft::format_error);
  }
  {
    auto m = adalora_tensors<T>(7, 5, 2, g);
    m.add("lora_B", stored<T>({5, 3}, g));
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::adalora<T>>(c, m, none), Catch::Contains("are not (r, in), (out, r), (r, 1)"));
  }
  {
    auto m = adalora_tensors<T>(7, 5, 2, g);
    m.add("lora_embedding_A", stored<T>({2, 7}, g));
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::adalora<T>>(c, m, none), peft::unsupported_error);
  }
  {
    auto m = adalora_tensors<T>(7, 5, 2, g);
    m.add("ranknum", stored<T>({1}, g));  // saved by old PEFT versions; PEFT 0.21 ignores it
    CHECK(peft::io::from_checkpoint<peft::adalora<T>>(c, m, none).ranknum() == 2.0);
  }
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::adalora<T>>(adalora_config(3, 4.0), adalora_tensors<T>(7, 5, 2, g), none),
                    Catch::Contains("has rank 2 but adapter_config.json gives 3"));
  {
    auto c2 = c;
    c2.raw["init_r"] = 2.5;
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::adalora<T>>(c2, adalora_tensors<T>(7, 5, 2, g), none), peft::format_error);
  }
  CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::adalora<T>>(peft_test::golden_dir("lora") / "adapter"),
                  peft::unsupported_error);
}

}  // namespace test_adalora
