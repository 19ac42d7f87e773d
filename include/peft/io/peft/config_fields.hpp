// peft/io/peft/config_fields.hpp — the rule for adapter_config.json: every field is honoured,
// known not to change a loaded adapter's outputs, or refused by name. Nothing is ignored.
//
//   peft::io::check_config_fields(cfg, peft_codec<lora<T>>::config_fields, "lora");
//
// load_peft_checkpoint calls it with the codec that reads the checkpoint. A field passes when
//   - the codec honours it (its `config_fields`: r, lora_alpha, ... for LoRA);
//   - it is bookkeeping or module selection PEFT writes (common_config_fields: peft_type,
//     task_type, target_modules, layers_to_transform, ...; which modules were adapted is what the
//     checkpoint's tensors say);
//   - it only shapes training or initialisation and leaves the saved adapter's outputs alone
//     (training_only_config_fields: dropouts, init_weights, AdaLoRA's schedule, ...);
//   - or it holds its default value (null, false, "", {}, [] for a field not listed; PEFT's
//     default for the refused fields below).
// Refused with unsupported_error naming the field and why: the LoRA variants and layouts
// peft-cpp does not implement (layer_replication, aLoRA's alora_invocation_tokens, use_qalora,
// target_parameters, megatron_config, arrow_config, ensure_weight_tying; use_bdlora,
// trainable_token_indices and the velora/monteclora/kasa configs outside plain LoRA, whose loader
// honours them), bias other than "none" (base biases trained and
// saved), and init_lora_weights whose initialisation rewrites the base weights (pissa*, olora,
// corda, loftq, lora_ga: PEFT's from_pretrained re-runs it, so the saved adapter is relative to a
// residual base) unless the codec lists init_lora_weights itself (LoRA's recomputes "pissa" and
// "olora" from the base model and refuses the rest with these reasons); any other field with a
// non-default value (a newer PEFT's, a typo) likewise.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <span>
#include <string>
#include <string_view>

#include "peft/core/error.hpp"
#include "peft/io/adapter_config.hpp"

