// adapter_traits for BEFT (see adapter_traits.hpp).
#pragma once

#include <vector>

#include "peft/adapters/beft.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::beft<T>> {
  static constexpr bool identity_at_init = true;  // b = 0
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}}; }
  /// b = +-[0.5, 1.5) in each output.
  static peft::beft<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    peft::beft<T> a(in, out, {});
    for (peft::index j = 0; j < out; ++j) {
      const double m = g.uniform(0.5, 1.5);
      a.bias()(0, j) = static_cast<T>(g.below(2) == 0 ? m : -m);
    }
    return a;
  }
  static peft::beft<T> make_default(peft::index in, peft::index out, peft::rng& /*g*/) { return peft::beft<T>(in, out, {}); }
};

}  // namespace peft_test
