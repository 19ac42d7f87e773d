// peft/kernels/linear.hpp — the fused f32 product of a frozen linear layer, forward and backward.
//
//   kernels::linear_nt(x, w, bias, y, epi)   y = x W^T + b, then epi(i0, j0, tile) per output tile
//   kernels::linear_nn(dy, w, dx, accumulate) dx = dy W (+ dx)
//
// x (m, k), W (n, k) row-major as nn.Linear stores it, y (m, n); all f32, rows may be strided.
// Forward multiplies rows of x against rows of W directly (both contiguous along k: no packing,
// no transposition), in 4 x 4 tiles of vector accumulators reduced once per k-slice; W is read
// from memory once per call for batches up to `tile_rows` and once per block of that many rows
// beyond (large batches go to Eigen's packed GEMM: see eigen_forward_rows). Threads (OpenMP)
// split the output columns, i.e. the rows of W, so each thread streams its own part of the
// weight. The epilogue (kernels/epilogue.hpp) runs on each finished tile of at most `tile_rows` x
// `tile_cols` outputs while it is still in cache: this is where adapters add their terms.
//
// The blocks are one operation per direction (block_nt, block_nn on an ISA tag) with one
// overload per ISA folder: reference/linear.hpp (double accumulation), and the body
// detail/linear_body.inc written once over each folder's vec: portable/linear.hpp (xsimd),
// x86/avx2/linear.hpp, x86/avx512/linear.hpp. Their dispatch tables (kernels/dispatch.hpp) give
// an ISA without its own blocks (NEON today) its parent's.
#pragma once

#include <algorithm>
#include <utility>

#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/interop/eigen.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/epilogue.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/parallel.hpp"
#include "peft/kernels/portable/linear.hpp"
#include "peft/kernels/reference/linear.hpp"
#include "peft/kernels/x86/avx2/linear.hpp"
#include "peft/kernels/x86/avx512/linear.hpp"

namespace peft::kernels {

namespace detail {

using block_nt_fn = void (*)(const float*, index, index, const float*, index, index, index, float*,
                             index);
using block_nn_fn = void (*)(const float*, index, index, const float*, index, index, index, float*,
                             index, bool);

struct block_nt_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(block_nt(tag, std::forward<A>(a)...)) {
    return block_nt(tag, std::forward<A>(a)...);
  }
};
struct block_nn_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(block_nn(tag, std::forward<A>(a)...)) {
    return block_nn(tag, std::forward<A>(a)...);
  }
};

/// The blocks of every ISA (kernels/dispatch.hpp).
inline constexpr dispatch_table<block_nt_fn> block_nt_table =
    make_dispatch_table<block_nt_fn, block_nt_op>();
inline constexpr dispatch_table<block_nn_fn> block_nn_table =
    make_dispatch_table<block_nn_fn, block_nn_op>();

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
  const detail::block_nt_fn block = detail::block_nt_table[version];
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
  const detail::block_nn_fn block = detail::block_nn_table[version];
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
