// peft/base/formats/q4_k.hpp — ggml's Q4_K super-block format: one place for its layout and its
// rule.
//
//   formats::block_q4_k b;
//   bool ok = formats::quantize_q4_k_block(x, b);   // x[0..256): ggml's quantize_row_q4_K_ref
//   formats::decode_q4_k_block(b, out);             // out[p] = d sc[s] q - dmin m[s], s = p / 32
//
// A block is 256 consecutive weights of a row in 8 sub-blocks of 32: the fp16 super-scales d and
// dmin, 12 bytes packing a 6-bit scale code sc[s] and a 6-bit min code m[s] per sub-block, then
// 128 bytes of 4-bit codes (144 bytes, as ggml stores it). Scale codes: for s < 4, sc[s] is the
// low 6 bits of scales[s] and m[s] those of scales[s + 4]; for s >= 4, sc[s] is the low nibble of
// scales[s + 4] with the top 2 bits of scales[s - 4] above it, m[s] the high nibble of
// scales[s + 4] with the top 2 bits of scales[s]. Codes: bytes [32 c, 32 c + 32) hold weights
// 64 c + l in their low nibbles and 64 c + 32 + l in their high nibbles (l < 32).
//
// Quantization, on f32 values in f32 arithmetic (products rounded before any sum, as ggml's
// portable build computes them):
// - per sub-block, weights w_i = sqrt(mean(x^2)) + |x_i| and ggml's make_qkx2_quants search
//   (nmax 15, rmin -1, rdelta 0.1, 20 steps, weighted squared error) fit a scale s and an offset
//   min <= 0, x ~ s q + min;
// - d = max s / 63 and dmin = max(-min) / 63, stored rounded to fp16 (nearest even);
//   sc = min(63, round(63 s / max s)) and m = min(63, round(63 (-min) / max(-min))), ties to even;
// - q = clamp(round((x + dmin m) / (d sc)), 0, 15) with the stored d and dmin; a sub-block whose
//   d sc is 0 keeps the codes of the search (it decodes to -dmin m whatever they are).
// Decoding: every weight is on its sub-block's grid d sc q - dmin m (q = 0..15). A weight inside
// the grid's range [-dmin m, 15 d sc - dmin m] is within d sc / 2 of its value (plus f32
// rounding of the division); one outside it (the search may clip a sub-block's extremes, and the
// 6-bit codes may shorten its range) decodes to the nearer end.
//
// Formats are a leaf layer beside core/: they depend on core/ only, and both the base policy
// (base/q4_k.hpp) and the kernels (kernels/*/quantized.hpp) include them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "peft/base/formats/detail/ggml_arithmetic.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::formats {

/// Weights per q4_k super-block (ggml's QK_K).
inline constexpr index q4_k_block_size = 256;

/// One q4_k super-block, ggml's block_q4_K.
struct block_q4_k {
  std::uint16_t d;            // fp16 bits: the scale of the scale codes
  std::uint16_t dmin;         // fp16 bits: the scale of the min codes
  std::uint8_t scales[12];    // 8 scale codes and 8 min codes of 6 bits (see the file comment)
  std::uint8_t qs[128];       // 4-bit codes, two weights 32 apart per byte
};
static_assert(sizeof(block_q4_k) == 144, "block_q4_k must match ggml's 144-byte layout");

/// The 6-bit scale code sc and min code m of sub-block s (0..7) from a block's 12 scale bytes.
inline void q4_k_scale_min(const std::uint8_t* scales, int s, std::uint8_t& sc, std::uint8_t& m) noexcept {
  if (s < 4) {
    sc = static_cast<std::uint8_t>(scales[s] & 63);
    m = static_cast<std::uint8_t>(scales[s + 4] & 63);
  } else {
    sc = static_cast<std::uint8_t>((scales[s + 4] & 15) | ((scales[s - 4] >> 6) << 4));
    m = static_cast<std::uint8_t>((scales[s + 4] >> 4) | ((scales[s] >> 6) << 4));
  }
}

/// The scale codes of all 8 sub-blocks of a block.
inline void q4_k_scale_mins(const block_q4_k& b, std::uint8_t sc[8], std::uint8_t m[8]) noexcept {
  for (int s = 0; s < 8; ++s) q4_k_scale_min(b.scales, s, sc[s], m[s]);
}

