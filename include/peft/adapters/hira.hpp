// peft/adapters/hira.hpp — HiRA, Hadamard high-rank adaptation (Huang et al., ICLR 2025), as
// HuggingFace PEFT 0.21 computes it.
//
//   y = x W0^T + b0 + x (W0 * (B A))^T      (* elementwise; no alpha, no scale)
//   A (r, in) = hira_A, B (out, r) = hira_B; merged W' = W0 * (1 + B A)
//
//   peft::hira<float> a(in, out, {.rank = 8});   // PEFT's init: A kaiming-uniform, B = 0 (a no-op)
//
// The term reads the frozen weight W0 itself, so the passes are written here (not additive):
// W0 is decoded through the base's dequantize_row a panel of rows at a time, whatever its format,
// and the effective delta W0 * (B A) is formed one panel at a time, never whole. Merging is
// undone from the merged weight (unmerge_delta). Checkpoints: io/peft/hira.hpp. Details:
// docs/methods/hira.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/core/weight_term_adapter.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// PEFT's `init_weights`: true (A kaiming-uniform, B = 0: a no-op), "gaussian" (A normal with
/// std 1 / r, B = 0), false (A and B standard normal, torch.randn).
enum class hira_init : std::uint8_t { standard, gaussian, random };

template <compute_scalar T>
class hira;

/// PEFT's HiraConfig default r is 32.
struct hira_options {
  template <compute_scalar T>
  using adapter = hira<T>;  // the adapter these options make

