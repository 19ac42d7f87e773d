// peft/kernels/x86/avx512/packed.hpp — the AVX512 kernel of kernels/packed.hpp: the body of
// kernels/detail/packed_body.inc over kernels/x86/avx512/vec.hpp, compiled for the AVX512 target.
// Empty on other architectures.
#pragma once

#include "peft/kernels/isa.hpp"

#if PEFT_X86_DISPATCH
#include <algorithm>

#include "peft/core/matrix_view.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/x86/avx512/vec.hpp"

PEFT_BEGIN_TARGET_AVX512
namespace peft::kernels::avx512 {
#include "peft/kernels/detail/packed_body.inc"
}  // namespace peft::kernels::avx512

PEFT_END_TARGET

#endif  // PEFT_X86_DISPATCH
