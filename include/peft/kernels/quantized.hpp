// peft/kernels/quantized.hpp — products with quantized weights, decoded in registers.
//
// One dot kernel per format (int8 row-wise, q4_0, nf4), each in four versions selected by
// kernels::isa: the scalar reference (kernels/reference/quantized.hpp, double accumulation), a
// portable xsimd version (a block decoded to a small stack buffer, then xsimd FMAs), and AVX2
// and AVX-512 versions with intrinsics (compiled with function-level targets, so a binary built
// without -march runs them when the CPU has them).
//
//   kernels::q4_0_dot(kernels::active_isa(), blocks, nb, n, x, ldx, m, y, ldy);
//   // y[r * ldy + j] = sum_p W[j, p] x[r * ldx + p]   for r < m (m <= 8), j < n
//
// A dot kernel streams its n weight rows once and multiplies every decoded block into all m
// rows of x (skinny batches: callers split larger batches into groups of max_dot_rows). Decode
// kernels (decode_*) write whole rows as f32 for the panel products of large batches.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>

#include <xsimd/xsimd.hpp>

#include "peft/core/matrix_view.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/reference/quantized.hpp"

namespace peft::kernels {

/// Rows of x one dot kernel call multiplies at most.
inline constexpr index max_dot_rows = 8;

// ---- row decoders (f32 panels) ----------------------------------------------------------------

/// out[0..in) = q[0..in) * scale, rounded to f32.
inline void decode_int8_row(const std::int8_t* q, float scale, index in, float* out) noexcept {
  for (index p = 0; p < in; ++p) out[p] = static_cast<float>(q[p]) * scale;
}

/// out[0..nb * 32) = the weights of nb q4_0 blocks (exact in f32).
inline void decode_q4_0_row(const block_q4_0* b, index nb, float* out) noexcept {
  for (index i = 0; i < nb; ++i) reference::decode_q4_0_block(b[i], out + i * q4_0_block_size);
}

/// out[0..in) = one nf4 row of w (in % 64 == 0), rounded to f32.
inline void decode_nf4_row(const nf4_rows& w, index j, float* out) noexcept {
  const std::uint8_t* p = w.packed + j * (w.in / 2);
  const float* am = w.absmax + j * (w.in / nf4_block_size);
  for (index e = 0; e < w.in; e += 2) {
    const float a = am[e / nf4_block_size];
    out[e] = nf4_values[static_cast<std::size_t>(p[e / 2] >> 4)] * a;
    out[e + 1] = nf4_values[static_cast<std::size_t>(p[e / 2] & 15)] * a;
  }
}

namespace detail {

// ---- portable (xsimd) ---------------------------------------------------------------------------

/// y(r, j) = sum over chunks c of decode(j, c) . x(r, c): `decode(j, c, buf)` writes the `chunk`
/// f32 weights of chunk c of row j (chunk a multiple of the batch width), `tail` columns of the
/// last chunk are read from x (the rest is zero in buf and never loaded from x).
template <class Decode>
void portable_dot(const Decode& decode, index chunk, index chunks, index in, index n,
                  const float* x, index ldx, index m, float* y, index ldy) {
  using batch = xsimd::batch<float>;
  constexpr index w = static_cast<index>(batch::size);
  alignas(64) float buf[64];
  alignas(64) float xt[64];
  for (index j = 0; j < n; ++j) {
    std::array<batch, max_dot_rows> acc;
    for (index r = 0; r < m; ++r) acc[static_cast<std::size_t>(r)] = batch(0.0f);
    for (index c = 0; c < chunks; ++c) {
      decode(j, c, buf);
      const index p0 = c * chunk;
      const index valid = std::min(chunk, in - p0);
      for (index r = 0; r < m; ++r) {
        const float* xr = x + r * ldx + p0;
        if (valid < chunk) {  // the tail: copy x's valid part, zero the rest
          std::fill(xt, xt + chunk, 0.0f);
          std::copy(xr, xr + valid, xt);
          xr = xt;
        }
        batch a = acc[static_cast<std::size_t>(r)];
        for (index p = 0; p < chunk; p += w) {
          a = xsimd::fma(batch::load_aligned(buf + p), batch::load_unaligned(xr + p), a);
        }
        acc[static_cast<std::size_t>(r)] = a;
      }
    }
    for (index r = 0; r < m; ++r) y[r * ldy + j] = xsimd::hadd(acc[static_cast<std::size_t>(r)]);
  }
}

inline void int8_dot_portable(const std::int8_t* q, const float* scale, index in, index n,
                              const float* x, index ldx, index m, float* y, index ldy) {
  constexpr index chunk = 64;
  auto decode = [&](index j, index c, float* buf) {
    const index p0 = c * chunk;
    const index valid = std::min(chunk, in - p0);
    const std::int8_t* src = q + j * in + p0;
    for (index p = 0; p < valid; ++p) buf[p] = static_cast<float>(src[p]);
    for (index p = valid; p < chunk; ++p) buf[p] = 0.0f;
  };
  portable_dot(decode, chunk, (in + chunk - 1) / chunk, in, n, x, ldx, m, y, ldy);
  for (index j = 0; j < n; ++j) {
    for (index r = 0; r < m; ++r) y[r * ldy + j] *= scale[j];
  }
}

inline void q4_0_dot_portable(const block_q4_0* blocks, index nb, index n, const float* x,
                              index ldx, index m, float* y, index ldy) {
  auto decode = [&](index j, index c, float* buf) {
    reference::decode_q4_0_block(blocks[j * nb + c], buf);
  };
  portable_dot(decode, q4_0_block_size, nb, nb * q4_0_block_size, n, x, ldx, m, y, ldy);
}

inline void nf4_dot_portable(const nf4_rows& w, index n, const float* x, index ldx, index m,
                             float* y, index ldy) {
  const index half = w.in / 2;
  const index blocks = w.in / nf4_block_size;
  auto decode = [&](index j, index c, float* buf) {
    const std::uint8_t* p = w.packed + j * half + c * (nf4_block_size / 2);
    const float a = w.absmax[j * blocks + c];
    for (index i = 0; i < nf4_block_size / 2; ++i) {
      buf[2 * i] = nf4_values[static_cast<std::size_t>(p[i] >> 4)] * a;
      buf[2 * i + 1] = nf4_values[static_cast<std::size_t>(p[i] & 15)] * a;
    }
  };
  portable_dot(decode, nf4_block_size, blocks, w.in, n, x, ldx, m, y, ldy);
}

#if PEFT_X86_DISPATCH

// ---- AVX2 + FMA ---------------------------------------------------------------------------------

PEFT_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int M>
PEFT_TARGET_AVX2 void int8_dot_avx2_m(const std::int8_t* q, const float* scale, index in, index n,
                                      const float* x, index ldx, float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const std::int8_t* w = q + j * in;
    __m256 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    index p = 0;
    for (; p + 16 <= in; p += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + p));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
      for (int r = 0; r < M; ++r) {
        const float* xr = x + r * ldx + p;
        acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc0[r]);
        acc1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc1[r]);
      }
    }
    for (int r = 0; r < M; ++r) {
      float s = hsum_avx2(_mm256_add_ps(acc0[r], acc1[r]));
      for (index t = p; t < in; ++t) s += static_cast<float>(w[t]) * x[r * ldx + t];
      y[r * ldy + j] = s * scale[j];
    }
  }
}

