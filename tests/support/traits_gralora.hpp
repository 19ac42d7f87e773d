// adapter_traits for GraLoRA (see adapter_traits.hpp): shapes divisible by gralora_k.
#pragma once

#include "peft/adapters/gralora.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::gralora<T>> {
  static constexpr bool identity_at_init = true;
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{6, 4}, {2, 2}, {12, 18}, {9, 3}}; }
  /// gralora_k = 3 where in and out allow it (else 2 or 1), a hybrid part on every other draw.
  static peft::gralora<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index k = in % 3 == 0 && out % 3 == 0 ? 3 : (in % 2 == 0 && out % 2 == 0 ? 2 : 1);
    const peft::index r = k * (1 + static_cast<peft::index>(g.below(2)));
    const peft::index hr = static_cast<peft::index>(g.below(2)) * 2;
    return peft::gralora<T>(in, out, {.rank = r, .k = k, .hybrid_rank = hr, .alpha = 3.0,
                                      .init = peft::gralora_init::random, .seed = g.next()});
  }
  static peft::gralora<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    const peft::index k = in % 2 == 0 && out % 2 == 0 ? 2 : 1;
    return peft::gralora<T>(in, out, {.rank = 2 * k, .k = k, .hybrid_rank = 1, .alpha = 4.0, .seed = g.next()});
  }
};

}  // namespace peft_test
