// peft/kernels/arm/neon/quantized_int8.hpp — the NEON integer dot kernels
// (kernels/quantized_int8.hpp) for AArch64 with the dot-product instructions (FEAT_DotProd,
// ARMv8.2: Cortex-A55/A76 and later, Apple M1 and later, Graviton 2 and later): vdotq_s32 adds
// four byte products into each int32 lane, sixteen per instruction. A weight block's codes are
// unpacked once (NEON shifts and masks) to signed bytes and multiplied into up to max_dot_rows
// activation rows; per sub-block the int32 sum is weighted by its scale, then one f32
// multiply-add per block and row, as the reference does (kernels/reference/quantized_int8.hpp
// holds the contract and the arithmetic). Compiled with a function-level "+dotprod" target and
// run only where the CPU reports it (neon::tag::supported()); empty on other architectures.
//
// Range: q4_k codes 0..15, q6_k -32..31, q8_0 and q4_0 (code - 8) are all signed bytes; a
// sub-block's sum stays far below 2^31 (at most 32 * 127 * 127).
#pragma once

#include "peft/kernels/isa.hpp"

#if PEFT_ARM_NEON
#include <arm_neon.h>

#include <cstdint>

#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/base/formats/q8_k.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/detail/quantized_dot.hpp"
#include "peft/kernels/dispatch.hpp"

PEFT_BEGIN_TARGET_NEON_DOTPROD
namespace peft::kernels::neon {

/// sum_i a[i] b[i] over 16 or 32 signed bytes.
inline std::int32_t dot16(const std::int8_t* a, const std::int8_t* b) {
  return vaddvq_s32(vdotq_s32(vdupq_n_s32(0), vld1q_s8(a), vld1q_s8(b)));
}
inline std::int32_t dot32(const std::int8_t* a, const std::int8_t* b) {
  const int32x4_t s = vdotq_s32(vdupq_n_s32(0), vld1q_s8(a), vld1q_s8(b));
  return vaddvq_s32(vdotq_s32(s, vld1q_s8(a + 16), vld1q_s8(b + 16)));
}

/// The 32 codes of 16 packed bytes: low nibbles to out[0..16), high nibbles to out[16..32), minus
/// `offset`.
inline void unpack_nibbles(const std::uint8_t* packed, std::int8_t offset, std::int8_t* out) {
  const uint8x16_t v = vld1q_u8(packed);
  const int8x16_t off = vdupq_n_s8(offset);
  vst1q_s8(out, vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15))), off));
  vst1q_s8(out + 16, vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), off));
}

template <int M>
void q4_k_q8_k_dot_rows(const formats::block_q4_k* w, index nb, index n, const formats::block_q8_k* x,
                        index ldx, float* y, index ldy) {
  alignas(16) std::int8_t q[256];
  for (index j = 0; j < n; ++j) {
    float acc[M] = {};
    for (index b = 0; b < nb; ++b) {
      const formats::block_q4_k& wb = w[j * nb + b];
      std::uint8_t sc[8], mn[8];
      formats::q4_k_scale_mins(wb, sc, mn);
      // 32 bytes per chunk c: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
      for (int c = 0; c < 4; ++c) {
        for (int h = 0; h < 2; ++h) {
          const uint8x16_t v = vld1q_u8(wb.qs + 32 * c + 16 * h);
          vst1q_s8(q + 64 * c + 16 * h, vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15))));
          vst1q_s8(q + 64 * c + 32 + 16 * h, vreinterpretq_s8_u8(vshrq_n_u8(v, 4)));
        }
      }
      const float dw = formats::half_to_float(wb.d);
      const float dminw = formats::half_to_float(wb.dmin);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_k& xb = x[r * ldx + b];
        std::int32_t dots = 0, mins = 0;
        for (int s = 0; s < 8; ++s) {
          dots += sc[s] * dot32(q + 32 * s, xb.qs + 32 * s);
          mins += mn[s] * (xb.bsums[2 * s] + xb.bsums[2 * s + 1]);
        }
        acc[r] += (xb.d * dw) * static_cast<float>(dots) + (-xb.d * dminw) * static_cast<float>(mins);
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = acc[r];
  }
}

