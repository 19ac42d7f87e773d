// peft/core/base_weight.hpp — the concept every frozen weight policy satisfies.
//
// A base weight is W0 (out_features, in_features) in PyTorch's nn.Linear layout, plus an
// optional bias b0, stored however the policy likes (dense f32/bf16/f16, quantized blocks).
// Adapters only touch it through these operations, for both compute scalars:
//   matmul(x, y)           y = x W0^T + b0          x (batch, in), y (batch, out), overwritten
//   matmul_t(dy, dx, acc)  dx = dy W0 (+ dx if acc)  dy (batch, out), dx (batch, in)
//   dequantize_row(i, r)   r[0..in) = W0[i, :]       for references, norms and merging
//   bias_value(j)          b0[j] (0 when there is no bias)
#pragma once

#include <concepts>
#include <type_traits>
#include <utility>

#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft {

template <class B>
concept base_weight = requires(const B& b, index i, matrix_view<const float> xf,
                               matrix_view<float> yf, matrix_view<const double> xd,
                               matrix_view<double> yd, float* rf, double* rd) {
  { b.out_features() } -> std::convertible_to<index>;
  { b.in_features() } -> std::convertible_to<index>;
  { b.has_bias() } -> std::convertible_to<bool>;
  b.matmul(xf, yf);
  b.matmul(xd, yd);
  b.matmul_t(xf, yf, true);
  b.matmul_t(xd, yd, true);
  b.dequantize_row(i, rf);
  b.dequantize_row(i, rd);
  { b.template bias_value<double>(i) } -> std::convertible_to<double>;
};

/// W0 decoded row by row into an (out, in) matrix of S: for decompositions, norms and merges
/// (a copy in memory; products go through matmul).
template <class S, base_weight B>
matrix<S> dequantized_weight(const B& b) {
  matrix<S> w(b.out_features(), b.in_features());
  for (index i = 0; i < w.rows(); ++i) b.dequantize_row(i, w.row(i));
  return w;
}

/// A base whose weight can be changed in place (merging adapters into it).
template <class B>
concept mutable_base_weight = base_weight<B> && requires(B& b, matrix_view<const double> dd,
                                                         matrix_view<const float> df,
                                                         const double* bd, const float* bf) {
  b.add_to_weight(dd, 1.0);
  b.add_to_weight(df, 1.0);
  b.add_to_bias(bd, 1.0);
  b.add_to_bias(bf, 1.0);
};

/// A base stored densely with writable storage (dense<S>): weight() and mutable_weight() are
/// views of W0 in its storage type. SHiRA's in-place switching and fused serving write into it.
template <class B>
concept dense_storage_base = mutable_base_weight<B> && requires(B& b, const B& cb) {
  b.mutable_weight().data();
  cb.weight().data();
};

/// The storage scalar of a dense_storage_base.
template <dense_storage_base B>
using storage_scalar_of = std::remove_cvref_t<decltype(*std::declval<B&>().mutable_weight().data())>;

}  // namespace peft
