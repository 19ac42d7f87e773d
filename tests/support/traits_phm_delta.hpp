// adapter_traits for phm_delta (see adapter_traits.hpp).
//
// The PHM order n is the largest of 4, 3, 2, 1 dividing both widths, which admits odd sizes
// (n = 1, or n = 3 on multiples of 3). The default init (W_left = 0) is an exact no-op.
#pragma once

#include <memory>

#include "peft/adapters/phm_delta.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::phm_delta<T>> {
  static constexpr bool identity_at_init = true;
  static std::vector<std::pair<peft::index, peft::index>> shapes() {
    return {{6, 9}, {7, 5}, {8, 12}, {1, 3}};
  }
  static peft::index order_for(peft::index a, peft::index b) {
    for (peft::index n : {4, 3, 2}) {
      if (a % n == 0 && b % n == 0) return n;
    }
    return 1;
  }
  static peft::phm_delta<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index n = order_for(in, out);
    auto rule = std::make_shared<peft::phm_rule<T>>(n);
    fill_random(rule->value.view(), g);
    return peft::phm_delta<T>(in, out, rule, {.n = n, .init = peft::phm_delta_init::random, .seed = g.next()});
  }
  static peft::phm_delta<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::phm_delta<T>(in, out, {.n = order_for(in, out), .seed = g.next()});
  }
};

}  // namespace peft_test
