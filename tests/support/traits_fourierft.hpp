// adapter_traits for FourierFT (see adapter_traits.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "peft/adapters/fourierft.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::fourierft<T>> {
  // PEFT's default init (init_weights=False) draws the spectrum from N(0, 1): not the identity.
  static constexpr bool identity_at_init = false;
  // Odd sizes, a single row and a single column; n ranges from 1 to the whole spectrum.
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}, {4, 2}}; }
  static peft::fourierft<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index cells = in * out;
    const peft::index n = 1 + static_cast<peft::index>(g.below(static_cast<std::uint64_t>(std::min<peft::index>(cells, 300))));
    std::vector<T> spectrum(static_cast<std::size_t>(n));
    for (auto& v : spectrum) v = static_cast<T>((g.below(2) ? 1.0 : -1.0) * g.uniform(0.25, 1.0));
    // scaling / (in out) is the entries' scale: keep Delta W of order one.
    const double scaling = g.uniform(0.5, 2.0) * static_cast<double>(cells) / static_cast<double>(n);
    const auto seed = static_cast<std::int64_t>(g.next() >> 1);
    return peft::fourierft<T>(std::move(spectrum), scaling, seed, in, out);
  }
  static peft::fourierft<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::fourierft<T>(in, out, {.n_frequency = std::min<peft::index>(in * out, 1000), .seed = g.next()});
  }
};

}  // namespace peft_test
