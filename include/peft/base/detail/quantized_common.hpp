// peft/base/detail/quantized_common.hpp — what the quantized frozen bases (int8_rowwise, q4_0,
// nf4) share: shapes, the f32 bias, the threaded products and their epilogues, merging.
//
// A format derives from quantized_linear<Format> (CRTP) and provides
//   static constexpr std::string_view name;                       "q4_0" (error messages)
//   index padded_in() const;        values per x row its dot kernel reads (>= in_features)
//   bool has_dot() const;           whether the fused skinny kernel applies to this shape
//   void dot_rows(isa, j0, n, x, ldx, m, y, ldy, scratch) const;  kernels::*_dot on rows j0..
//   template <class T> void decode_rows(j0, n, T* out, ld) const; rows as T, ld apart
//   template <class T> void dequantize_row(index i, T* out) const;
//   void quantize_row(index i, const float* row);                 (row-local formats)
// and optionally
//   static constexpr index dot_rows_below;  batches below this many rows take dot_rows (default
//                                           skinny_rows; base/packed_f32.hpp sets its own)
// and, for llama.cpp's arithmetic (8-bit activations, kernels/quantized_int8.hpp):
//   bool int8_activations() const;  whether the skinny f32 products use them now
//   std::size_t activation_row_bytes() const;                     bytes of one quantized x row
//   void quantize_activations(const float* x, index ldx, index m, std::byte* out) const;
//   void dot_rows_int8(isa, j0, n, const std::byte* xq, index m, float* y, index ldy) const;
// The format's block layout, code tables and quantization rule live in base/formats/; its dot
// and decode kernels in kernels/quantized.hpp.
//
// Products. y = x W^T + b in f32: batches below skinny_rows (or the format's dot_rows_below)
// stream each weight row once through the format's dot kernel (a decoded block is multiplied
// into up to 8 rows of x at a time); larger batches, and f64, decode a panel of weight rows
// (~256 KiB) into a per-thread buffer and multiply it with kernels::gemm_nt. Output rows
// (features) are split over threads with kernels::parallel_ranges; every finished tile
// y[:, j0 : j0 + n) gets its bias and then the epilogue. dx = dy W decodes panels the same way
// (split over batch rows for large batches, otherwise over weight rows into per-thread sums
// added in a fixed order).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <mutex>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/epilogue.hpp"
#include "peft/kernels/gemm.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/parallel.hpp"
#include "peft/kernels/quantized.hpp"

namespace peft::detail {

/// "name::function" for error messages.
inline std::string quantized_where(std::string_view name, std::string_view function) {
  std::string s(name);
  s += "::";
  s += function;
  return s;
}

/// Throws shape_error for an empty weight and format_error for a non-finite weight or bias value.
template <class U>
void check_quantizable(const std::string& where, matrix_view<const U> w, const U* bias) {
  if (w.rows() <= 0 || w.cols() <= 0) {
    std::string msg = "cannot quantize an empty weight ";
    msg += shape_string(w.rows(), w.cols());
    raise<shape_error>(where, msg);
  }
  if (w.data() == nullptr) raise<shape_error>(where, "weight is a null view");
  for (index i = 0; i < w.rows(); ++i) {
    for (index j = 0; j < w.cols(); ++j) {
      if (!std::isfinite(static_cast<double>(w(i, j)))) {
        std::string msg = "weight has a non-finite value at (";
        msg += std::to_string(i);
        msg += ", ";
        msg += std::to_string(j);
        msg += ')';
        raise<format_error>(where, msg);
      }
    }
  }
  if (bias != nullptr) {
    for (index i = 0; i < w.rows(); ++i) {
      if (!std::isfinite(static_cast<double>(bias[i]))) {
        std::string msg = "bias has a non-finite value at ";
        msg += std::to_string(i);
        raise<format_error>(where, msg);
      }
    }
  }
}

template <class Format>
class quantized_linear {
 public:
  /// Batches with fewer rows use the streaming dot kernels (f32 only).
  static constexpr index skinny_rows = 16;

  index out_features() const noexcept { return out_; }
  index in_features() const noexcept { return in_; }
  bool has_bias() const noexcept { return !bias_.empty(); }
  /// The bias (f32, out_features values; empty: none).
  const std::vector<float>& bias() const noexcept { return bias_; }

