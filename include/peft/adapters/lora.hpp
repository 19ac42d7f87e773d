// peft/adapters/lora.hpp — LoRA (Hu et al. 2021) as HuggingFace PEFT computes it.
//
//   y = x W0^T + b0 + s (x A^T B^T + b_B)      A (r, in), B (out, r), b_B (out) with lora_bias
//   s = alpha / r, or alpha / sqrt(r) with rsLoRA
//
//   peft::lora<float> a(in_features, out_features, {.rank = 16, .alpha = 32});   // B = 0: a no-op
//
// The passes come from the low-rank core (adapters/detail/low_rank_core.hpp); checkpoints are
// read and written by io/peft/lora.hpp. Mathematics and PEFT's conventions: docs/methods/lora.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/detail/low_rank_core.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"

namespace peft {

template <compute_scalar T>
class lora;

/// PEFT's `init_lora_weights`: true (kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r^2),
/// zero B), false (both random: A kaiming-uniform, B ~ U(-1/sqrt(r), 1/sqrt(r)); not a no-op).
enum class lora_init : std::uint8_t { kaiming_uniform, gaussian, random };

struct lora_options {
  template <compute_scalar T>
  using adapter = lora<T>;  // the adapter these options make

  index rank = 8;
  double alpha = 8.0;
  bool use_rslora = false;  // s = alpha / sqrt(r) instead of alpha / r
  bool bias = false;        // PEFT's lora_bias: a trainable bias on B
  lora_init init = lora_init::kaiming_uniform;
  std::uint64_t seed = 0;
};

/// The scale PEFT uses: alpha / r, or alpha / sqrt(r) with rsLoRA.
inline double lora_scale(double alpha, index rank, bool use_rslora) {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

template <compute_scalar T>
class lora : public low_rank_adapter<lora<T>, T> {
 public:
  static constexpr std::string_view method = "lora";

  lora() = default;

  /// A fresh adapter for a layer of `in_features` inputs and `out_features` outputs (the order
  /// of nn.Linear(in_features, out_features); the weight itself is (out, in)).
  lora(index in_features, index out_features, const lora_options& opt)
      : a_(checked_rank(opt.rank), checked_dim(in_features, "in_features")),
        b_(checked_dim(out_features, "out_features"), opt.rank),
        scale_(static_cast<T>(lora_scale(opt.alpha, opt.rank, opt.use_rslora))),
        ga_(a_.rows(), a_.cols()),
        gb_(b_.rows(), b_.cols()) {
    if (opt.bias) {
      bias_ = matrix<T>(1, out_features);
      gbias_ = matrix<T>(1, out_features);
    }
    rng gen(opt.seed);
    const double bound_a = 1.0 / std::sqrt(static_cast<double>(in_features));
    switch (opt.init) {
      case lora_init::kaiming_uniform:
        for (auto& v : a_.storage()) v = static_cast<T>(gen.uniform(-bound_a, bound_a));
        break;
      case lora_init::gaussian:
        for (auto& v : a_.storage()) v = static_cast<T>(gen.normal(0.0, 1.0 / static_cast<double>(opt.rank)));
        break;
      case lora_init::random: {
        for (auto& v : a_.storage()) v = static_cast<T>(gen.uniform(-bound_a, bound_a));
        const double bound_b = 1.0 / std::sqrt(static_cast<double>(opt.rank));
        for (auto& v : b_.storage()) v = static_cast<T>(gen.uniform(-bound_b, bound_b));
        // nn.Linear's default bias init, which PEFT leaves in place without init_lora_weights.
        for (auto& v : bias_.storage()) v = static_cast<T>(gen.uniform(-bound_b, bound_b));
        break;
      }
    }
  }

  /// An adapter from existing factors: A (r, in), B (out, r), optional bias (out values).
  lora(matrix<T> a, matrix<T> b, T scale, std::vector<T> bias = {})
      : a_(std::move(a)), b_(std::move(b)), scale_(scale), ga_(a_.rows(), a_.cols()), gb_(b_.rows(), b_.cols()) {
    if (b_.cols() != a_.rows()) {
      detail::raise<shape_error>("lora::lora", "B is " + detail::shape_string(b_.rows(), b_.cols()) +
                                                   " but A has rank " + std::to_string(a_.rows()));
    }
    checked_rank(a_.rows());
    if (!bias.empty()) {
      if (static_cast<index>(bias.size()) != b_.rows()) {
        detail::raise<shape_error>("lora::lora", "bias has " + std::to_string(bias.size()) + " values, expected " +
                                                     std::to_string(b_.rows()));
      }
      bias_ = matrix<T>(1, b_.rows(), std::move(bias));
      gbias_ = matrix<T>(1, b_.rows());
    }
  }

  index in_features() const noexcept { return a_.cols(); }
  index out_features() const noexcept { return b_.rows(); }
  index rank() const noexcept { return a_.rows(); }
  T scale() const noexcept { return scale_; }
  void set_scale(T s) noexcept { scale_ = s; }
  bool has_bias() const noexcept { return !bias_.empty(); }

  matrix_view<T> A() noexcept { return a_.view(); }
  matrix_view<const T> A() const noexcept { return a_.view(); }
  matrix_view<T> B() noexcept { return b_.view(); }
  matrix_view<const T> B() const noexcept { return b_.view(); }
  /// lora_B.bias as a (1, out) view; empty without lora_bias.
  matrix_view<T> bias() noexcept { return bias_.view(); }
  matrix_view<const T> bias() const noexcept { return bias_.view(); }
  matrix_view<const T> grad_A() const noexcept { return ga_.view(); }
  matrix_view<const T> grad_B() const noexcept { return gb_.view(); }
  matrix_view<const T> grad_bias() const noexcept { return gbias_.view(); }

  /// The term s (x A^T B^T + b_B) for the low-rank core.
  low_rank_term<T> low_rank() const noexcept {
    return {a_.view(), b_.view(), nullptr, nullptr, bias_.empty() ? nullptr : bias_.data(), scale_};
  }
  low_rank_gradients<T> low_rank_grads() noexcept {
    return {ga_.view(), gb_.view(), nullptr, nullptr, gbias_.empty() ? nullptr : gbias_.data()};
  }

  /// lora_A.weight (r, in), lora_B.weight (out, r), lora_B.bias (out) with lora_bias.
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"lora_A.weight", a_.view(), ga_.view(), detail::shape_of(a_.view(), false)});
    p.push_back({"lora_B.weight", b_.view(), gb_.view(), detail::shape_of(b_.view(), false)});
    if (!bias_.empty()) p.push_back({"lora_B.bias", bias_.view(), gbias_.view(), detail::shape_of(bias_.view(), true)});
    return p;
  }

  void zero_grad() {
    ga_.fill(T{0});
    gb_.fill(T{0});
    gbias_.fill(T{0});
  }

 private:
  static index checked_rank(index r) {
    if (r < 1) detail::raise<shape_error>("lora::lora", "rank must be >= 1, got " + std::to_string(r));
    return r;
  }
  static index checked_dim(index d, const char* what) {
    if (d < 1) {
      std::string msg = what;  // appended piece by piece: g++ 12 -Warray-bounds false positive
      msg += " must be >= 1, got ";
      msg += std::to_string(d);
      detail::raise<shape_error>("lora::lora", msg);
    }
    return d;
  }

  matrix<T> a_;      // (r, in)
  matrix<T> b_;      // (out, r)
  matrix<T> bias_;   // (1, out) or empty
  T scale_ = T{1};
  matrix<T> ga_;     // gradients, same shapes
  matrix<T> gb_;
  matrix<T> gbias_;
};

}  // namespace peft
