// peft/kernels/sparse_rows_epilogue.hpp — the epilogue of a sparse delta of W0 (SHiRA), declared once.
//
//   tile[i, j] += scale sum over entries k of output row j0 + j of  values[k] x[i0 + i, cols[k]]
//
// The entries are given by output row in CSR form: entries order[row_start[j]] ..
// order[row_start[j + 1] - 1] belong to output row j, with rows[k], cols[k] their coordinates.
// Reads only; safe on disjoint tiles from several threads.
#pragma once

#include <cstddef>
#include <cstdint>

#include "peft/core/matrix_view.hpp"

namespace peft::kernels {

template <class T>
struct sparse_rows_epilogue {
  matrix_view<const T> x;               // (m, in)
  const index* row_start = nullptr;     // (out + 1)
  const index* order = nullptr;         // (K)
  const std::int32_t* rows = nullptr;   // (K)
  const std::int32_t* cols = nullptr;   // (K)
  const T* values = nullptr;            // (K)
  T scale = T{1};

  void operator()(index i0, index j0, matrix_view<T> tile) const {
    const index first = row_start[j0], last = row_start[j0 + tile.cols()];
    for (index e = first; e < last; ++e) {
      const index k = order[e];
      const index j = rows[k] - j0;
      const T f = scale * values[k];
      const index c = cols[k];
      for (index i = 0; i < tile.rows(); ++i) tile(i, j) += f * x(i0 + i, c);
    }
  }
};

}  // namespace peft::kernels
