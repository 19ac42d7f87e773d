// peft/adapters/deft.hpp — DeFT, decompositional efficient fine-tuning (PaRa with para = true),
// as HuggingFace PEFT 0.21.2 computes it (peft_type "DEFT").
//
//   W' = (I - Q right^T) W0 + s Q R        P (out, r) = deft_P, R (r, in) = deft_R
//   relu: Q = P, right = relu(P);  qr: Q = the thin Q of P's QR (LAPACK's signs), right = Q
//   s = alpha / r (1 when alpha is absent or 0);  para: no R, W' = (I - Q right^T) W0
//   y = x W0^T + b0 + x A^T Q^T,  A = s R - M (r, in),  M = right^T W0
//
//   peft::deft<float> a(layer.base(), {.rank = 8});   // PEFT's init: R = M / s, a no-op
//   layer.add_adapter("default", std::move(a));
//
// The term reads W0 (through M), so the passes are written here: M and backward's W0 dA^T are
// read a row of W0 at a time through the base's dequantize_row, whatever its format; W0 is never
// formed whole. r is capped at out_features as PEFT does. Merging caches M (PEFT's
// _cached_merge_factor) so unmerge subtracts exactly what merge added. Checkpoints:
// io/peft/deft.hpp. Details and the QR gradient: docs/methods/deft.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/detail/merge_memo.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/core/weight_term_adapter.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// PEFT's decomposition_method: how Q and right come from P.
enum class deft_projection : std::uint8_t { relu, qr };

template <compute_scalar T>
class deft;

