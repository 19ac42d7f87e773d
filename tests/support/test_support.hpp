// tests/support/test_support.hpp — shared helpers for the unit tests (header-only, no Catch2).
//
// Everything here is written independently of the library's kernels: references are plain
// loops accumulating in double, so a test compares the library against arithmetic it does not
// share. Matrices are anything with rows(), cols() and operator()(i, j) (peft::matrix,
// peft::matrix_view), of any storage scalar (16-bit types are widened exactly).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "peft/core/dtype.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/isa.hpp"

namespace peft_test {

using peft::index;

/// The kernel versions (ISAs) this CPU runs, in the order of kernels::all_isas.
inline std::vector<peft::kernels::isa> supported_isas() {
  std::vector<peft::kernels::isa> v;
  for (auto i : peft::kernels::all_isas) {
    if (peft::kernels::isa_supported(i)) v.push_back(i);
  }
  return v;
}

// ---- tolerances ----------------------------------------------------------------------------------

/// The bound for a result computed in T against a double reference: `for_double` when T is
/// double, `for_float` otherwise. The defaults are the parity bound of the golden cases
/// (tests/data README: 1e-12 computing in double, 1e-5 in float).
template <class T>
constexpr double tolerance(double for_double = 1e-12, double for_float = 1e-5) {
  return std::is_same_v<T, double> ? for_double : for_float;
}

/// "Identical to rounding" for a re-associated product computed in T.
template <class T>
constexpr double rounding() {
  return tolerance<T>(1e-14, 1e-6);
}

/// |error| bound of an f32 dot product of length k against the exact value: k eps sum |x w|
/// (with a margin of 2).
inline double f32_dot_bound(index k, double abs_sum) {
  return 2.0 * static_cast<double>(k + 1) * 6e-8 * abs_sum + 1e-30;
}

/// Unit roundoff of a storage type (what one rounding to it can cost, relatively).
template <class S>
constexpr double unit_roundoff() {
  if constexpr (std::is_same_v<S, double>) return 0x1p-53;
  if constexpr (std::is_same_v<S, float>) return 0x1p-24;
  return 0x1p-8;  // bf16 (and f16 would be 2^-11)
}

/// A compute type T over a frozen weight stored as S, for TEMPLATE_TEST_CASE type lists.
template <class T, class S>
struct compute_on {
  using scalar = T;
  using storage = S;
};

/// The pairs the layer tests run over, named as in their test case names.
namespace compute_types {
using f32_on_f32 = compute_on<float, float>;
using f32_on_f64 = compute_on<float, double>;
using f32_on_bf16 = compute_on<float, peft::bf16>;
using f64_on_f64 = compute_on<double, double>;
using f64_on_f32 = compute_on<double, float>;
using f64_on_bf16 = compute_on<double, peft::bf16>;
}  // namespace compute_types

// ---- elements and random data ----------------------------------------------------------------------

/// Element (i, j) of a matrix or view of any storage scalar, as double (exact widening).
template <class M>
double at(const M& m, index i, index j) {
  return peft::convert<double>(m(i, j));
}

/// Overwrites every element of a view with uniform values in [lo, hi), rounded to T.
template <class T>
void fill_random(peft::matrix_view<T> v, peft::rng& gen, double lo = -1.0, double hi = 1.0) {
  for (index i = 0; i < v.rows(); ++i) {
    for (index j = 0; j < v.cols(); ++j) v(i, j) = peft::convert<T>(gen.uniform(lo, hi));
  }
}

/// A new rows x cols matrix of uniform values in [lo, hi), rounded to T.
template <class T>
peft::matrix<T> random_matrix(index rows, index cols, peft::rng& gen, double lo = -1.0,
                              double hi = 1.0) {
  peft::matrix<T> m(rows, cols);
  fill_random(m.view(), gen, lo, hi);
  return m;
}

/// A new rows x cols matrix of normal values N(0, stddev^2), rounded to T.
template <class T>
peft::matrix<T> normal_matrix(index rows, index cols, peft::rng& gen, double stddev) {
  peft::matrix<T> m(rows, cols);
  for (auto& v : m.storage()) v = peft::convert<T>(gen.normal(0.0, stddev));
  return m;
}

/// A vector of n uniform values in [lo, hi), rounded to T.
template <class T>
std::vector<T> random_vector(index n, peft::rng& gen, double lo = -1.0, double hi = 1.0) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = peft::convert<T>(gen.uniform(lo, hi));
  return v;
}

/// n values whose magnitudes are uniform in [lo, hi) and whose signs are random (the magnitudes
/// are drawn first, then the signs).
template <class T>
std::vector<T> random_signed_vector(index n, peft::rng& gen, double lo, double hi) {
  auto v = random_vector<T>(n, gen, lo, hi);
  for (auto& e : v) e = gen.below(2) ? e : -e;
  return v;
}

