// peft/kernels/portable/packed.hpp — the portable kernel of kernels/packed.hpp: the body of
// kernels/detail/packed_body.inc over xsimd batches (kernels/portable/vec.hpp).
#pragma once

#include <algorithm>

#include "peft/core/matrix_view.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/portable/vec.hpp"

namespace peft::kernels::portable {
#include "peft/kernels/detail/packed_body.inc"
}  // namespace peft::kernels::portable
