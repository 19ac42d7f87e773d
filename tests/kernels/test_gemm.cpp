// The optimised products (Eigen, panel decoding) against the reference loops, and the
// reference loops against an independent double-precision product.
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/core/dtype.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/gemm.hpp"
#include "peft/kernels/reference/gemm.hpp"
#include "support/test_support.hpp"

namespace test_gemm {

using ix = peft::index;

namespace {

template <class T, class S>
struct gemm_types {
  using compute = T;
  using storage = S;
};
using f32_f32 = gemm_types<float, float>;
using f32_f64 = gemm_types<float, double>;
using f32_bf16 = gemm_types<float, peft::bf16>;
using f32_f16 = gemm_types<float, peft::f16>;
using f64_f64 = gemm_types<double, double>;
using f64_f32 = gemm_types<double, float>;
using f64_bf16 = gemm_types<double, peft::bf16>;
using f64_f16 = gemm_types<double, peft::f16>;

/// Relative Frobenius tolerance of a T-precision product against the double-accumulated one.
template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-13;
}

/// A matrix living inside a larger NaN-filled buffer: offset, padded rows, padding after.
template <class U>
struct padded {
  std::vector<U> buf;
  peft::matrix_view<U> v;
  padded(ix rows, ix cols, bool strided) {
    const ix offset = strided ? 2 : 0;
    const ix stride = strided ? cols + 3 : cols;
    buf.assign(static_cast<std::size_t>(offset + rows * stride + (strided ? 3 : 0)),
               peft::convert<U>(std::numeric_limits<float>::quiet_NaN()));
    v = peft::matrix_view<U>(buf.data() + offset, rows, cols, stride);
  }
  /// True when every element outside the view is still NaN (nothing wrote past the view).
  bool padding_untouched() const {
    std::vector<bool> inside(buf.size(), false);
    for (ix i = 0; i < v.rows(); ++i) {
      for (ix j = 0; j < v.cols(); ++j) inside[static_cast<std::size_t>(&v(i, j) - buf.data())] = true;
    }
    for (std::size_t p = 0; p < buf.size(); ++p) {
      if (!inside[p] && !std::isnan(peft::convert<double>(buf[p]))) return false;
    }
    return true;
  }
};

enum class op { nt, nn, tn };

const char* name(op o) { return o == op::nt ? "nt" : o == op::nn ? "nn" : "tn"; }

struct shape {
  ix m, n, k;
};

/// Runs one product through the kernel and the reference with identical inputs and checks
/// the kernel against the reference and the reference against plain double loops.
template <class T, class S>
void check_product(op o, shape sh, double alpha, double beta, bool strided, peft::rng& gen) {
  const auto [m, n, k] = sh;
  const ix ar = o == op::tn ? k : m, ac = o == op::tn ? m : k;
  const ix br = o == op::nt ? n : k, bc = o == op::nt ? k : n;
  padded<T> a(ar, ac, strided);
  padded<S> b(br, bc, strided);
  padded<T> c(m, n, strided);
  padded<T> c_ref(m, n, strided);
  peft_test::fill_random(a.v, gen);
  peft_test::fill_random(b.v, gen);
  if (beta == 0.0) {
    // c is garbage the product must ignore: NaN (already) and an infinity.
    if (m > 0 && n > 0) c.v(0, 0) = c_ref.v(0, 0) = std::numeric_limits<T>::infinity();
  } else {
    peft_test::fill_random(c.v, gen);
    for (ix i = 0; i < m; ++i) {
      for (ix j = 0; j < n; ++j) c_ref.v(i, j) = c.v(i, j);
    }
  }
  const auto c_before = peft_test::to_double(c.v);
  INFO("op " << name(o) << " m " << m << " n " << n << " k " << k << " alpha " << alpha
             << " beta " << beta << " strided " << strided);
  if (k > 0) {
    REQUIRE(peft_test::nontrivial(a.v));
    REQUIRE(peft_test::nontrivial(b.v));
  }

  const peft::matrix_view<const T> ca = a.v;
  const peft::matrix_view<const S> cb = b.v;
  if (o == op::nt) {
    peft::kernels::gemm_nt<T, S>(alpha, ca, cb, beta, c.v);
    peft::kernels::reference::gemm_nt<T, S>(alpha, ca, cb, beta, c_ref.v);
  } else if (o == op::nn) {
    peft::kernels::gemm_nn<T, S>(alpha, ca, cb, beta, c.v);
    peft::kernels::reference::gemm_nn<T, S>(alpha, ca, cb, beta, c_ref.v);
  } else {
    if constexpr (std::is_same_v<T, S>) {
      peft::kernels::gemm_tn<T>(alpha, ca, cb, beta, c.v);
      peft::kernels::reference::gemm_tn<T>(alpha, ca, cb, beta, c_ref.v);
    }
  }

  // Independent truth: alpha * op(a, b) + beta * c, in double.
  peft::matrix<double> prod = o == op::nt   ? peft_test::ref_nt(a.v, b.v)
                              : o == op::nn ? peft_test::ref_nn(a.v, b.v)
                                            : peft_test::ref_tn(a.v, b.v);
  peft::matrix<double> truth = peft_test::scaled(prod, alpha);
  if (beta != 0.0) truth = peft_test::add(truth, c_before, beta);

  CHECK(peft_test::rel_error(c.v, c_ref.v) <= tolerance<T>());
  CHECK(peft_test::rel_error(c_ref.v, truth) <= tolerance<T>());
  CHECK(peft_test::rel_error(c.v, truth) <= tolerance<T>());
  if (alpha != 0.0 && k > 0) CHECK(peft_test::nontrivial(c.v));
  CHECK(c.padding_untouched());
  CHECK(c_ref.padding_untouched());
}

const std::vector<shape> small_shapes{{1, 1, 1},  {1, 7, 5},  {3, 1, 4},  {17, 5, 1},
                                      {3, 17, 9}, {17, 3, 33}, {1, 1, 64}, {8, 8, 8},
                                      {17, 17, 17}};
const std::vector<std::pair<double, double>> alpha_beta{
    {1.0, 0.0}, {1.0, 1.0}, {-0.5, 2.0}, {2.0, 0.0}, {0.0, 0.5}, {0.75, -1.0}};

}  // namespace

