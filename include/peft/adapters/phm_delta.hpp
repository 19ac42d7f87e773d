// peft/adapters/phm_delta.hpp — the mergeable Kronecker form of Compacter's LPHM layer
// (Mahabadi et al., NeurIPS 2021) used as a weight delta, like LoRA.
//
//   y = x (W0 + Delta W)^T + b0,   Delta W = sum_{i<n} A_i kron (u_i v_i^T)     (out, in)
//   rule A (n, n, n) shared between layers; u_i = W_left[i] (out/n), v_i = W_right[i] (in/n)
//
//   peft::phm_delta<float> a(in, out, {.n = 4});   // W_left = 0: an exact no-op
//
// The passes come from additive_adapter (the LPHM product of detail/phm.hpp; Delta W is never
// formed). The shared rule is stepped once per step (docs/methods/compacter.md). No PEFT format
// (io/peft/phm_delta.hpp): merge it, or save parameters(). Details: docs/methods/phm_delta.md.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/detail/phm.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"

namespace peft {

/// zero_left: W_left = 0 (Delta W = 0 at init); random: W_left glorot-uniform as well.
enum class phm_delta_init : std::uint8_t { zero_left, random };

template <compute_scalar T>
class phm_delta;

struct phm_delta_options {
  template <compute_scalar T>
  using adapter = phm_delta<T>;  // the adapter these options make

