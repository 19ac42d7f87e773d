// adapter_traits for DeFT (see adapter_traits.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "peft/adapters/deft.hpp"
#include "peft/base/dense.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::deft<T>> {
  static constexpr bool identity_at_init = true;  // R = right^T W0 / s
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {2, 3}, {13, 2}, {16, 24}}; }

  /// Random P and R (uniform in [-1, 1): relu's kink at 0 is met with probability ~0), rank 1 to
  /// min(3, out), relu or qr, with or without para and alpha, drawn from g. Not degenerate: relu
  /// gets a positive first row (right != 0); qr with para keeps r < out (r = out removes all of
  /// W0: W' = 0 and P has no gradient).
  static peft::deft<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    auto proj = g.below(2) ? peft::deft_projection::qr : peft::deft_projection::relu;
    const bool para = g.below(3) == 0;
    const double alpha = g.below(2) ? 0.0 : 1.5;
    peft::index r = std::min<peft::index>(out, 1 + static_cast<peft::index>(g.below(3)));
    if (proj == peft::deft_projection::qr && para && r == out) {
      if (out > 1) {
        r = out - 1;
      } else {
        proj = peft::deft_projection::relu;
      }
    }
    auto p = random_matrix<T>(out, r, g);
    if (proj == peft::deft_projection::relu) {
      for (peft::index i = 0; i < r; ++i) p(0, i) = static_cast<T>(std::abs(static_cast<double>(p(0, i))) + 0.25);
    }
    return peft::deft<T>(std::move(p), para ? peft::matrix<T>() : random_matrix<T>(r, in, g), proj, alpha, in);
  }
  static peft::deft<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    const peft::dense<T> w(random_matrix<T>(out, in, g));
    return peft::deft<T>(w, {.rank = 2, .seed = g.next()});
  }
  /// PEFT's init over the layer's base: R = right^T W0 (a no-op).
  template <class Base>
  static peft::deft<T> make_default_for(const Base& w, peft::rng& g) {
    return peft::deft<T>(w, {.rank = 2, .projection = g.below(2) ? peft::deft_projection::qr : peft::deft_projection::relu,
                             .seed = g.next()});
  }
};

}  // namespace peft_test
