// peft/base/formats/int8_rowwise.hpp — the int8 row-wise weight format: one place for its rule.
//
//   float scale = formats::quantize_int8_row(row, in, q);    // q[0..in) int8, one f32 scale
//   formats::dequantize_int8_row(q, scale, in, out);         // out[j] = q[j] * scale
//
// Symmetric absmax per row: scale = absmax / 127 in f32, q = round(w / scale) to nearest (ties
// to even, computed in double), clamped to [-127, 127]; a zero row has scale 0 and codes 0.
// Every element decodes within scale / 2 of its f32 value.
//
// Formats are a leaf layer beside core/: they depend on core/ only, and both the base policy
// (base/int8_rowwise.hpp) and the kernels (kernels/*/quantized.hpp) include them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "peft/core/matrix_view.hpp"

namespace peft::formats {

/// The largest code magnitude (the codes are symmetric: -127 .. 127).
inline constexpr int int8_rowwise_max_code = 127;

/// Quantizes row[0..n) into q[0..n) and returns the row's scale.
inline float quantize_int8_row(const float* row, index n, std::int8_t* q) noexcept {
  float absmax = 0.0f;
  for (index j = 0; j < n; ++j) absmax = std::max(absmax, std::abs(row[j]));
  const float scale = absmax / static_cast<float>(int8_rowwise_max_code);
  constexpr double limit = int8_rowwise_max_code;
  for (index j = 0; j < n; ++j) {
    const double v = scale > 0.0f ? std::nearbyint(static_cast<double>(row[j]) / scale) : 0.0;
    q[j] = static_cast<std::int8_t>(std::clamp(v, -limit, limit));
  }
  return scale;
}

/// out[0..n) = q[0..n) * scale, each product computed in double and rounded once to T.
template <class T>
void dequantize_int8_row(const std::int8_t* q, float scale, index n, T* out) noexcept {
  const double s = scale;
  for (index j = 0; j < n; ++j) out[j] = static_cast<T>(q[j] * s);
}

}  // namespace peft::formats
