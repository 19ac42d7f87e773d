// peft/adapters/miss.hpp — MiSS (Kang & Yin, "MiSS: matrix shard sharing", formerly Bone) as
// HuggingFace PEFT 0.21 computes it. r divides the input features into shards of r columns:
//
//   balance (default): y = x W0^T + b0 + S(x) B         B = miss_block (r, out)
//   mini:              the same with B = repeat(miss_block (r, m), out / m) along out
//   bat:               y = x (W0 + dW)^T + b0, dW block (q, p) = W0_{q,p} B_q + B_q
//                      B = miss_block (out / r, r, r), W0_{q,p} the r x r block of rows q, cols p
//
// S(x) (batch, r) sums the shards of x: S_j = sum_k x[k r + j] (the last shard zero-padded when r
// does not divide in_features). balance and mini are dW[o, i] = B[i mod r, o]; bat reads W0 (any
// base format, r rows at a time) and needs r | in_features and r | out_features, as in PEFT.
//
//   peft::miss<float> a(in, out, {.rank = 64});                               // B = 0: a no-op
//   peft::miss<float> b(in, out, {.rank = 16, .mode = peft::miss_mode::bat});
//
// A loaded adapter does not know every size (miss_block does not say in_features): the loader
// calls set_features. Checkpoints: io/peft/miss.hpp. Derivations: docs/methods/miss.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <Eigen/LU>

#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/core/weight_term_adapter.hpp"
#include "peft/interop/eigen.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// PEFT's init_weights: true (balance), "mini" (miss_block (r, mini_r) repeated along out),
/// "bat" (a block-wise update of W0 itself).
enum class miss_mode : std::uint8_t { balance, mini, bat };

/// The name PEFT's config gives the mode (init_weights): "balance" stands for true.
constexpr std::string_view miss_mode_name(miss_mode m) noexcept {
  return m == miss_mode::bat ? "bat" : m == miss_mode::mini ? "mini" : "balance";
}

template <compute_scalar T>
class miss;

struct miss_options {
  template <compute_scalar T>
  using adapter = miss<T>;  // the adapter these options make

  index rank = 64;                   // PEFT's r (its default 64): the shard width along in
  miss_mode mode = miss_mode::balance;
  index mini_rank = 1;               // PEFT's mini_r (mini mode only): must divide out_features
  bool random_init = false;          // PEFT's init_weights=False (balance only): kaiming-uniform B
  std::uint64_t seed = 0;            // for random_init (peft::rng, not torch's generator)
};

template <compute_scalar T>
class miss : public weight_term_adapter<miss<T>, T> {
  friend class weight_term_adapter<miss<T>, T>;

 public:
  using scalar = T;
  static constexpr std::string_view method = "miss";

  /// Nothing: S(x) costs O(batch in) and is recomputed by backward; bat re-reads W0's rows.
  struct cache_type {};

  miss() = default;

  /// A fresh adapter for an (out, in) layer with PEFT's initialisation (B = 0 unless random_init).
  miss(index in_features, index out_features, const miss_options& opt)
      : miss(opt.mode, opt.rank, opt.mode == miss_mode::mini ? opt.mini_rank : 0, std::vector<T>{}, in_features,
             out_features) {
    if (opt.random_init) {
      if (mode_ != miss_mode::balance) {
        detail::raise<error>("miss::miss", "random_init (PEFT's init_weights=False) is a balance-mode option; the " +
                                               std::string(miss_mode_name(mode_)) + " mode starts from zeros");
      }
      // kaiming_uniform_(a = sqrt(5)) on (r, out): fan_in = out, bound = 1 / sqrt(out).
      const double bound = 1.0 / std::sqrt(static_cast<double>(out_));
      rng gen(opt.seed);
      for (auto& v : block_.storage()) v = static_cast<T>(gen.uniform(-bound, bound));
    }
  }

