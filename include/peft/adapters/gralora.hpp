// peft/adapters/gralora.hpp — GraLoRA, granular low-rank adaptation (Jung et al. 2025), as
// HuggingFace PEFT 0.21 computes it, with its optional hybrid plain-LoRA part.
//
//   y = x W0^T + b0 + s (term_k(x) + (x Ag^T) Bg^T),   s = alpha / (r + hybrid_r)
//   x is split into k blocks x_n (in / k columns); A_n (in / k, r) = gralora_A[n], B_j (r, out / k)
//   = gralora_B[j]. z_n = x_n A_n (r) is cut into k groups of r / k; output block j is
//   u_j B_j with u_j = [z_0 group j, z_1 group j, ..., z_{k-1} group j] (r values). So the delta
//   is a k x k grid of rank-(r / k) blocks: dW[j, n] = (A_n[:, group j] B_j[rows of n])^T.
//   Ag (hybrid_r, in) = gralora_A_general.weight, Bg (out, hybrid_r) = gralora_B_general.weight.
//
//   peft::gralora<float> a(in, out, {.rank = 16, .k = 2, .alpha = 32});   // PEFT's init: B = 0
//
// The passes come from additive_adapter; forward keeps the permuted projections u (and x Ag^T)
// for backward. Checkpoints: io/peft/gralora.hpp. Details: docs/methods/gralora.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/interop/eigen.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// PEFT's `init_weights`: true (gralora_B and the hybrid B zero, A kaiming-uniform: a no-op),
/// false (every tensor kaiming-uniform).
enum class gralora_init : std::uint8_t { standard, random };

template <compute_scalar T>
class gralora;

/// PEFT's GraloraConfig defaults: r 32, gralora_k 2, hybrid_r 0, alpha 64.
struct gralora_options {
  template <compute_scalar T>
  using adapter = gralora<T>;  // the adapter these options make

