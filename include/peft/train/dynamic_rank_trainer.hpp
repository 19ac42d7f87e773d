// peft/train/dynamic_rank_trainer.hpp — the training procedure of dynamic-rank LoRA (Mao et al.,
// ACL 2024, "DoRA: dynamic rank distribution") over ALL the dynamic_rank layers of a model:
// importance EMA, the global cubic pruning schedule, the regulariser until pruning ends, the
// frozen final mask, and compaction to plain LoRAs.
//
//   peft::train::dynamic_rank_trainer<float> tr(layers, {.total_steps = T, .target_rank = 8});
//   for (index step = 1; step <= T; ++step) {          // 1-based: the optimizer step's number
//     zero_grad; forward; backward; tr.add_regularizer(step);
//     opt.step(tr.parameters()); tr.after_step(step);  // importance; pruning events; the mask
//   }
//   auto loras = tr.compact();                         // per layer a LoRA, or nullopt
//
// Layers are not owned. Errors are peft::error "[dynamic_rank_trainer::<function>] ..." (invalid
// options, a step not after the previous one). The schedule, the budget and the differences from
// the official code: docs/training.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/dynamic_rank.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"
#include "peft/train/detail/layer_list.hpp"

namespace peft::train {

/// The schedule of the global pruning; see the header comment. total_steps must be set.
struct dynamic_rank_schedule_options {
  index total_steps = 0;        // T, optimizer steps of the whole training
  double start_fraction = 0.15;  // pruning starts at floor(0.15 T)
  double end_fraction = 0.5;     // and ends (mask frozen, regulariser off after) at floor(0.5 T)
  index interval = 10;           // steps between pruning events (the paper's scripts: 100)
  double target_rank = 8;        // r: the final budget is ceil(r L) components over L layers
  double regularizer = 0.1;      // lambda_R
};

template <compute_scalar T>
class dynamic_rank_trainer {
 public:
  /// Schedules the pruning of `layers` (not owned; they must outlive the trainer). peft::error
  /// for an empty list, a null or repeated layer, or invalid options.
  dynamic_rank_trainer(std::vector<dynamic_rank<T>*> layers, dynamic_rank_schedule_options opt)
      : layers_(std::move(layers)), opt_(opt) {
    constexpr const char* where = "dynamic_rank_trainer::dynamic_rank_trainer";
    detail::check_layer_list(where, layers_);
    for (const dynamic_rank<T>* l : layers_) n_ += l->rank();
    if (opt_.total_steps < 1) {
      std::string m = "total_steps must be >= 1, got ";
      m += std::to_string(opt_.total_steps);
      peft::detail::raise<error>(where, m);
    }
    const auto in_unit = [](double f) { return std::isfinite(f) && f >= 0.0 && f <= 1.0; };
    if (!in_unit(opt_.start_fraction) || !in_unit(opt_.end_fraction) || !(opt_.start_fraction < opt_.end_fraction)) {
      std::string m = "need 0 <= start_fraction < end_fraction <= 1, got ";
      m += std::to_string(opt_.start_fraction);
      m += " and ";
      m += std::to_string(opt_.end_fraction);
      peft::detail::raise<error>(where, m);
    }
    if (opt_.interval < 1) {
      std::string m = "interval must be >= 1, got ";
      m += std::to_string(opt_.interval);
      peft::detail::raise<error>(where, m);
    }
    const double layers_d = static_cast<double>(layers_.size());
    if (!(std::isfinite(opt_.target_rank) && opt_.target_rank > 0.0 &&
          opt_.target_rank * layers_d <= static_cast<double>(n_))) {
      std::string m = "target_rank must be in (0, ";
      m += std::to_string(static_cast<double>(n_) / layers_d);
      m += "] (the layers' average initial rank), got ";
      m += std::to_string(opt_.target_rank);
      peft::detail::raise<error>(where, m);
    }
    if (!(std::isfinite(opt_.regularizer) && opt_.regularizer >= 0.0)) {
      std::string m = "regularizer must be finite and >= 0, got ";
      m += std::to_string(opt_.regularizer);
      peft::detail::raise<error>(where, m);
    }
    start_ = fraction_step(opt_.start_fraction, opt_.total_steps);
    end_ = fraction_step(opt_.end_fraction, opt_.total_steps);
    if (end_ <= start_) {
      std::string m = "the pruning phase is empty: floor(start_fraction T) = floor(end_fraction T) = ";
      m += std::to_string(start_);
      m += " for total_steps T = ";
      m += std::to_string(opt_.total_steps);
      peft::detail::raise<error>(where, m);
    }
    excess_ = static_cast<double>(n_) - opt_.target_rank * layers_d;
  }

