// peft/io/peft/gralora.hpp — GraLoRA in PEFT checkpoints: peft_type "GRALORA"; tensors gralora_A
// (k, in / k, r), gralora_B (k, r, out / k) (no ".weight") and, with hybrid_r > 0,
// gralora_A_general.weight (hybrid_r, in), gralora_B_general.weight (out, hybrid_r); fields r,
// alpha, gralora_k, hybrid_r (one value each for every module: GraloraConfig has no patterns),
// fan_in_fan_out (the loader's), gralora_dropout (training only).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/gralora.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<gralora<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "GRALORA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  /// gralora_dropout drops x's entries before the adapter in training only (the identity in
  /// eval), so a loaded adapter's outputs do not depend on it; peft-cpp trains without it.
  static constexpr std::string_view config_fields[] = {"r",        "alpha",          "gralora_k",
                                                       "hybrid_r", "fan_in_fan_out", "gralora_dropout"};
  static std::vector<std::string_view> module_tensors() {
    return {"gralora_A", "gralora_B", "gralora_A_general.weight", "gralora_B_general.weight"};
  }

  /// The config's numbers with PEFT's defaults (r 32, alpha 64, gralora_k 2, hybrid_r 0).
  static long long r_of(const adapter_config& c, const char* where) { return c.field("r") ? c.r : c.integer("r", 32, where); }
  static double alpha_of(const adapter_config& c, const char* where) { return c.number("alpha", 64.0, where); }
  static long long k_of(const adapter_config& c, const char* where) { return c.integer("gralora_k", 2, where); }
  static long long hybrid_of(const adapter_config& c, const char* where) { return c.integer("hybrid_r", 0, where); }

  /// The adapter of one module: shapes from the tensors, checked against r, gralora_k and hybrid_r.
  static gralora<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                    const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "gralora::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const long long r = r_of(c, where), k = k_of(c, where), hr = hybrid_of(c, where);
    if (k < 1 || r < 1 || hr < 0 || r % k != 0) {
      peft::detail::raise<format_error>(where, "adapter_config.json: r = " + std::to_string(r) + ", gralora_k = " +
                                                   std::to_string(k) + ", hybrid_r = " + std::to_string(hr) +
                                                   ": PEFT needs r >= 1, gralora_k >= 1 dividing r, hybrid_r >= 0");
    }
    const auto& sa = m.shape("gralora_A", 3);
    const auto& sb = m.shape("gralora_B", 3);
    if (sa[0] != k || sb[0] != k || sa[2] != r || sb[1] != r || sa[1] < 1 || sb[2] < 1) {
      peft::detail::raise<format_error>(where, mod + ": gralora_A " + detail::shape_text(sa) + " and gralora_B " +
                                                   detail::shape_text(sb) + " are not (k, in / k, r) and (k, r, out / k) "
                                                   "with the config's gralora_k = " + std::to_string(k) +
                                                   " and r = " + std::to_string(r));
    }
    const auto in = static_cast<index>(sa[0] * sa[1]), out = static_cast<index>(sb[0] * sb[2]);
    const bool has_general = m.contains("gralora_A_general.weight") || m.contains("gralora_B_general.weight");
    if (has_general != (hr > 0)) {
      peft::detail::raise<format_error>(where, mod + (hr > 0 ? " has no gralora_A_general / gralora_B_general although "
                                                               "hybrid_r = " + std::to_string(hr)
                                                             : " has gralora_A_general / gralora_B_general although "
                                                               "hybrid_r = 0"));
    }
    matrix<T> ag, bg;
    if (hr > 0) {
      ag = m.copy("gralora_A_general.weight", {hr, in});
      bg = m.copy("gralora_B_general.weight", {out, hr});
    }
    return gralora<T>(in, out, static_cast<index>(r), m.copy("gralora_A"), m.copy("gralora_B"), std::move(ag),
                      std::move(bg), alpha_of(c, where));
  }

  /// Makes `c` describe this module: peft_type GRALORA with r, alpha, gralora_k, hybrid_r.
  /// unsupported_error when they differ from the values another module wrote (GraloraConfig has
  /// one of each for every module).
  static void describe_in(const gralora<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "gralora::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "GRALORA") {
      c.peft_type = "GRALORA";
      c.r = a.rank();
      c.raw["r"] = a.rank();
      c.set_number("alpha", a.alpha());
      c.raw["gralora_k"] = a.k();
      c.raw["hybrid_r"] = a.hybrid_rank();
    }
    const double tol = 8.0 * std::numeric_limits<double>::epsilon() * std::max(1.0, std::abs(a.alpha()));
    auto differs = [&](const char* field, const std::string& mine, const std::string& theirs) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' has " + field + " = " + mine +
                                                        " but the config says " + theirs +
                                                        "; PEFT's GraloraConfig has one value for every module");
    };
    if (c.r != a.rank()) differs("r", std::to_string(a.rank()), std::to_string(c.r));
    if (k_of(c, where) != a.k()) differs("gralora_k", std::to_string(a.k()), std::to_string(k_of(c, where)));
    if (hybrid_of(c, where) != a.hybrid_rank()) {
      differs("hybrid_r", std::to_string(a.hybrid_rank()), std::to_string(hybrid_of(c, where)));
    }
    if (std::abs(alpha_of(c, where) - a.alpha()) > tol) {
      differs("alpha", std::to_string(a.alpha()), std::to_string(alpha_of(c, where)));
    }
    c.set_default("gralora_dropout", 0.0);
    c.set_default("init_weights", true);
    c.set_default("bias", "none");
  }
};

}  // namespace peft::io