/// Four 8-lane f32 vectors of one q4_0 block, (q - 8) * d, in weight order.
PEFT_TARGET_AVX2 inline void q4_0_block_avx2(const block_q4_0& b, __m256 out[4]) {
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
PEFT_TARGET_AVX2 void q4_0_dot_avx2_m(const block_q4_0* blocks, index nb, index n, const float* x,
                                      index ldx, float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const block_q4_0* row = blocks + j * nb;
    __m256 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (index b = 0; b < nb; ++b) {
      __m256 wv[4];
      q4_0_block_avx2(row[b], wv);
      for (int r = 0; r < M; ++r) {
        const float* xr = x + r * ldx + b * q4_0_block_size;
        acc0[r] = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(xr), acc0[r]);
        acc1[r] = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xr + 8), acc1[r]);
        acc0[r] = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xr + 16), acc0[r]);
        acc1[r] = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xr + 24), acc1[r]);
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = hsum_avx2(_mm256_add_ps(acc0[r], acc1[r]));
  }
}

/// Eight f32 NF4 values of the codes in the 8 low bytes of `codes` (16 entries = two 8-lane
/// halves of the table, chosen by bit 3 through the sign of code << 28).
PEFT_TARGET_AVX2 inline __m256 nf4_lookup_avx2(__m128i codes, __m256 tab_lo, __m256 tab_hi) {
  const __m256i idx = _mm256_cvtepu8_epi32(codes);
  const __m256 lo = _mm256_permutevar8x32_ps(tab_lo, idx);
  const __m256 hi = _mm256_permutevar8x32_ps(tab_hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int M>
PEFT_TARGET_AVX2 void nf4_dot_avx2_m(const nf4_rows& w, index n, const float* x, index ldx,
                                     float* y, index ldy) {
  const __m256 tab_lo = _mm256_loadu_ps(nf4_values.data());
  const __m256 tab_hi = _mm256_loadu_ps(nf4_values.data() + 8);
  const __m128i m4 = _mm_set1_epi8(15);
  const index half = w.in / 2;
  const index blocks = w.in / nf4_block_size;
  for (index j = 0; j < n; ++j) {
    const std::uint8_t* row = w.packed + j * half;
    const float* am = w.absmax + j * blocks;
    __m256 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (index b = 0; b < blocks; ++b) {
      const __m256 a = _mm256_set1_ps(am[b]);
      for (int h = 0; h < 2; ++h) {  // two halves of 32 weights (16 bytes)
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 32 + h * 16));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);  // even elements
        const __m128i lo = _mm_and_si128(v, m4);                      // odd elements
        const __m128i e0 = _mm_unpacklo_epi8(hi, lo);                 // elements 0..15
        const __m128i e1 = _mm_unpackhi_epi8(hi, lo);                 // elements 16..31
        const __m256 wv[4] = {_mm256_mul_ps(nf4_lookup_avx2(e0, tab_lo, tab_hi), a),
                              _mm256_mul_ps(nf4_lookup_avx2(_mm_srli_si128(e0, 8), tab_lo, tab_hi), a),
                              _mm256_mul_ps(nf4_lookup_avx2(e1, tab_lo, tab_hi), a),
                              _mm256_mul_ps(nf4_lookup_avx2(_mm_srli_si128(e1, 8), tab_lo, tab_hi), a)};
        for (int r = 0; r < M; ++r) {
          const float* xr = x + r * ldx + b * nf4_block_size + h * 32;
          acc0[r] = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(xr), acc0[r]);
          acc1[r] = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xr + 8), acc1[r]);
          acc0[r] = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xr + 16), acc0[r]);
          acc1[r] = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xr + 24), acc1[r]);
        }
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = hsum_avx2(_mm256_add_ps(acc0[r], acc1[r]));
  }
}

