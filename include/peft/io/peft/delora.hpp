// peft/io/peft/delora.hpp — DeLoRA in PEFT checkpoints: peft_type "DELORA"; tensors delora_A
// (r, in), delora_B (out, r), delora_lambda (1) and the buffer delora_w_norm (in) (no ".weight");
// fields r and rank_pattern (the tensors' rank must be the module's), delora_lambda and
// lambda_pattern (lambda's initial value only: the trained value is the delora_lambda tensor).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/delora.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<delora<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "DELORA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule;
  /// module_dropout and init_weights are training and initialisation only).
  static constexpr std::string_view config_fields[] = {"r", "rank_pattern", "delora_lambda", "lambda_pattern"};
  static std::vector<std::string_view> module_tensors() {
    return {"delora_A", "delora_B", "delora_lambda", "delora_w_norm"};
  }

  /// The adapter of one module. A's rank must be the config's for the module (rank_pattern);
  /// every tensor is required, delora_w_norm included (PEFT saves it: it is W0's column norms
  /// when the adapter was made, not recomputed from the base it is loaded on).
  static delora<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "delora::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const auto& sa = m.shape("delora_A", 2);
    const auto& sb = m.shape("delora_B", 2);
    if (sa[0] < 1 || sa[1] < 1 || sb[0] < 1 || sb[1] != sa[0]) {
      peft::detail::raise<format_error>(where, mod + ": delora_A " + detail::shape_text(sa) + " and delora_B " +
                                                   detail::shape_text(sb) + " do not multiply");
    }
    const index r = c.rank_for(m.module());
    if (sa[0] != r) {
      peft::detail::raise<format_error>(where, mod + " has rank " + std::to_string(sa[0]) +
                                                   " (delora_A) but adapter_config.json gives " + std::to_string(r));
    }
    if (const auto& shape = m.base_shape()) {
      const auto [out, in] = *shape;
      if (sb[0] != out || sa[1] != in) {
        peft::detail::raise<format_error>(where, mod + ": delora_B delora_A is " + peft::detail::shape_string(sb[0], sa[1]) +
                                                     ", the base is " + peft::detail::shape_string(out, in));
      }
    }
    const matrix<T> lambda = m.copy("delora_lambda", {1});
    std::vector<T> w_norm = m.copy("delora_w_norm", {sa[1]}).storage();
    return delora<T>(m.copy("delora_A"), m.copy("delora_B"), lambda(0, 0), std::move(w_norm));
  }

  /// Makes `c` describe this module: peft_type DELORA; r from the first module of a fresh config,
  /// a rank_pattern entry (first) for a module of another rank.
  static void describe_in(const delora<T>& a, adapter_config& c, const std::string& module) {
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "DELORA") {
      for (const char* k : {"delora_lambda", "lambda_pattern", "module_dropout"}) c.raw.erase(k);
    }
    if (c.fresh()) c.r = a.rank();
    c.peft_type = "DELORA";
    if (c.rank_for(module) == a.rank()) return;
    // adapter_config::to_json writes rank_pattern from `raw` for DELORA: keep both in PEFT's order.
    c.rank_pattern.insert(c.rank_pattern.begin(), {module, a.rank()});
    ordered_json pattern = ordered_json::object();
    pattern[module] = static_cast<long long>(a.rank());
    if (const auto* old = c.field("rank_pattern"); old != nullptr && old->is_object()) {
      for (const auto& [k, v] : old->items()) {
        if (k != module) pattern[k] = v;
      }
    }
    c.raw["rank_pattern"] = std::move(pattern);
  }
};

}  // namespace peft::io
