// peft/kernels/reference/quantized.hpp — the quantized weight formats and their scalar truth.
//
// The formats (block structs and code tables) are defined here, next to the reference kernels
// that read them; the vectorised kernels in kernels/quantized.hpp are tested against these.
//   int8 row-wise   q (int8) per weight, one f32 scale per row:        w = q * scale
//   q4_0 (ggml)     blocks of 32 along a row: fp16 d + 16 bytes; byte i = weight i (low nibble)
//                   | weight i + 16 (high nibble):                     w = (q - 8) * d
//   nf4 (bnb)       blocks of 64 over the flattened tensor, first element of a byte in the high
//                   nibble; w = nf4_values[q] * absmax(block)
// A dot kernel computes y[r * ldy + j] = sum_p W[j, p] x[r * ldx + p] for r < m and n
// consecutive weight rows; the reference accumulates in double.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "peft/core/dtype.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::kernels {

// ---- q4_0 ----------------------------------------------------------------------------------

/// Weights per q4_0 block (ggml's QK4_0).
inline constexpr index q4_0_block_size = 32;

/// One q4_0 block, ggml's block_q4_0: the fp16 scale d, then 16 bytes of packed 4-bit codes.
struct block_q4_0 {
  std::uint16_t d;       // IEEE binary16 bits
  std::uint8_t qs[16];   // qs[i] & 15: weight i, qs[i] >> 4: weight i + 16
};
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must match ggml's 18-byte layout");

// ---- nf4 -----------------------------------------------------------------------------------

/// Weights per nf4 block (bitsandbytes' default blocksize for 4-bit).
inline constexpr index nf4_block_size = 64;
/// Block absmaxes per double-quantisation group (bitsandbytes' nested blocksize).
inline constexpr index nf4_group_size = 256;

/// bitsandbytes' NF4 code (functional.py get_4bit_type("nf4"), kernels.cu dDequantizeNF4).
inline constexpr std::array<float, 16> nf4_values{
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f};

/// The NF4 code of a normalised value: bitsandbytes' decision tree (kernels.cu dQuantizeNF4),
/// whose thresholds are the midpoints of neighbouring code values; x == threshold goes down.
inline std::uint8_t nf4_encode(float x) noexcept {
  // Thresholds between code q - 1 and q, for q = 1..15.
  static constexpr float upper[15] = {
      -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
      -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f,
      0.03979014977812767f,  0.1202552504837513f,  0.2035212516784668f,  0.2920137718319893f,
      0.3893125355243683f,   0.5016634166240692f,   0.6427869200706482f,  0.8614784181118011f};
  std::uint8_t q = 0;
  for (float t : upper) q = static_cast<std::uint8_t>(q + (x > t ? 1 : 0));
  return q;
}

/// bitsandbytes' signed dynamic 8-bit map, create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8): for e = 0..6, the 2^e means of neighbouring points of linspace(0.1, 1, 2^e + 1)
/// times 10^(e - 6), both signs, plus 0 and 1, sorted (index 127 is 0, index 255 is 1). Each entry
/// is the exact value rounded once to f32; torch builds it with f32 linspace arithmetic, which
/// can differ in the last bit for a few entries (a checkpoint carries its own map).
inline const std::array<float, 256>& dynamic_map() noexcept {
  static const std::array<float, 256> map = [] {
    std::array<float, 256> m{};
    std::size_t n = 0;
    for (int e = 0; e < 7; ++e) {
      const int items = 1 << e;
      const double scale = std::pow(10.0, e - 6);
      for (int t = 0; t < items; ++t) {
        const double mean = 0.1 + 0.9 * (t + 0.5) / items;
        const auto v = static_cast<float>(scale * mean);
        m[n++] = v;
        m[n++] = -v;
      }
    }
    m[n++] = 0.0f;
    m[n++] = 1.0f;
    // Insertion sort: constant-free and tiny.
    for (std::size_t i = 1; i < m.size(); ++i) {
      const float v = m[i];
      std::size_t j = i;
      for (; j > 0 && m[j - 1] > v; --j) m[j] = m[j - 1];
      m[j] = v;
    }
    return m;
  }();
  return map;
}

