// peft/adapters/peanut.hpp — PEANuT, a weight-aware nonlinear adapter, as HuggingFace PEFT
// 0.21.2 computes it (peft_type "PEANUT").
//
//   H0 = act(W0^T A^T)                          (in, r)   A (r, out) = peanut_A.weight
//   H_{i+1} = act(H_i E_i^T), i < depth           encoders E_i (r, r) = peanut_encoders.i.weight
//   G_0 = H_depth;  G_{i+1} = act(G_i D_i^T) + H_{depth-1-i}   decoders D_i = peanut_decoders.i.weight
//   F = G_depth;  dW = s B F^T (out, in)          B (out, r) = peanut_B.weight, s = scaling
//   y = x W0^T + b0 + s (x F) B^T
//
//   layer.add_adapter("default", peft::peanut_options{.rank = 8, .depth = 1, .act_fn = "gelu"});
//
// act is a transformers ACT2FN name with a closed form (peanut_activation_of lists them; the
// others are refused by name). The term reads W0 (through H0), so the passes are written here:
// W0^T A^T and backward's dA = (W0 dZ0)^T read W0 a row at a time through the base's
// dequantize_row, whatever its format; only (in, r) intermediates are formed. Merging remembers
// F and B so unmerge subtracts exactly what merge added (PEFT restores a copy of W0); the
// merged weight alone does not determine W0 and is refused.
// Checkpoints: io/peft/peanut.hpp. Details: docs/methods/peanut.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/adapters/detail/merge_memo.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/core/weight_term_adapter.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// The transformers activations PEANuT can use here: those with an exact closed form.
enum class peanut_activation : std::uint8_t {
  relu,           // max(x, 0); derivative 0 at 0 (PyTorch's)
  relu2,          // relu(x)^2
  relu6,          // min(max(x, 0), 6); derivative 1 on (0, 6) only
  leaky_relu,     // x > 0 ? x : 0.01 x
  gelu,           // x Phi(x) (erf): gelu, gelu_python
  gelu_tanh,      // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): gelu_new, gelu_pytorch_tanh, gelu_python_tanh
  gelu_fast,      // the same with the constant 0.7978845608
  quick_gelu,     // x sigmoid(1.702 x)
  silu,           // x sigmoid(x): silu, swish
  sigmoid,
  tanh,
  linear,         // the identity
};

/// The activation of a transformers ACT2FN name, or nullopt for a name this library does not
/// compute (PEFT accepts any ACT2FN key; the refused ones are not closed forms, are clipped or
/// have their own parameters: gelu_10, gelu_accurate, hardswish, laplace, mish, prelu,
/// sqrtsoftplus, xielu).
inline std::optional<peanut_activation> peanut_activation_of(std::string_view name) noexcept {
  using a = peanut_activation;
  if (name == "relu") return a::relu;
  if (name == "relu2") return a::relu2;
  if (name == "relu6") return a::relu6;
  if (name == "leaky_relu") return a::leaky_relu;
  if (name == "gelu" || name == "gelu_python") return a::gelu;
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_python_tanh") return a::gelu_tanh;
  if (name == "gelu_fast") return a::gelu_fast;
  if (name == "quick_gelu") return a::quick_gelu;
  if (name == "silu" || name == "swish") return a::silu;
  if (name == "sigmoid") return a::sigmoid;
  if (name == "tanh") return a::tanh;
  if (name == "linear") return a::linear;
  return std::nullopt;
}

/// The names peanut_activation_of accepts, for error messages.
inline constexpr std::string_view peanut_activation_names =
    "relu, relu2, relu6, leaky_relu, gelu, gelu_python, gelu_new, gelu_pytorch_tanh, gelu_python_tanh, gelu_fast, "
    "quick_gelu, silu, swish, sigmoid, tanh, linear";

