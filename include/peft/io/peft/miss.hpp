// peft/io/peft/miss.hpp — MiSS in PEFT checkpoints: peft_type "MISS"; tensor miss_block (no
// ".weight"): [r, out] (balance), [r, mini_r] (mini), [out / r, r, r] (bat); fields r, mini_r,
// init_weights (which selects the mode: true/false balance, "bat", "mini") and miss_dropout.
// The checkpoint does not give in_features (nor out_features in mini mode): the loader binds the
// base's shape when it knows it, else call set_features.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/miss.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<miss<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "MISS"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  /// miss_dropout acts in training only (a loaded adapter's outputs do not depend on it).
  static constexpr std::string_view config_fields[] = {"r", "mini_r", "init_weights", "miss_dropout"};
  static std::vector<std::string_view> module_tensors() { return {"miss_block"}; }

  /// The mode adapter_config.json's init_weights selects (PEFT: true and false are balance, false
  /// only initialises randomly). format_error for another value.
  static miss_mode mode_of(const adapter_config& c) {
    const auto it = c.raw.find("init_weights");
    if (it == c.raw.end() || it->is_null() || it->is_boolean()) return miss_mode::balance;
    if (it->is_string()) {
      const auto s = it->get<std::string>();
      if (s == "bat") return miss_mode::bat;
      if (s == "mini") return miss_mode::mini;
    }
    peft::detail::raise<format_error>("miss::from_checkpoint", "adapter_config.json: 'init_weights' = " + it->dump() +
                                                                   ": MiSS takes true, false, \"bat\" or \"mini\"");
  }

  /// The adapter of one module, its mode from init_weights; bound to the base's shape when the
  /// loader knows it. format_error when miss_block's shape contradicts r, mini_r or the mode.
  static miss<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "miss::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const miss_mode mode = mode_of(c);
    const bool bat = mode == miss_mode::bat;
    const auto& t = m.get("miss_block");
    if (t.shape.size() != (bat ? 3u : 2u)) {
      peft::detail::raise<format_error>(where, mod + ": miss_block is " + detail::shape_text(t.shape) + ", expected " +
                                                   (bat ? "[out / r, r, r] (init_weights \"bat\")"
                                                        : mode == miss_mode::mini ? "[r, mini_r] (init_weights \"mini\")"
                                                                                  : "[r, out_features]"));
    }
    const auto r = static_cast<index>(bat ? t.shape[1] : t.shape[0]);
    if (bat && t.shape[2] != t.shape[1]) {
      peft::detail::raise<format_error>(where, mod + ": miss_block is " + detail::shape_text(t.shape) +
                                                   ", bat's blocks are square [out / r, r, r]");
    }
    if (c.raw.contains("r") && c.r != r) {
      peft::detail::raise<format_error>(where, mod + ": miss_block " + detail::shape_text(t.shape) + " has r = " +
                                                   std::to_string(r) + " but adapter_config.json gives r = " +
                                                   std::to_string(c.r));
    }
    index mini_r = 0;
    index out = bat ? static_cast<index>(t.shape[0] * t.shape[1]) : static_cast<index>(t.shape[1]);
    if (mode == miss_mode::mini) {
      mini_r = static_cast<index>(c.integer("mini_r", 1, where));
      if (mini_r != static_cast<index>(t.shape[1])) {
        peft::detail::raise<format_error>(where, mod + ": miss_block is " + detail::shape_text(t.shape) +
                                                     " but adapter_config.json gives mini_r = " + std::to_string(mini_r));
      }
      out = 0;  // the repeats along out_features are not in the checkpoint
    }
    index in = 0;
    if (const auto& shape = m.base_shape()) {
      if (out != 0 && shape->first != out) {
        peft::detail::raise<format_error>(where, mod + ": miss_block " + detail::shape_text(t.shape) + " is for " +
                                                     std::to_string(out) + " outputs, the base has " +
                                                     std::to_string(shape->first));
      }
      out = shape->first;
      in = shape->second;
    }
    return miss<T>(mode, r, mini_r, m.copy("miss_block").storage(), in, out);
  }

  /// Makes `c` describe the adapter: peft_type MISS, r, init_weights (the mode) and mini_r.
  /// unsupported_error when another module has a different r, mode or mini_r (MissConfig has one
  /// of each).
  static void describe_in(const miss<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "miss::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    const ordered_json mode = a.mode() == miss_mode::balance ? ordered_json(true) : ordered_json(std::string(miss_mode_name(a.mode())));
    const index mini_r = a.mode() == miss_mode::mini ? a.mini_rank() : 1;
    if (c.peft_type != "MISS") {
      c.peft_type = "MISS";
      c.r = a.rank();
      c.raw["r"] = a.rank();
      c.raw["init_weights"] = mode;
      c.raw["mini_r"] = mini_r;
    } else if (c.r != a.rank() || mode_of(c) != a.mode() ||
               (a.mode() == miss_mode::mini && c.integer("mini_r", 1, where) != mini_r)) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' has r = " + std::to_string(a.rank()) +
                                                        ", mode " + std::string(miss_mode_name(a.mode())) +
                                                        (a.mode() == miss_mode::mini ? ", mini_r = " + std::to_string(mini_r) : std::string()) +
                                                        ", unlike the config's; PEFT's MissConfig has one r, one "
                                                        "init_weights and one mini_r for every module");
    }
    if (!c.raw.contains("r")) c.raw["r"] = a.rank();
    if (!c.raw.contains("init_weights")) c.raw["init_weights"] = mode;
    if (!c.raw.contains("mini_r")) c.raw["mini_r"] = mini_r;
    if (!c.raw.contains("miss_dropout")) c.raw["miss_dropout"] = 0.0;
  }
};

}  // namespace peft::io
