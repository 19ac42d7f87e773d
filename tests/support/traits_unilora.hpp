// adapter_traits for Uni-LoRA (see adapter_traits.hpp). A short theta_d (fewer entries than
// r (in + out)) so that every entry is shared by several places of A and B; theta_d ~ U(-1, 1)
// in the random adapter. Not the identity at init (PEFT draws theta_d at random and both A and B
// read it).
#pragma once

#include "peft/adapters/unilora.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::unilora<T>> {
  static constexpr bool identity_at_init = false;
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {3, 9}, {8, 12}, {16, 24}}; }
  static peft::unilora<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    peft::unilora_options opt{.rank = 1 + static_cast<peft::index>(g.below(3)),
                              .theta_d_length = 5 + static_cast<peft::index>(g.below(8)),
                              .proj_seed = g.below(1000),
                              .init_theta_d_bound = 1.0,
                              .seed = g.next()};
    return peft::unilora<T>(in, out, opt);
  }
  static peft::unilora<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::unilora<T>(in, out, {.theta_d_length = 16, .seed = g.next()});
  }
};

}  // namespace peft_test
