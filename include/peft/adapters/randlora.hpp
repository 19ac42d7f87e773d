// peft/adapters/randlora.hpp — RandLoRA (Albert et al., ICLR 2025) as HuggingFace PEFT computes it.
//
//   in <= out: y = x W0^T + b0 + s (x U^T) V^T;   in > out: y = x W0^T + b0 + s (x V) U
//   U (R, mn) from lambda (r, nb), A and gamma (nb, mn); V (mx, R) = B[:mx, :nb, :] flattened;
//   A (r, min_max), B (max_max, nb_max r): frozen, SHARED by every adapted layer;
//   mn, mx = min, max(in, out), nb = ceil(mn / r), R = r nb, s = randlora_alpha / r
//
//   auto p = peft::make_randlora_projections<float>(r, {{in, out}}, seed);
//   peft::randlora<float> a(p, in, out, alpha);   // lambda = 0: the identity
//
// The passes come from additive_adapter (U is never formed). Checkpoints: io/peft/randlora.hpp
// (call set_features with the base's shape after loading). Details: docs/methods/randlora.md.
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

#include "peft/adapters/detail/projection_sizes.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// ceil(min_features / rank): PEFT's number of bases for a layer ("full rank").
inline index randlora_num_bases(index min_features, index rank) { return (min_features + rank - 1) / rank; }

/// The frozen bases RandLoRA shares between layers.
template <compute_scalar T>
struct randlora_projections {
  std::shared_ptr<matrix<T>> A;  // [r, 1, min_max] as (r, min_max)
  std::shared_ptr<matrix<T>> B;  // [max_max, nb_max, r] as (max_max, nb_max * r)
};

/// Bases for the layers given as (in_features, out_features) pairs, drawn as PEFT draws its
/// default (non-sparse) bases: kaiming-uniform with a = sqrt(5) (U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
/// fan_in = min_max for A, r for B), each tensor then divided by its sample standard deviation.
/// The generator is peft::rng seeded with `seed`: this does NOT reproduce PyTorch's generator,
/// so the values differ from those PEFT derives from projection_prng_key.
template <compute_scalar T>
randlora_projections<T> make_randlora_projections(index rank, std::span<const std::pair<index, index>> layers,
                                                  std::uint64_t seed = 0) {
  const auto [in_max, out_max] = detail::shared_projection_sizes("make_randlora_projections", rank, layers);
  const index mn = std::min(in_max, out_max), mx = std::max(in_max, out_max);
  const index nb = randlora_num_bases(mn, rank);
  rng gen(seed);
  auto draw = [&gen](index rows, index cols, double bound) {
    std::vector<double> v(static_cast<std::size_t>(rows * cols));
    for (auto& e : v) e = gen.uniform(-bound, bound);
    double mean = 0.0;
    for (double e : v) mean += e;
    mean /= static_cast<double>(v.size());
    double var = 0.0;
    for (double e : v) var += (e - mean) * (e - mean);
    // torch.std is the unbiased estimate; a single value is left as drawn.
    const double sd = v.size() > 1 ? std::sqrt(var / static_cast<double>(v.size() - 1)) : 1.0;
    auto m = std::make_shared<matrix<T>>(rows, cols);
    for (std::size_t i = 0; i < v.size(); ++i) m->storage()[i] = static_cast<T>(sd > 0.0 ? v[i] / sd : v[i]);
    return m;
  };
  randlora_projections<T> p;
  p.A = draw(rank, mn, 1.0 / std::sqrt(static_cast<double>(mn)));
  p.B = draw(mx, nb * rank, 1.0 / std::sqrt(static_cast<double>(rank)));
  return p;
}

/// make_randlora_projections for an initializer list of (in_features, out_features) pairs.
template <compute_scalar T>
randlora_projections<T> make_randlora_projections(index rank, std::initializer_list<std::pair<index, index>> layers,
                                                  std::uint64_t seed = 0) {
  return make_randlora_projections<T>(
      rank, std::span<const std::pair<index, index>>(layers.begin(), layers.size()), seed);
}

