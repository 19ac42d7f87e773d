// peft/io/embedding_adapters.hpp — the parts of a PEFT LoRA checkpoint that adapt embedding
// tables rather than linear layers: LoRA on an nn.Embedding (PEFT's lora.Embedding) and trainable
// tokens (LoraConfig.trainable_token_indices, PEFT's TrainableTokensLayer).
//
//   auto ck = peft::io::load_peft_checkpoint<double>("adapter");     // ck.embeddings holds them
//   for (const auto& e : ck.embeddings.lora) e.add_delta(table);        // table (vocab, dim), double
//   for (const auto& t : ck.embeddings.tokens) t.apply(table);
//
// On disk ("base_model.model." + module path + "."):
//   lora_embedding_A (r, num_embeddings), lora_embedding_B (embedding_dim, r): no ".weight".
//     Row t of the table gets scale * (B A[:, t])^T, scale = alpha / r (alpha / sqrt(r) with
//     use_rslora; rank_pattern / alpha_pattern as for linears); merged: W += scale (B A)^T.
//   base_layer.weight (num_embeddings, embedding_dim), optional: PEFT saves the whole base table
//     beside an embedding LoRA (save_embedding_layers) and loads it over the model's; merging
//     starts from it.
//   token_adapter.trainable_tokens_delta (n, embedding_dim): despite the name, the NEW VALUES of
//     rows trainable_token_indices of the module's weight (replaced, not added). The config gives
//     the indices as a list (the input embedding's) or as {module name: list} (a module matches a
//     name its path ends with, as in PEFT); a listed module with no tensor keeps its rows (PEFT
//     initialises the values from the base) — which is how PEFT saves a layer tied to the
//     embedding (lm_head with tie_word_embeddings: not stored, it follows the embedding).
// Tied embeddings: a base without lm_head.weight shares its table with lm_head. PEFT merges into
// the shared table, so a merged lm_head sees both kinds of change. Unmerged, PEFT's trainable
// tokens act on the tied lm_head as well, but an embedding LoRA acts on the lookup only (PEFT
// warns: merged and unmerged outputs then differ).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/io/adapter_config.hpp"
#include "peft/io/safetensors.hpp"

namespace peft::io {

/// A tensor kept as stored (dtype and bytes).
struct raw_tensor {
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;
};

/// LoRA on an embedding table.
template <compute_scalar T>
struct embedding_lora {
  std::string path;                      // module path, e.g. "model.embed_tokens"
  matrix<T> a;                           // lora_embedding_A (r, num_embeddings)
  matrix<T> b;                           // lora_embedding_B (embedding_dim, r)
  double scale = 1.0;
  std::optional<raw_tensor> base_weight;  // "<path>.base_layer.weight" saved with the adapter

  index rank() const noexcept { return a.rows(); }
  index num_embeddings() const noexcept { return a.cols(); }
  index embedding_dim() const noexcept { return b.rows(); }

  /// w (num_embeddings, embedding_dim) += scale (B A)^T, summed in double.
  void add_delta(matrix_view<double> w) const {
    check_table(w.rows(), w.cols(), "embedding_lora::add_delta");
    const index r = rank(), d = embedding_dim();
    std::vector<double> col(static_cast<std::size_t>(r));
    for (index t = 0; t < w.rows(); ++t) {
      for (index k = 0; k < r; ++k) col[static_cast<std::size_t>(k)] = static_cast<double>(a(k, t));
      double* row = w.row(t);
      for (index j = 0; j < d; ++j) {
        double s = 0.0;
        for (index k = 0; k < r; ++k) s += static_cast<double>(b(j, k)) * col[static_cast<std::size_t>(k)];
        row[j] += scale * s;
      }
    }
  }
  /// shape_error naming `where` unless the table is (num_embeddings, embedding_dim).
  void check_table(index rows, index cols, const std::string& where) const {
    if (rows != num_embeddings() || cols != embedding_dim()) {
      peft::detail::raise<shape_error>(where, "embedding '" + path + "' is " + std::to_string(rows) + "x" +
                                                  std::to_string(cols) + " but its lora_embedding_A/B need " +
                                                  std::to_string(num_embeddings()) + "x" + std::to_string(embedding_dim()));
    }
  }
};

/// Trainable tokens: rows `indices` of the module's weight take the values `values`.
template <compute_scalar T>
struct trainable_tokens {
  std::string path;              // module path, e.g. "model.embed_tokens" or "lm_head"
  std::vector<index> indices;    // distinct, >= 0
  matrix<T> values;              // (indices.size(), embedding_dim)

