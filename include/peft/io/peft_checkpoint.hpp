// peft/io/peft_checkpoint.hpp — HuggingFace PEFT checkpoints: adapter_config.json +
// adapter_model.safetensors, loaded into one adapter per adapted module and saved back.
//
//   auto ck = peft::io::load_peft_checkpoint<float>("path/to/adapter");   // any_adapter<float>
//   for (auto& m : ck.modules) { m.path; m.weight_name; m.adapter.forward(base, x, y, cache); }
//   peft::io::save_peft_checkpoint("out/adapter", ck);                      // PEFT loads it
//   auto mem = peft::io::load_peft_checkpoint<float>(peft::io::adapter_config::parse(json_text),
//                                                    peft::io::safetensors_file::parse(bytes));
//
// Keys on disk are "base_model.model.<module path>.<parameter>" (PEFT drops the adapter name on
// save); tensors shared by all modules are "base_model.<name>" (VeRA's projections). A module's
// base weight is "<module path>.weight". The method is chosen from adapter_config.json: the
// first alternative of the adapter type (any_adapter: adapters/registry.hpp's order; or one
// concrete type) whose codec (io/peft/<method>.hpp) handles the config reads every module.
// Tensors of `modules_to_save` modules (whole replacement weights) are kept verbatim in
// `saved_tensors`. A LoRA checkpoint's embedding parts (lora_embedding_A/B, trainable tokens) are
// in `embeddings` (io/embedding_adapters.hpp); code that runs only `modules` must refuse them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "peft/adapters/any_adapter.hpp"
#include "peft/core/checkpoint_codec.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/io/adapter_config.hpp"
#include "peft/io/checkpoint_tensors.hpp"
#include "peft/io/embedding_adapters.hpp"
#include "peft/io/peft/codecs.hpp"
#include "peft/io/safetensors.hpp"

namespace peft::io {

inline constexpr std::string_view peft_key_prefix = "base_model.model.";

/// Optional knowledge of the base model for the loader: module path -> (out_features,
/// in_features) of its weight, or nullopt. Needed only by methods whose tensors do not fix the
/// layer's shape (SHiRA's sparse indices may leave the last rows or columns empty).
using base_shape_fn = std::function<std::optional<std::pair<index, index>>(const std::string& module)>;
inline constexpr std::string_view peft_shared_prefix = "base_model.";

/// One adapted module of a checkpoint.
template <class Adapter>
struct adapted_module {
  std::string path;         // module path, e.g. "model.layers.0.self_attn.q_proj"
  std::string weight_name;  // the base weight it adapts: path + ".weight"
  Adapter adapter;
};

/// A tensor stored verbatim (modules_to_save): `name` is the base tensor it replaces.
struct saved_tensor {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;
};

/// A loaded checkpoint. Adapter is any_adapter<T> by default, or one concrete adapter type.
template <class Adapter>
struct basic_peft_checkpoint {
  using adapter_type = Adapter;
  adapter_config config;
  std::vector<adapted_module<Adapter>> modules;  // sorted by path
  std::vector<saved_tensor> saved_tensors;
  embedding_adapters<typename Adapter::scalar> embeddings;  // LoRA on embeddings, trainable tokens
  dtype stored_dtype = dtype::f32;               // dtype of the adapter tensors as read

  /// Adds the adapter of a module, named by its path ("model.layers.0.self_attn.q_proj") or by
  /// its base weight (the same + ".weight", as load_bases and the serving registry name them);
  /// modules stay sorted. peft::error when the module is present.
  adapted_module<Adapter>& add(std::string path, Adapter a) {
    if (path.ends_with(".weight")) path.resize(path.size() - 7);
    auto it = std::lower_bound(modules.begin(), modules.end(), path,
                               [](const adapted_module<Adapter>& m, const std::string& p) { return m.path < p; });
    if (it != modules.end() && it->path == path) {
      peft::detail::raise<error>("peft_checkpoint::add", "module '" + path + "' is already in the checkpoint");
    }
    std::string weight = path + ".weight";
    return *modules.insert(it, adapted_module<Adapter>{std::move(path), std::move(weight), std::move(a)});
  }

