// peft/core/adapter_checks.hpp — the argument checks every adapter runs, written once.
//
// Each throws shape_error naming the calling function ("[lora::forward] x is (3, 63), expected
// (3, 64)") when the base weight, the input, the output or a gradient does not fit the adapter.
#pragma once

#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::detail {

/// The base weight is (a.out_features(), a.in_features()).
template <class A, class Base>
void check_adapter_base(const char* where, const A& a, const Base& w) {
  if (w.in_features() != a.in_features() || w.out_features() != a.out_features()) {
    raise<shape_error>(where, "base weight is " + shape_string(w.out_features(), w.in_features()) +
                                  ", adapter expects " + shape_string(a.out_features(), a.in_features()));
  }
}

/// The base fits, x is (batch, in) and y is (batch, out).
template <class A, class Base, class T>
void check_adapter_io(const char* where, const A& a, const Base& w, matrix_view<const T> x, matrix_view<T> y) {
  check_adapter_base(where, a, w);
  expect_shape(where, "x", x, x.rows(), a.in_features());
  expect_shape(where, "y", y, x.rows(), a.out_features());
}

/// The base fits, x and dx are (batch, in), dy is (batch, out).
template <class A, class Base, class T>
void check_adapter_grad(const char* where, const A& a, const Base& w, matrix_view<const T> x,
                        matrix_view<const T> dy, matrix_view<T> dx) {
  check_adapter_base(where, a, w);
  expect_shape(where, "x", x, x.rows(), a.in_features());
  expect_shape(where, "dy", dy, x.rows(), a.out_features());
  expect_shape(where, "dx", dx, x.rows(), a.in_features());
}

}  // namespace peft::detail
