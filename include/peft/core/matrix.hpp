// peft/core/matrix.hpp — an owning row-major matrix (contiguous), convertible to views.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "peft/core/matrix_view.hpp"

namespace peft {

template <class T>
class matrix {
 public:
  matrix() = default;
  matrix(index rows, index cols, T fill = T{})
      : rows_(checked(rows)), cols_(checked(cols)),
        data_(static_cast<std::size_t>(rows * cols), fill) {}
  /// Row-major values; throws shape_error unless values.size() == rows * cols.
  matrix(index rows, index cols, std::vector<T> values)
      : rows_(checked(rows)), cols_(checked(cols)), data_(std::move(values)) {
    if (static_cast<index>(data_.size()) != rows_ * cols_) {
      detail::raise<shape_error>("matrix::matrix", std::to_string(data_.size()) +
                                                       " values for a " +
                                                       detail::shape_string(rows, cols) +
                                                       " matrix");
    }
  }

  index rows() const noexcept { return rows_; }
  index cols() const noexcept { return cols_; }
  index size() const noexcept { return rows_ * cols_; }
  bool empty() const noexcept { return data_.empty(); }
  T* data() noexcept { return data_.data(); }
  const T* data() const noexcept { return data_.data(); }
  T& operator()(index i, index j) noexcept { return data_[static_cast<std::size_t>(i * cols_ + j)]; }
  const T& operator()(index i, index j) const noexcept {
    return data_[static_cast<std::size_t>(i * cols_ + j)];
  }
  T* row(index i) noexcept { return data() + i * cols_; }
  const T* row(index i) const noexcept { return data() + i * cols_; }

  matrix_view<T> view() noexcept { return {data(), rows_, cols_}; }
  matrix_view<const T> view() const noexcept { return {data(), rows_, cols_}; }
  operator matrix_view<T>() noexcept { return view(); }              // NOLINT
  operator matrix_view<const T>() const noexcept { return view(); }  // NOLINT

  void fill(T v) { std::fill(data_.begin(), data_.end(), v); }
  std::vector<T>& storage() noexcept { return data_; }
  const std::vector<T>& storage() const noexcept { return data_; }

 private:
  static index checked(index n) {
    if (n < 0) detail::raise<shape_error>("matrix::matrix", "negative dimension " + std::to_string(n));
    return n;
  }
  index rows_ = 0;
  index cols_ = 0;
  std::vector<T> data_;
};

/// A deep copy of a view into an owning matrix.
template <class T>
matrix<std::remove_const_t<T>> to_matrix(matrix_view<T> v) {
  matrix<std::remove_const_t<T>> m(v.rows(), v.cols());
  for (index i = 0; i < v.rows(); ++i) std::copy(v.row(i), v.row(i) + v.cols(), m.row(i));
  return m;
}

}  // namespace peft
