// peft/adapters/lora.hpp — LoRA (Hu et al. 2021) as HuggingFace PEFT implements it.
//
//   y = x W0^T + b0 + s (x A^T B^T + b_B)      A (r, in), B (out, r), b_B (out) if lora_bias
//   s = alpha / r, or alpha / sqrt(r) with rsLoRA; set_scale() changes it at run time.
//
//   peft::lora<float> a(in, out, {.rank = 16, .alpha = 32});   // kaiming-uniform A, B = 0
//   a.forward(base, x, y, cache);   a.backward(base, x, dy, dx, cache);
//
// Gradients (g = dL/dy): dB += s g^T (x A^T), dA += s (g B)^T x, db_B += s sum_rows g,
// dx = g W0 + s (g B) A. Checkpoint names: lora_A.weight, lora_B.weight, lora_B.bias.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "peft/base/dense.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/io/adapter_config.hpp"
#include "peft/interop/eigen.hpp"
#include "peft/io/checkpoint_tensors.hpp"
#include "peft/kernels/epilogue.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// PEFT's `init_lora_weights`: true (kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r^2),
/// zero B), false (both random: A kaiming-uniform, B ~ U(-1/sqrt(r), 1/sqrt(r)); not a no-op).
enum class lora_init : std::uint8_t { kaiming_uniform, gaussian, random };

struct lora_options {
  index rank = 8;
  double alpha = 8.0;
  bool use_rslora = false;  // s = alpha / sqrt(r) instead of alpha / r
  bool bias = false;        // PEFT's lora_bias: a trainable bias on B
  lora_init init = lora_init::kaiming_uniform;
  std::uint64_t seed = 0;
};

/// The scale PEFT uses: alpha / r, or alpha / sqrt(r) with rsLoRA.
inline double lora_scale(double alpha, index rank, bool use_rslora) {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank))
                    : alpha / static_cast<double>(rank);
}

template <compute_scalar T>
class lora {
 public:
  using scalar = T;
  static constexpr std::string_view method = "lora";

  /// What backward needs from forward: t = x A^T (batch, r).
  struct cache_type {
    matrix<T> t;
  };

  lora() = default;

  /// A fresh adapter for a layer with `in_features` inputs and `out_features` outputs.
  lora(index in_features, index out_features, const lora_options& opt)
      : a_(checked_rank(opt.rank), checked_dim(in_features, "in_features")),
        b_(checked_dim(out_features, "out_features"), opt.rank),
        scale_(static_cast<T>(lora_scale(opt.alpha, opt.rank, opt.use_rslora))),
        ga_(a_.rows(), a_.cols()),
        gb_(b_.rows(), b_.cols()) {
    if (opt.bias) {
      bias_ = matrix<T>(1, out_features);
      gbias_ = matrix<T>(1, out_features);
    }
    rng gen(opt.seed);
    const double bound_a = 1.0 / std::sqrt(static_cast<double>(in_features));
    switch (opt.init) {
      case lora_init::kaiming_uniform:
        for (auto& v : a_.storage()) v = static_cast<T>(gen.uniform(-bound_a, bound_a));
        break;
      case lora_init::gaussian:
        for (auto& v : a_.storage())
          v = static_cast<T>(gen.normal(0.0, 1.0 / static_cast<double>(opt.rank)));
        break;
      case lora_init::random: {
        for (auto& v : a_.storage()) v = static_cast<T>(gen.uniform(-bound_a, bound_a));
        const double bound_b = 1.0 / std::sqrt(static_cast<double>(opt.rank));
        for (auto& v : b_.storage()) v = static_cast<T>(gen.uniform(-bound_b, bound_b));
        // nn.Linear's default bias init, which PEFT leaves in place without init_lora_weights.
        for (auto& v : bias_.storage()) v = static_cast<T>(gen.uniform(-bound_b, bound_b));
        break;
      }
    }
  }

