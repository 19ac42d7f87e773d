// peft/kernels/x86/avx512/quantized.hpp — the AVX-512 quantized dot kernels (int8 row-wise, q4_0,
// q8_0, q4_k, q6_k, nf4): blocks decoded in registers with intrinsics, accumulated with kernels/x86/avx512/vec.hpp,
// one instantiation per batch size; the contract is kernels/detail/quantized_dot.hpp. Compiled
// for the AVX-512 target; empty on other architectures.
//
// The all-lanes maskz forms of the conversions and permutes avoid GCC 12's _mm512_undefined_*
// false -Wmaybe-uninitialized warnings; they compile to the same instructions.
#pragma once

#include "peft/kernels/isa.hpp"

#if PEFT_X86_DISPATCH
#include <algorithm>
#include <cstdint>

#include <immintrin.h>

#include "peft/base/formats/nf4.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/detail/quantized_dot.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/x86/avx512/vec.hpp"

PEFT_BEGIN_TARGET_AVX512
namespace peft::kernels::avx512 {

inline __m512 i8_to_ps(__m128i v) {
  return _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_maskz_cvtepi8_epi32(0xFFFF, v));
}

inline __m512 u8_to_ps(__m128i v) {
  return _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_maskz_cvtepu8_epi32(0xFFFF, v));
}

template <int M>
void int8_dot_rows(const std::int8_t* q, const float* scale, index in, index n, const float* x,
                   index ldx, float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const std::int8_t* w = q + j * in;
    __m512 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = vec::zero();
    index p = 0;
    for (; p + 32 <= in; p += 32) {
      const __m512 w0 = i8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + p)));
      const __m512 w1 = i8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + p + 16)));
      for (int r = 0; r < M; ++r) {
        const float* xr = x + r * ldx + p;
        acc0[r] = vec::fma(w0, vec::load(xr), acc0[r]);
        acc1[r] = vec::fma(w1, vec::load(xr + 16), acc1[r]);
      }
    }
    for (; p < in; p += 16) {  // the tail, masked
      const index left = std::min<index>(16, in - p);
      const __mmask16 k = static_cast<__mmask16>((1u << left) - 1u);
      const __m512 wv = i8_to_ps(_mm_maskz_loadu_epi8(k, w + p));
      for (int r = 0; r < M; ++r) {
        acc0[r] = vec::fma(wv, _mm512_maskz_loadu_ps(k, x + r * ldx + p), acc0[r]);
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(vec::add(acc0[r], acc1[r])) * scale[j];
  }
}

/// Multiplies the two 16-weight halves of one q4_0 block into every row's accumulators. The
/// codes index a 16-entry table of q - 8 (vpermps reads the low 4 bits of each lane, so the low
/// nibble needs no mask); one row folds d after the two products (one multiply fewer).
template <int M>
inline void q4_0_block(const formats::block_q4_0& b, __m512 table, const float* x, index ldx,
                       __m512* acc0, __m512* acc1) {
  const __m512i v =
      _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs)));
  const __m512 lo = _mm512_maskz_permutexvar_ps(0xFFFF, v, table);
  const __m512 hi = _mm512_maskz_permutexvar_ps(0xFFFF, _mm512_maskz_srli_epi32(0xFFFF, v, 4), table);
  const __m512 d = vec::set1(_cvtsh_ss(b.d));
  if constexpr (M == 1) {
    const __m512 t = vec::fma(lo, vec::load(x), _mm512_mul_ps(hi, vec::load(x + 16)));
    acc0[0] = vec::fma(t, d, acc0[0]);
  } else {
    const __m512 lod = _mm512_mul_ps(lo, d);
    const __m512 hid = _mm512_mul_ps(hi, d);
    for (int r = 0; r < M; ++r) {
      const float* xr = x + r * ldx;
      acc0[r] = vec::fma(lod, vec::load(xr), acc0[r]);
      acc1[r] = vec::fma(hid, vec::load(xr + 16), acc1[r]);
    }
  }
}

