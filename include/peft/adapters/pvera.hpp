// peft/adapters/pvera.hpp — PVeRA (probabilistic VeRA) as HuggingFace PEFT computes it with the
// learned mean: in eval mode (sample_at_inference=False) and when merging.
//
//   h = lambda_d * (x A_s^T)                 A (2r, in_max) shared, A_s = A[:, :in]; lambda_d (2r)
//   mu = h[:, :r], logvar = h[:, r:]          PEFT's chunk(2)
//   y = x W0^T + b0 + lambda_b * (mu B_s^T)   B (out_max, r) shared, B_s = B[:out, :]; lambda_b (out)
//
// so only the first r rows of A and of lambda_d act: this is VeRA over A[:r, :in] with gate
// lambda_d[:r], and the passes come from the low-rank core. logvar (the last r values of
// lambda_d, rows r..2r of A) only matters when PEFT samples mu + eps exp(logvar / 2) (training,
// or sample_at_inference), which is not implemented: its gradient here is 0. The projections are
// shared like VeRA's (vera_projections); make_pvera_projections draws them bit for bit as PEFT
// does from projection_prng_key. Checkpoints: io/peft/pvera.hpp. Details: docs/methods/pvera.md.
#pragma once

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
#include "peft/adapters/vera.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/torch_generator.hpp"

namespace peft {

/// PEFT's PVeRA projections for the layers given as (in_features, out_features) pairs: A (2 rank,
/// max in) then B (max out, rank), each torch.nn.init.kaiming_uniform_ (bound sqrt(6 / fan_in),
/// fan_in = max in for A, rank for B) of a float32 tensor from
/// torch.Generator().manual_seed(projection_prng_key): the same numbers PEFT makes (for double,
/// the float32 values widened, as PEFT's .double() does).
template <compute_scalar T>
vera_projections<T> make_pvera_projections(index rank, std::span<const std::pair<index, index>> layers,
                                           std::uint64_t projection_prng_key = 0) {
  const auto [in_max, out_max] = detail::shared_projection_sizes("make_pvera_projections", rank, layers);
  torch_generator gen(projection_prng_key);
  auto kaiming = [&gen](matrix<T>& m, index fan_in) {
    const double bound = std::sqrt(3.0) * (std::sqrt(2.0) / std::sqrt(static_cast<double>(fan_in)));
    for (auto& v : m.storage()) v = static_cast<T>(gen.uniform<float>(-bound, bound));
  };
  vera_projections<T> p{std::make_shared<matrix<T>>(2 * rank, in_max), std::make_shared<matrix<T>>(out_max, rank)};
  kaiming(*p.A, in_max);
  kaiming(*p.B, rank);
  return p;
}

/// make_pvera_projections for an initializer list of (in_features, out_features) pairs.
template <compute_scalar T>
vera_projections<T> make_pvera_projections(index rank, std::initializer_list<std::pair<index, index>> layers,
                                           std::uint64_t projection_prng_key = 0) {
  return make_pvera_projections<T>(rank, std::span<const std::pair<index, index>>(layers.begin(), layers.size()),
                                   projection_prng_key);
}

template <compute_scalar T>
class pvera : public low_rank_adapter<pvera<T>, T> {
 public:
  static constexpr std::string_view method = "pvera";

  pvera() = default;

  /// A fresh adapter over shared projections, PEFT's init: lambda_d = d_initial (all 2r values),
  /// lambda_b = 0 (the identity).
  pvera(std::shared_ptr<matrix<T>> a, std::shared_ptr<matrix<T>> b, index in_features, index out_features,
        double d_initial = 0.1)
      : pvera(std::move(a), std::move(b), in_features, out_features, std::vector<T>{}, std::vector<T>{}, d_initial) {}

  /// The same from a vera_projections (make_pvera_projections).
  pvera(const vera_projections<T>& p, index in_features, index out_features, double d_initial = 0.1)
      : pvera(p.A, p.B, in_features, out_features, d_initial) {}

