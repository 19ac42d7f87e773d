// peft/io/peft/supertuning.hpp — Super-Tuning in PEFT checkpoints: peft_type "SUPERTUNING";
// tensors supertuning_values (K), supertuning_indices (K) int32 (flat indices into W0 (out, in)
// row-major; float accepted when integral), and with r supertuning_lora_A.weight (r, in),
// supertuning_lora_B.weight (out, r); fields sparsity (K = int(out in (1 - sparsity)), checked
// when the layer's shape is known), r (null: no LoRA part), lora_alpha (null: 2 r),
// save_precomputed_indices, select_top, and the training or initialisation only lora_dropout and
// init_weights. A checkpoint saved without its indices (save_precomputed_indices false) is refused:
// PEFT recomputes them at load as torch.topk of |W0|, whose order among equal magnitudes
// (and whose result on a base in another dtype) is not reproducible.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/supertuning.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<supertuning<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "SUPERTUNING"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  /// select_top only chose the indices, which the checkpoint holds.
  static constexpr std::string_view config_fields[] = {"sparsity", "r", "lora_alpha", "save_precomputed_indices",
                                                       "select_top"};
  static std::vector<std::string_view> module_tensors() {
    return {"supertuning_values", "supertuning_indices", "supertuning_lora_A.weight", "supertuning_lora_B.weight"};
  }
  /// supertuning_indices is stored as an integer tensor (I32; I64 and floats are accepted too).
  static bool integer_tensor(std::string_view name) { return name == "supertuning_indices"; }

  /// sparsity (PEFT's default 0.99), format_error outside [0, 1) as PEFT.
  static double sparsity_of(const adapter_config& c, const char* where) {
    const double s = c.number("sparsity", 0.99, where);
    if (!(s >= 0.0 && s < 1.0)) {
      peft::detail::raise<format_error>(where, "adapter_config.json: 'sparsity' must be in [0, 1), got " + std::to_string(s));
    }
    return s;
  }
  /// r (0: null, no LoRA part) and lora_alpha (null: 2 r); format_error for lora_alpha without r.
  static std::pair<index, double> lora_of(const adapter_config& c, const char* where) {
    const index r = c.field("r") != nullptr ? static_cast<index>(c.integer("r", 0, where)) : 0;
    if (c.field("r") != nullptr && r < 1) {
      peft::detail::raise<format_error>(where, "adapter_config.json: 'r' must be a positive integer or null");
    }
    if (r == 0) {
      if (c.field("lora_alpha") != nullptr) {
        peft::detail::raise<format_error>(where, "adapter_config.json: 'lora_alpha' is set but 'r' is null (PEFT "
                                                 "refuses it: the LoRA part needs r)");
      }
      return {0, 0.0};
    }
    return {r, c.number("lora_alpha", 2.0 * static_cast<double>(r), where)};
  }

  static supertuning<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                        const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "supertuning::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const double sparsity = sparsity_of(c, where);
    const auto [r, alpha] = lora_of(c, where);
    const bool saved_indices = c.boolean("save_precomputed_indices", true, where);
    (void)c.boolean("select_top", true, where);
    if (!m.contains("supertuning_indices")) {
      if (!saved_indices) {
        peft::detail::raise<unsupported_error>(
            where, "adapter_config.json: 'save_precomputed_indices' = false and " + mod +
                       " has no supertuning_indices: PEFT recomputes them at load as torch.topk of |W0|, whose order "
                       "among equal magnitudes (and whose result on a base in another dtype) is not reproducible; "
                       "save the adapter with save_precomputed_indices = true");
      }
      peft::detail::raise<format_error>(where, mod + " has no tensor 'supertuning_indices'");
    }
    if (!m.contains("supertuning_values")) peft::detail::raise<format_error>(where, mod + " has no tensor 'supertuning_values'");
    const auto& sv = m.shape("supertuning_values", 1);
    const auto& si = m.shape("supertuning_indices", 1);
    if (si[0] != sv[0] || sv[0] < 1) {
      peft::detail::raise<format_error>(where, mod + ": supertuning_indices is " + detail::shape_text(si) +
                                                   " and supertuning_values " + detail::shape_text(sv) +
                                                   ", expected [K] both with K >= 1");
    }
    const auto& stored = *m.get("supertuning_indices").data;
    std::vector<std::int64_t> idx(static_cast<std::size_t>(stored.size()));
    for (index t = 0; t < stored.cols(); ++t) {
      const double v = static_cast<double>(stored(0, t));
      if (!(v >= 0.0 && v <= static_cast<double>(supertuning<T>::max_exact_index())) || v != std::floor(v)) {
        peft::detail::raise<format_error>(where, mod + ": supertuning_indices[" + std::to_string(t) + "] = " +
                                                     std::to_string(v) + " is not an integer in [0, " +
                                                     std::to_string(supertuning<T>::max_exact_index()) +
                                                     "] (float holds larger indices inexactly: load as double)");
      }
      idx[static_cast<std::size_t>(t)] = static_cast<std::int64_t>(v);
    }
    const bool has_a = m.contains("supertuning_lora_A.weight"), has_b = m.contains("supertuning_lora_B.weight");
    matrix<T> a, b;
    if (r == 0) {
      if (has_a || has_b) {
        peft::detail::raise<format_error>(where, mod + " has supertuning_lora_A/B but adapter_config.json's 'r' is null "
                                                       "(no LoRA part)");
      }
    } else {
      if (!has_a || !has_b) {
        peft::detail::raise<format_error>(where, mod + " lacks supertuning_lora_" + std::string(has_a ? "B" : "A") +
                                                       ".weight but adapter_config.json gives r = " + std::to_string(r));
      }
      const auto& sa = m.shape("supertuning_lora_A.weight", 2);
      const auto& sb = m.shape("supertuning_lora_B.weight", 2);
      if (sa[0] != r || sb[1] != r || sa[1] < 1 || sb[0] < 1) {
        peft::detail::raise<format_error>(where, mod + ": supertuning_lora_A.weight " + detail::shape_text(sa) +
                                                     " and supertuning_lora_B.weight " + detail::shape_text(sb) +
                                                     " are not (r, in) and (out, r) for r = " + std::to_string(r));
      }
      a = m.copy("supertuning_lora_A.weight");
      b = m.copy("supertuning_lora_B.weight");
    }
    index in = r > 0 ? a.cols() : 0, out = r > 0 ? b.rows() : 0;
    if (const auto& shape = m.base_shape()) {
      const auto [base_out, base_in] = *shape;
      if (r > 0 && (base_out != out || base_in != in)) {
        peft::detail::raise<format_error>(where, mod + ": the LoRA part is for " + peft::detail::shape_string(out, in) +
                                                     ", the base is " + peft::detail::shape_string(base_out, base_in));
      }
      in = base_in;
      out = base_out;
    }
    if (in > 0) check_entries(where, mod, out, in, sparsity, static_cast<index>(idx.size()));
    std::vector<T> values = m.copy("supertuning_values").storage();
    return supertuning<T>(std::move(idx), std::move(values), in, out, std::move(a), std::move(b), alpha);
  }

  /// PEFT sizes the values of an out x in layer as int(out in (1 - sparsity)): another K would
  /// not load there.
  static void check_entries(const char* where, const std::string& mod, index out, index in, double sparsity, index k) {
    const index want = supertuning_entries(out, in, sparsity);
    if (k != want) {
      peft::detail::raise<format_error>(where, mod + " has K = " + std::to_string(k) + " entries, but sparsity " +
                                                   std::to_string(sparsity) + " on its " + peft::detail::shape_string(out, in) +
                                                   " weight gives int(out in (1 - sparsity)) = " + std::to_string(want));
    }
  }

  /// The sparsity PEFT needs for K entries of an out x in layer: the double nearest 1 - K / (out in)
  /// whose int(out in (1 - sparsity)) is K. unsupported_error when none is in [0, 1).
  static double sparsity_for(index out, index in, index k, const std::string& module) {
    double s = 1.0 - static_cast<double>(k) / static_cast<double>(out * in);
    for (int step = 0; step < 64 && supertuning_entries(out, in, s) < k; ++step) s = std::nextafter(s, 0.0);
    if (!(s >= 0.0 && s < 1.0) || supertuning_entries(out, in, s) != k) {
      peft::detail::raise<unsupported_error>("supertuning::describe_in", "module '" + module + "' has K = " + std::to_string(k) +
                                                                            " entries, which no sparsity gives PEFT");
    }
    return s;
  }

  /// Makes `c` describe this module: peft_type SUPERTUNING, sparsity, r (null without the LoRA
  /// part), lora_alpha, save_precomputed_indices true (the indices are written), PEFT's defaults
  /// for the rest. unsupported_error where PEFT's one config could not rebuild the module: a K
  /// its sparsity does not give on the module's shape, another r or lora_alpha than the first
  /// module's, or a module whose shape is unknown with no sparsity to keep.
  static void describe_in(const supertuning<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "supertuning::describe_in";
    for (const std::int64_t f : a.indices()) {
      if (f > supertuning<T>::max_exact_index()) {
        peft::detail::raise<unsupported_error>(where, "module '" + module + "' has the flat index " + std::to_string(f) +
                                                          ", above 2^24: tensors are written through float, which "
                                                          "holds it inexactly; save a supertuning<double>");
      }
    }
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "SUPERTUNING") {
      const ordered_json keep = c.raw;
      c.raw = ordered_json::object();
      for (const char* k : {"target_modules", "modules_to_save", "base_model_name_or_path", "revision", "task_type",
                            "inference_mode"}) {
        if (keep.contains(k)) c.raw[k] = keep[k];
      }
      if (!a.bound()) {
        peft::detail::raise<unsupported_error>(where, "module '" + module + "': the layer's shape is unknown, so no "
                                                      "sparsity can be given for its K entries (bind it with set_features)");
      }
      c.peft_type = "SUPERTUNING";
      c.rank_pattern.clear();
      c.alpha_pattern.clear();
      c.raw["sparsity"] = sparsity_for(a.out_features(), a.in_features(), a.entries(), module);
      c.r = a.has_lora() ? a.rank() : 8;
      c.raw["r"] = a.has_lora() ? ordered_json(a.rank()) : ordered_json(nullptr);
      c.raw["lora_alpha"] = a.has_lora() ? adapter_config::json_number(a.lora_alpha()) : ordered_json(nullptr);
    }
    const double sparsity = sparsity_of(c, where);
    const auto [r, alpha] = lora_of(c, where);
    if (r != a.rank() || (r > 0 && alpha != a.lora_alpha())) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' (r " + std::to_string(a.rank()) + ", lora_alpha " +
                                                        std::to_string(a.lora_alpha()) +
                                                        ") differs from the config's r / lora_alpha: PEFT's "
                                                        "SupertuningConfig has one of each for every module");
    }
    if (a.bound()) {
      const index want = supertuning_entries(a.out_features(), a.in_features(), sparsity);
      if (want != a.entries()) {
        peft::detail::raise<unsupported_error>(where, "module '" + module + "' has K = " + std::to_string(a.entries()) +
                                                          " entries, but the config's sparsity " + std::to_string(sparsity) +
                                                          " gives " + std::to_string(want) + " on its " +
                                                          peft::detail::shape_string(a.out_features(), a.in_features()) +
                                                          " weight: PEFT's SupertuningConfig has one sparsity for every module");
      }
    }
    c.raw["save_precomputed_indices"] = true;  // the indices are written
    c.set_default("select_top", true);
    c.set_default("lora_dropout", 0.0);
    c.set_default("init_weights", true);
  }
};

}  // namespace peft::io
