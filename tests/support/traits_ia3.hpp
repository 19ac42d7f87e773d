// adapter_traits for (IA)^3 (see adapter_traits.hpp).
#pragma once

#include "peft/adapters/ia3.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::ia3<T>> {
  static constexpr bool identity_at_init = true;
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}}; }
  /// Alternates input scaling (feedforward) and output scaling; |l| in [0.5, 1.5] so that
  /// unmerging (a division by l) stays well conditioned.
  static peft::ia3<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    static int call = 0;
    peft::ia3<T> a(in, out, {.feedforward = call++ % 2 == 0});
    for (peft::index i = 0; i < a.l().rows(); ++i) {
      for (peft::index j = 0; j < a.l().cols(); ++j) {
        const double m = g.uniform(0.5, 1.5);
        a.l()(i, j) = static_cast<T>(g.below(2) == 0 ? m : -m);
      }
    }
    return a;
  }
  static peft::ia3<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::ia3<T>(in, out, {.feedforward = g.below(2) == 0});
  }
};

}  // namespace peft_test
