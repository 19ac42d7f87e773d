// peft/adapters/loha.hpp — LoHa (low-rank Hadamard product, FedPara) as HuggingFace PEFT 0.21 does it.
//
//   y = x W0^T + b0 + x dW^T,   dW = s (W1a W1b) * (W2a W2b)     (* elementwise), s = alpha / r
//   W1a, W2a (out, r) = hada_w1_a, hada_w2_a;  W1b, W2b (r, in) = hada_w1_b, hada_w2_b
//
//   peft::loha<float> a(in, out, {.rank = 8, .alpha = 16});   // PEFT's init: hada_w2_b = 0
//
// dW has rank up to r^2, so it is formed (out, in) in forward and backward, as PEFT does:
// that costs 2 r out in multiply-adds per call besides the product with x.
// Gradients (g = dL/dy): M = s g^T x (out, in), P = W1a W1b, Q = W2a W2b;
//   dW1a += (M * Q) W1b^T, dW1b += W1a^T (M * Q), dW2a += (M * P) W2b^T, dW2b += W2a^T (M * P);
//   dx = g W0 + g dW.
// Checkpoint names: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (no ".weight"); config fields
// r, alpha, rank_pattern, alpha_pattern. hada_t1 / hada_t2 (the effective-conv2d form of a
// convolution) are rejected with unsupported_error.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "peft/base/dense.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/io/adapter_config.hpp"
#include "peft/io/checkpoint_tensors.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// PEFT's `init_weights`: true (hada_w2_b = 0, the others kaiming-uniform: a no-op), false (all
/// four kaiming-uniform).
enum class loha_init : std::uint8_t { standard, random };

struct loha_options {
  index rank = 8;
  double alpha = 8.0;
  loha_init init = loha_init::standard;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class loha {
 public:
  using scalar = T;
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

  /// y = x W0^T + b0 + x dW^T.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& /*cache*/) const {
    check_io("loha::forward", w, x, y);
    w.matmul(x, y);
    const matrix<T> d = delta();
    kernels::gemm_nt<T, T>(1.0, x, d.view(), 1.0, y);
  }

