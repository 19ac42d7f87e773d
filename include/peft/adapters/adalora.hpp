// peft/adapters/adalora.hpp — AdaLoRA's SVD-form adapter (Zhang et al. 2023) as HuggingFace
// PEFT 0.21 applies it (SVDLinear). Rank allocation during training is not part of this type.
//
//   y = x W0^T + b0 + f x (A * E)^T B^T      A (r, in), E (r, 1), B (out, r)
//   f = scaling / (ranknum + 1e-5),  scaling = lora_alpha (or r when lora_alpha <= 0)
//
//   peft::adalora<float> a(in, out, {.rank = 12, .alpha = 32});   // PEFT's init: E = 0
//
// `ranknum` is a frozen buffer PEFT does not save: at load it is float(init_r) for every module,
// also for modules that rank_pattern (AdaLoRA's saved budget masks) shrank to fewer
// triplets — PEFT resizes those and keeps the old ranknum — so f = lora_alpha / (init_r + 1e-5).
// Gradients (g = dL/dy, t = x A^T (batch, r), u = g B (batch, r)):
//   dB += f g^T (t * e^T),  dE_k += f sum_b u_bk t_bk,  dA += f (u * e^T)^T x,
//   dx = g W0 + f (u * e^T) A.
// Checkpoint names: lora_A, lora_B, lora_E (no ".weight"); config fields init_r, lora_alpha,
// rank_pattern ({"<module>.lora_E": [bool] * init_r}). r and target_r do not enter the formula.
// A module may have rank 0 (PEFT allows it): its term is zero.
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

/// PEFT's `init_lora_weights`: true (E = 0, A and B ~ N(0, 0.02^2): a no-op), false (A, E, B
/// ~ N(0, 1), PyTorch's randn: not a no-op).
enum class adalora_init : std::uint8_t { standard, random };

struct adalora_options {
  index rank = 12;     // init_r: the number of triplets, and ranknum
  double alpha = 8.0;  // lora_alpha; scaling = alpha, or the rank when alpha <= 0
  adalora_init init = adalora_init::standard;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class adalora {
 public:
  using scalar = T;
  static constexpr std::string_view method = "adalora";
  /// PEFT adds this to ranknum before dividing.
  static constexpr double ranknum_epsilon = 1e-5;

  /// What backward needs from forward: t = x A^T (batch, r).
  struct cache_type {
    matrix<T> t;
  };

  adalora() = default;

  /// A fresh adapter for an (out, in) linear layer: opt.rank triplets, ranknum = opt.rank.
  adalora(index in_features, index out_features, const adalora_options& opt)
      : a_(checked_rank(opt.rank), checked_dim(in_features, "in_features")),
        b_(checked_dim(out_features, "out_features"), opt.rank),
        e_(opt.rank, 1),
        scaling_(opt.alpha > 0 ? opt.alpha : static_cast<double>(opt.rank)),
        ranknum_(static_cast<double>(opt.rank)) {
    rng gen(opt.seed);
    const double sd = opt.init == adalora_init::standard ? 0.02 : 1.0;
    for (auto& v : a_.storage()) v = static_cast<T>(gen.normal(0.0, sd));
    if (opt.init == adalora_init::random) {
      for (auto& v : e_.storage()) v = static_cast<T>(gen.normal(0.0, 1.0));
    }
    for (auto& v : b_.storage()) v = static_cast<T>(gen.normal(0.0, sd));
    finish();
  }

  /// An adapter from existing tensors: A (r, in), B (out, r), E (r, 1); `scaling` and `ranknum`
  /// as PEFT keeps them (f = scaling / (ranknum + 1e-5)).
  adalora(matrix<T> a, matrix<T> b, matrix<T> e, double scaling, double ranknum)
      : a_(std::move(a)), b_(std::move(b)), e_(std::move(e)), scaling_(scaling), ranknum_(ranknum) {
    const index r = a_.rows();
    if (a_.cols() < 1 || b_.rows() < 1 || b_.cols() != r || e_.rows() != r || e_.cols() != 1) {
      detail::raise<shape_error>("adalora::adalora", "lora_A " + detail::shape_string(a_.rows(), a_.cols()) +
                                                         ", lora_B " + detail::shape_string(b_.rows(), b_.cols()) +
                                                         ", lora_E " + detail::shape_string(e_.rows(), e_.cols()) +
                                                         " are not (r, in), (out, r), (r, 1) with in, out >= 1");
    }
    if (!std::isfinite(scaling_) || !std::isfinite(ranknum_) || ranknum_ + ranknum_epsilon == 0.0) {
      detail::raise<shape_error>("adalora::adalora", "scaling and ranknum must be finite, ranknum + 1e-5 non-zero");
    }
    finish();
  }

  index in_features() const noexcept { return a_.cols(); }
  index out_features() const noexcept { return b_.rows(); }
  index rank() const noexcept { return a_.rows(); }
  double scaling() const noexcept { return scaling_; }
  double ranknum() const noexcept { return ranknum_; }
  /// f = scaling / (ranknum + 1e-5), the factor of the term.
  T factor() const noexcept { return factor_; }

  matrix_view<T> A() noexcept { return a_.view(); }
  matrix_view<const T> A() const noexcept { return a_.view(); }
  matrix_view<T> B() noexcept { return b_.view(); }
  matrix_view<const T> B() const noexcept { return b_.view(); }
  matrix_view<T> E() noexcept { return e_.view(); }
  matrix_view<const T> E() const noexcept { return e_.view(); }
  matrix_view<const T> grad_A() const noexcept { return ga_.view(); }
  matrix_view<const T> grad_B() const noexcept { return gb_.view(); }
  matrix_view<const T> grad_E() const noexcept { return ge_.view(); }

  /// y = x W0^T + b0 + f x (A * E)^T B^T.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    check_io("adalora::forward", w, x, y);
    w.matmul(x, y);
    add_svd(x, y, cache);
  }

