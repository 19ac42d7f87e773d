// adapter_traits for PEANuT (see adapter_traits.hpp).
#pragma once

#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/peanut.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::peanut<T>> {
  static constexpr bool identity_at_init = true;  // B = 0
  /// The encoder/decoder gradients pass through up to five activations (sigmoid's derivative is
  /// at most 1/4 each) and can be small against the loss, so the central differences' rounding
  /// noise (~1e-16 |loss| / h) reaches 2e-6 of them on some draws (measured on the clang and
  /// aarch64 builds). test_peanut holds every gradient to PEFT's autograd within 1e-12.
  static constexpr double fd_tolerance = 1e-5;
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {2, 3}, {13, 2}, {16, 24}, {1, 1}}; }

  /// Random A, encoders, decoders and B (uniform in [-1, 1): the kinks of relu and leaky_relu at
  /// 0 are met with probability ~0), rank 1 to 3, depth 0 to 2, an activation drawn from the
  /// closed forms (relu6 and relu2 left out: relu6's second kink at 6 is out of reach here, relu2
  /// squares at every level) and a scaling.
  static peft::peanut<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    static constexpr std::string_view acts[] = {"relu",       "leaky_relu", "gelu",    "gelu_new", "gelu_fast",
                                                "quick_gelu", "silu",       "swish", "sigmoid", "tanh",     "linear"};
    const peft::index r = 1 + static_cast<peft::index>(g.below(3));
    const peft::index depth = static_cast<peft::index>(g.below(3));
    const std::string_view act = acts[g.below(std::size(acts))];
    std::vector<peft::matrix<T>> enc, dec;
    for (peft::index i = 0; i < depth; ++i) enc.push_back(random_matrix<T>(r, r, g));
    for (peft::index i = 0; i < depth; ++i) dec.push_back(random_matrix<T>(r, r, g));
    const double scaling = g.below(2) ? 1.0 : 0.75;
    // One draw after the other: in one argument list their order would be the compiler's (g++
    // on x86 evaluates right to left, clang left to right), and so would the instance tested.
    auto b = random_matrix<T>(out, r, g);
    auto a = random_matrix<T>(r, out, g);
    return peft::peanut<T>(std::move(a), std::move(enc), std::move(dec), std::move(b), act, scaling, in);
  }
  /// PEFT's init: B = 0 (A and the chain kaiming-uniform).
  static peft::peanut<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::peanut<T>(in, out, {.rank = 2, .depth = 1, .act_fn = "gelu", .scaling = 1.0, .init_weights = true,
                                     .seed = g.next()});
  }
};

}  // namespace peft_test
