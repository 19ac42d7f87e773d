// peft/adapters/road.hpp — RoAd (Liao & Monz, "2D rotary adaptation", NeurIPS 2024) as
// HuggingFace PEFT 0.21 computes it: the base output h = x W0^T + b0 is rotated pair by pair,
//
//   y[j]     = c1[j] h[j]     - c2[j]     h[j + G/2]        j < G/2 inside each group of G
//   y[j+G/2] = c1[j+G/2] h[j+G/2] + c2[j+G/2] h[j]          outputs (G = group_size, G | out)
//
// with c1 = alpha cos(theta), c2 = alpha sin(theta) per output (road_theta, road_alpha):
//   road_1: out / 2 angles and scales, shared by the two elements of a pair;
//   road_2: out of each, one per element;
//   road_4: 2 out of each, a (alpha, theta) for c1 and another for c2 of every element.
//
//   peft::road<float> a(in, out, {.variant = peft::road_variant::road_2, .group_size = 64});
//
// Reads the base output, so it writes its own passes (the cache keeps h). Merging is
// multiplicative: W' = R W0, b' = R b0 (R the out x out rotation); unmerging applies R^{-1}, one
// 2 x 2 inverse per pair. A loaded adapter does not know in_features: bind(in, out) or
// set_features. Checkpoints: io/peft/road.hpp. Details: docs/methods/road.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"

namespace peft {

/// PEFT's RoadConfig.variant.
enum class road_variant : std::uint8_t { road_1, road_2, road_4 };

/// PEFT's name of a variant ("road_1", ...).
constexpr std::string_view road_variant_name(road_variant v) noexcept {
  return v == road_variant::road_1 ? "road_1" : v == road_variant::road_2 ? "road_2" : "road_4";
}

template <compute_scalar T>
class road;

struct road_options {
  template <compute_scalar T>
  using adapter = road<T>;  // the adapter these options make

  road_variant variant = road_variant::road_1;
  index group_size = 64;     // even, dividing out_features (PEFT's default 64)
  bool random_init = false;  // PEFT's init_weights=False: theta ~ N(0, 0.5^2), alpha ~ N(1, 0.5^2)
  std::uint64_t seed = 0;    // for random_init (peft::rng, not torch's generator)
};

template <compute_scalar T>
class road {
 public:
  using scalar = T;
  static constexpr std::string_view method = "road";

  /// What backward needs from forward: h = x W0^T + b0 (batch, out).
  struct cache_type {
    matrix<T> h;
  };

  road() = default;

  /// A fresh adapter for an (out, in) layer: theta = 0, alpha = 1 (the identity), or PEFT's
  /// random init.
  road(index in_features, index out_features, const road_options& opt)
      : road(opt.variant, opt.group_size, std::vector<T>{}, std::vector<T>{}, out_features, in_features) {
    if (opt.random_init) {
      rng gen(opt.seed);
      for (auto& v : theta_.storage()) v = static_cast<T>(gen.normal(0.0, 0.5));
      for (auto& v : alpha_.storage()) v = static_cast<T>(gen.normal(1.0, 0.5));
    }
  }