template <compute_scalar T>
class randlora : public additive_adapter<randlora<T>, T> {
  friend class additive_adapter<randlora<T>, T>;

 public:
  static constexpr std::string_view method = "randlora";

  /// What backward needs from forward (batch, R): for in <= out, q = the per-base products
  /// (x * A_k) gamma^T before lambda; for in > out, p = x V.
  struct cache_type {
    matrix<T> q;
  };

  randlora() = default;

  /// A fresh adapter over shared bases, PEFT's init: lambda = 0 (the identity),
  /// gamma = 1 / max(nb, mn). `alpha` is PEFT's randlora_alpha (scale = alpha / r).
  randlora(std::shared_ptr<matrix<T>> a, std::shared_ptr<matrix<T>> b, index in_features, index out_features,
           double alpha)
      : randlora(std::move(a), std::move(b), in_features, out_features, alpha, matrix<T>{}, matrix<T>{}) {}

  /// The same from a randlora_projections.
  randlora(const randlora_projections<T>& p, index in_features, index out_features, double alpha)
      : randlora(p.A, p.B, in_features, out_features, alpha) {}

  /// An adapter with given lambda (r, nb) and gamma (nb, mn); empty matrices take PEFT's init.
  randlora(std::shared_ptr<matrix<T>> a, std::shared_ptr<matrix<T>> b, index in_features, index out_features,
           double alpha, matrix<T> lambda, matrix<T> gamma)
      : a_(std::move(a)), b_(std::move(b)), alpha_(alpha) {
    constexpr const char* where = "randlora::randlora";
    if (!a_ || !b_) detail::raise<shape_error>(where, "the bases randlora_A and randlora_B must not be null");
    const index r = a_->rows();
    if (r < 1 || a_->cols() < 1) {
      detail::raise<shape_error>(where, "randlora_A is " + detail::shape_string(a_->rows(), a_->cols()) +
                                            " (rank, min_max); both must be >= 1");
    }
    if (b_->rows() < 1 || b_->cols() < r || b_->cols() % r != 0) {
      detail::raise<shape_error>(where, "randlora_B is " + detail::shape_string(b_->rows(), b_->cols()) +
                                            "; expected (max_max, nb_max * " + std::to_string(r) + ")");
    }
    if (!std::isfinite(alpha)) detail::raise<shape_error>(where, "randlora_alpha must be finite");
    check_features(where, in_features, out_features);
    in_ = in_features;
    out_ = out_features;
    const index mn = min_features(), nb = num_bases();
    scale_ = static_cast<T>(alpha / static_cast<double>(r));
    if (lambda.empty()) lambda = matrix<T>(r, nb, T{0});
    if (gamma.empty()) gamma = matrix<T>(nb, mn, static_cast<T>(1.0 / static_cast<double>(std::max(nb, mn))));
    if (lambda.rows() != r || lambda.cols() != nb) {
      detail::raise<shape_error>(where, "randlora_lambda is " + detail::shape_string(lambda.rows(), lambda.cols()) +
                                            ", expected " + detail::shape_string(r, nb) + " (rank, num_bases)");
    }
    if (gamma.rows() != nb || gamma.cols() != mn) {
      detail::raise<shape_error>(where, "randlora_gamma is " + detail::shape_string(gamma.rows(), gamma.cols()) +
                                            ", expected " + detail::shape_string(nb, mn) +
                                            " (num_bases, min(in, out))");
    }
    lambda_ = std::move(lambda);
    gamma_ = std::move(gamma);
    glambda_ = matrix<T>(r, nb);
    ggamma_ = matrix<T>(nb, mn);
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  index rank() const noexcept { return a_ ? a_->rows() : 0; }
  index min_features() const noexcept { return std::min(in_, out_); }
  index max_features() const noexcept { return std::max(in_, out_); }
  /// nb = ceil(min(in, out) / r).
  index num_bases() const noexcept { return rank() > 0 ? randlora_num_bases(min_features(), rank()) : 0; }
  /// nb_max: the bases randlora_B holds.
  index max_num_bases() const noexcept { return rank() > 0 ? b_->cols() / rank() : 0; }
  T scale() const noexcept { return scale_; }
  double alpha() const noexcept { return alpha_; }

  /// Sets the layer's shape (a checkpoint only determines min(in, out)): min(in, out) must stay
  /// gamma's width, max(in, out) at most randlora_B's height. Throws shape_error otherwise.
  void set_features(index in_features, index out_features) {
    constexpr const char* where = "randlora::set_features";
    if (!a_ || !b_) detail::raise<error>(where, "the adapter is default-constructed (no bases)");
    if (std::min(in_features, out_features) != min_features()) {
      detail::raise<shape_error>(where, "min(in, out) of " + detail::shape_string(out_features, in_features) +
                                            " differs from randlora_gamma's width " + std::to_string(min_features()));
    }
    check_features(where, in_features, out_features);
    in_ = in_features;
    out_ = out_features;
  }

  /// The shared bases themselves (the same objects for every layer that shares them).
  const std::shared_ptr<matrix<T>>& shared_A() const noexcept { return a_; }
  const std::shared_ptr<matrix<T>>& shared_B() const noexcept { return b_; }
  /// A_s = A[:, 0, :mn] (r, mn) and V = B[:mx, :nb, :] flattened (mx, nb * r): views into the bases.
  matrix_view<const T> A_slice() const noexcept {
    return a_ ? matrix_view<const T>(a_->data(), rank(), min_features(), a_->cols()) : matrix_view<const T>{};
  }
  matrix_view<const T> B_slice() const noexcept {
    return b_ ? matrix_view<const T>(b_->data(), max_features(), num_bases() * rank(), b_->cols())
              : matrix_view<const T>{};
  }
  matrix_view<T> lambda() noexcept { return lambda_.view(); }
  matrix_view<const T> lambda() const noexcept { return lambda_.view(); }
  matrix_view<T> gamma() noexcept { return gamma_.view(); }
  matrix_view<const T> gamma() const noexcept { return gamma_.view(); }
  matrix_view<const T> grad_lambda() const noexcept { return glambda_.view(); }
  matrix_view<const T> grad_gamma() const noexcept { return ggamma_.view(); }

  /// U (R, mn) as PEFT's get_scaled_bases builds it (k-major rows), for references and merging.
  matrix<T> scaled_basis() const {
    matrix<T> u(rank() * num_bases(), min_features());
    fill_scaled_basis(u.view(), false);
    return u;
  }

  /// dW = s V U (in <= out) or s U^T V^T (in > out), PEFT's get_delta_weight (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("randlora::delta_weight", w);
    detail::expect_shape("randlora::delta_weight", "dw", dw, out_, in_);
    const index rr = rank() * num_bases(), mn = min_features();
    const double s = static_cast<double>(scale_);
    if (in_ <= out_) {
      matrix<T> u(rr, mn);
      fill_scaled_basis(u.view(), false);
      kernels::gemm_nn<T, T>(s, B_slice(), u.view(), 0.0, dw);  // (mx, R) (R, mn)
    } else {
      matrix<T> ut(mn, rr);
      fill_scaled_basis(ut.view(), true);
      kernels::gemm_nt<T, T>(s, ut.view(), B_slice(), 0.0, dw);  // (mn, R) (mx, R)^T
    }
  }

