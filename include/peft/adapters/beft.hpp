// peft/adapters/beft.hpp — BEFT, bias-efficient fine-tuning (Huang et al., 2025, arXiv 2509.15974)
// as HuggingFace PEFT 0.21 computes it: one trained vector b (out) added to the layer's output,
//
//   y = x W0^T + b0 + b          (the same b for every row of the batch)
//
//   peft::beft<float> a(in, out, {});   // PEFT's init: b = 0, an exact no-op
//
// An additive term that does not read x: dL/db = the column sums of dL/dy and dx = dL/dy W0.
// Merging adds b to the base's bias (W0 is unchanged; a base without a bias gets b as its bias,
// where PEFT refuses). A loaded adapter does not know in_features: bind(in, out) or set_features.
// Checkpoints: io/peft/beft.hpp. Details: docs/methods/beft.md.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"

namespace peft {

template <compute_scalar T>
class beft;

struct beft_options {
  template <compute_scalar T>
  using adapter = beft<T>;  // the adapter these options make

  bool random_init = false;  // PEFT's init_weights=False: b ~ N(0, 1) (torch.randn; here peft::rng)
  std::uint64_t seed = 0;    // for random_init
};

template <compute_scalar T>
class beft : public additive_adapter<beft<T>, T> {
  friend class additive_adapter<beft<T>, T>;

 public:
  static constexpr std::string_view method = "beft";

  /// Backward needs nothing from forward.
  struct cache_type {};

  beft() = default;

  /// A fresh adapter for an (out, in) layer: b = 0, or N(0, 1) values with random_init.
  beft(index in_features, index out_features, const beft_options& opt)
      : beft(zeros(in_features, out_features), in_features) {
    if (opt.random_init) {
      rng gen(opt.seed);
      for (auto& v : b_.storage()) v = static_cast<T>(gen.normal(0.0, 1.0));
    }
  }

  /// An adapter from beft_bias's out_features values. in_features may be 0: unbound until bind().
  explicit beft(std::vector<T> bias, index in_features = 0) : in_(in_features) {
    const auto out = static_cast<index>(bias.size());
    if (out < 1 || in_ < 0) {
      detail::raise<shape_error>("beft::beft", "beft_bias needs >= 1 value and in_features >= 0 (0: unbound), got " +
                                                   std::to_string(out) + " values and in_features " + std::to_string(in_));
    }
    b_ = matrix<T>(1, out, std::move(bias));
    gb_ = matrix<T>(1, out);
  }

  /// Input features; 0 while unbound (an adapter loaded from a checkpoint).
  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return b_.cols(); }
  bool bound() const noexcept { return in_ > 0; }

  /// Sets in_features; shape_error if out_features differs or in_features is already another.
  beft& bind(index in_features, index out_features) {
    if (b_.empty()) detail::raise<error>("beft::bind", "the adapter is default-constructed");
    if (in_features < 1 || out_features != b_.cols() || (in_ != 0 && in_ != in_features)) {
      detail::raise<shape_error>("beft::bind", "the adapter is for " + detail::shape_string(b_.cols(), in_) +
                                                   " (0: unbound), cannot bind to " + detail::shape_string(out_features, in_features));
    }
    in_ = in_features;
    return *this;
  }
  /// The loader's and adapted_linear's hook for the layer's shape (same as bind).
  void set_features(index in_features, index out_features) { bind(in_features, out_features); }
  /// Merging changes the bias (it is all BEFT changes).
  bool touches_bias() const noexcept { return true; }

  /// beft_bias as (1, out), and its gradient.
  matrix_view<T> bias() noexcept { return b_.view(); }
  matrix_view<const T> bias() const noexcept { return b_.view(); }
  matrix_view<const T> grad_bias() const noexcept { return gb_.view(); }

  // forward, add_term, backward, backward_term: core/additive_adapter.hpp over the hooks below.

  /// dW = 0: BEFT leaves the weight alone.
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("beft::delta_weight", w);
    detail::expect_shape("beft::delta_weight", "dw", dw, out_features(), in_features());
    for (index i = 0; i < dw.rows(); ++i) std::fill(dw.row(i), dw.row(i) + dw.cols(), T{0});
  }

  /// db = b, whether or not the base has a bias (adding it to a base without one gives it b).
  template <base_weight Base>
  bool delta_bias(const Base& w, T* db) const {
    this->check_base("beft::delta_bias", w);
    std::copy(b_.data(), b_.data() + b_.cols(), db);
    return true;
  }

  /// beft_bias, saved as PEFT's (1, out) tensor.
  std::vector<parameter<T>> parameters() {
    return {{"beft_bias", b_.view(), gb_.view(), detail::shape_of(b_.view(), false)}};
  }

  void zero_grad() { gb_.fill(T{0}); }

  /// peft::error naming `where` for a default-constructed or unbound adapter.
  void check_ready(const char* where) const {
    if (b_.empty()) detail::raise<error>(where, "the adapter is default-constructed");
    if (in_ == 0) {
      detail::raise<error>(where, "the adapter is not bound to a layer (a checkpoint does not give in_features): "
                                  "bind(in, out) first");
    }
  }

 private:
  /// out_features zeros for a fresh (out, in) layer; shape_error naming the constructor otherwise.
  static std::vector<T> zeros(index in_features, index out_features) {
    if (in_features < 1 || out_features < 1) {
      detail::raise<shape_error>("beft::beft", "the layer is " + detail::shape_string(out_features, in_features) +
                                                   ", both sides must be >= 1");
    }
    return std::vector<T>(static_cast<std::size_t>(out_features), T{0});
  }

  // ---- additive_adapter hooks ------------------------------------------------------------------
  /// y += b on every row.
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& /*cache*/) const {
    const T* b = b_.data();
    for (index i = 0; i < x.rows(); ++i) {
      T* yr = y.row(i);
      for (index j = 0; j < y.cols(); ++j) yr[j] += b[j];
    }
  }
  /// db += the column sums of g; dx gets nothing (the term does not read x).
  void delta_backward(matrix_view<const T> /*x*/, matrix_view<const T> g, matrix_view<T> /*dx*/, cache_type& /*cache*/) {
    T* gb = gb_.data();
    for (index i = 0; i < g.rows(); ++i) {
      const T* gr = g.row(i);
      for (index j = 0; j < g.cols(); ++j) gb[j] += gr[j];
    }
  }

  index in_ = 0;
  matrix<T> b_;   // beft_bias (1, out)
  matrix<T> gb_;  // its gradient (1, out)
};

}  // namespace peft
