// peft/base/q8_0.hpp — a frozen weight in ggml's Q8_0 format: 8.5 bits per weight.
//
//   auto w = peft::q8_0::quantize(weight_view, bias_ptr);   // weight (out, in)
//   w.matmul(x, y);   // y = x W0^T + b0, blocks decoded in registers
//
// Layout (ggml block_q8_0; formats::block_q8_0 and the quantization rule are in
// base/formats/q8_0.hpp): each row is split into blocks of 32 consecutive weights; a block is
// the fp16 scale d and 32 signed bytes, byte i holding weight i; W0 = q * d. A row whose
// in_features is not a multiple of 32 is padded with zeros to whole blocks (ggml requires whole
// blocks; the padding quantizes to q = 0, i.e. exactly 0, and counts in storage_bytes()).
//
// Quantization follows ggml's quantize_row_q8_0_ref on the row rounded to f32: amax = max |w|
// of the block, d = amax / 127, id = 1 / d (0 when d == 0), q = round(w * id) (halves away from
// zero) in f32 arithmetic, and d is stored rounded to fp16 (nearest even). An element is within
// |d| / 2 of its value (times 1 + 1e-6 for the f32 arithmetic) plus the fp16 rounding of d times
// |q| <= 127 (up to 127 |d| 2^-11). The bias is kept in f32.
// Merging (add_to_weight) re-quantizes each row: lossy.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/base/detail/quantized_common.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/quantized.hpp"

namespace peft {

class q8_0 : public detail::quantized_linear<q8_0> {
  using base = detail::quantized_linear<q8_0>;
  friend base;

 public:
  static constexpr std::string_view name = "q8_0";
  using block_type = formats::block_q8_0;
  static constexpr index block_size = formats::q8_0_block_size;

  q8_0() = default;

  /// Quantizes a weight (out, in) and an optional bias of `out` values (nullptr: none).
  /// Throws shape_error for an empty weight, format_error for non-finite values and for a
  /// scale d beyond fp16's range (|w| above about 8.3e6).
  template <class U>
  static q8_0 quantize(matrix_view<const U> weight, const U* bias = nullptr) {
    detail::check_quantizable(detail::quantized_where(name, "quantize"), weight, bias);
    q8_0 w(weight.rows(), weight.cols(), bias_from(bias, weight.rows()));
    std::vector<float> row(static_cast<std::size_t>(w.padded_in()), 0.0f);
    for (index i = 0; i < weight.rows(); ++i) {
      row_to_f32(weight, i, row.data());
      w.quantize_row(i, row.data());
    }
    return w;
  }

  /// Blocks per row: ceil(in / 32).
  index blocks_per_row() const noexcept { return (in_ + block_size - 1) / block_size; }

  /// Bytes of the quantized weight: out * ceil(in / 32) blocks of 34 bytes (bias excluded).
  std::size_t storage_bytes() const noexcept { return blocks_.size() * sizeof(block_type); }

  /// The blocks, row-major: row i's blocks are [i * blocks_per_row(), (i + 1) * blocks_per_row()).
  const std::vector<block_type>& blocks() const noexcept { return blocks_; }

  /// out[0..in) = W0[i, :] (exact in f32 and f64).
  template <compute_scalar T>
  void dequantize_row(index i, T* out) const {
    check_row("dequantize_row", i);
    const index nb = blocks_per_row();
    T w[block_size];
    for (index b = 0; b < nb; ++b) {
      formats::decode_q8_0_block(blocks_[static_cast<std::size_t>(i * nb + b)], w);
      const index n = std::min(block_size, in_ - b * block_size);
      std::copy(w, w + n, out + b * block_size);
    }
  }

 private:
  q8_0(index out, index in, std::vector<float> bias)
      : base(out, in, std::move(bias)),
        blocks_(static_cast<std::size_t>(out * ((in + block_size - 1) / block_size))) {}

  index padded_in() const noexcept { return blocks_per_row() * block_size; }
  bool has_dot() const noexcept { return true; }

  void dot_rows(kernels::isa which, index j0, index n, const float* x, index ldx, index m,
                float* y, index ldy, std::vector<float>& /*scratch*/) const {
    const index nb = blocks_per_row();
    kernels::q8_0_dot(which, blocks_.data() + j0 * nb, nb, n, x, ldx, m, y, ldy);
  }

  template <class T>
  void decode_rows(index j0, index n, T* out, index ld) const {
    const index nb = blocks_per_row();
    for (index j = 0; j < n; ++j) {
      const block_type* b = blocks_.data() + (j0 + j) * nb;
      if constexpr (std::is_same_v<T, float>) {
        kernels::decode_q8_0_row(b, nb, out + j * ld);
      } else {
        for (index k = 0; k < nb; ++k) formats::decode_q8_0_block(b[k], out + j * ld + k * block_size);
      }
    }
  }

  /// ggml's quantize_row_q8_0_ref on row[0..in) (zeros beyond).
  void quantize_row(index i, const float* row) {
    const index nb = blocks_per_row();
    for (index b = 0; b < nb; ++b) {
      float x[block_size];
      for (index k = 0; k < block_size; ++k) {
        const index c = b * block_size + k;
        x[k] = c < in_ ? row[c] : 0.0f;
      }
      if (!formats::quantize_q8_0_block(x, blocks_[static_cast<std::size_t>(i * nb + b)])) {
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

  std::vector<block_type> blocks_;  // (out, ceil(in / 32))
};

static_assert(mutable_base_weight<q8_0>);
static_assert(fused_base_weight<q8_0, float> && fused_base_weight<q8_0, double>);

}  // namespace peft
