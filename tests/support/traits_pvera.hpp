// adapter_traits for PVeRA (see adapter_traits.hpp). The projections are made larger than the
// layer, so the property tests run on strided slices A[:r, :in], B[:out, :]; lambda_d's logvar
// half is random too (it must not change the output).
#pragma once

#include "peft/adapters/pvera.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

template <class T>
struct adapter_traits<peft::pvera<T>> {
  static constexpr bool identity_at_init = true;
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {1, 3}, {13, 1}, {16, 24}}; }
  static peft::pvera<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::index r = 1 + static_cast<peft::index>(g.below(4));
    const peft::index in_max = in + static_cast<peft::index>(g.below(3));
    const peft::index out_max = out + static_cast<peft::index>(g.below(3));
    auto p = peft::make_pvera_projections<T>(r, {{in, out}, {in_max, out_max}}, g.next());
    return peft::pvera<T>(p.A, p.B, in, out, random_vector<T>(2 * r, g, 0.2, 1.5), random_vector<T>(out, g));
  }
  static peft::pvera<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    return peft::pvera<T>(peft::make_pvera_projections<T>(3, {{in + 2, out + 1}}, g.next()), in, out);
  }
};

}  // namespace peft_test
