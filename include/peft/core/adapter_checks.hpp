// peft/core/adapter_checks.hpp — the argument checks every adapter runs, written once.
//
// Each throws shape_error naming the calling function ("[lora::forward] x is (3, 63), expected
// (3, 64)") when the base weight, the input, the output or a gradient does not fit the adapter.
// adapter_checks gives an adapter class the three as members, after its own readiness check
// (additive adapters get them from core/additive_adapter.hpp instead).
#pragma once

#include <string>
#include <string_view>

#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::detail {

/// "method::pass", the function an adapter's error messages name.
inline std::string pass_name(std::string_view method, const char* pass) {
  std::string s;
  s.reserve(method.size() + 16);  // built with += and reserve: g++ 12 misreports `a + b`
  s.append(method.data(), method.size());
  s += "::";
  s += pass;
  return s;
}

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

/// CRTP: check_base, check_io and check_grad as members of adapter A, each running A's
/// `void check_ready(const char* where) const` (e.g. "default-constructed") before the shape
/// checks above. A private check_ready needs `friend class detail::adapter_checks<A, T>;`; the
/// members are protected (bring them into A's own section with using-declarations).
template <class A, class T>
class adapter_checks {
 protected:
  template <class Base>
  void check_base(const char* where, const Base& w) const {
    self().check_ready(where);
    check_adapter_base(where, self(), w);
  }
  template <class Base>
  void check_io(const char* where, const Base& w, matrix_view<const T> x, matrix_view<T> y) const {
    self().check_ready(where);
    check_adapter_io(where, self(), w, x, y);
  }
  template <class Base>
  void check_grad(const char* where, const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                  matrix_view<T> dx) const {
    self().check_ready(where);
    check_adapter_grad(where, self(), w, x, g, dx);
  }

 private:
  const A& self() const { return static_cast<const A&>(*this); }
};

}  // namespace peft::detail
