// peft/core/adapter.hpp — the one interface every adapter implements.
//
// An adapter A is a policy over a frozen base weight (see base_weight.hpp). `A::scalar` is its
// compute type (float or double); `A::cache_type` holds what backward needs from forward (x A^T
// for LoRA, row norms for DoRA, a bottleneck pre-activation for Compacter).
//
// Two forms of the forward pass, because adapters are not all additive on x:
//   forward(w, x, y, cache)               y = the WHOLE output of the adapted layer. The adapter
//                                         decides how the base is applied (DoRA rescales rows of
//                                         the base product, SHiRA adds a sparse delta to W0,
//                                         serial Compacter transforms the base output).
//   add_term(w, x, h, y, cache)           y += this adapter's contribution given the base output
//                                         h = x W0^T + b0; used when several adapters share a
//                                         layer (PEFT sums their terms).
// and their backward passes, g = dL/dy:
//   backward(w, x, g, dx, cache)          parameter gradients += ; dx = dL/dx (overwritten)
//   backward_term(w, x, h, g, dh, dx, c)  parameter gradients += ; dh += (d term/d h)^T g;
//                                         dx += (d term/d x)^T g (the direct path only)
// plus `parameters()` (named views, see parameter.hpp) and `zero_grad()`.
// Linear adapters are `mergeable_adapter_for`: delta_weight(w, dW) writes W' - W0 (out, in) and
// delta_bias(w, db) writes b' - b0, returning false when the adapter does not touch the bias.
#pragma once

#include <concepts>
#include <ranges>
#include <string_view>

#include "peft/core/base_weight.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft {

template <class A, class Base>
concept adapter_for =
    base_weight<Base> && compute_scalar<typename A::scalar> &&
    std::default_initializable<typename A::cache_type> &&
    requires(A& a, const A& ca, const Base& w, typename A::cache_type& cache,
             matrix_view<const typename A::scalar> in, matrix_view<typename A::scalar> out) {
      { A::method } -> std::convertible_to<std::string_view>;
      { ca.in_features() } -> std::convertible_to<index>;
      { ca.out_features() } -> std::convertible_to<index>;
      ca.forward(w, in, out, cache);
      ca.add_term(w, in, in, out, cache);
      a.backward(w, in, in, out, cache);
      a.backward_term(w, in, in, in, out, out, cache);
      { a.parameters() } -> std::ranges::range;
      a.zero_grad();
    };

template <class A, class Base>
concept mergeable_adapter_for =
    adapter_for<A, Base> &&
    requires(const A& ca, const Base& w, matrix_view<typename A::scalar> dw,
             typename A::scalar* db) {
      ca.delta_weight(w, dw);
      { ca.delta_bias(w, db) } -> std::convertible_to<bool>;
    };

}  // namespace peft
