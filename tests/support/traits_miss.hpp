// adapter_traits for MiSS (see adapter_traits.hpp).
#pragma once

#include <numeric>

#include "peft/adapters/miss.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::miss<T>> {
  static constexpr bool identity_at_init = true;
  // Odd sizes (r not dividing in_features: the padded last shard), a single row or column, and
  // shapes where bat's r x r blocks are larger than 1.
  static std::vector<std::pair<peft::index, peft::index>> shapes() {
    return {{7, 5}, {1, 3}, {13, 1}, {16, 24}, {12, 8}, {9, 6}};
  }
  /// Cycles balance, mini and bat. balance: r from 1 to in (rarely dividing it); mini: mini_r a
  /// divisor of out; bat: r = gcd(in, out), |B| <= 0.5 / r so that I + B_q stays invertible.
  static peft::miss<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    static int call = 0;
    const auto mode = static_cast<peft::miss_mode>(call++ % 3);
    peft::index r = 1 + static_cast<peft::index>(g.below(static_cast<std::uint64_t>(std::min<peft::index>(in, 5))));
    peft::index m = 1;
    if (mode == peft::miss_mode::bat) r = std::gcd(in, out);
    if (mode == peft::miss_mode::mini) {
      for (peft::index d = out / 2; d >= 1; --d) {
        if (out % d == 0) {
          m = d;
          break;
        }
      }
    }
    peft::miss<T> a(in, out, {.rank = r, .mode = mode, .mini_rank = m});
    const double s = mode == peft::miss_mode::bat ? 0.5 / static_cast<double>(r) : 1.0;
    const auto b = a.block();
    for (peft::index i = 0; i < b.rows(); ++i) {
      for (peft::index j = 0; j < b.cols(); ++j) b(i, j) = static_cast<T>((g.below(2) ? 1.0 : -1.0) * s * g.uniform(0.25, 1.0));
    }
    return a;
  }
  static peft::miss<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    static int call = 0;
    const auto mode = static_cast<peft::miss_mode>(call++ % 3);
    const peft::index r = mode == peft::miss_mode::bat ? std::gcd(in, out)
                                                       : 1 + static_cast<peft::index>(g.below(static_cast<std::uint64_t>(in)));
    return peft::miss<T>(in, out, {.rank = r, .mode = mode, .mini_rank = mode == peft::miss_mode::mini ? out : 1});
  }
};

}  // namespace peft_test
