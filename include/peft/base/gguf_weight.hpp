// peft/base/gguf_weight.hpp — a frozen weight that is a tensor of a GGUF file, used in place.
//
//   auto f = peft::io::gguf_file::open("model-Q4_K_M.gguf");
//   auto w = peft::gguf_weight::view(f, f.tensor("blk.0.attn_v.weight"));   // no copy
//   w.matmul(x, y);                     // y = x W0^T, blocks decoded in registers
//
// The tensor's type is chosen at run time, so one model can mix them (llama.cpp's Q4_K_M files
// hold Q4_K and Q6_K tensors): F32, F16, BF16 and the block formats Q8_0, Q4_0, Q4_K, Q6_K
// (base/formats/). Other types are refused by name (unsupported_error). A 2-D tensor of ggml
// shape ne = {in, out} is W0 (out, in); rows are ggml rows, so no padding is needed.
//
// Products go through detail::quantized_linear (see its header): skinny f32 batches stream rows
// through the format's fused dot kernel (kernels/quantized.hpp; F32/F16/BF16 and the larger
// batches decode panels for gemm). The bias, when given, is kept in f32 beside the tensor.
// Merging (add_to_weight) copies the tensor out of the file the first time (copy on write) and
// re-quantizes each changed row with the format's rule (lossy for the block formats).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/base/detail/quantized_common.hpp"
#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/base/formats/q8_k.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/io/gguf.hpp"
#include "peft/kernels/decode.hpp"
#include "peft/kernels/quantized.hpp"
#include "peft/kernels/quantized_int8.hpp"

namespace peft {

class gguf_weight : public detail::quantized_linear<gguf_weight> {
  using base = detail::quantized_linear<gguf_weight>;
  friend base;

 public:
  static constexpr std::string_view name = "gguf_weight";

  gguf_weight() = default;

  /// Whether tensors of type `t` can be frozen bases.
  static constexpr bool implemented(io::ggml_type t) noexcept {
    using io::ggml_type;
    return t == ggml_type::f32 || t == ggml_type::f16 || t == ggml_type::bf16 || t == ggml_type::q8_0 ||
           t == ggml_type::q4_0 || t == ggml_type::q4_k || t == ggml_type::q6_k;
  }
  /// The implemented types, for messages.
  static std::string implemented_names() { return "F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K"; }

  /// The 2-D tensor `t` of `file`, in place (the weight keeps the file's mapping alive), with an
  /// optional bias of out values. unsupported_error for a type not implemented, shape_error for
  /// a tensor that is not 2-D or a bias of the wrong length.
  static gguf_weight view(const io::gguf_file& file, const io::gguf_tensor_info& t, std::vector<float> bias = {}) {
    check_tensor("gguf_weight::view", t);
    gguf_weight w(t.type, static_cast<index>(t.ne[1]), static_cast<index>(t.ne[0]), std::move(bias));
    w.keep_ = file.keep_alive();
    w.data_ = file.bytes(t).data();
    return w;
  }

  /// A weight that owns `bytes`: `out` rows of `in` values in ggml's layout of `type`.
  static gguf_weight own(io::ggml_type type, index out, index in, std::vector<std::byte> bytes,
                         std::vector<float> bias = {}) {
    io::gguf_tensor_info t;
    t.name = "(owned)";
    t.type = type;
    t.ne = {in, out};
    check_tensor("gguf_weight::own", t);
    gguf_weight w(type, out, in, std::move(bias));
    if (bytes.size() != static_cast<std::size_t>(out) * w.row_bytes()) {
      peft::detail::raise<shape_error>("gguf_weight::own", std::to_string(bytes.size()) + " bytes for " + std::to_string(out) +
                                                               " rows of " + std::to_string(w.row_bytes()));
    }
    auto owned = std::make_shared<std::vector<std::byte>>(std::move(bytes));
    w.data_ = owned->data();
    w.owned_ = std::move(owned);
    return w;
  }

  /// An F32 weight owning a copy of `weight` (out, in) and `bias` (nullptr: none), so that a
  /// transformers model directory loads under Base = gguf_weight too.
  template <class U>
  static gguf_weight from(matrix_view<const U> weight, const U* bias = nullptr) {
    std::vector<std::byte> bytes(static_cast<std::size_t>(weight.rows() * weight.cols()) * sizeof(float));
    for (index i = 0; i < weight.rows(); ++i) {
      for (index j = 0; j < weight.cols(); ++j) {
        const auto v = static_cast<float>(weight(i, j));
        std::memcpy(bytes.data() + static_cast<std::size_t>(i * weight.cols() + j) * sizeof(float), &v, sizeof v);
      }
    }
    std::vector<float> b;
    if (bias != nullptr) b.assign(bias, bias + weight.rows());
    return own(io::ggml_type::f32, weight.rows(), weight.cols(), std::move(bytes), std::move(b));
  }

