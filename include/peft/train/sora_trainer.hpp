// peft/train/sora_trainer.hpp — SoRA's training procedure over all the sora layers of a model
// (Ding et al., EMNLP 2023; code TsinghuaC3I/SoRA): the gate step after every optimizer step, the
// sparsifying scheduler, and compaction of every layer to a plain LoRA.
//
//   peft::train::sora_trainer<float> tr(layers, {.xi0 = 1e-4, .xi_max = 1e-3, .stages = 4});
//   peft::train::adamw<float> opt(tr.optimizer_parameters(), {.lr = 1e-3});   // A and B
//   per step:  zero_grad; forward; backward; opt.step(tr.optimizer_parameters()); tr.after_step(lr);
//   per stage: tr.next_stage();       at the end: auto loras = tr.compact();   // LoRA or nullopt
//
// The gate rule comes from the options (proximal, the paper's, by default; or official_code), not
// from the layers. Layers are not owned. Errors are peft::error "[sora_trainer::<function>] ...".
// The rules, the defaults and the official code's settings: docs/training.md.
#pragma once

#include <cmath>
#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/adapters/sora.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/core/parameter.hpp"
#include "peft/train/detail/layer_list.hpp"

namespace peft::train {

/// SoRA's schedule of thresholds and gate rule; see the header comment for the defaults.
struct sora_training_options {
  double xi0 = 1e-4;     // the first stage's xi (lambda of the L1 term for the proximal rule)
  double xi_max = 1e-3;  // the last stage's xi (unused when stages == 1)
  index stages = 1;      // number of values of the linear schedule, >= 1
  sora_gate_rule rule = sora_gate_rule::proximal;
};

template <compute_scalar T>
class sora_trainer {
 public:
  /// Trains the gates of `layers` (not owned; they must outlive the trainer). peft::error for
  /// an empty list, a null or repeated layer, or invalid options.
  sora_trainer(std::vector<sora<T>*> layers, sora_training_options opt) : layers_(std::move(layers)), opt_(opt) {
    constexpr const char* where = "sora_trainer::sora_trainer";
    detail::check_layer_list(where, layers_);
    if (!(std::isfinite(opt_.xi0) && opt_.xi0 >= 0.0 && std::isfinite(opt_.xi_max) && opt_.xi_max >= 0.0)) {
      std::string m = "xi0 and xi_max must be finite and >= 0, got xi0 ";
      m += std::to_string(opt_.xi0);
      m += ", xi_max ";
      m += std::to_string(opt_.xi_max);
      peft::detail::raise<error>(where, m);
    }
    if (opt_.stages < 1) {
      std::string m = "stages must be >= 1, got ";
      m += std::to_string(opt_.stages);
      peft::detail::raise<error>(where, m);
    }
    if (opt_.stages > 1 && opt_.xi_max < opt_.xi0) {
      std::string m = "the sparsifying schedule must not decrease: xi_max ";
      m += std::to_string(opt_.xi_max);
      m += " < xi0 ";
      m += std::to_string(opt_.xi0);
      peft::detail::raise<error>(where, m);
    }
    schedule_ = sora_threshold_schedule(opt_.xi0, opt_.xi_max, opt_.stages);
  }

  /// The gate step on every layer with the current xi (see the header comment): proximal,
  /// sora::proximal_step(lr, xi()) (uses and keeps the accumulated gate gradients; call it
  /// before zero_grad); official_code, sora::official_threshold(xi()). lr finite and >= 0.
  void after_step(double lr) {
    if (!(std::isfinite(lr) && lr >= 0.0)) {
      std::string m = "lr must be finite and >= 0, got ";
      m += std::to_string(lr);
      peft::detail::raise<error>("sora_trainer::after_step", m);
    }
    const double x = xi();
    for (sora<T>* l : layers_) {
      if (opt_.rule == sora_gate_rule::proximal) {
        l->proximal_step(lr, x);
      } else {
        l->official_threshold(x);
      }
    }
  }

  /// The sparsifying scheduler: moves to the next stage's xi; at the last stage xi stays xi_max.
  void next_stage() noexcept {
    if (stage_ + 1 < opt_.stages) ++stage_;
  }

  /// The current threshold (the schedule's value at stage()).
  double xi() const noexcept { return schedule_[static_cast<std::size_t>(stage_)]; }
  /// The current stage, 0-based (0 .. stages - 1).
  index stage() const noexcept { return stage_; }
  /// True at the last stage (next_stage() no longer changes xi).
  bool last_stage() const noexcept { return stage_ + 1 == opt_.stages; }
  /// Every stage's xi: numpy.linspace(xi0, xi_max, stages).
  const std::vector<double>& schedule() const noexcept { return schedule_; }
  const sora_training_options& options() const noexcept { return opt_; }
  /// Number of layers.
  std::size_t size() const noexcept { return layers_.size(); }

  /// Non-zero gates per layer (the rank each compacted LoRA has).
  std::vector<index> ranks() const {
    return detail::active_ranks(layers_);
  }
  /// Non-zero gates over all layers.
  index total_rank() const {
    index n = 0;
    for (const sora<T>* l : layers_) n += l->active_rank();
    return n;
  }

  /// Per layer the plain LoRA with identical outputs (sora::compact), std::nullopt when every
  /// gate of the layer is zero.
  std::vector<std::optional<lora<T>>> compact() const {
    return detail::compact_all<T>(layers_);
  }

  /// The parameters the caller's optimizer steps, named "layers.<i>.<name>": lora_A.weight and
  /// lora_B.weight of every layer, plus lora_gate with the official_code rule (give the gates a
  /// group with weight decay 0: name_contains{"lora_gate"}). Fetch anew for every step().
  std::vector<parameter<T>> optimizer_parameters() {
    const bool gates = opt_.rule != sora_gate_rule::proximal;  // proximal: stepped by the trainer
    return detail::prefixed_parameters<T>(layers_, [gates](const parameter<T>& p) { return gates || p.name != "lora_gate"; });
  }

  /// The official code's L1 term lambda_1 sum_layers sum_i |g_i| / (number of gates): adds its
  /// gradient (lambda_1 / n) sign(g) into every layer's gate gradient (after backward) and
  /// returns its value. lambda_1 finite and >= 0.
  double add_gate_l1(double lambda_1) {
    if (!(std::isfinite(lambda_1) && lambda_1 >= 0.0)) {
      std::string m = "lambda_1 must be finite and >= 0, got ";
      m += std::to_string(lambda_1);
      peft::detail::raise<error>("sora_trainer::add_gate_l1", m);
    }
    index n = 0;
    for (const sora<T>* l : layers_) n += l->rank();
    const double coef = lambda_1 / static_cast<double>(n);
    double total = 0.0;
    for (sora<T>* l : layers_) total += l->add_gate_l1(coef);
    return total;
  }

 private:
  std::vector<sora<T>*> layers_;
  sora_training_options opt_;
  std::vector<double> schedule_;
  index stage_ = 0;
};

}  // namespace peft::train
