// peft/adapters/lokr.hpp — LoKr (low-rank Kronecker adaptation) as HuggingFace PEFT 0.21 does it.
//
//   y = x W0^T + b0 + s x (W1 kron W2)^T               s = alpha / r, ALSO when W1 and W2 are full
//   W1 (out_l, in_m) = lokr_w1, or lokr_w1_a (out_l, r) @ lokr_w1_b (r, in_m)
//   W2 (out_k, in_n) = lokr_w2, or lokr_w2_a (out_k, r) @ lokr_w2_b (r, in_n)
//   (out_l, out_k) = lokr_factorization(out), (in_m, in_n) = lokr_factorization(in)
//
//   peft::lokr<float> a(in, out, {.rank = 8, .alpha = 16});   // PEFT's init: W1 = 0, W2 random
//
// PEFT chooses the forms from r (update_layer): W1 is full unless decompose_both and
// r < max(out_l, in_m) / 2; W2 is full unless r < max(out_k, in_n) / 2. (LyCORIS sets alpha = r
// when both are full; PEFT does not: its scaling is alpha / r in every case, and the golden
// checkpoints confirm it.)
// The (out, in) delta is never formed in forward or backward: each row of x read as a matrix
// X (in_m, in_n) gives the row of the term read as s W1 X W2^T (out_l, out_k).
// Gradients, G = a row of dL/dy read as (out_l, out_k), Z = X W2^T, V = W1^T G:
//   dW1 += s G Z^T,  dW2 += s V^T X,  dX = s V W2;  a low-rank factor P = P_a P_b receives
//   dP_a += dP P_b^T and dP_b += P_a^T dP.
// Checkpoint names: lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b (no ".weight");
// config fields r, alpha, rank_pattern, alpha_pattern, decompose_both, decompose_factor.
// lokr_t2 (the effective-conv2d form) and convolution-shaped tensors are rejected.
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

/// PEFT's `init_weights`: true (W1 = 0 or lokr_w1_a = 0, the rest kaiming-uniform: a no-op),
/// "lycoris" (W2 = 0 or lokr_w2_b = 0: a no-op), false (everything kaiming-uniform).
enum class lokr_init : std::uint8_t { standard, lycoris, random };

struct lokr_options {
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
class lokr {
 public:
  using scalar = T;
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
    const bool full1 = peft_w1_full(rank_, decompose_both_, out_l, in_m);
    const bool full2 = peft_w2_full(rank_, out_k, in_n);
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

  /// y = x W0^T + b0 + s x (W1 kron W2)^T.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& /*cache*/) const {
    check_io("lokr::forward", w, x, y);
    w.matmul(x, y);
    add_kron(x, y);
  }

