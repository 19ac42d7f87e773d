// peft/core/weight_term_adapter.hpp — the four passes of an adapter whose term reads the frozen
// weight W0 but not the base output: y = x W0^T + b0 + term(W0, x) (HiRA, MiSS, GLoRA, DeFT,
// PEANuT).
//
//   template <compute_scalar T>
//   class my_adapter : public weight_term_adapter<my_adapter<T>, T> {
//     friend class weight_term_adapter<my_adapter<T>, T>;
//     friend class detail::adapter_checks<my_adapter<T>, T>;
//     static constexpr std::string_view method = "my_adapter";
//     void check_ready(const char* where) const;                 // e.g. "default-constructed"
//     void add_delta(w, x, y, cache) const;                       // y += term(W0, x)
//     void delta_backward(w, x, g, dx, cache);                    // grads += ; dx += (d term / dx)^T g
//   };
//
// provides forward, add_term, backward and backward_term with the adapter concept's signatures,
// each checking its arguments first (errors name "my_adapter::forward" and so on), and, as
// protected members, the checks of core/adapter_checks.hpp for the class's other functions. The
// type is not additive (is_additive_adapter): serving treats it like any method with its own passes.
#pragma once

#include <string>

#include "peft/core/adapter_checks.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft {

template <class Derived, compute_scalar T>
class weight_term_adapter : public detail::adapter_checks<Derived, T> {
 public:
  /// y = x W0^T + b0 + term(W0, x).
  template <base_weight Base, class Cache>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, Cache& cache) const {
    this->check_io(where("forward").c_str(), w, x, y);
    w.matmul(x, y);
    self().add_delta(w, x, y, cache);
  }
  /// y += term(W0, x); the base output h is not needed.
  template <base_weight Base, class Cache>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<T> y,
                Cache& cache) const {
    this->check_io(where("add_term").c_str(), w, x, y);
    self().add_delta(w, x, y, cache);
  }
  /// Parameter gradients += ; dx = g W0 + (d term / dx)^T g.
  template <base_weight Base, class Cache>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, Cache& cache) {
    this->check_grad(where("backward").c_str(), w, x, g, dx);
    w.matmul_t(g, dx, false);
    self().delta_backward(w, x, g, dx, cache);
  }
  /// Parameter gradients += ; dx += (d term / dx)^T g; nothing flows to h.
  template <base_weight Base, class Cache>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<const T> g,
                     matrix_view<T> /*dh*/, matrix_view<T> dx, Cache& cache) {
    this->check_grad(where("backward_term").c_str(), w, x, g, dx);
    self().delta_backward(w, x, g, dx, cache);
  }

 private:
  /// "method::pass" for error messages.
  static std::string where(const char* pass) {
    return detail::pass_name(Derived::method, pass);
  }
  const Derived& self() const { return static_cast<const Derived&>(*this); }
  Derived& self() { return static_cast<Derived&>(*this); }
};

}  // namespace peft
