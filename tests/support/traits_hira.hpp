// adapter_traits for HiRA (see adapter_traits.hpp).
#pragma once

#include "peft/adapters/hira.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::hira<T>> {
  static constexpr bool identity_at_init = true;
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}}; }
  /// A and B uniform in [-0.4, 0.4): |B A| stays below 1 for r <= 3, so the merged weight
  /// W0 * (1 + B A) keeps W0 recoverable to rounding (merge then unmerge).
  static peft::hira<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index r = 1 + static_cast<peft::index>(g.below(3));
    return peft::hira<T>(random_matrix<T>(r, in, g, -0.4, 0.4), random_matrix<T>(out, r, g, -0.4, 0.4));
  }
  static peft::hira<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::hira<T>(in, out, {.rank = 2, .seed = g.next()});
  }
};

}  // namespace peft_test
