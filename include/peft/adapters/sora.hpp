// peft/adapters/sora.hpp — SoRA, sparse low-rank adaptation (Ding et al., EMNLP 2023; code
// TsinghuaC3I/SoRA).
//
//   y = x W0^T + b0 + s ((x A^T) * g) B^T      A (r_max, in), B (out, r_max), gate g (r_max),
//                                               s = alpha / r_max
//
//   peft::sora<float> a(in, out, {.rank = 8, .alpha = 16});  ...  a.gate_step(lr, xi);
//   std::optional<peft::lora<float>> l = a.compact();   // a plain LoRA of rank |{g_i != 0}|
//
// The passes come from the low-rank core (g is its gate). The gate rules (the paper's proximal
// step, the official code's threshold) and the schedule: docs/methods/sora.md, docs/training.md.
// No PEFT checkpoint format (io/peft/sora.hpp): compact() and save the LoRA.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <optional>
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

/// T_xi(z) = sign(z) max(|z| - xi, 0): the proximal operator of xi |z| (xi >= 0). NaN stays NaN.
template <std::floating_point F>
constexpr F soft_threshold(F z, F xi) noexcept {
  if (z != z) return z;
  if (z > xi) return z - xi;
  if (z < -xi) return z + xi;
  return F{0};
}

/// The threshold of TsinghuaC3I/SoRA's SparseAdamW, in its order: z > xi: z -= xi; then
/// z < -xi: z += xi; then |z| < xi: z = 0. Net effect: 0 when |z| < 2 xi (except |z| == xi,
/// which the strict comparisons leave as is), else sign(z) (|z| - xi).
template <std::floating_point F>
constexpr F sora_official_threshold(F z, F xi) noexcept {
  if (z > xi) z -= xi;
  if (z < -xi) z += xi;
  if ((z < F{0} ? -z : z) < xi) z = F{0};
  return z;
}

/// The sparsifying schedule: `stages` thresholds from xi_0 to xi_max, evenly spaced
/// (numpy.linspace: the last is exactly xi_max; one stage gives {xi_0}). stages >= 1.
inline std::vector<double> sora_threshold_schedule(double xi_0, double xi_max, index stages) {
  if (stages < 1) {
    detail::raise<error>("sora_threshold_schedule", "stages must be >= 1, got " + std::to_string(stages));
  }
  std::vector<double> xi(static_cast<std::size_t>(stages));
  for (index k = 0; k < stages; ++k) {
    xi[static_cast<std::size_t>(k)] =
        stages == 1 ? xi_0 : xi_0 + (xi_max - xi_0) * static_cast<double>(k) / static_cast<double>(stages - 1);
  }
  if (stages > 1) xi.back() = xi_max;
  return xi;
}

enum class sora_gate_rule : std::uint8_t {
  proximal,       // the paper: g <- T_{eta xi}(g - eta dL/dg)
  official_code,  // TsinghuaC3I/SoRA: optimizer step by the trainer, then a fixed-xi threshold
};

template <compute_scalar T>
class sora;

struct sora_options {
  template <compute_scalar T>
  using adapter = sora<T>;  // the adapter these options make

