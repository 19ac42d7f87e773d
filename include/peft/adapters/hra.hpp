// peft/adapters/hra.hpp — HRA, Householder reflection adaptation (Yuan et al., NeurIPS 2024), as
// HuggingFace PEFT 0.21 computes it.
//
//   W' = W0 R,   y = x R^T W0^T + b0          u = hra_u (in, r)
//   R = H_1 H_2 ... H_r,  H_i = I - 2 v_i v_i^T,  v_i = u_i / |u_i|          (apply_gs = false)
//   R = I - 2 Q Q^T,      Q = Gram-Schmidt(u) (in, r), orthonormal          (apply_gs = true)
//
//   peft::hra<float> a(in, out, {.rank = 8});   // PEFT's symmetric init: pairs of equal u_i, R = I
//
// Both forms are R = I - V T V^T (compact WY form; T = 2 I for Gram-Schmidt), so every pass is a
// few (batch, in) x (in, r) products: the base sees z = x R^T, and dx = (g W0) R. Reads no base
// output, but transforms the input before the base, so it writes its own passes; several HRA
// terms add (PEFT multiplies their R). Merging is multiplicative (delta_weight = W0 (R - I));
// unmerge_delta recovers it from the merged weight. hra_u does not give out_features: 0 until
// set_features. Checkpoints: io/peft/hra.hpp. Derivations: docs/methods/hra.md.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/interop/eigen.hpp"

namespace peft {

/// PEFT's `init_weights`: true (symmetric: each u column repeated once, so the reflections cancel
/// in pairs and R = I; for odd r PEFT warns and falls back to random), false (random).
/// Both draw kaiming-uniform values (bound 1 / sqrt(columns drawn)).
enum class hra_init : std::uint8_t { symmetric, random };

template <compute_scalar T>
class hra;

struct hra_options {
  template <compute_scalar T>
  using adapter = hra<T>;  // the adapter these options make

  index rank = 8;         // r, the number of reflections (PEFT's r)
  bool apply_gs = false;  // PEFT's apply_GS: orthogonalise the u columns first
  hra_init init = hra_init::symmetric;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class hra {
 public:
  using scalar = T;
  static constexpr std::string_view method = "hra";
  using dense_matrix = eigen_row_major<T>;

  /// R = I - V T V^T for the columns it covers, with what the gradient needs.
  struct reflector {
    dense_matrix v;        // (in, k): unit columns v_i (Householder) or Q (Gram-Schmidt)
    dense_matrix t;        // (k, k) upper triangular; 2 I for Gram-Schmidt
    dense_matrix r;        // (k, k) Gram-Schmidt only: u = Q r, r upper triangular, r_ii > 0
    std::vector<T> norms;  // Householder only: |u_i|
    bool full = false;     // every column of u (false: cancelling pairs dropped, forward only)
  };

  /// What backward needs from forward: the reflector and x V (batch, k).
  struct cache_type {
    reflector f;
    dense_matrix xv;
  };

  hra() = default;

  /// A fresh adapter for an (out, in) linear layer with PEFT's initialisation.
  /// shape_error for r < 1; error for apply_gs with r > in (Gram-Schmidt runs out of
  /// directions) or with the symmetric init of an even r (equal columns cannot be
  /// orthogonalised: PEFT produces rounding noise there).
  hra(index in_features, index out_features, const hra_options& opt)
      : in_(checked_dim(in_features, "in_features")), out_(checked_dim(out_features, "out_features")),
        apply_gs_(opt.apply_gs) {
    const index r = checked_dim(opt.rank, "rank");
    const bool symmetric = opt.init == hra_init::symmetric && r % 2 == 0;
    if (apply_gs_ && symmetric) {
      detail::raise<error>("hra::hra", "apply_gs with the symmetric init (even r = " + std::to_string(r) +
                                           ") repeats every u column, which Gram-Schmidt cannot orthogonalise; "
                                           "use hra_init::random");
    }
    check_gs_rank("hra::hra", r);
    u_ = matrix<T>(in_, r);
    rng gen(opt.seed);
    const index drawn = symmetric ? r / 2 : r;  // PEFT draws a (in, r/2) half and repeats it
    const double bound = 1.0 / std::sqrt(static_cast<double>(drawn));
    for (index i = 0; i < in_; ++i) {
      for (index j = 0; j < drawn; ++j) {
        const T value = static_cast<T>(gen.uniform(-bound, bound));
        if (symmetric) {
          u_(i, 2 * j) = value;
          u_(i, 2 * j + 1) = value;
        } else {
          u_(i, j) = value;
        }
      }
    }
    gu_ = matrix<T>(in_, r);
  }

  /// An adapter from existing vectors u = hra_u (in, r). out_features 0: unknown until
  /// set_features (any base with in_features inputs is accepted meanwhile).
  hra(matrix<T> u, bool apply_gs, index out_features = 0) : u_(std::move(u)), out_(out_features), apply_gs_(apply_gs) {
    if (u_.rows() < 1 || u_.cols() < 1 || out_ < 0) {
      detail::raise<shape_error>("hra::hra", "hra_u is " + detail::shape_string(u_.rows(), u_.cols()) +
                                                 ", expected (in_features >= 1, r >= 1); out_features " +
                                                 std::to_string(out_));
    }
    in_ = u_.rows();
    check_gs_rank("hra::hra", u_.cols());
    gu_ = matrix<T>(u_.rows(), u_.cols());
  }

  index in_features() const noexcept { return in_; }
  /// Output features; 0 while unknown (an adapter loaded from a checkpoint).
  index out_features() const noexcept { return out_; }
  index rank() const noexcept { return u_.cols(); }
  bool apply_gs() const noexcept { return apply_gs_; }

  /// The loader's and adapted_linear's hook for the layer's shape; shape_error if in_features
  /// differs or out_features was already set to another value.
  void set_features(index in_features, index out_features) {
    if (in_features != in_ || out_features < 1 || (out_ != 0 && out_ != out_features)) {
      detail::raise<shape_error>("hra::set_features", "the adapter is for " + detail::shape_string(out_, in_) +
                                                          " (0: any), cannot bind to " +
                                                          detail::shape_string(out_features, in_features));
    }
    out_ = out_features;
  }

  /// hra_u (in, r) and its gradient.
  matrix_view<T> u() noexcept { return u_.view(); }
  matrix_view<const T> u() const noexcept { return u_.view(); }
  matrix_view<const T> grad_u() const noexcept { return gu_.view(); }

  /// R (in, in), materialised (for tests and inspection; the passes never form it).
  matrix<T> rotation() const {
    const reflector f = make_reflector("hra::rotation", true);
    matrix<T> r(in_, in_);
    auto rm = as_eigen(r.view());
    rm.setIdentity();
    rm.noalias() -= f.v * f.t * f.v.transpose();
    return r;
  }

  /// y = (x R^T) W0^T + b0.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    check_io("hra::forward", w, x, y);
    cache.f = make_reflector("hra::forward", false);
    cache.xv.noalias() = as_eigen(x) * cache.f.v;
    matrix<T> z(x.rows(), in_);  // x R^T = x - (x V) T^T V^T
    auto zm = as_eigen(z.view());
    zm = as_eigen(x);
    zm.noalias() -= (cache.xv * cache.f.t.transpose()) * cache.f.v.transpose();
    w.matmul(matrix_view<const T>(z.view()), y);
  }

