// peft/models/memory.hpp — how much memory training a causal_lm will take, known from its config
// before any weight is read, and how much this machine has to give.
//
//   peft::models::training_shape s{.batch = 4, .seq_len = 128, .weight_bytes = 0.5625};  // q4_0
//   s.trainable = peft::models::lora_parameter_count(cfg, 16, {"q_proj", "v_proj"});
//   const auto need = peft::models::estimate_training_memory(cfg, s);
//   if (auto have = peft::models::available_memory(); have && need.total() > *have) ...   // refuse
//
// The model (docs/models.md, "Memory"): frozen weights at their storage size (linear weights at
// `weight_bytes` per element, embeddings and head as the compute type or, for a GGUF file, at
// their stored size); each trainable parameter four times (value, gradient, AdamW's two moments);
// what forward keeps for backward per token and layer (block input, two normalised inputs, q, k,
// v, attention output, residual, the MLP's three intermediates, each adapter's rank-wide
// intermediate), attention probabilities per sequence and head (len x len), logits and their
// gradient (tokens x vocab, twice), one layer's worth again as backward's working set, and a
// fixed allowance for the program. With activation checkpointing only each block's input is
// kept, plus one block recomputed. An estimate: it is meant to be within tens of percent of the
// peak resident size, and errs high.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/models/config.hpp"

