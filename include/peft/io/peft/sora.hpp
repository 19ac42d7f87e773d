// peft/io/peft/sora.hpp — sora has no HuggingFace PEFT checkpoint format; saving one says what to do.
#pragma once

#include <string_view>

#include "peft/adapters/sora.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<sora<T>> : no_peft_format {
  static constexpr std::string_view no_format_reason = "compact() to a LoRA and save that";
};

}  // namespace peft::io
