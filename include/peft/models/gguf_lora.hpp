// peft/models/gguf_lora.hpp — adapters as llama.cpp's GGUF LoRA files, both ways.
//
//   auto ck = peft::io::load_peft_checkpoint<double>("adapter_dir");
//   auto cfg = peft::models::lm_config::load("model_dir");     // or gguf_config(model.gguf)
//   peft::models::export_gguf_lora(ck, cfg, "adapter.gguf");   // llama-cli --lora adapter.gguf
//
//   auto back = peft::models::import_gguf_lora(peft::io::gguf_file::open("adapter.gguf"));
//   peft::io::save_peft_checkpoint("adapter_dir", back);        // PEFT loads it
//
// The file llama.cpp reads (src/llama-adapter.cpp): general.type "adapter", adapter.type "lora",
// adapter.lora.alpha (f32), and per adapted weight "<base tensor>.lora_a" of ggml shape {in, r}
// (A, r rows of in) and "<base tensor>.lora_b" of shape {r, out} (B, out rows of r). llama.cpp
// scales each pair by alpha / r, r read from the pair (alpha 0: scale 1).
//
// Export takes every method whose update is exactly low rank, s diag(lambda) B diag(c) A (LoRA,
// rsLoRA, rank and alpha patterns, AdaLoRA, VeRA): A' = diag(c) A, B' = diag(lambda) B. One
// alpha is written (the first module's s r); a module whose s r differs gets it folded into B'.
// Other methods (DoRA, LoHa, IA3, SHiRA, ...), lora_bias, modules_to_save, embedding adapters,
// and modules llama.cpp has no tensor for are refused (unsupported_error, suggesting `peft merge`). For general.architecture
// "llama" the rows of B' for q and k are permuted as convert_hf_to_gguf.py permutes the base
// weights (models/gguf_model.hpp); the head counts are also written (peft.attention.head_count,
// peft.attention.head_count_kv) so import can undo it without the model.
//
// Import reads such a file (ours, or one made by llama.cpp's convert_lora_to_gguf.py) into a
// LoRA checkpoint: rank per module from lora_a, scale alpha / r (1 when alpha is 0), q/k rows of
// B put back (the head counts from the file, else from `model`; unsupported_error when neither
// has them).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "peft/adapters/any_adapter.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/base/gguf_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/io/gguf.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/models/config.hpp"
#include "peft/models/gguf_model.hpp"
#include "peft/serve/mixed_forward.hpp"

