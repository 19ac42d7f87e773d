// tests/support/adapter_traits.hpp — what the shared property tests need to know of an adapter.
//
// Specialise peft_test::adapter_traits<A> for each adapter type (one header per adapter,
// tests/support/traits_<method>.hpp) and add the type to tests/support/all_adapters.hpp: the
// template test in tests/adapters/test_adapter_properties.cpp then checks, for that type:
// forward == base + add_term, backward == backward_term + base, gradients == central finite
// differences, merged == unmerged (mergeable types), identity at the method's default init.
#pragma once

#include <utility>
#include <vector>

#include "peft/base/dense.hpp"
#include "peft/core/random.hpp"

namespace peft_test {

template <class A>
struct adapter_traits;  // primary template: deliberately undefined

// Members a specialisation provides:
//   static constexpr bool identity_at_init;   // default init is an exact no-op
//   static std::vector<std::pair<peft::index, peft::index>> shapes();  // (in, out) pairs to test,
//                                              // odd sizes where the method allows them
//   static A make_random(peft::index in, peft::index out, peft::rng& g);  // every trainable
//                                              // parameter random and non-zero
//   static A make_default(peft::index in, peft::index out, peft::rng& g);  // the method's init
// and optionally:
//   static constexpr double fd_tolerance;      // the finite-difference check's relative bound
//                                              // (default 1e-7), for methods whose loss is a
//                                              // deep chain (its rounding noise / h is larger)

/// The relative error the property tests allow between a gradient and its finite differences.
template <class Traits>
constexpr double fd_tolerance() {
  if constexpr (requires { Traits::fd_tolerance; }) {
    return Traits::fd_tolerance;
  } else {
    return 1e-7;
  }
}

}  // namespace peft_test