  /// An adapter from miss_block's values (row-major; empty: zeros):
  ///   balance r * out values (r, out); mini r * mini_rank values (r, mini_rank);
  ///   bat out * r values ((out / r, r, r)).
  /// Sizes not given (0) are unbound until set_features: in_features always may be; out_features
  /// in mini mode. shape_error when the values or sizes do not fit.
  miss(miss_mode mode, index rank, index mini_rank, std::vector<T> block, index in_features = 0,
       index out_features = 0)
      : mode_(mode), r_(rank), m_(mode == miss_mode::mini ? mini_rank : 0) {
    constexpr const char* where = "miss::miss";
    if (r_ < 1) detail::raise<shape_error>(where, "r must be >= 1, got " + std::to_string(r_));
    if (mode_ == miss_mode::mini && m_ < 1) {
      detail::raise<shape_error>(where, "mini_r must be >= 1, got " + std::to_string(m_));
    }
    if (in_features < 0 || out_features < 0) {
      detail::raise<shape_error>(where, "features must be >= 1 (0: unbound), got " +
                                            detail::shape_string(out_features, in_features));
    }
    if (mode_ != miss_mode::mini && out_features == 0) {
      detail::raise<shape_error>(where, std::string("out_features is required in ") +
                                            std::string(miss_mode_name(mode_)) + " mode (miss_block's shape has it)");
    }
    out_ = out_features;
    const index rows = mode_ == miss_mode::bat ? out_ : r_;
    const index cols = mode_ == miss_mode::bat ? r_ : mode_ == miss_mode::mini ? m_ : out_;
    if (mode_ == miss_mode::bat && out_ % r_ != 0) {
      detail::raise<shape_error>(where, "bat needs r | out_features: out_features " + std::to_string(out_) +
                                            " is not a multiple of r = " + std::to_string(r_));
    }
    if (block.empty()) block.assign(static_cast<std::size_t>(rows * cols), T{0});
    if (static_cast<index>(block.size()) != rows * cols) {
      detail::raise<shape_error>(where, "miss_block has " + std::to_string(block.size()) + " values, expected " +
                                            std::to_string(rows * cols) + " (" + detail::shape_string(rows, cols) + ")");
    }
    block_ = matrix<T>(rows, cols, std::move(block));
    grad_ = matrix<T>(rows, cols);
    if (in_features > 0) {
      set_features(in_features, out_features == 0 ? out_ : out_features);  // every rule of the mode
    } else if (mode_ == miss_mode::mini && out_ > 0 && out_ % m_ != 0) {
      detail::raise<shape_error>(where, "mini_r = " + std::to_string(m_) + " does not divide out_features " +
                                            std::to_string(out_) + " (PEFT refuses it)");
    }
  }

  /// Input features; 0 until bound (a loaded adapter).
  index in_features() const noexcept { return in_; }
  /// Output features; 0 until bound (a loaded mini adapter).
  index out_features() const noexcept { return out_; }
  bool bound() const noexcept { return in_ > 0 && out_ > 0; }
  /// PEFT's r: the shard width along in_features.
  index rank() const noexcept { return r_; }
  /// PEFT's mini_r (mini mode), else 0.
  index mini_rank() const noexcept { return m_; }
  miss_mode mode() const noexcept { return mode_; }

  /// Binds the layer's shape; shape_error if it contradicts a known size or the mode's rules
  /// (r <= in_features; mini: mini_r | out_features; bat: r | in_features and r | out_features).
  void set_features(index in_features, index out_features) {
    constexpr const char* where = "miss::set_features";
    if (block_.empty()) detail::raise<error>(where, "the adapter is default-constructed");
    if (in_features < 1 || out_features < 1 || (in_ != 0 && in_ != in_features) || (out_ != 0 && out_ != out_features)) {
      detail::raise<shape_error>(where, "the adapter is for " + detail::shape_string(out_, in_) +
                                            " (0: unbound), cannot bind to " + detail::shape_string(out_features, in_features));
    }
    check_features(where, in_features, out_features);
    in_ = in_features;
    out_ = out_features;
  }

  /// miss_block as stored: balance (r, out), mini (r, mini_r), bat (out, r) = the (out / r, r, r)
  /// blocks stacked (row q r + a is row a of block q).
  matrix_view<T> block() noexcept { return block_.view(); }
  matrix_view<const T> block() const noexcept { return block_.view(); }
  matrix_view<const T> grad_block() const noexcept { return grad_.view(); }

  // ---- the passes -------------------------------------------------------------------------------