/// A deep copy of any matrix or view into a matrix<double>.
template <class M>
peft::matrix<double> to_double(const M& m) {
  peft::matrix<double> r(m.rows(), m.cols());
  for (index i = 0; i < m.rows(); ++i) {
    for (index j = 0; j < m.cols(); ++j) r(i, j) = at(m, i, j);
  }
  return r;
}

/// A deep copy of any matrix or view rounded to element type T.
template <class T, class M>
peft::matrix<T> convert_matrix(const M& m) {
  peft::matrix<T> r(m.rows(), m.cols());
  for (index i = 0; i < m.rows(); ++i) {
    for (index j = 0; j < m.cols(); ++j) r(i, j) = peft::convert<T>(at(m, i, j));
  }
  return r;
}

/// The Frobenius norm, accumulated in double.
template <class M>
double frobenius(const M& m) {
  double s = 0.0;
  for (index i = 0; i < m.rows(); ++i) {
    for (index j = 0; j < m.cols(); ++j) s += at(m, i, j) * at(m, i, j);
  }
  return std::sqrt(s);
}

/// The largest |element| (0 for an empty matrix).
template <class M>
double max_abs(const M& m) {
  double r = 0.0;
  for (index i = 0; i < m.rows(); ++i) {
    for (index j = 0; j < m.cols(); ++j) r = std::max(r, std::abs(at(m, i, j)));
  }
  return r;
}

/// ||a - b||_F / ||b||_F (plain ||a - b||_F when b is zero); infinity on a shape mismatch or NaN.
template <class MA, class MB>
double rel_error(const MA& a, const MB& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return std::numeric_limits<double>::infinity();
  double diff = 0.0;
  double ref = 0.0;
  for (index i = 0; i < a.rows(); ++i) {
    for (index j = 0; j < a.cols(); ++j) {
      const double d = at(a, i, j) - at(b, i, j);
      diff += d * d;
      ref += at(b, i, j) * at(b, i, j);
    }
  }
  const double e = ref > 0.0 ? std::sqrt(diff / ref) : std::sqrt(diff);
  return std::isnan(e) ? std::numeric_limits<double>::infinity() : e;
}

/// The sample moments of a matrix's elements, accumulated in double (row by row).
struct element_moments {
  double n;            // how many elements
  double mean;         // sum / n
  double mean_square;  // sum of squares / n
};

template <class M>
element_moments moments_of(const M& m) {
  double sum = 0.0, sum2 = 0.0;
  for (index i = 0; i < m.rows(); ++i) {
    for (index j = 0; j < m.cols(); ++j) {
      sum += at(m, i, j);
      sum2 += at(m, i, j) * at(m, i, j);
    }
  }
  const double n = static_cast<double>(m.rows() * m.cols());
  return {n, sum / n, sum2 / n};
}

/// True when every element of a and b compares equal (== on the stored values).
template <class MA, class MB>
bool exactly_equal(const MA& a, const MB& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (index i = 0; i < a.rows(); ++i) {
    for (index j = 0; j < a.cols(); ++j) {
      if (!(at(a, i, j) == at(b, i, j))) return false;
    }
  }
  return true;
}

/// True when every element of a and b has the same bit pattern (same shape and element type).
template <class T>
bool bitwise_equal(peft::matrix_view<const T> a, peft::matrix_view<const T> b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (index i = 0; i < a.rows(); ++i) {
    if (std::memcmp(a.row(i), b.row(i), static_cast<std::size_t>(a.cols()) * sizeof(T)) != 0) return false;
  }
  return true;
}

/// How many elements are non-zero.
template <class M>
index count_nonzero(const M& m) {
  index n = 0;
  for (index i = 0; i < m.rows(); ++i) {
    for (index j = 0; j < m.cols(); ++j) n += at(m, i, j) != 0.0 ? 1 : 0;
  }
  return n;
}

/// A random input worth testing with: non-empty, finite, and at least 90% non-zero.
template <class M>
bool nontrivial(const M& m) {
  if (m.rows() == 0 || m.cols() == 0) return false;
  for (index i = 0; i < m.rows(); ++i) {
    for (index j = 0; j < m.cols(); ++j) {
      if (!std::isfinite(at(m, i, j))) return false;
    }
  }
  return 10 * count_nonzero(m) >= 9 * m.rows() * m.cols() && max_abs(m) > 0.0;
}

/// sum_ij y_ij g_ij in double: the loss L = sum(y * G) whose gradient dL/dy is G.
template <class MY, class MG>
double dot(const MY& y, const MG& g) {
  double s = 0.0;
  for (index i = 0; i < y.rows(); ++i) {
    for (index j = 0; j < y.cols(); ++j) s += at(y, i, j) * at(g, i, j);
  }
  return s;
}