template <int M>
void q4_0_dot_rows(const formats::block_q4_0* blocks, index nb, index n, const float* x, index ldx,
                   float* y, index ldy) {
  // Skinny batches have few accumulators: two blocks per step keep four FMA chains in flight.
  constexpr int sets = M <= 2 ? 2 : 1;
  constexpr index bs = formats::q4_0_block_size;
  alignas(64) float values[16];
  for (int i = 0; i < 16; ++i) values[i] = static_cast<float>(i - 8);
  const __m512 table = _mm512_load_ps(values);
  for (index j = 0; j < n; ++j) {
    const formats::block_q4_0* row = blocks + j * nb;
    __m512 acc[sets][2][M];
    for (int s = 0; s < sets; ++s) {
      for (int r = 0; r < M; ++r) acc[s][0][r] = acc[s][1][r] = vec::zero();
    }
    index b = 0;
    for (; b + sets <= nb; b += sets) {
      for (int s = 0; s < sets; ++s) {
        q4_0_block<M>(row[b + s], table, x + (b + s) * bs, ldx, acc[s][0], acc[s][1]);
      }
    }
    for (; b < nb; ++b) q4_0_block<M>(row[b], table, x + b * bs, ldx, acc[0][0], acc[0][1]);
    for (int r = 0; r < M; ++r) {
      __m512 t = vec::add(acc[0][0][r], acc[0][1][r]);
      if constexpr (sets == 2) t = vec::add(t, vec::add(acc[1][0][r], acc[1][1][r]));
      y[r * ldy + j] = vec::sum(t);
    }
  }
}

/// Multiplies 32 consecutive decoded weights (two 16-lane vectors) into every row's accumulators;
/// x points at the first of them in row 0.
template <int M>
inline void fma_32(__m512 w0, __m512 w1, const float* x, index ldx, __m512* acc0, __m512* acc1) {
  for (int r = 0; r < M; ++r) {
    const float* xr = x + r * ldx;
    acc0[r] = vec::fma(w0, vec::load(xr), acc0[r]);
    acc1[r] = vec::fma(w1, vec::load(xr + 16), acc1[r]);
  }
}

template <int M>
void q8_0_dot_rows(const formats::block_q8_0* blocks, index nb, index n, const float* x, index ldx,
                   float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const formats::block_q8_0* row = blocks + j * nb;
    __m512 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = vec::zero();
    for (index b = 0; b < nb; ++b) {
      const __m512 d = vec::set1(_cvtsh_ss(row[b].d));
      const __m512 w0 = _mm512_mul_ps(i8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[b].qs))), d);
      const __m512 w1 = _mm512_mul_ps(i8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[b].qs + 16))), d);
      fma_32<M>(w0, w1, x + b * formats::q8_0_block_size, ldx, acc0, acc1);
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(vec::add(acc0[r], acc1[r]));
  }
}

/// Multiplies one q4_k super-block into every row's accumulators: the 6-bit codes are unpacked
/// once, then each sub-block's 32 weights (d sc) q - (dmin m) are decoded with one fused
/// multiply-subtract (the product is exact, so this is the reference value).
template <int M>
inline void q4_k_block(const formats::block_q4_k& b, const float* x, index ldx, __m512* acc0, __m512* acc1) {
  std::uint8_t sc[8], m[8];
  formats::q4_k_scale_mins(b, sc, m);
  const float d = _cvtsh_ss(b.d);
  const float dmin = _cvtsh_ss(b.dmin);
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int c = 0; c < 4; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * c));
    const __m256i nibbles[2] = {_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4)};
    for (int h = 0; h < 2; ++h) {
      const int s = 2 * c + h;
      const __m512 ds = vec::set1(d * static_cast<float>(sc[s]));
      const __m512 dm = vec::set1(dmin * static_cast<float>(m[s]));
      const __m512 w0 = _mm512_fmsub_ps(u8_to_ps(_mm256_castsi256_si128(nibbles[h])), ds, dm);
      const __m512 w1 = _mm512_fmsub_ps(u8_to_ps(_mm256_extracti128_si256(nibbles[h], 1)), ds, dm);
      fma_32<M>(w0, w1, x + 32 * s, ldx, acc0, acc1);
    }
  }
}

