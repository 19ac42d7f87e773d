// peft/train/shira_masks.hpp — SHiRA's masks: which K entries of a frozen weight W0 (d_out, d_in)
// an adapter trains (Bhardwaj et al., "Sparse High Rank Adapters", NeurIPS 2024, §3.1, App. B).
//
//   auto idx = peft::shira_weight_magnitude_mask(base, k);        // top-K |W0|
//   peft::shira_gradient_accumulator<float> acc(d_in, d_out);     // for (batch) acc.add(x, dy);
//   auto idx = peft::shira_snip_mask(base, acc.gradient(), k);    // top-K |W0 * G|
//   peft::shira<float> a(d_in, d_out, std::move(idx));            // zero values: the identity
//   (also shira_gradient_mask, shira_struct_mask; shira_random_mask is in adapters/detail/)
//
// A mask is (2, K) int32 as PEFT stores shira_indices, K distinct entries sorted row-major; ties
// go to the smaller flat index. shape_error for K outside [0, d_out d_in], format_error for a NaN
// score. PEFT's own random mask (torch.randperm) is not reproduced. Details: docs/training.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "peft/adapters/detail/shira_random_mask.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// Which lines SHiRA-Struct makes trainable besides the diagonal.
enum class shira_struct_lines : std::uint8_t { rows, columns, rows_and_columns };

namespace detail {

struct shira_scored {
  double score;
  std::int64_t pos;
};

/// The selection order: a larger score first, then the smaller flat position.
inline bool shira_ranks_before(const shira_scored& a, const shira_scored& b) noexcept {
  return a.score > b.score || (a.score == b.score && a.pos < b.pos);
}

/// The k entries of largest score; `row_scores(i, out)` writes the d_in scores of row i.
/// A bounded heap: O(d_out d_in log k) time at worst, O(k + d_in) memory.
template <class RowScores>
matrix<std::int32_t> shira_top_k(const char* where, index d_out, index d_in, index k, RowScores&& row_scores) {
  shira_check_request(where, d_out, d_in, k);
  std::vector<shira_scored> heap;  // a max-heap under shira_ranks_before: the top ranks last
  heap.reserve(static_cast<std::size_t>(k));
  std::vector<double> row(static_cast<std::size_t>(d_in));
  for (index i = 0; i < d_out && k > 0; ++i) {
    row_scores(i, row.data());
    for (index j = 0; j < d_in; ++j) {
      const double s = row[static_cast<std::size_t>(j)];
      if (std::isnan(s)) {
        raise<format_error>(where, "the score of entry " + shape_string(i, j) + " is NaN");
      }
      const shira_scored c{s, static_cast<std::int64_t>(i * d_in + j)};
      if (static_cast<index>(heap.size()) < k) {
        heap.push_back(c);
        std::push_heap(heap.begin(), heap.end(), shira_ranks_before);
      } else if (shira_ranks_before(c, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), shira_ranks_before);
        heap.back() = c;
        std::push_heap(heap.begin(), heap.end(), shira_ranks_before);
      }
    }
  }
  std::vector<std::int64_t> pos;
  pos.reserve(heap.size());
  for (const auto& e : heap) pos.push_back(e.pos);
  return shira_positions_to_indices(std::move(pos), d_in);
}

template <class U>
void shira_expect_matrix(const char* where, const char* what, const matrix_view<U>& m) {
  expect_shape(where, what, m, m.rows(), m.cols());
}

}  // namespace detail

/// SHiRA-WM: the K entries of largest |W0| of a weight given as a matrix view (out, in) of any
/// storage scalar.
template <class U>
matrix<std::int32_t> shira_weight_magnitude_mask(matrix_view<U> w, index k) {
  constexpr const char* where = "shira_weight_magnitude_mask";
  detail::shira_expect_matrix(where, "W0", w);
  return detail::shira_top_k(where, w.rows(), w.cols(), k, [&](index i, double* out) {
    for (index j = 0; j < w.cols(); ++j) out[j] = std::abs(convert<double>(w(i, j)));
  });
}

