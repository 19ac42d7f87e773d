// tests/support/all_adapters.hpp — every adapter type, for the shared property tests.
#pragma once

#include <tuple>

#include "support/traits_compacter.hpp"
#include "support/traits_dora.hpp"
#include "support/traits_dynamic_rank.hpp"
#include "support/traits_lora.hpp"
#include "support/traits_phm_delta.hpp"
#include "support/traits_sora.hpp"

namespace peft_test {

template <class T>
using all_adapters = std::tuple<peft::lora<T>, peft::dora<T>, peft::dynamic_rank<T>, peft::sora<T>,
                                peft::compacter<T>, peft::phm_delta<T>>;

}  // namespace peft_test
