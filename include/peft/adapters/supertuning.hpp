// peft/adapters/supertuning.hpp — Super-Tuning ("Super": a sparse support of W0 trained; "Supra":
// plus a LoRA) as HuggingFace PEFT 0.21.2 computes it (peft_type "SUPERTUNING").
//
//   y = x (W0 + S)^T + b0 + s x A^T B^T      S = scatter_add(zeros(out, in), idx, v)
//   v (K) trainable; idx (K) fixed flat indices into W0 (out, in) row-major, int32 on disk
//   A (r, in), B (out, r) and s = lora_alpha / r only with r (PEFT's r = None: Super alone)
//   K = int(out in (1 - sparsity)); PEFT picks idx = topk(|W0|.flatten(), K, largest=select_top)
//
//   peft::supertuning<float> a(layer.base(), {.sparsity = 0.99, .rank = 8});   // v = 0, B = 0
//   layer.add_adapter("default", std::move(a));
//
// Composed of the two methods it adds up: the sparse term is a SHiRA (adapters/shira.hpp) on the
// entries (idx / in, idx % in) with scale 1, the low-rank term a LoRA (adapters/lora.hpp) run
// through the low-rank core. Neither is made dense: the sparse term joins the base product's
// tiles, the low-rank term is x A^T then B. dW (merge) = S + s B A. An adapter loaded without
// the base's shape and without the LoRA part (which gives it) is bound by set_features (the
// loader and adapted_linear call it). Indices are distinct: PEFT's topk never repeats one, and a
// repeated one (which PEFT's scatter_add would sum) is refused. Checkpoints:
// io/peft/supertuning.hpp. Details: docs/methods/supertuning.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/detail/low_rank_core.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/shira.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"

namespace peft {

template <compute_scalar T>
class supertuning;

/// PEFT's SupertuningConfig for one layer. The indices come from the base (top-K |W0|): build
/// the adapter with supertuning<T>(layer.base(), options) and add that.
struct supertuning_options {
  double sparsity = 0.99;    // K = int(out in (1 - sparsity)), sparsity in [0, 1)
  bool select_top = true;    // false: the K smallest |W0| (the paper's "-bottom")
  index rank = 0;            // 0: PEFT's r = None (Super); else the Supra LoRA's rank
  double alpha = 0;          // lora_alpha; 0: PEFT's default 2 r (only with a rank)
  bool init_weights = true;  // false: v ~ N(0, 1), B kaiming-uniform (PEFT's tests' init)
  std::uint64_t seed = 0;    // values and LoRA init (peft::rng, not torch's generator)
};

/// PEFT's K for a weight of out x in entries: int(out in (1 - sparsity)), the product in double
/// truncated (0.9 of 120 entries leaves 11, not 12: 1 - 0.9 < 0.1 in double).
inline index supertuning_entries(index out_features, index in_features, double sparsity) {
  return static_cast<index>(static_cast<double>(out_features * in_features) * (1.0 - sparsity));
}

/// The K flat indices of the largest |W0| (select_top) or of the smallest, in PEFT's order
/// (torch.topk, sorted: by |W0| descending for the largest, ascending for the smallest). Ties go
/// to the lower index; torch leaves their order unspecified. W0 is read a row at a time through
/// the base's dequantize_row, whatever its format.
template <base_weight Base>
std::vector<std::int64_t> supertuning_magnitude_indices(const Base& w, index k, bool select_top) {
  const index out = w.out_features(), in = w.in_features(), n = out * in;
  if (k < 1 || k > n) {
    detail::raise<shape_error>("supertuning_magnitude_indices", "K = " + std::to_string(k) + " of " + std::to_string(n) +
                                                                   " entries, expected 1 <= K <= out in");
  }
  std::vector<double> score(static_cast<std::size_t>(n));
  for (index o = 0; o < out; ++o) {
    w.dequantize_row(o, score.data() + o * in);
    for (index i = o * in; i < (o + 1) * in; ++i) score[static_cast<std::size_t>(i)] = std::abs(score[static_cast<std::size_t>(i)]);
  }
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  for (index i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = i;
  auto before = [&](std::int64_t a, std::int64_t b) {
    const double sa = score[static_cast<std::size_t>(a)], sb = score[static_cast<std::size_t>(b)];
    if (sa != sb) return select_top ? sa > sb : sa < sb;
    return a < b;
  };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), before);
  order.resize(static_cast<std::size_t>(k));
  return order;
}

