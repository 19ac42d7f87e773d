// peft/adapters/oft.hpp — OFT, orthogonal fine-tuning (Qiu et al., NeurIPS 2023; Cayley-Neumann
// form: Qiu et al. 2025) as HuggingFace PEFT 0.21 computes it for a linear layer.
//
//   y = (x R) W0^T + b0      R = diag(R_1, ..., R_nb), each R_k a (b, b) rotation of the input
//   R_k = cayley(Q_k)        Q_k skew-symmetric, its strict upper triangle = oft_R.weight[k]
//   exact:   R = (I - Q)(I + Q)^{-1} = 2 (I + Q)^{-1} - I
//   Neumann: R = I + 2Q + 2Q^2 + ... + 2Q^{m-1} + Q^m   (PEFT's truncated series, m from
//            num_cayley_neumann_terms; note it approximates the exact form's transpose)
//   coft:    each Q_k rescaled to Frobenius norm eps / sqrt(#stored blocks) when larger
//   block_share: one stored block, used for all in / b blocks
//
//   peft::oft<double> a(in, out, {.block_size = 16, .form = {.use_cayley_neumann = false}});
//
// PEFT's init (oft_R = 0) is the identity. Merging: W' = W0 R^T (delta_weight = W0 (R^T - I));
// unmerge inverts R. The term of add_term is (x (R - I)) W0^T: several OFT adapters on one layer
// add their terms (PEFT chains the rotations). Checkpoints: io/peft/oft.hpp. Derivations, coft's
// in-place projection and PEFT differences: docs/methods/oft.md.
#pragma once

#include <Eigen/Core>
#include <Eigen/LU>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/interop/eigen.hpp"

namespace peft {

/// PEFT's `init_weights`: true (oft_R = 0, the identity) or false (oft_R ~ N(0, 0.1^2)).
enum class oft_init : std::uint8_t { identity, random };

/// How the rotation is built from oft_R (OFTConfig's fields of the same names).
struct oft_form {
  bool block_share = false;          // one block shared by all in / b blocks
  bool coft = false;                 // constrained OFT: project each Q_k into a ball of radius eps
  double eps = 6e-5;                 // coft's radius, before PEFT's division by sqrt(#blocks)
  bool use_cayley_neumann = true;    // PEFT's default: the truncated Neumann series
  int num_cayley_neumann_terms = 5;  // terms of the series (PEFT's count, see oft_neumann_coefficients)
};

template <compute_scalar T>
class oft;

struct oft_options {
  template <compute_scalar T>
  using adapter = oft<T>;  // the adapter these options make

  index block_size = 32;  // PEFT's oft_block_size (0: from r)
  index r = 0;            // number of blocks (0: from block_size); exactly one of the two is non-zero
  oft_form form = {};
  oft_init init = oft_init::identity;
  std::uint64_t seed = 0;
};

/// PEFT's OFTLayer.adjust_oft_parameters: the divisor of `in_features` nearest to `value`
/// (the lower one on a tie; in_features itself when value >= in_features).
inline index oft_adjust(index in_features, index value) {
  if (value >= in_features) return in_features;
  index higher = value;
  while (higher <= in_features && in_features % higher != 0) ++higher;
  index lower = value;
  while (lower > 1 && in_features % lower != 0) --lower;
  return value - lower <= higher - value ? lower : higher;
}

/// PEFT's (r, oft_block_size) for a layer of `in_features` inputs: exactly one of `r` and
/// `block_size` is non-zero, and a value that does not divide in_features is adjusted
/// (oft_adjust; PEFT warns). error naming `where` otherwise.
inline std::pair<index, index> oft_blocks(index in_features, index r, index block_size, const char* where) {
  if (in_features < 1) detail::raise<shape_error>(where, "in_features must be >= 1, got " + std::to_string(in_features));
  if (r < 0 || block_size < 0 || (r == 0) == (block_size == 0)) {
    detail::raise<error>(where, "exactly one of r (" + std::to_string(r) + ") and oft_block_size (" +
                                    std::to_string(block_size) + ") must be positive, the other 0");
  }
  if (r == 0) {
    if (in_features % block_size != 0 || block_size > in_features) block_size = oft_adjust(in_features, block_size);
    return {in_features / block_size, block_size};
  }
  if (in_features % r != 0 || r > in_features) r = oft_adjust(in_features, r);
  return {r, in_features / r};
}

/// PEFT's Cayley-Neumann coefficients: c[k-1] multiplies Q^k. For n terms: none (n <= 1),
/// 2Q (n = 2), 2Q + 2Q^2 + Q^3 (n = 3 and 4: PEFT's loop adds no term for 4), and
/// 2Q + ... + 2Q^{n-2} + Q^{n-1} (n >= 5).
inline std::vector<double> oft_neumann_coefficients(int terms) {
  if (terms <= 1) return {};
  if (terms == 2) return {2.0};
  const int m = terms < 4 ? 3 : terms - 1;  // the highest power
  std::vector<double> c(static_cast<std::size_t>(m), 2.0);
  c.back() = 1.0;
  return c;
}

template <compute_scalar T>
class oft {
  using emat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

