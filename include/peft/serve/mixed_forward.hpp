// peft/serve/mixed_forward.hpp — one frozen base product for a batch whose rows use different
// adapters (SGMV/BGMV-style serving, after Punica and S-LoRA).
//
//   y_i = x_i W0^T + b0 + sum over the groups g holding row i of  f_{g,i} term_g(x_i)
//
//   groups[0] = peft::serve::group_of(a, {0, 3, 5}, {1, 1, 0.5f});   // rows 0, 3, 5 use a
//   peft::serve::mixed_forward(base, x, y, groups);                  // others: the base alone
//
// Low-rank groups join the base product's tiles; other methods run per group through add_term.
// looped_forward is the one-forward-per-group baseline. Thread safety: reads the base and the
// adapters only. Errors: shape_error / peft::error before anything is written.
// Details: docs/serving.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/interop/eigen.hpp"
#include "peft/kernels/epilogue.hpp"
#include "peft/kernels/gemm.hpp"
#include "peft/adapters/detail/low_rank_core.hpp"
#include "peft/adapters/variant_adapter.hpp"
#include "peft/kernels/low_rank_epilogue.hpp"

namespace peft::serve {

/// One adapter's share of a mixed batch.
template <class Adapter>
struct batch_group {
  using scalar = typename Adapter::scalar;
  const Adapter* adapter = nullptr;                    // applied through add_term unless low_rank is set
  std::optional<low_rank_term<scalar>> low_rank;       // set: the grouped low-rank path
  std::vector<index> rows;                             // distinct rows of the batch, any order
  std::vector<scalar> factors;                         // one per row: multiplies the row's term
};

/// The low-rank term of an adapter whose method has one (the alternative's, for a variant),
/// else nullopt. It views the adapter's tensors: valid while the adapter lives unchanged.
template <class A>
std::optional<low_rank_term<typename A::scalar>> low_rank_of(const A& a) {
  if constexpr (requires { a.visit([](const auto&) {}); }) {
    return a.visit([](const auto& alt) { return low_rank_of(alt); });
  } else if constexpr (requires { { a.low_rank() } -> std::same_as<low_rank_term<typename A::scalar>>; }) {
    return a.low_rank();
  } else {
    return std::nullopt;
  }
}

/// A group for `a` over `rows` with their `factors`, on the low-rank path when the method has one.
template <class Adapter>
batch_group<Adapter> group_of(const Adapter& a, std::vector<index> rows, std::vector<typename Adapter::scalar> factors) {
  return {&a, low_rank_of(a), std::move(rows), std::move(factors)};
}

namespace detail {

/// A run of consecutive rows (in group order) of one group.
struct run {
  index first = 0;   // position in the grouped batch
  index count = 0;
  std::size_t group = 0;
  std::size_t start = 0;  // index into the group's rows/factors of its first row
};

template <class Adapter, class Base>
void check_groups(const char* where, const Base& base, matrix_view<const typename Adapter::scalar> x,
                  matrix_view<typename Adapter::scalar> y, std::span<const batch_group<Adapter>> groups) {
  peft::detail::expect_shape(where, "x", x, x.rows(), base.in_features());
  peft::detail::expect_shape(where, "y", y, x.rows(), base.out_features());
  std::vector<std::size_t> seen(static_cast<std::size_t>(x.rows()), 0);
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const auto& grp = groups[g];
    const std::string which = "group " + std::to_string(g);
    if (grp.rows.size() != grp.factors.size()) {
      peft::detail::raise<shape_error>(where, which + " has " + std::to_string(grp.rows.size()) + " rows but " +
                                                  std::to_string(grp.factors.size()) + " factors");
    }
    if (grp.low_rank) {
      const auto& f = *grp.low_rank;
      if (f.in_features() != base.in_features() || f.out_features() != base.out_features() || f.b.cols() != f.rank()) {
        peft::detail::raise<shape_error>(where, which + ": low-rank term " +
                                                    peft::detail::shape_string(f.out_features(), f.in_features()) +
                                                    " does not fit the base " +
                                                    peft::detail::shape_string(base.out_features(), base.in_features()));
      }
    } else if (grp.adapter == nullptr) {
      peft::detail::raise<error>(where, which + " has neither an adapter nor a low-rank term");
    } else if (grp.adapter->in_features() != base.in_features() || grp.adapter->out_features() != base.out_features()) {
      peft::detail::raise<shape_error>(where, which + ": adapter " +
                                                  peft::detail::shape_string(grp.adapter->out_features(), grp.adapter->in_features()) +
                                                  " does not fit the base " +
                                                  peft::detail::shape_string(base.out_features(), base.in_features()));
    }
    for (std::size_t k = 0; k < grp.rows.size(); ++k) {
      const index r = grp.rows[k];
      if (r < 0 || r >= x.rows()) {
        peft::detail::raise<shape_error>(where, which + " names row " + std::to_string(r) + " of a batch of " +
                                                    std::to_string(x.rows()));
      }
      if (seen[static_cast<std::size_t>(r)] == g + 1) {
        peft::detail::raise<error>(where, which + " names row " + std::to_string(r) + " twice");
      }
      seen[static_cast<std::size_t>(r)] = g + 1;
      if (!std::isfinite(static_cast<double>(grp.factors[k]))) {
        peft::detail::raise<error>(where, which + " has a non-finite factor for row " + std::to_string(r));
      }
    }
  }
}

/// order[p] = the batch row placed at position p: stable by the first group holding the row,
/// rows in no group first.
template <class Adapter>
std::vector<index> group_order(index batch, std::span<const batch_group<Adapter>> groups) {
  std::vector<std::size_t> key(static_cast<std::size_t>(batch), 0);
  for (std::size_t g = groups.size(); g-- > 0;) {
    for (index r : groups[g].rows) key[static_cast<std::size_t>(r)] = g + 1;
  }
  std::vector<index> order(static_cast<std::size_t>(batch));
  std::iota(order.begin(), order.end(), index{0});
  std::stable_sort(order.begin(), order.end(), [&](index a, index b) {
    return key[static_cast<std::size_t>(a)] < key[static_cast<std::size_t>(b)];
  });
  return order;
}

/// The runs of each group in grouped positions; each group's rows/factors are re-sorted by
/// position into `sorted` (index pairs into the group's vectors).
template <class Adapter>
std::vector<run> group_runs(std::span<const batch_group<Adapter>> groups, const std::vector<index>& position,
                            std::vector<std::vector<std::size_t>>& sorted) {
  std::vector<run> runs;
  sorted.assign(groups.size(), {});
  for (std::size_t g = 0; g < groups.size(); ++g) {
    auto& s = sorted[g];
    s.resize(groups[g].rows.size());
    std::iota(s.begin(), s.end(), std::size_t{0});
    std::sort(s.begin(), s.end(), [&](std::size_t a, std::size_t b) {
      return position[static_cast<std::size_t>(groups[g].rows[a])] < position[static_cast<std::size_t>(groups[g].rows[b])];
    });
    for (std::size_t k = 0; k < s.size();) {
      run rn{position[static_cast<std::size_t>(groups[g].rows[s[k]])], 1, g, k};
      while (k + static_cast<std::size_t>(rn.count) < s.size() &&
             position[static_cast<std::size_t>(groups[g].rows[s[k + static_cast<std::size_t>(rn.count)]])] ==
                 rn.first + rn.count) {
        ++rn.count;
      }
      k += static_cast<std::size_t>(rn.count);
      runs.push_back(rn);
    }
  }
  return runs;
}

}  // namespace detail

