// peft/io/model_files.hpp — a model's weights as one set of named tensors.
//
//   auto m = peft::io::model_files::open(path);  // model.safetensors, a sharded
//                                                // model.safetensors.index.json, or a directory
//                                                // holding either
//   for (const auto& name : m.names()) { const auto& info = m.info(name); auto b = m.bytes(name); }
//
// Shards are memory-mapped, never read whole. `resolve` maps a module path to the tensor name
// the base uses: "<path>.<suffix>" exactly, else the one tensor whose name ends with it or that
// it ends with (checkpoints saved from a wrapper model add or drop a leading "model.").
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/safetensors.hpp"

namespace peft::io {

class model_files {
 public:
  static model_files open(const std::filesystem::path& path) {
    constexpr const char* where = "model_files::open";
    namespace fs = std::filesystem;
    fs::path p = path;
    if (fs::is_directory(p)) {
      if (fs::exists(p / "model.safetensors")) {
        p = p / "model.safetensors";
      } else if (fs::exists(p / "model.safetensors.index.json")) {
        p = p / "model.safetensors.index.json";
      } else {
        peft::detail::raise<io_error>(where, "no model.safetensors or model.safetensors.index.json in " + path.string());
      }
    }
    model_files m;
    m.read_model_type(p.parent_path() / "config.json");
    if (p.filename().string().ends_with(".index.json")) {
      m.open_index(p);
    } else {
      m.add_file(p, std::nullopt);
    }
    return m;
  }

  /// Tensor names: file by file (shard order), within a file by data offset.
  const std::vector<std::string>& names() const noexcept { return names_; }
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const tensor_info& info(const std::string& name) const { return file_of(name).info(name); }
  std::span<const std::byte> bytes(const std::string& name) const { return file_of(name).bytes(name); }
  const safetensors_file& file_of(const std::string& name) const {
    auto it = where_.find(name);
    if (it == where_.end()) peft::detail::raise<format_error>("model_files::file_of", "no tensor named '" + name + "' in the base model");
    return *files_[it->second];
  }
  /// The first file's __metadata__ (for copying into a merged file).
  const std::map<std::string, std::string>& metadata() const { return files_.front()->metadata(); }
  std::size_t file_count() const noexcept { return files_.size(); }

  /// transformers' model_type from the config.json beside the weights ("gpt2", "llama", ...), or
  /// "" when there is none (or it is unreadable: the weights alone are a valid base).
  const std::string& model_type() const noexcept { return model_type_; }

  /// The base tensor for `module` + "." + `suffix` (see the header comment); nullopt if none,
  /// format_error if several candidates match.
  std::optional<std::string> resolve(const std::string& module, const std::string& suffix) const {
    const std::string want = module + "." + suffix;
    if (contains(want)) return want;
    std::optional<std::string> found;
    for (const auto& n : names_) {
      const bool match = (n.size() > want.size() && n.ends_with("." + want)) ||
                         (want.size() > n.size() && want.ends_with("." + n));
      if (!match) continue;
      if (found) {
        peft::detail::raise<format_error>("model_files::resolve", "module '" + module + "' matches both '" +
                                                                *found + "' and '" + n + "' in the base model");
      }
      found = n;
    }
    return found;
  }

 private:
  void read_model_type(const std::filesystem::path& config) {
    std::ifstream in(config, std::ios::binary);
    if (!in) return;
    try {
      const auto j = nlohmann::json::parse(in);
      if (j.is_object() && j.contains("model_type") && j["model_type"].is_string()) model_type_ = j["model_type"].get<std::string>();
    } catch (const nlohmann::json::exception&) {
      model_type_.clear();
    }
  }

