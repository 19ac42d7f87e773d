// peft/adapters/vera.hpp — VeRA (Kopiczko et al. 2024) as HuggingFace PEFT computes it.
//
//   y = x W0^T + b0 + lambda_b * ((lambda_d * (x A_s^T)) B_s^T)      no alpha, no scale
//   A (r, in_max), B (out_max, r): frozen random projections SHARED by every adapted layer of a
//   model (one std::shared_ptr each, never copied); per layer A_s = A[:, :in], B_s = B[:out, :].
//   lambda_d (r), lambda_b (out): trainable, init d_initial (0.1) and 0 (a no-op).
//
//   auto p = peft::make_vera_projections<float>(256, {{in1, out1}, {in2, out2}}, seed);
//   peft::vera<float> a1(p, in1, out1), a2(p, in2, out2);   // both reference p.A and p.B
//
// The passes come from the low-rank core (lambda_d is its gate, lambda_b its output scale);
// checkpoints: io/peft/vera.hpp (a checkpoint does not say in_features: call set_features with
// the base's shape). Details: docs/methods/vera.md.
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

#include "peft/adapters/detail/low_rank_core.hpp"
#include "peft/adapters/detail/projection_sizes.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"

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
  const auto [in_max, out_max] = detail::shared_projection_sizes("make_vera_projections", rank, layers);
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

namespace detail {

/// What VeRA and PVeRA share, under the low-rank core: the frozen projections A and B (one
/// std::shared_ptr each, shared by every adapted layer), the trainable lambda_d (the core's gate)
/// and lambda_b (its output scale) with their gradients, and the layer's shape. Derived gives
/// `method`, `rank()`, `A_slice()` and its constructors' own checks; tensor names and messages
/// take the method as their prefix ("vera_A", "pvera::set_features").
template <class Derived, compute_scalar T>
class shared_projections_adapter : public low_rank_adapter<Derived, T> {
 public:
  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  double d_initial() const noexcept { return d_initial_; }

  /// Sets the layer's shape (a checkpoint does not determine in_features): out_features must be
  /// the length of lambda_b, in_features at most A's width. Throws shape_error otherwise.
  void set_features(index in_features, index out_features) {
    const std::string where = pass_name(Derived::method, "set_features");
    check_ready(where.c_str());
    if (out_features != out_) {
      raise<shape_error>(where.c_str(), "out_features " + std::to_string(out_features) + " differs from " +
                                            tensor("_lambda_b") + "'s length " + std::to_string(out_));
    }
    check_features(where.c_str(), in_features, out_features);
    in_ = in_features;
  }

  /// The shared projections themselves (the same objects for every layer that shares them).
  const std::shared_ptr<matrix<T>>& shared_A() const noexcept { return a_; }
  const std::shared_ptr<matrix<T>>& shared_B() const noexcept { return b_; }
  /// B_s = B[:out, :] (out, r): a view into the shared projection.
  matrix_view<const T> B_slice() const noexcept {
    return b_ ? matrix_view<const T>(b_->data(), out_, self().rank(), b_->cols()) : matrix_view<const T>{};
  }
  /// lambda_d as (1, its length), lambda_b as (1, out), and their gradients.
  matrix_view<T> lambda_d() noexcept { return lambda_d_.view(); }
  matrix_view<const T> lambda_d() const noexcept { return lambda_d_.view(); }
  matrix_view<T> lambda_b() noexcept { return lambda_b_.view(); }
  matrix_view<const T> lambda_b() const noexcept { return lambda_b_.view(); }
  matrix_view<const T> grad_lambda_d() const noexcept { return gd_.view(); }
  matrix_view<const T> grad_lambda_b() const noexcept { return gb_.view(); }

  /// The term lambda_b * ((lambda_d[:r] * (x A_slice^T)) B_s^T) for the low-rank core; A and B
  /// frozen (lambda_d's values past r, PVeRA's logvar, get no gradient).
  low_rank_term<T> low_rank() const noexcept {
    return {self().A_slice(), B_slice(), lambda_d_.data(), lambda_b_.data(), nullptr, T{1}};
  }
  low_rank_gradients<T> low_rank_grads() noexcept { return {{}, {}, gd_.data(), gb_.data(), nullptr}; }

  /// Throws peft::error for a default-constructed adapter (no projections).
  void check_ready(const char* where) const {
    if (!a_ || !b_) raise<error>(where, "the adapter is default-constructed (no projections)");
  }

  /// <method>_lambda_b (out), <method>_lambda_d: trainable; <method>_A, <method>_B: the whole
  /// shared projections, frozen, shared = true (saved once as base_model.<method>_A / _B).
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({tensor("_lambda_b"), lambda_b_.view(), gb_.view(), shape_of(lambda_b_.view(), true)});
    p.push_back({tensor("_lambda_d"), lambda_d_.view(), gd_.view(), shape_of(lambda_d_.view(), true)});
    if (a_ && b_) {
      p.push_back({tensor("_A"), a_->view(), {}, shape_of(a_->view(), false), false, true});
      p.push_back({tensor("_B"), b_->view(), {}, shape_of(b_->view(), false), false, true});
    }
    return p;
  }

