// peft/models/peft_model.hpp — a language model with named adapters, in PEFT's habits.
//
//   auto pm = peft::models::peft_model<float>::from_pretrained(
//       peft::models::causal_lm<float>::load("model_dir"), "adapter_dir");   // PeftModel.from_pretrained
//   peft::models::peft_model<float> pm2(causal_lm<float>::load("model_dir"));
//   pm2.add_adapter("default", {.method = "lora", .rank = 16, .alpha = 32, .targets = {"all-linear"}});
//   pm2.trainable_parameters();  pm2.save_pretrained("out_dir");  pm2.merge_and_unload();
//   pm2.save_all_pretrained("dir");  pm3.load_all_adapters("dir");   // PEFT's subfolder layout
//
// Module names follow transformers; a checkpoint's modules are matched to the model's by their
// path exactly, else by the one model module whose path ends with the checkpoint's (or the other
// way round, for checkpoints saved from a bare base model). Methods created from options: lora
// (rsLoRA, lora_bias, rank/alpha patterns), dora, vera, loha, lokr, adalora, ia3, shira, and the
// two trained-rank methods dynamic_rank and sora (trained with train/dynamic_rank_trainer.hpp or
// train/sora_trainer.hpp over adapters_of<...>(name), then compact_adapter(name) makes them the
// plain LoRA PEFT loads); every method the library loads can be attached from a checkpoint.
// LoRA may start from PiSSA/OLoRA (adapter_options::init; save_pretrained_converted writes
// PEFT's conversion; docs/methods/lora.md).
#pragma once

#include <algorithm>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/lora_decomposition.hpp"
#include "peft/io/peft/codecs.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/models/causal_lm.hpp"

namespace peft::models {

/// What add_adapter creates (PEFT's LoraConfig and friends, the fields that matter here).
struct adapter_options {
  std::string method = "lora";          // lora, dora, vera, loha, lokr, adalora, ia3, shira,
                                        // dynamic_rank, sora
  index rank = 8;                       // r (dynamic_rank: the target average rank, a layer
                                        // starts with ceil(1.5 r); sora: r_max)
  double alpha = 8.0;                   // lora_alpha (alpha for LoHa/LoKr)
  bool use_rslora = false;
  bool bias = false;                    // lora_bias
  std::vector<std::string> targets;     // module names, or {"all-linear"}; empty: PEFT's default
  std::vector<std::pair<std::string, index>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::vector<std::string> feedforward_modules;  // IA3
  /// lora only: PEFT's init_lora_weights "pissa" or "olora" (adapters/lora_decomposition.hpp):
  /// A, B start as factors of W0 and the base becomes the residual W0 - s B0 A0 (dense bases);
  /// empty: the default (kaiming-uniform A, zero B).
  std::string init;
  std::uint64_t seed = 0;
};

/// PEFT's default target modules for a model type (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
inline std::vector<std::string> default_targets(const lm_config& c) {
  if (c.is_gpt2()) return {"c_attn"};
  return {"q_proj", "v_proj"};
}

template <compute_scalar T, base_weight Base = dense<T>>
class peft_model {
 public:
  using model_type = causal_lm<T, Base>;
  using adapter_type = typename model_type::adapter_type;

  explicit peft_model(model_type model, std::string model_path = {})
      : model_(std::move(model)), model_path_(std::move(model_path)) {}

  /// PeftModel.from_pretrained: the model with the adapter of `dir` attached as `name`.
  static peft_model from_pretrained(model_type model, const std::filesystem::path& dir, const std::string& name = "default") {
    peft_model pm(std::move(model));
    pm.load_adapter(dir, name);
    return pm;
  }

  model_type& model() noexcept { return model_; }
  const model_type& model() const noexcept { return model_; }
  std::vector<std::string> adapter_names() const {
    std::vector<std::string> n;
    for (const auto& [k, v] : configs_) n.push_back(k);
    return n;
  }
  const io::adapter_config& adapter_config(const std::string& name = "default") const {
    auto it = configs_.find(name);
    if (it == configs_.end()) detail::raise<error>("peft_model::adapter_config", "no adapter named '" + name + "'");
    return it->second;
  }

