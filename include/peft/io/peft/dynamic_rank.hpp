// peft/io/peft/dynamic_rank.hpp — dynamic_rank has no HuggingFace PEFT checkpoint format; saving one says what to do.
#pragma once

#include <string_view>

#include "peft/adapters/dynamic_rank.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<dynamic_rank<T>> : no_peft_format {
  static constexpr std::string_view no_format_reason = "compact() to a LoRA and save that";
};

}  // namespace peft::io
