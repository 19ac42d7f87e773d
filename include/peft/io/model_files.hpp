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
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
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
};

}  // namespace peft::io
