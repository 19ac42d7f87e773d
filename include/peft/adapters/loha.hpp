// peft/adapters/loha.hpp — LoHa, low-rank Hadamard product (FedPara), as HuggingFace PEFT 0.21
// computes it.
//
//   y = x W0^T + b0 + x dW^T,   dW = s (W1a W1b) * (W2a W2b)   (* elementwise), s = alpha / r
//   W1a, W2a (out, r) = hada_w1_a, hada_w2_a;  W1b, W2b (r, in) = hada_w1_b, hada_w2_b
//
//   peft::loha<float> a(in, out, {.rank = 8, .alpha = 16});   // PEFT's init: hada_w2_b = 0
//
// The passes come from additive_adapter; dW (rank up to r^2) is formed in forward and backward,
// as PEFT does. Checkpoints: io/peft/loha.hpp. Details: docs/methods/loha.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// PEFT's `init_weights`: true (hada_w2_b = 0, the others kaiming-uniform: a no-op), false (all
/// four kaiming-uniform).
enum class loha_init : std::uint8_t { standard, random };

template <compute_scalar T>
class loha;

struct loha_options {
  template <compute_scalar T>
  using adapter = loha<T>;  // the adapter these options make

  index rank = 8;
  double alpha = 8.0;
  loha_init init = loha_init::standard;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class loha : public additive_adapter<loha<T>, T> {
  friend class additive_adapter<loha<T>, T>;

 public:
  static constexpr std::string_view method = "loha";

  /// Nothing: backward forms P and Q again.
  struct cache_type {};

  loha() = default;

  /// A fresh adapter for an (out, in) linear layer.
  loha(index in_features, index out_features, const loha_options& opt)
      : w1a_(checked_dim(out_features, "out_features"), checked_rank(opt.rank)),
        w1b_(opt.rank, checked_dim(in_features, "in_features")),
        w2a_(out_features, opt.rank),
        w2b_(opt.rank, in_features),
        alpha_(opt.alpha) {
    rng gen(opt.seed);
    kaiming(w1a_, gen);
    kaiming(w1b_, gen);
    kaiming(w2a_, gen);
    if (opt.init == loha_init::random) kaiming(w2b_, gen);
    finish();
  }

  /// An adapter from existing factors: W1a, W2a (out, r), W1b, W2b (r, in); s = alpha / r.
  loha(matrix<T> w1a, matrix<T> w1b, matrix<T> w2a, matrix<T> w2b, double alpha)
      : w1a_(std::move(w1a)), w1b_(std::move(w1b)), w2a_(std::move(w2a)), w2b_(std::move(w2b)), alpha_(alpha) {
    const index r = w1a_.cols(), out = w1a_.rows(), in = w1b_.cols();
    const bool ok = r >= 1 && out >= 1 && in >= 1 && w1b_.rows() == r && w2a_.rows() == out && w2a_.cols() == r &&
                    w2b_.rows() == r && w2b_.cols() == in;
    if (!ok) {
      detail::raise<shape_error>("loha::loha", "hada_w1_a " + detail::shape_string(w1a_.rows(), w1a_.cols()) +
                                                   ", hada_w1_b " + detail::shape_string(w1b_.rows(), w1b_.cols()) +
                                                   ", hada_w2_a " + detail::shape_string(w2a_.rows(), w2a_.cols()) +
                                                   ", hada_w2_b " + detail::shape_string(w2b_.rows(), w2b_.cols()) +
                                                   " are not (out, r), (r, in), (out, r), (r, in) with r, in, out >= 1");
    }
    finish();
  }

  index in_features() const noexcept { return w1b_.cols(); }
  index out_features() const noexcept { return w1a_.rows(); }
  index rank() const noexcept { return w1a_.cols(); }
  double alpha() const noexcept { return alpha_; }
  T scale() const noexcept { return scale_; }

  matrix_view<const T> W1a() const noexcept { return w1a_.view(); }
  matrix_view<const T> W1b() const noexcept { return w1b_.view(); }
  matrix_view<const T> W2a() const noexcept { return w2a_.view(); }
  matrix_view<const T> W2b() const noexcept { return w2b_.view(); }
  matrix_view<const T> grad_W1a() const noexcept { return g1a_.view(); }
  matrix_view<const T> grad_W1b() const noexcept { return g1b_.view(); }
  matrix_view<const T> grad_W2a() const noexcept { return g2a_.view(); }
  matrix_view<const T> grad_W2b() const noexcept { return g2b_.view(); }

  // forward, add_term, backward, backward_term: core/additive_adapter.hpp over the hooks below.

  /// dW = s (W1a W1b) * (W2a W2b) (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("loha::delta_weight", w);
    detail::expect_shape("loha::delta_weight", "dw", dw, out_features(), in_features());
    const matrix<T> d = delta();
    for (index i = 0; i < d.rows(); ++i) std::copy(d.row(i), d.row(i) + d.cols(), dw.row(i));
  }

