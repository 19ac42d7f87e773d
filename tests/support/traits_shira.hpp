// adapter_traits for SHiRA (see adapter_traits.hpp).
#pragma once

#include <algorithm>

#include "peft/adapters/shira.hpp"
#include "peft/train/shira_masks.hpp"
#include "support/adapter_traits.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::shira<T>> {
  static constexpr bool identity_at_init = true;
  // Odd sizes, a single row and a single column; K ranges from 1 to the whole weight.
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}, {4, 2}}; }
  static peft::shira<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index n = in * out;
    const peft::index k = 1 + static_cast<peft::index>(g.below(static_cast<std::uint64_t>(std::min(n, 2 * (in + out)))));
    std::vector<T> values(static_cast<std::size_t>(k));
    for (auto& v : values) v = static_cast<T>((g.below(2) ? 1.0 : -1.0) * g.uniform(0.25, 1.0));
    peft::shira<T> a(in, out, peft::shira_random_mask(out, in, k, g.next()), std::move(values));
    a.set_scale(static_cast<T>(g.uniform(0.5, 2.0)));  // PEFT's set_scale: the gradients carry it
    return a;
  }
  static peft::shira<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    // PEFT's init: zero values on a mask of min(d_out d_in, d_out + d_in) entries (r = 1 where it fits).
    return peft::shira<T>(in, out, peft::shira_random_mask(out, in, std::min(in * out, in + out), g.next()));
  }
};

}  // namespace peft_test