  /// Call after backward, before the optimizer step `step` (1-based): while step <= s1 adds the
  /// gradients of lambda_R R into every layer's grad_A, grad_B and returns lambda_R R; after
  /// s1 returns 0 and changes nothing.
  double add_regularizer(index step) {
    check_step("dynamic_rank_trainer::add_regularizer", step, 1);
    if (!regularizer_active(step) || opt_.regularizer == 0.0) return 0.0;
    const double coef = opt_.regularizer / (2.0 * static_cast<double>(n_));
    double total = 0.0;
    for (dynamic_rank<T>* l : layers_) total += l->add_regularizer(coef);
    return total;
  }

  /// Call after the optimizer step `step` (1-based, increasing from call to call): updates
  /// every layer's importance; at a pruning event keeps the budget(step) most important
  /// components over all layers and prunes the rest; at the end of the phase freezes that mask;
  /// once frozen re-applies it.
  void after_step(index step) {
    constexpr const char* where = "dynamic_rank_trainer::after_step";
    check_step(where, step, 1);
    if (step <= last_step_) {
      std::string m = "steps must increase: got ";
      m += std::to_string(step);
      m += " after ";
      m += std::to_string(last_step_);
      peft::detail::raise<error>(where, m);
    }
    last_step_ = step;
    for (dynamic_rank<T>* l : layers_) l->update_importance();
    const index t = step - start_;
    const index tp = end_ - start_;
    if (!finished_ && t >= tp) {
      select(where, budget_at(tp), true);  // the final event (at s1, or late if s1 was skipped)
      finished_ = true;
    } else if (!finished_ && t >= 0 && t % opt_.interval == 0) {
      select(where, budget_at(t), false);
    }
    if (finished_) {
      for (dynamic_rank<T>* l : layers_) l->apply_mask();
    }
  }

  /// Components kept over all layers after `step` (>= 0; 0 = before training): N before the
  /// first event, then B(t_e) of the last event step t_e <= step (see the header comment).
  index budget(index step) const {
    check_step("dynamic_rank_trainer::budget", step, 0);
    const index t = step - start_;
    const index tp = end_ - start_;
    if (t < 0) return n_;
    if (t >= tp) return budget_at(tp);
    return budget_at(t - t % opt_.interval);
  }

  /// True when after_step(step) makes a pruning event (s0 <= step <= s1, (step - s0) % interval
  /// == 0 or step == s1).
  bool is_pruning_step(index step) const noexcept {
    const index t = step - start_;
    return step >= 1 && t >= 0 && t <= end_ - start_ && (t % opt_.interval == 0 || t == end_ - start_);
  }
  /// True while the regulariser is on (step <= s1).
  bool regularizer_active(index step) const noexcept { return step <= end_; }
  /// s0 = floor(start_fraction T) and s1 = floor(end_fraction T).
  index pruning_start() const noexcept { return start_; }
  index pruning_end() const noexcept { return end_; }
  /// N, every layer's r0 summed; and the final budget ceil(target_rank L).
  index initial_budget() const noexcept { return n_; }
  index final_budget() const { return budget_at(end_ - start_); }
  /// True once the final mask is frozen.
  bool finished() const noexcept { return finished_; }
  /// The last step given to after_step (0 before the first).
  index last_step() const noexcept { return last_step_; }
  const dynamic_rank_schedule_options& options() const noexcept { return opt_; }
  std::size_t size() const noexcept { return layers_.size(); }