// ---- AVX-512 ------------------------------------------------------------------------------------
// The all-lanes maskz forms of the conversions avoid GCC 12's _mm512_undefined_* false
// -Wmaybe-uninitialized warnings; they compile to the same instructions.

PEFT_TARGET_AVX512 inline __m512 i8_to_ps_avx512(__m128i v) {
  return _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_maskz_cvtepi8_epi32(0xFFFF, v));
}

PEFT_TARGET_AVX512 inline float hsum_avx512(__m512 v) {
  const __m512d d = _mm512_castps_pd(v);
  const __m256 lo = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xFF, d, 0));
  const __m256 hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xFF, d, 1));
  return hsum_avx2(_mm256_add_ps(lo, hi));
}

template <int M>
PEFT_TARGET_AVX512 void int8_dot_avx512_m(const std::int8_t* q, const float* scale, index in,
                                          index n, const float* x, index ldx, float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    const std::int8_t* w = q + j * in;
    __m512 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    index p = 0;
    for (; p + 32 <= in; p += 32) {
      const __m512 w0 = i8_to_ps_avx512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + p)));
      const __m512 w1 = i8_to_ps_avx512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + p + 16)));
      for (int r = 0; r < M; ++r) {
        const float* xr = x + r * ldx + p;
        acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc0[r]);
        acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc1[r]);
      }
    }
    for (; p < in; p += 16) {  // the tail, masked
      const index left = std::min<index>(16, in - p);
      const __mmask16 k = static_cast<__mmask16>((1u << left) - 1u);
      const __m512 wv = i8_to_ps_avx512(_mm_maskz_loadu_epi8(k, w + p));
      for (int r = 0; r < M; ++r) {
        acc0[r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(k, x + r * ldx + p), acc0[r]);
      }
    }
    for (int r = 0; r < M; ++r) {
      y[r * ldy + j] = hsum_avx512(_mm512_add_ps(acc0[r], acc1[r])) * scale[j];
    }
  }
}