  /// Replaces rows `indices` of w (rows, embedding_dim).
  void apply(matrix_view<double> w) const {
    check_table(w.rows(), w.cols(), "trainable_tokens::apply");
    for (std::size_t i = 0; i < indices.size(); ++i) {
      double* row = w.row(indices[i]);
      for (index j = 0; j < values.cols(); ++j) row[j] = static_cast<double>(values(static_cast<index>(i), j));
    }
  }
  /// shape_error naming `where` unless a (rows, cols) table holds every index and cols match.
  void check_table(index rows, index cols, const std::string& where) const {
    if (cols != values.cols()) {
      peft::detail::raise<shape_error>(where, "'" + path + "' has rows of " + std::to_string(cols) +
                                                  " but its trainable_tokens_delta rows have " +
                                                  std::to_string(values.cols()));
    }
    for (const index t : indices) {
      if (t >= rows) {
        peft::detail::raise<shape_error>(where, "trainable token index " + std::to_string(t) + " of '" + path +
                                                    "' is out of range: the table has " + std::to_string(rows) + " rows");
      }
    }
  }
};

/// The embedding parts of a checkpoint (empty for one that adapts linear layers only).
template <compute_scalar T>
struct embedding_adapters {
  std::vector<embedding_lora<T>> lora;       // sorted by path
  std::vector<trainable_tokens<T>> tokens;   // sorted by path

