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

#include "peft/base/detail/block_quantized.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/quantized.hpp"

namespace peft {

class q4_k : public detail::block_quantized<q4_k, formats::block_q4_k, formats::q4_k_block_size> {
  using base = detail::block_quantized<q4_k, formats::block_q4_k, formats::q4_k_block_size>;
  friend base;
  friend detail::quantized_linear<q4_k>;

 public:
  static constexpr std::string_view name = "q4_k";

  q4_k() = default;
  // quantize() throws format_error for a super-block scale beyond fp16's range (|w| above about 4e6).

 private:
  using base::base;

  static bool quantize_block(const float* x, block_type& out) noexcept { return formats::quantize_q4_k_block(x, out); }
  template <class T>
  static void decode_block(const block_type& b, T* out) noexcept {
    formats::decode_q4_k_block(b, out);
  }
  static void dot(kernels::isa which, const block_type* b, index nb, index n, const float* x, index ldx, index m,
                  float* y, index ldy) {
    kernels::q4_k_dot(which, b, nb, n, x, ldx, m, y, ldy);
  }
  static void decode_row(const block_type* b, index nb, float* out) noexcept { kernels::decode_q4_k_row(b, nb, out); }
};

static_assert(mutable_base_weight<q4_k>);
static_assert(fused_base_weight<q4_k, float> && fused_base_weight<q4_k, double>);

}  // namespace peft
