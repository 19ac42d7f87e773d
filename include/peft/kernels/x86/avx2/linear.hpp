// peft/kernels/x86/avx2/linear.hpp — the AVX2 blocks of kernels/linear.hpp: the body of
// kernels/detail/linear_body.inc over kernels/x86/avx2/vec.hpp, compiled for the AVX2 target
// (the body is included inside the target region so its templates keep the target). Empty on
// other architectures.
#pragma once

#include "peft/kernels/isa.hpp"

#if PEFT_X86_DISPATCH
#include <algorithm>

#include "peft/core/matrix_view.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/x86/avx2/vec.hpp"

PEFT_BEGIN_TARGET_AVX2
namespace peft::kernels::avx2 {
#include "peft/kernels/detail/linear_body.inc"
}  // namespace peft::kernels::avx2

namespace peft::kernels::detail {

inline void block_nt(avx2_tag, const float* x, index ldx, index m, const float* w, index ldw,
                     index n, index k, float* y, index ldy) {
  avx2::block_nt(x, ldx, m, w, ldw, n, k, y, ldy);
}
inline void block_nn(avx2_tag, const float* dy, index lddy, index m, const float* w,
                     index ldw, index n, index cols, float* dx, index lddx, bool accumulate) {
  avx2::block_nn(dy, lddy, m, w, ldw, n, cols, dx, lddx, accumulate);
}

}  // namespace peft::kernels::detail
PEFT_END_TARGET

#endif  // PEFT_X86_DISPATCH