  bool empty() const noexcept { return lora.empty() && tokens.empty(); }
  /// The first module path, for messages ("" when empty).
  std::string first_path() const { return !lora.empty() ? lora.front().path : !tokens.empty() ? tokens.front().path : ""; }
  const embedding_lora<T>* find_lora(const std::string& path) const {
    for (const auto& e : lora) {
      if (e.path == path) return &e;
    }
    return nullptr;
  }
  const trainable_tokens<T>* find_tokens(const std::string& path) const {
    for (const auto& t : tokens) {
      if (t.path == path) return &t;
    }
    return nullptr;
  }
  /// Trainable parameters (A, B and the token rows).
  std::size_t parameter_count() const {
    std::size_t n = 0;
    for (const auto& e : lora) n += static_cast<std::size_t>(e.a.size() + e.b.size());
    for (const auto& t : tokens) n += static_cast<std::size_t>(t.values.size());
    return n;
  }
};

/// Parameter names (after "<module>.") of the embedding parts.
inline constexpr std::string_view embedding_lora_a_name = "lora_embedding_A";
inline constexpr std::string_view embedding_lora_b_name = "lora_embedding_B";
inline constexpr std::string_view embedding_base_weight_name = "base_layer.weight";
inline constexpr std::string_view trainable_tokens_name = "token_adapter.trainable_tokens_delta";

namespace detail {

/// Keys of the embedding parts found while loading: module -> parameter -> full key.
using embedding_keys = std::map<std::string, std::map<std::string, std::string>>;

/// If `rest` (a key without "base_model.model.") names an embedding part, records it and returns true.
inline bool take_embedding_key(embedding_keys& keys, const std::string& rest, const std::string& key) {
  for (const auto p : {embedding_lora_a_name, embedding_lora_b_name, embedding_base_weight_name, trainable_tokens_name}) {
    if (rest.size() > p.size() + 1 && rest.ends_with(p) && rest[rest.size() - p.size() - 1] == '.') {
      keys[rest.substr(0, rest.size() - p.size() - 1)][std::string(p)] = key;
      return true;
    }
  }
  return false;
}

template <compute_scalar T>
matrix<T> read_2d(const safetensors_file& f, const std::string& key, const char* where) {
  const tensor_info& t = f.info(key);
  if (t.shape.size() != 2 || !is_floating(t.type)) {
    peft::detail::raise<format_error>(where, "tensor '" + key + "' is " + peft::detail::shape_text(t.shape) + " " +
                                                 std::string(safetensors_name(t.type)) + ", not a 2-D floating tensor");
  }
  return matrix<T>(static_cast<index>(t.shape[0]), static_cast<index>(t.shape[1]), f.read<T>(key));
}

/// The indices trainable_token_indices gives module `path`; nullopt when it lists none for it.
inline std::optional<std::vector<index>> token_indices_for(const adapter_config& c, const std::string& path,
                                                           std::size_t token_modules, const char* where) {
  const auto it = c.raw.find("trainable_token_indices");
  if (it == c.raw.end() || it->is_null()) return std::nullopt;
  auto read_list = [&](const ordered_json& v, const std::string& what) {
    if (!v.is_array()) {
      peft::detail::raise<format_error>(where, "adapter_config.json: " + what + " is not a list of token ids");
    }
    std::vector<index> ids;
    for (const auto& x : v) {
      if (!x.is_number_integer() || x.get<std::int64_t>() < 0) {
        peft::detail::raise<format_error>(where, "adapter_config.json: " + what + " holds " + x.dump() +
                                                     ", not a token id (an integer >= 0)");
      }
      const auto id = static_cast<index>(x.get<std::int64_t>());
      if (std::find(ids.begin(), ids.end(), id) != ids.end()) {
        peft::detail::raise<format_error>(where, "adapter_config.json: " + what + " lists token " + std::to_string(id) +
                                                     " twice (PEFT's index_copy would be undefined)");
      }
      ids.push_back(id);
    }
    return ids;
  };
  if (it->is_array()) {
    if (token_modules > 1) {
      peft::detail::raise<format_error>(where, "trainable_token_indices is one list (the input embedding's) but " +
                                                   std::to_string(token_modules) + " modules have trainable_tokens_delta");
    }
    return read_list(*it, "trainable_token_indices");
  }
  if (!it->is_object()) {
    peft::detail::raise<format_error>(where, "adapter_config.json: trainable_token_indices is neither a list nor an object");
  }
  std::optional<std::vector<index>> found;
  std::string found_key;
  for (const auto& [k, v] : it->items()) {
    if (!path.ends_with(k)) continue;  // PEFT's _set_trainable: the module name ends with the key
    if (found) {
      peft::detail::raise<format_error>(where, "trainable_token_indices entries '" + found_key + "' and '" + k +
                                                   "' both name module '" + path + "'");
    }
    found = read_list(v, "trainable_token_indices['" + k + "']");
    found_key = k;
  }
  return found;
}

/// Builds the embedding parts from the recorded keys. format_error for inconsistent tensors or
/// config; unsupported_error for what PEFT itself refuses on embeddings.
template <compute_scalar T>
embedding_adapters<T> read_embedding_adapters(const adapter_config& c, const safetensors_file& f, const embedding_keys& keys) {
  constexpr const char* where = "load_peft_checkpoint";
  embedding_adapters<T> out;
  std::size_t token_modules = 0;
  for (const auto& [module, params] : keys) token_modules += params.count(std::string(trainable_tokens_name));
  for (const auto& entry : keys) {
    const std::string& module = entry.first;
    const auto& params = entry.second;  // a plain reference: clang 14 cannot capture bindings
    auto key_of = [&](std::string_view p) -> const std::string* {
      const auto it = params.find(std::string(p));
      return it == params.end() ? nullptr : &it->second;
    };
    const auto* ka = key_of(embedding_lora_a_name);
    const auto* kb = key_of(embedding_lora_b_name);
    const auto* kbase = key_of(embedding_base_weight_name);
    const auto* kt = key_of(trainable_tokens_name);
    if ((ka != nullptr) != (kb != nullptr)) {
      const std::string has = ka ? "lora_embedding_A" : "lora_embedding_B";
      const std::string lacks = ka ? "lora_embedding_B" : "lora_embedding_A";
      peft::detail::raise<format_error>(where, "module '" + module + "' has " + has + " without " + lacks);
    }
    if (kbase && !ka) {
      peft::detail::raise<format_error>(where, "key '" + *kbase + "' is a base weight saved without an embedding LoRA");
    }
    if (ka && kt) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' has both an embedding LoRA and trainable "
                                                        "tokens (PEFT wraps one or the other)");
    }
    if (ka) {
      if (const auto why = c.unselected_by(module);
          !why.empty() && !(why == "target_modules" && c.targets_kind == target_kind::none)) {
        peft::detail::raise<format_error>(where, "module '" + module + "' has lora_embedding_A/B but the config's " +
                                                     std::string(why) + " leaves it out (PEFT would not load them)");
      }
      if (c.lora_bias) {
        peft::detail::raise<unsupported_error>(where, "module '" + module + "': PEFT refuses lora_bias on embeddings");
      }
      embedding_lora<T> e;
      e.path = module;
      e.a = read_2d<T>(f, *ka, where);
      e.b = read_2d<T>(f, *kb, where);
      if (e.b.cols() != e.a.rows()) {
        peft::detail::raise<format_error>(where, "module '" + module + "': lora_embedding_A " +
                                                     peft::detail::shape_text(f.info(*ka).shape) + " and lora_embedding_B " +
                                                     peft::detail::shape_text(f.info(*kb).shape) + " disagree on the rank");
      }
      if (e.rank() != c.rank_for(module)) {
        peft::detail::raise<format_error>(where, "module '" + module + "' has rank " + std::to_string(e.rank()) +
                                                     " but adapter_config.json gives " + std::to_string(c.rank_for(module)));
      }
      const double alpha = c.alpha_for(module), r = static_cast<double>(e.rank());
      e.scale = c.use_rslora ? alpha / std::sqrt(r) : alpha / r;
      if (kbase) {
        const tensor_info& t = f.info(*kbase);
        if (t.shape != std::vector<std::int64_t>{e.num_embeddings(), e.embedding_dim()} || !is_floating(t.type)) {
          peft::detail::raise<format_error>(where, "'" + *kbase + "' is " + peft::detail::shape_text(t.shape) + " " +
                                                       std::string(safetensors_name(t.type)) + ", lora_embedding_A/B need a " +
                                                       std::to_string(e.num_embeddings()) + "x" +
                                                       std::to_string(e.embedding_dim()) + " floating table");
        }
        const auto bytes = f.bytes(*kbase);
        e.base_weight = raw_tensor{t.type, t.shape, std::vector<std::byte>(bytes.begin(), bytes.end())};
      }
      out.lora.push_back(std::move(e));
    }
    if (kt) {
      auto ids = token_indices_for(c, module, token_modules, where);
      if (!ids) {
        peft::detail::raise<format_error>(where, "module '" + module + "' has trainable_tokens_delta but "
                                                     "adapter_config.json's trainable_token_indices gives it no indices");
      }
      trainable_tokens<T> t;
      t.path = module;
      t.values = read_2d<T>(f, *kt, where);
      if (static_cast<std::size_t>(t.values.rows()) != ids->size()) {
        peft::detail::raise<format_error>(where, "module '" + module + "': trainable_tokens_delta is " +
                                                     peft::detail::shape_text(f.info(*kt).shape) + " but " +
                                                     std::to_string(ids->size()) + " token indices are configured");
      }
      t.indices = std::move(*ids);
      out.tokens.push_back(std::move(t));
    }
  }
  return out;
}