/// The dynamic-map code of a normalised value, as bitsandbytes' dQuantize<0> chooses it: a
/// 7-step binary search from index 127, then the nearer of the last probe and its bracketing
/// neighbour (a tie keeps the probe).
inline std::uint8_t dynamic_encode(float x) noexcept {
  const auto& code = dynamic_map();
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[127];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[static_cast<std::size_t>(pivot)];
  }
  if (upper_pivot == 255) upper = code[255];
  if (lower_pivot == 0) lower = code[0];
  if (x > val) {
    const float mid = (upper + val) * 0.5f;
    return static_cast<std::uint8_t>(x > mid ? upper_pivot : pivot);
  }
  const float mid = (lower + val) * 0.5f;
  return static_cast<std::uint8_t>(x < mid ? lower_pivot : pivot);
}

/// An nf4 tensor's storage as the kernels read it (rows aligned to blocks: in % 64 == 0).
struct nf4_rows {
  const std::uint8_t* packed;  // row j at packed + j * in / 2
  const float* absmax;         // decoded block absmaxes, row j at absmax + j * in / 64
  index in;                    // a multiple of 64
};

}  // namespace peft::kernels

namespace peft::kernels::reference {

/// fp16 bits to float (exact).
inline float half_to_float(std::uint16_t bits) noexcept {
  return static_cast<float>(f16::from_bits(bits));
}

/// out[0..32) = the 32 weights of a q4_0 block.
template <class T>
void decode_q4_0_block(const block_q4_0& b, T* out) noexcept {
  const double d = half_to_float(b.d);
  for (int i = 0; i < 16; ++i) {
    out[i] = static_cast<T>((static_cast<int>(b.qs[i] & 15) - 8) * d);
    out[i + 16] = static_cast<T>((static_cast<int>(b.qs[i] >> 4) - 8) * d);
  }
}

/// int8 rows: y(r, j) = scale[j] sum_p q[j, p] x(r, p), in double.
inline void int8_dot(const std::int8_t* q, const float* scale, index in, index n,
                     const float* x, index ldx, index m, float* y, index ldy) noexcept {
  for (index j = 0; j < n; ++j) {
    const std::int8_t* w = q + j * in;
    for (index r = 0; r < m; ++r) {
      double acc = 0.0;
      for (index p = 0; p < in; ++p) acc += static_cast<double>(w[p]) * x[r * ldx + p];
      y[r * ldy + j] = static_cast<float>(acc * scale[j]);
    }
  }
}

/// q4_0 rows of nb blocks: x holds nb * 32 values per row (zero past in_features).
inline void q4_0_dot(const block_q4_0* blocks, index nb, index n, const float* x, index ldx,
                     index m, float* y, index ldy) noexcept {
  double w[q4_0_block_size];
  for (index j = 0; j < n; ++j) {
    for (index r = 0; r < m; ++r) {
      double acc = 0.0;
      for (index b = 0; b < nb; ++b) {
        decode_q4_0_block(blocks[j * nb + b], w);
        const float* xr = x + r * ldx + b * q4_0_block_size;
        for (index p = 0; p < q4_0_block_size; ++p) acc += w[p] * xr[p];
      }
      y[r * ldy + j] = static_cast<float>(acc);
    }
  }
}

/// nf4 rows (in % 64 == 0), first element of each byte in the high nibble.
inline void nf4_dot(const nf4_rows& w, index n, const float* x, index ldx, index m, float* y,
                    index ldy) noexcept {
  const index half = w.in / 2;
  const index blocks = w.in / nf4_block_size;
  for (index j = 0; j < n; ++j) {
    const std::uint8_t* p = w.packed + j * half;
    const float* am = w.absmax + j * blocks;
    for (index r = 0; r < m; ++r) {
      double acc = 0.0;
      for (index e = 0; e < w.in; ++e) {
        const std::uint8_t byte = p[e / 2];
        const int q = (e % 2 == 0) ? (byte >> 4) : (byte & 15);
        const double v = static_cast<double>(nf4_values[static_cast<std::size_t>(q)]) *
                         am[e / nf4_block_size];
        acc += v * x[r * ldx + e];
      }
      y[r * ldy + j] = static_cast<float>(acc);
    }
  }
}

}  // namespace peft::kernels::reference
