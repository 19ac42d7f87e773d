// peft/kernels/attention.hpp — softmax attention of one head, forward and backward, in blocks:
// no more than one block of scores (block_q x block_k) exists at a time.
//
//   kernels::attention_problem<float> p{...};    // kernels/reference/attention.hpp defines it
//   kernels::attention_workspace<float> ws;      // reused across calls of one thread
//   kernels::attention_forward(p, out, ldo, lse, ldlse, ws);
//   kernels::attention_backward(p, out, ldo, dout, lddo, lse, ldlse, dq, lddq, dk, dv, lddkv, ws);
//
// Forward: for each block of queries, the blocks of keys it can see one after another with the
// online softmax (a running maximum and sum per query, the partial output rescaled when the
// maximum grows); it returns the output and, per query, lse = log sum exp(scores), which is all
// the backward needs to form the probabilities again. Backward: for each pair of blocks the
// scores and probabilities are recomputed from lse, and dv += P^T dout, dP = dout v^T,
// dS = P (dP - rowsum(dout * out)) scale, dq += dS k, dk += dS^T q. Blocks that the mask hides
// entirely (causal, sliding window) are skipped. The products of a block are the f32 blocks of
// kernels/linear.hpp on the active ISA (double: plain loops), so the scores cost what a product
// costs. Threads are the caller's: one call is one head of one sequence.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <vector>

#include <xsimd/xsimd.hpp>

#include "peft/core/matrix_view.hpp"
#include "peft/kernels/linear.hpp"
#include "peft/kernels/reference/attention.hpp"

namespace peft::kernels {

/// Queries and keys per block.
inline constexpr index attention_block_q = 64;
inline constexpr index attention_block_k = 64;

/// Scratch of one thread: a few blocks; grows to the largest head_dim seen and is then reused.
template <class T>
struct attention_workspace {
  std::vector<T> s, p, t, acc, rowmax;
  std::vector<double> rowsum;
  std::vector<T> rowdot;  // backward: dout_i . out_i for every query (grown to the longest seen)