  /// Attaches the PEFT checkpoint in `dir` as adapter `name`. format_error when one of its
  /// modules is not in the model; shape_error when its shape differs from the model's.
  void load_adapter(const std::filesystem::path& dir, const std::string& name = "default") {
    constexpr const char* where = "peft_model::load_adapter";
    check_new(where, name);
    auto mods = model_.modules();
    io::base_shape_fn shape = [&](const std::string& path) -> std::optional<std::pair<index, index>> {
      if (auto* l = find_module(mods, path, nullptr)) return std::pair<index, index>{l->out_features(), l->in_features()};
      return std::nullopt;
    };
    // PiSSA/OLoRA checkpoints saved unconverted: PEFT re-runs the decomposition on the base.
    io::base_weight_fn weights = [&](const std::string& path) -> std::optional<matrix<double>> {
      auto* l = find_module(mods, path, nullptr);
      if (l == nullptr) return std::nullopt;
      for (const auto& a : l->adapter_names()) {
        if (l->merged(a)) {
          detail::raise<error>(where, "module '" + path + "' has adapter '" + a + "' merged into its base; the "
                                      "decomposition this adapter's initialisation re-runs needs the unmerged base");
        }
      }
      return dequantized_weight<double>(l->base());
    };
    auto ck = io::load_peft_checkpoint<T>(dir, shape, weights);
    if (!ck.saved_tensors.empty()) {
      detail::raise<unsupported_error>(where, "the adapter replaces whole modules (modules_to_save: '" +
                                                  ck.saved_tensors.front().name + "'), which models/ does not run");
    }
    auto table = table_adapter_of(where, name, ck.embeddings);
    std::vector<std::pair<typename model_type::linear*, adapter_type*>> attach;
    for (auto& m : ck.modules) {
      auto* l = find_module(mods, m.path, where);
      attach.emplace_back(l, &m.adapter);
    }
    std::vector<typename model_type::linear*> done;
    try {
      for (std::size_t i = 0; i < attach.size(); ++i) {
        auto [l, a] = attach[i];
        try {
          l->add_adapter(name, std::move(*a));
        } catch (const shape_error& e) {
          detail::raise<shape_error>(where, "module '" + ck.modules[i].path + "': " + e.what());
        }
        done.push_back(l);
      }
    } catch (...) {
      for (auto* l : done) l->remove_adapter(name);
      throw;
    }
    if (table) model_.table_adapters().push_back(std::move(*table));
    configs_[name] = ck.config;
    stored_[name] = ck.stored_dtype;
  }

  /// get_peft_model: a fresh adapter `name` on every module `opt.targets` selects.
  void add_adapter(const std::string& name, const adapter_options& opt) {
    constexpr const char* where = "peft_model::add_adapter";
    check_new(where, name);
    io::adapter_config cfg = config_for(opt);
    auto mods = model_.modules();
    std::vector<std::pair<std::string, typename model_type::linear*>> chosen;
    for (auto& [n, l] : mods) {
      if (cfg.selects(n)) chosen.emplace_back(n, l);
    }
    if (chosen.empty()) detail::raise<error>(where, "target_modules " + cfg.targets_string() + " select no module of the model");
    if (!opt.init.empty()) {
      add_decomposed(where, name, opt, std::move(cfg), chosen);
      return;
    }
    std::optional<vera_projections<T>> vera_p;
    if (opt.method == "vera") {
      std::vector<std::pair<index, index>> shapes;
      for (auto& [n, l] : chosen) shapes.emplace_back(l->in_features(), l->out_features());
      vera_p = make_vera_projections<T>(opt.rank, std::span<const std::pair<index, index>>(shapes), opt.seed);
    }
    std::vector<typename model_type::linear*> done;
    try {
      std::uint64_t k = 0;
      for (auto& [n, l] : chosen) {
        l->add_adapter(name, make(where, opt, cfg, n, *l, opt.seed * 1000003 + k++, vera_p));
        done.push_back(l);
      }
    } catch (...) {
      for (auto* l : done) l->remove_adapter(name);
      throw;
    }
    configs_[name] = cfg;
    stored_[name] = dtype::f32;
  }

  /// Adapter `name` of every module that has it, as method A (e.g. dynamic_rank<T>), in module
  /// order: what the trainers of train/ take. peft::error when a module's adapter is another method.
  template <class A>
  std::vector<A*> adapters_of(const std::string& name = "default") {
    adapter_config(name);
    std::vector<A*> out;
    for (auto& [n, l] : model_.modules()) {
      if (!l->contains(name)) continue;
      auto* a = l->adapter(name).template get_if<A>();
      if (a == nullptr) {
        detail::raise<error>("peft_model::adapters_of", "adapter '" + name + "' of module '" + n + "' is " +
                                                           std::string(l->adapter(name).active_method()));
      }
      out.push_back(a);
    }
    return out;
  }

