// peft/io/adapter_config.hpp — HuggingFace PEFT's adapter_config.json.
//
//   auto cfg = peft::io::adapter_config::load(dir);        // dir/adapter_config.json
//   cfg.rank_for("model.layers.0.self_attn.q_proj");       // r, or its rank_pattern override
//   cfg.targets("model.layers.0.mlp.up_proj");             // target_modules rule (list/regex)
//   cfg.selects("model.layers.0.mlp.up_proj");             // + exclude_modules, layers_to_transform
//
// The fields peft-cpp interprets are parsed into members; the whole document is kept (key
// order included) so that saving writes back every field PEFT wrote, with ours updated.
// Pattern rules follow PEFT 0.21: rank_pattern/alpha_pattern key k matches a module path p when
// the regex `(.*\.)?(k)$` matches p from its start, first key in file order wins;
// target_modules as a string is a regex that must match the whole path, as a list an entry
// equal to the path or to its last dotted components; "all-linear" matches every module.
// Regexes use std::regex (ECMAScript), which agrees with Python's `re` on the patterns used in
// practice (alternation, character classes, `.*`); lookbehind is not available.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/io/detail/json_depth.hpp"

namespace peft::io {

using ordered_json = nlohmann::ordered_json;

namespace detail {

/// The std::regex (ECMAScript) of a pattern from adapter_config.json. With libstdc++ it is
/// matched by the breadth-first executor (regex_constants::__polynomial): time polynomial in the
/// module path whatever the pattern, where the default backtracking one takes exponential time on
/// patterns such as "(.*)*(.*)*z" (a config that would hang its reader); back-references, which
/// that executor cannot run, are then refused as invalid. std::regex_error on a bad pattern.
inline std::regex module_regex(const std::string& pattern) {
#if defined(__GLIBCXX__)
  return std::regex(pattern, std::regex::ECMAScript | std::regex_constants::__polynomial);
#else
  return std::regex(pattern, std::regex::ECMAScript);
#endif
}

}  // namespace detail

/// How `target_modules` names the adapted modules.
enum class target_kind : std::uint8_t { none, list, regex, all_linear };

struct adapter_config {
  std::string peft_type = "LORA";                      // "LORA", "VERA", ...
  index r = 8;
  double lora_alpha = 8.0;
  bool use_rslora = false;
  bool use_dora = false;
  bool lora_bias = false;
  bool fan_in_fan_out = false;                          // base weights stored (in, out)
  double lora_dropout = 0.0;
  std::vector<std::pair<std::string, index>> rank_pattern;    // in file order
  std::vector<std::pair<std::string, double>> alpha_pattern;  // in file order
  target_kind targets_kind = target_kind::none;
  std::vector<std::string> target_modules;              // list entries, or the one regex
  std::vector<std::string> modules_to_save;
  std::vector<std::string> exclude_modules;             // list entries, or the one regex
  bool exclude_is_regex = false;
  std::vector<long long> layers_to_transform;           // empty: every layer
  std::vector<std::string> layers_pattern;              // empty: PEFT's default rule
  ordered_json raw = ordered_json::object();           // the document as read (or built)

  /// PEFT config classes without an `r` field (to_json writes r for every other one).
  static constexpr std::string_view no_rank_types[] = {"IA3", "BOFT", "C3A", "FOURIERFT", "ROAD", "BEFT", "WAVEFT", "FROD"};

  /// A LoRA config with PEFT's default fields, for adapters made in C++.
  static adapter_config lora(index r, double alpha, std::vector<std::string> targets,
                             bool use_rslora = false) {
    adapter_config c;
    c.r = r;
    c.lora_alpha = alpha;
    c.use_rslora = use_rslora;
    c.targets_kind = target_kind::list;
    c.target_modules = std::move(targets);
    return c;
  }

  /// The deepest nesting of arrays and objects parse() accepts (PEFT writes 3 levels; the
  /// safetensors header's limit): copying and saving the document recurse once per level.
  static constexpr std::size_t max_json_depth = 128;

