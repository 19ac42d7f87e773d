// peft/base/int8_rowwise.hpp — a frozen weight quantized to int8 with one f32 scale per row.
//
//   auto w = peft::int8_rowwise::quantize(weight_view, bias_ptr);   // weight (out, in)
//   w.matmul(x, y);   // y = x W0^T + b0 with W0[i, j] = q[i, j] * scale[i]
//
// Quantization (symmetric absmax, base/formats/int8_rowwise.hpp): the row is rounded to f32,
// scale = absmax / 127 (in f32), q = round(w / scale) to nearest (ties to even), clamped to
// [-127, 127]; a zero row has scale 0. Every element is then within scale / 2 of its f32 value.
// The bias is kept in f32.
// Products decode in registers (kernels::int8_dot) for batches below 16 rows and by panels above;
// see base/detail/quantized_common.hpp. Merging (add_to_weight) re-quantizes each row: lossy.
#pragma once

#include <cstdint>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/base/detail/quantized_common.hpp"
#include "peft/base/formats/int8_rowwise.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/quantized.hpp"

namespace peft {

class int8_rowwise : public detail::quantized_linear<int8_rowwise> {
  using base = detail::quantized_linear<int8_rowwise>;
  friend base;

 public:
  static constexpr std::string_view name = "int8_rowwise";
  /// The format's name on the command line and in files (base/quantized_formats.hpp).
  static constexpr std::string_view cli_name = "int8";

  int8_rowwise() = default;

  /// Quantizes a weight (out, in) and an optional bias of `out` values (nullptr: none).
  /// Throws shape_error for an empty weight, format_error for non-finite values.
  template <class U>
  static int8_rowwise quantize(matrix_view<const U> weight, const U* bias = nullptr) {
    detail::check_quantizable(detail::quantized_where(name, "quantize"), weight, bias);
    int8_rowwise w(weight.rows(), weight.cols(), bias_from(bias, weight.rows()));
    std::vector<float> row(static_cast<std::size_t>(weight.cols()));
    for (index i = 0; i < weight.rows(); ++i) {
      row_to_f32(weight, i, row.data());
      w.quantize_row(i, row.data());
    }
    return w;
  }

  /// Bytes of the quantized weight: out * in int8 values and out f32 scales (bias excluded).
  std::size_t storage_bytes() const noexcept { return q_.size() + scale_.size() * sizeof(float); }

  /// The codes (out * in, row-major) and the per-row scales.
  const std::vector<std::int8_t>& values() const noexcept { return q_; }
  const std::vector<float>& scales() const noexcept { return scale_; }

  /// out[0..in) = W0[i, :] = q[i, :] * scale[i], computed in double and rounded to T.
  template <compute_scalar T>
  void dequantize_row(index i, T* out) const {
    check_row("dequantize_row", i);
    formats::dequantize_int8_row(q_.data() + i * in_, scale_[static_cast<std::size_t>(i)], in_, out);
  }

 private:
  int8_rowwise(index out, index in, std::vector<float> bias)
      : base(out, in, std::move(bias)),
        q_(static_cast<std::size_t>(out * in)),
        scale_(static_cast<std::size_t>(out)) {}

  index padded_in() const noexcept { return in_; }
  bool has_dot() const noexcept { return true; }

  void dot_rows(kernels::isa which, index j0, index n, const float* x, index ldx, index m,
                float* y, index ldy, std::vector<float>& /*scratch*/) const {
    kernels::int8_dot(which, q_.data() + j0 * in_, scale_.data() + j0, in_, n, x, ldx, m, y, ldy);
  }

  template <class T>
  void decode_rows(index j0, index n, T* out, index ld) const {
    for (index j = 0; j < n; ++j) {
      if constexpr (std::is_same_v<T, float>) {
        kernels::decode_int8_row(q_.data() + (j0 + j) * in_, scale_[static_cast<std::size_t>(j0 + j)],
                                 in_, out + j * ld);
      } else {
        dequantize_row(j0 + j, out + j * ld);
      }
    }
  }

  void quantize_row(index i, const float* row) {
    scale_[static_cast<std::size_t>(i)] = formats::quantize_int8_row(row, in_, q_.data() + i * in_);
  }

  std::vector<std::int8_t> q_;  // (out, in)
  std::vector<float> scale_;    // (out)
};

static_assert(mutable_base_weight<int8_rowwise>);
static_assert(fused_base_weight<int8_rowwise, float> && fused_base_weight<int8_rowwise, double>);

}  // namespace peft