  void reserve(index head_dim) {
    const auto bq = static_cast<std::size_t>(attention_block_q), bk = static_cast<std::size_t>(attention_block_k);
    s.resize(bq * bk);
    p.resize(bq * bk);
    t.resize(bq * bk);
    acc.resize(bq * static_cast<std::size_t>(head_dim));
    rowmax.resize(bq);
    rowsum.resize(bq);
  }
};

namespace detail {

/// y (m, n) = x (m, k) w (n, k)^T.
template <class T>
void attention_nt(const T* x, index ldx, index m, const T* w, index ldw, index n, index k, T* y, index ldy) {
  if constexpr (std::is_same_v<T, float>) {
    block_nt_table[active_isa()](x, ldx, m, w, ldw, n, k, y, ldy);
  } else {
    for (index i = 0; i < m; ++i) {
      for (index j = 0; j < n; ++j) {
        T s{0};
        for (index d = 0; d < k; ++d) s += x[i * ldx + d] * w[j * ldw + d];
        y[i * ldy + j] = s;
      }
    }
  }
}

/// y (m, cols) += x (m, n) w (n, cols).
template <class T>
void attention_nn(const T* x, index ldx, index m, const T* w, index ldw, index n, index cols, T* y, index ldy) {
  if constexpr (std::is_same_v<T, float>) {
    block_nn_table[active_isa()](x, ldx, m, w, ldw, n, cols, y, ldy, true);
  } else {
    for (index i = 0; i < m; ++i) {
      T* yi = y + i * ldy;
      for (index j = 0; j < n; ++j) {
        const T a = x[i * ldx + j];
        if (a == T{0}) continue;
        const T* wj = w + j * ldw;
        for (index c = 0; c < cols; ++c) yi[c] += a * wj[c];
      }
    }
  }
}

/// t (n, m) = s (m, n)^T, s with row stride lds.
template <class T>
void attention_transpose(const T* s, index lds, index m, index n, T* t) {
  for (index i = 0; i < m; ++i)
    for (index j = 0; j < n; ++j) t[j * m + i] = s[i * lds + j];
}

/// out[j] = exp(a[j] * mul - shift) for j < n (a[j] = -inf gives 0); returns the sum in double.
/// f32 in xsimd vectors of the build's architecture (exp is half an attention block's work).
template <class T>
double attention_exp(const T* a, T mul, T shift, T* out, index n) {
  index j = 0;
  double sum = 0;
  if constexpr (std::is_same_v<T, float>) {
    using batch = xsimd::batch<float>;
    constexpr index w = static_cast<index>(batch::size);
    const batch vm(mul), vs(shift);
    batch acc(0.0f);
    for (; j + w <= n; j += w) {
      const batch e = xsimd::exp(xsimd::fms(batch::load_unaligned(a + j), vm, vs));
      e.store_unaligned(out + j);
      acc += e;
    }
    sum = static_cast<double>(xsimd::hadd(acc));
  }
  for (; j < n; ++j) {
    out[j] = std::exp(a[j] * mul - shift);
    sum += static_cast<double>(out[j]);
  }
  return sum;
}

/// Whether any key of [j0, j0 + nk) is visible to any query of [i0, i0 + nq).
template <class T>
bool attention_block_visible(const attention_problem<T>& p, index i0, index nq, index j0, index nk) {
  index qmin = p.qpos[i0], qmax = qmin, kmin = p.kpos[j0], kmax = kmin;
  for (index i = i0; i < i0 + nq; ++i) {
    qmin = std::min(qmin, p.qpos[i]);
    qmax = std::max(qmax, p.qpos[i]);
  }
  for (index j = j0; j < j0 + nk; ++j) {
    kmin = std::min(kmin, p.kpos[j]);
    kmax = std::max(kmax, p.kpos[j]);
  }
  return kmin <= qmax && (p.window <= 0 || qmin - kmax < p.window);
}

}  // namespace detail

/// out (nq, head_dim) = softmax(scale q k^T, masked) v and lse[i * ldlse] = log sum_j exp(score_ij)
/// (-inf, with a zero output row, for a query that sees no key).
template <class T>
void attention_forward(const attention_problem<T>& p, T* out, index ldo, T* lse, index ldlse,
                       attention_workspace<T>& ws) {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const index hd = p.head_dim, BK = attention_block_k;
  const T scale = static_cast<T>(p.scale);
  ws.reserve(hd);
  for (index i0 = 0; i0 < p.nq; i0 += attention_block_q) {
    const index bq = std::min(attention_block_q, p.nq - i0);
    std::fill(ws.acc.begin(), ws.acc.begin() + bq * hd, T{0});
    std::fill(ws.rowmax.begin(), ws.rowmax.begin() + bq, neg_inf);
    std::fill(ws.rowsum.begin(), ws.rowsum.begin() + bq, 0.0);
    for (index j0 = 0; j0 < p.nk; j0 += BK) {
      const index bk = std::min(BK, p.nk - j0);
      if (!detail::attention_block_visible(p, i0, bq, j0, bk)) continue;
      detail::attention_nt(p.q + i0 * p.ldq, p.ldq, bq, p.k + j0 * p.ldkv, p.ldkv, bk, hd, ws.s.data(), BK);
      for (index i = 0; i < bq; ++i) {
        T* si = ws.s.data() + i * BK;
        T* pi = ws.p.data() + i * BK;
        T bmax = neg_inf;
        for (index j = 0; j < bk; ++j) {
          si[j] = p.visible(i0 + i, j0 + j) ? si[j] * scale : neg_inf;
          bmax = std::max(bmax, si[j]);
        }
        if (bmax == neg_inf) {
          std::fill(pi, pi + bk, T{0});
          continue;
        }
        T& m = ws.rowmax[static_cast<std::size_t>(i)];
        const T mnew = std::max(m, bmax);
        const T alpha = std::exp(m - mnew);  // 0 while the row had no visible key
        const double sum = detail::attention_exp(si, T{1}, mnew, pi, bk);
        double& l = ws.rowsum[static_cast<std::size_t>(i)];
        if (alpha != T{1}) {
          l *= static_cast<double>(alpha);
          T* ai = ws.acc.data() + i * hd;
          for (index d = 0; d < hd; ++d) ai[d] *= alpha;
        }
        l += sum;
        m = mnew;
      }
      detail::attention_nn(ws.p.data(), BK, bq, p.v + j0 * p.ldkv, p.ldkv, bk, hd, ws.acc.data(), hd);
    }
    for (index i = 0; i < bq; ++i) {
      const double l = ws.rowsum[static_cast<std::size_t>(i)];
      T* oi = out + (i0 + i) * ldo;
      const T* ai = ws.acc.data() + i * hd;
      if (l > 0) {
        const T inv = static_cast<T>(1.0 / l);
        for (index d = 0; d < hd; ++d) oi[d] = ai[d] * inv;
        lse[(i0 + i) * ldlse] = static_cast<T>(static_cast<double>(ws.rowmax[static_cast<std::size_t>(i)]) + std::log(l));
      } else {
        std::fill(oi, oi + hd, T{0});
        lse[(i0 + i) * ldlse] = neg_inf;
      }
    }
  }
}

/// Adds the gradients of attention_forward to dq (nq, head_dim), dk and dv (nk, head_dim), from
/// dout and the forward's out and lse. Accumulates: the heads of one key/value head (grouped-query
/// attention) add into the same dk, dv.
template <class T>
void attention_backward(const attention_problem<T>& p, const T* out, index ldo, const T* dout, index lddo,
                        const T* lse, index ldlse, T* dq, index lddq, T* dk, T* dv, index lddkv,
                        attention_workspace<T>& ws) {
  const index hd = p.head_dim, BK = attention_block_k, BQ = attention_block_q;
  const T scale = static_cast<T>(p.scale);
  ws.reserve(hd);
  // rowdot_i = dout_i . out_i (= sum_j P_ij dP_ij), for every query.
  if (ws.rowdot.size() < static_cast<std::size_t>(p.nq)) ws.rowdot.resize(static_cast<std::size_t>(p.nq));
  std::vector<T>& rowdot = ws.rowdot;
  for (index i = 0; i < p.nq; ++i) {
    double s = 0;
    for (index d = 0; d < hd; ++d) s += static_cast<double>(dout[i * lddo + d]) * static_cast<double>(out[i * ldo + d]);
    rowdot[static_cast<std::size_t>(i)] = static_cast<T>(s);
  }
  for (index j0 = 0; j0 < p.nk; j0 += BK) {
    const index bk = std::min(BK, p.nk - j0);
    const T* kb = p.k + j0 * p.ldkv;
    const T* vb = p.v + j0 * p.ldkv;
    for (index i0 = 0; i0 < p.nq; i0 += BQ) {
      const index bq = std::min(BQ, p.nq - i0);
      if (!detail::attention_block_visible(p, i0, bq, j0, bk)) continue;
      const T* qb = p.q + i0 * p.ldq;
      const T* dob = dout + i0 * lddo;
      // P (bq, bk) from the scores and lse; dP = dout v^T in ws.s.
      detail::attention_nt(qb, p.ldq, bq, kb, p.ldkv, bk, hd, ws.p.data(), BK);
      for (index i = 0; i < bq; ++i) {
        T* pi = ws.p.data() + i * BK;
        const T l = lse[(i0 + i) * ldlse];
        if (!std::isfinite(static_cast<double>(l))) {
          std::fill(pi, pi + bk, T{0});
          continue;
        }
        for (index j = 0; j < bk; ++j) {
          if (!p.visible(i0 + i, j0 + j)) pi[j] = -std::numeric_limits<T>::infinity();
        }
        detail::attention_exp(pi, scale, l, pi, bk);
      }
      detail::attention_nt(dob, lddo, bq, vb, p.ldkv, bk, hd, ws.s.data(), BK);
      // dv += P^T dout
      detail::attention_transpose(ws.p.data(), BK, bq, bk, ws.t.data());
      detail::attention_nn(ws.t.data(), bq, bk, dob, lddo, bq, hd, dv + j0 * lddkv, lddkv);
      // dS = P (dP - rowdot) scale, in ws.s
      for (index i = 0; i < bq; ++i) {
        const T* pi = ws.p.data() + i * BK;
        T* si = ws.s.data() + i * BK;
        const T r = rowdot[static_cast<std::size_t>(i0 + i)];
        for (index j = 0; j < bk; ++j) si[j] = pi[j] == T{0} ? T{0} : pi[j] * (si[j] - r) * scale;
      }
      // dq += dS k; dk += dS^T q
      detail::attention_nn(ws.s.data(), BK, bq, kb, p.ldkv, bk, hd, dq + i0 * lddq, lddq);
      detail::attention_transpose(ws.s.data(), BK, bq, bk, ws.t.data());
      detail::attention_nn(ws.t.data(), bq, bk, qb, p.ldq, bq, hd, dk + j0 * lddkv, lddkv);
    }
  }
}

}  // namespace peft::kernels
