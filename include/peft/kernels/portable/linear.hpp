// peft/kernels/portable/linear.hpp — the portable ISA's blocks of kernels/linear.hpp: the body
// of kernels/detail/linear_body.inc over xsimd batches (kernels/portable/vec.hpp).
#pragma once

#include <algorithm>

#include "peft/core/matrix_view.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/portable/vec.hpp"

namespace peft::kernels::portable {
#include "peft/kernels/detail/linear_body.inc"
}  // namespace peft::kernels::portable

namespace peft::kernels::detail {

inline void block_nt(portable_tag, const float* x, index ldx, index m, const float* w, index ldw,
                     index n, index k, float* y, index ldy) {
  portable::block_nt(x, ldx, m, w, ldw, n, k, y, ldy);
}
inline void block_nn(portable_tag, const float* dy, index lddy, index m, const float* w,
                     index ldw, index n, index cols, float* dx, index lddx, bool accumulate) {
  portable::block_nn(dy, lddy, m, w, ldw, n, cols, dx, lddx, accumulate);
}

}  // namespace peft::kernels::detail
