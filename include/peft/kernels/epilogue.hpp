// peft/kernels/epilogue.hpp — the epilogue vocabulary under the kernels' namespace (the concept
// itself is core/epilogue.hpp): kernels take `const Epi&` satisfying kernels::epilogue_for and
// call it on every finished output tile.
#pragma once

#include "peft/core/epilogue.hpp"

namespace peft::kernels {

using peft::epilogue_for;
using peft::no_epilogue;

}  // namespace peft::kernels
