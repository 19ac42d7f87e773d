// peft/adapters/dora.hpp — DoRA, weight-decomposed low-rank adaptation (Liu et al., ICML 2024),
// as HuggingFace PEFT computes it (LoRA with use_dora).
//
//   y = b0 + k * (x W0^T + s x A^T B^T),  k = m / n,  n_j = ||(W0 + s B A)_{j,:}||_2 (detached)
//   A (r, in), B (out, r), m (out); s = alpha / r, or alpha / sqrt(r) with rsLoRA
//
//   peft::dora<float> a(base, {.rank = 16, .alpha = 32});   // B = 0, m = n: the identity
//
// Reads the base output, so it writes its own passes (its low-rank part uses the low-rank core).
// The norms are cached in the cache_type and recomputed after any non-const accessor; concurrent
// forwards need one cache each. Checkpoints: io/peft/dora.hpp. Details: docs/methods/dora.md.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/adapters/detail/low_rank_core.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

namespace detail {
/// A process-wide, never repeated, non-zero stamp for DoRA's parameter versions.
inline std::uint64_t next_dora_stamp() noexcept {
  static std::atomic<std::uint64_t> counter{0};
  return counter.fetch_add(1, std::memory_order_relaxed) + 1;
}
}  // namespace detail

template <compute_scalar T>
class dora {
 public:
  using scalar = T;
  static constexpr std::string_view method = "dora";

  /// What backward needs from forward, and the norm cache (see the header comment).
  struct cache_type {
    low_rank_cache<T> low_rank;              // t = x A^T (batch, r)
    matrix<T> z;                             // x W0^T, the base output without bias (batch, out)
    matrix<T> l;                             // s x A^T B^T (batch, out)
    std::vector<T> norm;                     // n (out), detached
    std::vector<T> k;                        // m / n (out)
    std::uint64_t stamp = 0;                 // parameter stamp n and k belong to; 0: none
    const void* base = nullptr;              // the base object n was computed from
    std::vector<double> w_sq;                // ||w_j||^2 of the frozen base (f32 fast path)
    const void* sq_base = nullptr;           // the base w_sq belongs to
    /// Forgets the norms: the next forward recomputes them.
    void invalidate() noexcept {
      stamp = 0;
      base = nullptr;
      sq_base = nullptr;
    }
  };

  dora() = default;

  /// A fresh adapter for the frozen weight `w`: LoRA's init for A and B (lora_options; `bias`
  /// must be false), m = the row norms of W0 + s B A, so with B = 0 the layer is unchanged.
  template <base_weight Base>
  dora(const Base& w, const lora_options& opt) {
    if (opt.bias) {
      detail::raise<unsupported_error>("dora::dora", "lora_bias is not supported with DoRA (PEFT rejects it too)");
    }
    lora_ = lora<T>(w.in_features(), w.out_features(), opt);
    magnitude_ = matrix<T>(1, out_features(), row_norms(w));
    grad_m_ = matrix<T>(1, out_features());
  }

  /// An adapter from a LoRA (A, B, s; no bias) and a magnitude of out_features values.
  dora(lora<T> low_rank, std::vector<T> magnitude) : lora_(std::move(low_rank)) {
    if (lora_.has_bias()) {
      detail::raise<unsupported_error>("dora::dora", "lora_bias is not supported with DoRA (PEFT rejects it too)");
    }
    if (static_cast<index>(magnitude.size()) != lora_.out_features()) {
      detail::raise<shape_error>("dora::dora", "magnitude has " + std::to_string(magnitude.size()) +
                                                   " values, expected " + std::to_string(lora_.out_features()));
    }
    magnitude_ = matrix<T>(1, lora_.out_features(), std::move(magnitude));
    grad_m_ = matrix<T>(1, lora_.out_features());
  }

  /// An adapter from A (r, in), B (out, r), the scale s and the magnitude (out values).
  dora(matrix<T> a, matrix<T> b, T scale, std::vector<T> magnitude)
      : dora(lora<T>(std::move(a), std::move(b), scale), std::move(magnitude)) {}

