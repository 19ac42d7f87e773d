// peft/io/peft/vblora.hpp — VB-LoRA in PEFT checkpoints: peft_type "VBLORA"; per module
// vblora_logits_A (r, in / L, num_vectors) and vblora_logits_B (out / L, r, num_vectors), or with
// save_only_topk_weights vblora_logits_{A,B}_topk_indices (..., topk) (any integer dtype) and
// _topk_weights (..., topk - 1); shared base_model.vblora_vector_bank (num_vectors, L), written
// once. Fields r, topk, num_vectors, vector_length, save_only_topk_weights, fan_in_fan_out;
// vblora_dropout, init_logits_std and init_vector_bank_bound only shape training.
#pragma once

#include <algorithm>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/vblora.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<vblora<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "VBLORA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule);
  /// vblora_dropout, init_logits_std and init_vector_bank_bound shape training only.
  static constexpr std::string_view config_fields[] = {
      "r",          "topk",           "num_vectors",    "vector_length",          "save_only_topk_weights",
      "fan_in_fan_out", "vblora_dropout", "init_logits_std", "init_vector_bank_bound"};
  static std::vector<std::string_view> module_tensors() {
    return {"vblora_logits_A", "vblora_logits_B", "vblora_logits_A_topk_indices", "vblora_logits_A_topk_weights",
            "vblora_logits_B_topk_indices", "vblora_logits_B_topk_weights"};
  }
  static std::vector<std::string_view> shared_tensors() { return {"vblora_vector_bank"}; }
  static bool integer_tensor(std::string_view name) { return name.ends_with("_topk_indices"); }

  /// The adapter of one module, over the checkpoint's one bank (shared by every module). The form
  /// (logits or top-k) is what save_only_topk_weights says; format_error for tensors of the other
  /// form, shapes that disagree with the bank or with r, topk, num_vectors, vector_length.
  static vblora<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                   const checkpoint_tensors<T>& shared) {
    constexpr const char* where = "vblora::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    if (!shared.contains("vblora_vector_bank")) {
      peft::detail::raise<format_error>(where, "the checkpoint has no base_model.vblora_vector_bank");
    }
    const auto& sv = shared.shape("vblora_vector_bank", 2);
    const index nv = static_cast<index>(sv[0]), len = static_cast<index>(sv[1]);
    expect_field(c, "num_vectors", nv, "the bank");
    expect_field(c, "vector_length", len, "the bank");
    const bool topk_only = c.boolean("save_only_topk_weights", false, where);
    const index topk = c.integer("topk", 2, where);
    const std::string a = topk_only ? "vblora_logits_A_topk_indices" : "vblora_logits_A";
    const std::string b = topk_only ? "vblora_logits_B_topk_indices" : "vblora_logits_B";
    for (const auto& [name, t] : m.all()) {
      if (name.ends_with("_topk_indices") != topk_only && name.ends_with("_topk_weights") != topk_only) {
        peft::detail::raise<format_error>(where, mod + " holds '" + name + "' but save_only_topk_weights is " +
                                                     (topk_only ? "true" : "false"));
      }
    }
    const auto& sa = m.shape(a, 3);
    const auto& sb = m.shape(b, 3);
    const index r = static_cast<index>(sa[0]);
    const index last = topk_only ? topk : nv;
    if (sb[1] != sa[0] || sa[2] != last || sb[2] != last) {
      peft::detail::raise<format_error>(where, mod + ": " + a + " " + detail::shape_text(sa) + " and " + b + " " +
                                                   detail::shape_text(sb) + " are not (r, in / L, " +
                                                   std::to_string(last) + ") and (out / L, r, " +
                                                   std::to_string(last) + ")");
    }
    if (c.raw.contains("r") && c.r != r) {
      peft::detail::raise<format_error>(where, mod + " has rank " + std::to_string(r) +
                                                   " but adapter_config.json gives r = " + std::to_string(c.r));
    }
    // One bank object for every module of this load: the bank's gradient sums over them.
    auto bank = shared.template shared_object<vblora_vector_bank<T>>(
        "vblora_vector_bank", [&] { return vblora_vector_bank<T>(*shared.shared("vblora_vector_bank")); });
    const index in = static_cast<index>(sa[1]) * len, out = static_cast<index>(sb[0]) * len;
    if (!topk_only) {
      if (topk < 1 || topk > nv) {
        peft::detail::raise<format_error>(where, "topk " + std::to_string(topk) + " is outside [1, num_vectors = " +
                                                     std::to_string(nv) + "]");
      }
      return vblora<T>(std::move(bank), r, in, out, topk, pieces(m, a, sa), pieces(m, b, sb));
    }
    const std::string wa = "vblora_logits_A_topk_weights", wb = "vblora_logits_B_topk_weights";
    m.shared(wa, {sa[0], sa[1], topk - 1});  // format_error for another shape
    m.shared(wb, {sb[0], sb[1], topk - 1});
    return vblora<T>::from_topk(std::move(bank), r, in, out, topk, pieces(m, a, sa), pieces(m, wa, m.get(wa).shape),
                                pieces(m, b, sb), pieces(m, wb, m.get(wb).shape));
  }

  /// Makes `c` describe the adapter: peft_type VBLORA, r, topk, num_vectors, vector_length, and
  /// save_only_topk_weights as the adapter's form says. unsupported_error when modules disagree
  /// (VBLoRAConfig has one of each) or when the config asks for the top-k form of an adapter
  /// holding logits (call keep_only_topk() on it first).
  static void describe_in(const vblora<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "vblora::describe_in";
    a.check_ready(where);
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "VBLORA") {
      // A config of another method (or a fresh one): this adapter's numbers replace it.
      c.peft_type = "VBLORA";
      c.r = a.rank();
      c.raw["r"] = a.rank();
      c.raw["topk"] = a.topk();
      c.raw["num_vectors"] = a.num_vectors();
      c.raw["vector_length"] = a.vector_length();
      c.raw["save_only_topk_weights"] = a.topk_only();
    }
    if (!a.topk_only() && c.boolean("save_only_topk_weights", false, where)) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' holds logits but the config asks for "
                                                    "save_only_topk_weights: call keep_only_topk() on every module "
                                                    "first (the saved adapter is then inference-only, as in PEFT)");
    }
    c.raw["save_only_topk_weights"] = a.topk_only();
    const std::pair<const char*, index> numbers[] = {
        {"r", a.rank()}, {"topk", a.topk()}, {"num_vectors", a.num_vectors()}, {"vector_length", a.vector_length()}};
    for (const auto& [name, v] : numbers) {
      if (c.raw.contains(name) && c.raw[name] != v) {
        peft::detail::raise<unsupported_error>(where, "module '" + module + "' has " + name + " = " +
                                                      std::to_string(v) + " but the config says " +
                                                      c.raw[name].dump() + "; VBLoRAConfig has one " + name +
                                                      " for every module");
      }
      c.raw[name] = v;
    }
    c.r = a.rank();
    c.set_default("init_logits_std", a.init_logits_std());
    if (!c.raw.contains("init_vector_bank_bound")) c.raw["init_vector_bank_bound"] = 0.02;
    if (!c.raw.contains("vblora_dropout")) c.raw["vblora_dropout"] = 0.0;
  }

 private:
  /// A (d0, d1, d2) tensor as the (d0 d1, d2) table of its pieces (the same row-major values).
  static matrix<T> pieces(const checkpoint_tensors<T>& m, const std::string& name, const std::vector<std::int64_t>& s) {
    return matrix<T>(static_cast<index>(s[0] * s[1]), static_cast<index>(s[2]), m.copy(name).storage());
  }
  static void expect_field(const adapter_config& c, const char* name, index actual, const char* what) {
    if (!c.raw.contains(name)) return;
    const index v = c.integer(name, actual, "vblora::from_checkpoint");
    if (v != actual) {
      peft::detail::raise<format_error>("vblora::from_checkpoint", std::string("adapter_config.json gives ") + name +
                                                                       " = " + std::to_string(v) + " but " + what +
                                                                       " gives " + std::to_string(actual));
    }
  }
};

}  // namespace peft::io