template <int M>
void q4_k_dot_rows(const formats::block_q4_k* blocks, index nb, index n, const float* x, index ldx,
                   float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const formats::block_q4_k* row = blocks + j * nb;
    __m512 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = vec::zero();
    for (index b = 0; b < nb; ++b) q4_k_block<M>(row[b], x + b * formats::q4_k_block_size, ldx, acc0, acc1);
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(vec::add(acc0[r], acc1[r]));
  }
}

/// Multiplies one q6_k super-block into every row's accumulators: each 16-lane vector is one
/// sub-block, (d scale) (q - 32), exact in f32. The codes of a half (128 weights) are assembled
/// 32 at a time from the low or high nibbles of ql and two bits of qh.
template <int M>
inline void q6_k_block(const formats::block_q6_k& b, const float* x, index ldx, __m512* acc0, __m512* acc1) {
  const float d = _cvtsh_ss(b.d);
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i m2 = _mm256_set1_epi8(3);
  const __m256i bias = _mm256_set1_epi8(32);
  for (int h = 0; h < 2; ++h) {
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.ql + 64 * h));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.ql + 64 * h + 32));
    const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qh + 32 * h));
    const __m256i low[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                            _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
    for (int k = 0; k < 4; ++k) {
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * k), m2);
      const __m256i q = _mm256_sub_epi8(_mm256_or_si256(low[k], _mm256_slli_epi16(high, 4)), bias);
      const int s = 8 * h + 2 * k;  // the scales of weights 128 h + 32 k + [0, 16) and [16, 32)
      const __m512 w0 = _mm512_mul_ps(i8_to_ps(_mm256_castsi256_si128(q)), vec::set1(d * static_cast<float>(b.scales[s])));
      const __m512 w1 =
          _mm512_mul_ps(i8_to_ps(_mm256_extracti128_si256(q, 1)), vec::set1(d * static_cast<float>(b.scales[s + 1])));
      fma_32<M>(w0, w1, x + 128 * h + 32 * k, ldx, acc0, acc1);
    }
  }
}

template <int M>
void q6_k_dot_rows(const formats::block_q6_k* blocks, index nb, index n, const float* x, index ldx,
                   float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const formats::block_q6_k* row = blocks + j * nb;
    __m512 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = vec::zero();
    for (index b = 0; b < nb; ++b) q6_k_block<M>(row[b], x + b * formats::q6_k_block_size, ldx, acc0, acc1);
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(vec::add(acc0[r], acc1[r]));
  }
}

template <int M>
void nf4_dot_rows(const formats::nf4_rows& w, index n, const float* x, index ldx, float* y,
                  index ldy) {
  const __m512 table = vec::load(formats::nf4_values.data());
  const __m128i m4 = _mm_set1_epi8(15);
  const index half = w.in / 2;
  const index blocks = w.in / formats::nf4_block_size;
  for (index j = 0; j < n; ++j) {
    const std::uint8_t* row = w.packed + j * half;
    const float* am = w.absmax + j * blocks;
    __m512 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = vec::zero();
    for (index b = 0; b < blocks; ++b) {
      const __m512 a = vec::set1(am[b]);
      for (int h = 0; h < 2; ++h) {  // two halves of 32 weights (16 bytes)
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 32 + h * 16));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);  // even elements
        const __m128i lo = _mm_and_si128(v, m4);                      // odd elements
        const __m512i i0 = _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_unpacklo_epi8(hi, lo));
        const __m512i i1 = _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_unpackhi_epi8(hi, lo));
        const __m512 w0 = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(0xFFFF, i0, table), a);
        const __m512 w1 = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(0xFFFF, i1, table), a);
        for (int r = 0; r < M; ++r) {
          const float* xr = x + r * ldx + b * formats::nf4_block_size + h * 32;
          acc0[r] = vec::fma(w0, vec::load(xr), acc0[r]);
          acc1[r] = vec::fma(w1, vec::load(xr + 16), acc1[r]);
        }
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(vec::add(acc0[r], acc1[r]));
  }
}

#include "peft/kernels/detail/quantized_entries.inc"

}  // namespace peft::kernels::avx512

PEFT_END_TARGET

#endif  // PEFT_X86_DISPATCH
