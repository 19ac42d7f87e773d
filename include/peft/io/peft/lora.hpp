// peft/io/peft/lora.hpp — LoRA in PEFT checkpoints: peft_type "LORA" without use_dora; tensors
// lora_A.weight (r, in), lora_B.weight (out, r), lora_B.bias (out, with lora_bias); the rank and
// scale of a module from r / rank_pattern, lora_alpha / alpha_pattern and use_rslora.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<lora<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "LORA" && !c.use_dora; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::span<const std::string_view> config_fields{lora_config_fields};
  static std::vector<std::string_view> module_tensors() { return {"lora_A.weight", "lora_B.weight", "lora_B.bias"}; }

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
    return lora<T>(m.copy("lora_A.weight"), m.copy("lora_B.weight"), static_cast<T>(s), std::move(bias));
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