  /// An adapter from existing factors: A (r, in), B (out, r), optional bias (out values).
  lora(matrix<T> a, matrix<T> b, T scale, std::vector<T> bias = {})
      : a_(std::move(a)), b_(std::move(b)), scale_(scale), ga_(a_.rows(), a_.cols()),
        gb_(b_.rows(), b_.cols()) {
    if (b_.cols() != a_.rows()) {
      detail::raise<shape_error>("lora::lora", "B is " + detail::shape_string(b_.rows(), b_.cols()) +
                                                   " but A has rank " + std::to_string(a_.rows()));
    }
    checked_rank(a_.rows());
    if (!bias.empty()) {
      if (static_cast<index>(bias.size()) != b_.rows()) {
        detail::raise<shape_error>("lora::lora", "bias has " + std::to_string(bias.size()) +
                                                     " values, expected " + std::to_string(b_.rows()));
      }
      bias_ = matrix<T>(1, b_.rows(), std::move(bias));
      gbias_ = matrix<T>(1, b_.rows());
    }
  }

  index in_features() const noexcept { return a_.cols(); }
  index out_features() const noexcept { return b_.rows(); }
  index rank() const noexcept { return a_.rows(); }
  T scale() const noexcept { return scale_; }
  void set_scale(T s) noexcept { scale_ = s; }
  bool has_bias() const noexcept { return !bias_.empty(); }

  matrix_view<T> A() noexcept { return a_.view(); }
  matrix_view<const T> A() const noexcept { return a_.view(); }
  matrix_view<T> B() noexcept { return b_.view(); }
  matrix_view<const T> B() const noexcept { return b_.view(); }
  /// lora_B.bias as a (1, out) view; empty without lora_bias.
  matrix_view<T> bias() noexcept { return bias_.view(); }
  matrix_view<const T> bias() const noexcept { return bias_.view(); }
  matrix_view<const T> grad_A() const noexcept { return ga_.view(); }
  matrix_view<const T> grad_B() const noexcept { return gb_.view(); }
  matrix_view<const T> grad_bias() const noexcept { return gbias_.view(); }

