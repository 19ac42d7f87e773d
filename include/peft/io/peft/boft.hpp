// peft/io/peft/boft.hpp — BOFT in PEFT checkpoints: peft_type "BOFT"; tensors boft_R
// (N, D, H, H) and boft_s (out, 1) (no ".weight"); fields boft_block_size, boft_block_num,
// boft_n_butterfly_factor (the layout, checked against the tensors), boft_dropout (training-only
// multiplicative dropout: a loaded adapter's outputs do not depend on it), fan_in_fan_out.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/boft.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<boft<T>> : codec_defaults {
  /// PEFT's "BOFT".
  static bool handles(const adapter_config& c) { return c.peft_type == "BOFT"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view config_fields[] = {"boft_block_size", "boft_block_num", "boft_n_butterfly_factor",
                                                       "boft_dropout", "fan_in_fan_out"};
  static std::vector<std::string_view> module_tensors() { return {"boft_R", "boft_s"}; }

  /// The adapter of one module. boft_R (N, D, H, H) gives the layout, which must be the config's:
  /// H = boft_block_size or D = boft_block_num, N = boft_n_butterfly_factor (or N = 1: PEFT
  /// without its CUDA kernel silently uses one factor and saves that), PEFT's rules for D H
  /// inputs; boft_s is (out, 1). format_error otherwise, or when the base shape differs.
  static boft<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "boft::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const auto& rs = m.shape("boft_R", 4);
    const auto& ss = m.shape("boft_s", 2);
    const long long block_size = c.integer("boft_block_size", 4, where);
    const long long block_num = c.integer("boft_block_num", 0, where);
    const long long factor = c.integer("boft_n_butterfly_factor", 1, where);
    if (rs[0] < 1 || rs[1] < 1 || rs[2] < 1 || rs[2] != rs[3] || ss[1] != 1 || ss[0] < 1) {
      peft::detail::raise<format_error>(where, mod + ": boft_R is " + detail::shape_text(rs) + " and boft_s " +
                                                   detail::shape_text(ss) + ", expected [N, D, H, H] and [out, 1]");
    }
    const boft_layout l{static_cast<index>(rs[0]), static_cast<index>(rs[1]), static_cast<index>(rs[2])};
    const bool layout_ok = (block_size != 0 ? l.size == block_size : l.blocks == block_num) &&
                           (l.factors == factor || l.factors == 1);
    if (!layout_ok) {
      peft::detail::raise<format_error>(where, mod + ": boft_R is " + detail::shape_text(rs) + " but the config has boft_block_size " +
                                                   std::to_string(block_size) + ", boft_block_num " + std::to_string(block_num) +
                                                   ", boft_n_butterfly_factor " + std::to_string(factor) +
                                                   " (expected [factor, D, H, H] with H = boft_block_size or D = boft_block_num)");
    }
    // PEFT's rules for this layout (its butterfly needs even blocks, ...).
    (void)boft_layout::of(l.blocks * l.size, block_size != 0 ? l.size : 0, block_size != 0 ? 0 : l.blocks, l.factors, where);
    if (const auto& shape = m.base_shape()) {
      const auto [out, in] = *shape;
      if (in != l.blocks * l.size || out != ss[0]) {
        peft::detail::raise<format_error>(where, mod + ": boft_R covers " + std::to_string(l.blocks * l.size) +
                                                     " inputs and boft_s " + std::to_string(ss[0]) + " outputs, the base layer is " +
                                                     peft::detail::shape_string(out, in));
      }
    }
    matrix<T> r(l.factors * l.blocks * l.size, l.size, m.copy("boft_R").storage());
    return boft<T>(std::move(r), m.copy("boft_s").storage(), l);
  }

  /// Makes `c` describe this module when saving: peft_type BOFT with boft_block_size = H and
  /// boft_n_butterfly_factor = N (boft_block_num 0), PEFT's other fields when absent (a single
  /// factor fits any boft_n_butterfly_factor, as the loader reads it).
  /// unsupported_error for a module that does not fit the config (BOFTConfig has one layout).
  static void describe_in(const boft<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "boft::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    const boft_layout& l = a.layout();
    if (c.peft_type != "BOFT") {
      c.peft_type = "BOFT";
      c.raw["boft_block_size"] = l.size;
      c.raw["boft_block_num"] = 0;
      c.raw["boft_n_butterfly_factor"] = l.factors;
    } else {
      const long long block_size = c.integer("boft_block_size", 4, where);
      const long long block_num = c.integer("boft_block_num", 0, where);
      const long long factor = c.integer("boft_n_butterfly_factor", 1, where);
      if ((block_size != 0 ? l.size != block_size : l.blocks != block_num) || (l.factors != factor && l.factors != 1)) {
        peft::detail::raise<unsupported_error>(where, "module '" + module + "' has " + std::to_string(l.factors) + " factors of " +
                                                        std::to_string(l.blocks) + " blocks of " + std::to_string(l.size) +
                                                        ", which the config (boft_block_size " + std::to_string(block_size) +
                                                        ", boft_block_num " + std::to_string(block_num) +
                                                        ", boft_n_butterfly_factor " + std::to_string(factor) +
                                                        ") does not describe: PEFT's BOFTConfig has one layout");
      }
    }
    c.set_default("boft_dropout", 0.0);
    c.set_default("fan_in_fan_out", false);
    c.set_default("init_weights", true);
    c.set_default("bias", "none");
  }
};

}  // namespace peft::io
