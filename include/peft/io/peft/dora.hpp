// peft/io/peft/dora.hpp — DoRA in PEFT checkpoints: peft_type "LORA" with use_dora; LoRA's tensors
// and patterns (io/peft/lora.hpp) plus lora_magnitude_vector (out). lora_bias is refused, as PEFT
// refuses it.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/dora.hpp"
#include "peft/io/peft/codec.hpp"
#include "peft/io/peft/lora.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<dora<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "LORA" && c.use_dora; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::span<const std::string_view> config_fields{lora_config_fields};
  /// lora_B.bias is listed only to refuse it with a clear message.
  static std::vector<std::string_view> module_tensors() {
    return {"lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector"};
  }

  /// A, B and s as LoRA reads them (rank_pattern, alpha_pattern, use_rslora), m from
  /// lora_magnitude_vector (out values).
  static dora<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& shared) {
    constexpr const char* where = "dora::from_checkpoint";
    if (c.lora_bias || m.contains("lora_B.bias")) {
      peft::detail::raise<unsupported_error>(where, "module '" + m.module() +
                                                        "': lora_bias with DoRA is not supported (PEFT rejects it too)");
    }
    const auto& sb = m.shape("lora_B.weight", 2);
    const auto& sm = m.shape("lora_magnitude_vector", 1);
    if (sm[0] != sb[0]) {
      peft::detail::raise<format_error>(where, "module '" + m.module() + "': lora_magnitude_vector " +
                                                   detail::shape_text(sm) + " does not match lora_B " +
                                                   detail::shape_text(sb));
    }
    lora<T> low_rank = peft_codec<lora<T>>::from_checkpoint(c, m, shared);
    return dora<T>(std::move(low_rank), m.copy("lora_magnitude_vector", {sb[0]}).storage());
  }

  /// LoRA's rank/alpha patterns for this module, and use_dora.
  static void describe_in(const dora<T>& a, adapter_config& c, const std::string& module) {
    peft_codec<lora<T>>::describe_in(a.lora_part(), c, module);
    c.use_dora = true;
  }
};

}  // namespace peft::io
