// peft/io/peft/hira.hpp — HiRA in PEFT checkpoints: peft_type "HIRA"; tensors hira_A (r, in),
// hira_B (out, r) (no ".weight"); fields r (default 32), rank_pattern, fan_in_fan_out (the
// loader's), hira_dropout (training only). Convolutions (hira_A with kernel dimensions) and
// embeddings (hira_embedding_A / _B) are refused: peft-cpp adapts linear layers.
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

  /// HiRA's rank for a module: rank_pattern first, then "r" (PEFT's default 32 when absent).
  static index rank_for(const adapter_config& c, const std::string& module) {
    if (c.field("r") != nullptr) return c.rank_for(module);
    adapter_config d;
    d.r = 32;
    d.rank_pattern = c.rank_pattern;
    return d.rank_for(module);
  }

  /// The adapter of one module: rank from the tensors, checked against r / rank_pattern.
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
    if (rank != rank_for(c, m.module())) {
      peft::detail::raise<format_error>(where, mod + " has rank " + std::to_string(rank) +
                                                   " but adapter_config.json gives " +
                                                   std::to_string(rank_for(c, m.module())));
    }
    if (const auto& shape = m.base_shape(); shape && (shape->first != sb[0] || shape->second != sa[1])) {
      peft::detail::raise<format_error>(where, mod + ": hira_B " + detail::shape_text(sb) + " and hira_A " +
                                                   detail::shape_text(sa) + " do not fit the base's " +
                                                   peft::detail::shape_string(shape->first, shape->second));
    }
    return hira<T>(m.copy("hira_A"), m.copy("hira_B"));
  }

  /// Makes `c` describe this module: peft_type HIRA; an exact rank_pattern entry where r does not
  /// give the module's rank (written to the document too: HiraConfig has rank_pattern but no
  /// alpha); PEFT's defaults for hira_dropout and init_weights.
  static void describe_in(const hira<T>& a, adapter_config& c, const std::string& module) {
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.fresh()) c.r = a.rank();  // the first module of a config built in C++ sets r
    c.peft_type = "HIRA";
    if (c.field("r") == nullptr) c.raw["r"] = c.r;  // to_json keeps it up to date from c.r
    if (c.rank_for(module) != a.rank()) {
      c.rank_pattern.insert(c.rank_pattern.begin(), {module, a.rank()});
      // to_json writes rank_pattern for LoRA's family only: the document is kept here, in the
      // order rank_for reads it (PEFT takes the first matching key too).
      ordered_json rp = ordered_json::object();
      for (const auto& [k, v] : c.rank_pattern) rp[k] = v;
      c.raw["rank_pattern"] = rp;
    }
    c.set_default("rank_pattern", ordered_json::object());
    c.set_default("hira_dropout", 0.0);
    c.set_default("init_weights", true);
  }
};

}  // namespace peft::io