  index n = 4;                  // PHM order; divides in_features and out_features
  phm_delta_init init = phm_delta_init::zero_left;
  double rule_init_std = 1e-4;  // a rule the adapter creates itself ~ N(0, std^2)
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class phm_delta : public additive_adapter<phm_delta<T>, T> {
  friend class additive_adapter<phm_delta<T>, T>;

 public:
  static constexpr std::string_view method = "phm_delta";

  /// What backward needs from forward: M = X V^T and the rule contraction (batch n, n).
  struct cache_type {
    detail::phm::workspace<T> ws;
  };

  phm_delta() = default;

  /// A fresh adapter with its own rule; share it with rule().
  phm_delta(index in_features, index out_features, const phm_delta_options& opt)
      : phm_delta(in_features, out_features,
                  make_phm_rule<T>(checked_n(opt.n), opt.rule_init_std, opt.seed ^ 0x5255'4c45ull), opt) {}

  /// A fresh adapter reading the shared `rule` (opt.n must equal its order).
  phm_delta(index in_features, index out_features, std::shared_ptr<phm_rule<T>> rule, const phm_delta_options& opt)
      : rule_(std::move(rule)) {
    constexpr const char* where = "phm_delta::phm_delta";
    const index n = checked_n(opt.n);
    detail::phm::check_rule(where, rule_, n);
    check_dims(where, in_features, out_features, n);
    left_ = matrix<T>(n, out_features / n);
    right_ = matrix<T>(n, in_features / n);
    rng gen(opt.seed);
    detail::phm::glorot_uniform_rows(right_, gen);
    if (opt.init == phm_delta_init::random) detail::phm::glorot_uniform_rows(left_, gen);
    allocate_grads();
  }

  /// An adapter from existing tensors: W_left (n, out/n), W_right (n, in/n), n the rule's order.
  phm_delta(std::shared_ptr<phm_rule<T>> rule, matrix<T> w_left, matrix<T> w_right)
      : rule_(std::move(rule)), left_(std::move(w_left)), right_(std::move(w_right)) {
    constexpr const char* where = "phm_delta::phm_delta";
    if (!rule_) detail::raise<shape_error>(where, "the rule is null");
    const index n = rule_->n();
    detail::phm::check_rule(where, rule_, n);
    detail::expect_shape(where, "W_left", left_.view(), n, left_.cols());
    detail::expect_shape(where, "W_right", right_.view(), n, right_.cols());
    check_dims(where, right_.cols() * n, left_.cols() * n, n);
    allocate_grads();
  }

  index in_features() const noexcept { return right_.cols() * right_.rows(); }
  index out_features() const noexcept { return left_.cols() * left_.rows(); }
  index n() const noexcept { return rule_ ? rule_->n() : 0; }
  /// The shared rule: pass it to other layers' constructors to share it.
  const std::shared_ptr<phm_rule<T>>& rule() const noexcept { return rule_; }

  matrix_view<T> w_left() noexcept { return left_.view(); }
  matrix_view<T> w_right() noexcept { return right_.view(); }
  matrix_view<const T> w_left() const noexcept { return left_.view(); }
  matrix_view<const T> w_right() const noexcept { return right_.view(); }
  matrix_view<const T> grad_w_left() const noexcept { return gleft_.view(); }
  matrix_view<const T> grad_w_right() const noexcept { return gright_.view(); }
  /// The shared rule's gradient (n, n n): the sum over every layer sharing the rule.
  matrix_view<const T> grad_rule() const noexcept {
    return rule_ ? matrix_view<const T>(rule_->grad.view()) : matrix_view<const T>{};
  }

  // forward, add_term, backward, backward_term: core/additive_adapter.hpp over the hooks below.

  /// dW = sum_i A_i kron (W_left[i] W_right[i]^T) (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("phm_delta::delta_weight", w);
    detail::expect_shape("phm_delta::delta_weight", "dw", dw, out_features(), in_features());
    detail::phm::kron_sum<T>(rule_->value.view(), detail::phm::rule_side::as_stored, left_.view(), right_.view(), dw);
  }

  /// No bias: false, db untouched.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// phm_rule (shared, once per model in an optimizer), W_left, W_right.
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    if (!rule_) return p;  // a default-constructed adapter has no parameters
    const auto n = static_cast<std::int64_t>(this->n());
    parameter<T> r{"phm_rule", rule_->value.view(), rule_->grad.view(), {n, n, n}};
    r.shared = true;
    p.push_back(std::move(r));
    p.push_back({"W_left", left_.view(), gleft_.view(), detail::shape_of(left_.view(), false)});
    p.push_back({"W_right", right_.view(), gright_.view(), detail::shape_of(right_.view(), false)});
    return p;
  }

  /// Zeroes this layer's gradients AND the shared rule's (seen by every layer sharing it).
  void zero_grad() {
    if (rule_) rule_->zero_grad();
    gleft_.fill(T{0});
    gright_.fill(T{0});
  }

 private:
  static index checked_n(index n) {
    if (n < 1) {
      detail::raise<shape_error>("phm_delta::phm_delta", "the PHM order n must be >= 1, got " + std::to_string(n));
    }
    return n;
  }

  static void check_dims(const char* where, index in, index out, index n) {
    detail::phm::check_divisible(where, "in_features", in, n);
    detail::phm::check_divisible(where, "out_features", out, n);
  }

  void allocate_grads() {
    gleft_ = matrix<T>(left_.rows(), left_.cols());
    gright_ = matrix<T>(right_.rows(), right_.cols());
  }

  template <class Base>
  void check_base(const char* where, const Base& w) const {
    detail::phm::check_rule(where, rule_, left_.rows());
    detail::check_adapter_base(where, *this, w);
  }

  // x Delta W^T = x H with H = sum_i A_i^T kron (v_i u_i^T) (in, out): the LPHM product with the
  // rule transposed, input-side factor W_right, output-side factor W_left.
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    detail::phm::apply<T>(rule_->value.view(), detail::phm::rule_side::transposed, right_.view(), left_.view(), x, y,
                          true, cache.ws);
  }

  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    using namespace detail::phm;
    const matrix_view<const T> rule = rule_->value.view();
    if (cache.ws.m.rows() != x.rows() * n() || cache.ws.q.rows() != x.rows() * n()) {
      prepare<T>(rule, rule_side::transposed, right_.view(), x, cache.ws);  // no forward on this batch
    }
    apply_backward<T>(rule, rule_side::transposed, right_.view(), left_.view(), x, g, cache.ws, rule_->grad.view(),
                      gright_.view(), gleft_.view(), dx, true);
  }

  std::shared_ptr<phm_rule<T>> rule_;  // shared by every layer built from it
  matrix<T> left_;                     // W_left (n, out/n): u_i
  matrix<T> right_;                    // W_right (n, in/n): v_i
  matrix<T> gleft_;
  matrix<T> gright_;
};


}  // namespace peft
