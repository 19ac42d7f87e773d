// adapter_traits for Super-Tuning (see adapter_traits.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "peft/adapters/supertuning.hpp"
#include "peft/base/dense.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::supertuning<T>> {
  static constexpr bool identity_at_init = true;  // v = 0, B = 0
  // Odd sizes, a single row and a single column; K from 1 to the whole weight.
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}, {4, 2}}; }

  /// K distinct random flat indices (in random order), values +-[0.25, 1), and every other draw
  /// a LoRA part of rank 1 to 3 with random A, B and lora_alpha.
  static peft::supertuning<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index n = in * out;
    const peft::index k = 1 + static_cast<peft::index>(g.below(static_cast<std::uint64_t>(std::min(n, 2 * (in + out)))));
    std::vector<std::int64_t> all(static_cast<std::size_t>(n));
    for (peft::index i = 0; i < n; ++i) all[static_cast<std::size_t>(i)] = i;
    for (peft::index i = 0; i < k; ++i) {  // partial Fisher-Yates
      const auto j = i + static_cast<peft::index>(g.below(static_cast<std::uint64_t>(n - i)));
      std::swap(all[static_cast<std::size_t>(i)], all[static_cast<std::size_t>(j)]);
    }
    all.resize(static_cast<std::size_t>(k));
    std::vector<T> values(static_cast<std::size_t>(k));
    for (auto& v : values) v = static_cast<T>((g.below(2) ? 1.0 : -1.0) * g.uniform(0.25, 1.0));
    if (g.below(2)) return peft::supertuning<T>(std::move(all), std::move(values), in, out);
    const peft::index r = 1 + static_cast<peft::index>(g.below(3));
    auto a = random_matrix<T>(r, in, g);
    auto b = random_matrix<T>(out, r, g);
    return peft::supertuning<T>(std::move(all), std::move(values), in, out, std::move(a), std::move(b), g.uniform(0.5, 6.0));
  }
  static peft::supertuning<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    const peft::dense<T> w(random_matrix<T>(out, in, g));
    return make_default_for(w, g);
  }
  /// PEFT's init over the layer's base: the top (or bottom) |W0|, v = 0, with or without a LoRA
  /// part (B = 0). sparsity 0.5 leaves at least one entry of every shape tested.
  template <class Base>
  static peft::supertuning<T> make_default_for(const Base& w, peft::rng& g) {
    peft::supertuning_options o;
    o.sparsity = 0.5;
    o.select_top = g.below(2) == 0;
    o.rank = static_cast<peft::index>(g.below(3));
    o.seed = g.next();
    return peft::supertuning<T>(w, o);
  }
};

}  // namespace peft_test
