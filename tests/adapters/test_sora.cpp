// sora (Ding et al. 2023): parity with the paper's formula (tests/data/paper/sora, float64
// PyTorch), the soft threshold and the official code's threshold, the proximal gate step, the
// L1 term, the threshold schedule, compaction to a plain LoRA, init, and errors.
#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/adapters/sora.hpp"
#include "peft/io/peft/sora.hpp"
#include "peft/base/dense.hpp"
#include "support/adapter_checks.hpp"
#include "support/gated_rank_checks.hpp"
#include "support/test_support.hpp"

namespace test_sora {

namespace {

using peft_test::rel_error;

/// A random sora adapter with every parameter non-zero (|g_i| in [0.2, 1), random signs).
template <class T>
peft::sora<T> random_adapter(peft::index in, peft::index out, peft::index r, peft::rng& g) {
  return peft_test::random_gated<peft::sora<T>>(in, out, r, g, 0.5);
}

/// Forward + backward of L = sum(y * gy) on random data: fills the adapter's gradients.
template <class T>
void accumulate_gradients(peft::sora<T>& a, peft::rng& g) {
  const auto w = peft::dense<T>(peft_test::random_matrix<T>(a.out_features(), a.in_features(), g));
  const auto x = peft_test::random_matrix<T>(3, a.in_features(), g);
  const auto gy = peft_test::random_matrix<T>(3, a.out_features(), g);
  peft::matrix<T> y(3, a.out_features()), dx(3, a.in_features());
  typename peft::sora<T>::cache_type cache;
  a.zero_grad();
  a.forward(w, x, y, cache);
  a.backward(w, x, gy, dx, cache);
}

}  // namespace

TEMPLATE_TEST_CASE("sora matches the paper's formula (golden)", "[sora][golden]", float, double) {
  using T = TestType;
  // one layer 64 -> 48, r_max = 8, alpha = 16, batch 5, gate_1 = 0
  peft_test::gated_case<peft::sora<T>> c("sora", "gate", static_cast<T>(2.0));
  peft_test::check_gated_case(c, 8, 7, "grad.gate", peft_test::tolerance<T>());  // one gate entry already zero
  CHECK(c.adapter.grad_gate()(0, 1) != T{0});  // a zero gate still has a gradient (it may come back)
}

TEMPLATE_TEST_CASE("sora: init (A kaiming-uniform, B = 0, g ~ N(0, 1)) is the identity", "[sora][init]", float, double) {
  using T = TestType;
  const peft::index in = 50, out = 30, r = 4000;
  const peft::sora<T> a(in, out, {.rank = r, .alpha = 16.0, .seed = 3});
  CHECK(a.scale() == static_cast<T>(16.0 / static_cast<double>(r)));
  CHECK(peft_test::count_nonzero(a.B()) == 0);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  CHECK(peft_test::max_abs(a.A()) <= bound);
  CHECK(peft_test::max_abs(a.A()) > 0.99 * bound);
  CHECK(peft_test::nontrivial(a.A()));
  const auto m = peft_test::moments_of(a.gate());
  CHECK(std::abs(m.mean) < 0.06);  // 4 standard errors
  CHECK(std::abs(m.mean_square - m.mean * m.mean - 1.0) < 0.1);
  CHECK(a.active_rank() == r);
  const peft::sora<T> same(in, out, {.rank = r, .alpha = 16.0, .seed = 3});
  const peft::sora<T> other(in, out, {.rank = r, .alpha = 16.0, .seed = 4});
  CHECK(peft_test::exactly_equal(same.gate(), a.gate()));
  CHECK_FALSE(peft_test::exactly_equal(other.gate(), a.gate()));

  peft::rng g(8);
  const peft::sora<T> small(in, out, {.rank = 3, .alpha = 6.0, .seed = 1});
  const auto w = peft::dense<T>(peft_test::random_matrix<T>(out, in, g), peft_test::random_vector<T>(out, g));
  peft_test::check_output_is_base(small, w, peft_test::random_matrix<T>(3, in, g));
}

TEST_CASE("sora: soft threshold and the official code's threshold", "[sora][threshold]") {
  static_assert(peft::soft_threshold(3.0, 1.0) == 2.0);
  static_assert(peft::sora_official_threshold(1.5, 1.0) == 0.0);
  struct row {
    double z, xi, soft, official;
  };
  // soft: sign(z) max(|z| - xi, 0); official: z > xi: z -= xi; z < -xi: z += xi; |z| < xi: 0
  const std::vector<row> rows{
      {3.0, 1.0, 2.0, 2.0},    {-3.0, 1.0, -2.0, -2.0}, {0.5, 1.0, 0.0, 0.0},  {-0.5, 1.0, 0.0, 0.0},
      {1.0, 1.0, 0.0, 1.0},    {-1.0, 1.0, 0.0, -1.0},  {1.5, 1.0, 0.5, 0.0},  {-1.5, 1.0, -0.5, 0.0},
      {2.0, 1.0, 1.0, 1.0},    {-2.0, 1.0, -1.0, -1.0}, {2.5, 1.0, 1.5, 1.5},  {0.0, 1.0, 0.0, 0.0},
      {0.7, 0.0, 0.7, 0.7},    {-0.7, 0.0, -0.7, -0.7}, {0.0, 0.0, 0.0, 0.0},  {1e-3, 3e-4, 7e-4, 7e-4},
  };
  for (const auto& r : rows) {
    INFO("z " << r.z << " xi " << r.xi);
    CHECK(peft::soft_threshold(r.z, r.xi) == Approx(r.soft).margin(1e-15));
    CHECK(peft::sora_official_threshold(r.z, r.xi) == Approx(r.official).margin(1e-15));
    CHECK(peft::soft_threshold(static_cast<float>(r.z), static_cast<float>(r.xi)) == Approx(r.soft).margin(1e-7));
    // T_xi is the proximal operator of xi |.|: u = argmin 0.5 (u - z)^2 + xi |u|, optimality:
    // u != 0: u - z + xi sign(u) = 0; u = 0: |z| <= xi
    const double u = peft::soft_threshold(r.z, r.xi);
    if (u != 0.0) {
      CHECK(std::abs(u - r.z + r.xi * (u > 0 ? 1.0 : -1.0)) < 1e-15);
    } else {
      CHECK(std::abs(r.z) <= r.xi);
    }
  }
  CHECK(std::isnan(peft::soft_threshold(std::numeric_limits<double>::quiet_NaN(), 1.0)));
}

TEMPLATE_TEST_CASE("sora: the proximal gate step", "[sora][proximal]", float, double) {
  using T = TestType;
  peft::rng g(17);
  auto a = random_adapter<T>(11, 6, 6, g);
  a.gate()(0, 0) = T(0.01);  // small gates: the threshold zeroes them
  a.gate()(0, 1) = T(-0.02);
  accumulate_gradients(a, g);
  REQUIRE(peft_test::count_nonzero(a.grad_gate()) == 6);
  const auto g0 = peft::to_matrix(a.gate());
  const auto dg = peft::to_matrix(a.grad_gate());
  const double eta = 1e-3, lambda = 50.0;  // threshold eta lambda = 0.05
  a.proximal_step(eta, lambda);
  for (peft::index i = 0; i < 6; ++i) {
    const double z = static_cast<double>(g0(0, i)) - eta * static_cast<double>(dg(0, i));
    const double expect = z > 0.05 ? z - 0.05 : (z < -0.05 ? z + 0.05 : 0.0);
    CHECK(static_cast<double>(a.gate()(0, i)) == Approx(expect).margin(std::is_same_v<T, double> ? 1e-15 : 1e-7));
  }
  CHECK(a.gate()(0, 0) == T{0});
  CHECK(a.gate()(0, 1) == T{0});
  CHECK(a.active_rank() == 4);
  CHECK(rel_error(a.grad_gate(), dg) == 0.0);  // the gradient is left for zero_grad()

  // gate_step: proximal by default; official_code thresholds the gate as it is (eta unused)
  auto b = random_adapter<T>(5, 4, 4, g);
  const std::array<T, 4> gates{T(0.3), T(-0.15), T(0.1), T(-0.05)};
  for (peft::index i = 0; i < 4; ++i) b.gate()(0, i) = gates[static_cast<std::size_t>(i)];
  auto c = b;
  CHECK(b.gate_rule() == peft::sora_gate_rule::proximal);
  b.gate_step(1.0, 0.1);  // zero gradient: plain soft threshold with xi = 0.1
  c.set_gate_rule(peft::sora_gate_rule::official_code);
  c.gate_step(123.0, 0.1);
  const std::array<double, 4> soft{0.2, -0.05, 0.0, 0.0}, official{0.2, 0.0, 0.1, 0.0};
  for (peft::index i = 0; i < 4; ++i) {
    CHECK(static_cast<double>(b.gate()(0, i)) == Approx(soft[static_cast<std::size_t>(i)]).margin(1e-7));
    CHECK(static_cast<double>(c.gate()(0, i)) == Approx(official[static_cast<std::size_t>(i)]).margin(1e-7));
  }
  // official rule: |g| < 2 xi -> 0 (0.15 < 0.2), the strict comparisons keep |g| == xi (0.1)

  CHECK_THROWS_AS(a.proximal_step(-1.0, 1.0), peft::error);
  CHECK_THROWS_AS(a.proximal_step(1.0, -1.0), peft::error);
  CHECK_THROWS_AS(a.proximal_step(std::numeric_limits<double>::quiet_NaN(), 1.0), peft::error);
  CHECK_THROWS_WITH(a.official_threshold(-0.1), Catch::Contains("[sora::official_threshold]"));
}

TEMPLATE_TEST_CASE("sora: the L1 term of the official code", "[sora][l1]", float, double) {
  using T = TestType;
  peft::rng g(4);
  auto a = random_adapter<T>(5, 3, 5, g);
  a.gate()(0, 2) = T{0};
  double l1 = 0.0;
  for (peft::index i = 0; i < 5; ++i) l1 += std::abs(static_cast<double>(a.gate()(0, i)));
  REQUIRE(l1 > 0.0);
  CHECK(a.gate_l1() == Approx(l1).epsilon(1e-12));
  a.zero_grad();
  CHECK(a.add_gate_l1(0.5) == Approx(0.5 * l1).epsilon(1e-12));
  for (peft::index i = 0; i < 5; ++i) {
    const T v = a.gate()(0, i);
    CHECK(a.grad_gate()(0, i) == (v > 0 ? T(0.5) : (v < 0 ? T(-0.5) : T{0})));
  }
}

TEST_CASE("sora: the sparsifying threshold schedule is numpy.linspace", "[sora][schedule]") {
  // numpy.linspace(1e-3, 1e-2, 4) and (0.1, 1.0, 5)
  const std::vector<double> a = peft::sora_threshold_schedule(1e-3, 1e-2, 4);
  const std::vector<double> ea{1e-3, 4e-3, 7e-3, 1e-2};
  REQUIRE(a.size() == ea.size());
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i] == Approx(ea[i]).epsilon(1e-15));
  CHECK(a.back() == 1e-2);
  const std::vector<double> b = peft::sora_threshold_schedule(0.1, 1.0, 5);
  const std::vector<double> eb{0.1, 0.325, 0.55, 0.775, 1.0};
  for (std::size_t i = 0; i < b.size(); ++i) CHECK(b[i] == Approx(eb[i]).epsilon(1e-15));
  CHECK(peft::sora_threshold_schedule(0.3, 5.0, 1) == std::vector<double>{0.3});
  CHECK_THROWS_AS(peft::sora_threshold_schedule(0.1, 1.0, 0), peft::error);
}

