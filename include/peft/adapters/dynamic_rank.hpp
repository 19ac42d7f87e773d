// peft/adapters/dynamic_rank.hpp — DoRA, dynamic rank distribution (Mao et al., ACL 2024; code
// MIkumikumi0116/DoRA). Not the weight-decomposed DoRA of PEFT (that one is `dora`).
//
//   y = x W0^T + b0 + s ((x A^T) * c) B^T      A (r0, in), B (out, r0), c (r0), s = alpha / r0
//
//   peft::dynamic_rank<float> a(in, out, {.rank = 8, .alpha = 16});  // r0 = ceil(1.5 * 8) = 12
//   a.update_importance(); a.prune(mask); auto l = a.compact();      // l: optional<lora<float>>
//
// The passes come from the low-rank core (c is its gate). Importance, masks and the regulariser
// are here; the global pruning schedule is train/dynamic_rank_trainer.hpp. No PEFT checkpoint
// format (io/peft/dynamic_rank.hpp): compact() and save the LoRA.
// Details: docs/methods/dynamic_rank.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/detail/gated_low_rank.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"

namespace peft {

template <compute_scalar T>
class dynamic_rank;

struct dynamic_rank_options {
  template <compute_scalar T>
  using adapter = dynamic_rank<T>;  // the adapter these options make

  index rank = 8;                   // target average rank r; a layer starts at r0 = ceil(1.5 r)
  index initial_rank = 0;           // r0 when > 0 (overrides ceil(1.5 r))
  double alpha = 8.0;               // s = alpha / r0
  double importance_decay = 0.9;    // S <- decay S + weight s
  double importance_weight = 0.1;
  double importance_eps = 1e-8;     // s_i = ... / (||B diag(c) A||_F + eps)
  std::uint64_t seed = 0;
};

/// r0 = ceil(1.5 r), the number of components a layer starts with for a target average rank r.
inline index dynamic_rank_initial_rank(index target_rank) { return (3 * target_rank + 1) / 2; }

template <compute_scalar T>
class dynamic_rank : public detail::gated_low_rank<dynamic_rank<T>, T> {
  using core = detail::gated_low_rank<dynamic_rank<T>, T>;
  friend class low_rank_adapter<dynamic_rank<T>, T>;

 public:
  using core::in_features;
  using core::out_features;
  using core::rank;
  static constexpr std::string_view method = "dynamic_rank";
  static constexpr std::string_view gate_name = "lora_scaler";  // the component vector in parameters()

  dynamic_rank() = default;

  /// A fresh layer: r0 components (options), A and B kaiming-uniform (a = 0), c = 0.
  dynamic_rank(index in_features, index out_features, const dynamic_rank_options& opt)
      : dynamic_rank(fresh(in_features, out_features, opt), opt) {}

  /// From existing factors: A (r0, in), B (out, r0), c (r0 values), scale s (alpha / r0).
  dynamic_rank(matrix<T> a, matrix<T> b, std::vector<T> c, T scale, const dynamic_rank_options& opt = {})
      : core("dynamic_rank::dynamic_rank", std::move(a), std::move(b), std::move(c), scale) {
    init_state(opt);
  }

  /// The component scalars c as a (1, r0) view.
  matrix_view<T> c() noexcept { return this->gates().view(); }
  matrix_view<const T> c() const noexcept { return this->gates().view(); }
  matrix_view<const T> grad_c() const noexcept { return this->gate_grads().view(); }

  // ---- importance ---------------------------------------------------------------------------

  /// ||B diag(c) A||_F (without s), from (r0, r0) Gram matrices (never the (out, in) product
  /// unless that is the cheaper one).
  double delta_norm() const { return low_rank::frobenius_norm(this->low_rank()); }

  /// This step's s_i = |c_i| ||b_i|| ||a_i|| / (||B diag(c) A||_F + eps), r0 values (all 0
  /// when the product is exactly zero and eps is 0).
  std::vector<T> component_importance() const {
    const std::vector<double> n = low_rank::component_norms(this->low_rank());
    const double denom = low_rank::frobenius_norm(this->low_rank()) + eps_;
    std::vector<T> s(n.size(), T{0});
    if (!(denom > 0.0)) return s;
    for (index i = 0; i < rank(); ++i) {
      const auto k = static_cast<std::size_t>(i);
      s[k] = static_cast<T>(std::abs(static_cast<double>(this->gates()(0, i))) * n[k] / denom);
    }
    return s;
  }

