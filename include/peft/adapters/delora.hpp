// peft/adapters/delora.hpp — DeLoRA, decoupled low-rank adaptation (Bini et al., ICLR 2025), as
// HuggingFace PEFT 0.21 computes it.
//
//   y = x W0^T + b0 + ((x * w) A^T * c) B^T        A (r, in), B (out, r), lambda a scalar
//   c_i = (lambda / r) / (max(||A_i,:||, 1e-4) max(||B_:,i||, 1e-4))
//   w (in) = the column norms of W0 when the adapter was created (PEFT's delora_w_norm buffer,
//   saved with the adapter and frozen)
//
//   peft::delora<float> a(layer.base(), {.rank = 8, .lambda = 15});   // PEFT's init: B = 0
//   layer.add_adapter("default", std::move(a));
//
// The term is a low-rank term (adapters/detail/low_rank_core.hpp) over A diag(w) with the gate c;
// each pass forms A diag(w) and c in its cache (O(r (in + out))), and backward carries the gate's
// gradient on to lambda and the norms of A and B. Checkpoints: io/peft/delora.hpp. Details:
// docs/methods/delora.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/detail/low_rank_core.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"

namespace peft {

template <compute_scalar T>
class delora;

/// PEFT's DeloraConfig for one layer. The adapter needs the base (w = its column norms):
/// build it with delora<T>(layer.base(), options) and add that.
struct delora_options {
  index rank = 8;
  double lambda = 15.0;       // delora_lambda's initial value (PEFT's default 15)
  bool init_weights = true;   // true: B = 0 (a no-op); false: B kaiming-uniform too
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class delora : public additive_adapter<delora<T>, T> {
  friend class additive_adapter<delora<T>, T>;

 public:
  static constexpr std::string_view method = "delora";
  /// PEFT's floor on the norms of A's rows and B's columns.
  static constexpr double norm_floor = 1e-4;

  /// What the passes derive from the parameters, and backward's scratch.
  struct cache_type {
    low_rank_cache<T> low_rank;
    matrix<T> a_scaled;        // A diag(w) (r, in)
    std::vector<T> gate;       // c (r)
    std::vector<double> norm_a, norm_b;  // ||A_i,:||, ||B_:,i|| before the floor (r)
    matrix<T> grad_a_scaled;   // dL/d(A diag(w)) (r, in)
    std::vector<T> grad_gate;  // dL/dc (r)
  };

  delora() = default;

  /// A fresh adapter for the base layer w with PEFT's initialisation: A kaiming-uniform
  /// (U(+-1/sqrt(in))), B zeros (or kaiming-uniform U(+-1/sqrt(r)) with init_weights false),
  /// lambda = opt.lambda, w = the column norms of W0 (read a row at a time, in double).
  template <base_weight Base>
  delora(const Base& w, const delora_options& opt)
      : a_(checked_rank(opt.rank, "delora::delora"), w.in_features()), b_(w.out_features(), opt.rank),
        lambda_(1, 1), w_norm_(1, w.in_features()) {
    if (w.in_features() < 1 || w.out_features() < 1) {
      detail::raise<shape_error>("delora::delora", "the base is " + detail::shape_string(w.out_features(), w.in_features()));
    }
    rng gen(opt.seed);
    const double bound_a = 1.0 / std::sqrt(static_cast<double>(w.in_features()));
    for (auto& v : a_.storage()) v = static_cast<T>(gen.uniform(-bound_a, bound_a));
    if (!opt.init_weights) {
      const double bound_b = 1.0 / std::sqrt(static_cast<double>(opt.rank));
      for (auto& v : b_.storage()) v = static_cast<T>(gen.uniform(-bound_b, bound_b));
    }
    lambda_(0, 0) = static_cast<T>(opt.lambda);
    std::vector<double> row(static_cast<std::size_t>(w.in_features())), sq(row.size(), 0.0);
    for (index i = 0; i < w.out_features(); ++i) {
      w.dequantize_row(i, row.data());
      for (std::size_t j = 0; j < row.size(); ++j) sq[j] += row[j] * row[j];
    }
    for (index j = 0; j < w.in_features(); ++j) w_norm_(0, j) = static_cast<T>(std::sqrt(sq[static_cast<std::size_t>(j)]));
    finish("delora::delora");
  }

  /// An adapter from existing tensors: A (r, in), B (out, r), lambda, w (in values).
  delora(matrix<T> a, matrix<T> b, T lambda, std::vector<T> w_norm)
      : a_(std::move(a)), b_(std::move(b)), lambda_(1, 1) {
    const auto n = static_cast<index>(w_norm.size());
    w_norm_ = matrix<T>(1, n, std::move(w_norm));
    lambda_(0, 0) = lambda;
    finish("delora::delora");
  }

  index in_features() const noexcept { return a_.cols(); }
  index out_features() const noexcept { return b_.rows(); }
  index rank() const noexcept { return a_.rows(); }
  matrix_view<const T> A() const noexcept { return a_.view(); }
  matrix_view<const T> B() const noexcept { return b_.view(); }
  T lambda() const noexcept { return lambda_(0, 0); }
  /// w (1, in): the base's column norms the adapter was made with.
  matrix_view<const T> w_norm() const noexcept { return w_norm_.view(); }

  // forward, add_term, backward, backward_term: core/additive_adapter.hpp over the hooks below.

  /// dW = B diag(c) A diag(w) (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("delora::delta_weight", w);
    detail::expect_shape("delora::delta_weight", "dw", dw, out_features(), in_features());
    cache_type cache;
    low_rank::delta(derive(cache), dw);
  }