/// PEFT's DeftConfig for one layer. The adapter reads the base (R = right^T W0 / s at init):
/// build it with deft<T>(layer.base(), options) and add that.
struct deft_options {
  index rank = 8;                                        // capped at out_features
  deft_projection projection = deft_projection::relu;    // decomposition_method
  double alpha = 0;        // 0: PEFT's None (s = 1); else s = alpha / r
  bool para = false;       // PaRa: no R, pure subspace removal
  bool init_weights = true;  // true: R = right^T W0 / s (a no-op); false: R ~ N(0, 0.02 init_scale)
  double init_scale = 1.0;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class deft : public weight_term_adapter<deft<T>, T> {
  friend class weight_term_adapter<deft<T>, T>;

 public:
  using scalar = T;
  static constexpr std::string_view method = "deft";

  /// What a pass derives from P, R and W0, and backward's scratch.
  struct cache_type {
    matrix<T> q, right;          // (out, r)
    matrix<double> q64, r64;     // qr: P = q64 r64 in double (thin, r64 (r, r) upper triangular)
    matrix<T> m;                 // M = right^T W0 (r, in)
    matrix<T> a;                 // A = s R - M (r, in)
    matrix<T> u, gq;             // x A^T, g Q (batch, r)
    matrix<T> dq, da;            // dL/dQ (direct) (out, r), dL/dA (r, in)
  };

  deft() = default;

  /// A fresh adapter for the base layer w with PEFT's initialisation (values from peft::rng):
  /// P ~ N(0, 0.02); R = right^T W0 / s (init_weights), N(0, 0.02 init_scale) otherwise, none
  /// with para. r = min(rank, out_features).
  template <base_weight Base>
  deft(const Base& w, const deft_options& opt)
      : in_(w.in_features()), projection_(opt.projection), alpha_(opt.alpha), para_(opt.para) {
    constexpr const char* where = "deft::deft";
    if (w.in_features() < 1 || w.out_features() < 1) {
      detail::raise<shape_error>(where, "the base is " + detail::shape_string(w.out_features(), w.in_features()));
    }
    if (opt.rank < 1) detail::raise<shape_error>(where, "rank must be >= 1, got " + std::to_string(opt.rank));
    const index r = std::min(opt.rank, w.out_features());
    rng gen(opt.seed);
    p_ = matrix<T>(w.out_features(), r);
    for (auto& v : p_.storage()) v = static_cast<T>(gen.normal(0.0, 0.02));
    if (!para_) {
      r_ = matrix<T>(r, w.in_features());
      if (opt.init_weights) {
        cache_type k;
        project(k);
        right_times_base(w, k.right.view(), k.m);
        const double s = scaling();
        for (std::size_t i = 0; i < r_.storage().size(); ++i) {
          r_.storage()[i] = static_cast<T>(static_cast<double>(k.m.storage()[i]) / s);
        }
      } else {
        for (auto& v : r_.storage()) v = static_cast<T>(gen.normal(0.0, 0.02 * opt.init_scale));
      }
    }
    finish(where);
  }

  /// An adapter from existing tensors: P (out, r) = deft_P, R (r, in) = deft_R, or an empty R
  /// for para (in_features then 0 until set_features, or given here).
  deft(matrix<T> p, matrix<T> r, deft_projection projection, double alpha, index in_features = 0)
      : p_(std::move(p)), r_(std::move(r)), projection_(projection), alpha_(alpha), para_(r_.empty()) {
    in_ = para_ ? in_features : r_.cols();
    if (!para_ && in_features != 0 && in_features != r_.cols()) {
      detail::raise<shape_error>("deft::deft", "deft_R " + detail::shape_string(r_.rows(), r_.cols()) + " does not have " +
                                                   std::to_string(in_features) + " columns (in_features)");
    }
    finish("deft::deft");
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return p_.rows(); }
  index rank() const noexcept { return p_.cols(); }
  deft_projection projection() const noexcept { return projection_; }
  bool para() const noexcept { return para_; }
  /// PEFT's alpha (0: None).
  double alpha() const noexcept { return alpha_; }
  /// s = alpha / r, or 1 without alpha.
  double scaling() const noexcept { return alpha_ != 0 ? alpha_ / static_cast<double>(rank()) : 1.0; }
  matrix_view<const T> P() const noexcept { return p_.view(); }
  /// deft_R (r, in); empty with para.
  matrix_view<const T> R() const noexcept { return r_.view(); }

  /// The loader's and adapted_linear's hook for the layer's shape (a para adapter loaded
  /// without the base does not know in_features). shape_error if it does not fit.
  void set_features(index in_features, index out_features) {
    if (out_features != p_.rows() || in_features < 1 || (in_ != 0 && in_ != in_features)) {
      detail::raise<shape_error>("deft::set_features", "the adapter is for " + detail::shape_string(p_.rows(), in_) +
                                                           " (in 0: any), cannot bind to " +
                                                           detail::shape_string(out_features, in_features));
    }
    in_ = in_features;
  }

  // forward, add_term, backward and backward_term: weight_term_adapter, over add_delta and
  // delta_backward below.

  /// dW = Q A = Q (s R - right^T W0) (out, in). Remembers M = right^T W0 and the base, so that
  /// unmerge_delta on that base (merged) subtracts exactly this (PEFT's _cached_merge_factor).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("deft::delta_weight", w);
    detail::expect_shape("deft::delta_weight", "dw", dw, out_features(), in_features());
    cache_type k;
    derive(w, k);
    kernels::gemm_nn<T, T>(1.0, k.q.view(), k.a.view(), 0.0, dw);
    merged_.remember({std::move(k.m), static_cast<const void*>(&w)});
  }