  /// Components not pruned by the current mask, per layer (sum == budget(last_step())).
  std::vector<index> ranks() const {
    std::vector<index> r;
    r.reserve(layers_.size());
    for (const dynamic_rank<T>* l : layers_) {
      const auto& m = l->mask();
      r.push_back(l->rank() - static_cast<index>(std::count(m.begin(), m.end(), true)));
    }
    return r;
  }
  /// Components with c_i != 0 per layer (the rank compact() gives each layer).
  std::vector<index> active_ranks() const {
    return detail::active_ranks(layers_);
  }

  /// Per layer the plain LoRA with identical outputs (dynamic_rank::compact), std::nullopt when
  /// every c_i of the layer is zero.
  std::vector<std::optional<lora<T>>> compact() const {
    return detail::compact_all<T>(layers_);
  }

  /// Every layer's parameters, named "layers.<i>.<name>" (lora_A.weight, lora_B.weight,
  /// lora_scaler): what the optimizer steps. Fetch anew for every step().
  std::vector<parameter<T>> parameters() {
    return detail::prefixed_parameters<T>(layers_, [](const parameter<T>&) { return true; });
  }

 private:
  /// floor(f total), a product within 1e-9 below an integer counted as that integer.
  static index fraction_step(double f, index total) {
    const double x = f * static_cast<double>(total);
    auto k = static_cast<index>(std::floor(x));
    if (x - static_cast<double>(k) > 1.0 - 1e-9) ++k;
    return k;
  }

  static void check_step(const char* where, index step, index lowest) {
    if (step < lowest) {
      std::string m = "step must be >= ";
      m += std::to_string(lowest);
      m += ", got ";
      m += std::to_string(step);
      peft::detail::raise<error>(where, m);
    }
  }

  /// B(t) = N - floor(D (t / Tp)^3), 0 <= t <= Tp.
  index budget_at(index t) const {
    const double q = static_cast<double>(t) / static_cast<double>(end_ - start_);
    const auto pruned = static_cast<index>(std::floor(excess_ * q * q * q));
    return n_ - std::clamp<index>(pruned, 0, n_);
  }

  /// Keeps the `keep` components of largest S over all layers (ties: earlier layer, then earlier
  /// component), prunes the others; `freeze` makes the masks final.
  void select(const char* where, index keep, bool freeze) {
    struct entry {
      double s;
      std::size_t layer;
      index component;
    };
    std::vector<entry> all;
    all.reserve(static_cast<std::size_t>(n_));
    for (std::size_t li = 0; li < layers_.size(); ++li) {
      const auto s = layers_[li]->importance();
      for (index i = 0; i < layers_[li]->rank(); ++i) {
        const double v = static_cast<double>(s[static_cast<std::size_t>(i)]);
        if (std::isnan(v)) {
          std::string m = "layer ";
          m += std::to_string(li);
          m += " component ";
          m += std::to_string(i);
          m += " has a NaN importance";
          peft::detail::raise<error>(where, m);
        }
        all.push_back({v, li, i});
      }
    }
    std::sort(all.begin(), all.end(), [](const entry& a, const entry& b) {
      if (a.s != b.s) return a.s > b.s;
      if (a.layer != b.layer) return a.layer < b.layer;
      return a.component < b.component;
    });
    std::vector<std::vector<bool>> masks(layers_.size());
    for (std::size_t li = 0; li < layers_.size(); ++li) {
      masks[li].assign(static_cast<std::size_t>(layers_[li]->rank()), true);
    }
    for (index k = 0; k < keep && k < static_cast<index>(all.size()); ++k) {
      const entry& e = all[static_cast<std::size_t>(k)];
      masks[e.layer][static_cast<std::size_t>(e.component)] = false;
    }
    for (std::size_t li = 0; li < layers_.size(); ++li) layers_[li]->prune(masks[li], freeze);
  }

  std::vector<dynamic_rank<T>*> layers_;
  dynamic_rank_schedule_options opt_;
  index n_ = 0;          // N: components over all layers
  index start_ = 0;      // s0
  index end_ = 0;        // s1
  double excess_ = 0.0;  // D = N - r L
  index last_step_ = 0;
  bool finished_ = false;
};

}  // namespace peft::train
