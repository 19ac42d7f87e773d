// peft/kernels/quantized.hpp — products with quantized weights, decoded in registers.
//
// One dot operation per format of base/formats/ (int8 row-wise, q4_0, q8_0, q4_k, q6_k, nf4), each an overload
// set over the ISA tags with one dispatch table (kernels/dispatch.hpp): the scalar reference
// (kernels/reference/quantized.hpp, double accumulation), a portable xsimd version
// (kernels/portable/quantized.hpp: a block decoded to a small stack buffer, then FMAs), and AVX2
// and AVX-512 versions with intrinsics (kernels/x86/*/quantized.hpp, compiled with function-level
// targets, so a binary built without -march runs them when the CPU has them). An ISA without its
// own version (NEON today) runs its parent's.
//
//   kernels::q4_0_dot(kernels::active_isa(), blocks, nb, n, x, ldx, m, y, ldy);
//   // y[r * ldy + j] = sum_p W[j, p] x[r * ldx + p]   for r < m (m <= 8), j < n
//
// A dot kernel streams its n weight rows once and multiplies every decoded block into all m
// rows of x (skinny batches: callers split larger batches into groups of max_dot_rows). Decode
// kernels (kernels/decode.hpp, decode_*_row) write whole rows as f32 for the panel products of
// large batches.
//
// Adding a format's kernel: its overload in reference/quantized.hpp (and in each ISA folder that
// has a faster one), and its signature, op, table and public function below.
#pragma once

#include <cstdint>
#include <utility>

#include "peft/base/formats/nf4.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/decode.hpp"
#include "peft/kernels/detail/quantized_dot.hpp"
#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/portable/quantized.hpp"
#include "peft/kernels/reference/quantized.hpp"
#include "peft/kernels/x86/avx2/quantized.hpp"
#include "peft/kernels/x86/avx512/quantized.hpp"

namespace peft::kernels {

namespace detail {

using int8_dot_fn = void (*)(const std::int8_t* q, const float* scale, index in, index n,
                             const float* x, index ldx, index m, float* y, index ldy);
using q4_0_dot_fn = void (*)(const formats::block_q4_0* blocks, index nb, index n, const float* x,
                             index ldx, index m, float* y, index ldy);
using q8_0_dot_fn = void (*)(const formats::block_q8_0* blocks, index nb, index n, const float* x,
                             index ldx, index m, float* y, index ldy);
using q4_k_dot_fn = void (*)(const formats::block_q4_k* blocks, index nb, index n, const float* x,
                             index ldx, index m, float* y, index ldy);
using q6_k_dot_fn = void (*)(const formats::block_q6_k* blocks, index nb, index n, const float* x,
                             index ldx, index m, float* y, index ldy);
using nf4_dot_fn = void (*)(const formats::nf4_rows& w, index n, const float* x, index ldx,
                            index m, float* y, index ldy);

struct int8_dot_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(int8_dot(tag, std::forward<A>(a)...)) {
    return int8_dot(tag, std::forward<A>(a)...);
  }
};
struct q4_0_dot_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(q4_0_dot(tag, std::forward<A>(a)...)) {
    return q4_0_dot(tag, std::forward<A>(a)...);
  }
};
struct q8_0_dot_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(q8_0_dot(tag, std::forward<A>(a)...)) {
    return q8_0_dot(tag, std::forward<A>(a)...);
  }
};
struct q4_k_dot_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(q4_k_dot(tag, std::forward<A>(a)...)) {
    return q4_k_dot(tag, std::forward<A>(a)...);
  }
};
struct q6_k_dot_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(q6_k_dot(tag, std::forward<A>(a)...)) {
    return q6_k_dot(tag, std::forward<A>(a)...);
  }
};
struct nf4_dot_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(nf4_dot(tag, std::forward<A>(a)...)) {
    return nf4_dot(tag, std::forward<A>(a)...);
  }
};

/// The dot kernels of every ISA (kernels/dispatch.hpp).
inline constexpr dispatch_table<int8_dot_fn> int8_dot_table = make_dispatch_table<int8_dot_fn, int8_dot_op>();
inline constexpr dispatch_table<q4_0_dot_fn> q4_0_dot_table = make_dispatch_table<q4_0_dot_fn, q4_0_dot_op>();
inline constexpr dispatch_table<q8_0_dot_fn> q8_0_dot_table = make_dispatch_table<q8_0_dot_fn, q8_0_dot_op>();
inline constexpr dispatch_table<q4_k_dot_fn> q4_k_dot_table = make_dispatch_table<q4_k_dot_fn, q4_k_dot_op>();
inline constexpr dispatch_table<q6_k_dot_fn> q6_k_dot_table = make_dispatch_table<q6_k_dot_fn, q6_k_dot_op>();
inline constexpr dispatch_table<nf4_dot_fn> nf4_dot_table = make_dispatch_table<nf4_dot_fn, nf4_dot_op>();

}  // namespace detail

/// int8 rows (in per row): y(r, j) = scale[j] sum_p q[j, p] x(r, p). m <= max_dot_rows.
inline void int8_dot(isa which, const std::int8_t* q, const float* scale, index in, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  detail::int8_dot_table[which](q, scale, in, n, x, ldx, m, y, ldy);
}

/// q4_0 rows of nb blocks; x holds nb * 32 readable values per row, zero past in_features.
inline void q4_0_dot(isa which, const formats::block_q4_0* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  detail::q4_0_dot_table[which](blocks, nb, n, x, ldx, m, y, ldy);
}

/// q8_0 rows of nb blocks; x holds nb * 32 readable values per row, zero past in_features.
inline void q8_0_dot(isa which, const formats::block_q8_0* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  detail::q8_0_dot_table[which](blocks, nb, n, x, ldx, m, y, ldy);
}

/// q4_k rows of nb blocks; x holds nb * 256 readable values per row, zero past in_features.
inline void q4_k_dot(isa which, const formats::block_q4_k* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  detail::q4_k_dot_table[which](blocks, nb, n, x, ldx, m, y, ldy);
}

/// q6_k rows of nb blocks; x holds nb * 256 readable values per row, zero past in_features.
inline void q6_k_dot(isa which, const formats::block_q6_k* blocks, index nb, index n,
                     const float* x, index ldx, index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  detail::q6_k_dot_table[which](blocks, nb, n, x, ldx, m, y, ldy);
}

/// nf4 rows with in % 64 == 0 (row j's blocks are its own).
inline void nf4_dot(isa which, const formats::nf4_rows& w, index n, const float* x, index ldx,
                    index m, float* y, index ldy) {
  if (n <= 0 || m <= 0) return;
  detail::nf4_dot_table[which](w, n, x, ldx, m, y, ldy);
}

}  // namespace peft::kernels
