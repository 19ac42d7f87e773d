// peft/io/peft/lora.hpp — LoRA in PEFT checkpoints: peft_type "LORA" without use_dora; tensors
// lora_A.weight (r, in), lora_B.weight (out, r), lora_B.bias (out, with lora_bias); the rank and
// scale of a module from r / rank_pattern, lora_alpha / alpha_pattern and use_rslora.
// init_lora_weights "pissa" / "olora" (saved unconverted: relative to the residual base PEFT's
// from_pretrained recomputes): loaded, when the loader is given the base weights, as PEFT's
// conversion (adapters/lora_decomposition.hpp: rank 2r over W0 itself), the config rewritten to
// say so (r and lora_alpha doubled, init_lora_weights true); refused without the base weights.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <optional>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/adapters/lora_decomposition.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<lora<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "LORA" && !c.use_dora; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view init_field[] = {"init_lora_weights"};  // judged by decomposition_of
  static constexpr auto config_fields = join_config_fields(lora_config_fields, init_field);
  static std::vector<std::string_view> module_tensors() { return {"lora_A.weight", "lora_B.weight", "lora_B.bias"}; }

  /// The decomposition init_lora_weights asks PEFT to re-run on load ("pissa", "olora"), nullopt
  /// for the initialisations that leave the base alone (true, false, "gaussian", "eva",
  /// "orthogonal", "mica"); unsupported_error naming the field for the others (pissa_niter_*,
  /// corda, loftq, lora_ga, unknown strings).
  static std::optional<lora_decomposition> decomposition_of(const adapter_config& c, const char* where) {
    const auto it = c.raw.find("init_lora_weights");
    if (it == c.raw.end() || it->is_null() || it->is_boolean()) return std::nullopt;
    if (it->is_string()) {
      std::string s = it->get<std::string>();
      if (s == "pissa") return lora_decomposition::pissa;
      std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
      if (s == "olora") return lora_decomposition::olora;  // PEFT compares it lower-cased
    }
    const std::string why = detail::refused_config_field("init_lora_weights", *it);
    if (why.empty()) return std::nullopt;
    peft::detail::raise<unsupported_error>(where, "adapter_config.json: 'init_lora_weights' = " + it->dump() + ": " + why);
  }

  /// After a load that converted PiSSA/OLoRA modules: the config of the converted adapter, as
  /// PEFT writes it with path_initial_model_for_weight_conversion (r, rank_pattern doubled;
  /// lora_alpha, alpha_pattern scaled to keep each module's scale; init_lora_weights true).
  static void after_load(adapter_config& c) {
    if (!decomposition_of(c, "lora::from_checkpoint")) return;
    const double alpha_factor = c.use_rslora ? std::sqrt(2.0) : 2.0;
    c.r *= 2;
    c.lora_alpha *= alpha_factor;
    for (auto& [k, v] : c.rank_pattern) v *= 2;
    for (auto& [k, v] : c.alpha_pattern) v *= alpha_factor;
    c.raw["init_lora_weights"] = true;
    c.raw["r"] = c.r;
    c.raw = c.to_json();
  }

  /// The adapter of one module: rank from lora_A, checked against r / rank_pattern; scale from
  /// lora_alpha / alpha_pattern and use_rslora.
  static lora<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "lora::from_checkpoint";
    const auto& sa = m.shape("lora_A.weight", 2);
    const auto& sb = m.shape("lora_B.weight", 2);
    if (sb[1] != sa[0]) {
      peft::detail::raise<format_error>(where, "module '" + m.module() + "': lora_A " + detail::shape_text(sa) +
                                                   " and lora_B " + detail::shape_text(sb) + " disagree on the rank");
    }
    const auto rank = static_cast<index>(sa[0]);
    if (rank != c.rank_for(m.module())) {
      peft::detail::raise<format_error>(where, "module '" + m.module() + "' has rank " + std::to_string(rank) +
                                                   " but adapter_config.json gives " +
                                                   std::to_string(c.rank_for(m.module())));
    }
    std::vector<T> bias;
    if (m.contains("lora_B.bias")) {
      bias = m.copy("lora_B.bias", {sb[0]}).storage();
    } else if (c.lora_bias) {
      peft::detail::raise<format_error>(where, "module '" + m.module() + "' has no lora_B.bias but lora_bias is true");
    }
    const double s = lora_scale(c.alpha_for(m.module()), rank, c.use_rslora);
    lora<T> a(m.copy("lora_A.weight"), m.copy("lora_B.weight"), static_cast<T>(s), std::move(bias));
    const auto kind = decomposition_of(c, where);
    if (!kind) return a;
    // PEFT's from_pretrained re-runs the decomposition on W0 and loads A, B over the residual.
    const std::string init = "adapter_config.json: 'init_lora_weights' = \"" + std::string(decomposition_name(*kind)) + "\"";
    if (*kind == lora_decomposition::olora && c.fan_in_fan_out) {
      peft::detail::raise<unsupported_error>(where, init + " with fan_in_fan_out: PEFT factors the stored (in, out) "
                                                    "weight, whose factors do not fit the adapter's shapes");
    }
    const auto w0 = m.base_weight();
    if (!w0) {
      peft::detail::raise<unsupported_error>(where, init + ": the adapter is relative to a residual base PEFT "
                                                    "recomputes from the base weight; load it with its base model "
                                                    "(peft_model::load_adapter, merge_model, peft merge)");
    }
    if (w0->rows() != sb[0] || w0->cols() != sa[1]) {
      peft::detail::raise<format_error>(where, "module '" + m.module() + "': the base weight is " +
                                                   peft::detail::shape_string(w0->rows(), w0->cols()) + ", the adapter's " +
                                                   peft::detail::shape_string(sb[0], sa[1]));
    }
    return with_initial_factors(a, decompose_weight<T>(*kind, w0->view(), rank, s));
  }

  /// Makes `c` describe this module: an exact rank_pattern / alpha_pattern entry where r /
  /// lora_alpha do not give its rank and scale; lora_bias when it has a bias.
  static void describe_in(const lora<T>& a, adapter_config& c, const std::string& module) {
    c.peft_type = "LORA";
    const double s = static_cast<double>(a.scale());
    if (c.fresh()) {  // the first module of a config built in C++ sets r and lora_alpha
      const double r = static_cast<double>(a.rank());
      c.r = a.rank();
      c.lora_alpha = c.use_rslora ? s * std::sqrt(r) : s * r;
    }
    const double tol = 8.0 * static_cast<double>(std::numeric_limits<T>::epsilon()) * std::max(1.0, std::abs(s));
    if (c.rank_for(module) != a.rank()) c.rank_pattern.insert(c.rank_pattern.begin(), {module, a.rank()});
    if (std::abs(lora_scale(c.alpha_for(module), a.rank(), c.use_rslora) - s) > tol) {
      const double r = static_cast<double>(a.rank());
      c.alpha_pattern.insert(c.alpha_pattern.begin(), {module, c.use_rslora ? s * std::sqrt(r) : s * r});
    }
    c.lora_bias = c.lora_bias || a.has_bias();
  }
};

}  // namespace peft::io