  /// DeLoRA does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// delora_A (r, in), delora_B (out, r), delora_lambda (1), and the frozen delora_w_norm (in).
  std::vector<parameter<T>> parameters() {
    return {{"delora_A", a_.view(), grad_a_.view(), detail::shape_of(a_.view(), false)},
            {"delora_B", b_.view(), grad_b_.view(), detail::shape_of(b_.view(), false)},
            {"delora_lambda", lambda_.view(), grad_lambda_.view(), {1}},
            {"delora_w_norm", w_norm_.view(), {}, detail::shape_of(w_norm_.view(), true), false}};
  }

  void zero_grad() {
    grad_a_.fill(T{0});
    grad_b_.fill(T{0});
    grad_lambda_.fill(T{0});
  }

 private:
  static index checked_rank(index r, const char* where) {
    if (r < 1) detail::raise<shape_error>(where, "rank must be >= 1, got " + std::to_string(r));
    return r;
  }
  void finish(const char* where) {
    if (a_.empty() || b_.empty() || b_.cols() != a_.rows()) {
      detail::raise<shape_error>(where, "delora_A " + detail::shape_string(a_.rows(), a_.cols()) + " and delora_B " +
                                            detail::shape_string(b_.rows(), b_.cols()) + " do not form a non-empty product");
    }
    if (w_norm_.cols() != a_.cols()) {
      detail::raise<shape_error>(where, "delora_w_norm has " + std::to_string(w_norm_.cols()) + " values, delora_A " +
                                            std::to_string(a_.cols()) + " columns");
    }
    grad_a_ = matrix<T>(a_.rows(), a_.cols());
    grad_b_ = matrix<T>(b_.rows(), b_.cols());
    grad_lambda_ = matrix<T>(1, 1);
  }

  /// Fills the cache's A diag(w), c and norms from the current parameters; the term over them.
  low_rank_term<T> derive(cache_type& k) const {
    const index r = rank(), in = in_features(), out = out_features();
    if (k.a_scaled.rows() != r || k.a_scaled.cols() != in) k.a_scaled = matrix<T>(r, in);
    k.gate.resize(static_cast<std::size_t>(r));
    k.norm_a.assign(static_cast<std::size_t>(r), 0.0);
    k.norm_b.assign(static_cast<std::size_t>(r), 0.0);
    const T* w = w_norm_.row(0);
    for (index i = 0; i < r; ++i) {
      const T* a = a_.row(i);
      T* s = k.a_scaled.row(i);
      double sq = 0;
      for (index j = 0; j < in; ++j) {
        sq += static_cast<double>(a[j]) * static_cast<double>(a[j]);
        s[j] = a[j] * w[j];
      }
      k.norm_a[static_cast<std::size_t>(i)] = std::sqrt(sq);
    }
    for (index o = 0; o < out; ++o) {
      const T* b = b_.row(o);
      for (index i = 0; i < r; ++i) k.norm_b[static_cast<std::size_t>(i)] += static_cast<double>(b[i]) * static_cast<double>(b[i]);
    }
    const double per_rank = static_cast<double>(lambda()) / static_cast<double>(r);
    for (std::size_t i = 0; i < k.gate.size(); ++i) {
      k.norm_b[i] = std::sqrt(k.norm_b[i]);
      k.gate[i] = static_cast<T>(per_rank / (std::max(k.norm_a[i], norm_floor) * std::max(k.norm_b[i], norm_floor)));
    }
    return {k.a_scaled.view(), b_.view(), k.gate.data(), nullptr, nullptr, T{1}};
  }

