// peft/adapters/vblora.hpp — VB-LoRA (Li, Han, Ji 2024, "VB-LoRA: Extreme Parameter Efficient
// Fine-Tuning with Vector Banks") as HuggingFace PEFT 0.21 computes it.
//
//   y = x W0^T + b0 + (x A^T) B^T            no alpha, no scale; A (r, in), B (out, r)
//   A and B are assembled from a vector bank V (num_vectors, L) SHARED by every adapted layer:
//   each length-L piece of a row of A (and of a column of B) is a top-k softmax mixture of bank
//   vectors,  piece = sum_{k in topk(l)} softmax(l[topk])_k V[k],  chosen by its own logits l.
//   vblora_logits_A (r, in / L, num_vectors), vblora_logits_B (out / L, r, num_vectors) and V
//   are trainable (V's gradient is accumulated over every layer sharing it).
//
//   auto bank = peft::make_vblora_vector_bank<float>(256, 16, 0.02, seed);
//   peft::vblora<float> a1(in1, out1, bank, {.rank = 4}), a2(in2, out2, bank, {.rank = 4});
//
// Two storage forms: logits (trainable), or only each piece's top-k indices and weights (PEFT's
// save_only_topk_weights: inference and merging only; keep_only_topk() converts). A and B are
// assembled into the cache by every forward (cost O(pieces * num_vectors + r (in + out) k));
// the product and its gradients come from the low-rank core, the chain rule through the top-k
// softmax is applied after it. Checkpoints: io/peft/vblora.hpp. Details: docs/methods/vblora.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/detail/low_rank_core.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// The vector bank VB-LoRA layers share: value (num_vectors, vector_length) and its gradient,
/// accumulated by every layer that holds the bank.
template <compute_scalar T>
struct vblora_vector_bank {
  matrix<T> value;  // (num_vectors, vector_length)
  matrix<T> grad;   // same shape, += by every layer sharing the bank

  vblora_vector_bank() = default;
  /// A bank holding `values` (num_vectors, vector_length), both >= 1.
  explicit vblora_vector_bank(matrix<T> values) : value(std::move(values)) {
    if (value.rows() < 1 || value.cols() < 1) {
      detail::raise<shape_error>("vblora_vector_bank::vblora_vector_bank",
                                 "the bank is " + detail::shape_string(value.rows(), value.cols()) +
                                     ", expected at least one vector of length >= 1");
    }
    grad = matrix<T>(value.rows(), value.cols());
  }
  index num_vectors() const noexcept { return value.rows(); }
  index vector_length() const noexcept { return value.cols(); }
  void zero_grad() { grad.fill(T{0}); }
};

/// PEFT's initialisation of a bank: U(-bound, bound), drawn from peft::rng seeded with `seed`
/// (not PyTorch's generator).
template <compute_scalar T>
std::shared_ptr<vblora_vector_bank<T>> make_vblora_vector_bank(index num_vectors, index vector_length,
                                                              double bound = 0.02, std::uint64_t seed = 0) {
  if (num_vectors < 1 || vector_length < 1) {
    detail::raise<shape_error>("make_vblora_vector_bank", "num_vectors " + std::to_string(num_vectors) +
                                                              " and vector_length " + std::to_string(vector_length) +
                                                              " must be >= 1");
  }
  rng gen(seed);
  matrix<T> v(num_vectors, vector_length);
  for (auto& e : v.storage()) e = static_cast<T>(gen.uniform(-bound, bound));
  return std::make_shared<vblora_vector_bank<T>>(std::move(v));
}

template <compute_scalar T>
class vblora;

/// PEFT's VBLoRAConfig numbers. A layer built from options alone makes its own bank
/// (num_vectors, vector_length, init_vector_bank_bound); pass a bank to share one.
struct vblora_options {
  template <compute_scalar T>
  using adapter = vblora<T>;  // the adapter these options make

