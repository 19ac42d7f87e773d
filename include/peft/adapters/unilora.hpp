// peft/adapters/unilora.hpp — Uni-LoRA (Li et al. 2025, "Uni-LoRA: One Vector Is All You Need")
// as HuggingFace PEFT 0.21 computes it.
//
//   y = x W0^T + b0 + (x A^T) B^T            no alpha, no scale; A (r, in), B (out, r)
//   A[k] = theta_d[idx_A[k]] * s_A[k],  B[k] = theta_d[idx_B[k]] * s_B[k]   (element-wise)
//   theta_d (theta_d_length) is ONE trainable vector shared by every adapted layer; the integer
//   indices and the scales are frozen. PEFT draws the indices of all layers at once, in the
//   model's module order (A then B per layer), with numpy.random.default_rng(proj_seed): every
//   entry of theta_d is used floor(D / d) or ceil(D / d) times (D = total of r (in + out),
//   d = theta_d_length), and s = 1 / sqrt(count of the index) (float32, as PEFT stores it).
//
//   auto layers = peft::make_unilora_layers<float>({{in1, out1}, {in2, out2}}, {.rank = 4});
//
// A and B are assembled into the cache by every forward; the product and its gradients come from
// the low-rank core, dtheta_d gathers dA * s_A and dB * s_B at the indices (accumulated over every
// layer sharing theta_d). Checkpoints: io/peft/unilora.hpp. Details: docs/methods/unilora.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "peft/adapters/detail/low_rank_core.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/numpy_generator.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// The vector theta_d Uni-LoRA layers share: value (1, length) and its gradient, accumulated by
/// every layer that holds it.
template <compute_scalar T>
struct unilora_theta {
  matrix<T> value;  // (1, length)
  matrix<T> grad;   // same shape, += by every layer sharing it

  unilora_theta() = default;
  /// theta_d holding `values` (1, length >= 1).
  explicit unilora_theta(matrix<T> values) : value(std::move(values)) {
    if (value.rows() != 1 || value.cols() < 1) {
      detail::raise<shape_error>("unilora_theta::unilora_theta", "theta_d is " +
                                                                     detail::shape_string(value.rows(), value.cols()) +
                                                                     ", expected (1, length >= 1)");
    }
    grad = matrix<T>(1, value.cols());
  }
  index length() const noexcept { return value.cols(); }
  void zero_grad() { grad.fill(T{0}); }
};

template <compute_scalar T>
class unilora;

/// PEFT's UniLoraConfig numbers. theta_d is drawn from peft::rng seeded with `seed` (PEFT uses
/// torch's global generator, which no checkpoint records): U(-init_theta_d_bound,
/// init_theta_d_bound), or N(0, 1) with init_weights = false. The indices are PEFT's exactly.
struct unilora_options {
  template <compute_scalar T>
  using adapter = unilora<T>;  // the adapter these options make

  index rank = 4;
  index theta_d_length = 256;
  std::uint64_t proj_seed = 42;
  double init_theta_d_bound = 0.02;
  bool init_weights = true;
  std::uint64_t seed = 0;
};

/// PEFT's UniLoraModel.generate_index: `count` indices into [0, length), each value used
/// count / length times plus once more for count % length of them (numpy's choice without
/// replacement), shuffled with numpy.random.default_rng(proj_seed).
inline std::vector<std::int64_t> unilora_generate_index(std::int64_t count, std::int64_t length,
                                                        std::uint64_t proj_seed) {
  if (count < 0 || length < 1) {
    detail::raise<shape_error>("unilora_generate_index", "need count >= 0 and length >= 1, got count = " +
                                                             std::to_string(count) + ", length = " +
                                                             std::to_string(length));
  }
  const std::int64_t base = count / length, rem = count % length;
  numpy_generator g(proj_seed);
  std::vector<std::int64_t> data;
  data.reserve(static_cast<std::size_t>(count));
  for (std::int64_t v = 0; v < length; ++v)
    for (std::int64_t k = 0; k < base; ++k) data.push_back(v);
  if (rem > 0) {
    const auto extras = g.choice_without_replacement(length, rem);
    data.insert(data.end(), extras.begin(), extras.end());
  }
  g.shuffle(data);
  return data;
}