  void add_file(const std::filesystem::path& p, const std::optional<std::vector<std::string>>& expected) {
    auto file = std::make_unique<safetensors_file>(safetensors_file::open(p));
    const std::size_t idx = files_.size();
    for (const auto& t : file->tensors()) {
      if (!where_.emplace(t.name, idx).second) {
        peft::detail::raise<format_error>("model_files::open", "tensor '" + t.name + "' appears in two shards (" + p.string() + ")");
      }
      names_.push_back(t.name);
    }
    if (expected) {
      for (const auto& n : *expected) {
        if (!file->contains(n)) {
          peft::detail::raise<format_error>("model_files::open", "the index places '" + n + "' in " + p.string() + ", which does not hold it");
        }
      }
    }
    files_.push_back(std::move(file));
  }

  void open_index(const std::filesystem::path& index_path) {
    constexpr const char* where = "model_files::open";
    std::ifstream in(index_path, std::ios::binary);
    if (!in) peft::detail::raise<io_error>(where, "cannot open " + index_path.string());
    std::ostringstream ss;
    ss << in.rdbuf();
    nlohmann::ordered_json j;
    try {
      j = nlohmann::ordered_json::parse(ss.str());
    } catch (const nlohmann::json::exception& e) {
      peft::detail::raise<format_error>(where, index_path.string() + " is not valid JSON: " + e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
      peft::detail::raise<format_error>(where, index_path.string() + " has no 'weight_map' object");
    }
    std::vector<std::string> shard_order;
    std::map<std::string, std::vector<std::string>> by_shard;
    for (const auto& [tensor, shard] : j["weight_map"].items()) {
      if (!shard.is_string()) peft::detail::raise<format_error>(where, index_path.string() + ": weight_map values must be file names");
      const auto s = shard.get<std::string>();
      if (s.find('/') != std::string::npos || s.find("..") != std::string::npos) {
        peft::detail::raise<format_error>(where, index_path.string() + ": shard name '" + s + "' is not a plain file name");
      }
      if (!by_shard.count(s)) shard_order.push_back(s);
      by_shard[s].push_back(tensor);
    }
    if (shard_order.empty()) peft::detail::raise<format_error>(where, index_path.string() + " lists no tensors");
    std::sort(shard_order.begin(), shard_order.end());
    for (const auto& s : shard_order) add_file(index_path.parent_path() / s, by_shard[s]);
  }

  std::vector<std::unique_ptr<safetensors_file>> files_;
  std::vector<std::string> names_;
  std::map<std::string, std::size_t> where_;
  std::string model_type_;
};

/// Whether `module`'s weight is stored (in, out), as transformers' Conv1D stores it, rather than
/// (out, in) as nn.Linear. PEFT decides fan_in_fan_out per module type, whatever the config says
/// (true for Conv1D, false for nn.Linear, with a warning), so the config's flag is the last
/// resort: (1) a model whose config.json names an architecture built on Conv1D (gpt2, openai-gpt,
/// imagegpt, decision_transformer): the modules named c_attn, q_attn, c_proj, c_fc are Conv1D,
/// every other one nn.Linear; (2) given the layer's (in, out), a stored shape that fits one layout
/// only; (3) `config_flag`.
inline bool stored_in_out(const model_files& model, const std::string& module,
                          std::optional<std::pair<std::int64_t, std::int64_t>> in_out, bool config_flag) {
  const std::string& t = model.model_type();
  if (t == "gpt2" || t == "openai-gpt" || t == "imagegpt" || t == "decision_transformer") {
    const auto dot = module.rfind('.');
    const std::string last = dot == std::string::npos ? module : module.substr(dot + 1);
    return last == "c_attn" || last == "q_attn" || last == "c_proj" || last == "c_fc";
  }
  if (in_out && in_out->first != in_out->second) {
    if (const auto name = model.resolve(module, "weight")) {
      const auto& s = model.info(*name).shape;
      if (s == std::vector<std::int64_t>{in_out->second, in_out->first}) return false;
      if (s == std::vector<std::int64_t>{in_out->first, in_out->second}) return true;
    }
  }
  return config_flag;
}

}  // namespace peft::io
