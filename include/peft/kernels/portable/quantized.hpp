// peft/kernels/portable/quantized.hpp — the portable ISA's quantized dot kernels: a block of
// weights decoded to a small stack buffer, then multiplied into up to max_dot_rows rows of x with
// the vector of kernels/portable/vec.hpp (xsimd); the contract is kernels/detail/quantized_dot.hpp.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>

#include "peft/base/formats/nf4.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/decode.hpp"
#include "peft/kernels/detail/quantized_dot.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/portable/vec.hpp"

namespace peft::kernels::portable {

/// y(r, j) = sum over chunks c of decode(j, c) . x(r, c): `decode(j, c, buf)` writes the `chunk`
/// f32 weights of chunk c of row j (chunk a multiple of the vector width, at most max_chunk:
/// a ggml super-block); columns past `in` in the last chunk are zero in buf and never loaded from x.
inline constexpr index max_chunk = 256;

template <class Decode>
void dot(const Decode& decode, index chunk, index chunks, index in, index n, const float* x,
         index ldx, index m, float* y, index ldy) {
  using reg = vec::reg;
  alignas(64) float buf[max_chunk];
  alignas(64) float xt[max_chunk];
  for (index j = 0; j < n; ++j) {
    std::array<reg, max_dot_rows> acc;
    for (index r = 0; r < m; ++r) acc[static_cast<std::size_t>(r)] = vec::zero();
    for (index c = 0; c < chunks; ++c) {
      decode(j, c, buf);
      const index p0 = c * chunk;
      const index valid = std::min(chunk, in - p0);
      for (index r = 0; r < m; ++r) {
        const float* xr = x + r * ldx + p0;
        if (valid < chunk) {  // the tail: copy x's valid part, zero the rest
          std::fill(xt, xt + chunk, 0.0f);
          std::copy(xr, xr + valid, xt);
          xr = xt;
        }
        reg a = acc[static_cast<std::size_t>(r)];
        for (index p = 0; p < chunk; p += vec::width) a = vec::fma(vec::load(buf + p), vec::load(xr + p), a);
        acc[static_cast<std::size_t>(r)] = a;
      }
    }
    for (index r = 0; r < m; ++r) y[r * ldy + j] = vec::sum(acc[static_cast<std::size_t>(r)]);
  }
}

inline void int8_dot(portable_tag, const std::int8_t* q, const float* scale, index in, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  constexpr index chunk = 64;
  auto decode = [&](index j, index c, float* buf) {
    const index p0 = c * chunk;
    const index valid = std::min(chunk, in - p0);
    const std::int8_t* src = q + j * in + p0;
    for (index p = 0; p < valid; ++p) buf[p] = static_cast<float>(src[p]);
    for (index p = valid; p < chunk; ++p) buf[p] = 0.0f;
  };
  dot(decode, chunk, (in + chunk - 1) / chunk, in, n, x, ldx, m, y, ldy);
  for (index j = 0; j < n; ++j) {
    for (index r = 0; r < m; ++r) y[r * ldy + j] *= scale[j];
  }
}

inline void q4_0_dot(portable_tag, const formats::block_q4_0* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  auto decode = [&](index j, index c, float* buf) { formats::decode_q4_0_block(blocks[j * nb + c], buf); };
  dot(decode, formats::q4_0_block_size, nb, nb * formats::q4_0_block_size, n, x, ldx, m, y, ldy);
}

inline void q8_0_dot(portable_tag, const formats::block_q8_0* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  auto decode = [&](index j, index c, float* buf) { decode_q8_0_row(blocks + j * nb + c, 1, buf); };
  dot(decode, formats::q8_0_block_size, nb, nb * formats::q8_0_block_size, n, x, ldx, m, y, ldy);
}

inline void q4_k_dot(portable_tag, const formats::block_q4_k* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  auto decode = [&](index j, index c, float* buf) { decode_q4_k_row(blocks + j * nb + c, 1, buf); };
  dot(decode, formats::q4_k_block_size, nb, nb * formats::q4_k_block_size, n, x, ldx, m, y, ldy);
}

inline void q6_k_dot(portable_tag, const formats::block_q6_k* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  auto decode = [&](index j, index c, float* buf) { decode_q6_k_row(blocks + j * nb + c, 1, buf); };
  dot(decode, formats::q6_k_block_size, nb, nb * formats::q6_k_block_size, n, x, ldx, m, y, ldy);
}

inline void nf4_dot(portable_tag, const formats::nf4_rows& w, index n, const float* x, index ldx,
                    index m, float* y, index ldy) {
  constexpr index block_bytes = formats::nf4_block_size / 2;
  const index blocks = w.in / formats::nf4_block_size;
  auto decode = [&](index j, index c, float* buf) {
    decode_nf4_bytes(w.packed + j * (w.in / 2) + c * block_bytes, block_bytes, w.absmax[j * blocks + c], buf);
  };
  dot(decode, formats::nf4_block_size, blocks, w.in, n, x, ldx, m, y, ldy);
}

}  // namespace peft::kernels::portable