namespace peft::models {

/// general.architecture of a model of `arch` in llama.cpp (Mistral is "llama" there).
inline std::string gguf_architecture(architecture arch) {
  switch (arch) {
    case architecture::llama:
    case architecture::mistral: return "llama";
    case architecture::qwen2: return "qwen2";
    case architecture::qwen3: return "qwen3";
    case architecture::gpt2: return "gpt2";
  }
  return "llama";
}

/// Writes the checkpoint's adapter as a GGUF LoRA adapter for a model of config `cfg` (see the
/// top of this header). The file is written atomically; on error nothing is left at `out`.
template <class Adapter>
void export_gguf_lora(const io::basic_peft_checkpoint<Adapter>& ck, const lm_config& cfg, const std::filesystem::path& out) {
  constexpr const char* where = "export_gguf_lora";
  using T = typename Adapter::scalar;
  if (!ck.embeddings.empty()) {
    detail::raise<unsupported_error>(where, "the adapter changes the embedding table of '" + ck.embeddings.first_path() +
                                                "' (LoRA on embeddings or trainable_token_indices), which a GGUF LoRA "
                                                "adapter does not hold");
  }
  if (!ck.saved_tensors.empty()) {
    detail::raise<unsupported_error>(where, "the adapter replaces whole modules (modules_to_save: '" +
                                                ck.saved_tensors.front().name + "'), which a GGUF LoRA adapter does "
                                                "not hold; use `peft merge` instead");
  }
  if (ck.modules.empty()) detail::raise<error>(where, "the checkpoint has no module");
  io::gguf_writer w;
  w.set("general.architecture", io::gguf_value::string(gguf_architecture(cfg.arch)));
  w.set("general.type", io::gguf_value::string("adapter"));
  w.set("adapter.type", io::gguf_value::string("lora"));
  w.set("peft.source.peft_type", io::gguf_value::string(ck.config.peft_type));
  std::optional<double> alpha;
  for (const auto& m : ck.modules) {
    std::optional<low_rank_term<T>> term;
    m.adapter.visit([&](const auto& a) {
      using A = std::remove_cvref_t<decltype(a)>;
      if constexpr (is_additive_adapter<A>) term = serve::low_rank_of(a);
    });
    if (!term) {
      detail::raise<unsupported_error>(where, "module '" + m.path + "': a " + std::string(m.adapter.active_method()) +
                                                  " adapter has no exact low-rank form for llama.cpp; use `peft merge` instead");
    }
    if (term->bias != nullptr) {
      detail::raise<unsupported_error>(where, "module '" + m.path + "' has a LoRA bias (lora_bias), which llama.cpp's adapters "
                                                  "cannot express; use `peft merge` instead");
    }
    const auto name = gguf_tensor_name(cfg.arch, m.path, "weight");
    const auto shape = linear_shape(cfg, m.path);
    if (!name || !shape) {
      detail::raise<unsupported_error>(where, "module '" + m.path + "' is not a linear layer of the model");
    }
    const index r = term->rank(), in = term->in_features(), n_out = term->out_features();
    if (shape->first != n_out || shape->second != in) {
      detail::raise<shape_error>(where, "module '" + m.path + "' is adapted as " + std::to_string(n_out) + "x" +
                                            std::to_string(in) + ", the model's is " + std::to_string(shape->first) + "x" +
                                            std::to_string(shape->second));
    }
    const double s = static_cast<double>(term->scale);
    if (!alpha) alpha = s * static_cast<double>(r);
    // llama.cpp applies alpha / r: the rest of this module's scale goes into B.
    const double fold = s * static_cast<double>(r) / *alpha;
    std::vector<float> a(static_cast<std::size_t>(r * in)), b(static_cast<std::size_t>(n_out * r));
    for (index k = 0; k < r; ++k) {
      const double c = term->c != nullptr ? static_cast<double>(term->c[k]) : 1.0;
      for (index p = 0; p < in; ++p) a[static_cast<std::size_t>(k * in + p)] = static_cast<float>(c * static_cast<double>(term->a(k, p)));
    }
    std::vector<index> perm;
    if (cfg.arch == architecture::llama || cfg.arch == architecture::mistral) {
      if (m.path.ends_with("self_attn.q_proj")) perm = gguf_qk_permutation(n_out, cfg.heads);
      if (m.path.ends_with("self_attn.k_proj")) perm = gguf_qk_permutation(n_out, cfg.kv_heads);
    }
    for (index i = 0; i < n_out; ++i) {
      const index g = perm.empty() ? i : perm[static_cast<std::size_t>(i)];  // HF row i is GGUF row g
      const double lambda = term->lambda != nullptr ? static_cast<double>(term->lambda[i]) : 1.0;
      for (index k = 0; k < r; ++k) {
        b[static_cast<std::size_t>(g * r + k)] = static_cast<float>(fold * lambda * static_cast<double>(term->b(i, k)));
      }
    }
    w.add_f32(*name + ".lora_a", r, in, a);
    w.add_f32(*name + ".lora_b", n_out, r, b);
  }
  w.set("adapter.lora.alpha", io::gguf_value::f32(static_cast<float>(*alpha)));
  if (cfg.arch == architecture::llama || cfg.arch == architecture::mistral) {
    w.set("peft.attention.head_count", io::gguf_value::u32(static_cast<std::uint32_t>(cfg.heads)));
    w.set("peft.attention.head_count_kv", io::gguf_value::u32(static_cast<std::uint32_t>(cfg.kv_heads)));
  }
  w.write(out);
}

/// The transformers module of GGUF base tensor `name` ("blk.3.attn_q.weight" ->
/// "model.layers.3.self_attn.q_proj"), or nullopt.
inline std::optional<std::string> gguf_module_of(architecture arch, const std::string& name, index layers) {
  static const std::vector<std::string> llama_subs = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.o_proj", "mlp.gate_proj",   "mlp.up_proj",
                                                      "mlp.down_proj"};
  static const std::vector<std::string> gpt2_subs = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"};
  const bool gpt2 = arch == architecture::gpt2;
  if (name == "output.weight") return std::string("lm_head");
  for (index l = 0; l < layers; ++l) {
    for (const auto& sub : gpt2 ? gpt2_subs : llama_subs) {
      const std::string module = (gpt2 ? "transformer.h." : "model.layers.") + std::to_string(l) + "." + sub;
      if (gguf_tensor_name(arch, module, "weight") == name) return module;
    }
  }
  return std::nullopt;
}