  /// Replaces every dynamic_rank / sora adapter of `name` by the plain LoRA with identical
  /// outputs (their compact(): the components whose gate is non-zero); a module whose gates are
  /// all zero loses the adapter (its term was exactly zero). Then save_pretrained writes a PEFT
  /// LoRA checkpoint (per-module ranks and scales as rank_pattern / alpha_pattern; target_modules
  /// lists the kept modules when some were dropped). Returns the number of modules dropped.
  /// peft::error when every module would be dropped, or for an adapter not merged out of the way.
  std::size_t compact_adapter(const std::string& name = "default") {
    constexpr const char* where = "peft_model::compact_adapter";
    adapter_config(name);
    auto mods = model_.modules();
    std::vector<std::pair<typename model_type::linear*, std::optional<lora<T>>>> plan;
    for (auto& [n, l] : mods) {
      if (!l->contains(name)) continue;
      if (l->merged(name)) detail::raise<error>(where, "adapter '" + name + "' is merged into '" + n + "'; unmerge it first");
      auto& a = l->adapter(name);
      std::optional<lora<T>> c;
      if (const auto* d = a.template get_if<dynamic_rank<T>>()) {
        c = d->compact();
      } else if (const auto* g = a.template get_if<sora<T>>()) {
        c = g->compact();
      } else {
        continue;  // already a plain adapter
      }
      plan.emplace_back(l, std::move(c));
    }
    if (plan.empty()) return 0;
    std::size_t remaining = 0;
    for (auto& [n, l] : mods) remaining += l->contains(name) ? 1 : 0;
    std::size_t dropped = 0;
    for (auto& [l, c] : plan) dropped += c ? 0 : 1;
    if (dropped == remaining) detail::raise<error>(where, "every component of adapter '" + name + "' is zero; nothing to keep");
    const bool enabled = plan.front().first->enabled(name);
    for (auto& [l, c] : plan) {
      l->remove_adapter(name);
      if (c) {
        l->add_adapter(name, adapter_type(std::move(*c)));
        l->set_enabled(name, enabled);
      }
    }
    auto& cfg = configs_[name];
    if (dropped > 0) {
      std::vector<std::string> targets;
      for (auto& [n, l] : mods) {
        if (l->contains(name)) targets.push_back(n);
      }
      cfg.targets_kind = io::target_kind::list;
      cfg.target_modules = targets;
      cfg.raw["target_modules"] = targets;
    }
    return dropped;
  }

  /// Removes adapter `name` from every module. An adapter initialised with PiSSA/OLoRA here
  /// gives its modules' bases back what the initialisation took out of them (s B0 A0).
  void delete_adapter(const std::string& name) {
    adapter_config(name);
    auto initial = initial_.find(name);
    for (auto& [n, l] : model_.modules()) {
      if (!l->contains(name)) continue;
      l->remove_adapter(name);
      if (initial == initial_.end()) continue;
      if constexpr (mutable_base_weight<Base>) {
        const auto& [f, s] = initial->second.at(n);
        const matrix<double> d = initial_delta(f, s);
        l->base().add_to_weight(matrix_view<const double>(d.view()), 1.0);
      }
    }
    if (initial != initial_.end()) initial_.erase(initial);
    auto& tables = model_.table_adapters();
    tables.erase(std::remove_if(tables.begin(), tables.end(), [&](const auto& t) { return t.name == name; }), tables.end());
    configs_.erase(name);
    stored_.erase(name);
  }

  /// Makes `name` the only enabled adapter (PEFT's set_adapter).
  void set_adapter(const std::string& name) {
    adapter_config(name);
    for (auto& [n, l] : model_.modules()) {
      for (const auto& a : l->adapter_names()) {
        if (!l->merged(a)) l->set_enabled(a, a == name);
      }
    }
    for (auto& t : model_.table_adapters()) t.enabled = t.name == name;
  }

