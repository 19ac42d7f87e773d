// peft/kernels/portable/vec.hpp — the portable ISA's vector: an xsimd batch of f32 of the build's
// default architecture (SSE2 without -march), used by the portable linear and quantized kernels.
//
// Every ISA folder has one such `vec` with the same members:
//   reg, width, zero(), load(p), store(p, v), set1(a), add(a, b), fma(a, b, c) = a * b + c,
//   sum(v) (the horizontal sum), and has_partial; with has_partial, load_n(p, n) / store_n(p, v,
//   n) touch only the first n < width lanes (the others read as zero), otherwise they are never
//   called and the kernels finish tails with scalar loops.
#pragma once

#include <xsimd/xsimd.hpp>

namespace peft::kernels::portable {

struct vec {
  using reg = xsimd::batch<float>;
  static constexpr int width = static_cast<int>(reg::size);
  static constexpr bool has_partial = false;
  static reg zero() noexcept { return reg(0.0f); }
  static reg load(const float* p) noexcept { return reg::load_unaligned(p); }
  static reg load_n(const float*, int) noexcept { return zero(); }
  static void store(float* p, reg v) noexcept { v.store_unaligned(p); }
  static void store_n(float*, reg, int) noexcept {}
  static reg set1(float a) noexcept { return reg(a); }
  static reg add(reg a, reg b) noexcept { return a + b; }
  static reg fma(reg a, reg b, reg c) noexcept { return xsimd::fma(a, b, c); }
  static float sum(reg v) noexcept { return xsimd::hadd(v); }
};

}  // namespace peft::kernels::portable
