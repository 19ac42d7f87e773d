// peft/adapters/glora.hpp — GLoRA, generalised LoRA (Chavan et al., 2023), as HuggingFace PEFT
// 0.21.2 computes it (tuners/glora).
//
//   W' = W0 + W0 * A + B,   b' = b0 + b0 * D + E + W0 C     (* elementwise, broadcast)
//   y = x W0^T + b0 + x (W0 * A + B)^T + [base has a bias] (b0 * D + E + W0 C)
//
// Each support tensor is one "path": A, B (out, in) are lora (Xd (out, r) Xu (r, in)), vector
// (X (out, 1), broadcast along a row), constant (X (1)) or none; C (in, 1) is lora (Xd (in, r),
// Xu (r, 1)), vector (X (in, 1)) or none; D, E (out) are vector (X (out)), constant or none.
// "none" keeps PEFT's zero buffer ("zeros", saved in checkpoints, never trained). As in PEFT, C,
// D and E act only on a base with a bias.
//
//   peft::glora<float> a(in, out, {.rank = 4});   // PEFT's init: Xd, vectors, constants 0 (a no-op)
//
// The term reads W0 itself, so the passes are written here: W0 is decoded a panel of rows at a
// time through the base's dequantize_row and W0 * A + B is formed one panel at a time. Merging is
// undone from the merged weight (unmerge_delta). Checkpoints: io/peft/glora.hpp. Details:
// docs/methods/glora.md.
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

/// How one support tensor is parameterised (PEFT's config_A_B / config_C / config_D_E values).
enum class glora_path : std::uint8_t { lora, vector, constant, none };

/// PEFT's spelling of a path kind.
inline std::string_view glora_path_name(glora_path k) noexcept {
  switch (k) {
    case glora_path::lora: return "lora";
    case glora_path::vector: return "vector";
    case glora_path::constant: return "constant";
    case glora_path::none: return "none";
  }
  return "none";
}

template <compute_scalar T>
class glora;

/// PEFT's GloraConfig defaults: r 8, config_A_B "lora", config_C "lora", config_D_E "constant",
/// init_weights true. init_weights false: kaiming-uniform (a = sqrt 5) for Xd and the vectors,
/// N(0, 0.02^2) for the constants (values from peft::rng, not torch's generator).
struct glora_options {
  template <compute_scalar T>
  using adapter = glora<T>;  // the adapter these options make

