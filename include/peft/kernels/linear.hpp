// peft/kernels/linear.hpp — the fused f32 product of a frozen linear layer, forward and backward.
//
//   kernels::linear_nt(x, w, bias, y, epi)   y = x W^T + b, then epi(i0, j0, tile) per output tile
//   kernels::linear_nn(dy, w, dx, accumulate) dx = dy W (+ dx)
//
// x (m, k), W (n, k) row-major as nn.Linear stores it, y (m, n); all f32, rows may be strided.
// Forward multiplies rows of x against rows of W directly (both contiguous along k: no packing,
// no transposition), in 4 x 4 tiles of vector accumulators reduced once per k-slice; W is read
// from memory once per call for batches up to `skinny_rows` and once per block of that many rows
// beyond (large batches go to Eigen's packed GEMM: see eigen_forward_rows). Threads (OpenMP) split the output columns, i.e. the rows of W, so each thread streams
// its own part of the weight. The epilogue (kernels/epilogue.hpp) runs on each finished tile of at
// most `tile_rows` x `tile_cols` outputs while it is still in cache: this is where adapters add
// their terms.
//
// Versions (kernels/isa.hpp): reference (kernels/reference/gemm.hpp, double accumulation),
// portable (xsimd), avx2, avx512 — the same algorithm over different vector types.
#pragma once

#include <algorithm>
#include <xsimd/xsimd.hpp>

#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/epilogue.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/parallel.hpp"
#include "peft/interop/eigen.hpp"
#include "peft/kernels/reference/gemm.hpp"

namespace peft::kernels {

namespace detail::portable_linear {
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
  static reg fma(reg a, reg b, reg c) noexcept { return xsimd::fma(a, b, c); }
  static float sum(reg v) noexcept { return xsimd::hadd(v); }
};
#include "peft/kernels/detail/linear_body.inc"
}  // namespace detail::portable_linear

