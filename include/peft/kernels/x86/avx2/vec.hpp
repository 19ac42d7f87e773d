// peft/kernels/x86/avx2/vec.hpp — the AVX2 vector (8 f32 lanes), used by the AVX2 linear and
// quantized kernels; the members are those of kernels/portable/vec.hpp, with masked partial
// loads and stores. Compiled for the AVX2 target; empty on other architectures.
#pragma once

#include "peft/kernels/isa.hpp"

#if PEFT_X86_DISPATCH
#include <immintrin.h>

PEFT_BEGIN_TARGET_AVX2
namespace peft::kernels::avx2 {

struct vec {
  using reg = __m256;
  static constexpr int width = 8;
  static constexpr bool has_partial = true;
  static __m256i mask(int n) noexcept {
    alignas(32) static const int bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + 8 - n));
  }
  static reg zero() noexcept { return _mm256_setzero_ps(); }
  static reg load(const float* p) noexcept { return _mm256_loadu_ps(p); }
  static reg load_n(const float* p, int n) noexcept { return _mm256_maskload_ps(p, mask(n)); }
  static void store(float* p, reg v) noexcept { _mm256_storeu_ps(p, v); }
  static void store_n(float* p, reg v, int n) noexcept { _mm256_maskstore_ps(p, mask(n), v); }
  static reg set1(float a) noexcept { return _mm256_set1_ps(a); }
  static reg add(reg a, reg b) noexcept { return _mm256_add_ps(a, b); }
  static reg fma(reg a, reg b, reg c) noexcept { return _mm256_fmadd_ps(a, b, c); }
  static float sum(reg v) noexcept {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

}  // namespace peft::kernels::avx2
PEFT_END_TARGET

#endif  // PEFT_X86_DISPATCH
