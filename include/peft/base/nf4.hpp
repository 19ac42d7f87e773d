// peft/base/nf4.hpp — a frozen weight in bitsandbytes' NF4 format (QLoRA), with or without
// double quantization of the block absmaxes.
//
//   auto w = peft::nf4::quantize(weight_view, bias_ptr);                 // double quant on
//   auto v = peft::nf4::quantize(weight_view, bias_ptr, {.double_quant = false});
//   w.matmul(x, y);   // y = x W0^T + b0, blocks decoded in registers
//
// Layout and rules (base/formats/nf4.hpp), as bitsandbytes' quantize_4bit(blocksize=64,
// quant_type="nf4") on the row-major (out, in) tensor: blocks of 64 run over the FLATTENED
// tensor (so a block may span two rows when in_features % 64 != 0, and the last block may be
// partial); element e's 4-bit code sits in byte e / 2, the even element in the high nibble;
// W0 = nf4_values[q] * absmax(block).
// Quantization: absmax = max |w| of the block (f32), q = dQuantizeNF4(w * (1 / absmax)), i.e.
// the nearest NF4 value (a block of zeros stores absmax 0 and code 7, the value 0).
// Double quantization (compress_statistics=True): offset = mean of the absmaxes (summed in double,
// stored f32); the centred absmaxes absmax - offset are quantized in groups of 256 to 8-bit codes
// of the signed dynamic map (formats::dynamic_map()) with one f32 absmax2 per group, as
// quantize_blockwise does; the decoded absmax is code[q] * absmax2 + offset in f32. Values are
// quantized against the exact absmax and decoded with the decoded one, as in bitsandbytes.
// The code tables (16 and 256 f32) are constants of the format and not counted in storage_bytes.
//
// Products: when in_features % 64 == 0 every row owns whole blocks and f32 batches below 16 rows
// run the streaming dot kernel (kernels::nf4_dot); otherwise rows are decoded by panels (any
// batch). Merging (add_to_weight) re-quantizes the whole tensor through a temporary f32 copy
// (the offset and the group absmaxes are shared across rows): lossy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/base/detail/quantized_common.hpp"
#include "peft/base/formats/nf4.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/quantized.hpp"

namespace peft {

/// NF4 quantization options.
struct nf4_options {
  /// Quantize the block absmaxes to 8 bits in groups of 256 (bitsandbytes' compress_statistics).
  bool double_quant = true;
};

class nf4 : public detail::quantized_linear<nf4> {
  using base = detail::quantized_linear<nf4>;
  friend base;

 public:
  static constexpr std::string_view name = "nf4";
  static constexpr index block_size = formats::nf4_block_size;
  static constexpr index group_size = formats::nf4_group_size;

  nf4() = default;

  /// Quantizes a weight (out, in) and an optional bias of `out` values (nullptr: none).
  /// Throws shape_error for an empty weight, format_error for non-finite values.
  template <class U>
  static nf4 quantize(matrix_view<const U> weight, const U* bias = nullptr, nf4_options opt = {}) {
    detail::check_quantizable(detail::quantized_where(name, "quantize"), weight, bias);
    nf4 w(weight.rows(), weight.cols(), bias_from(bias, weight.rows()), opt);
    w.encode([&](index e) { return static_cast<float>(weight(e / weight.cols(), e % weight.cols())); });
    return w;
  }

  bool double_quant() const noexcept { return double_quant_; }
  /// Blocks of 64 over the flattened tensor: ceil(out * in / 64).
  index blocks() const noexcept { return (elements() + block_size - 1) / block_size; }
  /// Double-quantization groups: ceil(blocks() / 256) (0 without double quantization).
  index groups() const noexcept { return double_quant_ ? (blocks() + group_size - 1) / group_size : 0; }

  /// Bytes of the quantized weight (bias excluded): ceil(out * in / 2) packed codes, plus with
  /// double quantization one byte per block, one f32 per group and the f32 offset, without it
  /// one f32 absmax per block.
  std::size_t storage_bytes() const noexcept {
    std::size_t n = packed_.size();
    if (double_quant_) {
      n += qabsmax_.size() + absmax2_.size() * sizeof(float) + sizeof(float);
    } else {
      n += absmax_.size() * sizeof(float);
    }
    return n;
  }

  /// The packed codes (ceil(out * in / 2) bytes, first element of a byte in the high nibble).
  const std::vector<std::uint8_t>& packed() const noexcept { return packed_; }
  /// The 4-bit code of flattened element e = i * in + j.
  std::uint8_t code(index e) const noexcept { return formats::nf4_code(packed_.data(), e); }
  /// The absmax block b decodes with (f32; double-quantized when double_quant()).
  float block_absmax(index b) const noexcept {
    if (!double_quant_) return absmax_[static_cast<std::size_t>(b)];
    return formats::dequantize_nf4_absmax(qabsmax_[static_cast<std::size_t>(b)],
                                          absmax2_[static_cast<std::size_t>(b / group_size)], offset_);
  }
  /// Double quantization's state: the 8-bit codes, the group absmaxes and the offset.
  const std::vector<std::uint8_t>& absmax_codes() const noexcept { return qabsmax_; }
  const std::vector<float>& group_absmax() const noexcept { return absmax2_; }
  float absmax_offset() const noexcept { return offset_; }

