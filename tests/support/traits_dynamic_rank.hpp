// adapter_traits for dynamic_rank (see adapter_traits.hpp).
#pragma once

#include <vector>

#include "peft/adapters/dynamic_rank.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::dynamic_rank<T>> {
  static constexpr bool identity_at_init = true;  // c = 0
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}}; }
  /// A, B, c all random and non-zero (c in [0.2, 1) with random signs), r0 in 1..4.
  static peft::dynamic_rank<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index r0 = 1 + static_cast<peft::index>(g.below(4));
    std::vector<T> c(static_cast<std::size_t>(r0));
    for (auto& v : c) v = static_cast<T>((g.below(2) == 0 ? -1.0 : 1.0) * g.uniform(0.2, 1.0));
    return peft::dynamic_rank<T>(random_matrix<T>(r0, in, g), random_matrix<T>(out, r0, g), std::move(c),
                                 static_cast<T>(3.0 / static_cast<double>(r0)));
  }
  static peft::dynamic_rank<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::dynamic_rank<T>(in, out, {.rank = 2, .alpha = 4.0, .seed = g.next()});
  }
};

}  // namespace peft_test
