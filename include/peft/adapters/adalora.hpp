// peft/adapters/adalora.hpp — AdaLoRA's SVD-form adapter (Zhang et al. 2023) as HuggingFace PEFT
// 0.21 applies it (SVDLinear). Rank allocation during training is not part of this type.
//
//   y = x W0^T + b0 + f x (A * E)^T B^T      A (r, in), E (r, 1), B (out, r)
//   f = scaling / (ranknum + 1e-5),  scaling = lora_alpha (or r when lora_alpha <= 0)
//
//   peft::adalora<float> a(in_features, out_features, {.rank = 12, .alpha = 32});   // E = 0
//
// A module may have rank 0 (PEFT allows it): its term is zero. The passes come from the low-rank
// core (E is its gate c); checkpoints: io/peft/adalora.hpp; ranknum and PEFT's conventions:
// docs/methods/adalora.md.
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
class adalora;

/// PEFT's `init_lora_weights`: true (E = 0, A and B ~ N(0, 0.02^2): a no-op), false (A, E, B
/// ~ N(0, 1), PyTorch's randn: not a no-op).
enum class adalora_init : std::uint8_t { standard, random };

struct adalora_options {
  template <compute_scalar T>
  using adapter = adalora<T>;  // the adapter these options make

  index rank = 12;     // init_r: the number of triplets, and ranknum
  double alpha = 8.0;  // lora_alpha; scaling = alpha, or the rank when alpha <= 0
  adalora_init init = adalora_init::standard;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class adalora : public low_rank_adapter<adalora<T>, T> {
 public:
  static constexpr std::string_view method = "adalora";
  /// PEFT adds this to ranknum before dividing.
  static constexpr double ranknum_epsilon = 1e-5;

  adalora() = default;

  /// A fresh adapter for an (out, in) linear layer: opt.rank triplets, ranknum = opt.rank.
  adalora(index in_features, index out_features, const adalora_options& opt)
      : a_(checked_rank(opt.rank), checked_dim(in_features, "in_features")),
        b_(checked_dim(out_features, "out_features"), opt.rank),
        e_(opt.rank, 1),
        scaling_(opt.alpha > 0 ? opt.alpha : static_cast<double>(opt.rank)),
        ranknum_(static_cast<double>(opt.rank)) {
    rng gen(opt.seed);
    const double sd = opt.init == adalora_init::standard ? 0.02 : 1.0;
    for (auto& v : a_.storage()) v = static_cast<T>(gen.normal(0.0, sd));
    if (opt.init == adalora_init::random) {
      for (auto& v : e_.storage()) v = static_cast<T>(gen.normal(0.0, 1.0));
    }
    for (auto& v : b_.storage()) v = static_cast<T>(gen.normal(0.0, sd));
    finish();
  }

  /// An adapter from existing tensors: A (r, in), B (out, r), E (r, 1); `scaling` and `ranknum`
  /// as PEFT keeps them (f = scaling / (ranknum + 1e-5)).
  adalora(matrix<T> a, matrix<T> b, matrix<T> e, double scaling, double ranknum)
      : a_(std::move(a)), b_(std::move(b)), e_(std::move(e)), scaling_(scaling), ranknum_(ranknum) {
    const index r = a_.rows();
    if (a_.cols() < 1 || b_.rows() < 1 || b_.cols() != r || e_.rows() != r || e_.cols() != 1) {
      detail::raise<shape_error>("adalora::adalora", "lora_A " + detail::shape_string(a_.rows(), a_.cols()) +
                                                         ", lora_B " + detail::shape_string(b_.rows(), b_.cols()) +
                                                         ", lora_E " + detail::shape_string(e_.rows(), e_.cols()) +
                                                         " are not (r, in), (out, r), (r, 1) with in, out >= 1");
    }
    if (!std::isfinite(scaling_) || !std::isfinite(ranknum_) || ranknum_ + ranknum_epsilon == 0.0) {
      detail::raise<shape_error>("adalora::adalora", "scaling and ranknum must be finite, ranknum + 1e-5 non-zero");
    }
    finish();
  }

  index in_features() const noexcept { return a_.cols(); }
  index out_features() const noexcept { return b_.rows(); }
  index rank() const noexcept { return a_.rows(); }
  double scaling() const noexcept { return scaling_; }
  double ranknum() const noexcept { return ranknum_; }
  /// f = scaling / (ranknum + 1e-5), the factor of the term.
  T factor() const noexcept { return factor_; }

  matrix_view<T> A() noexcept { return a_.view(); }
  matrix_view<const T> A() const noexcept { return a_.view(); }
  matrix_view<T> B() noexcept { return b_.view(); }
  matrix_view<const T> B() const noexcept { return b_.view(); }
  matrix_view<T> E() noexcept { return e_.view(); }
  matrix_view<const T> E() const noexcept { return e_.view(); }
  matrix_view<const T> grad_A() const noexcept { return ga_.view(); }
  matrix_view<const T> grad_B() const noexcept { return gb_.view(); }
  matrix_view<const T> grad_E() const noexcept { return ge_.view(); }

  /// The term f x (A * E)^T B^T for the low-rank core (E is its gate).
  low_rank_term<T> low_rank() const noexcept { return {a_.view(), b_.view(), e_.data(), nullptr, nullptr, factor_}; }
  low_rank_gradients<T> low_rank_grads() noexcept { return {ga_.view(), gb_.view(), ge_.data(), nullptr, nullptr}; }

  /// lora_A (r, in), lora_B (out, r), lora_E (r, 1): PEFT's names (no ".weight").
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"lora_A", a_.view(), ga_.view(), detail::shape_of(a_.view(), false)});
    p.push_back({"lora_B", b_.view(), gb_.view(), detail::shape_of(b_.view(), false)});
    p.push_back({"lora_E", e_.view(), ge_.view(), detail::shape_of(e_.view(), false)});
    return p;
  }

  void zero_grad() {
    ga_.fill(T{0});
    gb_.fill(T{0});
    ge_.fill(T{0});
  }

 private:
  static index checked_rank(index r) {
    if (r < 0) detail::raise<shape_error>("adalora::adalora", "rank must be >= 0, got " + std::to_string(r));
    return r;
  }
  static index checked_dim(index d, const char* what) {
    if (d < 1) detail::raise<shape_error>("adalora::adalora", std::string(what) + " must be >= 1, got " + std::to_string(d));
    return d;
  }
  void finish() {
    factor_ = static_cast<T>(scaling_ / (ranknum_ + ranknum_epsilon));
    ga_ = matrix<T>(a_.rows(), a_.cols());
    gb_ = matrix<T>(b_.rows(), b_.cols());
    ge_ = matrix<T>(e_.rows(), e_.cols());
  }

  matrix<T> a_;   // (r, in)
  matrix<T> b_;   // (out, r)
  matrix<T> e_;   // (r, 1)
  double scaling_ = 1.0;
  double ranknum_ = 1.0;
  T factor_ = T{1};
  matrix<T> ga_;  // gradients, same shapes
  matrix<T> gb_;
  matrix<T> ge_;
};


}  // namespace peft
