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

#include "peft/base/detail/block_quantized.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/quantized.hpp"

namespace peft {

class q8_0 : public detail::block_quantized<q8_0, formats::block_q8_0, formats::q8_0_block_size> {
  using base = detail::block_quantized<q8_0, formats::block_q8_0, formats::q8_0_block_size>;
  friend base;
  friend detail::quantized_linear<q8_0>;

 public:
  static constexpr std::string_view name = "q8_0";

  q8_0() = default;
  // quantize() throws format_error for a scale d beyond fp16's range (|w| above about 8.3e6).

 private:
  using base::base;

  static bool quantize_block(const float* x, block_type& out) noexcept { return formats::quantize_q8_0_block(x, out); }
  template <class T>
  static void decode_block(const block_type& b, T* out) noexcept {
    formats::decode_q8_0_block(b, out);
  }
  static void dot(kernels::isa which, const block_type* b, index nb, index n, const float* x, index ldx, index m,
                  float* y, index ldy) {
    kernels::q8_0_dot(which, b, nb, n, x, ldx, m, y, ldy);
  }
  static void decode_row(const block_type* b, index nb, float* out) noexcept { kernels::decode_q8_0_row(b, nb, out); }
};

static_assert(mutable_base_weight<q8_0>);
static_assert(fused_base_weight<q8_0, float> && fused_base_weight<q8_0, double>);

}  // namespace peft
