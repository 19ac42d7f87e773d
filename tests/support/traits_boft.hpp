// adapter_traits for BOFT (see adapter_traits.hpp).
#pragma once

#include "peft/adapters/boft.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::boft<T>> {
  static constexpr bool identity_at_init = true;  // R = 0, s = 1
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{8, 5}, {5, 3}, {16, 6}, {6, 1}}; }
  /// The richest layout each width allows (PEFT's rules: a butterfly needs an even number of
  /// even blocks): three butterfly factors (16 | in), two by block_num (8 | in) or block_size
  /// (4 | in), one factor of 2-blocks (even in) or one block; R ~ N(0, 0.1^2), s ~ N(1, 0.1^2).
  static peft::boft<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    peft::boft_options o{.block_size = 0, .block_num = 1, .init = peft::boft_init::random, .seed = g.next()};
    if (in % 16 == 0) {
      o.block_size = 4, o.block_num = 0, o.n_butterfly_factor = 3;
    } else if (in % 8 == 0) {
      o.block_size = 0, o.block_num = 4, o.n_butterfly_factor = 2;
    } else if (in % 4 == 0) {
      o.block_size = 2, o.block_num = 0, o.n_butterfly_factor = 2;
    } else if (in % 2 == 0) {
      o.block_size = 2, o.block_num = 0;
    }
    return peft::boft<T>(in, out, o);
  }
  static peft::boft<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::boft<T>(in, out, {.block_size = 0, .block_num = 1, .seed = g.next()});
  }
};

}  // namespace peft_test
