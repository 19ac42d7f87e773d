// adapter_traits for LoHa (see adapter_traits.hpp).
#pragma once

#include "peft/adapters/loha.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::loha<T>> {
  static constexpr bool identity_at_init = true;
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}}; }
  static peft::loha<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index r = 1 + static_cast<peft::index>(g.below(4));
    return peft::loha<T>(in, out, {.rank = r, .alpha = 3.0, .init = peft::loha_init::random, .seed = g.next()});
  }
  static peft::loha<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::loha<T>(in, out, {.rank = 2, .alpha = 4.0, .seed = g.next()});
  }
};

}  // namespace peft_test
