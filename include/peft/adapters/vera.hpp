// peft/adapters/vera.hpp — VeRA (Kopiczko et al. 2024) as HuggingFace PEFT implements it.
//
//   y = x W0^T + b0 + lambda_b * ((lambda_d * (x A_s^T)) B_s^T)      no alpha, no scale
//   A (r, in_max), B (out_max, r): frozen random projections SHARED by every adapted layer of a
//   model (one std::shared_ptr each, never copied); per layer the slices
//   A_s = A[:, :in] (r, in) and B_s = B[:out, :] (out, r) are strided views into them.
//   lambda_d (r), lambda_b (out): the trainable vectors, init d_initial (0.1) and 0, so a fresh
//   adapter is the identity.
//
//   auto p = peft::make_vera_projections<float>(256, {{in1, out1}, {in2, out2}}, seed);
//   peft::vera<float> a1(p, in1, out1), a2(p, in2, out2);   // both reference p.A and p.B
//
// Gradients (g = dL/dy, t = x A_s^T (batch, r), z = (lambda_d * t) B_s^T (batch, out)):
//   d lambda_b += sum_rows g * z;   u = (g * lambda_b) B_s (batch, r);
//   d lambda_d += sum_rows u * t;   dx = g W0 + (u * lambda_d) A_s.
// Merge: Delta W = diag(lambda_b) B_s diag(lambda_d) A_s (out, in).
// Checkpoint names: per module "vera_lambda_b", "vera_lambda_d"; shared "base_model.vera_A",
// "base_model.vera_B" (written once). Checkpoints saved with save_projection=false are rejected:
// their projections must be regenerated with PyTorch's RNG from projection_prng_key.
//
// A checkpoint does not say a layer's in_features (lambda_b gives out_features): from_checkpoint
// assumes in = in_max; call set_features(in, out) with the base layer's shape before use.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/base/dense.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/interop/eigen.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/io/adapter_config.hpp"
#include "peft/io/checkpoint_tensors.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// The frozen projections VeRA shares between layers: A (r, in_max), B (out_max, r).
template <compute_scalar T>
struct vera_projections {
  std::shared_ptr<matrix<T>> A;  // (r, in_max)
  std::shared_ptr<matrix<T>> B;  // (out_max, r)
};

/// Projections for the layers given as (in_features, out_features) pairs: A (rank, max in),
/// B (max out, rank), drawn as PEFT draws them, kaiming-uniform with gain sqrt(2)
/// (U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), fan_in = max in for A, rank for B), but from
/// peft::rng seeded with `seed`: this does NOT reproduce PyTorch's generator, so the values
/// differ from those PEFT derives from projection_prng_key (they are saved with the adapter).
template <compute_scalar T>
vera_projections<T> make_vera_projections(index rank, std::span<const std::pair<index, index>> layers,
                                          std::uint64_t seed = 0) {
  constexpr const char* where = "make_vera_projections";
  if (rank < 1) detail::raise<shape_error>(where, "rank must be >= 1, got " + std::to_string(rank));
  if (layers.empty()) detail::raise<shape_error>(where, "no layer given");
  index in_max = 0, out_max = 0;
  for (const auto& [in, out] : layers) {
    if (in < 1 || out < 1) {
      detail::raise<shape_error>(where, "a layer has in_features " + std::to_string(in) + " and out_features " +
                                            std::to_string(out) + "; both must be >= 1");
    }
    in_max = std::max(in_max, in);
    out_max = std::max(out_max, out);
  }
  rng gen(seed);
  vera_projections<T> p{std::make_shared<matrix<T>>(rank, in_max), std::make_shared<matrix<T>>(out_max, rank)};
  const double bound_a = std::sqrt(6.0 / static_cast<double>(in_max));
  for (auto& v : p.A->storage()) v = static_cast<T>(gen.uniform(-bound_a, bound_a));
  const double bound_b = std::sqrt(6.0 / static_cast<double>(rank));
  for (auto& v : p.B->storage()) v = static_cast<T>(gen.uniform(-bound_b, bound_b));
  return p;
}

