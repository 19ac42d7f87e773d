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
class pvera : public detail::shared_projections_adapter<pvera<T>, T> {
  using base = detail::shared_projections_adapter<pvera<T>, T>;

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
      : base(std::move(a), std::move(b), d_initial) {
    constexpr const char* where = "pvera::pvera";
    const auto& pa = this->a_;
    const auto& pb = this->b_;
    if (!pa || !pb) detail::raise<shape_error>(where, "the projections pvera_A and pvera_B must not be null");
    if (pb->cols() < 1) detail::raise<shape_error>(where, "pvera_B has no columns (rank 0)");
    if (pa->rows() != 2 * pb->cols()) {
      detail::raise<shape_error>(where, "pvera_A is " + detail::shape_string(pa->rows(), pa->cols()) +
                                            " but pvera_B is " + detail::shape_string(pb->rows(), pb->cols()) +
                                            "; pvera_A needs 2 r rows for rank r");
    }
    const index r2 = 2 * rank();
    this->init(where, in_features, out_features, std::move(lambda_d), r2, "2 r = " + std::to_string(r2),
               std::move(lambda_b));
  }

  /// r: pvera_B's columns (pvera_A has 2 r rows).
  index rank() const noexcept { return this->b_ ? this->b_->cols() : 0; }
  /// The rows of A the mean reads, A[:r, :in] (r, in): a view into the shared projection (B_s =
  /// B[:out, :]: B_slice()).
  matrix_view<const T> A_slice() const noexcept {
    return this->a_ ? matrix_view<const T>(this->a_->data(), rank(), this->in_, this->a_->cols())
                    : matrix_view<const T>{};
  }
};

}  // namespace peft