/// SHiRA-WM over a frozen base (dense or quantized): rows are decoded with dequantize_row.
template <base_weight Base>
matrix<std::int32_t> shira_weight_magnitude_mask(const Base& w, index k) {
  return detail::shira_top_k("shira_weight_magnitude_mask", w.out_features(), w.in_features(), k,
                             [&](index i, double* out) {
                               w.dequantize_row(i, out);
                               for (index j = 0; j < w.in_features(); ++j) out[j] = std::abs(out[j]);
                             });
}

/// SHiRA-Grad: the K entries of largest |G|, G (out, in) an accumulated gradient dL/dW0 (see
/// shira_gradient_accumulator).
template <class U>
matrix<std::int32_t> shira_gradient_mask(matrix_view<U> g, index k) {
  constexpr const char* where = "shira_gradient_mask";
  detail::shira_expect_matrix(where, "G", g);
  return detail::shira_top_k(where, g.rows(), g.cols(), k, [&](index i, double* out) {
    for (index j = 0; j < g.cols(); ++j) out[j] = std::abs(convert<double>(g(i, j)));
  });
}

/// SHiRA-SNIP: the K entries of largest |W0 * G| (SNIP's saliency, Lee et al. 2019), elementwise.
template <class U, class V>
matrix<std::int32_t> shira_snip_mask(matrix_view<U> w, matrix_view<V> g, index k) {
  constexpr const char* where = "shira_snip_mask";
  detail::shira_expect_matrix(where, "W0", w);
  detail::expect_shape(where, "G", g, w.rows(), w.cols());
  return detail::shira_top_k(where, w.rows(), w.cols(), k, [&](index i, double* out) {
    for (index j = 0; j < w.cols(); ++j) out[j] = std::abs(convert<double>(w(i, j)) * convert<double>(g(i, j)));
  });
}

/// SHiRA-SNIP over a frozen base (rows decoded with dequantize_row).
template <base_weight Base, class V>
matrix<std::int32_t> shira_snip_mask(const Base& w, matrix_view<V> g, index k) {
  constexpr const char* where = "shira_snip_mask";
  detail::expect_shape(where, "G", g, w.out_features(), w.in_features());
  return detail::shira_top_k(where, w.out_features(), w.in_features(), k, [&](index i, double* out) {
    w.dequantize_row(i, out);
    for (index j = 0; j < w.in_features(); ++j) out[j] = std::abs(out[j] * convert<double>(g(i, j)));
  });
}