template <compute_scalar T>
class supertuning : public additive_adapter_tag, public detail::adapter_checks<supertuning<T>, T> {
 public:
  using scalar = T;
  static constexpr std::string_view method = "supertuning";

  /// What backward needs: the sparse term nothing, the low-rank term x A^T.
  struct cache_type {
    typename shira<T>::cache_type sparse;
    low_rank_cache<T> low_rank;
  };

  supertuning() = default;

  /// A fresh adapter for the base layer w with PEFT's initialisation: indices the top (or
  /// bottom) K of |W0|, values 0 (N(0, 1) without init_weights), and with a rank a LoRA of
  /// A kaiming-uniform, B = 0 (kaiming-uniform without init_weights). shape_error on sparsity
  /// outside [0, 1), K = 0, a negative rank, or an alpha without a rank (PEFT's errors).
  template <base_weight Base>
  supertuning(const Base& w, const supertuning_options& opt) {
    constexpr const char* where = "supertuning::supertuning";
    if (!(opt.sparsity >= 0.0 && opt.sparsity < 1.0)) {
      detail::raise<shape_error>(where, "sparsity must be in [0, 1), got " + std::to_string(opt.sparsity));
    }
    if (opt.rank < 0) detail::raise<shape_error>(where, "rank must be >= 0 (0: no LoRA part), got " + std::to_string(opt.rank));
    if (opt.rank == 0 && opt.alpha != 0) {
      detail::raise<shape_error>(where, "alpha is set without a rank (PEFT refuses lora_alpha when r is None)");
    }
    const index out = w.out_features(), in = w.in_features();
    const index k = supertuning_entries(out, in, opt.sparsity);
    if (k < 1) {
      detail::raise<shape_error>(where, "sparsity " + std::to_string(opt.sparsity) + " leaves no entry of the " +
                                            detail::shape_string(out, in) + " weight trainable");
    }
    std::vector<T> values(static_cast<std::size_t>(k), T{0});
    rng gen(opt.seed);
    if (!opt.init_weights) {
      for (auto& v : values) v = static_cast<T>(gen.normal());
    }
    matrix<T> a, b;
    double alpha = 0;
    if (opt.rank > 0) {
      alpha = opt.alpha != 0 ? opt.alpha : 2.0 * static_cast<double>(opt.rank);
      lora_options lo;
      lo.rank = opt.rank;
      lo.alpha = alpha;
      lo.init = opt.init_weights ? lora_init::kaiming_uniform : lora_init::random;
      lo.seed = gen.next();
      lora<T> l(in, out, lo);
      a = to_matrix(l.A());
      b = to_matrix(l.B());
    }
    *this = supertuning(supertuning_magnitude_indices(w, k, opt.select_top), std::move(values), in, out, std::move(a),
                        std::move(b), alpha);
  }

