// peft/adapters/detail/gated_low_rank.hpp — what the gated-rank adapters (SoRA and dynamic-rank
// LoRA) share: A (r, in), B (out, r), one scalar c_i per component, a scale s, their gradients,
// the accessors, the low-rank term s ((x A^T) * c) B^T (computed by the low-rank core),
// parameters() and compaction to LoRA. A CRTP base: Derived names its component vector
// (`static constexpr std::string_view gate_name`). Not public: use sora / dynamic_rank.
#pragma once

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "peft/adapters/detail/low_rank_core.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"

namespace peft::detail {

template <class Derived, compute_scalar T>
class gated_low_rank : public low_rank_adapter<Derived, T> {
 public:
  index in_features() const noexcept { return a_.cols(); }
  index out_features() const noexcept { return b_.rows(); }
  /// The number of components (closed or pruned ones included).
  index rank() const noexcept { return a_.rows(); }
  /// Components with c_i != 0: the rank compact() gives.
  index active_rank() const noexcept {
    index n = 0;
    for (index i = 0; i < rank(); ++i) n += c_(0, i) != T{0} ? 1 : 0;
    return n;
  }
  T scale() const noexcept { return scale_; }
  void set_scale(T s) noexcept { scale_ = s; }

  matrix_view<T> A() noexcept { return a_.view(); }
  matrix_view<const T> A() const noexcept { return a_.view(); }
  matrix_view<T> B() noexcept { return b_.view(); }
  matrix_view<const T> B() const noexcept { return b_.view(); }
  matrix_view<const T> grad_A() const noexcept { return ga_.view(); }
  matrix_view<const T> grad_B() const noexcept { return gb_.view(); }

  /// The term s ((x A^T) * c) B^T for the low-rank core.
  low_rank_term<T> low_rank() const noexcept { return {a_.view(), b_.view(), c_.data(), nullptr, nullptr, scale_}; }
  low_rank_gradients<T> low_rank_grads() noexcept { return {ga_.view(), gb_.view(), gc_.data(), nullptr, nullptr}; }

  /// The plain LoRA with identical outputs: S = {i : c_i != 0}, A' = A_S (|S|, in),
  /// B' = B_S diag(c_S) (out, |S|), the same scale. std::nullopt when every c_i is zero: the
  /// term is then exactly zero, the layer needs no adapter (lora requires rank >= 1).
  std::optional<lora<T>> compact() const {
    const index k = active_rank();
    if (k == 0) return std::nullopt;
    matrix<T> a2(k, in_features()), b2(out_features(), k);
    index p = 0;
    for (index i = 0; i < rank(); ++i) {
      const T ci = c_(0, i);
      if (ci == T{0}) continue;
      std::copy(a_.row(i), a_.row(i) + in_features(), a2.row(p));
      for (index j = 0; j < out_features(); ++j) b2(j, p) = b_(j, i) * ci;
      ++p;
    }
    return lora<T>(std::move(a2), std::move(b2), scale_);
  }

  /// lora_A.weight, lora_B.weight (as LoRA) and the component vector (Derived::gate_name).
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"lora_A.weight", a_.view(), ga_.view(), shape_of(a_.view(), false)});
    p.push_back({"lora_B.weight", b_.view(), gb_.view(), shape_of(b_.view(), false)});
    p.push_back({std::string(Derived::gate_name), c_.view(), gc_.view(), shape_of(c_.view(), true)});
    return p;
  }

  void zero_grad() {
    ga_.fill(T{0});
    gb_.fill(T{0});
    gc_.fill(T{0});
  }

  gated_low_rank() = default;

  /// Takes A (r, in), B (out, r), c (r values) and the scale s; `where` names the public
  /// constructor in error messages. r, in and out must be >= 1.
  gated_low_rank(const char* where, matrix<T> a, matrix<T> b, std::vector<T> c, T scale)
      : a_(std::move(a)), b_(std::move(b)), scale_(scale) {
    if (a_.rows() < 1 || a_.cols() < 1 || b_.rows() < 1) {
      raise<shape_error>(where, "A is " + shape_string(a_.rows(), a_.cols()) + " and B is " +
                                    shape_string(b_.rows(), b_.cols()) +
                                    ": rank, in_features and out_features must be >= 1");
    }
    if (b_.cols() != a_.rows()) {
      raise<shape_error>(where, "B is " + shape_string(b_.rows(), b_.cols()) + " but A has rank " +
                                    std::to_string(a_.rows()));
    }
    if (static_cast<index>(c.size()) != a_.rows()) {
      std::string m = "the component vector has ";
      m += std::to_string(c.size());
      m += " values, expected ";
      m += std::to_string(a_.rows());
      raise<shape_error>(where, m);
    }
    c_ = matrix<T>(1, a_.rows(), std::move(c));
    ga_ = matrix<T>(a_.rows(), a_.cols());
    gb_ = matrix<T>(b_.rows(), b_.cols());
    gc_ = matrix<T>(1, a_.rows());
  }

 protected:
  const matrix<T>& a_matrix() const noexcept { return a_; }
  const matrix<T>& b_matrix() const noexcept { return b_; }
  matrix<T>& gates() noexcept { return c_; }  // (1, r)
  const matrix<T>& gates() const noexcept { return c_; }
  matrix<T>& gate_grads() noexcept { return gc_; }
  const matrix<T>& gate_grads() const noexcept { return gc_; }
  matrix<T>& grad_a_matrix() noexcept { return ga_; }
  matrix<T>& grad_b_matrix() noexcept { return gb_; }

 private:
  matrix<T> a_;   // (r, in)
  matrix<T> b_;   // (out, r)
  matrix<T> c_;   // (1, r)
  T scale_ = T{1};
  matrix<T> ga_;  // gradients, same shapes
  matrix<T> gb_;
  matrix<T> gc_;
};

}  // namespace peft::detail
