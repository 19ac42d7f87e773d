// peft/adapters/ia3.hpp — (IA)^3 (Liu et al., NeurIPS 2022) as HuggingFace PEFT 0.21 computes it.
//
//   feed-forward module:  y = W0 (l * x) + b0       l = ia3_l (1, in): scales the INPUT
//   other modules:        y = (W0 x + b0) * l       l = ia3_l (out, 1): scales the OUTPUT, bias too
//
//   peft::ia3<float> a(in, out, {.feedforward = true});   // PEFT's init: l = 1, a no-op
//
// Reads the base output, so it writes its own passes; several IA3 terms add (PEFT multiplies).
// Merging is multiplicative (delta_weight = W0 * (l - 1)). A loaded adapter knows one side of the
// layer only: bind(in, out) or bind(base). Checkpoints: io/peft/ia3.hpp. Details:
// docs/methods/ia3.md.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"

namespace peft {

/// PEFT's `init_ia3_weights`: true (l = 1: a no-op), false (l ~ N(0, 1), PyTorch's randn).
enum class ia3_init : std::uint8_t { ones, random };

template <compute_scalar T>
class ia3;

struct ia3_options {
  template <compute_scalar T>
  using adapter = ia3<T>;  // the adapter these options make

  bool feedforward = false;  // scale the input (true) or the output (false)
  ia3_init init = ia3_init::ones;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class ia3 {
 public:
  using scalar = T;
  static constexpr std::string_view method = "ia3";

  /// What backward needs from forward (output scaling): h = x W0^T + b0 (batch, out).
  struct cache_type {
    matrix<T> h;
  };

  ia3() = default;

  /// A fresh adapter for an (out, in) linear layer.
  ia3(index in_features, index out_features, const ia3_options& opt)
      : in_(checked_dim(in_features, "in_features")), out_(checked_dim(out_features, "out_features")),
        feedforward_(opt.feedforward) {
    l_ = feedforward_ ? matrix<T>(1, in_, T{1}) : matrix<T>(out_, 1, T{1});
    if (opt.init == ia3_init::random) {
      rng gen(opt.seed);
      for (auto& v : l_.storage()) v = static_cast<T>(gen.normal(0.0, 1.0));
    }
    gl_ = matrix<T>(l_.rows(), l_.cols());
  }

  /// An adapter from an existing vector: in_features values (feedforward) or out_features
  /// values. The other side may be 0: unbound until bind().
  ia3(std::vector<T> l, bool feedforward, index in_features = 0, index out_features = 0)
      : in_(in_features), out_(out_features), feedforward_(feedforward) {
    const auto n = static_cast<index>(l.size());
    if (n < 1 || in_ < 0 || out_ < 0 || (feedforward_ && in_ != 0 && in_ != n) || (!feedforward_ && out_ != 0 && out_ != n)) {
      detail::raise<shape_error>("ia3::ia3", std::to_string(n) + " values of ia3_l for a " +
                                                 (feedforward_ ? std::string("feedforward") : std::string("output-scaled")) +
                                                 " layer of " + detail::shape_string(out_, in_));
    }
    if (feedforward_) {
      in_ = n;
      l_ = matrix<T>(1, n, std::move(l));
    } else {
      out_ = n;
      l_ = matrix<T>(n, 1, std::move(l));
    }
    gl_ = matrix<T>(l_.rows(), l_.cols());
  }

  /// Input features; 0 while unbound (an output-scaled adapter loaded from a checkpoint).
  index in_features() const noexcept { return in_; }
  /// Output features; 0 while unbound (a feedforward adapter loaded from a checkpoint).
  index out_features() const noexcept { return out_; }
  bool feedforward() const noexcept { return feedforward_; }
  bool bound() const noexcept { return in_ > 0 && out_ > 0; }
  /// Sets the unknown side; shape_error if the known side differs.
  /// The loader's and adapted_linear's hook for the layer's shape (same as bind).
  void set_features(index in_features, index out_features) { bind(in_features, out_features); }

  ia3& bind(index in_features, index out_features) {
    if (in_features < 1 || out_features < 1 || (in_ != 0 && in_ != in_features) || (out_ != 0 && out_ != out_features)) {
      detail::raise<shape_error>("ia3::bind", "the adapter is for " + detail::shape_string(out_, in_) +
                                                  " (0: unbound), cannot bind to " + detail::shape_string(out_features, in_features));
    }
    in_ = in_features;
    out_ = out_features;
    return *this;
  }
  template <base_weight Base>
  ia3& bind(const Base& w) {
    return bind(w.in_features(), w.out_features());
  }
  /// Whether merging changes the bias of a base that has one (output scaling).
  bool touches_bias() const noexcept { return !feedforward_; }

  /// ia3_l as stored: (1, in) or (out, 1).
  matrix_view<T> l() noexcept { return l_.view(); }
  matrix_view<const T> l() const noexcept { return l_.view(); }
  matrix_view<const T> grad_l() const noexcept { return gl_.view(); }

  /// y = W0 (l * x) + b0, or (W0 x + b0) * l.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    check_io("ia3::forward", w, x, y);
    if (feedforward_) {
      const matrix<T> xs = scaled_input(x, T{0});
      w.matmul(matrix_view<const T>(xs.view()), y);
      return;
    }
    w.matmul(x, y);
    if (cache.h.rows() != y.rows() || cache.h.cols() != y.cols()) cache.h = matrix<T>(y.rows(), y.cols());
    for (index i = 0; i < y.rows(); ++i) {
      T* row = y.row(i);
      std::copy(row, row + y.cols(), cache.h.row(i));
      for (index j = 0; j < y.cols(); ++j) row[j] *= l_(j, 0);
    }
  }

