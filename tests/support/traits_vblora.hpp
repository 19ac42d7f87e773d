// adapter_traits for VB-LoRA (see adapter_traits.hpp). The vector length divides both sides of
// each shape (1 for odd sizes); logits ~ N(0, 1) keep the top-k choice away from ties, so the
// finite differences do not cross a change of selection. Not the identity at init (PEFT
// initialises both the logits and the bank at random).
#pragma once

#include <numeric>

#include "peft/adapters/vblora.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::vblora<T>> {
  static constexpr bool identity_at_init = false;
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {3, 9}, {8, 12}, {16, 24}}; }
  static peft::vblora<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index len = std::gcd(std::gcd(in, out), peft::index{4});
    peft::vblora_options opt{.rank = 1 + static_cast<peft::index>(g.below(3)),
                             .topk = 2 + static_cast<peft::index>(g.below(2)),
                             .num_vectors = 6,
                             .vector_length = len,
                             .init_logits_std = 1.0,
                             .init_vector_bank_bound = 1.0,
                             .seed = g.next()};
    return peft::vblora<T>(in, out, opt);
  }
  static peft::vblora<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    const peft::index len = std::gcd(std::gcd(in, out), peft::index{4});
    return peft::vblora<T>(in, out, {.num_vectors = 8, .vector_length = len, .seed = g.next()});
  }
};

}  // namespace peft_test