  index in_features() const noexcept { return lora_.in_features(); }
  index out_features() const noexcept { return lora_.out_features(); }
  index rank() const noexcept { return lora_.rank(); }
  T scale() const noexcept { return lora_.scale(); }
  /// Changes s; the norms are recomputed at the next forward.
  void set_scale(T s) noexcept {
    lora_.set_scale(s);
    invalidate_norms();
  }

  /// The low-rank part (A, B, s and their gradients), read-only.
  const lora<T>& lora_part() const noexcept { return lora_; }
  /// Writable views; each call invalidates cached norms (see the header comment).
  matrix_view<T> A() noexcept {
    invalidate_norms();
    return lora_.A();
  }
  matrix_view<const T> A() const noexcept { return lora_.A(); }
  matrix_view<T> B() noexcept {
    invalidate_norms();
    return lora_.B();
  }
  matrix_view<const T> B() const noexcept { return lora_.B(); }
  /// m as a (1, out) view.
  matrix_view<T> magnitude() noexcept {
    invalidate_norms();
    return magnitude_.view();
  }
  matrix_view<const T> magnitude() const noexcept { return magnitude_.view(); }
  matrix_view<const T> grad_A() const noexcept { return lora_.grad_A(); }
  matrix_view<const T> grad_B() const noexcept { return lora_.grad_B(); }
  /// dL/dm as a (1, out) view.
  matrix_view<const T> grad_magnitude() const noexcept { return grad_m_.view(); }

  /// Makes every cache recompute n and k at its next forward (after changing values through a
  /// view kept from an earlier accessor call).
  void invalidate_norms() noexcept { stamp_ = detail::next_dora_stamp(); }

  /// The smallest norm used: sqrt of the smallest normal T (2^-63 for float, 2^-511 for double).
  static T norm_floor() noexcept { return std::sqrt(std::numeric_limits<T>::min()); }

  /// n_j = ||(W0 + s B A)_{j,:}||_2 for every output j, raised to norm_floor(); computed now
  /// (no cache, pinned norms ignored) without forming W0 + s B A.
  template <base_weight Base>
  std::vector<T> row_norms(const Base& w) const {
    check_base("dora::row_norms", w);
    const index out = out_features(), in = in_features(), r = rank();
    const double s = static_cast<double>(scale());
    const factors_in_double f = widened_factors();
    const matrix<double>&a = f.a, &b = f.b, &bg = f.bg;
    const index panel = std::clamp<index>(32768 / std::max<index>(in, 1), 1, out);
    matrix<double> rows(panel, in);             // W0 rows [j0, j0 + panel)
    matrix<double> wa(panel, r);                // those rows times A^T
    std::vector<double> v(static_cast<std::size_t>(in));
    std::vector<T> n(static_cast<std::size_t>(out));
    for (index j0 = 0; j0 < out; j0 += panel) {
      const index nj = std::min(panel, out - j0);
      for (index i = 0; i < nj; ++i) w.dequantize_row(j0 + i, rows.row(i));
      kernels::gemm_nt<double, double>(1.0, matrix_view<const double>(rows.view().row_block(0, nj)), a.view(), 0.0,
                                       wa.view().row_block(0, nj));
      for (index i = 0; i < nj; ++i) {
        const index j = j0 + i;
        double sq = 0.0, cross = 0.0, quad = 0.0;
        for (index c = 0; c < in; ++c) sq += rows(i, c) * rows(i, c);
        for (index p = 0; p < r; ++p) {
          cross += b(j, p) * wa(i, p);
          quad += b(j, p) * bg(j, p);
        }
        n[static_cast<std::size_t>(j)] = norm_of_row(j, sq, cross, quad, s, a, b, [&](double* dst) {
          std::copy(rows.row(i), rows.row(i) + in, dst);
        }, v);
      }
    }
    return n;
  }

