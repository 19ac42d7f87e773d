// adapter_traits for sora (see adapter_traits.hpp).
#pragma once

#include <vector>

#include "peft/adapters/sora.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::sora<T>> {
  static constexpr bool identity_at_init = true;  // B = 0
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}}; }
  /// A, B, gate all random and non-zero (gate in [0.2, 1) with random signs), r_max in 1..4.
  static peft::sora<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index r = 1 + static_cast<peft::index>(g.below(4));
    std::vector<T> gate(static_cast<std::size_t>(r));
    for (auto& v : gate) v = static_cast<T>((g.below(2) == 0 ? -1.0 : 1.0) * g.uniform(0.2, 1.0));
    return peft::sora<T>(random_matrix<T>(r, in, g), random_matrix<T>(out, r, g), std::move(gate),
                         static_cast<T>(3.0 / static_cast<double>(r)));
  }
  static peft::sora<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::sora<T>(in, out, {.rank = 3, .alpha = 6.0, .seed = g.next()});
  }
};

}  // namespace peft_test
