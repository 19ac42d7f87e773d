// peft/adapters/lokr.hpp — LoKr, low-rank Kronecker product (LyCORIS), as HuggingFace PEFT 0.21
// computes it.
//
//   y = x W0^T + b0 + s x (W1 kron W2)^T        s = alpha / r (also when W1 and W2 are full)
//   W1 (out_l, in_m): full, or (out_l, r) @ (r, in_m);  W2 (out_k, in_n): likewise with r
//   (out_l, out_k) = lokr_factorization(out), (in_m, in_n) = lokr_factorization(in)
//
//   peft::lokr<float> a(in, out, {.rank = 8, .alpha = 16});   // PEFT's init: W1 = 0, W2 random
//
// The passes come from additive_adapter; the (out, in) delta is never formed. Checkpoints:
// io/peft/lokr.hpp. Details (PEFT's factorization and choice of forms): docs/methods/lokr.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// PEFT's `factorization(dimension, factor)` (from LyCORIS): two numbers whose product is
/// `dimension`. factor > 0 dividing it gives (factor, dimension / factor) as is (unsorted);
/// otherwise the divisor pair (m <= n) closest to the square root, with m <= factor when
/// factor > 0 (factor == -1: no limit; 0 or < -1: (1, dimension)).
inline std::pair<index, index> lokr_factorization(index dimension, index factor = -1) {
  if (dimension < 1) {
    detail::raise<shape_error>("lokr_factorization", "dimension must be >= 1, got " + std::to_string(dimension));
  }
  if (factor > 0 && dimension % factor == 0) return {factor, dimension / factor};
  const index limit = factor == -1 ? dimension : factor;
  index m = 1, n = dimension;
  while (m < n) {
    index next = m + 1;
    while (dimension % next != 0) ++next;
    const index other = dimension / next;
    if (next + other > 1 + dimension || next > limit) break;  // the first test never fires (kept as PEFT has it)
    m = next;
    n = other;
  }
  if (m > n) std::swap(m, n);
  return {m, n};
}

/// PEFT's choice of forms (update_layer for nn.Linear): lokr_w1 is full unless decompose_both and
/// 2 r < max(out_l, in_m); lokr_w2 is full unless 2 r < max(out_k, in_n).
inline bool lokr_w1_full(index r, bool decompose_both, index out_l, index in_m) {
  return !(decompose_both && 2 * r < std::max(out_l, in_m));
}
inline bool lokr_w2_full(index r, index out_k, index in_n) { return !(2 * r < std::max(out_k, in_n)); }

/// PEFT's `init_weights`: true (W1 = 0 or lokr_w1_a = 0, the rest kaiming-uniform: a no-op),
/// "lycoris" (W2 = 0 or lokr_w2_b = 0: a no-op), false (everything kaiming-uniform).
enum class lokr_init : std::uint8_t { standard, lycoris, random };

template <compute_scalar T>
class lokr;

struct lokr_options {
  template <compute_scalar T>
  using adapter = lokr<T>;  // the adapter these options make

  index rank = 8;
  double alpha = 8.0;
  bool decompose_both = false;  // allow lokr_w1 to be low rank too
  index decompose_factor = -1;  // lokr_factorization's factor
  lokr_init init = lokr_init::standard;
  std::uint64_t seed = 0;
};

/// One Kronecker factor: `full`, or the low-rank product `a` @ `b` (then `full` is empty).
template <compute_scalar T>
struct lokr_factor {
  matrix<T> full;
  matrix<T> a;
  matrix<T> b;

  /// A full factor.
  static lokr_factor whole(matrix<T> m) { return {std::move(m), {}, {}}; }
  /// A low-rank factor a (rows, r) @ b (r, cols).
  static lokr_factor product(matrix<T> a, matrix<T> b) { return {{}, std::move(a), std::move(b)}; }
  bool decomposed() const noexcept { return full.empty(); }
  index rows() const noexcept { return decomposed() ? a.rows() : full.rows(); }
  index cols() const noexcept { return decomposed() ? b.cols() : full.cols(); }
};