  /// The module adapting base weight `weight_name`, or nullptr.
  const adapted_module<Adapter>* find(const std::string& weight_name) const {
    for (const auto& m : modules) {
      if (m.weight_name == weight_name) return &m;
    }
    return nullptr;
  }
  adapted_module<Adapter>* find(const std::string& weight_name) {
    return const_cast<adapted_module<Adapter>*>(std::as_const(*this).find(weight_name));
  }
  /// Trainable parameters over all modules and embedding parts (as PEFT counts them); a shared
  /// tensor counts once, frozen ones (VeRA's projections) and integer ones (SHiRA's indices) not at all.
  std::size_t parameter_count() {
    std::size_t n = 0;
    std::vector<const void*> seen;
    for (auto& m : modules) {
      for (const auto& p : m.adapter.parameters()) {
        if (!p.trainable || p.integer) continue;
        if (p.shared) {
          if (std::find(seen.begin(), seen.end(), p.value.data()) != seen.end()) continue;
          seen.push_back(p.value.data());
        }
        n += static_cast<std::size_t>(p.value.size());
      }
    }
    return n + embeddings.parameter_count();
  }
};

template <compute_scalar T>
using peft_checkpoint = basic_peft_checkpoint<any_adapter<T>>;

namespace detail {

template <class Adapter>
struct alternatives {
  using type = type_list<Adapter>;
};
template <class... As>
struct alternatives<variant_adapter<As...>> {
  using type = type_list<As...>;
};

/// Every alternative has a codec (a method added to adapters/registry.hpp without one fails here).
template <class... As>
constexpr bool all_have_codecs(type_list<As...>) {
  return (checkpoint_codec<peft_codec<As>, As> && ...);
}

/// Splits "base_model.model.<module>.<param>" for a param in `params` (longest match wins).
inline bool split_key(const std::string& rest, const std::vector<std::string_view>& params, std::string& module,
                      std::string& param) {
  std::size_t best = 0;
  for (auto p : params) {
    if (rest.size() > p.size() + 1 && rest.ends_with(p) && rest[rest.size() - p.size() - 1] == '.' && p.size() > best) {
      best = p.size();
      param = std::string(p);
    }
  }
  if (best == 0) return false;
  module = rest.substr(0, rest.size() - best - 1);
  return true;
}

template <compute_scalar T>
stored_tensor<T> convert_tensor(const safetensors_file& f, const tensor_info& t) {
  stored_tensor<T> s;
  s.shape = t.shape;
  s.type = t.type;
  index rows = 1, cols = 1;
  if (t.shape.size() == 1) {
    cols = static_cast<index>(t.shape[0]);
  } else if (!t.shape.empty()) {
    rows = static_cast<index>(t.shape[0]);
    for (std::size_t i = 1; i < t.shape.size(); ++i) {
      // The file's element count did not overflow, but with rows == 0 the row length still can.
      if (__builtin_mul_overflow(cols, static_cast<index>(t.shape[i]), &cols)) {
        peft::detail::raise<format_error>("load_peft_checkpoint", "tensor '" + t.name + "' is " +
                                                                    peft::detail::shape_text(t.shape) +
                                                                    ": its row length overflows");
      }
    }
  }
  s.data = std::make_shared<matrix<T>>(rows, cols, f.read<T>(t.name));
  return s;
}

template <class A, class Adapter>
void load_modules(basic_peft_checkpoint<Adapter>& ck, const safetensors_file& file, const base_shape_fn& base_shape,
                  const base_weight_fn& base_weight) {
  using T = typename A::scalar;
  using codec = peft_codec<A>;
  constexpr const char* where = "load_peft_checkpoint";
  const adapter_config& cfg = ck.config;
  const auto params = codec::module_tensors();
  const auto shared_names = codec::shared_tensors();
  checkpoint_tensors<T> shared;
  std::map<std::string, checkpoint_tensors<T>> by_module;
  embedding_keys embedding;  // plain LoRA only: lora_embedding_A/B, trainable tokens
  bool first = true;
  for (const auto& t : file.tensors()) {
    if (!t.name.starts_with(peft_shared_prefix)) {
      peft::detail::raise<format_error>(where, "key '" + t.name + "' does not start with 'base_model.'");
    }
    if (!t.name.starts_with(peft_key_prefix)) {
      const std::string name = t.name.substr(peft_shared_prefix.size());
      // A codec names its shared tensors (shared_tensors()), or recognises a family of them
      // (shared_tensor(name): FRoD's frod_V.<category>).
      bool known = std::find(shared_names.begin(), shared_names.end(), name) != shared_names.end();
      if constexpr (requires { codec::shared_tensor(std::string_view(name)); }) {
        known = known || codec::shared_tensor(std::string_view(name));
      }
      if (!known) {
        peft::detail::raise<format_error>(where, "key '" + t.name + "' is not a shared tensor of " + std::string(A::method));
      }
      shared.add(name, convert_tensor<T>(file, t));
      continue;
    }
    const std::string rest = t.name.substr(peft_key_prefix.size());
    std::string module, param;
    if (!split_key(rest, params, module, param)) {
      if (A::method == std::string_view("lora") && take_embedding_key(embedding, rest, t.name)) {
        if (first && is_floating(t.type) && !rest.ends_with(embedding_base_weight_name)) {
          ck.stored_dtype = t.type;  // the adapter's dtype, not the base table's
          first = false;
        }
        continue;
      }
      const auto dot = rest.rfind('.');
      const std::string owner = dot == std::string::npos ? rest : rest.substr(0, dot);
      if (cfg.saves_module(owner)) {
        saved_tensor s{rest, t.type, t.shape, {}};
        const auto b = file.bytes(t.name);
        s.data.assign(b.begin(), b.end());
        ck.saved_tensors.push_back(std::move(s));
        continue;
      }
      peft::detail::raise<format_error>(where, "key '" + t.name + "' is not a parameter of " + std::string(A::method) +
                                                   " (peft_type " + cfg.peft_type + ")");
    }
    if (!is_floating(t.type) && !codec::integer_tensor(param)) {
      peft::detail::raise<format_error>(where, "tensor '" + t.name + "' has non-floating dtype " +
                                                   std::string(safetensors_name(t.type)));
    }
    if (first && is_floating(t.type)) {
      ck.stored_dtype = t.type;
      first = false;
    }
    auto [it, inserted] = by_module.try_emplace(module, module);
    it->second.add(param, convert_tensor<T>(file, t));
  }
  for (auto& [module, tensors] : by_module) {
    // PEFT adapts only the modules its config selects and drops other tensors with a warning:
    // refused here rather than merged differently (no target_modules: nothing to check against).
    if (const auto why = cfg.unselected_by(module);
        !why.empty() && !(why == "target_modules" && cfg.targets_kind == target_kind::none)) {
      peft::detail::raise<format_error>(where, "module '" + module + "' has adapter tensors but the config's " +
                                                   std::string(why) + " leaves it out (PEFT would not load them)");
    }
    std::optional<std::pair<index, index>> shape;
    if (base_shape) shape = base_shape(module);
    tensors.set_base_shape(shape);
    tensors.set_base_weight(&base_weight);
    A a = codec::from_checkpoint(cfg, tensors, shared);
    if constexpr (requires { a.set_features(index{}, index{}); }) {
      if (shape) a.set_features(shape->second, shape->first);
    }
    ck.modules.push_back({module, module + ".weight", Adapter(std::move(a))});
  }
  if (!embedding.empty()) ck.embeddings = read_embedding_adapters<T>(cfg, file, embedding);
  if (ck.modules.empty() && ck.embeddings.empty()) {
    const std::string name = file.path().empty() ? std::string("adapter_model.safetensors") : file.path().string();
    peft::detail::raise<format_error>(where, name + " holds no adapted module");
  }
}

inline void write_text_atomically(const std::filesystem::path& path, const std::string& text) {
  auto tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) peft::detail::raise<io_error>("save_peft_checkpoint", "cannot write " + tmp.string());
    out << text;
    out.flush();
    if (!out) {
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      peft::detail::raise<io_error>("save_peft_checkpoint", "cannot write " + tmp.string());
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    peft::detail::raise<io_error>("save_peft_checkpoint", "cannot rename onto " + path.string());
  }
}

}  // namespace detail

