// peft/base/packed_f32.hpp — a frozen f32 weight pre-packed in panels for the forward product.
//
//   auto w = peft::packed_f32::pack(weight_view, bias_ptr);   // weight (out, in), any scalar
//   w.matmul(x, y);   // y = x W0^T + b0: the same values as dense<float>, in another layout
//
// Layout: the weight rows in panels of 16 (the last one padded with zero rows), each panel
// k-major: panel[p * 16 + c] = W0[16 * panel_index + c, p]. This is how BLAS libraries pack W
// inside every call; here it is done once, when the layer is loaded, so f32 products multiply x
// into it directly with kernels::packed_dot: one broadcast value of x times 16 consecutive
// outputs per FMA, no horizontal sums, one sequential stream per panel (kernels/packed.hpp),
// eight rows of x at a time with the panel staying in cache between them. f64 products and
// dx = dy W0 unpack panels of rows into a per-thread buffer and use the general product, as the
// quantized bases do (base/detail/quantized_common.hpp, which also gives merging and the bias):
// training's backward over this layout is slower than over dense<float>.
//
// An option beside dense<float>, not a replacement: storage is the f32 values (plus up to 15
// padding rows), nothing is rounded; dequantize_row and the products' results equal
// dense<float>'s up to the order of the f32 additions. Merging (add_to_weight) adds in double
// and rounds to f32, as dense<float> does. Building one copies the weight once (the caller may
// drop the row-major original). The panels start on a cache line, so each 16-value row of a
// panel is exactly one.
#pragma once

#include <algorithm>
#include <cstddef>
#include <limits>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/base/detail/quantized_common.hpp"
#include "peft/core/aligned_vector.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/packed.hpp"

namespace peft {

class packed_f32 : public detail::quantized_linear<packed_f32> {
  using base = detail::quantized_linear<packed_f32>;
  friend base;

 public:
  static constexpr std::string_view name = "packed_f32";
  /// Every f32 batch uses the panel kernel: it was faster than unpacking at every batch size
  /// measured, 1 to 2048 rows (benchmarks/RESULTS.md).
  static constexpr index dot_rows_below = std::numeric_limits<index>::max();
  static constexpr index panel_rows = kernels::packed_panel_rows;

  packed_f32() = default;

  /// Packs a weight (out, in) rounded to f32 and an optional bias of `out` values (nullptr:
  /// none). Throws shape_error for an empty weight; values are taken as they are (no checks:
  /// packing is exact).
  template <class U>
  static packed_f32 pack(matrix_view<const U> weight, const U* bias = nullptr) {
    if (weight.rows() <= 0 || weight.cols() <= 0 || weight.data() == nullptr) {
      detail::raise<shape_error>("packed_f32::pack",
                                 "cannot pack an empty weight " + detail::shape_string(weight.rows(), weight.cols()));
    }
    packed_f32 w(weight.rows(), weight.cols(), bias_from(bias, weight.rows()));
    std::vector<float> row(static_cast<std::size_t>(weight.cols()));
    for (index i = 0; i < weight.rows(); ++i) {
      row_to_f32(weight, i, row.data());
      w.quantize_row(i, row.data());
    }
    return w;
  }

  /// Bytes of the packed weight (padding rows included, bias excluded).
  std::size_t storage_bytes() const noexcept { return panels_.size() * sizeof(float); }

  /// The panels: ceil(out / 16) blocks of in * 16 values, panel[p * 16 + c] = W0[16 b + c, p].
  const aligned_vector<float>& panels() const noexcept { return panels_; }

  /// out[0..in) = W0[i, :] in the compute type.
  template <compute_scalar T>
  void dequantize_row(index i, T* out) const {
    check_row("dequantize_row", i);
    const float* src = panel(i / panel_rows) + i % panel_rows;
    for (index p = 0; p < in_; ++p) out[p] = static_cast<T>(src[p * panel_rows]);
  }

 private:
  packed_f32(index out, index in, std::vector<float> bias)
      : base(out, in, std::move(bias)),
        panels_(static_cast<std::size_t>((out + panel_rows - 1) / panel_rows * panel_rows * in), 0.0f) {}

  const float* panel(index b) const noexcept { return panels_.data() + b * panel_rows * in_; }

  index padded_in() const noexcept { return in_; }
  bool has_dot() const noexcept { return true; }

  /// Rows j0 .. j0 + n of y's tile: j0 is a multiple of 16 and n <= 16 (the skinny products'
  /// tiles), m <= 8.
  void dot_rows(kernels::isa which, index j0, index n, const float* x, index ldx, index m,
                float* y, index ldy, std::vector<float>& /*scratch*/) const {
    kernels::packed_dot(which, panel(j0 / panel_rows), in_, n, x, ldx, m, y, ldy);
  }

  /// Rows j0 .. j0 + n as T, ld apart (any j0): panel by panel, reading each sequentially.
  template <class T>
  void decode_rows(index j0, index n, T* out, index ld) const {
    for (index j = j0; j < j0 + n;) {
      const index c0 = j % panel_rows;
      const index cn = std::min(panel_rows - c0, j0 + n - j);
      const float* src = panel(j / panel_rows);
      T* dst = out + (j - j0) * ld;
      for (index p = 0; p < in_; ++p) {
        const float* s = src + p * panel_rows + c0;
        for (index c = 0; c < cn; ++c) dst[c * ld + p] = static_cast<T>(s[c]);
      }
      j += cn;
    }
  }

  void quantize_row(index i, const float* row) {
    float* dst = panels_.data() + (i / panel_rows) * panel_rows * in_ + i % panel_rows;
    for (index p = 0; p < in_; ++p) dst[p * panel_rows] = row[p];
  }

  aligned_vector<float> panels_;  // 64-byte aligned: a panel row is one cache line
};

static_assert(mutable_base_weight<packed_f32>);
static_assert(fused_base_weight<packed_f32, float> && fused_base_weight<packed_f32, double>);

}  // namespace peft
