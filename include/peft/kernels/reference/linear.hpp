// peft/kernels/reference/linear.hpp — the reference ISA's blocks of kernels/linear.hpp: the
// scalar truth of reference/gemm.hpp (double accumulation) in the blocks' shape.
//
//   block_nt(reference_tag{}, x, ldx, m, w, ldw, n, k, y, ldy)         y = x w^T
//   block_nn(reference_tag{}, dy, lddy, m, w, ldw, n, cols, dx, lddx, accumulate)
#pragma once

#include "peft/core/matrix_view.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/reference/gemm.hpp"

namespace peft::kernels::reference {

/// y (m, n) = x (m, k) w (n, k)^T.
inline void block_nt(reference_tag, const float* x, index ldx, index m, const float* w, index ldw,
                     index n, index k, float* y, index ldy) {
  gemm_nt<float, float>(1.0, matrix_view<const float>(x, m, k, ldx),
                                   matrix_view<const float>(w, n, k, ldw), 0.0,
                                   matrix_view<float>(y, m, n, ldy));
}

/// dx (m, cols) (+)= dy (m, n) w (n, cols).
inline void block_nn(reference_tag, const float* dy, index lddy, index m, const float* w,
                     index ldw, index n, index cols, float* dx, index lddx, bool accumulate) {
  gemm_nn<float, float>(1.0, matrix_view<const float>(dy, m, n, lddy),
                                   matrix_view<const float>(w, n, cols, ldw), accumulate ? 1.0 : 0.0,
                                   matrix_view<float>(dx, m, cols, lddx));
}

}  // namespace peft::kernels::reference
