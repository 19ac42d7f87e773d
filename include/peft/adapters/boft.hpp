// peft/adapters/boft.hpp — BOFT, butterfly orthogonal fine-tuning (Liu et al., ICLR 2024), as
// HuggingFace PEFT 0.21 computes it.
//
//   W' = diag(s) W0 M^T,   y = s * ((x M) W0^T) + b0          s = boft_s (out, 1)
//   M = M_{N-1} ... M_1 M_0,   M_i = P_i B_i P_i^T             N = boft_n_butterfly_factor
//   B_i = blockdiag(Q_i1 .. Q_iD),  Q = (I - S)(I + S)^{-1},  S = (R - R^T) / 2
//                                                             R = boft_R[i, j] (H, H), D H = in
//   P_i: PEFT's block butterfly permutation (the identity for N = 1)
//
//   peft::boft<float> a(in, out, {.block_size = 8});   // PEFT's init: R = 0, s = 1, a no-op
//
// The rotation is applied to the input (never formed: O(batch in H) per factor), the scale to
// the base product, so it writes its own passes; several BOFT terms add (PEFT multiplies).
// Merging is multiplicative (delta_weight = diag(s) W0 M^T - W0); unmerge_delta recovers it from
// the merged weight. Checkpoints: io/peft/boft.hpp. Derivations: docs/methods/boft.md.
#pragma once

#include <Eigen/Core>
#include <Eigen/LU>
#include <algorithm>
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

/// PEFT's `init_weights`: true (R = 0, s = 1: a no-op), false (R ~ N(0, 0.1^2), s ~ N(1, 0.1^2)).
enum class boft_init : std::uint8_t { identity, random };

template <compute_scalar T>
class boft;

/// PEFT's BOFTConfig numbers; exactly one of block_size and block_num is non-zero.
struct boft_options {
  template <compute_scalar T>
  using adapter = boft<T>;  // the adapter these options make

  index block_size = 4;          // boft_block_size (H), 0: from block_num
  index block_num = 0;           // boft_block_num (D), 0: from block_size
  index n_butterfly_factor = 1;  // boft_n_butterfly_factor (N), 1: one block-diagonal factor
  boft_init init = boft_init::identity;
  std::uint64_t seed = 0;
};

/// The shape of a BOFT rotation: N factors of D blocks of H x H, D H = in_features.
struct boft_layout {
  index factors = 1;  // N
  index blocks = 1;   // D
  index size = 1;     // H

  /// PEFT's BOFTLayer.update_layer rules for a layer of `in` inputs; error naming the rule.
  static boft_layout of(index in, index block_size, index block_num, index n_butterfly_factor, const char* where) {
    auto fail = [&](const std::string& why) { detail::raise<error>(where, why); };
    if (n_butterfly_factor < 1) fail("boft_n_butterfly_factor must be >= 1, got " + std::to_string(n_butterfly_factor));
    if (block_size < 0 || block_num < 0 || (block_size == 0) == (block_num == 0)) {
      fail("exactly one of boft_block_size (" + std::to_string(block_size) + ") and boft_block_num (" +
           std::to_string(block_num) + ") must be non-zero (boft_block_size x boft_block_num = in_features)");
    }
    const index extra = n_butterfly_factor - 1;  // PEFT's boft_n_butterfly_factor - 1
    const index pow2 = index{1} << std::min<index>(extra, 62);
    boft_layout l;
    l.factors = n_butterfly_factor;
    if (block_num != 0) {
      if (in % block_num != 0) {
        fail("in_features (" + std::to_string(in) + ") must be divisible by boft_block_num (" + std::to_string(block_num) + ")");
      }
      if (extra != 0 && (pow2 > block_num || block_num % pow2 != 0)) {
        fail("boft_block_num (" + std::to_string(block_num) + ") must be a multiple of 2^(boft_n_butterfly_factor - 1) = " +
             std::to_string(pow2));
      }
      l.blocks = block_num;
      l.size = in / block_num;
    } else {
      if (in % block_size != 0) {
        fail("in_features (" + std::to_string(in) + ") must be divisible by boft_block_size (" + std::to_string(block_size) + ")");
      }
      if (extra != 0 && (in < block_size * pow2 || in % (block_size * pow2) != 0)) {
        fail("in_features (" + std::to_string(in) + ") must be a multiple of boft_block_size x 2^(boft_n_butterfly_factor - 1) = " +
             std::to_string(block_size * pow2));
      }
      l.size = block_size;
      l.blocks = in / block_size;
    }
    if (extra != 0 && (l.blocks % 2 != 0 || l.size % 2 != 0)) {
      fail("a butterfly (boft_n_butterfly_factor > 1) needs an even number of blocks and an even block size, got " +
           std::to_string(l.blocks) + " blocks of " + std::to_string(l.size));
    }
    return l;
  }
};

