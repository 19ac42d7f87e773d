// adapter_traits for DeLoRA (see adapter_traits.hpp).
#pragma once

#include <vector>

#include "peft/adapters/delora.hpp"
#include "peft/base/dense.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::delora<T>> {
  static constexpr bool identity_at_init = true;  // B = 0
  // No side of 1: a column of B (or row of A) of one value enters only as its sign (c divides
  // by its norm), so the exact gradient is zero and finite differences compare rounding noise.
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {2, 3}, {13, 2}, {16, 24}}; }

  /// Random A, B, lambda = +-[0.5, 2) and w in [0.5, 1.5), rank 1 to 4.
  static peft::delora<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index r = 1 + static_cast<peft::index>(g.below(4));
    std::vector<T> w(static_cast<std::size_t>(in));
    for (auto& v : w) v = static_cast<T>(g.uniform(0.5, 1.5));
    const T lambda = static_cast<T>((g.below(2) ? 1.0 : -1.0) * g.uniform(0.5, 2.0));
    return peft::delora<T>(random_matrix<T>(r, in, g), random_matrix<T>(out, r, g), lambda, std::move(w));
  }
  /// PEFT's init over a random base (B = 0 whatever the base).
  static peft::delora<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    const peft::dense<T> w(random_matrix<T>(out, in, g));
    return peft::delora<T>(w, {.rank = 2, .seed = g.next()});
  }
  /// PEFT's init over the layer's base: w = its column norms, B = 0.
  template <class Base>
  static peft::delora<T> make_default_for(const Base& w, peft::rng& g) {
    return peft::delora<T>(w, {.rank = 2, .seed = g.next()});
  }
};

}  // namespace peft_test
