// peft/io/peft/unilora.hpp — Uni-LoRA in PEFT checkpoints: peft_type "UNILORA"; shared
// base_model.unilora_theta_d (theta_d_length), written once; with save_indices, per module
// unilora_indices_A (r, in) and unilora_indices_B (out, r) (any integer dtype) and
// unilora_scales_A / unilora_scales_B of the same shapes. Fields r, theta_d_length, proj_seed,
// save_indices, fan_in_fan_out; unilora_dropout and init_theta_d_bound only shape training.
// Without save_indices (PEFT's default) the file holds theta_d alone and PEFT redraws the indices
// over every adapted module in the model's module order, which the checkpoint does not record:
// refused here; peft::make_unilora_layers rebuilds such a model from that order.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/unilora.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<unilora<T>> : codec_defaults {
  /// UNILORA configs; unsupported_error for one without save_indices (see the file head).
  static bool handles(const adapter_config& c) {
    if (c.peft_type != "UNILORA") return false;
    require_saved_indices(c);
    return true;
  }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule);
  /// unilora_dropout and init_theta_d_bound shape training only.
  static constexpr std::string_view config_fields[] = {"r",
                                                       "theta_d_length",
                                                       "proj_seed",
                                                       "save_indices",
                                                       "fan_in_fan_out",
                                                       "unilora_dropout",
                                                       "init_theta_d_bound"};
  static std::vector<std::string_view> module_tensors() {
    return {"unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"};
  }
  static std::vector<std::string_view> shared_tensors() { return {"unilora_theta_d"}; }
  static bool integer_tensor(std::string_view name) { return name.starts_with("unilora_indices_"); }

  /// The adapter of one module over the checkpoint's one theta_d (shared by every module).
  /// format_error for missing tensors, shapes that disagree with each other, with r or with
  /// theta_d_length, indices outside theta_d; unsupported_error without save_indices.
  static unilora<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                    const checkpoint_tensors<T>& shared) {
    constexpr const char* where = "unilora::from_checkpoint";
    require_saved_indices(c);
    const std::string mod = "module '" + m.module() + "'";
    if (!shared.contains("unilora_theta_d")) {
      peft::detail::raise<format_error>(where, "the checkpoint has no base_model.unilora_theta_d");
    }
    const auto& st = shared.shape("unilora_theta_d", 1);
    const index len = static_cast<index>(st[0]);
    if (len < 1) peft::detail::raise<format_error>(where, "base_model.unilora_theta_d is empty");
    if (const index d = c.integer("theta_d_length", len, where); d != len) {
      peft::detail::raise<format_error>(where, "adapter_config.json gives theta_d_length = " + std::to_string(d) +
                                                   " but base_model.unilora_theta_d has " + std::to_string(len) +
                                                   " entries");
    }
    const long long seed = c.integer("proj_seed", 42, where);
    if (seed < 0) {
      peft::detail::raise<format_error>(where, "adapter_config.json: proj_seed = " + std::to_string(seed) +
                                                   " is negative (numpy's default_rng refuses it)");
    }
    const auto& sa = m.shape("unilora_indices_A", 2);
    const auto& sb = m.shape("unilora_indices_B", 2);
    const index r = static_cast<index>(sa[0]), in = static_cast<index>(sa[1]), out = static_cast<index>(sb[0]);
    if (sb[1] != sa[0] || r < 1 || in < 1 || out < 1) {
      peft::detail::raise<format_error>(where, mod + ": unilora_indices_A " + detail::shape_text(sa) +
                                                   " and unilora_indices_B " + detail::shape_text(sb) +
                                                   " are not (r, in) and (out, r)");
    }
    if (c.raw.contains("r") && c.r != r) {
      peft::detail::raise<format_error>(where, mod + " has rank " + std::to_string(r) +
                                                   " but adapter_config.json gives r = " + std::to_string(c.r));
    }
    auto scales_a = m.copy("unilora_scales_A", {sa[0], sa[1]});  // format_error for another shape
    auto scales_b = m.copy("unilora_scales_B", {sb[0], sb[1]});
    auto ia = indices(m, "unilora_indices_A", len);
    auto ib = indices(m, "unilora_indices_B", len);
    // One theta_d object for every module of this load: its gradient sums over them.
    auto theta = shared.template shared_object<unilora_theta<T>>(
        "unilora_theta_d", [&] { return unilora_theta<T>(shared.copy("unilora_theta_d")); });
    unilora<T> a(std::move(theta), r, in, out, std::move(ia), std::move(ib), std::move(scales_a), std::move(scales_b));
    a.set_config_numbers(static_cast<std::uint64_t>(seed), c.number("init_theta_d_bound", 0.02, where));
    return a;
  }

  /// Makes `c` describe the adapter: peft_type UNILORA, r, theta_d_length, proj_seed, and
  /// save_indices = true (the indices and scales are always written, so PEFT loads them rather
  /// than redrawing). unsupported_error when modules disagree on r or theta_d_length
  /// (UniLoraConfig has one of each).
  static void describe_in(const unilora<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "unilora::describe_in";
    a.check_ready(where);
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "UNILORA") {
      // A config of another method (or a fresh one): this adapter's numbers replace it.
      c.peft_type = "UNILORA";
      c.r = a.rank();
      c.raw["r"] = a.rank();
      c.raw["theta_d_length"] = a.theta_d_length();
      c.raw["proj_seed"] = static_cast<long long>(a.proj_seed());
      c.set_number("init_theta_d_bound", a.init_theta_d_bound());
    }
    const std::pair<const char*, index> numbers[] = {{"r", a.rank()}, {"theta_d_length", a.theta_d_length()}};
    for (const auto& [name, v] : numbers) {
      if (c.raw.contains(name) && c.raw[name] != v) {
        peft::detail::raise<unsupported_error>(where, "module '" + module + "' has " + name + " = " +
                                                      std::to_string(v) + " but the config says " +
                                                      c.raw[name].dump() + "; UniLoraConfig has one " + name +
                                                      " for every module");
      }
      c.raw[name] = v;
    }
    c.r = a.rank();
    c.raw["save_indices"] = true;
    c.set_default("proj_seed", static_cast<long long>(a.proj_seed()));
    c.set_default("init_theta_d_bound", a.init_theta_d_bound());
    c.set_default("unilora_dropout", 0.0);
  }

 private:
  static void require_saved_indices(const adapter_config& c) {
    if (!c.boolean("save_indices", false, "unilora::from_checkpoint")) {
      peft::detail::raise<unsupported_error>(
          "unilora::from_checkpoint",
          "adapter_config.json: 'save_indices' = false: the checkpoint holds theta_d only and PEFT redraws the "
          "indices over every adapted module in the model's module order, which it does not record; rebuild the "
          "layers with peft::make_unilora_layers (module shapes in that order, theta_d from the file) or save with "
          "save_indices=True");
    }
  }
  /// An integer tensor's values as indices into theta_d; format_error for others.
  static std::vector<std::int64_t> indices(const checkpoint_tensors<T>& m, const std::string& name, index len) {
    const auto& data = *m.shared(name);
    std::vector<std::int64_t> out;
    out.reserve(data.storage().size());
    for (const T v : data.storage()) {
      if (!(v >= T{0} && v < static_cast<T>(len)) || v != std::floor(v)) {
        peft::detail::raise<format_error>("unilora::from_checkpoint",
                                          "module '" + m.module() + "': " + name + " holds " +
                                              std::to_string(static_cast<double>(v)) +
                                              ", not an index in [0, theta_d_length = " + std::to_string(len) + ")");
      }
      out.push_back(static_cast<std::int64_t>(v));
    }
    return out;
  }
};

}  // namespace peft::io
