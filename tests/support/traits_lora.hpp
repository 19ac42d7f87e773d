// adapter_traits for LoRA (see adapter_traits.hpp).
#pragma once

#include "peft/adapters/lora.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::lora<T>> {
  static constexpr bool identity_at_init = true;
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}}; }
  static peft::lora<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index r = 1 + static_cast<peft::index>(g.below(4));
    peft::lora_options o{.rank = r, .alpha = 3.0, .bias = true, .init = peft::lora_init::random, .seed = g.next()};
    peft::lora<T> a(in, out, o);
    for (peft::index j = 0; j < out; ++j) a.bias()(0, j) = static_cast<T>(g.uniform(-1, 1));
    return a;
  }
  static peft::lora<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::lora<T>(in, out, {.rank = 2, .alpha = 4.0, .seed = g.next()});
  }
};

}  // namespace peft_test
