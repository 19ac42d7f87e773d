// peft/models/causal_lm.hpp — decoder-only language models (Llama, Mistral, Qwen2, Qwen3, GPT-2)
// whose every projection is an adapted linear layer over a frozen base.
//
//   auto lm = peft::models::causal_lm<float>::load("path/to/model");        // dense f32 bases
//   auto q  = peft::models::causal_lm<float, peft::nf4>::load("path/to/model");  // QLoRA bases
//   peft::models::token_batch b = peft::models::token_batch::from_rows({{1, 5, 9}, {1, 7}});
//   auto logits = lm.forward(b);                        // (sequences * length, vocab)
//   double loss = lm.loss_and_backward(b, b.causal_labels());   // adapter grads +=
//
// Modules are named as transformers names them in *ForCausalLM ("model.layers.0.self_attn.q_proj",
// GPT-2's "transformer.h.0.attn.c_attn"); `modules()` lists them for attaching adapters
// (models/peft_model.hpp does it PEFT's way). Numbers follow transformers: see docs/models.md.
// Not thread-safe: forward stores what backward needs.
#pragma once

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <type_traits>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/any_adapter.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/io/embedding_adapters.hpp"
#include "peft/io/model_bases.hpp"
#include "peft/io/gguf.hpp"
#include "peft/io/model_files.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/kernels/attention.hpp"
#include "peft/kernels/gemm.hpp"
#include "peft/kernels/parallel.hpp"
#include "peft/kernels/transformer.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "peft/models/config.hpp"
#include "peft/models/gguf_model.hpp"
#include "peft/models/ops.hpp"

namespace peft::models {

/// Label value that takes no part in the loss (transformers' ignore_index).
inline constexpr long long ignore_label = -100;

/// A batch of token sequences: ids (sequences, length) row-major, a 0/1 attention mask of the
/// same shape (empty: all 1) and position ids (empty: the column index, as transformers' forward).
struct token_batch {
  index sequences = 0;
  index length = 0;
  std::vector<long long> ids;
  std::vector<unsigned char> mask;
  std::vector<long long> positions;

  /// Right-padded rows (pad id 0, mask 0).
  static token_batch from_rows(const std::vector<std::vector<long long>>& rows) {
    token_batch b;
    b.sequences = static_cast<index>(rows.size());
    for (const auto& r : rows) b.length = std::max(b.length, static_cast<index>(r.size()));
    b.ids.assign(static_cast<std::size_t>(b.sequences * b.length), 0);
    b.mask.assign(b.ids.size(), 0);
    for (index s = 0; s < b.sequences; ++s) {
      const auto& r = rows[static_cast<std::size_t>(s)];
      for (std::size_t c = 0; c < r.size(); ++c) {
        b.ids[static_cast<std::size_t>(s * b.length) + c] = r[c];
        b.mask[static_cast<std::size_t>(s * b.length) + c] = 1;
      }
    }
    return b;
  }
  bool valid(index s, index c) const { return mask.empty() || mask[static_cast<std::size_t>(s * length + c)] != 0; }
  /// transformers' labels for causal-LM training: the ids, with masked positions ignored.
  std::vector<long long> causal_labels() const {
    std::vector<long long> l = ids;
    for (index s = 0; s < sequences; ++s) {
      for (index c = 0; c < length; ++c) {
        if (!valid(s, c)) l[static_cast<std::size_t>(s * length + c)] = ignore_label;
      }
    }
    return l;
  }
};

/// Whether `path` names a GGUF model file (its extension is .gguf) rather than a directory.
inline bool is_gguf_path(const std::filesystem::path& path) { return path.extension() == ".gguf"; }

/// The tensors of a transformers model directory by module name (what causal_lm::load reads;
/// gguf_weights is the same for a GGUF file).
struct hf_weights {
  const io::model_files& f;
  bool gpt2 = false;

  bool has(const std::string& module, const std::string& suffix) const { return f.resolve(module, suffix).has_value(); }

  template <class T>
  matrix<T> read_matrix(const std::string& module, const std::string& suffix, index rows, index cols) const {
    const std::string name = checked(module, suffix, {rows, cols}, std::to_string(rows) + "x" + std::to_string(cols) + " floating");
    auto m = f.file_of(name).template read_matrix<T>(name);
    f.file_of(name).release(name);  // the converted copy is what stays in memory
    return m;
  }
  template <class T>
  std::vector<T> read_vector(const std::string& module, const std::string& suffix, index n) const {
    const std::string name = checked(module, suffix, {n}, std::to_string(n) + " floating values");
    auto v = f.file_of(name).template read<T>(name);
    f.file_of(name).release(name);
    return v;
  }
  template <base_weight Base>
  Base base(const std::string& module, index /*out*/, index /*in*/) const {
    return io::load_base<Base>(f, module, gpt2);
  }

 private:
  std::string checked(const std::string& module, const std::string& suffix, const std::vector<std::int64_t>& shape,
                      const std::string& expected) const {
    const auto name = f.resolve(module, suffix);
    if (!name) detail::raise<format_error>("causal_lm::load", "the model has no tensor '" + module + "." + suffix + "'");
    const auto& info = f.info(*name);
    if (info.shape != shape || !is_floating(info.type)) {
      detail::raise<format_error>("causal_lm::load", "'" + *name + "' is " + detail::shape_text(info.shape) + ", expected " + expected);
    }
    return *name;
  }
};

/// Options of causal_lm::load.
struct load_options {
  bool activation_checkpointing = false;  // keep only each block's input; recompute in backward
  /// Every weight of the model trainable too (needs Base = dense<T>): parameters() then lists
  /// them under their names in model.safetensors, after the adapters' tensors.
  bool full_finetuning = false;
  /// Base = gguf_weight only: llama.cpp's 8-bit activations in the quantized products of skinny
  /// batches (generation), gguf_weight::set_int8_activations. Off: exact f32 activations.
  bool int8_activations = false;
};

template <compute_scalar T, base_weight Base = dense<T>>
class causal_lm {
 public:
  using scalar = T;
  using base_type = Base;
  using adapter_type = any_adapter<T>;
  using linear = adapted_linear<Base, adapter_type>;

  /// Loads config.json and the weights (model.safetensors or a sharded index) from a model
  /// directory, or a llama.cpp model file (a path ending in .gguf; models/gguf_model.hpp): with
  /// Base = gguf_weight its tensors are the bases in place, other bases get decoded copies.
  /// unsupported_error for an architecture or config value not implemented, format_error for a
  /// missing or misshapen tensor, io_error for unreadable files.
  static causal_lm load(const std::filesystem::path& path, load_options opt = {}) {
    causal_lm m;
    m.opt_ = opt;
    if (is_gguf_path(path)) {
      const auto file = io::gguf_file::open(path);
      m.cfg_ = gguf_config(file);
      const gguf_weights w(file, m.cfg_);
      m.load_weights(w);
      w.check_all_used();
    } else {
      m.cfg_ = lm_config::load(path);
      const auto files = io::model_files::open(path);
      m.load_weights(hf_weights{files, m.cfg_.is_gpt2()});
    }
    if (opt.int8_activations) {
      if constexpr (std::is_same_v<Base, gguf_weight>) {
        for (auto& [name, l] : m.modules()) l->base().set_int8_activations(true);
        if (m.head_base_) m.head_base_->set_int8_activations(true);
      } else {
        detail::raise<unsupported_error>("causal_lm::load", "8-bit activations need a GGUF model (Base = gguf_weight)");
      }
    }
    if (opt.full_finetuning) {
      if constexpr (std::is_same_v<Base, dense<T>>) {
        m.full_.emplace(m);
      } else {
        detail::raise<unsupported_error>("causal_lm::load", "full fine-tuning needs dense bases of the compute type");
      }
    }
    return m;
  }

