// peft/models/gguf_model.hpp — a llama.cpp model file (GGUF) read as the transformers model it
// was converted from: its hyperparameters as an lm_config, its tensors under transformers' names.
//
//   auto file = peft::io::gguf_file::open("model-Q4_K_M.gguf");
//   auto cfg = peft::models::gguf_config(file);              // llama, qwen2, qwen3, gpt2
//   peft::models::gguf_weights w(file, cfg);
//   auto q = w.base<peft::gguf_weight>("model.layers.0.self_attn.q_proj");   // in place
//
// causal_lm::load(path) uses this for a path ending in .gguf. Names follow llama.cpp's
// convert_hf_to_gguf.py (blk.N.attn_q, ffn_gate, token_embd, output, ...). For general.architecture
// "llama" (Llama and Mistral) the converter permutes the rows of q and k within each head (so
// llama.cpp can rotate adjacent pairs); the rows are put back here (gguf_qk_permutation), as
// encoded rows: nothing is decoded. Every metadata key of the architecture and every tensor is
// either used or refused by name (unsupported_error), as config.json's fields are: general.*,
// tokenizer.* and quantize.* keys are bookkeeping. See docs/gguf.md.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/base/gguf_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/io/gguf.hpp"
#include "peft/io/model_bases.hpp"
#include "peft/models/config.hpp"

