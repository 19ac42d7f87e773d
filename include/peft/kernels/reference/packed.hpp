// peft/kernels/reference/packed.hpp — the scalar truth of kernels/packed.hpp: the panel product
// in plain loops accumulating in double.
//
//   packed_dot(reference_tag{}, panel, k, n, x, ldx, m, y, ldy)
//   // y[r * ldy + c] = sum_p x[r * ldx + p] panel[p * 16 + c]   for r < m, c < n <= 16
#pragma once

#include "peft/core/matrix_view.hpp"
#include "peft/kernels/isa.hpp"

namespace peft::kernels::reference {

inline void packed_dot(reference_tag, const float* panel, index k, index n, const float* x,
                       index ldx, index m, float* y, index ldy) {
  for (index r = 0; r < m; ++r) {
    for (index c = 0; c < n; ++c) {
      double s = 0.0;
      for (index p = 0; p < k; ++p) s += static_cast<double>(x[r * ldx + p]) * static_cast<double>(panel[p * 16 + c]);
      y[r * ldy + c] = static_cast<float>(s);
    }
  }
}

}  // namespace peft::kernels::reference
