// sora (Ding et al. 2023): parity with the paper's formula (tests/data/paper/sora, float64
// PyTorch), the soft threshold and the official code's threshold, the proximal gate step, the
// L1 term, the threshold schedule, compaction to a plain LoRA, init, and errors.
#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/adapters/sora.hpp"
#include "peft/io/peft/sora.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/safetensors.hpp"
#include "support/test_support.hpp"

namespace {

namespace fs = std::filesystem;
using peft_test::rel_error;

template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 1e-5;
}
template <class T>
double rounding() {  // "identical to rounding" for a re-associated product
  return std::is_same_v<T, double> ? 1e-14 : 1e-6;
}

const fs::path case_dir = fs::path(PEFT_TEST_DATA_DIR) / "paper" / "sora";

/// The golden case: one layer 64 -> 48, r_max = 8, alpha = 16, batch 5, gate_1 = 0.
template <class T>
struct golden {
  peft::io::safetensors_file f = peft::io::safetensors_file::open(case_dir / "reference.safetensors");
  peft::dense<T> base{f.read_matrix<T>("W0"), f.read<T>("b0")};
  peft::matrix<T> x = f.read_matrix<T>("x");
  peft::matrix<T> gy = f.read_matrix<T>("grad_y");
  peft::sora<T> adapter{f.read_matrix<T>("lora_A"), f.read_matrix<T>("lora_B"), f.read<T>("gate"), static_cast<T>(2.0)};
  peft::matrix<double> ref(const char* name) const { return f.read_matrix<double>(name); }
};

/// A random sora adapter with every parameter non-zero (|g_i| in [0.2, 1), random signs).
template <class T>
peft::sora<T> random_adapter(peft::index in, peft::index out, peft::index r, peft::rng& g) {
  auto gate = peft_test::random_vector<T>(r, g, 0.2, 1.0);
  for (auto& v : gate) v = g.below(2) ? v : -v;
  return peft::sora<T>(peft_test::random_matrix<T>(r, in, g), peft_test::random_matrix<T>(out, r, g),
                       std::move(gate), static_cast<T>(0.5));
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
  const double tol = tolerance<T>();
  golden<T> c;
  auto& a = c.adapter;
  REQUIRE(peft_test::nontrivial(c.x));
  REQUIRE(peft_test::nontrivial(c.gy));
  REQUIRE(peft_test::nontrivial(a.A()));
  REQUIRE(peft_test::nontrivial(a.B()));
  REQUIRE(a.rank() == 8);
  REQUIRE(peft_test::count_nonzero(a.gate()) == 7);  // one gate entry already zero
  REQUIRE(a.active_rank() == 7);

  peft::matrix<T> y(c.x.rows(), a.out_features()), dx(c.x.rows(), a.in_features());
  typename peft::sora<T>::cache_type cache;
  a.forward(c.base, c.x, y, cache);
  CHECK(rel_error(y, c.ref("y")) < tol);
  a.zero_grad();
  a.backward(c.base, c.x, c.gy, dx, cache);
  CHECK(rel_error(dx, c.ref("grad_x")) < tol);
  CHECK(rel_error(a.grad_A(), c.ref("grad.lora_A")) < tol);
  CHECK(rel_error(a.grad_B(), c.ref("grad.lora_B")) < tol);
  CHECK(rel_error(a.grad_gate(), c.ref("grad.gate")) < tol);
  CHECK(a.grad_gate()(0, 1) != T{0});  // a zero gate still has a gradient (it may come back)

  // merged: W0 + s B diag(g) A gives the same output
  peft::matrix<T> dw(a.out_features(), a.in_features());
  a.delta_weight(c.base, dw);
  peft::matrix<T> w = peft::to_matrix(c.base.weight());
  for (peft::index i = 0; i < w.rows(); ++i)
    for (peft::index j = 0; j < w.cols(); ++j) w(i, j) += dw(i, j);
  const peft::dense<T> merged(std::move(w), c.f.template read<T>("b0"));
  peft::matrix<T> ym(c.x.rows(), a.out_features());
  merged.matmul(peft::matrix_view<const T>(c.x.view()), ym.view());
  CHECK(rel_error(ym, c.ref("y")) < tol);
  T db = 0;
  CHECK_FALSE(a.delta_bias(c.base, &db));

  // compaction: rank 7, same output
  const auto l = a.compact();
  REQUIRE(l.has_value());
  CHECK(l->rank() == 7);
  CHECK(l->scale() == a.scale());
  peft::matrix<T> yl(c.x.rows(), a.out_features());
  typename peft::lora<T>::cache_type lc;
  l->forward(c.base, c.x, yl, lc);
  CHECK(rel_error(yl, c.ref("y")) < tol);
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
  double mean = 0.0, sq = 0.0;
  for (peft::index i = 0; i < r; ++i) {
    mean += static_cast<double>(a.gate()(0, i));
    sq += static_cast<double>(a.gate()(0, i)) * static_cast<double>(a.gate()(0, i));
  }
  mean /= static_cast<double>(r);
  const double var = sq / static_cast<double>(r) - mean * mean;
  CHECK(std::abs(mean) < 0.06);  // 4 standard errors
  CHECK(std::abs(var - 1.0) < 0.1);
  CHECK(a.active_rank() == r);
  const peft::sora<T> same(in, out, {.rank = r, .alpha = 16.0, .seed = 3});
  const peft::sora<T> other(in, out, {.rank = r, .alpha = 16.0, .seed = 4});
  CHECK(peft_test::exactly_equal(same.gate(), a.gate()));
  CHECK_FALSE(peft_test::exactly_equal(other.gate(), a.gate()));

  peft::rng g(8);
  const peft::sora<T> small(in, out, {.rank = 3, .alpha = 6.0, .seed = 1});
  const auto w = peft::dense<T>(peft_test::random_matrix<T>(out, in, g), peft_test::random_vector<T>(out, g));
  const auto x = peft_test::random_matrix<T>(3, in, g);
  peft::matrix<T> y(3, out), h(3, out);
  typename peft::sora<T>::cache_type cache;
  small.forward(w, x, y, cache);
  w.matmul(peft::matrix_view<const T>(x.view()), h.view());
  CHECK(peft_test::exactly_equal(y, h));
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
    peft::matrix<T> y(4, out), yl(4, out), h(4, out);
    typename peft::sora<T>::cache_type cache;
    a.forward(w, x, y, cache);
    w.matmul(peft::matrix_view<const T>(x.view()), h.view());
    const auto l = a.compact();
    if (r / 2 == 0) {
      CHECK_FALSE(l.has_value());
      CHECK(peft_test::exactly_equal(y, h));
      continue;
    }
    REQUIRE(rel_error(y, h) > 1e-3);
    REQUIRE(l.has_value());
    CHECK(l->rank() == r / 2);
    CHECK(l->scale() == a.scale());
    typename peft::lora<T>::cache_type lc;
    l->forward(w, x, yl, lc);
    CHECK(rel_error(yl, y) < rounding<T>());
    peft::matrix<T> d1(out, in), d2(out, in);
    a.delta_weight(w, d1);
    l->delta_weight(w, d2);
    CHECK(rel_error(d2, d1) < rounding<T>());

    // every gate zero: no LoRA (rank 0 does not exist); the adapter is exactly the identity
    a.official_threshold(10.0);
    CHECK(a.active_rank() == 0);
    CHECK_FALSE(a.compact().has_value());
    a.forward(w, x, y, cache);
    CHECK(peft_test::exactly_equal(y, h));
  }
}