namespace peft::models {

/// The GGUF name of transformers' tensor "<module>.<suffix>" for `arch` ("blk.0.attn_q.weight"),
/// or nullopt for a module the converter does not write.
inline std::optional<std::string> gguf_tensor_name(architecture arch, const std::string& module, const std::string& suffix) {
  struct pair {
    std::string_view hf, gguf;
  };
  static constexpr pair llama_layer[] = {
      {"self_attn.q_proj", "attn_q"},       {"self_attn.k_proj", "attn_k"},   {"self_attn.v_proj", "attn_v"},
      {"self_attn.o_proj", "attn_output"},  {"mlp.gate_proj", "ffn_gate"},    {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"},        {"input_layernorm", "attn_norm"}, {"post_attention_layernorm", "ffn_norm"},
      {"self_attn.q_norm", "attn_q_norm"},  {"self_attn.k_norm", "attn_k_norm"}};
  static constexpr pair gpt2_layer[] = {{"ln_1", "attn_norm"},     {"attn.c_attn", "attn_qkv"}, {"attn.c_proj", "attn_output"},
                                        {"ln_2", "ffn_norm"},      {"mlp.c_fc", "ffn_up"},      {"mlp.c_proj", "ffn_down"}};
  const bool gpt2 = arch == architecture::gpt2;
  const std::string root = gpt2 ? "transformer." : "model.";
  const std::string layers = gpt2 ? "transformer.h." : "model.layers.";
  auto whole = [&](std::string_view name) { return std::string(name) + "." + suffix; };
  if (module == root + (gpt2 ? "wte" : "embed_tokens")) return whole("token_embd");
  if (gpt2 && module == "transformer.wpe") return whole("position_embd");
  if (module == root + (gpt2 ? "ln_f" : "norm")) return whole("output_norm");
  if (module == "lm_head") return whole("output");
  if (!module.starts_with(layers)) return std::nullopt;
  const std::string rest = module.substr(layers.size());
  const auto dot = rest.find('.');
  if (dot == std::string::npos || dot == 0 || !std::all_of(rest.begin(), rest.begin() + static_cast<std::ptrdiff_t>(dot), [](char c) { return c >= '0' && c <= '9'; })) {
    return std::nullopt;
  }
  const std::string sub = rest.substr(dot + 1);
  for (const pair& p : gpt2 ? std::span<const pair>(gpt2_layer) : std::span<const pair>(llama_layer)) {
    if (sub == p.hf) return "blk." + rest.substr(0, dot) + "." + std::string(p.gguf) + "." + suffix;
  }
  return std::nullopt;
}

/// The (out, in) shape of linear `module` in a model of config `c` ("model.layers.0.mlp.down_proj"
/// -> (hidden, intermediate)), or nullopt for a module that is not one of its linear layers.
inline std::optional<std::pair<index, index>> linear_shape(const lm_config& c, const std::string& module) {
  const index H = c.hidden_size, I = c.intermediate_size, q = c.heads * c.head_dim, kv = c.kv_heads * c.head_dim;
  const auto name = gguf_tensor_name(c.arch, module, "weight");
  if (!name || !name->starts_with("blk.")) {
    if (module == "lm_head") return std::pair<index, index>{c.vocab_size, H};
    return std::nullopt;
  }
  const std::string layer = name->substr(4, name->find('.', 4) - 4);
  if (std::stoll(layer) >= c.layers) return std::nullopt;
  const std::string kind = name->substr(name->find('.', 4) + 1);
  if (kind == "attn_q.weight") return std::pair<index, index>{q, H};
  if (kind == "attn_k.weight" || kind == "attn_v.weight") return std::pair<index, index>{kv, H};
  if (kind == "attn_output.weight") return std::pair<index, index>{H, q};
  if (kind == "attn_qkv.weight") return std::pair<index, index>{3 * H, H};
  if (kind == "ffn_gate.weight" || kind == "ffn_up.weight") return std::pair<index, index>{I, H};
  if (kind == "ffn_down.weight") return std::pair<index, index>{H, I};
  return std::nullopt;
}

/// The rows of a head-permuted q or k projection put back: result row r is GGUF row perm[r].
/// llama.cpp's converter stores, within each of `heads` heads of head_dim rows, row h*hd + t*hd/2
/// + j at h*hd + 2j + t (t in {0, 1}). `heads` is the number of query heads for q and of key/value
/// heads for k.
inline std::vector<index> gguf_qk_permutation(index rows, index heads) {
  std::vector<index> perm(static_cast<std::size_t>(rows));
  const index hd = rows / heads, half = hd / 2;
  for (index h = 0; h < heads; ++h) {
    for (index t = 0; t < 2; ++t) {
      for (index j = 0; j < half; ++j) perm[static_cast<std::size_t>(h * hd + t * half + j)] = h * hd + 2 * j + t;
    }
  }
  return perm;
}

/// The model's hyperparameters from the file's metadata: general.architecture "llama" (Llama and
/// Mistral), "qwen2", "qwen3" or "gpt2"; the vocabulary from token_embd. unsupported_error naming
/// the key for an architecture, a key or a value not implemented (rope scaling other than
/// linear, partial rotary embeddings, experts, ...); format_error for missing or malformed keys.
inline lm_config gguf_config(const io::gguf_file& f) {
  constexpr const char* where = "gguf_config";
  lm_config c;
  const std::string a = f.string("general.architecture");
  if (a == "llama") {
    c.arch = architecture::llama;
  } else if (a == "qwen2") {
    c.arch = architecture::qwen2;
  } else if (a == "qwen3") {
    c.arch = architecture::qwen3;
  } else if (a == "gpt2") {
    c.arch = architecture::gpt2;
  } else {
    detail::raise<unsupported_error>(where, f.source_name() + ": architecture '" + a +
                                                "' is not implemented (llama, qwen2, qwen3, gpt2)");
  }
  c.model_type = a;
  std::set<std::string, std::less<>> read;
  auto key = [&](const std::string& k) {
    read.insert(a + "." + k);
    return a + "." + k;
  };
  auto need = [&](const std::string& k) -> index {
    const auto v = f.integer(key(k));
    if (!v || *v <= 0) detail::raise<format_error>(where, f.source_name() + ": '" + a + "." + k + "' must be a positive integer");
    return static_cast<index>(*v);
  };
  auto optional_int = [&](const std::string& k, index fallback) -> index {
    const auto v = f.integer(key(k));
    if (v && *v <= 0) detail::raise<format_error>(where, f.source_name() + ": '" + a + "." + k + "' must be a positive integer");
    return v ? static_cast<index>(*v) : fallback;
  };
  c.hidden_size = need("embedding_length");
  c.layers = need("block_count");
  if (c.layers > lm_config::max_layers) {
    detail::raise<format_error>(where, f.source_name() + ": '" + a + ".block_count' must be at most 65536");
  }
  c.intermediate_size = need("feed_forward_length");
  c.heads = need("attention.head_count");
  c.kv_heads = optional_int("attention.head_count_kv", c.heads);
  c.max_positions = need("context_length");
  c.head_dim = optional_int("attention.key_length", c.hidden_size / c.heads);
  if (optional_int("attention.value_length", c.head_dim) != c.head_dim) {
    detail::raise<unsupported_error>(where, f.source_name() + ": '" + a + ".attention.value_length' differs from key_length");
  }
  const auto* embd = f.find_tensor("token_embd.weight");
  if (embd == nullptr || embd->ne.size() != 2) detail::raise<format_error>(where, f.source_name() + ": no 2-D token_embd.weight");
  c.vocab_size = static_cast<index>(embd->ne[1]);
  if (optional_int("vocab_size", c.vocab_size) != c.vocab_size) {
    detail::raise<format_error>(where, f.source_name() + ": '" + a + ".vocab_size' disagrees with token_embd.weight");
  }
  c.tie_word_embeddings = f.find_tensor("output.weight") == nullptr;
  c.sliding_window.assign(static_cast<std::size_t>(c.layers), 0);
  if (c.is_gpt2()) {
    c.norm_eps = f.number(key("attention.layer_norm_epsilon")).value_or(1e-5);
    c.act = activation::gelu_tanh;
    c.rope.kind = rope_kind::none;
    c.qkv_bias = c.o_bias = c.mlp_bias = true;
  } else {
    c.norm_eps = f.number(key("attention.layer_norm_rms_epsilon")).value_or(1e-6);
    c.act = activation::silu;
    c.rope.theta = f.number(key("rope.freq_base")).value_or(10000.0);
    if (optional_int("rope.dimension_count", c.head_dim) != c.head_dim) {
      detail::raise<unsupported_error>(where, f.source_name() + ": '" + a +
                                                  ".rope.dimension_count' is not the head size (partial rotary embeddings)");
    }
    // llama.cpp: a factor of 0 (or none) is no scaling; the type defaults to linear.
    const double factor = f.number(key("rope.scaling.factor")).value_or(0.0);
    std::string type = "linear";
    if (const auto* t = f.find(key("rope.scaling.type")); t != nullptr) type = t->is_string() ? *t->string_value() : "?";
    if (type != "none" && factor != 0.0 && factor != 1.0) {
      if (type != "linear") {
        detail::raise<unsupported_error>(where, f.source_name() + ": '" + a + ".rope.scaling.type' " + type + " is not implemented");
      }
      c.rope.kind = rope_kind::linear;
      c.rope.factor = factor;
    }
    key("rope.scaling.factor");
    c.qkv_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
    c.o_bias = f.find_tensor("blk.0.attn_output.bias") != nullptr;
    c.mlp_bias = f.find_tensor("blk.0.ffn_up.bias") != nullptr;
    c.qk_norm = f.find_tensor("blk.0.attn_q_norm.weight") != nullptr;
  }
  if (const auto eos = f.integer("tokenizer.ggml.eos_token_id")) c.eos_token_ids.push_back(*eos);
  // Every key of the architecture is read or refused.
  for (const auto& [k, v] : f.metadata()) {
    if (!k.starts_with(a + ".") || read.count(k) != 0) continue;
    detail::raise<unsupported_error>(where, f.source_name() + ": metadata '" + k + "' is not implemented");
  }
  c.validate();
  return c;
}

/// The tensors of a GGUF model by transformers' module names (see the top of this header).
class gguf_weights {
 public:
  gguf_weights(const io::gguf_file& f, const lm_config& c) : f_(f), c_(c) {}

  /// Whether the file has "<module>.<suffix>".
  bool has(const std::string& module, const std::string& suffix) const {
    const auto n = gguf_tensor_name(c_.arch, module, suffix);
    return n && f_.find_tensor(*n) != nullptr;
  }

  /// The tensor as a (rows, cols) matrix of T (decoded; rows of q and k put back).
  template <class T>
  matrix<T> read_matrix(const std::string& module, const std::string& suffix, index rows, index cols) const {
    const gguf_weight w = weight(module, suffix, rows, cols);
    matrix<T> m(rows, cols);
    for (index i = 0; i < rows; ++i) w.dequantize_row(i, m.row(i));
    return m;
  }

  /// A 1-D tensor of n values as T.
  template <class T>
  std::vector<T> read_vector(const std::string& module, const std::string& suffix, index n) const {
    const matrix<T> m = read_matrix<T>(module, suffix, 1, n);
    return std::vector<T>(m.row(0), m.row(0) + n);
  }

  /// The base of linear `module` of shape (out, in), with its bias when the file has one:
  /// in place for gguf_weight, decoded and then converted (dense) or re-quantized for others.
  template <base_weight Base>
  Base base(const std::string& module, index out, index in) const {
    std::vector<float> bias;
    if (has(module, "bias")) bias = read_vector<float>(module, "bias", out);
    if constexpr (std::is_same_v<Base, gguf_weight>) {
      const std::string name = *gguf_tensor_name(c_.arch, module, "weight");
      const auto* t = find(name, module + ".weight");
      used_.insert(name);
      check_shape(*t, out, in);
      gguf_weight w = gguf_weight::view(f_, *t, std::move(bias));
      if (const auto heads = permuted_heads(module)) return w.permuted_rows(gguf_qk_permutation(out, *heads));
      return w;
    } else {
      using U = std::conditional_t<io::detail::stores_double<Base>(), double, float>;
      const matrix<U> w = read_matrix<U>(module, "weight", out, in);
      std::vector<U> b(bias.begin(), bias.end());
      return io::detail::make_base<Base, U>(w.view(), b.empty() ? nullptr : b.data());
    }
  }

  /// unsupported_error naming the first tensor of the file no read used (an unknown layer type,
  /// experts, llama3's rope_freqs, ...).
  void check_all_used() const {
    for (const auto& t : f_.tensors()) {
      if (used_.count(t.name) == 0) {
        detail::raise<unsupported_error>("gguf_weights", f_.source_name() + ": tensor '" + t.name + "' is not implemented");
      }
    }
  }

 private:
  const io::gguf_tensor_info* find(const std::string& name, const std::string& hf) const {
    const auto* t = f_.find_tensor(name);
    if (t == nullptr) detail::raise<format_error>("gguf_weights", f_.source_name() + " has no tensor '" + name + "' (" + hf + ")");
    return t;
  }

  static void check_shape(const io::gguf_tensor_info& t, index rows, index cols) {
    const bool vector = rows == 1 && t.ne.size() == 1 && t.ne[0] == cols;
    const bool mat = t.ne.size() == 2 && t.ne[0] == cols && t.ne[1] == rows;
    if (!vector && !mat) {
      std::string ne;
      for (auto d : t.ne) ne += (ne.empty() ? "" : ", ") + std::to_string(d);
      detail::raise<format_error>("gguf_weights", "tensor '" + t.name + "' has ne [" + ne + "], expected " + std::to_string(rows) +
                                                      " rows of " + std::to_string(cols));
    }
  }

  /// For llama-architecture q and k (weights and biases): the head count of the permutation.
  std::optional<index> permuted_heads(const std::string& module) const {
    if (c_.arch != architecture::llama) return std::nullopt;
    if (module.ends_with("self_attn.q_proj")) return c_.heads;
    if (module.ends_with("self_attn.k_proj")) return c_.kv_heads;
    return std::nullopt;
  }

  /// The tensor "<module>.<suffix>" as a gguf_weight of (rows, cols), rows put back.
  gguf_weight weight(const std::string& module, const std::string& suffix, index rows, index cols) const {
    const auto name = gguf_tensor_name(c_.arch, module, suffix);
    if (!name) detail::raise<format_error>("gguf_weights", "no GGUF name for '" + module + "." + suffix + "'");
    io::gguf_tensor_info t = *find(*name, module + "." + suffix);
    used_.insert(*name);
    check_shape(t, rows, cols);
    if (t.ne.size() == 1) t.ne.push_back(1);
    gguf_weight w = gguf_weight::view(f_, t);
    if (const auto heads = permuted_heads(module)) {
      // A bias of q or k is one row here: permute its values.
      if (rows == 1) {
        std::vector<float> v(static_cast<std::size_t>(cols));
        w.dequantize_row(0, v.data());
        const auto perm = gguf_qk_permutation(cols, *heads);
        std::vector<float> out(v.size());
        for (std::size_t i = 0; i < v.size(); ++i) out[i] = v[static_cast<std::size_t>(perm[i])];
        std::vector<std::byte> bytes(out.size() * sizeof(float));
        std::memcpy(bytes.data(), out.data(), bytes.size());
        return gguf_weight::own(io::ggml_type::f32, 1, cols, std::move(bytes));
      }
      return w.permuted_rows(gguf_qk_permutation(rows, *heads));
    }
    return w;
  }

  const io::gguf_file& f_;
  const lm_config& c_;
  mutable std::set<std::string> used_;
};

}  // namespace peft::models
