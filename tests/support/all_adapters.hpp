// tests/support/all_adapters.hpp — every adapter type, for the shared property tests.
#pragma once

#include <tuple>

#include "support/traits_lora.hpp"

namespace peft_test {

template <class T>
using all_adapters = std::tuple<peft::lora<T>>;

}  // namespace peft_test
