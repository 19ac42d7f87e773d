// adapter_traits for OFT (see adapter_traits.hpp).
#pragma once

#include <vector>

#include "peft/adapters/oft.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::oft<T>> {
  static constexpr bool identity_at_init = true;
  /// in must have a divisor >= 2 (a block of 1 is the identity, with no parameter).
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{6, 5}, {2, 3}, {9, 1}, {16, 24}}; }
  /// Cycles through the forms: exact Cayley, Neumann (5 and 3 terms), block_share with either,
  /// and coft with a radius the values stay inside (its projection is not differentiated, as in
  /// PEFT, so finite differences would not see it). The block size is a random divisor >= 2 of
  /// in; every packed entry is non-zero.
  static peft::oft<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    static int call = 0;
    const int kind = call++ % 6;
    peft::oft_form f;
    f.use_cayley_neumann = kind == 1 || kind == 2 || kind == 4;
    f.num_cayley_neumann_terms = kind == 2 ? 3 : 5;
    f.block_share = kind == 3 || kind == 4;
    f.coft = kind == 5;
    f.eps = 100.0;
    std::vector<peft::index> divisors;
    for (peft::index b = 2; b <= in; ++b)
      if (in % b == 0) divisors.push_back(b);
    const peft::index b = divisors[static_cast<std::size_t>(g.below(divisors.size()))];
    peft::oft<T> a(in, out, {.block_size = b, .form = f});
    auto w = a.weight();
    for (peft::index i = 0; i < w.rows(); ++i) {
      for (peft::index j = 0; j < w.cols(); ++j) {
        const double m = g.uniform(0.05, 0.3);
        w(i, j) = static_cast<T>(g.below(2) == 0 ? m : -m);
      }
    }
    return a;
  }
  static peft::oft<T> make_default(peft::index in, peft::index out, peft::rng& /*g*/) {
    return peft::oft<T>(in, out, {.block_size = in % 2 == 0 ? 2 : in, .form = {}});
  }
};

}  // namespace peft_test