/// Multiplies the two 16-weight halves of one q4_0 block into every row's accumulators. The
/// codes index a 16-entry table of q - 8 (vpermps reads the low 4 bits of each lane, so the low
/// nibble needs no mask); one row folds d after the two products (one multiply fewer).
template <int M>
PEFT_TARGET_AVX512 inline void q4_0_block_avx512(const block_q4_0& b, __m512 table, const float* x,
                                                 index ldx, __m512* acc0, __m512* acc1) {
  const __m512i v =
      _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs)));
  const __m512 lo = _mm512_maskz_permutexvar_ps(0xFFFF, v, table);
  const __m512 hi = _mm512_maskz_permutexvar_ps(0xFFFF, _mm512_maskz_srli_epi32(0xFFFF, v, 4), table);
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(b.d));
  if constexpr (M == 1) {
    const __m512 t = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x), _mm512_mul_ps(hi, _mm512_loadu_ps(x + 16)));
    acc0[0] = _mm512_fmadd_ps(t, d, acc0[0]);
  } else {
    const __m512 lod = _mm512_mul_ps(lo, d);
    const __m512 hid = _mm512_mul_ps(hi, d);
    for (int r = 0; r < M; ++r) {
      const float* xr = x + r * ldx;
      acc0[r] = _mm512_fmadd_ps(lod, _mm512_loadu_ps(xr), acc0[r]);
      acc1[r] = _mm512_fmadd_ps(hid, _mm512_loadu_ps(xr + 16), acc1[r]);
    }
  }
}

