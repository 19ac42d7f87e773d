// peft/core/matrix_view.hpp — the one vocabulary type for 2-D data.
//
// A non-owning, row-major, row-strided view: element (i, j) lives at data[i * stride + j].
// Activations are (batch, features), weights (out_features, in_features) as in PyTorch's
// nn.Linear. `matrix_view<const T>` is the read-only form; a mutable view converts to it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "peft/core/error.hpp"

namespace peft {

using index = std::ptrdiff_t;

template <class T>
class matrix_view {
 public:
  using value_type = std::remove_cv_t<T>;
  using element_type = T;

  constexpr matrix_view() noexcept = default;
  /// Contiguous rows (stride == cols).
  constexpr matrix_view(T* data, index rows, index cols) noexcept
      : data_(data), rows_(rows), cols_(cols), stride_(cols) {}
  /// Rows `stride` elements apart; stride >= cols.
  constexpr matrix_view(T* data, index rows, index cols, index stride) noexcept
      : data_(data), rows_(rows), cols_(cols), stride_(stride) {}

  /// matrix_view<T> -> matrix_view<const T>.
  template <class U>
    requires(std::is_const_v<T> && std::is_same_v<std::remove_const_t<T>, U>)
  constexpr matrix_view(const matrix_view<U>& other) noexcept  // NOLINT(google-explicit-constructor)
      : data_(other.data()), rows_(other.rows()), cols_(other.cols()), stride_(other.stride()) {}

  constexpr T* data() const noexcept { return data_; }
  constexpr index rows() const noexcept { return rows_; }
  constexpr index cols() const noexcept { return cols_; }
  constexpr index stride() const noexcept { return stride_; }
  constexpr index size() const noexcept { return rows_ * cols_; }
  constexpr bool empty() const noexcept { return rows_ == 0 || cols_ == 0; }
  constexpr bool contiguous() const noexcept { return stride_ == cols_ || rows_ <= 1; }

  constexpr T& operator()(index i, index j) const noexcept { return data_[i * stride_ + j]; }
  constexpr T* row(index i) const noexcept { return data_ + i * stride_; }

  /// Rows [first, first + count).
  constexpr matrix_view row_block(index first, index count) const noexcept {
    return {data_ + first * stride_, count, cols_, stride_};
  }
  /// The sub-matrix of `nrows x ncols` at (i, j).
  constexpr matrix_view block(index i, index j, index nrows, index ncols) const noexcept {
    return {data_ + i * stride_ + j, nrows, ncols, stride_};
  }

 private:
  T* data_ = nullptr;
  index rows_ = 0;
  index cols_ = 0;
  index stride_ = 0;
};

template <class T>
matrix_view(T*, index, index) -> matrix_view<T>;
template <class T>
matrix_view(T*, index, index, index) -> matrix_view<T>;

namespace detail {

inline std::string shape_string(index rows, index cols) {
  // Appended piece by piece: `"(" + std::to_string(...)` trips a false -Wrestrict in GCC 12 -O2.
  std::string s = "(";
  s += std::to_string(rows);
  s += ", ";
  s += std::to_string(cols);
  s += ')';
  return s;
}

/// "[8, 96]": a tensor's shape as PyTorch prints it.
inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  s += ']';
  return s;
}

/// Throws shape_error "[where] <what> is (r, c), expected (rows, cols)" unless the view matches.
template <class T>
void expect_shape(const char* where, const char* what, const matrix_view<T>& v, index rows,
                  index cols) {
  if (v.rows() != rows || v.cols() != cols) {
    raise<shape_error>(where, std::string(what) + " is " + shape_string(v.rows(), v.cols()) +
                                  ", expected " + shape_string(rows, cols));
  }
  if (v.stride() < v.cols() && v.rows() > 1) {
    raise<shape_error>(where, std::string(what) + " has row stride " + std::to_string(v.stride()) +
                                  " smaller than its " + std::to_string(v.cols()) + " columns");
  }
  if (v.data() == nullptr && !v.empty()) {
    raise<shape_error>(where, std::string(what) + " is a null view");
  }
}

}  // namespace detail
}  // namespace peft
