// peft/kernels/reference/quantized_int8.hpp — the scalar truth of the integer dot kernels
// (kernels/quantized_int8.hpp): quantized weights times 8-bit activations, llama.cpp's way.
//
//   kernels::reference::q4_k_q8_k_dot(w, nb, n, x, ldx, m, y, ldy);
//   // y[r * ldy + j] = dot(weight row j, activation row r), both nb blocks long
//
// Each pair of blocks gives exact integer sums (the codes times the activation codes, weighted
// by the weight's sub-block scales), combined in double with the f32 block scales ggml forms:
//   q4_k . q8_k   d = d_x d_w, dmin = -d_x dmin_w (f32 products):
//                 d sum_s sc[s] sum q x  +  dmin sum_s m[s] sum x
//   q6_k . q8_k   d = d_x d_w:  d sum_s scales[s] sum (q - 32) x
//   q8_0 . q8_0   d = d_x d_w (exact in f32):  d sum q x
//   q4_0 . q8_0   d = d_x d_w (exact in f32):  d sum (q - 8) x
// (x the activation codes). ggml adds the same per-block terms in f32; the faster versions
// (kernels/portable/quantized_int8.hpp, kernels/x86/avx2/quantized_int8.hpp) are tested against
// these. The reference reads only the activation codes and d; the others also read a q8_k
// block's bsums, which must be its group sums (formats::quantize_q8_k_block writes them).
#pragma once

#include <cstdint>

#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/base/formats/q8_k.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/isa.hpp"