  // forward, add_term, backward and backward_term: weight_term_adapter, over add_delta and
  // delta_backward below.

  // ---- merging ----------------------------------------------------------------------------------

  /// dW = W' - W0 (out, in): B[i mod r, o] (balance, mini), W0_{q,p} B_q + B_q (bat).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("miss::delta_weight", w);
    detail::expect_shape("miss::delta_weight", "dw", dw, out_, in_);
    if (mode_ == miss_mode::bat) {
      for_each_bat_panel(w, [&](index r0, index rows, matrix_view<const T> d, matrix_view<const T>) {
        for (index i = 0; i < rows; ++i) std::copy(d.row(i), d.row(i) + in_, dw.row(r0 + i));
      });
      return;
    }
    for (index o = 0; o < out_; ++o) {
      T* row = dw.row(o);
      for (index i = 0; i < in_; ++i) row[i] = full_block(i % r_, o);
    }
  }

  /// MiSS leaves the bias alone.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// What merge added, recovered from the merged weight: bat inverts W' = W0 (I + B_q) + B_q block
  /// by block, W0_{q,p} = (W'_{q,p} - B_q) (I + B_q)^{-1} (PEFT's unmerge); the other modes do not
  /// depend on W0 (delta_weight). error when some I + B_q is singular (W0 is lost).
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    constexpr const char* where = "miss::unmerge_delta";
    check_base(where, merged);
    if (mode_ != miss_mode::bat) return delta_weight(merged, dw);
    detail::expect_shape(where, "dw", dw, out_, in_);
    using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const index nb = in_ / r_;
    matrix<T> wq(r_, in_), inv(r_, r_), w0(r_, in_);
    for (index q = 0; q < out_ / r_; ++q) {
      for (index a = 0; a < r_; ++a) merged.dequantize_row(q * r_ + a, wq.row(a));
      const auto bq = as_eigen(block_q(q));
      const mat ib = mat::Identity(r_, r_) + bq;
      const Eigen::FullPivLU<mat> lu(ib);  // r x r: full pivoting tells a singular block reliably
      if (!lu.isInvertible()) {
        detail::raise<error>(where, "I + miss_block[" + std::to_string(q) +
                                        "] is singular: the merged weight no longer holds W0");
      }
      as_eigen(inv.view()) = lu.inverse();
      // (W' - B_q) for every shard: wq as (r nb, r) holds shard p of row a in row a nb + p.
      for (index a = 0; a < r_; ++a) {
        for (index p = 0; p < nb; ++p) {
          T* s = wq.row(a) + p * r_;
          for (index c = 0; c < r_; ++c) s[c] -= bq(a, c);
        }
      }
      kernels::gemm_nn<T, T>(1.0, shards(wq.view()), matrix_view<const T>(inv.view()), 0.0, shards_mut(w0.view()));
      for (index a = 0; a < r_; ++a) {
        merged.dequantize_row(q * r_ + a, dw.row(q * r_ + a));
        T* d = dw.row(q * r_ + a);
        for (index i = 0; i < in_; ++i) d[i] -= w0(a, i);
      }
    }
  }

  /// miss_block: (r, out) balance, (r, mini_r) mini, (out / r, r, r) bat.
  std::vector<parameter<T>> parameters() {
    std::vector<std::int64_t> shape{block_.rows(), block_.cols()};
    if (mode_ == miss_mode::bat) shape = {out_ / r_, r_, r_};
    return {{"miss_block", block_.view(), grad_.view(), std::move(shape)}};
  }

  void zero_grad() { grad_.fill(T{0}); }

 private:
  void check_features(const char* where, index in, index out) const {
    if (r_ > in) {
      detail::raise<shape_error>(where, "r = " + std::to_string(r_) + " exceeds in_features " + std::to_string(in) +
                                            " (PEFT refuses it)");
    }
    if (mode_ == miss_mode::mini && out % m_ != 0) {
      detail::raise<shape_error>(where, "mini_r = " + std::to_string(m_) + " does not divide out_features " +
                                            std::to_string(out) + " (PEFT refuses it)");
    }
    if (mode_ == miss_mode::bat && (in % r_ != 0 || out % r_ != 0)) {
      detail::raise<shape_error>(where, "bat divides the weight into r x r blocks: r = " + std::to_string(r_) +
                                            " must divide both sizes of " + detail::shape_string(out, in));
    }
  }

  void check_ready(const char* where) const {
    if (block_.empty()) detail::raise<error>(where, "the adapter is default-constructed");
    if (!bound()) {
      detail::raise<error>(where, "the adapter is unbound (" + detail::shape_string(out_, in_) +
                                      ", 0: unknown): call set_features with the base's shape");
    }
  }
  using checks = detail::adapter_checks<miss, T>;  // check_base / check_io / check_grad
  friend checks;
  using checks::check_base;
  using checks::check_io;
  using checks::check_grad;

  /// B_full[j, o] for balance (B itself) and mini (B[j, o mod mini_r]).
  T full_block(index j, index o) const { return mode_ == miss_mode::mini ? block_(j, o % m_) : block_(j, o); }
  /// B_q (r, r) of bat, and its gradient.
  matrix_view<const T> block_q(index q) const { return matrix_view<const T>(block_.row(q * r_), r_, r_); }
  matrix_view<T> grad_q(index q) { return matrix_view<T>(grad_.row(q * r_), r_, r_); }
  /// An (rows, in) contiguous matrix with r | in seen as (rows in / r, r): row a (in / r) + p is
  /// shard p of row a.
  matrix_view<const T> shards(matrix_view<const T> m) const {
    return matrix_view<const T>(m.data(), m.rows() * (in_ / r_), r_);
  }
  matrix_view<T> shards_mut(matrix_view<T> m) const { return matrix_view<T>(m.data(), m.rows() * (in_ / r_), r_); }

  /// S(x) (batch, r): the shards of x summed, the last one zero-padded.
  matrix<T> shard_sum(matrix_view<const T> x) const {
    matrix<T> s(x.rows(), r_);
    for (index b = 0; b < x.rows(); ++b) {
      const T* xr = x.row(b);
      T* sr = s.row(b);
      for (index i0 = 0; i0 < in_; i0 += r_) {
        const index n = std::min(r_, in_ - i0);
        for (index j = 0; j < n; ++j) sr[j] += xr[i0 + j];
      }
    }
    return s;
  }

  /// bat: calls f(r0, rows, dW[r0 : r0 + rows, :], W0[r0 : r0 + rows, :]) over panels of whole
  /// row blocks (~64 KiB of W0 rows decoded at a time; never the whole weight).
  template <class Base, class F>
  void for_each_bat_panel(const Base& w, F&& f) const {
    const index nb = in_ / r_;
    const index blocks_per_panel = std::max<index>(1, std::min<index>(out_ / r_, (index{1} << 13) / (in_ * r_)));
    const index panel = blocks_per_panel * r_;
    matrix<T> w0(panel, in_), d(panel, in_);
    for (index r0 = 0; r0 < out_; r0 += panel) {
      const index rows = std::min(panel, out_ - r0);
      for (index i = 0; i < rows; ++i) w.dequantize_row(r0 + i, w0.row(i));
      for (index q0 = 0; q0 < rows; q0 += r_) {
        const index q = (r0 + q0) / r_;
        const auto wq = matrix_view<const T>(w0.row(q0), r_, in_);
        const auto dq = matrix_view<T>(d.row(q0), r_, in_);
        // dW_{q,p} = W0_{q,p} B_q + B_q, every shard p at once on the (r nb, r) views.
        kernels::gemm_nn<T, T>(1.0, shards(wq), block_q(q), 0.0, shards_mut(dq));
        for (index a = 0; a < r_; ++a) {
          const T* br = block_.row(q * r_ + a);
          T* dr = dq.row(a);
          for (index p = 0; p < nb; ++p) {
            for (index c = 0; c < r_; ++c) dr[p * r_ + c] += br[c];
          }
        }
      }
      f(r0, rows, matrix_view<const T>(d.data(), rows, in_), matrix_view<const T>(w0.data(), rows, in_));
    }
  }

  /// y += x dW^T.
  template <class Base>
  void add_delta(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& /*cache*/) const {
    const index batch = x.rows();
    if (mode_ == miss_mode::bat) {
      for_each_bat_panel(w, [&](index r0, index rows, matrix_view<const T> d, matrix_view<const T>) {
        kernels::gemm_nt<T, T>(1.0, x, d, 1.0, y.block(0, r0, batch, rows));
      });
      return;
    }
    const matrix<T> s = shard_sum(x);  // (batch, r)
    if (mode_ == miss_mode::balance) {
      kernels::gemm_nn<T, T>(1.0, s.view(), block_.view(), 1.0, y);
      return;
    }
    matrix<T> t(batch, m_);  // S B (batch, mini_r), repeated along out
    kernels::gemm_nn<T, T>(1.0, s.view(), block_.view(), 0.0, t.view());
    for (index b = 0; b < batch; ++b) {
      T* yr = y.row(b);
      for (index o0 = 0; o0 < out_; o0 += m_) {
        for (index c = 0; c < m_; ++c) yr[o0 + c] += t(b, c);
      }
    }
  }

  /// grad += d<g, x dW^T>/dB; dx += g dW.
  template <class Base>
  void delta_backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                      cache_type& /*cache*/) {
    const index batch = x.rows();
    if (mode_ == miss_mode::bat) {
      // dL/d(dW) = g^T x, panel by panel; dW_{q,p} = W0_{q,p} B_q + B_q gives
      // dB_q = sum_p W0_{q,p}^T G_{q,p} + G_{q,p}.
      const index nb = in_ / r_;
      matrix<T> gp;
      for_each_bat_panel(w, [&](index r0, index rows, matrix_view<const T> d, matrix_view<const T> w0) {
        kernels::gemm_nn<T, T>(1.0, g.block(0, r0, batch, rows), d, 1.0, dx);
        if (gp.rows() != rows) gp = matrix<T>(rows, in_);
        kernels::gemm_tn<T>(1.0, g.block(0, r0, batch, rows), x, 0.0, gp.view());
        for (index q0 = 0; q0 < rows; q0 += r_) {
          const index q = (r0 + q0) / r_;
          const auto gq = matrix_view<const T>(gp.row(q0), r_, in_);
          auto dbq = grad_q(q);
          kernels::gemm_tn<T>(1.0, shards(matrix_view<const T>(w0.row(q0), r_, in_)), shards(gq), 1.0, dbq);
          for (index a = 0; a < r_; ++a) {
            const T* gr = gq.row(a);
            T* br = dbq.row(a);
            for (index p = 0; p < nb; ++p) {
              for (index c = 0; c < r_; ++c) br[c] += gr[p * r_ + c];
            }
          }
        }
      });
      return;
    }
    const matrix<T> s = shard_sum(x);  // (batch, r)
    matrix<T> gs;                      // g with mini's repeats summed (batch, mini_r)
    matrix_view<const T> ge = g;
    if (mode_ == miss_mode::mini) {
      gs = matrix<T>(batch, m_);
      for (index b = 0; b < batch; ++b) {
        const T* gr = g.row(b);
        for (index o0 = 0; o0 < out_; o0 += m_) {
          for (index c = 0; c < m_; ++c) gs(b, c) += gr[o0 + c];
        }
      }
      ge = gs.view();
    }
    kernels::gemm_tn<T>(1.0, s.view(), ge, 1.0, grad_.view());  // dB += S^T g
    matrix<T> ds(batch, r_);                                      // dS = g B^T
    kernels::gemm_nt<T, T>(1.0, ge, block_.view(), 0.0, ds.view());
    for (index b = 0; b < batch; ++b) {
      T* dr = dx.row(b);
      const T* sr = ds.row(b);
      for (index i0 = 0; i0 < in_; i0 += r_) {
        const index n = std::min(r_, in_ - i0);
        for (index j = 0; j < n; ++j) dr[i0 + j] += sr[j];
      }
    }
  }

  miss_mode mode_ = miss_mode::balance;
  index r_ = 0;
  index m_ = 0;  // mini_r (mini mode), else 0
  index in_ = 0;
  index out_ = 0;
  matrix<T> block_;  // miss_block: (r, out) balance, (r, mini_r) mini, (out, r) bat
  matrix<T> grad_;   // its gradient, same shape
};

}  // namespace peft
