// peft/core/epilogue.hpp — how work joins a base product while its output is hot: the epilogue
// concept and the concept of a base whose product takes one.
//
// A fused base product y = x W0^T + b0 calls an epilogue once per finished output tile:
//
//   epi(i0, j0, tile)    tile = y.block(i0, j0, rows, cols), already holding x W0^T + b0
//
// The tiles of one call are disjoint and cover y exactly once; with OpenMP they are handed out
// from several threads at once, so an epilogue may only write its own tile (and state indexed
// by it) and read shared inputs. The epilogues the library declares live in kernels/
// (low_rank_epilogue.hpp: LoRA and every low-rank method; sparse_rows_epilogue.hpp: SHiRA).
#pragma once

#include <concepts>

#include "peft/core/matrix_view.hpp"

namespace peft {

/// The epilogue that adds nothing (the plain product).
struct no_epilogue {
  template <class T>
  void operator()(index /*i0*/, index /*j0*/, matrix_view<T> /*tile*/) const noexcept {}
};

/// F is an epilogue over scalar T.
template <class F, class T>
concept epilogue_for = std::invocable<const F&, index, index, matrix_view<T>>;

/// A base whose matmul takes an epilogue (dense and the quantized bases do).
template <class B, class T>
concept fused_base_weight = requires(const B& b, matrix_view<const T> x, matrix_view<T> y, const no_epilogue& epi) {
  b.matmul(x, y, epi);
};

}  // namespace peft
