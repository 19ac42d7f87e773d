// peft/adapters/c3a.hpp — C3A, circular convolution adaptation (Chen et al., 2024), as
// HuggingFace PEFT 0.21 computes it.
//
//   y = x W0^T + b0 + x dW^T / in_features        dW block-circulant, blocks (b, b)
//   dW[p b + t, q b + j] = K[p, q, (j - t) mod b]   K = c3a_kernel (out / b, in / b, b)
//
// i.e. each output block is a sum over input blocks of circular cross-correlations
// y_p[t] = sum_q sum_l K[p, q, l] x_q[(t + l) mod b] / in (PEFT: fft(ifft(x) * fft(K)), real part).
//
//   peft::c3a<float> a(in, out, {.block_size = 16});   // PEFT's init: xavier-uniform kernel
//
// The passes come from additive_adapter. Each output block row of dW (b, in) is formed from K
// (O(b in)) and applied with one product, so a call costs one product of the layer's size; the
// full (out, in) delta is never formed. Checkpoints: io/peft/c3a.hpp. Details: docs/methods/c3a.md.
#pragma once

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
#include "peft/kernels/gemm.hpp"

namespace peft {

/// PEFT's `init_weights` for C3A: true (zeros: a no-op), "gaussian" (N(0, 1)), "kaiming_uniform"
/// (U(+-1/sqrt(in))), "xavier_uniform" or false (U(+-sqrt(6 / (in + out))), PEFT's default).
enum class c3a_init : std::uint8_t { zeros, gaussian, kaiming_uniform, xavier_uniform };

template <compute_scalar T>
class c3a;

struct c3a_options {
  template <compute_scalar T>
  using adapter = c3a<T>;  // the adapter these options make

  index block_size = 256;  // PEFT's default; must divide in_features and out_features
  c3a_init init = c3a_init::xavier_uniform;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class c3a : public additive_adapter<c3a<T>, T> {
  friend class additive_adapter<c3a<T>, T>;

 public:
  static constexpr std::string_view method = "c3a";

  /// Nothing: backward re-forms each block row of dW from K (O(out in), less than the products).
  struct cache_type {};

  c3a() = default;

  /// A fresh adapter for an (out, in) linear layer with PEFT's shapes and initialisation.
  c3a(index in_features, index out_features, const c3a_options& opt)
      : kernel_(checked_blocks(in_features, out_features, opt.block_size, "c3a::c3a")),
        grad_(kernel_.rows(), kernel_.cols()), block_(opt.block_size), in_(in_features) {
    rng gen(opt.seed);
    const auto fan_in = static_cast<double>(in_features), fan_out = static_cast<double>(out_features);
    switch (opt.init) {
      case c3a_init::zeros: break;
      case c3a_init::gaussian:
        for (auto& v : kernel_.storage()) v = static_cast<T>(gen.normal());
        break;
      case c3a_init::kaiming_uniform:
        fill_uniform(1.0 / std::sqrt(fan_in), gen);
        break;
      case c3a_init::xavier_uniform:
        fill_uniform(std::sqrt(6.0 / (fan_in + fan_out)), gen);
        break;
    }
  }

  /// An adapter from an existing kernel stored as (out / b, (in / b) b): K[p, q, l] at
  /// kernel(p, q b + l), the row-major flattening of PEFT's (out / b, in / b, b) tensor.
  c3a(matrix<T> kernel, index block_size) : kernel_(std::move(kernel)), block_(block_size) {
    if (block_ < 1) detail::raise<shape_error>("c3a::c3a", "block_size must be >= 1, got " + std::to_string(block_));
    if (kernel_.empty() || kernel_.cols() % block_ != 0) {
      detail::raise<shape_error>("c3a::c3a", "the kernel " + detail::shape_string(kernel_.rows(), kernel_.cols()) +
                                                 " is not (out / b, (in / b) b) for block_size " +
                                                 std::to_string(block_));
    }
    in_ = kernel_.cols();
    grad_ = matrix<T>(kernel_.rows(), kernel_.cols());
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return kernel_.rows() * block_; }
  index block_size() const noexcept { return block_; }
  /// K as (out / b, (in / b) b).
  const matrix<T>& kernel() const noexcept { return kernel_; }
  /// The factor applied to the convolution: 1 / in_features (PEFT divides by x.size(-1)).
  T scale() const noexcept { return static_cast<T>(1.0 / static_cast<double>(in_)); }

  // forward, add_term, backward, backward_term: core/additive_adapter.hpp over the hooks below.

  /// dW / in_features (out, in): the block-circulant delta PEFT merges.
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("c3a::delta_weight", w);
    detail::expect_shape("c3a::delta_weight", "dw", dw, out_features(), in_features());
    for (index p = 0; p < kernel_.rows(); ++p) block_row(p, dw.row_block(p * block_, block_));
  }

