// tests/support/all_adapters.hpp — every registered adapter type (adapters/registry.hpp), for the
// shared property tests. Each method needs its traits (support/traits_<method>.hpp, included
// here): a registered method without them fails to compile the property tests.
#pragma once

#include <tuple>

#include "peft/adapters/registry.hpp"
#include "support/traits_adalora.hpp"
#include "support/traits_beft.hpp"
#include "support/traits_boft.hpp"
#include "support/traits_c3a.hpp"
#include "support/traits_compacter.hpp"
#include "support/traits_deft.hpp"
#include "support/traits_delora.hpp"
#include "support/traits_dora.hpp"
#include "support/traits_dynamic_rank.hpp"
#include "support/traits_fourierft.hpp"
#include "support/traits_frod.hpp"
#include "support/traits_glora.hpp"
#include "support/traits_gralora.hpp"
#include "support/traits_hira.hpp"
#include "support/traits_hra.hpp"
#include "support/traits_ia3.hpp"
#include "support/traits_loha.hpp"
#include "support/traits_lokr.hpp"
#include "support/traits_lora.hpp"
#include "support/traits_miss.hpp"
#include "support/traits_oft.hpp"
#include "support/traits_peanut.hpp"
#include "support/traits_phm_delta.hpp"
#include "support/traits_pvera.hpp"
#include "support/traits_randlora.hpp"
#include "support/traits_road.hpp"
#include "support/traits_shira.hpp"
#include "support/traits_sora.hpp"
#include "support/traits_supertuning.hpp"
#include "support/traits_tinylora.hpp"
#include "support/traits_unilora.hpp"
#include "support/traits_vblora.hpp"
#include "support/traits_vera.hpp"
#include "support/traits_waveft.hpp"

namespace peft_test {

template <class T>
using all_adapters = peft::rebind_list_t<std::tuple, peft::registered_adapters<T>>;

}  // namespace peft_test
