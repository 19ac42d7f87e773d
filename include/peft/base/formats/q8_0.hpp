// peft/base/formats/q8_0.hpp — ggml's Q8_0 block format: one place for its layout and its rule.
//
//   formats::block_q8_0 b;
//   bool ok = formats::quantize_q8_0_block(x, b);   // x[0..32): ggml's quantize_row_q8_0_ref
//   formats::decode_q8_0_block(b, out);             // out[0..32) = q * d
//
// A block is 32 consecutive weights of a row: the fp16 scale d, then 32 signed bytes, byte i
// holding weight i (34 bytes, as ggml stores it).
// Quantization on f32 values: amax = max |w|, d = amax / 127, id = 1 / d (0 when d == 0),
// q = round(w * id) (halves away from zero) in f32 arithmetic, and d stored rounded to fp16
// (nearest even). A weight is within |d| / 2 of q * d, plus 127 times the fp16 rounding of d.
//
// Formats are a leaf layer beside core/: they depend on core/ only, and both the base policy
// (base/q8_0.hpp) and the kernels (kernels/*/quantized.hpp) include them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "peft/base/formats/detail/ggml_arithmetic.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::formats {

/// Weights per q8_0 block (ggml's QK8_0).
inline constexpr index q8_0_block_size = 32;

/// One q8_0 block, ggml's block_q8_0: the fp16 scale d, then 32 signed 8-bit codes.
struct block_q8_0 {
  std::uint16_t d;       // IEEE binary16 bits
  std::int8_t qs[32];    // qs[i]: weight i
};
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must match ggml's 34-byte layout");

/// ggml's quantize_row_q8_0_ref on one block x[0..32) (pad a partial block with zeros). Returns
/// false, leaving `out` unchanged, when the scale d is beyond fp16's range (|w| above ~8.3e6).
inline bool quantize_q8_0_block(const float* x, block_q8_0& out) noexcept {
  float amax = 0.0f;
  for (index k = 0; k < q8_0_block_size; ++k) amax = std::max(amax, std::abs(x[k]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  block_q8_0 b;
  if (!detail::to_fp16(d, b.d)) return false;
  for (index k = 0; k < q8_0_block_size; ++k) {
    const float r = std::round(x[k] * id);
    // Only a subnormal d (|w| below ~1e-36) makes id infinite; ggml's x86 build stores 0 then,
    // and the fp16 d is 0 whatever the codes.
    b.qs[k] = std::isfinite(r) ? static_cast<std::int8_t>(std::clamp(r, -128.0f, 127.0f)) : std::int8_t{0};
  }
  out = b;
  return true;
}

/// out[0..32) = the 32 weights of a block, q * d computed in double and rounded to T (exact in
/// f32 and f64).
template <class T>
void decode_q8_0_block(const block_q8_0& b, T* out) noexcept {
  const double d = half_to_float(b.d);
  for (int i = 0; i < 32; ++i) out[i] = static_cast<T>(b.qs[i] * d);
}

}  // namespace peft::formats
