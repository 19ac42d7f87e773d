// peft/kernels/reference/attention.hpp — the scalar truth of kernels/attention.hpp: softmax
// attention of one head, with each query's whole row of probabilities formed and every sum in
// double. Same signatures as the blocked kernels; the tests hold those to these.
//
//   kernels::attention_problem<float> p{...};            // one head of one sequence
//   kernels::reference::attention_forward(p, out, ldo, lse, 1);
//   kernels::reference::attention_backward(p, out, ldo, dout, ldo, lse, 1, dq, ldq, dk, dv, ldkv);
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "peft/core/matrix_view.hpp"

namespace peft::kernels {

/// One head of one sequence: nq queries against nk keys and values, each a row of head_dim
/// values at its stride. Key j is visible to query i when kpos[j] <= qpos[i] and, with a sliding
/// window (window > 0), qpos[i] - kpos[j] < window: causal attention over positions, so padding
/// removed from a batch (gaps in the positions) and a key/value cache (queries after nk - nq
/// cached keys) are both expressed by the positions. Scores are scale * q . k.
template <class T>
struct attention_problem {
  index nq = 0, nk = 0, head_dim = 0;
  const T* q = nullptr;
  index ldq = 0;
  const T* k = nullptr;
  const T* v = nullptr;
  index ldkv = 0;
  const index* qpos = nullptr;
  const index* kpos = nullptr;
  index window = 0;
  double scale = 1.0;

  bool visible(index i, index j) const noexcept {
    return kpos[j] <= qpos[i] && (window <= 0 || qpos[i] - kpos[j] < window);
  }
};

namespace reference {

/// out (nq, head_dim) = softmax(scale q k^T, masked) v; lse[i * ldlse] = log sum_j exp(score_ij),
/// -inf for a query that sees no key (its output row is zero).
template <class T>
void attention_forward(const attention_problem<T>& p, T* out, index ldo, T* lse, index ldlse) {
  std::vector<double> s(static_cast<std::size_t>(p.nk));
  for (index i = 0; i < p.nq; ++i) {
    const T* qi = p.q + i * p.ldq;
    double m = -std::numeric_limits<double>::infinity();
    for (index j = 0; j < p.nk; ++j) {
      if (!p.visible(i, j)) continue;
      const T* kj = p.k + j * p.ldkv;
      double dot = 0;
      for (index d = 0; d < p.head_dim; ++d) dot += static_cast<double>(qi[d]) * static_cast<double>(kj[d]);
      s[static_cast<std::size_t>(j)] = dot * p.scale;
      m = std::max(m, s[static_cast<std::size_t>(j)]);
    }
    T* oi = out + i * ldo;
    std::fill(oi, oi + p.head_dim, T{0});
    if (m == -std::numeric_limits<double>::infinity()) {
      lse[i * ldlse] = static_cast<T>(m);
      continue;
    }
    double sum = 0;
    for (index j = 0; j < p.nk; ++j) {
      if (p.visible(i, j)) sum += std::exp(s[static_cast<std::size_t>(j)] - m);
    }
    std::vector<double> acc(static_cast<std::size_t>(p.head_dim), 0.0);
    for (index j = 0; j < p.nk; ++j) {
      if (!p.visible(i, j)) continue;
      const double pij = std::exp(s[static_cast<std::size_t>(j)] - m) / sum;
      const T* vj = p.v + j * p.ldkv;
      for (index d = 0; d < p.head_dim; ++d) acc[static_cast<std::size_t>(d)] += pij * static_cast<double>(vj[d]);
    }
    for (index d = 0; d < p.head_dim; ++d) oi[d] = static_cast<T>(acc[static_cast<std::size_t>(d)]);
    lse[i * ldlse] = static_cast<T>(m + std::log(sum));
  }
}

/// Adds the gradients of the forward above to dq (nq, head_dim), dk and dv (nk, head_dim), given
/// dout and the forward's out and lse. Accumulates: heads sharing a key/value head (grouped-query
/// attention) add into the same dk, dv.
template <class T>
void attention_backward(const attention_problem<T>& p, const T* out, index ldo, const T* dout, index lddo,
                        const T* lse, index ldlse, T* dq, index lddq, T* dk, T* dv, index lddkv) {
  const index hd = p.head_dim;
  for (index i = 0; i < p.nq; ++i) {
    const double l = static_cast<double>(lse[i * ldlse]);
    if (!std::isfinite(l)) continue;
    const T* qi = p.q + i * p.ldq;
    const T* doi = dout + i * lddo;
    const T* oi = out + i * ldo;
    double rowdot = 0;  // sum_j P_ij dP_ij = dout_i . out_i
    for (index d = 0; d < hd; ++d) rowdot += static_cast<double>(doi[d]) * static_cast<double>(oi[d]);
    for (index j = 0; j < p.nk; ++j) {
      if (!p.visible(i, j)) continue;
      const T* kj = p.k + j * p.ldkv;
      const T* vj = p.v + j * p.ldkv;
      double dot = 0, dpv = 0;
      for (index d = 0; d < hd; ++d) {
        dot += static_cast<double>(qi[d]) * static_cast<double>(kj[d]);
        dpv += static_cast<double>(doi[d]) * static_cast<double>(vj[d]);
      }
      const double pij = std::exp(dot * p.scale - l);
      const double ds = pij * (dpv - rowdot) * p.scale;
      T* dvj = dv + j * lddkv;
      T* dkj = dk + j * lddkv;
      T* dqi = dq + i * lddq;
      for (index d = 0; d < hd; ++d) {
        dvj[d] = static_cast<T>(static_cast<double>(dvj[d]) + pij * static_cast<double>(doi[d]));
        dkj[d] = static_cast<T>(static_cast<double>(dkj[d]) + ds * static_cast<double>(qi[d]));
        dqi[d] = static_cast<T>(static_cast<double>(dqi[d]) + ds * static_cast<double>(kj[d]));
      }
    }
  }
}

}  // namespace reference
}  // namespace peft::kernels
