// peft/base/dense.hpp — a frozen dense weight: W0 (out, in) stored as f64, f32, bf16 or f16.
//
//   peft::dense<peft::bf16> w = peft::dense<peft::bf16>::from(weight_view, bias_ptr);
//   w.matmul(x, y);   // y = x W0^T + b0, computed in the scalar type of x and y
//
// Storage and compute types are independent: a bf16 weight is decoded panel by panel into the
// compute type inside the product, never converted whole. Merging (add_to_weight) rounds the
// result to the storage type, so merge followed by unmerge is exact only for f64 storage.
#pragma once

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "peft/core/base_weight.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/kernels/epilogue.hpp"
#include "peft/kernels/gemm.hpp"
#include "peft/kernels/linear.hpp"

namespace peft {

template <storage_scalar S>
class dense {
 public:
  using storage_type = S;

  dense() = default;
  /// Takes ownership of the weight (out, in) and an optional bias of `out` values.
  explicit dense(matrix<S> weight, std::vector<S> bias = {})
      : weight_(std::move(weight)), bias_(std::move(bias)) {
    if (!bias_.empty() && static_cast<index>(bias_.size()) != weight_.rows()) {
      detail::raise<shape_error>("dense::dense", "bias has " + std::to_string(bias_.size()) +
                                                     " values, expected " +
                                                     std::to_string(weight_.rows()));
    }
  }

  /// Converts a weight view (out, in) and an optional bias (nullptr: none) to storage type S.
  template <class U>
  static dense from(matrix_view<const U> weight, const U* bias = nullptr) {
    matrix<S> w(weight.rows(), weight.cols());
    for (index i = 0; i < weight.rows(); ++i) {
      for (index j = 0; j < weight.cols(); ++j) w(i, j) = convert<S>(weight(i, j));
    }
    std::vector<S> b;
    if (bias != nullptr) {
      b.resize(static_cast<std::size_t>(weight.rows()));
      for (index i = 0; i < weight.rows(); ++i) b[static_cast<std::size_t>(i)] = convert<S>(bias[i]);
    }
    return dense(std::move(w), std::move(b));
  }

  index out_features() const noexcept { return weight_.rows(); }
  index in_features() const noexcept { return weight_.cols(); }
  bool has_bias() const noexcept { return !bias_.empty(); }
  static constexpr dtype storage_dtype() noexcept { return dtype_of_v<S>; }

  matrix_view<const S> weight() const noexcept { return weight_.view(); }
  /// Writable storage, for in-place switching (SHiRA scatters values into W0 and restores them).
  matrix_view<S> mutable_weight() noexcept { return weight_.view(); }
  const std::vector<S>& bias() const noexcept { return bias_; }
  /// Writable bias (full fine-tuning steps it in place); empty when the layer has none.
  std::vector<S>& mutable_bias() noexcept { return bias_; }

  template <compute_scalar T>
  T bias_value(index j) const noexcept {
    return bias_.empty() ? T{0} : convert<T>(bias_[static_cast<std::size_t>(j)]);
  }

  /// y = x W0^T + b0. x (batch, in), y (batch, out); y is overwritten. T is deduced from y, so
  /// x may be a mutable view too (here and in matmul_t).
  template <compute_scalar T>
  void matmul(std::type_identity_t<matrix_view<const T>> x, matrix_view<T> y) const {
    matmul(x, y, kernels::no_epilogue{});
  }

  /// y = x W0^T + b0, then epi(i0, j0, tile) on each finished output tile (kernels/epilogue.hpp).
  /// f32 weights under f32 compute run the fused kernels of kernels/linear.hpp (the epilogue sees
  /// tiles while they are in cache); other combinations call it once on the whole of y.
  template <compute_scalar T, class Epi>
    requires kernels::epilogue_for<Epi, T>
  void matmul(std::type_identity_t<matrix_view<const T>> x, matrix_view<T> y, const Epi& epi) const {
    detail::expect_shape("dense::matmul", "x", x, x.rows(), in_features());
    detail::expect_shape("dense::matmul", "y", y, x.rows(), out_features());
    if constexpr (std::is_same_v<T, float> && std::is_same_v<S, float>) {
      kernels::linear_nt(x, weight_.view(), bias_.empty() ? nullptr : bias_.data(), y, epi);
    } else {
      kernels::gemm_nt<T, S>(1.0, x, weight_.view(), 0.0, y);
      if (!bias_.empty()) {
        for (index i = 0; i < y.rows(); ++i) {
          T* row = y.row(i);
          for (index j = 0; j < y.cols(); ++j) row[j] += bias_value<T>(j);
        }
      }
      if (!y.empty()) epi(index{0}, index{0}, y);
    }
  }

  /// dx = dy W0, or dx += dy W0 when `accumulate`. dy (batch, out), dx (batch, in).
  template <compute_scalar T>
  void matmul_t(std::type_identity_t<matrix_view<const T>> dy, matrix_view<T> dx,
                bool accumulate = false) const {
    detail::expect_shape("dense::matmul_t", "dy", dy, dy.rows(), out_features());
    detail::expect_shape("dense::matmul_t", "dx", dx, dy.rows(), in_features());
    if constexpr (std::is_same_v<T, float> && std::is_same_v<S, float>) {
      kernels::linear_nn(dy, weight_.view(), dx, accumulate);
    } else {
      kernels::gemm_nn<T, S>(1.0, dy, weight_.view(), accumulate ? 1.0 : 0.0, dx);
    }
  }

  /// out[0..in) = W0[i, :] in the compute type.
  template <compute_scalar T>
  void dequantize_row(index i, T* out) const {
    if (i < 0 || i >= out_features()) {
      detail::raise<shape_error>("dense::dequantize_row", "row " + std::to_string(i) +
                                                              " out of range [0, " +
                                                              std::to_string(out_features()) + ")");
    }
    const S* r = weight_.row(i);
    for (index j = 0; j < in_features(); ++j) out[j] = convert<T>(r[j]);
  }

  /// W0 += alpha * dw, each sum computed in double and rounded to the storage type (once for
  /// f64/f32; bf16 and f16 round through float, i.e. twice).
  template <compute_scalar T>
  void add_to_weight(matrix_view<const T> dw, double alpha) {
    detail::expect_shape("dense::add_to_weight", "dw", dw, out_features(), in_features());
    for (index i = 0; i < out_features(); ++i) {
      S* r = weight_.row(i);
      for (index j = 0; j < in_features(); ++j) {
        r[j] = convert<S>(convert<double>(r[j]) + alpha * static_cast<double>(dw(i, j)));
      }
    }
  }

  /// b0 += alpha * db (db has out_features values). A base without bias gets a zero bias first.
  template <compute_scalar T>
  void add_to_bias(const T* db, double alpha) {
    if (bias_.empty()) bias_.assign(static_cast<std::size_t>(out_features()), convert<S>(0.0));
    for (index j = 0; j < out_features(); ++j) {
      auto& b = bias_[static_cast<std::size_t>(j)];
      b = convert<S>(convert<double>(b) + alpha * static_cast<double>(db[j]));
    }
  }

 private:
  matrix<S> weight_;
  std::vector<S> bias_;
};

static_assert(mutable_base_weight<dense<float>>);
static_assert(mutable_base_weight<dense<bf16>>);
static_assert(fused_base_weight<dense<float>, float> && fused_base_weight<dense<bf16>, double>);

}  // namespace peft