TEMPLATE_TEST_CASE("gemm_nt and gemm_nn match the reference for every storage type", "[gemm]",
                   f32_f32, f32_f64, f32_bf16, f32_f16, f64_f64, f64_f32, f64_bf16, f64_f16) {
  using T = typename TestType::compute;
  using S = typename TestType::storage;
  peft::rng gen(2024);
  for (op o : {op::nt, op::nn}) {
    for (const auto& sh : small_shapes) {
      for (const auto& [alpha, beta] : alpha_beta) {
        for (bool strided : {false, true}) check_product<T, S>(o, sh, alpha, beta, strided, gen);
      }
    }
  }
}

TEMPLATE_TEST_CASE("gemm over several decode panels matches the reference", "[gemm]", f32_f32,
                   f32_bf16, f32_f16, f64_f64, f64_f32, f64_bf16) {
  using T = typename TestType::compute;
  using S = typename TestType::storage;
  peft::rng gen(77);
  // A panel is ~64 KiB of T: 300 columns make it 54 (float) or 27 (double) rows, so these
  // weights are decoded in several panels, the last one partial.
  for (bool strided : {false, true}) {
    check_product<T, S>(op::nt, {3, 131, 300}, 1.0, 0.0, strided, gen);
    check_product<T, S>(op::nt, {5, 131, 300}, -1.5, 0.5, strided, gen);
    check_product<T, S>(op::nn, {3, 300, 131}, 1.0, 0.0, strided, gen);
    check_product<T, S>(op::nn, {4, 300, 131}, 0.5, 1.0, strided, gen);
  }
}

TEMPLATE_TEST_CASE("gemm_tn matches the reference", "[gemm]", float, double) {
  peft::rng gen(31);
  for (const auto& sh : small_shapes) {
    for (const auto& [alpha, beta] : alpha_beta) {
      for (bool strided : {false, true}) {
        check_product<TestType, TestType>(op::tn, sh, alpha, beta, strided, gen);
      }
    }
  }
  check_product<TestType, TestType>(op::tn, {40, 23, 129}, 1.0, 1.0, true, gen);
}