template <compute_scalar T>
class boft {
 public:
  using scalar = T;
  static constexpr std::string_view method = "boft";
  using dense_matrix = eigen_row_major<T>;

  /// The orthogonal blocks Q_ij = (I - S)(I + S)^{-1} and (I + S)^{-1} for the gradient.
  struct rotation {
    std::vector<dense_matrix> q;     // N D blocks (H, H), factor-major
    std::vector<dense_matrix> ainv;  // (I + S)^{-1}, same layout
  };

  /// What backward needs from forward: the blocks, each factor's permuted input x_i P_i
  /// (batch, in), and z W0^T (batch, out) with z = x M (for ds).
  struct cache_type {
    rotation rot;
    std::vector<matrix<T>> inputs;
    matrix<T> zw;
  };

  boft() = default;

  /// A fresh adapter for an (out, in) linear layer with PEFT's initialisation; error when the
  /// block numbers do not fit in_features (PEFT's rules, boft_layout::of).
  boft(index in_features, index out_features, const boft_options& opt)
      : in_(checked_dim(in_features, "in_features")), out_(checked_dim(out_features, "out_features")),
        layout_(boft_layout::of(in_, opt.block_size, opt.block_num, opt.n_butterfly_factor, "boft::boft")) {
    r_ = matrix<T>(layout_.factors * layout_.blocks * layout_.size, layout_.size);
    s_ = matrix<T>(out_, 1, T{1});
    if (opt.init == boft_init::random) {
      rng gen(opt.seed);
      for (auto& v : r_.storage()) v = static_cast<T>(gen.normal(0.0, 0.1));
      for (auto& v : s_.storage()) v = static_cast<T>(gen.normal(1.0, 0.1));
    }
    finish();
  }

  /// An adapter from existing tensors: boft_R as (N D H, H) rows (PEFT's (N, D, H, H)) with
  /// `layout`, boft_s (out) values. shape_error when they do not fit.
  boft(matrix<T> r, std::vector<T> s, boft_layout layout)
      : in_(layout.blocks * layout.size), out_(static_cast<index>(s.size())), layout_(layout), r_(std::move(r)) {
    if (layout_.factors < 1 || layout_.blocks < 1 || layout_.size < 1 || out_ < 1 ||
        r_.rows() != layout_.factors * layout_.blocks * layout_.size || r_.cols() != layout_.size) {
      detail::raise<shape_error>("boft::boft", "boft_R " + detail::shape_string(r_.rows(), r_.cols()) + " for " +
                                                   std::to_string(layout_.factors) + " factors of " +
                                                   std::to_string(layout_.blocks) + " blocks of " +
                                                   std::to_string(layout_.size) + ", with " + std::to_string(out_) +
                                                   " values of boft_s");
    }
    s_ = matrix<T>(out_, 1, std::move(s));
    finish();
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  const boft_layout& layout() const noexcept { return layout_; }
  /// Factor i's permutation: (x P_i)[perm[k]] = x[k] (PEFT's P_i[k, perm[k]] = 1).
  const std::vector<index>& permutation(index i) const { return perms_[static_cast<std::size_t>(i)]; }

  /// boft_R as (N D H, H) rows, block (i, j) at rows (i D + j) H; boft_s (out, 1).
  matrix_view<T> r() noexcept { return r_.view(); }
  matrix_view<const T> r() const noexcept { return r_.view(); }
  matrix_view<T> s() noexcept { return s_.view(); }
  matrix_view<const T> s() const noexcept { return s_.view(); }
  matrix_view<const T> grad_r() const noexcept { return gr_.view(); }
  matrix_view<const T> grad_s() const noexcept { return gs_.view(); }

  /// M (in, in), materialised (for tests and inspection; the passes never form it).
  matrix<T> rotation_matrix() const {
    check_ready("boft::rotation_matrix");
    const rotation rot = make_rotation("boft::rotation_matrix");
    matrix<T> m(in_, in_);
    for (index i = 0; i < in_; ++i) m(i, i) = T{1};
    rotate(rot, m.view(), false);  // I M
    return m;
  }

  /// y = s * ((x M) W0^T) + b0.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    check_io("boft::forward", w, x, y);
    cache.rot = make_rotation("boft::forward");
    matrix<T> z = rotated_input(x, cache);
    w.matmul(matrix_view<const T>(z.view()), y);
    resize(cache.zw, y.rows(), y.cols());
    for (index i = 0; i < y.rows(); ++i) {
      T* row = y.row(i);
      for (index j = 0; j < y.cols(); ++j) {
        const T b = w.template bias_value<T>(j);
        cache.zw(i, j) = row[j] - b;
        row[j] += (s_(j, 0) - T{1}) * cache.zw(i, j);  // s (h_z - b) + b, exact for s = 1
      }
    }
  }