  /// y += s x (W1 kron W2)^T; h is not needed.
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<T> y,
                cache_type& /*cache*/) const {
    check_io("lokr::add_term", w, x, y);
    add_kron(x, y);
  }

  /// Accumulates the factor gradients; writes dx = g W0 + s g (W1 kron W2).
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                cache_type& /*cache*/) {
    check_grad("lokr::backward", w, x, g, dx);
    w.matmul_t(g, dx, false);
    kron_backward(x, g, dx);
  }

  /// Accumulates the factor gradients and dx += s g (W1 kron W2); the term does not depend on h.
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<const T> g,
                     matrix_view<T> /*dh*/, matrix_view<T> dx, cache_type& /*cache*/) {
    check_grad("lokr::backward_term", w, x, g, dx);
    kron_backward(x, g, dx);
  }

  /// dW = s W1 kron W2 (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("lokr::delta_weight", w);
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

  // ---- PEFT checkpoints ----------------------------------------------------------------------

  static bool handles(const io::adapter_config& c) { return c.peft_type == "LOKR"; }
  static std::vector<std::string_view> checkpoint_parameters() {
    return {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"};
  }
  static std::vector<std::string_view> shared_parameters() { return {}; }

  /// LoKr's alpha for a module: alpha_pattern first, then "alpha" (PEFT's default 8).
  static double alpha_for(const io::adapter_config& c, const std::string& module) {
    for (const auto& [k, v] : c.alpha_pattern) {
      if (io::adapter_config::pattern_matches(k, module)) return v;
    }
    return config_number(c, "alpha", 8.0);
  }

  /// The adapter of one module. r and alpha come from the config (rank_pattern, alpha_pattern);
  /// the factors' shapes must be PEFT's factorization of the layer, and their forms (full or
  /// low rank) those PEFT builds for that r and decompose_both: anything else is a format_error,
  /// since PEFT itself could not load it.
  static lokr from_checkpoint(const io::adapter_config& c, const io::checkpoint_tensors<T>& m,
                              const io::checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "lokr::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    if (m.contains("lokr_t2")) {
      detail::raise<unsupported_error>(where, mod + " has lokr_t2, LoKr's effective-conv2d form of a convolution: "
                                                    "peft-cpp adapts linear layers only");
    }
    for (const auto& [name, t] : m.all()) {
      if (t.shape.size() != 2) {
        detail::raise<unsupported_error>(where, mod + ": '" + name + "' is " + io::detail::shape_text(t.shape) +
                                                    ", a convolution's factor: peft-cpp adapts linear layers only");
      }
    }
    const index r = c.rank_for(m.module());
    const double alpha = alpha_for(c, m.module());
    const bool both = config_bool(c, "decompose_both", false);
    const auto factor = static_cast<index>(config_integer(c, "decompose_factor", -1));
    lokr_factor<T> f1 = read_factor(m, "lokr_w1", r);
    lokr_factor<T> f2 = read_factor(m, "lokr_w2", r);
    const index out = f1.rows() * f2.rows(), in = f1.cols() * f2.cols();
    const auto [out_l, out_k] = lokr_factorization(out, factor);
    const auto [in_m, in_n] = lokr_factorization(in, factor);
    if (f1.rows() != out_l || f2.rows() != out_k || f1.cols() != in_m || f2.cols() != in_n) {
      detail::raise<format_error>(
          where, mod + ": W1 " + detail::shape_string(f1.rows(), f1.cols()) + " and W2 " +
                     detail::shape_string(f2.rows(), f2.cols()) + " make a " + detail::shape_string(out, in) +
                     " weight, which PEFT (decompose_factor " + std::to_string(factor) + ") factors as W1 " +
                     detail::shape_string(out_l, in_m) + ", W2 " + detail::shape_string(out_k, in_n));
    }
    check_forms(where, mod, f1.decomposed(), f2.decomposed(), r, both, out_l, out_k, in_m, in_n, format_tag{});
    return lokr(std::move(f1), std::move(f2), r, alpha, both, factor);
  }

  /// Makes `c` describe this module: peft_type LOKR; alpha, decompose_both and decompose_factor
  /// when `c` has none yet; exact rank_pattern / alpha_pattern entries where r / alpha do not
  /// give this module's. unsupported_error when `c` already says something (decompose_both,
  /// decompose_factor) under which PEFT would build this module with other shapes or forms.
  void describe_in(io::adapter_config& c, const std::string& module) const {
    constexpr const char* where = "lokr::describe_in";
    if (!c.raw.is_object()) c.raw = io::ordered_json::object();
    if (c.peft_type != "LOKR") {
      c.raw.erase("decompose_both");
      c.raw.erase("decompose_factor");
      c.raw.erase("alpha");
    }
    c.peft_type = "LOKR";
    if (!c.raw.contains("decompose_both") || c.raw["decompose_both"].is_null()) c.raw["decompose_both"] = decompose_both_;
    if (!c.raw.contains("decompose_factor") || c.raw["decompose_factor"].is_null()) {
      c.raw["decompose_factor"] = static_cast<long long>(factor_);
    }
    if (!c.raw.contains("alpha") || c.raw["alpha"].is_null()) c.raw["alpha"] = json_number(alpha_);
    if (c.rank_for(module) != rank_) c.rank_pattern.insert(c.rank_pattern.begin(), {module, rank_});
    const double tol = 8.0 * std::numeric_limits<double>::epsilon() * std::max(1.0, std::abs(alpha_));
    if (std::abs(alpha_for(c, module) - alpha_) > tol) c.alpha_pattern.insert(c.alpha_pattern.begin(), {module, alpha_});
    const auto factor = static_cast<index>(config_integer(c, "decompose_factor", -1));
    const auto [out_l, out_k] = lokr_factorization(out_features(), factor);
    const auto [in_m, in_n] = lokr_factorization(in_features(), factor);
    if (w1_.rows() != out_l || w2_.rows() != out_k || w1_.cols() != in_m || w2_.cols() != in_n) {
      detail::raise<unsupported_error>(where, "module '" + module + "' is factored as W1 " +
                                                  detail::shape_string(w1_.rows(), w1_.cols()) + ", W2 " +
                                                  detail::shape_string(w2_.rows(), w2_.cols()) +
                                                  ", but under the config's decompose_factor " + std::to_string(factor) +
                                                  " PEFT factors it as W1 " + detail::shape_string(out_l, in_m) +
                                                  ", W2 " + detail::shape_string(out_k, in_n));
    }
    check_forms(where, "module '" + module + "'", w1_.decomposed(), w2_.decomposed(), rank_,
                config_bool(c, "decompose_both", false), out_l, out_k, in_m, in_n, unsupported_tag{});
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
  struct format_tag {};
  struct unsupported_tag {};

  static index checked_rank(index r, const char* where) {
    if (r < 1) detail::raise<shape_error>(where, "rank must be >= 1, got " + std::to_string(r));
    return r;
  }
  /// PEFT's update_layer for nn.Linear.
  static bool peft_w1_full(index r, bool both, index out_l, index in_m) { return !(both && 2 * r < std::max(out_l, in_m)); }
  static bool peft_w2_full(index r, index out_k, index in_n) { return !(2 * r < std::max(out_k, in_n)); }

  template <class Tag>
  static void check_forms(const char* where, const std::string& mod, bool dec1, bool dec2, index r, bool both,
                          index out_l, index out_k, index in_m, index in_n, Tag) {
    using error_type = std::conditional_t<std::is_same_v<Tag, format_tag>, format_error, unsupported_error>;
    const bool full1 = peft_w1_full(r, both, out_l, in_m), full2 = peft_w2_full(r, out_k, in_n);
    if (full1 == dec1) {
      std::string what = mod + " has ";
      what += dec1 ? "lokr_w1_a/lokr_w1_b" : "lokr_w1";
      what += ", but for r = " + std::to_string(r) + (both ? " with" : " without") + " decompose_both PEFT builds ";
      what += full1 ? "a full lokr_w1" : "lokr_w1_a/lokr_w1_b";
      what += " (full unless decompose_both and 2 r < max(" + std::to_string(out_l) + ", " + std::to_string(in_m) + "))";
      detail::raise<error_type>(where, what);
    }
    if (full2 == dec2) {
      std::string what = mod + " has ";
      what += dec2 ? "lokr_w2_a/lokr_w2_b" : "lokr_w2";
      what += ", but for r = " + std::to_string(r) + " PEFT builds ";
      what += full2 ? "a full lokr_w2" : "lokr_w2_a/lokr_w2_b";
      what += " (full unless 2 r < max(" + std::to_string(out_k) + ", " + std::to_string(in_n) + "))";
      detail::raise<error_type>(where, what);
    }
  }

  static const io::ordered_json* config_field(const io::adapter_config& c, const char* name) {
    const auto it = c.raw.find(name);
    return (it == c.raw.end() || it->is_null()) ? nullptr : &*it;
  }
  static double config_number(const io::adapter_config& c, const char* name, double fallback) {
    const auto* v = config_field(c, name);
    if (v == nullptr) return fallback;
    if (!v->is_number()) detail::raise<format_error>("lokr::from_checkpoint", std::string("adapter_config.json: '") + name + "' must be a number");
    return v->get<double>();
  }
  static long long config_integer(const io::adapter_config& c, const char* name, long long fallback) {
    const auto* v = config_field(c, name);
    if (v == nullptr) return fallback;
    if (!v->is_number_integer()) {
      detail::raise<format_error>("lokr::from_checkpoint", std::string("adapter_config.json: '") + name + "' must be an integer");
    }
    return v->get<long long>();
  }
  static bool config_bool(const io::adapter_config& c, const char* name, bool fallback) {
    const auto* v = config_field(c, name);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) detail::raise<format_error>("lokr::from_checkpoint", std::string("adapter_config.json: '") + name + "' must be true or false");
    return v->get<bool>();
  }
  static io::ordered_json json_number(double v) {
    return v == std::floor(v) && std::abs(v) < 1e15 ? io::ordered_json(static_cast<long long>(v)) : io::ordered_json(v);
  }

  /// `base` ("lokr_w1"): the full tensor, or `base`_a and `base`_b of rank r.
  static lokr_factor<T> read_factor(const io::checkpoint_tensors<T>& m, const std::string& base, index r) {
    constexpr const char* where = "lokr::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const bool full = m.contains(base), has_a = m.contains(base + "_a"), has_b = m.contains(base + "_b");
    if (full && (has_a || has_b)) {
      detail::raise<format_error>(where, mod + " has both " + base + " and " + base + "_a/" + base + "_b");
    }
    if (full) {
      lokr_factor<T> f = lokr_factor<T>::whole(m.copy(base));
      if (f.full.empty()) detail::raise<format_error>(where, mod + ": '" + base + "' is empty");
      return f;
    }
    if (!has_a || !has_b) {
      detail::raise<format_error>(where, mod + " has neither " + base + " nor both " + base + "_a and " + base + "_b");
    }
    const auto& sa = m.shape(base + "_a", 2);
    const auto& sb = m.shape(base + "_b", 2);
    if (sa[1] != sb[0] || sa[0] < 1 || sb[1] < 1) {
      detail::raise<format_error>(where, mod + ": " + base + "_a " + io::detail::shape_text(sa) + " and " + base + "_b " +
                                             io::detail::shape_text(sb) + " do not multiply");
    }
    if (sa[1] != r) {
      detail::raise<format_error>(where, mod + " has rank " + std::to_string(sa[1]) + " (" + base +
                                             "_a) but adapter_config.json gives " + std::to_string(r));
    }
    return lokr_factor<T>::product(m.copy(base + "_a"), m.copy(base + "_b"));
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

  void add_kron(matrix_view<const T> x, matrix_view<T> y) const {
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

  void kron_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx) {
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

static_assert(mergeable_adapter_for<lokr<float>, dense<float>>);
static_assert(mergeable_adapter_for<lokr<double>, dense<bf16>>);

}  // namespace peft