  index rank = 32;
  hira_init init = hira_init::standard;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class hira : public weight_term_adapter<hira<T>, T> {
  friend class weight_term_adapter<hira<T>, T>;

 public:
  using scalar = T;
  static constexpr std::string_view method = "hira";

  /// Nothing: backward decodes W0 and forms B A again, a panel at a time.
  struct cache_type {};

  hira() = default;

  /// A fresh adapter for an (out, in) linear layer, initialised as PEFT does (values from
  /// peft::rng, not torch's generator).
  hira(index in_features, index out_features, const hira_options& opt) {
    constexpr const char* where = "hira::hira";
    if (in_features < 1 || out_features < 1) {
      detail::raise<shape_error>(where, "in_features and out_features must be >= 1, got " + std::to_string(in_features) +
                                            " and " + std::to_string(out_features));
    }
    if (opt.rank < 1) detail::raise<shape_error>(where, "rank must be >= 1, got " + std::to_string(opt.rank));
    a_ = matrix<T>(opt.rank, in_features);
    b_ = matrix<T>(out_features, opt.rank);
    rng gen(opt.seed);
    switch (opt.init) {
      case hira_init::standard: {
        const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));  // kaiming-uniform, a = sqrt 5
        for (auto& v : a_.storage()) v = static_cast<T>(gen.uniform(-bound, bound));
        break;
      }
      case hira_init::gaussian:
        for (auto& v : a_.storage()) v = static_cast<T>(gen.normal(0.0, 1.0 / static_cast<double>(opt.rank)));
        break;
      case hira_init::random:
        for (auto& v : a_.storage()) v = static_cast<T>(gen.normal());
        for (auto& v : b_.storage()) v = static_cast<T>(gen.normal());
        break;
    }
    finish();
  }

  /// An adapter from existing factors: A (r, in) = hira_A, B (out, r) = hira_B.
  hira(matrix<T> a, matrix<T> b) : a_(std::move(a)), b_(std::move(b)) {
    if (a_.rows() < 1 || a_.cols() < 1 || b_.rows() < 1 || b_.cols() != a_.rows()) {
      detail::raise<shape_error>("hira::hira", "hira_A " + detail::shape_string(a_.rows(), a_.cols()) + " and hira_B " +
                                                   detail::shape_string(b_.rows(), b_.cols()) +
                                                   " are not (r, in) and (out, r) with r, in, out >= 1");
    }
    finish();
  }

  index in_features() const noexcept { return a_.cols(); }
  index out_features() const noexcept { return b_.rows(); }
  index rank() const noexcept { return a_.rows(); }

  matrix_view<const T> A() const noexcept { return a_.view(); }
  matrix_view<const T> B() const noexcept { return b_.view(); }
  matrix_view<const T> grad_A() const noexcept { return ga_.view(); }
  matrix_view<const T> grad_B() const noexcept { return gb_.view(); }

  // forward, add_term, backward and backward_term: weight_term_adapter, over add_delta and
  // delta_backward below.

  /// dW = W0 * (B A) (out, in), W0 read a row at a time.
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("hira::delta_weight", w);
    detail::expect_shape("hira::delta_weight", "dw", dw, out_features(), in_features());
    kernels::gemm_nn<T, T>(1.0, b_.view(), a_.view(), 0.0, dw);  // B A
    std::vector<T> row(static_cast<std::size_t>(in_features()));
    for (index o = 0; o < out_features(); ++o) {
      w.dequantize_row(o, row.data());
      T* d = dw.row(o);
      for (index i = 0; i < in_features(); ++i) d[i] *= row[static_cast<std::size_t>(i)];
    }
  }

  /// HiRA does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// What merge added, recovered from the merged weight W' = W0 * (1 + P), P = B A:
  /// W' - W' / (1 + P) = W' * P / (1 + P). PEFT keeps a copy of W0 instead; this needs none.
  /// Throws peft::error where 1 + P is 0 (that entry of W0 is lost in W').
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    constexpr const char* where = "hira::unmerge_delta";
    check_base(where, merged);
    detail::expect_shape(where, "dw", dw, out_features(), in_features());
    kernels::gemm_nn<T, T>(1.0, b_.view(), a_.view(), 0.0, dw);  // P = B A
    std::vector<T> row(static_cast<std::size_t>(in_features()));
    for (index o = 0; o < out_features(); ++o) {
      merged.dequantize_row(o, row.data());
      T* d = dw.row(o);
      for (index i = 0; i < in_features(); ++i) {
        const T f = T{1} + d[i];
        if (f == T{0}) {
          detail::raise<error>(where, "1 + (B A)[" + std::to_string(o) + ", " + std::to_string(i) +
                                          "] is 0: the merged weight no longer holds W0 there");
        }
        d[i] = row[static_cast<std::size_t>(i)] * d[i] / f;
      }
    }
  }

  /// hira_A (r, in), hira_B (out, r): PEFT's names (no ".weight").
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"hira_A", a_.view(), ga_.view(), detail::shape_of(a_.view(), false)});
    p.push_back({"hira_B", b_.view(), gb_.view(), detail::shape_of(b_.view(), false)});
    return p;
  }

  void zero_grad() {
    ga_.fill(T{0});
    gb_.fill(T{0});
  }

 private:
  void finish() {
    ga_ = matrix<T>(a_.rows(), a_.cols());
    gb_ = matrix<T>(b_.rows(), b_.cols());
  }
  void check_ready(const char* where) const {
    if (a_.empty()) detail::raise<error>(where, "the adapter is default-constructed (no factors)");
  }
  using checks = detail::adapter_checks<hira, T>;  // check_base / check_io / check_grad
  friend checks;
  using checks::check_base;
  using checks::check_io;
  using checks::check_grad;

  /// Rows of W0 per panel: about 256 Ki values of T per panel buffer.
  index panel_rows() const noexcept {
    return std::clamp<index>((index{1} << 18) / std::max<index>(in_features(), 1), 1, out_features());
  }
  /// For each panel of rows [o0, o0 + p) of W0: w0 = W0[o0.., :] (p, in) decoded, e = w0 * P[o0..]
  /// with P = B A; calls f(o0, p, w0, e).
  template <class Base, class F>
  void for_each_panel(const Base& w, F&& f) const {
    const index in = in_features(), out = out_features(), panel = panel_rows();
    matrix<T> w0(panel, in), e(panel, in);
    for (index o0 = 0; o0 < out; o0 += panel) {
      const index p = std::min(panel, out - o0);
      auto w0v = w0.view().row_block(0, p);
      auto ev = e.view().row_block(0, p);
      for (index o = 0; o < p; ++o) w.dequantize_row(o0 + o, w0v.row(o));
      kernels::gemm_nn<T, T>(1.0, b_.view().row_block(o0, p), a_.view(), 0.0, ev);  // P[o0..] = B[o0..] A
      for (index o = 0; o < p; ++o) {
        const T* wr = w0v.row(o);
        T* er = ev.row(o);
        for (index i = 0; i < in; ++i) er[i] *= wr[i];
      }
      f(o0, p, matrix_view<const T>(w0v), matrix_view<const T>(ev));
    }
  }

  /// y += x E^T, E = W0 * (B A), panel by panel.
  template <class Base>
  void add_delta(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& /*cache*/) const {
    const index batch = x.rows();
    for_each_panel(w, [&](index o0, index p, matrix_view<const T> /*w0*/, matrix_view<const T> e) {
      kernels::gemm_nt<T, T>(1.0, x, e, 1.0, y.block(0, o0, batch, p));
    });
  }
  /// With N = W0 * (g^T x): dB += N A^T, dA += B^T N; dx += g E. Panel by panel.
  template <class Base>
  void delta_backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                      cache_type& /*cache*/) {
    const index batch = x.rows(), in = in_features();
    matrix<T> n(std::min(panel_rows(), out_features()), in);
    for_each_panel(w, [&](index o0, index p, matrix_view<const T> w0, matrix_view<const T> e) {
      const auto gp = g.block(0, o0, batch, p);
      kernels::gemm_nn<T, T>(1.0, gp, e, 1.0, dx);  // dx += g[:, panel] E[panel]
      auto nv = n.view().row_block(0, p);
      kernels::gemm_tn<T>(1.0, gp, x, 0.0, nv);  // g[:, panel]^T x
      for (index o = 0; o < p; ++o) {
        const T* wr = w0.row(o);
        T* nr = nv.row(o);
        for (index i = 0; i < in; ++i) nr[i] *= wr[i];
      }
      kernels::gemm_nt<T, T>(1.0, matrix_view<const T>(nv), a_.view(), 1.0, gb_.view().row_block(o0, p));
      kernels::gemm_tn<T>(1.0, b_.view().row_block(o0, p), matrix_view<const T>(nv), 1.0, ga_.view());
    });
  }

  matrix<T> a_;  // (r, in): hira_A
  matrix<T> b_;  // (out, r): hira_B
  matrix<T> ga_;  // gradients, same shapes
  matrix<T> gb_;
};

}  // namespace peft
