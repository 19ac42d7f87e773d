// peft/kernels/portable/quantized_int8.hpp — the portable ISA's integer dot kernels
// (kernels/quantized_int8.hpp): plain scalar integer code, no intrinsics. A weight block's codes
// are unpacked once to a small stack buffer of bytes and multiplied into each of up to
// max_dot_rows activation rows with int32 sums (loops the compiler may vectorise), then scaled
// and added in f32 per block, as ggml's generic code does. The contract and the per-block
// arithmetic are those of kernels/reference/quantized_int8.hpp.
#pragma once

#include <cstdint>

#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/base/formats/q8_k.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/detail/quantized_dot.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/isa.hpp"

namespace peft::kernels::portable {

/// sum_i a[i] b[i] over N signed or unsigned bytes, in int32 (exact: |sum| < 2^31 for N <= 2^16).
template <int N, class A>
inline std::int32_t byte_dot(const A* a, const std::int8_t* b) noexcept {
  std::int32_t s = 0;
  for (int i = 0; i < N; ++i) s += static_cast<std::int32_t>(a[i]) * b[i];
  return s;
}

template <int M>
void q4_k_q8_k_dot_rows(const formats::block_q4_k* w, index nb, index n, const formats::block_q8_k* x,
                        index ldx, float* y, index ldy) {
  std::uint8_t q[256];
  for (index j = 0; j < n; ++j) {
    float acc[M] = {};
    for (index b = 0; b < nb; ++b) {
      const formats::block_q4_k& wb = w[j * nb + b];
      std::uint8_t sc[8], mn[8];
      formats::q4_k_scale_mins(wb, sc, mn);
      for (int c = 0; c < 4; ++c) {
        for (int l = 0; l < 32; ++l) {
          q[64 * c + l] = static_cast<std::uint8_t>(wb.qs[32 * c + l] & 15);
          q[64 * c + 32 + l] = static_cast<std::uint8_t>(wb.qs[32 * c + l] >> 4);
        }
      }
      const float dw = formats::half_to_float(wb.d);
      const float dminw = formats::half_to_float(wb.dmin);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_k& xb = x[r * ldx + b];
        std::int32_t dots = 0, mins = 0;
        for (int s = 0; s < 8; ++s) {
          dots += sc[s] * byte_dot<32>(q + 32 * s, xb.qs + 32 * s);
          mins += mn[s] * (xb.bsums[2 * s] + xb.bsums[2 * s + 1]);
        }
        const float d = xb.d * dw;
        const float dmin = -xb.d * dminw;
        acc[r] += d * static_cast<float>(dots) + dmin * static_cast<float>(mins);
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = acc[r];
  }
}

template <int M>
void q6_k_q8_k_dot_rows(const formats::block_q6_k* w, index nb, index n, const formats::block_q8_k* x,
                        index ldx, float* y, index ldy) {
  std::int8_t q[256];
  for (index j = 0; j < n; ++j) {
    float acc[M] = {};
    for (index b = 0; b < nb; ++b) {
      const formats::block_q6_k& wb = w[j * nb + b];
      for (int h = 0; h < 2; ++h) {
        const std::uint8_t* ql = wb.ql + 64 * h;
        const std::uint8_t* qh = wb.qh + 32 * h;
        std::int8_t* o = q + 128 * h;
        for (int l = 0; l < 32; ++l) {
          o[l] = static_cast<std::int8_t>(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
          o[32 + l] = static_cast<std::int8_t>(((ql[32 + l] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
          o[64 + l] = static_cast<std::int8_t>(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
          o[96 + l] = static_cast<std::int8_t>(((ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
      }
      const float dw = formats::half_to_float(wb.d);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_k& xb = x[r * ldx + b];
        std::int32_t dots = 0;
        for (int s = 0; s < 16; ++s) dots += wb.scales[s] * byte_dot<16>(q + 16 * s, xb.qs + 16 * s);
        acc[r] += (xb.d * dw) * static_cast<float>(dots);
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = acc[r];
  }
}

template <int M>
void q8_0_q8_0_dot_rows(const formats::block_q8_0* w, index nb, index n, const formats::block_q8_0* x,
                        index ldx, float* y, index ldy) {
  for (index j = 0; j < n; ++j) {
    float acc[M] = {};
    for (index b = 0; b < nb; ++b) {
      const formats::block_q8_0& wb = w[j * nb + b];
      const float dw = formats::half_to_float(wb.d);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_0& xb = x[r * ldx + b];
        acc[r] += (dw * formats::half_to_float(xb.d)) * static_cast<float>(byte_dot<32>(wb.qs, xb.qs));
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = acc[r];
  }
}

template <int M>
void q4_0_q8_0_dot_rows(const formats::block_q4_0* w, index nb, index n, const formats::block_q8_0* x,
                        index ldx, float* y, index ldy) {
  std::int8_t q[32];
  for (index j = 0; j < n; ++j) {
    float acc[M] = {};
    for (index b = 0; b < nb; ++b) {
      const formats::block_q4_0& wb = w[j * nb + b];
      for (int l = 0; l < 16; ++l) {
        q[l] = static_cast<std::int8_t>((wb.qs[l] & 15) - 8);
        q[16 + l] = static_cast<std::int8_t>((wb.qs[l] >> 4) - 8);
      }
      const float dw = formats::half_to_float(wb.d);
      for (int r = 0; r < M; ++r) {
        const formats::block_q8_0& xb = x[r * ldx + b];
        acc[r] += (dw * formats::half_to_float(xb.d)) * static_cast<float>(byte_dot<32>(q, xb.qs));
      }
    }
    for (int r = 0; r < M; ++r) y[r * ldy + j] = acc[r];
  }
}

#include "peft/kernels/detail/quantized_int8_entries.inc"

}  // namespace peft::kernels::portable
