// peft/base/formats/q6_k.hpp — ggml's Q6_K super-block format: one place for its layout and its
// rule.
//
//   formats::block_q6_k b;
//   bool ok = formats::quantize_q6_k_block(x, b);   // x[0..256): ggml's quantize_row_q6_K_ref
//   formats::decode_q6_k_block(b, out);             // out[p] = d scales[p / 16] (q - 32)
//
// A block is 256 consecutive weights of a row in 16 sub-blocks of 16: 128 bytes of low nibbles
// ql, 64 bytes of high bit pairs qh, 16 signed 8-bit sub-block scales, then the fp16 super-scale
// d (210 bytes, as ggml stores it). Weight p = 128 h + 32 k + l (h < 2, k < 4, l < 32) has the
// 6-bit code q = lo | hi << 4 with lo the low (k = 0, 1) or high (k = 2, 3) nibble of
// ql[64 h + 32 (k % 2) + l] and hi = bits 2k, 2k + 1 of qh[32 h + l].
//
// Quantization, on f32 values in f32 arithmetic (products rounded before any sum, as ggml's
// portable build computes them):
// - per sub-block, ggml's make_qx_quants (nmax 32, weights x^2) fits a signed scale s with
//   x ~ s l, l in [-32, 31] (s = 0 and codes 0 for a sub-block with max |x| below 1e-15);
// - with S the s of largest magnitude (the first on ties): a block whose |S| is below 1e-15 is
//   all zero bytes; otherwise d = S / -128 stored rounded to fp16 (nearest even) and
//   scales = min(127, round(-128 s / S)), ties to even;
// - q = clamp(round(x / (d scales)), -32, 31) + 32 with the stored d; a sub-block whose
//   d scales is 0 keeps the codes of the fit (it decodes to 0 whatever they are).
// Decoding: every weight is on its sub-block's grid d scales (q - 32). A weight within
// [-32.5, 31.5] steps of the grid is within |d scales| / 2 of its value (plus f32 rounding of the
// division); one beyond it decodes to the nearer end (the 8-bit scales may shorten a sub-block's
// range, and a sub-block whose scale rounds to 0 decodes to 0).
//
// Formats are a leaf layer beside core/: they depend on core/ only, and both the base policy
// (base/q6_k.hpp) and the kernels (kernels/*/quantized.hpp) include them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "peft/base/formats/detail/ggml_arithmetic.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::formats {

/// Weights per q6_k super-block (ggml's QK_K).
inline constexpr index q6_k_block_size = 256;

/// One q6_k super-block, ggml's block_q6_K.
struct block_q6_k {
  std::uint8_t ql[128];      // low 4 bits of the codes
  std::uint8_t qh[64];       // high 2 bits of the codes
  std::int8_t scales[16];    // sub-block scales (of d)
  std::uint16_t d;           // fp16 bits: the super-block scale
};
static_assert(sizeof(block_q6_k) == 210, "block_q6_k must match ggml's 210-byte layout");

/// The 6-bit code (0..63) of weight p (0..255) of a block.
inline int q6_k_code(const block_q6_k& b, int p) noexcept {
  const int h = p / 128, k = (p % 128) / 32, l = p % 32;
  const std::uint8_t byte = b.ql[64 * h + 32 * (k % 2) + l];
  const int lo = k < 2 ? (byte & 15) : (byte >> 4);
  const int hi = (b.qh[32 * h + l] >> (2 * k)) & 3;
  return lo | (hi << 4);
}