/// make_vera_projections for an initializer list of (in_features, out_features) pairs.
template <compute_scalar T>
vera_projections<T> make_vera_projections(index rank, std::initializer_list<std::pair<index, index>> layers,
                                          std::uint64_t seed = 0) {
  return make_vera_projections<T>(rank, std::span<const std::pair<index, index>>(layers.begin(), layers.size()),
                                  seed);
}

template <compute_scalar T>
class vera : public additive_adapter<vera<T>, T> {
  friend class additive_adapter<vera<T>, T>;

 public:
  using scalar = T;
  static constexpr std::string_view method = "vera";

  /// What backward needs from forward: t = x A_s^T (batch, r), z = (lambda_d * t) B_s^T (batch, out).
  struct cache_type {
    matrix<T> t;
    matrix<T> z;
  };

  vera() = default;

  /// A fresh adapter over shared projections: lambda_d = d_initial, lambda_b = 0 (the identity).
  vera(std::shared_ptr<matrix<T>> a, std::shared_ptr<matrix<T>> b, index in_features, index out_features,
       double d_initial = 0.1)
      : vera(std::move(a), std::move(b), in_features, out_features, std::vector<T>{}, std::vector<T>{}, d_initial) {}

  /// The same from a vera_projections.
  vera(const vera_projections<T>& p, index in_features, index out_features, double d_initial = 0.1)
      : vera(p.A, p.B, in_features, out_features, d_initial) {}

  /// An adapter with given vectors: lambda_d (r values), lambda_b (out_features values). Empty
  /// vectors take the default init (d_initial, 0). `d_initial` is kept for describe_in.
  vera(std::shared_ptr<matrix<T>> a, std::shared_ptr<matrix<T>> b, index in_features, index out_features,
       std::vector<T> lambda_d, std::vector<T> lambda_b, double d_initial = 0.1)
      : a_(std::move(a)), b_(std::move(b)), d_initial_(d_initial) {
    constexpr const char* where = "vera::vera";
    if (!a_ || !b_) detail::raise<shape_error>(where, "the projections vera_A and vera_B must not be null");
    if (a_->rows() < 1) detail::raise<shape_error>(where, "vera_A has no rows (rank 0)");
    if (b_->cols() != a_->rows()) {
      detail::raise<shape_error>(where, "vera_B is " + detail::shape_string(b_->rows(), b_->cols()) +
                                            " but vera_A has rank " + std::to_string(a_->rows()));
    }
    check_features(where, in_features, out_features);
    in_ = in_features;
    out_ = out_features;
    const index r = rank();
    if (lambda_d.empty()) lambda_d.assign(static_cast<std::size_t>(r), static_cast<T>(d_initial));
    if (lambda_b.empty()) lambda_b.assign(static_cast<std::size_t>(out_), T{0});
    if (static_cast<index>(lambda_d.size()) != r) {
      detail::raise<shape_error>(where, "vera_lambda_d has " + std::to_string(lambda_d.size()) +
                                            " values, expected the rank " + std::to_string(r));
    }
    if (static_cast<index>(lambda_b.size()) != out_) {
      detail::raise<shape_error>(where, "vera_lambda_b has " + std::to_string(lambda_b.size()) +
                                            " values, expected out_features " + std::to_string(out_));
    }
    lambda_d_ = matrix<T>(1, r, std::move(lambda_d));
    lambda_b_ = matrix<T>(1, out_, std::move(lambda_b));
    gd_ = matrix<T>(1, r);
    gb_ = matrix<T>(1, out_);
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  index rank() const noexcept { return a_ ? a_->rows() : 0; }
  double d_initial() const noexcept { return d_initial_; }

  /// Sets the layer's shape (a checkpoint does not determine in_features): out_features must be
  /// the length of lambda_b, in_features at most vera_A's width. Throws shape_error otherwise.
  void set_features(index in_features, index out_features) {
    check_ready("vera::set_features");
    if (out_features != out_) {
      detail::raise<shape_error>("vera::set_features", "out_features " + std::to_string(out_features) +
                                                            " differs from vera_lambda_b's length " + std::to_string(out_));
    }
    check_features("vera::set_features", in_features, out_features);
    in_ = in_features;
  }

  /// The shared projections themselves (the same objects for every layer that shares them).
  const std::shared_ptr<matrix<T>>& shared_A() const noexcept { return a_; }
  const std::shared_ptr<matrix<T>>& shared_B() const noexcept { return b_; }
  /// A_s = A[:, :in] (r, in) and B_s = B[:out, :] (out, r): views into the shared projections.
  matrix_view<const T> A_slice() const noexcept {
    return a_ ? matrix_view<const T>(a_->data(), rank(), in_, a_->cols()) : matrix_view<const T>{};
  }
  matrix_view<const T> B_slice() const noexcept {
    return b_ ? matrix_view<const T>(b_->data(), out_, rank(), b_->cols()) : matrix_view<const T>{};
  }
  /// lambda_d as (1, r), lambda_b as (1, out), and their gradients.
  matrix_view<T> lambda_d() noexcept { return lambda_d_.view(); }
  matrix_view<const T> lambda_d() const noexcept { return lambda_d_.view(); }
  matrix_view<T> lambda_b() noexcept { return lambda_b_.view(); }
  matrix_view<const T> lambda_b() const noexcept { return lambda_b_.view(); }
  matrix_view<const T> grad_lambda_d() const noexcept { return gd_.view(); }
  matrix_view<const T> grad_lambda_b() const noexcept { return gb_.view(); }

  /// dW = diag(lambda_b) B_s diag(lambda_d) A_s (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("vera::delta_weight", w);
    detail::expect_shape("vera::delta_weight", "dw", dw, out_, in_);
    const index r = rank();
    matrix<T> bl(out_, r);  // diag(lambda_b) B_s diag(lambda_d)
    const auto bs = B_slice();
    for (index i = 0; i < out_; ++i) {
      for (index k = 0; k < r; ++k) bl(i, k) = lambda_b_(0, i) * bs(i, k) * lambda_d_(0, k);
    }
    kernels::gemm_nn<T, T>(1.0, bl.view(), A_slice(), 0.0, dw);
  }