  /// S <- decay S + weight s (call after every optimizer step; S starts at 0).
  void update_importance() {
    const std::vector<T> s = component_importance();
    for (std::size_t i = 0; i < s.size(); ++i) {
      importance_[i] = static_cast<T>(decay_ * static_cast<double>(importance_[i]) +
                                      weight_ * static_cast<double>(s[i]));
    }
  }

  /// The running importance S (r0 values): what the global pruning schedule ranks.
  std::span<const T> importance() const noexcept { return importance_; }
  /// Restores S (e.g. from a trainer's saved state); r0 values.
  void set_importance(std::span<const T> s) {
    if (static_cast<index>(s.size()) != rank()) {
      detail::raise<shape_error>("dynamic_rank::set_importance", size_message(s.size()));
    }
    importance_.assign(s.begin(), s.end());
  }

  // ---- masks --------------------------------------------------------------------------------

  /// A pruning event: remembers `pruned` (r0 flags, true = pruned) as the mask and sets c_i = 0
  /// where it is set. Unfrozen, pruned components may regrow (their c_i still has a gradient:
  /// the paper lets them until the pruning phase ends); `freeze` makes this mask final.
  /// peft::error when the mask is already frozen.
  void prune(const std::vector<bool>& pruned, bool freeze = false) {
    if (static_cast<index>(pruned.size()) != rank()) {
      detail::raise<shape_error>("dynamic_rank::prune", size_message(pruned.size()));
    }
    if (frozen_) {
      detail::raise<error>("dynamic_rank::prune", "the mask is frozen (the pruning phase has ended)");
    }
    mask_ = pruned;
    frozen_ = freeze;
    apply_mask();
  }
  /// Sets c_i = 0 for every masked component; call after each optimizer step once the mask is
  /// frozen (an optimizer with momentum would otherwise move a masked c_i off zero).
  void apply_mask() {
    for (index i = 0; i < rank(); ++i) {
      if (mask_[static_cast<std::size_t>(i)]) this->gates()(0, i) = T{0};
    }
  }
  /// The current mask (r0 flags, true = pruned).
  const std::vector<bool>& mask() const noexcept { return mask_; }
  bool mask_frozen() const noexcept { return frozen_; }
  /// Freezes (the pruning phase has ended) or unfreezes the current mask.
  void set_mask_frozen(bool frozen) noexcept { frozen_ = frozen; }

  // ---- regulariser --------------------------------------------------------------------------

  /// R_layer = sum_i (var(A_i,:) + var(B_:,i)), unbiased variances.
  double regularizer() const { return regularize(0.0, nullptr, nullptr); }

  /// Adds coef * dR_layer/dA and dR_layer/dB into grad_A, grad_B; returns coef * R_layer.
  /// d var(v) / d v_k = 2 (v_k - mean(v)) / (n - 1).
  double add_regularizer(double coef) {
    return coef * regularize(coef, &this->grad_a_matrix(), &this->grad_b_matrix());
  }

 private:
  // ---- low_rank_adapter hook ----------------------------------------------------------------
  void after_backward() { mask_gradient(); }  // a frozen mask keeps masked c_i gradients at zero

  struct factors {
    matrix<T> a, b;
    std::vector<T> c;
    T scale;
  };
  dynamic_rank(factors f, const dynamic_rank_options& opt)
      : core("dynamic_rank::dynamic_rank", std::move(f.a), std::move(f.b), std::move(f.c), f.scale) {
    init_state(opt);
  }

