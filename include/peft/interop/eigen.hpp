// peft/interop/eigen.hpp — zero-copy bridges between matrix_view and Eigen.
//
//   auto m = peft::as_eigen(view);           // Eigen::Map, row-major, outer stride = view.stride()
//   peft::matrix_view<float> v = peft::view_of(eigen_row_major_matrix);
//   peft::matrix<float> c = peft::to_matrix(any_eigen_matrix_or_expression);   // a copy
//
// matrix_view is row-major; Eigen's default matrices are column-major. view_of refuses those at
// compile time in one sentence; to_matrix copies them.
#pragma once

#include <Eigen/Core>
#include <string>
#include <type_traits>

#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft {

template <class T>
using eigen_row_major = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic,
                                      Eigen::RowMajor>;

/// An Eigen::Map over the view's memory (const view -> const map). No copy.
template <class T>
auto as_eigen(matrix_view<T> v) {
  using plain = eigen_row_major<T>;
  using mapped = std::conditional_t<std::is_const_v<T>, const plain, plain>;
  const Eigen::Index stride = v.stride() < v.cols() ? v.cols() : v.stride();
  return Eigen::Map<mapped, Eigen::Unaligned, Eigen::OuterStride<>>(
      v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(stride));
}

namespace detail {
template <class Derived>
constexpr void require_row_major() {
  static_assert(static_cast<bool>(Derived::IsRowMajor) || Derived::ColsAtCompileTime == 1,
                "peft::view_of: a column-major Eigen matrix (Eigen's default) cannot be viewed as a row-major "
                "matrix_view without copying; declare it peft::eigen_row_major<T> "
                "(Eigen::Matrix<T, Dynamic, Dynamic, RowMajor>) or copy it with peft::to_matrix(m)");
}
}  // namespace detail

/// A view of a row-major Eigen matrix (or a column vector) with unit inner stride. No copy. A
/// column-major matrix is refused at compile time with one sentence (use to_matrix to copy it).
template <class Derived>
auto view_of(Eigen::PlainObjectBase<Derived>& m) {
  detail::require_row_major<Derived>();
  using T = typename Derived::Scalar;
  // A column-major column vector's rows are inner-stride apart (outerStride() is its size).
  const index stride = Derived::IsRowMajor ? m.outerStride() : m.innerStride();
  return matrix_view<T>(m.data(), m.rows(), m.cols(), stride);
}
template <class Derived>
auto view_of(const Eigen::PlainObjectBase<Derived>& m) {
  detail::require_row_major<Derived>();
  using T = typename Derived::Scalar;
  const index stride = Derived::IsRowMajor ? m.outerStride() : m.innerStride();
  return matrix_view<const T>(m.data(), m.rows(), m.cols(), stride);
}

/// A copy of any Eigen matrix or expression (column-major included) as a peft::matrix.
template <class Derived>
matrix<typename Derived::Scalar> to_matrix(const Eigen::DenseBase<Derived>& e) {
  matrix<typename Derived::Scalar> m(e.rows(), e.cols());
  as_eigen(m.view()) = e;
  return m;
}

/// A view of an Eigen::Map of a row-major matrix (e.g. one made by as_eigen).
template <class Plain, int Options, class Stride>
  requires(static_cast<bool>(std::remove_const_t<Plain>::IsRowMajor))
auto view_of(const Eigen::Map<Plain, Options, Stride>& m) {
  using T = std::conditional_t<std::is_const_v<Plain>, const typename Plain::Scalar,
                               typename Plain::Scalar>;
  if (m.cols() > 1 && m.innerStride() != 1) {
    detail::raise<shape_error>("peft::view_of", "the map's columns are not contiguous (inner stride " +
                                                    std::to_string(m.innerStride()) + ")");
  }
  return matrix_view<T>(const_cast<T*>(m.data()), m.rows(), m.cols(), m.outerStride());
}

}  // namespace peft
