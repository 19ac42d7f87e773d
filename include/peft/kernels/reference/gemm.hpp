// peft/kernels/reference/gemm.hpp — the scalar truth for every product the library computes.
//
// Plain loops, accumulation in double (long double would not change the float results), any
// storage type for the weight. Fused and vectorised kernels are tested against these.
#pragma once

#include "peft/core/dtype.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::kernels::reference {

/// c = alpha * a b^T + beta * c, a (m, k), b (n, k), c (m, n). beta == 0 ignores c's contents.
template <class T, class S>
void gemm_nt(double alpha, matrix_view<const T> a, matrix_view<const S> b, double beta,
             matrix_view<T> c) {
  for (index i = 0; i < c.rows(); ++i) {
    for (index j = 0; j < c.cols(); ++j) {
      double acc = 0.0;
      for (index p = 0; p < a.cols(); ++p) {
        acc += static_cast<double>(a(i, p)) * convert<double>(b(j, p));
      }
      const double prior = beta == 0.0 ? 0.0 : beta * static_cast<double>(c(i, j));
      c(i, j) = static_cast<T>(alpha * acc + prior);
    }
  }
}

/// c = alpha * a b + beta * c, a (m, k), b (k, n), c (m, n).
template <class T, class S>
void gemm_nn(double alpha, matrix_view<const T> a, matrix_view<const S> b, double beta,
             matrix_view<T> c) {
  for (index i = 0; i < c.rows(); ++i) {
    for (index j = 0; j < c.cols(); ++j) {
      double acc = 0.0;
      for (index p = 0; p < a.cols(); ++p) {
        acc += static_cast<double>(a(i, p)) * convert<double>(b(p, j));
      }
      const double prior = beta == 0.0 ? 0.0 : beta * static_cast<double>(c(i, j));
      c(i, j) = static_cast<T>(alpha * acc + prior);
    }
  }
}

/// c = alpha * a^T b + beta * c, a (k, m), b (k, n), c (m, n).
template <class T>
void gemm_tn(double alpha, matrix_view<const T> a, matrix_view<const T> b, double beta,
             matrix_view<T> c) {
  for (index i = 0; i < c.rows(); ++i) {
    for (index j = 0; j < c.cols(); ++j) {
      double acc = 0.0;
      for (index p = 0; p < a.rows(); ++p) {
        acc += static_cast<double>(a(p, i)) * static_cast<double>(b(p, j));
      }
      const double prior = beta == 0.0 ? 0.0 : beta * static_cast<double>(c(i, j));
      c(i, j) = static_cast<T>(alpha * acc + prior);
    }
  }
}

}  // namespace peft::kernels::reference
