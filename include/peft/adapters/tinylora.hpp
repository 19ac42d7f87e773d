// peft/adapters/tinylora.hpp — TinyLoRA ("Learning to Reason in 13 Parameters", arXiv:2602.04118)
// on linear layers, as HuggingFace PEFT 0.21.2 computes it (tuners/tinylora, class Linear).
//
//   y = x W0^T + b0 + ((x A^T) R^T) B^T,     R = sum_i v_i P_i   (r, r)
//   A (r, in) = diag(sqrt S) V^T and B (out, r) = U diag(sqrt S) from the truncated SVD of W0
//   (frozen), P (u, r, r) fixed random projections (frozen), v (u) the only trainable tensor,
//   shared by the modules of one weight-tying group (a tinylora_vector held by every layer of it).
//
//   peft::tinylora<float> a(layer.base(), {.rank = 2, .u = 64});   // v = 0: a no-op
//   layer.add_adapter("default", std::move(a));
//
// The term is a low-rank term over R A; backward carries dL/d(R A) to v through A and P.
// Checkpoints: io/peft/tinylora.hpp. Details and what differs from PEFT: docs/methods/tinylora.md.
#pragma once

#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/detail/low_rank_core.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// The trainable vector v (1, u) and its gradient, shared by every layer of one weight-tying
/// group: each layer's backward adds to the same gradient.
template <compute_scalar T>
struct tinylora_vector {
  matrix<T> value;  // (1, u)
  matrix<T> grad;   // same shape

  tinylora_vector() = default;
  explicit tinylora_vector(matrix<T> values) : value(std::move(values)) {
    if (value.rows() != 1 || value.cols() < 1) {
      detail::raise<shape_error>("tinylora_vector::tinylora_vector",
                                 "v is " + detail::shape_string(value.rows(), value.cols()) + ", expected (1, u >= 1)");
    }
    grad = matrix<T>(1, value.cols());
  }
  index size() const noexcept { return value.cols(); }
  void zero_grad() { grad.fill(T{0}); }
};

template <compute_scalar T>
class tinylora;

/// PEFT's TinyLoraConfig for one layer. The adapter needs the base (A and B are its SVD): build it
/// with tinylora<T>(layer.base(), options), or pass `v` to share one vector between layers
/// (PEFT's weight_tying). P ~ N(0, 1/r) is drawn from peft::rng seeded with
/// projection_seed + layer_index (PEFT draws it with torch.normal; see docs/methods/tinylora.md).
struct tinylora_options {
  template <compute_scalar T>
  using adapter = tinylora<T>;  // the adapter these options make

  index rank = 2;
  index u = 64;
  bool init_uniform = false;   // PEFT's init_weights="uniform": v ~ U(-init_v_bound, init_v_bound); else v = 0
  double init_v_bound = 0.02;
  std::uint64_t projection_seed = 42;
  index layer_index = 0;       // the module's position among the adapted modules (PEFT's seed offset)
  std::uint64_t seed = 0;      // v's uniform draw
};

template <compute_scalar T>
class tinylora : public additive_adapter<tinylora<T>, T> {
  friend class additive_adapter<tinylora<T>, T>;

 public:
  static constexpr std::string_view method = "tinylora";

  /// What the passes derive from v: R (r, r), R A (r, in), the low-rank cache, dL/d(R A).
  struct cache_type {
    matrix<T> r_mat;
    matrix<T> ra;
    matrix<T> grad_ra;
    low_rank_cache<T> lr;
  };

  tinylora() = default;