template <int M>
PEFT_TARGET_AVX512 void q4_0_dot_avx512_m(const block_q4_0* blocks, index nb, index n,
                                          const float* x, index ldx, float* y, index ldy) {
  // Skinny batches have few accumulators: two blocks per step keep four FMA chains in flight.
  constexpr int sets = M <= 2 ? 2 : 1;
  alignas(64) float values[16];
  for (int i = 0; i < 16; ++i) values[i] = static_cast<float>(i - 8);
  const __m512 table = _mm512_load_ps(values);
  for (index j = 0; j < n; ++j) {
    const block_q4_0* row = blocks + j * nb;
    __m512 acc[sets][2][M];
    for (int s = 0; s < sets; ++s) {
      for (int r = 0; r < M; ++r) acc[s][0][r] = acc[s][1][r] = _mm512_setzero_ps();
    }
    index b = 0;
    for (; b + sets <= nb; b += sets) {
      for (int s = 0; s < sets; ++s) {
        q4_0_block_avx512<M>(row[b + s], table, x + (b + s) * q4_0_block_size, ldx, acc[s][0], acc[s][1]);
      }
    }
    for (; b < nb; ++b) q4_0_block_avx512<M>(row[b], table, x + b * q4_0_block_size, ldx, acc[0][0], acc[0][1]);
    for (int r = 0; r < M; ++r) {
      __m512 t = _mm512_add_ps(acc[0][0][r], acc[0][1][r]);
      if constexpr (sets == 2) t = _mm512_add_ps(t, _mm512_add_ps(acc[1][0][r], acc[1][1][r]));
      y[r * ldy + j] = hsum_avx512(t);
    }
  }
}

template <int M>
PEFT_TARGET_AVX512 void nf4_dot_avx512_m(const nf4_rows& w, index n, const float* x, index ldx,
                                         float* y, index ldy) {
  const __m512 table = _mm512_loadu_ps(nf4_values.data());
  const __m128i m4 = _mm_set1_epi8(15);
  const index half = w.in / 2;
  const index blocks = w.in / nf4_block_size;
  for (index j = 0; j < n; ++j) {
    const std::uint8_t* row = w.packed + j * half;
    const float* am = w.absmax + j * blocks;
    __m512 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (index b = 0; b < blocks; ++b) {
      const __m512 a = _mm512_set1_ps(am[b]);
      for (int h = 0; h < 2; ++h) {  // two halves of 32 weights (16 bytes)
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 32 + h * 16));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);  // even elements
        const __m128i lo = _mm_and_si128(v, m4);                      // odd elements
        const __m512i i0 = _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_unpacklo_epi8(hi, lo));
        const __m512i i1 = _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_unpackhi_epi8(hi, lo));
        const __m512 w0 = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(0xFFFF, i0, table), a);
        const __m512 w1 = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(0xFFFF, i1, table), a);
        for (int r = 0; r < M; ++r) {
          const float* xr = x + r * ldx + b * nf4_block_size + h * 32;
          acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc0[r]);
          acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc1[r]);
        }
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = hsum_avx512(_mm512_add_ps(acc0[r], acc1[r]));
  }
}

// Batch-size switches: one instantiation per m keeps the accumulators in registers.
#define PEFT_QUANT_SWITCH_M(call)                \
  switch (m) {                                   \
    case 1: call(1); break;                      \
    case 2: call(2); break;                      \
    case 3: call(3); break;                      \
    case 4: call(4); break;                      \
    case 5: call(5); break;                      \
    case 6: call(6); break;                      \
    case 7: call(7); break;                      \
    default: call(8); break;                     \
  }

