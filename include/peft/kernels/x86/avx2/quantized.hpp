// peft/kernels/x86/avx2/quantized.hpp — the AVX2 quantized dot kernels (int8 row-wise, q4_0,
// nf4): blocks decoded in registers with intrinsics, accumulated with kernels/x86/avx2/vec.hpp,
// one instantiation per batch size; the contract is kernels/detail/quantized_dot.hpp. Compiled
// for the AVX2 target; empty on other architectures.
#pragma once

#include "peft/kernels/isa.hpp"

#if PEFT_X86_DISPATCH
#include <cstdint>

#include <immintrin.h>

#include "peft/base/formats/nf4.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/detail/quantized_dot.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/x86/avx2/vec.hpp"

PEFT_BEGIN_TARGET_AVX2
namespace peft::kernels::avx2 {

template <int M>
void int8_dot_rows(const std::int8_t* q, const float* scale, index in, index n, const float* x,
                   index ldx, float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const std::int8_t* w = q + j * in;
    __m256 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = vec::zero();
    index p = 0;
    for (; p + 16 <= in; p += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + p));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
      for (int r = 0; r < M; ++r) {
        const float* xr = x + r * ldx + p;
        acc0[r] = vec::fma(w0, vec::load(xr), acc0[r]);
        acc1[r] = vec::fma(w1, vec::load(xr + 8), acc1[r]);
      }
    }
    for (int r = 0; r < M; ++r) {
      float s = vec::sum(vec::add(acc0[r], acc1[r]));
      for (index t = p; t < in; ++t) s += static_cast<float>(w[t]) * x[r * ldx + t];
      y[r * ldy + j] = s * scale[j];
    }
  }
}

/// Four 8-lane f32 vectors of one q4_0 block, (q - 8) * d, in weight order.
inline void q4_0_block(const formats::block_q4_0& b, __m256 out[4]) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
  const __m128i m4 = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(v, m4);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
  const __m256i eight = _mm256_set1_epi32(8);
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(b.d));
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i) {
    const __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[i]), eight);
    out[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
  }
}

template <int M>
void q4_0_dot_rows(const formats::block_q4_0* blocks, index nb, index n, const float* x, index ldx,
                   float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const formats::block_q4_0* row = blocks + j * nb;
    __m256 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = vec::zero();
    for (index b = 0; b < nb; ++b) {
      __m256 wv[4];
      q4_0_block(row[b], wv);
      for (int r = 0; r < M; ++r) {
        const float* xr = x + r * ldx + b * formats::q4_0_block_size;
        acc0[r] = vec::fma(wv[0], vec::load(xr), acc0[r]);
        acc1[r] = vec::fma(wv[1], vec::load(xr + 8), acc1[r]);
        acc0[r] = vec::fma(wv[2], vec::load(xr + 16), acc0[r]);
        acc1[r] = vec::fma(wv[3], vec::load(xr + 24), acc1[r]);
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(vec::add(acc0[r], acc1[r]));
  }
}

/// Eight f32 NF4 values of the codes in the 8 low bytes of `codes` (16 entries = two 8-lane
/// halves of the table, chosen by bit 3 through the sign of code << 28).
inline __m256 nf4_lookup(__m128i codes, __m256 tab_lo, __m256 tab_hi) {
  const __m256i idx = _mm256_cvtepu8_epi32(codes);
  const __m256 lo = _mm256_permutevar8x32_ps(tab_lo, idx);
  const __m256 hi = _mm256_permutevar8x32_ps(tab_hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int M>
void nf4_dot_rows(const formats::nf4_rows& w, index n, const float* x, index ldx, float* y,
                  index ldy) {
  const __m256 tab_lo = vec::load(formats::nf4_values.data());
  const __m256 tab_hi = vec::load(formats::nf4_values.data() + 8);
  const __m128i m4 = _mm_set1_epi8(15);
  const index half = w.in / 2;
  const index blocks = w.in / formats::nf4_block_size;
  for (index j = 0; j < n; ++j) {
    const std::uint8_t* row = w.packed + j * half;
    const float* am = w.absmax + j * blocks;
    __m256 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = vec::zero();
    for (index b = 0; b < blocks; ++b) {
      const __m256 a = vec::set1(am[b]);
      for (int h = 0; h < 2; ++h) {  // two halves of 32 weights (16 bytes)
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 32 + h * 16));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);  // even elements
        const __m128i lo = _mm_and_si128(v, m4);                      // odd elements
        const __m128i e0 = _mm_unpacklo_epi8(hi, lo);                 // elements 0..15
        const __m128i e1 = _mm_unpackhi_epi8(hi, lo);                 // elements 16..31
        const __m256 wv[4] = {_mm256_mul_ps(nf4_lookup(e0, tab_lo, tab_hi), a),
                              _mm256_mul_ps(nf4_lookup(_mm_srli_si128(e0, 8), tab_lo, tab_hi), a),
                              _mm256_mul_ps(nf4_lookup(e1, tab_lo, tab_hi), a),
                              _mm256_mul_ps(nf4_lookup(_mm_srli_si128(e1, 8), tab_lo, tab_hi), a)};
        for (int r = 0; r < M; ++r) {
          const float* xr = x + r * ldx + b * formats::nf4_block_size + h * 32;
          acc0[r] = vec::fma(wv[0], vec::load(xr), acc0[r]);
          acc1[r] = vec::fma(wv[1], vec::load(xr + 8), acc1[r]);
          acc0[r] = vec::fma(wv[2], vec::load(xr + 16), acc0[r]);
          acc1[r] = vec::fma(wv[3], vec::load(xr + 24), acc1[r]);
        }
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(vec::add(acc0[r], acc1[r]));
  }
}

#include "peft/kernels/detail/quantized_entries.inc"

}  // namespace peft::kernels::avx2

PEFT_END_TARGET

#endif  // PEFT_X86_DISPATCH
