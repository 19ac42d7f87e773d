// peft/kernels/x86/avx2/quantized_int8.hpp — the AVX2 integer dot kernels
// (kernels/quantized_int8.hpp): byte products with _mm256_maddubs_epi16 (unsigned weight codes
// or |w| times signed activation codes, pairs summed to int16), widened and weighted by the
// sub-block scales with _mm256_madd_epi16 into int32 lanes, then one f32 multiply-add per block
// and row. A weight block is unpacked once and multiplied into up to max_dot_rows activation
// rows; AVX-512 runs these (kernels/dispatch.hpp). The contract and the per-block arithmetic are
// those of kernels/reference/quantized_int8.hpp. Compiled for the AVX2 target; empty on other
// architectures.
//
// Range: every int16 pair sum stays below 2^15 (q4_k 2 * 15 * 128, q6_k 2 * 63 * 128,
// q8_0 / q4_0 2 * 128 * 127), given activation codes in [-127, 127] (the quantizers of
// base/formats/q8_k.hpp make nothing else).
#pragma once

#include "peft/kernels/isa.hpp"

#if PEFT_X86_DISPATCH
#include <cstdint>

#include <immintrin.h>

#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/base/formats/q8_k.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/detail/quantized_dot.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/x86/avx2/vec.hpp"

PEFT_BEGIN_TARGET_AVX2
namespace peft::kernels::avx2 {

inline __m256i load_bytes(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

/// Two 128-bit halves as one 256-bit vector (lo in lanes 0..3).
inline __m256i join(__m128i lo, __m128i hi) { return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1); }

/// Eight int32 lanes, lane i = sum of the four products of bytes 4i..4i+3 of |w| (unsigned) and
/// a with w's signs (signed), i.e. of w and a as signed bytes.
inline __m256i signed_dot(__m256i abs_w, __m256i w, __m256i a) {
  const __m256i p16 = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(a, w));
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

template <int M>
void q4_k_q8_k_dot_rows(const formats::block_q4_k* w, index nb, index n, const formats::block_q8_k* x,
                        index ldx, float* y, index ldy) {
  const __m256i m4 = _mm256_set1_epi8(15);
  for (index j = 0; j < n; ++j) {
    __m256 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = vec::zero();
    for (index b = 0; b < nb; ++b) {
      const formats::block_q4_k& wb = w[j * nb + b];
      std::uint8_t sc[8], mn[8];
      formats::q4_k_scale_mins(wb, sc, mn);
      __m256i sumi[M];
      for (int r = 0; r < M; ++r) sumi[r] = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) {  // weights 64 c + [0, 32) (low nibbles) and + [32, 64) (high)
        const __m256i v = load_bytes(wb.qs + 32 * c);
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        const __m256i s_lo = _mm256_set1_epi16(sc[2 * c]);
        const __m256i s_hi = _mm256_set1_epi16(sc[2 * c + 1]);
        for (int r = 0; r < M; ++r) {
          const std::int8_t* a = x[r * ldx + b].qs + 64 * c;
          const __m256i p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load_bytes(a)), s_lo);
          const __m256i p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load_bytes(a + 32)), s_hi);
          sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p_lo, p_hi));
        }
      }
      // The min codes, each repeated for the two groups of 16 of its sub-block.
      const __m128i m8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn));
      const __m256i mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
      const float dw = _cvtsh_ss(wb.d);
      const float dminw = _cvtsh_ss(wb.dmin);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_k& xb = x[r * ldx + b];
        const __m256i msum = _mm256_madd_epi16(load_bytes(xb.bsums), mins);
        acc[r] = _mm256_fmadd_ps(vec::set1(xb.d * dw), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        acc[r] = _mm256_fmadd_ps(vec::set1(-xb.d * dminw), _mm256_cvtepi32_ps(msum), acc[r]);
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(acc[r]);
  }
}