  /// Per-request adapters: the logits of `b` (as causal_lm::forward) where sequence i runs with
  /// adapter `adapter_of[i]` alone ("" = the base model, no adapter). Sequences of the same
  /// adapter run together; which adapters are enabled afterwards is as before. peft::error for
  /// an unknown name or when an adapter is merged (its delta is in every sequence's weights).
  matrix<T> forward_per_sequence(const token_batch& b, const std::vector<std::string>& adapter_of) {
    constexpr const char* where = "peft_model::forward_per_sequence";
    if (!model_.table_adapters().empty()) {
      detail::raise<unsupported_error>(where, "adapter '" + model_.table_adapters().front().name +
                                                  "' changes the token table (embedding LoRA, trainable tokens); "
                                                  "per-sequence adapters do not run it");
    }
    if (static_cast<index>(adapter_of.size()) != b.sequences) {
      detail::raise<shape_error>(where, "give one adapter name per sequence");
    }
    for (const auto& a : adapter_of) {
      if (!a.empty()) adapter_config(a);
    }
    auto mods = model_.modules();
    std::vector<std::pair<typename model_type::linear*, std::vector<std::pair<std::string, bool>>>> before;
    for (auto& [n, l] : mods) {
      std::vector<std::pair<std::string, bool>> states;
      for (const auto& a : l->adapter_names()) {
        if (l->merged(a)) detail::raise<error>(where, "adapter '" + a + "' is merged into '" + n + "'");
        states.emplace_back(a, l->enabled(a));
      }
      before.emplace_back(l, std::move(states));
    }
    auto restore = [&] {
      for (auto& [l, states] : before) {
        for (const auto& [a, on] : states) l->set_enabled(a, on);
      }
    };
    matrix<T> out(b.sequences * b.length, model_.vocab_size());
    std::vector<std::string> names = adapter_of;
    std::sort(names.begin(), names.end());
    names.erase(std::unique(names.begin(), names.end()), names.end());
    try {
      for (const auto& name : names) {
        for (auto& [l, states] : before) {
          for (const auto& st : states) l->set_enabled(st.first, st.first == name);
        }
        token_batch part;
        part.length = b.length;
        std::vector<index> rows;
        for (index s = 0; s < b.sequences; ++s) {
          if (adapter_of[static_cast<std::size_t>(s)] != name) continue;
          rows.push_back(s);
          const auto from = static_cast<std::size_t>(s * b.length), to = from + static_cast<std::size_t>(b.length);
          part.ids.insert(part.ids.end(), b.ids.begin() + from, b.ids.begin() + to);
          if (!b.mask.empty()) part.mask.insert(part.mask.end(), b.mask.begin() + from, b.mask.begin() + to);
          if (!b.positions.empty()) part.positions.insert(part.positions.end(), b.positions.begin() + from, b.positions.begin() + to);
        }
        part.sequences = static_cast<index>(rows.size());
        const auto logits = model_.forward(part);
        for (std::size_t i = 0; i < rows.size(); ++i) {
          for (index c = 0; c < b.length; ++c) {
            const T* src = logits.row(static_cast<index>(i) * b.length + c);
            std::copy(src, src + model_.vocab_size(), out.row(rows[i] * b.length + c));
          }
        }
      }
    } catch (...) {
      restore();
      throw;
    }
    restore();
    return out;
  }

  /// Trainable adapter values (PEFT's print_trainable_parameters numerator; shared tensors once).
  std::size_t trainable_parameters() {
    std::size_t n = 0;
    for (const auto& p : model_.parameters()) {
      if (p.trainable && !p.integer) n += static_cast<std::size_t>(p.value.size());
    }
    return n;
  }

  /// Every tensor of adapter `name` by its key in adapter_model.safetensors.
  std::map<std::string, parameter<T>> named_parameters(const std::string& name = "default") {
    std::map<std::string, parameter<T>> out;
    for (auto& [n, l] : model_.modules()) {
      if (!l->contains(name)) continue;
      for (auto p : l->adapter(name).parameters()) {
        const std::string key = p.shared ? std::string(io::peft_shared_prefix) + p.name
                                         : std::string(io::peft_key_prefix) + n + "." + p.name;
        out.emplace(key, std::move(p));
      }
    }
    for (auto& p : model_.parameters()) {  // table adapters: "<module>.<name>.<parameter>"
      const auto at = p.name.find("." + name + ".");
      if (at == std::string::npos) continue;
      const std::string param = p.name.substr(at + name.size() + 2);
      if (param != "lora_embedding_A" && param != "lora_embedding_B" && param != "token_adapter.trainable_tokens_delta") {
        continue;
      }
      const std::string module = p.name.substr(0, at);
      if (module != model_.embedding_path() && module != "lm_head") continue;
      out.emplace(std::string(io::peft_key_prefix) + module + "." + param, std::move(p));
    }
    return out;
  }

