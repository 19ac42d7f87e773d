// adapter_traits for HRA (see adapter_traits.hpp).
#pragma once

#include <algorithm>

#include "peft/adapters/hra.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::hra<T>> {
  static constexpr bool identity_at_init = true;  // even r: the reflections cancel in pairs
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}}; }
  /// Alternates Householder chains (odd r, more reflections than inputs for the small shapes, so
  /// in = 1 still reflects) and Gram-Schmidt (r <= in), random u.
  static peft::hra<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    static int call = 0;
    const bool gs = call++ % 2 == 1;
    return peft::hra<T>(in, out, {.rank = gs ? std::min<peft::index>(in, 3) : 5, .apply_gs = gs,
                                  .init = peft::hra_init::random, .seed = g.next()});
  }
  static peft::hra<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::hra<T>(in, out, {.rank = 4, .seed = g.next()});
  }
};

}  // namespace peft_test