TEMPLATE_TEST_CASE("gemm with an empty inner dimension scales c", "[gemm]", float, double) {
  using T = TestType;
  peft::rng gen(5);
  peft::matrix<T> a(3, 0), b(4, 0), bt(0, 4), at(0, 3);
  for (double beta : {0.0, 1.0, -2.0}) {
    auto c_nt = peft_test::random_matrix<T>(3, 4, gen);
    const auto before = peft_test::to_double(c_nt);
    REQUIRE(peft_test::nontrivial(c_nt));
    auto c_nn = c_nt;
    auto c_tn = c_nt;
    if (beta == 0.0) c_nn(1, 1) = std::numeric_limits<T>::quiet_NaN();
    peft::kernels::gemm_nt<T, T>(1.0, a.view(), b.view(), beta, c_nt.view());
    peft::kernels::gemm_nn<T, peft::bf16>(1.0, a.view(), peft::matrix<peft::bf16>(0, 4).view(), beta,
                                         c_nn.view());
    peft::kernels::gemm_tn<T>(1.0, at.view(), peft::matrix<T>(0, 4).view(), beta, c_tn.view());
    const auto want = peft_test::scaled(before, beta);
    INFO("beta " << beta);
    CHECK(peft_test::rel_error(c_nt, want) <= tolerance<T>());
    CHECK(peft_test::rel_error(c_nn, want) <= tolerance<T>());
    CHECK(peft_test::rel_error(c_tn, want) <= tolerance<T>());
  }
  (void)bt;
  // An empty output is a no-op.
  peft::matrix<T> c0(0, 5);
  peft::kernels::gemm_nt<T, T>(1.0, peft::matrix<T>(0, 3).view(), peft::matrix<T>(5, 3).view(), 0.0,
                               c0.view());
  CHECK(c0.empty());
}

TEST_CASE("reference gemm on a hand-computed example", "[gemm]") {
  // a = [[1, 2], [3, 4]], b = [[5, 6], [7, 8]]: a b^T = [[17, 23], [39, 53]],
  // a b = [[19, 22], [43, 50]], a^T b = [[26, 30], [38, 44]].
  const peft::matrix<double> a(2, 2, std::vector<double>{1, 2, 3, 4});
  const peft::matrix<double> b(2, 2, std::vector<double>{5, 6, 7, 8});
  peft::matrix<double> c(2, 2, std::vector<double>{1, 1, 1, 1});
  peft::kernels::reference::gemm_nt<double, double>(2.0, a, b, 3.0, c);
  CHECK(c.storage() == std::vector<double>{37, 49, 81, 109});
  peft::kernels::gemm_nt<double, double>(1.0, a, b, 0.0, c);
  CHECK(c.storage() == std::vector<double>{17, 23, 39, 53});
  peft::kernels::gemm_nn<double, double>(1.0, a, b, 0.0, c);
  CHECK(c.storage() == std::vector<double>{19, 22, 43, 50});
  peft::kernels::gemm_tn<double>(1.0, a, b, 0.0, c);
  CHECK(c.storage() == std::vector<double>{26, 30, 38, 44});
  peft::kernels::reference::gemm_tn<double>(1.0, a, b, 0.0, c);
  CHECK(c.storage() == std::vector<double>{26, 30, 38, 44});
  // bf16 weights: 1.5 and -0.25 are exact in bf16.
  const peft::matrix<peft::bf16> wb(1, 2, std::vector<peft::bf16>{peft::bf16(1.5f), peft::bf16(-0.25f)});
  peft::matrix<float> y(2, 1);
  peft::kernels::gemm_nt<float, peft::bf16>(1.0, peft_test::convert_matrix<float>(a), wb, 0.0, y);
  CHECK(y(0, 0) == 1.0f);   // 1 * 1.5 - 2 * 0.25
  CHECK(y(1, 0) == 3.5f);   // 3 * 1.5 - 4 * 0.25
}

}  // namespace test_gemm