 public:
  using scalar = T;
  static constexpr std::string_view method = "oft";

  /// What backward needs from forward: the rotation blocks R_k stacked (#stored blocks * b, b).
  struct cache_type {
    matrix<T> rotation;
  };

  oft() = default;

  /// A fresh adapter for an (out, in) linear layer, with PEFT's block resolution and init.
  oft(index in_features, index out_features, const oft_options& opt)
      : in_(in_features), out_(out_features), form_(checked_form(opt.form, "oft::oft")) {
    if (out_features < 1) detail::raise<shape_error>("oft::oft", "out_features must be >= 1, got " + std::to_string(out_features));
    const auto [r, b] = oft_blocks(in_features, opt.r, opt.block_size, "oft::oft");
    b_ = b;
    w_ = matrix<T>(form_.block_share ? 1 : r, elements(b));
    if (opt.init == oft_init::random) {
      rng gen(opt.seed);
      for (auto& v : w_.storage()) v = static_cast<T>(gen.normal(0.0, 0.1));
    }
    gw_ = matrix<T>(w_.rows(), w_.cols());
  }

  /// An adapter from oft_R.weight (#stored blocks, b (b - 1) / 2) for blocks of `block_size`.
  /// in_features: #stored blocks * b unless block_share (then 0: unknown until set_features);
  /// out_features 0: unknown until set_features (the tensor does not say).
  oft(matrix<T> weight, index block_size, const oft_form& form, index in_features = 0, index out_features = 0)
      : in_(in_features), out_(out_features), b_(block_size), form_(checked_form(form, "oft::oft")), w_(std::move(weight)) {
    if (b_ < 1 || w_.rows() < 1 || w_.cols() != elements(b_) || in_ < 0 || out_ < 0) {
      detail::raise<shape_error>("oft::oft", "oft_R.weight is " + detail::shape_string(w_.rows(), w_.cols()) +
                                                 ", which is not (#blocks, b (b - 1) / 2) for block size " +
                                                 std::to_string(b_));
    }
    if (form_.block_share && w_.rows() != 1) {
      detail::raise<shape_error>("oft::oft", "block_share stores one block, oft_R.weight has " + std::to_string(w_.rows()));
    }
    if (!form_.block_share && in_ == 0) in_ = w_.rows() * b_;
    if (in_ != 0 && (in_ % b_ != 0 || (!form_.block_share && in_ != w_.rows() * b_))) {
      detail::raise<shape_error>("oft::oft", std::to_string(w_.rows()) + " blocks of " + std::to_string(b_) +
                                                 " do not rotate " + std::to_string(in_) + " input features");
    }
    gw_ = matrix<T>(w_.rows(), w_.cols());
  }