  // ---- additive_adapter hooks ------------------------------------------------------------------
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    low_rank::add(derive(cache), x, y, cache.low_rank);
  }
  kernels::low_rank_epilogue<T> tile_epilogue(matrix_view<const T> x, cache_type& cache) const {
    const low_rank_term<T> term = derive(cache);
    low_rank::project(term, x, cache.low_rank);
    return low_rank::epilogue(term, cache.low_rank);
  }

  /// The low-rank core gives dL/d(A diag(w)), dL/dB (direct part) and dL/dc; then
  ///   dA += dL/d(A diag(w)) diag(w)
  ///   dlambda += sum_i dc_i / (r a_i b_i)
  ///   dA_i,: -= dc_i c_i A_i,: / a_i^2,  dB_:,i -= dc_i c_i B_:,i / b_i^2   (norms above the floor)
  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    const low_rank_term<T> term = derive(cache);
    const index r = rank(), in = in_features(), out = out_features();
    if (cache.grad_a_scaled.rows() != r || cache.grad_a_scaled.cols() != in) {
      cache.grad_a_scaled = matrix<T>(r, in);
    } else {
      cache.grad_a_scaled.fill(T{0});
    }
    cache.grad_gate.assign(static_cast<std::size_t>(r), T{0});
    low_rank::backward(term, {cache.grad_a_scaled.view(), grad_b_.view(), cache.grad_gate.data(), nullptr, nullptr}, x,
                       g, dx, cache.low_rank);

    const T* w = w_norm_.row(0);
    const double rr = static_cast<double>(r);
    double dlambda = 0;
    std::vector<T> coef_b(static_cast<std::size_t>(r), T{0});
    for (index i = 0; i < r; ++i) {
      const auto iu = static_cast<std::size_t>(i);
      const double dc = static_cast<double>(cache.grad_gate[iu]);
      const double na = cache.norm_a[iu], nb = cache.norm_b[iu];
      const double fa = std::max(na, norm_floor), fb = std::max(nb, norm_floor);
      dlambda += dc / (rr * fa * fb);
      const double dc_c = dc * static_cast<double>(cache.gate[iu]);
      const T ca = na >= norm_floor ? static_cast<T>(-dc_c / (na * na)) : T{0};
      coef_b[iu] = nb >= norm_floor ? static_cast<T>(-dc_c / (nb * nb)) : T{0};
      const T* a = a_.row(i);
      const T* ga = cache.grad_a_scaled.row(i);
      T* da = grad_a_.row(i);
      for (index j = 0; j < in; ++j) da[j] += ga[j] * w[j] + ca * a[j];
    }
    for (index o = 0; o < out; ++o) {
      const T* b = b_.row(o);
      T* db = grad_b_.row(o);
      for (index i = 0; i < r; ++i) db[i] += coef_b[static_cast<std::size_t>(i)] * b[i];
    }
    grad_lambda_(0, 0) += static_cast<T>(dlambda);
  }

  matrix<T> a_;       // (r, in)
  matrix<T> b_;       // (out, r)
  matrix<T> lambda_;  // (1, 1)
  matrix<T> w_norm_;  // (1, in), frozen
  matrix<T> grad_a_;
  matrix<T> grad_b_;
  matrix<T> grad_lambda_;
};

}  // namespace peft
