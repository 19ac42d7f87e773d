// The pre-packed f32 layout: kernels::packed_dot in every version this CPU runs against plain
// double loops, and peft::packed_f32 as a base (products of every batch size, f32 and f64, dx,
// rows, merging) against the same weight in dense form; LoRA over it, fused and unfused.
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/adapters/lora.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/packed_f32.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/packed.hpp"
#include "support/test_support.hpp"

namespace test_packed {

using ix = peft::index;
namespace kernels = peft::kernels;

namespace {

/// Worst |y - x W^T - b| over the f32 rounding bound of each output (<= 1 passes).
template <class MY>
double worst_against_exact(const MY& y, const peft::matrix<float>& x, const peft::matrix<float>& w,
                           const std::vector<float>& bias) {
  double worst = 0.0;
  for (ix i = 0; i < x.rows(); ++i) {
    for (ix j = 0; j < w.rows(); ++j) {
      double exact = bias.empty() ? 0.0 : bias[static_cast<std::size_t>(j)];
      double abs_sum = std::abs(exact);
      for (ix p = 0; p < x.cols(); ++p) {
        exact += static_cast<double>(x(i, p)) * w(j, p);
        abs_sum += std::abs(static_cast<double>(x(i, p)) * w(j, p));
      }
      worst = std::max(worst, std::abs(static_cast<double>(y(i, j)) - exact) / peft_test::f32_dot_bound(x.cols(), abs_sum));
    }
  }
  return worst;
}

}  // namespace

TEST_CASE("packed_dot: every version equals the double product, tails of k, n and m", "[kernels][packed]") {
  peft::rng gen(31);
  for (auto version : peft_test::supported_isas()) {
    kernels::scoped_isa guard(version);
    for (ix k : {ix{0}, ix{1}, ix{7}, ix{255}, ix{256}, ix{257}, ix{1100}}) {
      // One panel of 16 weight rows, k-major, and x with 5 spare values per row.
      std::vector<float> panel(static_cast<std::size_t>(16 * k));
      for (auto& v : panel) v = static_cast<float>(gen.uniform(-1.0, 1.0));
      const ix ldx = k + 5;
      std::vector<float> x(static_cast<std::size_t>(8 * ldx));
      for (auto& v : x) v = static_cast<float>(gen.uniform(-1.0, 1.0));
      for (ix n : {ix{1}, ix{5}, ix{16}}) {
        for (ix m = 1; m <= kernels::packed_max_rows; ++m) {
          INFO("isa " << kernels::isa_name(version) << " k " << k << " n " << n << " m " << m);
          const ix ldy = 19;
          std::vector<float> y(static_cast<std::size_t>(m * ldy), std::numeric_limits<float>::quiet_NaN());
          kernels::packed_dot(version, panel.data(), k, n, x.data(), ldx, m, y.data(), ldy);
          double worst = 0.0;
          bool untouched = true;
          for (ix r = 0; r < m; ++r) {
            for (ix c = 0; c < n; ++c) {
              double exact = 0.0, abs_sum = 0.0;
              for (ix p = 0; p < k; ++p) {
                const double t = static_cast<double>(x[static_cast<std::size_t>(r * ldx + p)]) *
                                 panel[static_cast<std::size_t>(p * 16 + c)];
                exact += t;
                abs_sum += std::abs(t);
              }
              worst = std::max(worst, std::abs(y[static_cast<std::size_t>(r * ldy + c)] - exact) / peft_test::f32_dot_bound(k, abs_sum));
            }
            for (ix c = n; c < ldy; ++c) untouched = untouched && std::isnan(y[static_cast<std::size_t>(r * ldy + c)]);
          }
          CHECK(worst <= 1.0);
          CHECK(untouched);
          if (k > 0) CHECK(std::abs(y[0]) > 0.0f);
        }
      }
    }
  }
}

TEST_CASE("packed_f32: products, dx and rows equal the dense weight's", "[base][packed]") {
  peft::rng gen(32);
  struct shape {
    ix m, n, k;
  };
  for (auto version : peft_test::supported_isas()) {
    kernels::scoped_isa guard(version);
    for (const shape s : {shape{1, 5, 7}, shape{3, 16, 33}, shape{8, 33, 129}, shape{9, 70, 300},
                          shape{17, 16, 1}, shape{63, 47, 64}, shape{64, 40, 20}, shape{100, 19, 257},
                          shape{260, 21, 33}}) {
      INFO("isa " << kernels::isa_name(version) << " m " << s.m << " n " << s.n << " k " << s.k);
      const auto w = peft_test::random_matrix<float>(s.n, s.k, gen);
      const auto x = peft_test::random_matrix<float>(s.m, s.k, gen);
      const auto dy = peft_test::random_matrix<float>(s.m, s.n, gen);
      const auto bias = peft_test::random_vector<float>(s.n, gen);
      REQUIRE(peft_test::nontrivial(w));
      REQUIRE(peft_test::nontrivial(x));
      const auto packed = peft::packed_f32::pack(peft::matrix_view<const float>(w.view()), bias.data());
      CHECK(packed.out_features() == s.n);
      CHECK(packed.in_features() == s.k);
      CHECK(packed.has_bias());
      CHECK(packed.storage_bytes() == static_cast<std::size_t>((s.n + 15) / 16 * 16 * s.k) * sizeof(float));

      // Rows: the stored values exactly.
      std::vector<float> row(static_cast<std::size_t>(s.k));
      bool rows_exact = true;
      for (ix i = 0; i < s.n; ++i) {
        packed.dequantize_row(i, row.data());
        for (ix p = 0; p < s.k; ++p) rows_exact = rows_exact && row[static_cast<std::size_t>(p)] == w(i, p);
      }
      CHECK(rows_exact);
      CHECK(peft_test::exactly_equal(packed.dequantize(), w));

      // y = x W^T + b in f32 (the panel kernel) and f64 (unpacked panels).
      peft::matrix<float> y(s.m, s.n);
      packed.matmul<float>(x.view(), y.view());
      CHECK(worst_against_exact(y, x, w, bias) <= 1.0);
      const auto xd = peft_test::convert_matrix<double>(x);
      peft::matrix<double> yd(s.m, s.n);
      packed.matmul<double>(xd.view(), yd.view());
      const auto exact = peft_test::ref_linear(x, w, bias);
      CHECK(peft_test::rel_error(yd.view(), exact.view()) <= 1e-14);

      // dx = dy W, and dx += dy W.
      peft::matrix<float> dx(s.m, s.k);
      packed.matmul_t<float>(dy.view(), dx.view());
      const auto dx_exact = peft_test::ref_nn(dy, w);
      CHECK(peft_test::rel_error(dx.view(), dx_exact.view()) <= 1e-5);
      packed.matmul_t<float>(dy.view(), dx.view(), true);
      CHECK(peft_test::rel_error(dx.view(), peft_test::scaled(dx_exact, 2.0).view()) <= 1e-5);
    }
  }
}

TEST_CASE("packed_f32: merging rounds as dense<float> does; errors name the function", "[base][packed]") {
  peft::rng gen(33);
  const auto w = peft_test::random_matrix<float>(21, 13, gen);
  const auto dw = peft_test::random_matrix<double>(21, 13, gen);
  auto packed = peft::packed_f32::pack(peft::matrix_view<const float>(w.view()));
  auto dense = peft::dense<float>::from(peft::matrix_view<const float>(w.view()));
  CHECK_FALSE(packed.has_bias());
  packed.add_to_weight(peft::matrix_view<const double>(dw.view()), 0.5);
  dense.add_to_weight(peft::matrix_view<const double>(dw.view()), 0.5);
  CHECK(peft_test::exactly_equal(packed.dequantize(), peft::dequantized_weight<float>(dense)));
  CHECK_FALSE(peft_test::exactly_equal(packed.dequantize(), w));

  const peft::matrix<float> empty(0, 4);
  CHECK_THROWS_WITH(peft::packed_f32::pack(peft::matrix_view<const float>(empty.view())),
                    Catch::Contains("packed_f32::pack") && Catch::Contains("empty"));
  std::vector<float> row(13);
  CHECK_THROWS_AS(packed.dequantize_row(21, row.data()), peft::shape_error);
  peft::matrix<float> x(2, 12), y(2, 21);
  CHECK_THROWS_WITH(packed.matmul<float>(x.view(), y.view()), Catch::Contains("packed_f32::matmul"));
}

TEST_CASE("LoRA over packed_f32: forward and gradients equal LoRA over dense<float>", "[base][packed][lora]") {
  peft::rng gen(34);
  for (auto version : peft_test::supported_isas()) {
    kernels::scoped_isa guard(version);
    for (ix m : {ix{1}, ix{8}, ix{40}, ix{70}}) {
      INFO("isa " << kernels::isa_name(version) << " m " << m);
      const ix k = 96, n = 50;
      const auto w = peft_test::random_matrix<float>(n, k, gen);
      const auto bias = peft_test::random_vector<float>(n, gen);
      const auto packed = peft::packed_f32::pack(peft::matrix_view<const float>(w.view()), bias.data());
      const auto dense = peft::dense<float>::from(peft::matrix_view<const float>(w.view()), bias.data());
      const peft::lora_options opts{.rank = 4, .alpha = 8, .init = peft::lora_init::random, .seed = 9};
      peft::lora<float> a(k, n, opts), b(k, n, opts);
      const auto x = peft_test::random_matrix<float>(m, k, gen);
      const auto dy = peft_test::random_matrix<float>(m, n, gen);
      peft::matrix<float> ya(m, n), yb(m, n), dxa(m, k), dxb(m, k);
      peft::lora<float>::cache_type ca, cb;
      a.forward(packed, x.view(), ya.view(), ca);
      b.forward(dense, x.view(), yb.view(), cb);
      REQUIRE(peft_test::nontrivial(ya));
      CHECK(peft_test::rel_error(ya.view(), yb.view()) <= 1e-6);
      // The fused forward and base + add_term over the packed base.
      peft::matrix<float> plain(m, n);
      packed.matmul<float>(x.view(), plain.view());
      peft::lora<float>::cache_type cu;
      a.add_term(packed, x.view(), plain.view(), plain.view(), cu);
      CHECK(peft_test::rel_error(plain.view(), ya.view()) <= 1e-6);

      a.zero_grad();
      b.zero_grad();
      a.backward(packed, x.view(), dy.view(), dxa.view(), ca);
      b.backward(dense, x.view(), dy.view(), dxb.view(), cb);
      CHECK(peft_test::rel_error(dxa.view(), dxb.view()) <= 1e-5);
      auto pa = a.parameters();
      auto pb = b.parameters();
      REQUIRE(pa.size() == pb.size());
      for (std::size_t q = 0; q < pa.size(); ++q) {
        REQUIRE(peft_test::nontrivial(pa[q].grad));
        CHECK(peft_test::rel_error(pa[q].grad, pb[q].grad) <= 1e-5);
      }
    }
  }
}

}  // namespace test_packed