TEST_CASE("sora: errors", "[sora][errors]") {
  using A = peft::sora<double>;
  peft::rng g(1);
  CHECK_THROWS_AS(A(4, 3, {.rank = 0}), peft::shape_error);
  CHECK_THROWS_AS(A(0, 3, {.rank = 2}), peft::shape_error);
  CHECK_THROWS_AS(A(4, -1, {.rank = 2}), peft::shape_error);
  CHECK_THROWS_WITH(A(peft::matrix<double>(2, 4), peft::matrix<double>(3, 3), {0, 0}, 1.0),
                    Catch::Contains("[sora::sora] B is (3, 3) but A has rank 2"));
  CHECK_THROWS_AS(A(peft::matrix<double>(2, 4), peft::matrix<double>(3, 2), {0}, 1.0), peft::shape_error);

  A a(4, 3, {.rank = 2, .seed = 2});
  const peft::dense<double> w(peft_test::random_matrix<double>(3, 4, g));
  const peft::dense<double> wrong(peft_test::random_matrix<double>(2, 4, g));
  peft::matrix<double> x(2, 4), y(2, 3), dx(2, 4), dy(2, 3), bad(2, 5);
  A::cache_type cache;
  CHECK_THROWS_WITH(a.forward(w, bad, y, cache), Catch::Contains("[sora::forward] x is (2, 5), expected (2, 4)"));
  CHECK_THROWS_AS(a.forward(wrong, x, y, cache), peft::shape_error);
  CHECK_THROWS_AS(a.add_term(w, x, y, peft::matrix<double>(2, 2), cache), peft::shape_error);
  CHECK_THROWS_AS(a.backward(w, x, dy, bad, cache), peft::shape_error);
  CHECK_THROWS_AS(a.backward_term(w, x, y, dy, dy, peft::matrix<double>(2, 3), cache), peft::shape_error);
  CHECK_THROWS_AS(a.delta_weight(w, peft::matrix<double>(4, 3)), peft::shape_error);

  static_assert(!peft::io::peft_codec<A>::has_format);  // PEFT has no format: the codec says so
  peft::io::checkpoint_tensors<double> m("layer");
  CHECK_THROWS_AS(peft::io::from_checkpoint<A>(peft::io::adapter_config{}, m, m), peft::unsupported_error);
  CHECK_THROWS_WITH(peft::io::from_checkpoint<A>(peft::io::adapter_config{}, m, m),
                    Catch::Contains("compact() to a LoRA and save that"));
  peft::io::adapter_config cfg;
  CHECK_THROWS_AS(peft::io::describe_in(a, cfg, "layer"), peft::unsupported_error);
  const auto p = a.parameters();
  REQUIRE(p.size() == 3);
  CHECK(p[0].name == "lora_A.weight");
  CHECK(p[1].name == "lora_B.weight");
  CHECK(p[2].name == "lora_gate");
  CHECK(p[2].shape == std::vector<std::int64_t>{2});
  CHECK(p[1].shape == std::vector<std::int64_t>{3, 2});
}
