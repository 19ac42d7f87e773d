// peft/io/peft/beft.hpp — BEFT in PEFT checkpoints: peft_type "BEFT"; one tensor per module,
// beft_bias (1, out) (no ".weight"). BeftConfig's only field of its own, init_weights, only
// initialises (io/peft/config_fields.hpp lists it as such). The checkpoint does not give
// in_features: the loader binds the base's shape when it knows it, else call bind / set_features.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/beft.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<beft<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "BEFT"; }
  /// The adapter_config.json fields it honours beyond the common and training-only ones: none
  /// (io/peft/config_fields.hpp has the rule; any other field with a non-default value is refused).
  static constexpr std::span<const std::string_view> config_fields{};
  static std::vector<std::string_view> module_tensors() { return {"beft_bias"}; }

  /// The adapter of one module. format_error unless beft_bias is [1, out] with out the base's
  /// out_features (when the loader knows the base).
  static beft<T> from_checkpoint(const adapter_config& /*c*/, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "beft::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const auto& s = m.get("beft_bias").shape;
    if (s.size() != 2 || s[0] != 1 || s[1] < 1) {
      peft::detail::raise<format_error>(where, mod + ": beft_bias is " + detail::shape_text(s) + ", expected [1, out_features]");
    }
    index in = 0;
    if (const auto& shape = m.base_shape()) {
      if (shape->first != s[1]) {
        peft::detail::raise<format_error>(where, mod + ": beft_bias has " + std::to_string(s[1]) + " values, the base has " +
                                                     std::to_string(shape->first) + " outputs");
      }
      in = shape->second;
    }
    return beft<T>(m.copy("beft_bias").storage(), in);
  }

  /// Makes `c` describe the adapter: peft_type BEFT and PEFT's default init_weights.
  static void describe_in(const beft<T>& /*a*/, adapter_config& c, const std::string& /*module*/) {
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    c.peft_type = "BEFT";
    c.set_default("init_weights", true);
  }
};

}  // namespace peft::io
