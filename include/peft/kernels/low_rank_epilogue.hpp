// peft/kernels/low_rank_epilogue.hpp — the epilogue of every low-rank term, declared once.
//
//   tile[i, j] += scale (sum_q p[i0 + i, q] b[j0 + j, q]) col[j0 + j] + bias_row[i0 + i] bias[j0 + j]
//
// p (m, r) holds the projected rows (x A^T, already gated and scaled per row where the term
// says so), b (n, r) the up factor, col an optional per-output vector (VeRA's lambda_b), bias an
// optional per-output bias with its factor: `bias_scale`, or per row `bias_row` (mixed batches,
// where each row has its own adapter scale). When `unscaled` is set (m, n), it receives the
// tile's p b^T before col is applied (what VeRA's backward needs). Reads p, b, col, bias only;
// writes its own tile (and its block of `unscaled`): safe on disjoint tiles from several threads.
// f32 batches of a few rows (decoding: m = 1) form p b^T with the dispatched dot blocks of
// kernels/linear.hpp, 64 columns at a time on the stack; larger ones and double use Eigen's product
// (with EIGEN_USE_BLAS a BLAS call per tile, whose fixed cost dominates a 1 x 16 x 64 product).
#pragma once

#include <algorithm>
#include <type_traits>

#include "peft/core/epilogue.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/interop/eigen.hpp"
#include "peft/kernels/linear.hpp"

namespace peft::kernels {

/// Rows up to which an f32 low-rank product runs on the dot blocks instead of Eigen.
inline constexpr index low_rank_block_rows = 8;

/// Whether the low-rank products of a batch of `rows` rows run on the dot blocks (f32, at most
/// low_rank_block_rows rows). The epilogue and the unfused term (adapters/detail/low_rank_core.hpp)
/// both decide by it, on the whole batch, so they give the same numbers bit for bit.
template <class T>
constexpr bool low_rank_on_blocks(index rows) noexcept {
  return std::is_same_v<T, float> && rows <= low_rank_block_rows;
}

template <class T>
struct low_rank_epilogue {
  matrix_view<const T> p;           // (m, r)
  matrix_view<const T> b;           // (n, r)
  T scale = T{1};                   // multiplies p b^T
  const T* col = nullptr;           // (n) or null
  const T* bias = nullptr;          // (n) or null
  T bias_scale = T{1};              // multiplies the bias on every row ...
  const T* bias_row = nullptr;      // ... or row i0 + i by bias_row[i0 + i] (then bias_scale is unused)
  matrix_view<T> unscaled{};        // (m, n) or empty

  void operator()(index i0, index j0, matrix_view<T> tile) const {
    const index rows = tile.rows(), cols = tile.cols(), r = p.cols();
    bool done = false;
    if constexpr (std::is_same_v<T, float>) {
      if (r > 0 && low_rank_on_blocks<T>(p.rows())) {  // the batch's rows, not the tile's
        add_blocked(i0, j0, tile);
        done = true;
      }
    }
    if (r > 0 && !done) {
      const auto pb = as_eigen(p.block(i0, 0, rows, r));
      const auto bb = as_eigen(b.block(j0, 0, cols, r));
      if (col == nullptr) {
        as_eigen(tile).noalias() += scale * (pb * bb.transpose());
      } else {
        const Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>> c(col + j0, cols);
        if (unscaled.empty()) {
          as_eigen(tile).array() += scale * ((pb * bb.transpose()).eval().array().rowwise() * c);
        } else {
          auto z = as_eigen(unscaled.block(i0, j0, rows, cols));
          z.noalias() = pb * bb.transpose();
          as_eigen(tile).array() += scale * (z.array().rowwise() * c);
        }
      }
    }
    add_bias(i0, j0, tile);
  }

 private:
  /// tile += scale (p b^T) col for a tile of at most low_rank_block_rows rows (f32 only).
  void add_blocked(index i0, index j0, matrix_view<T> tile) const {
    constexpr index chunk = 64;
    T z[low_rank_block_rows * chunk];
    const index rows = tile.rows(), r = p.cols();
    const detail::block_nt_fn block = detail::block_nt_table[active_isa()];
    for (index c0 = 0; c0 < tile.cols(); c0 += chunk) {
      const index nc = std::min(chunk, tile.cols() - c0);
      block(p.row(i0), p.stride(), rows, b.row(j0 + c0), b.stride(), nc, r, z, chunk);
      for (index i = 0; i < rows; ++i) {
        const T* zi = z + i * chunk;
        T* row = tile.row(i) + c0;
        if (!unscaled.empty()) std::copy(zi, zi + nc, unscaled.row(i0 + i) + j0 + c0);
        if (col == nullptr) {
          for (index j = 0; j < nc; ++j) row[j] += scale * zi[j];
        } else {
          for (index j = 0; j < nc; ++j) row[j] += scale * (zi[j] * col[j0 + c0 + j]);
        }
      }
    }
  }

  /// tile[i, j] += (bias_row[i0 + i] or bias_scale) bias[j0 + j]; nothing without a bias.
  void add_bias(index i0, index j0, matrix_view<T> tile) const {
    const index rows = tile.rows(), cols = tile.cols();
    if (bias != nullptr) {
      for (index i = 0; i < rows; ++i) {
        const T f = bias_row != nullptr ? bias_row[i0 + i] : bias_scale;
        T* row = tile.row(i);
        for (index j = 0; j < cols; ++j) row[j] += f * bias[j0 + j];
      }
    }
  }
};

}  // namespace peft::kernels
