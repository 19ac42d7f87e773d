// peft/adapters/compacter.hpp — Compacter (Mahabadi, Henderson, Ruder, NeurIPS 2021; code
// rabeehk/compacter): a bottleneck adapter whose two projections are LPHM layers.
//
//   serial (the paper):  y = h + up(gelu(down(h)))    h = x W0^T + b0, down: out -> k = out / R
//   parallel:            y = h + up(gelu(down(x)))    down: in -> k = in / R;  up: k -> out
//   PHM(z) = z H + b,  H = sum_{i<n} A_i kron (l_i r_i^T), never formed (detail/phm.hpp)
//
//   peft::compacter<float> a(in, out, {.n = 4, .reduction_factor = 32});   // a.rule() to share
//
// Writes its own passes (serial reads the base output). The rule A (n, n, n) is SHARED by every
// layer: update it once per step, zero all layers' gradients first, no concurrent backward.
// Not mergeable; no PEFT format (io/peft/compacter.hpp). Details: docs/methods/compacter.md.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/detail/phm.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"

namespace peft {

/// Where the bottleneck reads: the base output h (serial, the paper) or the layer input x.
enum class compacter_placement : std::uint8_t { serial, parallel };

template <compute_scalar T>
class compacter;

struct compacter_options {
  template <compute_scalar T>
  using adapter = compacter<T>;  // the adapter these options make

  index n = 4;                 // PHM order: number of Kronecker sums, the rule is (n, n, n)
  index reduction_factor = 32; // R: bottleneck k = d_model / R
  compacter_placement placement = compacter_placement::serial;
  double rule_init_std = 1e-4; // a rule the adapter creates itself ~ N(0, std^2)
  std::uint64_t seed = 0;      // fast weights (and an own rule)
};

/// One LPHM layer's own weights: left (n, in/n), right (n, out/n), bias (1, out).
template <compute_scalar T>
struct phm_factors {
  matrix<T> left;
  matrix<T> right;
  std::vector<T> bias;  // out values (empty: zero)
};

template <compute_scalar T>
class compacter {
 public:
  using scalar = T;
  static constexpr std::string_view method = "compacter";

  /// What backward needs from forward: the bottleneck pre-activation p = down(z) (batch, k),
  /// a = gelu(p) (batch, k), both PHM workspaces, and (fused serial forward) h (batch, out).
  struct cache_type {
    matrix<T> h;
    matrix<T> pre;
    matrix<T> act;
    matrix<T> dact;  // backward scratch (batch, k)
    matrix<T> dh;    // backward scratch (batch, out), fused serial
    detail::phm::workspace<T> down;
    detail::phm::workspace<T> up;
  };

  compacter() = default;