#if PEFT_X86_DISPATCH
PEFT_BEGIN_TARGET_AVX2
namespace detail::avx2_linear {
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
  static reg fma(reg a, reg b, reg c) noexcept { return _mm256_fmadd_ps(a, b, c); }
  static float sum(reg v) noexcept {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#include "peft/kernels/detail/linear_body.inc"
}  // namespace detail::avx2_linear
PEFT_END_TARGET

PEFT_BEGIN_TARGET_AVX512
namespace detail::avx512_linear {
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
  static reg fma(reg a, reg b, reg c) noexcept { return _mm512_fmadd_ps(a, b, c); }
  static float sum(reg v) noexcept {
    // extractf32x8 rather than castps512_ps256: g++ 12 warns about the latter's undefined upper half.
    const __m256 h = _mm256_add_ps(_mm512_extractf32x8_ps(v, 0), _mm512_extractf32x8_ps(v, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#include "peft/kernels/detail/linear_body.inc"
}  // namespace detail::avx512_linear
PEFT_END_TARGET
#endif

namespace detail {

using block_nt_fn = void (*)(const float*, index, index, const float*, index, index, index, float*,
                             index);
using block_nn_fn = void (*)(const float*, index, index, const float*, index, index, index, float*,
                             index, bool);

/// The scalar truth in the same block shape (double accumulation).
inline void reference_block_nt(const float* x, index ldx, index m, const float* w, index ldw,
                               index n, index k, float* y, index ldy) {
  reference::gemm_nt<float, float>(1.0, matrix_view<const float>(x, m, k, ldx),
                                   matrix_view<const float>(w, n, k, ldw), 0.0,
                                   matrix_view<float>(y, m, n, ldy));
}
inline void reference_block_nn(const float* dy, index lddy, index m, const float* w, index ldw,
                               index n, index cols, float* dx, index lddx, bool accumulate) {
  reference::gemm_nn<float, float>(1.0, matrix_view<const float>(dy, m, n, lddy),
                                   matrix_view<const float>(w, n, cols, ldw), accumulate ? 1.0 : 0.0,
                                   matrix_view<float>(dx, m, cols, lddx));
}

inline block_nt_fn select_block_nt(isa i) noexcept {
  switch (i) {
#if PEFT_X86_DISPATCH
    case isa::avx512: return &avx512_linear::block_nt;
    case isa::avx2: return &avx2_linear::block_nt;
#endif
    case isa::portable: return &portable_linear::block_nt;
    default: return &reference_block_nt;
  }
}
inline block_nn_fn select_block_nn(isa i) noexcept {
  switch (i) {
#if PEFT_X86_DISPATCH
    case isa::avx512: return &avx512_linear::block_nn;
    case isa::avx2: return &avx2_linear::block_nn;
#endif
    case isa::portable: return &portable_linear::block_nn;
    default: return &reference_block_nn;
  }
}

/// tile[i, j] += bias[j0 + j]; nothing when bias is null.
inline void add_bias(matrix_view<float> tile, const float* bias, index j0) noexcept {
  if (bias == nullptr) return;
  for (index i = 0; i < tile.rows(); ++i) {
    float* r = tile.row(i);
    for (index j = 0; j < tile.cols(); ++j) r[j] += bias[j0 + j];
  }
}

}  // namespace detail

/// Output tile of the forward product: rows of x per tile (W is re-read once per this many rows)
/// and rows of W per tile (the epilogue's granularity and the threads' grain).
inline constexpr index tile_rows = 256;
inline constexpr index tile_cols = 64;

/// Batches from this many rows on hand the dense forward product to Eigen's packed GEMM, which is
/// faster there (m = 512, k = n = 4096, 2 threads on Zen 4: ~290 GFLOP/s against ~255 for the
/// tiles above); bias and epilogue then follow tile by tile in a second threaded pass.
inline constexpr index eigen_forward_rows = 256;
/// Backward (dx = dy W) uses the tiles above for 2 <= m < eigen_backward_rows and Eigen otherwise
/// (Eigen's GEMV streams W better at m = 1; its packed GEMM wins from m = 32 on, measured).
inline constexpr index eigen_backward_rows = 32;

/// y = x W^T + b (bias may be null: none), then epi(i0, j0, tile) on every finished tile.
template <class Epi = no_epilogue>
  requires epilogue_for<Epi, float>
void linear_nt(matrix_view<const float> x, matrix_view<const float> w, const float* bias,
               matrix_view<float> y, const Epi& epi = {}) {
  constexpr const char* where = "kernels::linear_nt";
  peft::detail::expect_shape(where, "w", w, w.rows(), x.cols());
  peft::detail::expect_shape(where, "y", y, x.rows(), w.rows());
  if (y.empty()) return;
  const index m = x.rows(), n = w.rows(), k = x.cols();
  const isa version = active_isa();
  const double work = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  if (m >= eigen_forward_rows && version != isa::reference && k > 0) {
    as_eigen(y).noalias() = as_eigen(x) * as_eigen(w).transpose();
    parallel_ranges(n, tile_cols, static_cast<double>(m) * static_cast<double>(n) * 64.0,
                    [&](index j_first, index j_last) {
      for (index j0 = j_first; j0 < j_last; j0 += tile_cols) {
        const index nc = std::min(tile_cols, j_last - j0);
        for (index i0 = 0; i0 < m; i0 += tile_rows) {
          matrix_view<float> tile = y.block(i0, j0, std::min(tile_rows, m - i0), nc);
          detail::add_bias(tile, bias, j0);
          epi(i0, j0, tile);
        }
      }
    });
    return;
  }
  const detail::block_nt_fn block = detail::select_block_nt(version);
  parallel_ranges(n, tile_cols, work, [&](index j_first, index j_last) {
    for (index j0 = j_first; j0 < j_last; j0 += tile_cols) {
      const index nc = std::min(tile_cols, j_last - j0);
      for (index i0 = 0; i0 < m; i0 += tile_rows) {
        const index mc = std::min(tile_rows, m - i0);
        block(x.row(i0), x.stride(), mc, w.row(j0), w.stride(), nc, k, y.row(i0) + j0, y.stride());
        matrix_view<float> tile = y.block(i0, j0, mc, nc);
        detail::add_bias(tile, bias, j0);
        epi(i0, j0, tile);
      }
    }
  });
}

/// dx = dy W, or dx += dy W with `accumulate`. dy (m, n), W (n, k), dx (m, k).
inline void linear_nn(matrix_view<const float> dy, matrix_view<const float> w, matrix_view<float> dx,
                      bool accumulate = false) {
  constexpr const char* where = "kernels::linear_nn";
  peft::detail::expect_shape(where, "w", w, dy.cols(), w.cols());
  peft::detail::expect_shape(where, "dx", dx, dy.rows(), w.cols());
  if (dx.empty()) return;
  const index m = dy.rows(), n = w.rows(), k = w.cols();
  const isa version = active_isa();
  if (version != isa::reference && (m < 2 || m >= eigen_backward_rows)) {
    if (n == 0) {
      if (!accumulate) as_eigen(dx).setZero();
    } else if (accumulate) {
      as_eigen(dx).noalias() += as_eigen(dy) * as_eigen(w);
    } else {
      as_eigen(dx).noalias() = as_eigen(dy) * as_eigen(w);
    }
    return;
  }
  const detail::block_nn_fn block = detail::select_block_nn(version);
  const double work = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  constexpr index grain = 64;
  parallel_ranges(k, grain, work, [&](index c_first, index c_last) {
    for (index i0 = 0; i0 < m; i0 += tile_rows) {
      const index mc = std::min(tile_rows, m - i0);
      block(dy.row(i0), dy.stride(), mc, w.data() + c_first, w.stride(), n, c_last - c_first,
            dx.row(i0) + c_first, dx.stride(), accumulate);
    }
  });
}

}  // namespace peft::kernels
