// peft/adapters/registry.hpp — THE list of methods. The run-time variant (any_adapter), the
// checkpoint loader (io/peft_checkpoint.hpp), the serving code and the test suite's list of
// adapters are all derived from `registered_adapters`. Adding a method: its header below, one
// entry in the list, its codec (io/peft/<method>.hpp, included by io/peft/codecs.hpp) and its
// tests; docs/adding_a_method.md has the whole recipe. The loader tries methods in this order
// (the first whose codec handles a config wins).
#pragma once

#include "peft/adapters/adalora.hpp"
#include "peft/adapters/beft.hpp"
#include "peft/adapters/boft.hpp"
#include "peft/adapters/c3a.hpp"
#include "peft/adapters/compacter.hpp"
#include "peft/adapters/deft.hpp"
#include "peft/adapters/delora.hpp"
#include "peft/adapters/dora.hpp"
#include "peft/adapters/dynamic_rank.hpp"
#include "peft/adapters/fourierft.hpp"
#include "peft/adapters/frod.hpp"
#include "peft/adapters/glora.hpp"
#include "peft/adapters/gralora.hpp"
#include "peft/adapters/hira.hpp"
#include "peft/adapters/hra.hpp"
#include "peft/adapters/ia3.hpp"
#include "peft/adapters/loha.hpp"
#include "peft/adapters/lokr.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/miss.hpp"
#include "peft/adapters/oft.hpp"
#include "peft/adapters/peanut.hpp"
#include "peft/adapters/phm_delta.hpp"
#include "peft/adapters/pvera.hpp"
#include "peft/adapters/randlora.hpp"
#include "peft/adapters/road.hpp"
#include "peft/adapters/shira.hpp"
#include "peft/adapters/sora.hpp"
#include "peft/adapters/supertuning.hpp"
#include "peft/adapters/tinylora.hpp"
#include "peft/adapters/unilora.hpp"
#include "peft/adapters/vblora.hpp"
#include "peft/adapters/vera.hpp"
#include "peft/adapters/waveft.hpp"
#include "peft/core/type_list.hpp"

namespace peft {

template <compute_scalar T>
using registered_adapters = type_list<lora<T>, dora<T>, vera<T>, randlora<T>, shira<T>, lokr<T>, loha<T>, adalora<T>,
                                      ia3<T>, dynamic_rank<T>, sora<T>, compacter<T>, phm_delta<T>, vblora<T>, oft<T>,
                                      hra<T>, miss<T>, c3a<T>, gralora<T>, hira<T>, fourierft<T>, road<T>, delora<T>,
                                      boft<T>, beft<T>, pvera<T>, unilora<T>, waveft<T>,
                                      tinylora<T>, glora<T>, deft<T>, peanut<T>, supertuning<T>, frod<T>>;

}  // namespace peft
