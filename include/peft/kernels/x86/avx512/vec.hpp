// peft/kernels/x86/avx512/vec.hpp — the AVX-512 vector (16 f32 lanes), used by the AVX-512
// linear and quantized kernels; the members are those of kernels/portable/vec.hpp, with masked
// partial loads and stores. Compiled for the AVX-512 target; empty on other architectures.
#pragma once

#include "peft/kernels/isa.hpp"
#include "peft/kernels/x86/avx2/vec.hpp"

#if PEFT_X86_DISPATCH
#include <immintrin.h>

PEFT_BEGIN_TARGET_AVX512
namespace peft::kernels::avx512 {

struct vec {
  using reg = __m512;
  static constexpr int width = 16;
  static constexpr bool has_partial = true;
  static __mmask16 mask(int n) noexcept { return static_cast<__mmask16>((1u << n) - 1u); }
  static reg zero() noexcept { return _mm512_setzero_ps(); }
  static reg load(const float* p) noexcept { return _mm512_loadu_ps(p); }
  static reg load_n(const float* p, int n) noexcept { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store(float* p, reg v) noexcept { _mm512_storeu_ps(p, v); }
  static void store_n(float* p, reg v, int n) noexcept { _mm512_mask_storeu_ps(p, mask(n), v); }
  static reg set1(float a) noexcept { return _mm512_set1_ps(a); }
  static reg add(reg a, reg b) noexcept { return _mm512_add_ps(a, b); }
  static reg fma(reg a, reg b, reg c) noexcept { return _mm512_fmadd_ps(a, b, c); }
  /// The two 256-bit halves added, then AVX2's sum. The all-lanes maskz extract avoids GCC 12's
  /// false -Wmaybe-uninitialized on the _mm512_undefined_* operand of the unmasked forms (and on
  /// the undefined upper half of castps512_ps256); it is the same instruction.
  static float sum(reg v) noexcept {
    const __m512d d = _mm512_castps_pd(v);
    const __m256 lo = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xFF, d, 0));
    const __m256 hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xFF, d, 1));
    return avx2::vec::sum(_mm256_add_ps(lo, hi));
  }
};

}  // namespace peft::kernels::avx512
PEFT_END_TARGET

#endif  // PEFT_X86_DISPATCH