  index rank = 8;
  glora_path a_b = glora_path::lora;
  glora_path c = glora_path::lora;
  glora_path d_e = glora_path::constant;
  bool init_weights = true;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class glora : public weight_term_adapter<glora<T>, T> {
  friend class weight_term_adapter<glora<T>, T>;

 public:
  using scalar = T;
  static constexpr std::string_view method = "glora";

  /// Which tensor of the five: A, B (weight-shaped), C (in, 1), D, E (bias-shaped).
  enum class slot : std::uint8_t { a, b, c, d, e };

  /// One support tensor: `kind` and its values (the unused matrices stay empty). x is (out, 1)
  /// for a weight-shaped vector, (in, 1) for C's, (1, out) for a bias-shaped one and (1, 1) for
  /// a constant; zeros is PEFT's buffer of the materialised shape ((out, in), (in, 1), (1, out)).
  struct path {
    glora_path kind = glora_path::none;
    matrix<T> xd, xu, x, zeros;
    matrix<T> gxd, gxu, gx;
  };

  /// Nothing: backward decodes W0 and forms the support tensors again, a panel at a time.
  struct cache_type {};

  glora() = default;

  /// A fresh adapter for an (out, in) linear layer, initialised as PEFT does.
  glora(index in_features, index out_features, const glora_options& opt) {
    constexpr const char* where = "glora::glora";
    if (in_features < 1 || out_features < 1) {
      detail::raise<shape_error>(where, "in_features and out_features must be >= 1, got " + std::to_string(in_features) +
                                            " and " + std::to_string(out_features));
    }
    if (opt.c == glora_path::constant) {
      detail::raise<error>(where, "config_C cannot be 'constant' (PEFT allows lora, vector, none)");
    }
    if (opt.d_e == glora_path::lora) detail::raise<error>(where, "config_D_E cannot be 'lora' (PEFT allows vector, constant, none)");
    const bool any_lora = opt.a_b == glora_path::lora || opt.c == glora_path::lora;
    if (any_lora && opt.rank < 1) detail::raise<shape_error>(where, "rank must be >= 1, got " + std::to_string(opt.rank));
    in_ = in_features;
    out_ = out_features;
    rank_ = any_lora ? opt.rank : 0;
    rng gen(opt.seed);
    const bool zero = opt.init_weights;
    auto kaiming = [&](matrix<T>& m, index fan_in) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
      for (auto& v : m.storage()) v = static_cast<T>(gen.uniform(-bound, bound));
    };
    auto make = [&](path& p, glora_path kind, index rows, index cols, bool bias_shaped) {
      p.kind = kind;
      switch (kind) {
        case glora_path::lora:
          p.xd = matrix<T>(rows, opt.rank);
          p.xu = matrix<T>(opt.rank, cols);
          kaiming(p.xu, cols);
          if (!zero) kaiming(p.xd, opt.rank);
          break;
        case glora_path::vector:
          p.x = bias_shaped ? matrix<T>(1, rows) : matrix<T>(rows, 1);
          if (!zero) kaiming(p.x, bias_shaped ? rows : 1);  // PEFT: a 1-D vector as (1, n), fan_in n
          break;
        case glora_path::constant:
          p.x = matrix<T>(1, 1);
          if (!zero) p.x(0, 0) = static_cast<T>(gen.normal(0.0, 0.02));
          break;
        case glora_path::none:
          p.zeros = bias_shaped ? matrix<T>(1, rows) : matrix<T>(rows, cols);
          break;
      }
    };
    make(paths_[0], opt.a_b, out_, in_, false);
    make(paths_[1], opt.a_b, out_, in_, false);
    make(paths_[2], opt.c, in_, 1, false);
    make(paths_[3], opt.d_e, out_, 1, true);
    make(paths_[4], opt.d_e, out_, 1, true);
    finish();
  }

  /// An adapter from existing paths (A, B, C, D, E) for an (out, in) layer: shapes are checked
  /// against `kind` as described at `path`; rank is the lora paths' (all equal). in or out 0:
  /// taken from the paths; out may stay unknown (0) when A, B, D, E are all constants, until
  /// set_features binds it.
  glora(index in_features, index out_features, path a, path b, path c, path d, path e)
      : paths_{std::move(a), std::move(b), std::move(c), std::move(d), std::move(e)}, in_(in_features), out_(out_features) {
    constexpr const char* where = "glora::glora";
    if (in_ < 0 || out_ < 0) {
      detail::raise<shape_error>(where, "in_features and out_features must be >= 0, got " + std::to_string(in_) + " and " +
                                            std::to_string(out_));
    }
    if (in_ == 0) in_ = inferred_in();
    if (out_ == 0) out_ = inferred_out();
    if (in_ < 1) detail::raise<shape_error>(where, "in_features is not given and no path has it");
    rank_ = 0;
    for (int s = 0; s < 5; ++s) check_path(where, static_cast<slot>(s));
    finish();
  }