namespace detail {

/// Why a PEFT method that no codec reads is refused, for those whose reason is not merely "not
/// yet" (empty otherwise).
inline std::string refused_method_reason(std::string_view peft_type) {
  for (const std::string_view prompt : {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING",
                                        "ADAPTION_PROMPT", "CPT", "CARTRIDGE"}) {
    if (peft_type == prompt) {
      return "a prompt-learning method: it adds virtual tokens or key/value prefixes to the input, it adapts no "
             "linear layer";
    }
  }
  if (peft_type == "LN_TUNING") return "it tunes the layer norms, it adapts no linear layer";
  if (peft_type == "POLY" || peft_type == "XLORA") {
    return "it routes each input among several LoRAs by a learned gate: no one adapter or weight stands for it";
  }
  if (peft_type == "PSOFT") {
    return "its rotation acts between the base weight's singular vectors, whose signs are the choice of the "
           "LAPACK build that computed them when the adapter was created; they are not in the checkpoint, so its "
           "update cannot be reproduced";
  }
  if (peft_type == "LILY") {
    return "its router mixes the shared up-projections by the routing weights averaged over every token of the "
           "batch, so a sequence's output depends on the other sequences of its batch: no weight stands for it (PEFT "
           "cannot merge it either)";
  }
  if (peft_type == "SHADOW") {
    return "it runs a second, smaller transformer beside the model and adds its state to whole decoder blocks' "
           "outputs: it adapts no linear layer and cannot be merged";
  }
  if (peft_type == "ADAMSS") {
    return "which output rows each subspace updates (scatter_index) is not in the checkpoint: PEFT recomputes it on "
           "load from a seeded randomized SVD and k-means, which another machine or library does not reproduce";
  }
  return {};
}

/// What both load_checkpoint_as overloads do: the first alternative of Adapter whose codec
/// handles `config` reads the tensors of the file `weights()` returns (asked for only then).
template <class Adapter, class Weights>
basic_peft_checkpoint<Adapter> load_checkpoint(adapter_config config, Weights&& weights, const base_shape_fn& base_shape,
                                               const base_weight_fn& base_weight) {
  constexpr const char* where = "load_peft_checkpoint";
  basic_peft_checkpoint<Adapter> ck;
  ck.config = std::move(config);
  bool loaded = false;
  std::string supported;
  using methods = typename alternatives<Adapter>::type;
  static_assert(all_have_codecs(methods{}),
                "a method of the adapter type has no checkpoint codec: write io/peft/<method>.hpp (see "
                "docs/adding_a_method.md) and include it in io/peft/codecs.hpp");
  auto try_one = [&]<class A>(A*) {
    using codec = peft_codec<A>;
    if constexpr (codec::has_format) {
      if (!supported.empty()) supported += ", ";
      supported += A::method;
      if (loaded || !codec::handles(ck.config)) return;
      if constexpr (A::method == std::string_view("lora")) {  // its loader reads the embedding parts
        std::vector<std::string_view> fields(std::begin(codec::config_fields), std::end(codec::config_fields));
        fields.push_back("trainable_token_indices");
        check_config_fields(ck.config, fields, A::method);
      } else {
        check_config_fields(ck.config, std::span<const std::string_view>(codec::config_fields), A::method);
      }
      const auto& file = weights();
      load_modules<A>(ck, file, base_shape, base_weight);
      // A codec may rewrite the config to describe what it built (LoRA: an adapter converted
      // from PiSSA/OLoRA/KaSA has twice the rank; OSF's is a LoRA).
      if constexpr (requires(adapter_config& c) { codec::after_load(c, ck); }) codec::after_load(ck.config, ck);
      loaded = true;
    }
  };
  for_each_type(methods{}, try_one);
  if (!loaded) {
    if (const std::string why = refused_method_reason(ck.config.peft_type); !why.empty()) {
      peft::detail::raise<unsupported_error>(where, "peft_type '" + ck.config.peft_type + "' is not supported: " + why);
    }
    peft::detail::raise<unsupported_error>(where, "peft_type '" + ck.config.peft_type +
                                                      (ck.config.use_dora ? "' with use_dora" : "'") +
                                                      " is not supported (methods: " + supported + ")");
  }
  return ck;
}

}  // namespace detail