  /// Parses the text of an adapter_config.json; `source` names it in errors.
  static adapter_config parse(const std::string& text, const std::string& source = "adapter_config.json") {
    constexpr const char* where = "adapter_config::parse";
    ordered_json j;
    try {
      j = ordered_json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      peft::detail::raise<format_error>(where, source + " is not valid JSON: " + e.what());
    }
    if (!j.is_object()) peft::detail::raise<format_error>(where, source + " is not a JSON object");
    if (detail::json_nests_deeper(j, max_json_depth)) {
      peft::detail::raise<format_error>(where, source + " nests arrays and objects more than 128 deep");
    }
    adapter_config c;
    c.raw = j;
    auto field = [&](const char* name) -> const ordered_json* {
      auto it = j.find(name);
      return (it == j.end() || it->is_null()) ? nullptr : &*it;
    };
    auto get_bool = [&](const char* name, bool& out) {
      if (const auto* v = field(name)) {
        if (!v->is_boolean()) peft::detail::raise<format_error>(where, source + ": '" + name + "' must be true or false");
        out = v->get<bool>();
      }
    };
    auto get_number = [&](const char* name, double& out) {
      if (const auto* v = field(name)) {
        if (!v->is_number()) peft::detail::raise<format_error>(where, source + ": '" + name + "' must be a number");
        out = v->get<double>();
      }
    };
    auto get_rank = [&](const ordered_json& v, const std::string& what) -> index {
      if (!v.is_number_integer() || v.get<long long>() < 1) {
        peft::detail::raise<format_error>(where, source + ": " + what + " must be a positive integer");
      }
      return static_cast<index>(v.get<long long>());
    };
    if (const auto* v = field("peft_type")) {
      if (!v->is_string()) peft::detail::raise<format_error>(where, source + ": 'peft_type' must be a string");
      c.peft_type = v->get<std::string>();
    } else {
      peft::detail::raise<format_error>(where, source + " has no 'peft_type'");
    }
    // OFT's r counts blocks and is 0 when oft_block_size gives them (PEFT's default).
    if (const auto* v = field("r")) {
      c.r = c.peft_type == "OFT" && v->is_number_integer() && v->get<long long>() == 0 ? 0 : get_rank(*v, "'r'");
    }
    get_number("lora_alpha", c.lora_alpha);
    get_number("lora_dropout", c.lora_dropout);
    get_bool("use_rslora", c.use_rslora);
    get_bool("use_dora", c.use_dora);
    get_bool("lora_bias", c.lora_bias);
    get_bool("fan_in_fan_out", c.fan_in_fan_out);
    // AdaLoRA's rank_pattern holds per-module boolean masks, not ranks: it stays in `raw`.
    if (const auto* v = c.peft_type == "ADALORA" ? nullptr : field("rank_pattern")) {
      if (!v->is_object()) peft::detail::raise<format_error>(where, source + ": 'rank_pattern' must be an object");
      for (const auto& [k, val] : v->items()) c.rank_pattern.emplace_back(k, get_rank(val, "rank_pattern['" + k + "']"));
    }
    if (const auto* v = field("alpha_pattern")) {
      if (!v->is_object()) peft::detail::raise<format_error>(where, source + ": 'alpha_pattern' must be an object");
      for (const auto& [k, val] : v->items()) {
        if (!val.is_number()) peft::detail::raise<format_error>(where, source + ": alpha_pattern['" + k + "'] must be a number");
        c.alpha_pattern.emplace_back(k, val.get<double>());
      }
    }
    if (const auto* v = field("target_modules")) {
      if (v->is_string()) {
        const auto s = v->get<std::string>();
        if (s == "all-linear" || s == "ALL-LINEAR" || s == "All-Linear") {
          c.targets_kind = target_kind::all_linear;
        } else {
          c.targets_kind = target_kind::regex;
          c.target_modules = {s};
          compile(s, where, source + ": target_modules");
        }
      } else if (v->is_array()) {
        c.targets_kind = target_kind::list;
        for (const auto& e : *v) {
          if (!e.is_string()) peft::detail::raise<format_error>(where, source + ": target_modules entries must be strings");
          c.target_modules.push_back(e.get<std::string>());
        }
      } else {
        peft::detail::raise<format_error>(where, source + ": 'target_modules' must be a string or a list");
      }
    }
    if (const auto* v = field("modules_to_save")) {
      if (!v->is_array()) peft::detail::raise<format_error>(where, source + ": 'modules_to_save' must be a list");
      for (const auto& e : *v) {
        if (!e.is_string()) peft::detail::raise<format_error>(where, source + ": modules_to_save entries must be strings");
        c.modules_to_save.push_back(e.get<std::string>());
      }
    }
    if (const auto* v = field("exclude_modules")) {
      if (v->is_string()) {
        c.exclude_is_regex = true;
        c.exclude_modules = {v->get<std::string>()};
        compile(c.exclude_modules.front(), where, source + ": exclude_modules");
      } else if (v->is_array()) {
        for (const auto& e : *v) {
          if (!e.is_string()) peft::detail::raise<format_error>(where, source + ": exclude_modules entries must be strings");
          c.exclude_modules.push_back(e.get<std::string>());
        }
      } else {
        peft::detail::raise<format_error>(where, source + ": 'exclude_modules' must be a string or a list");
      }
    }
    if (const auto* v = field("layers_to_transform")) {
      auto layer = [&](const ordered_json& e) {
        if (!e.is_number_integer()) {
          peft::detail::raise<format_error>(where, source + ": 'layers_to_transform' must be an integer or a list of integers");
        }
        c.layers_to_transform.push_back(e.get<long long>());
      };
      if (v->is_array()) {
        for (const auto& e : *v) layer(e);
      } else {
        layer(*v);
      }
    }
    if (const auto* v = field("layers_pattern")) {
      if (v->is_string()) {
        if (!v->get<std::string>().empty()) c.layers_pattern = {v->get<std::string>()};
      } else if (v->is_array()) {
        for (const auto& e : *v) {
          if (!e.is_string()) peft::detail::raise<format_error>(where, source + ": layers_pattern entries must be strings");
          c.layers_pattern.push_back(e.get<std::string>());
        }
      } else {
        peft::detail::raise<format_error>(where, source + ": 'layers_pattern' must be a string or a list");
      }
      for (const auto& k : c.layers_pattern) compile(k, where, source + ": layers_pattern");
    }
    for (const auto& [k, val] : c.rank_pattern) compile(k, where, source + ": rank_pattern key");
    for (const auto& [k, val] : c.alpha_pattern) compile(k, where, source + ": alpha_pattern key");
    return c;
  }

