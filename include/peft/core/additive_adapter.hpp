// peft/core/additive_adapter.hpp — the four passes of an adapter whose term is added to the
// base product and does not depend on it: y = x W0^T + b0 + term(x).
//
//   template <compute_scalar T>
//   class my_adapter : public additive_adapter<my_adapter<T>, T> {
//     friend class additive_adapter<my_adapter<T>, T>;
//     void add_delta(x, y, cache) const;             // y += term(x)
//     void delta_backward(x, g, dx, cache);           // parameter grads += ; dx += (d term / dx)^T g
//     // optional: the fused form, for bases whose product takes an epilogue (core/epilogue.hpp)
//     Epilogue tile_epilogue(x, cache) const;         // prepares what every tile needs, returns
//                                                     // the epilogue adding term(x) to a tile
//     // optional: void check_ready(const char* where) const;   // e.g. "default-constructed"
//     // optional: template <class Base> void check_base_state(const char* where, const Base&) const;
//   };
//
// provides forward, add_term, backward and backward_term with the adapter concept's signatures,
// the argument checks (errors name the derived type's method: "[vera::forward] ..."), and
// marks the type as additive (is_additive_adapter), which tells the serving code that the term
// does not read the base output.
#pragma once

#include <string>
#include <type_traits>

#include "peft/core/adapter_checks.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/epilogue.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft {

/// Tag base of every additive adapter.
struct additive_adapter_tag {};

template <class A>
inline constexpr bool is_additive_adapter = std::is_base_of_v<additive_adapter_tag, A>;

template <class Derived, compute_scalar T>
class additive_adapter : public additive_adapter_tag {
 public:
  using scalar = T;

  /// y = x W0^T + b0 + term(x).
  template <base_weight Base, class Cache>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, Cache& cache) const {
    check_io(where("forward").c_str(), w, x, y);
    if constexpr (fused_base_weight<Base, T> && has_tile_epilogue<Cache>) {
      // The term joins each output tile of the base product while it is in cache.
      w.matmul(x, y, self().tile_epilogue(x, cache));
    } else {
      w.matmul(x, y);
      self().add_delta(x, y, cache);
    }
  }
  /// y += term(x); the base output h is not needed.
  template <base_weight Base, class Cache>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<T> y,
                Cache& cache) const {
    check_io(where("add_term").c_str(), w, x, y);
    self().add_delta(x, y, cache);
  }
  /// Parameter gradients += ; dx = g W0 + (d term / dx)^T g.
  template <base_weight Base, class Cache>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, Cache& cache) {
    check_grad(where("backward").c_str(), w, x, g, dx);
    w.matmul_t(g, dx, false);
    self().delta_backward(x, g, dx, cache);
  }
  /// Parameter gradients += ; dx += (d term / dx)^T g; nothing flows to h.
  template <base_weight Base, class Cache>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<const T> g,
                     matrix_view<T> /*dh*/, matrix_view<T> dx, Cache& cache) {
    check_grad(where("backward_term").c_str(), w, x, g, dx);
    self().delta_backward(x, g, dx, cache);
  }

 protected:
  /// "method::pass" for error messages.
  static std::string where(const char* pass) {
    return detail::pass_name(Derived::method, pass);
  }
  template <class Base>
  void check_base(const char* where, const Base& w) const {
    ready(where, w);
    detail::check_adapter_base(where, self(), w);
  }
  template <class Base>
  void check_io(const char* where, const Base& w, matrix_view<const T> x, matrix_view<T> y) const {
    ready(where, w);
    detail::check_adapter_io(where, self(), w, x, y);
  }
  template <class Base>
  void check_grad(const char* where, const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                  matrix_view<T> dx) const {
    ready(where, w);
    detail::check_adapter_grad(where, self(), w, x, g, dx);
  }

 private:
  template <class Cache>
  static constexpr bool has_tile_epilogue = requires(const Derived& d, matrix_view<const T> x, Cache& c) {
    d.tile_epilogue(x, c);
  };
  template <class Base>
  void ready(const char* where, const Base& w) const {
    if constexpr (requires(const Derived& d) { d.check_ready(where); }) self().check_ready(where);
    if constexpr (requires(const Derived& d) { d.check_base_state(where, w); }) self().check_base_state(where, w);
  }
  const Derived& self() const { return static_cast<const Derived&>(*this); }
  Derived& self() { return static_cast<Derived&>(*this); }
};

}  // namespace peft
