// peft/base/q6_k.hpp — a frozen weight in ggml's Q6_K format: 6.5625 bits per weight.
//
//   auto w = peft::q6_k::quantize(weight_view, bias_ptr);   // weight (out, in)
//   w.matmul(x, y);   // y = x W0^T + b0, blocks decoded in registers
//
// Layout (ggml block_q6_K; formats::block_q6_k, the packing of its codes and the quantization
// rule are in base/formats/q6_k.hpp): each row is split into super-blocks of 256 consecutive
// weights, each 16 sub-blocks of 16 with a signed 8-bit scale; a super-block is 192 bytes of
// 6-bit codes, the 16 scales and the fp16 d; W0 = d scale (q - 32). A row whose in_features is
// not a multiple of 256 is padded with zeros to whole blocks (ggml requires whole blocks; the
// padding quantizes to q = 32 or to a zero scale, i.e. exactly 0, and counts in
// storage_bytes(), so rows much shorter than 256 waste most of their blocks).
//
// Quantization follows ggml's quantize_row_q6_K_ref (no importance matrix) on the row rounded to
// f32, bit for bit: a search fits each sub-block's scale, which is then coded on 8 bits against
// the block's fp16 d. Round trip: every element is on its sub-block's grid d scale (q - 32)
// (q = 0..63), within |d scale| / 2 (times 1 + 1e-5) of its value when that lies within the
// grid's range (-32.5 to 31.5 steps), else at the nearer end (a sub-block whose scale codes to 0
// decodes to 0); on uniform data the error is about 1.7% of the weights' RMS. The bias is kept
// in f32.
// Merging (add_to_weight) re-quantizes each row: lossy.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/base/detail/block_quantized.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/quantized.hpp"

namespace peft {

class q6_k : public detail::block_quantized<q6_k, formats::block_q6_k, formats::q6_k_block_size> {
  using base = detail::block_quantized<q6_k, formats::block_q6_k, formats::q6_k_block_size>;
  friend base;
  friend detail::quantized_linear<q6_k>;

 public:
  static constexpr std::string_view name = "q6_k";

  q6_k() = default;
  // quantize() throws format_error for a super-block scale beyond fp16's range (|w| above about 2.7e8).

 private:
  using base::base;

  static bool quantize_block(const float* x, block_type& out) noexcept { return formats::quantize_q6_k_block(x, out); }
  template <class T>
  static void decode_block(const block_type& b, T* out) noexcept {
    formats::decode_q6_k_block(b, out);
  }
  static void dot(kernels::isa which, const block_type* b, index nb, index n, const float* x, index ldx, index m,
                  float* y, index ldy) {
    kernels::q6_k_dot(which, b, nb, n, x, ldx, m, y, ldy);
  }
  static void decode_row(const block_type* b, index nb, float* out) noexcept { kernels::decode_q6_k_row(b, nb, out); }
};

static_assert(mutable_base_weight<q6_k>);
static_assert(fused_base_weight<q6_k, float> && fused_base_weight<q6_k, double>);

}  // namespace peft
