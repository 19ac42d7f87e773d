// peft/io/peft/phm_delta.hpp — phm_delta has no HuggingFace PEFT checkpoint format; saving one says what to do.
#pragma once

#include <string_view>

#include "peft/adapters/phm_delta.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<phm_delta<T>> : no_peft_format {
  static constexpr std::string_view no_format_reason = "merge the delta into the base weights (merge_and_unload) or save parameters() with safetensors and use the tensor constructor";
};

}  // namespace peft::io
