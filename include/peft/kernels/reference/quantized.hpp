// peft/kernels/reference/quantized.hpp — the scalar truth of the quantized dot kernels: plain
// loops accumulating in double over the formats of base/formats/ (int8 row-wise, q4_0, q8_0,
// q4_k, q6_k, nf4).
//
//   kernels::reference::q4_0_dot(blocks, nb, n, x, ldx, m, y, ldy);
//   // y[r * ldy + j] = sum_p W[j, p] x[r * ldx + p]   for r < m and n consecutive weight rows
//
// The vectorised versions (kernels/portable/quantized.hpp, kernels/x86/*/quantized.hpp) are
// tested against these; detail::*_dot(reference_tag, ...) make them the reference ISA's entries
// of the dispatch tables in kernels/quantized.hpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "peft/base/formats/nf4.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/isa.hpp"

namespace peft::kernels::reference {

/// int8 rows: y(r, j) = scale[j] sum_p q[j, p] x(r, p), in double.
inline void int8_dot(const std::int8_t* q, const float* scale, index in, index n,
                     const float* x, index ldx, index m, float* y, index ldy) noexcept {
  for (index j = 0; j < n; ++j) {
    const std::int8_t* w = q + j * in;
    for (index r = 0; r < m; ++r) {
      double acc = 0.0;
      for (index p = 0; p < in; ++p) acc += static_cast<double>(w[p]) * x[r * ldx + p];
      y[r * ldy + j] = static_cast<float>(acc * scale[j]);
    }
  }
}

/// q4_0 rows of nb blocks: x holds nb * 32 values per row (zero past in_features).
inline void q4_0_dot(const formats::block_q4_0* blocks, index nb, index n, const float* x,
                     index ldx, index m, float* y, index ldy) noexcept {
  double w[formats::q4_0_block_size];
  for (index j = 0; j < n; ++j) {
    for (index r = 0; r < m; ++r) {
      double acc = 0.0;
      for (index b = 0; b < nb; ++b) {
        formats::decode_q4_0_block(blocks[j * nb + b], w);
        const float* xr = x + r * ldx + b * formats::q4_0_block_size;
        for (index p = 0; p < formats::q4_0_block_size; ++p) acc += w[p] * xr[p];
      }
      y[r * ldy + j] = static_cast<float>(acc);
    }
  }
}

/// Rows of nb ggml blocks of Size weights each, decoded by `decode(block, double*)`: x holds
/// nb * Size values per row (zero past in_features).
template <index Size, class Block, class Decode>
void ggml_block_dot(const Decode& decode, const Block* blocks, index nb, index n, const float* x,
                    index ldx, index m, float* y, index ldy) noexcept {
  double w[Size];
  for (index j = 0; j < n; ++j) {
    for (index r = 0; r < m; ++r) {
      double acc = 0.0;
      for (index b = 0; b < nb; ++b) {
        decode(blocks[j * nb + b], w);
        const float* xr = x + r * ldx + b * Size;
        for (index p = 0; p < Size; ++p) acc += w[p] * xr[p];
      }
      y[r * ldy + j] = static_cast<float>(acc);
    }
  }
}

/// q8_0 rows of nb blocks: x holds nb * 32 values per row (zero past in_features).
inline void q8_0_dot(const formats::block_q8_0* blocks, index nb, index n, const float* x,
                     index ldx, index m, float* y, index ldy) noexcept {
  ggml_block_dot<formats::q8_0_block_size>([](const formats::block_q8_0& b, double* w) { formats::decode_q8_0_block(b, w); },
                                           blocks, nb, n, x, ldx, m, y, ldy);
}

/// q4_k rows of nb blocks: x holds nb * 256 values per row (zero past in_features).
inline void q4_k_dot(const formats::block_q4_k* blocks, index nb, index n, const float* x,
                     index ldx, index m, float* y, index ldy) noexcept {
  ggml_block_dot<formats::q4_k_block_size>([](const formats::block_q4_k& b, double* w) { formats::decode_q4_k_block(b, w); },
                                           blocks, nb, n, x, ldx, m, y, ldy);
}

/// q6_k rows of nb blocks: x holds nb * 256 values per row (zero past in_features).
inline void q6_k_dot(const formats::block_q6_k* blocks, index nb, index n, const float* x,
                     index ldx, index m, float* y, index ldy) noexcept {
  ggml_block_dot<formats::q6_k_block_size>([](const formats::block_q6_k& b, double* w) { formats::decode_q6_k_block(b, w); },
                                           blocks, nb, n, x, ldx, m, y, ldy);
}

/// nf4 rows (in % 64 == 0), first element of each byte in the high nibble.
inline void nf4_dot(const formats::nf4_rows& w, index n, const float* x, index ldx, index m,
                    float* y, index ldy) noexcept {
  const index half = w.in / 2;
  const index blocks = w.in / formats::nf4_block_size;
  for (index j = 0; j < n; ++j) {
    const std::uint8_t* p = w.packed + j * half;
    const float* am = w.absmax + j * blocks;
    for (index r = 0; r < m; ++r) {
      double acc = 0.0;
      for (index e = 0; e < w.in; ++e) {
        const double v = static_cast<double>(formats::nf4_values[formats::nf4_code(p, e)]) *
                         am[e / formats::nf4_block_size];
        acc += v * x[r * ldx + e];
      }
      y[r * ldy + j] = static_cast<float>(acc);
    }
  }
}

inline void int8_dot(reference_tag, const std::int8_t* q, const float* scale, index in, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  int8_dot(q, scale, in, n, x, ldx, m, y, ldy);
}
inline void q4_0_dot(reference_tag, const formats::block_q4_0* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  q4_0_dot(blocks, nb, n, x, ldx, m, y, ldy);
}
inline void q8_0_dot(reference_tag, const formats::block_q8_0* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  q8_0_dot(blocks, nb, n, x, ldx, m, y, ldy);
}
inline void q4_k_dot(reference_tag, const formats::block_q4_k* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  q4_k_dot(blocks, nb, n, x, ldx, m, y, ldy);
}
inline void q6_k_dot(reference_tag, const formats::block_q6_k* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  q6_k_dot(blocks, nb, n, x, ldx, m, y, ldy);
}
inline void nf4_dot(reference_tag, const formats::nf4_rows& w, index n, const float* x, index ldx,
                    index m, float* y, index ldy) {
  nf4_dot(w, n, x, ldx, m, y, ldy);
}

}  // namespace peft::kernels::reference
