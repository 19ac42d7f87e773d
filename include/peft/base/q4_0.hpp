// peft/base/q4_0.hpp — a frozen weight in ggml's Q4_0 format: 4.5 bits per weight.
//
//   auto w = peft::q4_0::quantize(weight_view, bias_ptr);   // weight (out, in)
//   w.matmul(x, y);   // y = x W0^T + b0, blocks decoded in registers
//
// Layout (ggml block_q4_0; formats::block_q4_0 and the quantization rule are in
// base/formats/q4_0.hpp): each row is split into blocks of 32 consecutive weights; a block is
// the fp16 scale d and 16 bytes, byte i holding weight i in its low nibble and weight i + 16 in
// its high nibble; W0 = (q - 8) * d. A row whose in_features is not a multiple of 32 is padded
// with zeros to whole blocks (ggml requires whole blocks; the padding quantizes to q = 8, i.e.
// exactly 0, and counts in storage_bytes()).
//
// Quantization follows ggml's quantize_row_q4_0_ref on the row rounded to f32: max = the value
// of largest magnitude (the first one on ties), d = max / -8, id = 1 / d (0 when d == 0),
// q = min(15, (int)(w * id + 8.5)) in f32 arithmetic, and d is stored rounded to fp16 (nearest
// even). An element is within |d| / 2 of its value (plus the fp16 rounding of d, up to
// 8 |d| 2^-11) except when w * id > 7.5 (values of the sign opposite to max near its magnitude),
// which clamp to q = 15 and are within |d|. The bias is kept in f32.
// Merging (add_to_weight) re-quantizes each row: lossy.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/base/detail/block_quantized.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/quantized.hpp"

namespace peft {

class q4_0 : public detail::block_quantized<q4_0, formats::block_q4_0, formats::q4_0_block_size> {
  using base = detail::block_quantized<q4_0, formats::block_q4_0, formats::q4_0_block_size>;
  friend base;
  friend detail::quantized_linear<q4_0>;

 public:
  static constexpr std::string_view name = "q4_0";

  q4_0() = default;
  // quantize() throws format_error for a scale d beyond fp16's range (|w| above about 5.2e5).

 private:
  using base::base;

  static bool quantize_block(const float* x, block_type& out) noexcept { return formats::quantize_q4_0_block(x, out); }
  template <class T>
  static void decode_block(const block_type& b, T* out) noexcept {
    formats::decode_q4_0_block(b, out);
  }
  static void dot(kernels::isa which, const block_type* b, index nb, index n, const float* x, index ldx, index m,
                  float* y, index ldy) {
    kernels::q4_0_dot(which, b, nb, n, x, ldx, m, y, ldy);
  }
  static void decode_row(const block_type* b, index nb, float* out) noexcept { kernels::decode_q4_0_row(b, nb, out); }
};

static_assert(mutable_base_weight<q4_0>);
static_assert(fused_base_weight<q4_0, float> && fused_base_weight<q4_0, double>);

}  // namespace peft