namespace detail {

/// act(z) and act'(z), in double.
inline double peanut_act(peanut_activation f, double z) noexcept {
  constexpr double k_tanh = 0.79788456080286535588;  // sqrt(2 / pi)
  switch (f) {
    case peanut_activation::relu: return z > 0 ? z : 0.0;
    case peanut_activation::relu2: return z > 0 ? z * z : 0.0;
    case peanut_activation::relu6: return z > 0 ? (z < 6 ? z : 6.0) : 0.0;
    case peanut_activation::leaky_relu: return z > 0 ? z : 0.01 * z;
    case peanut_activation::gelu: return 0.5 * z * (1.0 + std::erf(z * 0.70710678118654752440));
    case peanut_activation::gelu_tanh: return 0.5 * z * (1.0 + std::tanh(k_tanh * (z + 0.044715 * z * z * z)));
    case peanut_activation::gelu_fast: return 0.5 * z * (1.0 + std::tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z)));
    case peanut_activation::quick_gelu: return z / (1.0 + std::exp(-1.702 * z));
    case peanut_activation::silu: return z / (1.0 + std::exp(-z));
    case peanut_activation::sigmoid: return 1.0 / (1.0 + std::exp(-z));
    case peanut_activation::tanh: return std::tanh(z);
    case peanut_activation::linear: return z;
  }
  return z;
}

inline double peanut_act_grad(peanut_activation f, double z) noexcept {
  constexpr double k_tanh = 0.79788456080286535588;
  switch (f) {
    case peanut_activation::relu: return z > 0 ? 1.0 : 0.0;
    case peanut_activation::relu2: return z > 0 ? 2.0 * z : 0.0;
    case peanut_activation::relu6: return z > 0 && z < 6 ? 1.0 : 0.0;
    case peanut_activation::leaky_relu: return z > 0 ? 1.0 : 0.01;
    case peanut_activation::gelu: {
      const double cdf = 0.5 * (1.0 + std::erf(z * 0.70710678118654752440));
      const double pdf = 0.39894228040143267794 * std::exp(-0.5 * z * z);
      return cdf + z * pdf;
    }
    case peanut_activation::gelu_tanh:
    case peanut_activation::gelu_fast: {
      const double k = f == peanut_activation::gelu_tanh ? k_tanh : 0.7978845608;
      const double t = std::tanh(k * (z + 0.044715 * z * z * z));
      return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * z * z);
    }
    case peanut_activation::quick_gelu: {
      const double s = 1.0 / (1.0 + std::exp(-1.702 * z));
      return s + 1.702 * z * s * (1.0 - s);
    }
    case peanut_activation::silu: {
      const double s = 1.0 / (1.0 + std::exp(-z));
      return s * (1.0 + z * (1.0 - s));
    }
    case peanut_activation::sigmoid: {
      const double s = 1.0 / (1.0 + std::exp(-z));
      return s * (1.0 - s);
    }
    case peanut_activation::tanh: {
      const double t = std::tanh(z);
      return 1.0 - t * t;
    }
    case peanut_activation::linear: return 1.0;
  }
  return 1.0;
}

}  // namespace detail

template <compute_scalar T>
class peanut;

/// PEFT's PeanutConfig for one layer.
struct peanut_options {
  template <compute_scalar T>
  using adapter = peanut<T>;  // the adapter these options make