  /// A fresh adapter with its own rule (rule_init_std, seed); share it with rule().
  compacter(index in_features, index out_features, const compacter_options& opt)
      : compacter(in_features, out_features,
                  make_phm_rule<T>(checked_n("compacter::compacter", opt.n), opt.rule_init_std, opt.seed ^ 0x5255'4c45ull),
                  opt) {}

  /// A fresh adapter reading the shared `rule` (opt.n must equal its order): glorot-uniform
  /// fast weights from opt.seed, zero biases. The rule is not re-initialised.
  compacter(index in_features, index out_features, std::shared_ptr<phm_rule<T>> rule, const compacter_options& opt)
      : in_(in_features), out_(out_features), placement_(opt.placement), rule_(std::move(rule)) {
    constexpr const char* where = "compacter::compacter";
    const index n = checked_n(where, opt.n);
    detail::phm::check_rule(where, rule_, n);
    if (opt.reduction_factor < 1) {
      detail::raise<shape_error>(where, "reduction_factor must be >= 1, got " + std::to_string(opt.reduction_factor));
    }
    check_dims(where, n);
    const index d = d_model();
    if (d % opt.reduction_factor != 0) {
      detail::raise<shape_error>(where, "d_model = " + std::to_string(d) + " is not divisible by reduction_factor " +
                                            std::to_string(opt.reduction_factor));
    }
    const index k = d / opt.reduction_factor;
    detail::phm::check_divisible(where, "bottleneck d_model / reduction_factor", k, n);
    rng gen(opt.seed);
    down_ = make_factors(n, d, k, gen);
    up_ = make_factors(n, k, out_, gen);
    allocate_grads();
  }

  /// An adapter from existing tensors: `down` maps d_model -> k (left (n, d_model/n), right
  /// (n, k/n), bias k values or empty), `up` maps k -> out (left (n, k/n), right (n, out/n),
  /// bias out values or empty); n is the rule's order.
  compacter(index in_features, index out_features, compacter_placement placement, std::shared_ptr<phm_rule<T>> rule,
            phm_factors<T> down, phm_factors<T> up)
      : in_(in_features), out_(out_features), placement_(placement), rule_(std::move(rule)) {
    constexpr const char* where = "compacter::compacter";
    if (!rule_) detail::raise<shape_error>(where, "the rule is null");
    const index n = rule_->n();
    detail::phm::check_rule(where, rule_, n);
    check_dims(where, n);
    const index k = down.right.cols() * n;
    detail::phm::check_divisible(where, "bottleneck (down.W_right columns * n)", k, n);
    down_ = to_layer(where, "down", n, d_model(), k, std::move(down));
    up_ = to_layer(where, "up", n, k, out_, std::move(up));
    allocate_grads();
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  /// The width the bottleneck reads and the layer writes: out (serial) or in (parallel).
  index d_model() const noexcept { return placement_ == compacter_placement::serial ? out_ : in_; }
  index bottleneck() const noexcept { return down_.bias.cols(); }
  index n() const noexcept { return rule_ ? rule_->n() : 0; }
  compacter_placement placement() const noexcept { return placement_; }
  /// The shared rule: pass it to other layers' constructors to share it.
  const std::shared_ptr<phm_rule<T>>& rule() const noexcept { return rule_; }

  matrix_view<T> down_left() noexcept { return down_.left.view(); }
  matrix_view<T> down_right() noexcept { return down_.right.view(); }
  matrix_view<T> down_bias() noexcept { return down_.bias.view(); }
  matrix_view<T> up_left() noexcept { return up_.left.view(); }
  matrix_view<T> up_right() noexcept { return up_.right.view(); }
  matrix_view<T> up_bias() noexcept { return up_.bias.view(); }
  matrix_view<const T> down_left() const noexcept { return down_.left.view(); }
  matrix_view<const T> down_right() const noexcept { return down_.right.view(); }
  matrix_view<const T> down_bias() const noexcept { return down_.bias.view(); }
  matrix_view<const T> up_left() const noexcept { return up_.left.view(); }
  matrix_view<const T> up_right() const noexcept { return up_.right.view(); }
  matrix_view<const T> up_bias() const noexcept { return up_.bias.view(); }
  matrix_view<const T> grad_down_left() const noexcept { return gdown_.left.view(); }
  matrix_view<const T> grad_down_right() const noexcept { return gdown_.right.view(); }
  matrix_view<const T> grad_down_bias() const noexcept { return gdown_.bias.view(); }
  matrix_view<const T> grad_up_left() const noexcept { return gup_.left.view(); }
  matrix_view<const T> grad_up_right() const noexcept { return gup_.right.view(); }
  matrix_view<const T> grad_up_bias() const noexcept { return gup_.bias.view(); }
  /// The shared rule's gradient (n, n n): the sum over every layer sharing the rule.
  matrix_view<const T> grad_rule() const noexcept {
    return rule_ ? matrix_view<const T>(rule_->grad.view()) : matrix_view<const T>{};
  }

  /// y = h + up(gelu(down(h))) (serial) or h + up(gelu(down(x))) (parallel), h = x W0^T + b0.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    check_io("compacter::forward", w, x, y);
    w.matmul(x, y);
    if (placement_ == compacter_placement::serial) {
      detail::phm::ensure(cache.h, x.rows(), out_);
      for (index r = 0; r < x.rows(); ++r) std::copy(y.row(r), y.row(r) + out_, cache.h.row(r));
      add_bottleneck(cache.h.view(), y, cache);
    } else {
      add_bottleneck(x, y, cache);
    }
  }

  /// y += up(gelu(down(h or x))), given the base output h (batch, out).
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<T> y,
                cache_type& cache) const {
    check_io("compacter::add_term", w, x, y);
    detail::expect_shape("compacter::add_term", "h", h, x.rows(), out_);
    add_bottleneck(input_of(x, h), y, cache);
  }