  /// An adapter from stored tensors: flat indices (K) into W0 (out, in) row-major, distinct;
  /// values (K; empty: zeros); optionally the LoRA part A (r, in), B (out, r) and lora_alpha
  /// (s = alpha / r; 0: PEFT's default 2 r). in_features / out_features: the layer's shape, 0
  /// when unknown (then taken from A and B, or bound later by set_features). shape_error on
  /// sizes, format_error on indices (negative, repeated, outside the layer).
  supertuning(std::vector<std::int64_t> indices, std::vector<T> values, index in_features = 0, index out_features = 0,
              matrix<T> lora_a = {}, matrix<T> lora_b = {}, double lora_alpha = 0)
      : flat_(std::move(indices)) {
    constexpr const char* where = "supertuning::supertuning";
    if (flat_.empty()) detail::raise<shape_error>(where, "no index: K must be >= 1");
    if (values.empty()) values.assign(flat_.size(), T{0});
    if (values.size() != flat_.size()) {
      detail::raise<shape_error>(where, std::to_string(values.size()) + " values for " + std::to_string(flat_.size()) +
                                            " indices");
    }
    check_distinct(where, flat_);
    if (!lora_a.empty() || !lora_b.empty()) {
      if (lora_a.rows() < 1 || lora_a.cols() < 1 || lora_b.cols() != lora_a.rows() || lora_b.rows() < 1) {
        detail::raise<shape_error>(where, "supertuning_lora_A is " + detail::shape_string(lora_a.rows(), lora_a.cols()) +
                                              " and supertuning_lora_B " +
                                              detail::shape_string(lora_b.rows(), lora_b.cols()) +
                                              ", expected (r, in) and (out, r) with r >= 1");
      }
      if ((in_features != 0 && in_features != lora_a.cols()) || (out_features != 0 && out_features != lora_b.rows())) {
        detail::raise<shape_error>(where, "the LoRA part is for " + detail::shape_string(lora_b.rows(), lora_a.cols()) +
                                              ", the layer is " + detail::shape_string(out_features, in_features));
      }
      in_features = lora_a.cols();
      out_features = lora_b.rows();
      alpha_ = lora_alpha != 0 ? lora_alpha : 2.0 * static_cast<double>(lora_a.rows());
      const T s = static_cast<T>(lora_scale(alpha_, lora_a.rows(), false));
      lora_ = lora<T>(std::move(lora_a), std::move(lora_b), s);
    } else if (lora_alpha != 0) {
      detail::raise<shape_error>(where, "lora_alpha is given without the LoRA part (PEFT refuses lora_alpha when r is None)");
    }
    mirror_ = matrix<T>(1, static_cast<index>(flat_.size()));
    for (std::size_t t = 0; t < flat_.size(); ++t) mirror_(0, static_cast<index>(t)) = static_cast<T>(flat_[t]);
    pending_ = matrix<T>(1, static_cast<index>(flat_.size()), std::move(values));
    pending_grad_ = matrix<T>(1, pending_.cols());
    if (in_features != 0 || out_features != 0) set_features(in_features, out_features);
  }

  /// The layer's shape for an adapter loaded without it (no LoRA part: the flat indices do not
  /// tell out from in): the loader's and adapted_linear's hook. shape_error if the adapter is
  /// bound to another shape or the layer has more than 2^31 entries (PEFT's int32 indices);
  /// format_error if an index is outside the layer.
  void set_features(index in_features, index out_features) {
    constexpr const char* where = "supertuning::set_features";
    if (bound()) {
      if (in_features != in_ || out_features != out_) {
        detail::raise<shape_error>(where, "the adapter is for " + detail::shape_string(out_, in_) + ", cannot bind to " +
                                              detail::shape_string(out_features, in_features));
      }
      return;
    }
    if (in_features < 1 || out_features < 1) {
      detail::raise<shape_error>(where, "the layer is " + detail::shape_string(out_features, in_features) +
                                            ", both sizes must be >= 1");
    }
    const index n = out_features * in_features;
    if (n - 1 > index{std::numeric_limits<std::int32_t>::max()}) {
      detail::raise<shape_error>(where, "the " + detail::shape_string(out_features, in_features) +
                                            " weight has more than 2^31 entries: PEFT stores its flat indices as int32");
    }
    matrix<std::int32_t> rc(2, static_cast<index>(flat_.size()));
    for (std::size_t t = 0; t < flat_.size(); ++t) {
      const std::int64_t f = flat_[t];
      if (f >= n) {
        detail::raise<format_error>(where, "supertuning_indices[" + std::to_string(t) + "] = " + std::to_string(f) +
                                               " is outside the " + detail::shape_string(out_features, in_features) +
                                               " weight (" + std::to_string(n) + " entries)");
      }
      rc(0, static_cast<index>(t)) = static_cast<std::int32_t>(f / in_features);
      rc(1, static_cast<index>(t)) = static_cast<std::int32_t>(f % in_features);
    }
    sparse_ = shira<T>(in_features, out_features, std::move(rc), pending_.storage());
    pending_ = matrix<T>();
    pending_grad_ = matrix<T>();
    in_ = in_features;
    out_ = out_features;
  }

