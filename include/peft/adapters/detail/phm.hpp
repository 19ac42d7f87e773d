// peft/adapters/detail/phm.hpp — the LPHM product shared by Compacter (compacter.hpp) and its
// mergeable Kronecker form (phm_delta.hpp), and the shared "rule" tensor both use.
//
//   PHM(z) = z H,   H = sum_{i<n} op(A_i) kron (l_i r_i^T)        H (n p, n q) = (in, out)
//   op(A_i) = A_i (rule_side::as_stored) or A_i^T (rule_side::transposed); H is never formed:
//   two GEMMs over the batch and an n^3-per-row contraction, O(batch n^2 (p + q)).
//
// phm_rule<T> holds A (n, n, n) as (n, n n) and its gradient; layers hold it through a
// std::shared_ptr, read the same memory and accumulate into the same gradient.
// Derivation and gradients: docs/methods/compacter.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <numbers>
#include <string>
#include <vector>

#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// The PHM rule A (n, n, n) and its gradient, shared by every layer built from it.
/// Stored as a (n, n n) matrix: value(i, a n + c) = A_i[a, c] (row-major (n, n, n), as saved).
/// Do not resize `value` or `grad`: layers check their shape on every call.
template <compute_scalar T>
struct phm_rule {
  matrix<T> value;  // (n, n * n)
  matrix<T> grad;   // (n, n * n), += by every layer that shares the rule

  phm_rule() = default;
  /// A zero rule of order n (n >= 1).
  explicit phm_rule(index n) : value(checked(n), n * n), grad(n, n * n) {}
  /// A rule from n^3 values in (i, a, c) order, as a (n, n, n) tensor is stored.
  phm_rule(index n, std::vector<T> values) : value(checked(n), n * n, checked(n, std::move(values))), grad(n, n * n) {}

  index n() const noexcept { return value.rows(); }
  T& operator()(index i, index a, index c) noexcept { return value(i, a * n() + c); }
  T operator()(index i, index a, index c) const noexcept { return value(i, a * n() + c); }
  void zero_grad() { grad.fill(T{0}); }

 private:
  static index checked(index n) {
    if (n < 1) detail::raise<shape_error>("phm_rule::phm_rule", "order n must be >= 1, got " + std::to_string(n));
    return n;
  }
  static std::vector<T> checked(index n, std::vector<T> values) {
    if (static_cast<index>(values.size()) != checked(n) * n * n) {
      detail::raise<shape_error>("phm_rule::phm_rule", std::to_string(values.size()) + " values for a rule of order " +
                                                           std::to_string(n) + ", expected " + std::to_string(n * n * n));
    }
    return values;
  }
};

/// A new shared rule of order n with entries ~ N(0, stddev^2) (the paper's code: phm_c_init =
/// "normal", phm_init_range = 1e-4).
template <compute_scalar T>
std::shared_ptr<phm_rule<T>> make_phm_rule(index n, double stddev, std::uint64_t seed) {
  auto r = std::make_shared<phm_rule<T>>(n);
  rng gen(seed);
  for (auto& v : r->value.storage()) v = static_cast<T>(gen.normal(0.0, stddev));
  return r;
}