  /// A copy whose row i is row perm[i] of this one (the encoded rows are moved, nothing is
  /// decoded), and so is the bias. shape_error unless perm has out_features() indices in range.
  gguf_weight permuted_rows(std::span<const index> perm) const {
    if (static_cast<index>(perm.size()) != out_) peft::detail::raise<shape_error>("gguf_weight::permuted_rows", "one index per row expected");
    const std::size_t rb = row_bytes();
    std::vector<std::byte> bytes(static_cast<std::size_t>(out_) * rb);
    std::vector<float> bias;
    for (index i = 0; i < out_; ++i) {
      const index src = perm[static_cast<std::size_t>(i)];
      if (src < 0 || src >= out_) peft::detail::raise<shape_error>("gguf_weight::permuted_rows", "row index out of range");
      std::memcpy(bytes.data() + static_cast<std::size_t>(i) * rb, data_ + static_cast<std::size_t>(src) * rb, rb);
      if (!bias_.empty()) bias.push_back(bias_[static_cast<std::size_t>(src)]);
    }
    return own(type_, out_, in_, std::move(bytes), std::move(bias));
  }

  io::ggml_type type() const noexcept { return type_; }
  /// Bytes of one encoded row.
  std::size_t row_bytes() const noexcept {
    const auto b = io::ggml_block_of(static_cast<std::uint32_t>(type_));
    return static_cast<std::size_t>(in_ / b->elements) * b->bytes;
  }
  /// The encoded rows (out_features() * row_bytes() bytes).
  std::span<const std::byte> data() const noexcept { return {data_, static_cast<std::size_t>(out_) * row_bytes()}; }
  /// Bytes of the weight as stored (bias excluded).
  std::size_t storage_bytes() const noexcept { return data().size(); }
  /// Whether the weight still points into the file (no merge has copied it).
  bool in_place() const noexcept { return owned_ == nullptr; }

  /// llama.cpp's arithmetic for skinny f32 batches (fewer than skinny_rows rows): x is rounded
  /// to 8 bits per block (Q8_K for Q4_K/Q6_K, Q8_0 for Q8_0/Q4_0) and multiplied with integer
  /// dot products (kernels/quantized_int8.hpp), 2-4x faster at m = 1 than the exact
  /// f32-activation path, which stays the default. No effect on other types and on f64.
  void set_int8_activations(bool on) noexcept { int8_ = on; }
  /// Whether 8-bit activations are in use for this weight.
  bool int8_activations() const noexcept {
    using io::ggml_type;
    return int8_ && (type_ == ggml_type::q8_0 || type_ == ggml_type::q4_0 || type_ == ggml_type::q4_k ||
                     type_ == ggml_type::q6_k);
  }

  /// out[0..in) = W0[i, :] (exact in f32 and f64).
  template <compute_scalar T>
  void dequantize_row(index i, T* out) const {
    check_row("dequantize_row", i);
    decode_rows(i, 1, out, in_);
  }

 private:
  gguf_weight(io::ggml_type type, index out, index in, std::vector<float> bias) : base(out, in, std::move(bias)), type_(type) {
    if (!bias_.empty() && static_cast<index>(bias_.size()) != out) {
      peft::detail::raise<shape_error>("gguf_weight", "the bias has " + std::to_string(bias_.size()) + " values for " +
                                                          std::to_string(out) + " rows");
    }
  }

  static void check_tensor(std::string_view where, const io::gguf_tensor_info& t) {
    if (!implemented(t.type)) {
      peft::detail::raise<unsupported_error>(where, "tensor '" + t.name + "' has type " + io::ggml_type_name(t.type) +
                                                        ", which peft-cpp does not implement as a frozen base (" +
                                                        implemented_names() + ")");
    }
    if (t.ne.size() != 2 || t.ne[0] <= 0 || t.ne[1] <= 0) {
      peft::detail::raise<shape_error>(where, "tensor '" + t.name + "' is not a non-empty matrix");
    }
    const auto b = io::ggml_block_of(static_cast<std::uint32_t>(t.type));
    if (t.ne[0] % b->elements != 0) {
      peft::detail::raise<shape_error>(where, "tensor '" + t.name + "' rows are not whole " + std::string(b->name) + " blocks");
    }
  }

