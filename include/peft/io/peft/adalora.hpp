// peft/io/peft/adalora.hpp — AdaLoRA in PEFT checkpoints: peft_type "ADALORA"; tensors lora_A,
// lora_B, lora_E (no ".weight"); init_r (ranknum), lora_alpha (scaling), and rank_pattern holding
// each module's budget mask ({"<module>.lora_E": [bool] * init_r}). r and target_r do not enter
// the formula.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/adalora.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<adalora<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "ADALORA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  /// LoraConfig's fields and AdaLoRA's schedule (training only: the saved ranks are in the tensors).
  static constexpr std::string_view schedule_fields[] = {"target_r", "init_r", "tinit",          "tfinal",
                                                         "deltaT",   "beta1",  "beta2",          "orth_reg_weight",
                                                         "total_step"};
  static constexpr auto config_fields = join_config_fields(lora_config_fields, schedule_fields);
  /// `ranknum` is accepted and ignored (old PEFT versions saved it; PEFT 0.21 ignores it too:
  /// the key does not name a parameter of its model). Embedding tensors are rejected.
  static std::vector<std::string_view> module_tensors() {
    return {"lora_A", "lora_B", "lora_E", "ranknum", "lora_embedding_A", "lora_embedding_B"};
  }

  /// init_r of the config (PEFT's default 12).
  static index init_r(const adapter_config& c) {
    const auto it = c.raw.find("init_r");
    if (it == c.raw.end() || it->is_null()) return 12;
    if (!it->is_number_integer() || it->get<long long>() < 0) {
      peft::detail::raise<format_error>("adalora::from_checkpoint", "adapter_config.json: 'init_r' must be an integer >= 0");
    }
    return static_cast<index>(it->get<long long>());
  }

  /// The rank PEFT gives a module: the number of true entries of its rank_pattern mask
  /// ("<module>.lora_E", a list of init_r booleans), or init_r.
  static index rank_for(const adapter_config& c, const std::string& module) {
    constexpr const char* where = "adalora::from_checkpoint";
    const index r0 = init_r(c);
    const auto it = c.raw.find("rank_pattern");
    if (it == c.raw.end() || it->is_null()) return r0;
    if (!it->is_object()) peft::detail::raise<format_error>(where, "adapter_config.json: AdaLoRA's 'rank_pattern' must be an object");
    const ordered_json* mask = nullptr;
    for (const auto& key : {module + ".lora_E", module + ".lora_E.default"}) {
      const auto m = it->find(key);
      if (m != it->end()) {
        mask = &*m;
        break;
      }
    }
    if (mask == nullptr) return r0;
    if (!mask->is_array() || static_cast<index>(mask->size()) != r0) {
      peft::detail::raise<format_error>(where, "adapter_config.json: rank_pattern of '" + module + "' must be a list of init_r = " +
                                             std::to_string(r0) + " booleans");
    }
    index r = 0;
    for (const auto& v : *mask) {
      if (v.is_boolean()) {
        r += v.get<bool>() ? 1 : 0;
      } else if (v.is_number_integer() && (v.get<long long>() == 0 || v.get<long long>() == 1)) {
        r += static_cast<index>(v.get<long long>());
      } else {
        peft::detail::raise<format_error>(where, "adapter_config.json: rank_pattern of '" + module + "' holds a non-boolean");
      }
    }
    return r;
  }

  /// The adapter of one module: rank from the tensors, checked against rank_pattern / init_r;
  /// ranknum = init_r; scaling = lora_alpha, or the rank when lora_alpha <= 0.
  static adalora<T> from_checkpoint(const adapter_config& c, const io::checkpoint_tensors<T>& m,
                                 const io::checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "adalora::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    if (m.contains("lora_embedding_A") || m.contains("lora_embedding_B")) {
      peft::detail::raise<unsupported_error>(where, mod + " is an embedding (lora_embedding_A/B): peft-cpp adapts linear layers only");
    }
    const auto& sa = m.shape("lora_A", 2);
    const auto& sb = m.shape("lora_B", 2);
    const auto& se = m.shape("lora_E", 2);
    if (sb[1] != sa[0] || se[0] != sa[0] || se[1] != 1 || sa[1] < 1 || sb[0] < 1) {
      peft::detail::raise<format_error>(where, mod + ": lora_A " + detail::shape_text(sa) + ", lora_B " +
                                             detail::shape_text(sb) + ", lora_E " + detail::shape_text(se) +
                                             " are not (r, in), (out, r), (r, 1)");
    }
    const auto rank = static_cast<index>(sa[0]);
    const index expected = rank_for(c, m.module());
    if (rank != expected) {
      peft::detail::raise<format_error>(where, mod + " has rank " + std::to_string(rank) + " but adapter_config.json gives " +
                                             std::to_string(expected) + " (init_r, or its rank_pattern mask)");
    }
    const double scaling = c.lora_alpha > 0 ? c.lora_alpha : static_cast<double>(rank);
    return adalora<T>(m.copy("lora_A"), m.copy("lora_B"), m.copy("lora_E"), scaling, static_cast<double>(init_r(c)));
  }

  /// Makes `c` describe this module: peft_type ADALORA; init_r = ranknum and lora_alpha =
  /// scaling when `c` has no init_r yet (and total_step = 1 when absent, which PEFT requires);
  /// a rank_pattern mask (rank trues, then falses, init_r in all) when rank < init_r.
  /// unsupported_error when `c` cannot describe it: another ranknum or scaling (PEFT has one
  /// init_r and one lora_alpha per adapter), a non-integer ranknum, or rank > ranknum.
  static void describe_in(const adalora<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "adalora::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "ADALORA") {
      c.raw.erase("init_r");
      c.raw.erase("rank_pattern");
    }
    c.peft_type = "ADALORA";
    c.rank_pattern.clear();  // LoRA's integer patterns mean nothing to AdaLoRA (its masks live in raw)
    const std::string mod = "module '" + module + "'";
    if (a.ranknum() != std::floor(a.ranknum()) || a.ranknum() < 0 || a.ranknum() > 1e9) {
      peft::detail::raise<unsupported_error>(where, mod + " has ranknum " + std::to_string(a.ranknum()) +
                                                  ", which no integer init_r gives");
    }
    if (!c.raw.contains("init_r") || c.raw["init_r"].is_null()) {
      c.raw["init_r"] = static_cast<long long>(a.ranknum());
      if (a.scaling() > 0) c.lora_alpha = a.scaling();
    }
    if (!c.raw.contains("total_step") || c.raw["total_step"].is_null()) c.raw["total_step"] = 1;
    const index r0 = init_r(c);
    if (static_cast<double>(r0) != a.ranknum()) {
      peft::detail::raise<unsupported_error>(where, mod + " has ranknum " + std::to_string(a.ranknum()) + ", the config's init_r is " +
                                                  std::to_string(r0) + ": PEFT has one init_r per adapter");
    }
    if (a.rank() > r0) {
      peft::detail::raise<unsupported_error>(where, mod + " has rank " + std::to_string(a.rank()) + " > init_r " + std::to_string(r0));
    }
    const double expect = c.lora_alpha > 0 ? c.lora_alpha : static_cast<double>(a.rank());
    if (std::abs(expect - a.scaling()) > 8.0 * std::numeric_limits<double>::epsilon() * std::max(1.0, std::abs(a.scaling()))) {
      peft::detail::raise<unsupported_error>(where, mod + " has scaling " + std::to_string(a.scaling()) + ", the config gives " +
                                                  std::to_string(expect) + ": PEFT has one lora_alpha per adapter");
    }
    if (a.rank() < r0) {
      if (!c.raw.contains("rank_pattern") || !c.raw["rank_pattern"].is_object()) {
        c.raw["rank_pattern"] = ordered_json::object();
      }
      ordered_json mask = ordered_json::array();
      for (index k = 0; k < r0; ++k) mask.push_back(k < a.rank());
      c.raw["rank_pattern"][module + ".lora_E"] = std::move(mask);
    }
  }
};

}  // namespace peft::io
