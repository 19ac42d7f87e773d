// peft/base/formats/nf4.hpp — bitsandbytes' NF4 format and its double quantization: one place
// for the code tables, the packing and the quantization rules.
//
//   float absmax = formats::quantize_nf4_block(value, e0, e1, packed);   // elements [e0, e1)
//   w = formats::nf4_values[formats::nf4_code(packed, e)] * absmax
//
// As bitsandbytes' quantize_4bit(blocksize=64, quant_type="nf4") on a flattened tensor: blocks
// of 64 elements; element e's 4-bit code sits in byte e / 2, the even element in the high
// nibble; absmax = max |w| of the block (f32) and q = dQuantizeNF4(w * (1 / absmax)), the
// nearest NF4 value (a block of zeros stores absmax 0 and code 7, the value 0).
// Double quantization (compress_statistics=True): offset = mean of the absmaxes (summed in
// double, stored f32); the centred absmaxes absmax - offset are quantized in groups of 256 to
// 8-bit codes of the signed dynamic map with one f32 absmax per group (quantize_blockwise); the
// decoded absmax is dynamic_map()[code] * group absmax + offset in f32.
// nf4_rows is how the kernels read an nf4 tensor whose rows own whole blocks.
//
// Formats are a leaf layer beside core/: they depend on core/ only, and both the base policy
// (base/nf4.hpp) and the kernels (kernels/*/quantized.hpp) include them.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "peft/core/matrix_view.hpp"

namespace peft::formats {

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

/// The 4-bit code of flattened element e (even elements in the high nibble).
inline std::uint8_t nf4_code(const std::uint8_t* packed, index e) noexcept {
  const std::uint8_t byte = packed[e / 2];
  return static_cast<std::uint8_t>(e % 2 == 0 ? byte >> 4 : byte & 15);
}

/// Stores code q of flattened element e, keeping the other nibble of its byte.
inline void set_nf4_code(std::uint8_t* packed, index e, std::uint8_t q) noexcept {
  std::uint8_t& byte = packed[e / 2];
  byte = static_cast<std::uint8_t>(e % 2 == 0 ? (byte & 0x0f) | (q << 4) : (byte & 0xf0) | q);
}

/// Quantizes elements [e0, e1) of a flattened tensor (`value(e)` gives element e as f32) into
/// their codes in `packed`, and returns the block's absmax.
template <class Value>
float quantize_nf4_block(const Value& value, index e0, index e1, std::uint8_t* packed) {
  float am = 0.0f;
  for (index e = e0; e < e1; ++e) am = std::max(am, std::abs(value(e)));
  const float inv = am > 0.0f ? 1.0f / am : 0.0f;
  for (index e = e0; e < e1; ++e) set_nf4_code(packed, e, nf4_encode(value(e) * inv));
  return am;
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

/// Double quantization of nb block absmaxes: writes one code per block and one f32 absmax per
/// group of nf4_group_size blocks (ceil(nb / 256) of them), and returns the offset.
inline float quantize_nf4_absmax(const float* absmax, index nb, std::uint8_t* codes,
                                 float* group_absmax) noexcept {
  double sum = 0.0;
  for (index b = 0; b < nb; ++b) sum += absmax[b];
  const auto offset = static_cast<float>(sum / static_cast<double>(nb));
  const index ng = (nb + nf4_group_size - 1) / nf4_group_size;
  for (index g = 0; g < ng; ++g) {
    const index b0 = g * nf4_group_size;
    const index b1 = std::min(nb, b0 + nf4_group_size);
    float am2 = 0.0f;
    for (index b = b0; b < b1; ++b) am2 = std::max(am2, std::abs(absmax[b] - offset));
    group_absmax[g] = am2;
    const float inv = am2 > 0.0f ? 1.0f / am2 : 0.0f;
    for (index b = b0; b < b1; ++b) codes[b] = dynamic_encode((absmax[b] - offset) * inv);
  }
  return offset;
}

/// The absmax a double-quantized block decodes with (f32 arithmetic, as bitsandbytes).
inline float dequantize_nf4_absmax(std::uint8_t code, float group_absmax, float offset) noexcept {
  float a = dynamic_map()[code] * group_absmax;
  a += offset;
  return a;
}

/// An nf4 tensor's storage as the kernels read it (rows aligned to blocks: in % 64 == 0).
struct nf4_rows {
  const std::uint8_t* packed;  // row j at packed + j * in / 2
  const float* absmax;         // decoded block absmaxes, row j at absmax + j * in / 64
  index in;                    // a multiple of 64
};

}  // namespace peft::formats