template <compute_scalar T>
class lokr : public additive_adapter<lokr<T>, T> {
  friend class additive_adapter<lokr<T>, T>;

 public:
  static constexpr std::string_view method = "lokr";

  /// Nothing: backward recomputes X W2^T (a product of the size of the input).
  struct cache_type {};

  lokr() = default;

  /// A fresh adapter with PEFT's shapes and forms for an (out, in) linear layer.
  lokr(index in_features, index out_features, const lokr_options& opt)
      : rank_(checked_rank(opt.rank, "lokr::lokr")), alpha_(opt.alpha),
        scale_(static_cast<T>(opt.alpha / static_cast<double>(opt.rank))), decompose_both_(opt.decompose_both),
        factor_(opt.decompose_factor) {
    if (in_features < 1 || out_features < 1) {
      detail::raise<shape_error>("lokr::lokr", "in_features and out_features must be >= 1, got " +
                                                   detail::shape_string(out_features, in_features));
    }
    const auto [in_m, in_n] = lokr_factorization(in_features, factor_);
    const auto [out_l, out_k] = lokr_factorization(out_features, factor_);
    const bool full1 = lokr_w1_full(rank_, decompose_both_, out_l, in_m);
    const bool full2 = lokr_w2_full(rank_, out_k, in_n);
    rng gen(opt.seed);
    const bool zero1 = opt.init == lokr_init::standard;  // W1 (or its a) starts at zero
    const bool zero2 = opt.init == lokr_init::lycoris;   // W2 (or its b) starts at zero
    w1_ = full1 ? lokr_factor<T>::whole(init_matrix(out_l, in_m, zero1, gen))
                : lokr_factor<T>::product(init_matrix(out_l, rank_, zero1, gen), init_matrix(rank_, in_m, false, gen));
    w2_ = full2 ? lokr_factor<T>::whole(init_matrix(out_k, in_n, zero2, gen))
                : lokr_factor<T>::product(init_matrix(out_k, rank_, false, gen), init_matrix(rank_, in_n, zero2, gen));
    finish("lokr::lokr");
  }

  /// An adapter from existing factors. `rank` and `alpha` give s = alpha / rank (and, with
  /// decompose_both / decompose_factor, what PEFT's config must say when saving).
  lokr(lokr_factor<T> w1, lokr_factor<T> w2, index rank, double alpha, bool decompose_both = false,
       index decompose_factor = -1)
      : w1_(std::move(w1)), w2_(std::move(w2)), rank_(checked_rank(rank, "lokr::lokr")), alpha_(alpha),
        scale_(static_cast<T>(alpha / static_cast<double>(rank))), decompose_both_(decompose_both),
        factor_(decompose_factor) {
    finish("lokr::lokr");
  }

  index in_features() const noexcept { return w1_.cols() * w2_.cols(); }
  index out_features() const noexcept { return w1_.rows() * w2_.rows(); }
  index rank() const noexcept { return rank_; }
  double alpha() const noexcept { return alpha_; }
  T scale() const noexcept { return scale_; }
  bool decompose_both() const noexcept { return decompose_both_; }
  index decompose_factor() const noexcept { return factor_; }
  const lokr_factor<T>& w1() const noexcept { return w1_; }
  const lokr_factor<T>& w2() const noexcept { return w2_; }
  /// W1 (out_l, in_m) and W2 (out_k, in_n), formed.
  matrix<T> W1() const { return formed(w1_); }
  matrix<T> W2() const { return formed(w2_); }

  // forward, add_term, backward, backward_term: core/additive_adapter.hpp over the hooks below.