TEMPLATE_TEST_CASE("sora: compaction to a LoRA preserves outputs", "[sora][compact]", float, double) {
  using T = TestType;
  peft::rng g(31);
  for (auto [in, out, r] : std::vector<std::array<peft::index, 3>>{{7, 5, 4}, {1, 3, 2}, {13, 1, 3}, {31, 24, 9}}) {
    INFO("in " << in << " out " << out << " r " << r);
    auto a = random_adapter<T>(in, out, r, g);
    for (peft::index i = 0; i < r; i += 2) a.gate()(0, i) = T(0.01);
    a.proximal_step(1.0, 0.05);  // zero gradient: zeroes the gates set to 0.01
    CHECK(a.active_rank() == r / 2);
    const auto w = peft::dense<T>(peft_test::random_matrix<T>(out, in, g), peft_test::random_vector<T>(out, g));
    const auto x = peft_test::random_matrix<T>(4, in, g);
    const auto l = a.compact();
    if (r / 2 == 0) {
      peft_test::check_compacts_to_base(a, w, x);
      continue;
    }
    REQUIRE(l.has_value());
    peft_test::check_compacted(a, *l, w, x, r / 2, peft_test::rounding<T>());
    peft_test::check_same_delta(a, *l, w, peft_test::rounding<T>());

    // every gate zero: no LoRA (rank 0 does not exist); the adapter is exactly the identity
    a.official_threshold(10.0);
    CHECK(a.active_rank() == 0);
    peft_test::check_compacts_to_base(a, w, x);
  }
}

TEST_CASE("sora: errors", "[sora][errors]") {
  using A = peft::sora<double>;
  using peft_test::arg;
  using peft_test::pass;
  peft::rng g(1);
  peft_test::check_gated_constructor_errors<A>(-1, "[sora::sora] B is (3, 3) but A has rank 2", {0});

  A a(4, 3, {.rank = 2, .seed = 2});
  const peft::dense<double> w(peft_test::random_matrix<double>(3, 4, g));
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::x, 2, 5, "[sora::forward] x is (2, 5), expected (2, 4)"},
                                 {pass::forward, arg::base, 2, 4},
                                 {pass::add_term, arg::y, 2, 2},
                                 {pass::backward, arg::dx, 2, 5},
                                 {pass::backward_term, arg::dx, 2, 3},
                                 {pass::delta_weight, arg::dw, 4, 3}});

  peft_test::check_no_peft_format(a, "compact() to a LoRA and save that");  // PEFT has no format: the codec says so
  const auto p = peft_test::check_gated_parameters(a, "lora_gate");
  CHECK(p[2].shape == std::vector<std::int64_t>{2});
  CHECK(p[1].shape == std::vector<std::int64_t>{3, 2});
}

}  // namespace test_sora
