// peft/kernels/decode.hpp — quantized weight rows decoded to f32, for the panel products of
// large batches (base/detail/quantized_common.hpp) and the portable dot kernels.
//
//   kernels::decode_q4_0_row(blocks, nb, out);   // out[0..nb * 32) = the row's weights
//   kernels::decode_q4_k_row(blocks, nb, out);   // out[0..nb * 256) (q8_0: 32, q6_k: 256)
//
// Plain loops in f32 arithmetic; each value equals the format's reference decode rounded to f32
// (base/formats/), which computes the same products in double.
#pragma once

#include <cstddef>
#include <cstdint>

#include "peft/base/formats/nf4.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::kernels {

/// out[0..in) = q[0..in) * scale, rounded to f32.
inline void decode_int8_row(const std::int8_t* q, float scale, index in, float* out) noexcept {
  for (index p = 0; p < in; ++p) out[p] = static_cast<float>(q[p]) * scale;
}

/// out[0..nb * 32) = the weights of nb q4_0 blocks (exact in f32).
inline void decode_q4_0_row(const formats::block_q4_0* b, index nb, float* out) noexcept {
  for (index i = 0; i < nb; ++i) formats::decode_q4_0_block(b[i], out + i * formats::q4_0_block_size);
}

/// out[0..nb * 32) = the weights of nb q8_0 blocks (exact in f32).
inline void decode_q8_0_row(const formats::block_q8_0* b, index nb, float* out) noexcept {
  for (index i = 0; i < nb; ++i) {
    const float d = formats::half_to_float(b[i].d);
    float* o = out + i * formats::q8_0_block_size;
    for (int k = 0; k < 32; ++k) o[k] = static_cast<float>(b[i].qs[k]) * d;
  }
}

/// out[0..nb * 256) = the weights of nb q4_k blocks: (d sc) q - (dmin m) in f32, the products
/// exact and the difference rounded once (fused or not).
inline void decode_q4_k_row(const formats::block_q4_k* b, index nb, float* out) noexcept {
  for (index i = 0; i < nb; ++i) {
    const float d = formats::half_to_float(b[i].d);
    const float dmin = formats::half_to_float(b[i].dmin);
    std::uint8_t sc[8], m[8];
    formats::q4_k_scale_mins(b[i], sc, m);
    float* o = out + i * formats::q4_k_block_size;
    for (int c = 0; c < 4; ++c) {
      const float d0 = d * sc[2 * c], m0 = dmin * m[2 * c];
      const float d1 = d * sc[2 * c + 1], m1 = dmin * m[2 * c + 1];
      const std::uint8_t* q = b[i].qs + 32 * c;
      for (int l = 0; l < 32; ++l) {
        o[64 * c + l] = d0 * static_cast<float>(q[l] & 15) - m0;
        o[64 * c + 32 + l] = d1 * static_cast<float>(q[l] >> 4) - m1;
      }
    }
  }
}

/// out[0..nb * 256) = the weights of nb q6_k blocks: (d scale) (q - 32) in f32 (exact).
inline void decode_q6_k_row(const formats::block_q6_k* b, index nb, float* out) noexcept {
  for (index i = 0; i < nb; ++i) {
    const float d = formats::half_to_float(b[i].d);
    float* o = out + i * formats::q6_k_block_size;
    for (int h = 0; h < 2; ++h) {
      const std::uint8_t* ql = b[i].ql + 64 * h;
      const std::uint8_t* qh = b[i].qh + 32 * h;
      const std::int8_t* sc = b[i].scales + 8 * h;
      for (int l = 0; l < 32; ++l) {
        const int q0 = (ql[l] & 15) | ((qh[l] & 3) << 4);
        const int q1 = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
        const int q2 = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
        const int q3 = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        const int s = l / 16;
        o[128 * h + l] = d * static_cast<float>(sc[s]) * static_cast<float>(q0 - 32);
        o[128 * h + 32 + l] = d * static_cast<float>(sc[s + 2]) * static_cast<float>(q1 - 32);
        o[128 * h + 64 + l] = d * static_cast<float>(sc[s + 4]) * static_cast<float>(q2 - 32);
        o[128 * h + 96 + l] = d * static_cast<float>(sc[s + 6]) * static_cast<float>(q3 - 32);
      }
    }
  }
}

/// out[0..2 * bytes) = the nf4 values of `bytes` packed bytes times absmax (f32).
inline void decode_nf4_bytes(const std::uint8_t* p, index bytes, float absmax, float* out) noexcept {
  for (index i = 0; i < bytes; ++i) {
    out[2 * i] = formats::nf4_values[static_cast<std::size_t>(p[i] >> 4)] * absmax;
    out[2 * i + 1] = formats::nf4_values[static_cast<std::size_t>(p[i] & 15)] * absmax;
  }
}

/// out[0..in) = row j of an nf4 tensor whose rows own whole blocks (in % 64 == 0), in f32.
inline void decode_nf4_row(const formats::nf4_rows& w, index j, float* out) noexcept {
  constexpr index block_bytes = formats::nf4_block_size / 2;
  const index blocks = w.in / formats::nf4_block_size;
  const std::uint8_t* p = w.packed + j * (w.in / 2);
  const float* am = w.absmax + j * blocks;
  for (index b = 0; b < blocks; ++b) {
    decode_nf4_bytes(p + b * block_bytes, block_bytes, am[b], out + b * formats::nf4_block_size);
  }
}

}  // namespace peft::kernels
