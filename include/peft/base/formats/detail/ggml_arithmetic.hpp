// peft/base/formats/detail/ggml_arithmetic.hpp — the f32 arithmetic ggml's reference quantizers
// (ggml-quants.c, *_ref) are written in, made explicit so our quantizers give their bytes.
//
// ggml's portable library is compiled without FMA, so every product is rounded to f32 before it
// is added; a compiler allowed to contract (GNU mode with -mfma or -march=native) would fuse them
// here and change rare roundings. product() keeps a product separate; nearest_int() is ggml's
// rounding to the nearest integer (ties to even); to_fp16() is its f32 -> fp16 store.
#pragma once

#include <cmath>
#include <cstdint>

#include "peft/core/dtype.hpp"

namespace peft::formats::detail {

/// a * b rounded to f32, never fused into a following add or subtract.
inline float product(float a, float b) noexcept {
  volatile float p = a * b;
  return p;
}

/// v rounded to the nearest integer, ties to even: ggml's nearest_int, which requires
/// |v| <= 2^22 - 1 (values beyond are clamped here; ggml's quantizers never produce them).
inline int nearest_int(float v) noexcept {
  constexpr float limit = 4194303.0f;
  const float c = std::fmin(limit, std::fmax(-limit, v));
  return static_cast<int>(std::nearbyint(c));
}

/// f rounded to fp16 (nearest even) into `bits`; false, leaving `bits` unchanged, when the result
/// is not finite.
inline bool to_fp16(float f, std::uint16_t& bits) noexcept {
  const f16 h(f);
  if (!std::isfinite(static_cast<float>(h))) return false;
  bits = h.bits;
  return true;
}

}  // namespace peft::formats::detail