  /// y += W0 (R - I) x, i.e. (x (R^T - I)) W0^T.
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<T> y,
                cache_type& cache) const {
    check_io("hra::add_term", w, x, y);
    detail::expect_shape("hra::add_term", "h", h, x.rows(), w.out_features());
    cache.f = make_reflector("hra::add_term", false);
    cache.xv.noalias() = as_eigen(x) * cache.f.v;
    matrix<T> d(x.rows(), in_);  // x (R^T - I) = -(x V) T^T V^T
    as_eigen(d.view()).noalias() = -(cache.xv * cache.f.t.transpose()) * cache.f.v.transpose();
    matrix<T> t(x.rows(), y.cols());
    w.matmul(matrix_view<const T>(d.view()), t.view());
    for (index i = 0; i < y.rows(); ++i) {
      T* row = y.row(i);
      for (index j = 0; j < y.cols(); ++j) row[j] += t(i, j) - w.template bias_value<T>(j);
    }
  }

  /// Accumulates du; writes dx = (g W0) R.
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    check_grad("hra::backward", w, x, g, dx);
    w.matmul_t(g, dx, false);  // dz = g W0
    const dense_matrix bv = accumulate("hra::backward", x, matrix_view<const T>(dx), cache);
    const reflector& f = cache.f;
    as_eigen(dx).noalias() -= (bv * f.t) * f.v.transpose();  // dz R = dz - (dz V) T V^T
  }

  /// Accumulates du; dx += (g W0) (R - I); dh untouched (the term does not read h).
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<const T> g,
                     matrix_view<T> dh, matrix_view<T> dx, cache_type& cache) {
    check_grad("hra::backward_term", w, x, g, dx);
    detail::expect_shape("hra::backward_term", "h", h, x.rows(), w.out_features());
    detail::expect_shape("hra::backward_term", "dh", dh, x.rows(), w.out_features());
    matrix<T> dz(x.rows(), in_);
    w.matmul_t(g, dz.view(), false);
    const dense_matrix bv = accumulate("hra::backward_term", x, matrix_view<const T>(dz.view()), cache);
    const reflector& f = cache.f;
    as_eigen(dx).noalias() -= (bv * f.t) * f.v.transpose();
  }

  /// dW = W0 R - W0 = -(W0 V) T V^T, W0 read a row at a time into dw.
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("hra::delta_weight", w);
    detail::expect_shape("hra::delta_weight", "dw", dw, w.out_features(), w.in_features());
    const reflector f = make_reflector("hra::delta_weight", false);
    for (index i = 0; i < dw.rows(); ++i) w.dequantize_row(i, dw.row(i));
    auto d = as_eigen(dw);
    const dense_matrix wv = d * f.v;  // (out, k)
    d.noalias() = -(wv * f.t) * f.v.transpose();
  }

  /// Merging leaves the bias alone.
  template <base_weight Base>
  bool delta_bias(const Base& w, T* /*db*/) const {
    check_base("hra::delta_bias", w);
    return false;
  }

  /// What merge added, recovered from the merged W' = W0 R (R orthogonal): W' - W' R^T =
  /// (W' V) T^T V^T.
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    check_base("hra::unmerge_delta", merged);
    detail::expect_shape("hra::unmerge_delta", "dw", dw, merged.out_features(), merged.in_features());
    const reflector f = make_reflector("hra::unmerge_delta", false);
    for (index i = 0; i < dw.rows(); ++i) merged.dequantize_row(i, dw.row(i));
    auto d = as_eigen(dw);
    const dense_matrix wv = d * f.v;
    d.noalias() = (wv * f.t.transpose()) * f.v.transpose();
  }

  /// hra_u (in, r): PEFT's name (no ".weight").
  std::vector<parameter<T>> parameters() {
    return {{"hra_u", u_.view(), gu_.view(), detail::shape_of(u_.view(), false)}};
  }

  void zero_grad() { gu_.fill(T{0}); }

 private:
  static index checked_dim(index d, const char* what) {
    if (d < 1) detail::raise<shape_error>("hra::hra", std::string(what) + " must be >= 1, got " + std::to_string(d));
    return d;
  }
  void check_gs_rank(const char* where, index r) const {
    if (apply_gs_ && r > in_) {
      detail::raise<error>(where, "apply_gs needs r <= in_features (Gram-Schmidt of r = " + std::to_string(r) +
                                      " vectors in " + std::to_string(in_) + " dimensions)");
    }
  }

  /// The reflector of u. Householder form: V = [v_1 .. v_r], T^{-1} = I / 2 + striu(V^T V)
  /// (docs/methods/hra.md). With `full` false, reflections that cancel exactly (v_{i+1} = +-v_i,
  /// bitwise: PEFT's symmetric init) are dropped in pairs, so a fresh adapter is exactly the
  /// base; the gradient always uses the full chain.
  reflector make_reflector(const char* where, bool full) const {
    const index r = u_.cols();
    const auto u = as_eigen(u_.view());
    reflector f;
    if (apply_gs_) {
      f.v.resize(in_, r);
      f.r = dense_matrix::Zero(r, r);
      for (index i = 0; i < r; ++i) {  // modified Gram-Schmidt, PEFT's order
        auto q = f.v.col(i);
        q = u.col(i);
        for (index j = 0; j < i; ++j) {
          f.r(j, i) = f.v.col(j).dot(q);
          q -= f.r(j, i) * f.v.col(j);
        }
        f.r(i, i) = q.norm();
        // A residual at rounding level is noise, not a direction (PEFT normalises it anyway).
        const T floor = static_cast<T>(in_) * std::numeric_limits<T>::epsilon() * u.col(i).norm();
        if (!(f.r(i, i) > floor) || !std::isfinite(f.r(i, i))) {
          detail::raise<error>(where, "hra_u column " + std::to_string(i) +
                                          " is linearly dependent on the previous ones (or not finite): "
                                          "Gram-Schmidt (apply_GS) cannot orthogonalise it");
        }
        q /= f.r(i, i);
      }
      f.t = dense_matrix::Identity(r, r) * T{2};
      f.full = true;
      return f;
    }
    std::vector<index> kept;
    kept.reserve(static_cast<std::size_t>(r));
    dense_matrix v(in_, r);
    f.norms.resize(static_cast<std::size_t>(r));
    for (index i = 0; i < r; ++i) {
      const T n = u.col(i).norm();
      if (!(n > T{0}) || !std::isfinite(n)) {
        detail::raise<error>(where, "hra_u column " + std::to_string(i) + " is zero or not finite: its reflection is undefined");
      }
      f.norms[static_cast<std::size_t>(i)] = n;
      v.col(i) = u.col(i) / n;
      if (!full && !kept.empty()) {
        const auto prev = v.col(kept.back());
        if (prev == v.col(i) || prev == -v.col(i)) {  // H_prev H_i = I exactly
          kept.pop_back();
          continue;
        }
      }
      kept.push_back(i);
    }
    f.full = static_cast<index>(kept.size()) == r;
    const index k = static_cast<index>(kept.size());
    if (f.full) {
      f.v = std::move(v);
    } else {
      f.v.resize(in_, k);
      for (index j = 0; j < k; ++j) f.v.col(j) = v.col(kept[static_cast<std::size_t>(j)]);
    }
    dense_matrix tinv = (f.v.transpose() * f.v).template triangularView<Eigen::StrictlyUpper>();
    tinv.diagonal().setConstant(T{0.5});
    f.t = tinv.template triangularView<Eigen::Upper>().solve(dense_matrix::Identity(k, k));
    return f;
  }

  /// Adds dL/du for z = x R^T with dL/dz = dz; leaves the full reflector in cache.f and returns
  /// dz V (batch, r) for dx. Reuses the forward's reflector and x V when they cover every column.
  dense_matrix accumulate(const char* where, matrix_view<const T> x, matrix_view<const T> dz, cache_type& cache) {
    if (!cache.f.full || cache.xv.rows() != x.rows() || cache.f.v.rows() != in_) {
      cache.f = make_reflector(where, true);
      cache.xv.noalias() = as_eigen(x) * cache.f.v;
    }
    const reflector& f = cache.f;
    const auto xm = as_eigen(x);
    const auto dzm = as_eigen(dz);
    const dense_matrix& a = cache.xv;      // x V (batch, r)
    dense_matrix b = dzm * f.v;            // dz V (batch, r)
    // z = x - A T^T V^T:  dV = -(x^T (B T) + dz^T (A T^T)),  dT = -B^T A.
    dense_matrix dv = -(xm.transpose() * (b * f.t));
    dv.noalias() -= dzm.transpose() * (a * f.t.transpose());
    auto gu = as_eigen(gu_.view());
    if (apply_gs_) {
      // u = Q r (reduced QR): du = [dQ - Q (Q^T dQ - K)] r^{-T}, K = strictly lower (Q^T dQ - dQ^T Q).
      const dense_matrix qtd = f.v.transpose() * dv;
      dense_matrix m = qtd;
      dense_matrix k = (qtd - qtd.transpose()).template triangularView<Eigen::StrictlyLower>();
      m -= k;
      dense_matrix du = dv;
      du.noalias() -= f.v * m;
      f.r.transpose().template triangularView<Eigen::Lower>().template solveInPlace<Eigen::OnTheRight>(du);
      gu += du;
      return b;
    }
    // T = (I / 2 + striu(V^T V))^{-1}: d(T^{-1}) = -T^T dT T^T = T^T B^T A T^T; its strictly upper
    // part S is the gradient of striu(V^T V), so dV += V (S + S^T).
    const dense_matrix dtinv = f.t.transpose() * (b.transpose() * a) * f.t.transpose();
    const dense_matrix s = dtinv.template triangularView<Eigen::StrictlyUpper>();
    dv.noalias() += f.v * (s + s.transpose());
    // v_i = u_i / |u_i|: du_i = (dv_i - v_i (v_i . dv_i)) / |u_i|.
    for (index i = 0; i < u_.cols(); ++i) {
      const T along = f.v.col(i).dot(dv.col(i));
      gu.col(i) += (dv.col(i) - along * f.v.col(i)) / f.norms[static_cast<std::size_t>(i)];
    }
    return b;
  }

  template <class Base>
  void check_base(const char* where, const Base& w) const {
    if (u_.cols() < 1) detail::raise<error>(where, "the adapter is empty (default-constructed)");
    if (w.in_features() != in_ || (out_ != 0 && w.out_features() != out_)) {
      detail::raise<shape_error>(where, "base weight is " + detail::shape_string(w.out_features(), w.in_features()) +
                                            ", adapter expects " + detail::shape_string(out_, in_) + " (0: any)");
    }
  }
  template <class Base>
  void check_io(const char* where, const Base& w, matrix_view<const T> x, matrix_view<T> y) const {
    check_base(where, w);
    detail::expect_shape(where, "x", x, x.rows(), w.in_features());
    detail::expect_shape(where, "y", y, x.rows(), w.out_features());
  }
  template <class Base>
  void check_grad(const char* where, const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                  matrix_view<T> dx) const {
    check_base(where, w);
    detail::expect_shape(where, "x", x, x.rows(), w.in_features());
    detail::expect_shape(where, "dy", g, x.rows(), w.out_features());
    detail::expect_shape(where, "dx", dx, x.rows(), w.in_features());
  }

  matrix<T> u_;   // hra_u (in, r)
  matrix<T> gu_;  // its gradient
  index in_ = 0;
  index out_ = 0;
  bool apply_gs_ = false;
};

}  // namespace peft