  template <class Block>
  const Block* blocks_of(index row) const noexcept {
    return reinterpret_cast<const Block*>(data_ + static_cast<std::size_t>(row) * row_bytes());
  }

  index padded_in() const noexcept { return in_; }
  bool has_dot() const noexcept {
    using io::ggml_type;
    return type_ == ggml_type::q8_0 || type_ == ggml_type::q4_0 || type_ == ggml_type::q4_k || type_ == ggml_type::q6_k;
  }

  void dot_rows(kernels::isa which, index j0, index n, const float* x, index ldx, index m, float* y, index ldy,
                std::vector<float>& /*scratch*/) const {
    using io::ggml_type;
    switch (type_) {
      case ggml_type::q8_0:
        kernels::q8_0_dot(which, blocks_of<formats::block_q8_0>(j0), in_ / formats::q8_0_block_size, n, x, ldx, m, y, ldy);
        break;
      case ggml_type::q4_0:
        kernels::q4_0_dot(which, blocks_of<formats::block_q4_0>(j0), in_ / formats::q4_0_block_size, n, x, ldx, m, y, ldy);
        break;
      case ggml_type::q4_k:
        kernels::q4_k_dot(which, blocks_of<formats::block_q4_k>(j0), in_ / formats::q4_k_block_size, n, x, ldx, m, y, ldy);
        break;
      case ggml_type::q6_k:
        kernels::q6_k_dot(which, blocks_of<formats::block_q6_k>(j0), in_ / formats::q6_k_block_size, n, x, ldx, m, y, ldy);
        break;
      default: break;  // has_dot() is false
    }
  }

  bool k_quant() const noexcept { return type_ == io::ggml_type::q4_k || type_ == io::ggml_type::q6_k; }

  std::size_t activation_row_bytes() const noexcept {
    return k_quant() ? static_cast<std::size_t>(in_ / formats::q8_k_block_size) * sizeof(formats::block_q8_k)
                     : static_cast<std::size_t>(in_ / formats::q8_0_block_size) * sizeof(formats::block_q8_0);
  }

  void quantize_activations(const float* x, index ldx, index m, std::byte* out) const {
    if (k_quant()) {
      kernels::quantize_q8_k_rows(x, ldx, m, in_ / formats::q8_k_block_size, reinterpret_cast<formats::block_q8_k*>(out));
    } else {
      kernels::quantize_q8_0_rows(x, ldx, m, in_ / formats::q8_0_block_size, reinterpret_cast<formats::block_q8_0*>(out));
    }
  }

  void dot_rows_int8(kernels::isa which, index j0, index n, const std::byte* xq, index m, float* y, index ldy) const {
    using io::ggml_type;
    const auto* xk = reinterpret_cast<const formats::block_q8_k*>(xq);
    const auto* x0 = reinterpret_cast<const formats::block_q8_0*>(xq);
    const index nk = in_ / formats::q8_k_block_size, n0 = in_ / formats::q8_0_block_size;
    switch (type_) {
      case ggml_type::q4_k: kernels::q4_k_q8_k_dot(which, blocks_of<formats::block_q4_k>(j0), nk, n, xk, nk, m, y, ldy); break;
      case ggml_type::q6_k: kernels::q6_k_q8_k_dot(which, blocks_of<formats::block_q6_k>(j0), nk, n, xk, nk, m, y, ldy); break;
      case ggml_type::q8_0: kernels::q8_0_q8_0_dot(which, blocks_of<formats::block_q8_0>(j0), n0, n, x0, n0, m, y, ldy); break;
      case ggml_type::q4_0: kernels::q4_0_q8_0_dot(which, blocks_of<formats::block_q4_0>(j0), n0, n, x0, n0, m, y, ldy); break;
      default: break;  // int8_activations() is false
    }
  }

