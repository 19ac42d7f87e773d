// peft/models/config.hpp — a decoder-only language model's config.json, as transformers reads it.
//
//   auto cfg = peft::models::lm_config::load("path/to/model");   // the directory or config.json
//   cfg.arch, cfg.hidden_size, cfg.layers, cfg.rope ...
//
// Architectures (model_type): llama, mistral, qwen2, qwen3, gpt2. Every field of config.json is
// either implemented, known not to change the numbers (bookkeeping, generation defaults, dropout:
// the library never applies dropout), or refused by name: unsupported_error for a value the code
// does not implement (another rope type, partial rotary embeddings, quantization_config, ...),
// format_error for a missing or malformed field. See docs/models.md.
#pragma once

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "peft/core/activation.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/io/detail/json_depth.hpp"

namespace peft::models {

enum class architecture : std::uint8_t { llama, mistral, qwen2, qwen3, gpt2 };
using activation = peft::activation;
enum class rope_kind : std::uint8_t { none, default_, linear, llama3 };

/// Rotary embeddings as transformers computes their inverse frequencies.
struct rope_config {
  rope_kind kind = rope_kind::default_;
  double theta = 10000.0;
  double factor = 1.0;                  // linear and llama3
  double low_freq_factor = 1.0;         // llama3
  double high_freq_factor = 4.0;        // llama3
  double original_max_positions = 8192;  // llama3
};

struct lm_config {
  architecture arch = architecture::llama;
  std::string model_type;
  index vocab_size = 0;
  index hidden_size = 0;
  index intermediate_size = 0;
  index layers = 0;
  index heads = 0;
  index kv_heads = 0;
  index head_dim = 0;
  index max_positions = 0;
  double norm_eps = 1e-6;
  activation act = activation::silu;
  rope_config rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;    // q, k, v projections have a bias
  bool o_bias = false;      // the output projection has a bias
  bool mlp_bias = false;
  bool qk_norm = false;     // Qwen3: RMSNorm over each head of q and k before the rotation
  std::vector<index> sliding_window;  // per layer; 0 = full attention
  std::vector<long long> eos_token_ids;

  bool is_gpt2() const noexcept { return arch == architecture::gpt2; }

  /// The most layers a config may declare: far above any real model (a few hundred), low enough
  /// that per-layer tables stay small whatever a malformed file says. format_error above it.
  static constexpr index max_layers = index{1} << 16;

  static lm_config load(const std::filesystem::path& path) {
    const auto file = std::filesystem::is_directory(path) ? path / "config.json" : path;
    std::ifstream in(file);
    if (!in) detail::raise<io_error>("lm_config::load", "cannot open " + file.string());
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      detail::raise<format_error>("lm_config::load", file.string() + " is not valid JSON: " + e.what());
    }
    return from_json(j);
  }

  static lm_config from_json(const nlohmann::json& j) {
    constexpr const char* where = "lm_config";
    if (!j.is_object()) detail::raise<format_error>(where, "config.json is not a JSON object");
    // Copying and dumping a value recurse once per level: refuse a malformed depth first.
    if (io::detail::json_nests_deeper(j, 128)) {
      detail::raise<format_error>(where, "config.json nests arrays and objects more than 128 deep");
    }
    reader r{j, {}};
    lm_config c;
    c.model_type = r.string("model_type");
    if (c.model_type == "llama") {
      c.arch = architecture::llama;
    } else if (c.model_type == "mistral") {
      c.arch = architecture::mistral;
    } else if (c.model_type == "qwen2") {
      c.arch = architecture::qwen2;
    } else if (c.model_type == "qwen3") {
      c.arch = architecture::qwen3;
    } else if (c.model_type == "gpt2") {
      c.arch = architecture::gpt2;
    } else {
      detail::raise<unsupported_error>(where, "model_type '" + c.model_type +
                                                  "' is not implemented (llama, mistral, qwen2, qwen3, gpt2)");
    }
    if (c.is_gpt2()) {
      read_gpt2(r, c);
    } else {
      read_llama_family(r, c);
    }
    r.eos(c);
    r.refuse_unread();
    c.validate();
    return c;
  }

 private:
  /// Reads fields and remembers which were read; refuse_unread() names the first field that is
  /// neither read nor known to leave the numbers alone.
  struct reader {
    const nlohmann::json& j;
    std::set<std::string> read;