  /// RandLoRA does not touch the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// Throws peft::error for a default-constructed adapter (no bases).
  void check_ready(const char* where) const {
    if (!a_ || !b_) detail::raise<error>(where, "the adapter is default-constructed (no bases)");
  }

  /// randlora_lambda (r, nb), randlora_gamma (nb, mn): trainable; randlora_A, randlora_B: the
  /// whole shared bases, frozen, shared = true (saved once as base_model.randlora_A / _B).
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"randlora_lambda", lambda_.view(), glambda_.view(), detail::shape_of(lambda_.view(), false)});
    p.push_back({"randlora_gamma", gamma_.view(), ggamma_.view(), detail::shape_of(gamma_.view(), false)});
    if (a_ && b_) {
      const auto r = static_cast<std::int64_t>(rank());
      p.push_back({"randlora_A", a_->view(), {}, {r, 1, static_cast<std::int64_t>(a_->cols())}, false, true});
      p.push_back({"randlora_B", b_->view(), {}, {static_cast<std::int64_t>(b_->rows()),
                                                  static_cast<std::int64_t>(max_num_bases()), r}, false, true});
    }
    return p;
  }

  void zero_grad() {
    glambda_.fill(T{0});
    ggamma_.fill(T{0});
  }

 private:
  void check_features(const char* where, index in, index out) const {
    if (in < 1 || out < 1) {
      detail::raise<shape_error>(where, "in_features and out_features must be >= 1, got " +
                                            detail::shape_string(out, in) + " (out, in)");
    }
    const index mn = std::min(in, out), mx = std::max(in, out), r = a_->rows();
    if (mn > a_->cols()) {
      detail::raise<shape_error>(where, "min(in, out) = " + std::to_string(mn) + " exceeds randlora_A's width " +
                                            std::to_string(a_->cols()));
    }
    if (mx > b_->rows()) {
      detail::raise<shape_error>(where, "max(in, out) = " + std::to_string(mx) + " exceeds randlora_B's height " +
                                            std::to_string(b_->rows()));
    }
    if (randlora_num_bases(mn, r) > b_->cols() / r) {
      detail::raise<shape_error>(where, "the layer needs " + std::to_string(randlora_num_bases(mn, r)) +
                                            " bases, randlora_B holds " + std::to_string(b_->cols() / r));
    }
  }

  /// U (R, mn) into `u`, or U^T (mn, R) when `transposed`.
  void fill_scaled_basis(matrix_view<T> u, bool transposed) const {
    const index r = rank(), nb = num_bases(), mn = min_features();
    const auto a = A_slice();
    for (index k = 0; k < r; ++k) {
      for (index b = 0; b < nb; ++b) {
        const T l = lambda_(k, b);
        for (index j = 0; j < mn; ++j) {
          const T v = l * a(k, j) * gamma_(b, j);
          if (transposed) {
            u(j, k * nb + b) = v;
          } else {
            u(k * nb + b, j) = v;
          }
        }
      }
    }
  }

  /// dst = src * A_k, row by row (batch, mn).
  static void scale_columns(matrix_view<const T> src, const T* a_k, matrix_view<T> dst) {
    for (index i = 0; i < src.rows(); ++i) {
      const T* s = src.row(i);
      T* d = dst.row(i);
      for (index j = 0; j < src.cols(); ++j) d[j] = s[j] * a_k[j];
    }
  }

  /// in <= out: cache.q[:, k*nb : (k+1)*nb] = (x * A_k) gamma^T.  in > out: cache.q = x V.
  void project(matrix_view<const T> x, cache_type& cache) const {
    const index n = x.rows(), r = rank(), nb = num_bases(), mn = min_features();
    if (cache.q.rows() != n || cache.q.cols() != r * nb) cache.q = matrix<T>(n, r * nb);
    if (in_ <= out_) {
      matrix<T> xa(n, mn);
      const auto a = A_slice();
      for (index k = 0; k < r; ++k) {
        scale_columns(x, a.row(k), xa.view());
        kernels::gemm_nt<T, T>(1.0, xa.view(), gamma_.view(), 0.0, cache.q.view().block(0, k * nb, n, nb));
      }
    } else {
      kernels::gemm_nn<T, T>(1.0, x, B_slice(), 0.0, cache.q.view());  // (batch, mx) (mx, R)
    }
  }

  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    project(x, cache);
    const index n = x.rows(), r = rank(), nb = num_bases(), mn = min_features();
    if (in_ <= out_) {
      matrix<T> t(n, r * nb);  // q * lambda (flattened k-major)
      for (index i = 0; i < n; ++i) {
        for (index c = 0; c < r * nb; ++c) t(i, c) = cache.q(i, c) * lambda_.data()[c];
      }
      kernels::gemm_nt<T, T>(static_cast<double>(scale_), t.view(), B_slice(), 1.0, y);  // (batch, R) (mx, R)^T
    } else {
      matrix<T> wk(n, nb), z(n, mn);
      const auto a = A_slice();
      for (index k = 0; k < r; ++k) {
        for (index i = 0; i < n; ++i) {
          for (index b = 0; b < nb; ++b) wk(i, b) = cache.q(i, k * nb + b) * lambda_(k, b);
        }
        kernels::gemm_nn<T, T>(1.0, wk.view(), gamma_.view(), 0.0, z.view());  // (batch, nb) (nb, mn)
        const T* ak = a.row(k);
        for (index i = 0; i < n; ++i) {
          T* row = y.row(i);
          for (index j = 0; j < mn; ++j) row[j] += scale_ * z(i, j) * ak[j];
        }
      }
    }
  }

  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    const index n = x.rows(), r = rank(), nb = num_bases(), mn = min_features();
    if (cache.q.rows() != n || cache.q.cols() != r * nb) project(x, cache);
    const auto a = A_slice();
    if (in_ <= out_) {
      matrix<T> gt(n, r * nb);                                                 // s g V
      kernels::gemm_nn<T, T>(static_cast<double>(scale_), g, B_slice(), 0.0, gt.view());
      matrix<T> xa(n, mn), gk(n, nb), z(n, mn);
      for (index k = 0; k < r; ++k) {
        for (index i = 0; i < n; ++i) {
          for (index b = 0; b < nb; ++b) {
            const T gv = gt(i, k * nb + b);
            glambda_(k, b) += gv * cache.q(i, k * nb + b);
            gk(i, b) = gv * lambda_(k, b);
          }
        }
        scale_columns(x, a.row(k), xa.view());
        kernels::gemm_tn<T>(1.0, gk.view(), xa.view(), 1.0, ggamma_.view());   // (nb, mn)
        kernels::gemm_nn<T, T>(1.0, gk.view(), gamma_.view(), 0.0, z.view());  // (batch, mn)
        const T* ak = a.row(k);
        for (index i = 0; i < n; ++i) {
          T* row = dx.row(i);
          for (index j = 0; j < mn; ++j) row[j] += z(i, j) * ak[j];
        }
      }
    } else {
      matrix<T> gs(n, mn);                                                     // s g
      for (index i = 0; i < n; ++i) {
        for (index j = 0; j < mn; ++j) gs(i, j) = scale_ * g(i, j);
      }
      matrix<T> ga(n, mn), h(n, nb), wk(n, nb), dp(n, r * nb);
      for (index k = 0; k < r; ++k) {
        scale_columns(gs.view(), a.row(k), ga.view());
        kernels::gemm_nt<T, T>(1.0, ga.view(), gamma_.view(), 0.0, h.view());  // (batch, nb)
        for (index i = 0; i < n; ++i) {
          for (index b = 0; b < nb; ++b) {
            const T p = cache.q(i, k * nb + b);
            glambda_(k, b) += h(i, b) * p;
            wk(i, b) = p * lambda_(k, b);
            dp(i, k * nb + b) = h(i, b) * lambda_(k, b);
          }
        }
        kernels::gemm_tn<T>(1.0, wk.view(), ga.view(), 1.0, ggamma_.view());  // (nb, mn)
      }
      kernels::gemm_nt<T, T>(1.0, dp.view(), B_slice(), 1.0, dx);             // (batch, R) (mx, R)^T
    }
  }

  std::shared_ptr<matrix<T>> a_;  // (r, min_max), shared
  std::shared_ptr<matrix<T>> b_;  // (max_max, nb_max * r), shared
  index in_ = 0;
  index out_ = 0;
  double alpha_ = 0.0;
  T scale_ = T{0};
  matrix<T> lambda_;   // (r, nb)
  matrix<T> gamma_;    // (nb, mn)
  matrix<T> glambda_;  // gradients, same shapes
  matrix<T> ggamma_;
};


}  // namespace peft
