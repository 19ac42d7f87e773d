// adapter_traits for TinyLoRA (see adapter_traits.hpp). The random adapter has random A, B, P
// and v ~ U(-1, 1) (rank 1 to 3, u 1 to 6); the default is PEFT's construction over a random base
// (the SVD of W0, v = 0), the identity.
#pragma once

#include <memory>
#include <vector>

#include "peft/adapters/tinylora.hpp"
#include "peft/base/dense.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::tinylora<T>> {
  static constexpr bool identity_at_init = true;  // v = 0
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {3, 9}, {8, 12}, {16, 24}}; }

  static peft::tinylora<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index r = 1 + static_cast<peft::index>(g.below(3));
    const peft::index u = 1 + static_cast<peft::index>(g.below(6));
    peft::matrix<T> v(1, u);
    for (auto& e : v.storage()) e = static_cast<T>(g.uniform(-1.0, 1.0));
    return peft::tinylora<T>(random_matrix<T>(r, in, g), random_matrix<T>(out, r, g), random_matrix<T>(u, r * r, g),
                             std::make_shared<peft::tinylora_vector<T>>(std::move(v)));
  }
  /// PEFT's construction over a random base.
  static peft::tinylora<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    const peft::dense<T> w(random_matrix<T>(out, in, g));
    return peft::tinylora<T>(w, {.rank = 2, .u = 8});
  }
  /// PEFT's construction over the layer's base.
  template <class Base>
  static peft::tinylora<T> make_default_for(const Base& w, peft::rng& /*g*/) {
    return peft::tinylora<T>(w, {.rank = 2, .u = 8});
  }
};

}  // namespace peft_test