  index rank = 32;
  index depth = 0;              // encoder / decoder pairs
  std::string act_fn = "relu";  // a transformers ACT2FN name (peanut_activation_of)
  double scaling = 1.0;
  bool init_weights = true;     // true: B = 0 (a no-op); false: B kaiming-uniform too
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class peanut : public weight_term_adapter<peanut<T>, T> {
  friend class weight_term_adapter<peanut<T>, T>;

 public:
  using scalar = T;
  static constexpr std::string_view method = "peanut";

  /// The chain of one pass (all (in, r)) and backward's scratch.
  struct cache_type {
    std::vector<matrix<T>> z;   // encoder side pre-activations: z[0] = W0^T A^T, z[i+1] = H_i E_i^T
    std::vector<matrix<T>> h;   // h[i] = act(z[i]), i <= depth
    std::vector<matrix<T>> y;   // decoder pre-activations: y[i] = G_i D_i^T
    std::vector<matrix<T>> gd;  // decoder inputs G_i, i <= depth (gd[depth] = F)
    matrix<T> u, gb;            // x F, g B (batch, r)
  };

  peanut() = default;

  /// A fresh adapter with PEFT's initialisation (values from peft::rng): A, the encoders and
  /// decoders kaiming-uniform (a = sqrt 5: U(+-1/sqrt(fan_in)), fan_in = out for A, r for the
  /// others); B zeros (init_weights) or U(+-1/sqrt(r)).
  peanut(index in_features, index out_features, const peanut_options& opt)
      : in_(in_features), scaling_(opt.scaling) {
    constexpr const char* where = "peanut::peanut";
    if (in_features < 1 || out_features < 1) {
      detail::raise<shape_error>(where, "the base is " + detail::shape_string(out_features, in_features));
    }
    if (opt.rank < 1) detail::raise<shape_error>(where, "rank must be >= 1, got " + std::to_string(opt.rank));
    if (opt.depth < 0) detail::raise<shape_error>(where, "depth must be >= 0, got " + std::to_string(opt.depth));
    set_activation(where, opt.act_fn);
    const index r = opt.rank;
    rng gen(opt.seed);
    auto fill = [&gen](matrix<T>& m, double fan_in) {
      const double bound = 1.0 / std::sqrt(fan_in);
      for (auto& v : m.storage()) v = static_cast<T>(gen.uniform(-bound, bound));
    };
    a_ = matrix<T>(r, out_features);
    fill(a_, static_cast<double>(out_features));
    for (index i = 0; i < opt.depth; ++i) {
      enc_.emplace_back(r, r);
      fill(enc_.back(), static_cast<double>(r));
    }
    for (index i = 0; i < opt.depth; ++i) {
      dec_.emplace_back(r, r);
      fill(dec_.back(), static_cast<double>(r));
    }
    b_ = matrix<T>(out_features, r);
    if (!opt.init_weights) fill(b_, static_cast<double>(r));
    finish(where);
  }

  /// An adapter from existing tensors: A (r, out), encoders and decoders (depth of each, (r, r)),
  /// B (out, r). in_features is 0 (any) until set_features, or given here.
  peanut(matrix<T> a, std::vector<matrix<T>> encoders, std::vector<matrix<T>> decoders, matrix<T> b,
         std::string_view act_fn, double scaling, index in_features = 0)
      : a_(std::move(a)), b_(std::move(b)), enc_(std::move(encoders)), dec_(std::move(decoders)), in_(in_features),
        scaling_(scaling) {
    set_activation("peanut::peanut", act_fn);
    finish("peanut::peanut");
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return b_.rows(); }
  index rank() const noexcept { return a_.rows(); }
  index depth() const noexcept { return static_cast<index>(enc_.size()); }
  double scaling() const noexcept { return scaling_; }
  /// The act_fn name as given (an alias such as "swish" is kept for saving).
  const std::string& act_fn() const noexcept { return act_name_; }
  peanut_activation activation() const noexcept { return act_; }
  matrix_view<const T> A() const noexcept { return a_.view(); }
  matrix_view<const T> B() const noexcept { return b_.view(); }
  matrix_view<const T> encoder(index i) const { return enc_.at(static_cast<std::size_t>(i)).view(); }
  matrix_view<const T> decoder(index i) const { return dec_.at(static_cast<std::size_t>(i)).view(); }

  /// The loader's and adapted_linear's hook for the layer's shape (the tensors do not hold
  /// in_features). shape_error if it does not fit.
  void set_features(index in_features, index out_features) {
    if (out_features != b_.rows() || in_features < 1 || (in_ != 0 && in_ != in_features)) {
      detail::raise<shape_error>("peanut::set_features", "the adapter is for " + detail::shape_string(b_.rows(), in_) +
                                                             " (in 0: any), cannot bind to " +
                                                             detail::shape_string(out_features, in_features));
    }
    in_ = in_features;
  }

  // forward, add_term, backward and backward_term: weight_term_adapter, over add_delta and
  // delta_backward below.

  /// dW = s B F^T (out, in), F from the base w. Remembers F, B and the base, so that
  /// unmerge_delta on that base (merged) subtracts exactly this.
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("peanut::delta_weight", w);
    detail::expect_shape("peanut::delta_weight", "dw", dw, out_features(), in_features());
    cache_type k;
    chain(w, k);
    kernels::gemm_nt<T, T>(scaling_, b_.view(), k.gd.back().view(), 0.0, dw);
    merged_.remember({std::move(k.gd.back()), b_, a_, enc_, dec_, static_cast<const void*>(&w)});
  }