  index rank = 4;
  index topk = 2;
  index num_vectors = 256;
  index vector_length = 256;  // must divide in_features and out_features
  double init_logits_std = 0.1;
  double init_vector_bank_bound = 0.02;
  std::uint64_t seed = 0;
};

template <compute_scalar T>
class vblora : public additive_adapter<vblora<T>, T> {
  friend class additive_adapter<vblora<T>, T>;

 public:
  static constexpr std::string_view method = "vblora";

  /// What forward assembles and backward reuses: each piece's top-k indices and softmax weights
  /// (pieces of A first, then of B), A (r, in), B (out, r), and the low-rank core's t = x A^T.
  struct cache_type {
    std::vector<index> idx;  // (pieces, topk)
    std::vector<T> w;        // (pieces, topk)
    matrix<T> a;             // (r, in)
    matrix<T> b;             // (out, r)
    low_rank_cache<T> lr;
    bool assembled = false;
  };

  vblora() = default;

  /// A fresh adapter over a shared bank: logits ~ N(0, init_logits_std^2) (peft::rng, `seed`).
  vblora(index in_features, index out_features, std::shared_ptr<vblora_vector_bank<T>> bank,
         const vblora_options& opt)
      : bank_(std::move(bank)), rank_(opt.rank), topk_(opt.topk), init_logits_std_(opt.init_logits_std) {
    check_layout("vblora::vblora", in_features, out_features);
    logits_a_ = matrix<T>(pieces_a(), bank_->num_vectors());
    logits_b_ = matrix<T>(pieces_b(), bank_->num_vectors());
    rng gen(opt.seed);
    for (auto& v : logits_a_.storage()) v = static_cast<T>(gen.normal(0.0, opt.init_logits_std));
    for (auto& v : logits_b_.storage()) v = static_cast<T>(gen.normal(0.0, opt.init_logits_std));
    finish();
  }

  /// A fresh adapter with its own bank (num_vectors, vector_length, init_vector_bank_bound).
  vblora(index in_features, index out_features, const vblora_options& opt)
      : vblora(in_features, out_features,
               make_vblora_vector_bank<T>(opt.num_vectors, opt.vector_length, opt.init_vector_bank_bound,
                                          opt.seed ^ 0x9e3779b97f4a7c15ULL),
               opt) {}

  /// An adapter from existing logits: logits_a (r * in / L, num_vectors) holds PEFT's
  /// vblora_logits_A (r, in / L, num_vectors) row-major, logits_b (out / L * r, num_vectors)
  /// PEFT's vblora_logits_B (out / L, r, num_vectors); L = the bank's vector_length.
  vblora(std::shared_ptr<vblora_vector_bank<T>> bank, index rank, index in_features, index out_features, index topk,
         matrix<T> logits_a, matrix<T> logits_b)
      : bank_(std::move(bank)), rank_(rank), topk_(topk), logits_a_(std::move(logits_a)), logits_b_(std::move(logits_b)) {
    constexpr const char* where = "vblora::vblora";
    check_layout(where, in_features, out_features);
    expect_table(where, "vblora_logits_A", logits_a_, pieces_a(), bank_->num_vectors());
    expect_table(where, "vblora_logits_B", logits_b_, pieces_b(), bank_->num_vectors());
    finish();
  }