  /// n_j from the expansion ||w_j||^2 + 2 s B_j (A w_j) + s^2 B_j A A^T B_j^T (sq, cross, quad);
  /// where it cancels (or the row is zero), ||w_j + s B_j A||^2 directly from the row that
  /// `load_row` writes into `scratch` (in values). Raised to norm_floor().
  template <class LoadRow>
  static T norm_of_row(index j, double sq, double cross, double quad, double s, const matrix<double>& a,
                       const matrix<double>& b, LoadRow&& load_row, std::vector<double>& scratch) {
    double n2 = sq + 2.0 * s * cross + s * s * quad;
    if (!(n2 > cancellation_limit * (sq + s * s * quad))) {
      load_row(scratch.data());
      for (index p = 0; p < a.rows(); ++p) {
        const double f = s * b(j, p);
        for (index c = 0; c < a.cols(); ++c) scratch[static_cast<std::size_t>(c)] += f * a(p, c);
      }
      n2 = 0.0;
      for (double e : scratch) n2 += e * e;
    }
    return std::max(static_cast<T>(std::sqrt(std::max(n2, 0.0))), norm_floor());
  }

  /// The f32 path of the norms, taken in training where they change every step: ||w_j||^2 once
  /// per base (kept in the cache: W0 is frozen), A W0^T through the base's own fused product (a
  /// batch of r rows), the O(out r^2) rest and the cancellation fallback in double as row_norms.
  template <class Base>
  std::vector<T> row_norms_with_cache(const Base& w, cache_type& cache) const {
    const index out = out_features(), in = in_features(), r = rank();
    std::vector<double> row(static_cast<std::size_t>(in));
    if (cache.sq_base != static_cast<const void*>(&w) || static_cast<index>(cache.w_sq.size()) != out) {
      cache.w_sq.assign(static_cast<std::size_t>(out), 0.0);
      for (index j = 0; j < out; ++j) {
        w.dequantize_row(j, row.data());
        double sq = 0.0;
        for (double e : row) sq += e * e;
        cache.w_sq[static_cast<std::size_t>(j)] = sq;
      }
      cache.sq_base = &w;
    }
    matrix<T> aw(r, out);  // A W0^T + b0: the base product of the r rows of A
    w.matmul(lora_.A(), aw.view());
    const double s = static_cast<double>(scale());
    const factors_in_double f = widened_factors();
    const matrix<double>&a = f.a, &b = f.b, &bg = f.bg;
    std::vector<T> n(static_cast<std::size_t>(out));
    for (index j = 0; j < out; ++j) {
      const double bias = w.template bias_value<double>(j);
      const double sq = cache.w_sq[static_cast<std::size_t>(j)];
      double cross = 0.0, quad = 0.0;
      for (index p = 0; p < r; ++p) {
        cross += b(j, p) * (static_cast<double>(aw(p, j)) - bias);
        quad += b(j, p) * bg(j, p);
      }
      n[static_cast<std::size_t>(j)] =
          norm_of_row(j, sq, cross, quad, s, a, b, [&](double* dst) { w.dequantize_row(j, dst); }, row);
    }
    return n;
  }

  /// Holds n fixed at `norms` (out positive values) instead of computing it: forward, backward
  /// and delta_weight then use these. For finite-difference checks of the detached gradient.
  void pin_norms(std::vector<T> norms) {
    if (static_cast<index>(norms.size()) != out_features()) {
      detail::raise<shape_error>("dora::pin_norms", "got " + std::to_string(norms.size()) + " norms, expected " +
                                                        std::to_string(out_features()));
    }
    for (T v : norms) {
      if (!(v > T{0}) || !std::isfinite(v)) {
        detail::raise<error>("dora::pin_norms", "norms must be finite and positive, got " + std::to_string(v));
      }
    }
    pinned_ = std::move(norms);
    invalidate_norms();
  }
  /// pin_norms(row_norms(w)): freezes n at its current value.
  template <base_weight Base>
  void freeze_norms(const Base& w) {
    pin_norms(row_norms(w));
  }
  /// Back to computing n from the parameters.
  void unpin_norms() noexcept {
    pinned_.clear();
    invalidate_norms();
  }
  bool norms_pinned() const noexcept { return !pinned_.empty(); }

