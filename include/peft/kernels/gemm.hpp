// peft/kernels/gemm.hpp — the products adapters and bases are built from.
//
// Same signatures as kernels/reference/gemm.hpp. Compute-type operands go to Eigen's blocked
// GEMM; a weight stored in another type (bf16, f16, f32 under double compute) is decoded a panel
// of rows at a time into a cache-sized buffer and multiplied there, so a full-size converted
// copy is never made. Define PEFT_FORCE_REFERENCE to route everything to the reference loops.
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include "peft/core/dtype.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/interop/eigen.hpp"
#include "peft/kernels/reference/gemm.hpp"

namespace peft::kernels {

namespace detail {

/// Rows of a stored weight decoded per panel: ~64 KiB of compute scalars.
template <class T>
index panel_rows(index cols) {
  return std::max<index>(1, static_cast<index>(65536 / sizeof(T)) / std::max<index>(cols, 1));
}

template <class T, class S>
void decode_rows(matrix_view<const S> w, index first, index count, T* out) {
  for (index i = 0; i < count; ++i) {
    const S* src = w.row(first + i);
    T* dst = out + i * w.cols();
    for (index j = 0; j < w.cols(); ++j) dst[j] = convert<T>(src[j]);
  }
}

template <class T>
void scale_or_zero(double beta, matrix_view<T> c) {
  if (beta == 1.0) return;
  if (beta == 0.0) {
    as_eigen(c).setZero();
  } else {
    as_eigen(c) *= static_cast<T>(beta);
  }
}

/// c = product + beta * c for an Eigen product expression (alpha already in it).
template <class T, class Product>
void update(matrix_view<T> c, double beta, const Product& product) {
  auto cm = as_eigen(c);
  if (beta == 0.0) {
    cm.noalias() = product;
  } else {
    scale_or_zero(beta, c);
    cm.noalias() += product;
  }
}

}  // namespace detail

/// c = alpha * a b^T + beta * c: a (m, k) compute type, b (n, k) any storage type.
template <class T, class S>
void gemm_nt(double alpha, matrix_view<const T> a, matrix_view<const S> b, double beta,
             matrix_view<T> c) {
#ifdef PEFT_FORCE_REFERENCE
  reference::gemm_nt(alpha, a, b, beta, c);
#else
  if (c.empty()) return;
  if (a.cols() == 0) return detail::scale_or_zero(beta, c);
  const T al = static_cast<T>(alpha);
  if constexpr (std::is_same_v<T, S>) {
    detail::update(c, beta, al * (as_eigen(a) * as_eigen(b).transpose()));
  } else {
    const index panel = detail::panel_rows<T>(b.cols());
    std::vector<T> buffer(static_cast<std::size_t>(std::min(panel, b.rows()) * b.cols()));
    for (index j0 = 0; j0 < b.rows(); j0 += panel) {
      const index nj = std::min(panel, b.rows() - j0);
      detail::decode_rows(b, j0, nj, buffer.data());
      matrix_view<const T> bp(buffer.data(), nj, b.cols());
      gemm_nt<T, T>(alpha, a, bp, beta, c.block(0, j0, c.rows(), nj));
    }
  }
#endif
}

/// c = alpha * a b + beta * c: a (m, k) compute type, b (k, n) any storage type.
template <class T, class S>
void gemm_nn(double alpha, matrix_view<const T> a, matrix_view<const S> b, double beta,
             matrix_view<T> c) {
#ifdef PEFT_FORCE_REFERENCE
  reference::gemm_nn(alpha, a, b, beta, c);
#else
  if (c.empty()) return;
  if (a.cols() == 0) return detail::scale_or_zero(beta, c);
  const T al = static_cast<T>(alpha);
  if constexpr (std::is_same_v<T, S>) {
    detail::update(c, beta, al * (as_eigen(a) * as_eigen(b)));
  } else {
    detail::scale_or_zero(beta, c);
    const index panel = detail::panel_rows<T>(b.cols());
    std::vector<T> buffer(static_cast<std::size_t>(std::min(panel, b.rows()) * b.cols()));
    for (index p0 = 0; p0 < b.rows(); p0 += panel) {
      const index np = std::min(panel, b.rows() - p0);
      detail::decode_rows(b, p0, np, buffer.data());
      matrix_view<const T> bp(buffer.data(), np, b.cols());
      gemm_nn<T, T>(alpha, a.block(0, p0, a.rows(), np), bp, 1.0, c);
    }
  }
#endif
}

/// c = alpha * a^T b + beta * c: a (k, m), b (k, n), both compute type.
template <class T>
void gemm_tn(double alpha, matrix_view<const T> a, matrix_view<const T> b, double beta,
             matrix_view<T> c) {
#ifdef PEFT_FORCE_REFERENCE
  reference::gemm_tn(alpha, a, b, beta, c);
#else
  if (c.empty()) return;
  if (a.rows() == 0) return detail::scale_or_zero(beta, c);
  const T al = static_cast<T>(alpha);
  detail::update(c, beta, al * (as_eigen(a).transpose() * as_eigen(b)));
#endif
}

}  // namespace peft::kernels
