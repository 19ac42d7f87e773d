// LoHa: parity with HuggingFace PEFT 0.21 (tests/data/peft/loha), the Hadamard delta and its
// gradients against double loops, initialisation, saving and loading, and the errors.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "peft/io/peft/loha.hpp"
#include "peft/adapters/loha.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_loha {

using ix = peft::index;

namespace {

using peft_test::rel_error;
using peft_test::stored;
using peft_test::tolerance;

// ---- LoHa helpers ------------------------------------------------------------------------------

peft::io::adapter_config loha_config(ix r, double alpha) {
  auto c = peft_test::config_of("LOHA");
  c.r = r;
  c.raw["alpha"] = alpha;
  return c;
}

/// The four factors of a (out, in) module of rank r.
template <class T>
peft::io::checkpoint_tensors<T> loha_tensors(ix in, ix out, ix r, peft::rng& g) {
  return peft_test::random_tensors<T>(
      "layer", {{"hada_w1_a", {out, r}}, {"hada_w1_b", {r, in}}, {"hada_w2_a", {out, r}}, {"hada_w2_b", {r, in}}}, g);
}

/// a * b elementwise, in double.
template <class MA, class MB>
peft::matrix<double> hadamard(const MA& a, const MB& b) {
  peft::matrix<double> c(a.rows(), a.cols());
  for (ix i = 0; i < a.rows(); ++i)
    for (ix j = 0; j < a.cols(); ++j) c(i, j) = peft_test::at(a, i, j) * peft_test::at(b, i, j);
  return c;
}

}  // namespace

TEMPLATE_TEST_CASE("loha reproduces PEFT: layers, network, merged weights", "[loha][golden]", float, double) {
  peft_test::check_golden<peft::loha<TestType>>("loha");
}

TEST_CASE("loha golden checkpoint: rank and scale from the config", "[loha][golden]") {
  auto ck = peft::io::load_checkpoint_as<peft::loha<double>>(peft_test::golden_dir("loha") / "adapter");
  const auto& up = ck.find("up.weight")->adapter;
  CHECK(up.rank() == 8);
  CHECK(up.alpha() == 16.0);
  CHECK(up.scale() == 2.0);
  CHECK(up.in_features() == 64);
  CHECK(up.out_features() == 96);
}

TEMPLATE_TEST_CASE("loha forward, dx, delta and the four gradients equal double loops", "[loha]", float, double) {
  using T = TestType;
  peft::rng g(17);
  const ix in = 13, out = 9, batch = 4, r = 3;
  peft::loha<T> a(in, out, {.rank = r, .alpha = 5.0, .init = peft::loha_init::random, .seed = 3});
  const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(a.W2b()));
  const double s = 5.0 / 3.0;
  const auto P = peft_test::ref_nn(a.W1a(), a.W1b()), Q = peft_test::ref_nn(a.W2a(), a.W2b());
  const auto dW = peft_test::scaled(hadamard(P, Q), s);
  peft_test::check_against_delta(a, w, x, gy, dW, tolerance<T>());
  std::vector<T> db(static_cast<std::size_t>(out));
  CHECK(!a.delta_bias(w, db.data()));
  // dL/d(dW) = g^T x; through dW = s P * Q: dP = s M * Q, dQ = s M * P.
  const auto M = peft_test::ref_tn(gy, x);
  const auto dP = peft_test::scaled(hadamard(M, Q), s), dQ = peft_test::scaled(hadamard(M, P), s);
  CHECK(rel_error(a.grad_W1a(), peft_test::ref_nt(dP, a.W1b())) < tolerance<T>());
  CHECK(rel_error(a.grad_W1b(), peft_test::ref_tn(a.W1a(), dP)) < tolerance<T>());
  CHECK(rel_error(a.grad_W2a(), peft_test::ref_nt(dQ, a.W2b())) < tolerance<T>());
  CHECK(rel_error(a.grad_W2b(), peft_test::ref_tn(a.W2a(), dQ)) < tolerance<T>());
  // A second backward accumulates; zero_grad clears.
  const auto first = peft_test::to_double(a.grad_W1a());
  typename peft::loha<T>::cache_type cache;
  peft::matrix<T> dx(batch, in);
  a.backward(w, x.view(), gy.view(), dx.view(), cache);
  CHECK(rel_error(a.grad_W1a(), peft_test::scaled(first, 2.0)) < tolerance<T>());
  a.zero_grad();
  CHECK(peft_test::max_abs(a.grad_W2b()) == 0.0);
}

TEMPLATE_TEST_CASE("loha init: PEFT's default zeroes hada_w2_b only (a no-op); random is not", "[loha]", float,
                   double) {
  using T = TestType;
  peft::rng g(8);
  const ix in = 40, out = 24, r = 4;
  const auto w = peft_test::random_dense<T>(in, out, g);
  const auto x = peft_test::random_matrix<T>(3, in, g);
  peft::loha<T> a(in, out, {.rank = r, .alpha = 8.0, .seed = 1});
  peft_test::check_output_is_base(a, w, x);
  CHECK(peft_test::max_abs(a.W2b()) == 0.0);
  for (auto v : {a.W1a(), a.W1b(), a.W2a()}) {
    CHECK(peft_test::count_nonzero(v) == v.size());
    CHECK(peft_test::max_abs(v) <= 1.0 / std::sqrt(static_cast<double>(v.cols())));  // kaiming-uniform, a = sqrt 5
  }
  CHECK(peft_test::max_abs(a.W1b()) > 0.5 / std::sqrt(static_cast<double>(in)));
  CHECK(a.scale() == static_cast<T>(2.0));
  peft::loha<T> b(in, out, {.rank = r, .alpha = 8.0, .init = peft::loha_init::random, .seed = 1});
  peft_test::check_not_base(b, w, x, 1e-4);
}