/// A fresh theta_d of `length`: U(-bound, bound), or N(0, 1) without init_weights (peft::rng).
template <compute_scalar T>
std::shared_ptr<unilora_theta<T>> make_unilora_theta(index length, double bound = 0.02, bool init_weights = true,
                                                     std::uint64_t seed = 0) {
  if (length < 1) {
    detail::raise<shape_error>("make_unilora_theta", "theta_d_length must be >= 1, got " + std::to_string(length));
  }
  rng gen(seed);
  matrix<T> v(1, length);
  for (auto& e : v.storage()) e = static_cast<T>(init_weights ? gen.uniform(-bound, bound) : gen.normal(0.0, 1.0));
  return std::make_shared<unilora_theta<T>>(std::move(v));
}

template <compute_scalar T>
class unilora : public additive_adapter<unilora<T>, T> {
  friend class additive_adapter<unilora<T>, T>;

 public:
  static constexpr std::string_view method = "unilora";

  /// What forward assembles and backward reuses: A (r, in), B (out, r), t = x A^T.
  struct cache_type {
    matrix<T> a;
    matrix<T> b;
    low_rank_cache<T> lr;
    bool assembled = false;
  };

  unilora() = default;

  /// A model of one adapted layer, as PEFT builds it: its own theta_d (see unilora_options), the
  /// indices of generate_index over this layer alone.
  unilora(index in_features, index out_features, const unilora_options& opt)
      : unilora(std::move(layers({{in_features, out_features}}, opt, nullptr).front())) {}

  /// An adapter over `theta` from its frozen tensors: indices_a / scales_a (r, in) and
  /// indices_b / scales_b (out, r), row-major; indices in [0, theta_d_length).
  unilora(std::shared_ptr<unilora_theta<T>> theta, index rank, index in_features, index out_features,
          std::vector<std::int64_t> indices_a, std::vector<std::int64_t> indices_b, matrix<T> scales_a,
          matrix<T> scales_b)
      : theta_(std::move(theta)), in_(in_features), out_(out_features), rank_(rank), idx_a_(std::move(indices_a)),
        idx_b_(std::move(indices_b)), sa_(std::move(scales_a)), sb_(std::move(scales_b)) {
    constexpr const char* where = "unilora::unilora";
    if (!theta_) detail::raise<shape_error>(where, "theta_d must not be null");
    if (rank_ < 1 || in_ < 1 || out_ < 1) {
      detail::raise<shape_error>(where, "rank " + std::to_string(rank_) + ", in_features " + std::to_string(in_) +
                                            " and out_features " + std::to_string(out_) + " must be >= 1");
    }
    const index len = theta_->length();
    if (len > (index{1} << std::numeric_limits<T>::digits)) {
      detail::raise<shape_error>(where, "theta_d_length " + std::to_string(len) +
                                            " is above what this scalar type holds exactly as an index");
    }
    check_count(where, "unilora_indices_A", idx_a_.size(), rank_, in_);
    check_count(where, "unilora_indices_B", idx_b_.size(), out_, rank_);
    check_table(where, "unilora_scales_A", sa_.rows(), sa_.cols(), rank_, in_);
    check_table(where, "unilora_scales_B", sb_.rows(), sb_.cols(), out_, rank_);
    idx_a_t_ = matrix<T>(rank_, in_);
    idx_b_t_ = matrix<T>(out_, rank_);
    for (const auto& [ids, mirror, name] : {std::tuple{&idx_a_, &idx_a_t_, "unilora_indices_A"},
                                            std::tuple{&idx_b_, &idx_b_t_, "unilora_indices_B"}}) {
      for (std::size_t k = 0; k < ids->size(); ++k) {
        const std::int64_t v = (*ids)[k];
        if (v < 0 || v >= len) {
          detail::raise<shape_error>(where, std::string(name) + " holds " + std::to_string(v) +
                                                ", not an index in [0, theta_d_length = " + std::to_string(len) + ")");
        }
        mirror->storage()[k] = static_cast<T>(v);
      }
    }
  }