  /// DeFT does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// What merge added, for a base W' = W0 + dW: with the M delta_weight remembered for this base,
  /// Q (s R - M) (exact, PEFT's way). Otherwise M is recovered from W': right^T W' =
  /// (I - G) M + s G R with G = right^T Q, so M = (I - G)^-1 (right^T W' - s G R) (relu); with qr
  /// G = I (the removed subspace is gone from W'), and peft::error says so.
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    constexpr const char* where = "deft::unmerge_delta";
    check_base(where, merged);
    detail::expect_shape(where, "dw", dw, out_features(), in_features());
    cache_type k;
    project(k);
    const index r = rank(), in = in_features(), out = out_features();
    const double s = scaling();
    remembered last = merged_.recall();
    if (last.base == static_cast<const void*>(&merged) && last.m.rows() == r && last.m.cols() == in) {
      k.m = std::move(last.m);
    } else {
      if (projection_ == deft_projection::qr) {
        detail::raise<error>(where, "with decomposition_method qr, W' = (I - Q Q^T) W0 + s Q R no longer holds Q^T W0; "
                                    "unmerge needs the M = Q^T W0 that merging this base remembered (merge and "
                                    "unmerge with the same adapter and base), as PEFT caches it");
      }
      matrix<T> mw;
      right_times_base(merged, k.right.view(), mw);  // right^T W'
      matrix<double> g(r, r), rhs(r, in);
      for (index o = 0; o < out; ++o)
        for (index i = 0; i < r; ++i)
          for (index j = 0; j < r; ++j) g(i, j) += static_cast<double>(k.right(o, i)) * static_cast<double>(k.q(o, j));
      for (index i = 0; i < r; ++i) {
        for (index c = 0; c < in; ++c) {
          double v = static_cast<double>(mw(i, c));
          if (!para_) {
            for (index j = 0; j < r; ++j) v -= s * g(i, j) * static_cast<double>(r_(j, c));
          }
          rhs(i, c) = v;
        }
      }
      for (index i = 0; i < r; ++i)
        for (index j = 0; j < r; ++j) g(i, j) = (i == j ? 1.0 : 0.0) - g(i, j);
      if (!solve_in_place(g, rhs)) {
        detail::raise<error>(where, "I - relu(P)^T P is singular: the merged weight no longer determines W0");
      }
      k.m = matrix<T>(r, in);
      for (std::size_t i = 0; i < rhs.storage().size(); ++i) k.m.storage()[i] = static_cast<T>(rhs.storage()[i]);
    }
    form_a(k);
    kernels::gemm_nn<T, T>(1.0, k.q.view(), k.a.view(), 0.0, dw);
  }

  /// deft_P (out, r) and, without para, deft_R (r, in): PEFT's names (no ".weight").
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"deft_P", p_.view(), gp_.view(), detail::shape_of(p_.view(), false)});
    if (!para_) p.push_back({"deft_R", r_.view(), gr_.view(), detail::shape_of(r_.view(), false)});
    return p;
  }

  void zero_grad() {
    gp_.fill(T{0});
    gr_.fill(T{0});
  }

 private:
  void finish(const char* where) {
    if (p_.rows() < 1 || p_.cols() < 1 || p_.cols() > p_.rows()) {
      detail::raise<shape_error>(where, "deft_P is " + detail::shape_string(p_.rows(), p_.cols()) +
                                            ", expected (out_features, r) with 1 <= r <= out_features");
    }
    if (!para_ && (r_.rows() != p_.cols() || r_.cols() < 1)) {
      detail::raise<shape_error>(where, "deft_R is " + detail::shape_string(r_.rows(), r_.cols()) + ", deft_P " +
                                            detail::shape_string(p_.rows(), p_.cols()) + ": expected (r, in) with r = " +
                                            std::to_string(p_.cols()));
    }
    if (in_ < 0) detail::raise<shape_error>(where, "in_features is " + std::to_string(in_));
    gp_ = matrix<T>(p_.rows(), p_.cols());
    gr_ = matrix<T>(r_.rows(), r_.cols());
  }
  void check_ready(const char* where) const {
    if (p_.empty()) detail::raise<error>(where, "the adapter is default-constructed (no deft_P)");
  }
  using checks = detail::adapter_checks<deft, T>;  // check_base / check_io / check_grad
  friend checks;
  using checks::check_base;
  using checks::check_io;
  using checks::check_grad;

  /// k.q and k.right from P (and k.q64, k.r64 for qr).
  void project(cache_type& k) const {
    const index out = out_features(), r = rank();
    if (projection_ == deft_projection::relu) {
      k.q = p_;
      k.right = matrix<T>(out, r);
      for (std::size_t i = 0; i < p_.storage().size(); ++i) {
        const T v = p_.storage()[i];
        k.right.storage()[i] = v > T{0} ? v : T{0};
      }
      return;
    }
    householder_qr(k.q64, k.r64);
    k.q = matrix<T>(out, r);
    for (std::size_t i = 0; i < k.q.storage().size(); ++i) k.q.storage()[i] = static_cast<T>(k.q64.storage()[i]);
    k.right = k.q;
  }

  /// The thin QR of P in double as LAPACK's geqrf + orgqr (and torch.linalg.qr) give it: Householder
  /// reflections with beta = -sign(alpha) ||x|| (none for a column already reduced), so the
  /// diagonal of R may be negative.
  void householder_qr(matrix<double>& q, matrix<double>& rr) const {
    const index m = out_features(), n = rank();
    matrix<double> a(m, n);
    for (std::size_t i = 0; i < a.storage().size(); ++i) a.storage()[i] = static_cast<double>(p_.storage()[i]);
    std::vector<double> tau(static_cast<std::size_t>(n), 0.0);
    for (index k = 0; k < n; ++k) {
      const double alpha = a(k, k);
      double xs = 0;
      for (index i = k + 1; i < m; ++i) xs += a(i, k) * a(i, k);
      if (xs == 0) continue;  // tau = 0: H = I (LAPACK's dlarfg)
      const double beta = -std::copysign(std::sqrt(alpha * alpha + xs), alpha);
      tau[static_cast<std::size_t>(k)] = (beta - alpha) / beta;
      const double scale = 1.0 / (alpha - beta);
      for (index i = k + 1; i < m; ++i) a(i, k) *= scale;
      a(k, k) = beta;
      const double t = tau[static_cast<std::size_t>(k)];
      for (index j = k + 1; j < n; ++j) {
        double d = a(k, j);
        for (index i = k + 1; i < m; ++i) d += a(i, k) * a(i, j);
        a(k, j) -= t * d;
        for (index i = k + 1; i < m; ++i) a(i, j) -= t * d * a(i, k);
      }
    }
    rr = matrix<double>(n, n);
    for (index i = 0; i < n; ++i)
      for (index j = i; j < n; ++j) rr(i, j) = a(i, j);
    q = matrix<double>(m, n);
    for (index i = 0; i < n; ++i) q(i, i) = 1.0;
    for (index k = n - 1; k >= 0; --k) {  // Q = H_0 ... H_{n-1} E, applied right to left
      const double t = tau[static_cast<std::size_t>(k)];
      if (t == 0) continue;
      for (index j = 0; j < n; ++j) {
        double d = q(k, j);
        for (index i = k + 1; i < m; ++i) d += a(i, k) * q(i, j);
        q(k, j) -= t * d;
        for (index i = k + 1; i < m; ++i) q(i, j) -= t * d * a(i, k);
      }
    }
  }

  /// out = right^T W (r, in), W read a row at a time (dequantize_row), accumulated in double.
  template <class Base>
  void right_times_base(const Base& w, matrix_view<const T> right, matrix<T>& out) const {
    const index r = right.cols(), in = w.in_features();
    matrix<double> acc(r, in);
    std::vector<double> row(static_cast<std::size_t>(in));
    for (index o = 0; o < w.out_features(); ++o) {
      w.dequantize_row(o, row.data());
      const T* ro = right.row(o);
      for (index i = 0; i < r; ++i) {
        const double c = static_cast<double>(ro[i]);
        if (c == 0) continue;
        double* ai = acc.row(i);
        for (index j = 0; j < in; ++j) ai[j] += c * row[static_cast<std::size_t>(j)];
      }
    }
    out = matrix<T>(r, in);
    for (std::size_t i = 0; i < acc.storage().size(); ++i) out.storage()[i] = static_cast<T>(acc.storage()[i]);
  }

  /// k.a = s R - k.m (para: -k.m).
  void form_a(cache_type& k) const {
    const T s = static_cast<T>(scaling());
    k.a = matrix<T>(k.m.rows(), k.m.cols());
    for (std::size_t i = 0; i < k.a.storage().size(); ++i) {
      k.a.storage()[i] = (para_ ? T{0} : s * r_.storage()[i]) - k.m.storage()[i];
    }
  }

  /// Q, right, M and A of the current parameters over the base w.
  template <class Base>
  void derive(const Base& w, cache_type& k) const {
    project(k);
    right_times_base(w, k.right.view(), k.m);
    form_a(k);
  }

  /// y += (x A^T) Q^T.
  template <class Base>
  void add_delta(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& k) const {
    derive(w, k);
    k.u = matrix<T>(x.rows(), rank());
    kernels::gemm_nt<T, T>(1.0, x, k.a.view(), 0.0, k.u.view());
    kernels::gemm_nt<T, T>(1.0, k.u.view(), k.q.view(), 1.0, y);
  }

  /// With u = x A^T, gq = g Q:  dQ = g^T u,  dA = gq^T x,  dx += gq A,  dR += s dA,
  /// d right = -W0 dA^T (W0 a row at a time); then dP = dQ + [P > 0] d right (relu), or the QR
  /// gradient of dQ + d right (qr).
  template <class Base>
  void delta_backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& k) {
    derive(w, k);
    const index batch = x.rows(), r = rank(), in = in_features(), out = out_features();
    k.u = matrix<T>(batch, r);
    k.gq = matrix<T>(batch, r);
    k.dq = matrix<T>(out, r);
    k.da = matrix<T>(r, in);
    kernels::gemm_nt<T, T>(1.0, x, k.a.view(), 0.0, k.u.view());
    kernels::gemm_nn<T, T>(1.0, g, k.q.view(), 0.0, k.gq.view());
    kernels::gemm_tn<T>(1.0, g, k.u.view(), 0.0, k.dq.view());
    kernels::gemm_tn<T>(1.0, k.gq.view(), x, 0.0, k.da.view());
    kernels::gemm_nn<T, T>(1.0, k.gq.view(), k.a.view(), 1.0, dx);
    if (!para_) {
      const T s = static_cast<T>(scaling());
      for (std::size_t i = 0; i < gr_.storage().size(); ++i) gr_.storage()[i] += s * k.da.storage()[i];
    }
    // d right (out, r) = -W0 dA^T, in double.
    matrix<double> dright(out, r);
    std::vector<double> row(static_cast<std::size_t>(in));
    for (index o = 0; o < out; ++o) {
      w.dequantize_row(o, row.data());
      for (index i = 0; i < r; ++i) {
        const T* dai = k.da.row(i);
        double d = 0;
        for (index j = 0; j < in; ++j) d += row[static_cast<std::size_t>(j)] * static_cast<double>(dai[j]);
        dright(o, i) = -d;
      }
    }
    if (projection_ == deft_projection::relu) {
      for (index o = 0; o < out; ++o) {
        for (index i = 0; i < r; ++i) {
          const double mask = p_(o, i) > T{0} ? 1.0 : 0.0;
          gp_(o, i) += static_cast<T>(static_cast<double>(k.dq(o, i)) + mask * dright(o, i));
        }
      }
      return;
    }
    for (index o = 0; o < out; ++o)
      for (index i = 0; i < r; ++i) dright(o, i) += static_cast<double>(k.dq(o, i));
    qr_backward(k, dright);
  }

  /// dP += (gQ + Q copyltu(M)) R^-T with M = -gQ^T Q, copyltu(M) = tril(M) + tril(M, -1)^T: the
  /// gradient of P = QR's thin Q (PyTorch's linalg_qr_backward with no gradient on R), in double.
  void qr_backward(const cache_type& k, const matrix<double>& gq) {
    constexpr const char* where = "deft::backward";
    const index out = out_features(), r = rank();
    const matrix<double>& q = k.q64;
    const matrix<double>& rr = k.r64;
    matrix<double> mm(r, r);
    for (index i = 0; i < r; ++i)
      for (index j = 0; j < r; ++j) {
        double v = 0;
        for (index o = 0; o < out; ++o) v -= gq(o, i) * q(o, j);
        mm(i, j) = v;
      }
    matrix<double> c(r, r);  // copyltu(M)
    for (index i = 0; i < r; ++i)
      for (index j = 0; j < r; ++j) c(i, j) = i >= j ? mm(i, j) : mm(j, i);
    for (index i = 0; i < r; ++i) {
      if (rr(i, i) == 0) {
        detail::raise<error>(where, "deft_P is rank-deficient (its QR has R[" + std::to_string(i) + ", " +
                                        std::to_string(i) + "] = 0): the gradient through qr is undefined");
      }
    }
    std::vector<double> xrow(static_cast<std::size_t>(r)), d(static_cast<std::size_t>(r));
    for (index o = 0; o < out; ++o) {
      for (index j = 0; j < r; ++j) {
        double v = gq(o, j);
        for (index l = 0; l < r; ++l) v += q(o, l) * c(l, j);
        xrow[static_cast<std::size_t>(j)] = v;
      }
      // d R^T = x: R d^T = x^T, back substitution over the upper triangle.
      for (index kk = r - 1; kk >= 0; --kk) {
        double v = xrow[static_cast<std::size_t>(kk)];
        for (index j = kk + 1; j < r; ++j) v -= rr(kk, j) * d[static_cast<std::size_t>(j)];
        d[static_cast<std::size_t>(kk)] = v / rr(kk, kk);
      }
      for (index j = 0; j < r; ++j) gp_(o, j) += static_cast<T>(d[static_cast<std::size_t>(j)]);
    }
  }

  /// Solves a X = b in place (b <- X) by Gaussian elimination with partial pivoting; false when
  /// a is singular.
  static bool solve_in_place(matrix<double>& a, matrix<double>& b) {
    const index n = a.rows(), nc = b.cols();
    double norm = 0;
    for (double v : a.storage()) norm = std::max(norm, std::abs(v));
    for (index k = 0; k < n; ++k) {
      index piv = k;
      for (index i = k + 1; i < n; ++i)
        if (std::abs(a(i, k)) > std::abs(a(piv, k))) piv = i;
      if (!(std::abs(a(piv, k)) > 1e-13 * norm)) return false;
      if (piv != k) {
        for (index j = 0; j < n; ++j) std::swap(a(k, j), a(piv, j));
        for (index j = 0; j < nc; ++j) std::swap(b(k, j), b(piv, j));
      }
      for (index i = k + 1; i < n; ++i) {
        const double f = a(i, k) / a(k, k);
        if (f == 0) continue;
        for (index j = k; j < n; ++j) a(i, j) -= f * a(k, j);
        for (index j = 0; j < nc; ++j) b(i, j) -= f * b(k, j);
      }
    }
    for (index k = n - 1; k >= 0; --k) {
      for (index j = 0; j < nc; ++j) {
        double v = b(k, j);
        for (index l = k + 1; l < n; ++l) v -= a(k, l) * b(l, j);
        b(k, j) = v / a(k, k);
      }
    }
    return true;
  }

  matrix<T> p_;   // (out, r): deft_P
  matrix<T> r_;   // (r, in): deft_R; empty with para
  index in_ = 0;
  deft_projection projection_ = deft_projection::relu;
  double alpha_ = 0;
  bool para_ = false;
  matrix<T> gp_, gr_;
  // What the last delta_weight read (PEFT's _cached_merge_factor): M and the base it came from.
  struct remembered {
    matrix<T> m;
    const void* base = nullptr;
  };
  detail::merge_memo<remembered> merged_;
};

}  // namespace peft
