// peft/io/peft/compacter.hpp — compacter has no HuggingFace PEFT checkpoint format; saving one says what to do.
#pragma once

#include <string_view>

#include "peft/adapters/compacter.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<compacter<T>> : no_peft_format {
  static constexpr std::string_view no_format_reason = "save parameters() with safetensors (the shared phm_rule once) and rebuild with the tensor constructor";
};

}  // namespace peft::io
