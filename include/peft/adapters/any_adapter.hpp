// peft/adapters/any_adapter.hpp — the closed set of adapter types a checkpoint can choose from.
//
// The PEFT loader tries each alternative's `handles(config)` in this order. Adding an adapter
// type means adding it here (and writing its header); nothing else changes.
#pragma once

#include "peft/adapters/lora.hpp"
#include "peft/adapters/variant_adapter.hpp"

namespace peft {

template <compute_scalar T>
using any_adapter = variant_adapter<lora<T>>;

}  // namespace peft