  index rank = 8;  // r_max
  double alpha = 8.0;  // s = alpha / r_max
  sora_gate_rule gate_rule = sora_gate_rule::proximal;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class sora : public detail::gated_low_rank<sora<T>, T> {
  using core = detail::gated_low_rank<sora<T>, T>;
  friend class low_rank_adapter<sora<T>, T>;

 public:
  using core::in_features;
  using core::out_features;
  using core::rank;
  static constexpr std::string_view method = "sora";
  static constexpr std::string_view gate_name = "lora_gate";  // the component vector in parameters()

  sora() = default;

  /// A fresh adapter: A kaiming-uniform (a = sqrt 5), B = 0, g ~ N(0, 1).
  sora(index in_features, index out_features, const sora_options& opt)
      : core(fresh(in_features, out_features, opt)), rule_(opt.gate_rule) {}

  /// From existing factors: A (r_max, in), B (out, r_max), gate (r_max values), scale s.
  sora(matrix<T> a, matrix<T> b, std::vector<T> gate, T scale,
       sora_gate_rule rule = sora_gate_rule::proximal)
      : core("sora::sora", std::move(a), std::move(b), std::move(gate), scale), rule_(rule) {}

  sora_gate_rule gate_rule() const noexcept { return rule_; }
  void set_gate_rule(sora_gate_rule r) noexcept { rule_ = r; }

  /// The gate g as a (1, r_max) view.
  matrix_view<T> gate() noexcept { return this->gates().view(); }
  matrix_view<const T> gate() const noexcept { return this->gates().view(); }
  matrix_view<const T> grad_gate() const noexcept { return this->gate_grads().view(); }

  // ---- the gate -----------------------------------------------------------------------------

  /// The paper's proximal step from the accumulated gate gradient:
  /// g <- T_{eta lambda}(g - eta dL/dg). eta, lambda finite and >= 0. The gradient is kept
  /// (zero_grad() is the caller's).
  void proximal_step(double eta, double lambda) {
    check_step("sora::proximal_step", eta, lambda);
    const double xi = eta * lambda;
    for (index i = 0; i < rank(); ++i) {
      const double z = static_cast<double>(this->gates()(0, i)) - eta * static_cast<double>(this->gate_grads()(0, i));
      this->gates()(0, i) = static_cast<T>(soft_threshold(z, xi));
    }
  }

  /// The official code's threshold on the gate as it is (after the trainer's optimizer step),
  /// with a fixed xi: g_i <- sora_official_threshold(g_i, xi).
  void official_threshold(double xi) {
    check_step("sora::official_threshold", 0.0, xi);
    const T x = static_cast<T>(xi);
    for (index i = 0; i < rank(); ++i) this->gates()(0, i) = sora_official_threshold(this->gates()(0, i), x);
  }

  /// The configured rule: proximal_step(eta, xi), or official_threshold(xi) (eta unused).
  void gate_step(double eta, double xi) {
    if (rule_ == sora_gate_rule::proximal) {
      proximal_step(eta, xi);
    } else {
      official_threshold(xi);
    }
  }

  /// sum_i |g_i|, the official code's L1 term (before its weight).
  double gate_l1() const {
    double s = 0.0;
    for (index i = 0; i < rank(); ++i) s += std::abs(static_cast<double>(this->gates()(0, i)));
    return s;
  }

  /// dL/dg += coef sign(g) (sign(0) = 0, as torch); returns coef * gate_l1().
  double add_gate_l1(double coef) {
    for (index i = 0; i < rank(); ++i) {
      const T v = this->gates()(0, i);
      const T sign = v > T{0} ? T{1} : (v < T{0} ? T{-1} : T{0});
      this->gate_grads()(0, i) += static_cast<T>(coef) * sign;
    }
    return coef * gate_l1();
  }

 private:
  static core fresh(index in, index out, const sora_options& opt) {
    constexpr const char* where = "sora::sora";
    if (opt.rank < 1) detail::raise<shape_error>(where, "rank must be >= 1, got " + std::to_string(opt.rank));
    if (in < 1 || out < 1) {
      detail::raise<shape_error>(where, "in_features and out_features must be >= 1, got " +
                                            detail::shape_string(in, out));
    }
    rng gen(opt.seed);
    matrix<T> a(opt.rank, in);
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));  // kaiming-uniform, a = sqrt 5
    for (auto& v : a.storage()) v = static_cast<T>(gen.uniform(-bound, bound));
    std::vector<T> g(static_cast<std::size_t>(opt.rank));
    for (auto& v : g) v = static_cast<T>(gen.normal(0.0, 1.0));
    return core(where, std::move(a), matrix<T>(out, opt.rank), std::move(g),
                                     static_cast<T>(opt.alpha / static_cast<double>(opt.rank)));
  }

  static void check_step(const char* where, double eta, double xi) {
    if (!(std::isfinite(eta) && std::isfinite(xi) && eta >= 0.0 && xi >= 0.0)) {
      std::string m = "step size and threshold must be finite and >= 0, got eta ";
      m += std::to_string(eta);
      m += ", threshold ";
      m += std::to_string(xi);
      detail::raise<error>(where, m);
    }
  }

  sora_gate_rule rule_ = sora_gate_rule::proximal;
};

}  // namespace peft
