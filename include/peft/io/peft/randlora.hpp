// peft/io/peft/randlora.hpp — RandLoRA in PEFT checkpoints: peft_type "RANDLORA"; per module
// randlora_lambda, randlora_gamma (and PEFT's per-module copies of the bases, checked equal to the
// shared ones and dropped); shared base_model.randlora_A, base_model.randlora_B; fields r,
// randlora_alpha, save_projection (false is refused: the bases would come from PyTorch's RNG).
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/randlora.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<randlora<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "RANDLORA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view config_fields[] = {"r",      "projection_prng_key", "save_projection", "sparse",
                                                       "very_sparse", "fan_in_fan_out", "randlora_alpha"};
  /// Per-module names: the trainable vectors and PEFT's per-module copies of the bases.
  static std::vector<std::string_view> module_tensors() {
    return {"randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"};
  }
  static std::vector<std::string_view> shared_tensors() { return {"randlora_A", "randlora_B"}; }

  /// The adapter of one module: the bases referenced from `shared` (the same objects for every
  /// module), lambda and gamma copied; the module's copies of the bases, when present, must equal
  /// the shared ones. in = min(in, out), out = randlora_B's height until set_features is called.
  /// unsupported_error for save_projection=false, format_error for inconsistent shapes or copies.
  static randlora<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                  const checkpoint_tensors<T>& shared) {
    constexpr const char* where = "randlora::from_checkpoint";
    if (!c.boolean("save_projection", true, where)) {
      peft::detail::raise<unsupported_error>(
          where, "the adapter was saved with save_projection=false: randlora_A and randlora_B are not in the "
                 "checkpoint, and PEFT regenerates them from projection_prng_key with PyTorch's random generator, "
                 "which peft-cpp does not reproduce; load the adapter in PEFT and save it again with "
                 "save_projection=True");
    }
    if (!shared.contains("randlora_A") || !shared.contains("randlora_B")) {
      peft::detail::raise<format_error>(where, "the checkpoint has no base_model.randlora_A / base_model.randlora_B "
                                         "although save_projection is true");
    }
    const auto& sa = shared.shape("randlora_A", 3);
    const auto& sb = shared.shape("randlora_B", 3);
    if (sa[0] < 1 || sa[1] != 1 || sa[2] < 1) {
      peft::detail::raise<format_error>(where, "randlora_A is " + detail::shape_text(sa) + ", expected [r, 1, min_dim]");
    }
    if (sb[2] != sa[0] || sb[0] < sa[2] || sb[1] < 1) {
      peft::detail::raise<format_error>(where, "randlora_B " + detail::shape_text(sb) + " and randlora_A " +
                                             detail::shape_text(sa) + " do not fit [max_dim, nb, r] and [r, 1, min_dim]");
    }
    const index r = static_cast<index>(sa[0]);
    if (c.raw.contains("r") && c.r != r) {
      peft::detail::raise<format_error>(where, "randlora_A has rank " + std::to_string(r) +
                                             " but adapter_config.json gives r = " + std::to_string(c.r));
    }
    for (const char* name : {"randlora_A", "randlora_B"}) {
      if (!m.contains(name)) continue;
      if (m.get(name).shape != shared.get(name).shape ||
          m.shared(name)->storage() != shared.shared(name)->storage()) {
        peft::detail::raise<format_error>(where, "module '" + m.module() + "': its copy of " + name +
                                               " differs from base_model." + name +
                                               " (PEFT saves one buffer under both keys, so they must be equal)");
      }
    }
    const auto& sl = m.shape("randlora_lambda", 2);
    const auto& sg = m.shape("randlora_gamma", 2);
    const std::string mod = "module '" + m.module() + "': ";
    if (sl[0] != r || sl[1] != sg[0]) {
      peft::detail::raise<format_error>(where, mod + "randlora_lambda " + detail::shape_text(sl) + " and randlora_gamma " +
                                             detail::shape_text(sg) + " do not fit rank " + std::to_string(r) +
                                             " (expected [r, nb] and [nb, min(in, out)])");
    }
    const index nb = static_cast<index>(sg[0]), mn = static_cast<index>(sg[1]);
    if (mn < 1 || mn > static_cast<index>(sa[2]) || nb != randlora_num_bases(mn, r) || nb > static_cast<index>(sb[1])) {
      peft::detail::raise<format_error>(where, mod + "randlora_gamma " + detail::shape_text(sg) + " does not fit the bases " +
                                             detail::shape_text(sa) + " / " + detail::shape_text(sb) +
                                             " (num_bases must be ceil(min(in, out) / r))");
    }
    const double alpha = c.number("randlora_alpha", 640.0, where);
    return randlora<T>(shared.shared("randlora_A"), shared.shared("randlora_B"), mn, static_cast<index>(sb[0]), alpha,
                    m.copy("randlora_lambda"), m.copy("randlora_gamma"));
  }

  /// Makes `c` describe this module when saving: peft_type RANDLORA, r, randlora_alpha = s r,
  /// save_projection true (the bases are always written).
  static void describe_in(const randlora<T>& a, adapter_config& c, const std::string& /*module*/) {
    c.peft_type = "RANDLORA";
    c.r = a.rank();
    const double alpha = static_cast<double>(a.scale()) * static_cast<double>(a.rank());
    const double rounded = std::round(alpha);
    // PEFT declares randlora_alpha an int; keep an integer when the scale gives one.
    const bool integral = std::abs(alpha - rounded) <= 1e-6 * std::max(1.0, std::abs(alpha)) && std::abs(rounded) < 1e15;
    c.raw["randlora_alpha"] = integral ? ordered_json(static_cast<long long>(rounded)) : ordered_json(alpha);
    c.raw["save_projection"] = true;
    for (const char* k : {"sparse", "very_sparse"}) {
      if (!c.raw.contains(k)) c.raw[k] = false;
    }
    if (!c.raw.contains("projection_prng_key")) c.raw["projection_prng_key"] = 0;
    if (!c.raw.contains("randlora_dropout")) c.raw["randlora_dropout"] = 0.0;
  }
};

}  // namespace peft::io
