// peft/io/peft/hira.hpp — HiRA in PEFT checkpoints: peft_type "HIRA"; tensors hira_A (r, in),
// hira_B (out, r) (no ".weight"); fields r (default 32), rank_pattern, fan_in_fan_out (the
// loader's), hira_dropout (training only). Convolutions (hira_A with kernel dimensions) and
// embeddings (hira_embedding_A / _B) are refused: peft-cpp adapts linear layers.
// PEFT 0.21 builds every HiRA module with rank r: its dispatch_default reads config.r and drops
// the rank rank_pattern gave (docs/methods/hira.md). So a saved module has rank r whatever
// rank_pattern says; loading accepts r (or rank_pattern's rank, which a PEFT that fixes this
// would write), and saving refuses modules whose ranks differ, which PEFT 0.21 cannot load.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/hira.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<hira<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "HIRA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  /// hira_dropout drops x's entries before the HiRA term in training only (the identity in eval),
  /// so a loaded adapter's outputs do not depend on it; peft-cpp trains without it.
  static constexpr std::string_view config_fields[] = {"r", "rank_pattern", "fan_in_fan_out", "hira_dropout"};
  static std::vector<std::string_view> module_tensors() {
    return {"hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"};
  }

  /// The config's r (PEFT's default 32 when absent).
  static index r_of(const adapter_config& c) { return c.field("r") != nullptr ? c.r : 32; }
  /// rank_pattern's rank for a module, else r.
  static index pattern_rank_for(const adapter_config& c, const std::string& module) {
    if (c.field("r") != nullptr) return c.rank_for(module);
    adapter_config d;
    d.r = 32;
    d.rank_pattern = c.rank_pattern;
    return d.rank_for(module);
  }

  /// The adapter of one module: rank from the tensors, checked against r (or rank_pattern).
  static hira<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "hira::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    if (m.contains("hira_embedding_A") || m.contains("hira_embedding_B")) {
      peft::detail::raise<unsupported_error>(where, mod + " has hira_embedding_A/hira_embedding_B, HiRA on an embedding: "
                                                          "peft-cpp adapts linear layers only");
    }
    for (const auto& [name, t] : m.all()) {
      if (t.shape.size() != 2) {
        peft::detail::raise<unsupported_error>(where, mod + ": '" + name + "' is " + detail::shape_text(t.shape) +
                                                            ", not a matrix (a convolution's): peft-cpp adapts linear "
                                                            "layers only");
      }
    }
    const auto& sa = m.shape("hira_A", 2);
    const auto& sb = m.shape("hira_B", 2);
    if (sa[0] < 1 || sa[1] < 1 || sb[0] < 1 || sb[1] != sa[0]) {
      peft::detail::raise<format_error>(where, mod + ": hira_A " + detail::shape_text(sa) + " and hira_B " +
                                                   detail::shape_text(sb) + " are not (r, in) and (out, r)");
    }
    const auto rank = static_cast<index>(sa[0]);
    const index r = r_of(c), pattern_r = pattern_rank_for(c, m.module());
    if (rank != r && rank != pattern_r) {
      peft::detail::raise<format_error>(where, mod + " has rank " + std::to_string(rank) +
                                                   " but adapter_config.json gives r = " + std::to_string(r) +
                                                   (pattern_r != r ? " (rank_pattern: " + std::to_string(pattern_r) + ")" : ""));
    }
    if (const auto& shape = m.base_shape(); shape && (shape->first != sb[0] || shape->second != sa[1])) {
      peft::detail::raise<format_error>(where, mod + ": hira_B " + detail::shape_text(sb) + " and hira_A " +
                                                   detail::shape_text(sa) + " do not fit the base's " +
                                                   peft::detail::shape_string(shape->first, shape->second));
    }
    return hira<T>(m.copy("hira_A"), m.copy("hira_B"));
  }

  /// Makes `c` describe this module: peft_type HIRA, r; PEFT's defaults for rank_pattern,
  /// hira_dropout and init_weights. unsupported_error for a module whose rank differs from r:
  /// PEFT 0.21 gives every HiRA module rank r (rank_pattern is dropped), so it could not load it.
  static void describe_in(const hira<T>& a, adapter_config& c, const std::string& module) {
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "HIRA") {
      c.peft_type = "HIRA";
      c.r = a.rank();
      c.rank_pattern.clear();
      c.raw["r"] = a.rank();  // to_json keeps it up to date from c.r
      c.raw["rank_pattern"] = ordered_json::object();
    } else if (c.field("r") == nullptr) {
      c.r = 32;  // HiraConfig's default, which an absent r meant when this config was read
      c.raw["r"] = 32;
    }
    if (c.r != a.rank()) {
      peft::detail::raise<unsupported_error>(
          "hira::describe_in", "module '" + module + "' has rank " + std::to_string(a.rank()) + " but the config says r = " +
                                   std::to_string(c.r) + "; PEFT 0.21 builds every HiRA module with rank r (it drops "
                                   "rank_pattern), so it could not load modules of different ranks");
    }
    c.set_default("rank_pattern", ordered_json::object());
    c.set_default("hira_dropout", 0.0);
    c.set_default("init_weights", true);
  }
};

}  // namespace peft::io
