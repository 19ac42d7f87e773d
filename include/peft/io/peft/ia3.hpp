// peft/io/peft/ia3.hpp — (IA)^3 in PEFT checkpoints: peft_type "IA3"; tensor ia3_l (no
// ".weight"); field feedforward_modules (a list: a module is feedforward when its path ends with
// an entry, a plain suffix, PEFT's rule, unlike target_modules; a string: a regex matching the
// whole path).
#pragma once

#include <algorithm>
#include <regex>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/ia3.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

/// PEFT's IA3Model._check_target_module_feedforward: `rule` is adapter_config.json's
/// feedforward_modules (null/absent: no module; a string: re.fullmatch; a list: the module path
/// ends with an entry, as a plain string suffix). format_error on another JSON type or a bad regex.
inline bool ia3_feedforward(const ordered_json& rule, const std::string& module) {
  constexpr const char* where = "ia3_feedforward";
  if (rule.is_null()) return false;
  if (rule.is_string()) {
    try {
      return std::regex_match(module, detail::module_regex(rule.get<std::string>()));
    } catch (const std::regex_error& e) {
      peft::detail::raise<format_error>(where, "feedforward_modules '" + rule.get<std::string>() + "' is not a valid regex: " + e.what());
    }
  }
  if (!rule.is_array()) peft::detail::raise<format_error>(where, "feedforward_modules must be a string or a list of strings");
  for (const auto& e : rule) {
    if (!e.is_string()) peft::detail::raise<format_error>(where, "feedforward_modules entries must be strings");
    if (module.ends_with(e.get<std::string>())) return true;
  }
  return false;
}

template <compute_scalar T>
struct peft_codec<ia3<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "IA3"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view config_fields[] = {"feedforward_modules", "fan_in_fan_out"};
  static std::vector<std::string_view> module_tensors() { return {"ia3_l"}; }

  /// Whether `c` makes `module` a feedforward module (PEFT's rule, see ia3_feedforward).
  static bool is_feedforward(const adapter_config& c, const std::string& module) {
    const auto it = c.raw.find("feedforward_modules");
    return it != c.raw.end() && ia3_feedforward(*it, module);
  }

  /// The adapter of one module, unbound on the side ia3_l does not give. The config's
  /// feedforward_modules decides the kind; ia3_l must have the matching shape.
  static ia3<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                             const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "ia3::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const auto& t = m.get("ia3_l");
    if (t.shape.size() != 2) {
      if (t.shape.size() > 2) {
        peft::detail::raise<unsupported_error>(where, mod + ": ia3_l is " + detail::shape_text(t.shape) +
                                                    ", a convolution's: peft-cpp adapts linear layers only");
      }
      peft::detail::raise<format_error>(where, mod + ": ia3_l is " + detail::shape_text(t.shape) + ", expected [1, in] or [out, 1]");
    }
    const bool ff = is_feedforward(c, m.module());
    const auto n = ff ? t.shape[1] : t.shape[0];
    if ((ff ? t.shape[0] : t.shape[1]) != 1 || n < 1) {
      peft::detail::raise<format_error>(where, mod + (ff ? " is a feedforward module (feedforward_modules), so ia3_l must be [1, in]"
                                                   : " is not a feedforward module (feedforward_modules), so ia3_l must be [out, 1]") +
                                             ", it is " + detail::shape_text(t.shape));
    }
    return ia3<T>(m.copy("ia3_l").storage(), ff);
  }

  /// Makes `c` describe this module: peft_type IA3; a feedforward module not yet matched by
  /// feedforward_modules is added to it (to the list, and to a list target_modules, which PEFT
  /// requires to contain it; or as an alternative of the regex). unsupported_error when
  /// feedforward_modules matches an output-scaled module.
  static void describe_in(const ia3<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "ia3::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "IA3") c.raw.erase("feedforward_modules");
    c.peft_type = "IA3";
    const bool matched = is_feedforward(c, module);
    if (matched == a.feedforward()) return;
    if (!a.feedforward()) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' scales its output, but the config's "
                                              "feedforward_modules makes it a feedforward module");
    }
    auto& rule = c.raw["feedforward_modules"];
    if (rule.is_string()) {
      std::string escaped;
      for (const char ch : module) {
        if (std::string_view(".^$|?*+()[]{}\\").find(ch) != std::string_view::npos) escaped += '\\';
        escaped += ch;
      }
      std::string re = "(?:";
      re += rule.get<std::string>();
      re += ")|";
      re += escaped;
      rule = re;
    } else {
      if (!rule.is_array()) rule = ordered_json::array();
      rule.push_back(module);
      if (c.targets_kind == target_kind::list &&
          std::find(c.target_modules.begin(), c.target_modules.end(), module) == c.target_modules.end()) {
        c.target_modules.push_back(module);
      }
    }
  }
};

}  // namespace peft::io