  /// An adapter with given vectors: lambda_d (2r values: the mean's gate, then logvar's),
  /// lambda_b (out_features values). Empty vectors take the default init (d_initial, 0).
  /// `d_initial` is kept for describe_in. A must have twice B's columns.
  pvera(std::shared_ptr<matrix<T>> a, std::shared_ptr<matrix<T>> b, index in_features, index out_features,
        std::vector<T> lambda_d, std::vector<T> lambda_b, double d_initial = 0.1)
      : a_(std::move(a)), b_(std::move(b)), d_initial_(d_initial) {
    constexpr const char* where = "pvera::pvera";
    if (!a_ || !b_) detail::raise<shape_error>(where, "the projections pvera_A and pvera_B must not be null");
    if (b_->cols() < 1) detail::raise<shape_error>(where, "pvera_B has no columns (rank 0)");
    if (a_->rows() != 2 * b_->cols()) {
      detail::raise<shape_error>(where, "pvera_A is " + detail::shape_string(a_->rows(), a_->cols()) +
                                            " but pvera_B is " + detail::shape_string(b_->rows(), b_->cols()) +
                                            "; pvera_A needs 2 r rows for rank r");
    }
    check_features(where, in_features, out_features);
    in_ = in_features;
    out_ = out_features;
    const index r2 = 2 * rank();
    if (lambda_d.empty()) lambda_d.assign(static_cast<std::size_t>(r2), static_cast<T>(d_initial));
    if (lambda_b.empty()) lambda_b.assign(static_cast<std::size_t>(out_), T{0});
    if (static_cast<index>(lambda_d.size()) != r2) {
      detail::raise<shape_error>(where, "pvera_lambda_d has " + std::to_string(lambda_d.size()) +
                                            " values, expected 2 r = " + std::to_string(r2));
    }
    if (static_cast<index>(lambda_b.size()) != out_) {
      detail::raise<shape_error>(where, "pvera_lambda_b has " + std::to_string(lambda_b.size()) +
                                            " values, expected out_features " + std::to_string(out_));
    }
    lambda_d_ = matrix<T>(1, r2, std::move(lambda_d));
    lambda_b_ = matrix<T>(1, out_, std::move(lambda_b));
    gd_ = matrix<T>(1, r2);
    gb_ = matrix<T>(1, out_);
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  /// r: pvera_B's columns (pvera_A has 2 r rows).
  index rank() const noexcept { return b_ ? b_->cols() : 0; }
  double d_initial() const noexcept { return d_initial_; }

  /// Sets the layer's shape (a checkpoint does not determine in_features): out_features must be
  /// the length of lambda_b, in_features at most pvera_A's width. Throws shape_error otherwise.
  void set_features(index in_features, index out_features) {
    check_ready("pvera::set_features");
    if (out_features != out_) {
      detail::raise<shape_error>("pvera::set_features", "out_features " + std::to_string(out_features) +
                                                             " differs from pvera_lambda_b's length " +
                                                             std::to_string(out_));
    }
    check_features("pvera::set_features", in_features, out_features);
    in_ = in_features;
  }

  /// The shared projections themselves (the same objects for every layer that shares them).
  const std::shared_ptr<matrix<T>>& shared_A() const noexcept { return a_; }
  const std::shared_ptr<matrix<T>>& shared_B() const noexcept { return b_; }
  /// The rows of A the mean reads, A[:r, :in] (r, in), and B_s = B[:out, :] (out, r): views into
  /// the shared projections.
  matrix_view<const T> A_slice() const noexcept {
    return a_ ? matrix_view<const T>(a_->data(), rank(), in_, a_->cols()) : matrix_view<const T>{};
  }
  matrix_view<const T> B_slice() const noexcept {
    return b_ ? matrix_view<const T>(b_->data(), out_, rank(), b_->cols()) : matrix_view<const T>{};
  }
  /// lambda_d as (1, 2r), lambda_b as (1, out), and their gradients.
  matrix_view<T> lambda_d() noexcept { return lambda_d_.view(); }
  matrix_view<const T> lambda_d() const noexcept { return lambda_d_.view(); }
  matrix_view<T> lambda_b() noexcept { return lambda_b_.view(); }
  matrix_view<const T> lambda_b() const noexcept { return lambda_b_.view(); }
  matrix_view<const T> grad_lambda_d() const noexcept { return gd_.view(); }
  matrix_view<const T> grad_lambda_b() const noexcept { return gb_.view(); }

  /// The term lambda_b * ((lambda_d[:r] * (x A[:r, :in]^T)) B_s^T) for the low-rank core.
  low_rank_term<T> low_rank() const noexcept {
    return {A_slice(), B_slice(), lambda_d_.data(), lambda_b_.data(), nullptr, T{1}};
  }
  /// lambda_d's first r values get the gate's gradient; its last r (logvar) stay 0.
  low_rank_gradients<T> low_rank_grads() noexcept { return {{}, {}, gd_.data(), gb_.data(), nullptr}; }

  /// Throws peft::error for a default-constructed adapter (no projections).
  void check_ready(const char* where) const {
    if (!a_ || !b_) detail::raise<error>(where, "the adapter is default-constructed (no projections)");
  }

  /// pvera_lambda_b (out), pvera_lambda_d (2r): trainable; pvera_A, pvera_B: the whole shared
  /// projections, frozen, shared = true (saved once as base_model.pvera_A / pvera_B).
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"pvera_lambda_b", lambda_b_.view(), gb_.view(), detail::shape_of(lambda_b_.view(), true)});
    p.push_back({"pvera_lambda_d", lambda_d_.view(), gd_.view(), detail::shape_of(lambda_d_.view(), true)});
    if (a_ && b_) {
      p.push_back({"pvera_A", a_->view(), {}, detail::shape_of(a_->view(), false), false, true});
      p.push_back({"pvera_B", b_->view(), {}, detail::shape_of(b_->view(), false), false, true});
    }
    return p;
  }

  void zero_grad() {
    gd_.fill(T{0});
    gb_.fill(T{0});
  }

 private:
  void check_features(const char* where, index in, index out) const {
    if (in < 1 || in > a_->cols()) {
      detail::raise<shape_error>(where, "in_features " + std::to_string(in) + " is outside [1, " +
                                            std::to_string(a_->cols()) + "] (pvera_A's width)");
    }
    if (out < 1 || out > b_->rows()) {
      detail::raise<shape_error>(where, "out_features " + std::to_string(out) + " is outside [1, " +
                                            std::to_string(b_->rows()) + "] (pvera_B's height)");
    }
  }
  std::shared_ptr<matrix<T>> a_;  // (2r, in_max), shared
  std::shared_ptr<matrix<T>> b_;  // (out_max, r), shared
  index in_ = 0;
  index out_ = 0;
  matrix<T> lambda_d_;  // (1, 2r)
  matrix<T> lambda_b_;  // (1, out)
  matrix<T> gd_;        // gradients, same shapes
  matrix<T> gb_;
  double d_initial_ = 0.1;
};

}  // namespace peft