    bool has(const std::string& k) {
      read.insert(k);
      return j.contains(k) && !j.at(k).is_null();
    }
    [[noreturn]] void bad(const std::string& k, const char* what) {
      detail::raise<format_error>("lm_config", "field '" + k + "' " + what);
    }
    std::string string(const std::string& k) {
      if (!has(k) || !j.at(k).is_string()) bad(k, "must be a string");
      return j.at(k).get<std::string>();
    }
    index integer(const std::string& k) {
      if (!has(k) || !j.at(k).is_number_integer() || j.at(k).get<long long>() <= 0) bad(k, "must be a positive integer");
      return static_cast<index>(j.at(k).get<long long>());
    }
    index integer_or(const std::string& k, index fallback) { return has(k) ? integer(k) : fallback; }
    double number(const std::string& k) {
      if (!has(k) || !j.at(k).is_number()) bad(k, "must be a number");
      return j.at(k).get<double>();
    }
    double number_or(const std::string& k, double fallback) { return has(k) ? number(k) : fallback; }
    bool boolean_or(const std::string& k, bool fallback) {
      if (!has(k)) return fallback;
      if (!j.at(k).is_boolean()) bad(k, "must be true or false");
      return j.at(k).get<bool>();
    }
    /// A field whose only implemented value is `ok` (or absent/null).
    template <class V>
    void only(const std::string& k, const V& ok, const char* why) {
      if (!has(k)) return;
      if (j.at(k) != nlohmann::json(ok)) {
        detail::raise<unsupported_error>("lm_config", "field '" + k + "' = " + j.at(k).dump() + " is not implemented (" + why + ")");
      }
    }
    void eos(lm_config& c) {
      if (!has("eos_token_id")) return;
      const auto& e = j.at("eos_token_id");
      if (e.is_number_integer()) {
        c.eos_token_ids.push_back(e.get<long long>());
      } else if (e.is_array()) {
        for (const auto& v : e) {
          if (!v.is_number_integer()) bad("eos_token_id", "must be an integer or a list of integers");
          c.eos_token_ids.push_back(v.get<long long>());
        }
      } else {
        bad("eos_token_id", "must be an integer or a list of integers");
      }
    }
    void refuse_unread() {
      for (const auto& [k, v] : j.items()) {
        // An unknown switch that is off (false) asks for nothing; any other value is refused.
        if (read.count(k) || harmless(k) || v.is_null() || (v.is_boolean() && !v.get<bool>())) continue;
        detail::raise<unsupported_error>("lm_config", "field '" + k + "' (= " + v.dump().substr(0, 60) +
                                                          ") is not implemented; see docs/models.md");
      }
    }
  };

  /// Fields that do not change the forward pass: bookkeeping, tokenizer ids, generation defaults
  /// (the caller's options decide generation), dropout (never applied), initialisation.
  static bool harmless(const std::string& k) {
    static const std::set<std::string> names = {
        "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "_commit_hash",
        "use_cache", "initializer_range", "bos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
        "id2label", "label2id", "_num_labels", "num_labels", "problem_type", "finetuning_task", "tokenizer_class",
        "prefix", "task_specific_params", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
        "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_decoder",
        "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
        "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
        "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
        "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
        "begin_suppress_tokens", "_attn_implementation_autoset", "attention_dropout", "attn_pdrop", "embd_pdrop",
        "resid_pdrop", "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
        "summary_use_proj", "pretraining_tp", "n_ctx", "output_router_logits", "router_aux_loss_coef",
        "gradient_checkpointing", "output_past"};
    return names.count(k) != 0;
  }