  /// dW = s W1 kron W2 (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("lokr::delta_weight", w);
    detail::expect_shape("lokr::delta_weight", "dw", dw, out_features(), in_features());
    const matrix<T> a = W1(), b = W2();
    for (index i = 0; i < a.rows(); ++i) {
      for (index p = 0; p < b.rows(); ++p) {
        T* row = dw.row(i * b.rows() + p);
        for (index j = 0; j < a.cols(); ++j) {
          const T sa = scale_ * a(i, j);
          for (index q = 0; q < b.cols(); ++q) row[j * b.cols() + q] = sa * b(p, q);
        }
      }
    }
  }

  /// LoKr does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// Named views: lokr_w1 or lokr_w1_a, lokr_w1_b; lokr_w2 or lokr_w2_a, lokr_w2_b.
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    add_parameters(p, "lokr_w1", w1_, g1_);
    add_parameters(p, "lokr_w2", w2_, g2_);
    return p;
  }

  void zero_grad() {
    for (auto* g : {&g1_.full, &g1_.a, &g1_.b, &g2_.full, &g2_.a, &g2_.b}) g->fill(T{0});
  }

 private:
  static index checked_rank(index r, const char* where) {
    if (r < 1) detail::raise<shape_error>(where, "rank must be >= 1, got " + std::to_string(r));
    return r;
  }
  static matrix<T> init_matrix(index rows, index cols, bool zero, rng& gen) {
    matrix<T> m(rows, cols);
    if (!zero) {
      // kaiming_uniform_(a = sqrt(5)) on a (rows, cols) tensor: U(-1/sqrt(cols), 1/sqrt(cols)).
      const double bound = 1.0 / std::sqrt(static_cast<double>(cols));
      for (auto& v : m.storage()) v = static_cast<T>(gen.uniform(-bound, bound));
    }
    return m;
  }

  static void check_factor(const char* where, const lokr_factor<T>& f, const char* name, index r) {
    if (f.decomposed()) {
      if (f.a.empty() || f.b.empty() || f.a.cols() != f.b.rows()) {
        detail::raise<shape_error>(where, std::string(name) + "_a " + detail::shape_string(f.a.rows(), f.a.cols()) + " and " +
                                              name + "_b " + detail::shape_string(f.b.rows(), f.b.cols()) +
                                              " do not form a non-empty product");
      }
      if (f.a.cols() != r) {
        detail::raise<shape_error>(where, std::string(name) + "_a has rank " + std::to_string(f.a.cols()) +
                                              ", the adapter's rank is " + std::to_string(r));
      }
    } else if (!f.a.empty() || !f.b.empty()) {
      detail::raise<shape_error>(where, std::string(name) + " is given both full and as a product");
    }
  }

  void finish(const char* where) {
    check_factor(where, w1_, "lokr_w1", rank_);
    check_factor(where, w2_, "lokr_w2", rank_);
    g1_ = grad_like(w1_);
    g2_ = grad_like(w2_);
  }
  static lokr_factor<T> grad_like(const lokr_factor<T>& f) {
    lokr_factor<T> g;
    if (f.decomposed()) {
      g.a = matrix<T>(f.a.rows(), f.a.cols());
      g.b = matrix<T>(f.b.rows(), f.b.cols());
    } else {
      g.full = matrix<T>(f.full.rows(), f.full.cols());
    }
    return g;
  }
  static void add_parameters(std::vector<parameter<T>>& p, const std::string& base, lokr_factor<T>& f,
                             lokr_factor<T>& g) {
    if (f.decomposed()) {
      p.push_back({base + "_a", f.a.view(), g.a.view(), detail::shape_of(f.a.view(), false)});
      p.push_back({base + "_b", f.b.view(), g.b.view(), detail::shape_of(f.b.view(), false)});
    } else {
      p.push_back({base, f.full.view(), g.full.view(), detail::shape_of(f.full.view(), false)});
    }
  }
  static matrix<T> formed(const lokr_factor<T>& f) {
    if (!f.decomposed()) return f.full;
    matrix<T> m(f.a.rows(), f.b.cols());
    kernels::gemm_nn<T, T>(1.0, f.a.view(), f.b.view(), 0.0, m.view());
    return m;
  }
  /// The factor as a view: the full tensor itself, or the product formed into `tmp`.
  static matrix_view<const T> factor_view(const lokr_factor<T>& f, matrix<T>& tmp) {
    if (!f.decomposed()) return f.full.view();
    tmp = formed(f);
    return tmp.view();
  }

  // ---- additive_adapter hooks: y += s x (W1 kron W2)^T; gradients and dx += s g (W1 kron W2) ---
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& /*cache*/) const {
    matrix<T> t1, t2;
    const auto a = factor_view(w1_, t1);  // (out_l, in_m)
    const auto b = factor_view(w2_, t2);  // (out_k, in_n)
    matrix<T> z(a.cols(), b.rows());      // (in_m, out_k)
    const double s = static_cast<double>(scale_);
    for (index r = 0; r < x.rows(); ++r) {
      const matrix_view<const T> xr(x.row(r), a.cols(), b.cols());            // X (in_m, in_n)
      kernels::gemm_nt<T, T>(1.0, xr, b, 0.0, z.view());                     // Z = X W2^T
      kernels::gemm_nn<T, T>(s, a, z.view(), 1.0, matrix_view<T>(y.row(r), a.rows(), b.rows()));  // Y += s W1 Z
    }
  }

  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& /*cache*/) {
    matrix<T> t1, t2;
    const auto a = factor_view(w1_, t1);  // (out_l, in_m)
    const auto b = factor_view(w2_, t2);  // (out_k, in_n)
    const index out_l = a.rows(), in_m = a.cols(), out_k = b.rows(), in_n = b.cols();
    matrix<T> d1_tmp, d2_tmp;
    matrix_view<T> d1 = w1_.decomposed() ? (d1_tmp = matrix<T>(out_l, in_m)).view() : g1_.full.view();
    matrix_view<T> d2 = w2_.decomposed() ? (d2_tmp = matrix<T>(out_k, in_n)).view() : g2_.full.view();
    matrix<T> z(in_m, out_k), v(in_m, out_k);
    const double s = static_cast<double>(scale_);
    for (index r = 0; r < x.rows(); ++r) {
      const matrix_view<const T> xr(x.row(r), in_m, in_n);   // X
      const matrix_view<const T> gr(g.row(r), out_l, out_k);  // G
      kernels::gemm_nt<T, T>(1.0, xr, b, 0.0, z.view());     // Z = X W2^T
      kernels::gemm_nt<T, T>(s, gr, z.view(), 1.0, d1);      // dW1 += s G Z^T
      kernels::gemm_tn<T>(1.0, a, gr, 0.0, v.view());        // V = W1^T G
      kernels::gemm_tn<T>(s, v.view(), xr, 1.0, d2);         // dW2 += s V^T X
      kernels::gemm_nn<T, T>(s, v.view(), b, 1.0, matrix_view<T>(dx.row(r), in_m, in_n));  // dX += s V W2
    }
    if (w1_.decomposed()) spread(w1_, d1, g1_);
    if (w2_.decomposed()) spread(w2_, d2, g2_);
  }
  /// dP (of P = P_a P_b) into dP_a += dP P_b^T and dP_b += P_a^T dP.
  static void spread(const lokr_factor<T>& f, matrix_view<const T> d, lokr_factor<T>& g) {
    kernels::gemm_nt<T, T>(1.0, d, f.b.view(), 1.0, g.a.view());
    kernels::gemm_tn<T>(1.0, f.a.view(), d, 1.0, g.b.view());
  }

  lokr_factor<T> w1_;  // (out_l, in_m) or (out_l, r) @ (r, in_m)
  lokr_factor<T> w2_;  // (out_k, in_n) or (out_k, r) @ (r, in_n)
  lokr_factor<T> g1_;  // gradients, same forms
  lokr_factor<T> g2_;
  index rank_ = 1;
  double alpha_ = 1.0;
  T scale_ = T{1};
  bool decompose_both_ = false;
  index factor_ = -1;
};


}  // namespace peft
