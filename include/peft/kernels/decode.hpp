// peft/kernels/decode.hpp — quantized weight rows decoded to f32, for the panel products of
// large batches (base/detail/quantized_common.hpp) and the portable dot kernels.
//
//   kernels::decode_q4_0_row(blocks, nb, out);   // out[0..nb * 32) = the row's weights
//
// Plain loops in f32 arithmetic; each value equals the format's reference decode rounded to f32
// (base/formats/), which computes the same products in double.
#pragma once

#include <cstddef>
#include <cstdint>

#include "peft/base/formats/nf4.hpp"
#include "peft/base/formats/q4_0.hpp"
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