/// A GGUF LoRA adapter as a LoRA checkpoint (see the top of this header). `model`, when given,
/// supplies the head counts for undoing the q/k row order of "llama" adapters.
inline io::peft_checkpoint<float> import_gguf_lora(const io::gguf_file& f, const lm_config* model = nullptr) {
  constexpr const char* where = "import_gguf_lora";
  if (const auto* t = f.find("general.type"); t == nullptr || !t->is_string() || *t->string_value() != "adapter") {
    detail::raise<format_error>(where, f.source_name() + " is not an adapter (general.type is not 'adapter')");
  }
  if (f.string("adapter.type") != "lora") {
    detail::raise<unsupported_error>(where, f.source_name() + ": adapter.type '" + f.string("adapter.type") + "' is not lora");
  }
  const std::string arch_name = f.string("general.architecture");
  architecture arch = architecture::llama;
  if (arch_name == "qwen2") {
    arch = architecture::qwen2;
  } else if (arch_name == "qwen3") {
    arch = architecture::qwen3;
  } else if (arch_name == "gpt2") {
    arch = architecture::gpt2;
  } else if (arch_name != "llama") {
    detail::raise<unsupported_error>(where, f.source_name() + ": architecture '" + arch_name + "' is not implemented");
  }
  const double alpha = f.number("adapter.lora.alpha").value_or(0.0);
  std::optional<index> heads, kv_heads;
  if (const auto h = f.integer("peft.attention.head_count")) heads = static_cast<index>(*h);
  if (const auto h = f.integer("peft.attention.head_count_kv")) kv_heads = static_cast<index>(*h);
  if (model != nullptr) {
    if (!heads) heads = model->heads;
    if (!kv_heads) kv_heads = model->kv_heads;
  }
  index layers = 0;  // enough layers to name every tensor of the file
  for (const auto& t : f.tensors()) {
    if (t.name.starts_with("blk.")) layers = std::max<index>(layers, std::atoll(t.name.c_str() + 4) + 1);
  }
  io::peft_checkpoint<float> ck;
  ck.config.peft_type = "LORA";
  ck.config.fan_in_fan_out = arch == architecture::gpt2;  // GPT-2's layers are Conv1D in transformers
  ck.config.set_default("task_type", "CAUSAL_LM");
  for (const auto& t : f.tensors()) {
    if (!t.name.ends_with(".lora_a")) {
      if (!t.name.ends_with(".lora_b")) {
        detail::raise<unsupported_error>(where, f.source_name() + ": tensor '" + t.name + "' is not a LoRA factor");
      }
      continue;
    }
    const std::string base = t.name.substr(0, t.name.size() - 7);
    const auto* tb = f.find_tensor(base + ".lora_b");
    if (tb == nullptr) detail::raise<format_error>(where, f.source_name() + ": '" + t.name + "' has no matching .lora_b");
    const auto module = gguf_module_of(arch, base, layers);
    if (!module) detail::raise<unsupported_error>(where, f.source_name() + ": no transformers module for '" + base + "'");
    if (t.ne.size() != 2 || tb->ne.size() != 2 || t.ne[1] != tb->ne[0]) {
      detail::raise<format_error>(where, f.source_name() + ": the shapes of '" + base + "'.lora_a and .lora_b disagree");
    }
    const index in = static_cast<index>(t.ne[0]), r = static_cast<index>(t.ne[1]), n_out = static_cast<index>(tb->ne[1]);
    if (model != nullptr) {
      const auto shape = linear_shape(*model, *module);
      if (!shape || shape->first != n_out || shape->second != in) {
        detail::raise<shape_error>(where, f.source_name() + ": '" + base + "' adapts " + std::to_string(n_out) + "x" +
                                              std::to_string(in) + ", which is not a linear layer of the model");
      }
    }
    const gguf_weight wa = gguf_weight::view(f, t), wb = gguf_weight::view(f, *tb);
    matrix<float> a(r, in), b(n_out, r);
    for (index k = 0; k < r; ++k) wa.dequantize_row(k, a.row(k));
    std::vector<index> perm;
    if (arch == architecture::llama && (module->ends_with("self_attn.q_proj") || module->ends_with("self_attn.k_proj"))) {
      const bool q = module->ends_with("self_attn.q_proj");
      const auto h = q ? heads : kv_heads;
      if (!h) {
        detail::raise<unsupported_error>(where, f.source_name() + ": undoing llama.cpp's row order of '" + base +
                                                    "' needs the model's head counts: give the model (--model)");
      }
      if (*h <= 0 || n_out % (2 * *h) != 0) detail::raise<format_error>(where, "the head count does not divide '" + base + "'");
      perm = gguf_qk_permutation(n_out, *h);
    }
    for (index i = 0; i < n_out; ++i) wb.dequantize_row(perm.empty() ? i : perm[static_cast<std::size_t>(i)], b.row(i));
    const float scale = alpha != 0.0 ? static_cast<float>(alpha / static_cast<double>(r)) : 1.0f;
    ck.add(*module, any_adapter<float>(lora<float>(std::move(a), std::move(b), scale)));
  }
  if (ck.modules.empty()) detail::raise<format_error>(where, f.source_name() + " holds no LoRA tensor");
  return ck;
}

}  // namespace peft::models
