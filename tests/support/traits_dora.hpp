// adapter_traits for DoRA (see adapter_traits.hpp).
//
// DoRA's row norm n is detached: its gradient is the derivative of the forward with n held at
// its current value, not of the forward itself (n depends on A and B). The shared property
// test differentiates the forward by finite differences, so freeze()/thaw() hold n at its
// current value (dora::freeze_norms) while the parameters are differentiated. The computed norms and the detached gradient against
// finite differences with n frozen at its current value are tested in tests/adapters/test_dora.cpp.
//
// identity_at_init is false only because make_default(in, out, g) has no base weight: DoRA's
// init (m = the row norms of W0) needs it. make_default_for(w, g) is the real init (the identity,
// exactly), for a shared test that passes the base; test_dora.cpp checks it.
#pragma once

#include <vector>

#include "peft/adapters/dora.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::dora<T>> {
  static constexpr bool identity_at_init = false;  // needs the base: see make_default_for
  static constexpr bool detached_norm = true;      // gradients treat n as a constant

  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}}; }

  /// Random A, B (lora_init::random) and m in +-[0.5, 1.5).
  static peft::dora<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index r = 1 + static_cast<peft::index>(g.below(4));
    peft::lora_options o{.rank = r, .alpha = 3.0, .init = peft::lora_init::random, .seed = g.next()};
    std::vector<T> m(static_cast<std::size_t>(out));
    for (auto& v : m) v = static_cast<T>((g.below(2) ? 1.0 : -1.0) * g.uniform(0.5, 1.5));
    return peft::dora<T>(peft::lora<T>(in, out, o), std::move(m));
  }

  /// Without a base: B = 0 and m = 1 (not the identity unless W0's rows have unit norm).
  static peft::dora<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::dora<T>(peft::lora<T>(in, out, {.rank = 2, .alpha = 4.0, .seed = g.next()}),
                         std::vector<T>(static_cast<std::size_t>(out), T{1}));
  }

  /// DoRA's init over the base `w`: B = 0, m = n, the identity exactly.
  template <class Base>
  static peft::dora<T> make_default_for(const Base& w, peft::rng& g) {
    return peft::dora<T>(w, {.rank = 2, .alpha = 4.0, .seed = g.next()});
  }

  /// Freezes n at its value for `w`, so that finite differences see the detached gradient.
  template <class Base>
  static void freeze(peft::dora<T>& a, const Base& w) {
    a.freeze_norms(w);
  }
  static void thaw(peft::dora<T>& a) { a.unpin_norms(); }
};

}  // namespace peft_test
