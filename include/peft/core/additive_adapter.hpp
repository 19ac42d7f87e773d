// peft/core/additive_adapter.hpp — the four passes of an adapter whose term is added to the
// base product and does not depend on it: y = x W0^T + b0 + term(x).
//
//   template <compute_scalar T>
//   class my_adapter : public additive_adapter<my_adapter<T>, T> {
//     friend class additive_adapter<my_adapter<T>, T>;
//     void add_delta(x, y, cache) const;        // y += term(x)
//     void delta_backward(x, g, dx, cache);      // parameter grads += ; dx += (d term / dx)^T g
//     template <class Base> void check_io(where, w, x, y) const;   // argument checks
//     template <class Base> void check_grad(where, w, x, g, dx) const;
//     // optional, for bases with a fused product (kernels/epilogue.hpp):
//     void prepare_tiles(x, cache) const;                 // what every tile needs, once
//     void add_delta_tile(i0, j0, tile, cache) const;     // tile += term(x)[i0.., j0..]
//   };
//
// provides forward, add_term, backward and backward_term with the adapter concept's signatures;
// errors name the derived type's method: "[vera::forward] ...".
#pragma once

#include <string>

#include "peft/core/base_weight.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/epilogue.hpp"

namespace peft {

template <class Derived, compute_scalar T>
class additive_adapter {
 public:
  /// y = x W0^T + b0 + term(x).
  template <base_weight Base, class Cache>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, Cache& cache) const {
    self().check_io(where("forward").c_str(), w, x, y);
    if constexpr (fused_base_weight<Base, T> && has_tile_hooks<Cache>) {
      // The term joins each output tile of the base product while it is in cache.
      self().prepare_tiles(x, cache);
      w.matmul(x, y, [this, &cache](index i0, index j0, matrix_view<T> tile) {
        self().add_delta_tile(i0, j0, tile, cache);
      });
    } else {
      w.matmul(x, y);
      self().add_delta(x, y, cache);
    }
  }
  /// y += term(x); the base output h is not needed.
  template <base_weight Base, class Cache>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<T> y,
                Cache& cache) const {
    self().check_io(where("add_term").c_str(), w, x, y);
    self().add_delta(x, y, cache);
  }
  /// Parameter gradients += ; dx = g W0 + (d term / dx)^T g.
  template <base_weight Base, class Cache>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, Cache& cache) {
    self().check_grad(where("backward").c_str(), w, x, g, dx);
    w.matmul_t(g, dx, false);
    self().delta_backward(x, g, dx, cache);
  }
  /// Parameter gradients += ; dx += (d term / dx)^T g; nothing flows to h.
  template <base_weight Base, class Cache>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<const T> g,
                     matrix_view<T> /*dh*/, matrix_view<T> dx, Cache& cache) {
    self().check_grad(where("backward_term").c_str(), w, x, g, dx);
    self().delta_backward(x, g, dx, cache);
  }

 private:
  /// The optional fused form: prepare_tiles(x, cache) once, then add_delta_tile(i0, j0, tile,
  /// cache) adds the term to each finished output tile (concurrently on disjoint tiles).
  template <class Cache>
  static constexpr bool has_tile_hooks = requires(const Derived& d, matrix_view<const T> x, matrix_view<T> t,
                                                  Cache& c, index i) {
    d.prepare_tiles(x, c);
    d.add_delta_tile(i, i, t, c);
  };

  static std::string where(const char* pass) {
    std::string s;
    s.reserve(Derived::method.size() + 16);  // built with += and reserve: g++ 12 misreports `a + b`
    s.append(Derived::method.data(), Derived::method.size());
    s += "::";
    s += pass;
    return s;
  }
  const Derived& self() const { return static_cast<const Derived&>(*this); }
  Derived& self() { return static_cast<Derived&>(*this); }
};

}  // namespace peft