  /// out[0..in) = W0[i, :]: nf4_values[q] * absmax, the product in double rounded to T.
  template <compute_scalar T>
  void dequantize_row(index i, T* out) const {
    check_row("dequantize_row", i);
    index e = i * in_;
    index b = -1;
    double a = 0.0;
    for (index j = 0; j < in_; ++j, ++e) {
      if (e / block_size != b) {
        b = e / block_size;
        a = block_absmax(b);
      }
      out[j] = static_cast<T>(static_cast<double>(formats::nf4_values[code(e)]) * a);
    }
  }

  /// W0 = quantize(dequantize(W0) + alpha * dw) over the whole tensor (see the header comment):
  /// lossy. Nothing changes when a sum is not finite (format_error).
  template <compute_scalar T>
  void add_to_weight(matrix_view<const T> dw, double alpha) {
    const std::string where = detail::quantized_where(name, "add_to_weight");
    detail::expect_shape(where.c_str(), "dw", dw, out_, in_);
    matrix<float> w(out_, in_);
    std::vector<double> row(static_cast<std::size_t>(in_));
    for (index i = 0; i < out_; ++i) {
      dequantize_row(i, row.data());
      for (index j = 0; j < in_; ++j) {
        const auto v = static_cast<float>(row[static_cast<std::size_t>(j)] + alpha * static_cast<double>(dw(i, j)));
        if (!std::isfinite(v)) {
          std::string msg = "merged weight is not finite at (";
          msg += std::to_string(i);
          msg += ", ";
          msg += std::to_string(j);
          msg += ')';
          detail::raise<format_error>(where, msg);
        }
        w(i, j) = v;
      }
    }
    encode([&](index e) { return w.data()[e]; });
  }

 private:
  nf4(index out, index in, std::vector<float> bias, nf4_options opt)
      : base(out, in, std::move(bias)), double_quant_(opt.double_quant) {}

  index elements() const noexcept { return out_ * in_; }
  bool row_aligned() const noexcept { return in_ % block_size == 0; }
  index padded_in() const noexcept { return in_; }
  bool has_dot() const noexcept { return row_aligned(); }

  /// Quantizes the flattened tensor, value(e) giving element e as f32.
  template <class Value>
  void encode(const Value& value) {
    const index n = elements();
    const index nb = blocks();
    packed_.assign(static_cast<std::size_t>((n + 1) / 2), 0);
    std::vector<float> absmax(static_cast<std::size_t>(nb));
    for (index b = 0; b < nb; ++b) {
      const index e0 = b * block_size;
      absmax[static_cast<std::size_t>(b)] =
          formats::quantize_nf4_block(value, e0, std::min(n, e0 + block_size), packed_.data());
    }
    if (!double_quant_) {
      absmax_ = std::move(absmax);
      return;
    }
    qabsmax_.assign(static_cast<std::size_t>(nb), 0);
    absmax2_.assign(static_cast<std::size_t>((nb + group_size - 1) / group_size), 0.0f);
    offset_ = formats::quantize_nf4_absmax(absmax.data(), nb, qabsmax_.data(), absmax2_.data());
  }

  /// Decoded absmaxes of the blocks of rows [j0, j0 + n) (row-aligned layout).
  const float* row_absmax(index j0, index n, std::vector<float>& scratch) const {
    const index per_row = in_ / block_size;
    if (!double_quant_) return absmax_.data() + j0 * per_row;
    scratch.resize(static_cast<std::size_t>(n * per_row));
    for (index b = 0; b < n * per_row; ++b) scratch[static_cast<std::size_t>(b)] = block_absmax(j0 * per_row + b);
    return scratch.data();
  }

  void dot_rows(kernels::isa which, index j0, index n, const float* x, index ldx, index m,
                float* y, index ldy, std::vector<float>& scratch) const {
    const formats::nf4_rows w{packed_.data() + j0 * (in_ / 2), row_absmax(j0, n, scratch), in_};
    kernels::nf4_dot(which, w, n, x, ldx, m, y, ldy);
  }

  template <class T>
  void decode_rows(index j0, index n, T* out, index ld) const {
    if constexpr (std::is_same_v<T, float>) {
      if (row_aligned()) {
        std::vector<float> scratch;
        const formats::nf4_rows w{packed_.data() + j0 * (in_ / 2), row_absmax(j0, n, scratch), in_};
        for (index j = 0; j < n; ++j) kernels::decode_nf4_row(w, j, out + j * ld);
        return;
      }
    }
    for (index j = 0; j < n; ++j) dequantize_row(j0 + j, out + j * ld);
  }

  bool double_quant_ = true;
  std::vector<std::uint8_t> packed_;   // ceil(out * in / 2)
  std::vector<float> absmax_;          // (blocks) without double quantization
  std::vector<std::uint8_t> qabsmax_;  // (blocks) with double quantization
  std::vector<float> absmax2_;         // (groups)
  float offset_ = 0.0f;
};

static_assert(mutable_base_weight<nf4>);
static_assert(fused_base_weight<nf4, float> && fused_base_weight<nf4, double>);

}  // namespace peft