  /// An adapter from road_theta and road_alpha (each parameter_count(variant, out) values; empty:
  /// the identity init). in_features may be 0: unbound until bind(). shape_error when sizes do not
  /// fit (group_size even, dividing out_features).
  road(road_variant variant, index group_size, std::vector<T> theta, std::vector<T> alpha, index out_features,
       index in_features = 0)
      : variant_(variant), g_(group_size), in_(in_features), out_(out_features) {
    constexpr const char* where = "road::road";
    if (g_ < 2 || g_ % 2 != 0) {
      detail::raise<shape_error>(where, "group_size must be even and >= 2, got " + std::to_string(g_));
    }
    if (out_ < 1 || out_ % g_ != 0) {
      detail::raise<shape_error>(where, "out_features " + std::to_string(out_) + " is not a positive multiple of group_size " +
                                            std::to_string(g_) + " (PEFT refuses it)");
    }
    if (in_ < 0) detail::raise<shape_error>(where, "in_features must be >= 1 (0: unbound), got " + std::to_string(in_));
    const index n = parameter_count(variant_, out_);
    if (theta.empty()) theta.assign(static_cast<std::size_t>(n), T{0});
    if (alpha.empty()) alpha.assign(static_cast<std::size_t>(n), T{1});
    if (static_cast<index>(theta.size()) != n || static_cast<index>(alpha.size()) != n) {
      detail::raise<shape_error>(where, "road_theta has " + std::to_string(theta.size()) + " values and road_alpha " +
                                            std::to_string(alpha.size()) + ", " + std::string(road_variant_name(variant_)) +
                                            " with out_features " + std::to_string(out_) + " needs " + std::to_string(n));
    }
    theta_ = matrix<T>(1, n, std::move(theta));
    alpha_ = matrix<T>(1, n, std::move(alpha));
    gtheta_ = matrix<T>(1, n);
    galpha_ = matrix<T>(1, n);
  }

  /// Values of road_theta (and of road_alpha) a variant stores for out_features outputs.
  static constexpr index parameter_count(road_variant v, index out_features) noexcept {
    return v == road_variant::road_1 ? out_features / 2 : v == road_variant::road_2 ? out_features : 2 * out_features;
  }

  /// Input features; 0 while unbound (an adapter loaded from a checkpoint).
  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  bool bound() const noexcept { return in_ > 0; }
  road_variant variant() const noexcept { return variant_; }
  index group_size() const noexcept { return g_; }

  /// Sets in_features; shape_error if out_features differs or in_features is already another.
  road& bind(index in_features, index out_features) {
    if (theta_.empty()) detail::raise<error>("road::bind", "the adapter is default-constructed");
    if (in_features < 1 || out_features != out_ || (in_ != 0 && in_ != in_features)) {
      detail::raise<shape_error>("road::bind", "the adapter is for " + detail::shape_string(out_, in_) +
                                                   " (0: unbound), cannot bind to " + detail::shape_string(out_features, in_features));
    }
    in_ = in_features;
    return *this;
  }
  /// The loader's and adapted_linear's hook for the layer's shape (same as bind).
  void set_features(index in_features, index out_features) { bind(in_features, out_features); }
  /// Merging rotates the bias too (b' = R b0).
  bool touches_bias() const noexcept { return true; }

  /// road_theta, road_alpha as (1, n) views, and their gradients.
  matrix_view<T> theta() noexcept { return theta_.view(); }
  matrix_view<const T> theta() const noexcept { return theta_.view(); }
  matrix_view<T> alpha() noexcept { return alpha_.view(); }
  matrix_view<const T> alpha() const noexcept { return alpha_.view(); }
  matrix_view<const T> grad_theta() const noexcept { return gtheta_.view(); }
  matrix_view<const T> grad_alpha() const noexcept { return galpha_.view(); }

  // ---- the passes -------------------------------------------------------------------------------

  /// y = R (x W0^T + b0); h kept for backward.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    check_io("road::forward", w, x, y);
    if (cache.h.rows() != y.rows() || cache.h.cols() != y.cols()) cache.h = matrix<T>(y.rows(), y.cols());
    w.matmul(x, cache.h.view());
    const coefficients c = coefs();
    rotate(c, cache.h.view(), y, false);
  }