  index rank = 32;        // r: the rank of each block row / column (divisible by k)
  index k = 2;            // gralora_k: blocks per side (divides in, out and r)
  index hybrid_rank = 0;  // hybrid_r: rank of the plain-LoRA part (0: none)
  double alpha = 64.0;
  gralora_init init = gralora_init::standard;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class gralora : public additive_adapter<gralora<T>, T> {
  friend class additive_adapter<gralora<T>, T>;

 public:
  static constexpr std::string_view method = "gralora";

  /// What backward needs from forward.
  struct cache_type {
    matrix<T> u;  // (batch, k r): the projections u_j side by side (u_j = columns [j r, (j + 1) r))
    matrix<T> h;  // (batch, hybrid_r): x Ag^T
  };

  gralora() = default;

  /// A fresh adapter for an (out, in) linear layer, initialised as PEFT does (kaiming-uniform
  /// with a = sqrt 5 on PEFT's (r, in / k) and (out / k, r) factors, drawn from peft::rng).
  gralora(index in_features, index out_features, const gralora_options& opt) : alpha_(opt.alpha) {
    check_sizes("gralora::gralora", in_features, out_features, opt.rank, opt.k, opt.hybrid_rank);
    in_ = in_features;
    out_ = out_features;
    r_ = opt.rank;
    k_ = opt.k;
    hr_ = opt.hybrid_rank;
    a_ = matrix<T>(k_, (in_ / k_) * r_);
    b_ = matrix<T>(k_, r_ * (out_ / k_));
    ag_ = matrix<T>(hr_, in_);
    bg_ = matrix<T>(out_, hr_);
    rng gen(opt.seed);
    const bool random = opt.init == gralora_init::random;
    uniform(a_, 1.0 / std::sqrt(static_cast<double>(in_ / k_)), gen);
    if (random) uniform(b_, 1.0 / std::sqrt(static_cast<double>(r_)), gen);
    if (hr_ > 0) {
      uniform(ag_, 1.0 / std::sqrt(static_cast<double>(in_)), gen);
      if (random) uniform(bg_, 1.0 / std::sqrt(static_cast<double>(hr_)), gen);
    }
    finish();
  }

  /// An adapter from existing tensors in PEFT's layout: gralora_A (k, in / k, r) and gralora_B
  /// (k, r, out / k) as row-major (k, in / k * r) and (k, r * out / k) matrices; Ag (hybrid_r, in)
  /// and Bg (out, hybrid_r), both empty (0 x 0) when there is no hybrid part. in, out and r are
  /// given because the flattened tensors do not determine them.
  gralora(index in_features, index out_features, index rank, matrix<T> a, matrix<T> b, matrix<T> ag, matrix<T> bg,
          double alpha)
      : a_(std::move(a)), b_(std::move(b)), ag_(std::move(ag)), bg_(std::move(bg)), alpha_(alpha) {
    constexpr const char* where = "gralora::gralora";
    const index k = a_.rows(), hr = ag_.rows();
    check_sizes(where, in_features, out_features, rank, k, hr);
    in_ = in_features;
    out_ = out_features;
    r_ = rank;
    k_ = k;
    hr_ = hr;
    if (a_.cols() != (in_ / k_) * r_ || b_.rows() != k_ || b_.cols() != r_ * (out_ / k_)) {
      detail::raise<shape_error>(where, "gralora_A is " + detail::shape_string(a_.rows(), a_.cols()) +
                                            " and gralora_B " + detail::shape_string(b_.rows(), b_.cols()) +
                                            ", expected (k, in / k * r) = " + detail::shape_string(k_, (in_ / k_) * r_) +
                                            " and (k, r * out / k) = " + detail::shape_string(k_, r_ * (out_ / k_)));
    }
    const bool hybrid_ok = hr_ == 0 ? bg_.empty()
                                    : ag_.cols() == in_ && bg_.rows() == out_ && bg_.cols() == hr_;
    if (!hybrid_ok) {
      detail::raise<shape_error>(where, "gralora_A_general is " + detail::shape_string(ag_.rows(), ag_.cols()) +
                                            " and gralora_B_general " + detail::shape_string(bg_.rows(), bg_.cols()) +
                                            ", expected (hybrid_r, in) and (out, hybrid_r) with in = " +
                                            std::to_string(in_) + ", out = " + std::to_string(out_));
    }
    if (hr_ == 0) {  // one empty shape for "no hybrid part"
      ag_ = matrix<T>(0, in_);
      bg_ = matrix<T>(out_, 0);
    }
    finish();
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  index rank() const noexcept { return r_; }
  index k() const noexcept { return k_; }
  index hybrid_rank() const noexcept { return hr_; }
  double alpha() const noexcept { return alpha_; }
  T scale() const noexcept { return scale_; }

  /// A_n = gralora_A[n] (in / k, r) and B_j = gralora_B[j] (r, out / k): views into the tensors.
  matrix_view<const T> A_block(index n) const noexcept { return {a_.row(n), in_ / k_, r_}; }
  matrix_view<const T> B_block(index j) const noexcept { return {b_.row(j), r_, out_ / k_}; }
  /// The tensors as stored (k, in / k * r), (k, r * out / k), (hybrid_r, in), (out, hybrid_r),
  /// and their gradients.
  matrix_view<const T> A() const noexcept { return a_.view(); }
  matrix_view<const T> B() const noexcept { return b_.view(); }
  matrix_view<const T> A_general() const noexcept { return ag_.view(); }
  matrix_view<const T> B_general() const noexcept { return bg_.view(); }
  matrix_view<const T> grad_A() const noexcept { return ga_.view(); }
  matrix_view<const T> grad_B() const noexcept { return gb_.view(); }
  matrix_view<const T> grad_A_general() const noexcept { return gag_.view(); }
  matrix_view<const T> grad_B_general() const noexcept { return gbg_.view(); }

  // forward, add_term, backward, backward_term: core/additive_adapter.hpp over the hooks below.

  /// dW (out, in): block (j, n) = s (A_n[:, group j] B_j[rows n r / k .. (n + 1) r / k))^T, plus
  /// s Bg Ag.
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("gralora::delta_weight", w);
    detail::expect_shape("gralora::delta_weight", "dw", dw, out_, in_);
    const index ib = in_ / k_, ob = out_ / k_, rs = r_ / k_;
    for (index j = 0; j < k_; ++j) {
      for (index n = 0; n < k_; ++n) {
        // (ob, ib) = (A_n[:, group j] B_j[rows of n])^T, a rank-(r / k) product
        as_eigen(dw.block(j * ob, n * ib, ob, ib)).noalias() =
            scale_ * (as_eigen(A_block(n).block(0, j * rs, ib, rs)) * as_eigen(B_block(j).row_block(n * rs, rs))).transpose();
      }
    }
    if (hr_ > 0) kernels::gemm_nn<T, T>(static_cast<double>(scale_), bg_.view(), ag_.view(), 1.0, dw);
  }

  /// GraLoRA does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// gralora_A (k, in / k, r), gralora_B (k, r, out / k), and with a hybrid part
  /// gralora_A_general.weight, gralora_B_general.weight: PEFT's names.
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"gralora_A", a_.view(), ga_.view(), dims(k_, in_ / k_, r_)});
    p.push_back({"gralora_B", b_.view(), gb_.view(), dims(k_, r_, out_ / k_)});
    if (hr_ > 0) {
      p.push_back({"gralora_A_general.weight", ag_.view(), gag_.view(), detail::shape_of(ag_.view(), false)});
      p.push_back({"gralora_B_general.weight", bg_.view(), gbg_.view(), detail::shape_of(bg_.view(), false)});
    }
    return p;
  }

  void zero_grad() {
    ga_.fill(T{0});
    gb_.fill(T{0});
    gag_.fill(T{0});
    gbg_.fill(T{0});
  }

  /// Throws peft::error for a default-constructed adapter.
  void check_ready(const char* where) const {
    if (k_ == 0) detail::raise<error>(where, "the adapter is default-constructed (no tensors)");
  }

 private:
  /// The shape rules of PEFT's GraloraConfig and GraloraLayer.update_layer.
  static void check_sizes(const char* where, index in, index out, index r, index k, index hr) {
    if (in < 1 || out < 1) {
      detail::raise<shape_error>(where, "in_features and out_features must be >= 1, got " + std::to_string(in) +
                                            " and " + std::to_string(out));
    }
    if (r < 1) detail::raise<shape_error>(where, "rank r must be >= 1, got " + std::to_string(r));
    if (k < 1) detail::raise<shape_error>(where, "gralora_k must be >= 1, got " + std::to_string(k));
    if (hr < 0) detail::raise<shape_error>(where, "hybrid_r must be >= 0, got " + std::to_string(hr));
    if (r % k != 0) {
      detail::raise<shape_error>(where, "r = " + std::to_string(r) + " is not divisible by gralora_k = " + std::to_string(k));
    }
    if (in % k != 0 || out % k != 0) {
      detail::raise<shape_error>(where, "in_features " + std::to_string(in) + " and out_features " + std::to_string(out) +
                                            " must both be divisible by gralora_k = " + std::to_string(k));
    }
  }
  static std::vector<std::int64_t> dims(index a, index b, index c) {
    return {static_cast<std::int64_t>(a), static_cast<std::int64_t>(b), static_cast<std::int64_t>(c)};
  }
  /// U(-bound, bound): kaiming_uniform_(a = sqrt 5) has bound 1 / sqrt(fan_in).
  static void uniform(matrix<T>& m, double bound, rng& gen) {
    for (auto& v : m.storage()) v = static_cast<T>(gen.uniform(-bound, bound));
  }
  void finish() {
    scale_ = static_cast<T>(alpha_ / static_cast<double>(r_ + hr_));
    ga_ = matrix<T>(a_.rows(), a_.cols());
    gb_ = matrix<T>(b_.rows(), b_.cols());
    gag_ = matrix<T>(ag_.rows(), ag_.cols());
    gbg_ = matrix<T>(bg_.rows(), bg_.cols());
  }
  matrix_view<T> grad_A_block(index n) noexcept { return {ga_.row(n), in_ / k_, r_}; }
  matrix_view<T> grad_B_block(index j) noexcept { return {gb_.row(j), r_, out_ / k_}; }

  /// Moves the (n, j) groups between the two column orders of a (batch, k r) matrix: z has
  /// z_n = x_n A_n at columns [n r, (n + 1) r), u has u_j at [j r, (j + 1) r); group j of z_n is
  /// u_j's group n. The swap of (n, j) is its own inverse: the same call maps u back to z.
  void regroup(matrix_view<const T> src, matrix_view<T> dst) const {
    const index rs = r_ / k_;
    for (index i = 0; i < src.rows(); ++i) {
      const T* s = src.row(i);
      T* d = dst.row(i);
      for (index n = 0; n < k_; ++n)
        for (index j = 0; j < k_; ++j) std::copy(s + n * r_ + j * rs, s + n * r_ + (j + 1) * rs, d + j * r_ + n * rs);
    }
  }
  /// cache.u (batch, k r) and cache.h (batch, hybrid_r) for x.
  void project(matrix_view<const T> x, cache_type& cache) const {
    const index batch = x.rows(), ib = in_ / k_;
    matrix<T> z(batch, k_ * r_);
    for (index n = 0; n < k_; ++n)
      kernels::gemm_nn<T, T>(1.0, x.block(0, n * ib, batch, ib), A_block(n), 0.0, z.view().block(0, n * r_, batch, r_));
    if (cache.u.rows() != batch || cache.u.cols() != k_ * r_) cache.u = matrix<T>(batch, k_ * r_);
    regroup(z.view(), cache.u.view());
    if (hr_ > 0) {
      if (cache.h.rows() != batch || cache.h.cols() != hr_) cache.h = matrix<T>(batch, hr_);
      kernels::gemm_nt<T, T>(1.0, x, ag_.view(), 0.0, cache.h.view());
    }
  }

  // ---- additive_adapter hooks ---------------------------------------------------------------
  /// y += s (u_j B_j for each output block j) + s (x Ag^T) Bg^T.
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    project(x, cache);
    const index batch = x.rows(), ob = out_ / k_;
    const double s = static_cast<double>(scale_);
    for (index j = 0; j < k_; ++j)
      kernels::gemm_nn<T, T>(s, cache.u.view().block(0, j * r_, batch, r_), B_block(j), 1.0, y.block(0, j * ob, batch, ob));
    if (hr_ > 0) kernels::gemm_nt<T, T>(s, cache.h.view(), bg_.view(), 1.0, y);
  }
  /// dB_j += s u_j^T g_j; du_j = s g_j B_j^T, regrouped to dz_n; dA_n += x_n^T dz_n; dx_n += dz_n A_n^T;
  /// the hybrid part as LoRA.
  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    const index batch = x.rows(), ib = in_ / k_, ob = out_ / k_;
    if (cache.u.rows() != batch || cache.u.cols() != k_ * r_ || (hr_ > 0 && cache.h.rows() != batch)) project(x, cache);
    const double s = static_cast<double>(scale_);
    matrix<T> du(batch, k_ * r_);
    for (index j = 0; j < k_; ++j) {
      const auto gj = g.block(0, j * ob, batch, ob);
      kernels::gemm_tn<T>(s, cache.u.view().block(0, j * r_, batch, r_), gj, 1.0, grad_B_block(j));
      kernels::gemm_nt<T, T>(s, gj, B_block(j), 0.0, du.view().block(0, j * r_, batch, r_));
    }
    matrix<T> dz(batch, k_ * r_);
    regroup(du.view(), dz.view());  // the swap of (n, j) is its own inverse
    for (index n = 0; n < k_; ++n) {
      const auto dzn = matrix_view<const T>(dz.view().block(0, n * r_, batch, r_));
      kernels::gemm_tn<T>(1.0, x.block(0, n * ib, batch, ib), dzn, 1.0, grad_A_block(n));
      kernels::gemm_nt<T, T>(1.0, dzn, A_block(n), 1.0, dx.block(0, n * ib, batch, ib));
    }
    if (hr_ > 0) {
      kernels::gemm_tn<T>(s, g, cache.h.view(), 1.0, gbg_.view());  // dBg += s g^T h
      matrix<T> dh(batch, hr_);
      kernels::gemm_nn<T, T>(s, g, bg_.view(), 0.0, dh.view());     // dh = s g Bg
      kernels::gemm_tn<T>(1.0, dh.view(), x, 1.0, gag_.view());     // dAg += dh^T x
      kernels::gemm_nn<T, T>(1.0, dh.view(), ag_.view(), 1.0, dx);  // dx += dh Ag
    }
  }

  index in_ = 0, out_ = 0, r_ = 0, k_ = 0, hr_ = 0;
  matrix<T> a_;   // (k, in / k * r): gralora_A
  matrix<T> b_;   // (k, r * out / k): gralora_B
  matrix<T> ag_;  // (hybrid_r, in)
  matrix<T> bg_;  // (out, hybrid_r)
  double alpha_ = 64.0;
  T scale_ = T{1};
  matrix<T> ga_, gb_, gag_, gbg_;  // gradients, same shapes
};

}  // namespace peft
