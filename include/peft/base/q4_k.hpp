// peft/base/q4_k.hpp — a frozen weight in ggml's Q4_K format: 4.5 bits per weight.
//
//   auto w = peft::q4_k::quantize(weight_view, bias_ptr);   // weight (out, in)
//   w.matmul(x, y);   // y = x W0^T + b0, blocks decoded in registers
//
// Layout (ggml block_q4_K; formats::block_q4_k, the packing of its codes and the quantization
// rule are in base/formats/q4_k.hpp): each row is split into super-blocks of 256 consecutive
// weights, each 8 sub-blocks of 32 with a 6-bit scale code sc and min code m; a super-block is
// the fp16 d and dmin, 12 bytes of codes and 128 bytes of 4-bit weights;
// W0 = d sc q - dmin m. A row whose in_features is not a multiple of 256 is padded with zeros to
// whole blocks (ggml requires whole blocks; the padding counts in storage_bytes(), so rows much
// shorter than 256 waste most of their blocks). The padding takes part in the fit of its
// sub-block: a sub-block of padding alone decodes to exactly 0, padding that shares a sub-block
// with weights decodes to a level of its grid (never read: the products see x = 0 there).
//
// Quantization follows ggml's quantize_row_q4_K_ref (no importance matrix) on the row rounded to
// f32, bit for bit: a weighted least-squares search fits each sub-block's scale and min, which
// are then coded on 6 bits against the block's fp16 d and dmin. Round trip: every element is on
// its sub-block's grid d sc q - dmin m (q = 0..15), within d sc / 2 (times 1 + 1e-5) of its
// value when that lies in the grid's range [-dmin m, 15 d sc - dmin m], else at the nearer end
// (the search may clip a sub-block's extremes); on uniform data the error is about 7% of the
// weights' RMS. The bias is kept in f32.
// Merging (add_to_weight) re-quantizes each row: lossy.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/base/detail/quantized_common.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/quantized.hpp"

namespace peft {

class q4_k : public detail::quantized_linear<q4_k> {
  using base = detail::quantized_linear<q4_k>;
  friend base;

 public:
  static constexpr std::string_view name = "q4_k";
  using block_type = formats::block_q4_k;
  static constexpr index block_size = formats::q4_k_block_size;

  q4_k() = default;

  /// Quantizes a weight (out, in) and an optional bias of `out` values (nullptr: none).
  /// Throws shape_error for an empty weight, format_error for non-finite values and for a
  /// super-block scale beyond fp16's range (|w| above about 4e6).
  template <class U>
  static q4_k quantize(matrix_view<const U> weight, const U* bias = nullptr) {
    detail::check_quantizable(detail::quantized_where(name, "quantize"), weight, bias);
    q4_k w(weight.rows(), weight.cols(), bias_from(bias, weight.rows()));
    std::vector<float> row(static_cast<std::size_t>(w.padded_in()), 0.0f);
    for (index i = 0; i < weight.rows(); ++i) {
      row_to_f32(weight, i, row.data());
      w.quantize_row(i, row.data());
    }
    return w;
  }

  /// Blocks per row: ceil(in / 256).
  index blocks_per_row() const noexcept { return (in_ + block_size - 1) / block_size; }

  /// Bytes of the quantized weight: out * ceil(in / 256) blocks of 144 bytes (bias excluded).
  std::size_t storage_bytes() const noexcept { return blocks_.size() * sizeof(block_type); }

  /// The blocks, row-major: row i's blocks are [i * blocks_per_row(), (i + 1) * blocks_per_row()).
  const std::vector<block_type>& blocks() const noexcept { return blocks_; }

  /// out[0..in) = W0[i, :] (computed in double, rounded to T once).
  template <compute_scalar T>
  void dequantize_row(index i, T* out) const {
    check_row("dequantize_row", i);
    const index nb = blocks_per_row();
    T w[block_size];
    for (index b = 0; b < nb; ++b) {
      formats::decode_q4_k_block(blocks_[static_cast<std::size_t>(i * nb + b)], w);
      const index n = std::min(block_size, in_ - b * block_size);
      std::copy(w, w + n, out + b * block_size);
    }
  }

 private:
  q4_k(index out, index in, std::vector<float> bias)
      : base(out, in, std::move(bias)),
        blocks_(static_cast<std::size_t>(out * ((in + block_size - 1) / block_size))) {}

  index padded_in() const noexcept { return blocks_per_row() * block_size; }
  bool has_dot() const noexcept { return true; }

  void dot_rows(kernels::isa which, index j0, index n, const float* x, index ldx, index m,
                float* y, index ldy, std::vector<float>& /*scratch*/) const {
    const index nb = blocks_per_row();
    kernels::q4_k_dot(which, blocks_.data() + j0 * nb, nb, n, x, ldx, m, y, ldy);
  }

  template <class T>
  void decode_rows(index j0, index n, T* out, index ld) const {
    const index nb = blocks_per_row();
    for (index j = 0; j < n; ++j) {
      const block_type* b = blocks_.data() + (j0 + j) * nb;
      if constexpr (std::is_same_v<T, float>) {
        kernels::decode_q4_k_row(b, nb, out + j * ld);
      } else {
        for (index k = 0; k < nb; ++k) formats::decode_q4_k_block(b[k], out + j * ld + k * block_size);
      }
    }
  }

  /// ggml's quantize_row_q4_K_ref on row[0..in) (zeros beyond).
  void quantize_row(index i, const float* row) {
    const index nb = blocks_per_row();
    for (index b = 0; b < nb; ++b) {
      float x[block_size];  // 1 KiB
      for (index k = 0; k < block_size; ++k) {
        const index c = b * block_size + k;
        x[k] = c < in_ ? row[c] : 0.0f;
      }
      if (!formats::quantize_q4_k_block(x, blocks_[static_cast<std::size_t>(i * nb + b)])) {
        float amax = 0.0f;
        for (float v : x) amax = std::max(amax, std::abs(v));
        std::string msg = "row ";
        msg += std::to_string(i);
        msg += " has a block scale beyond fp16's range (|w| up to ";
        msg += std::to_string(amax);
        msg += ')';
        detail::raise<format_error>(detail::quantized_where(name, "quantize"), msg);
      }
    }
  }

  std::vector<block_type> blocks_;  // (out, ceil(in / 256))
};

static_assert(mutable_base_weight<q4_k>);
static_assert(fused_base_weight<q4_k, float> && fused_base_weight<q4_k, double>);

}  // namespace peft
