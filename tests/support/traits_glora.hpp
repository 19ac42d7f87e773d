// adapter_traits for GLoRA (see adapter_traits.hpp).
#pragma once

#include <array>
#include <cstdint>

#include "peft/adapters/glora.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::glora<T>> {
  // PEFT's default init (init_weights=True) zeroes Xd, the vectors and the constants: the identity.
  static constexpr bool identity_at_init = true;
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}}; }
  /// Each support tensor's parameterisation drawn at random (A and B share one, D and E
  /// another, as PEFT's config does), values uniform in [-0.4, 0.4) so that 1 + A and 1 + D stay
  /// away from 0 (merge then unmerge recovers W0 and b0).
  static peft::glora<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    using peft::glora_path;
    static constexpr std::array<glora_path, 4> ab = {glora_path::lora, glora_path::vector, glora_path::constant,
                                                     glora_path::none};
    static constexpr std::array<glora_path, 3> c = {glora_path::lora, glora_path::vector, glora_path::none};
    static constexpr std::array<glora_path, 3> de = {glora_path::vector, glora_path::constant, glora_path::none};
    const peft::index r = 1 + static_cast<peft::index>(g.below(3));
    const glora_path kab = ab[g.below(ab.size())], kc = c[g.below(c.size())], kde = de[g.below(de.size())];
    auto make = [&](glora_path k, peft::index rows, peft::index cols, bool bias_shaped) {
      typename peft::glora<T>::path p;
      p.kind = k;
      switch (k) {
        case glora_path::lora:
          p.xd = random_matrix<T>(rows, r, g, -0.4, 0.4);
          p.xu = random_matrix<T>(r, cols, g, -0.4, 0.4);
          break;
        case glora_path::vector:
          p.x = bias_shaped ? random_matrix<T>(1, rows, g, -0.4, 0.4) : random_matrix<T>(rows, 1, g, -0.4, 0.4);
          break;
        case glora_path::constant:
          p.x = random_matrix<T>(1, 1, g, -0.4, 0.4);
          break;
        case glora_path::none:
          break;
      }
      return p;
    };
    return peft::glora<T>(in, out, make(kab, out, in, false), make(kab, out, in, false), make(kc, in, 1, false),
                          make(kde, out, 1, true), make(kde, out, 1, true));
  }
  static peft::glora<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::glora<T>(in, out, {.rank = 2, .seed = g.next()});
  }
};

}  // namespace peft_test