  /// VeRA does not touch the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  // ---- PEFT checkpoints (io/peft_checkpoint.hpp calls these) ------------------------------------

  static bool handles(const io::adapter_config& c) { return c.peft_type == "VERA"; }
  static std::vector<std::string_view> checkpoint_parameters() { return {"vera_lambda_b", "vera_lambda_d"}; }
  static std::vector<std::string_view> shared_parameters() { return {"vera_A", "vera_B"}; }

  /// The adapter of one module: vera_A / vera_B referenced from `shared` (the same objects for
  /// every module), the lambdas copied. in_features is set to vera_A's width: call set_features
  /// with the base layer's shape. unsupported_error for save_projection=false; format_error for
  /// shapes that disagree (r, lambda lengths, a layer wider than the projections).
  static vera from_checkpoint(const io::adapter_config& c, const io::checkpoint_tensors<T>& m,
                              const io::checkpoint_tensors<T>& shared) {
    constexpr const char* where = "vera::from_checkpoint";
    if (!saves_projection(c)) {
      detail::raise<unsupported_error>(
          where, "the adapter was saved with save_projection=false: vera_A and vera_B are not in the checkpoint, "
                 "and PEFT regenerates them from projection_prng_key with PyTorch's random generator, which "
                 "peft-cpp does not reproduce; load the adapter in PEFT and save it again with save_projection=True");
    }
    if (!shared.contains("vera_A") || !shared.contains("vera_B")) {
      detail::raise<format_error>(where, "the checkpoint has no base_model.vera_A / base_model.vera_B although "
                                         "save_projection is true");
    }
    const auto& sa = shared.shape("vera_A", 2);
    const auto& sb = shared.shape("vera_B", 2);
    if (sb[1] != sa[0] || sa[0] < 1) {
      detail::raise<format_error>(where, "vera_A " + io::detail::shape_text(sa) + " and vera_B " +
                                             io::detail::shape_text(sb) + " disagree on the rank");
    }
    if (c.raw.contains("r") && c.r != static_cast<index>(sa[0])) {
      detail::raise<format_error>(where, "vera_A has rank " + std::to_string(sa[0]) + " but adapter_config.json gives r = " +
                                             std::to_string(c.r));
    }
    const auto& sd = m.shape("vera_lambda_d", 1);
    const auto& sl = m.shape("vera_lambda_b", 1);
    if (sd[0] != sa[0]) {
      detail::raise<format_error>(where, "module '" + m.module() + "': vera_lambda_d has " + std::to_string(sd[0]) +
                                             " values, expected the rank " + std::to_string(sa[0]));
    }
    if (sl[0] < 1 || sl[0] > sb[0]) {
      detail::raise<format_error>(where, "module '" + m.module() + "': vera_lambda_b has " + std::to_string(sl[0]) +
                                             " values, but vera_B has " + std::to_string(sb[0]) + " rows");
    }
    const double d0 = number_field(c, "d_initial", 0.1);
    return vera(shared.shared("vera_A"), shared.shared("vera_B"), static_cast<index>(sa[1]),
                static_cast<index>(sl[0]), m.copy("vera_lambda_d").storage(), m.copy("vera_lambda_b").storage(), d0);
  }