/// y = the base product of x plus each group's term on its rows (see the file comment).
/// x (batch, in), y (batch, out); y is overwritten.
template <base_weight Base, class Adapter>
void mixed_forward(const Base& base, matrix_view<const typename Adapter::scalar> x,
                   matrix_view<typename Adapter::scalar> y, std::span<const batch_group<Adapter>> groups) {
  using T = typename Adapter::scalar;
  constexpr const char* where = "serve::mixed_forward";
  detail::check_groups<Adapter>(where, base, x, y, groups);
  const index m = x.rows();
  if (m == 0) return;

  const std::vector<index> order = detail::group_order<Adapter>(m, groups);
  bool identity = true;
  for (index p = 0; p < m; ++p) identity = identity && order[static_cast<std::size_t>(p)] == p;
  std::vector<index> position(static_cast<std::size_t>(m));
  for (index p = 0; p < m; ++p) position[static_cast<std::size_t>(order[static_cast<std::size_t>(p)])] = p;

  // The batch in group order (a copy only when the rows are not grouped already).
  matrix<T> xg, yg;
  matrix_view<const T> xp = x;
  matrix_view<T> yp = y;
  if (!identity) {
    xg = matrix<T>(m, x.cols());
    yg = matrix<T>(m, y.cols());
    for (index p = 0; p < m; ++p) {
      const T* src = x.row(order[static_cast<std::size_t>(p)]);
      std::copy(src, src + x.cols(), xg.row(p));
    }
    xp = xg.view();
    yp = yg.view();
  }

  std::vector<std::vector<std::size_t>> sorted;
  const std::vector<detail::run> runs = detail::group_runs<Adapter>(groups, position, sorted);

  // Shrink: p_run = diag(f s) (x_run A^T * c) for the low-rank runs, through the core; f s per
  // row also scales the bias.
  struct low_rank_run {
    detail::run where;
    low_rank_term<T> term;
    low_rank_cache<T> cache;  // t, p of the run
    std::vector<T> factors;   // f s per row
  };
  std::vector<low_rank_run> lr;
  for (const auto& rn : runs) {
    const auto& grp = groups[rn.group];
    if (!grp.low_rank) continue;
    low_rank_run l{rn, *grp.low_rank, {}, {}};
    low_rank::project(l.term, xp.block(rn.first, 0, rn.count, xp.cols()), l.cache);
    matrix<T>& p = l.term.c != nullptr ? l.cache.p : l.cache.t;
    for (index i = 0; i < rn.count; ++i) {
      const T f = grp.factors[sorted[rn.group][rn.start + static_cast<std::size_t>(i)]] * l.term.scale;
      l.factors.push_back(f);
      T* row = p.row(i);
      for (index q = 0; q < p.cols(); ++q) row[q] *= f;
    }
    lr.push_back(std::move(l));
  }
  std::sort(lr.begin(), lr.end(), [](const low_rank_run& a, const low_rank_run& b) { return a.where.first < b.where.first; });

  // One base product; the core's epilogue expands each low-rank run into the tiles it covers.
  auto expand = [&lr](index i0, index j0, matrix_view<T> tile) {
    const index i1 = i0 + tile.rows();
    for (const auto& l : lr) {
      if (l.where.first >= i1) break;
      const index a = std::max(i0, l.where.first), b = std::min(i1, l.where.first + l.where.count);
      if (a >= b) continue;
      kernels::low_rank_epilogue<T> e;
      e.p = l.cache.projected(l.term).block(a - l.where.first, 0, b - a, l.term.rank());
      e.b = l.term.b;
      e.col = l.term.lambda;
      e.bias = l.term.bias;
      e.bias_row = l.factors.data() + (a - l.where.first);
      e(0, j0, tile.block(a - i0, 0, b - a, tile.cols()));
    }
  };
  if constexpr (fused_base_weight<Base, T>) {
    base.matmul(xp, yp, expand);
  } else {
    base.matmul(xp, yp);
    expand(0, 0, yp);
  }

  // The groups without a low-rank term, run by run: y_run += f (add_term(x_run, h = y_run) - h).
  for (const auto& rn : runs) {
    const auto& grp = groups[rn.group];
    if (grp.low_rank) continue;
    const matrix_view<T> yr = yp.block(rn.first, 0, rn.count, yp.cols());
    const matrix<T> h = to_matrix(matrix_view<const T>(yr));
    matrix<T> out = h;
    typename Adapter::cache_type cache{};
    grp.adapter->add_term(base, xp.block(rn.first, 0, rn.count, xp.cols()), h.view(), out.view(), cache);
    for (index i = 0; i < rn.count; ++i) {
      const T f = grp.factors[sorted[rn.group][rn.start + static_cast<std::size_t>(i)]];
      T* dst = yr.row(i);
      const T* o = out.row(i);
      const T* hh = h.row(i);
      if (f == T{1}) {
        std::copy(o, o + yr.cols(), dst);
      } else {
        for (index j = 0; j < yr.cols(); ++j) dst[j] += f * (o[j] - hh[j]);
      }
    }
  }

  if (!identity) {
    for (index p = 0; p < m; ++p) {
      const T* src = yg.row(p);
      std::copy(src, src + y.cols(), y.row(order[static_cast<std::size_t>(p)]));
    }
  }
}