  /// LoHa does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b: PEFT's names (no ".weight").
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"hada_w1_a", w1a_.view(), g1a_.view(), detail::shape_of(w1a_.view(), false)});
    p.push_back({"hada_w1_b", w1b_.view(), g1b_.view(), detail::shape_of(w1b_.view(), false)});
    p.push_back({"hada_w2_a", w2a_.view(), g2a_.view(), detail::shape_of(w2a_.view(), false)});
    p.push_back({"hada_w2_b", w2b_.view(), g2b_.view(), detail::shape_of(w2b_.view(), false)});
    return p;
  }

  void zero_grad() {
    g1a_.fill(T{0});
    g1b_.fill(T{0});
    g2a_.fill(T{0});
    g2b_.fill(T{0});
  }

 private:
  static index checked_rank(index r) {
    if (r < 1) detail::raise<shape_error>("loha::loha", "rank must be >= 1, got " + std::to_string(r));
    return r;
  }
  static index checked_dim(index d, const char* what) {
    if (d < 1) detail::raise<shape_error>("loha::loha", std::string(what) + " must be >= 1, got " + std::to_string(d));
    return d;
  }
  /// kaiming_uniform_(a = sqrt(5)) on a (rows, cols) tensor: U(-1/sqrt(cols), 1/sqrt(cols)).
  static void kaiming(matrix<T>& m, rng& gen) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(m.cols()));
    for (auto& v : m.storage()) v = static_cast<T>(gen.uniform(-bound, bound));
  }
  void finish() {
    scale_ = static_cast<T>(alpha_ / static_cast<double>(rank()));
    g1a_ = matrix<T>(w1a_.rows(), w1a_.cols());
    g1b_ = matrix<T>(w1b_.rows(), w1b_.cols());
    g2a_ = matrix<T>(w2a_.rows(), w2a_.cols());
    g2b_ = matrix<T>(w2b_.rows(), w2b_.cols());
  }

  /// P = W1a W1b and Q = W2a W2b (out, in).
  void products(matrix<T>& p, matrix<T>& q) const {
    p = matrix<T>(out_features(), in_features());
    q = matrix<T>(out_features(), in_features());
    kernels::gemm_nn<T, T>(1.0, w1a_.view(), w1b_.view(), 0.0, p.view());
    kernels::gemm_nn<T, T>(1.0, w2a_.view(), w2b_.view(), 0.0, q.view());
  }
  /// dW = s P * Q.
  matrix<T> delta() const {
    matrix<T> p, q;
    products(p, q);
    auto& pv = p.storage();
    const auto& qv = q.storage();
    for (std::size_t k = 0; k < pv.size(); ++k) pv[k] = scale_ * pv[k] * qv[k];
    return p;
  }

  // ---- additive_adapter hooks: y += x dW^T; gradients and dx += g dW ---------------------------
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& /*cache*/) const {
    const matrix<T> d = delta();
    kernels::gemm_nt<T, T>(1.0, x, d.view(), 1.0, y);
  }
  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& /*cache*/) {
    matrix<T> p, q;
    products(p, q);
    const index out = out_features(), in = in_features();
    matrix<T> d(out, in);                                                // dW = s P * Q
    {
      auto& dv = d.storage();
      const auto& pv = p.storage();
      const auto& qv = q.storage();
      for (std::size_t k = 0; k < dv.size(); ++k) dv[k] = scale_ * pv[k] * qv[k];
    }
    kernels::gemm_nn<T, T>(1.0, g, d.view(), 1.0, dx);                  // dx += g dW
    kernels::gemm_tn<T>(static_cast<double>(scale_), g, x, 0.0, d.view());  // M = s g^T x (reuses d)
    // M * Q and M * P, in place of Q and P.
    auto& mv = d.storage();
    auto& pv = p.storage();
    auto& qv = q.storage();
    for (std::size_t k = 0; k < mv.size(); ++k) {
      qv[k] *= mv[k];
      pv[k] *= mv[k];
    }
    kernels::gemm_nt<T, T>(1.0, q.view(), w1b_.view(), 1.0, g1a_.view());  // dW1a += (M*Q) W1b^T
    kernels::gemm_tn<T>(1.0, w1a_.view(), q.view(), 1.0, g1b_.view());     // dW1b += W1a^T (M*Q)
    kernels::gemm_nt<T, T>(1.0, p.view(), w2b_.view(), 1.0, g2a_.view());  // dW2a += (M*P) W2b^T
    kernels::gemm_tn<T>(1.0, w2a_.view(), p.view(), 1.0, g2b_.view());     // dW2b += W2a^T (M*P)
  }

  matrix<T> w1a_;  // (out, r)
  matrix<T> w1b_;  // (r, in)
  matrix<T> w2a_;  // (out, r)
  matrix<T> w2b_;  // (r, in)
  double alpha_ = 1.0;
  T scale_ = T{1};
  matrix<T> g1a_;  // gradients, same shapes
  matrix<T> g1b_;
  matrix<T> g2a_;
  matrix<T> g2b_;
};


}  // namespace peft
