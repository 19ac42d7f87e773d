// peft/adapters/any_adapter.hpp — one adapter of any registered method, chosen at run time (by a
// checkpoint's adapter_config.json, or by the program): variant_adapter over
// adapters/registry.hpp's list, so a method added there is an alternative here too.
#pragma once

#include "peft/adapters/registry.hpp"
#include "peft/adapters/variant_adapter.hpp"

namespace peft {

template <compute_scalar T>
using any_adapter = rebind_list_t<variant_adapter, registered_adapters<T>>;

}  // namespace peft