  /// C3A does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// c3a_kernel, shape (out / b, in / b, b).
  std::vector<parameter<T>> parameters() {
    return {{"c3a_kernel", kernel_.view(), grad_.view(),
             {static_cast<std::int64_t>(kernel_.rows()), static_cast<std::int64_t>(in_ / block_),
              static_cast<std::int64_t>(block_)}}};
  }

  void zero_grad() { grad_.fill(T{0}); }

 private:
  static matrix<T> checked_blocks(index in, index out, index b, const char* where) {
    if (in < 1 || out < 1) {
      detail::raise<shape_error>(where, "in_features and out_features must be >= 1, got " + detail::shape_string(out, in));
    }
    if (b < 1) detail::raise<shape_error>(where, "block_size must be >= 1, got " + std::to_string(b));
    if (in % b != 0 || out % b != 0) {
      detail::raise<shape_error>(where, "block_size " + std::to_string(b) + " must divide in_features " +
                                            std::to_string(in) + " and out_features " + std::to_string(out));
    }
    return matrix<T>(out / b, in);
  }
  void fill_uniform(double bound, rng& gen) {
    for (auto& v : kernel_.storage()) v = static_cast<T>(gen.uniform(-bound, bound));
  }

  /// Block row p of dW / in (b, in): r[t, q b + j] = K[p, q, (j - t) mod b] / in.
  void block_row(index p, matrix_view<T> r) const {
    const T s = scale();
    const T* k = kernel_.row(p);
    for (index t = 0; t < block_; ++t) {
      T* row = r.row(t);
      for (index q = 0; q < in_; q += block_) {
        // l = (j - t) mod b as two runs, j >= t and j < t.
        for (index j = t; j < block_; ++j) row[q + j] = s * k[q + j - t];
        for (index j = 0; j < t; ++j) row[q + j] = s * k[q + j - t + block_];
      }
    }
  }

  // ---- additive_adapter hooks ------------------------------------------------------------------
  /// y[:, p-th block] += x R_p^T for each block row R_p of dW / in.
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& /*cache*/) const {
    matrix<T> r(block_, in_);  // (b, in)
    for (index p = 0; p < kernel_.rows(); ++p) {
      block_row(p, r.view());
      kernels::gemm_nt<T, T>(1.0, x, r.view(), 1.0, y.block(0, p * block_, y.rows(), block_));
    }
  }

  /// dx += sum_p g_p R_p; dK[p, q, l] += sum_t (g_p^T x)[t, q b + (t + l) mod b] / in.
  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& /*cache*/) {
    matrix<T> r(block_, in_), c(block_, in_);  // (b, in) each
    const T s = scale();
    for (index p = 0; p < kernel_.rows(); ++p) {
      const auto gp = g.block(0, p * block_, g.rows(), block_);  // (batch, b)
      block_row(p, r.view());
      kernels::gemm_nn<T, T>(1.0, gp, r.view(), 1.0, dx);
      kernels::gemm_tn<T>(1.0, gp, x, 0.0, c.view());  // C = g_p^T x (b, in)
      T* dk = grad_.row(p);
      for (index t = 0; t < block_; ++t) {
        const T* ct = c.row(t);
        for (index q = 0; q < in_; q += block_) {
          // l = j - t for j >= t, l = j - t + b for j < t.
          for (index j = t; j < block_; ++j) dk[q + j - t] += s * ct[q + j];
          for (index j = 0; j < t; ++j) dk[q + j - t + block_] += s * ct[q + j];
        }
      }
    }
  }

  matrix<T> kernel_;  // (out / b, (in / b) b): K[p, q, l] at (p, q b + l)
  matrix<T> grad_;    // same shape
  index block_ = 1;
  index in_ = 0;
};

}  // namespace peft