  static factors fresh(index in, index out, const dynamic_rank_options& opt) {
    constexpr const char* where = "dynamic_rank::dynamic_rank";
    if (opt.initial_rank < 0 || (opt.initial_rank == 0 && opt.rank < 1)) {
      std::string m = "rank must be >= 1 (or initial_rank > 0), got rank ";
      m += std::to_string(opt.rank);
      m += ", initial_rank ";
      m += std::to_string(opt.initial_rank);
      detail::raise<shape_error>(where, m);
    }
    if (in < 1 || out < 1) {
      detail::raise<shape_error>(where, "in_features and out_features must be >= 1, got " +
                                            detail::shape_string(in, out));
    }
    const index r0 = opt.initial_rank > 0 ? opt.initial_rank : dynamic_rank_initial_rank(opt.rank);
    rng gen(opt.seed);
    factors f{matrix<T>(r0, in), matrix<T>(out, r0), std::vector<T>(static_cast<std::size_t>(r0), T{0}),
              static_cast<T>(opt.alpha / static_cast<double>(r0))};
    const double bound_a = std::sqrt(6.0 / static_cast<double>(in));  // kaiming-uniform, a = 0
    const double bound_b = std::sqrt(6.0 / static_cast<double>(r0));
    for (auto& v : f.a.storage()) v = static_cast<T>(gen.uniform(-bound_a, bound_a));
    for (auto& v : f.b.storage()) v = static_cast<T>(gen.uniform(-bound_b, bound_b));
    return f;
  }

  void init_state(const dynamic_rank_options& opt) {
    if (!(std::isfinite(opt.importance_decay) && std::isfinite(opt.importance_weight) &&
          std::isfinite(opt.importance_eps) && opt.importance_eps >= 0.0)) {
      detail::raise<error>("dynamic_rank::dynamic_rank",
                           "importance_decay, importance_weight must be finite and importance_eps finite, >= 0");
    }
    decay_ = opt.importance_decay;
    weight_ = opt.importance_weight;
    eps_ = opt.importance_eps;
    importance_.assign(static_cast<std::size_t>(rank()), T{0});
    mask_.assign(static_cast<std::size_t>(rank()), false);
  }

  std::string size_message(std::size_t n) const {
    std::string m = "got ";
    m += std::to_string(n);
    m += " values, expected r0 = ";
    m += std::to_string(rank());
    return m;
  }

  void mask_gradient() {
    if (!frozen_) return;
    for (index i = 0; i < rank(); ++i) {
      if (mask_[static_cast<std::size_t>(i)]) this->gate_grads()(0, i) = T{0};
    }
  }

  /// R_layer; with gradients given (and coef != 0) also adds coef * dR_layer into them.
  double regularize(double coef, matrix<T>* ga, matrix<T>* gb) const {
    const auto& a = this->a_matrix();
    const auto& b = this->b_matrix();
    const bool grads = ga != nullptr && gb != nullptr && coef != 0.0;
    double total = 0.0;
    const index in = in_features(), out = out_features();
    for (index i = 0; i < rank(); ++i) {
      if (in > 1) {  // var(A_i,:) over in values
        double mean = 0.0, ss = 0.0;
        for (index j = 0; j < in; ++j) mean += static_cast<double>(a(i, j));
        mean /= static_cast<double>(in);
        for (index j = 0; j < in; ++j) ss += (static_cast<double>(a(i, j)) - mean) * (static_cast<double>(a(i, j)) - mean);
        total += ss / static_cast<double>(in - 1);
        if (grads) {
          const double f = 2.0 * coef / static_cast<double>(in - 1);
          for (index j = 0; j < in; ++j) (*ga)(i, j) += static_cast<T>(f * (static_cast<double>(a(i, j)) - mean));
        }
      }
      if (out > 1) {  // var(B_:,i) over out values
        double mean = 0.0, ss = 0.0;
        for (index j = 0; j < out; ++j) mean += static_cast<double>(b(j, i));
        mean /= static_cast<double>(out);
        for (index j = 0; j < out; ++j) ss += (static_cast<double>(b(j, i)) - mean) * (static_cast<double>(b(j, i)) - mean);
        total += ss / static_cast<double>(out - 1);
        if (grads) {
          const double f = 2.0 * coef / static_cast<double>(out - 1);
          for (index j = 0; j < out; ++j) (*gb)(j, i) += static_cast<T>(f * (static_cast<double>(b(j, i)) - mean));
        }
      }
    }
    return total;
  }

  std::vector<T> importance_;  // S, r0 values
  std::vector<bool> mask_;     // true = pruned
  bool frozen_ = false;
  double decay_ = 0.9;
  double weight_ = 0.1;
  double eps_ = 1e-8;
};

}  // namespace peft