namespace detail {

/// ggml's make_qkx2_quants with Q4_K's parameters on one sub-block of 32: fits x ~ scale * L +
/// min (min <= 0), writes the codes L (0..15) and -min, returns the scale.
inline float q4_k_fit(const float* x, const float* weights, std::uint8_t* codes, float& neg_min) noexcept {
  constexpr int n = 32;
  constexpr int nmax = 15;
  constexpr float rmin = -1.0f;
  constexpr float rdelta = 0.1f;
  constexpr int steps = 20;
  float lo = x[0];
  float hi = x[0];
  float sum_w = weights[0];
  float sum_x = product(sum_w, x[0]);
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    sum_w += weights[i];
    sum_x += product(weights[i], x[i]);
  }
  if (lo > 0.0f) lo = 0.0f;
  if (hi == lo) {
    std::fill(codes, codes + n, std::uint8_t{0});
    neg_min = -lo;
    return 0.0f;
  }
  // As in ggml, every step searches from the best (scale, min) so far: min moves with it.
  float min = lo;
  float iscale = static_cast<float>(nmax) / (hi - min);
  float scale = 1.0f / iscale;
  float best_error = 0.0f;
  for (int i = 0; i < n; ++i) {
    codes[i] = static_cast<std::uint8_t>(std::clamp(nearest_int(iscale * (x[i] - min)), 0, nmax));
    const float diff = product(scale, static_cast<float>(codes[i])) + min - x[i];
    best_error += product(weights[i], diff * diff);
  }
  std::uint8_t trial[n];
  for (int step = 0; step <= steps; ++step) {
    iscale = (rmin + product(rdelta, static_cast<float>(step)) + static_cast<float>(nmax)) / (hi - min);
    float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = std::clamp(nearest_int(iscale * (x[i] - min)), 0, nmax);
      trial[i] = static_cast<std::uint8_t>(l);
      const float wl = product(weights[i], static_cast<float>(l));
      sum_l += wl;
      sum_l2 += product(wl, static_cast<float>(l));
      sum_xl += product(wl, x[i]);
    }
    const float det = product(sum_w, sum_l2) - product(sum_l, sum_l);
    if (det > 0.0f) {
      float this_scale = (product(sum_w, sum_xl) - product(sum_x, sum_l)) / det;
      float this_min = (product(sum_l2, sum_x) - product(sum_l, sum_xl)) / det;
      if (this_min > 0.0f) {
        this_min = 0.0f;
        this_scale = sum_xl / sum_l2;
      }
      float error = 0.0f;
      for (int i = 0; i < n; ++i) {
        const float diff = product(this_scale, static_cast<float>(trial[i])) + this_min - x[i];
        error += product(weights[i], diff * diff);
      }
      if (error < best_error) {
        std::copy(trial, trial + n, codes);
        best_error = error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  neg_min = -min;
  return scale;
}

}  // namespace detail

/// ggml's quantize_row_q4_K_ref on one super-block x[0..256) (pad a partial block with zeros).
/// Returns false, leaving `out` unchanged, when d or dmin is beyond fp16's range (|w| above
/// about 4e6).
inline bool quantize_q4_k_block(const float* x, block_q4_k& out) noexcept {
  std::uint8_t codes[256];
  float weights[32];
  float scale[8];
  float neg_min[8];
  float max_scale = 0.0f;
  float max_min = 0.0f;
  for (int s = 0; s < 8; ++s) {
    const float* xs = x + 32 * s;
    float sum_x2 = 0.0f;
    for (int l = 0; l < 32; ++l) sum_x2 += detail::product(xs[l], xs[l]);
    const float av_x = std::sqrt(sum_x2 / 32.0f);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::abs(xs[l]);
    scale[s] = detail::q4_k_fit(xs, weights, codes + 32 * s, neg_min[s]);
    if (scale[s] > max_scale) max_scale = scale[s];
    if (neg_min[s] > max_min) max_min = neg_min[s];
  }
  const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
  block_q4_k b;
  for (int s = 0; s < 8; ++s) {
    // ggml stores the rounded code in a byte (modulo 256) before capping it at 63.
    const auto ls = std::min<std::uint8_t>(63, static_cast<std::uint8_t>(detail::nearest_int(inv_scale * scale[s])));
    const auto lm = std::min<std::uint8_t>(63, static_cast<std::uint8_t>(detail::nearest_int(inv_min * neg_min[s])));
    if (s < 4) {
      b.scales[s] = ls;
      b.scales[s + 4] = lm;
    } else {
      b.scales[s + 4] = static_cast<std::uint8_t>((ls & 15) | ((lm & 15) << 4));
      b.scales[s - 4] = static_cast<std::uint8_t>(b.scales[s - 4] | ((ls >> 4) << 6));
      b.scales[s] = static_cast<std::uint8_t>(b.scales[s] | ((lm >> 4) << 6));
    }
  }
  if (!detail::to_fp16(max_scale / 63.0f, b.d) || !detail::to_fp16(max_min / 63.0f, b.dmin)) return false;
  const float d = half_to_float(b.d);
  const float dmin = half_to_float(b.dmin);
  for (int s = 0; s < 8; ++s) {
    std::uint8_t sc = 0, m = 0;
    q4_k_scale_min(b.scales, s, sc, m);
    const float ds = d * static_cast<float>(sc);  // exact: 11 x 6 significant bits
    if (ds == 0.0f) continue;
    const float dm = dmin * static_cast<float>(m);  // exact
    for (int l = 0; l < 32; ++l) {
      const int q = detail::nearest_int((x[32 * s + l] + dm) / ds);
      codes[32 * s + l] = static_cast<std::uint8_t>(std::clamp(q, 0, 15));
    }
  }
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      b.qs[32 * c + l] = static_cast<std::uint8_t>(codes[64 * c + l] | (codes[64 * c + 32 + l] << 4));
    }
  }
  out = b;
  return true;
}

/// out[0..256) = the 256 weights of a block, d sc q - dmin m computed in double and rounded to T
/// (once: ggml's f32 dequantization gives the same f32 values, as d sc, d sc q and dmin m are
/// exact in f32 and its subtraction rounds once).
template <class T>
void decode_q4_k_block(const block_q4_k& b, T* out) noexcept {
  const double d = half_to_float(b.d);
  const double dmin = half_to_float(b.dmin);
  std::uint8_t sc[8], m[8];
  q4_k_scale_mins(b, sc, m);
  for (int c = 0; c < 4; ++c) {
    const double d0 = d * sc[2 * c], m0 = dmin * m[2 * c];
    const double d1 = d * sc[2 * c + 1], m1 = dmin * m[2 * c + 1];
    for (int l = 0; l < 32; ++l) {
      const std::uint8_t v = b.qs[32 * c + l];
      out[64 * c + l] = static_cast<T>(d0 * (v & 15) - m0);
      out[64 * c + 32 + l] = static_cast<T>(d1 * (v >> 4) - m1);
    }
  }
}

}  // namespace peft::formats