  /// save_pretrained: adapter_config.json + adapter_model.safetensors of adapter `name` in `dir`
  /// (tensors stored as `stored_as`, default: the dtype the adapter was loaded with).
  void save_pretrained(const std::filesystem::path& dir, const std::string& name = "default",
                       std::optional<dtype> stored_as = std::nullopt) {
    io::peft_checkpoint<T> ck;
    ck.config = adapter_config(name);
    for (auto& [n, l] : model_.modules()) {
      if (l->contains(name)) ck.add(n, l->adapter(name));
    }
    for (const auto& t : model_.table_adapters()) {
      if (t.name != name) continue;
      if (t.lora) ck.embeddings.lora.push_back(*t.lora);
      if (t.tokens) ck.embeddings.tokens.push_back(*t.tokens);
      if (t.head) ck.embeddings.tokens.push_back(*t.head);
      std::sort(ck.embeddings.tokens.begin(), ck.embeddings.tokens.end(),
                [](const auto& a, const auto& b) { return a.path < b.path; });
    }
    io::save_peft_checkpoint(dir, ck, stored_as.value_or(stored_.at(name)));
  }

  /// save_pretrained with PEFT's path_initial_model_for_weight_conversion: adapter `name`,
  /// initialised with PiSSA/OLoRA (add_adapter's init, or loaded), written as the plain LoRA of
  /// rank 2r relative to the original base (lora_decomposition.hpp: A' = [A; A0], B' = [B, -B0];
  /// config r and lora_alpha doubled, init_lora_weights true). An adapter loaded from an
  /// unconverted checkpoint is held converted already and saves the same with save_pretrained.
  /// peft::error for an adapter this model did not initialise with a decomposition.
  void save_pretrained_converted(const std::filesystem::path& dir, const std::string& name = "default",
                                 std::optional<dtype> stored_as = std::nullopt) {
    constexpr const char* where = "peft_model::save_pretrained_converted";
    adapter_config(name);
    const auto initial = initial_.find(name);
    if (initial == initial_.end()) {
      detail::raise<error>(where, "adapter '" + name + "' was not initialised with pissa or olora by add_adapter");
    }
    io::peft_checkpoint<T> ck;
    ck.config = adapter_config(name);
    io::peft_codec<lora<T>>::after_load(ck.config);
    for (auto& [n, l] : model_.modules()) {
      if (!l->contains(name)) continue;
      const auto* a = l->adapter(name).template get_if<lora<T>>();
      if (a == nullptr) detail::raise<error>(where, "adapter '" + name + "' of module '" + n + "' is not a LoRA");
      ck.add(n, adapter_type(with_initial_factors(*a, initial->second.at(n).first)));
    }
    io::save_peft_checkpoint(dir, ck, stored_as.value_or(stored_.at(name)));
  }

  /// PEFT's layout for several adapters in one directory (a PeftModel's save_pretrained):
  /// adapter "default" in `dir` itself, every other adapter in `dir`/<name>, each written as
  /// save_pretrained(dir, name) writes it. peft::error when there is no adapter or a name is not
  /// a plain directory name (nothing is written then).
  void save_all_pretrained(const std::filesystem::path& dir) {
    constexpr const char* where = "peft_model::save_all_pretrained";
    if (configs_.empty()) detail::raise<error>(where, "the model has no adapter");
    for (const auto& [n, c] : configs_) {
      if (n != "default" && !plain_dir_name(n)) {
        detail::raise<error>(where, "adapter name '" + n + "' cannot be a directory name");
      }
    }
    for (const auto& [n, c] : configs_) save_pretrained(n == "default" ? dir : dir / n, n);
  }