  /// PEANuT does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// What merge added: s B F^T with the F and B delta_weight remembered (the same numbers,
  /// whatever the parameters are now). On the base object merge was given, used as they are; on
  /// another one (a copy or a moved layer) only if W' - s B F^T gives back F through the chain of
  /// the parameters merge used (to 1e-9 in double, 1e-4 in float, relative to max |F|). dW
  /// depends on W0, which W0 + dW alone does not determine: without such a remembered merge,
  /// peft::error says so (PEFT keeps a copy of W0 for unmerge instead).
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    constexpr const char* where = "peanut::unmerge_delta";
    check_base(where, merged);
    detail::expect_shape(where, "dw", dw, out_features(), in_features());
    const remembered last = merged_.recall();
    const bool known = last.f.rows() == in_features() && last.b.rows() == out_features();
    if (!known || (last.base != static_cast<const void*>(&merged) && !reproduces_merge(merged, last))) {
      detail::raise<error>(where, "PEANuT's delta is a function of W0, which the merged weight W0 + dW does not "
                                  "determine: unmerge needs the delta that merging this base remembered (merge and "
                                  "unmerge with the same adapter, on that base or a copy of it)");
    }
    kernels::gemm_nt<T, T>(scaling_, last.b.view(), last.f.view(), 0.0, dw);
  }

  /// peanut_A.weight, peanut_encoders.i.weight, peanut_decoders.i.weight, peanut_B.weight:
  /// PEFT's names.
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"peanut_A.weight", a_.view(), ga_.view(), detail::shape_of(a_.view(), false)});
    for (std::size_t i = 0; i < enc_.size(); ++i) {
      p.push_back({"peanut_encoders." + std::to_string(i) + ".weight", enc_[i].view(), genc_[i].view(),
                   detail::shape_of(enc_[i].view(), false)});
    }
    for (std::size_t i = 0; i < dec_.size(); ++i) {
      p.push_back({"peanut_decoders." + std::to_string(i) + ".weight", dec_[i].view(), gdec_[i].view(),
                   detail::shape_of(dec_[i].view(), false)});
    }
    p.push_back({"peanut_B.weight", b_.view(), gb_.view(), detail::shape_of(b_.view(), false)});
    return p;
  }

  void zero_grad() {
    ga_.fill(T{0});
    gb_.fill(T{0});
    for (auto& m : genc_) m.fill(T{0});
    for (auto& m : gdec_) m.fill(T{0});
  }

 private:
  void set_activation(const char* where, std::string_view name) {
    const auto f = peanut_activation_of(name);
    if (!f) {
      detail::raise<unsupported_error>(where, "act_fn \"" + std::string(name) +
                                                  "\" is not one of the closed-form activations computed here (" +
                                                  std::string(peanut_activation_names) + ")");
    }
    act_ = *f;
    act_name_ = std::string(name);
  }

  void finish(const char* where) {
    const index r = a_.rows(), out = a_.cols();
    if (r < 1 || out < 1) {
      detail::raise<shape_error>(where, "peanut_A is " + detail::shape_string(a_.rows(), a_.cols()) +
                                            ", expected (r, out_features) with r, out_features >= 1");
    }
    if (b_.rows() != out || b_.cols() != r) {
      detail::raise<shape_error>(where, "peanut_B is " + detail::shape_string(b_.rows(), b_.cols()) + ", peanut_A " +
                                            detail::shape_string(a_.rows(), a_.cols()) + ": expected B (" +
                                            std::to_string(out) + ", " + std::to_string(r) + ")");
    }
    if (enc_.size() != dec_.size()) {
      detail::raise<shape_error>(where, std::to_string(enc_.size()) + " encoders and " + std::to_string(dec_.size()) +
                                            " decoders: PEANuT has depth of each");
    }
    for (std::size_t i = 0; i < enc_.size(); ++i) {
      for (const auto* m : {&enc_[i], &dec_[i]}) {
        if (m->rows() != r || m->cols() != r) {
          detail::raise<shape_error>(where, std::string(m == &enc_[i] ? "peanut_encoders." : "peanut_decoders.") +
                                                std::to_string(i) + " is " + detail::shape_string(m->rows(), m->cols()) +
                                                ", expected (r, r) with r = " + std::to_string(r));
        }
      }
    }
    if (in_ < 0) detail::raise<shape_error>(where, "in_features is " + std::to_string(in_));
    ga_ = matrix<T>(a_.rows(), a_.cols());
    gb_ = matrix<T>(b_.rows(), b_.cols());
    genc_.clear();
    gdec_.clear();
    for (std::size_t i = 0; i < enc_.size(); ++i) {
      genc_.emplace_back(r, r);
      gdec_.emplace_back(r, r);
    }
  }
  void check_ready(const char* where) const {
    if (a_.empty()) detail::raise<error>(where, "the adapter is default-constructed (no peanut_A)");
    if (in_ < 1) {
      detail::raise<error>(where, "in_features is unknown: bind the adapter to its layer first (set_features)");
    }
  }
  using checks = detail::adapter_checks<peanut, T>;  // check_base / check_io / check_grad
  friend checks;
  using checks::check_base;
  using checks::check_io;
  using checks::check_grad;

  /// The rows of W' - s B F^T (the merged base minus the remembered delta), for the chain.
  template <class Base>
  struct unmerged_rows {
    const Base& merged;
    const matrix<T>& b;
    const matrix<T>& f;
    double s;
    void dequantize_row(index o, double* row) const {
      merged.dequantize_row(o, row);
      const T* bo = b.row(o);
      for (index j = 0; j < f.rows(); ++j) {
        const T* fj = f.row(j);
        double d = 0;
        for (index i = 0; i < f.cols(); ++i) d += static_cast<double>(bo[i]) * static_cast<double>(fj[i]);
        row[j] -= s * d;
      }
    }
  };

  /// What the last delta_weight used: F, the parameters of the chain, and the base.
  struct remembered {
    matrix<T> f, b, a;
    std::vector<matrix<T>> enc, dec;
    const void* base = nullptr;
  };

  /// Whether the merged base minus the remembered delta gives back the remembered F through the
  /// parameters merge used: the remembered merge is this base's.
  template <class Base>
  bool reproduces_merge(const Base& merged, const remembered& last) const {
    peanut then(last.a, last.enc, last.dec, last.b, act_name_, scaling_, in_);
    cache_type k;
    then.chain(unmerged_rows<Base>{merged, last.b, last.f, scaling_}, k);
    const matrix<T>& f = k.gd.back();
    double scale = 0, diff = 0;
    for (std::size_t e = 0; e < f.storage().size(); ++e) {
      scale = std::max(scale, std::abs(static_cast<double>(last.f.storage()[e])));
      diff = std::max(diff, std::abs(static_cast<double>(f.storage()[e]) - static_cast<double>(last.f.storage()[e])));
    }
    const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-9;
    return diff <= tol * std::max(scale, 1e-30);
  }

  /// out = act(z) elementwise.
  matrix<T> activate(const matrix<T>& z) const {
    matrix<T> h(z.rows(), z.cols());
    for (std::size_t i = 0; i < z.storage().size(); ++i) {
      h.storage()[i] = static_cast<T>(detail::peanut_act(act_, static_cast<double>(z.storage()[i])));
    }
    return h;
  }

  /// out = m M^T for m (in, r), M (r, r), accumulated in double.
  static matrix<T> times_t(const matrix<T>& m, const matrix<T>& mm) {
    const index n = m.rows(), r = m.cols();
    matrix<T> out(n, r);
    for (index i = 0; i < n; ++i) {
      const T* mi = m.row(i);
      T* oi = out.row(i);
      for (index j = 0; j < r; ++j) {
        const T* mj = mm.row(j);
        double v = 0;
        for (index l = 0; l < r; ++l) v += static_cast<double>(mi[l]) * static_cast<double>(mj[l]);
        oi[j] = static_cast<T>(v);
      }
    }
    return out;
  }

  /// The whole chain over the base w: z, h, y, gd (gd.back() = F).
  template <class Base>
  void chain(const Base& w, cache_type& k) const {
    const index r = rank(), in = in_features(), out = out_features(), d = depth();
    // z0 = W0^T A^T (in, r), W0 a row at a time, in double.
    matrix<double> acc(in, r);
    std::vector<double> row(static_cast<std::size_t>(in));
    for (index o = 0; o < out; ++o) {
      w.dequantize_row(o, row.data());
      for (index j = 0; j < in; ++j) {
        const double wj = row[static_cast<std::size_t>(j)];
        if (wj == 0) continue;
        double* aj = acc.row(j);
        for (index i = 0; i < r; ++i) aj[i] += wj * static_cast<double>(a_(i, o));
      }
    }
    k.z.assign(1, matrix<T>(in, r));
    for (std::size_t i = 0; i < acc.storage().size(); ++i) k.z[0].storage()[i] = static_cast<T>(acc.storage()[i]);
    k.h.assign(1, activate(k.z[0]));
    for (index i = 0; i < d; ++i) {
      k.z.push_back(times_t(k.h.back(), enc_[static_cast<std::size_t>(i)]));
      k.h.push_back(activate(k.z.back()));
    }
    k.y.clear();
    k.gd.assign(1, k.h.back());
    for (index i = 0; i < d; ++i) {
      k.y.push_back(times_t(k.gd.back(), dec_[static_cast<std::size_t>(i)]));
      matrix<T> next = activate(k.y.back());
      const matrix<T>& res = k.h[static_cast<std::size_t>(d - 1 - i)];
      for (std::size_t e = 0; e < next.storage().size(); ++e) next.storage()[e] += res.storage()[e];
      k.gd.push_back(std::move(next));
    }
  }

  /// y += s (x F) B^T.
  template <class Base>
  void add_delta(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& k) const {
    chain(w, k);
    k.u = matrix<T>(x.rows(), rank());
    kernels::gemm_nn<T, T>(1.0, x, k.gd.back().view(), 0.0, k.u.view());
    kernels::gemm_nt<T, T>(scaling_, k.u.view(), b_.view(), 1.0, y);
  }

  /// With u = x F, gb = g B:  dB = s g^T u,  dx += s gb F^T,  dF = s x^T gb (in, r); then back
  /// through the decoders (each residual gets its output's gradient), the encoders and the
  /// first activation to dZ0, and dA = (W0 dZ0)^T (W0 a row at a time).
  template <class Base>
  void delta_backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& k) {
    chain(w, k);
    const index batch = x.rows(), r = rank(), in = in_features(), out = out_features(), d = depth();
    const matrix<T>& f = k.gd.back();
    k.u = matrix<T>(batch, r);
    k.gb = matrix<T>(batch, r);
    kernels::gemm_nn<T, T>(1.0, x, f.view(), 0.0, k.u.view());
    kernels::gemm_nn<T, T>(1.0, g, b_.view(), 0.0, k.gb.view());
    kernels::gemm_tn<T>(scaling_, g, k.u.view(), 1.0, gb_.view());
    kernels::gemm_nt<T, T>(scaling_, k.gb.view(), f.view(), 1.0, dx);
    matrix<double> dg(in, r);  // dL/dG_i, from i = depth down to 0
    {
      matrix<T> df(in, r);
      kernels::gemm_tn<T>(scaling_, x, k.gb.view(), 0.0, df.view());
      for (std::size_t e = 0; e < df.storage().size(); ++e) dg.storage()[e] = static_cast<double>(df.storage()[e]);
    }
    // dres[i]: the gradient reaching H_i through the residual of decoder depth-1-i.
    std::vector<matrix<double>> dres(static_cast<std::size_t>(d));
    for (index i = d - 1; i >= 0; --i) {
      const auto ui = static_cast<std::size_t>(i);
      dres[static_cast<std::size_t>(d - 1 - i)] = dg;
      const matrix<T>& yi = k.y[ui];
      matrix<double> dy(in, r);
      for (std::size_t e = 0; e < dy.storage().size(); ++e) {
        dy.storage()[e] = dg.storage()[e] * detail::peanut_act_grad(act_, static_cast<double>(yi.storage()[e]));
      }
      accumulate_weight_grad(dy, k.gd[ui], gdec_[ui]);
      dg = input_grad(dy, dec_[ui]);
    }
    // Encoders: dg now holds dL/dH_depth (besides residuals, added per level).
    for (index i = d - 1; i >= 0; --i) {
      const auto ui = static_cast<std::size_t>(i);
      const matrix<T>& zi = k.z[ui + 1];
      matrix<double> dz(in, r);
      for (std::size_t e = 0; e < dz.storage().size(); ++e) {
        dz.storage()[e] = dg.storage()[e] * detail::peanut_act_grad(act_, static_cast<double>(zi.storage()[e]));
      }
      accumulate_weight_grad(dz, k.h[ui], genc_[ui]);
      dg = input_grad(dz, enc_[ui]);
      for (std::size_t e = 0; e < dg.storage().size(); ++e) dg.storage()[e] += dres[ui].storage()[e];
    }
    // dZ0 = dH0 * act'(Z0); dA[:, o] = sum_j W0[o, j] dZ0[j, :].
    for (std::size_t e = 0; e < dg.storage().size(); ++e) {
      dg.storage()[e] *= detail::peanut_act_grad(act_, static_cast<double>(k.z[0].storage()[e]));
    }
    std::vector<double> row(static_cast<std::size_t>(in)), acc(static_cast<std::size_t>(r));
    for (index o = 0; o < out; ++o) {
      w.dequantize_row(o, row.data());
      std::fill(acc.begin(), acc.end(), 0.0);
      for (index j = 0; j < in; ++j) {
        const double wj = row[static_cast<std::size_t>(j)];
        if (wj == 0) continue;
        const double* dj = dg.row(j);
        for (index i = 0; i < r; ++i) acc[static_cast<std::size_t>(i)] += wj * dj[i];
      }
      for (index i = 0; i < r; ++i) ga_(i, o) += static_cast<T>(acc[static_cast<std::size_t>(i)]);
    }
  }

  /// gm += dz^T m for out = m M^T (dz (in, r), m (in, r), gm (r, r)).
  static void accumulate_weight_grad(const matrix<double>& dz, const matrix<T>& m, matrix<T>& gm) {
    const index n = dz.rows(), r = dz.cols();
    for (index a = 0; a < r; ++a) {
      for (index b = 0; b < r; ++b) {
        double v = 0;
        for (index j = 0; j < n; ++j) v += dz(j, a) * static_cast<double>(m(j, b));
        gm(a, b) += static_cast<T>(v);
      }
    }
  }

  /// dz M: the gradient of m for out = m M^T.
  static matrix<double> input_grad(const matrix<double>& dz, const matrix<T>& mm) {
    const index n = dz.rows(), r = dz.cols();
    matrix<double> out(n, r);
    for (index j = 0; j < n; ++j) {
      const double* dj = dz.row(j);
      double* oj = out.row(j);
      for (index a = 0; a < r; ++a) {
        const double c = dj[a];
        if (c == 0) continue;
        const T* ma = mm.row(a);
        for (index b = 0; b < r; ++b) oj[b] += c * static_cast<double>(ma[b]);
      }
    }
    return out;
  }

  matrix<T> a_;                // (r, out): peanut_A.weight
  matrix<T> b_;                // (out, r): peanut_B.weight
  std::vector<matrix<T>> enc_;  // depth x (r, r)
  std::vector<matrix<T>> dec_;  // depth x (r, r)
  index in_ = 0;
  double scaling_ = 1.0;
  peanut_activation act_ = peanut_activation::relu;
  std::string act_name_ = "relu";
  matrix<T> ga_, gb_;
  std::vector<matrix<T>> genc_, gdec_;
  // What the last delta_weight added: F, B and the base it read.
  detail::merge_memo<remembered> merged_;
};

}  // namespace peft