namespace peft::kernels::reference {

/// One q4_k block times one q8_k block, in double.
inline double q4_k_q8_k_block(const formats::block_q4_k& w, const formats::block_q8_k& x) noexcept {
  std::uint8_t sc[8], m[8];
  formats::q4_k_scale_mins(w, sc, m);
  std::int64_t dots = 0;  // sum_s sc[s] sum q x
  std::int64_t mins = 0;  // sum_s m[s] sum x
  for (int c = 0; c < 4; ++c) {
    for (int h = 0; h < 2; ++h) {
      const int s = 2 * c + h;
      std::int64_t qx = 0, sx = 0;
      for (int l = 0; l < 32; ++l) {
        const std::uint8_t byte = w.qs[32 * c + l];
        const int q = h == 0 ? (byte & 15) : (byte >> 4);
        const int a = x.qs[32 * s + l];
        qx += q * a;
        sx += a;
      }
      dots += sc[s] * qx;
      mins += m[s] * sx;
    }
  }
  const float d = x.d * formats::half_to_float(w.d);
  const float dmin = -x.d * formats::half_to_float(w.dmin);
  return static_cast<double>(d) * static_cast<double>(dots) + static_cast<double>(dmin) * static_cast<double>(mins);
}

/// One q6_k block times one q8_k block, in double.
inline double q6_k_q8_k_block(const formats::block_q6_k& w, const formats::block_q8_k& x) noexcept {
  std::int64_t dots = 0;  // sum_s scales[s] sum (q - 32) x
  for (int s = 0; s < 16; ++s) {
    std::int64_t qx = 0;
    for (int i = 0; i < 16; ++i) {
      const int p = 16 * s + i;
      qx += (formats::q6_k_code(w, p) - 32) * x.qs[p];
    }
    dots += w.scales[s] * qx;
  }
  const float d = x.d * formats::half_to_float(w.d);
  return static_cast<double>(d) * static_cast<double>(dots);
}

/// One q8_0 block times one q8_0 activation block, in double.
inline double q8_0_q8_0_block(const formats::block_q8_0& w, const formats::block_q8_0& x) noexcept {
  std::int64_t dots = 0;
  for (int i = 0; i < 32; ++i) dots += w.qs[i] * x.qs[i];
  const float d = formats::half_to_float(w.d) * formats::half_to_float(x.d);
  return static_cast<double>(d) * static_cast<double>(dots);
}

/// One q4_0 block times one q8_0 activation block, in double.
inline double q4_0_q8_0_block(const formats::block_q4_0& w, const formats::block_q8_0& x) noexcept {
  std::int64_t dots = 0;
  for (int i = 0; i < 16; ++i) {
    dots += ((w.qs[i] & 15) - 8) * x.qs[i];
    dots += ((w.qs[i] >> 4) - 8) * x.qs[i + 16];
  }
  const float d = formats::half_to_float(w.d) * formats::half_to_float(x.d);
  return static_cast<double>(d) * static_cast<double>(dots);
}

/// y[r * ldy + j] = sum_b block(w[j nb + b], x[r ldx + b]) for r < m, j < n.
template <class W, class X, class Block>
void int8_block_dot(const Block& block, const W* w, index nb, index n, const X* x, index ldx, index m,
              float* y, index ldy) noexcept {
  for (index j = 0; j < n; ++j) {
    for (index r = 0; r < m; ++r) {
      double acc = 0.0;
      for (index b = 0; b < nb; ++b) acc += block(w[j * nb + b], x[r * ldx + b]);
      y[r * ldy + j] = static_cast<float>(acc);
    }
  }
}

/// q4_k weight rows of nb blocks times q8_k activation rows (ldx blocks apart).
inline void q4_k_q8_k_dot(const formats::block_q4_k* w, index nb, index n, const formats::block_q8_k* x,
                          index ldx, index m, float* y, index ldy) noexcept {
  int8_block_dot(q4_k_q8_k_block, w, nb, n, x, ldx, m, y, ldy);
}

/// q6_k weight rows of nb blocks times q8_k activation rows (ldx blocks apart).
inline void q6_k_q8_k_dot(const formats::block_q6_k* w, index nb, index n, const formats::block_q8_k* x,
                          index ldx, index m, float* y, index ldy) noexcept {
  int8_block_dot(q6_k_q8_k_block, w, nb, n, x, ldx, m, y, ldy);
}

/// q8_0 weight rows of nb blocks times q8_0 activation rows (ldx blocks apart).
inline void q8_0_q8_0_dot(const formats::block_q8_0* w, index nb, index n, const formats::block_q8_0* x,
                          index ldx, index m, float* y, index ldy) noexcept {
  int8_block_dot(q8_0_q8_0_block, w, nb, n, x, ldx, m, y, ldy);
}

/// q4_0 weight rows of nb blocks times q8_0 activation rows (ldx blocks apart).
inline void q4_0_q8_0_dot(const formats::block_q4_0* w, index nb, index n, const formats::block_q8_0* x,
                          index ldx, index m, float* y, index ldy) noexcept {
  int8_block_dot(q4_0_q8_0_block, w, nb, n, x, ldx, m, y, ldy);
}

inline void q4_k_q8_k_dot(reference_tag, const formats::block_q4_k* w, index nb, index n,
                          const formats::block_q8_k* x, index ldx, index m, float* y, index ldy) {
  q4_k_q8_k_dot(w, nb, n, x, ldx, m, y, ldy);
}
inline void q6_k_q8_k_dot(reference_tag, const formats::block_q6_k* w, index nb, index n,
                          const formats::block_q8_k* x, index ldx, index m, float* y, index ldy) {
  q6_k_q8_k_dot(w, nb, n, x, ldx, m, y, ldy);
}
inline void q8_0_q8_0_dot(reference_tag, const formats::block_q8_0* w, index nb, index n,
                          const formats::block_q8_0* x, index ldx, index m, float* y, index ldy) {
  q8_0_q8_0_dot(w, nb, n, x, ldx, m, y, ldy);
}
inline void q4_0_q8_0_dot(reference_tag, const formats::block_q4_0* w, index nb, index n,
                          const formats::block_q8_0* x, index ldx, index m, float* y, index ldy) {
  q4_0_q8_0_dot(w, nb, n, x, ldx, m, y, ldy);
}

}  // namespace peft::kernels::reference