  /// Makes `c` describe this module when saving: peft_type VERA, r, save_projection true (the
  /// projections are always written), d_initial (kept when the config has one).
  void describe_in(io::adapter_config& c, const std::string& /*module*/) const {
    c.peft_type = "VERA";
    c.r = rank();
    c.raw["save_projection"] = true;
    if (!c.raw.contains("d_initial") || c.raw["d_initial"].is_null()) c.raw["d_initial"] = d_initial_;
    if (!c.raw.contains("projection_prng_key")) c.raw["projection_prng_key"] = 0;
    if (!c.raw.contains("vera_dropout")) c.raw["vera_dropout"] = 0.0;
  }

  /// vera_lambda_b (out), vera_lambda_d (r): trainable; vera_A, vera_B: the whole shared
  /// projections, frozen, shared = true (saved once as base_model.vera_A / vera_B).
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"vera_lambda_b", lambda_b_.view(), gb_.view(), detail::shape_of(lambda_b_.view(), true)});
    p.push_back({"vera_lambda_d", lambda_d_.view(), gd_.view(), detail::shape_of(lambda_d_.view(), true)});
    if (a_ && b_) {
      p.push_back({"vera_A", a_->view(), {}, detail::shape_of(a_->view(), false), false, true});
      p.push_back({"vera_B", b_->view(), {}, detail::shape_of(b_->view(), false), false, true});
    }
    return p;
  }

  void zero_grad() {
    gd_.fill(T{0});
    gb_.fill(T{0});
  }

 private:
  static bool saves_projection(const io::adapter_config& c) {
    auto it = c.raw.find("save_projection");
    if (it == c.raw.end() || it->is_null()) return true;  // PEFT's default
    if (!it->is_boolean()) detail::raise<format_error>("vera::from_checkpoint", "'save_projection' must be true or false");
    return it->template get<bool>();
  }
  static double number_field(const io::adapter_config& c, const char* name, double fallback) {
    auto it = c.raw.find(name);
    if (it == c.raw.end() || it->is_null()) return fallback;
    if (!it->is_number()) {
      detail::raise<format_error>("vera::from_checkpoint", std::string("'") + name + "' must be a number");
    }
    return it->template get<double>();
  }

  void check_features(const char* where, index in, index out) const {
    if (in < 1 || in > a_->cols()) {
      detail::raise<shape_error>(where, "in_features " + std::to_string(in) + " is outside [1, " +
                                            std::to_string(a_->cols()) + "] (vera_A's width)");
    }
    if (out < 1 || out > b_->rows()) {
      detail::raise<shape_error>(where, "out_features " + std::to_string(out) + " is outside [1, " +
                                            std::to_string(b_->rows()) + "] (vera_B's height)");
    }
  }
  void check_ready(const char* where) const {
    if (!a_ || !b_) detail::raise<error>(where, "the adapter is default-constructed (no projections)");
  }
  template <class Base>
  void check_base(const char* where, const Base& w) const {
    check_ready(where);
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

  /// cache.t = x A_s^T; cache.z = (lambda_d * t) B_s^T.
  void project(matrix_view<const T> x, cache_type& cache) const {
    const index n = x.rows(), r = rank();
    if (cache.t.rows() != n || cache.t.cols() != r) cache.t = matrix<T>(n, r);
    if (cache.z.rows() != n || cache.z.cols() != out_) cache.z = matrix<T>(n, out_);
    kernels::gemm_nt<T, T>(1.0, x, A_slice(), 0.0, cache.t.view());                  // (batch, r)
    matrix<T> u(n, r);                                                                 // lambda_d * t
    for (index i = 0; i < n; ++i) {
      for (index k = 0; k < r; ++k) u(i, k) = cache.t(i, k) * lambda_d_(0, k);
    }
    kernels::gemm_nt<T, T>(1.0, u.view(), B_slice(), 0.0, cache.z.view());           // (batch, out)
  }

  /// Fused form (core/additive_adapter.hpp): t = x A_s^T once; each output tile then gets
  /// z = (t * lambda_d) B_s^T for its block (kept in the cache for backward) and lambda_b * z.
  void prepare_tiles(matrix_view<const T> x, cache_type& cache) const {
    const index n = x.rows(), r = rank();
    if (cache.t.rows() != n || cache.t.cols() != r) cache.t = matrix<T>(n, r);
    if (cache.z.rows() != n || cache.z.cols() != out_) cache.z = matrix<T>(n, out_);
    kernels::gemm_nt<T, T>(1.0, x, A_slice(), 0.0, cache.t.view());                  // (batch, r)
  }
  void add_delta_tile(index i0, index j0, matrix_view<T> tile, cache_type& cache) const {
    const index r = rank();
    const auto tb = as_eigen(matrix_view<const T>(cache.t.view()).block(i0, 0, tile.rows(), r));
    const auto bb = as_eigen(B_slice().block(j0, 0, tile.cols(), r));
    const auto d = as_eigen(matrix_view<const T>(lambda_d_.view()).block(0, 0, 1, r));
    auto z = as_eigen(cache.z.view().block(i0, j0, tile.rows(), tile.cols()));
    z.noalias() = (tb.array().rowwise() * d.array().row(0)).matrix() * bb.transpose();
    for (index i = 0; i < tile.rows(); ++i) {
      for (index j = 0; j < tile.cols(); ++j) tile(i, j) += lambda_b_(0, j0 + j) * z(i, j);
    }
  }

  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    project(x, cache);
    for (index i = 0; i < y.rows(); ++i) {
      T* row = y.row(i);
      for (index j = 0; j < out_; ++j) row[j] += lambda_b_(0, j) * cache.z(i, j);
    }
  }

  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    const index n = x.rows(), r = rank();
    if (cache.t.rows() != n || cache.t.cols() != r || cache.z.rows() != n || cache.z.cols() != out_) {
      project(x, cache);
    }
    matrix<T> gl(n, out_);  // g * lambda_b
    for (index i = 0; i < n; ++i) {
      for (index j = 0; j < out_; ++j) {
        gb_(0, j) += g(i, j) * cache.z(i, j);
        gl(i, j) = g(i, j) * lambda_b_(0, j);
      }
    }
    matrix<T> u(n, r);                                                                 // (g * lambda_b) B_s
    kernels::gemm_nn<T, T>(1.0, gl.view(), B_slice(), 0.0, u.view());
    for (index i = 0; i < n; ++i) {
      for (index k = 0; k < r; ++k) {
        gd_(0, k) += u(i, k) * cache.t(i, k);
        u(i, k) *= lambda_d_(0, k);
      }
    }
    kernels::gemm_nn<T, T>(1.0, u.view(), A_slice(), 1.0, dx);                        // dx += u A_s
  }

  std::shared_ptr<matrix<T>> a_;  // (r, in_max), shared
  std::shared_ptr<matrix<T>> b_;  // (out_max, r), shared
  index in_ = 0;
  index out_ = 0;
  matrix<T> lambda_d_;  // (1, r)
  matrix<T> lambda_b_;  // (1, out)
  matrix<T> gd_;        // gradients, same shapes
  matrix<T> gb_;
  double d_initial_ = 0.1;
};

static_assert(mergeable_adapter_for<vera<float>, dense<float>>);
static_assert(mergeable_adapter_for<vera<double>, dense<bf16>>);

}  // namespace peft
