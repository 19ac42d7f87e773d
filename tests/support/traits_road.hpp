// adapter_traits for RoAd (see adapter_traits.hpp).
#pragma once

#include "peft/adapters/road.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::road<T>> {
  static constexpr bool identity_at_init = true;
  // out_features must be even (pairs); one group (G = out), several groups, and one pair.
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 4}, {1, 2}, {13, 6}, {16, 24}, {5, 12}}; }
  /// The largest of 4 and 2 dividing out (several groups where possible), else out itself.
  static peft::index group_for(peft::index out) { return out % 4 == 0 && out > 4 ? 4 : out % 2 == 0 && out > 2 ? 2 : out; }
  /// Cycles road_1, road_2, road_4; theta in [-1, 1], |alpha| in [0.5, 1.5] (every pair's
  /// rotation invertible, so unmerging is well conditioned).
  static peft::road<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    static int call = 0;
    const auto variant = static_cast<peft::road_variant>(call++ % 3);
    peft::road<T> a(in, out, {.variant = variant, .group_size = group_for(out)});
    for (peft::index k = 0; k < a.theta().cols(); ++k) {
      a.theta()(0, k) = static_cast<T>(g.uniform(-1.0, 1.0));
      a.alpha()(0, k) = static_cast<T>((g.below(2) ? 1.0 : -1.0) * g.uniform(0.5, 1.5));
    }
    return a;
  }
  static peft::road<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::road<T>(in, out, {.variant = static_cast<peft::road_variant>(g.below(3)), .group_size = group_for(out)});
  }
};

}  // namespace peft_test