  /// Input features; 0 while unknown (a block-shared adapter loaded from a checkpoint).
  index in_features() const noexcept { return in_; }
  /// Output features; 0 while unknown (an adapter loaded from a checkpoint).
  index out_features() const noexcept { return out_; }
  /// The loader's and adapted_linear's hook for the layer's shape; shape_error if it conflicts.
  void set_features(index in_features, index out_features) {
    if (in_features < 1 || out_features < 1 || (in_ != 0 && in_ != in_features) || (out_ != 0 && out_ != out_features) ||
        in_features % b_ != 0) {
      detail::raise<shape_error>("oft::set_features", "the adapter rotates " + std::to_string(in_) + " inputs (0: any multiple of " +
                                                          std::to_string(b_) + ") into " + std::to_string(out_) +
                                                          " outputs (0: any), not a layer of " +
                                                          detail::shape_string(out_features, in_features));
    }
    in_ = in_features;
    out_ = out_features;
  }

  index block_size() const noexcept { return b_; }
  /// Blocks stored in oft_R.weight (1 with block_share).
  index stored_blocks() const noexcept { return w_.rows(); }
  const oft_form& form() const noexcept { return form_; }

  /// oft_R.weight: row k is the strict upper triangle of Q_k, row by row (torch.triu_indices).
  matrix_view<T> weight() noexcept { return w_.view(); }
  matrix_view<const T> weight() const noexcept { return w_.view(); }
  matrix_view<const T> grad_weight() const noexcept { return gw_.view(); }

  /// The rotation blocks R_k stacked (#stored blocks * b, b), from the coft-projected Q_k.
  matrix<T> rotation() const {
    matrix<T> r(w_.rows() * b_, b_);
    const auto c = oft_neumann_coefficients(form_.num_cayley_neumann_terms);
    emat q(b_, b_);
    for (index k = 0; k < w_.rows(); ++k) {
      skew(k, q);
      auto rk = as_eigen(r.view()).middleRows(k * b_, b_);
      if (form_.use_cayley_neumann) {
        // I + sum_k c_k Q^k, the powers built as PEFT does (Q^k = Q^{k-1} Q).
        rk.setIdentity();
        emat p = q, next(b_, b_);
        for (std::size_t j = 0; j < c.size(); ++j) {
          if (j > 0) {
            next.noalias() = p * q;
            p.swap(next);
          }
          rk += static_cast<T>(c[j]) * p;
        }
      } else {
        // (I - Q)(I + Q)^{-1} = 2 (I + Q)^{-1} - I (I + Q is invertible for skew Q).
        const emat m = emat::Identity(b_, b_) + q;
        rk = T{2} * m.partialPivLu().inverse();
        rk.diagonal().array() -= T{1};
      }
    }
    return r;
  }

  /// coft's projection written into oft_R.weight: what PEFT's forward does in place (so that an
  /// optimizer steps from the projected point, as PEFT's does). A no-op without coft.
  void constrain() {
    if (!form_.coft) return;
    emat q(b_, b_);
    for (index k = 0; k < w_.rows(); ++k) {
      skew(k, q);
      pack(q, w_.row(k), false);
    }
  }

  /// y = (x R) W0^T + b0.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    check_io("oft::forward", w, x, y);
    cache.rotation = rotation();
    const matrix<T> xr = rotated(x, cache.rotation, false);
    w.matmul(matrix_view<const T>(xr.view()), y);
  }