/// Makes `c` describe the embedding parts (for saving): target_modules, rank_pattern and
/// alpha_pattern entries for each embedding LoRA, trainable_token_indices for the tokens.
template <compute_scalar T>
void describe_embeddings(const embedding_adapters<T>& e, adapter_config& c) {
  if (!e.empty() && c.peft_type.empty()) c.peft_type = "LORA";
  for (const auto& l : e.lora) {
    if (c.fresh()) {
      c.peft_type = "LORA";
      c.r = l.rank();
      c.lora_alpha = c.use_rslora ? l.scale * std::sqrt(static_cast<double>(l.rank())) : l.scale * static_cast<double>(l.rank());
    }
    const double r = static_cast<double>(l.rank());
    if (c.rank_for(l.path) != l.rank()) c.rank_pattern.insert(c.rank_pattern.begin(), {l.path, l.rank()});
    const double s = c.use_rslora ? c.alpha_for(l.path) / std::sqrt(r) : c.alpha_for(l.path) / r;
    if (std::abs(s - l.scale) > 1e-12 * std::max(1.0, std::abs(l.scale))) {
      c.alpha_pattern.insert(c.alpha_pattern.begin(), {l.path, c.use_rslora ? l.scale * std::sqrt(r) : l.scale * r});
    }
  }
  if (e.tokens.empty()) {
    if (c.raw.contains("trainable_token_indices")) c.raw["trainable_token_indices"] = nullptr;
    return;
  }
  // Kept as read when it still gives every module its indices; else a dict keyed by full paths.
  bool same = true;
  for (const auto& t : e.tokens) {
    std::optional<std::vector<index>> ids;
    try {
      ids = token_indices_for(c, t.path, e.tokens.size(), "save_peft_checkpoint");
    } catch (const error&) {
      ids.reset();
    }
    same = same && ids && *ids == t.indices;
  }
  if (same) return;
  ordered_json d = ordered_json::object();
  for (const auto& t : e.tokens) {
    ordered_json ids = ordered_json::array();
    for (const index i : t.indices) ids.push_back(static_cast<std::int64_t>(i));
    d[t.path] = std::move(ids);
  }
  c.raw["trainable_token_indices"] = std::move(d);
}

/// Adds the tensors of the embedding parts to a checkpoint being written.
template <compute_scalar T>
void write_embeddings(const embedding_adapters<T>& e, safetensors_writer& w, std::string_view prefix, dtype stored_as) {
  auto add = [&](const std::string& key, const matrix<T>& m) {
    w.add(key, {m.rows(), m.cols()}, std::span<const T>(m.data(), static_cast<std::size_t>(m.size())), stored_as);
  };
  for (const auto& l : e.lora) {
    const std::string p = std::string(prefix) + l.path + ".";
    add(p + std::string(embedding_lora_a_name), l.a);
    add(p + std::string(embedding_lora_b_name), l.b);
    if (l.base_weight) {
      w.add(p + std::string(embedding_base_weight_name), l.base_weight->type, l.base_weight->shape,
            std::span<const std::byte>(l.base_weight->data));
    }
  }
  for (const auto& t : e.tokens) add(std::string(prefix) + t.path + "." + std::string(trainable_tokens_name), t.values);
}

}  // namespace detail

}  // namespace peft::io