  /// Attaches every adapter of PEFT's several-adapter layout: `dir`'s own (when it holds an
  /// adapter_config.json) as "default", and each subdirectory holding an adapter_config.json as
  /// the adapter named after it, in name order. Returns the names attached. format_error when
  /// `dir` holds no adapter; when one fails to load, the ones attached before are removed again.
  std::vector<std::string> load_all_adapters(const std::filesystem::path& dir) {
    constexpr const char* where = "peft_model::load_all_adapters";
    namespace fs = std::filesystem;
    std::vector<std::pair<std::string, fs::path>> found;
    if (fs::exists(dir / "adapter_config.json")) found.emplace_back("default", dir);
    std::vector<std::pair<std::string, fs::path>> subs;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      if (e.is_directory() && fs::exists(e.path() / "adapter_config.json")) subs.emplace_back(e.path().filename().string(), e.path());
    }
    if (ec) detail::raise<io_error>(where, "cannot list " + dir.string() + ": " + ec.message());
    std::sort(subs.begin(), subs.end());
    found.insert(found.end(), subs.begin(), subs.end());
    if (found.empty()) detail::raise<format_error>(where, dir.string() + " holds no adapter_config.json, nor a subdirectory with one");
    std::vector<std::string> names;
    try {
      for (const auto& [n, p] : found) {
        load_adapter(p, n);
        names.push_back(n);
      }
    } catch (...) {
      for (const auto& n : names) delete_adapter(n);
      throw;
    }
    return names;
  }

  /// Merges every enabled adapter into its base and removes all adapters (merge_and_unload).
  void merge_and_unload()
    requires mutable_base_weight<Base>
  {
    for (auto& [n, l] : model_.modules()) {
      for (const auto& a : l->adapter_names()) {
        if (l->enabled(a) && !l->merged(a)) l->merge(a);
      }
      for (const auto& a : l->adapter_names()) l->unload(a);
    }
    model_.merge_table_adapters();
    configs_.clear();
    stored_.clear();
    initial_.clear();  // the bases now hold the whole merged weights
  }

 private:
  /// The table adapter (causal_lm::table_adapter) of a checkpoint's embedding parts, checked
  /// against the model; nullopt when it has none.
  std::optional<typename model_type::table_adapter> table_adapter_of(const char* where, const std::string& name,
                                                                      const io::embedding_adapters<T>& e) const {
    if (e.empty()) return std::nullopt;
    if (model_.embeddings_in_file()) {
      detail::raise<unsupported_error>(where, "the adapter changes the token table of '" + e.first_path() +
                                                  "' but the embeddings are read from a GGUF file in place");
    }
    const auto& cfg = model_.config();
    const std::string embed = model_.embedding_path();
    typename model_type::table_adapter t;
    t.name = name;
    for (const auto& l : e.lora) {
      if (l.path != embed) {
        detail::raise<format_error>(where, "embedding LoRA on '" + l.path + "': the model's input embedding is '" + embed + "'");
      }
      l.check_table(cfg.vocab_size, cfg.hidden_size, where);
      t.lora = l;
      t.grad_a = matrix<T>(l.a.rows(), l.a.cols());
      t.grad_b = matrix<T>(l.b.rows(), l.b.cols());
    }
    for (const auto& k : e.tokens) {
      k.check_table(cfg.vocab_size, cfg.hidden_size, where);
      if (k.path == embed) {
        t.tokens = k;
        t.grad_tokens = matrix<T>(k.values.rows(), k.values.cols());
      } else if (k.path == "lm_head" && !cfg.tie_word_embeddings) {
        t.head = k;
        t.grad_head = matrix<T>(k.values.rows(), k.values.cols());
      } else {
        detail::raise<unsupported_error>(where, "trainable tokens on '" + k.path + "': the model runs them on its input "
                                                    "embedding '" + embed + "' and an untied lm_head only");
      }
    }
    return t;
  }

  model_type model_;
  std::string model_path_;
  std::map<std::string, io::adapter_config> configs_;
  std::map<std::string, dtype> stored_;
  /// Adapters add_adapter initialised with PiSSA/OLoRA: per module, A0, B0 and the scale s.
  std::map<std::string, std::map<std::string, std::pair<lora_factors<T>, double>>> initial_;

