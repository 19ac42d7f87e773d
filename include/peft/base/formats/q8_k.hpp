// peft/base/formats/q8_k.hpp — 8-bit activations for the integer dot kernels
// (kernels/quantized_int8.hpp): ggml's Q8_K block, and ggml's run-time Q8_0 activation rule.
//
//   formats::block_q8_k a;
//   formats::quantize_q8_k_block(x, a);          // x[0..256): ggml's quantize_row_q8_K_ref
//   formats::block_q8_0 b;
//   formats::quantize_q8_0_activations(x, b);    // x[0..32): ggml's x86 quantize_row_q8_0
//
// Q8_K is ggml's activation format for the K-quants (q4_k, q6_k weights): 256 consecutive values
// of a row, the f32 scale d, 256 signed bytes (value i in byte i) and the 16 sums of the codes in
// groups of 16 (292 bytes, ggml's block_q8_K); a value decodes to d q. It is never stored in a
// model file, only made from the activations just before a product.
// Quantization, in f32: max = the value of largest magnitude (the first on ties); a block whose
// max is 0 is all zeros (d = 0, codes 0, sums 0); otherwise iscale = -127 / max,
// q = min(127, round(iscale x)) (ties to even), d = 1 / iscale. The codes are in [-127, 127];
// a value is within |d| / 2 of d q. (ggml once used -128 / max; the current rule is -127 / max.)
//
// Q8_0 activations (for q8_0 and q4_0 weights) are block_q8_0 (base/formats/q8_0.hpp). ggml
// quantizes them with quantize_row_q8_0, whose x86 build (AVX, AVX2: what llama.cpp runs on
// x86-64) is not its reference rule quantize_row_q8_0_ref (= formats::quantize_q8_0_block):
// amax = max |x|, d = amax / 127 stored rounded to fp16, but the codes are round(x * (127 / amax))
// with ties to even, where the reference rounds x * (1 / d) with halves away from zero. The two
// differ by one in a code now and then (a tie, or 127 / amax and 1 / (amax / 127) rounding
// apart); quantize_q8_0_activations follows the x86 rule, so its blocks are the ones llama.cpp
// multiplies on x86-64 (ggml's scalar fallback uses the reference rule, its Arm build its own).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "peft/base/formats/detail/ggml_arithmetic.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::formats {

/// Values per q8_k block (ggml's QK_K).
inline constexpr index q8_k_block_size = 256;

/// One q8_k block, ggml's block_q8_K.
struct block_q8_k {
  float d;                   // the scale: value i is d qs[i]
  std::int8_t qs[256];       // codes, -127..127
  std::int16_t bsums[16];    // bsums[g] = sum of qs[16 g .. 16 g + 16)
};
static_assert(sizeof(block_q8_k) == 292, "block_q8_k must match ggml's 292-byte layout");

/// ggml's quantize_row_q8_K_ref on one block x[0..256) (pad a partial block with zeros).
inline void quantize_q8_k_block(const float* x, block_q8_k& out) noexcept {
  float amax = 0.0f;
  float max = 0.0f;
  for (index k = 0; k < q8_k_block_size; ++k) {
    if (std::abs(x[k]) > amax) {
      amax = std::abs(x[k]);
      max = x[k];
    }
  }
  if (amax == 0.0f) {  // ggml leaves bsums as they were here; they are zero in ours
    out = block_q8_k{};
    return;
  }
  const float iscale = -127.0f / max;
  for (index k = 0; k < q8_k_block_size; ++k) {
    // Within [-127, 127] whenever iscale is finite (|max| above ~3.7e-37); the clamp only keeps
    // an infinite iscale from wrapping around.
    out.qs[k] = static_cast<std::int8_t>(std::clamp(detail::nearest_int(iscale * x[k]), -128, 127));
  }
  for (int g = 0; g < 16; ++g) {
    int sum = 0;
    for (int i = 0; i < 16; ++i) sum += out.qs[16 * g + i];
    out.bsums[g] = static_cast<std::int16_t>(sum);
  }
  out.d = 1.0f / iscale;
}

/// out[0..256) = d q, the values of a block: exact in f64, rounded once in f32 (ggml's
/// dequantize_row_q8_K).
template <class T>
void decode_q8_k_block(const block_q8_k& b, T* out) noexcept {
  for (int i = 0; i < 256; ++i) out[i] = static_cast<T>(static_cast<double>(b.d) * b.qs[i]);
}

/// ggml's x86 (AVX, AVX2) quantize_row_q8_0 on one block x[0..32) of activations (pad a partial
/// block with zeros): see the file comment. A d beyond fp16's range (|x| above ~8.3e6) is stored
/// as infinity, as ggml stores it.
inline void quantize_q8_0_activations(const float* x, block_q8_0& out) noexcept {
  float amax = 0.0f;
  for (index k = 0; k < q8_0_block_size; ++k) amax = std::max(amax, std::abs(x[k]));
  out.d = f16(amax / 127.0f).bits;
  const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
  for (index k = 0; k < q8_0_block_size; ++k) {
    const float r = std::nearbyint(x[k] * id);  // the default rounding mode: ties to even
    out.qs[k] = static_cast<std::int8_t>(std::clamp(r, -128.0f, 127.0f));
  }
}

}  // namespace peft::formats
