// peft/kernels/x86/avx2/quantized.hpp — the AVX2 quantized dot kernels (int8 row-wise, q4_0,
// q8_0, q4_k, q6_k, nf4): blocks decoded in registers with intrinsics, accumulated with kernels/x86/avx2/vec.hpp,
// one instantiation per batch size; the contract is kernels/detail/quantized_dot.hpp. Compiled
// for the AVX2 target; empty on other architectures.
#pragma once

#include "peft/kernels/isa.hpp"

#if PEFT_X86_DISPATCH
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

/// Multiplies 32 consecutive decoded weights (four 8-lane vectors) into every row's accumulators;
/// x points at the first of them in row 0.
template <int M>
inline void fma_32(const __m256 w[4], const float* x, index ldx, __m256* acc0, __m256* acc1) {
  for (int r = 0; r < M; ++r) {
    const float* xr = x + r * ldx;
    acc0[r] = vec::fma(w[0], vec::load(xr), acc0[r]);
    acc1[r] = vec::fma(w[1], vec::load(xr + 8), acc1[r]);
    acc0[r] = vec::fma(w[2], vec::load(xr + 16), acc0[r]);
    acc1[r] = vec::fma(w[3], vec::load(xr + 24), acc1[r]);
  }
}

/// 32 bytes as four 8-lane f32 vectors in order (signed or unsigned bytes).
template <bool Signed>
inline void bytes_to_ps(__m256i v, __m256 out[4]) {
  const __m128i lo = _mm256_castsi256_si128(v);
  const __m128i hi = _mm256_extracti128_si256(v, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i) {
    out[i] = _mm256_cvtepi32_ps(Signed ? _mm256_cvtepi8_epi32(parts[i]) : _mm256_cvtepu8_epi32(parts[i]));
  }
}

template <int M>
void q8_0_dot_rows(const formats::block_q8_0* blocks, index nb, index n, const float* x, index ldx,
                   float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const formats::block_q8_0* row = blocks + j * nb;
    __m256 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = vec::zero();
    for (index b = 0; b < nb; ++b) {
      __m256 wv[4];
      bytes_to_ps<true>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[b].qs)), wv);
      const __m256 d = vec::set1(_cvtsh_ss(row[b].d));
      for (auto& w : wv) w = _mm256_mul_ps(w, d);
      fma_32<M>(wv, x + b * formats::q8_0_block_size, ldx, acc0, acc1);
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(vec::add(acc0[r], acc1[r]));
  }
}

/// Multiplies one q4_k super-block into every row's accumulators: the 6-bit codes are unpacked
/// once, then each sub-block's 32 weights (d sc) q - (dmin m) are decoded with one fused
/// multiply-subtract (the product is exact, so this is the reference value).
template <int M>
inline void q4_k_block(const formats::block_q4_k& b, const float* x, index ldx, __m256* acc0, __m256* acc1) {
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
      const __m256 ds = vec::set1(d * static_cast<float>(sc[s]));
      const __m256 dm = vec::set1(dmin * static_cast<float>(m[s]));
      __m256 wv[4];
      bytes_to_ps<false>(nibbles[h], wv);
      for (auto& w : wv) w = _mm256_fmsub_ps(w, ds, dm);
      fma_32<M>(wv, x + 32 * s, ldx, acc0, acc1);
    }
  }
}

template <int M>
void q4_k_dot_rows(const formats::block_q4_k* blocks, index nb, index n, const float* x, index ldx,
                   float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const formats::block_q4_k* row = blocks + j * nb;
    __m256 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = vec::zero();
    for (index b = 0; b < nb; ++b) q4_k_block<M>(row[b], x + b * formats::q4_k_block_size, ldx, acc0, acc1);
    for (int r = 0; r < M; ++r) y[r * ldy + j] = vec::sum(vec::add(acc0[r], acc1[r]));
  }
}

/// The four groups of 32 signed codes q - 32 of one half (128 weights) of a q6_k block, in weight
/// order: low or high nibbles of ql with two bits of qh above them.
inline void q6_k_codes(const std::uint8_t* ql, const std::uint8_t* qh, __m256i out[4]) {
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i m2 = _mm256_set1_epi8(3);
  const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
  const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
  const __m256i low[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                          _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                          _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
  const __m256i high[4] = {_mm256_and_si256(h, m2), _mm256_and_si256(_mm256_srli_epi16(h, 2), m2),
                           _mm256_and_si256(_mm256_srli_epi16(h, 4), m2),
                           _mm256_and_si256(_mm256_srli_epi16(h, 6), m2)};
  const __m256i bias = _mm256_set1_epi8(32);
  for (int k = 0; k < 4; ++k) {
    out[k] = _mm256_sub_epi8(_mm256_or_si256(low[k], _mm256_slli_epi16(high[k], 4)), bias);
  }
}

/// Multiplies one q6_k super-block into every row's accumulators: 16 weights per sub-block scale,
/// each weight (d scale) (q - 32), exact in f32.
template <int M>
inline void q6_k_block(const formats::block_q6_k& b, const float* x, index ldx, __m256* acc0, __m256* acc1) {
  const float d = _cvtsh_ss(b.d);
  for (int h = 0; h < 2; ++h) {
    __m256i codes[4];
    q6_k_codes(b.ql + 64 * h, b.qh + 32 * h, codes);
    for (int k = 0; k < 4; ++k) {
      const int s = 8 * h + 2 * k;  // the scales of weights 128 h + 32 k + [0, 16) and [16, 32)
      const __m256 s0 = vec::set1(d * static_cast<float>(b.scales[s]));
      const __m256 s1 = vec::set1(d * static_cast<float>(b.scales[s + 1]));
      __m256 wv[4];
      bytes_to_ps<true>(codes[k], wv);
      wv[0] = _mm256_mul_ps(wv[0], s0);
      wv[1] = _mm256_mul_ps(wv[1], s0);
      wv[2] = _mm256_mul_ps(wv[2], s1);
      wv[3] = _mm256_mul_ps(wv[3], s1);
      fma_32<M>(wv, x + 128 * h + 32 * k, ldx, acc0, acc1);
    }
  }
}

template <int M>
void q6_k_dot_rows(const formats::block_q6_k* blocks, index nb, index n, const float* x, index ldx,
                   float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const formats::block_q6_k* row = blocks + j * nb;
    __m256 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = vec::zero();
    for (index b = 0; b < nb; ++b) q6_k_block<M>(row[b], x + b * formats::q6_k_block_size, ldx, acc0, acc1);
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