/// SHiRA-Struct. The paper (§3.1; App. B.1): "every f rows or columns" of W0 are trainable, a
/// rank-1 pattern, plus the diagonal, which makes the mask high rank. Here the budget K fixes f:
/// the min(d_out, d_in) diagonal entries come first, then n evenly spaced lines (line t of L is
/// floor(t L / n): rows, columns, or rows and columns alternating row 0, column 0, row 1, ...),
/// entries of each line in order and skipping those already taken, with the smallest n that
/// reaches K; the last line is only partly used when the lines overshoot K. shape_error when K
/// is smaller than the diagonal. PEFT has no struct mask.
inline matrix<std::int32_t> shira_struct_mask(index d_out, index d_in, index k,
                                              shira_struct_lines lines = shira_struct_lines::rows) {
  constexpr const char* where = "shira_struct_mask";
  detail::shira_check_request(where, d_out, d_in, k);
  const index diag = std::min(d_out, d_in);
  if (k < diag) {
    detail::raise<shape_error>(where, "K = " + std::to_string(k) + " is smaller than the diagonal of a " +
                                          detail::shape_string(d_out, d_in) + " weight (" + std::to_string(diag) +
                                          " entries)");
  }
  std::vector<std::int64_t> pos;
  pos.reserve(static_cast<std::size_t>(k));
  std::vector<bool> taken(static_cast<std::size_t>(d_out * d_in), false);
  for (index i = 0; i < diag; ++i) {
    pos.push_back(static_cast<std::int64_t>(i * d_in + i));
    taken[static_cast<std::size_t>(i * d_in + i)] = true;
  }
  const index rest = k - diag;
  if (rest == 0) return detail::shira_positions_to_indices(std::move(pos), d_in);

  const bool use_rows = lines != shira_struct_lines::columns;
  const bool use_cols = lines != shira_struct_lines::rows;
  const index max_lines = (use_rows ? d_out : 0) + (use_cols ? d_in : 0);
  const index line_len = lines == shira_struct_lines::rows      ? d_in
                         : lines == shira_struct_lines::columns ? d_out
                                                                : std::max(d_in, d_out);
  std::vector<std::int64_t> extra;
  extra.reserve(static_cast<std::size_t>(rest));
  // n lines of at most line_len new entries each: start from the fewest that could suffice.
  for (index n = std::max<index>(1, (rest + line_len - 1) / line_len); n <= max_lines; ++n) {
    extra.clear();
    const index n_rows = !use_rows ? 0 : use_cols ? (n + 1) / 2 : n;
    const index n_cols = n - n_rows;
    auto take = [&](std::int64_t p) {
      if (static_cast<index>(extra.size()) < rest && !taken[static_cast<std::size_t>(p)]) {
        taken[static_cast<std::size_t>(p)] = true;
        extra.push_back(p);
      }
    };
    for (index t = 0; t < std::max(n_rows, n_cols); ++t) {
      if (t < n_rows) {
        const index r = t * d_out / n_rows;
        for (index j = 0; j < d_in; ++j) take(static_cast<std::int64_t>(r * d_in + j));
      }
      if (t < n_cols) {
        const index c = t * d_in / n_cols;
        for (index i = 0; i < d_out; ++i) take(static_cast<std::int64_t>(i * d_in + c));
      }
    }
    for (auto p : extra) taken[static_cast<std::size_t>(p)] = false;  // undo for the next n
    if (static_cast<index>(extra.size()) == rest) break;
  }
  if (static_cast<index>(extra.size()) != rest) {
    // Unreachable: every line of the kind chosen covers the whole weight. Kept as a guard.
    detail::raise<error>(where, "could not place " + std::to_string(rest) + " entries on lines");
  }
  pos.insert(pos.end(), extra.begin(), extra.end());
  return detail::shira_positions_to_indices(std::move(pos), d_in);
}

/// G = sum over calibration batches of dL/dW0 = dy^T x (out, in), the input of
/// shira_gradient_mask and shira_snip_mask. dy is dL/dy of the frozen layer y = x W0^T + b0.
template <compute_scalar T>
class shira_gradient_accumulator {
 public:
  shira_gradient_accumulator(index in_features, index out_features) {
    if (in_features < 1 || out_features < 1) {
      detail::raise<shape_error>("shira_gradient_accumulator::shira_gradient_accumulator",
                                 "the weight is " + detail::shape_string(out_features, in_features) +
                                     ", both sizes must be >= 1");
    }
    g_ = matrix<T>(out_features, in_features);
  }

  index in_features() const noexcept { return g_.cols(); }
  index out_features() const noexcept { return g_.rows(); }

  /// G += dy^T x for one batch: x (batch, in), dy (batch, out).
  void add(matrix_view<const T> x, matrix_view<const T> dy) {
    constexpr const char* where = "shira_gradient_accumulator::add";
    detail::expect_shape(where, "x", x, x.rows(), in_features());
    detail::expect_shape(where, "dy", dy, x.rows(), out_features());
    kernels::gemm_tn<T>(1.0, dy, x, 1.0, g_.view());
    ++batches_;
  }

  /// The accumulated G (out, in).
  matrix_view<const T> gradient() const noexcept { return g_.view(); }
  /// How many batches were added since construction or reset().
  index batches() const noexcept { return batches_; }
  void reset() {
    g_.fill(T{0});
    batches_ = 0;
  }

 private:
  matrix<T> g_;  // (out, in)
  index batches_ = 0;
};

}  // namespace peft
