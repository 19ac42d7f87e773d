// tests/support/all_adapters.hpp — every adapter type, for the shared property tests.
#pragma once

#include <tuple>

#include "support/traits_adalora.hpp"
#include "support/traits_compacter.hpp"
#include "support/traits_dora.hpp"
#include "support/traits_dynamic_rank.hpp"
#include "support/traits_ia3.hpp"
#include "support/traits_loha.hpp"
#include "support/traits_lokr.hpp"
#include "support/traits_lora.hpp"
#include "support/traits_phm_delta.hpp"
#include "support/traits_randlora.hpp"
#include "support/traits_shira.hpp"
#include "support/traits_sora.hpp"
#include "support/traits_vera.hpp"

namespace peft_test {

template <class T>
using all_adapters = std::tuple<peft::lora<T>, peft::dora<T>, peft::vera<T>, peft::randlora<T>, peft::shira<T>,
                                peft::lokr<T>, peft::loha<T>, peft::adalora<T>, peft::ia3<T>, peft::dynamic_rank<T>,
                                peft::sora<T>, peft::compacter<T>, peft::phm_delta<T>>;

}  // namespace peft_test