  /// y += (x (R - I)) W0^T (the base output h is not read).
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<T> y,
                cache_type& cache) const {
    check_io("oft::add_term", w, x, y);
    cache.rotation = rotation();
    const matrix<T> xr = rotated(x, cache.rotation, true);
    matrix<T> t(x.rows(), y.cols());
    w.matmul(matrix_view<const T>(xr.view()), t.view());  // x (R - I) W0^T + b0
    for (index i = 0; i < y.rows(); ++i) {
      T* row = y.row(i);
      for (index j = 0; j < y.cols(); ++j) row[j] += t(i, j) - w.template bias_value<T>(j);
    }
  }

  /// Accumulates d oft_R.weight; writes dx = (g W0) R^T.
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    check_grad("oft::backward", w, x, g, dx);
    w.matmul_t(g, dx, false);  // g W0: dL/d(x R)
    backward_rotation(x, dx, dx, cache, false);
  }

  /// Accumulates d oft_R.weight; dx += (g W0)(R^T - I). The term does not read h (dh untouched).
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<const T> g,
                     matrix_view<T> /*dh*/, matrix_view<T> dx, cache_type& cache) {
    check_grad("oft::backward_term", w, x, g, dx);
    matrix<T> gw(x.rows(), x.cols());
    w.matmul_t(g, gw.view(), false);
    backward_rotation(x, matrix_view<const T>(gw.view()), dx, cache, true);
  }

  /// dW = W0 (R^T - I), block column by block column (W' = W0 R^T, PEFT's merge).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("oft::delta_weight", w);
    detail::expect_shape("oft::delta_weight", "dw", dw, w.out_features(), w.in_features());
    for (index i = 0; i < dw.rows(); ++i) w.dequantize_row(i, dw.row(i));
    const matrix<T> r = rotation();
    right_multiply(dw, r, T{1});
  }

  /// OFT leaves the bias alone: false (db untouched).
  template <base_weight Base>
  bool delta_bias(const Base& w, T* /*db*/) const {
    check_base("oft::delta_bias", w);
    return false;
  }

  /// What merge added, recovered from the merged weight W' = W0 R^T: W' (I - R^{-T}) (PEFT's
  /// unmerge inverts R, which the Neumann series leaves only nearly orthogonal). error if a
  /// block is singular.
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    constexpr const char* where = "oft::unmerge_delta";
    check_base(where, merged);
    detail::expect_shape(where, "dw", dw, merged.out_features(), merged.in_features());
    for (index i = 0; i < dw.rows(); ++i) merged.dequantize_row(i, dw.row(i));
    matrix<T> inv(w_.rows() * b_, b_);
    const matrix<T> r = rotation();
    for (index k = 0; k < w_.rows(); ++k) {
      const Eigen::FullPivLU<emat> lu(as_eigen(r.view()).middleRows(k * b_, b_));
      if (!lu.isInvertible()) detail::raise<error>(where, "rotation block " + std::to_string(k) + " is singular: W0 is lost");
      as_eigen(inv.view()).middleRows(k * b_, b_) = lu.inverse();
    }
    right_multiply(dw, inv, T{-1});  // W' - W' R^{-T}
  }

  /// oft_R.weight (#stored blocks, b (b - 1) / 2), PEFT's name.
  std::vector<parameter<T>> parameters() {
    return {{"oft_R.weight", w_.view(), gw_.view(), detail::shape_of(w_.view(), false)}};
  }

  void zero_grad() { gw_.fill(T{0}); }

 private:
  static index elements(index b) { return b * (b - 1) / 2; }

  static oft_form checked_form(const oft_form& f, const char* where) {
    if (f.coft && !(f.eps > 0.0)) detail::raise<error>(where, "coft needs eps > 0, got " + std::to_string(f.eps));
    return f;
  }

  /// Q_k = U - U^T from row k of oft_R.weight, then coft's projection: PEFT scales Q_k by
  /// eps' / ||Q_k||_F when ||Q_k||_F > eps', with eps' = eps / sqrt(#stored blocks) computed in
  /// float32 (a 0-d float32 tensor in PEFT), which matters beyond 1e-8.
  void skew(index k, emat& q) const {
    const T* u = w_.row(k);
    q.setZero();
    index e = 0;
    for (index i = 0; i < b_; ++i) {
      for (index j = i + 1; j < b_; ++j, ++e) {
        q(i, j) = u[e];
        q(j, i) = -u[e];
      }
    }
    if (!form_.coft) return;
    const float radius = static_cast<float>(form_.eps) / std::sqrt(static_cast<float>(w_.rows()));
    const T norm = q.norm();
    if (norm > static_cast<T>(radius)) q = (q / norm) * static_cast<T>(radius);
  }

  /// The strict upper triangle of q into `u` (accumulate: u += q_ij - q_ji, the gradient of the
  /// packed entries; otherwise u = q_ij).
  void pack(const emat& q, T* u, bool accumulate_gradient) const {
    index e = 0;
    for (index i = 0; i < b_; ++i) {
      for (index j = i + 1; j < b_; ++j, ++e) {
        if (accumulate_gradient) {
          u[e] += q(i, j) - q(j, i);
        } else {
          u[e] = q(i, j);
        }
      }
    }
  }

  /// The stored block that rotates input block k.
  index block_of(index k) const noexcept { return form_.block_share ? 0 : k; }

  /// x R (or x (R - I)) per block: (batch, in).
  matrix<T> rotated(matrix_view<const T> x, const matrix<T>& r, bool minus_identity) const {
    matrix<T> xr(x.rows(), x.cols());
    const auto xe = as_eigen(x);
    auto out = as_eigen(xr.view());
    for (index k = 0; k < x.cols() / b_; ++k) {
      const auto rk = as_eigen(r.view()).middleRows(block_of(k) * b_, b_);
      out.middleCols(k * b_, b_).noalias() = xe.middleCols(k * b_, b_) * rk;
      if (minus_identity) out.middleCols(k * b_, b_) -= xe.middleCols(k * b_, b_);
    }
    return xr;
  }

  /// m := sign * (m B_k^T - m) per block column of `in` (B_k: block k of `blocks`, stacked
  /// (#stored blocks * b, b)).
  void right_multiply(matrix_view<T> m, const matrix<T>& blocks, T sign) const {
    auto me = as_eigen(m);
    emat t(m.rows(), b_);
    for (index k = 0; k < m.cols() / b_; ++k) {
      const auto bk = as_eigen(blocks.view()).middleRows(block_of(k) * b_, b_);
      t.noalias() = me.middleCols(k * b_, b_) * bk.transpose();
      me.middleCols(k * b_, b_) = sign * (t - me.middleCols(k * b_, b_));
    }
  }

  /// Given gr = dL/d(x R) (batch, in): accumulates d oft_R.weight and writes dx = gr R^T
  /// (term: dx += gr (R^T - I)). `gr` and `dx` may alias (backward).
  void backward_rotation(matrix_view<const T> x, matrix_view<const T> gr, matrix_view<T> dx, cache_type& cache,
                         bool term) {
    if (cache.rotation.rows() != w_.rows() * b_ || cache.rotation.cols() != b_) cache.rotation = rotation();
    const auto& r = cache.rotation;
    const index nb = x.cols() / b_;
    // dL/dR_k = x_k^T gr_k, summed over the blocks sharing a stored block.
    std::vector<emat> gr_blocks(static_cast<std::size_t>(w_.rows()), emat::Zero(b_, b_));
    const auto xe = as_eigen(x);
    const auto ge = as_eigen(gr);
    for (index k = 0; k < nb; ++k) {
      gr_blocks[static_cast<std::size_t>(block_of(k))].noalias() +=
          xe.middleCols(k * b_, b_).transpose() * ge.middleCols(k * b_, b_);
    }
    // dx (after dL/dR: gr may be dx itself).
    auto dxe = as_eigen(dx);
    emat t(x.rows(), b_);
    for (index k = 0; k < nb; ++k) {
      const auto rk = as_eigen(r.view()).middleRows(block_of(k) * b_, b_);
      t.noalias() = ge.middleCols(k * b_, b_) * rk.transpose();
      if (term) {
        dxe.middleCols(k * b_, b_) += t - ge.middleCols(k * b_, b_);
      } else {
        dxe.middleCols(k * b_, b_) = t;
      }
    }
    // dL/dQ_k through the Cayley transform or the series, then onto the packed entries.
    emat q(b_, b_), gq(b_, b_);
    for (index s = 0; s < w_.rows(); ++s) {
      const emat& g = gr_blocks[static_cast<std::size_t>(s)];
      if (form_.use_cayley_neumann) {
        skew(s, q);
        neumann_backward(q, g, gq);
      } else {
        // R = 2 (I + Q)^{-1} - I: dL/dQ = -2 M^{-T} G M^{-T} with M^{-1} = (I + R) / 2.
        emat a = as_eigen(r.view()).middleRows(s * b_, b_).transpose();
        a.diagonal().array() += T{1};  // (I + R)^T = 2 M^{-T}
        gq.noalias() = a * g * a;
        gq *= T{-0.5};
      }
      pack(gq, gw_.row(s), true);
    }
  }

  /// dL/dQ of R = I + sum_k c_k Q^k given G = dL/dR: reverse mode through P_k = P_{k-1} Q.
  void neumann_backward(const emat& q, const emat& g, emat& gq) const {
    const auto c = oft_neumann_coefficients(form_.num_cayley_neumann_terms);
    gq.setZero();
    if (c.empty()) return;
    const std::size_t m = c.size();
    std::vector<emat> p(m);  // p[j] = Q^{j+1}, j < m - 1
    p[0] = q;
    for (std::size_t j = 1; j + 1 < m; ++j) p[j].noalias() = p[j - 1] * q;
    emat a = static_cast<T>(c[m - 1]) * g;  // dL/dP_m
    emat next(b_, b_);
    for (std::size_t j = m - 1; j >= 1; --j) {
      gq.noalias() += p[j - 1].transpose() * a;  // P_{j+1} = P_j Q: dQ += P_j^T A
      next.noalias() = a * q.transpose();        // dP_j = c_j G + A Q^T
      a = static_cast<T>(c[j - 1]) * g + next;
    }
    gq += a;  // P_1 = Q
  }

  template <class Base>
  void check_base(const char* where, const Base& w) const {
    if (w_.rows() == 0) detail::raise<error>(where, "the adapter has no oft_R (default-constructed)");
    const bool in_ok = in_ == 0 ? w.in_features() % b_ == 0 : w.in_features() == in_;
    const bool out_ok = out_ == 0 || w.out_features() == out_;
    if (!in_ok || !out_ok) {
      detail::raise<shape_error>(where, "base weight is " + detail::shape_string(w.out_features(), w.in_features()) +
                                            ", adapter expects " + detail::shape_string(out_, in_) +
                                            " (0: any; in a multiple of the block size " + std::to_string(b_) + ")");
    }
  }
  template <class Base>
  void check_io(const char* where, const Base& w, matrix_view<const T> x, matrix_view<T> y) const {
    check_base(where, w);
    detail::expect_shape(where, "x", x, x.rows(), w.in_features());
    detail::expect_shape(where, "y", y, x.rows(), w.out_features());
  }
  template <class Base>
  void check_grad(const char* where, const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                  matrix_view<T> dx) const {
    check_base(where, w);
    detail::expect_shape(where, "x", x, x.rows(), w.in_features());
    detail::expect_shape(where, "dy", g, x.rows(), w.out_features());
    detail::expect_shape(where, "dx", dx, x.rows(), w.in_features());
  }

  index in_ = 0;
  index out_ = 0;
  index b_ = 1;
  oft_form form_;
  matrix<T> w_;   // oft_R.weight (#stored blocks, b (b - 1) / 2)
  matrix<T> gw_;  // its gradient
};

}  // namespace peft
