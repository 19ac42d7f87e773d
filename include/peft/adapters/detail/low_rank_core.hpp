// peft/adapters/detail/low_rank_core.hpp — the one low-rank term behind LoRA, AdaLoRA, VeRA, SoRA,
// dynamic-rank LoRA and the mixed-batch serving path.
//
//   term(x) = s ((x A^T * c) B^T) * lambda + s b      A (r, in), B (out, r)
//   c (r): an optional gate / singular values / lambda_d; lambda (out): an optional output
//   scale (VeRA's lambda_b); b (out): an optional bias (LoRA's lora_B.bias); s a scalar.
//
// A method describes its term with a low_rank_term (views of its own tensors) and where the
// gradients go with low_rank_gradients (null or empty: frozen); low_rank_adapter then gives it
// forward (fused into the base product through kernels::low_rank_epilogue), add_term, backward,
// backward_term, delta_weight and delta_bias. Gradients (g = dL/dy, t = x A^T, p = t * c,
// z = p B^T, u = (g * lambda) B):
//   dB += s (g * lambda)^T p   dc += s sum_rows u * t   dA += s (u * c)^T x   dx += s (u * c) A
//   dlambda += s sum_rows g * z   db += s sum_rows g
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "peft/core/additive_adapter.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/gemm.hpp"
#include "peft/kernels/linear.hpp"
#include "peft/kernels/low_rank_epilogue.hpp"

namespace peft {

/// The term of a low-rank method: views into the method's tensors.
template <compute_scalar T>
struct low_rank_term {
  matrix_view<const T> a;        // (r, in)
  matrix_view<const T> b;        // (out, r)
  const T* c = nullptr;          // (r) or null
  const T* lambda = nullptr;     // (out) or null
  const T* bias = nullptr;       // (out) or null
  T scale = T{1};

  index rank() const noexcept { return a.rows(); }
  index in_features() const noexcept { return a.cols(); }
  index out_features() const noexcept { return b.rows(); }
};

/// Where a low-rank term's gradients accumulate; an empty view or null pointer is not trained.
template <compute_scalar T>
struct low_rank_gradients {
  matrix_view<T> a;       // (r, in)
  matrix_view<T> b;       // (out, r)
  T* c = nullptr;         // (r)
  T* lambda = nullptr;    // (out)
  T* bias = nullptr;      // (out)
};

/// What backward needs from forward: t = x A^T, p = t * c (t itself without c), z = p B^T
/// (only with lambda).
template <compute_scalar T>
struct low_rank_cache {
  matrix<T> t;  // (batch, r)
  matrix<T> p;  // (batch, r), used only with c
  matrix<T> z;  // (batch, out), used only with lambda
  index rows = -1;       // the batch t and p hold, -1: none
  bool z_ready = false;  // z was written by the forward of that batch

