// peft/train/loraplus.hpp — LoRA+ (Hayou et al., ICML 2024): B's learning rate a multiple of A's,
// as parameter groups of the optimizers of train/optimizer.hpp, grouped the way PEFT 0.21's
// create_loraplus_optimizer groups them.
//
//   peft::train::adamw_options o{.lr = 2e-4, .weight_decay = 0.0};
//   peft::train::adamw<float> opt(params, o, peft::train::loraplus_groups<float>(o, {.lr_ratio = 16}));
//
// The default group (A and everything else) keeps `o`; "loraplus_B" (names containing "lora_B" and
// every 1-D tensor: DoRA's magnitude, VeRA's scales, biases) steps with lr * lr_ratio;
// "loraplus_B_no_decay" (those of them whose name contains "bias") also with weight decay 0;
// "loraplus_embedding" (LoRA on embeddings: names containing "lora_embedding_") with
// embedding_lr. PEFT passes its `loraplus_weight_decay` (default 0) as every group's weight decay
// but the last; here that is `o.weight_decay`. The schedule scales every group's lr alike.
// Details: docs/training.md.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"
#include "peft/train/optimizer.hpp"

namespace peft::train {

/// LoRA+'s two numbers (PEFT's loraplus_lr_ratio and loraplus_lr_embedding).
struct loraplus_options {
  double lr_ratio = 16.0;      // lr of B over lr of A; the paper suggests 2^4 for most tasks
  double embedding_lr = 1e-6;  // lr of LoRA-on-embedding tensors (PEFT's default)
};

/// Whether LoRA+ steps `p` with B's learning rate: its name contains "lora_B" or it is 1-D.
template <compute_scalar T>
bool loraplus_is_b(const parameter<T>& p) {
  return p.name.find("lora_B") != std::string::npos || p.shape.size() == 1;
}

/// The parameter groups of LoRA+ over defaults `o` (see the header comment). peft::error for a
/// ratio that is not finite and > 0 or an embedding lr that is not finite and >= 0.
template <compute_scalar T, class Options>
std::vector<param_group<T, Options>> loraplus_groups(const Options& o, const loraplus_options& lp = {}) {
  constexpr const char* where = "loraplus_groups";
  if (!(lp.lr_ratio > 0) || !std::isfinite(lp.lr_ratio)) {
    detail::bad_option(where, "loraplus_B", "lr_ratio", "finite and > 0", lp.lr_ratio);
  }
  if (!(lp.embedding_lr >= 0) || !std::isfinite(lp.embedding_lr)) {
    detail::bad_option(where, "loraplus_embedding", "embedding_lr", "finite and >= 0", lp.embedding_lr);
  }
  Options emb = o;
  emb.lr = lp.embedding_lr;
  Options b = o;
  b.lr = o.lr * lp.lr_ratio;
  Options b_no_decay = b;
  b_no_decay.weight_decay = 0.0;
  std::vector<param_group<T, Options>> g;
  g.push_back({"loraplus_embedding", name_contains{"lora_embedding_"}, emb});
  g.push_back({"loraplus_B_no_decay",
               [](const parameter<T>& p) { return loraplus_is_b(p) && p.name.find("bias") != std::string::npos; },
               b_no_decay});
  g.push_back({"loraplus_B", [](const parameter<T>& p) { return loraplus_is_b(p); }, b});
  return g;
}

}  // namespace peft::train