  /// Rows j0 .. j0 + n as f32 into out (ld apart).
  void decode_rows_f32(index j0, index n, float* out, index ld) const {
    using io::ggml_type;
    for (index j = 0; j < n; ++j) {
      float* o = out + j * ld;
      const std::byte* row = data_ + static_cast<std::size_t>(j0 + j) * row_bytes();
      switch (type_) {
        case ggml_type::f32: std::memcpy(o, row, static_cast<std::size_t>(in_) * sizeof(float)); break;
        case ggml_type::f16:
        case ggml_type::bf16:
          for (index p = 0; p < in_; ++p) {
            std::uint16_t bits;
            std::memcpy(&bits, row + 2 * p, 2);
            o[p] = type_ == ggml_type::f16 ? static_cast<float>(f16::from_bits(bits)) : static_cast<float>(bf16::from_bits(bits));
          }
          break;
        case ggml_type::q8_0: kernels::decode_q8_0_row(blocks_of<formats::block_q8_0>(j0 + j), in_ / formats::q8_0_block_size, o); break;
        case ggml_type::q4_0: kernels::decode_q4_0_row(blocks_of<formats::block_q4_0>(j0 + j), in_ / formats::q4_0_block_size, o); break;
        case ggml_type::q4_k: kernels::decode_q4_k_row(blocks_of<formats::block_q4_k>(j0 + j), in_ / formats::q4_k_block_size, o); break;
        case ggml_type::q6_k: kernels::decode_q6_k_row(blocks_of<formats::block_q6_k>(j0 + j), in_ / formats::q6_k_block_size, o); break;
        default: break;
      }
    }
  }

  /// Rows as T: decoded in f32 (exact for every implemented type) and widened for double.
  template <class T>
  void decode_rows(index j0, index n, T* out, index ld) const {
    if constexpr (std::is_same_v<T, float>) {
      decode_rows_f32(j0, n, out, ld);
    } else {
      std::vector<float> row(static_cast<std::size_t>(in_));
      for (index j = 0; j < n; ++j) {
        decode_rows_f32(j0 + j, 1, row.data(), in_);
        std::copy(row.begin(), row.end(), out + j * ld);
      }
    }
  }

  /// Re-encodes row i from f32 values (merging): copies the tensor out of the file first.
  void quantize_row(index i, const float* values) {
    using io::ggml_type;
    if (owned_ == nullptr || owned_.use_count() > 1) {
      auto copy = std::make_shared<std::vector<std::byte>>(data_, data_ + data().size());
      data_ = copy->data();
      owned_ = std::move(copy);
      keep_.reset();
    }
    std::byte* row = owned_->data() + static_cast<std::size_t>(i) * row_bytes();
    bool ok = true;
    switch (type_) {
      case ggml_type::f32: std::memcpy(row, values, static_cast<std::size_t>(in_) * sizeof(float)); break;
      case ggml_type::f16:
      case ggml_type::bf16:
        for (index p = 0; p < in_; ++p) {
          const std::uint16_t bits = type_ == ggml_type::f16 ? f16(values[p]).bits : bf16(values[p]).bits;
          std::memcpy(row + 2 * p, &bits, 2);
        }
        break;
      case ggml_type::q8_0: ok = encode<formats::block_q8_0>(row, values, formats::q8_0_block_size, formats::quantize_q8_0_block); break;
      case ggml_type::q4_0: ok = encode<formats::block_q4_0>(row, values, formats::q4_0_block_size, formats::quantize_q4_0_block); break;
      case ggml_type::q4_k: ok = encode<formats::block_q4_k>(row, values, formats::q4_k_block_size, formats::quantize_q4_k_block); break;
      case ggml_type::q6_k: ok = encode<formats::block_q6_k>(row, values, formats::q6_k_block_size, formats::quantize_q6_k_block); break;
      default: break;
    }
    if (!ok) {
      peft::detail::raise<format_error>("gguf_weight::add_to_weight", "row " + std::to_string(i) + " has a block scale beyond fp16's range");
    }
  }

  template <class Block, class Quantize>
  bool encode(std::byte* row, const float* values, index block, Quantize quantize) const {
    auto* b = reinterpret_cast<Block*>(row);
    for (index k = 0; k < in_ / block; ++k) {
      if (!quantize(values + k * block, b[k])) return false;
    }
    return true;
  }

  io::ggml_type type_ = io::ggml_type::f32;
  bool int8_ = false;
  const std::byte* data_ = nullptr;
  std::shared_ptr<const void> keep_;               // the file's mapping (in place)
  std::shared_ptr<std::vector<std::byte>> owned_;  // own(), or after a merge
};

static_assert(mutable_base_weight<gguf_weight>);
static_assert(fused_base_weight<gguf_weight, float> && fused_base_weight<gguf_weight, double>);

}  // namespace peft