  /// y += f x (A * E)^T B^T; h is not needed.
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<T> y,
                cache_type& cache) const {
    check_io("adalora::add_term", w, x, y);
    add_svd(x, y, cache);
  }

  /// Accumulates dA, dE, dB; writes dx = g W0 + f (g B * e^T) A.
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                cache_type& cache) {
    check_grad("adalora::backward", w, x, g, dx);
    w.matmul_t(g, dx, false);
    svd_backward(x, g, dx, cache);
  }

  /// Accumulates dA, dE, dB and dx += f (g B * e^T) A; the term does not depend on h.
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<const T> g,
                     matrix_view<T> /*dh*/, matrix_view<T> dx, cache_type& cache) {
    check_grad("adalora::backward_term", w, x, g, dx);
    svd_backward(x, g, dx, cache);
  }

  /// dW = f B (A * E) (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("adalora::delta_weight", w);
    detail::expect_shape("adalora::delta_weight", "dw", dw, out_features(), in_features());
    matrix<T> ae = a_;  // (r, in)
    for (index k = 0; k < rank(); ++k) {
      T* row = ae.row(k);
      for (index j = 0; j < ae.cols(); ++j) row[j] *= e_(k, 0);
    }
    kernels::gemm_nn<T, T>(static_cast<double>(factor_), b_.view(), ae.view(), 0.0, dw);
  }

  /// AdaLoRA does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  // ---- PEFT checkpoints ----------------------------------------------------------------------

  static bool handles(const io::adapter_config& c) { return c.peft_type == "ADALORA"; }
  /// `ranknum` is accepted and ignored (old PEFT versions saved it; PEFT 0.21 ignores it too:
  /// the key does not name a parameter of its model). Embedding tensors are rejected.
  static std::vector<std::string_view> checkpoint_parameters() {
    return {"lora_A", "lora_B", "lora_E", "ranknum", "lora_embedding_A", "lora_embedding_B"};
  }
  static std::vector<std::string_view> shared_parameters() { return {}; }

  /// init_r of the config (PEFT's default 12).
  static index init_r(const io::adapter_config& c) {
    const auto it = c.raw.find("init_r");
    if (it == c.raw.end() || it->is_null()) return 12;
    if (!it->is_number_integer() || it->template get<long long>() < 0) {
      detail::raise<format_error>("adalora::from_checkpoint", "adapter_config.json: 'init_r' must be an integer >= 0");
    }
    return static_cast<index>(it->template get<long long>());
  }

  /// The rank PEFT gives a module: the number of true entries of its rank_pattern mask
  /// ("<module>.lora_E", a list of init_r booleans), or init_r.
  static index rank_for(const io::adapter_config& c, const std::string& module) {
    constexpr const char* where = "adalora::from_checkpoint";
    const index r0 = init_r(c);
    const auto it = c.raw.find("rank_pattern");
    if (it == c.raw.end() || it->is_null()) return r0;
    if (!it->is_object()) detail::raise<format_error>(where, "adapter_config.json: AdaLoRA's 'rank_pattern' must be an object");
    const io::ordered_json* mask = nullptr;
    for (const auto& key : {module + ".lora_E", module + ".lora_E.default"}) {
      const auto m = it->find(key);
      if (m != it->end()) {
        mask = &*m;
        break;
      }
    }
    if (mask == nullptr) return r0;
    if (!mask->is_array() || static_cast<index>(mask->size()) != r0) {
      detail::raise<format_error>(where, "adapter_config.json: rank_pattern of '" + module + "' must be a list of init_r = " +
                                             std::to_string(r0) + " booleans");
    }
    index r = 0;
    for (const auto& v : *mask) {
      if (v.is_boolean()) {
        r += v.get<bool>() ? 1 : 0;
      } else if (v.is_number_integer() && (v.get<long long>() == 0 || v.get<long long>() == 1)) {
        r += static_cast<index>(v.get<long long>());
      } else {
        detail::raise<format_error>(where, "adapter_config.json: rank_pattern of '" + module + "' holds a non-boolean");
      }
    }
    return r;
  }

  /// The adapter of one module: rank from the tensors, checked against rank_pattern / init_r;
  /// ranknum = init_r; scaling = lora_alpha, or the rank when lora_alpha <= 0.
  static adalora from_checkpoint(const io::adapter_config& c, const io::checkpoint_tensors<T>& m,
                                 const io::checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "adalora::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    if (m.contains("lora_embedding_A") || m.contains("lora_embedding_B")) {
      detail::raise<unsupported_error>(where, mod + " is an embedding (lora_embedding_A/B): peft-cpp adapts linear layers only");
    }
    const auto& sa = m.shape("lora_A", 2);
    const auto& sb = m.shape("lora_B", 2);
    const auto& se = m.shape("lora_E", 2);
    if (sb[1] != sa[0] || se[0] != sa[0] || se[1] != 1 || sa[1] < 1 || sb[0] < 1) {
      detail::raise<format_error>(where, mod + ": lora_A " + io::detail::shape_text(sa) + ", lora_B " +
                                             io::detail::shape_text(sb) + ", lora_E " + io::detail::shape_text(se) +
                                             " are not (r, in), (out, r), (r, 1)");
    }
    const auto rank = static_cast<index>(sa[0]);
    const index expected = rank_for(c, m.module());
    if (rank != expected) {
      detail::raise<format_error>(where, mod + " has rank " + std::to_string(rank) + " but adapter_config.json gives " +
                                             std::to_string(expected) + " (init_r, or its rank_pattern mask)");
    }
    const double scaling = c.lora_alpha > 0 ? c.lora_alpha : static_cast<double>(rank);
    return adalora(m.copy("lora_A"), m.copy("lora_B"), m.copy("lora_E"), scaling, static_cast<double>(init_r(c)));
  }

  /// Makes `c` describe this module: peft_type ADALORA; init_r = ranknum and lora_alpha =
  /// scaling when `c` has no init_r yet (and total_step = 1 when absent, which PEFT requires);
  /// a rank_pattern mask (rank trues, then falses, init_r in all) when rank < init_r.
  /// unsupported_error when `c` cannot describe it: another ranknum or scaling (PEFT has one
  /// init_r and one lora_alpha per adapter), a non-integer ranknum, or rank > ranknum.
  void describe_in(io::adapter_config& c, const std::string& module) const {
    constexpr const char* where = "adalora::describe_in";
    if (!c.raw.is_object()) c.raw = io::ordered_json::object();
    if (c.peft_type != "ADALORA") {
      c.raw.erase("init_r");
      c.raw.erase("rank_pattern");
    }
    c.peft_type = "ADALORA";
    c.rank_pattern.clear();  // LoRA's integer patterns mean nothing to AdaLoRA (its masks live in raw)
    const std::string mod = "module '" + module + "'";
    if (ranknum_ != std::floor(ranknum_) || ranknum_ < 0 || ranknum_ > 1e9) {
      detail::raise<unsupported_error>(where, mod + " has ranknum " + std::to_string(ranknum_) +
                                                  ", which no integer init_r gives");
    }
    if (!c.raw.contains("init_r") || c.raw["init_r"].is_null()) {
      c.raw["init_r"] = static_cast<long long>(ranknum_);
      if (scaling_ > 0) c.lora_alpha = scaling_;
    }
    if (!c.raw.contains("total_step") || c.raw["total_step"].is_null()) c.raw["total_step"] = 1;
    const index r0 = init_r(c);
    if (static_cast<double>(r0) != ranknum_) {
      detail::raise<unsupported_error>(where, mod + " has ranknum " + std::to_string(ranknum_) + ", the config's init_r is " +
                                                  std::to_string(r0) + ": PEFT has one init_r per adapter");
    }
    if (rank() > r0) {
      detail::raise<unsupported_error>(where, mod + " has rank " + std::to_string(rank()) + " > init_r " + std::to_string(r0));
    }
    const double expect = c.lora_alpha > 0 ? c.lora_alpha : static_cast<double>(rank());
    if (std::abs(expect - scaling_) > 8.0 * std::numeric_limits<double>::epsilon() * std::max(1.0, std::abs(scaling_))) {
      detail::raise<unsupported_error>(where, mod + " has scaling " + std::to_string(scaling_) + ", the config gives " +
                                                  std::to_string(expect) + ": PEFT has one lora_alpha per adapter");
    }
    if (rank() < r0) {
      if (!c.raw.contains("rank_pattern") || !c.raw["rank_pattern"].is_object()) {
        c.raw["rank_pattern"] = io::ordered_json::object();
      }
      io::ordered_json mask = io::ordered_json::array();
      for (index k = 0; k < r0; ++k) mask.push_back(k < rank());
      c.raw["rank_pattern"][module + ".lora_E"] = std::move(mask);
    }
  }

  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"lora_A", a_.view(), ga_.view(), detail::shape_of(a_.view(), false)});
    p.push_back({"lora_B", b_.view(), gb_.view(), detail::shape_of(b_.view(), false)});
    p.push_back({"lora_E", e_.view(), ge_.view(), detail::shape_of(e_.view(), false)});
    return p;
  }

  void zero_grad() {
    ga_.fill(T{0});
    gb_.fill(T{0});
    ge_.fill(T{0});
  }

 private:
  static index checked_rank(index r) {
    if (r < 0) detail::raise<shape_error>("adalora::adalora", "rank must be >= 0, got " + std::to_string(r));
    return r;
  }
  static index checked_dim(index d, const char* what) {
    if (d < 1) detail::raise<shape_error>("adalora::adalora", std::string(what) + " must be >= 1, got " + std::to_string(d));
    return d;
  }
  void finish() {
    factor_ = static_cast<T>(scaling_ / (ranknum_ + ranknum_epsilon));
    ga_ = matrix<T>(a_.rows(), a_.cols());
    gb_ = matrix<T>(b_.rows(), b_.cols());
    ge_ = matrix<T>(e_.rows(), e_.cols());
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

  void compute_t(matrix_view<const T> x, cache_type& cache) const {
    if (cache.t.rows() != x.rows() || cache.t.cols() != rank()) cache.t = matrix<T>(x.rows(), rank());
    kernels::gemm_nt<T, T>(1.0, x, a_.view(), 0.0, cache.t.view());  // t = x A^T
  }

  void add_svd(matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    if (rank() == 0) return;
    compute_t(x, cache);
    matrix<T> te = cache.t;  // t * e^T (batch, r)
    for (index i = 0; i < te.rows(); ++i) {
      for (index k = 0; k < rank(); ++k) te(i, k) *= e_(k, 0);
    }
    kernels::gemm_nt<T, T>(static_cast<double>(factor_), te.view(), b_.view(), 1.0, y);
  }

  void svd_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    if (rank() == 0) return;
    if (cache.t.rows() != x.rows() || cache.t.cols() != rank()) compute_t(x, cache);
    const index batch = x.rows(), r = rank();
    const double f = static_cast<double>(factor_);
    matrix<T> u(batch, r);                                     // u = g B
    kernels::gemm_nn<T, T>(1.0, g, b_.view(), 0.0, u.view());
    matrix<T> te(batch, r);                                    // t * e^T
    for (index i = 0; i < batch; ++i) {
      for (index k = 0; k < r; ++k) {
        te(i, k) = cache.t(i, k) * e_(k, 0);
        ge_(k, 0) += factor_ * u(i, k) * cache.t(i, k);      // dE += f sum_b u t
        u(i, k) *= e_(k, 0);                                   // u <- u * e^T
      }
    }
    kernels::gemm_tn<T>(f, g, te.view(), 1.0, gb_.view());    // dB += f g^T (t * e^T)
    kernels::gemm_tn<T>(f, u.view(), x, 1.0, ga_.view());     // dA += f (u * e^T)^T x
    kernels::gemm_nn<T, T>(f, u.view(), a_.view(), 1.0, dx);  // dx += f (u * e^T) A
  }

  matrix<T> a_;   // (r, in)
  matrix<T> b_;   // (out, r)
  matrix<T> e_;   // (r, 1)
  double scaling_ = 1.0;
  double ranknum_ = 1.0;
  T factor_ = T{1};
  matrix<T> ga_;  // gradients, same shapes
  matrix<T> gb_;
  matrix<T> ge_;
};

static_assert(mergeable_adapter_for<adalora<float>, dense<float>>);
static_assert(mergeable_adapter_for<adalora<double>, dense<bf16>>);

}  // namespace peft
