// adapter_traits for LoKr (see adapter_traits.hpp).
#pragma once

#include "peft/adapters/lokr.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::lokr<T>> {
  static constexpr bool identity_at_init = true;
  // Primes factor as 1 x n; 16 = 4 x 4, 24 = 4 x 6, 18 = 3 x 6, 12 = 3 x 4.
  static std::vector<std::pair<peft::index, peft::index>> shapes() {
    return {{7, 5}, {1, 3}, {13, 1}, {16, 24}, {12, 18}};
  }
  /// Cycles through PEFT's forms: both factors full (large r), both low rank (r = 1 with
  /// decompose_both), and decompose_factor 2 with r = 2.
  static peft::lokr<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    static int call = 0;
    const int kind = call++ % 3;
    peft::lokr_options o{.rank = kind == 0 ? 8 : kind,
                         .alpha = 3.0,
                         .decompose_both = kind == 1,
                         .decompose_factor = kind == 2 ? 2 : -1,
                         .init = peft::lokr_init::random,
                         .seed = g.next()};
    return peft::lokr<T>(in, out, o);
  }
  static peft::lokr<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::lokr<T>(in, out, {.rank = 1, .alpha = 4.0, .decompose_both = true, .seed = g.next()});
  }
};

}  // namespace peft_test