  /// Reads `path`, or `path`/adapter_config.json when `path` is a directory.
  static adapter_config load(const std::filesystem::path& path) {
    const auto file = std::filesystem::is_directory(path) ? path / "adapter_config.json" : path;
    std::ifstream in(file, std::ios::binary);
    if (!in) peft::detail::raise<io_error>("adapter_config::load", "cannot open " + file.string());
    std::ostringstream ss;
    ss << in.rdbuf();
    return parse(ss.str(), file.string());
  }

  /// A config nobody has filled: default-constructed (not read from a file, not made by lora()).
  /// Saving into one takes r and alpha from the first module instead of adding patterns.
  bool fresh() const { return raw.empty() && targets_kind == target_kind::none && rank_pattern.empty() && alpha_pattern.empty(); }

  // ---- typed readers and writers of any field, shared by every method's codec -------------
  // Readers return the fallback when the field is absent or null and throw format_error
  // "[where] adapter_config.json: 'name' must be ..." when it has another type.

  /// The field, or nullptr when it is absent or null.
  const ordered_json* field(std::string_view name) const {
    const auto it = raw.find(name);
    return (it == raw.end() || it->is_null()) ? nullptr : &*it;
  }
  double number(std::string_view name, double fallback, const char* where) const {
    const auto* v = field(name);
    if (v == nullptr) return fallback;
    if (!v->is_number()) type_error(where, name, "a number");
    return v->get<double>();
  }
  long long integer(std::string_view name, long long fallback, const char* where) const {
    const auto* v = field(name);
    if (v == nullptr) return fallback;
    if (!v->is_number_integer()) type_error(where, name, "an integer");
    return v->get<long long>();
  }
  bool boolean(std::string_view name, bool fallback, const char* where) const {
    const auto* v = field(name);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) type_error(where, name, "true or false");
    return v->get<bool>();
  }
  /// Writes a number as PEFT would: an integral value as an integer (8, not 8.0).
  void set_number(std::string_view name, double v) { raw[std::string(name)] = json_number(v); }
  /// Sets the field unless it is present and not null.
  void set_default(std::string_view name, ordered_json v) {
    if (field(name) == nullptr) raw[std::string(name)] = std::move(v);
  }
  /// An alpha for a module: alpha_pattern first, else `fallback` (the method's own alpha field).
  double pattern_alpha(const std::string& module, double fallback) const {
    for (const auto& [k, v] : alpha_pattern) {
      if (pattern_matches(k, module)) return v;
    }
    return fallback;
  }
  static ordered_json json_number(double v) {
    return v == std::floor(v) && std::abs(v) < 1e15 ? ordered_json(static_cast<long long>(v)) : ordered_json(v);
  }