  static void read_rope(reader& r, lm_config& c) {
    // transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters {rope_type, rope_theta, ...}.
    c.rope.theta = r.number_or("rope_theta", 10000.0);
    nlohmann::json scaling;
    if (r.has("rope_parameters")) scaling = r.j.at("rope_parameters");
    if (r.has("rope_scaling")) scaling = r.j.at("rope_scaling");
    if (scaling.is_null()) return;
    if (!scaling.is_object()) r.bad("rope_scaling", "must be an object");
    std::string type = "default";
    for (const char* k : {"rope_type", "type"}) {
      if (!scaling.contains(k)) continue;
      if (!scaling.at(k).is_string()) r.bad(std::string("rope_scaling.") + k, "must be a string");
      type = scaling.at(k).get<std::string>();
      break;
    }
    auto num = [&](const char* k, double fallback) {
      if (!scaling.contains(k) || scaling.at(k).is_null()) return fallback;
      if (!scaling.at(k).is_number()) r.bad(std::string("rope_scaling.") + k, "must be a number");
      return scaling.at(k).get<double>();
    };
    c.rope.theta = num("rope_theta", c.rope.theta);
    std::set<std::string> known = {"rope_type", "type", "rope_theta"};
    if (type == "default") {
      c.rope.kind = rope_kind::default_;
    } else if (type == "linear") {
      c.rope.kind = rope_kind::linear;
      c.rope.factor = num("factor", 1.0);
      known.insert("factor");
    } else if (type == "llama3") {
      c.rope.kind = rope_kind::llama3;
      c.rope.factor = num("factor", 8.0);
      c.rope.low_freq_factor = num("low_freq_factor", 1.0);
      c.rope.high_freq_factor = num("high_freq_factor", 4.0);
      c.rope.original_max_positions = num("original_max_position_embeddings", 8192);
      known.insert({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"});
    } else {
      detail::raise<unsupported_error>("lm_config", "rope type '" + type + "' is not implemented (default, linear, llama3)");
    }
    for (const auto& [k, v] : scaling.items()) {
      if (known.count(k) || v.is_null()) continue;
      if (k == "partial_rotary_factor" && v.is_number() && v.get<double>() == 1.0) continue;
      detail::raise<unsupported_error>("lm_config", "rope field '" + k + "' is not implemented for rope type '" + type + "'");
    }
    if (c.rope.factor <= 0) r.bad("rope_scaling.factor", "must be positive");
  }

  static activation read_activation(reader& r, const std::string& k, const std::string& fallback) {
    const std::string a = r.has(k) ? r.string(k) : fallback;
    if (a == "silu" || a == "swish") return activation::silu;
    if (a == "gelu") return activation::gelu;
    if (a == "gelu_new" || a == "gelu_pytorch_tanh" || a == "gelu_fast") return activation::gelu_tanh;
    if (a == "relu") return activation::relu;
    detail::raise<unsupported_error>("lm_config", k + " '" + a + "' is not implemented (silu, gelu, gelu_new, relu)");
  }

  static void read_llama_family(reader& r, lm_config& c) {
    c.vocab_size = r.integer("vocab_size");
    c.hidden_size = r.integer("hidden_size");
    c.intermediate_size = r.integer("intermediate_size");
    c.layers = r.integer("num_hidden_layers");
    if (c.layers > max_layers) r.bad("num_hidden_layers", "must be at most 65536");
    c.heads = r.integer("num_attention_heads");
    c.kv_heads = r.integer_or("num_key_value_heads", c.heads);
    c.head_dim = r.integer_or("head_dim", c.hidden_size / c.heads);
    c.max_positions = r.integer_or("max_position_embeddings", 2048);
    c.norm_eps = r.number_or("rms_norm_eps", 1e-6);
    c.act = read_activation(r, "hidden_act", "silu");
    c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", c.arch == architecture::qwen3 ? false : false);
    read_rope(r, c);
    r.only("partial_rotary_factor", 1.0, "rotary embeddings over part of each head");
    r.only("attn_logit_softcapping", nullptr, "logit soft-capping");
    r.only("final_logit_softcapping", nullptr, "logit soft-capping");
    r.only("quantization_config", nullptr, "pre-quantized checkpoints; use --quantize-base instead");
    r.only("use_mrope", false, "multimodal rotary embeddings");
    r.only("is_encoder_decoder", false, "encoder-decoder models");
    r.only("add_cross_attention", false, "cross-attention");
    const bool attn_bias = r.boolean_or("attention_bias", false);
    switch (c.arch) {
      case architecture::qwen2:
        c.qkv_bias = true;  // Qwen2's q/k/v always have a bias, o_proj never
        c.o_bias = false;
        break;
      case architecture::qwen3:
        c.qkv_bias = attn_bias;
        c.o_bias = attn_bias;
        c.qk_norm = true;
        break;
      default:
        c.qkv_bias = attn_bias;
        c.o_bias = attn_bias;
    }
    c.mlp_bias = c.arch == architecture::llama ? r.boolean_or("mlp_bias", false) : false;
    if (c.arch != architecture::llama) r.only("mlp_bias", false, "a bias on the MLP of this architecture");
    read_sliding_window(r, c);
  }

  /// Which layers attend within a window: Mistral's sliding_window applies to every layer; Qwen2/3
  /// use it only with use_sliding_window, on layers >= max_window_layers (or as layer_types says).
  static void read_sliding_window(reader& r, lm_config& c) {
    c.sliding_window.assign(static_cast<std::size_t>(c.layers), 0);
    const index window = r.has("sliding_window") ? r.integer("sliding_window") : 0;
    std::vector<std::string> types;
    if (r.has("layer_types")) {
      const auto& lt = r.j.at("layer_types");
      if (!lt.is_array() || static_cast<index>(lt.size()) != c.layers) r.bad("layer_types", "must list one type per layer");
      for (const auto& t : lt) {
        const auto s = t.is_string() ? t.get<std::string>() : std::string();
        if (s != "full_attention" && s != "sliding_attention") {
          detail::raise<unsupported_error>("lm_config", "layer type '" + t.dump() + "' is not implemented");
        }
        types.push_back(s);
      }
    }
    if (c.arch == architecture::mistral || c.arch == architecture::llama) {
      if (c.arch == architecture::llama) r.only("sliding_window", nullptr, "Llama has no sliding window");
      for (index l = 0; l < c.layers; ++l) {
        const bool sliding = types.empty() || types[static_cast<std::size_t>(l)] == "sliding_attention";
        c.sliding_window[static_cast<std::size_t>(l)] = sliding ? window : 0;
      }
      return;
    }
    const bool use = r.boolean_or("use_sliding_window", false);
    const index max_window_layers = r.has("max_window_layers") ? r.integer("max_window_layers") : c.layers;
    for (index l = 0; l < c.layers; ++l) {
      bool sliding = false;
      if (!types.empty()) {
        sliding = types[static_cast<std::size_t>(l)] == "sliding_attention";
      } else {
        sliding = use && l >= max_window_layers;
      }
      if (sliding && window == 0) r.bad("sliding_window", "must be set when layers use a sliding window");
      c.sliding_window[static_cast<std::size_t>(l)] = sliding ? window : 0;
    }
  }

  static void read_gpt2(reader& r, lm_config& c) {
    c.vocab_size = r.integer("vocab_size");
    c.hidden_size = r.integer("n_embd");
    c.layers = r.integer("n_layer");
    if (c.layers > max_layers) r.bad("n_layer", "must be at most 65536");
    c.heads = r.integer("n_head");
    c.kv_heads = c.heads;
    c.head_dim = c.hidden_size / c.heads;
    if (r.has("n_inner")) {
      c.intermediate_size = r.integer("n_inner");
    } else if (c.hidden_size > std::numeric_limits<index>::max() / 4) {
      r.bad("n_embd", "is too large for n_inner = 4 n_embd");
    } else {
      c.intermediate_size = 4 * c.hidden_size;
    }
    c.max_positions = r.integer("n_positions");
    c.norm_eps = r.number_or("layer_norm_epsilon", 1e-5);
    c.act = read_activation(r, "activation_function", "gelu_new");
    c.rope.kind = rope_kind::none;
    c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", true);
    c.qkv_bias = c.o_bias = c.mlp_bias = true;
    c.sliding_window.assign(static_cast<std::size_t>(c.layers), 0);
    r.only("scale_attn_weights", true, "unscaled attention scores");
    r.only("scale_attn_by_inverse_layer_idx", false, "scores scaled by the inverse layer index");
    r.boolean_or("reorder_and_upcast_attn", false);  // numerics only: scores are computed in float anyway
    r.only("add_cross_attention", false, "cross-attention");
    r.only("quantization_config", nullptr, "pre-quantized checkpoints; use --quantize-base instead");
  }

 public:
  /// format_error for fields that contradict each other (heads and kv heads, an odd rotary
  /// head_dim, a non-positive epsilon). load() and the GGUF reader call it.
  void validate() const {
    auto bad = [](const std::string& what) { detail::raise<format_error>("lm_config", what); };
    if (hidden_size % heads != 0 && is_gpt2()) bad("n_embd must be a multiple of n_head");
    if (heads % kv_heads != 0) bad("num_attention_heads must be a multiple of num_key_value_heads");
    if (head_dim < 1) bad("head_dim must be positive (hidden_size is smaller than num_attention_heads)");
    if (rope.kind != rope_kind::none && head_dim % 2 != 0) bad("head_dim must be even for rotary embeddings");
    if (!(norm_eps > 0) || !std::isfinite(norm_eps)) bad("the norm epsilon must be positive");
  }
};

}  // namespace peft::models