  template <compute_scalar T>
  T bias_value(index j) const noexcept {
    return bias_.empty() ? T{0} : static_cast<T>(bias_[static_cast<std::size_t>(j)]);
  }

  /// The whole weight decoded to f32 (out, in): for tests and inspection, not for products.
  matrix<float> dequantize() const {
    matrix<float> w(out_, in_);
    for (index i = 0; i < out_; ++i) self().dequantize_row(i, w.row(i));
    return w;
  }

  /// y = x W0^T + b0. x (batch, in), y (batch, out); y is overwritten. T is deduced from y, so
  /// x may be a mutable view too (here and in matmul_t).
  template <compute_scalar T>
  void matmul(std::type_identity_t<matrix_view<const T>> x, matrix_view<T> y) const {
    matmul(x, y, kernels::no_epilogue{});
  }

  /// y = x W0^T + b0, then epi(i0, j0, tile) once per finished tile of y (disjoint tiles
  /// covering y, possibly from several threads at once).
  template <compute_scalar T, class Epilogue>
    requires kernels::epilogue_for<Epilogue, T>
  void matmul(std::type_identity_t<matrix_view<const T>> x, matrix_view<T> y, const Epilogue& epi) const {
    const std::string where = quantized_where(Format::name, "matmul");
    expect_shape(where.c_str(), "x", x, x.rows(), in_);
    expect_shape(where.c_str(), "y", y, x.rows(), out_);
    if (y.empty()) return;
    const kernels::isa which = kernels::active_isa();
    if constexpr (std::is_same_v<T, float>) {
      if (x.rows() < dot_rows_limit() && self().has_dot()) return matmul_skinny(which, x, y, epi);
    }
    matmul_panels(x, y, epi);
  }

