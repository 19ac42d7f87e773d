// peft/kernels/detail/quantized_dot.hpp — the contract every ISA's quantized dot kernels follow
// (kernels/quantized.hpp dispatches them): their signatures and the batch they take.
//
//   y[r * ldy + j] = sum_p W[j, p] x[r * ldx + p]   for r < m (1 <= m <= max_dot_rows), j < n
//
// A kernel streams its n weight rows once and multiplies every decoded block into all m rows of
// x (int8 rows also scale by their row's scale).
#pragma once

#include <cstdint>

#include "peft/base/formats/nf4.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::kernels {

/// Rows of x one dot kernel call multiplies at most.
inline constexpr index max_dot_rows = 8;

namespace detail {

using int8_dot_fn = void (*)(const std::int8_t* q, const float* scale, index in, index n,
                             const float* x, index ldx, index m, float* y, index ldy);
using q4_0_dot_fn = void (*)(const formats::block_q4_0* blocks, index nb, index n, const float* x,
                             index ldx, index m, float* y, index ldy);
using nf4_dot_fn = void (*)(const formats::nf4_rows& w, index n, const float* x, index ldx,
                            index m, float* y, index ldy);

}  // namespace detail
}  // namespace peft::kernels
