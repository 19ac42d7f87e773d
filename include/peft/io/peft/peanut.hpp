// peft/io/peft/peanut.hpp — PEANuT in PEFT checkpoints: peft_type "PEANUT"; tensors
// peanut_A.weight (r, out), peanut_encoders.<i>.weight and peanut_decoders.<i>.weight (r, r),
// i < depth, peanut_B.weight (out, r); fields r, depth, act_fn (a closed-form transformers
// activation, others refused by name), scaling, and the initialisation-only init_weights.
// PEFT's PeanutConfig has no rank_pattern: every module has the config's r and depth.
#pragma once

#include <array>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/peanut.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

namespace detail {

/// The deepest encoder / decoder chain the loader reads (its tensor names are listed up front).
inline constexpr std::size_t peanut_max_depth = 256;

/// "peanut_encoders.<i>.weight" and "peanut_decoders.<i>.weight" for i < peanut_max_depth.
inline const std::vector<std::string>& peanut_chain_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    n.reserve(2 * peanut_max_depth);
    for (std::size_t i = 0; i < peanut_max_depth; ++i) {
      n.push_back("peanut_encoders." + std::to_string(i) + ".weight");
      n.push_back("peanut_decoders." + std::to_string(i) + ".weight");
    }
    return n;
  }();
  return names;
}

}  // namespace detail