  /// Binds the layer's shape (the loader calls it with the base's): out_features when the paths
  /// leave it unknown; shape_error when it contradicts a known one.
  void set_features(index in_features, index out_features) {
    if (in_features != in_ || (out_ != 0 && out_features != out_)) {
      detail::raise<shape_error>("glora::set_features", "the base is " + detail::shape_string(out_features, in_features) +
                                                             " but the adapter is " + detail::shape_string(out_, in_));
    }
    out_ = out_features;
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  /// The lora paths' rank; 0 when no path is lora.
  index rank() const noexcept { return rank_; }
  const path& get(slot s) const noexcept { return paths_[static_cast<int>(s)]; }
  glora_path kind(slot s) const noexcept { return get(s).kind; }
  static std::string_view slot_name(slot s) noexcept {
    constexpr std::string_view names[] = {"glora_A", "glora_B", "glora_C", "glora_D", "glora_E"};
    return names[static_cast<int>(s)];
  }

  // forward, add_term, backward and backward_term: weight_term_adapter, over add_delta and
  // delta_backward below.

  /// dW = W0 * A + B (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("glora::delta_weight", w);
    detail::expect_shape("glora::delta_weight", "dw", dw, out_, in_);
    for_each_panel(w, [&](index o0, index p, matrix_view<const T> /*w0*/, matrix_view<const T> e) {
      for (index o = 0; o < p; ++o) std::copy(e.row(o), e.row(o) + in_, dw.row(o0 + o));
    });
  }

  /// Whether merging changes a base bias: C, D or E is not none.
  bool touches_bias() const noexcept {
    return kind(slot::c) != glora_path::none || kind(slot::d) != glora_path::none || kind(slot::e) != glora_path::none;
  }

  /// db = b0 * D + E + W0 C (out); false (db untouched) for a base without a bias.
  template <base_weight Base>
  bool delta_bias(const Base& w, T* db) const {
    check_base("glora::delta_bias", w);
    if (!w.has_bias()) return false;
    const std::vector<T> c = c_vector();
    std::vector<T> row(static_cast<std::size_t>(in_));
    for (index o = 0; o < out_; ++o) {
      w.dequantize_row(o, row.data());
      db[o] = bias_shift(w.template bias_value<T>(o), o) + dot(row.data(), c.data());
    }
    return true;
  }