  /// PEFT's rank for a module path (rank_pattern first).
  index rank_for(const std::string& module) const {
    for (const auto& [k, v] : rank_pattern) {
      if (pattern_matches(k, module)) return v;
    }
    return r;
  }
  /// PEFT's lora_alpha for a module path (alpha_pattern first).
  double alpha_for(const std::string& module) const {
    for (const auto& [k, v] : alpha_pattern) {
      if (pattern_matches(k, module)) return v;
    }
    return lora_alpha;
  }
  /// Whether target_modules selects this module path (none: false; all-linear: true).
  bool targets(const std::string& module) const {
    switch (targets_kind) {
      case target_kind::none: return false;
      case target_kind::all_linear: return true;
      case target_kind::regex:
        return std::regex_match(module, compile(target_modules.front(), "adapter_config::targets", "target_modules"));
      case target_kind::list:
        for (const auto& t : target_modules) {
          if (module == t || (module.size() > t.size() && module.ends_with(t) &&
                              module[module.size() - t.size() - 1] == '.')) {
            return true;
          }
        }
        return false;
    }
    return false;
  }
  /// PEFT's whole module-selection rule (check_target_module_exists): "" when the config selects
  /// the module path, else the field that leaves it out: "exclude_modules" (a list entry equal to
  /// the path or its last dotted components, or a regex matching the whole path),
  /// "modules_to_save" (such a module is never adapted), "target_modules" (also when it is
  /// absent), or "layers_to_transform" (matched through target_modules' last components — an
  /// entry equal to the whole path or a regex bypasses it, as in PEFT — and the module's layer
  /// index, its first `<pattern>.<digits>.` for a layers_pattern entry, without layers_pattern the
  /// first numbered path component after the second, is not listed or not found).
  std::string_view unselected_by(const std::string& module) const {
    auto tail_is = [&](const std::string& k) {
      return module == k || (module.size() > k.size() && module.ends_with(k) && module[module.size() - k.size() - 1] == '.');
    };
    if (exclude_is_regex) {
      if (std::regex_match(module, compile(exclude_modules.front(), "adapter_config::unselected_by", "exclude_modules"))) {
        return "exclude_modules";
      }
    } else {
      for (const auto& k : exclude_modules) {
        if (tail_is(k)) return "exclude_modules";
      }
    }
    if (saves_module(module)) return "modules_to_save";
    switch (targets_kind) {
      case target_kind::none: return "target_modules";
      case target_kind::regex: return targets(module) ? "" : "target_modules";
      case target_kind::list:
        if (std::find(target_modules.begin(), target_modules.end(), module) != target_modules.end()) return "";
        if (!targets(module)) return "target_modules";
        break;
      case target_kind::all_linear: break;  // PEFT expands it into names: the layer rule applies
    }
    if (layers_to_transform.empty()) return "";
    const auto idx = layer_index(module);
    if (!idx || std::find(layers_to_transform.begin(), layers_to_transform.end(), *idx) == layers_to_transform.end()) {
      return "layers_to_transform";
    }
    return "";
  }
  /// unselected_by(module) is "".
  bool selects(const std::string& module) const { return unselected_by(module).empty(); }
  /// The layer index PEFT reads from a module path for layers_to_transform (see unselected_by).
  std::optional<long long> layer_index(const std::string& module) const {
    // Dotted components and where each starts.
    std::vector<std::size_t> start{0};
    for (std::size_t i = 0; i < module.size(); ++i) {
      if (module[i] == '.') start.push_back(i + 1);
    }
    auto component = [&](std::size_t j) {
      const std::size_t end = j + 1 < start.size() ? start[j + 1] - 1 : module.size();
      return std::string_view(module).substr(start[j], end - start[j]);
    };
    auto digits = [](std::string_view c) {
      return !c.empty() && std::all_of(c.begin(), c.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
    };
    auto number = [&](std::size_t j) -> std::optional<long long> {
      const auto c = component(j);
      if (c.size() > 18) return std::nullopt;
      return std::stoll(std::string(c));
    };
    if (layers_pattern.empty()) {
      // PEFT: re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
      for (std::size_t j = 2; j + 1 < start.size(); ++j) {
        if (digits(component(j))) return number(j);
      }
      return std::nullopt;
    }
    // PEFT: re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key), patterns in order; the
    // earliest start wins (exact for literal patterns, the ones used in practice).
    for (const auto& p : layers_pattern) {
      const auto re = compile(p, "adapter_config::layer_index", "layers_pattern");
      for (std::size_t i = 0; i < start.size(); ++i) {
        for (std::size_t j = i + 1; j + 1 < start.size(); ++j) {
          if (digits(component(j)) &&
              std::regex_match(module.begin() + static_cast<std::ptrdiff_t>(start[i]),
                               module.begin() + static_cast<std::ptrdiff_t>(start[j] - 1), re)) {
            return number(j);
          }
        }
      }
    }
    return std::nullopt;
  }
  /// Makes the config select exactly `modules` (full paths in target_modules, no exclusion, no
  /// layer rule): what saving does when exclude_modules or layers_to_transform would leave out a
  /// saved module, so that PEFT loads every tensor saved.
  void select_exactly(const std::vector<std::string>& modules) {
    targets_kind = target_kind::list;
    target_modules = modules;
    exclude_modules.clear();
    exclude_is_regex = false;
    layers_to_transform.clear();
    layers_pattern.clear();
    for (const char* k : {"exclude_modules", "layers_to_transform", "layers_pattern"}) {
      if (raw.contains(k)) raw[k] = nullptr;
    }
  }
  /// Whether the module path lies inside a modules_to_save module (PEFT's rule).
  bool saves_module(const std::string& module) const {
    for (const auto& m : modules_to_save) {
      if (module == m || module.ends_with("." + m) || module.starts_with(m + ".") ||
          module.find("." + m + ".") != std::string::npos) {
        return true;
      }
    }
    return false;
  }
  /// target_modules as written: the list, the regex, or "all-linear".
  std::string targets_string() const {
    switch (targets_kind) {
      case target_kind::none: return "(none)";
      case target_kind::all_linear: return "all-linear";
      case target_kind::regex: return "regex " + target_modules.front();
      case target_kind::list: {
        std::string s;
        for (const auto& t : target_modules) {
          if (!s.empty()) s += ", ";
          s += t;
        }
        return s;
      }
    }
    return {};
  }

  /// The JSON document: the fields read, updated from the members, PEFT's defaults added for a
  /// config built in C++.
  ordered_json to_json() const {
    ordered_json j = raw;
    if (!j.is_object()) j = ordered_json::object();
    auto set_default = [&](const char* k, ordered_json v) {
      if (!j.contains(k)) j[k] = std::move(v);
    };
    set_default("base_model_name_or_path", nullptr);
    set_default("inference_mode", true);
    set_default("revision", nullptr);
    set_default("task_type", nullptr);
    j["peft_type"] = peft_type;
    // Which of LoRA's fields a method's PEFT config class takes: all of them for LORA and
    // ADALORA (AdaLoraConfig extends LoraConfig; its rank_pattern holds masks, kept in `raw`),
    // r and the rank/alpha patterns for the LyCORIS methods (LOHA, LOKR); r for every other
    // config class that has one (every method's but those of no_rank_types: IA3, BOFT, C3A, ROAD,
    // FOURIERFT, BEFT, WAVEFT, FROD; SUPERTUNING's only when not null). Other method-specific fields stay as read: adapters' describe_in edit `raw`.
    const bool lora_fields = peft_type == "LORA" || peft_type == "ADALORA";
    const bool pattern_fields = peft_type == "LORA" || peft_type == "LOHA" || peft_type == "LOKR";
    const bool has_r = std::find(std::begin(no_rank_types), std::end(no_rank_types), peft_type) == std::end(no_rank_types);
    if (peft_type == "SUPERTUNING") {
      // SupertuningConfig's r is null without the LoRA part (Super alone): written only when set.
      if (j.contains("r") && !j["r"].is_null()) j["r"] = r;
    } else if (has_r || j.contains("r")) {
      j["r"] = r;
    }
    if (peft_type == "LORA") {
      set_default("bias", "none");
      set_default("init_lora_weights", true);
      set_default("layers_pattern", nullptr);
      set_default("layers_to_transform", nullptr);
    }
    if (lora_fields) {
      j["lora_alpha"] = json_number(lora_alpha);
      j["lora_dropout"] = lora_dropout;
      j["use_rslora"] = use_rslora;
      j["use_dora"] = use_dora;
      j["lora_bias"] = lora_bias;
      j["fan_in_fan_out"] = fan_in_fan_out;
    }
    if (pattern_fields) {
      ordered_json rp = ordered_json::object();
      for (const auto& [k, v] : rank_pattern) rp[k] = v;
      j["rank_pattern"] = rp;
      ordered_json ap = ordered_json::object();
      for (const auto& [k, v] : alpha_pattern) ap[k] = v;
      j["alpha_pattern"] = ap;
    }
    switch (targets_kind) {
      case target_kind::none: j["target_modules"] = nullptr; break;
      case target_kind::all_linear: j["target_modules"] = "all-linear"; break;
      case target_kind::regex: j["target_modules"] = target_modules.front(); break;
      case target_kind::list: j["target_modules"] = target_modules; break;
    }
    if (modules_to_save.empty()) {
      set_default("modules_to_save", nullptr);
    } else {
      j["modules_to_save"] = modules_to_save;
    }
    return j;
  }

  /// PEFT's pattern rule: `(.*\.)?(key)$` matched from the start of the module path.
  static bool pattern_matches(const std::string& key, const std::string& module) {
    return std::regex_match(module, compile("(.*\\.)?(" + key + ")", "adapter_config::pattern_matches", "pattern"));
  }

 private:
  [[noreturn]] static void type_error(const char* where, std::string_view name, const char* what) {
    std::string m = "adapter_config.json: '";
    m += name;
    m += "' must be ";
    m += what;
    peft::detail::raise<format_error>(where, m);
  }
  static std::regex compile(const std::string& pattern, const char* where, const std::string& what) {
    try {
      return detail::module_regex(pattern);
    } catch (const std::regex_error& e) {
      peft::detail::raise<format_error>(where, what + " '" + pattern + "' is not a valid regex: " + e.what());
    }
  }
};

}  // namespace peft::io