  /// Writes the model's weights as `dir`/model.safetensors (stored as `stored_as`, names and
  /// layouts as read) and its config.json copied from `source_dir`: a model directory
  /// transformers loads (after full fine-tuning, or merge_and_unload).
  void save_pretrained(const std::filesystem::path& dir, const std::filesystem::path& source_dir,
                       dtype stored_as = dtype::f32)
    requires std::is_same_v<Base, dense<T>>
  {
    io::safetensors_writer w;
    w.set_metadata({{"format", "pt"}});
    for (auto& t : named_tensors()) {
      matrix<T> m = to_matrix(matrix_view<const T>(t.value));
      if (t.transposed) {
        matrix<T> tr(m.cols(), m.rows());
        for (index i = 0; i < m.rows(); ++i) {
          for (index j = 0; j < m.cols(); ++j) tr(j, i) = m(i, j);
        }
        m = std::move(tr);
      }
      std::vector<std::int64_t> shape = t.vector ? std::vector<std::int64_t>{m.cols()}
                                                 : std::vector<std::int64_t>{m.rows(), m.cols()};
      w.add(t.name, std::move(shape), std::span<const T>(m.storage()), stored_as);
    }
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) detail::raise<io_error>("causal_lm::save_pretrained", "cannot create " + dir.string());
    w.write(dir / "model.safetensors");
    const auto cfg = std::filesystem::is_directory(source_dir) ? source_dir / "config.json" : source_dir;
    if (std::filesystem::absolute(cfg) != std::filesystem::absolute(dir / "config.json")) {
      std::filesystem::copy_file(cfg, dir / "config.json", std::filesystem::copy_options::overwrite_existing, ec);
      if (ec) detail::raise<io_error>("causal_lm::save_pretrained", "cannot copy " + cfg.string());
    }
  }

  const lm_config& config() const noexcept { return cfg_; }
  index vocab_size() const noexcept { return cfg_.vocab_size; }
  void set_activation_checkpointing(bool on) { opt_.activation_checkpointing = on; }

  /// Every projection, named as transformers names the module, in layer order.
  std::vector<std::pair<std::string, linear*>> modules() {
    std::vector<std::pair<std::string, linear*>> out;
    for (auto& b : blocks_) {
      for (std::size_t p = 0; p < b.proj.size(); ++p) out.emplace_back(b.names[p], b.proj[p].get());
    }
    return out;
  }
  linear* module(const std::string& name) {
    for (auto& [n, l] : modules()) {
      if (n == name) return l;
    }
    return nullptr;
  }

  /// Logits (sequences * length, vocab) row-major; rows of masked positions are 0.
  matrix<T> forward(const token_batch& b) {
    run(b, false);
    matrix<T> logits(b.sequences * b.length, cfg_.vocab_size);
    for (index r = 0; r < packed_.rows; ++r) {
      const index row = packed_.seq[static_cast<std::size_t>(r)] * b.length + packed_.col[static_cast<std::size_t>(r)];
      std::copy(logits_.row(r), logits_.row(r) + cfg_.vocab_size, logits.row(row));
    }
    return logits;
  }

  /// The causal-LM loss of transformers: logits at column c predict labels[c + 1]; -100 is
  /// ignored; the sum of the token losses divided by `normalizer` (default: the number of
  /// predicted tokens, i.e. the mean). Adds d loss / d parameter to every trainable adapter's
  /// gradients (gradient accumulation: pass the total token count of all micro-batches).
  double loss_and_backward(const token_batch& b, const std::vector<long long>& labels, double normalizer = 0) {
    return loss_impl(b, labels, normalizer, true);
  }
  /// The same loss without gradients.
  double loss(const token_batch& b, const std::vector<long long>& labels) { return loss_impl(b, labels, 0, false); }
  /// Number of tokens the loss of (b, labels) averages over.
  static index predicted_tokens(const token_batch& b, const std::vector<long long>& labels) {
    index n = 0;
    for (index s = 0; s < b.sequences; ++s) {
      for (index c = 0; c + 1 < b.length; ++c) n += labels[static_cast<std::size_t>(s * b.length + c + 1)] != ignore_label;
    }
    return n;
  }