  /// A fresh adapter for the base w with PEFT's construction: the rank min(r, in, out) truncated
  /// SVD of W0 (in double; singular vectors' signs are LAPACK's choice in PEFT, Eigen's here),
  /// P ~ N(0, 1/r) (peft::rng), v zeros or U(-bound, bound), or the shared `v` when given.
  template <base_weight Base>
  tinylora(const Base& w, const tinylora_options& opt, std::shared_ptr<tinylora_vector<T>> v = nullptr) {
    constexpr const char* where = "tinylora::tinylora";
    const index in = w.in_features(), out = w.out_features();
    if (in < 1 || out < 1) detail::raise<shape_error>(where, "the base is " + detail::shape_string(out, in));
    if (opt.rank < 1 || opt.u < 1) {
      detail::raise<shape_error>(where, "rank " + std::to_string(opt.rank) + " and u " + std::to_string(opt.u) +
                                            " must be >= 1");
    }
    using dmat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    dmat w0(out, in);
    for (index i = 0; i < out; ++i) w.dequantize_row(i, w0.row(i).data());
    const Eigen::JacobiSVD<dmat> svd(w0, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const index r = std::min({opt.rank, in, out});
    a_ = matrix<T>(r, in);
    b_ = matrix<T>(out, r);
    for (index k = 0; k < r; ++k) {
      const double s = std::sqrt(svd.singularValues()(k));
      for (index j = 0; j < in; ++j) a_(k, j) = static_cast<T>(s * svd.matrixV()(j, k));
      for (index i = 0; i < out; ++i) b_(i, k) = static_cast<T>(svd.matrixU()(i, k) * s);
    }
    rng proj(opt.projection_seed + static_cast<std::uint64_t>(opt.layer_index));
    p_ = matrix<T>(opt.u, r * r);
    const double sd = 1.0 / std::sqrt(static_cast<double>(r));
    for (auto& e : p_.storage()) e = static_cast<T>(proj.normal(0.0, sd));
    if (!v) {
      matrix<T> values(1, opt.u);
      if (opt.init_uniform) {
        rng gen(opt.seed);
        for (auto& e : values.storage()) e = static_cast<T>(gen.uniform(-opt.init_v_bound, opt.init_v_bound));
      }
      v = std::make_shared<tinylora_vector<T>>(std::move(values));
    }
    v_ = std::move(v);
    finish(where);
  }

  /// An adapter from existing tensors: A (r, in), B (out, r), P (u, r r) (row i = P_i row-major)
  /// and the (possibly shared) v of u values.
  tinylora(matrix<T> a, matrix<T> b, matrix<T> p, std::shared_ptr<tinylora_vector<T>> v)
      : v_(std::move(v)), a_(std::move(a)), b_(std::move(b)), p_(std::move(p)) {
    finish("tinylora::tinylora");
  }

  index in_features() const noexcept { return a_.cols(); }
  index out_features() const noexcept { return b_.rows(); }
  index rank() const noexcept { return a_.rows(); }
  index u() const noexcept { return p_.rows(); }
  matrix_view<const T> A() const noexcept { return a_.view(); }
  matrix_view<const T> B() const noexcept { return b_.view(); }
  /// P as (u, r r): row i is P_i (r, r) row-major.
  matrix_view<const T> P() const noexcept { return p_.view(); }
  /// The trainable v (the same object for every layer sharing it).
  const std::shared_ptr<tinylora_vector<T>>& v() const noexcept { return v_; }

  /// R = sum_i v_i P_i (r, r).
  matrix<T> R() const {
    check_ready("tinylora::R");
    cache_type c;
    assemble(c);
    return std::move(c.r_mat);
  }

  // forward, add_term, backward, backward_term: core/additive_adapter.hpp over the hooks below.

  /// dW = B R A (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_ready("tinylora::delta_weight");
    this->check_base("tinylora::delta_weight", w);
    detail::expect_shape("tinylora::delta_weight", "dw", dw, out_features(), in_features());
    cache_type c;
    assemble(c);
    kernels::gemm_nn<T, T>(1.0, b_.view(), c.ra.view(), 0.0, dw);
  }
  /// TinyLoRA does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// tinylora_v.0 (u, shared, trainable: PEFT saves the group's vector as base_model.tinylora_v.0),
  /// and the frozen tinylora_A (r, in), tinylora_B (out, r), tinylora_P (u, r, r).
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    if (!v_) return p;
    parameter<T> v{"tinylora_v.0", v_->value.view(), v_->grad.view(), {static_cast<std::int64_t>(v_->size())}};
    v.shared = true;
    p.push_back(std::move(v));
    const auto r = static_cast<std::int64_t>(rank());
    p.push_back({"tinylora_A", a_.view(), {}, detail::shape_of(a_.view(), false), false});
    p.push_back({"tinylora_B", b_.view(), {}, detail::shape_of(b_.view(), false), false});
    p.push_back({"tinylora_P", p_.view(), {}, {static_cast<std::int64_t>(u()), r, r}, false});
    return p;
  }

  /// Zeroes the shared v's gradient (seen by every layer sharing it).
  void zero_grad() {
    if (v_) v_->zero_grad();
  }

  /// Throws peft::error for a default-constructed adapter (no v).
  void check_ready(const char* where) const {
    if (!v_) detail::raise<error>(where, "the adapter is default-constructed (no v)");
  }

 private:
  void finish(const char* where) {
    if (!v_) detail::raise<shape_error>(where, "v must not be null");
    const index r = a_.rows();
    if (a_.empty() || b_.empty() || b_.cols() != r) {
      detail::raise<shape_error>(where, "tinylora_A " + detail::shape_string(a_.rows(), a_.cols()) + " and tinylora_B " +
                                            detail::shape_string(b_.rows(), b_.cols()) +
                                            " do not form a non-empty product");
    }
    if (p_.rows() < 1 || p_.cols() != r * r) {
      detail::raise<shape_error>(where, "tinylora_P is " + detail::shape_string(p_.rows(), p_.cols()) +
                                            ", expected (u >= 1, r r = " + std::to_string(r * r) + ")");
    }
    if (v_->value.rows() != 1 || v_->size() != p_.rows() || v_->grad.cols() != v_->size()) {
      detail::raise<shape_error>(where, "v holds " + std::to_string(v_->size()) + " values, tinylora_P " +
                                            std::to_string(p_.rows()) + " projections");
    }
  }

  /// R = sum_i v_i P_i and R A into the cache.
  void assemble(cache_type& c) const {
    const index r = rank(), in = in_features();
    low_rank::detail::resize(c.r_mat, r, r);
    low_rank::detail::resize(c.ra, r, in);
    c.r_mat.fill(T{0});
    const T* v = v_->value.row(0);
    for (index i = 0; i < u(); ++i) {
      const T* pi = p_.row(i);
      for (index k = 0; k < r * r; ++k) c.r_mat.storage()[static_cast<std::size_t>(k)] += v[i] * pi[k];
    }
    kernels::gemm_nn<T, T>(1.0, c.r_mat.view(), a_.view(), 0.0, c.ra.view());
  }
  low_rank_term<T> term(const cache_type& c) const { return {c.ra.view(), b_.view(), nullptr, nullptr, nullptr, T{1}}; }

  // ---- additive_adapter hooks ------------------------------------------------------------------
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& c) const {
    assemble(c);
    low_rank::add(term(c), x, y, c.lr);
  }
  kernels::low_rank_epilogue<T> tile_epilogue(matrix_view<const T> x, cache_type& c) const {
    assemble(c);
    low_rank::project(term(c), x, c.lr);
    return low_rank::epilogue(term(c), c.lr);
  }
  /// The low-rank core gives dx and G = dL/d(R A); then dR = G A^T and dv_i += <dR, P_i>.
  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& c) {
    assemble(c);
    const index r = rank(), in = in_features();
    low_rank::detail::resize(c.grad_ra, r, in);
    c.grad_ra.fill(T{0});
    low_rank::backward(term(c), low_rank_gradients<T>{c.grad_ra.view(), {}}, x, g, dx, c.lr);
    std::vector<double> dr(static_cast<std::size_t>(r * r), 0.0);
    for (index j = 0; j < r; ++j) {
      const T* gj = c.grad_ra.row(j);
      for (index k = 0; k < r; ++k) {
        const T* ak = a_.row(k);
        double s = 0;
        for (index l = 0; l < in; ++l) s += static_cast<double>(gj[l]) * static_cast<double>(ak[l]);
        dr[static_cast<std::size_t>(j * r + k)] = s;
      }
    }
    T* gv = v_->grad.row(0);
    for (index i = 0; i < u(); ++i) {
      const T* pi = p_.row(i);
      double s = 0;
      for (index k = 0; k < r * r; ++k) s += dr[static_cast<std::size_t>(k)] * static_cast<double>(pi[k]);
      gv[i] += static_cast<T>(s);
    }
  }

  std::shared_ptr<tinylora_vector<T>> v_;  // (1, u), shared by a weight-tying group
  matrix<T> a_;                            // (r, in), frozen
  matrix<T> b_;                            // (out, r), frozen
  matrix<T> p_;                            // (u, r r), frozen
};

}  // namespace peft