/// Loads a PEFT checkpoint directory (adapter_config.json + adapter_model.safetensors) into
/// adapters of type Adapter (default: any_adapter<T>, every method peft-cpp knows). Throws
/// io_error (missing files), format_error (keys, shapes, a config inconsistent with the tensors),
/// unsupported_error (a method or variant that no alternative of Adapter handles). `base_weight`
/// gives the base model's weights to initialisations PEFT re-runs on load: a LoRA saved with
/// init_lora_weights "pissa" or "olora" is relative to a residual base and is loaded, given the
/// base, as PEFT's conversion of it (rank 2r, relative to W0 itself, config rewritten to match);
/// without it such a checkpoint is refused.
template <class Adapter>
basic_peft_checkpoint<Adapter> load_checkpoint_as(const std::filesystem::path& dir, const base_shape_fn& base_shape = {},
                                                  const base_weight_fn& base_weight = {}) {
  constexpr const char* where = "load_peft_checkpoint";
  namespace fs = std::filesystem;
  const fs::path weights = dir / "adapter_model.safetensors";
  return detail::load_checkpoint<Adapter>(adapter_config::load(dir), [&] {
    if (!fs::exists(weights)) {
      if (fs::exists(dir / "adapter_model.bin")) {
        peft::detail::raise<unsupported_error>(where, (dir / "adapter_model.bin").string() +
                                                          " is a pickle checkpoint; save it with safe_serialization=True");
      }
      peft::detail::raise<io_error>(where, "no adapter_model.safetensors in " + dir.string());
    }
    return safetensors_file::open(weights);
  }, base_shape, base_weight);
}