namespace detail {

/// The codes l (-32..31) of x[0..16) for the scale 1 / iscale, clamped; their weighted sums
/// sum x^3 l and sum x^2 l^2 (in ggml's order of operations).
inline void q6_k_trial(const float* x, float iscale, int* l, float& sum_lx, float& sum_l2) noexcept {
  sum_lx = 0.0f;
  sum_l2 = 0.0f;
  for (int i = 0; i < 16; ++i) {
    l[i] = std::clamp(nearest_int(iscale * x[i]), -32, 31);
    const float w = x[i] * x[i];
    const float li = static_cast<float>(l[i]);
    sum_lx += product(w * x[i], li);
    sum_l2 += product(product(w, li), li);
  }
}

/// ggml's make_qx_quants(16, 32, x, L, rmse_type 1, no importance): writes the codes L (0..63)
/// and returns the scale.
inline float q6_k_fit(const float* x, std::int8_t* codes) noexcept {
  constexpr int nmax = 32;
  float max = 0.0f;
  float amax = 0.0f;
  for (int i = 0; i < 16; ++i) {
    if (std::abs(x[i]) > amax) {
      amax = std::abs(x[i]);
      max = x[i];
    }
  }
  if (amax < 1e-15f) {
    std::fill(codes, codes + 16, std::int8_t{0});
    return 0.0f;
  }
  int l[16];
  float sum_lx = 0.0f, sum_l2 = 0.0f;
  q6_k_trial(x, static_cast<float>(-nmax) / max, l, sum_lx, sum_l2);
  for (int i = 0; i < 16; ++i) codes[i] = static_cast<std::int8_t>(l[i] + nmax);
  float scale = sum_l2 != 0.0f ? sum_lx / sum_l2 : 0.0f;
  float best = scale * sum_lx;
  for (int step = -9; step <= 9; ++step) {
    if (step == 0) continue;
    const float iscale = -(static_cast<float>(nmax) + product(0.1f, static_cast<float>(step))) / max;
    q6_k_trial(x, iscale, l, sum_lx, sum_l2);
    if (sum_l2 > 0.0f && sum_lx * sum_lx > best * sum_l2) {
      for (int i = 0; i < 16; ++i) codes[i] = static_cast<std::int8_t>(l[i] + nmax);
      scale = sum_lx / sum_l2;
      best = scale * sum_lx;
    }
  }
  return scale;
}

}  // namespace detail

/// ggml's quantize_row_q6_K_ref on one super-block x[0..256) (pad a partial block with zeros).
/// Returns false, leaving `out` unchanged, when d is beyond fp16's range (|w| above about 2.7e8).
inline bool quantize_q6_k_block(const float* x, block_q6_k& out) noexcept {
  std::int8_t codes[256];
  float scale[16];
  float max_scale = 0.0f;
  float max_abs_scale = 0.0f;
  for (int s = 0; s < 16; ++s) {
    scale[s] = detail::q6_k_fit(x + 16 * s, codes + 16 * s);
    if (std::abs(scale[s]) > max_abs_scale) {
      max_abs_scale = std::abs(scale[s]);
      max_scale = scale[s];
    }
  }
  block_q6_k b;
  if (max_abs_scale < 1e-15f) {
    std::memset(&b, 0, sizeof b);
    out = b;
    return true;
  }
  const float iscale = -128.0f / max_scale;
  if (!detail::to_fp16(1.0f / iscale, b.d)) return false;
  for (int s = 0; s < 16; ++s) {
    b.scales[s] = static_cast<std::int8_t>(std::min(127, detail::nearest_int(iscale * scale[s])));
  }
  const float d = half_to_float(b.d);
  for (int s = 0; s < 16; ++s) {
    const float ds = d * static_cast<float>(b.scales[s]);  // exact: 11 x 8 significant bits
    if (ds == 0.0f) continue;
    for (int i = 0; i < 16; ++i) {
      const int q = std::clamp(detail::nearest_int(x[16 * s + i] / ds), -32, 31);
      codes[16 * s + i] = static_cast<std::int8_t>(q + 32);
    }
  }
  for (int h = 0; h < 2; ++h) {
    const std::int8_t* c = codes + 128 * h;
    for (int l = 0; l < 32; ++l) {
      b.ql[64 * h + l] = static_cast<std::uint8_t>((c[l] & 15) | ((c[l + 64] & 15) << 4));
      b.ql[64 * h + 32 + l] = static_cast<std::uint8_t>((c[l + 32] & 15) | ((c[l + 96] & 15) << 4));
      b.qh[32 * h + l] = static_cast<std::uint8_t>((c[l] >> 4) | ((c[l + 32] >> 4) << 2) |
                                                   ((c[l + 64] >> 4) << 4) | ((c[l + 96] >> 4) << 6));
    }
  }
  out = b;
  return true;
}

/// out[0..256) = the 256 weights of a block, d scales (q - 32) computed in double and rounded to T
/// (exact in f32 and f64: 11 + 8 + 6 significant bits; ggml's f32 dequantization is the same).
template <class T>
void decode_q6_k_block(const block_q6_k& b, T* out) noexcept {
  const double d = half_to_float(b.d);
  for (int p = 0; p < 256; ++p) out[p] = static_cast<T>(d * b.scales[p / 16] * (q6_k_code(b, p) - 32));
}

}  // namespace peft::formats
