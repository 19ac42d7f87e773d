// peft/interop/xtensor.hpp — zero-copy bridges between matrix_view and xtensor.
//
//   auto a = peft::as_xtensor(view);          // a strided view over the view's memory
//   peft::matrix_view<float> v = peft::view_of(xtensor_2d);   // row-major xtensor only
#pragma once

#include <array>
#include <cstddef>
#include <type_traits>
#include <utility>
#include <xtensor/xadapt.hpp>
#include <xtensor/xstrided_view.hpp>
#include <xtensor/xtensor.hpp>

#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft {

/// A 2-D strided xtensor view over the view's memory (row stride kept). No copy.
template <class T>
auto as_xtensor(matrix_view<T> v) {
  std::array<std::size_t, 2> shape{static_cast<std::size_t>(v.rows()),
                                   static_cast<std::size_t>(v.cols())};
  std::array<std::ptrdiff_t, 2> strides{v.rows() > 1 ? v.stride() : v.cols(), 1};
  const auto extent = v.empty() ? std::size_t{0}
                                : static_cast<std::size_t>((v.rows() - 1) * strides[0] + v.cols());
  // An xtensor adaptor assumes its buffer holds exactly its elements (fill() and scalar
  // assignment walk the buffer linearly), so a padded row stride needs a strided view over a
  // flat adaptor of the whole span.
  auto flat = xt::adapt(v.data(), extent, xt::no_ownership(), std::array<std::size_t, 1>{extent});
  return xt::strided_view(std::move(flat), std::move(shape), std::move(strides), 0,
                          xt::layout_type::dynamic);
}

/// A view of a 2-D row-major xtensor container or adaptor with unit column stride. No copy.
template <class E>
auto view_of(E& e) -> matrix_view<std::remove_reference_t<decltype(*e.data())>>
  requires requires { e.data(); e.strides(); e.shape(); e.dimension(); }
{
  using T = std::remove_reference_t<decltype(*e.data())>;
  if (e.dimension() != 2) {
    detail::raise<shape_error>("peft::view_of", "expected a 2-D tensor, got " +
                                                    std::to_string(e.dimension()) + " dimensions");
  }
  const auto rows = static_cast<index>(e.shape()[0]);
  const auto cols = static_cast<index>(e.shape()[1]);
  const auto col_stride = static_cast<index>(e.strides()[1]);
  if (cols > 1 && col_stride != 1) {
    detail::raise<shape_error>("peft::view_of", "the tensor's columns are not contiguous (stride " +
                                                    std::to_string(col_stride) + ")");
  }
  index row_stride = static_cast<index>(e.strides()[0]);
  if (rows <= 1) row_stride = cols;
  return matrix_view<T>(e.data() + e.data_offset(), rows, cols, row_stride);
}

}  // namespace peft
