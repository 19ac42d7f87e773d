// peft/train/detail/layer_list.hpp — the list of gated layers a rank trainer works on
// (train/sora_trainer.hpp, train/dynamic_rank_trainer.hpp): checking it, and what is done to
// every layer alike (ranks, compaction, prefixed parameter names).
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"

namespace peft::train::detail {

/// peft::error (naming `where`) for an empty list, a null or a repeated layer.
template <class Layer>
void check_layer_list(const char* where, const std::vector<Layer*>& layers) {
  if (layers.empty()) peft::detail::raise<error>(where, "no layers given");
  std::unordered_set<const Layer*> seen;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const char* problem = layers[i] == nullptr ? " is null" : !seen.insert(layers[i]).second ? " is listed twice" : nullptr;
    if (problem != nullptr) {
      std::string m = "layer ";
      m += std::to_string(i);
      m += problem;
      peft::detail::raise<error>(where, m);
    }
  }
}

/// Each layer's active_rank().
template <class Layer>
std::vector<index> active_ranks(const std::vector<Layer*>& layers) {
  std::vector<index> r;
  r.reserve(layers.size());
  for (const Layer* l : layers) r.push_back(l->active_rank());
  return r;
}

/// Each layer's compact(): the plain LoRA with identical outputs, or std::nullopt.
template <class T, class Layer>
std::vector<std::optional<lora<T>>> compact_all(const std::vector<Layer*>& layers) {
  std::vector<std::optional<lora<T>>> out;
  out.reserve(layers.size());
  for (const Layer* l : layers) out.push_back(l->compact());
  return out;
}

/// Every layer's parameters that `keep(p)` accepts, named "layers.<i>.<name>".
template <class T, class Layer, class Keep>
std::vector<parameter<T>> prefixed_parameters(const std::vector<Layer*>& layers, Keep keep) {
  std::vector<parameter<T>> all;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    for (auto& p : layers[i]->parameters()) {
      if (!keep(p)) continue;
      std::string name = "layers.";
      name += std::to_string(i);
      name += '.';
      name += p.name;
      p.name = std::move(name);
      all.push_back(std::move(p));
    }
  }
  return all;
}

}  // namespace peft::train::detail
