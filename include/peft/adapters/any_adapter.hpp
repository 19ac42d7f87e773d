// peft/adapters/any_adapter.hpp — the closed set of adapter types a checkpoint can choose from.
//
// The PEFT loader tries each alternative's `handles(config)` in this order. Adding an adapter
// type means writing its header and adding it here; nothing else changes. Methods without a
// PEFT checkpoint format (dynamic_rank, sora, compacter, phm_delta) never handle a config but
// are alternatives so that layers built at run time can hold them.
#pragma once

#include "peft/adapters/adalora.hpp"
#include "peft/adapters/compacter.hpp"
#include "peft/adapters/dora.hpp"
#include "peft/adapters/dynamic_rank.hpp"
#include "peft/adapters/ia3.hpp"
#include "peft/adapters/loha.hpp"
#include "peft/adapters/lokr.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/phm_delta.hpp"
#include "peft/adapters/randlora.hpp"
#include "peft/adapters/shira.hpp"
#include "peft/adapters/sora.hpp"
#include "peft/adapters/variant_adapter.hpp"
#include "peft/adapters/vera.hpp"

namespace peft {

template <compute_scalar T>
using any_adapter = variant_adapter<lora<T>, dora<T>, vera<T>, randlora<T>, shira<T>, lokr<T>, loha<T>, adalora<T>,
                                    ia3<T>, dynamic_rank<T>, sora<T>, compacter<T>, phm_delta<T>>;

}  // namespace peft