TEST_CASE("loha checkpoints: rank_pattern and alpha_pattern; save and load keep every module", "[loha]") {
  peft::rng g(2);
  peft::io::checkpoint_tensors<double> none;
  auto c = loha_config(3, 6.0);
  CHECK(peft::io::from_checkpoint<peft::loha<double>>(c, loha_tensors<double>(7, 5, 3, g), none).scale() == 2.0);
  c.rank_pattern = {{"layer", 2}};
  c.alpha_pattern = {{"layer", 3.0}};
  CHECK(peft::io::from_checkpoint<peft::loha<double>>(c, loha_tensors<double>(7, 5, 2, g), none).scale() == 1.5);

  peft::io::basic_peft_checkpoint<peft::loha<double>> ck;
  ck.config.targets_kind = peft::io::target_kind::none;
  ck.modules.push_back({"m.a", "m.a.weight", peft::loha<double>(7, 5, {.rank = 2, .alpha = 3.0, .init = peft::loha_init::random, .seed = 1})});
  ck.modules.push_back({"m.b", "m.b.weight", peft::loha<double>(4, 6, {.rank = 5, .alpha = 7.5, .init = peft::loha_init::random, .seed = 2})});
  auto back = peft_test::save_and_load(ck, "peft_loha_roundtrip");
  CHECK(back.config.peft_type == "LOHA");
  REQUIRE(back.modules.size() == 2);
  for (auto& m : ck.modules) {
    auto& b = back.find(m.weight_name)->adapter;
    CHECK(b.rank() == m.adapter.rank());
    CHECK(b.scale() == m.adapter.scale());
    CHECK(rel_error(b.W2b(), m.adapter.W2b()) < 1e-7);  // stored as f32
  }
}

TEMPLATE_TEST_CASE("loha rejects bad shapes, bad checkpoints and convolutions with clear errors", "[loha]", float,
                   double) {
  using T = TestType;
  peft::rng g(4);
  peft::loha<T> a(7, 5, {.rank = 2, .init = peft::loha_init::random});
  const peft::dense<T> w(peft_test::random_matrix<T>(5, 7, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 6, 7, "[loha::forward] base weight is (6, 7)"},
                                 {pass::add_term, arg::y, 2, 6},
                                 {pass::backward_term, arg::dx, 2, 6}});
  CHECK_THROWS_AS(peft::loha<T>(7, 5, {.rank = 0}), peft::shape_error);
  CHECK_THROWS_AS(peft::loha<T>(peft::matrix<T>(5, 2), peft::matrix<T>(2, 7), peft::matrix<T>(5, 3), peft::matrix<T>(2, 7), 1.0),
                  peft::shape_error);

  const auto c = loha_config(2, 4.0);
  peft::io::checkpoint_tensors<T> none;
  REQUIRE_NOTHROW(peft::io::from_checkpoint<peft::loha<T>>(c, loha_tensors<T>(7, 5, 2, g), none));
  {
    auto m = loha_tensors<T>(7, 5, 2, g);
    m.add("hada_t1", stored<T>({2, 2, 3, 3}, g));
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::loha<T>>(c, m, none), Catch::Contains("[loha::from_checkpoint]") &&
                                                                      Catch::Contains("hada_t1/hada_t2"));
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::loha<T>>(c, m, none), peft::unsupported_error);
  }
  {
    auto m = loha_tensors<T>(7, 5, 2, g);
    m.add("hada_w1_b", stored<T>({2, 7, 1, 1}, g));
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::loha<T>>(c, m, none), peft::unsupported_error);
  }
  {
    auto m = loha_tensors<T>(7, 5, 2, g);
    m.add("hada_w2_b", stored<T>({2, 6}, g));
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::loha<T>>(c, m, none), Catch::Contains("are not (out, r), (r, in)"));
  }
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::loha<T>>(loha_config(4, 4.0), loha_tensors<T>(7, 5, 2, g), none),
                    Catch::Contains("has rank 2 but adapter_config.json gives 4"));
  {
    peft::io::checkpoint_tensors<T> m("layer");
    m.add("hada_w1_a", stored<T>({5, 2}, g));
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::loha<T>>(c, m, none), peft::format_error);
  }
  {
    auto c2 = c;
    c2.raw["alpha"] = "big";
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::loha<T>>(c2, loha_tensors<T>(7, 5, 2, g), none), peft::format_error);
  }
  CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::loha<T>>(peft_test::golden_dir("lokr") / "adapter"),
                  peft::unsupported_error);
}

}  // namespace test_loha
