// peft/io/peft/deft.hpp — DeFT in PEFT checkpoints: peft_type "DEFT"; tensors deft_P (out, r)
// and deft_R (r, in) (none with para; no ".weight"); fields r (capped at out_features as PEFT
// does), decomposition_method ("relu" or "qr"), alpha (s = alpha / r; null or 0: 1), para,
// fan_in_fan_out (the loader's), and the training or initialisation only deft_dropout,
// init_scale and init_weights.
#pragma once

#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/deft.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<deft<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "DEFT"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  /// deft_dropout drops x's entries before the injection term in training only (the identity in
  /// eval); init_scale is R's initial spread: a loaded adapter's outputs depend on neither.
  static constexpr std::string_view config_fields[] = {"r",    "decomposition_method", "alpha",        "para",
                                                       "fan_in_fan_out", "deft_dropout", "init_scale"};
  static std::vector<std::string_view> module_tensors() { return {"deft_P", "deft_R"}; }

  /// decomposition_method (PEFT's default "relu"); unsupported_error naming it otherwise.
  static deft_projection projection_of(const adapter_config& c, const char* where) {
    const auto* v = c.field("decomposition_method");
    if (v == nullptr) return deft_projection::relu;
    if (!v->is_string()) {
      peft::detail::raise<format_error>(where, "adapter_config.json: 'decomposition_method' must be a string");
    }
    const auto s = v->get<std::string>();
    if (s == "relu") return deft_projection::relu;
    if (s == "qr") return deft_projection::qr;
    peft::detail::raise<unsupported_error>(where, "adapter_config.json: 'decomposition_method' = \"" + s +
                                                      "\": PEFT's DeFT knows \"relu\" and \"qr\" only");
  }

  /// The adapter of one module: r = min(config r, out_features) must be deft_P's width; deft_R
  /// present exactly when para is false.
  static deft<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "deft::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const deft_projection proj = projection_of(c, where);
    const bool para = c.boolean("para", false, where);
    const double alpha = c.number("alpha", 0.0, where);
    const long long config_r = c.field("r") != nullptr ? c.integer("r", 8, where) : 8;  // DeftConfig's default 8
    if (config_r < 1) peft::detail::raise<format_error>(where, "adapter_config.json: 'r' must be >= 1, got " + std::to_string(config_r));
    const auto& sp = m.shape("deft_P", 2);
    if (sp[0] < 1 || sp[1] < 1) {
      peft::detail::raise<format_error>(where, mod + ": deft_P is " + detail::shape_text(sp) + ", not (out, r)");
    }
    const long long r = std::min<long long>(config_r, sp[0]);
    if (sp[1] != r) {
      peft::detail::raise<format_error>(where, mod + " has rank " + std::to_string(sp[1]) + " (deft_P " +
                                                   detail::shape_text(sp) + ") but adapter_config.json gives r = " +
                                                   std::to_string(config_r) + " (min(r, out_features) = " +
                                                   std::to_string(r) + ")");
    }
    index in = 0;
    if (para) {
      if (m.contains("deft_R")) {
        peft::detail::raise<format_error>(where, mod + " has deft_R but adapter_config.json says para = true (PaRa has no R)");
      }
    } else {
      if (!m.contains("deft_R")) {
        peft::detail::raise<format_error>(where, mod + " has no tensor 'deft_R' but adapter_config.json says para = false");
      }
      const auto& sr = m.shape("deft_R", 2);
      if (sr[0] != sp[1] || sr[1] < 1) {
        peft::detail::raise<format_error>(where, mod + ": deft_R " + detail::shape_text(sr) + " and deft_P " +
                                                     detail::shape_text(sp) + " are not (r, in) and (out, r)");
      }
      in = static_cast<index>(sr[1]);
    }
    if (const auto& shape = m.base_shape()) {
      const auto [out, base_in] = *shape;
      if (sp[0] != out || (!para && in != base_in)) {
        peft::detail::raise<format_error>(where, mod + ": deft_P " + detail::shape_text(sp) +
                                                     (para ? std::string() : " and deft_R " + detail::shape_text(m.shape("deft_R", 2))) +
                                                     " do not fit the base's " + peft::detail::shape_string(out, base_in));
      }
      in = base_in;
    }
    return deft<T>(m.copy("deft_P"), para ? matrix<T>() : m.copy("deft_R"), proj, alpha, in);
  }

  /// Makes `c` describe this module: peft_type DEFT, r, decomposition_method, alpha, para and
  /// PEFT's defaults for the rest. unsupported_error for a module PEFT could not rebuild from
  /// one config (another r, projection, alpha or para than the first module's).
  static void describe_in(const deft<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "deft::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    const char* method = a.projection() == deft_projection::qr ? "qr" : "relu";
    if (c.peft_type != "DEFT") {
      const ordered_json keep = c.raw;
      c.raw = ordered_json::object();
      for (const char* k : {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                            "modules_to_save", "base_model_name_or_path", "revision", "task_type", "inference_mode",
                            "fan_in_fan_out"}) {
        if (keep.contains(k)) c.raw[k] = keep[k];
      }
      c.peft_type = "DEFT";
      c.r = a.rank();
      c.rank_pattern.clear();
      c.alpha_pattern.clear();
      c.raw["r"] = a.rank();
      c.raw["decomposition_method"] = method;
      c.raw["alpha"] = a.alpha() != 0 ? adapter_config::json_number(a.alpha()) : ordered_json(nullptr);
      c.raw["para"] = a.para();
    }
    const deft_projection proj = projection_of(c, where);
    const bool para = c.boolean("para", false, where);
    const double alpha = c.number("alpha", 0.0, where);
    const index r = c.field("r") != nullptr ? c.r : 8;
    const bool rank_ok = a.rank() == std::min(r, a.out_features());
    if (!rank_ok || proj != a.projection() || para != a.para() || alpha != a.alpha()) {
      peft::detail::raise<unsupported_error>(
          where, "module '" + module + "' (rank " + std::to_string(a.rank()) + ", " + method + ", alpha " +
                     std::to_string(a.alpha()) + (a.para() ? ", para" : "") +
                     ") differs from the config's r / decomposition_method / alpha / para: PEFT's DeftConfig has one "
                     "of each for every module (no rank_pattern), so it could not load it");
    }
    c.set_default("decomposition_method", "relu");
    c.set_default("init_scale", 1.0);
    c.set_default("alpha", nullptr);
    c.set_default("para", false);
    c.set_default("fan_in_fan_out", false);
    c.set_default("deft_dropout", 0.0);
    c.set_default("init_weights", true);
    c.set_default("bias", "none");
  }
};

}  // namespace peft::io
