// adapter_traits for Compacter (see adapter_traits.hpp).
//
// make_random alternates serial and parallel placement from call to call (the property test
// builds two adapters per shape: batch 1 and batch 3), so every shape runs both placements. The
// PHM order n is the largest of 4, 3, 2, 1 dividing every PHM width, which admits odd sizes
// (n = 1, or n = 3 on multiples of 3). Not an identity at init: the paper's rule ~ N(0, 1e-4^2)
// with glorot fast weights gives a small non-zero bottleneck output (see compacter.hpp).
#pragma once

#include <memory>

#include "peft/adapters/compacter.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::compacter<T>> {
  static constexpr bool identity_at_init = false;
  static std::vector<std::pair<peft::index, peft::index>> shapes() {
    return {{7, 6}, {6, 9}, {1, 3}, {16, 12}};
  }
  /// The largest of 4, 3, 2, 1 dividing both widths.
  static peft::index order_for(peft::index a, peft::index b) {
    for (peft::index n : {4, 3, 2}) {
      if (a % n == 0 && b % n == 0) return n;
    }
    return 1;
  }
  static peft::compacter_options options_for(peft::index in, peft::index out, peft::compacter_placement p,
                                             std::uint64_t seed) {
    const peft::index d = p == peft::compacter_placement::serial ? out : in;
    const peft::index n = order_for(d, out);
    const peft::index k = d % (2 * n) == 0 ? 2 * n : n;  // a bottleneck of one or two blocks
    return {.n = n, .reduction_factor = d / k, .placement = p, .seed = seed};
  }
  static peft::compacter<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    static int calls = 0;
    const auto p = (calls++ % 2 == 0) ? peft::compacter_placement::serial : peft::compacter_placement::parallel;
    const auto o = options_for(in, out, p, g.next());
    auto rule = std::make_shared<peft::phm_rule<T>>(o.n);
    fill_random(rule->value.view(), g);
    peft::compacter<T> a(in, out, rule, o);
    fill_random(a.down_bias(), g, -0.5, 0.5);
    fill_random(a.up_bias(), g, -0.5, 0.5);
    return a;
  }
  static peft::compacter<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::compacter<T>(in, out, options_for(in, out, peft::compacter_placement::serial, g.next()));
  }
};

}  // namespace peft_test
