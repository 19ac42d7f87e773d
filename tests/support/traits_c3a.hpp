// adapter_traits for C3A (see adapter_traits.hpp).
#pragma once

#include <numeric>

#include "peft/adapters/c3a.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::c3a<T>> {
  static constexpr bool identity_at_init = false;  // PEFT's default init is xavier-uniform
  // The block size must divide both sides: gcd 8, 6, 7, 5 and 1 (odd sizes, b = 1, one block).
  static std::vector<std::pair<peft::index, peft::index>> shapes() {
    return {{16, 24}, {12, 18}, {7, 14}, {5, 5}, {3, 1}};
  }
  /// Cycles the block size through the divisors of gcd(in, out), largest first; a random kernel.
  static peft::c3a<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    static int call = 0;
    const peft::index d = std::gcd(in, out);
    std::vector<peft::index> divisors;
    for (peft::index b = d; b >= 1; --b)
      if (d % b == 0) divisors.push_back(b);
    const peft::index b = divisors[static_cast<std::size_t>(call++) % divisors.size()];
    return peft::c3a<T>(in, out, {.block_size = b, .init = peft::c3a_init::xavier_uniform, .seed = g.next()});
  }
  static peft::c3a<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::c3a<T>(in, out, {.block_size = std::gcd(in, out), .seed = g.next()});
  }
};

}  // namespace peft_test
