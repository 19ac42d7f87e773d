// peft/adapters/any_adapter.hpp — the closed set of adapter types a checkpoint can choose from.
//
// The PEFT loader tries each alternative's `handles(config)` in this order. Adding an adapter
// type means writing its header and adding it here; nothing else changes. Methods without a
// PEFT checkpoint format (dynamic_rank, sora, compacter, phm_delta) never handle a config but
// are alternatives so that layers built at run time can hold them.
#pragma once

#include "peft/adapters/compacter.hpp"
#include "peft/adapters/dora.hpp"
#include "peft/adapters/dynamic_rank.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/phm_delta.hpp"
#include "peft/adapters/sora.hpp"
#include "peft/adapters/variant_adapter.hpp"

namespace peft {

template <compute_scalar T>
using any_adapter = variant_adapter<lora<T>, dora<T>, dynamic_rank<T>, sora<T>, compacter<T>, phm_delta<T>>;

}  // namespace peft
