// peft/base/formats/q4_0.hpp — ggml's Q4_0 block format: one place for its layout and its rule.
//
//   formats::block_q4_0 b;
//   bool ok = formats::quantize_q4_0_block(x, b);   // x[0..32): ggml's quantize_row_q4_0_ref
//   formats::decode_q4_0_block(b, out);             // out[0..32) = (q - 8) * d
//
// A block is 32 consecutive weights of a row: the fp16 scale d, then 16 bytes, byte i holding
// weight i in its low nibble and weight i + 16 in its high nibble (18 bytes, as ggml stores it).
// Quantization on f32 values: max = the value of largest magnitude (the first one on ties),
// d = max / -8, id = 1 / d (0 when d == 0), q = min(15, (int)(w * id + 8.5)) in f32 arithmetic,
// and d stored rounded to fp16 (nearest even).
//
// Formats are a leaf layer beside core/: they depend on core/ only, and both the base policy
// (base/q4_0.hpp) and the kernels (kernels/*/quantized.hpp) include them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "peft/core/dtype.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::formats {

/// Weights per q4_0 block (ggml's QK4_0).
inline constexpr index q4_0_block_size = 32;

/// One q4_0 block, ggml's block_q4_0: the fp16 scale d, then 16 bytes of packed 4-bit codes.
struct block_q4_0 {
  std::uint16_t d;       // IEEE binary16 bits
  std::uint8_t qs[16];   // qs[i] & 15: weight i, qs[i] >> 4: weight i + 16
};
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must match ggml's 18-byte layout");

/// fp16 bits to float (exact).
inline float half_to_float(std::uint16_t bits) noexcept {
  return static_cast<float>(f16::from_bits(bits));
}

/// ggml's quantize_row_q4_0_ref on one block x[0..32) (pad a partial block with zeros). Returns
/// false, leaving `out` unchanged, when the scale d is beyond fp16's range (|w| above ~5.2e5).
inline bool quantize_q4_0_block(const float* x, block_q4_0& out) noexcept {
  float amax = 0.0f;
  float max = 0.0f;
  for (index k = 0; k < q4_0_block_size; ++k) {
    if (amax < std::abs(x[k])) {
      amax = std::abs(x[k]);
      max = x[k];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const f16 dh(d);
  if (!std::isfinite(static_cast<float>(dh))) return false;
  out.d = dh.bits;
  for (int k = 0; k < 16; ++k) {
    // volatile: the product is rounded to f32 before the add, as in ggml (no FMA contraction).
    volatile float p0 = x[k] * id;
    volatile float p1 = x[k + 16] * id;
    const int q0 = std::min(15, static_cast<int>(static_cast<float>(p0) + 8.5f));
    const int q1 = std::min(15, static_cast<int>(static_cast<float>(p1) + 8.5f));
    out.qs[k] = static_cast<std::uint8_t>(q0 | (q1 << 4));
  }
  return true;
}

/// out[0..32) = the 32 weights of a block, (q - 8) * d computed in double and rounded to T
/// (exact in f32 and f64).
template <class T>
void decode_q4_0_block(const block_q4_0& b, T* out) noexcept {
  const double d = half_to_float(b.d);
  for (int i = 0; i < 16; ++i) {
    out[i] = static_cast<T>((static_cast<int>(b.qs[i] & 15) - 8) * d);
    out[i + 16] = static_cast<T>((static_cast<int>(b.qs[i] >> 4) - 8) * d);
  }
}

}  // namespace peft::formats