template <base_weight Base, class Adapter>
void mixed_forward(const Base& base, matrix_view<const typename Adapter::scalar> x,
                   matrix_view<typename Adapter::scalar> y, const std::vector<batch_group<Adapter>>& groups) {
  mixed_forward(base, x, y, std::span<const batch_group<Adapter>>(groups));
}

/// The baseline: for each group, its rows gathered into a sub-batch, one full forward (the
/// adapter's own, fused where it has one) and the rows scattered back; rows in no group get the
/// base product of their own sub-batch. Groups must be disjoint. Same result as mixed_forward.
template <base_weight Base, class Adapter>
void looped_forward(const Base& base, matrix_view<const typename Adapter::scalar> x,
                    matrix_view<typename Adapter::scalar> y, std::span<const batch_group<Adapter>> groups) {
  using T = typename Adapter::scalar;
  constexpr const char* where = "serve::looped_forward";
  detail::check_groups<Adapter>(where, base, x, y, groups);
  std::vector<char> used(static_cast<std::size_t>(x.rows()), 0);
  for (const auto& grp : groups) {
    for (index r : grp.rows) {
      if (used[static_cast<std::size_t>(r)] != 0) peft::detail::raise<error>(where, "row " + std::to_string(r) + " is in two groups");
      used[static_cast<std::size_t>(r)] = 1;
    }
  }
  auto gather = [&](const std::vector<index>& rows) {
    matrix<T> xs(static_cast<index>(rows.size()), x.cols());
    for (std::size_t k = 0; k < rows.size(); ++k) std::copy(x.row(rows[k]), x.row(rows[k]) + x.cols(), xs.row(static_cast<index>(k)));
    return xs;
  };
  auto scatter = [&](const std::vector<index>& rows, const matrix<T>& ys) {
    for (std::size_t k = 0; k < rows.size(); ++k) {
      std::copy(ys.row(static_cast<index>(k)), ys.row(static_cast<index>(k)) + y.cols(), y.row(rows[k]));
    }
  };
  std::vector<index> rest;
  for (index r = 0; r < x.rows(); ++r) {
    if (used[static_cast<std::size_t>(r)] == 0) rest.push_back(r);
  }
  if (!rest.empty()) {
    const matrix<T> xs = gather(rest);
    matrix<T> ys(xs.rows(), y.cols());
    base.matmul(xs.view(), ys.view());
    scatter(rest, ys);
  }
  for (const auto& grp : groups) {
    if (grp.rows.empty()) continue;
    const matrix<T> xs = gather(grp.rows);
    matrix<T> ys(xs.rows(), y.cols());
    typename Adapter::cache_type cache{};
    const bool unit = std::all_of(grp.factors.begin(), grp.factors.end(), [](T f) { return f == T{1}; });
    if (grp.adapter != nullptr && unit) {
      grp.adapter->forward(base, xs.view(), ys.view(), cache);
    } else {
      // A scaled term: h + f (forward - h) row by row (a term alone is applied unfused).
      matrix<T> h(xs.rows(), y.cols());
      base.matmul(xs.view(), h.view());
      ys = h;
      if (grp.adapter != nullptr) {
        grp.adapter->forward(base, xs.view(), ys.view(), cache);
      } else {
        low_rank_cache<T> cache_lr;
        low_rank::add(*grp.low_rank, matrix_view<const T>(xs.view()), ys.view(), cache_lr);
      }
      for (index i = 0; i < ys.rows(); ++i) {
        const T fi = grp.factors[static_cast<std::size_t>(i)];
        for (index j = 0; j < ys.cols(); ++j) ys(i, j) = h(i, j) + fi * (ys(i, j) - h(i, j));
      }
    }
    scatter(grp.rows, ys);
  }
}

template <base_weight Base, class Adapter>
void looped_forward(const Base& base, matrix_view<const typename Adapter::scalar> x,
                    matrix_view<typename Adapter::scalar> y, const std::vector<batch_group<Adapter>>& groups) {
  looped_forward(base, x, y, std::span<const batch_group<Adapter>>(groups));
}

}  // namespace peft::serve