template <compute_scalar T>
struct peft_codec<peanut<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "PEANUT"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view config_fields[] = {"r", "depth", "act_fn", "scaling"};
  static std::vector<std::string_view> module_tensors() {
    std::vector<std::string_view> t = {"peanut_A.weight", "peanut_B.weight"};
    for (const auto& n : detail::peanut_chain_names()) t.emplace_back(n);
    return t;
  }

  /// act_fn (PEFT's default "relu"); format_error for a non-string, unsupported_error naming it
  /// for an activation this library does not compute.
  static std::string act_fn_of(const adapter_config& c, const char* where) {
    const auto* v = c.field("act_fn");
    if (v == nullptr || v->is_null()) return "relu";
    if (!v->is_string()) peft::detail::raise<format_error>(where, "adapter_config.json: 'act_fn' must be a string");
    const auto s = v->get<std::string>();
    if (!peanut_activation_of(s)) {
      peft::detail::raise<unsupported_error>(where, "adapter_config.json: 'act_fn' = \"" + s +
                                                        "\" is not one of the closed-form activations computed here (" +
                                                        std::string(peanut_activation_names) + ")");
    }
    return s;
  }
  /// depth (PEFT's default 0); format_error when negative or deeper than the loader reads.
  static index depth_of(const adapter_config& c, const char* where) {
    const long long d = c.integer("depth", 0, where);
    if (d < 0 || d > static_cast<long long>(detail::peanut_max_depth)) {
      peft::detail::raise<format_error>(where, "adapter_config.json: 'depth' = " + std::to_string(d) +
                                                   " is outside [0, " + std::to_string(detail::peanut_max_depth) + "]");
    }
    return static_cast<index>(d);
  }
  static index rank_of(const adapter_config& c, const char* where) {
    return c.field("r") != nullptr ? static_cast<index>(c.integer("r", 32, where)) : 32;  // PeanutConfig's default 32
  }

  /// The adapter of one module: A (r, out) with the config's r, exactly depth encoders and
  /// decoders (r, r), B (out, r); out_features checked against the base when the loader knows it.
  static peanut<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                   const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "peanut::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const std::string act = act_fn_of(c, where);
    const index depth = depth_of(c, where);
    const double scaling = c.number("scaling", 1.0, where);
    const index r = rank_of(c, where);
    if (r < 1) peft::detail::raise<format_error>(where, "adapter_config.json: 'r' must be >= 1, got " + std::to_string(r));
    const auto& sa = m.shape("peanut_A.weight", 2);
    if (sa[0] != r || sa[1] < 1) {
      peft::detail::raise<format_error>(where, mod + ": peanut_A.weight is " + peft::detail::shape_text(sa) +
                                                   ", expected (r, out_features) with r = " + std::to_string(r) +
                                                   " (adapter_config.json)");
    }
    const auto out = static_cast<index>(sa[1]);
    matrix<T> b = m.copy("peanut_B.weight", {out, r});
    std::vector<matrix<T>> enc, dec;
    for (index i = 0; i < depth; ++i) {
      const std::string e = "peanut_encoders." + std::to_string(i) + ".weight";
      const std::string d = "peanut_decoders." + std::to_string(i) + ".weight";
      for (const auto* n : {&e, &d}) {
        if (!m.contains(*n)) {
          peft::detail::raise<format_error>(where, mod + " has no tensor '" + *n + "' but adapter_config.json gives depth = " +
                                                       std::to_string(depth));
        }
      }
      enc.push_back(m.copy(e, {r, r}));
      dec.push_back(m.copy(d, {r, r}));
    }
    for (const auto& [name, t] : m.all()) {
      (void)t;
      if (name == "peanut_A.weight" || name == "peanut_B.weight") continue;
      bool used = false;
      for (index i = 0; i < depth && !used; ++i) {
        used = name == "peanut_encoders." + std::to_string(i) + ".weight" ||
               name == "peanut_decoders." + std::to_string(i) + ".weight";
      }
      if (!used) {
        peft::detail::raise<format_error>(where, mod + " has tensor '" + name + "' but adapter_config.json gives depth = " +
                                                     std::to_string(depth));
      }
    }
    index in = 0;
    if (const auto& shape = m.base_shape()) {
      if (shape->first != out) {
        peft::detail::raise<format_error>(where, mod + ": peanut_A.weight " + peft::detail::shape_text(sa) +
                                                     " does not fit the base's " +
                                                     peft::detail::shape_string(shape->first, shape->second));
      }
      in = shape->second;
    }
    return peanut<T>(m.copy("peanut_A.weight"), std::move(enc), std::move(dec), std::move(b), act, scaling, in);
  }

  /// Makes `c` describe this module: peft_type PEANUT, r, depth, act_fn, scaling and PEFT's
  /// defaults for the rest. unsupported_error for a module PEFT could not rebuild from one config
  /// (another r, depth, act_fn or scaling than the config's).
  static void describe_in(const peanut<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "peanut::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "PEANUT") {
      const ordered_json keep = c.raw;
      c.raw = ordered_json::object();
      for (const char* k : {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                            "modules_to_save", "base_model_name_or_path", "revision", "task_type", "inference_mode"}) {
        if (keep.contains(k)) c.raw[k] = keep[k];
      }
      c.peft_type = "PEANUT";
      c.r = a.rank();
      c.rank_pattern.clear();
      c.alpha_pattern.clear();
      c.raw["r"] = a.rank();
      c.raw["depth"] = a.depth();
      c.raw["act_fn"] = a.act_fn();
      c.set_number("scaling", a.scaling());
    }
    const index r = rank_of(c, where);
    const index depth = depth_of(c, where);
    const std::string act = act_fn_of(c, where);
    const double scaling = c.number("scaling", 1.0, where);
    if (a.rank() != r || a.depth() != depth || act != a.act_fn() || scaling != a.scaling()) {
      peft::detail::raise<unsupported_error>(
          where, "module '" + module + "' (rank " + std::to_string(a.rank()) + ", depth " + std::to_string(a.depth()) +
                     ", act_fn " + a.act_fn() + ", scaling " + std::to_string(a.scaling()) +
                     ") differs from the config's r / depth / act_fn / scaling: PEFT's PeanutConfig has one of each "
                     "for every module (no rank_pattern), so it could not load it");
    }
    c.set_default("depth", 0);
    c.set_default("act_fn", "relu");
    c.set_default("scaling", 1.0);
    c.set_default("init_weights", true);
  }
};

}  // namespace peft::io
