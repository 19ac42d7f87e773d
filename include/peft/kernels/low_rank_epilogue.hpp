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
#pragma once

#include "peft/core/epilogue.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/interop/eigen.hpp"

namespace peft::kernels {

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
    if (r > 0) {
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
