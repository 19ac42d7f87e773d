// peft/kernels/epilogue.hpp — how an adapter's term joins the base product while it is hot.
//
// A fused base product y = x W0^T + b0 calls an epilogue once per finished output tile:
//
//   epi(i0, j0, tile)    tile = y.block(i0, j0, rows, cols), already holding x W0^T + b0
//
// The tiles of one call are disjoint and cover y exactly once; with OpenMP they are handed out
// from several threads at once, so an epilogue may only write its own tile (and read shared
// inputs). LoRA adds s t[i0.., :] B[j0.., :]^T there (t = x A^T computed beforehand); DoRA scales
// the columns; an unmerged SHiRA adds its sparse rows.
#pragma once

#include <concepts>

#include "peft/core/matrix_view.hpp"

namespace peft::kernels {

/// The epilogue that adds nothing (the plain product).
struct no_epilogue {
  template <class T>
  void operator()(index /*i0*/, index /*j0*/, matrix_view<T> /*tile*/) const noexcept {}
};

/// F is an epilogue over scalar T.
template <class F, class T>
concept epilogue_for = std::invocable<const F&, index, index, matrix_view<T>>;

}  // namespace peft::kernels

namespace peft {

/// A base whose matmul takes an epilogue (dense f32/f64 and the quantized bases do).
template <class B, class T>
concept fused_base_weight = requires(const B& b, matrix_view<const T> x, matrix_view<T> y,
                                     const kernels::no_epilogue& epi) {
  b.matmul(x, y, epi);
};

}  // namespace peft
