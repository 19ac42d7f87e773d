// peft/core/parameter.hpp — named views of an adapter's tensors.
//
// `parameters()` of every adapter returns these: the name PEFT uses inside the module
// (`lora_A.weight`, `lora_magnitude_vector`, ...), the value and its gradient as row-major
// views, the logical shape as it is saved (a vector is {n}, a matrix {rows, cols}), whether an
// optimizer should update it, and whether it is shared with other layers (VeRA's projections,
// Compacter's rule: shared tensors are saved once, not per layer).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/matrix_view.hpp"

namespace peft {

template <class T>
struct parameter {
  std::string name;                 // PEFT's name inside the module, without the adapter name
  matrix_view<T> value;             // the data
  matrix_view<T> grad;              // same shape as value; empty when not trainable
  std::vector<std::int64_t> shape;  // logical shape for checkpoints
  bool trainable = true;
  bool shared = false;
  bool integer = false;             // saved as an I32 tensor (SHiRA's indices), never trained
};

namespace detail {

/// Logical shape of a view: {cols} for a vector stored as one row, else {rows, cols}.
template <class T>
std::vector<std::int64_t> shape_of(const matrix_view<T>& v, bool is_vector) {
  if (is_vector) return {static_cast<std::int64_t>(v.cols())};
  return {static_cast<std::int64_t>(v.rows()), static_cast<std::int64_t>(v.cols())};
}

}  // namespace detail
}  // namespace peft