/// The same from memory: a checkpoint whose adapter_config.json and adapter_model.safetensors
/// were read elsewhere (adapter_config::parse, safetensors_file::parse), e.g. from an archive or
/// a network stream. Throws as the directory overload does, io_error aside.
template <class Adapter>
basic_peft_checkpoint<Adapter> load_checkpoint_as(adapter_config config, const safetensors_file& weights,
                                                  const base_shape_fn& base_shape = {},
                                                  const base_weight_fn& base_weight = {}) {
  return detail::load_checkpoint<Adapter>(std::move(config), [&]() -> const safetensors_file& { return weights; },
                                          base_shape, base_weight);
}

/// load_checkpoint_as<any_adapter<T>>: every method peft-cpp loads.
template <compute_scalar T>
peft_checkpoint<T> load_peft_checkpoint(const std::filesystem::path& dir, const base_shape_fn& base_shape = {},
                                        const base_weight_fn& base_weight = {}) {
  return load_checkpoint_as<any_adapter<T>>(dir, base_shape, base_weight);
}
/// load_checkpoint_as<any_adapter<T>> from memory.
template <compute_scalar T>
peft_checkpoint<T> load_peft_checkpoint(adapter_config config, const safetensors_file& weights,
                                        const base_shape_fn& base_shape = {}, const base_weight_fn& base_weight = {}) {
  return load_checkpoint_as<any_adapter<T>>(std::move(config), weights, base_shape, base_weight);
}