namespace peft::models {

/// What a training run looks like, for estimate_training_memory.
struct training_shape {
  index batch = 1;               // sequences per step (the largest micro-batch: batch / grad-accum)
  index seq_len = 1;             // tokens of the longest sequence
  bool checkpointing = false;    // activation checkpointing
  bool full = false;             // full fine-tuning: every weight trains (weights at scalar_bytes)
  double weight_bytes = 4.0;     // bytes per frozen linear weight element (f32 4, q4_0 0.5625, ...)
  std::size_t scalar_bytes = 4;  // the compute type's size
  std::size_t trainable = 0;     // trainable parameters (adapters); ignored when full
  index adapter_rank = 0;        // the adapters' rank (their saved intermediates), 0 for none
  std::size_t embedding_bytes = 0;  // when nonzero: the embeddings and head as stored (GGUF file)
};

/// An estimate of a training run's peak resident memory, by part (bytes).
struct training_memory {
  std::size_t weights = 0;      // frozen (or, full fine-tuning, trained) weights
  std::size_t optimizer = 0;    // gradients and AdamW's moments (and trainable values)
  std::size_t activations = 0;  // kept for backward, plus backward's working set
  std::size_t logits = 0;       // logits and their gradient
  std::size_t overhead = std::size_t{96} << 20;  // the program, its libraries, thread stacks
  std::size_t total() const noexcept { return weights + optimizer + activations + logits + overhead; }
};

/// Elements of the model's linear weights per layer (every projection of one block).
inline std::size_t linear_elements_per_layer(const lm_config& c) {
  const auto H = static_cast<std::size_t>(c.hidden_size), I = static_cast<std::size_t>(c.intermediate_size);
  const auto q = static_cast<std::size_t>(c.heads * c.head_dim), kv = static_cast<std::size_t>(c.kv_heads * c.head_dim);
  if (c.is_gpt2()) return 3 * H * H + H * H + 2 * H * I;
  return q * H + 2 * kv * H + H * q + 3 * H * I;
}

/// (in, out) of each projection of one block, with its module name (q_proj, ..., down_proj; GPT-2:
/// c_attn, c_proj, c_fc, mlp.c_proj).
inline std::vector<std::pair<std::string, std::pair<index, index>>> block_projections(const lm_config& c) {
  const index H = c.hidden_size, I = c.intermediate_size, q = c.heads * c.head_dim, kv = c.kv_heads * c.head_dim;
  if (c.is_gpt2()) return {{"c_attn", {H, 3 * H}}, {"c_proj", {H, H}}, {"c_fc", {H, I}}, {"mlp.c_proj", {I, H}}};
  return {{"q_proj", {H, q}},    {"k_proj", {H, kv}},  {"v_proj", {H, kv}},  {"o_proj", {q, H}},
          {"gate_proj", {H, I}}, {"up_proj", {H, I}}, {"down_proj", {I, H}}};
}

/// Trainable parameters of a rank-r LoRA on the projections `targets` names (module names as
/// block_projections gives them, "all-linear" for every one): r (in + out) each, over all layers.
inline std::size_t lora_parameter_count(const lm_config& c, index rank, const std::vector<std::string>& targets) {
  std::size_t n = 0;
  const bool all = targets.size() == 1 && (targets[0] == "all-linear" || targets[0] == "ALL-LINEAR");
  for (const auto& [name, shape] : block_projections(c)) {
    const auto dot = name.rfind('.');
    const std::string last = dot == std::string::npos ? name : name.substr(dot + 1);
    bool chosen = all;
    for (const auto& t : targets) chosen = chosen || t == name || t == last;
    if (chosen) n += static_cast<std::size_t>(rank * (shape.first + shape.second));
  }
  return n * static_cast<std::size_t>(c.layers);
}

/// The peak resident memory of training `c` as `s` describes (see the file comment).
inline training_memory estimate_training_memory(const lm_config& c, const training_shape& s) {
  training_memory m;
  const auto L = static_cast<std::size_t>(c.layers), H = static_cast<std::size_t>(c.hidden_size);
  const auto I = static_cast<std::size_t>(c.intermediate_size), V = static_cast<std::size_t>(c.vocab_size);
  const auto q = static_cast<std::size_t>(c.heads * c.head_dim), kv = static_cast<std::size_t>(c.kv_heads * c.head_dim);
  const auto B = static_cast<std::size_t>(s.batch), S = static_cast<std::size_t>(s.seq_len);
  const std::size_t tokens = B * S, sz = s.scalar_bytes;
  const std::size_t linear = linear_elements_per_layer(c) * L;
  const std::size_t embed = V * H * (c.tie_word_embeddings ? 1 : 2) + (c.is_gpt2() ? static_cast<std::size_t>(c.max_positions) * H : 0);
  if (s.full) {
    const std::size_t params = linear + embed;
    m.weights = params * sz;
    m.optimizer = params * sz * 3;  // gradient + two moments
  } else {
    m.weights = static_cast<std::size_t>(static_cast<double>(linear) * s.weight_bytes) +
                (s.embedding_bytes ? s.embedding_bytes : embed * sz);
    m.optimizer = s.trainable * sz * 4;
  }
  // Per token of one block: x, n1, n2, h (4H), q and attention output (2q), k, v (2kv), the MLP's
  // three (3I; GPT-2: the fused qkv 3H and two of I), each projection's adapter intermediate.
  const std::size_t per_token = (c.is_gpt2() ? 4 * H + 2 * q + 2 * kv + 3 * H + 2 * I : 4 * H + 2 * q + 2 * kv + 3 * I) +
                                static_cast<std::size_t>(s.adapter_rank) * block_projections(c).size();
  // Attention keeps one log-sum-exp per (token, head); its scores exist a block at a time.
  const std::size_t attention = tokens * static_cast<std::size_t>(c.heads);
  const std::size_t block = (tokens * per_token + attention) * sz;
  m.activations = (s.checkpointing ? L * tokens * H * sz + block : L * block) + block;  // + backward's working set
  m.logits = 2 * tokens * V * sz;
  return m;
}

/// Bytes this process can still use: the smaller of /proc/meminfo's MemAvailable and the cgroup's
/// memory limit less its usage (cgroup v2 or v1); nullopt where neither can be read.
inline std::optional<std::size_t> available_memory() {
  std::optional<std::size_t> best;
  auto consider = [&](std::size_t v) { best = best ? std::min(*best, v) : v; };
  {
    std::ifstream in("/proc/meminfo");
    std::string key;
    std::size_t kib = 0;
    std::string unit;
    while (in >> key >> kib >> unit) {
      if (key == "MemAvailable:") {
        consider(kib * 1024);
        break;
      }
    }
  }
  auto read_number = [](const char* path) -> std::optional<std::size_t> {
    std::ifstream in(path);
    std::string text;
    if (!(in >> text) || text == "max") return std::nullopt;
    try {
      return static_cast<std::size_t>(std::stoull(text));
    } catch (const std::exception&) {
      return std::nullopt;
    }
  };
  for (const auto& [limit, usage] : {std::pair{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"},
                                     std::pair{"/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                               "/sys/fs/cgroup/memory/memory.usage_in_bytes"}}) {
    const auto l = read_number(limit), u = read_number(usage);
    if (l && u && *l < (std::size_t{1} << 60)) consider(*l > *u ? *l - *u : 0);
  }
  return best;
}

/// "1.25 GiB", "340 MiB", "12 KiB", "100 B".
inline std::string memory_text(std::size_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u >= 3 ? "%.2f %s" : "%.0f %s", v, units[u]);
  return buf;
}

}  // namespace peft::models