  /// y = x W0^T + b0 + (k - 1) (x W0^T) + k s x A^T B^T (the whole output).
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    check_io("dora::forward", w, x, y);
    if constexpr (fused_base_weight<Base, T>) {
      // One pass: each tile of h = x W0^T + b0 gets z = h - b0, l = s t B^T and the rescaling
      // while it is in cache (the same arithmetic as apply()).
      ensure_norms(w, cache);
      const low_rank_term<T> term = lora_.low_rank();
      low_rank::project(term, x, cache.low_rank);
      const index batch = x.rows(), out = out_features();
      if (cache.z.rows() != batch || cache.z.cols() != out) cache.z = matrix<T>(batch, out);
      if (cache.l.rows() != batch || cache.l.cols() != out) cache.l = matrix<T>(batch, out);
      w.matmul(x, y, rescale_epilogue<Base>{w, low_rank::epilogue(term, cache.low_rank), cache});
    } else {
      w.matmul(x, y);
      apply(w, x, matrix_view<const T>(y), y, cache);
    }
  }

  /// y += (k - 1) (h - b0) + k s x A^T B^T, h = x W0^T + b0 the layer's base output.
  /// Several DoRA adapters on one layer each rescale the shared h. PEFT's evaluation-mode
  /// forward (and training with lora_dropout = 0) instead hands each DoRA adapter the output
  /// accumulated so far, base plus the earlier adapters' terms, so its result depends on the
  /// adapter order; PEFT's training forward with dropout > 0 uses the base output, as here.
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<T> y,
                cache_type& cache) const {
    check_io("dora::add_term", w, x, y);
    detail::expect_shape("dora::add_term", "h", h, x.rows(), out_features());
    apply(w, x, h, y, cache);
  }

  /// Accumulates dA, dB, dm; writes dx = (k g) W0 + s ((k g) B) A.
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                cache_type& cache) {
    check_grad("dora::backward", w, x, g, dx);
    if (!prepared(cache, x)) {
      matrix<T> h(x.rows(), out_features());
      w.matmul(x, h.view());
      prepare(w, x, h.view(), cache);
    }
    const matrix<T> kg = scaled_grad(g, cache);
    accumulate_magnitude_grad(g, cache);
    w.matmul_t(matrix_view<const T>(kg.view()), dx, false);
    low_rank::backward(lora_.low_rank(), lora_.low_rank_grads(), x, kg.view(), dx, cache.low_rank);
  }

  /// Accumulates dA, dB, dm; dh += (k - 1) g; dx += s ((k g) B) A.
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<const T> g,
                     matrix_view<T> dh, matrix_view<T> dx, cache_type& cache) {
    check_grad("dora::backward_term", w, x, g, dx);
    detail::expect_shape("dora::backward_term", "h", h, x.rows(), out_features());
    detail::expect_shape("dora::backward_term", "dh", dh, x.rows(), out_features());
    if (!prepared(cache, x)) prepare(w, x, h, cache);
    for (index i = 0; i < g.rows(); ++i) {
      for (index j = 0; j < g.cols(); ++j) dh(i, j) += (kv(cache, j) - T{1}) * g(i, j);
    }
    const matrix<T> kg = scaled_grad(g, cache);
    accumulate_magnitude_grad(g, cache);
    low_rank::backward(lora_.low_rank(), lora_.low_rank_grads(), x, kg.view(), dx, cache.low_rank);
  }

  /// dW = (m / n)[:, None] * (W0 + s B A) - W0 = (k - 1) W0 + k s B A, with n computed now
  /// (or pinned); remembers n for unmerge_delta.
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("dora::delta_weight", w);
    detail::expect_shape("dora::delta_weight", "dw", dw, out_features(), in_features());
    std::vector<T> n = pinned_.empty() ? row_norms(w) : pinned_;
    low_rank::delta(lora_.low_rank(), dw);  // s B A
    std::vector<T> row(static_cast<std::size_t>(in_features()));
    for (index j = 0; j < out_features(); ++j) {
      w.dequantize_row(j, row.data());
      const T k = magnitude_(0, j) / n[static_cast<std::size_t>(j)];
      for (index c = 0; c < in_features(); ++c) {
        dw(j, c) = (k - T{1}) * row[static_cast<std::size_t>(c)] + k * dw(j, c);
      }
    }
    merge_norm_ = std::move(n);
  }

  /// W' - W0 recovered from the merged weight W' = (m / n')[:, None] * (W0 + s B A) with the
  /// norms n' the last delta_weight used (PEFT's unmerge): dW = W' (1 - n' / m) + s B A.
  /// Throws peft::error when there was no delta_weight or some m_j is 0 (that row of W0 is lost).
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    constexpr const char* where = "dora::unmerge_delta";
    check_base(where, merged);
    detail::expect_shape(where, "dw", dw, out_features(), in_features());
    if (static_cast<index>(merge_norm_.size()) != out_features()) {
      detail::raise<error>(where, "no merge to undo: the norms are remembered by delta_weight");
    }
    for (index j = 0; j < out_features(); ++j) {
      if (magnitude_(0, j) == T{0}) {
        detail::raise<error>(where, "magnitude[" + std::to_string(j) +
                                        "] is 0: the merged row is zero and W0's row cannot be recovered");
      }
    }
    low_rank::delta(lora_.low_rank(), dw);  // s B A
    std::vector<T> row(static_cast<std::size_t>(in_features()));
    for (index j = 0; j < out_features(); ++j) {
      merged.dequantize_row(j, row.data());
      const T f = (magnitude_(0, j) - merge_norm_[static_cast<std::size_t>(j)]) / magnitude_(0, j);
      for (index c = 0; c < in_features(); ++c) dw(j, c) += f * row[static_cast<std::size_t>(c)];
    }
  }

  /// DoRA never changes the bias (PEFT has no lora_bias with DoRA): false, db untouched.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// lora_A.weight, lora_B.weight, lora_magnitude_vector (a vector of out values). Invalidates
  /// cached norms: callers may change the values through these views.
  std::vector<parameter<T>> parameters() {
    invalidate_norms();
    std::vector<parameter<T>> p = lora_.parameters();
    p.push_back({"lora_magnitude_vector", magnitude_.view(), grad_m_.view(), detail::shape_of(magnitude_.view(), true)});
    return p;
  }

  /// Zeroes every gradient; also invalidates cached norms (a training step changed the values).
  void zero_grad() {
    lora_.zero_grad();
    grad_m_.fill(T{0});
    invalidate_norms();
  }

 private:
  /// Below this fraction of ||w_j||^2 + s^2 ||B_j A||^2, n_j^2 is recomputed directly.
  static constexpr double cancellation_limit = 1e-2;

  /// A (r, in), B (out, r) and B A A^T (out, r) in double: what every row norm needs.
  struct factors_in_double {
    matrix<double> a, b, bg;
  };
  factors_in_double widened_factors() const {
    factors_in_double f{widen(lora_.A()), widen(lora_.B()), matrix<double>(out_features(), rank())};
    matrix<double> gram(rank(), rank());  // A A^T
    kernels::gemm_nt<double, double>(1.0, f.a.view(), f.a.view(), 0.0, gram.view());
    kernels::gemm_nn<double, double>(1.0, f.b.view(), gram.view(), 0.0, f.bg.view());
    return f;
  }

  static matrix<double> widen(matrix_view<const T> v) {
    matrix<double> m(v.rows(), v.cols());
    for (index i = 0; i < v.rows(); ++i) {
      for (index j = 0; j < v.cols(); ++j) m(i, j) = static_cast<double>(v(i, j));
    }
    return m;
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

  /// DoRA's fused epilogue: on a tile of h = x W0^T + b0 it stores z = h - b0 and l = s t B^T
  /// (the low-rank epilogue on a zeroed tile of l) for backward, then writes h + (k - 1) z + k l.
  template <class Base>
  struct rescale_epilogue {
    const Base& w;
    kernels::low_rank_epilogue<T> low_rank;
    cache_type& cache;
    void operator()(index i0, index j0, matrix_view<T> tile) const {
      matrix_view<T> z = cache.z.view().block(i0, j0, tile.rows(), tile.cols());
      matrix_view<T> l = cache.l.view().block(i0, j0, tile.rows(), tile.cols());
      for (index i = 0; i < tile.rows(); ++i) {
        for (index j = 0; j < tile.cols(); ++j) {
          z(i, j) = tile(i, j) - w.template bias_value<T>(j0 + j);
          l(i, j) = T{0};
        }
      }
      low_rank(i0, j0, l);
      for (index i = 0; i < tile.rows(); ++i) {
        for (index j = 0; j < tile.cols(); ++j) {
          const T k = kv(cache, j0 + j);
          tile(i, j) += (k - T{1}) * z(i, j) + k * l(i, j);
        }
      }
    }
  };

  static T kv(const cache_type& c, index j) { return c.k[static_cast<std::size_t>(j)]; }

  /// Fills cache.norm and cache.k: pinned norms, the cached ones, or freshly computed.
  template <class Base>
  void ensure_norms(const Base& w, cache_type& cache) const {
    const auto out = static_cast<std::size_t>(out_features());
    if (!pinned_.empty()) {
      cache.norm = pinned_;
      cache.invalidate();
    } else if (cache.stamp != stamp_ || cache.base != static_cast<const void*>(&w) || cache.norm.size() != out) {
      if constexpr (std::is_same_v<T, float> && fused_base_weight<Base, T>) {
        cache.norm = row_norms_with_cache(w, cache);
      } else {
        cache.norm = row_norms(w);
      }
      cache.stamp = stamp_;
      cache.base = &w;
    } else if (cache.k.size() == out) {
      return;  // n and k are current
    }
    cache.k.resize(out);
    for (std::size_t j = 0; j < out; ++j) cache.k[j] = magnitude_(0, static_cast<index>(j)) / cache.norm[j];
  }

  /// n, k, z = h - b0 and l = s x A^T B^T for this x.
  template <class Base>
  void prepare(const Base& w, matrix_view<const T> x, matrix_view<const T> h, cache_type& cache) const {
    ensure_norms(w, cache);
    const index batch = x.rows(), out = out_features();
    if (cache.z.rows() != batch || cache.z.cols() != out) cache.z = matrix<T>(batch, out);
    if (cache.l.rows() != batch || cache.l.cols() != out) cache.l = matrix<T>(batch, out);
    for (index i = 0; i < batch; ++i) {
      for (index j = 0; j < out; ++j) cache.z(i, j) = h(i, j) - w.template bias_value<T>(j);
    }
    cache.l.fill(T{0});
    low_rank::add(lora_.low_rank(), x, cache.l.view(), cache.low_rank);
  }

  bool prepared(const cache_type& cache, matrix_view<const T> x) const {
    const auto out = static_cast<std::size_t>(out_features());
    return cache.z.rows() == x.rows() && cache.z.cols() == out_features() && cache.l.rows() == x.rows() &&
           cache.k.size() == out && cache.norm.size() == out;
  }

  /// y += (k - 1) z + k l, after preparing the cache; h and y may be the same memory.
  template <class Base>
  void apply(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<T> y,
             cache_type& cache) const {
    prepare(w, x, h, cache);
    for (index i = 0; i < y.rows(); ++i) {
      for (index j = 0; j < y.cols(); ++j) {
        const T k = kv(cache, j);
        y(i, j) += (k - T{1}) * cache.z(i, j) + k * cache.l(i, j);
      }
    }
  }

  static matrix<T> scaled_grad(matrix_view<const T> g, const cache_type& cache) {
    matrix<T> kg(g.rows(), g.cols());  // (batch, out)
    for (index i = 0; i < g.rows(); ++i) {
      for (index j = 0; j < g.cols(); ++j) kg(i, j) = kv(cache, j) * g(i, j);
    }
    return kg;
  }

  /// dm_j += sum_i g_ij (z_ij + l_ij) / n_j.
  void accumulate_magnitude_grad(matrix_view<const T> g, const cache_type& cache) {
    for (index j = 0; j < g.cols(); ++j) {
      double sum = 0.0;
      for (index i = 0; i < g.rows(); ++i) {
        sum += static_cast<double>(g(i, j)) * static_cast<double>(cache.z(i, j) + cache.l(i, j));
      }
      grad_m_(0, j) += static_cast<T>(sum / static_cast<double>(cache.norm[static_cast<std::size_t>(j)]));
    }
  }

  lora<T> lora_;                      // A (r, in), B (out, r), s, dA, dB
  matrix<T> magnitude_;               // m (1, out)
  matrix<T> grad_m_;                  // dm (1, out)
  std::vector<T> pinned_;             // pinned n (out) or empty
  std::uint64_t stamp_ = detail::next_dora_stamp();
  mutable std::vector<T> merge_norm_;  // n' of the last delta_weight, for unmerge_delta
};


}  // namespace peft