  /// Whether the layer's shape is known (the passes need it).
  bool bound() const noexcept { return in_ != 0; }
  /// 0 while unbound (no LoRA part, loaded without the base).
  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  /// K, the number of trainable entries.
  index entries() const noexcept { return static_cast<index>(flat_.size()); }
  /// The flat indices into W0 (out, in), as stored.
  const std::vector<std::int64_t>& indices() const noexcept { return flat_; }
  /// supertuning_values (1, K).
  matrix_view<T> values() noexcept { return bound() ? sparse_.values() : pending_.view(); }
  matrix_view<const T> values() const noexcept { return bound() ? sparse_.values() : pending_.view(); }
  matrix_view<const T> grad_values() const noexcept { return sparse_.grad_values(); }

  /// Whether the Supra LoRA part is present (PEFT's r set).
  bool has_lora() const noexcept { return lora_.rank() > 0; }
  /// The LoRA rank r, 0 without the LoRA part.
  index rank() const noexcept { return lora_.rank(); }
  /// lora_alpha (0 without the LoRA part); the scale is alpha / r.
  double lora_alpha() const noexcept { return alpha_; }
  T scale() const noexcept { return lora_.scale(); }
  /// The two terms, read-only: the sparse one (valid once bound) and the LoRA one.
  const shira<T>& sparse_part() const noexcept { return sparse_; }
  const lora<T>& lora_part() const noexcept { return lora_; }
  matrix_view<T> A() noexcept { return lora_.A(); }
  matrix_view<const T> A() const noexcept { return lora_.A(); }
  matrix_view<T> B() noexcept { return lora_.B(); }
  matrix_view<const T> B() const noexcept { return lora_.B(); }