  /// PEFT's adapters of a model whose adapted layers have `shapes` (in, out) in the order of the
  /// model's named_modules(): one theta_d (`theta`, or a fresh one from `opt`), the indices of all
  /// layers from one generate_index over sum r (in + out), each layer's A then B, and the scales
  /// from the counts over all of them. What PEFT rebuilds when save_indices is false.
  static std::vector<unilora> layers(const std::vector<std::pair<index, index>>& shapes, const unilora_options& opt,
                                     std::shared_ptr<unilora_theta<T>> theta) {
    constexpr const char* where = "unilora::layers";
    if (opt.rank < 1 || opt.theta_d_length < 1) {
      detail::raise<shape_error>(where, "rank " + std::to_string(opt.rank) + " and theta_d_length " +
                                            std::to_string(opt.theta_d_length) + " must be >= 1");
    }
    if (!theta) theta = make_unilora_theta<T>(opt.theta_d_length, opt.init_theta_d_bound, opt.init_weights, opt.seed);
    if (theta->length() != opt.theta_d_length) {
      detail::raise<shape_error>(where, "theta_d has length " + std::to_string(theta->length()) +
                                            " but theta_d_length is " + std::to_string(opt.theta_d_length));
    }
    std::int64_t total = 0;
    for (const auto& [in, out] : shapes) {
      if (in < 1 || out < 1) {
        detail::raise<shape_error>(where, "a layer is " + detail::shape_string(out, in) + ", expected sides >= 1");
      }
      total += opt.rank * (in + out);
    }
    const auto idx = unilora_generate_index(total, opt.theta_d_length, opt.proj_seed);
    std::vector<std::int64_t> counts(static_cast<std::size_t>(opt.theta_d_length), 0);
    for (const auto v : idx) ++counts[static_cast<std::size_t>(v)];
    // PEFT: float32 rsqrt of the counts (1 / sqrt in float), converted to the layer's dtype.
    auto scale = [&](std::int64_t v) {
      return static_cast<T>(1.0f / std::sqrt(static_cast<float>(counts[static_cast<std::size_t>(v)])));
    };
    std::vector<unilora> out;
    out.reserve(shapes.size());
    std::size_t pos = 0;
    for (const auto& [in, o] : shapes) {
      const index r = opt.rank;
      auto take = [&](index rows, index cols, std::vector<std::int64_t>& ids, matrix<T>& s) {
        const auto n = static_cast<std::size_t>(rows * cols);
        ids.assign(idx.begin() + static_cast<std::ptrdiff_t>(pos), idx.begin() + static_cast<std::ptrdiff_t>(pos + n));
        s = matrix<T>(rows, cols);
        for (std::size_t k = 0; k < n; ++k) s.storage()[k] = scale(ids[k]);
        pos += n;
      };
      std::vector<std::int64_t> ia, ib;
      matrix<T> sa, sb;
      take(r, in, ia, sa);
      take(o, r, ib, sb);
      out.emplace_back(theta, r, in, o, std::move(ia), std::move(ib), std::move(sa), std::move(sb));
      out.back().proj_seed_ = opt.proj_seed;
      out.back().init_bound_ = opt.init_theta_d_bound;
    }
    return out;
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  index rank() const noexcept { return rank_; }
  index theta_d_length() const noexcept { return theta_ ? theta_->length() : 0; }
  /// The proj_seed the indices were drawn with (PEFT's default 42 for an adapter from tensors).
  std::uint64_t proj_seed() const noexcept { return proj_seed_; }
  double init_theta_d_bound() const noexcept { return init_bound_; }
  void set_config_numbers(std::uint64_t proj_seed, double init_theta_d_bound) noexcept {
    proj_seed_ = proj_seed;
    init_bound_ = init_theta_d_bound;
  }

  /// The shared theta_d (the same object for every layer sharing it).
  const std::shared_ptr<unilora_theta<T>>& theta() const noexcept { return theta_; }
  /// The frozen indices, row-major (r, in) and (out, r), and scales.
  const std::vector<std::int64_t>& indices_A() const noexcept { return idx_a_; }
  const std::vector<std::int64_t>& indices_B() const noexcept { return idx_b_; }
  matrix_view<const T> scales_A() const noexcept { return sa_.view(); }
  matrix_view<const T> scales_B() const noexcept { return sb_.view(); }

  /// A (r, in) and B (out, r) as theta_d gives them now.
  std::pair<matrix<T>, matrix<T>> lora_matrices() const {
    check_ready("unilora::lora_matrices");
    cache_type c;
    assemble(c);
    return {std::move(c.a), std::move(c.b)};
  }

  // forward, add_term, backward, backward_term: core/additive_adapter.hpp over the hooks below.

  /// dW = B A (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("unilora::delta_weight", w);
    detail::expect_shape("unilora::delta_weight", "dw", dw, out_, in_);
    cache_type c;
    assemble(c);
    kernels::gemm_nn<T, T>(1.0, c.b.view(), c.a.view(), 0.0, dw);
  }
  /// Uni-LoRA does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// unilora_theta_d (shared, trainable), unilora_indices_A / _B (integer) and unilora_scales_A /
  /// _B (frozen): PEFT's names and shapes (the last four are what save_indices writes).
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    if (!theta_) return p;
    const auto r = static_cast<std::int64_t>(rank_), in = static_cast<std::int64_t>(in_),
               out = static_cast<std::int64_t>(out_);
    parameter<T> t{"unilora_theta_d", theta_->value.view(), theta_->grad.view(),
                   {static_cast<std::int64_t>(theta_->length())}};
    t.shared = true;
    p.push_back(std::move(t));
    p.push_back({"unilora_indices_A", idx_a_t_.view(), {}, {r, in}, false, false, true});
    p.push_back({"unilora_indices_B", idx_b_t_.view(), {}, {out, r}, false, false, true});
    p.push_back({"unilora_scales_A", sa_.view(), {}, {r, in}, false});
    p.push_back({"unilora_scales_B", sb_.view(), {}, {out, r}, false});
    return p;
  }

  /// Zeroes the shared theta_d's gradient (seen by every layer sharing it).
  void zero_grad() {
    if (theta_) theta_->zero_grad();
  }

  /// Throws peft::error for a default-constructed adapter (no theta_d).
  void check_ready(const char* where) const {
    if (!theta_) detail::raise<error>(where, "the adapter is default-constructed (no theta_d)");
  }

 private:
  static void check_count(const char* where, const char* name, std::size_t n, index er, index ec) {
    if (n != static_cast<std::size_t>(er * ec)) {
      detail::raise<shape_error>(where, std::string(name) + " holds " + std::to_string(n) + " indices, expected " +
                                            detail::shape_string(er, ec));
    }
  }
  static void check_table(const char* where, const char* name, index rows, index cols, index er, index ec) {
    if (rows != er || cols != ec) {
      detail::raise<shape_error>(where, std::string(name) + " is " + detail::shape_string(rows, cols) + ", expected " +
                                            detail::shape_string(er, ec));
    }
  }

  void assemble(cache_type& c) const {
    low_rank::detail::resize(c.a, rank_, in_);
    low_rank::detail::resize(c.b, out_, rank_);
    const T* th = theta_->value.row(0);
    for (std::size_t k = 0; k < idx_a_.size(); ++k) {
      c.a.storage()[k] = th[idx_a_[k]] * sa_.storage()[k];
    }
    for (std::size_t k = 0; k < idx_b_.size(); ++k) {
      c.b.storage()[k] = th[idx_b_[k]] * sb_.storage()[k];
    }
    c.assembled = true;
  }
  low_rank_term<T> term(const cache_type& c) const { return {c.a.view(), c.b.view(), nullptr, nullptr, nullptr, T{1}}; }

  // ---- additive_adapter hooks ------------------------------------------------------------------
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& c) const {
    assemble(c);
    low_rank::add(term(c), x, y, c.lr);
  }
  kernels::low_rank_epilogue<T> tile_epilogue(matrix_view<const T> x, cache_type& c) const {
    assemble(c);
    low_rank::project(term(c), x, c.lr);
    return low_rank::epilogue(term(c), c.lr);
  }
  /// dx += g B A; dA = (g B)^T x, dB = g^T (x A^T), gathered into theta_d: dtheta[idx] += dA s_A.
  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& c) {
    if (!c.assembled) assemble(c);
    matrix<T> da(rank_, in_), db(out_, rank_);
    low_rank::backward(term(c), low_rank_gradients<T>{da.view(), db.view()}, x, g, dx, c.lr);
    T* gt = theta_->grad.row(0);
    for (std::size_t k = 0; k < idx_a_.size(); ++k) gt[idx_a_[k]] += da.storage()[k] * sa_.storage()[k];
    for (std::size_t k = 0; k < idx_b_.size(); ++k) gt[idx_b_[k]] += db.storage()[k] * sb_.storage()[k];
  }

  std::shared_ptr<unilora_theta<T>> theta_;  // (1, theta_d_length), shared
  index in_ = 0;
  index out_ = 0;
  index rank_ = 0;
  std::vector<std::int64_t> idx_a_;  // (r, in) row-major
  std::vector<std::int64_t> idx_b_;  // (out, r)
  matrix<T> sa_;                     // (r, in)
  matrix<T> sb_;                     // (out, r)
  matrix<T> idx_a_t_;                // the indices as T, for parameters()
  matrix<T> idx_b_t_;
  std::uint64_t proj_seed_ = 42;
  double init_bound_ = 0.02;
};

/// unilora<T>::layers: PEFT's adapters of a model whose adapted layers have `shapes` (in, out),
/// in the order of its named_modules(), over `theta` (or a fresh theta_d from `opt`).
template <compute_scalar T>
std::vector<unilora<T>> make_unilora_layers(const std::vector<std::pair<index, index>>& shapes,
                                            const unilora_options& opt,
                                            std::shared_ptr<unilora_theta<T>> theta = nullptr) {
  return unilora<T>::layers(shapes, opt, std::move(theta));
}

}  // namespace peft