/// a b^T (a (m, k), b (n, k)) with plain loops in double.
template <class MA, class MB>
peft::matrix<double> ref_nt(const MA& a, const MB& b) {
  peft::matrix<double> c(a.rows(), b.rows());
  for (index i = 0; i < a.rows(); ++i) {
    for (index j = 0; j < b.rows(); ++j) {
      double s = 0.0;
      for (index p = 0; p < a.cols(); ++p) s += at(a, i, p) * at(b, j, p);
      c(i, j) = s;
    }
  }
  return c;
}

/// a b (a (m, k), b (k, n)) with plain loops in double.
template <class MA, class MB>
peft::matrix<double> ref_nn(const MA& a, const MB& b) {
  peft::matrix<double> c(a.rows(), b.cols());
  for (index i = 0; i < a.rows(); ++i) {
    for (index j = 0; j < b.cols(); ++j) {
      double s = 0.0;
      for (index p = 0; p < a.cols(); ++p) s += at(a, i, p) * at(b, p, j);
      c(i, j) = s;
    }
  }
  return c;
}

/// a^T b (a (k, m), b (k, n)) with plain loops in double.
template <class MA, class MB>
peft::matrix<double> ref_tn(const MA& a, const MB& b) {
  peft::matrix<double> c(a.cols(), b.cols());
  for (index i = 0; i < a.cols(); ++i) {
    for (index j = 0; j < b.cols(); ++j) {
      double s = 0.0;
      for (index p = 0; p < a.rows(); ++p) s += at(a, p, i) * at(b, p, j);
      c(i, j) = s;
    }
  }
  return c;
}

/// The frozen linear layer x W^T + b in double; `bias` may be empty (no bias).
template <class MX, class MW, class V>
peft::matrix<double> ref_linear(const MX& x, const MW& w, const std::vector<V>& bias) {
  peft::matrix<double> y = ref_nt(x, w);
  if (!bias.empty()) {
    for (index i = 0; i < y.rows(); ++i) {
      for (index j = 0; j < y.cols(); ++j) y(i, j) += peft::convert<double>(bias[static_cast<std::size_t>(j)]);
    }
  }
  return y;
}

/// One LoRA term s (x A^T B^T + b_B) in double; `bias` is a (1, out) matrix or empty.
template <class MX, class MA, class MB, class MBias>
peft::matrix<double> ref_lora_term(const MX& x, const MA& a, const MB& b, const MBias& bias,
                                   double s) {
  const peft::matrix<double> t = ref_nt(x, a);  // (batch, r)
  peft::matrix<double> y = ref_nt(t, b);        // (batch, out)
  for (index i = 0; i < y.rows(); ++i) {
    for (index j = 0; j < y.cols(); ++j) {
      y(i, j) = s * (y(i, j) + (bias.cols() > 0 ? at(bias, 0, j) : 0.0));
    }
  }
  return y;
}

/// a + alpha * b elementwise, in double.
template <class MA, class MB>
peft::matrix<double> add(const MA& a, const MB& b, double alpha = 1.0) {
  peft::matrix<double> c(a.rows(), a.cols());
  for (index i = 0; i < a.rows(); ++i) {
    for (index j = 0; j < a.cols(); ++j) c(i, j) = at(a, i, j) + alpha * at(b, i, j);
  }
  return c;
}

/// alpha * a elementwise, in double.
template <class M>
peft::matrix<double> scaled(const M& a, double alpha) {
  peft::matrix<double> c(a.rows(), a.cols());
  for (index i = 0; i < a.rows(); ++i) {
    for (index j = 0; j < a.cols(); ++j) c(i, j) = alpha * at(a, i, j);
  }
  return c;
}

/// Central difference (L(p + h) - L(p - h)) / (p+ - p-) of loss() in one scalar p, restored after.
template <class T, class F>
double central_difference(T& p, double h, F&& loss) {
  const T saved = p;
  const T up = peft::convert<T>(peft::convert<double>(saved) + h);
  const T down = peft::convert<T>(peft::convert<double>(saved) - h);
  p = up;
  const double l_up = loss();
  p = down;
  const double l_down = loss();
  p = saved;
  return (l_up - l_down) / (peft::convert<double>(up) - peft::convert<double>(down));
}

/// The central-difference gradient of loss() with respect to every element of `param`.
template <class T, class F>
peft::matrix<double> fd_gradient(peft::matrix_view<T> param, double h, F&& loss) {
  peft::matrix<double> g(param.rows(), param.cols());
  for (index i = 0; i < param.rows(); ++i) {
    for (index j = 0; j < param.cols(); ++j) g(i, j) = central_difference(param(i, j), h, loss);
  }
  return g;
}

/// Column sums of a matrix as a (1, cols) matrix<double>.
template <class M>
peft::matrix<double> column_sums(const M& m) {
  peft::matrix<double> s(1, m.cols());
  for (index i = 0; i < m.rows(); ++i) {
    for (index j = 0; j < m.cols(); ++j) s(0, j) += at(m, i, j);
  }
  return s;
}

}  // namespace peft_test