  /// y = x W0^T + b0 + x S^T (in the base product's tiles) + s x A^T B^T.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    check_io("supertuning::forward", w, x, y);
    sparse_.forward(w, x, y, cache.sparse);
    if (has_lora()) low_rank::add(lora_.low_rank(), x, y, cache.low_rank);
  }
  /// y += x S^T + s x A^T B^T; the base output h is not needed.
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<T> y,
                cache_type& cache) const {
    check_io("supertuning::add_term", w, x, y);
    sparse_.add_term(w, x, h, y, cache.sparse);
    if (has_lora()) low_rank::add(lora_.low_rank(), x, y, cache.low_rank);
  }
  /// dv += (g^T x)[idx], dA += s B^T g^T x, dB += s g^T x A^T; dx = g W0 + g S + s g B A.
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    check_grad("supertuning::backward", w, x, g, dx);
    sparse_.backward(w, x, g, dx, cache.sparse);
    if (has_lora()) low_rank::backward(lora_.low_rank(), lora_.low_rank_grads(), x, g, dx, cache.low_rank);
  }
  /// The gradients as backward; dx += g S + s g B A (the direct path only); dh untouched.
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<const T> g,
                     matrix_view<T> dh, matrix_view<T> dx, cache_type& cache) {
    check_grad("supertuning::backward_term", w, x, g, dx);
    sparse_.backward_term(w, x, h, g, dh, dx, cache.sparse);
    if (has_lora()) low_rank::backward(lora_.low_rank(), lora_.low_rank_grads(), x, g, dx, cache.low_rank);
  }

  /// dW = S + s B A (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    constexpr const char* where = "supertuning::delta_weight";
    check_ready(where);
    detail::check_adapter_base(where, *this, w);
    detail::expect_shape(where, "dw", dw, out_, in_);
    if (has_lora()) {
      low_rank::delta(lora_.low_rank(), dw);
    } else {
      for (index i = 0; i < out_; ++i) std::fill(dw.row(i), dw.row(i) + in_, T{0});
    }
    const auto& rc = sparse_.indices();
    const auto v = sparse_.values();
    for (index t = 0; t < entries(); ++t) dw(rc(0, t), rc(1, t)) += v(0, t);
  }
  /// Super-Tuning leaves the bias alone.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// supertuning_values (K, trainable), supertuning_indices (K, integer, frozen: its view
  /// mirrors indices() as T, so in float an index above 2^24 reads rounded there, and saving
  /// refuses it; writing to it changes nothing), and with the LoRA part
  /// supertuning_lora_A.weight (r, in) and supertuning_lora_B.weight (out, r).
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    if (bound()) {
      parameter<T> v = sparse_.parameters().front();  // shira_weight: the values and their gradient
      v.name = "supertuning_values";
      p.push_back(std::move(v));
    } else {
      // Unbound (loaded without the layer's shape): the values, with a gradient no pass writes
      // (the passes need the shape).
      p.push_back({"supertuning_values", pending_.view(), pending_grad_.view(), detail::shape_of(pending_.view(), true)});
    }
    for (std::size_t t = 0; t < flat_.size(); ++t) mirror_(0, static_cast<index>(t)) = static_cast<T>(flat_[t]);
    p.push_back({"supertuning_indices", mirror_.view(), matrix_view<T>{}, detail::shape_of(mirror_.view(), true),
                 /*trainable=*/false, /*shared=*/false, /*integer=*/true});
    if (has_lora()) {
      for (auto& q : lora_.parameters()) {
        q.name = "supertuning_" + q.name;
        p.push_back(std::move(q));
      }
    }
    return p;
  }

  void zero_grad() {
    if (bound()) sparse_.zero_grad();
    pending_grad_.fill(T{0});
    lora_.zero_grad();
  }

  /// Largest flat index exact in T (below 2^24 in float) and in int32 (PEFT's dtype on disk):
  /// the largest a checkpoint can carry through T (tensors are read and written as T).
  static constexpr index max_exact_index() noexcept { return shira<T>::max_exact_index(); }

  /// No flat index twice (PEFT's topk never repeats one; its scatter_add would add the values of
  /// a repeated one, which apply-style merging and per-entry gradients here do not model), none
  /// negative. format_error naming `where`.
  static void check_distinct(const char* where, const std::vector<std::int64_t>& flat) {
    std::vector<std::int64_t> sorted = flat;
    std::sort(sorted.begin(), sorted.end());
    if (!sorted.empty() && sorted.front() < 0) {
      detail::raise<format_error>(where, "supertuning_indices holds " + std::to_string(sorted.front()) +
                                             ", a negative flat index");
    }
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end()) {
      detail::raise<format_error>(where, "supertuning_indices holds the flat index " + std::to_string(*dup) +
                                             " more than once: PEFT's topk never repeats one (its scatter_add would "
                                             "add their values); refused");
    }
  }

 private:
  void check_ready(const char* where) const {
    if (flat_.empty()) detail::raise<error>(where, "the adapter is default-constructed (no indices)");
    if (!bound()) {
      detail::raise<error>(where, "the layer's shape is unknown (loaded without the base and without the LoRA part): "
                                  "bind it with set_features(in, out) or add it to an adapted_linear");
    }
  }
  using checks = detail::adapter_checks<supertuning, T>;  // check_base / check_io / check_grad
  friend checks;
  using checks::check_io;
  using checks::check_grad;

  std::vector<std::int64_t> flat_;  // (K) flat indices into W0 (out, in), as stored
  shira<T> sparse_;                 // the values at (idx / in, idx % in), scale 1; once bound
  matrix<T> pending_;               // (1, K) the values while unbound
  matrix<T> pending_grad_;          // (1, K) their (zero) gradient while unbound
  lora<T> lora_;                    // A (r, in), B (out, r), s = alpha / r; rank 0 without
  double alpha_ = 0;                // lora_alpha (0 without the LoRA part)
  matrix<T> mirror_;                // (1, K) flat_ as T, for parameters()
  index in_ = 0;
  index out_ = 0;
};

}  // namespace peft