template <int M>
void q6_k_q8_k_dot_rows(const formats::block_q6_k* w, index nb, index n, const formats::block_q8_k* x,
                        index ldx, float* y, index ldy) {
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i m2 = _mm256_set1_epi8(3);
  for (index j = 0; j < n; ++j) {
    __m256 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = vec::zero();
    for (index b = 0; b < nb; ++b) {
      const formats::block_q6_k& wb = w[j * nb + b];
      __m256i sumi[M];
      for (int r = 0; r < M; ++r) sumi[r] = _mm256_setzero_si256();
      for (int h = 0; h < 2; ++h) {
        // The unsigned codes q (0..63) of weights 128 h + 32 k + [0, 32), k < 4.
        const __m256i l0 = load_bytes(wb.ql + 64 * h);
        const __m256i l1 = load_bytes(wb.ql + 64 * h + 32);
        const __m256i hb = load_bytes(wb.qh + 32 * h);
        const __m256i q[4] = {
            _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4)),
            _mm256_or_si256(_mm256_and_si256(l1, m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4))};
        for (int k = 0; k < 4; ++k) {
          const int s = 8 * h + 2 * k;  // the scales of the two sub-blocks of 16
          const __m256i scale = join(_mm_set1_epi16(wb.scales[s]), _mm_set1_epi16(wb.scales[s + 1]));
          for (int r = 0; r < M; ++r) {
            const __m256i a = load_bytes(x[r * ldx + b].qs + 128 * h + 32 * k);
            sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], a), scale));
          }
        }
      }
      // The offset 32 of the codes: sum_s scales[s] 32 bsums[s].
      const __m256i scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb.scales)));
      const float dw = _cvtsh_ss(wb.d);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_k& xb = x[r * ldx + b];
        const __m256i offset = _mm256_slli_epi32(_mm256_madd_epi16(load_bytes(xb.bsums), scales), 5);
        const __m256i s = _mm256_sub_epi32(sumi[r], offset);
        acc[r] = _mm256_fmadd_ps(vec::set1(xb.d * dw), _mm256_cvtepi32_ps(s), acc[r]);
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(acc[r]);
  }
}

template <int M>
void q8_0_q8_0_dot_rows(const formats::block_q8_0* w, index nb, index n, const formats::block_q8_0* x,
                        index ldx, float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    __m256 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = vec::zero();
    for (index b = 0; b < nb; ++b) {
      const formats::block_q8_0& wb = w[j * nb + b];
      const __m256i q = load_bytes(wb.qs);
      const __m256i abs_q = _mm256_sign_epi8(q, q);
      const float dw = _cvtsh_ss(wb.d);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_0& xb = x[r * ldx + b];
        const __m256i s = signed_dot(abs_q, q, load_bytes(xb.qs));
        acc[r] = _mm256_fmadd_ps(vec::set1(dw * _cvtsh_ss(xb.d)), _mm256_cvtepi32_ps(s), acc[r]);
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(acc[r]);
  }
}

template <int M>
void q4_0_q8_0_dot_rows(const formats::block_q4_0* w, index nb, index n, const formats::block_q8_0* x,
                        index ldx, float* y, index ldy) {
  const __m128i m4 = _mm_set1_epi8(15);
  const __m256i eight = _mm256_set1_epi8(8);
  for (index j = 0; j < n; ++j) {
    __m256 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = vec::zero();
    for (index b = 0; b < nb; ++b) {
      const formats::block_q4_0& wb = w[j * nb + b];
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb.qs));
      // Weights 0..15 from the low nibbles, 16..31 from the high ones, as q - 8.
      const __m256i q = _mm256_sub_epi8(join(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4)), eight);
      const __m256i abs_q = _mm256_sign_epi8(q, q);
      const float dw = _cvtsh_ss(wb.d);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_0& xb = x[r * ldx + b];
        const __m256i s = signed_dot(abs_q, q, load_bytes(xb.qs));
        acc[r] = _mm256_fmadd_ps(vec::set1(dw * _cvtsh_ss(xb.d)), _mm256_cvtepi32_ps(s), acc[r]);
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(acc[r]);
  }
}

#include "peft/kernels/detail/quantized_int8_entries.inc"

}  // namespace peft::kernels::avx2

PEFT_END_TARGET

#endif  // PEFT_X86_DISPATCH
