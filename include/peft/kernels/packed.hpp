// peft/kernels/packed.hpp — f32 products with a weight pre-packed in panels (the layout of
// base/packed_f32.hpp): up to 8 rows of x against one panel of 16 weight rows per call.
//
//   kernels::packed_dot(kernels::active_isa(), panel, k, n, x, ldx, m, y, ldy);
//   // y[r * ldy + c] = sum_p x[r * ldx + p] W[j0 + c, p]   for r < m (m <= 8), c < n (n <= 16)
//   // panel = the 16 weight rows j0 .. j0 + 15 stored k-major: panel[p * 16 + c] = W[j0 + c, p]
//
// The row-major kernels of kernels/linear.hpp keep one accumulator per output along k and reduce
// it at the end (horizontal sums); here W is laid out once, at load time, the way BLAS packs it
// per call: the kernel broadcasts one value of x and multiplies it into 16 consecutive outputs
// with whole vectors (an outer product; no horizontal sums), streaming one sequential panel.
// The arithmetic is f32 with f32 activations, in a different order from kernels/linear.hpp's.
//
// One overload per ISA folder (reference/packed.hpp in double; the body detail/packed_body.inc
// over each folder's vec: portable/packed.hpp, x86/avx2/packed.hpp, x86/avx512/packed.hpp), one
// dispatch table (kernels/dispatch.hpp); NEON runs the portable one (xsimd's NEON batch).
#pragma once

#include <utility>

#include "peft/core/matrix_view.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/portable/packed.hpp"
#include "peft/kernels/reference/packed.hpp"
#include "peft/kernels/x86/avx2/packed.hpp"
#include "peft/kernels/x86/avx512/packed.hpp"

namespace peft::kernels {

/// Weight rows per panel of the packed layout.
inline constexpr index packed_panel_rows = 16;
/// Rows of x one packed_dot call multiplies at most.
inline constexpr index packed_max_rows = 8;

namespace detail {

using packed_dot_fn = void (*)(const float* panel, index k, index n, const float* x, index ldx,
                               index m, float* y, index ldy);

struct packed_dot_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(packed_dot(tag, std::forward<A>(a)...)) {
    return packed_dot(tag, std::forward<A>(a)...);
  }
};

/// The panel kernels of every ISA (kernels/dispatch.hpp).
inline constexpr dispatch_table<packed_dot_fn> packed_dot_table =
    make_dispatch_table<packed_dot_fn, packed_dot_op>();

}  // namespace detail

/// y[r * ldy + c] = sum_p x[r * ldx + p] panel[p * 16 + c] for r < m, c < n; 1 <= m <=
/// packed_max_rows, n <= packed_panel_rows (columns c >= n of the panel are read, not written).
inline void packed_dot(isa which, const float* panel, index k, index n, const float* x, index ldx,
                       index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  detail::packed_dot_table[which](panel, k, n, x, ldx, m, y, ldy);
}

}  // namespace peft::kernels
