// peft/io/peft/hra.hpp — HRA in PEFT checkpoints: peft_type "HRA"; tensor hra_u (in, r) (no
// ".weight"); fields r and apply_GS (init_weights only shapes a fresh adapter; bias other than
// "none" is refused by the shared rule). The layer's out_features comes from the base when the
// loader knows it (set_features).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/hra.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<hra<T>> : codec_defaults {
  /// PEFT's "HRA".
  static bool handles(const adapter_config& c) { return c.peft_type == "HRA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view config_fields[] = {"r", "apply_GS"};
  static std::vector<std::string_view> module_tensors() { return {"hra_u"}; }

  /// The adapter of one module: hra_u must be 2-D (in, r) with r the config's r (HRAConfig has
  /// one r for every module); format_error otherwise, unsupported_error for a convolution's
  /// (in * k * k, r) when the base shape shows it.
  static hra<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "hra::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const auto& s = m.shape("hra_u", 2);
    const bool gs = c.boolean("apply_GS", false, where);
    const index r = c.rank_for(m.module());
    if (s[1] != r || s[0] < 1) {
      peft::detail::raise<format_error>(where, mod + ": hra_u is " + detail::shape_text(s) + ", expected [in_features, r] with r = " +
                                                   std::to_string(r) + " (adapter_config.json)");
    }
    index out = 0;
    if (const auto& shape = m.base_shape()) {
      const auto [base_out, base_in] = *shape;
      if (base_in != s[0]) {
        peft::detail::raise<unsupported_error>(where, mod + ": hra_u has " + std::to_string(s[0]) + " rows but the base layer has " +
                                                        std::to_string(base_in) + " inputs (a convolution's hra_u "
                                                        "is (in * k * k, r): peft-cpp adapts linear layers only)");
      }
      out = base_out;
    }
    return hra<T>(m.copy("hra_u"), gs, out);
  }

  /// Makes `c` describe this module when saving: peft_type HRA, r, apply_GS, init_weights when
  /// absent. unsupported_error when modules differ in r or apply_GS (HRAConfig has one of each).
  static void describe_in(const hra<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "hra::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "HRA") {
      c.peft_type = "HRA";
      c.r = a.rank();
      c.raw["r"] = a.rank();
      c.raw["apply_GS"] = a.apply_gs();
    } else if (c.r != a.rank() || c.boolean("apply_GS", false, where) != a.apply_gs()) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' has r = " + std::to_string(a.rank()) +
                                                      ", apply_GS = " + (a.apply_gs() ? "true" : "false") +
                                                      " but the config says r = " + std::to_string(c.r) + ", apply_GS = " +
                                                      (c.boolean("apply_GS", false, where) ? "true" : "false") +
                                                      ": PEFT's HRAConfig has one r and one apply_GS for every module");
    }
    c.set_default("apply_GS", a.apply_gs());
    c.set_default("init_weights", true);
    c.set_default("bias", "none");
  }
};

}  // namespace peft::io