PEFT_TARGET_AVX2 inline void int8_dot_avx2(const std::int8_t* q, const float* scale, index in,
                                           index n, const float* x, index ldx, index m, float* y,
                                           index ldy) {
#define PEFT_CALL(M) int8_dot_avx2_m<M>(q, scale, in, n, x, ldx, y, ldy)
  PEFT_QUANT_SWITCH_M(PEFT_CALL)
#undef PEFT_CALL
}
PEFT_TARGET_AVX512 inline void int8_dot_avx512(const std::int8_t* q, const float* scale, index in,
                                               index n, const float* x, index ldx, index m,
                                               float* y, index ldy) {
#define PEFT_CALL(M) int8_dot_avx512_m<M>(q, scale, in, n, x, ldx, y, ldy)
  PEFT_QUANT_SWITCH_M(PEFT_CALL)
#undef PEFT_CALL
}
PEFT_TARGET_AVX2 inline void q4_0_dot_avx2(const block_q4_0* blocks, index nb, index n,
                                           const float* x, index ldx, index m, float* y,
                                           index ldy) {
#define PEFT_CALL(M) q4_0_dot_avx2_m<M>(blocks, nb, n, x, ldx, y, ldy)
  PEFT_QUANT_SWITCH_M(PEFT_CALL)
#undef PEFT_CALL
}
PEFT_TARGET_AVX512 inline void q4_0_dot_avx512(const block_q4_0* blocks, index nb, index n,
                                               const float* x, index ldx, index m, float* y,
                                               index ldy) {
#define PEFT_CALL(M) q4_0_dot_avx512_m<M>(blocks, nb, n, x, ldx, y, ldy)
  PEFT_QUANT_SWITCH_M(PEFT_CALL)
#undef PEFT_CALL
}
PEFT_TARGET_AVX2 inline void nf4_dot_avx2(const nf4_rows& w, index n, const float* x, index ldx,
                                          index m, float* y, index ldy) {
#define PEFT_CALL(M) nf4_dot_avx2_m<M>(w, n, x, ldx, y, ldy)
  PEFT_QUANT_SWITCH_M(PEFT_CALL)
#undef PEFT_CALL
}
PEFT_TARGET_AVX512 inline void nf4_dot_avx512(const nf4_rows& w, index n, const float* x,
                                              index ldx, index m, float* y, index ldy) {
#define PEFT_CALL(M) nf4_dot_avx512_m<M>(w, n, x, ldx, y, ldy)
  PEFT_QUANT_SWITCH_M(PEFT_CALL)
#undef PEFT_CALL
}
#undef PEFT_QUANT_SWITCH_M

#endif  // PEFT_X86_DISPATCH

}  // namespace detail

// ---- dispatch -------------------------------------------------------------------------------------

/// int8 rows (in per row): y(r, j) = scale[j] sum_p q[j, p] x(r, p). m <= max_dot_rows.
inline void int8_dot(isa which, const std::int8_t* q, const float* scale, index in, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  switch (which) {
#if PEFT_X86_DISPATCH
    case isa::avx512: return detail::int8_dot_avx512(q, scale, in, n, x, ldx, m, y, ldy);
    case isa::avx2: return detail::int8_dot_avx2(q, scale, in, n, x, ldx, m, y, ldy);
#endif
    case isa::portable: return detail::int8_dot_portable(q, scale, in, n, x, ldx, m, y, ldy);
    default: return reference::int8_dot(q, scale, in, n, x, ldx, m, y, ldy);
  }
}

/// q4_0 rows of nb blocks; x holds nb * 32 readable values per row, zero past in_features.
inline void q4_0_dot(isa which, const block_q4_0* blocks, index nb, index n, const float* x,
                     index ldx, index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  switch (which) {
#if PEFT_X86_DISPATCH
    case isa::avx512: return detail::q4_0_dot_avx512(blocks, nb, n, x, ldx, m, y, ldy);
    case isa::avx2: return detail::q4_0_dot_avx2(blocks, nb, n, x, ldx, m, y, ldy);
#endif
    case isa::portable: return detail::q4_0_dot_portable(blocks, nb, n, x, ldx, m, y, ldy);
    default: return reference::q4_0_dot(blocks, nb, n, x, ldx, m, y, ldy);
  }
}

/// nf4 rows with in % 64 == 0 (row j's blocks are its own).
inline void nf4_dot(isa which, const nf4_rows& w, index n, const float* x, index ldx, index m,
                    float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  switch (which) {
#if PEFT_X86_DISPATCH
    case isa::avx512: return detail::nf4_dot_avx512(w, n, x, ldx, m, y, ldy);
    case isa::avx2: return detail::nf4_dot_avx2(w, n, x, ldx, m, y, ldy);
#endif
    case isa::portable: return detail::nf4_dot_portable(w, n, x, ldx, m, y, ldy);
    default: return reference::nf4_dot(w, n, x, ldx, m, y, ldy);
  }
}

}  // namespace peft::kernels