  /// dx = dy W0, or dx += dy W0 when `accumulate`. dy (batch, out), dx (batch, in).
  template <compute_scalar T>
  void matmul_t(std::type_identity_t<matrix_view<const T>> dy, matrix_view<T> dx,
                bool accumulate = false) const {
    const std::string where = quantized_where(Format::name, "matmul_t");
    expect_shape(where.c_str(), "dy", dy, dy.rows(), out_);
    expect_shape(where.c_str(), "dx", dx, dy.rows(), in_);
    if (dx.empty()) return;
    if (!accumulate) {
      for (index r = 0; r < dx.rows(); ++r) std::fill(dx.row(r), dx.row(r) + dx.cols(), T{0});
    }
    if (out_ == 0) return;
    const index m = dy.rows();
    const index kp = self().padded_in();
    const index panel = panel_rows(kp);
    const double work = 2.0 * static_cast<double>(m) * static_cast<double>(out_) * static_cast<double>(in_);
    if (m >= skinny_rows * kernels::max_threads()) {
      // Large batches: every thread decodes all panels for its own rows of dx.
      kernels::parallel_ranges(m, skinny_rows, work, [&](index r0, index r1) {
        std::vector<T> buf(static_cast<std::size_t>(panel * kp));
        for (index p0 = 0; p0 < out_; p0 += panel) {
          const index np = std::min(panel, out_ - p0);
          self().decode_rows(p0, np, buf.data(), kp);
          kernels::gemm_nn<T, T>(1.0, dy.block(r0, p0, r1 - r0, np),
                                 matrix_view<const T>(buf.data(), np, in_, kp), 1.0,
                                 dx.block(r0, 0, r1 - r0, in_));
        }
      });
      return;
    }
    // Skinny batches: threads split the weight rows and sum into private copies of dx.
    std::mutex mutex;
    std::vector<std::pair<index, matrix<T>>> partial;
    kernels::parallel_ranges(out_, panel, work, [&](index p_first, index p_last) {
      const bool whole = p_first == 0 && p_last == out_;
      matrix<T> own;
      if (!whole) own = matrix<T>(m, in_);
      matrix_view<T> target = whole ? dx : own.view();
      std::vector<T> buf(static_cast<std::size_t>(panel * kp));
      for (index p0 = p_first; p0 < p_last; p0 += panel) {
        const index np = std::min(panel, p_last - p0);
        self().decode_rows(p0, np, buf.data(), kp);
        kernels::gemm_nn<T, T>(1.0, dy.block(0, p0, m, np),
                               matrix_view<const T>(buf.data(), np, in_, kp), 1.0, target);
      }
      if (!whole) {
        const std::lock_guard<std::mutex> lock(mutex);
        partial.emplace_back(p_first, std::move(own));
      }
    });
    std::sort(partial.begin(), partial.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    for (const auto& part : partial) {
      for (index r = 0; r < m; ++r) {
        const T* src = part.second.row(r);
        T* dst = dx.row(r);
        for (index c = 0; c < in_; ++c) dst[c] += src[c];
      }
    }
  }

  /// b0 += alpha * db (db has out_features values), rounded to f32. A base without bias gets a
  /// zero bias first.
  template <compute_scalar T>
  void add_to_bias(const T* db, double alpha) {
    if (bias_.empty()) bias_.assign(static_cast<std::size_t>(out_), 0.0f);
    for (index j = 0; j < out_; ++j) {
      float& b = bias_[static_cast<std::size_t>(j)];
      b = static_cast<float>(static_cast<double>(b) + alpha * static_cast<double>(db[j]));
    }
  }

  /// W0 = quantize(dequantize(W0) + alpha * dw): lossy, each row is re-quantized from its
  /// decoded values plus the update (summed in double, rounded to f32). Nothing changes when a
  /// sum is not finite (format_error).
  template <compute_scalar T>
  void add_to_weight(matrix_view<const T> dw, double alpha) {
    const std::string where = quantized_where(Format::name, "add_to_weight");
    expect_shape(where.c_str(), "dw", dw, out_, in_);
    std::vector<double> row(static_cast<std::size_t>(padded_or_in()));
    std::vector<float> sum(static_cast<std::size_t>(padded_or_in()), 0.0f);
    for (int pass = 0; pass < 2; ++pass) {  // pass 0 checks every sum, pass 1 writes
      for (index i = 0; i < out_; ++i) {
        self().dequantize_row(i, row.data());
        for (index j = 0; j < in_; ++j) {
          sum[static_cast<std::size_t>(j)] =
              static_cast<float>(row[static_cast<std::size_t>(j)] + alpha * static_cast<double>(dw(i, j)));
          if (pass == 0 && !std::isfinite(sum[static_cast<std::size_t>(j)])) {
            std::string msg = "merged weight is not finite at (";
            msg += std::to_string(i);
            msg += ", ";
            msg += std::to_string(j);
            msg += ')';
            raise<format_error>(where, msg);
          }
        }
        if (pass == 1) self_mut().quantize_row(i, sum.data());
      }
    }
  }

 protected:
  quantized_linear() = default;
  quantized_linear(index out, index in, std::vector<float> bias)
      : out_(out), in_(in), bias_(std::move(bias)) {}

  /// The bias of a quantize() call, in f32 (empty without one).
  template <class U>
  static std::vector<float> bias_from(const U* bias, index out) {
    std::vector<float> b;
    if (bias != nullptr) {
      b.resize(static_cast<std::size_t>(out));
      for (index j = 0; j < out; ++j) b[static_cast<std::size_t>(j)] = static_cast<float>(bias[j]);
    }
    return b;
  }

  /// Row i of w rounded to f32 into row[0..in).
  template <class U>
  static void row_to_f32(matrix_view<const U> w, index i, float* row) {
    for (index j = 0; j < w.cols(); ++j) row[j] = static_cast<float>(w(i, j));
  }

  /// Throws shape_error unless 0 <= i < out_features.
  void check_row(std::string_view function, index i) const {
    if (i < 0 || i >= out_) {
      std::string msg = "row ";
      msg += std::to_string(i);
      msg += " out of range [0, ";
      msg += std::to_string(out_);
      msg += ')';
      raise<shape_error>(quantized_where(Format::name, function), msg);
    }
  }

  index out_ = 0;
  index in_ = 0;
  std::vector<float> bias_;

 private:
  const Format& self() const noexcept { return static_cast<const Format&>(*this); }
  Format& self_mut() noexcept { return static_cast<Format&>(*this); }
  index padded_or_in() const { return std::max<index>(self().padded_in(), in_); }

  static constexpr index dot_rows_limit() noexcept {
    if constexpr (requires { Format::dot_rows_below; }) {
      return Format::dot_rows_below;
    } else {
      return skinny_rows;
    }
  }

  /// Weight rows per decoded panel: ~256 KiB of f32 (a multiple of 8 rows when that fits).
  static index panel_rows(index kp) {
    const index rows = std::max<index>(1, static_cast<index>(65536) / std::max<index>(kp, 1));
    return rows >= 16 ? rows / 8 * 8 : rows;
  }

  template <class T>
  void add_bias(matrix_view<T> tile, index j0) const {
    if (bias_.empty()) return;
    for (index r = 0; r < tile.rows(); ++r) {
      T* row = tile.row(r);
      for (index j = 0; j < tile.cols(); ++j) row[j] += bias_value<T>(j0 + j);
    }
  }

  template <class Epilogue>
  void matmul_skinny(kernels::isa which, matrix_view<const float> x, matrix_view<float> y,
                     const Epilogue& epi) const {
    const index m = x.rows();
    const index kp = self().padded_in();
    // The kernels read kp values per row of x: pad with zeros when the format pads its rows.
    std::vector<float> padded;
    const float* xp = x.data();
    index ldx = x.stride();
    if (kp != in_) {
      padded.assign(static_cast<std::size_t>(m * kp), 0.0f);
      for (index r = 0; r < m; ++r) std::copy(x.row(r), x.row(r) + in_, padded.data() + r * kp);
      xp = padded.data();
      ldx = kp;
    }
    // With 8-bit activations every row of x is quantized once, before the threads start.
    std::vector<std::byte> xq;
    std::size_t xq_row = 0;
    if constexpr (requires(const Format& f) { f.int8_activations(); }) {
      if (self().int8_activations()) {
        xq_row = self().activation_row_bytes();
        xq.resize(xq_row * static_cast<std::size_t>(m));
        self().quantize_activations(xp, ldx, m, xq.data());
      }
    }
    constexpr index tile = 16;
    const double work = 2.0 * static_cast<double>(m) * static_cast<double>(out_) * static_cast<double>(in_);
    kernels::parallel_ranges(out_, tile, work, [&](index j_first, index j_last) {
      std::vector<float> scratch;
      for (index j0 = j_first; j0 < j_last; j0 += tile) {
        const index n = std::min(tile, j_last - j0);
        for (index r0 = 0; r0 < m; r0 += kernels::max_dot_rows) {
          const index mr = std::min(kernels::max_dot_rows, m - r0);
          float* yt = y.data() + r0 * y.stride() + j0;
          if constexpr (requires(const Format& f) { f.int8_activations(); }) {
            if (xq_row != 0) {
              self().dot_rows_int8(which, j0, n, xq.data() + static_cast<std::size_t>(r0) * xq_row, mr, yt, y.stride());
              continue;
            }
          }
          self().dot_rows(which, j0, n, xp + r0 * ldx, ldx, mr, yt, y.stride(), scratch);
        }
        const matrix_view<float> t = y.block(0, j0, m, n);
        add_bias(t, j0);
        epi(index{0}, j0, t);
      }
    });
  }

  template <class T, class Epilogue>
  void matmul_panels(matrix_view<const T> x, matrix_view<T> y, const Epilogue& epi) const {
    const index m = x.rows();
    const index kp = self().padded_in();
    const index panel = panel_rows(kp);
    const double work = 2.0 * static_cast<double>(m) * static_cast<double>(out_) * static_cast<double>(in_);
    kernels::parallel_ranges(out_, panel, work, [&](index j_first, index j_last) {
      std::vector<T> buf(static_cast<std::size_t>(std::min(panel, j_last - j_first) * kp));
      for (index j0 = j_first; j0 < j_last; j0 += panel) {
        const index n = std::min(panel, j_last - j0);
        self().decode_rows(j0, n, buf.data(), kp);
        const matrix_view<T> t = y.block(0, j0, m, n);
        kernels::gemm_nt<T, T>(1.0, x, matrix_view<const T>(buf.data(), n, in_, kp), 0.0, t);
        add_bias(t, j0);
        epi(index{0}, j0, t);
      }
    });
  }
};

}  // namespace peft::detail
