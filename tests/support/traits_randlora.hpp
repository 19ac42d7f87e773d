// adapter_traits for RandLoRA (see adapter_traits.hpp). Shapes cover in < out, in > out and
// in == out (PEFT's two orientations), with bases larger than the layer (strided slices) and
// ranks that do not divide min(in, out) (a partly used last basis).
#pragma once

#include "peft/adapters/randlora.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::randlora<T>> {
  static constexpr bool identity_at_init = true;
  static std::vector<std::pair<peft::index, peft::index>> shapes() {
    return {{7, 5}, {5, 7}, {1, 3}, {13, 1}, {16, 24}, {24, 16}, {6, 6}};
  }
  static peft::randlora<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index r = 1 + static_cast<peft::index>(g.below(4));
    const peft::index in_max = in + static_cast<peft::index>(g.below(3));
    const peft::index out_max = out + static_cast<peft::index>(g.below(3));
    auto p = peft::make_randlora_projections<T>(r, {{in, out}, {in_max, out_max}}, g.next());
    const peft::index mn = std::min(in, out), nb = peft::randlora_num_bases(mn, r);
    return peft::randlora<T>(p.A, p.B, in, out, 3.0 * static_cast<double>(r), random_matrix<T>(r, nb, g),
                             random_matrix<T>(nb, mn, g));
  }
  static peft::randlora<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::randlora<T>(peft::make_randlora_projections<T>(2, {{in, out + 1}}, g.next()), in, out, 40.0);
  }
};

}  // namespace peft_test