  /// y += R h - h.
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<T> y,
                cache_type& /*cache*/) const {
    check_io("road::add_term", w, x, y);
    detail::expect_shape("road::add_term", "h", h, x.rows(), out_);
    rotate(coefs(), h, y, true);
  }

  /// Gradients += ; dx = (R^T g) W0.
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    check_grad("road::backward", w, x, g, dx);
    if (cache.h.rows() != x.rows() || cache.h.cols() != out_) {
      cache.h = matrix<T>(x.rows(), out_);
      w.matmul(x, cache.h.view());
    }
    matrix<T> dh(g.rows(), out_);
    accumulate_grads(coefs(), cache.h.view(), g, dh.view(), false);
    w.matmul_t(matrix_view<const T>(dh.view()), dx, false);
  }

  /// Gradients += ; dh += R^T g - g (the term reads only h: dx is untouched).
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<const T> g,
                     matrix_view<T> dh, matrix_view<T> dx, cache_type& /*cache*/) {
    check_grad("road::backward_term", w, x, g, dx);
    detail::expect_shape("road::backward_term", "h", h, x.rows(), out_);
    detail::expect_shape("road::backward_term", "dh", dh, x.rows(), out_);
    accumulate_grads(coefs(), h, g, dh, true);
  }

  // ---- merging ----------------------------------------------------------------------------------

  /// dW = R W0 - W0, two rows of W0 at a time.
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("road::delta_weight", w);
    detail::expect_shape("road::delta_weight", "dw", dw, out_, w.in_features());
    pairwise_rows(w, dw, coefs());
  }

  /// db = R b0 - b0 for a base with a bias; false (db untouched) otherwise.
  template <base_weight Base>
  bool delta_bias(const Base& w, T* db) const {
    check_base("road::delta_bias", w);
    if (!w.has_bias()) return false;
    pairwise_bias(w, db, coefs());
    return true;
  }

  /// What merge added, recovered from the merged W' = R W0: W' - R^{-1} W' (PEFT's unmerge).
  /// error if a pair's 2 x 2 rotation is singular (some alpha is 0: W0 is lost).
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    check_base("road::unmerge_delta", merged);
    detail::expect_shape("road::unmerge_delta", "dw", dw, out_, merged.in_features());
    pairwise_rows(merged, dw, inverse_coefs("road::unmerge_delta"), T{-1});
  }

  /// What merge added to the bias, from the merged b' = R b0: b' - R^{-1} b'.
  template <base_weight Base>
  bool unmerge_delta_bias(const Base& merged, T* db) const {
    check_base("road::unmerge_delta_bias", merged);
    if (!merged.has_bias()) return false;
    pairwise_bias(merged, db, inverse_coefs("road::unmerge_delta_bias"), T{-1});
    return true;
  }

  /// road_theta, road_alpha: vectors of parameter_count(variant, out) values.
  std::vector<parameter<T>> parameters() {
    return {{"road_theta", theta_.view(), gtheta_.view(), detail::shape_of(theta_.view(), true)},
            {"road_alpha", alpha_.view(), galpha_.view(), detail::shape_of(alpha_.view(), true)}};
  }

  void zero_grad() {
    gtheta_.fill(T{0});
    galpha_.fill(T{0});
  }

 private:
  /// The rotation as 2 x 2 blocks: pair (j, j + G/2) of a group maps (h_j, h_k) to
  /// (a_j h_j + b_j h_k, c_j h_j + d_j h_k), stored at the pair's first index j (out / 2 pairs
  /// in group order). R: a = c1[j], b = -c2[j], c = c2[k], d = c1[k].
  struct coefficients {
    std::vector<T> a, b, c, d;
  };

  /// Pair p's two outputs (j, k).
  std::pair<index, index> pair_at(index p) const {
    const index half = g_ / 2;
    const index j = (p / half) * g_ + p % half;
    return {j, j + half};
  }

  /// Where output o's c1 = alpha[t1] cos(theta[t1]) and c2 = alpha[t2] sin(theta[t2]) come from
  /// (PEFT's _prepare_cols): road_1 shares one entry per pair, road_4 has two per output.
  struct output_coef {
    index t1, t2;
  };
  output_coef source(index o) const {
    switch (variant_) {
      case road_variant::road_1: {
        const index half = g_ / 2, k = o / g_ * half + o % half;  // shared by the pair
        return {k, k};
      }
      case road_variant::road_2: return {o, o};
      case road_variant::road_4: {
        const index base = o / g_ * 2 * g_ + o % g_;
        return {base, base + g_};
      }
    }
    return {o, o};
  }
  /// c1[o] and c2[o].
  T c1(index o) const {
    const auto s = source(o);
    return alpha_(0, s.t1) * std::cos(theta_(0, s.t1));
  }
  T c2(index o) const {
    const auto s = source(o);
    return alpha_(0, s.t2) * std::sin(theta_(0, s.t2));
  }

  coefficients coefs() const {
    const index pairs = out_ / 2;
    coefficients r{std::vector<T>(static_cast<std::size_t>(pairs)), std::vector<T>(static_cast<std::size_t>(pairs)),
                   std::vector<T>(static_cast<std::size_t>(pairs)), std::vector<T>(static_cast<std::size_t>(pairs))};
    for (index p = 0; p < pairs; ++p) {
      const auto [j, k] = pair_at(p);
      const auto u = static_cast<std::size_t>(p);
      r.a[u] = c1(j);
      r.b[u] = -c2(j);
      r.c[u] = c2(k);
      r.d[u] = c1(k);
    }
    return r;
  }

  /// R^{-1} as the same blocks; error naming `where` if a block is singular.
  coefficients inverse_coefs(const char* where) const {
    coefficients r = coefs();
    for (std::size_t u = 0; u < r.a.size(); ++u) {
      const T det = r.a[u] * r.d[u] - r.b[u] * r.c[u];
      if (det == T{0} || !std::isfinite(det)) {
        detail::raise<error>(where, "the rotation of output pair " + std::to_string(pair_at(static_cast<index>(u)).first) +
                                        " is singular (its scales are 0): the merged weight no longer holds W0");
      }
      const T a = r.a[u];
      r.a[u] = r.d[u] / det;
      r.d[u] = a / det;
      r.b[u] = -r.b[u] / det;
      r.c[u] = -r.c[u] / det;
    }
    return r;
  }

  /// y = R h (or y += R h - h).
  void rotate(const coefficients& c, matrix_view<const T> h, matrix_view<T> y, bool as_term) const {
    for (index i = 0; i < h.rows(); ++i) {
      const T* hr = h.row(i);
      T* yr = y.row(i);
      for (index p = 0; p < out_ / 2; ++p) {
        const auto [j, k] = pair_at(p);
        const auto u = static_cast<std::size_t>(p);
        const T yj = c.a[u] * hr[j] + c.b[u] * hr[k];
        const T yk = c.c[u] * hr[j] + c.d[u] * hr[k];
        if (as_term) {
          yr[j] += yj - hr[j];
          yr[k] += yk - hr[k];
        } else {
          yr[j] = yj;
          yr[k] = yk;
        }
      }
    }
  }

  /// theta and alpha gradients of <g, R h> += ; dh = R^T g (or dh += R^T g - g).
  void accumulate_grads(const coefficients& c, matrix_view<const T> h, matrix_view<const T> g, matrix_view<T> dh,
                        bool as_term) {
    // dL/dc1[o] and dL/dc2[o] summed over the batch, then through c = alpha (cos|sin) theta.
    std::vector<T> dc1(static_cast<std::size_t>(out_)), dc2(static_cast<std::size_t>(out_));
    for (index i = 0; i < h.rows(); ++i) {
      const T* hr = h.row(i);
      const T* gr = g.row(i);
      T* dr = dh.row(i);
      for (index p = 0; p < out_ / 2; ++p) {
        const auto [j, k] = pair_at(p);
        const auto u = static_cast<std::size_t>(p);
        dc1[static_cast<std::size_t>(j)] += gr[j] * hr[j];
        dc1[static_cast<std::size_t>(k)] += gr[k] * hr[k];
        dc2[static_cast<std::size_t>(j)] -= gr[j] * hr[k];  // y_j = c1_j h_j - c2_j h_k
        dc2[static_cast<std::size_t>(k)] += gr[k] * hr[j];  // y_k = c1_k h_k + c2_k h_j
        const T dj = c.a[u] * gr[j] + c.c[u] * gr[k];
        const T dk = c.b[u] * gr[j] + c.d[u] * gr[k];
        if (as_term) {
          dr[j] += dj - gr[j];
          dr[k] += dk - gr[k];
        } else {
          dr[j] = dj;
          dr[k] = dk;
        }
      }
    }
    for (index o = 0; o < out_; ++o) {
      const auto s = source(o);
      const T g1 = dc1[static_cast<std::size_t>(o)], g2 = dc2[static_cast<std::size_t>(o)];
      const T a1 = alpha_(0, s.t1), t1 = theta_(0, s.t1), a2 = alpha_(0, s.t2), t2 = theta_(0, s.t2);
      galpha_(0, s.t1) += g1 * std::cos(t1);
      gtheta_(0, s.t1) -= g1 * a1 * std::sin(t1);
      galpha_(0, s.t2) += g2 * std::sin(t2);
      gtheta_(0, s.t2) += g2 * a2 * std::cos(t2);
    }
  }

  /// dw = sign (M W - W) for the block rotation M, reading two rows of W per pair (unmerging:
  /// M = R^{-1}, sign -1, W' - R^{-1} W').
  template <class Base>
  void pairwise_rows(const Base& w, matrix_view<T> dw, const coefficients& m, T sign = T{1}) const {
    const index in = w.in_features();
    std::vector<T> rj(static_cast<std::size_t>(in)), rk(static_cast<std::size_t>(in));
    for (index p = 0; p < out_ / 2; ++p) {
      const auto [j, k] = pair_at(p);
      const auto u = static_cast<std::size_t>(p);
      w.dequantize_row(j, rj.data());
      w.dequantize_row(k, rk.data());
      T* dj = dw.row(j);
      T* dk = dw.row(k);
      for (index i = 0; i < in; ++i) {
        const auto v = static_cast<std::size_t>(i);
        dj[i] = sign * ((m.a[u] - T{1}) * rj[v] + m.b[u] * rk[v]);
        dk[i] = sign * (m.c[u] * rj[v] + (m.d[u] - T{1}) * rk[v]);
      }
    }
  }

  /// db = sign (M b - b).
  template <class Base>
  void pairwise_bias(const Base& w, T* db, const coefficients& m, T sign = T{1}) const {
    for (index p = 0; p < out_ / 2; ++p) {
      const auto [j, k] = pair_at(p);
      const auto u = static_cast<std::size_t>(p);
      const T bj = w.template bias_value<T>(j), bk = w.template bias_value<T>(k);
      db[j] = sign * ((m.a[u] - T{1}) * bj + m.b[u] * bk);
      db[k] = sign * (m.c[u] * bj + (m.d[u] - T{1}) * bk);
    }
  }

  void check_ready(const char* where) const {
    if (theta_.empty()) detail::raise<error>(where, "the adapter is default-constructed");
  }
  /// The base must have out_features outputs, and in_features inputs when bound.
  template <class Base>
  void check_base(const char* where, const Base& w) const {
    check_ready(where);
    if (w.out_features() != out_ || (in_ != 0 && w.in_features() != in_)) {
      detail::raise<shape_error>(where, "base weight is " + detail::shape_string(w.out_features(), w.in_features()) +
                                            ", adapter expects " + detail::shape_string(out_, in_) + " (0: any)");
    }
  }
  template <class Base>
  void check_io(const char* where, const Base& w, matrix_view<const T> x, matrix_view<T> y) const {
    check_base(where, w);
    detail::expect_shape(where, "x", x, x.rows(), w.in_features());
    detail::expect_shape(where, "y", y, x.rows(), out_);
  }
  template <class Base>
  void check_grad(const char* where, const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                  matrix_view<T> dx) const {
    check_base(where, w);
    detail::expect_shape(where, "x", x, x.rows(), w.in_features());
    detail::expect_shape(where, "dy", g, x.rows(), out_);
    detail::expect_shape(where, "dx", dx, x.rows(), w.in_features());
  }

  road_variant variant_ = road_variant::road_1;
  index g_ = 0;  // group_size
  index in_ = 0;
  index out_ = 0;
  matrix<T> theta_;  // road_theta (1, n)
  matrix<T> alpha_;  // road_alpha (1, n)
  matrix<T> gtheta_;
  matrix<T> galpha_;
};

}  // namespace peft