  /// An inference-only adapter from PEFT's save_only_topk_weights form: per piece the top-k bank
  /// indices (pieces, topk) and the first topk - 1 softmax weights (pieces, topk - 1), the last
  /// being 1 - their sum; pieces of A (r * in / L) in indices_a / weights_a, of B (out / L * r)
  /// in indices_b / weights_b, ordered as the logits are. Indices must be in [0, num_vectors).
  static vblora from_topk(std::shared_ptr<vblora_vector_bank<T>> bank, index rank, index in_features,
                          index out_features, index topk, const matrix<T>& indices_a, const matrix<T>& weights_a,
                          const matrix<T>& indices_b, const matrix<T>& weights_b) {
    constexpr const char* where = "vblora::from_topk";
    vblora a;
    a.bank_ = std::move(bank);
    a.rank_ = rank;
    a.topk_ = topk;
    a.check_layout(where, in_features, out_features);
    a.topk_only_ = true;
    a.sel_idx_ = matrix<T>(a.pieces_a() + a.pieces_b(), topk);
    a.sel_w_ = matrix<T>(a.pieces_a() + a.pieces_b(), topk);
    a.set_selection(where, "vblora_logits_A", indices_a, weights_a, 0, a.pieces_a());
    a.set_selection(where, "vblora_logits_B", indices_b, weights_b, a.pieces_a(), a.pieces_b());
    a.finish();
    return a;
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  index rank() const noexcept { return rank_; }
  index topk() const noexcept { return topk_; }
  index num_vectors() const noexcept { return bank_ ? bank_->num_vectors() : 0; }
  index vector_length() const noexcept { return bank_ ? bank_->vector_length() : 0; }
  double init_logits_std() const noexcept { return init_logits_std_; }
  /// True in the save_only_topk_weights form (no logits: inference and merging only).
  bool topk_only() const noexcept { return topk_only_; }

  /// The shared bank (the same object for every layer sharing it).
  const std::shared_ptr<vblora_vector_bank<T>>& bank() const noexcept { return bank_; }
  /// The logits as (pieces, num_vectors) tables (empty in the top-k form) and their gradients.
  matrix_view<T> logits_A() noexcept { return logits_a_.view(); }
  matrix_view<const T> logits_A() const noexcept { return logits_a_.view(); }
  matrix_view<T> logits_B() noexcept { return logits_b_.view(); }
  matrix_view<const T> logits_B() const noexcept { return logits_b_.view(); }
  matrix_view<const T> grad_logits_A() const noexcept { return ga_.view(); }
  matrix_view<const T> grad_logits_B() const noexcept { return gb_.view(); }

  /// A (r, in) and B (out, r) as the current logits and bank give them.
  std::pair<matrix<T>, matrix<T>> lora_matrices() const {
    check_ready("vblora::lora_matrices");
    cache_type c;
    assemble(c);
    return {std::move(c.a), std::move(c.b)};
  }

  /// Drops the logits, keeping each piece's top-k indices and softmax weights (what PEFT saves
  /// with save_only_topk_weights): the outputs are unchanged, the adapter is no longer trainable.
  void keep_only_topk() {
    check_ready("vblora::keep_only_topk");
    if (topk_only_) return;
    const index n = pieces_a() + pieces_b();
    std::vector<index> idx(static_cast<std::size_t>(n * topk_));
    std::vector<T> w(idx.size());
    select(idx, w);
    sel_idx_ = matrix<T>(n, topk_);
    sel_w_ = matrix<T>(n, topk_, std::move(w));
    for (std::size_t i = 0; i < idx.size(); ++i) sel_idx_.storage()[i] = static_cast<T>(idx[i]);
    logits_a_ = matrix<T>();
    logits_b_ = matrix<T>();
    ga_ = matrix<T>();
    gb_ = matrix<T>();
    topk_only_ = true;
  }

  // forward, add_term, backward, backward_term: core/additive_adapter.hpp over the hooks below.

  /// dW = B A (out, in).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("vblora::delta_weight", w);
    detail::expect_shape("vblora::delta_weight", "dw", dw, out_, in_);
    cache_type c;
    assemble(c);
    kernels::gemm_nn<T, T>(1.0, c.b.view(), c.a.view(), 0.0, dw);
  }
  /// VB-LoRA does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// Logits form: vblora_logits_A, vblora_logits_B (trainable), vblora_vector_bank (shared,
  /// trainable). Top-k form: vblora_logits_{A,B}_topk_indices (integer), _topk_weights (the first
  /// topk - 1 weights) and the bank, all frozen. PEFT's names and shapes.
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    if (!bank_) return p;
    const auto r = static_cast<std::int64_t>(rank_), ti = static_cast<std::int64_t>(in_ / vector_length()),
               to = static_cast<std::int64_t>(out_ / vector_length()), nv = static_cast<std::int64_t>(num_vectors()),
               k = static_cast<std::int64_t>(topk_);
    if (!topk_only_) {
      p.push_back({"vblora_logits_A", logits_a_.view(), ga_.view(), {r, ti, nv}});
      p.push_back({"vblora_logits_B", logits_b_.view(), gb_.view(), {to, r, nv}});
    } else {
      const index pa = pieces_a(), pb = pieces_b();
      auto rows = [&](matrix<T>& m, index first, index n, index cols) {
        return matrix_view<T>(m.row(first), n, cols, m.cols());
      };
      p.push_back({"vblora_logits_A_topk_indices", rows(sel_idx_, 0, pa, topk_), {}, {r, ti, k}, false, false, true});
      p.push_back({"vblora_logits_A_topk_weights", rows(sel_w_, 0, pa, topk_ - 1), {}, {r, ti, k - 1}, false});
      p.push_back({"vblora_logits_B_topk_indices", rows(sel_idx_, pa, pb, topk_), {}, {to, r, k}, false, false, true});
      p.push_back({"vblora_logits_B_topk_weights", rows(sel_w_, pa, pb, topk_ - 1), {}, {to, r, k - 1}, false});
    }
    parameter<T> v{"vblora_vector_bank", bank_->value.view(), {}, {nv, static_cast<std::int64_t>(vector_length())}};
    if (!topk_only_) v.grad = bank_->grad.view();
    v.trainable = !topk_only_;
    v.shared = true;
    p.push_back(std::move(v));
    return p;
  }

  /// Zeroes this layer's logit gradients AND the shared bank's (seen by every layer sharing it).
  void zero_grad() {
    ga_.fill(T{0});
    gb_.fill(T{0});
    if (bank_ && !topk_only_) bank_->zero_grad();
  }

  /// Throws peft::error for a default-constructed adapter (no bank).
  void check_ready(const char* where) const {
    if (!bank_) detail::raise<error>(where, "the adapter is default-constructed (no vector bank)");
  }

 private:
  index pieces_a() const noexcept { return rank_ * (in_ / vector_length()); }
  index pieces_b() const noexcept { return (out_ / vector_length()) * rank_; }

  void check_layout(const char* where, index in, index out) {
    if (!bank_) detail::raise<shape_error>(where, "the vector bank must not be null");
    const index len = bank_->vector_length(), nv = bank_->num_vectors();
    if (rank_ < 1) detail::raise<shape_error>(where, "rank must be >= 1, got " + std::to_string(rank_));
    if (topk_ < 1 || topk_ > nv) {
      detail::raise<shape_error>(where, "topk " + std::to_string(topk_) + " is outside [1, num_vectors = " +
                                            std::to_string(nv) + "]");
    }
    if (in < 1 || out < 1 || in % len != 0 || out % len != 0) {
      detail::raise<shape_error>(where, "in_features " + std::to_string(in) + " and out_features " +
                                            std::to_string(out) + " must be positive multiples of vector_length " +
                                            std::to_string(len));
    }
    in_ = in;
    out_ = out;
  }
  static void expect_table(const char* where, const char* name, const matrix<T>& m, index rows, index cols) {
    if (m.rows() != rows || m.cols() != cols) {
      detail::raise<shape_error>(where, std::string(name) + " is " + detail::shape_string(m.rows(), m.cols()) +
                                            " as a table of pieces, expected " + detail::shape_string(rows, cols));
    }
  }
  /// Rows [first, first + n) of the top-k form from indices (n, topk) and weights (n, topk - 1).
  void set_selection(const char* where, const char* name, const matrix<T>& idx, const matrix<T>& w, index first,
                     index n) {
    const std::string s(name);
    expect_table(where, (s + "_topk_indices").c_str(), idx, n, topk_);
    if (w.rows() != n || w.cols() != topk_ - 1) {
      detail::raise<shape_error>(where, s + "_topk_weights is " + detail::shape_string(w.rows(), w.cols()) +
                                            ", expected " + detail::shape_string(n, topk_ - 1));
    }
    const index nv = bank_->num_vectors();
    for (index i = 0; i < n; ++i) {
      T rest = T{1};
      for (index k = 0; k < topk_; ++k) {
        const T v = idx(i, k);
        if (!(v >= T{0} && v < static_cast<T>(nv)) || v != std::floor(v)) {
          detail::raise<shape_error>(where, s + "_topk_indices holds " + std::to_string(static_cast<double>(v)) +
                                                ", not an index in [0, num_vectors = " + std::to_string(nv) + ")");
        }
        sel_idx_(first + i, k) = v;
        if (k + 1 < topk_) {
          sel_w_(first + i, k) = w(i, k);
          rest -= w(i, k);
        }
      }
      sel_w_(first + i, topk_ - 1) = rest;
    }
  }
  void finish() {
    ga_ = matrix<T>(logits_a_.rows(), logits_a_.cols());
    gb_ = matrix<T>(logits_b_.rows(), logits_b_.cols());
  }

  /// Each piece's top-k indices (largest logits first) and softmax weights, pieces of A then B.
  void select(std::vector<index>& idx, std::vector<T>& w) const {
    const index k = topk_, nv = num_vectors(), pa = pieces_a(), n = pa + pieces_b();
    idx.resize(static_cast<std::size_t>(n * k));
    w.resize(idx.size());
    if (topk_only_) {
      for (std::size_t i = 0; i < idx.size(); ++i) {
        idx[i] = static_cast<index>(sel_idx_.storage()[i]);
        w[i] = sel_w_.storage()[i];
      }
      return;
    }
    for (index s = 0; s < n; ++s) {
      const T* l = s < pa ? logits_a_.row(s) : logits_b_.row(s - pa);
      index* top = idx.data() + s * k;
      T* wt = w.data() + s * k;
      // Insertion into a sorted list of k: O(num_vectors k), k is small (PEFT's default 2).
      index filled = 0;
      for (index v = 0; v < nv; ++v) {
        if (filled == k && !(l[v] > l[top[k - 1]])) continue;
        index pos = filled < k ? filled++ : k - 1;
        while (pos > 0 && l[v] > l[top[pos - 1]]) {
          top[pos] = top[pos - 1];
          --pos;
        }
        top[pos] = v;
      }
      const T mx = l[top[0]];
      T sum = T{0};
      for (index q = 0; q < k; ++q) sum += (wt[q] = std::exp(l[top[q]] - mx));
      for (index q = 0; q < k; ++q) wt[q] /= sum;
    }
  }

  /// c.idx, c.w, and A, B from them: piece (q, j) of A is A[q, jL:(j+1)L], piece (t, q) of B is
  /// B[tL:(t+1)L, q].
  void assemble(cache_type& c) const {
    select(c.idx, c.w);
    const index k = topk_, len = vector_length(), ti = in_ / len, pa = pieces_a();
    low_rank::detail::resize(c.a, rank_, in_);
    low_rank::detail::resize(c.b, out_, rank_);
    std::vector<T> piece(static_cast<std::size_t>(len));
    for (index s = 0; s < pa + pieces_b(); ++s) {
      std::fill(piece.begin(), piece.end(), T{0});
      for (index q = 0; q < k; ++q) {
        const T wq = c.w[static_cast<std::size_t>(s * k + q)];
        const T* v = bank_->value.row(c.idx[static_cast<std::size_t>(s * k + q)]);
        for (index e = 0; e < len; ++e) piece[static_cast<std::size_t>(e)] += wq * v[e];
      }
      if (s < pa) {
        std::copy(piece.begin(), piece.end(), c.a.row(s / ti) + (s % ti) * len);
      } else {
        const index t = (s - pa) / rank_, q = (s - pa) % rank_;
        for (index e = 0; e < len; ++e) c.b(t * len + e, q) = piece[static_cast<std::size_t>(e)];
      }
    }
    c.assembled = true;
  }
  low_rank_term<T> term(const cache_type& c) const { return {c.a.view(), c.b.view(), nullptr, nullptr, nullptr, T{1}}; }

  // ---- additive_adapter hooks ------------------------------------------------------------------
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& c) const {
    assemble(c);
    low_rank::add(term(c), x, y, c.lr);
  }
  kernels::low_rank_epilogue<T> tile_epilogue(matrix_view<const T> x, cache_type& c) const {
    assemble(c);
    low_rank::project(term(c), x, c.lr);
    return low_rank::epilogue(term(c), c.lr);
  }
  /// dx += g B A; with logits: dA = (g B)^T x, dB = g^T (x A^T) through the top-k softmax into
  /// the logits (the k selected entries only) and the bank (accumulated).
  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& c) {
    if (!c.assembled) assemble(c);
    if (topk_only_) {
      low_rank::backward(term(c), low_rank_gradients<T>{}, x, g, dx, c.lr);
      return;
    }
    matrix<T> da(rank_, in_), db(out_, rank_);
    low_rank::backward(term(c), low_rank_gradients<T>{da.view(), db.view()}, x, g, dx, c.lr);
    const index k = topk_, len = vector_length(), ti = in_ / len, pa = pieces_a();
    std::vector<T> gp(static_cast<std::size_t>(len)), dw(static_cast<std::size_t>(k));
    for (index s = 0; s < pa + pieces_b(); ++s) {
      const T* gs;  // dL/d piece
      if (s < pa) {
        gs = da.row(s / ti) + (s % ti) * len;
      } else {
        const index t = (s - pa) / rank_, q = (s - pa) % rank_;
        for (index e = 0; e < len; ++e) gp[static_cast<std::size_t>(e)] = db(t * len + e, q);
        gs = gp.data();
      }
      const index* top = c.idx.data() + s * k;
      const T* wt = c.w.data() + s * k;
      T mean = T{0};  // sum_q w_q dw_q
      for (index q = 0; q < k; ++q) {
        const T* v = bank_->value.row(top[q]);
        T* gv = bank_->grad.row(top[q]);
        T d = T{0};
        for (index e = 0; e < len; ++e) {
          d += gs[e] * v[e];
          gv[e] += wt[q] * gs[e];  // dV[top_q] += w_q dpiece
        }
        dw[static_cast<std::size_t>(q)] = d;
        mean += wt[q] * d;
      }
      T* gl = s < pa ? ga_.row(s) : gb_.row(s - pa);
      for (index q = 0; q < k; ++q) gl[top[q]] += wt[q] * (dw[static_cast<std::size_t>(q)] - mean);  // softmax
    }
  }

  std::shared_ptr<vblora_vector_bank<T>> bank_;  // (num_vectors, L), shared
  index in_ = 0;
  index out_ = 0;
  index rank_ = 0;
  index topk_ = 0;
  double init_logits_std_ = 0.1;
  bool topk_only_ = false;
  matrix<T> logits_a_;  // (r * in / L, num_vectors)
  matrix<T> logits_b_;  // (out / L * r, num_vectors)
  matrix<T> ga_;        // gradients, same shapes
  matrix<T> gb_;
  matrix<T> sel_idx_;   // top-k form: (pieces, topk) bank indices, pieces of A then B
  matrix<T> sel_w_;     // top-k form: (pieces, topk) softmax weights
};

}  // namespace peft
