// peft/kernels/quantized_int8.hpp — products of quantized weights with 8-bit activations, as
// llama.cpp computes them: an option beside the exact f32-activation kernels of
// kernels/quantized.hpp (which stay the default).
//
//   std::vector<formats::block_q8_k> xq(m * nb);
//   kernels::quantize_q8_k_rows(x, ldx, m, nb, xq.data());        // activations to Q8_K
//   kernels::q4_k_q8_k_dot(kernels::active_isa(), w, nb, n, xq.data(), nb, m, y, ldy);
//   // y[r * ldy + j] = dot(weight row j, activation row r)   for r < m (m <= 8), j < n
//
// The activations are rounded to 8 bits per block (formats/q8_k.hpp): Q8_K (256 values) for the
// K-quants q4_k and q6_k, Q8_0 (32 values) for q8_0 and q4_0; the products are then integer
// sums per block, scaled once per block in f32. The result is llama.cpp's (up to the order of
// the f32 additions), not the exact product of the weights with x: each activation moves by up
// to half a step, max |x| / 254 of its block (for Gaussian rows of 4096 a q4_k dot moves by about
// 1e-4 of sum |w x|, under 1% of |y|). In exchange the kernels read 8 bits per activation and
// multiply bytes (AVX2: 32 byte products per instruction; q4_k at m = 1 runs ~3.5x faster).
//
// Weight rows are nb blocks each, consecutive (as the policies store them); activation rows are
// ldx blocks apart (ldx >= nb), each nb blocks of a row of x padded with zeros to whole blocks.
// Each operation is an overload set over the ISA tags with one dispatch table (as in
// kernels/quantized.hpp): the reference (kernels/reference/quantized_int8.hpp, exact integer sums
// combined in double), a portable one (plain scalar integer code), an AVX2 one
// (_mm256_maddubs_epi16; AVX-512 runs it) and a NEON one (vdotq_s32, AArch64 with DotProd).
#pragma once

#include <utility>

#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/base/formats/q8_k.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/detail/quantized_dot.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/portable/quantized_int8.hpp"
#include "peft/kernels/reference/quantized_int8.hpp"
#include "peft/kernels/arm/neon/quantized_int8.hpp"
#include "peft/kernels/x86/avx2/quantized_int8.hpp"

namespace peft::kernels {

namespace detail {

using q4_k_q8_k_dot_fn = void (*)(const formats::block_q4_k* w, index nb, index n, const formats::block_q8_k* x,
                                  index ldx, index m, float* y, index ldy);
using q6_k_q8_k_dot_fn = void (*)(const formats::block_q6_k* w, index nb, index n, const formats::block_q8_k* x,
                                  index ldx, index m, float* y, index ldy);
using q8_0_q8_0_dot_fn = void (*)(const formats::block_q8_0* w, index nb, index n, const formats::block_q8_0* x,
                                  index ldx, index m, float* y, index ldy);
using q4_0_q8_0_dot_fn = void (*)(const formats::block_q4_0* w, index nb, index n, const formats::block_q8_0* x,
                                  index ldx, index m, float* y, index ldy);

struct q4_k_q8_k_dot_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(q4_k_q8_k_dot(tag, std::forward<A>(a)...)) {
    return q4_k_q8_k_dot(tag, std::forward<A>(a)...);
  }
};
struct q6_k_q8_k_dot_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(q6_k_q8_k_dot(tag, std::forward<A>(a)...)) {
    return q6_k_q8_k_dot(tag, std::forward<A>(a)...);
  }
};
struct q8_0_q8_0_dot_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(q8_0_q8_0_dot(tag, std::forward<A>(a)...)) {
    return q8_0_q8_0_dot(tag, std::forward<A>(a)...);
  }
};
struct q4_0_q8_0_dot_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(q4_0_q8_0_dot(tag, std::forward<A>(a)...)) {
    return q4_0_q8_0_dot(tag, std::forward<A>(a)...);
  }
};

/// The integer dot kernels of every ISA (kernels/dispatch.hpp).
inline constexpr dispatch_table<q4_k_q8_k_dot_fn> q4_k_q8_k_dot_table =
    make_dispatch_table<q4_k_q8_k_dot_fn, q4_k_q8_k_dot_op>();
inline constexpr dispatch_table<q6_k_q8_k_dot_fn> q6_k_q8_k_dot_table =
    make_dispatch_table<q6_k_q8_k_dot_fn, q6_k_q8_k_dot_op>();
inline constexpr dispatch_table<q8_0_q8_0_dot_fn> q8_0_q8_0_dot_table =
    make_dispatch_table<q8_0_q8_0_dot_fn, q8_0_q8_0_dot_op>();
inline constexpr dispatch_table<q4_0_q8_0_dot_fn> q4_0_q8_0_dot_table =
    make_dispatch_table<q4_0_q8_0_dot_fn, q4_0_q8_0_dot_op>();

}  // namespace detail

/// Rows of x (ldx floats apart, each nb * 256 readable values) to q8_k rows of nb blocks
/// (out[r * nb + b]), with formats::quantize_q8_k_block.
inline void quantize_q8_k_rows(const float* x, index ldx, index m, index nb, formats::block_q8_k* out) noexcept {
  for (index r = 0; r < m; ++r) {
    for (index b = 0; b < nb; ++b) {
      formats::quantize_q8_k_block(x + r * ldx + b * formats::q8_k_block_size, out[r * nb + b]);
    }
  }
}

/// Rows of x (ldx floats apart, each nb * 32 readable values) to q8_0 activation rows of nb blocks
/// (out[r * nb + b]), with formats::quantize_q8_0_activations (ggml's x86 rule).
inline void quantize_q8_0_rows(const float* x, index ldx, index m, index nb, formats::block_q8_0* out) noexcept {
  for (index r = 0; r < m; ++r) {
    for (index b = 0; b < nb; ++b) {
      formats::quantize_q8_0_activations(x + r * ldx + b * formats::q8_0_block_size, out[r * nb + b]);
    }
  }
}

/// q4_k weight rows of nb blocks times q8_k activation rows (ldx blocks apart). m <= max_dot_rows.
inline void q4_k_q8_k_dot(isa which, const formats::block_q4_k* w, index nb, index n, const formats::block_q8_k* x,
                          index ldx, index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  detail::q4_k_q8_k_dot_table[which](w, nb, n, x, ldx, m, y, ldy);
}

/// q6_k weight rows of nb blocks times q8_k activation rows (ldx blocks apart). m <= max_dot_rows.
inline void q6_k_q8_k_dot(isa which, const formats::block_q6_k* w, index nb, index n, const formats::block_q8_k* x,
                          index ldx, index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  detail::q6_k_q8_k_dot_table[which](w, nb, n, x, ldx, m, y, ldy);
}

/// q8_0 weight rows of nb blocks times q8_0 activation rows (ldx blocks apart). m <= max_dot_rows.
inline void q8_0_q8_0_dot(isa which, const formats::block_q8_0* w, index nb, index n, const formats::block_q8_0* x,
                          index ldx, index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  detail::q8_0_q8_0_dot_table[which](w, nb, n, x, ldx, m, y, ldy);
}

/// q4_0 weight rows of nb blocks times q8_0 activation rows (ldx blocks apart). m <= max_dot_rows.
inline void q4_0_q8_0_dot(isa which, const formats::block_q4_0* w, index nb, index n, const formats::block_q8_0* x,
                          index ldx, index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  detail::q4_0_q8_0_dot_table[which](w, nb, n, x, ldx, m, y, ldy);
}

}  // namespace peft::kernels