namespace detail::phm {

/// Which of A_i and A_i^T multiplies the rank-one block (see the top of the file).
enum class rule_side : std::uint8_t { as_stored, transposed };

/// Per-call buffers, kept between forward and backward: M = Z L^T and Q (both (batch n, n)),
/// and the backward scratch dM, dQ.
template <class T>
struct workspace {
  matrix<T> m;
  matrix<T> q;
  matrix<T> dm;
  matrix<T> dq;
};

template <class T>
void ensure(matrix<T>& m, index rows, index cols) {
  if (m.rows() != rows || m.cols() != cols) m = matrix<T>(rows, cols);
}

/// Calls f(first_row, count) over the batch: one chunk when every view is contiguous (so a
/// (count, n w) block is a (count n, w) matrix), else row by row.
template <class F>
void for_chunks(index batch, bool contiguous, F&& f) {
  if (batch == 0) return;
  if (contiguous) {
    f(index{0}, batch);
  } else {
    for (index b = 0; b < batch; ++b) f(b, index{1});
  }
}

/// Rows [first, first + count) of v (batch, n w) seen as (count n, w).
template <class T>
matrix_view<T> reshaped(matrix_view<T> v, index first, index count, index n) {
  return matrix_view<T>(v.row(first), count * n, v.cols() / n);
}

/// op(A_i)[a, c] for the rule stored as (n, n n).
template <class T>
T rule_at(matrix_view<const T> rule, rule_side side, index i, index a, index c) noexcept {
  const index n = rule.rows();
  return side == rule_side::as_stored ? rule(i, a * n + c) : rule(i, c * n + a);
}

/// ws.m = Z L^T and ws.q = the rule contraction, for z (batch, n p). Shapes are the caller's
/// responsibility (rule (n, n n), left (n, p), z (batch, n p)).
template <class T>
void prepare(matrix_view<const T> rule, rule_side side, matrix_view<const T> left, matrix_view<const T> z,
             workspace<T>& ws) {
  const index n = rule.rows();
  const index batch = z.rows();
  ensure(ws.m, batch * n, n);
  ensure(ws.q, batch * n, n);
  for_chunks(batch, z.contiguous(), [&](index b0, index cnt) {
    kernels::gemm_nt<T, T>(1.0, reshaped(z, b0, cnt, n), left, 0.0, ws.m.view().row_block(b0 * n, cnt * n));
  });
  // Q[r n + c, i] = sum_a op(A_i)[a, c] M[r n + a, i]: n^3 per row.
  for (index r = 0; r < batch; ++r) {
    const index base = r * n;
    for (index c = 0; c < n; ++c) {
      T* qrow = ws.q.row(base + c);
      for (index i = 0; i < n; ++i) {
        T s{0};
        for (index a = 0; a < n; ++a) s += rule_at(rule, side, i, a, c) * ws.m(base + a, i);
        qrow[i] = s;
      }
    }
  }
}

/// out = z H (+ out when `accumulate`); z (batch, n p), out (batch, n q). Fills ws for backward.
template <class T>
void apply(matrix_view<const T> rule, rule_side side, matrix_view<const T> left, matrix_view<const T> right,
           matrix_view<const T> z, matrix_view<T> out, bool accumulate, workspace<T>& ws) {
  const index n = rule.rows();
  prepare(rule, side, left, z, ws);
  for_chunks(z.rows(), out.contiguous(), [&](index b0, index cnt) {
    kernels::gemm_nn<T, T>(1.0, ws.q.view().row_block(b0 * n, cnt * n), right, accumulate ? 1.0 : 0.0,
                           reshaped(out, b0, cnt, n));
  });
}

/// Given g = dL/d(z H) (batch, n q) and ws from apply/prepare on the same z:
/// rule_grad += dA, left_grad += dL, right_grad += dR, and dz = g H^T (+ dz when
/// `accumulate_dz`); an empty dz skips the input gradient.
template <class T>
void apply_backward(matrix_view<const T> rule, rule_side side, matrix_view<const T> left,
                    matrix_view<const T> right, matrix_view<const T> z, matrix_view<const T> g, workspace<T>& ws,
                    matrix_view<T> rule_grad, matrix_view<T> left_grad, matrix_view<T> right_grad,
                    matrix_view<T> dz, bool accumulate_dz) {
  const index n = rule.rows();
  const index batch = z.rows();
  ensure(ws.dq, batch * n, n);
  ensure(ws.dm, batch * n, n);
  for_chunks(batch, g.contiguous(), [&](index b0, index cnt) {
    const auto gc = reshaped(g, b0, cnt, n);                                          // (cnt n, q)
    kernels::gemm_tn<T>(1.0, ws.q.view().row_block(b0 * n, cnt * n), gc, 1.0, right_grad);  // dR += Q^T G
    kernels::gemm_nt<T, T>(1.0, gc, right, 0.0, ws.dq.view().row_block(b0 * n, cnt * n));  // dQ = G R^T
  });
  for (index r = 0; r < batch; ++r) {
    const index base = r * n;
    for (index a = 0; a < n; ++a) {
      for (index i = 0; i < n; ++i) {
        const T mai = ws.m(base + a, i);
        T s{0};
        for (index c = 0; c < n; ++c) {
          const T dqc = ws.dq(base + c, i);
          s += rule_at(rule, side, i, a, c) * dqc;
          if (side == rule_side::as_stored) {
            rule_grad(i, a * n + c) += mai * dqc;
          } else {
            rule_grad(i, c * n + a) += mai * dqc;
          }
        }
        ws.dm(base + a, i) = s;
      }
    }
  }
  for_chunks(batch, z.contiguous(), [&](index b0, index cnt) {
    kernels::gemm_tn<T>(1.0, ws.dm.view().row_block(b0 * n, cnt * n), reshaped(z, b0, cnt, n), 1.0,
                        left_grad);  // dL += dM^T Z
  });
  if (!dz.empty()) {
    for_chunks(batch, dz.contiguous(), [&](index b0, index cnt) {
      kernels::gemm_nn<T, T>(1.0, ws.dm.view().row_block(b0 * n, cnt * n), left, accumulate_dz ? 1.0 : 0.0,
                             reshaped(dz, b0, cnt, n));  // dZ = dM L
    });
  }
}

/// dst (n p, n q) = sum_i op(A_i) kron (l_i r_i^T), one (p, q) block per (a, c):
/// block = L^T diag(op(A)[:, a, c]) R. For merging (phm_delta) and for references.
template <class T>
void kron_sum(matrix_view<const T> rule, rule_side side, matrix_view<const T> left, matrix_view<const T> right,
              matrix_view<T> dst) {
  const index n = rule.rows();
  const index p = left.cols();
  const index q = right.cols();
  matrix<T> scaled(n, p);
  for (index a = 0; a < n; ++a) {
    for (index c = 0; c < n; ++c) {
      for (index i = 0; i < n; ++i) {
        const T s = rule_at(rule, side, i, a, c);
        for (index b = 0; b < p; ++b) scaled(i, b) = s * left(i, b);
      }
      kernels::gemm_tn<T>(1.0, scaled.view(), right, 0.0, dst.block(a * p, c * q, p, q));
    }
  }
}

/// gelu with the tanh approximation (PyTorch's approximate="tanh", HF's "gelu_new"):
/// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
template <class T>
T gelu_tanh(T x) noexcept {
  constexpr T c = static_cast<T>(0.79788456080286535587989211986876);  // sqrt(2 / pi)
  constexpr T k = static_cast<T>(0.044715);
  return static_cast<T>(0.5) * x * (T{1} + std::tanh(c * (x + k * x * x * x)));
}

/// d gelu_tanh / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 0.044715 x^2), t = tanh(.).
template <class T>
T gelu_tanh_derivative(T x) noexcept {
  constexpr T c = static_cast<T>(0.79788456080286535587989211986876);
  constexpr T k = static_cast<T>(0.044715);
  const T t = std::tanh(c * (x + k * x * x * x));
  return static_cast<T>(0.5) * (T{1} + t) +
         static_cast<T>(0.5) * x * (T{1} - t * t) * c * (T{1} + T{3} * k * x * x);
}

/// The paper code's "glorot-uniform" on one rank-one factor: torch xavier_uniform_ with gain
/// sqrt(2) on a (w, 1) or (1, w) matrix, i.e. U(-b, b) with b = sqrt(2) sqrt(6 / (w + 1)).
template <class T>
void glorot_uniform_rows(matrix<T>& m, rng& gen) {
  const double bound = std::numbers::sqrt2 * std::sqrt(6.0 / static_cast<double>(m.cols() + 1));
  for (auto& v : m.storage()) v = static_cast<T>(gen.uniform(-bound, bound));
}

/// Column sums of g added to the (1, cols) bias gradient.
template <class T>
void add_column_sums(matrix_view<const T> g, matrix_view<T> bias_grad) {
  for (index r = 0; r < g.rows(); ++r) {
    const T* row = g.row(r);
    for (index j = 0; j < g.cols(); ++j) bias_grad(0, j) += row[j];
  }
}

/// y[r, :] += bias for every row.
template <class T>
void add_row_bias(matrix_view<T> y, matrix_view<const T> bias) {
  for (index r = 0; r < y.rows(); ++r) {
    T* row = y.row(r);
    for (index j = 0; j < y.cols(); ++j) row[j] += bias(0, j);
  }
}

/// Throws shape_error unless the shared rule exists and is (n, n n) with a same-shaped gradient.
template <class T>
void check_rule(const char* where, const std::shared_ptr<phm_rule<T>>& rule, index n) {
  if (!rule) detail::raise<shape_error>(where, "the rule is null");
  const index rn = rule->value.rows();
  if (rn != n || rule->value.cols() != n * n || rule->grad.rows() != n || rule->grad.cols() != n * n) {
    detail::raise<shape_error>(where, "the shared rule is " + shape_string(rule->value.rows(), rule->value.cols()) +
                                          " with gradient " + shape_string(rule->grad.rows(), rule->grad.cols()) +
                                          ", expected both " + shape_string(n, n * n) + " (order " +
                                          std::to_string(n) + ")");
  }
}

/// Throws shape_error unless `dim` is positive and divisible by n.
inline void check_divisible(const char* where, const char* what, index dim, index n) {
  if (dim < 1 || dim % n != 0) {
    detail::raise<shape_error>(where, std::string(what) + " = " + std::to_string(dim) +
                                          " must be a positive multiple of the PHM order n = " + std::to_string(n));
  }
}

}  // namespace detail::phm
}  // namespace peft