  /// W0 of a layer's base, dequantized, in double.
  /// add_adapter for lora with init "pissa" / "olora": factors for every chosen module first (so
  /// a failure changes nothing), then each base becomes its residual and the adapter starts at
  /// the factors.
  template <class Chosen>
  void add_decomposed(const char* where, const std::string& name, const adapter_options& opt, io::adapter_config cfg,
                      Chosen& chosen) {
    if (opt.method != "lora") {
      detail::raise<unsupported_error>(where, "init '" + opt.init + "' applies to method lora only (got " + opt.method + ")");
    }
    if (opt.init != "pissa" && opt.init != "olora") {
      detail::raise<unsupported_error>(where, "init '" + opt.init + "' is not one of pissa, olora");
    }
    if constexpr (!dense_storage_base<Base>) {
      detail::raise<unsupported_error>(where, "init '" + opt.init + "' rewrites the base weights into their residual; "
                                              "initialise over a dense base (then quantize the residual, as PEFT advises)");
    } else {
      if (opt.bias) detail::raise<unsupported_error>(where, "init '" + opt.init + "' with lora_bias is not supported");
      if (opt.init == "olora" && cfg.fan_in_fan_out) {
        detail::raise<unsupported_error>(where, "PEFT's olora factors the stored (in, out) weight of GPT-2's Conv1D "
                                                "modules, whose factors do not fit the adapter");
      }
      const auto kind = opt.init == "pissa" ? lora_decomposition::pissa : lora_decomposition::olora;
      std::map<std::string, std::pair<lora_factors<T>, double>> factors;
      for (auto& [n, l] : chosen) {
        for (const auto& a : l->adapter_names()) {
          if (l->merged(a)) detail::raise<error>(where, "module '" + n + "' has adapter '" + a + "' merged into its base");
        }
        const index r = cfg.rank_for(n);
        const double s = lora_scale(cfg.alpha_for(n), r, cfg.use_rslora);
        factors.emplace(n, std::pair{decompose_base<T>(kind, l->base(), r, s), s});
      }
      std::vector<typename model_type::linear*> done;
      try {
        for (auto& [n, l] : chosen) {
          const auto& [f, s] = factors.at(n);
          l->add_adapter(name, adapter_type(lora<T>(f.a, f.b, static_cast<T>(s))));
          const matrix<double> d = initial_delta(f, s);
          l->base().add_to_weight(matrix_view<const double>(d.view()), -1.0);
          done.push_back(l);
        }
      } catch (...) {
        for (auto* l : done) {
          l->remove_adapter(name);
          for (auto& [n, c] : chosen) {
            if (c != l) continue;
            const auto& [f, s] = factors.at(n);
            const matrix<double> d = initial_delta(f, s);
            l->base().add_to_weight(matrix_view<const double>(d.view()), 1.0);
          }
        }
        throw;
      }
      cfg.raw["init_lora_weights"] = opt.init;
      configs_[name] = std::move(cfg);
      stored_[name] = dtype::f32;
      initial_[name] = std::move(factors);
    }
  }

  static bool plain_dir_name(const std::string& n) {
    return !n.empty() && n != "." && n != ".." && n.find('/') == std::string::npos && n.find('\\') == std::string::npos &&
           n.find('\0') == std::string::npos;
  }

  void check_new(const char* where, const std::string& name) const {
    if (configs_.count(name)) detail::raise<error>(where, "an adapter named '" + name + "' exists");
  }

  template <class Modules>
  static typename model_type::linear* find_module(Modules& mods, const std::string& path, const char* where) {
    for (auto& [n, l] : mods) {
      if (n == path) return l;
    }
    typename model_type::linear* found = nullptr;
    std::string found_name;
    for (auto& [n, l] : mods) {
      if (n.ends_with("." + path) || path.ends_with("." + n)) {
        if (found != nullptr && where != nullptr) {
          detail::raise<format_error>(where, "the adapter's module '" + path + "' matches both '" + found_name +
                                                 "' and '" + n + "'");
        }
        found = l;
        found_name = n;
      }
    }
    if (found == nullptr && where != nullptr) {
      detail::raise<format_error>(where, "the adapter's module '" + path + "' is not a projection of the model");
    }
    return found;
  }

