// peft/kernels/detail/quantized_dot.hpp — the contract every ISA's quantized dot kernels follow
// (kernels/quantized.hpp declares their signatures and dispatches them): the batch they take.
//
//   y[r * ldy + j] = sum_p W[j, p] x[r * ldx + p]   for r < m (1 <= m <= max_dot_rows), j < n
//
// A kernel streams its n weight rows once and multiplies every decoded block into all m rows of
// x (int8 rows also scale by their row's scale).
#pragma once

#include "peft/core/matrix_view.hpp"

namespace peft::kernels {

/// Rows of x one dot kernel call multiplies at most.
inline constexpr index max_dot_rows = 8;

}  // namespace peft::kernels