namespace peft::io {

/// Fields every method's checkpoint may carry: PEFT's bookkeeping and module selection.
inline constexpr std::string_view common_config_fields[] = {
    "peft_type",       "task_type",       "auto_mapping",    "peft_version",        "base_model_name_or_path",
    "revision",        "inference_mode",  "target_modules",  "exclude_modules",     "layers_to_transform",
    "layers_pattern",  "modules_to_save", "runtime_config",  "megatron_core",       "qalora_group_size"};

/// Fields that shape training or initialisation only: a loaded adapter's outputs do not depend on
/// them (peft-cpp trains without dropout; the init configs matter only through init_lora_weights,
/// which is checked).
inline constexpr std::string_view training_only_config_fields[] = {
    "lora_dropout", "vera_dropout", "randlora_dropout", "rank_dropout", "module_dropout", "rank_dropout_scale",
    "init_weights", "init_ia3_weights", "d_initial", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "use_effective_conv2d"};

/// What the LoRA-family codecs (lora, dora, adalora) honour: LoraConfig's numbers.
inline constexpr std::string_view lora_config_fields[] = {"r",           "lora_alpha",   "use_rslora",   "use_dora",
                                                          "lora_bias",   "fan_in_fan_out", "rank_pattern", "alpha_pattern"};

/// Two lists of honoured fields as one (a codec that extends another's fields).
template <std::size_t N, std::size_t M>
constexpr std::array<std::string_view, N + M> join_config_fields(const std::string_view (&a)[N],
                                                                   const std::string_view (&b)[M]) {
  std::array<std::string_view, N + M> out{};
  for (std::size_t i = 0; i < N; ++i) out[i] = a[i];
  for (std::size_t i = 0; i < M; ++i) out[N + i] = b[i];
  return out;
}

namespace detail {

inline bool config_value_is_default(const ordered_json& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) || (v.is_string() && v.get<std::string>().empty()) ||
         (v.is_object() && v.empty()) || (v.is_array() && v.empty());
}

/// Why a field with a non-default value is refused; empty when it is not one of these.
inline std::string refused_config_field(const std::string& name, const ordered_json& v) {
  if (name == "bias") {
    if (v.is_string() && v.get<std::string>() == "none") return {};
    return "the base layers' biases were trained and saved with the adapter (PEFT's bias option), which is not "
           "implemented";
  }
  if (name == "init_lora_weights") {
    if (v.is_boolean()) return {};
    if (v.is_string()) {
      const auto s = v.get<std::string>();
      // Initial values only (MiCA also freezes B while training); the saved tensors are the adapter.
      if (s == "gaussian" || s == "eva" || s == "orthogonal" || s == "mica") return {};
      if (s.starts_with("pissa_niter_")) {
        return "PiSSA with a randomized SVD (torch.svd_lowrank, drawn from the process's global generator, which the "
               "checkpoint does not record) rewrites the base weights and PEFT's from_pretrained re-runs it, so the "
               "adapter is relative to a residual base no one can reproduce; convert it to a plain LoRA when saving "
               "(path_initial_model_for_weight_conversion)";
      }
      if (s == "pissa" || s == "olora") {
        return "this initialisation rewrites the base weights and PEFT's from_pretrained re-runs it, so the adapter "
               "is relative to a residual base; peft-cpp recomputes it for plain LoRA given the base model (not for "
               "this method); or convert it to a plain LoRA when saving (path_initial_model_for_weight_conversion)";
      }
      if (s == "corda" || s == "loftq" || s == "lora_ga") {
        return "this initialisation rewrites the base weights (from data or quantization) and PEFT's from_pretrained "
               "re-runs it, so the adapter is relative to a residual base; convert it to a plain LoRA when saving "
               "(path_initial_model_for_weight_conversion)";
      }
    }
    return "an initialisation peft-cpp does not know";
  }
  if (config_value_is_default(v)) return {};
  if (name == "layer_replication") return "the model's layers are replicated (PEFT's layer_replication), which is not implemented";
  if (name == "alora_invocation_tokens") {
    return "an activated LoRA (aLoRA) acts only after its invocation tokens; it is not implemented and PEFT refuses to "
           "merge it";
  }
  if (name == "use_qalora") return "QA-LoRA pools the input in groups before lora_A, which is not implemented";
  if (name == "use_bdlora") return "block-diagonal LoRA (BD-LoRA) is implemented for plain LoRA only";
  if (name == "target_parameters") return "the adapter targets parameters (PEFT's ParamWrapper), not linear layers; not implemented";
  if (name == "trainable_token_indices") {
    return "trainable embedding rows (trainable tokens) are implemented for plain LoRA only";
  }
  if (name == "megatron_config") return "Megatron-LM's parallel layers are not implemented";
  if (name == "ensure_weight_tying") return "PEFT's weight tying of adapted embeddings is not implemented";
  if (name == "velora_config" || name == "monteclora_config" || name == "arrow_config" || name == "kasa_config") {
    return "this LoRA variant is implemented for plain LoRA only (not with DoRA or AdaLoRA)";
  }
  return "a field peft-cpp does not implement (so it cannot honour this value)";
}

}  // namespace detail

/// Throws unsupported_error "[<method>::from_checkpoint] adapter_config.json: '<field>' = <value>:
/// <why>" for the first field of `c` that `honoured` (the codec's fields), the common and the
/// training-only lists do not cover and whose value is not the default.
inline void check_config_fields(const adapter_config& c, std::span<const std::string_view> honoured, std::string_view method) {
  auto listed = [](std::span<const std::string_view> list, const std::string& k) {
    return std::find(list.begin(), list.end(), k) != list.end();
  };
  for (const auto& [k, v] : c.raw.items()) {
    // bias is judged by value; init_lora_weights too unless the codec judges it itself.
    const bool by_value = k == "bias" || (k == "init_lora_weights" && !listed(honoured, k));
    if (!by_value && (listed(honoured, k) || listed(common_config_fields, k) || listed(training_only_config_fields, k))) {
      continue;
    }
    const std::string why = detail::refused_config_field(k, v);
    if (why.empty()) continue;
    std::string value = v.dump();
    if (value.size() > 60) value = value.substr(0, 57) + "...";
    peft::detail::raise<unsupported_error>(std::string(method) + "::from_checkpoint",
                                           "adapter_config.json: '" + k + "' = " + value + ": " + why);
  }
}

}  // namespace peft::io
