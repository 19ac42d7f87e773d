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