  /// p = t * c, or t itself when the term has no c.
  matrix_view<const T> projected(const low_rank_term<T>& term) const {
    return term.c != nullptr ? p.view() : t.view();
  }
};

namespace low_rank {

namespace detail {
template <class T>
void resize(matrix<T>& m, index rows, index cols) {
  if (m.rows() != rows || m.cols() != cols) m = matrix<T>(rows, cols);
}
}  // namespace detail

/// cache.t = x A^T and cache.p = t * c; cache.z is sized (not computed) when the term has lambda.
template <compute_scalar T>
void project(const low_rank_term<T>& term, matrix_view<const T> x, low_rank_cache<T>& cache) {
  const index n = x.rows(), r = term.rank();
  detail::resize(cache.t, n, r);
  if (r > 0) {
    // A few f32 rows (decoding): the dispatched dot blocks, without a BLAS call's fixed cost.
    if constexpr (std::is_same_v<T, float>) {
      if (kernels::low_rank_on_blocks<T>(n)) {
        kernels::linear_nt(x, term.a, nullptr, cache.t.view());
      } else {
        kernels::gemm_nt<T, T>(1.0, x, term.a, 0.0, cache.t.view());
      }
    } else {
      kernels::gemm_nt<T, T>(1.0, x, term.a, 0.0, cache.t.view());
    }
  }
  if (term.c != nullptr) {
    detail::resize(cache.p, n, r);
    for (index i = 0; i < n; ++i) {
      const T* src = cache.t.row(i);
      T* dst = cache.p.row(i);
      for (index q = 0; q < r; ++q) dst[q] = src[q] * term.c[q];
    }
  }
  if (term.lambda != nullptr) detail::resize(cache.z, n, term.out_features());
  cache.rows = n;
  cache.z_ready = false;
}

/// The epilogue adding the term to the tiles of the base product, after project() on the same x.
/// With lambda it also fills cache.z for backward.
template <compute_scalar T>
kernels::low_rank_epilogue<T> epilogue(const low_rank_term<T>& term, low_rank_cache<T>& cache) {
  kernels::low_rank_epilogue<T> e;
  e.p = cache.projected(term);
  e.b = term.b;
  e.scale = term.scale;
  e.col = term.lambda;
  e.bias = term.bias;
  e.bias_scale = term.scale;
  if (term.lambda != nullptr) {
    e.unscaled = cache.z.view();
    cache.z_ready = true;  // the epilogue fills it
  }
  return e;
}

/// y += term(x) (unfused), keeping what backward needs in the cache.
template <compute_scalar T>
void add(const low_rank_term<T>& term, matrix_view<const T> x, matrix_view<T> y, low_rank_cache<T>& cache) {
  project(term, x, cache);
  if (term.rank() == 0 && term.bias == nullptr) return;
  if (term.lambda == nullptr && term.bias == nullptr && !kernels::low_rank_on_blocks<T>(x.rows())) {
    kernels::gemm_nt<T, T>(static_cast<double>(term.scale), cache.projected(term), term.b, 1.0, y);
    return;
  }
  epilogue(term, cache)(index{0}, index{0}, y);  // the fused path's arithmetic (few rows: dot blocks)
}

/// Accumulates the gradients `grads` asks for and dx += (d term / dx)^T g. Uses the cache of a
/// forward on the same x, or recomputes it.
template <compute_scalar T>
void backward(const low_rank_term<T>& term, const low_rank_gradients<T>& grads, matrix_view<const T> x,
              matrix_view<const T> g, matrix_view<T> dx, low_rank_cache<T>& cache) {
  const index n = x.rows(), r = term.rank(), out = term.out_features();
  const double s = static_cast<double>(term.scale);
  if (cache.rows != n || cache.t.rows() != n || cache.t.cols() != r) project(term, x, cache);
  if (term.lambda != nullptr && grads.lambda != nullptr) {
    if (!cache.z_ready) {
      detail::resize(cache.z, n, out);
      if (r > 0) kernels::gemm_nt<T, T>(1.0, cache.projected(term), term.b, 0.0, cache.z.view());
      cache.z_ready = true;
    }
    for (index j = 0; j < out; ++j) {
      T sum = T{0};
      for (index i = 0; i < n; ++i) sum += g(i, j) * cache.z(i, j);
      grads.lambda[j] += term.scale * sum;
    }
  }
  if (term.bias != nullptr && grads.bias != nullptr) {
    for (index i = 0; i < n; ++i) {
      for (index j = 0; j < out; ++j) grads.bias[j] += term.scale * g(i, j);
    }
  }
  if (r == 0) return;
  matrix<T> gl;                              // g * lambda (batch, out)
  matrix_view<const T> gv = g;
  if (term.lambda != nullptr) {
    gl = matrix<T>(n, out);
    for (index i = 0; i < n; ++i) {
      for (index j = 0; j < out; ++j) gl(i, j) = g(i, j) * term.lambda[j];
    }
    gv = gl.view();
  }
  matrix<T> u(n, r);                                                            // (batch, r)
  kernels::gemm_nn<T, T>(1.0, gv, term.b, 0.0, u.view());                      // u = (g * lambda) B
  if (!grads.b.empty()) kernels::gemm_tn<T>(s, gv, cache.projected(term), 1.0, grads.b);  // dB += s gl^T p
  if (term.c != nullptr) {
    for (index i = 0; i < n; ++i) {
      T* ur = u.row(i);
      const T* tr = cache.t.row(i);
      for (index q = 0; q < r; ++q) {
        if (grads.c != nullptr) grads.c[q] += term.scale * ur[q] * tr[q];       // dc += s u * t
        ur[q] *= term.c[q];                                                      // u <- u * c
      }
    }
  }
  if (!grads.a.empty()) kernels::gemm_tn<T>(s, u.view(), x, 1.0, grads.a);     // dA += s u^T x
  kernels::gemm_nn<T, T>(s, u.view(), term.a, 1.0, dx);                        // dx += s u A
}

/// dw = s diag(lambda) B diag(c) A (out, in), overwritten.
template <compute_scalar T>
void delta(const low_rank_term<T>& term, matrix_view<T> dw) {
  const index r = term.rank(), out = term.out_features();
  if (term.c == nullptr && term.lambda == nullptr) {
    kernels::gemm_nn<T, T>(static_cast<double>(term.scale), term.b, term.a, 0.0, dw);
    return;
  }
  matrix<T> bc(out, r);  // diag(lambda) B diag(c)
  for (index i = 0; i < out; ++i) {
    const T li = term.lambda != nullptr ? term.lambda[i] : T{1};
    for (index q = 0; q < r; ++q) bc(i, q) = li * term.b(i, q) * (term.c != nullptr ? term.c[q] : T{1});
  }
  kernels::gemm_nn<T, T>(static_cast<double>(term.scale), bc.view(), term.a, 0.0, dw);
}

/// db = s b; false (db untouched) without a bias.
template <compute_scalar T>
bool delta_bias(const low_rank_term<T>& term, T* db) {
  if (term.bias == nullptr) return false;
  for (index j = 0; j < term.out_features(); ++j) db[j] = term.scale * term.bias[j];
  return true;
}

/// ||a_q||_2 ||b_q||_2 per component q (row q of A, column q of B), in double.
template <compute_scalar T>
std::vector<double> component_norms(const low_rank_term<T>& term) {
  std::vector<double> n(static_cast<std::size_t>(term.rank()));
  for (index q = 0; q < term.rank(); ++q) {
    double sa = 0.0, sb = 0.0;
    for (index j = 0; j < term.in_features(); ++j) sa += static_cast<double>(term.a(q, j)) * static_cast<double>(term.a(q, j));
    for (index j = 0; j < term.out_features(); ++j) sb += static_cast<double>(term.b(j, q)) * static_cast<double>(term.b(j, q));
    n[static_cast<std::size_t>(q)] = std::sqrt(sa) * std::sqrt(sb);
  }
  return n;
}

/// ||B diag(c) A||_F (lambda and s excluded), from the (r, r) Gram matrices A A^T and B^T B
/// (r^2 (in + out) multiply-adds) unless forming the (out, in) product is cheaper.
template <compute_scalar T>
double frobenius_norm(const low_rank_term<T>& term) {
  const index r = term.rank(), in = term.in_features(), out = term.out_features();
  auto cv = [&](index q) { return term.c != nullptr ? static_cast<double>(term.c[q]) : 1.0; };
  double sum = 0.0;
  if (r * (in + out) >= in * out) {
    low_rank_term<T> plain = term;
    plain.lambda = nullptr;
    plain.scale = T{1};
    matrix<T> dw(out, in);
    delta(plain, dw.view());
    for (T v : dw.storage()) sum += static_cast<double>(v) * static_cast<double>(v);
    return std::sqrt(sum);
  }
  matrix<T> ga(r, r), gb(r, r);
  kernels::gemm_nt<T, T>(1.0, term.a, term.a, 0.0, ga.view());  // A A^T
  kernels::gemm_tn<T>(1.0, term.b, term.b, 0.0, gb.view());      // B^T B
  for (index i = 0; i < r; ++i) {
    double row = 0.0;
    for (index j = 0; j < r; ++j) row += cv(j) * static_cast<double>(ga(i, j)) * static_cast<double>(gb(i, j));
    sum += cv(i) * row;
  }
  return std::sqrt(std::max(sum, 0.0));  // rounding may leave a tiny negative for a ~zero product
}

}  // namespace low_rank

/// The four passes, delta_weight and delta_bias of a method whose term is a low_rank_term. The
/// derived class provides
///   low_rank_term<T> low_rank() const;             its term
///   low_rank_gradients<T> low_rank_grads();        where its gradients go
/// and optionally `void after_backward()` (dynamic-rank masks its gate gradient there) and
/// `void check_ready(const char* where) const` (see additive_adapter).
template <class Derived, compute_scalar T>
class low_rank_adapter : public additive_adapter<Derived, T> {
  friend class additive_adapter<Derived, T>;

 public:
  using cache_type = low_rank_cache<T>;

  /// dW = s diag(lambda) B diag(c) A (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    const std::string where = this->where("delta_weight");
    this->check_base(where.c_str(), w);
    peft::detail::expect_shape(where.c_str(), "dw", dw, self().out_features(), self().in_features());
    low_rank::delta(self().low_rank(), dw);
  }
  /// db = s b; false (db untouched) without a bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* db) const {
    return low_rank::delta_bias(self().low_rank(), db);
  }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }
  Derived& self() { return static_cast<Derived&>(*this); }

  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    low_rank::add(self().low_rank(), x, y, cache);
  }
  kernels::low_rank_epilogue<T> tile_epilogue(matrix_view<const T> x, cache_type& cache) const {
    const low_rank_term<T> term = self().low_rank();
    low_rank::project(term, x, cache);
    return low_rank::epilogue(term, cache);
  }
  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    low_rank::backward(self().low_rank(), self().low_rank_grads(), x, g, dx, cache);
    if constexpr (requires(Derived& d) { d.after_backward(); }) self().after_backward();
  }
};

}  // namespace peft