  /// y += s * ((x M - x) W0^T) + (s - 1) * (h - b0).
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<T> y,
                cache_type& cache) const {
    check_io("boft::add_term", w, x, y);
    detail::expect_shape("boft::add_term", "h", h, x.rows(), w.out_features());
    cache.rot = make_rotation("boft::add_term");
    matrix<T> d = rotated_input(x, cache);
    as_eigen(d.view()) -= as_eigen(x);
    resize(cache.zw, y.rows(), y.cols());
    w.matmul(matrix_view<const T>(d.view()), cache.zw.view());
    for (index i = 0; i < y.rows(); ++i) {
      T* row = y.row(i);
      for (index j = 0; j < y.cols(); ++j) {
        const T hb = h(i, j) - w.template bias_value<T>(j);
        const T dw = cache.zw(i, j) - w.template bias_value<T>(j);  // (x M - x) W0^T
        row[j] += s_(j, 0) * dw + (s_(j, 0) - T{1}) * hb;
        cache.zw(i, j) = dw + hb;  // z W0^T
      }
    }
  }

  /// Accumulates dR, ds; writes dx = ((g * s) W0) M^T.
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    check_grad("boft::backward", w, x, g, dx);
    const matrix<T> gs = scaled_grad(w, x, g, cache, "boft::backward");
    w.matmul_t(matrix_view<const T>(gs.view()), dx, false);  // dz = (g * s) W0
    backprop_rotation(dx, cache);
  }

  /// Accumulates dR, ds; dh += (s - 1) * g; dx += ((g * s) W0) (M^T - I).
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<const T> g,
                     matrix_view<T> dh, matrix_view<T> dx, cache_type& cache) {
    check_grad("boft::backward_term", w, x, g, dx);
    detail::expect_shape("boft::backward_term", "h", h, x.rows(), w.out_features());
    detail::expect_shape("boft::backward_term", "dh", dh, x.rows(), w.out_features());
    const matrix<T> gs = scaled_grad(w, x, g, cache, "boft::backward_term");
    for (index i = 0; i < g.rows(); ++i) {
      for (index j = 0; j < g.cols(); ++j) dh(i, j) += (s_(j, 0) - T{1}) * g(i, j);
    }
    matrix<T> dz(x.rows(), in_);
    w.matmul_t(matrix_view<const T>(gs.view()), dz.view(), false);
    as_eigen(dx) -= as_eigen(dz.view());
    backprop_rotation(dz.view(), cache);
    as_eigen(dx) += as_eigen(dz.view());
  }

  /// dW = diag(s) W0 M^T - W0, W0 read a row at a time into dw.
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("boft::delta_weight", w);
    detail::expect_shape("boft::delta_weight", "dw", dw, w.out_features(), w.in_features());
    const rotation rot = make_rotation("boft::delta_weight");
    for (index i = 0; i < dw.rows(); ++i) w.dequantize_row(i, dw.row(i));
    matrix<T> m(dw.rows(), dw.cols());
    as_eigen(m.view()) = as_eigen(dw);
    rotate(rot, m.view(), true);  // W0 M^T
    for (index i = 0; i < dw.rows(); ++i) {
      for (index j = 0; j < dw.cols(); ++j) dw(i, j) = s_(i, 0) * m(i, j) - dw(i, j);
    }
  }

  /// Merging leaves the bias alone.
  template <base_weight Base>
  bool delta_bias(const Base& w, T* /*db*/) const {
    check_base("boft::delta_bias", w);
    return false;
  }

  /// What merge added, from the merged W' = diag(s) W0 M^T: W' - diag(1 / s) W' M. error if s
  /// has a zero (W0 is lost).
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    check_base("boft::unmerge_delta", merged);
    detail::expect_shape("boft::unmerge_delta", "dw", dw, merged.out_features(), merged.in_features());
    for (const T v : s_.storage()) {
      if (v == T{0}) detail::raise<error>("boft::unmerge_delta", "boft_s has a zero entry: the merged weight no longer holds W0");
    }
    const rotation rot = make_rotation("boft::unmerge_delta");
    for (index i = 0; i < dw.rows(); ++i) merged.dequantize_row(i, dw.row(i));
    matrix<T> m(dw.rows(), dw.cols());
    as_eigen(m.view()) = as_eigen(dw);
    rotate(rot, m.view(), false);  // W' M
    for (index i = 0; i < dw.rows(); ++i) {
      for (index j = 0; j < dw.cols(); ++j) dw(i, j) -= m(i, j) / s_(i, 0);
    }
  }

  /// boft_R (N, D, H, H) and boft_s (out, 1): PEFT's names (no ".weight").
  std::vector<parameter<T>> parameters() {
    return {{"boft_R", r_.view(), gr_.view(), {layout_.factors, layout_.blocks, layout_.size, layout_.size}},
            {"boft_s", s_.view(), gs_.view(), {out_, 1}}};
  }

  void zero_grad() {
    gr_.fill(T{0});
    gs_.fill(T{0});
  }

 private:
  static index checked_dim(index d, const char* what) {
    if (d < 1) detail::raise<shape_error>("boft::boft", std::string(what) + " must be >= 1, got " + std::to_string(d));
    return d;
  }
  static void resize(matrix<T>& m, index rows, index cols) {
    if (m.rows() != rows || m.cols() != cols) m = matrix<T>(rows, cols);
  }

  /// Gradients and PEFT's permutations (block_butterfly_perm) once the shapes are set.
  void finish() {
    gr_ = matrix<T>(r_.rows(), r_.cols());
    gs_ = matrix<T>(s_.rows(), 1);
    perms_.clear();
    const index extra = layout_.factors - 1;
    for (index i = 0; i < layout_.factors; ++i) {
      std::vector<index> perm(static_cast<std::size_t>(in_));
      for (index k = 0; k < in_; ++k) perm[static_cast<std::size_t>(k)] = k;
      if (extra != 0) {
        // Blocks of width bs = in / (D / 2^i) = H 2^i, cut into runs of H / 2: the even runs
        // first, then the odd ones, within every block.
        const index half = layout_.size / 2;
        const index width = in_ / (layout_.blocks >> i);
        const index runs = width / half;
        std::vector<index> order;
        order.reserve(static_cast<std::size_t>(width));
        for (const index parity : {index{0}, index{1}}) {
          for (index run = parity; run < runs; run += 2) {
            for (index t = 0; t < half; ++t) order.push_back(run * half + t);
          }
        }
        for (index b0 = 0; b0 < in_; b0 += width) {
          for (index t = 0; t < width; ++t) perm[static_cast<std::size_t>(b0 + t)] = b0 + order[static_cast<std::size_t>(t)];
        }
      }
      perms_.push_back(std::move(perm));
    }
  }

  rotation make_rotation(const char* where) const {
    const index h = layout_.size, nb = layout_.factors * layout_.blocks;
    rotation rot;
    rot.q.reserve(static_cast<std::size_t>(nb));
    rot.ainv.reserve(static_cast<std::size_t>(nb));
    const auto r = as_eigen(r_.view());
    const dense_matrix eye = dense_matrix::Identity(h, h);
    for (index b = 0; b < nb; ++b) {
      const auto blk = r.block(b * h, 0, h, h);
      const dense_matrix skew = (blk - blk.transpose()) * T{0.5};
      Eigen::PartialPivLU<dense_matrix> lu(eye + skew);  // I + S: never singular for real skew S
      dense_matrix ainv = lu.inverse();
      if (!ainv.allFinite()) detail::raise<error>(where, "boft_R block " + std::to_string(b) + " is not finite");
      rot.q.push_back((eye - skew) * ainv);
      rot.ainv.push_back(std::move(ainv));
    }
    return rot;
  }

  /// One factor on the rows of x (rows, in): out = x P_i B_i P_i^T (B_i^T if transposed).
  /// `permuted`, when given, receives x P_i.
  void apply_factor(const rotation& rot, index i, matrix_view<const T> x, matrix_view<T> out, bool transposed,
                    matrix<T>* permuted) const {
    const index h = layout_.size, rows = x.rows();
    const auto& perm = perms_[static_cast<std::size_t>(i)];
    const bool identity = layout_.factors == 1;
    matrix<T> a_local;
    matrix<T>& a = permuted != nullptr ? *permuted : a_local;
    resize(a, rows, in_);
    for (index r = 0; r < rows; ++r) {
      const T* src = x.row(r);
      T* dst = a.row(r);
      for (index k = 0; k < in_; ++k) dst[perm[static_cast<std::size_t>(k)]] = src[k];
    }
    matrix<T> b(rows, in_);
    const auto am = as_eigen(a.view());
    auto bm = as_eigen(b.view());
    for (index j = 0; j < layout_.blocks; ++j) {
      const auto& q = rot.q[static_cast<std::size_t>(i * layout_.blocks + j)];
      if (transposed) {
        bm.middleCols(j * h, h).noalias() = am.middleCols(j * h, h) * q.transpose();
      } else {
        bm.middleCols(j * h, h).noalias() = am.middleCols(j * h, h) * q;
      }
    }
    for (index r = 0; r < rows; ++r) {
      const T* src = b.row(r);
      T* dst = out.row(r);
      if (identity) {
        std::copy(src, src + in_, dst);
      } else {
        for (index k = 0; k < in_; ++k) dst[k] = src[perm[static_cast<std::size_t>(k)]];
      }
    }
  }

  /// x M (transposed: x M^T) in place on the rows of x.
  void rotate(const rotation& rot, matrix_view<T> x, bool transposed) const {
    matrix<T> tmp(x.rows(), in_);
    for (index t = 0; t < layout_.factors; ++t) {
      const index i = transposed ? t : layout_.factors - 1 - t;  // x M applies M_{N-1} first
      as_eigen(tmp.view()) = as_eigen(x);
      apply_factor(rot, i, matrix_view<const T>(tmp.view()), x, transposed, nullptr);
    }
  }

  /// z = x M, keeping each factor's permuted input in the cache.
  matrix<T> rotated_input(matrix_view<const T> x, cache_type& cache) const {
    cache.inputs.resize(static_cast<std::size_t>(layout_.factors));
    matrix<T> z(x.rows(), in_), tmp(x.rows(), in_);
    as_eigen(z.view()) = as_eigen(x);
    for (index i = layout_.factors - 1; i >= 0; --i) {
      as_eigen(tmp.view()) = as_eigen(z.view());
      apply_factor(cache.rot, i, matrix_view<const T>(tmp.view()), z.view(), false,
                   &cache.inputs[static_cast<std::size_t>(i)]);
    }
    return z;
  }

  /// Accumulates ds from z W0^T (recomputed when the cache is not this batch's) and returns
  /// g * s (batch, out).
  template <class Base>
  matrix<T> scaled_grad(const Base& w, matrix_view<const T> x, matrix_view<const T> g, cache_type& cache,
                        const char* where) {
    if (cache.zw.rows() != x.rows() || cache.zw.cols() != g.cols() ||
        cache.inputs.size() != static_cast<std::size_t>(layout_.factors) ||
        cache.inputs.front().rows() != x.rows()) {
      cache.rot = make_rotation(where);
      const matrix<T> z = rotated_input(x, cache);
      resize(cache.zw, x.rows(), g.cols());
      w.matmul(matrix_view<const T>(z.view()), cache.zw.view());
      for (index i = 0; i < x.rows(); ++i) {
        for (index j = 0; j < g.cols(); ++j) cache.zw(i, j) -= w.template bias_value<T>(j);
      }
    }
    matrix<T> gs(g.rows(), g.cols());
    for (index i = 0; i < g.rows(); ++i) {
      for (index j = 0; j < g.cols(); ++j) {
        gs_(j, 0) += g(i, j) * cache.zw(i, j);
        gs(i, j) = g(i, j) * s_(j, 0);
      }
    }
    return gs;
  }

  /// dz (rows, in) -> dz M^T in place, accumulating dR: for each factor, with input a = x_i P_i
  /// and db = dc P_i, dQ_j = a_j^T db_j; the Cayley map gives dS = -(I + Q)^T dQ (I + S)^{-T}
  /// and dR = (dS - dS^T) / 2.
  void backprop_rotation(matrix_view<T> dz, const cache_type& cache) {
    const index h = layout_.size, rows = dz.rows();
    auto gr = as_eigen(gr_.view());
    const dense_matrix eye = dense_matrix::Identity(h, h);
    matrix<T> db(rows, in_), da(rows, in_);
    for (index i = 0; i < layout_.factors; ++i) {  // M_0 was applied last
      const auto& perm = perms_[static_cast<std::size_t>(i)];
      for (index r = 0; r < rows; ++r) {
        const T* src = dz.row(r);
        T* dst = db.row(r);
        for (index k = 0; k < in_; ++k) dst[perm[static_cast<std::size_t>(k)]] = src[k];
      }
      const auto am = as_eigen(cache.inputs[static_cast<std::size_t>(i)].view());
      const auto dbm = as_eigen(db.view());
      auto dam = as_eigen(da.view());
      for (index j = 0; j < layout_.blocks; ++j) {
        const std::size_t b = static_cast<std::size_t>(i * layout_.blocks + j);
        const dense_matrix& q = cache.rot.q[b];
        const dense_matrix dq = am.middleCols(j * h, h).transpose() * dbm.middleCols(j * h, h);
        const dense_matrix ds = -((eye + q).transpose() * dq) * cache.rot.ainv[b].transpose();
        gr.block(static_cast<index>(b) * h, 0, h, h) += (ds - ds.transpose()) * T{0.5};
        dam.middleCols(j * h, h).noalias() = dbm.middleCols(j * h, h) * q.transpose();
      }
      for (index r = 0; r < rows; ++r) {
        const T* src = da.row(r);
        T* dst = dz.row(r);
        for (index k = 0; k < in_; ++k) dst[k] = src[perm[static_cast<std::size_t>(k)]];
      }
    }
  }

  void check_ready(const char* where) const {
    if (r_.rows() < 1) detail::raise<error>(where, "the adapter is empty (default-constructed)");
  }
  template <class Base>
  void check_base(const char* where, const Base& w) const {
    check_ready(where);
    if (w.in_features() != in_ || w.out_features() != out_) {
      detail::raise<shape_error>(where, "base weight is " + detail::shape_string(w.out_features(), w.in_features()) +
                                            ", adapter expects " + detail::shape_string(out_, in_));
    }
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

  index in_ = 0;
  index out_ = 0;
  boft_layout layout_;
  matrix<T> r_;   // boft_R (N D H, H)
  matrix<T> s_;   // boft_s (out, 1)
  matrix<T> gr_;  // gradients, same shapes
  matrix<T> gs_;
  std::vector<std::vector<index>> perms_;  // one per factor
};

}  // namespace peft
