// dynamic_rank (DoRA, dynamic rank distribution; Mao et al. 2024): parity with the paper's
// formulas (tests/data/paper/dynamic_rank, float64 PyTorch), the Gram-matrix norm and the
// importance against materialised products, the regulariser and its gradient, masks through a
// backward and an update, compaction to a plain LoRA (and saving that), init, and errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <array>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/dynamic_rank.hpp"
#include "peft/io/peft/dynamic_rank.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "support/file_support.hpp"
#include "support/adapter_checks.hpp"
#include "support/gated_rank_checks.hpp"
#include "support/test_support.hpp"

namespace test_dynamic_rank {

namespace {

namespace fs = std::filesystem;
using peft::index;
using peft_test::rel_error;
using peft_test::rounding;

/// The golden case: one layer 64 -> 48, r0 = 12, alpha = 8, batch 5, c_0 = 0 (already pruned).
template <class T>
peft_test::gated_case<peft::dynamic_rank<T>> golden() {
  return {"dynamic_rank", "scaler", static_cast<T>(8.0 / 12.0)};
}

/// ||B diag(c) A||_F by materialising the product in double loops.
template <class A>
double materialised_norm(const A& a) {
  double s = 0.0;
  for (index j = 0; j < a.out_features(); ++j) {
    for (index k = 0; k < a.in_features(); ++k) {
      double v = 0.0;
      for (index i = 0; i < a.rank(); ++i) {
        v += peft_test::at(a.B(), j, i) * peft_test::at(a.c(), 0, i) * peft_test::at(a.A(), i, k);
      }
      s += v * v;
    }
  }
  return std::sqrt(s);
}

/// A random dynamic_rank with every parameter non-zero (|c_i| in [0.2, 1), random signs).
template <class T>
peft::dynamic_rank<T> random_adapter(index in, index out, index r0, peft::rng& g) {
  return peft_test::random_gated<peft::dynamic_rank<T>>(in, out, r0, g, 0.75);
}

}  // namespace

TEMPLATE_TEST_CASE("dynamic_rank matches the paper's formulas (golden)", "[dynamic_rank][golden]", float, double) {
  using T = TestType;
  const double tol = peft_test::tolerance<T>();
  auto c = golden<T>();
  auto& a = c.adapter;
  peft_test::check_gated_case(c, 12, 11, "grad.scaler", tol);  // c_0 = 0: one component already pruned

  // importance (this step's s_i) and the regulariser: the case gives R_layer / (L 2 r0), L = 1
  const auto s = a.component_importance();
  const peft::matrix<T> sm(1, a.rank(), s);
  const auto s_ref = c.ref("importance");
  REQUIRE(peft_test::count_nonzero(s_ref) == 11);
  CHECK(rel_error(sm, s_ref) < tol);
  CHECK(sm(0, 0) == T{0});
  const double reg_ref = c.ref("regularizer")(0, 0);
  REQUIRE(reg_ref > 0.0);
  CHECK(std::abs(a.regularizer() / (2.0 * 12.0) - reg_ref) < tol * reg_ref);

  // EMA from S = 0: 0.1 s after one update, 0.19 s after two
  for (double v : a.importance()) CHECK(v == 0.0);
  a.update_importance();
  CHECK(rel_error(peft::matrix<T>(1, a.rank(), std::vector<T>(a.importance().begin(), a.importance().end())),
                  peft_test::scaled(s_ref, 0.1)) < tol);
  a.update_importance();
  CHECK(rel_error(peft::matrix<T>(1, a.rank(), std::vector<T>(a.importance().begin(), a.importance().end())),
                  peft_test::scaled(s_ref, 0.19)) < tol);

  // configured coefficients: S <- 0.5 S + 0.25 s
  peft::dynamic_rank<T> b(peft::to_matrix(a.A()), peft::to_matrix(a.B()), peft::to_matrix(a.c()).storage(), a.scale(),
                          {.importance_decay = 0.5, .importance_weight = 0.25});
  b.update_importance();
  b.update_importance();
  CHECK(rel_error(peft::matrix<T>(1, b.rank(), std::vector<T>(b.importance().begin(), b.importance().end())),
                  peft_test::scaled(s_ref, 0.375)) < tol);
}

TEST_CASE("dynamic_rank: compact() to a LoRA, save it, load it back (golden)", "[dynamic_rank][golden][io]") {
  auto c = golden<double>();
  const auto l = c.adapter.compact();
  REQUIRE(l.has_value());
  peft::io::basic_peft_checkpoint<peft::lora<double>> ck;
  ck.config.r = 8;
  ck.config.lora_alpha = 8.0;
  ck.modules.push_back({"layer", "layer.weight", *l});
  const fs::path dir = peft_test::temp_path("peft_dynamic_rank_" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
  peft::io::save_peft_checkpoint(dir, ck, peft::dtype::f64);
  const auto loaded = peft::io::load_checkpoint_as<peft::lora<double>>(dir);
  fs::remove_all(dir);
  REQUIRE(loaded.modules.size() == 1);
  peft::matrix<double> y(c.x.rows(), 48);
  typename peft::lora<double>::cache_type cache;
  loaded.modules[0].adapter.forward(c.base, c.x, y, cache);
  CHECK(rel_error(y, c.ref("y")) < 1e-12);

  // the adapter itself cannot be saved: describe_in says what to do
  peft::io::basic_peft_checkpoint<peft::dynamic_rank<double>> ck2;
  ck2.modules.push_back({"layer", "layer.weight", c.adapter});
  CHECK_THROWS_WITH(peft::io::save_peft_checkpoint(dir, ck2, peft::dtype::f64),
                    Catch::Contains("compact() to a LoRA and save that"));
  CHECK_FALSE(fs::exists(dir / "adapter_model.safetensors"));
}

TEMPLATE_TEST_CASE("dynamic_rank: init, r0 = ceil(1.5 r), identity at start", "[dynamic_rank][init]", float, double) {
  using T = TestType;
  for (peft::index r = 1; r <= 9; ++r) {
    const peft::dynamic_rank<T> a(5, 4, {.rank = r, .alpha = 6.0});
    CHECK(a.rank() == static_cast<peft::index>(std::ceil(1.5 * static_cast<double>(r))));
    CHECK(a.scale() == static_cast<T>(6.0 / static_cast<double>(a.rank())));
  }
  const peft::dynamic_rank<T> b(5, 4, {.rank = 8, .initial_rank = 3});
  CHECK(b.rank() == 3);

  const peft::index in = 200, out = 150;
  const peft::dynamic_rank<T> a(in, out, {.rank = 8, .alpha = 16.0, .seed = 7});
  const peft::index r0 = 12;
  REQUIRE(a.rank() == r0);
  CHECK(peft_test::count_nonzero(a.c()) == 0);
  CHECK(a.active_rank() == 0);
  const double bound_a = std::sqrt(6.0 / in), bound_b = std::sqrt(6.0 / r0);  // kaiming-uniform, a = 0
  CHECK(peft_test::max_abs(a.A()) <= bound_a);
  CHECK(peft_test::max_abs(a.A()) > 0.95 * bound_a);
  CHECK(peft_test::max_abs(a.B()) <= bound_b);
  CHECK(peft_test::max_abs(a.B()) > 0.95 * bound_b);
  // U(-b, b) has variance b^2 / 3
  const double var_a = std::pow(peft_test::frobenius(a.A()), 2) / static_cast<double>(a.A().size());
  CHECK(std::abs(var_a / (bound_a * bound_a / 3.0) - 1.0) < 0.05);
  CHECK(peft_test::nontrivial(a.A()));
  CHECK(peft_test::nontrivial(a.B()));
  // same seed, same adapter; another seed, another one
  const peft::dynamic_rank<T> same(in, out, {.rank = 8, .alpha = 16.0, .seed = 7});
  const peft::dynamic_rank<T> other(in, out, {.rank = 8, .alpha = 16.0, .seed = 8});
  CHECK(peft_test::exactly_equal(same.A(), a.A()));
  CHECK_FALSE(peft_test::exactly_equal(other.A(), a.A()));

  // identity: the output is exactly the base output; importance is 0 (no division by zero)
  peft::rng g(3);
  const auto w = peft_test::random_dense<T>(in, out, g);
  peft_test::check_output_is_base(a, w, peft_test::random_matrix<T>(3, in, g));
  for (T s : a.component_importance()) CHECK(s == T{0});
  const peft::dynamic_rank<T> no_eps(in, out, {.rank = 8, .importance_eps = 0.0, .seed = 7});
  for (T s : no_eps.component_importance()) CHECK(s == T{0});  // 0 / 0 is not NaN here
}

TEMPLATE_TEST_CASE("dynamic_rank: ||B diag(c) A||_F from Gram matrices == the materialised norm",
                   "[dynamic_rank][importance]", float, double) {
  using T = TestType;
  peft::rng g(11);
  // (in, out, r0): Gram path (r0 (in + out) < in out) and the direct path for tiny layers
  for (auto [in, out, r0] : std::vector<std::array<peft::index, 3>>{{64, 48, 12}, {33, 17, 5}, {200, 3, 2}, {2, 3, 4}, {1, 1, 1}}) {
    INFO("in " << in << " out " << out << " r0 " << r0);
    auto a = random_adapter<T>(in, out, r0, g);
    const double ref = materialised_norm(a);
    REQUIRE(ref > 0.0);
    CHECK(std::abs(a.delta_norm() - ref) < 10 * rounding<T>() * ref);
    // per component: ||c_i b_i a_i^T||_F by materialising each outer product
    const auto s = a.component_importance();
    for (peft::index i = 0; i < r0; ++i) {
      double sq = 0.0;
      for (peft::index j = 0; j < out; ++j)
        for (peft::index k = 0; k < in; ++k) {
          const double v = peft_test::at(a.c(), 0, i) * peft_test::at(a.B(), j, i) * peft_test::at(a.A(), i, k);
          sq += v * v;
        }
      const double si = std::sqrt(sq) / (ref + 1e-8);
      CHECK(std::abs(static_cast<double>(s[static_cast<std::size_t>(i)]) - si) < 10 * rounding<T>() * si);
    }
  }
}

TEMPLATE_TEST_CASE("dynamic_rank: the regulariser and its gradient", "[dynamic_rank][regularizer]", float, double) {
  using T = TestType;
  peft::rng g(5);
  for (const auto& shape : std::vector<std::array<peft::index, 3>>{{9, 6, 3}, {1, 4, 2}, {5, 1, 2}}) {
    const peft::index in = shape[0], out = shape[1], r0 = shape[2];  // (clang 14 cannot capture bindings)
    INFO("in " << in << " out " << out << " r0 " << r0);
    auto a = random_adapter<double>(in, out, r0, g);
    auto af = random_adapter<T>(in, out, r0, g);
    // reference: two-pass unbiased variances; one element -> 0
    auto var = [](const std::vector<double>& v) {
      if (v.size() < 2) return 0.0;
      double m = 0.0, s = 0.0;
      for (double e : v) m += e;
      m /= static_cast<double>(v.size());
      for (double e : v) s += (e - m) * (e - m);
      return s / static_cast<double>(v.size() - 1);
    };
    auto reference = [&](const auto& ad) {
      double r = 0.0;
      for (peft::index i = 0; i < r0; ++i) {
        std::vector<double> row, col;
        for (peft::index j = 0; j < in; ++j) row.push_back(peft_test::at(ad.A(), i, j));
        for (peft::index j = 0; j < out; ++j) col.push_back(peft_test::at(ad.B(), j, i));
        r += var(row) + var(col);
      }
      return r;
    };
    const double r_ref = reference(a);
    if (in > 1 && out > 1) REQUIRE(r_ref > 0.0);
    CHECK(std::abs(a.regularizer() - r_ref) <= 1e-14 * std::max(1.0, r_ref));
    CHECK(std::abs(af.regularizer() - reference(af)) <= 1e-6 * std::max(1.0, reference(af)));

    // gradient of coef * R against central differences (double)
    const double coef = 0.37;
    a.zero_grad();
    CHECK(std::abs(a.add_regularizer(coef) - coef * r_ref) <= 1e-14 * std::max(1.0, r_ref));
    auto loss = [&] { return coef * a.regularizer(); };
    CHECK(rel_error(a.grad_A(), peft_test::fd_gradient(a.A(), 1e-6, loss)) < 1e-7);
    CHECK(rel_error(a.grad_B(), peft_test::fd_gradient(a.B(), 1e-6, loss)) < 1e-7);
    CHECK(peft_test::count_nonzero(a.grad_c()) == 0);
    if (in > 1) CHECK(peft_test::count_nonzero(a.grad_A()) > 0);
  }
}

TEMPLATE_TEST_CASE("dynamic_rank: masks keep pruned components at zero", "[dynamic_rank][mask]", float, double) {
  using T = TestType;
  peft::rng g(21);
  const peft::index in = 9, out = 7, r0 = 5;
  auto a = random_adapter<T>(in, out, r0, g);
  const auto w = peft::dense<T>(peft_test::random_matrix<T>(out, in, g), peft_test::random_vector<T>(out, g));
  const auto x = peft_test::random_matrix<T>(3, in, g);
  const auto gy = peft_test::random_matrix<T>(3, out, g);
  const std::vector<bool> pruned{false, true, false, false, true};

  auto step = [&] {  // forward, backward, plain SGD on every parameter
    peft::matrix<T> y(3, out), dx(3, in);
    typename peft::dynamic_rank<T>::cache_type cache;
    a.zero_grad();
    a.forward(w, x, y, cache);
    a.backward(w, x, gy, dx, cache);
    for (auto& p : a.parameters())
      for (peft::index i = 0; i < p.value.rows(); ++i)
        for (peft::index j = 0; j < p.value.cols(); ++j) p.value(i, j) -= T(0.1) * p.grad(i, j);
  };

  // a pruning event during the phase: c_i = 0, but the component may regrow
  const auto c_before = peft::to_matrix(a.c());
  a.prune(pruned);
  CHECK_FALSE(a.mask_frozen());
  CHECK(a.mask() == pruned);
  for (peft::index i = 0; i < r0; ++i) {
    CHECK(a.c()(0, i) == (pruned[static_cast<std::size_t>(i)] ? T{0} : c_before(0, i)));
  }
  CHECK(a.active_rank() == 3);
  step();
  CHECK(a.c()(0, 1) != T{0});  // regrew: dc_1 = s sum_b (g B)_b1 (x A^T)_b1 != 0
  CHECK(a.c()(0, 4) != T{0});

  // the final event: frozen; masked components stay exactly zero through backward + update
  a.prune(pruned, true);
  CHECK(a.mask_frozen());
  CHECK(a.c()(0, 1) == T{0});
  const auto a1 = peft::to_matrix(a.A()), b1 = peft::to_matrix(a.B());
  step();
  for (peft::index i : {peft::index{1}, peft::index{4}}) {
    CHECK(a.c()(0, i) == T{0});
    CHECK(a.grad_c()(0, i) == T{0});
    for (peft::index j = 0; j < in; ++j) CHECK(a.grad_A()(i, j) == T{0});  // c_i = 0: no gradient
    for (peft::index j = 0; j < out; ++j) CHECK(a.grad_B()(j, i) == T{0});
    for (peft::index j = 0; j < in; ++j) CHECK(a.A()(i, j) == a1(i, j));
  }
  CHECK(peft_test::count_nonzero(a.grad_c()) == 3);   // the others still learn
  CHECK(rel_error(a.B(), b1) > 0.0);
  // an optimizer with momentum moves a masked c_i; apply_mask() puts it back
  a.c()(0, 4) = T(0.25);
  a.apply_mask();
  CHECK(a.c()(0, 4) == T{0});
  CHECK(a.active_rank() == 3);
  CHECK_THROWS_AS(a.prune(pruned), peft::error);
  a.set_mask_frozen(false);
  CHECK_NOTHROW(a.prune(std::vector<bool>(r0, false)));
  CHECK_THROWS_AS(a.prune(std::vector<bool>(r0 + 1, false)), peft::shape_error);
  CHECK_THROWS_AS(a.set_importance(std::vector<T>(r0 - 1)), peft::shape_error);
  const std::vector<T> s{1, 2, 3, 4, 5};
  a.set_importance(s);
  CHECK(std::vector<T>(a.importance().begin(), a.importance().end()) == s);
}

TEMPLATE_TEST_CASE("dynamic_rank: compaction to a LoRA preserves outputs", "[dynamic_rank][compact]", float, double) {
  using T = TestType;
  peft::rng g(99);
  for (auto [in, out, r0] : std::vector<std::array<peft::index, 3>>{{7, 5, 4}, {1, 3, 2}, {13, 1, 3}, {31, 24, 9}}) {
    INFO("in " << in << " out " << out << " r0 " << r0);
    auto a = random_adapter<T>(in, out, r0, g);
    std::vector<bool> pruned(static_cast<std::size_t>(r0));
    for (peft::index i = 0; i < r0; ++i) pruned[static_cast<std::size_t>(i)] = i % 2 == 1;
    a.prune(pruned);
    const auto w = peft_test::random_dense<T>(in, out, g);
    const auto x = peft_test::random_matrix<T>(4, in, g);
    const auto l = a.compact();
    REQUIRE(l.has_value());
    peft_test::check_compacted(a, *l, w, x, (r0 + 1) / 2, rounding<T>());
    peft_test::check_same_delta(a, *l, w, rounding<T>());

    // everything pruned: no LoRA (rank 0 does not exist); the adapter is exactly the identity
    a.prune(std::vector<bool>(static_cast<std::size_t>(r0), true));
    peft_test::check_compacts_to_base(a, w, x);
  }
}

TEST_CASE("dynamic_rank: errors", "[dynamic_rank][errors]") {
  using A = peft::dynamic_rank<double>;
  using peft_test::arg;
  using peft_test::pass;
  peft::rng g(1);
  peft_test::check_gated_constructor_errors<A>(0, "[dynamic_rank::dynamic_rank]", {0, 0, 0});
  CHECK_THROWS_AS(A(4, 3, {.rank = 2, .importance_eps = -1.0}), peft::error);
  CHECK_THROWS_AS(A(peft::matrix<double>(0, 4), peft::matrix<double>(3, 0), {}, 1.0), peft::shape_error);

  A a(4, 3, {.rank = 2, .seed = 2});
  const peft::dense<double> w(peft_test::random_matrix<double>(3, 4, g));
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::x, 2, 5, "[dynamic_rank::forward] x is (2, 5), expected (2, 4)"},
                                 {pass::forward, arg::base, 3, 5},
                                 {pass::forward, arg::y, 3, 3},
                                 {pass::add_term, arg::y, 2, 4},
                                 {pass::backward, arg::dx, 2, 5},
                                 {pass::backward_term, arg::dy, 1, 3},
                                 {pass::delta_weight, arg::dw, 4, 3}});

  // PEFT has no format: the codec says so, and says what to do
  peft_test::check_no_peft_format(a, "compact() to a LoRA and save that", "compact() to a LoRA and save that");
  // parameters: names, logical shapes, all trainable
  const auto p = peft_test::check_gated_parameters(a, "lora_scaler");
  CHECK(p[2].shape == std::vector<std::int64_t>{3});
  CHECK(p[0].shape == std::vector<std::int64_t>{3, 4});
}

}  // namespace test_dynamic_rank