template <int M>
void q6_k_q8_k_dot_rows(const formats::block_q6_k* w, index nb, index n, const formats::block_q8_k* x,
                        index ldx, float* y, index ldy) {
  alignas(16) std::int8_t q[256];
  const uint8x16_t low4 = vdupq_n_u8(15), two = vdupq_n_u8(3);
  const int8x16_t bias = vdupq_n_s8(32);
  for (index j = 0; j < n; ++j) {
    float acc[M] = {};
    for (index b = 0; b < nb; ++b) {
      const formats::block_q6_k& wb = w[j * nb + b];
      // Each half h: 64 low-nibble bytes ql and 32 bytes qh of 2-bit high parts make 128 codes.
      for (int h = 0; h < 2; ++h) {
        for (int k = 0; k < 2; ++k) {  // 16 of the 32 columns at a time
          const uint8x16_t ql0 = vld1q_u8(wb.ql + 64 * h + 16 * k), ql1 = vld1q_u8(wb.ql + 64 * h + 32 + 16 * k);
          const uint8x16_t qh = vld1q_u8(wb.qh + 32 * h + 16 * k);
          std::int8_t* o = q + 128 * h + 16 * k;
          auto put = [&](std::int8_t* dst, uint8x16_t lo4, uint8x16_t hi2) {
            vst1q_s8(dst, vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo4, vshlq_n_u8(hi2, 4))), bias));
          };
          put(o, vandq_u8(ql0, low4), vandq_u8(qh, two));
          put(o + 32, vandq_u8(ql1, low4), vandq_u8(vshrq_n_u8(qh, 2), two));
          put(o + 64, vshrq_n_u8(ql0, 4), vandq_u8(vshrq_n_u8(qh, 4), two));
          put(o + 96, vshrq_n_u8(ql1, 4), vshrq_n_u8(qh, 6));
        }
      }
      const float dw = formats::half_to_float(wb.d);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_k& xb = x[r * ldx + b];
        std::int32_t dots = 0;
        for (int s = 0; s < 16; ++s) dots += wb.scales[s] * dot16(q + 16 * s, xb.qs + 16 * s);
        acc[r] += (xb.d * dw) * static_cast<float>(dots);
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = acc[r];
  }
}

template <int M>
void q8_0_q8_0_dot_rows(const formats::block_q8_0* w, index nb, index n, const formats::block_q8_0* x,
                        index ldx, float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    float acc[M] = {};
    for (index b = 0; b < nb; ++b) {
      const formats::block_q8_0& wb = w[j * nb + b];
      const float dw = formats::half_to_float(wb.d);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_0& xb = x[r * ldx + b];
        acc[r] += (dw * formats::half_to_float(xb.d)) * static_cast<float>(dot32(wb.qs, xb.qs));
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = acc[r];
  }
}

template <int M>
void q4_0_q8_0_dot_rows(const formats::block_q4_0* w, index nb, index n, const formats::block_q8_0* x,
                        index ldx, float* y, index ldy) {
  alignas(16) std::int8_t q[32];
  for (index j = 0; j < n; ++j) {
    float acc[M] = {};
    for (index b = 0; b < nb; ++b) {
      const formats::block_q4_0& wb = w[j * nb + b];
      unpack_nibbles(wb.qs, 8, q);
      const float dw = formats::half_to_float(wb.d);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_0& xb = x[r * ldx + b];
        acc[r] += (dw * formats::half_to_float(xb.d)) * static_cast<float>(dot32(q, xb.qs));
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = acc[r];
  }
}

#include "peft/kernels/detail/quantized_int8_entries.inc"

}  // namespace peft::kernels::neon
PEFT_END_TARGET
#endif  // PEFT_ARM_NEON
