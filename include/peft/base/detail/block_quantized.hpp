// peft/base/detail/block_quantized.hpp — what ggml's block formats (q4_0, q8_0, q4_k, q6_k)
// share as frozen bases: rows split into whole blocks (padded with zeros), stored row-major in a
// vector, quantized and decoded block by block, multiplied by the format's dot kernel.
//
// A format derives from block_quantized<Format, Block, BlockSize> and provides (privately, with
// the base as a friend):
//   static constexpr std::string_view name;
//   static bool quantize_block(const float* x, Block& out);        ggml's *_ref rule; false when
//                                                                  a scale overflows fp16
//   template <class T> static void decode_block(const Block&, T* out);   exact
//   static void dot(isa, const Block*, index nb, index n, const float* x, index ldx, index m,
//                   float* y, index ldy);                          kernels::*_dot
//   static void decode_row(const Block*, index nb, float* out);    kernels::decode_*_row
// and a private constructor forwarding to block_quantized's (using base::base).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/base/detail/quantized_common.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/isa.hpp"

namespace peft::detail {

template <class Format, class Block, index BlockSize>
class block_quantized : public quantized_linear<Format> {
  using linear = quantized_linear<Format>;
  friend linear;

 public:
  using block_type = Block;
  static constexpr index block_size = BlockSize;

  /// Quantizes a weight (out, in) and an optional bias of `out` values (nullptr: none).
  /// Throws shape_error for an empty weight, format_error for non-finite values and for a
  /// block scale beyond fp16's range.
  template <class U>
  static Format quantize(matrix_view<const U> weight, const U* bias = nullptr) {
    check_quantizable(quantized_where(Format::name, "quantize"), weight, bias);
    Format w(weight.rows(), weight.cols(), linear::bias_from(bias, weight.rows()));
    std::vector<float> row(static_cast<std::size_t>(w.padded_in()), 0.0f);
    for (index i = 0; i < weight.rows(); ++i) {
      linear::row_to_f32(weight, i, row.data());
      w.quantize_row(i, row.data());
    }
    return w;
  }

  /// Blocks per row: ceil(in / block_size).
  index blocks_per_row() const noexcept { return (this->in_ + block_size - 1) / block_size; }

  /// Bytes of the quantized weight: out * blocks_per_row() blocks (bias excluded).
  std::size_t storage_bytes() const noexcept { return blocks_.size() * sizeof(Block); }

  /// The blocks, row-major: row i's blocks are [i * blocks_per_row(), (i + 1) * blocks_per_row()).
  const std::vector<Block>& blocks() const noexcept { return blocks_; }

  /// out[0..in) = W0[i, :] (computed in double, rounded to T once).
  template <compute_scalar T>
  void dequantize_row(index i, T* out) const {
    this->check_row("dequantize_row", i);
    const index nb = blocks_per_row();
    T w[block_size];
    for (index b = 0; b < nb; ++b) {
      Format::decode_block(blocks_[static_cast<std::size_t>(i * nb + b)], w);
      const index n = std::min(block_size, this->in_ - b * block_size);
      std::copy(w, w + n, out + b * block_size);
    }
  }

 protected:
  block_quantized() = default;
  block_quantized(index out, index in, std::vector<float> bias)
      : linear(out, in, std::move(bias)),
        blocks_(static_cast<std::size_t>(out * ((in + block_size - 1) / block_size))) {}

 private:
  index padded_in() const noexcept { return blocks_per_row() * block_size; }
  bool has_dot() const noexcept { return true; }

  void dot_rows(kernels::isa which, index j0, index n, const float* x, index ldx, index m, float* y, index ldy,
                std::vector<float>& /*scratch*/) const {
    const index nb = blocks_per_row();
    Format::dot(which, blocks_.data() + j0 * nb, nb, n, x, ldx, m, y, ldy);
  }

  template <class T>
  void decode_rows(index j0, index n, T* out, index ld) const {
    const index nb = blocks_per_row();
    for (index j = 0; j < n; ++j) {
      const Block* b = blocks_.data() + (j0 + j) * nb;
      if constexpr (std::is_same_v<T, float>) {
        Format::decode_row(b, nb, out + j * ld);
      } else {
        for (index k = 0; k < nb; ++k) Format::decode_block(b[k], out + j * ld + k * block_size);
      }
    }
  }

  /// The format's quantization rule on row[0..in) (zeros beyond).
  void quantize_row(index i, const float* row) {
    const index nb = blocks_per_row();
    for (index b = 0; b < nb; ++b) {
      float x[block_size];  // up to 1 KiB
      for (index k = 0; k < block_size; ++k) {
        const index c = b * block_size + k;
        x[k] = c < this->in_ ? row[c] : 0.0f;
      }
      if (!Format::quantize_block(x, blocks_[static_cast<std::size_t>(i * nb + b)])) {
        float amax = 0.0f;
        for (float v : x) amax = std::max(amax, std::abs(v));
        std::string msg = "row ";
        msg += std::to_string(i);
        msg += " has a block scale beyond fp16's range (|w| up to ";
        msg += std::to_string(amax);
        msg += ')';
        raise<format_error>(quantized_where(Format::name, "quantize"), msg);
      }
    }
  }

  std::vector<Block> blocks_;  // (out, blocks_per_row())
};

}  // namespace peft::detail