  /// y = x W0^T + b0 + s (x A^T B^T + b_B). On a base with a fused product (dense f32, the
  /// quantized bases) t = x A^T comes first and s t B^T is added to each output tile of the base
  /// product while it is in cache.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    check_io("lora::forward", w, x, y);
    if constexpr (fused_base_weight<Base, T>) {
      project(x, cache);
      const matrix_view<const T> t = cache.t.view();
      w.matmul(x, y, [this, t](index i0, index j0, matrix_view<T> tile) {
        add_projected(t, i0, j0, tile, scale_);
      });
    } else {
      w.matmul(x, y);
      add_low_rank(x, y, cache);
    }
  }

  /// cache.t = x A^T (batch, r): the first half of the low-rank term.
  void project(matrix_view<const T> x, cache_type& cache) const {
    if (cache.t.rows() != x.rows() || cache.t.cols() != rank()) cache.t = matrix<T>(x.rows(), rank());
    kernels::gemm_nt<T, T>(1.0, x, a_.view(), 0.0, cache.t.view());
  }

  /// The second half on one output tile at (i0, j0): tile += f (t[i0.., :] B[j0.., :]^T + b_B),
  /// with f = s for the plain term (DoRA passes its own factor). Reads only; safe to call
  /// concurrently on disjoint tiles.
  void add_projected(matrix_view<const T> t, index i0, index j0, matrix_view<T> tile, T f) const {
    const matrix_view<const T> tb = t.block(i0, 0, tile.rows(), rank());
    const matrix_view<const T> bb = b_.view().block(j0, 0, tile.cols(), rank());
    as_eigen(tile).noalias() += f * (as_eigen(tb) * as_eigen(bb).transpose());
    if (!bias_.empty()) {
      for (index i = 0; i < tile.rows(); ++i) {
        T* row = tile.row(i);
        for (index j = 0; j < tile.cols(); ++j) row[j] += f * bias_(0, j0 + j);
      }
    }
  }

  /// y += s (x A^T B^T + b_B); h (the base output) is not needed by LoRA.
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/,
                matrix_view<T> y, cache_type& cache) const {
    check_io("lora::add_term", w, x, y);
    add_low_rank(x, y, cache);
  }

  /// Accumulates dA, dB, db_B; writes dx = g W0 + s (g B) A.
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                matrix_view<T> dx, cache_type& cache) {
    check_grad("lora::backward", w, x, g, dx);
    w.matmul_t(g, dx, false);
    low_rank_backward(x, g, dx, cache);
  }

  /// Accumulates dA, dB, db_B and dx += s (g B) A; LoRA's term does not depend on h.
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/,
                     matrix_view<const T> g, matrix_view<T> /*dh*/, matrix_view<T> dx,
                     cache_type& cache) {
    check_grad("lora::backward_term", w, x, g, dx);
    low_rank_backward(x, g, dx, cache);
  }

  /// dW = s B A (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("lora::delta_weight", w);
    detail::expect_shape("lora::delta_weight", "dw", dw, out_features(), in_features());
    kernels::gemm_nn<T, T>(static_cast<double>(scale_), b_.view(), a_.view(), 0.0, dw);
  }

  /// db = s b_B; false (db untouched) without lora_bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* db) const {
    if (bias_.empty()) return false;
    for (index j = 0; j < out_features(); ++j) db[j] = scale_ * bias_(0, j);
    return true;
  }

  // ---- PEFT checkpoints (io/peft_checkpoint.hpp calls these) ------------------------------------

  /// PEFT's "LORA" without use_dora.
  static bool handles(const io::adapter_config& c) { return c.peft_type == "LORA" && !c.use_dora; }
  /// Per-module tensor names, and tensors shared by all modules ("base_model.<name>"): none.
  static std::vector<std::string_view> checkpoint_parameters() {
    return {"lora_A.weight", "lora_B.weight", "lora_B.bias"};
  }
  static std::vector<std::string_view> shared_parameters() { return {}; }

  /// The adapter of one module: rank from lora_A, checked against r / rank_pattern; scale from
  /// lora_alpha / alpha_pattern and use_rslora.
  static lora from_checkpoint(const io::adapter_config& c, const io::checkpoint_tensors<T>& m,
                              const io::checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "lora::from_checkpoint";
    const auto& sa = m.shape("lora_A.weight", 2);
    const auto& sb = m.shape("lora_B.weight", 2);
    if (sb[1] != sa[0]) {
      detail::raise<format_error>(where, "module '" + m.module() + "': lora_A " + io::detail::shape_text(sa) +
                                             " and lora_B " + io::detail::shape_text(sb) + " disagree on the rank");
    }
    const auto rank = static_cast<index>(sa[0]);
    if (rank != c.rank_for(m.module())) {
      detail::raise<format_error>(where, "module '" + m.module() + "' has rank " + std::to_string(rank) +
                                             " but adapter_config.json gives " + std::to_string(c.rank_for(m.module())));
    }
    std::vector<T> bias;
    if (m.contains("lora_B.bias")) {
      bias = m.copy("lora_B.bias", {sb[0]}).storage();
    } else if (c.lora_bias) {
      detail::raise<format_error>(where, "module '" + m.module() + "' has no lora_B.bias but lora_bias is true");
    }
    const double s = lora_scale(c.alpha_for(m.module()), rank, c.use_rslora);
    return lora(m.copy("lora_A.weight"), m.copy("lora_B.weight"), static_cast<T>(s), std::move(bias));
  }

  /// Makes `c` describe this module when saving: an exact rank_pattern / alpha_pattern entry
  /// where r / lora_alpha do not give this rank and scale; lora_bias when this module has one.
  void describe_in(io::adapter_config& c, const std::string& module) const {
    c.peft_type = "LORA";
    const double s = static_cast<double>(scale_);
    const double tol = 8.0 * static_cast<double>(std::numeric_limits<T>::epsilon()) * std::max(1.0, std::abs(s));
    if (c.rank_for(module) != rank()) c.rank_pattern.insert(c.rank_pattern.begin(), {module, rank()});
    if (std::abs(lora_scale(c.alpha_for(module), rank(), c.use_rslora) - s) > tol) {
      const double r = static_cast<double>(rank());
      c.alpha_pattern.insert(c.alpha_pattern.begin(), {module, c.use_rslora ? s * std::sqrt(r) : s * r});
    }
    c.lora_bias = c.lora_bias || has_bias();
  }

  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"lora_A.weight", a_.view(), ga_.view(), detail::shape_of(a_.view(), false)});
    p.push_back({"lora_B.weight", b_.view(), gb_.view(), detail::shape_of(b_.view(), false)});
    if (!bias_.empty()) {
      p.push_back({"lora_B.bias", bias_.view(), gbias_.view(), detail::shape_of(bias_.view(), true)});
    }
    return p;
  }

  void zero_grad() {
    ga_.fill(T{0});
    gb_.fill(T{0});
    gbias_.fill(T{0});
  }

 private:
  static index checked_rank(index r) {
    if (r < 1) detail::raise<shape_error>("lora::lora", "rank must be >= 1, got " + std::to_string(r));
    return r;
  }
  static index checked_dim(index d, const char* what) {
    if (d < 1) {
      std::string msg = what;  // appended piece by piece: g++ 12 -Warray-bounds false positive
      msg += " must be >= 1, got ";
      msg += std::to_string(d);
      detail::raise<shape_error>("lora::lora", msg);
    }
    return d;
  }

  template <class Base>
  void check_base(const char* where, const Base& w) const {
    detail::check_adapter_base(where, *this, w);
  }
  template <class Base>
  void check_io(const char* where, const Base& w, matrix_view<const T> x, matrix_view<T> y) const {
    detail::check_adapter_io(where, *this, w, x, y);
  }
  template <class Base>
  void check_grad(const char* where, const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                  matrix_view<T> dx) const {
    detail::check_adapter_grad(where, *this, w, x, g, dx);
  }

  void add_low_rank(matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    project(x, cache);                                                              // (batch, r)
    kernels::gemm_nt<T, T>(static_cast<double>(scale_), cache.t.view(), b_.view(), 1.0, y);
    if (!bias_.empty()) {
      for (index i = 0; i < y.rows(); ++i) {
        T* row = y.row(i);
        for (index j = 0; j < y.cols(); ++j) row[j] += scale_ * bias_(0, j);
      }
    }
  }

  void low_rank_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                         cache_type& cache) {
    if (cache.t.rows() != x.rows() || cache.t.cols() != rank()) {
      cache.t = matrix<T>(x.rows(), rank());
      kernels::gemm_nt<T, T>(1.0, x, a_.view(), 0.0, cache.t.view());
    }
    const double s = static_cast<double>(scale_);
    matrix<T> u(x.rows(), rank());                                                 // (batch, r)
    kernels::gemm_nn<T, T>(1.0, g, b_.view(), 0.0, u.view());                      // g B
    kernels::gemm_tn<T>(s, g, cache.t.view(), 1.0, gb_.view());                    // dB += s g^T t
    kernels::gemm_tn<T>(s, u.view(), x, 1.0, ga_.view());                          // dA += s u^T x
    kernels::gemm_nn<T, T>(s, u.view(), a_.view(), 1.0, dx);                       // dx += s u A
    if (!bias_.empty()) {
      for (index i = 0; i < g.rows(); ++i) {
        for (index j = 0; j < g.cols(); ++j) gbias_(0, j) += scale_ * g(i, j);
      }
    }
  }

  matrix<T> a_;      // (r, in)
  matrix<T> b_;      // (out, r)
  matrix<T> bias_;   // (1, out) or empty
  T scale_ = T{1};
  matrix<T> ga_;     // gradients, same shapes
  matrix<T> gb_;
  matrix<T> gbias_;
};

static_assert(mergeable_adapter_for<lora<float>, dense<float>>);
static_assert(mergeable_adapter_for<lora<double>, dense<bf16>>);

}  // namespace peft