  /// Accumulates every parameter gradient (the rule's into the shared gradient); writes
  /// dx = (g + dh_bottleneck) W0 (serial) or g W0 + dx_bottleneck (parallel). Call after forward on
  /// the same x (a cache of another batch size is recomputed).
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                cache_type& cache) {
    check_grad("compacter::backward", w, x, g, dx);
    const bool serial = placement_ == compacter_placement::serial;
    if (!cached(cache, x.rows()) || (serial && (cache.h.rows() != x.rows() || cache.h.cols() != out_))) {
      matrix<T> y(x.rows(), out_);
      forward(w, x, y.view(), cache);
    }
    if (serial) {
      detail::phm::ensure(cache.dh, x.rows(), out_);
      for (index r = 0; r < x.rows(); ++r) std::copy(g.row(r), g.row(r) + out_, cache.dh.row(r));
      bottleneck_backward(cache.h.view(), g, cache.dh.view(), cache);
      w.matmul_t(matrix_view<const T>(cache.dh.view()), dx, false);
    } else {
      w.matmul_t(g, dx, false);
      bottleneck_backward(x, g, dx, cache);
    }
  }

  /// Accumulates every parameter gradient; serial: dh += (d term / dh)^T g (dx untouched),
  /// parallel: dx += (d term / dx)^T g (dh untouched).
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<const T> g,
                     matrix_view<T> dh, matrix_view<T> dx, cache_type& cache) {
    constexpr const char* where = "compacter::backward_term";
    check_grad(where, w, x, g, dx);
    detail::expect_shape(where, "h", h, x.rows(), out_);
    detail::expect_shape(where, "dh", dh, x.rows(), out_);
    if (!cached(cache, x.rows())) {
      matrix<T> y(x.rows(), out_);
      add_bottleneck(input_of(x, h), y.view(), cache);
    }
    bottleneck_backward(input_of(x, h), g, placement_ == compacter_placement::serial ? dh : dx, cache);
  }

  /// phm_rule (shared, once per model in an optimizer), then down.* and up.* (this layer).
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    if (!rule_) return p;  // a default-constructed adapter has no parameters
    const auto n = static_cast<std::int64_t>(this->n());
    parameter<T> r{"phm_rule", rule_->value.view(), rule_->grad.view(), {n, n, n}};
    r.shared = true;
    p.push_back(std::move(r));
    add_layer(p, "down.", down_, gdown_);
    add_layer(p, "up.", up_, gup_);
    return p;
  }

  /// Zeroes this layer's gradients AND the shared rule's (seen by every layer sharing it).
  void zero_grad() {
    if (rule_) rule_->zero_grad();
    for (auto* l : {&gdown_, &gup_}) {
      l->left.fill(T{0});
      l->right.fill(T{0});
      l->bias.fill(T{0});
    }
  }

 private:
  struct layer {
    matrix<T> left;   // (n, in/n)
    matrix<T> right;  // (n, out/n)
    matrix<T> bias;   // (1, out)
  };

  static index checked_n(const char* where, index n) {
    if (n < 1) detail::raise<shape_error>(where, "the PHM order n must be >= 1, got " + std::to_string(n));
    return n;
  }

  void check_dims(const char* where, index n) const {
    if (in_ < 1 || out_ < 1) {
      detail::raise<shape_error>(where, "the layer is " + detail::shape_string(out_, in_) + ", expected positive sizes");
    }
    detail::phm::check_divisible(where, "out_features", out_, n);
    if (placement_ == compacter_placement::parallel) detail::phm::check_divisible(where, "in_features", in_, n);
  }

  static layer make_factors(index n, index in, index out, rng& gen) {
    layer l{matrix<T>(n, in / n), matrix<T>(n, out / n), matrix<T>(1, out)};
    detail::phm::glorot_uniform_rows(l.left, gen);
    detail::phm::glorot_uniform_rows(l.right, gen);
    return l;
  }

  static layer to_layer(const char* where, const char* name, index n, index in, index out, phm_factors<T> f) {
    const std::string nm(name);
    detail::expect_shape(where, (nm + ".W_left").c_str(), f.left.view(), n, in / n);
    detail::expect_shape(where, (nm + ".W_right").c_str(), f.right.view(), n, out / n);
    if (!f.bias.empty() && static_cast<index>(f.bias.size()) != out) {
      detail::raise<shape_error>(where, nm + ".bias has " + std::to_string(f.bias.size()) + " values, expected " +
                                            std::to_string(out));
    }
    layer l{std::move(f.left), std::move(f.right), matrix<T>(1, out)};
    if (!f.bias.empty()) l.bias = matrix<T>(1, out, std::move(f.bias));
    return l;
  }

  void allocate_grads() {
    gdown_ = {matrix<T>(down_.left.rows(), down_.left.cols()), matrix<T>(down_.right.rows(), down_.right.cols()),
              matrix<T>(1, down_.bias.cols())};
    gup_ = {matrix<T>(up_.left.rows(), up_.left.cols()), matrix<T>(up_.right.rows(), up_.right.cols()),
            matrix<T>(1, up_.bias.cols())};
  }

  static void add_layer(std::vector<parameter<T>>& p, const std::string& prefix, layer& v, layer& g) {
    p.push_back({prefix + "W_left", v.left.view(), g.left.view(), detail::shape_of(v.left.view(), false)});
    p.push_back({prefix + "W_right", v.right.view(), g.right.view(), detail::shape_of(v.right.view(), false)});
    p.push_back({prefix + "bias", v.bias.view(), g.bias.view(), detail::shape_of(v.bias.view(), true)});
  }

  matrix_view<const T> input_of(matrix_view<const T> x, matrix_view<const T> h) const noexcept {
    return placement_ == compacter_placement::serial ? h : x;
  }

  bool cached(const cache_type& c, index batch) const noexcept {
    return c.pre.rows() == batch && c.pre.cols() == bottleneck() && c.act.rows() == batch &&
           c.down.m.rows() == batch * n() && c.up.m.rows() == batch * n();
  }

  template <class Base>
  void check_base(const char* where, const Base& w) const {
    detail::phm::check_rule(where, rule_, down_.left.rows());
    detail::check_adapter_base(where, *this, w);
  }
  template <class Base>
  void check_io(const char* where, const Base& w, matrix_view<const T> x, matrix_view<T> y) const {
    check_base(where, w);
    detail::expect_shape(where, "x", x, x.rows(), in_);
    detail::expect_shape(where, "y", y, x.rows(), out_);
  }
  template <class Base>
  void check_grad(const char* where, const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                  matrix_view<T> dx) const {
    check_base(where, w);
    detail::expect_shape(where, "x", x, x.rows(), in_);
    detail::expect_shape(where, "dy", g, x.rows(), out_);
    detail::expect_shape(where, "dx", dx, x.rows(), in_);
  }

  /// y += up(gelu(down(z))); z (batch, d_model).
  void add_bottleneck(matrix_view<const T> z, matrix_view<T> y, cache_type& cache) const {
    using namespace detail::phm;
    const index batch = z.rows();
    const index k = bottleneck();
    ensure(cache.pre, batch, k);
    ensure(cache.act, batch, k);
    const matrix_view<const T> rule = rule_->value.view();
    apply<T>(rule, rule_side::as_stored, down_.left.view(), down_.right.view(), z, cache.pre.view(), false,
             cache.down);                                                                      // (batch, k)
    add_row_bias<T>(cache.pre.view(), down_.bias.view());
    for (index r = 0; r < batch; ++r) {
      for (index j = 0; j < k; ++j) cache.act(r, j) = gelu_tanh(cache.pre(r, j));
    }
    apply<T>(rule, rule_side::as_stored, up_.left.view(), up_.right.view(), cache.act.view(), y, true,
             cache.up);                                                                        // (batch, out)
    add_row_bias<T>(y, up_.bias.view());
  }

  /// Parameter gradients += for g = dL/dy; dz += g (d term / dz), z the bottleneck input.
  void bottleneck_backward(matrix_view<const T> z, matrix_view<const T> g, matrix_view<T> dz, cache_type& cache) {
    using namespace detail::phm;
    const index batch = z.rows();
    const index k = bottleneck();
    const matrix_view<const T> rule = rule_->value.view();
    ensure(cache.dact, batch, k);
    add_column_sums<T>(g, gup_.bias.view());
    apply_backward<T>(rule, rule_side::as_stored, up_.left.view(), up_.right.view(), cache.act.view(), g, cache.up,
                      rule_->grad.view(), gup_.left.view(), gup_.right.view(), cache.dact.view(), false);
    for (index r = 0; r < batch; ++r) {
      for (index j = 0; j < k; ++j) cache.dact(r, j) *= gelu_tanh_derivative(cache.pre(r, j));  // dp
    }
    add_column_sums<T>(cache.dact.view(), gdown_.bias.view());
    apply_backward<T>(rule, rule_side::as_stored, down_.left.view(), down_.right.view(), z, cache.dact.view(),
                      cache.down, rule_->grad.view(), gdown_.left.view(), gdown_.right.view(), dz, true);
  }

  index in_ = 0;
  index out_ = 0;
  compacter_placement placement_ = compacter_placement::serial;
  std::shared_ptr<phm_rule<T>> rule_;  // shared by every layer built from it
  layer down_;                         // d_model -> k
  layer up_;                           // k -> out
  layer gdown_;                        // gradients, same shapes
  layer gup_;
};


}  // namespace peft