  io::adapter_config config_for(const adapter_options& opt) const {
    constexpr const char* where = "peft_model::add_adapter";
    static const std::vector<std::string> methods = {"lora", "dora",  "vera",         "loha", "lokr",
                                                     "adalora", "ia3", "shira", "dynamic_rank", "sora"};
    if (std::find(methods.begin(), methods.end(), opt.method) == methods.end()) {
      detail::raise<unsupported_error>(where, "method '" + opt.method +
                                                  "' cannot be created from options (lora, dora, vera, loha, lokr, "
                                                  "adalora, ia3, shira, dynamic_rank, sora); attach it from a checkpoint");
    }
    if (opt.rank < 1) detail::raise<error>(where, "rank must be positive");
    io::adapter_config c;
    // The method's PEFT config class decides which fields the document carries (a VeRA config
    // has no lora_alpha); dynamic_rank and sora are saved as the LoRA they compact to.
    const std::string& m = opt.method;
    c.peft_type = m == "vera"      ? "VERA"
                  : m == "loha"    ? "LOHA"
                  : m == "lokr"    ? "LOKR"
                  : m == "adalora" ? "ADALORA"
                  : m == "ia3"     ? "IA3"
                  : m == "shira"   ? "SHIRA"
                                   : "LORA";
    const auto targets = opt.targets.empty() ? default_targets(model_.config()) : opt.targets;
    if (targets.size() == 1 && (targets[0] == "all-linear" || targets[0] == "ALL-LINEAR")) {
      c.targets_kind = io::target_kind::all_linear;
    } else {
      c.targets_kind = io::target_kind::list;
      c.target_modules = targets;
    }
    c.r = opt.rank;
    c.lora_alpha = opt.alpha;
    c.use_rslora = opt.use_rslora;
    c.use_dora = opt.method == "dora";
    c.lora_bias = opt.bias;
    c.fan_in_fan_out = model_.config().is_gpt2();
    c.rank_pattern = opt.rank_pattern;
    c.alpha_pattern = opt.alpha_pattern;
    if (model_.config().is_gpt2() && (opt.method == "loha" || opt.method == "lokr" || opt.method == "shira")) {
      // PEFT refuses these on transformers' Conv1D, so a checkpoint made here would not load there.
      detail::raise<unsupported_error>(where, "PEFT does not apply " + opt.method +
                                                  " to GPT-2's Conv1D modules; its checkpoint would not load in PEFT");
    }
    if ((opt.use_rslora || opt.bias) && opt.method != "lora" && opt.method != "dora") {
      detail::raise<unsupported_error>(where, "use_rslora and lora_bias apply to lora and dora only");
    }
    c.raw = c.to_json();
    c.raw["task_type"] = "CAUSAL_LM";
    if (!model_path_.empty()) c.raw["base_model_name_or_path"] = model_path_;
    if (opt.method == "ia3") c.raw["feedforward_modules"] = opt.feedforward_modules;
    if (c.fan_in_fan_out) c.raw["fan_in_fan_out"] = true;  // GPT-2's Conv1D, for every method's config
    return c;
  }

  static bool listed(const std::vector<std::string>& keys, const std::string& module) {
    for (const auto& k : keys) {
      if (module == k || module.ends_with("." + k)) return true;
    }
    return false;
  }

  adapter_type make(const char* where, const adapter_options& opt, const io::adapter_config& cfg, const std::string& module,
                    const typename model_type::linear& l, std::uint64_t seed,
                    const std::optional<vera_projections<T>>& vera_p) const {
    const index in = l.in_features(), out = l.out_features();
    const index r = cfg.rank_for(module);
    const double alpha = cfg.alpha_for(module);
    const std::string& m = opt.method;
    if (m == "lora" || m == "dora") {
      lora_options o;
      o.rank = r;
      o.alpha = alpha;
      o.use_rslora = opt.use_rslora;
      o.bias = opt.bias;
      o.seed = seed;
      if (m == "dora") return dora<T>(l.base(), o);
      return lora<T>(in, out, o);
    }
    if (m == "loha") return loha<T>(in, out, loha_options{.rank = r, .alpha = alpha, .seed = seed});
    if (m == "lokr") {
      lokr_options o;
      o.rank = r;
      o.alpha = alpha;
      o.seed = seed;
      return lokr<T>(in, out, o);
    }
    if (m == "adalora") return adalora<T>(in, out, adalora_options{.rank = r, .alpha = alpha, .seed = seed});
    if (m == "ia3") return ia3<T>(in, out, ia3_options{.feedforward = listed(opt.feedforward_modules, module), .seed = seed});
    if (m == "shira") return shira<T>(in, out, shira_options{.rank = r, .seed = seed});
    if (m == "vera") return vera<T>(*vera_p, in, out);
    if (m == "dynamic_rank") return dynamic_rank<T>(in, out, dynamic_rank_options{.rank = r, .alpha = alpha, .seed = seed});
    if (m == "sora") return sora<T>(in, out, sora_options{.rank = r, .alpha = alpha, .seed = seed});
    detail::raise<unsupported_error>(where, "method '" + m + "' cannot be created from options");
  }
};

}  // namespace peft::models