  void zero_grad() {
    gd_.fill(T{0});
    gb_.fill(T{0});
  }

 protected:
  shared_projections_adapter() = default;
  shared_projections_adapter(std::shared_ptr<matrix<T>> a, std::shared_ptr<matrix<T>> b, double d_initial)
      : a_(std::move(a)), b_(std::move(b)), d_initial_(d_initial) {}

  /// After the derived constructor's checks of A and B: the shape, and lambda_d (`d_size` values;
  /// empty: d_initial each; `d_expected` says what its length should be) and lambda_b (out
  /// values; empty: 0), with zero gradients.
  void init(const char* where, index in_features, index out_features, std::vector<T> lambda_d, index d_size,
            const std::string& d_expected, std::vector<T> lambda_b) {
    check_features(where, in_features, out_features);
    in_ = in_features;
    out_ = out_features;
    if (lambda_d.empty()) lambda_d.assign(static_cast<std::size_t>(d_size), static_cast<T>(d_initial_));
    if (lambda_b.empty()) lambda_b.assign(static_cast<std::size_t>(out_), T{0});
    if (static_cast<index>(lambda_d.size()) != d_size) {
      raise<shape_error>(where, tensor("_lambda_d") + " has " + std::to_string(lambda_d.size()) + " values, expected " +
                                    d_expected);
    }
    if (static_cast<index>(lambda_b.size()) != out_) {
      raise<shape_error>(where, tensor("_lambda_b") + " has " + std::to_string(lambda_b.size()) +
                                    " values, expected out_features " + std::to_string(out_));
    }
    lambda_d_ = matrix<T>(1, d_size, std::move(lambda_d));
    lambda_b_ = matrix<T>(1, out_, std::move(lambda_b));
    gd_ = matrix<T>(1, d_size);
    gb_ = matrix<T>(1, out_);
  }
  /// "<method><suffix>", a tensor's name.
  static std::string tensor(const char* suffix) {
    std::string s(Derived::method);
    s += suffix;
    return s;
  }

  std::shared_ptr<matrix<T>> a_;  // (r or 2r, in_max), shared
  std::shared_ptr<matrix<T>> b_;  // (out_max, r), shared
  index in_ = 0;

 private:
  void check_features(const char* where, index in, index out) const {
    if (in < 1 || in > a_->cols()) {
      raise<shape_error>(where, "in_features " + std::to_string(in) + " is outside [1, " + std::to_string(a_->cols()) +
                                    "] (" + tensor("_A") + "'s width)");
    }
    if (out < 1 || out > b_->rows()) {
      raise<shape_error>(where, "out_features " + std::to_string(out) + " is outside [1, " +
                                    std::to_string(b_->rows()) + "] (" + tensor("_B") + "'s height)");
    }
  }
  const Derived& self() const { return static_cast<const Derived&>(*this); }

  index out_ = 0;
  matrix<T> lambda_d_;  // (1, r or 2r)
  matrix<T> lambda_b_;  // (1, out)
  matrix<T> gd_;        // gradients, same shapes
  matrix<T> gb_;
  double d_initial_ = 0.1;
};

}  // namespace detail

template <compute_scalar T>
class vera : public detail::shared_projections_adapter<vera<T>, T> {
  using base = detail::shared_projections_adapter<vera<T>, T>;

 public:
  static constexpr std::string_view method = "vera";

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
      : base(std::move(a), std::move(b), d_initial) {
    constexpr const char* where = "vera::vera";
    if (!this->a_ || !this->b_) detail::raise<shape_error>(where, "the projections vera_A and vera_B must not be null");
    if (this->a_->rows() < 1) detail::raise<shape_error>(where, "vera_A has no rows (rank 0)");
    if (this->b_->cols() != this->a_->rows()) {
      detail::raise<shape_error>(where, "vera_B is " + detail::shape_string(this->b_->rows(), this->b_->cols()) +
                                            " but vera_A has rank " + std::to_string(this->a_->rows()));
    }
    const index r = rank();
    this->init(where, in_features, out_features, std::move(lambda_d), r, "the rank " + std::to_string(r),
               std::move(lambda_b));
  }

  index rank() const noexcept { return this->a_ ? this->a_->rows() : 0; }
  /// A_s = A[:, :in] (r, in): a view into the shared projection (B_s: B_slice()).
  matrix_view<const T> A_slice() const noexcept {
    return this->a_ ? matrix_view<const T>(this->a_->data(), rank(), this->in_, this->a_->cols())
                    : matrix_view<const T>{};
  }
};

}  // namespace peft
