// peft/adapters/detail/gated_low_rank.hpp — the kernel shared by the gated-rank adapters.
//
//   term(x) = s ((x A^T) * c) B^T = s x (B diag(c) A)^T     A (r, in), B (out, r), c (r)
//
// dynamic_rank (c = the component scalars) and sora (c = the gate) both own one of these and
// add their method-specific parts (importance and masks; proximal gate steps) around it.
// Gradients (g = dL/dy, t = x A^T (batch, r), u = g B (batch, r)):
//   dB += s g^T (t * c)     dA += s (u * c)^T x     dc_i += s sum_b u_bi t_bi     dx += s (u * c) A
// Not part of the public API: use dynamic_rank / sora.
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft::detail {

/// What backward needs from forward: t = x A^T (batch, r), and a (batch, r) work buffer.
template <compute_scalar T>
struct gated_low_rank_cache {
  matrix<T> t;      // (batch, r)
  matrix<T> gated;  // (batch, r): t * c in forward, (g B) * c in backward
};

template <compute_scalar T>
class gated_low_rank {
 public:
  gated_low_rank() = default;

  /// Takes A (r, in), B (out, r), c (r values) and the scale s; `where` names the public
  /// constructor in error messages. r, in and out must be >= 1.
  gated_low_rank(const char* where, matrix<T> a, matrix<T> b, std::vector<T> c, T scale)
      : a_(std::move(a)), b_(std::move(b)), scale_(scale) {
    if (a_.rows() < 1 || a_.cols() < 1 || b_.rows() < 1) {
      raise<shape_error>(where, "A is " + shape_string(a_.rows(), a_.cols()) + " and B is " +
                                    shape_string(b_.rows(), b_.cols()) +
                                    ": rank, in_features and out_features must be >= 1");
    }
    if (b_.cols() != a_.rows()) {
      raise<shape_error>(where, "B is " + shape_string(b_.rows(), b_.cols()) + " but A has rank " +
                                    std::to_string(a_.rows()));
    }
    if (static_cast<index>(c.size()) != a_.rows()) {
      std::string m = "the component vector has ";
      m += std::to_string(c.size());
      m += " values, expected ";
      m += std::to_string(a_.rows());
      raise<shape_error>(where, m);
    }
    c_ = matrix<T>(1, a_.rows(), std::move(c));
    ga_ = matrix<T>(a_.rows(), a_.cols());
    gb_ = matrix<T>(b_.rows(), b_.cols());
    gc_ = matrix<T>(1, a_.rows());
  }

  index in_features() const noexcept { return a_.cols(); }
  index out_features() const noexcept { return b_.rows(); }
  index rank() const noexcept { return a_.rows(); }
  T scale() const noexcept { return scale_; }
  void set_scale(T s) noexcept { scale_ = s; }

  matrix<T>& a() noexcept { return a_; }
  const matrix<T>& a() const noexcept { return a_; }
  matrix<T>& b() noexcept { return b_; }
  const matrix<T>& b() const noexcept { return b_; }
  matrix<T>& c() noexcept { return c_; }  // (1, r)
  const matrix<T>& c() const noexcept { return c_; }
  matrix<T>& grad_a() noexcept { return ga_; }
  const matrix<T>& grad_a() const noexcept { return ga_; }
  matrix<T>& grad_b() noexcept { return gb_; }
  const matrix<T>& grad_b() const noexcept { return gb_; }
  matrix<T>& grad_c() noexcept { return gc_; }
  const matrix<T>& grad_c() const noexcept { return gc_; }

  /// Components with c_i != 0.
  index active_rank() const noexcept {
    index n = 0;
    for (index i = 0; i < rank(); ++i) n += c_(0, i) != T{0} ? 1 : 0;
    return n;
  }

  // ---- shape checks, messages "[where] ..." ---------------------------------------------------

  template <class Base>
  void check_base(const char* where, const Base& w) const {
    detail::check_adapter_base(where, *this, w);
  }
  template <class Base>
  void check_io(const char* where, const Base& w, matrix_view<const T> x, matrix_view<T> y) const {
    check_base(where, w);
    expect_shape(where, "x", x, x.rows(), in_features());
    expect_shape(where, "y", y, x.rows(), out_features());
  }
  template <class Base>
  void check_grad(const char* where, const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                  matrix_view<T> dx) const {
    check_base(where, w);
    expect_shape(where, "x", x, x.rows(), in_features());
    expect_shape(where, "dy", g, x.rows(), out_features());
    expect_shape(where, "dx", dx, x.rows(), in_features());
  }

  // ---- the kernel -----------------------------------------------------------------------------

  /// y += s ((x A^T) * c) B^T; keeps t = x A^T in the cache for backward.
  void add(matrix_view<const T> x, matrix_view<T> y, gated_low_rank_cache<T>& cache) const {
    ensure(cache, x.rows());
    kernels::gemm_nt<T, T>(1.0, x, a_.view(), 0.0, cache.t.view());  // t = x A^T
    scale_columns(cache.t, cache.gated);                              // t * c
    kernels::gemm_nt<T, T>(static_cast<double>(scale_), cache.gated.view(), b_.view(), 1.0, y);
  }

  /// dA, dB, dc += (see the file comment); dx += s ((g B) * c) A. Uses t from the forward on the
  /// same x (recomputed when the cache does not hold one of the right shape).
  void backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                gated_low_rank_cache<T>& cache) {
    const bool stale = cache.t.rows() != x.rows() || cache.t.cols() != rank();
    ensure(cache, x.rows());
    if (stale) kernels::gemm_nt<T, T>(1.0, x, a_.view(), 0.0, cache.t.view());
    const double s = static_cast<double>(scale_);
    matrix<T> u(x.rows(), rank());                                     // (batch, r)
    kernels::gemm_nn<T, T>(1.0, g, b_.view(), 0.0, u.view());          // u = g B
    for (index bi = 0; bi < x.rows(); ++bi) {                          // dc_i += s sum_b u t
      const T* ur = u.row(bi);
      const T* tr = cache.t.row(bi);
      for (index i = 0; i < rank(); ++i) gc_(0, i) += scale_ * ur[i] * tr[i];
    }
    scale_columns(cache.t, cache.gated);                               // t * c
    kernels::gemm_tn<T>(s, g, cache.gated.view(), 1.0, gb_.view());   // dB += s g^T (t * c)
    scale_columns(u, cache.gated);                                     // v = u * c
    kernels::gemm_tn<T>(s, cache.gated.view(), x, 1.0, ga_.view());   // dA += s v^T x
    kernels::gemm_nn<T, T>(s, cache.gated.view(), a_.view(), 1.0, dx); // dx += s v A
  }

  /// dw = s B diag(c) A (out, in).
  void delta(matrix_view<T> dw) const { delta(static_cast<double>(scale_), dw); }

  /// dw = factor B diag(c) A (out, in).
  void delta(double factor, matrix_view<T> dw) const {
    matrix<T> ca(rank(), in_features());  // diag(c) A
    for (index i = 0; i < rank(); ++i) {
      const T ci = c_(0, i);
      for (index j = 0; j < in_features(); ++j) ca(i, j) = ci * a_(i, j);
    }
    kernels::gemm_nn<T, T>(factor, b_.view(), ca.view(), 0.0, dw);
  }

  /// ||a_i||_2 ||b_i||_2 per component (a_i row i of A, b_i column i of B), in double.
  std::vector<double> component_norms() const {
    std::vector<double> n(static_cast<std::size_t>(rank()));
    for (index i = 0; i < rank(); ++i) {
      double sa = 0.0, sb = 0.0;
      for (index j = 0; j < in_features(); ++j) sa += static_cast<double>(a_(i, j)) * static_cast<double>(a_(i, j));
      for (index j = 0; j < out_features(); ++j) sb += static_cast<double>(b_(j, i)) * static_cast<double>(b_(j, i));
      n[static_cast<std::size_t>(i)] = std::sqrt(sa) * std::sqrt(sb);
    }
    return n;
  }

  /// ||B diag(c) A||_F (without the scale s), never forming the (out, in) product when that
  /// costs more: ||B diag(c) A||_F^2 = sum_ij c_i c_j (B^T B)_ij (A A^T)_ij, two (r, r) Gram
  /// matrices for r^2 (in + out) multiply-adds instead of r in out. Tiny layers (r (in + out)
  /// >= in out) form the product directly.
  double frobenius_norm() const {
    const index r = rank(), in = in_features(), out = out_features();
    double sum = 0.0;
    if (r * (in + out) >= in * out) {
      matrix<T> dw(out, in);
      delta(1.0, dw.view());
      for (T v : dw.storage()) sum += static_cast<double>(v) * static_cast<double>(v);
      return std::sqrt(sum);
    }
    matrix<T> ga(r, r), gb(r, r);
    kernels::gemm_nt<T, T>(1.0, a_.view(), a_.view(), 0.0, ga.view());  // A A^T
    kernels::gemm_tn<T>(1.0, b_.view(), b_.view(), 0.0, gb.view());      // B^T B
    for (index i = 0; i < r; ++i) {
      double row = 0.0;
      for (index j = 0; j < r; ++j) {
        row += static_cast<double>(c_(0, j)) * static_cast<double>(ga(i, j)) * static_cast<double>(gb(i, j));
      }
      sum += static_cast<double>(c_(0, i)) * row;
    }
    return std::sqrt(std::max(sum, 0.0));  // rounding may leave a tiny negative for a ~zero product
  }

  /// The plain LoRA with the same delta: S = {i : c_i != 0}, A' = A_S, B' = B_S diag(c_S), the
  /// same scale. std::nullopt when every c_i is zero (the term is exactly zero; LoRA needs r >= 1).
  std::optional<lora<T>> compact() const {
    const index k = active_rank();
    if (k == 0) return std::nullopt;
    matrix<T> a2(k, in_features()), b2(out_features(), k);
    index p = 0;
    for (index i = 0; i < rank(); ++i) {
      const T ci = c_(0, i);
      if (ci == T{0}) continue;
      std::copy(a_.row(i), a_.row(i) + in_features(), a2.row(p));
      for (index j = 0; j < out_features(); ++j) b2(j, p) = b_(j, i) * ci;
      ++p;
    }
    return lora<T>(std::move(a2), std::move(b2), scale_);
  }

  void zero_grad() {
    ga_.fill(T{0});
    gb_.fill(T{0});
    gc_.fill(T{0});
  }

 private:
  void ensure(gated_low_rank_cache<T>& cache, index batch) const {
    if (cache.t.rows() != batch || cache.t.cols() != rank()) cache.t = matrix<T>(batch, rank());
    if (cache.gated.rows() != batch || cache.gated.cols() != rank()) cache.gated = matrix<T>(batch, rank());
  }
  /// out = in * c (each column i times c_i); out has in's shape.
  void scale_columns(const matrix<T>& in, matrix<T>& out) const {
    for (index bi = 0; bi < in.rows(); ++bi) {
      const T* src = in.row(bi);
      T* dst = out.row(bi);
      for (index i = 0; i < rank(); ++i) dst[i] = src[i] * c_(0, i);
    }
  }

  matrix<T> a_;   // (r, in)
  matrix<T> b_;   // (out, r)
  matrix<T> c_;   // (1, r)
  T scale_ = T{1};
  matrix<T> ga_;  // gradients, same shapes
  matrix<T> gb_;
  matrix<T> gc_;
};

}  // namespace peft::detail
