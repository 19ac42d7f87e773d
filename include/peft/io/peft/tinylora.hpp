// peft/io/peft/tinylora.hpp — TinyLoRA in PEFT checkpoints: peft_type "TINYLORA"; per module the
// buffers tinylora_A (r, in), tinylora_B (out, r) and, with save_projection, tinylora_P (u, r, r);
// the trainable vectors once, as base_model.tinylora_v.<group>. Fields r, u, weight_tying,
// projection_seed, save_projection, init_v_bound, fan_in_fan_out (false), tinylora_dropout.
// Loaded: checkpoints with one group (weight_tying = 1, or one adapted module) and their P.
// Refused, because PEFT picks a module's group and P's seed by the module's position among the
// adapted modules in the model's order, which the checkpoint does not record: several groups,
// and save_projection = false. TinyLoRA's Embedding class saves the same tensors in the same
// orientation (A (r, dim), B (vocab, r)) and merges the same B R A: nothing in the checkpoint
// tells it from a Linear (docs/methods/tinylora.md).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/tinylora.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<tinylora<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "TINYLORA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule);
  /// tinylora_dropout and init_v_bound shape training only; fan_in_fan_out must be false.
  static constexpr std::string_view config_fields[] = {"r",           "u",
                                                       "weight_tying", "projection_seed",
                                                       "save_projection", "init_v_bound",
                                                       "fan_in_fan_out",  "tinylora_dropout"};
  static std::vector<std::string_view> module_tensors() { return {"tinylora_A", "tinylora_B", "tinylora_P"}; }
  /// base_model.tinylora_v.<g> for the groups 0 .. 4095 (read so that several groups are refused
  /// with the reason, not as unknown keys).
  static std::vector<std::string_view> shared_tensors() {
    static const std::vector<std::string> names = [] {
      std::vector<std::string> n;
      for (int g = 0; g < max_groups; ++g) n.push_back("tinylora_v." + std::to_string(g));
      return n;
    }();
    return {names.begin(), names.end()};
  }

  /// The adapter of one module over the checkpoint's one v (shared by every module).
  /// unsupported_error for save_projection = false, several tinylora_v groups, fan_in_fan_out;
  /// format_error for missing tensors and shapes that disagree with each
  /// other, with r, u or the base.
  static tinylora<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                     const checkpoint_tensors<T>& shared) {
    constexpr const char* where = "tinylora::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    if (c.boolean("fan_in_fan_out", false, where)) {
      peft::detail::raise<unsupported_error>(where, "adapter_config.json: 'fan_in_fan_out' = true (a Conv1D base, "
                                                    "weights stored (in, out)) is not implemented for TinyLoRA");
    }
    if (!c.boolean("save_projection", true, where)) {
      peft::detail::raise<unsupported_error>(
          where, "adapter_config.json: 'save_projection' = false: PEFT redraws tinylora_P with torch.normal seeded by "
                 "projection_seed + the module's position among the adapted modules in the model's order, which "
                 "the checkpoint does not record; save it in PEFT with save_projection=True");
    }
    const double tying = c.number("weight_tying", 0.0, where);
    if (!(tying >= 0.0 && tying <= 1.0)) {
      peft::detail::raise<format_error>(where, "adapter_config.json: weight_tying = " + std::to_string(tying) +
                                                   " is outside [0, 1]");
    }
    if (!shared.contains("tinylora_v.0")) {
      peft::detail::raise<format_error>(where, "the checkpoint has no base_model.tinylora_v.0");
    }
    std::size_t groups = 0;
    for (const auto& [name, t] : shared.all()) groups += name.starts_with("tinylora_v.") ? 1 : 0;
    if (groups != 1) {
      peft::detail::raise<unsupported_error>(
          where, "the checkpoint holds " + std::to_string(groups) + " tinylora_v groups (weight_tying " +
                     std::to_string(tying) + "): PEFT gives a module the group of its position among the adapted "
                     "modules in the model's order, which the checkpoint does not record; only one group (weight_tying "
                     "= 1, or a single adapted module) is loaded");
    }
    if (!m.contains("tinylora_P")) {
      peft::detail::raise<format_error>(where, mod + " has no tinylora_P although save_projection is true (PEFT would "
                                                     "redraw it from the module's position, which is not recorded)");
    }
    const auto& sa = m.shape("tinylora_A", 2);
    const auto& sb = m.shape("tinylora_B", 2);
    const auto& sp = m.shape("tinylora_P", 3);
    const auto& sv = shared.shape("tinylora_v.0", 1);
    const std::int64_t r = sa[0];
    if (r < 1 || sa[1] < 1 || sb[0] < 1 || sb[1] != r) {
      peft::detail::raise<format_error>(where, mod + ": tinylora_A " + detail::shape_text(sa) + " and tinylora_B " +
                                                   detail::shape_text(sb) + " are not (r, in) and (out, r)");
    }
    if (const auto& shape = m.base_shape()) {
      const auto [out, in] = *shape;
      if (sb[0] != out || sa[1] != in) {
        peft::detail::raise<format_error>(where, mod + ": tinylora_B tinylora_A is " +
                                                     peft::detail::shape_string(sb[0], sa[1]) + ", the base is " +
                                                     peft::detail::shape_string(out, in));
      }
    }
    // PEFT's rank is min(r, in, out).
    const index cr = c.r;
    if (c.raw.contains("r") && r != std::min<std::int64_t>({cr, sa[1], sb[0]})) {
      peft::detail::raise<format_error>(where, mod + " has rank " + std::to_string(r) + " (tinylora_A) but " +
                                                   "adapter_config.json gives r = " + std::to_string(cr) +
                                                   " (the rank is min(r, in, out))");
    }
    if (sp[0] < 1 || sp[1] != r || sp[2] != r) {
      peft::detail::raise<format_error>(where, mod + ": tinylora_P is " + detail::shape_text(sp) +
                                                   ", expected (u, r, r) with r = " + std::to_string(r));
    }
    if (sv[0] != sp[0]) {
      peft::detail::raise<format_error>(where, mod + ": tinylora_P has " + std::to_string(sp[0]) +
                                                   " projections but base_model.tinylora_v.0 has " +
                                                   std::to_string(sv[0]) + " values");
    }
    if (const long long u = c.integer("u", 64, where); c.raw.contains("u") && u != sv[0]) {
      peft::detail::raise<format_error>(where, "adapter_config.json gives u = " + std::to_string(u) +
                                                   " but base_model.tinylora_v.0 has " + std::to_string(sv[0]) +
                                                   " values");
    }
    // One v object for every module of this load: its gradient sums over them.
    auto v = shared.template shared_object<tinylora_vector<T>>(
        "tinylora_v.0", [&] {
          return tinylora_vector<T>(matrix<T>(1, static_cast<index>(sv[0]), shared.copy("tinylora_v.0").storage()));
        });
    return tinylora<T>(m.copy("tinylora_A"), m.copy("tinylora_B"), m.copy("tinylora_P"), std::move(v));
  }

  /// Makes `c` describe the adapter: peft_type TINYLORA, r, u, weight_tying 1 (the one v is
  /// written as group 0 and shared by every module), save_projection true (P is always written),
  /// fan_in_fan_out false, projection_seed and init_v_bound defaults. unsupported_error when
  /// modules disagree on u (TinyLoraConfig has one).
  static void describe_in(const tinylora<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "tinylora::describe_in";
    a.check_ready(where);
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "TINYLORA") {
      c.peft_type = "TINYLORA";
      c.r = a.rank();
      c.raw["r"] = a.rank();
      c.raw["u"] = a.u();
    }
    if (c.raw.contains("u") && c.raw["u"] != a.u()) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' has u = " + std::to_string(a.u()) +
                                                        " but the config says " + c.raw["u"].dump() +
                                                        "; TinyLoraConfig has one u for every module");
    }
    c.raw["u"] = a.u();
    if (a.rank() > c.r) {  // the config's r is the largest rank (PEFT truncates to min(r, in, out))
      c.r = a.rank();
      c.raw["r"] = a.rank();
    }
    c.raw["weight_tying"] = 1.0;
    c.raw["save_projection"] = true;
    c.raw["fan_in_fan_out"] = false;
    c.set_default("projection_seed", 42);
    c.set_default("init_v_bound", 0.02);
    c.set_default("tinylora_dropout", 0.0);
  }

 private:
  static constexpr int max_groups = 4096;
};

}  // namespace peft::io