  /// y += x dW^T; h is not needed.
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<T> y,
                cache_type& /*cache*/) const {
    check_io("loha::add_term", w, x, y);
    const matrix<T> d = delta();
    kernels::gemm_nt<T, T>(1.0, x, d.view(), 1.0, y);
  }

  /// Accumulates the four factor gradients; writes dx = g W0 + g dW.
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                cache_type& /*cache*/) {
    check_grad("loha::backward", w, x, g, dx);
    w.matmul_t(g, dx, false);
    hadamard_backward(x, g, dx);
  }

  /// Accumulates the four factor gradients and dx += g dW; the term does not depend on h.
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<const T> g,
                     matrix_view<T> /*dh*/, matrix_view<T> dx, cache_type& /*cache*/) {
    check_grad("loha::backward_term", w, x, g, dx);
    hadamard_backward(x, g, dx);
  }

  /// dW = s (W1a W1b) * (W2a W2b) (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("loha::delta_weight", w);
    detail::expect_shape("loha::delta_weight", "dw", dw, out_features(), in_features());
    const matrix<T> d = delta();
    for (index i = 0; i < d.rows(); ++i) std::copy(d.row(i), d.row(i) + d.cols(), dw.row(i));
  }

  /// LoHa does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  // ---- PEFT checkpoints ----------------------------------------------------------------------

  static bool handles(const io::adapter_config& c) { return c.peft_type == "LOHA"; }
  static std::vector<std::string_view> checkpoint_parameters() {
    return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"};
  }
  static std::vector<std::string_view> shared_parameters() { return {}; }

  /// LoHa's alpha for a module: alpha_pattern first, then "alpha" (PEFT's default 8).
  static double alpha_for(const io::adapter_config& c, const std::string& module) {
    for (const auto& [k, v] : c.alpha_pattern) {
      if (io::adapter_config::pattern_matches(k, module)) return v;
    }
    const auto it = c.raw.find("alpha");
    if (it == c.raw.end() || it->is_null()) return 8.0;
    if (!it->is_number()) detail::raise<format_error>("loha::from_checkpoint", "adapter_config.json: 'alpha' must be a number");
    return it->template get<double>();
  }

  /// The adapter of one module: rank from the tensors, checked against r / rank_pattern;
  /// s = alpha / r with alpha from alpha / alpha_pattern.
  static loha from_checkpoint(const io::adapter_config& c, const io::checkpoint_tensors<T>& m,
                              const io::checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "loha::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    if (m.contains("hada_t1") || m.contains("hada_t2")) {
      detail::raise<unsupported_error>(where, mod + " has hada_t1/hada_t2, LoHa's effective-conv2d form of a "
                                                    "convolution: peft-cpp adapts linear layers only");
    }
    for (const auto& [name, t] : m.all()) {
      if (t.shape.size() != 2) {
        detail::raise<unsupported_error>(where, mod + ": '" + name + "' is " + io::detail::shape_text(t.shape) +
                                                    ", not a matrix: peft-cpp adapts linear layers only");
      }
    }
    const auto& s1a = m.shape("hada_w1_a", 2);
    const auto& s1b = m.shape("hada_w1_b", 2);
    const auto& s2a = m.shape("hada_w2_a", 2);
    const auto& s2b = m.shape("hada_w2_b", 2);
    const bool ok = s1a[1] >= 1 && s1a[0] >= 1 && s1b[1] >= 1 && s1b[0] == s1a[1] && s2a == s1a && s2b == s1b;
    if (!ok) {
      detail::raise<format_error>(where, mod + ": hada_w1_a " + io::detail::shape_text(s1a) + ", hada_w1_b " +
                                             io::detail::shape_text(s1b) + ", hada_w2_a " + io::detail::shape_text(s2a) +
                                             ", hada_w2_b " + io::detail::shape_text(s2b) +
                                             " are not (out, r), (r, in), (out, r), (r, in)");
    }
    const auto rank = static_cast<index>(s1a[1]);
    if (rank != c.rank_for(m.module())) {
      detail::raise<format_error>(where, mod + " has rank " + std::to_string(rank) + " but adapter_config.json gives " +
                                             std::to_string(c.rank_for(m.module())));
    }
    return loha(m.copy("hada_w1_a"), m.copy("hada_w1_b"), m.copy("hada_w2_a"), m.copy("hada_w2_b"),
                alpha_for(c, m.module()));
  }

  /// Makes `c` describe this module: peft_type LOHA; "alpha" when `c` has none; exact
  /// rank_pattern / alpha_pattern entries where r / alpha do not give this module's.
  void describe_in(io::adapter_config& c, const std::string& module) const {
    if (!c.raw.is_object()) c.raw = io::ordered_json::object();
    if (c.peft_type != "LOHA") c.raw.erase("alpha");
    c.peft_type = "LOHA";
    if (!c.raw.contains("alpha") || c.raw["alpha"].is_null()) {
      c.raw["alpha"] = alpha_ == std::floor(alpha_) && std::abs(alpha_) < 1e15 ? io::ordered_json(static_cast<long long>(alpha_))
                                                                              : io::ordered_json(alpha_);
    }
    if (c.rank_for(module) != rank()) c.rank_pattern.insert(c.rank_pattern.begin(), {module, rank()});
    const double tol = 8.0 * std::numeric_limits<double>::epsilon() * std::max(1.0, std::abs(alpha_));
    if (std::abs(alpha_for(c, module) - alpha_) > tol) c.alpha_pattern.insert(c.alpha_pattern.begin(), {module, alpha_});
  }

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

  template <class Base>
  void check_base(const char* where, const Base& w) const {
    detail::check_adapter_base(where, *this, w);
  }
  template <class Base>
  void check_io(const char* where, const Base& w, matrix_view<const T> x, matrix_view<T> y) const {
    detail::check_adapter_io(where, *this, w, x, y);
  }
  template <class Base>
  void check_grad(const char* where, const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                  matrix_view<T> dx) const {
    detail::check_adapter_grad(where, *this, w, x, g, dx);
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

  void hadamard_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx) {
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

static_assert(mergeable_adapter_for<loha<float>, dense<float>>);
static_assert(mergeable_adapter_for<loha<double>, dense<bf16>>);

}  // namespace peft