  /// y += W0 ((l - 1) * x), or y += (l - 1) * h.
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<T> y,
                cache_type& /*cache*/) const {
    check_io("ia3::add_term", w, x, y);
    if (feedforward_) {
      const matrix<T> xs = scaled_input(x, T{1});
      matrix<T> t(x.rows(), y.cols());
      w.matmul(matrix_view<const T>(xs.view()), t.view());  // W0 ((l - 1) x) + b0
      for (index i = 0; i < y.rows(); ++i) {
        T* row = y.row(i);
        for (index j = 0; j < y.cols(); ++j) row[j] += t(i, j) - w.template bias_value<T>(j);
      }
      return;
    }
    detail::expect_shape("ia3::add_term", "h", h, x.rows(), y.cols());
    for (index i = 0; i < y.rows(); ++i) {
      T* row = y.row(i);
      for (index j = 0; j < y.cols(); ++j) row[j] += (l_(j, 0) - T{1}) * h(i, j);
    }
  }

  /// Accumulates dl; writes dx = l * (g W0), or (g * l) W0.
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                cache_type& cache) {
    check_grad("ia3::backward", w, x, g, dx);
    if (feedforward_) {
      w.matmul_t(g, dx, false);  // g W0
      for (index i = 0; i < dx.rows(); ++i) {
        T* row = dx.row(i);
        for (index j = 0; j < dx.cols(); ++j) {
          gl_(0, j) += row[j] * x(i, j);
          row[j] *= l_(0, j);
        }
      }
      return;
    }
    if (cache.h.rows() != x.rows() || cache.h.cols() != g.cols()) {
      cache.h = matrix<T>(x.rows(), g.cols());
      w.matmul(x, cache.h.view());
    }
    matrix<T> gl(g.rows(), g.cols());  // g * l
    for (index i = 0; i < g.rows(); ++i) {
      for (index j = 0; j < g.cols(); ++j) {
        gl_(j, 0) += g(i, j) * cache.h(i, j);
        gl(i, j) = g(i, j) * l_(j, 0);
      }
    }
    w.matmul_t(matrix_view<const T>(gl.view()), dx, false);
  }

  /// Accumulates dl; feedforward: dx += (l - 1) * (g W0); other: dh += (l - 1) * g.
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<const T> g,
                     matrix_view<T> dh, matrix_view<T> dx, cache_type& /*cache*/) {
    check_grad("ia3::backward_term", w, x, g, dx);
    if (feedforward_) {
      matrix<T> gw(x.rows(), x.cols());
      w.matmul_t(g, gw.view(), false);  // g W0
      for (index i = 0; i < gw.rows(); ++i) {
        for (index j = 0; j < gw.cols(); ++j) {
          gl_(0, j) += gw(i, j) * x(i, j);
          dx(i, j) += (l_(0, j) - T{1}) * gw(i, j);
        }
      }
      return;
    }
    detail::expect_shape("ia3::backward_term", "h", h, x.rows(), g.cols());
    detail::expect_shape("ia3::backward_term", "dh", dh, x.rows(), g.cols());
    for (index i = 0; i < g.rows(); ++i) {
      for (index j = 0; j < g.cols(); ++j) {
        gl_(j, 0) += g(i, j) * h(i, j);
        dh(i, j) += (l_(j, 0) - T{1}) * g(i, j);
      }
    }
  }

  /// dW = W0 * (l - 1): columns scaled for feedforward, rows otherwise (W' = W0 * l).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("ia3::delta_weight", w);
    detail::expect_shape("ia3::delta_weight", "dw", dw, w.out_features(), w.in_features());
    for (index i = 0; i < dw.rows(); ++i) {
      T* row = dw.row(i);
      w.dequantize_row(i, row);
      for (index j = 0; j < dw.cols(); ++j) row[j] *= (feedforward_ ? l_(0, j) : l_(i, 0)) - T{1};
    }
  }

  /// db = b0 * (l - 1) for output scaling of a base with a bias; false (db untouched) otherwise.
  template <base_weight Base>
  bool delta_bias(const Base& w, T* db) const {
    check_base("ia3::delta_bias", w);
    if (feedforward_ || !w.has_bias()) return false;
    for (index j = 0; j < w.out_features(); ++j) db[j] = w.template bias_value<T>(j) * (l_(j, 0) - T{1});
    return true;
  }

  /// What merge added, recovered from the merged weight W' = W0 * l: W' - W' / l.
  /// error if l has a zero (W0 is lost).
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    check_base("ia3::unmerge_delta", merged);
    check_invertible("ia3::unmerge_delta");
    detail::expect_shape("ia3::unmerge_delta", "dw", dw, merged.out_features(), merged.in_features());
    for (index i = 0; i < dw.rows(); ++i) {
      T* row = dw.row(i);
      merged.dequantize_row(i, row);
      for (index j = 0; j < dw.cols(); ++j) {
        const T s = feedforward_ ? l_(0, j) : l_(i, 0);
        row[j] = row[j] - row[j] / s;
      }
    }
  }

  /// What merge added to the bias, from the merged b' = b0 * l: b' - b' / l; false when merge
  /// leaves the bias alone.
  template <base_weight Base>
  bool unmerge_delta_bias(const Base& merged, T* db) const {
    check_base("ia3::unmerge_delta_bias", merged);
    if (feedforward_ || !merged.has_bias()) return false;
    check_invertible("ia3::unmerge_delta_bias");
    for (index j = 0; j < merged.out_features(); ++j) {
      const T b = merged.template bias_value<T>(j);
      db[j] = b - b / l_(j, 0);
    }
    return true;
  }

  /// ia3_l: (1, in) feedforward, (out, 1) otherwise (PEFT's name, no ".weight").
  std::vector<parameter<T>> parameters() {
    return {{"ia3_l", l_.view(), gl_.view(), detail::shape_of(l_.view(), false)}};
  }

  void zero_grad() { gl_.fill(T{0}); }

 private:
  static index checked_dim(index d, const char* what) {
    if (d < 1) detail::raise<shape_error>("ia3::ia3", std::string(what) + " must be >= 1, got " + std::to_string(d));
    return d;
  }
  void check_invertible(const char* where) const {
    for (const T v : l_.storage()) {
      if (v == T{0}) detail::raise<error>(where, "ia3_l has a zero entry: the merged weight no longer holds W0");
    }
  }

  /// The base must match the known side(s).
  template <class Base>
  void check_base(const char* where, const Base& w) const {
    const bool in_ok = in_ == 0 ? !feedforward_ : w.in_features() == in_;
    const bool out_ok = out_ == 0 ? feedforward_ : w.out_features() == out_;
    if (!in_ok || !out_ok) {
      detail::raise<shape_error>(where, "base weight is " + detail::shape_string(w.out_features(), w.in_features()) +
                                            ", adapter expects " + detail::shape_string(out_, in_) + " (0: any)");
    }
  }
  template <class Base>
  void check_io(const char* where, const Base& w, matrix_view<const T> x, matrix_view<T> y) const {
    check_base(where, w);
    detail::expect_shape(where, "x", x, x.rows(), w.in_features());
    detail::expect_shape(where, "y", y, x.rows(), w.out_features());
  }
  template <class Base>
  void check_grad(const char* where, const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                  matrix_view<T> dx) const {
    check_base(where, w);
    detail::expect_shape(where, "x", x, x.rows(), w.in_features());
    detail::expect_shape(where, "dy", g, x.rows(), w.out_features());
    detail::expect_shape(where, "dx", dx, x.rows(), w.in_features());
  }

  /// x * (l - shift) (batch, in), feedforward only.
  matrix<T> scaled_input(matrix_view<const T> x, T shift) const {
    matrix<T> xs(x.rows(), x.cols());
    for (index i = 0; i < x.rows(); ++i) {
      for (index j = 0; j < x.cols(); ++j) xs(i, j) = x(i, j) * (l_(0, j) - shift);
    }
    return xs;
  }

  index in_ = 0;
  index out_ = 0;
  bool feedforward_ = false;
  matrix<T> l_;   // (1, in) feedforward, (out, 1) otherwise
  matrix<T> gl_;  // gradient, same shape
};


}  // namespace peft
