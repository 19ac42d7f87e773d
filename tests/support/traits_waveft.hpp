// adapter_traits for WaveFT (see adapter_traits.hpp).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "peft/adapters/waveft.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::waveft<T>> {
  // PEFT's default init (init_weights=True) zeros the spectrum: the identity.
  static constexpr bool identity_at_init = true;
  // Odd sizes, a single row and a single column, and one layer long filters fit in.
  static std::vector<std::pair<peft::index, peft::index>> shapes() {
    return {{7, 5}, {1, 3}, {13, 1}, {16, 24}, {4, 2}, {27, 25}};
  }
  static peft::waveft<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    // The direct placement and wavelets of each family, short and long. A filter longer than the
    // layer's smaller side leaves coefficients whose patch barely touches the weight: gradients
    // so small that finite differences of the whole loss cannot resolve them (PEFT parity on such
    // layers: test_waveft.cpp), so those are not drawn here.
    static constexpr std::array<const char*, 6> families = {"db1", "db2", "sym5", "coif1", "db10", "coif4"};
    static constexpr std::array<peft::index, 6> lengths = {2, 4, 10, 6, 20, 24};
    const peft::index cells = in * out;
    const peft::index n = 1 + static_cast<peft::index>(g.below(static_cast<std::uint64_t>(std::min<peft::index>(cells, 300))));
    std::vector<T> spectrum(static_cast<std::size_t>(n));
    for (auto& v : spectrum) v = static_cast<T>((g.below(2) ? 1.0 : -1.0) * g.uniform(0.25, 1.0));
    std::vector<const char*> fit;
    for (std::size_t i = 0; i < families.size(); ++i) {
      if (lengths[i] <= std::max<peft::index>(2, std::min(in, out))) fit.push_back(families[i]);
    }
    const auto pick = g.below(fit.size() + 1);
    const bool use_idwt = pick < fit.size();
    const char* family = use_idwt ? fit[pick] : "db20";
    const auto seed = static_cast<std::int64_t>(g.next() >> 1);
    return peft::waveft<T>(std::move(spectrum), g.uniform(0.5, 2.0), family, use_idwt, seed, in, out);
  }
  static peft::waveft<T> make_default(peft::index in, peft::index out, peft::rng& /*g*/) {
    return peft::waveft<T>(in, out, {.n_frequency = std::min<peft::index>(in * out, 2592), .wavelet_family = "db3"});
  }
};

}  // namespace peft_test