  /// What merge added, from the merged weight W' = W0 (1 + A) + B: W0 = (W' - B) / (1 + A), so
  /// dW = W' - W0. Throws peft::error where 1 + A is 0 (W0 is lost there).
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    constexpr const char* where = "glora::unmerge_delta";
    check_base(where, merged);
    detail::expect_shape(where, "dw", dw, out_, in_);
    std::vector<T> row(static_cast<std::size_t>(in_));
    for (index o = 0; o < out_; ++o) {
      merged.dequantize_row(o, row.data());
      recover_row(where, o, row.data(), dw.row(o));
      for (index i = 0; i < in_; ++i) dw(o, i) = row[static_cast<std::size_t>(i)] - dw(o, i);
    }
  }

  /// What merge added to the bias, from the merged layer: with W0 recovered as in unmerge_delta,
  /// b0 = (b' - E - W0 C) / (1 + D), db = b' - b0. False for a base without a bias.
  template <base_weight Base>
  bool unmerge_delta_bias(const Base& merged, T* db) const {
    constexpr const char* where = "glora::unmerge_delta_bias";
    check_base(where, merged);
    if (!merged.has_bias()) return false;
    const std::vector<T> c = c_vector();
    std::vector<T> row(static_cast<std::size_t>(in_)), w0(static_cast<std::size_t>(in_));
    for (index o = 0; o < out_; ++o) {
      merged.dequantize_row(o, row.data());
      recover_row(where, o, row.data(), w0.data());
      const T f = T{1} + value_of(get(slot::d), o);
      if (f == T{0}) {
        detail::raise<error>(where, "1 + D[" + std::to_string(o) + "] is 0: the merged bias no longer holds b0 there");
      }
      const T b = merged.template bias_value<T>(o);
      db[o] = b - (b - value_of(get(slot::e), o) - dot(w0.data(), c.data())) / f;
    }
    return true;
  }

  /// PEFT's names: glora_A.Xd / glora_A.Xu (lora), glora_A.X (vector, constant), glora_A.zeros
  /// (none: a frozen buffer), likewise for B, C, D, E.
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> out;
    for (int s = 0; s < 5; ++s) {
      path& p = paths_[s];
      const std::string n(slot_name(static_cast<slot>(s)));
      const bool bias_shaped = s >= 3;
      switch (p.kind) {
        case glora_path::lora:
          out.push_back({n + ".Xd", p.xd.view(), p.gxd.view(), detail::shape_of(p.xd.view(), false)});
          out.push_back({n + ".Xu", p.xu.view(), p.gxu.view(), detail::shape_of(p.xu.view(), false)});
          break;
        case glora_path::vector:
          out.push_back({n + ".X", p.x.view(), p.gx.view(), detail::shape_of(p.x.view(), bias_shaped)});
          break;
        case glora_path::constant:
          out.push_back({n + ".X", p.x.view(), p.gx.view(), detail::shape_of(p.x.view(), true)});
          break;
        case glora_path::none: {
          parameter<T> z{n + ".zeros", p.zeros.view(), {}, detail::shape_of(p.zeros.view(), bias_shaped)};
          z.trainable = false;
          out.push_back(std::move(z));
          break;
        }
      }
    }
    return out;
  }

  void zero_grad() {
    for (auto& p : paths_) {
      p.gxd.fill(T{0});
      p.gxu.fill(T{0});
      p.gx.fill(T{0});
    }
  }

 private:
  void finish() {
    for (auto& p : paths_) {
      p.gxd = matrix<T>(p.xd.rows(), p.xd.cols());
      p.gxu = matrix<T>(p.xu.rows(), p.xu.cols());
      p.gx = matrix<T>(p.x.rows(), p.x.cols());
    }
  }

  /// The shapes of path s against its kind (constructor from paths).
  void check_path(const char* where, slot s) {
    path& p = paths_[static_cast<int>(s)];
    const std::string n(slot_name(s));
    const bool weight = s == slot::a || s == slot::b, bias = s == slot::d || s == slot::e;
    const index rows = weight ? out_ : (s == slot::c ? in_ : 1);
    const index cols = weight ? in_ : (s == slot::c ? 1 : out_);
    auto bad = [&](const std::string& what) {
      detail::raise<shape_error>(where, n + " (" + std::string(glora_path_name(p.kind)) + "): " + what);
    };
    if (out_ == 0 && s != slot::c && p.kind != glora_path::constant) bad("out_features is not given");
    switch (p.kind) {
      case glora_path::lora: {
        if (bias) bad("a bias-shaped path cannot be lora");
        const index r = p.xd.cols();
        if (p.xd.rows() != rows || p.xu.rows() != r || p.xu.cols() != cols || r < 1) {
          bad("Xd " + detail::shape_string(p.xd.rows(), p.xd.cols()) + " and Xu " +
              detail::shape_string(p.xu.rows(), p.xu.cols()) + " are not (" + std::to_string(rows) + ", r) and (r, " + std::to_string(cols) + ")");
        }
        if (rank_ != 0 && r != rank_) bad("rank " + std::to_string(r) + " differs from another path's " + std::to_string(rank_));
        rank_ = r;
        break;
      }
      case glora_path::vector: {
        if (s == slot::c || weight) {
          if (p.x.rows() != rows || p.x.cols() != 1) bad("X is " + detail::shape_string(p.x.rows(), p.x.cols()) +
                                                         ", expected " + detail::shape_string(rows, 1));
        } else if (p.x.rows() != 1 || p.x.cols() != out_) {
          bad("X is " + detail::shape_string(p.x.rows(), p.x.cols()) + ", expected " + detail::shape_string(1, out_));
        }
        break;
      }
      case glora_path::constant:
        if (s == slot::c) bad("C cannot be constant");
        if (p.x.rows() != 1 || p.x.cols() != 1) bad("X is " + detail::shape_string(p.x.rows(), p.x.cols()) + ", expected one value");
        break;
      case glora_path::none:
        if (p.zeros.empty()) p.zeros = matrix<T>(rows, cols);
        if (p.zeros.rows() != rows || p.zeros.cols() != cols) {
          bad("zeros is " + detail::shape_string(p.zeros.rows(), p.zeros.cols()) + ", expected " +
              detail::shape_string(rows, cols));
        }
        break;
    }
  }

  void check_ready(const char* where) const {
    if (in_ == 0) detail::raise<error>(where, "the adapter is default-constructed (no paths)");
    if (out_ == 0) {
      detail::raise<error>(where, "out_features is unknown (A, B, D and E are constants): call set_features first");
    }
  }

  /// in from the paths that carry it (A, B lora / none, C), else 0.
  index inferred_in() const {
    for (int s = 0; s < 2; ++s) {
      const path& p = paths_[s];
      if (p.kind == glora_path::lora) return p.xu.cols();
      if (p.kind == glora_path::none && !p.zeros.empty()) return p.zeros.cols();
    }
    const path& c = paths_[2];
    if (c.kind == glora_path::lora) return c.xd.rows();
    if (c.kind == glora_path::vector) return c.x.rows();
    return c.zeros.rows();
  }
  /// out from the paths that carry it (A, B lora / vector / none, D, E vector / none), else 0.
  index inferred_out() const {
    for (int s = 0; s < 2; ++s) {
      const path& p = paths_[s];
      if (p.kind == glora_path::lora) return p.xd.rows();
      if (p.kind == glora_path::vector) return p.x.rows();
      if (p.kind == glora_path::none && !p.zeros.empty()) return p.zeros.rows();
    }
    for (int s = 3; s < 5; ++s) {
      const path& p = paths_[s];
      if (p.kind == glora_path::vector) return p.x.cols();
      if (p.kind == glora_path::none && !p.zeros.empty()) return p.zeros.cols();
    }
    return 0;
  }
  using checks = detail::adapter_checks<glora, T>;  // check_base / check_io / check_grad
  friend checks;
  using checks::check_base;
  using checks::check_io;
  using checks::check_grad;

  static T dot(const T* a, const T* b, index n) {
    T s{0};
    for (index i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }
  T dot(const T* a, const T* b) const { return dot(a, b, in_); }

  /// Element j of a bias-shaped path (D, E): 0 for none.
  static T value_of(const path& p, index j) {
    switch (p.kind) {
      case glora_path::vector: return p.x(0, j);
      case glora_path::constant: return p.x(0, 0);
      default: return T{0};
    }
  }
  /// b0_j D_j + E_j.
  T bias_shift(T b0, index j) const { return b0 * value_of(get(slot::d), j) + value_of(get(slot::e), j); }

  /// C as an in-vector: Xd Xu, X, or zeros.
  std::vector<T> c_vector() const {
    const path& p = get(slot::c);
    std::vector<T> c(static_cast<std::size_t>(in_), T{0});
    if (p.kind == glora_path::vector) {
      for (index i = 0; i < in_; ++i) c[static_cast<std::size_t>(i)] = p.x(i, 0);
    } else if (p.kind == glora_path::lora) {
      for (index i = 0; i < in_; ++i) c[static_cast<std::size_t>(i)] = dot(p.xd.row(i), p.xu.data(), p.xd.cols());
    }
    return c;
  }

  /// Rows [o0, o0 + m) of a weight-shaped path's matrix into `dst` (m, in), (beta 0).
  void fill_rows(const path& p, index o0, matrix_view<T> dst) const {
    switch (p.kind) {
      case glora_path::lora:
        kernels::gemm_nn<T, T>(1.0, p.xd.view().row_block(o0, dst.rows()), p.xu.view(), 0.0, dst);
        break;
      case glora_path::vector:
        for (index o = 0; o < dst.rows(); ++o) std::fill(dst.row(o), dst.row(o) + in_, p.x(o0 + o, 0));
        break;
      case glora_path::constant:
        for (index o = 0; o < dst.rows(); ++o) std::fill(dst.row(o), dst.row(o) + in_, p.x(0, 0));
        break;
      case glora_path::none:
        for (index o = 0; o < dst.rows(); ++o) std::fill(dst.row(o), dst.row(o) + in_, T{0});
        break;
    }
  }

  /// Row o of W0 from the merged row `merged` (in values) into `w0`.
  void recover_row(const char* where, index o, const T* merged, T* w0) const {
    matrix<T> a(1, in_), b(1, in_);
    fill_rows(get(slot::a), o, a.view());
    fill_rows(get(slot::b), o, b.view());
    for (index i = 0; i < in_; ++i) {
      const T f = T{1} + a(0, i);
      if (f == T{0}) {
        detail::raise<error>(where, "1 + A[" + std::to_string(o) + ", " + std::to_string(i) +
                                        "] is 0: the merged weight no longer holds W0 there");
      }
      w0[i] = (merged[i] - b(0, i)) / f;
    }
  }

  /// Rows of W0 per panel: about 256 Ki values of T per panel buffer.
  index panel_rows() const noexcept { return std::clamp<index>((index{1} << 18) / std::max<index>(in_, 1), 1, out_); }

  /// For each panel of rows [o0, o0 + p): w0 = W0[o0.., :] decoded and e = w0 * A + B there;
  /// calls f(o0, p, w0, e).
  template <class Base, class F>
  void for_each_panel(const Base& w, F&& f) const {
    const index panel = panel_rows();
    matrix<T> w0(panel, in_), e(panel, in_), b(panel, in_);
    for (index o0 = 0; o0 < out_; o0 += panel) {
      const index p = std::min(panel, out_ - o0);
      auto w0v = w0.view().row_block(0, p);
      auto ev = e.view().row_block(0, p);
      auto bv = b.view().row_block(0, p);
      for (index o = 0; o < p; ++o) w.dequantize_row(o0 + o, w0v.row(o));
      fill_rows(get(slot::a), o0, ev);
      fill_rows(get(slot::b), o0, bv);
      for (index o = 0; o < p; ++o) {
        const T* wr = w0v.row(o);
        const T* br = bv.row(o);
        T* er = ev.row(o);
        for (index i = 0; i < in_; ++i) er[i] = er[i] * wr[i] + br[i];
      }
      f(o0, p, matrix_view<const T>(w0v), matrix_view<const T>(ev));
    }
  }

  /// y += x E^T with E = W0 * A + B, panel by panel; then the bias term on every row.
  template <class Base>
  void add_delta(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& /*cache*/) const {
    const index batch = x.rows();
    const bool bias = w.has_bias();
    const std::vector<T> c = bias ? c_vector() : std::vector<T>{};
    std::vector<T> shift(static_cast<std::size_t>(out_), T{0});
    for_each_panel(w, [&](index o0, index p, matrix_view<const T> w0, matrix_view<const T> e) {
      kernels::gemm_nt<T, T>(1.0, x, e, 1.0, y.block(0, o0, batch, p));
      if (!bias) return;
      for (index o = 0; o < p; ++o) {
        shift[static_cast<std::size_t>(o0 + o)] = bias_shift(w.template bias_value<T>(o0 + o), o0 + o) + dot(w0.row(o), c.data());
      }
    });
    if (!bias) return;
    for (index i = 0; i < batch; ++i) {
      for (index j = 0; j < out_; ++j) y(i, j) += shift[static_cast<std::size_t>(j)];
    }
  }

  /// The gradient d (rows [o0, o0 + m), in) of a weight-shaped path's matrix, reduced onto its
  /// parameters: lora dXd += d Xu^T, dXu += Xd^T d; vector row sums; constant the total.
  void accumulate(path& p, index o0, matrix_view<const T> d) {
    switch (p.kind) {
      case glora_path::lora:
        kernels::gemm_nt<T, T>(1.0, d, p.xu.view(), 1.0, p.gxd.view().row_block(o0, d.rows()));
        kernels::gemm_tn<T>(1.0, matrix_view<const T>(p.xd.view().row_block(o0, d.rows())), d, 1.0, p.gxu.view());
        break;
      case glora_path::vector:
        for (index o = 0; o < d.rows(); ++o) p.gx(o0 + o, 0) += dot(d.row(o), ones_.data());
        break;
      case glora_path::constant:
        for (index o = 0; o < d.rows(); ++o) p.gx(0, 0) += dot(d.row(o), ones_.data());
        break;
      case glora_path::none:
        break;
    }
  }

  /// With N = g^T x (per panel): dB = N, dA = W0 * N, reduced onto each path; dx += g E. With a
  /// bias, s = column sums of g: dD = s * b0, dE = s (or their totals), dC = W0^T s.
  template <class Base>
  void delta_backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                      cache_type& /*cache*/) {
    const index batch = x.rows();
    const bool bias = w.has_bias();
    ones_.assign(static_cast<std::size_t>(in_), T{1});
    std::vector<T> s(static_cast<std::size_t>(out_), T{0});
    for (index i = 0; i < batch; ++i) {
      for (index j = 0; j < out_; ++j) s[static_cast<std::size_t>(j)] += g(i, j);
    }
    std::vector<T> dc(static_cast<std::size_t>(in_), T{0});
    matrix<T> n(std::min(panel_rows(), out_), in_);
    for_each_panel(w, [&](index o0, index p, matrix_view<const T> w0, matrix_view<const T> e) {
      const auto gp = g.block(0, o0, batch, p);
      kernels::gemm_nn<T, T>(1.0, gp, e, 1.0, dx);  // dx += g[:, panel] E[panel]
      auto nv = n.view().row_block(0, p);
      kernels::gemm_tn<T>(1.0, gp, x, 0.0, nv);  // N = g[:, panel]^T x
      accumulate(paths_[1], o0, matrix_view<const T>(nv));
      for (index o = 0; o < p; ++o) {
        const T* wr = w0.row(o);
        T* nr = nv.row(o);
        for (index i = 0; i < in_; ++i) nr[i] *= wr[i];
      }
      accumulate(paths_[0], o0, matrix_view<const T>(nv));
      if (!bias) return;
      for (index o = 0; o < p; ++o) {
        const T so = s[static_cast<std::size_t>(o0 + o)];
        const T* wr = w0.row(o);
        for (index i = 0; i < in_; ++i) dc[static_cast<std::size_t>(i)] += so * wr[i];
      }
    });
    if (!bias) return;
    path& pd = paths_[3];
    path& pe = paths_[4];
    for (index j = 0; j < out_; ++j) {
      const T sj = s[static_cast<std::size_t>(j)];
      const T b0 = w.template bias_value<T>(j);
      if (pd.kind == glora_path::vector) pd.gx(0, j) += sj * b0;
      if (pd.kind == glora_path::constant) pd.gx(0, 0) += sj * b0;
      if (pe.kind == glora_path::vector) pe.gx(0, j) += sj;
      if (pe.kind == glora_path::constant) pe.gx(0, 0) += sj;
    }
    path& pc = paths_[2];
    if (pc.kind == glora_path::vector) {
      for (index i = 0; i < in_; ++i) pc.gx(i, 0) += dc[static_cast<std::size_t>(i)];
    } else if (pc.kind == glora_path::lora) {
      for (index i = 0; i < in_; ++i) {
        const T d = dc[static_cast<std::size_t>(i)];
        for (index k = 0; k < pc.xd.cols(); ++k) {
          pc.gxd(i, k) += d * pc.xu(k, 0);
          pc.gxu(k, 0) += pc.xd(i, k) * d;
        }
      }
    }
  }

  path paths_[5];  // A, B, C, D, E
  index in_ = 0;
  index out_ = 0;
  index rank_ = 0;
  std::vector<T> ones_;  // in ones: row sums through dot
};

}  // namespace peft