/// Writes `dir`/adapter_model.safetensors (tensors stored as `stored_as`, by default the dtype the
/// checkpoint was read with: a BF16 adapter is re-saved as BF16) and
/// `dir`/adapter_config.json, each atomically (temporary file, then rename). The config is made
/// to describe the modules (each adapter's `describe_in`: LoRA adds exact rank_pattern /
/// alpha_pattern entries where r / lora_alpha do not give its rank and scale), and target_modules
/// is extended to every saved module; if exclude_modules or layers_to_transform would still leave
/// one out, target_modules becomes the exact list of saved modules and those fields null (PEFT
/// then loads every tensor written). Shared tensors are written once, as "base_model.<name>";
/// error when two modules hold different values under one shared name (the format has one).
template <class Adapter>
void save_peft_checkpoint(const std::filesystem::path& dir, basic_peft_checkpoint<Adapter>& ck,
                          std::optional<dtype> stored = std::nullopt) {
  constexpr const char* where = "save_peft_checkpoint";
  using T = typename Adapter::scalar;
  const dtype stored_as = stored.value_or(ck.stored_dtype);
  if (!is_floating(stored_as)) peft::detail::raise<unsupported_error>(where, "adapter tensors must be stored as a floating dtype");
  if (ck.modules.empty() && ck.embeddings.empty()) peft::detail::raise<error>(where, "the checkpoint has no module");
  adapter_config cfg = ck.config;
  for (auto& m : ck.modules) {
    if constexpr (requires { m.adapter.visit([](auto&) {}); }) {
      m.adapter.visit([&](const auto& a) { describe_in(a, cfg, m.path); });
    } else {
      describe_in(m.adapter, cfg, m.path);
    }
    if (!cfg.targets(m.path)) {
      if (cfg.targets_kind != target_kind::list) {
        cfg.targets_kind = target_kind::list;
        cfg.target_modules.clear();
        for (const auto& mm : ck.modules) cfg.target_modules.push_back(mm.path);
      } else {
        cfg.target_modules.push_back(m.path);
      }
    }
  }
  detail::describe_embeddings(ck.embeddings, cfg);
  for (const auto& e : ck.embeddings.lora) {
    if (!cfg.targets(e.path)) {
      if (cfg.targets_kind != target_kind::list) {
        cfg.targets_kind = target_kind::list;
        cfg.target_modules.clear();
        for (const auto& mm : ck.modules) cfg.target_modules.push_back(mm.path);
      }
      cfg.target_modules.push_back(e.path);
    }
  }
  // exclude_modules or layers_to_transform may still leave out a saved module (an adapter added
  // or moved after loading): then the config lists the saved modules exactly.
  if (!std::all_of(ck.modules.begin(), ck.modules.end(), [&](const auto& m) { return cfg.selects(m.path); }) ||
      !std::all_of(ck.embeddings.lora.begin(), ck.embeddings.lora.end(), [&](const auto& e) { return cfg.selects(e.path); })) {
    std::vector<std::string> paths;
    for (const auto& m : ck.modules) paths.push_back(m.path);
    for (const auto& e : ck.embeddings.lora) paths.push_back(e.path);
    cfg.select_exactly(paths);
  }
  safetensors_writer w;
  w.set_metadata({{"format", "pt"}});
  // A shared tensor is written once; every module must hold the same values under its name
  // (one object, as loading makes, or equal copies): the format has room for one.
  struct written_shared {
    std::string key, module;
    std::vector<T> values;
  };
  std::vector<written_shared> shared_written;
  for (auto& m : ck.modules) {
    for (const auto& p : m.adapter.parameters()) {
      std::vector<T> values(static_cast<std::size_t>(p.value.size()));
      for (index i = 0; i < p.value.rows(); ++i) {
        std::copy(p.value.row(i), p.value.row(i) + p.value.cols(), values.begin() + i * p.value.cols());
      }
      std::string key;
      if (p.shared) {
        key = std::string(peft_shared_prefix) + p.name;
        const auto same = std::find_if(shared_written.begin(), shared_written.end(),
                                       [&](const written_shared& s) { return s.key == key; });
        if (same != shared_written.end()) {
          if (same->values != values) {
            peft::detail::raise<error>(where, "modules '" + same->module + "' and '" + m.path + "' hold different '" +
                                                  key + "' tensors; the checkpoint has one (share one object)");
          }
          continue;
        }
        shared_written.push_back({key, m.path, values});
      } else {
        key = std::string(peft_key_prefix) + m.path + "." + p.name;
      }
      w.add(key, p.shape, std::span<const T>(values), p.integer ? dtype::i32 : stored_as);
    }
  }
  detail::write_embeddings(ck.embeddings, w, peft_key_prefix, stored_as);
  for (const auto& s : ck.saved_tensors) {
    w.add(std::string(peft_key_prefix) + s.name, s.type, s.shape, std::span<const std::byte>(s.data));
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) peft::detail::raise<io_error>(where, "cannot create " + dir.string() + ": " + ec.message());
  w.write(dir / "adapter_model.safetensors");
  detail::write_text_atomically(dir / "adapter_config.json", cfg.to_json().dump(2) + "\n");
  ck.config = cfg;
}

}  // namespace peft::io