  /// Every trainable adapter parameter of the model, named "<module>.<adapter>.<parameter>";
  /// a tensor shared by several modules (VeRA) is listed once.
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> all;
    std::vector<const T*> seen;
    for (auto& [name, l] : modules()) {
      for (auto p : l->parameters()) {
        if (p.shared) {
          if (std::find(seen.begin(), seen.end(), p.value.data()) != seen.end()) continue;
          seen.push_back(p.value.data());
        }
        p.name = name + "." + p.name;
        all.push_back(std::move(p));
      }
    }
    for (auto& t : tables_) {
      auto add = [&](std::string name, matrix<T>& v, matrix<T>& g) {
        parameter<T> p;
        p.name = std::move(name);
        p.value = v.view();
        p.grad = g.view();
        p.shape = {v.rows(), v.cols()};
        all.push_back(std::move(p));
      };
      const std::string e = embedding_path() + "." + t.name + ".";
      if (t.lora) {
        add(e + "lora_embedding_A", t.lora->a, t.grad_a);
        add(e + "lora_embedding_B", t.lora->b, t.grad_b);
      }
      if (t.tokens) add(e + "token_adapter.trainable_tokens_delta", t.tokens->values, t.grad_tokens);
      if (t.head) add("lm_head." + t.name + ".token_adapter.trainable_tokens_delta", t.head->values, t.grad_head);
    }
    if (full_) {
      auto named = named_tensors();
      for (std::size_t i = 0; i < named.size(); ++i) {
        auto& t = named[i];
        parameter<T> p;
        p.name = t.name;
        p.value = t.value;
        p.grad = full_->grads[i].view();
        p.shape = t.vector ? std::vector<std::int64_t>{t.value.cols()}
                           : t.transposed ? std::vector<std::int64_t>{t.value.cols(), t.value.rows()}
                                          : std::vector<std::int64_t>{t.value.rows(), t.value.cols()};
        all.push_back(std::move(p));
      }
    }
    return all;
  }
  void zero_grad() {
    for (auto& [name, l] : modules()) l->zero_grad();
    for (auto& t : tables_) {
      for (auto* g : {&t.grad_a, &t.grad_b, &t.grad_tokens, &t.grad_head}) g->fill(T{0});
    }
    if (full_) {
      for (auto& g : full_->grads) g.fill(T{0});
    }
  }
  bool full_finetuning() const noexcept { return full_.has_value(); }

  // ---- adapters on the token table ------------------------------------------------------------

  /// An adapter on the token table, run unmerged (PEFT's lora.Embedding and trainable tokens,
  /// io/embedding_adapters.hpp). The lookup of token t takes row t of `tokens` when t is one of
  /// its indices, then gets s (B A[:, t])^T from `lora`. `head` replaces rows of an untied
  /// lm_head; with tie_word_embeddings `tokens` replace the head's rows too (PEFT ties the
  /// layers), `lora` does not (PEFT adds it to the lookup only). At most one is enabled at a time.
  struct table_adapter {
    std::string name;
    bool enabled = true;
    std::optional<io::embedding_lora<T>> lora;
    std::optional<io::trainable_tokens<T>> tokens;
    std::optional<io::trainable_tokens<T>> head;
    matrix<T> grad_a, grad_b, grad_tokens, grad_head;  // shaped as the values
  };
  /// The input embedding's module path: "model.embed_tokens" (GPT-2: "transformer.wte").
  std::string embedding_path() const { return gpt2() ? "transformer.wte" : "model.embed_tokens"; }
  /// Whether the embeddings are read from a GGUF file in place (no table adapters then).
  bool embeddings_in_file() const noexcept { return embed_base_.has_value(); }
  std::vector<table_adapter>& table_adapters() noexcept { return tables_; }
  const std::vector<table_adapter>& table_adapters() const noexcept { return tables_; }

  /// Merges the enabled table adapters into the embedding table (and an untied lm_head) in
  /// double, rounding once, and removes every table adapter. With tied embeddings the head
  /// shares the merged table (PEFT's merge writes the shared weight).
  void merge_table_adapters() {
    constexpr const char* where = "causal_lm::merge_table_adapters";
    if (embed_base_ && !tables_.empty()) detail::raise<unsupported_error>(where, "the embeddings are a GGUF file's");
    for (const auto& t : tables_) {
      if (!t.enabled) continue;
      auto merge_into = [&](matrix<T>& w, auto&& change) {
        matrix<double> d(w.rows(), w.cols());
        for (index i = 0; i < w.size(); ++i) d.data()[i] = static_cast<double>(w.data()[i]);
        change(d);
        for (index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<T>(d.data()[i]);
      };
      if (t.lora || t.tokens) {
        merge_into(embed_, [&](matrix<double>& d) {
          if (t.tokens) t.tokens->apply(d.view());
          if (t.lora) t.lora->add_delta(d.view());
        });
      }
      if (t.head) merge_into(lm_head_, [&](matrix<double>& d) { t.head->apply(d.view()); });
    }
    tables_.clear();
  }

  // ---- generation with a key/value cache ---------------------------------------------------

  /// Keys and values of the tokens seen so far of one sequence.
  class kv_cache {
   public:
    index size() const noexcept { return len_; }

   private:
    friend class causal_lm;
    std::vector<matrix<T>> k, v;  // per layer (capacity, kv_heads * head_dim)
    index len_ = 0;
  };

  kv_cache new_cache(index capacity) const {
    kv_cache c;
    const index kvd = cfg_.kv_heads * cfg_.head_dim;
    for (index l = 0; l < cfg_.layers; ++l) {
      c.k.emplace_back(capacity, kvd);
      c.v.emplace_back(capacity, kvd);
    }
    return c;
  }

  /// Runs `tokens` (positions cache.size()...) through the model, appending their keys and
  /// values to `cache`; returns the logits of the last token (vocab).
  std::vector<T> decode(kv_cache& cache, const std::vector<long long>& tokens) {
    constexpr const char* where = "causal_lm::decode";
    if (tokens.empty()) detail::raise<error>(where, "no tokens");
    const index start = cache.len_;
    const index n = static_cast<index>(tokens.size());
    if (cache.k.empty() || start + n > cache.k.front().rows()) {
      detail::raise<error>(where, "the cache holds " + std::to_string(cache.k.empty() ? 0 : cache.k.front().rows()) +
                                      " tokens; " + std::to_string(start + n) + " needed");
    }
    token_batch b;
    b.sequences = 1;
    b.length = start + n;
    b.ids.assign(static_cast<std::size_t>(start), 0);
    b.ids.insert(b.ids.end(), tokens.begin(), tokens.end());
    b.mask.assign(static_cast<std::size_t>(start), 0);
    b.mask.resize(static_cast<std::size_t>(start + n), 1);
    cache_ = &cache;
    last_logits_only_ = true;
    try {
      run(b, false);
    } catch (...) {
      cache_ = nullptr;
      last_logits_only_ = false;
      throw;
    }
    cache_ = nullptr;
    last_logits_only_ = false;
    cache.len_ = start + n;
    return std::vector<T>(logits_.row(0), logits_.row(0) + cfg_.vocab_size);
  }

 private:
  // Projections of a block. Llama family: q k v o gate up down; GPT-2: c_attn (q, k and v in one)
  // attn.c_proj, mlp.c_fc, mlp.c_proj.
  static constexpr std::size_t q_ = 0, k_ = 1, v_ = 2, o_ = 3, gate_ = 4, up_ = 5, down_ = 6;
  static constexpr std::size_t qkv_ = 0, attn_out_ = 1, fc_ = 2, fc_out_ = 3;

  struct block {
    std::vector<std::string> names;
    std::vector<std::unique_ptr<linear>> proj;
    std::vector<T> norm1_w, norm1_b, norm2_w, norm2_b, q_norm_w, k_norm_w;
  };

  /// What one block's forward keeps for backward.
  struct saved {
    matrix<T> x;              // block input (rows, hidden)
    matrix<T> n1, n2;         // normalised inputs of attention and MLP
    std::vector<T> st1, st2;  // norm statistics
    matrix<T> q_raw, k_raw;   // q, k before the head norm (Qwen3)
    std::vector<T> qn_inv, kn_inv;
    matrix<T> q, k, v;        // rotated q, k; v (rows, heads*hd | kv*hd)
    matrix<T> qkv;            // GPT-2's fused projection output
    std::vector<T> lse;       // attention's log-sum-exp per (row, head)
    matrix<T> att;            // attention output (rows, heads*hd)
    matrix<T> h;              // after the attention residual
    matrix<T> g, u, a;        // gate (or c_fc) output, up output, activation (input of down)
  };

  /// The batch as packed rows (only unmasked tokens), sequence by sequence.
  struct packing {
    index rows = 0;
    std::vector<index> seq, col, pos;
    std::vector<long long> ids;
    std::vector<index> start;  // sequences + 1 offsets
  };

  /// A weight of the model by its name in model.safetensors: a view of the value as this class
  /// stores it (a projection (out, in); GPT-2's Conv1D is stored (in, out): `transposed`).
  struct named_tensor {
    std::string name;
    matrix_view<T> value;
    bool vector = false;
    bool transposed = false;
  };

  /// Every weight, in a fixed order: embeddings, per block (projections, biases, norms), final
  /// norm, lm_head. Only for dense<T> bases.
  std::vector<named_tensor> named_tensors() {
    std::vector<named_tensor> out;
    if constexpr (std::is_same_v<Base, dense<T>>) {
      const std::string root = gpt2() ? "transformer" : "model";
      auto vec = [&](std::string name, std::vector<T>& v) {
        out.push_back({std::move(name), matrix_view<T>(v.data(), 1, static_cast<index>(v.size())), true, false});
      };
      out.push_back({root + (gpt2() ? ".wte.weight" : ".embed_tokens.weight"), embed_.view(), false, false});
      if (gpt2()) out.push_back({"transformer.wpe.weight", positions_.view(), false, false});
      for (auto& b : blocks_) {
        for (std::size_t p = 0; p < b.proj.size(); ++p) {
          auto& base = b.proj[p]->base();
          out.push_back({b.names[p] + ".weight", base.mutable_weight(), false, gpt2()});
          if (base.has_bias()) vec(b.names[p] + ".bias", base.mutable_bias());
        }
        const std::string prefix = b.names[0].substr(0, b.names[0].find(gpt2() ? "attn." : "self_attn."));
        if (gpt2()) {
          vec(prefix + "ln_1.weight", b.norm1_w);
          vec(prefix + "ln_1.bias", b.norm1_b);
          vec(prefix + "ln_2.weight", b.norm2_w);
          vec(prefix + "ln_2.bias", b.norm2_b);
        } else {
          vec(prefix + "input_layernorm.weight", b.norm1_w);
          vec(prefix + "post_attention_layernorm.weight", b.norm2_w);
          if (cfg_.qk_norm) {
            vec(prefix + "self_attn.q_norm.weight", b.q_norm_w);
            vec(prefix + "self_attn.k_norm.weight", b.k_norm_w);
          }
        }
      }
      vec(root + (gpt2() ? ".ln_f.weight" : ".norm.weight"), final_w_);
      if (gpt2()) vec("transformer.ln_f.bias", final_b_);
      if (!cfg_.tie_word_embeddings) out.push_back({"lm_head.weight", lm_head_.view(), false, false});
    }
    return out;
  }

  /// Gradients of every named tensor (full fine-tuning), in named_tensors() order.
  struct full_state {
    std::vector<matrix<T>> grads;
    std::vector<const void*> values;  // where each tensor's value starts (storage never moves)
    explicit full_state(causal_lm& m) {
      for (auto& t : m.named_tensors()) {
        grads.emplace_back(t.value.rows(), t.value.cols());
        values.push_back(t.value.data());
      }
    }
  };
  /// The gradient buffer of the named tensor whose value starts at `data`.
  T* grad_of(const void* data) {
    for (std::size_t i = 0; i < full_->values.size(); ++i) {
      if (full_->values[i] == data) return full_->grads[i].data();
    }
    detail::raise<error>("causal_lm::backward", "internal: no gradient buffer for a weight");
  }

  lm_config cfg_;
  load_options opt_;
  std::optional<full_state> full_;
  std::vector<block> blocks_;
  matrix<T> embed_;        // (vocab, hidden)
  matrix<T> positions_;    // GPT-2 (n_positions, hidden)
  matrix<T> lm_head_;      // (vocab, hidden); empty when tied
  // A GGUF model under Base = gguf_weight keeps its embeddings and head in the file: rows of
  // the embeddings are decoded as tokens need them, the head is a frozen base (embed_ and
  // lm_head_ stay empty).
  std::optional<Base> embed_base_, head_base_;
  std::vector<table_adapter> tables_;  // adapters on the token table (table_adapters())
  bool last_logits_only_ = false;  // decode(): the head product for the last token alone
  std::vector<T> final_w_, final_b_;
  ops::rope_table<T> rope_;

  // forward state
  packing packed_;
  std::vector<saved> saved_;
  matrix<T> final_in_, final_n_;
  std::vector<T> final_st_;
  matrix<T> logits_;
  kv_cache* cache_ = nullptr;

  bool gpt2() const noexcept { return cfg_.is_gpt2(); }
  const matrix<T>& head_weight() const { return cfg_.tie_word_embeddings ? embed_ : lm_head_; }

  // ---- loading ------------------------------------------------------------------------------

  template <class Source>
  std::unique_ptr<linear> load_linear(const Source& f, const std::string& module, index out, index in, bool bias) {
    auto l = std::make_unique<linear>(f.template base<Base>(module, out, in));
    if (l->out_features() != out || l->in_features() != in) {
      detail::raise<format_error>("causal_lm::load", "'" + module + "' is " + std::to_string(l->out_features()) + "x" +
                                                         std::to_string(l->in_features()) + ", the config says " +
                                                         std::to_string(out) + "x" + std::to_string(in));
    }
    if (bias != f.has(module, "bias")) {
      detail::raise<format_error>("causal_lm::load", "'" + module + "' " + (bias ? "has no bias; the config says it has one"
                                                                                 : "has a bias the config does not declare"));
    }
    return l;
  }

  template <class Source>
  void load_weights(const Source& f) {
    const index H = cfg_.hidden_size, I = cfg_.intermediate_size, hd = cfg_.head_dim;
    const index qd = cfg_.heads * hd, kvd = cfg_.kv_heads * hd;
    const std::string root = gpt2() ? "transformer" : "model";
    if constexpr (std::is_same_v<Source, gguf_weights> && std::is_same_v<Base, gguf_weight>) {
      embed_base_.emplace(f.template base<Base>(root + (gpt2() ? ".wte" : ".embed_tokens"), cfg_.vocab_size, H));
    } else {
      embed_ = f.template read_matrix<T>(root + (gpt2() ? ".wte" : ".embed_tokens"), "weight", cfg_.vocab_size, H);
    }
    if (gpt2()) positions_ = f.template read_matrix<T>("transformer.wpe", "weight", cfg_.max_positions, H);
    for (index l = 0; l < cfg_.layers; ++l) {
      block b;
      const std::string p = root + (gpt2() ? ".h." : ".layers.") + std::to_string(l) + ".";
      auto add = [&](const std::string& name, index out, index in, bool bias) {
        b.names.push_back(p + name);
        b.proj.push_back(load_linear(f, p + name, out, in, bias));
      };
      if (gpt2()) {
        add("attn.c_attn", 3 * H, H, true);
        add("attn.c_proj", H, H, true);
        add("mlp.c_fc", I, H, true);
        add("mlp.c_proj", H, I, true);
        b.norm1_w = f.template read_vector<T>(p + "ln_1", "weight", H);
        b.norm1_b = f.template read_vector<T>(p + "ln_1", "bias", H);
        b.norm2_w = f.template read_vector<T>(p + "ln_2", "weight", H);
        b.norm2_b = f.template read_vector<T>(p + "ln_2", "bias", H);
      } else {
        add("self_attn.q_proj", qd, H, cfg_.qkv_bias);
        add("self_attn.k_proj", kvd, H, cfg_.qkv_bias);
        add("self_attn.v_proj", kvd, H, cfg_.qkv_bias);
        add("self_attn.o_proj", H, qd, cfg_.o_bias);
        add("mlp.gate_proj", I, H, cfg_.mlp_bias);
        add("mlp.up_proj", I, H, cfg_.mlp_bias);
        add("mlp.down_proj", H, I, cfg_.mlp_bias);
        b.norm1_w = f.template read_vector<T>(p + "input_layernorm", "weight", H);
        b.norm2_w = f.template read_vector<T>(p + "post_attention_layernorm", "weight", H);
        if (cfg_.qk_norm) {
          b.q_norm_w = f.template read_vector<T>(p + "self_attn.q_norm", "weight", hd);
          b.k_norm_w = f.template read_vector<T>(p + "self_attn.k_norm", "weight", hd);
        }
      }
      blocks_.push_back(std::move(b));
    }
    final_w_ = f.template read_vector<T>(root + (gpt2() ? ".ln_f" : ".norm"), "weight", H);
    if (gpt2()) final_b_ = f.template read_vector<T>("transformer.ln_f", "bias", H);
    if constexpr (std::is_same_v<Source, gguf_weights> && std::is_same_v<Base, gguf_weight>) {
      head_base_.emplace(cfg_.tie_word_embeddings ? *embed_base_ : f.template base<Base>("lm_head", cfg_.vocab_size, H));
    } else if (!cfg_.tie_word_embeddings) {
      lm_head_ = f.template read_matrix<T>("lm_head", "weight", cfg_.vocab_size, H);
    }
    if (cfg_.rope.kind != rope_kind::none) rope_ = ops::rope_table<T>(cfg_.rope, hd, cfg_.max_positions);
  }

  // ---- forward ------------------------------------------------------------------------------

  void pack(const token_batch& b) {
    constexpr const char* where = "causal_lm::forward";
    const auto n = static_cast<std::size_t>(b.sequences * b.length);
    if (b.ids.size() != n || (!b.mask.empty() && b.mask.size() != n) || (!b.positions.empty() && b.positions.size() != n)) {
      detail::raise<shape_error>(where, "ids, mask and positions must each hold sequences x length values");
    }
    packing& p = packed_;
    p = packing{};
    p.start.push_back(0);
    for (index s = 0; s < b.sequences; ++s) {
      for (index c = 0; c < b.length; ++c) {
        if (!b.valid(s, c)) continue;
        const long long id = b.ids[static_cast<std::size_t>(s * b.length + c)];
        if (id < 0 || id >= cfg_.vocab_size) {
          detail::raise<error>(where, "token id " + std::to_string(id) + " (sequence " + std::to_string(s) +
                                          ") is outside the vocabulary of " + std::to_string(cfg_.vocab_size));
        }
        const long long pos = b.positions.empty() ? c : b.positions[static_cast<std::size_t>(s * b.length + c)];
        if (pos < 0 || pos >= cfg_.max_positions) {
          detail::raise<error>(where, "position " + std::to_string(pos) + " (sequence " + std::to_string(s) +
                                          ") is beyond the model's " + std::to_string(cfg_.max_positions) +
                                          " positions");
        }
        p.seq.push_back(s);
        p.col.push_back(c);
        p.pos.push_back(static_cast<index>(pos));
        p.ids.push_back(id);
      }
      p.start.push_back(static_cast<index>(p.ids.size()));
    }
    p.rows = static_cast<index>(p.ids.size());
    if (p.rows == 0) detail::raise<error>(where, "the batch has no unmasked token");
  }

  void run(const token_batch& b, bool keep) {
    pack(b);
    if (full_) {
      // The weights may have been stepped: drop what adapters derived from them (DoRA's norms).
      for (auto& blk : blocks_) {
        for (auto& l : blk.proj) l->base();
      }
    }
    const index H = cfg_.hidden_size;
    const index R = packed_.rows;
    const table_adapter* ta = active_table();
    matrix<T> x(R, H);
    for (index r = 0; r < R; ++r) {
      const auto id = static_cast<index>(packed_.ids[static_cast<std::size_t>(r)]);
      if (embed_base_) {
        embed_base_->dequantize_row(id, x.row(r));
      } else {
        std::copy(embed_.row(id), embed_.row(id) + H, x.row(r));
      }
      if (ta) table_lookup(*ta, id, x.row(r));
      if (gpt2()) {
        const T* pe = positions_.row(packed_.pos[static_cast<std::size_t>(r)]);
        for (index i = 0; i < H; ++i) x(r, i) += pe[i];
      }
    }
    saved_.assign(static_cast<std::size_t>(cfg_.layers), saved{});
    for (index l = 0; l < cfg_.layers; ++l) {
      saved& s = saved_[static_cast<std::size_t>(l)];
      matrix<T> out = block_forward(l, x, s, keep && !opt_.activation_checkpointing);
      if (keep && opt_.activation_checkpointing) s.x = std::move(x);  // the block input only
      x = std::move(out);
    }
    final_in_ = std::move(x);
    final_n_ = matrix<T>(R, H);
    norm(final_in_, final_w_, final_b_, final_n_, final_st_);
    // decode() needs the last token's logits only (a 512-token prompt would otherwise cost 512
    // head products).
    const index first = last_logits_only_ ? R - 1 : 0;
    const matrix_view<const T> h = matrix_view<const T>(final_n_.view()).block(first, 0, R - first, H);
    logits_ = matrix<T>(R - first, cfg_.vocab_size);
    if (head_base_) {
      head_base_->matmul(h, logits_.view());
    } else {
      kernels::gemm_nt<T, T>(1.0, h, head_weight().view(), 0.0, logits_.view());
    }
    if (const auto* ht = ta ? head_tokens(*ta) : nullptr) {  // replaced head rows: their logits anew
      for (index r = 0; r < h.rows(); ++r) {
        for (std::size_t i = 0; i < ht->indices.size(); ++i) {
          const T* v = ht->values.row(static_cast<index>(i));
          double s = 0.0;
          for (index j = 0; j < H; ++j) s += static_cast<double>(h(r, j)) * static_cast<double>(v[j]);
          logits_(r, ht->indices[i]) = static_cast<T>(s);
        }
      }
    }
  }

  /// The enabled table adapter, or nullptr; unsupported_error when two are enabled, or with
  /// full fine-tuning (the table itself trains).
  const table_adapter* active_table() const {
    const table_adapter* a = nullptr;
    for (const auto& t : tables_) {
      if (!t.enabled) continue;
      if (a) {
        detail::raise<unsupported_error>("causal_lm::forward", "adapters '" + a->name + "' and '" + t.name +
                                                                   "' on the token table are both enabled; enable one");
      }
      a = &t;
    }
    if (a && full_) detail::raise<unsupported_error>("causal_lm::forward", "a table adapter with full fine-tuning");
    return a;
  }
  /// The trainable tokens replacing lm_head rows: `head`, or with tied embeddings `tokens`.
  const io::trainable_tokens<T>* head_tokens(const table_adapter& t) const {
    if (t.head) return &*t.head;
    return cfg_.tie_word_embeddings && t.tokens ? &*t.tokens : nullptr;
  }
  /// The index of `id` in `t`'s indices, or -1.
  static index token_slot(const io::trainable_tokens<T>& t, index id) {
    for (std::size_t i = 0; i < t.indices.size(); ++i) {
      if (t.indices[i] == id) return static_cast<index>(i);
    }
    return -1;
  }
  void table_lookup(const table_adapter& t, index id, T* x) const {
    const index H = cfg_.hidden_size;
    if (t.tokens) {
      if (const index i = token_slot(*t.tokens, id); i >= 0) std::copy(t.tokens->values.row(i), t.tokens->values.row(i) + H, x);
    }
    if (t.lora) {
      const auto& a = t.lora->a;
      const auto& b = t.lora->b;
      for (index j = 0; j < H; ++j) {
        double s = 0.0;
        for (index k = 0; k < a.rows(); ++k) s += static_cast<double>(b(j, k)) * static_cast<double>(a(k, id));
        x[j] = static_cast<T>(static_cast<double>(x[j]) + t.lora->scale * s);
      }
    }
  }

  void norm(const matrix<T>& x, const std::vector<T>& w, const std::vector<T>& bias, matrix<T>& y,
            std::vector<T>& st) const {
    const index R = x.rows(), n = x.cols();
    if (gpt2()) {
      st.resize(static_cast<std::size_t>(2 * R));
      kernels::layer_norm(x.data(), w.data(), bias.data(), R, n, cfg_.norm_eps, y.data(), st.data());
    } else {
      st.resize(static_cast<std::size_t>(R));
      kernels::rms_norm(x.data(), w.data(), R, n, cfg_.norm_eps, y.data(), st.data());
    }
  }
  /// dx from dy through a norm with weight w (and bias b for LayerNorm), plus dres when given
  /// (the residual branch's gradient); with full fine-tuning the weight's and bias' gradients
  /// are accumulated too.
  void norm_backward(const matrix<T>& x, const std::vector<T>& w, const std::vector<T>& b, const std::vector<T>& st,
                     const matrix<T>& dy, matrix<T>& dx, const matrix<T>* dres = nullptr) {
    T* dw = full_ ? grad_of(w.data()) : nullptr;
    const T* dr = dres != nullptr ? dres->data() : nullptr;
    if (gpt2()) {
      T* db = full_ ? grad_of(b.data()) : nullptr;
      kernels::layer_norm_backward(x.data(), w.data(), st.data(), x.rows(), x.cols(), dy.data(), dx.data(), dw, db, dr);
    } else {
      kernels::rms_norm_backward(x.data(), w.data(), st.data(), x.rows(), x.cols(), dy.data(), dx.data(), dw, dr);
    }
  }

  static void apply(linear& l, const matrix<T>& x, matrix<T>& y) {
    y = matrix<T>(x.rows(), l.out_features());
    l.forward(x.view(), y.view());
  }

  /// One block on x (rows, hidden): returns its output; `s` keeps what backward needs when
  /// `full`, else it is left empty.
  matrix<T> block_forward(index l, const matrix<T>& x, saved& s, bool full) {
    block& b = blocks_[static_cast<std::size_t>(l)];
    const index R = x.rows(), H = cfg_.hidden_size, hd = cfg_.head_dim;
    const index qd = cfg_.heads * hd, kvd = cfg_.kv_heads * hd;
    if (full) s.x = to_matrix(x.view());
    s.n1 = matrix<T>(R, H);
    norm(x, b.norm1_w, b.norm1_b, s.n1, s.st1);
    if (gpt2()) {
      apply(*b.proj[qkv_], s.n1, s.qkv);
      s.q = matrix<T>(R, qd);
      s.k = matrix<T>(R, kvd);
      s.v = matrix<T>(R, kvd);
      for (index r = 0; r < R; ++r) {
        std::copy(s.qkv.row(r), s.qkv.row(r) + H, s.q.row(r));
        std::copy(s.qkv.row(r) + H, s.qkv.row(r) + 2 * H, s.k.row(r));
        std::copy(s.qkv.row(r) + 2 * H, s.qkv.row(r) + 3 * H, s.v.row(r));
      }
      if (!full) s.qkv = {};
    } else {
      apply(*b.proj[q_], s.n1, s.q);
      apply(*b.proj[k_], s.n1, s.k);
      apply(*b.proj[v_], s.n1, s.v);
      if (cfg_.qk_norm) {
        s.q_raw = s.q;
        s.k_raw = s.k;
        s.qn_inv.resize(static_cast<std::size_t>(R * cfg_.heads));
        s.kn_inv.resize(static_cast<std::size_t>(R * cfg_.kv_heads));
        kernels::rms_norm(s.q_raw.data(), b.q_norm_w.data(), R * cfg_.heads, hd, cfg_.norm_eps, s.q.data(),
                          s.qn_inv.data());
        kernels::rms_norm(s.k_raw.data(), b.k_norm_w.data(), R * cfg_.kv_heads, hd, cfg_.norm_eps, s.k.data(),
                      s.kn_inv.data());
      }
      rope_.apply_rows(s.q.data(), R, cfg_.heads, packed_.pos.data());
      rope_.apply_rows(s.k.data(), R, cfg_.kv_heads, packed_.pos.data());
    }
    attention_forward(l, s, full);
    matrix<T> a;
    apply(*b.proj[gpt2() ? attn_out_ : o_], s.att, a);
    s.h = matrix<T>(R, H);
    s.n2 = matrix<T>(R, H);
    if (gpt2()) {
      kernels::add(x.data(), a.data(), R * H, s.h.data());
      norm(s.h, b.norm2_w, b.norm2_b, s.n2, s.st2);
    } else {  // the residual addition and the norm in one pass
      s.st2.resize(static_cast<std::size_t>(R));
      kernels::add_rms_norm(x.data(), a.data(), b.norm2_w.data(), R, H, cfg_.norm_eps, s.h.data(), s.n2.data(),
                            s.st2.data());
    }
    s.a = matrix<T>(R, cfg_.intermediate_size);
    if (gpt2()) {
      apply(*b.proj[fc_], s.n2, s.g);
      kernels::gated_activation(cfg_.act, s.g.data(), static_cast<const T*>(nullptr), s.g.size(), s.a.data());
    } else {
      apply(*b.proj[gate_], s.n2, s.g);
      apply(*b.proj[up_], s.n2, s.u);
      kernels::gated_activation(cfg_.act, s.g.data(), s.u.data(), s.g.size(), s.a.data());
    }
    matrix<T> m;
    apply(*b.proj[gpt2() ? fc_out_ : down_], s.a, m);
    matrix<T> out(R, H);
    kernels::add(s.h.data(), m.data(), R * H, out.data());
    if (!full) s = saved{};
    return out;
  }

  /// Which keys a query sees: its own sequence, columns <= its own, within the sliding window.
  index window_of(index l) const { return cfg_.sliding_window[static_cast<std::size_t>(l)]; }

  /// Attention of every sequence and head (kernels/attention.hpp: blocked, online softmax);
  /// s.att (rows, heads*hd), and with `full` s.lse (rows, heads), which the backward forms the
  /// probabilities again from. With a cache (decode), the keys and values are appended to it and
  /// the queries attend to everything it holds.
  void attention_forward(index l, saved& s, bool full) {
    const index R = packed_.rows, hd = cfg_.head_dim, nh = cfg_.heads, group = cfg_.heads / cfg_.kv_heads;
    const index qd = nh * hd, kvd = cfg_.kv_heads * hd;
    s.att = matrix<T>(R, qd);
    const index nseq = static_cast<index>(packed_.start.size()) - 1;
    // Key/value rows and their positions: the batch's own rows, or the cache (decode).
    const T* kbase = s.k.data();
    const T* vbase = s.v.data();
    const index past = cache_ != nullptr ? cache_->len_ : 0;
    std::vector<index> cache_pos;
    if (cache_ != nullptr) {
      auto& ck = cache_->k[static_cast<std::size_t>(l)];
      auto& cv = cache_->v[static_cast<std::size_t>(l)];
      for (index r = 0; r < R; ++r) {
        std::copy(s.k.row(r), s.k.row(r) + kvd, ck.row(past + r));
        std::copy(s.v.row(r), s.v.row(r) + kvd, cv.row(past + r));
      }
      kbase = ck.data();
      vbase = cv.data();
      cache_pos.resize(static_cast<std::size_t>(past + R));
      for (index j = 0; j < past + R; ++j) cache_pos[static_cast<std::size_t>(j)] = j;
    }
    std::vector<T> local;
    std::vector<T>& lse = full ? s.lse : local;
    lse.assign(static_cast<std::size_t>(R * nh), T{0});
    double work = 0;
    for (index q = 0; q < nseq; ++q) {
      const index len = packed_.start[static_cast<std::size_t>(q) + 1] - packed_.start[static_cast<std::size_t>(q)];
      work += 4.0 * static_cast<double>(len) * static_cast<double>(past + len) * static_cast<double>(qd);
    }
    kernels::parallel_ranges(nseq * nh, 1, work, [&](index first, index last) {
      kernels::attention_workspace<T> ws;
      for (index job = first; job < last; ++job) {
        const index q = job / nh, h = job % nh, kh = h / group;
        const index r0 = packed_.start[static_cast<std::size_t>(q)];
        const index len = packed_.start[static_cast<std::size_t>(q) + 1] - r0;
        const index k0 = cache_ != nullptr ? 0 : r0;
        kernels::attention_problem<T> p;
        p.nq = len;
        p.nk = past + len;
        p.head_dim = hd;
        p.q = s.q.row(r0) + h * hd;
        p.ldq = qd;
        p.k = kbase + k0 * kvd + kh * hd;
        p.v = vbase + k0 * kvd + kh * hd;
        p.ldkv = kvd;
        p.qpos = cache_ != nullptr ? cache_pos.data() + past : packed_.col.data() + r0;
        p.kpos = cache_ != nullptr ? cache_pos.data() : packed_.col.data() + r0;
        p.window = window_of(l);
        p.scale = 1.0 / std::sqrt(static_cast<double>(hd));
        kernels::attention_forward(p, s.att.row(r0) + h * hd, qd, lse.data() + r0 * nh + h, nh, ws);
      }
    });
  }

  // ---- loss and backward ------------------------------------------------------------------

  double loss_impl(const token_batch& b, const std::vector<long long>& labels, double normalizer, bool grad) {
    constexpr const char* where = "causal_lm::loss";
    if (labels.size() != b.ids.size()) detail::raise<shape_error>(where, "labels must hold sequences x length values");
    for (index s = 0; s < b.sequences; ++s) {
      for (index c = 0; c + 1 < b.length; ++c) {
        const long long t = labels[static_cast<std::size_t>(s * b.length + c + 1)];
        if (t == ignore_label) continue;
        if (t < 0 || t >= cfg_.vocab_size) {
          detail::raise<error>(where, "label " + std::to_string(t) + " is outside the vocabulary");
        }
        if (!b.valid(s, c)) {
          detail::raise<error>(where, "sequence " + std::to_string(s) + " has a label after a masked position " +
                                          std::to_string(c) + "; set it to -100");
        }
      }
    }
    run(b, grad);
    const index count = predicted_tokens(b, labels);
    if (count == 0) detail::raise<error>(where, "no token to predict (every label is -100)");
    const double norm = normalizer > 0 ? normalizer : static_cast<double>(count);
    const index R = packed_.rows, V = cfg_.vocab_size;
    std::vector<long long> target(static_cast<std::size_t>(R), -1);  // the next token, or -1
    for (index r = 0; r < R; ++r) {
      const index s = packed_.seq[static_cast<std::size_t>(r)], c = packed_.col[static_cast<std::size_t>(r)];
      if (c + 1 >= b.length) continue;
      const long long t = labels[static_cast<std::size_t>(s * b.length + c + 1)];
      if (t != ignore_label) target[static_cast<std::size_t>(r)] = t;
    }
    // Rows without a target keep a zero gradient.
    matrix<T> dlogits(grad ? R : 0, grad ? V : 0);
    const double total = kernels::cross_entropy(logits_.data(), R, V, V, target.data(), 1.0 / norm,
                                                grad ? dlogits.data() : nullptr, V);
    if (grad) backward(dlogits);
    return total / norm;
  }

  void backward(const matrix<T>& dlogits) {
    const index R = packed_.rows, H = cfg_.hidden_size;
    matrix<T> dn(R, H);
    if (head_base_) {
      head_base_->matmul_t(matrix_view<const T>(dlogits.view()), dn.view());
    } else {
      kernels::gemm_nn<T, T>(1.0, dlogits.view(), head_weight().view(), 0.0, dn.view());
    }
    if (full_) {  // d lm_head (or the tied embedding) += dlogits^T h
      matrix_view<T> g(grad_of(head_weight().data()), cfg_.vocab_size, H);
      kernels::gemm_tn<T>(1.0, dlogits.view(), final_n_.view(), 1.0, g);
    }
    const table_adapter* ta = active_table();
    table_adapter* tw = ta ? &tables_[static_cast<std::size_t>(ta - tables_.data())] : nullptr;
    if (const auto* ht = ta ? head_tokens(*ta) : nullptr) {  // replaced head rows
      matrix<T>& g = ta->head ? tw->grad_head : tw->grad_tokens;
      for (std::size_t i = 0; i < ht->indices.size(); ++i) {
        const index t = ht->indices[i];
        const T* v = ht->values.row(static_cast<index>(i));
        const T* w = head_weight().row(t);
        T* gi = g.row(static_cast<index>(i));
        for (index r = 0; r < R; ++r) {
          const T d = dlogits(r, t);
          if (d == T{0}) continue;
          for (index j = 0; j < H; ++j) {
            dn(r, j) += d * (v[j] - w[j]);
            gi[j] += d * final_n_(r, j);
          }
        }
      }
    }
    matrix<T> dx(R, H);
    norm_backward(final_in_, final_w_, final_b_, final_st_, dn, dx);
    for (index l = cfg_.layers - 1; l >= 0; --l) {
      saved& s = saved_[static_cast<std::size_t>(l)];
      if (opt_.activation_checkpointing) {
        const matrix<T> x = std::move(s.x);
        block_forward(l, x, s, true);  // recompute (and refresh the adapters' caches)
      }
      dx = block_backward(l, s, dx);
      s = saved{};
    }
    if (tw) {  // the table adapter's lookup
      for (index r = 0; r < R; ++r) {
        const auto id = static_cast<index>(packed_.ids[static_cast<std::size_t>(r)]);
        const T* d = dx.row(r);
        if (tw->tokens) {
          if (const index i = token_slot(*tw->tokens, id); i >= 0) {
            T* g = tw->grad_tokens.row(i);
            for (index j = 0; j < H; ++j) g[j] += d[j];
          }
        }
        if (tw->lora) {
          const auto& a = tw->lora->a;
          const auto& b = tw->lora->b;
          const T s = static_cast<T>(tw->lora->scale);
          for (index k = 0; k < a.rows(); ++k) {
            double u = 0.0;
            for (index j = 0; j < H; ++j) u += static_cast<double>(b(j, k)) * static_cast<double>(d[j]);
            tw->grad_a(k, id) += static_cast<T>(static_cast<double>(s) * u);
            for (index j = 0; j < H; ++j) tw->grad_b(j, k) += s * d[j] * a(k, id);
          }
        }
      }
    }
    if (full_) {  // token (and GPT-2 position) embeddings
      T* ge = grad_of(embed_.data());
      T* gp = gpt2() ? grad_of(positions_.data()) : nullptr;
      for (index r = 0; r < R; ++r) {
        T* e = ge + static_cast<index>(packed_.ids[static_cast<std::size_t>(r)]) * H;
        for (index i = 0; i < H; ++i) e[i] += dx(r, i);
        if (gp != nullptr) {
          T* pe = gp + packed_.pos[static_cast<std::size_t>(r)] * H;
          for (index i = 0; i < H; ++i) pe[i] += dx(r, i);
        }
      }
    }
  }

  /// dx through a projection (adapter gradients +=); with full fine-tuning also
  /// dW += dy^T x and db += the column sums of dy.
  void back(linear& l, const matrix<T>& x, const matrix<T>& dy, matrix<T>& dx) {
    dx = matrix<T>(x.rows(), x.cols());
    l.backward(x.view(), dy.view(), dx.view());
    if constexpr (std::is_same_v<Base, dense<T>>) {
      if (!full_) return;
      const Base& base = std::as_const(l).base();
      matrix_view<T> gw(grad_of(base.weight().data()), l.out_features(), l.in_features());
      kernels::gemm_tn<T>(1.0, dy.view(), x.view(), 1.0, gw);
      if (base.has_bias()) {
        T* gb = grad_of(base.bias().data());
        for (index r = 0; r < dy.rows(); ++r) {
          for (index j = 0; j < dy.cols(); ++j) gb[j] += dy(r, j);
        }
      }
    }
  }

  /// Gradient of the block input from the gradient of its output.
  matrix<T> block_backward(index l, saved& s, const matrix<T>& dout) {
    block& b = blocks_[static_cast<std::size_t>(l)];
    const index R = packed_.rows, H = cfg_.hidden_size, hd = cfg_.head_dim;
    // MLP
    matrix<T> da;
    back(*b.proj[gpt2() ? fc_out_ : down_], s.a, dout, da);
    matrix<T> dn2(R, H);
    if (gpt2()) {
      matrix<T> dg(R, cfg_.intermediate_size);
      kernels::gated_activation_backward(cfg_.act, s.g.data(), static_cast<const T*>(nullptr), da.data(), dg.size(),
                                         dg.data(), static_cast<T*>(nullptr));
      back(*b.proj[fc_], s.n2, dg, dn2);
    } else {
      matrix<T> dg(R, cfg_.intermediate_size), du(R, cfg_.intermediate_size);
      kernels::gated_activation_backward(cfg_.act, s.g.data(), s.u.data(), da.data(), dg.size(), dg.data(), du.data());
      matrix<T> t;
      back(*b.proj[gate_], s.n2, dg, dn2);
      back(*b.proj[up_], s.n2, du, t);
      kernels::add(dn2.data(), t.data(), dn2.size(), dn2.data());
    }
    matrix<T> dh(R, H);
    norm_backward(s.h, b.norm2_w, b.norm2_b, s.st2, dn2, dh, &dout);
    // attention
    matrix<T> datt;
    back(*b.proj[gpt2() ? attn_out_ : o_], s.att, dh, datt);
    matrix<T> dq(R, s.q.cols()), dk(R, s.k.cols()), dv(R, s.v.cols());
    attention_backward(l, s, datt, dq, dk, dv);
    matrix<T> dn1(R, H);
    if (gpt2()) {
      matrix<T> dqkv(R, 3 * H);
      for (index r = 0; r < R; ++r) {
        std::copy(dq.row(r), dq.row(r) + H, dqkv.row(r));
        std::copy(dk.row(r), dk.row(r) + H, dqkv.row(r) + H);
        std::copy(dv.row(r), dv.row(r) + H, dqkv.row(r) + 2 * H);
      }
      back(*b.proj[qkv_], s.n1, dqkv, dn1);
    } else {
      rope_.apply_rows(dq.data(), R, cfg_.heads, packed_.pos.data(), true);
      rope_.apply_rows(dk.data(), R, cfg_.kv_heads, packed_.pos.data(), true);
      if (cfg_.qk_norm) {
        matrix<T> tq(R, dq.cols()), tk(R, dk.cols());
        kernels::rms_norm_backward(s.q_raw.data(), b.q_norm_w.data(), s.qn_inv.data(), R * cfg_.heads, hd, dq.data(),
                               tq.data(), full_ ? grad_of(b.q_norm_w.data()) : nullptr);
        kernels::rms_norm_backward(s.k_raw.data(), b.k_norm_w.data(), s.kn_inv.data(), R * cfg_.kv_heads, hd, dk.data(),
                               tk.data(), full_ ? grad_of(b.k_norm_w.data()) : nullptr);
        dq = std::move(tq);
        dk = std::move(tk);
      }
      matrix<T> t;
      back(*b.proj[q_], s.n1, dq, dn1);
      back(*b.proj[k_], s.n1, dk, t);
      kernels::add(dn1.data(), t.data(), dn1.size(), dn1.data());
      back(*b.proj[v_], s.n1, dv, t);
      kernels::add(dn1.data(), t.data(), dn1.size(), dn1.data());
    }
    matrix<T> dx(R, H);
    norm_backward(s.x, b.norm1_w, b.norm1_b, s.st1, dn1, dx, &dh);
    return dx;
  }

  /// dq, dk, dv from d(attention output), from the forward's output and lse
  /// (kernels/attention.hpp).
  void attention_backward(index l, const saved& s, const matrix<T>& datt, matrix<T>& dq, matrix<T>& dk, matrix<T>& dv) {
    const index hd = cfg_.head_dim, nh = cfg_.heads, group = cfg_.heads / cfg_.kv_heads;
    const index qd = nh * hd, kvd = cfg_.kv_heads * hd;
    const index nseq = static_cast<index>(packed_.start.size()) - 1;
    dq.fill(T{0});
    dk.fill(T{0});
    dv.fill(T{0});
    double work = 0;
    for (index q = 0; q < nseq; ++q) {
      const index len = packed_.start[static_cast<std::size_t>(q) + 1] - packed_.start[static_cast<std::size_t>(q)];
      work += 10.0 * static_cast<double>(len) * static_cast<double>(len) * static_cast<double>(qd);
    }
    // Sequences are independent; heads of one kv group write the same dk/dv, so a job is a
    // (sequence, kv head) pair.
    const index nkv = cfg_.kv_heads;
    kernels::parallel_ranges(nseq * nkv, 1, work, [&](index first, index last) {
      kernels::attention_workspace<T> ws;
      for (index job = first; job < last; ++job) {
        const index q = job / nkv, kh = job % nkv;
        const index r0 = packed_.start[static_cast<std::size_t>(q)];
        const index len = packed_.start[static_cast<std::size_t>(q) + 1] - r0;
        for (index h = kh * group; h < (kh + 1) * group; ++h) {
          kernels::attention_problem<T> p;
          p.nq = len;
          p.nk = len;
          p.head_dim = hd;
          p.q = s.q.row(r0) + h * hd;
          p.ldq = qd;
          p.k = s.k.row(r0) + kh * hd;
          p.v = s.v.row(r0) + kh * hd;
          p.ldkv = kvd;
          p.qpos = packed_.col.data() + r0;
          p.kpos = packed_.col.data() + r0;
          p.window = window_of(l);
          p.scale = 1.0 / std::sqrt(static_cast<double>(hd));
          kernels::attention_backward(p, s.att.row(r0) + h * hd, qd, datt.row(r0) + h * hd, qd, s.lse.data() + r0 * nh + h,
                                      nh, dq.row(r0) + h * hd, qd, dk.row(r0) + kh * hd, dv.row(r0) + kh * hd, kvd, ws);
        }
      }
    });
  }
};

}  // namespace peft::models
