// peft/kernels/reference/transformer.hpp — the row-wise pieces of a transformer block as plain
// loops: normalisations, the MLP's (gated) activation and the cross-entropy of a row of logits,
// forward and backward. The truth kernels/transformer.hpp is tested against; in double they are
// also what the double models compute.
//
// Buffers are row-major (rows, n), contiguous. Statistics (the norms' sums, the loss's
// log-sum-exp) are accumulated in double whatever T is. Each backward takes what its forward
// saved and the gradient of the output, and writes the gradient of the input; weight gradients
// are added (+=) where a pointer is given.
#pragma once

#include <cmath>
#include <cstddef>

#include "peft/core/activation.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::kernels::reference {

/// y = w * x / sqrt(mean(x^2) + eps) per row; inv (rows) keeps 1/sqrt(...) for backward.
template <class T>
void rms_norm(const T* x, const T* w, index rows, index n, double eps, T* y, T* inv) {
  for (index r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    double ss = 0;
    for (index i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * static_cast<double>(xr[i]);
    const T s = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    inv[r] = s;
    T* yr = y + r * n;
    for (index i = 0; i < n; ++i) yr[i] = w[i] * (xr[i] * s);
  }
}

/// dx = (d rms_norm / dx)^T dy, plus dres when not null (a residual branch's gradient);
/// dw += sum_r dy * x * inv when dw is not null.
template <class T>
void rms_norm_backward(const T* x, const T* w, const T* inv, index rows, index n, const T* dy, T* dx, T* dw,
                       const T* dres = nullptr) {
  for (index r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    const T* dyr = dy + r * n;
    const double s = inv[r];
    double dot = 0;
    for (index i = 0; i < n; ++i) dot += static_cast<double>(dyr[i]) * w[i] * xr[i];
    const double k = s * s * s * dot / static_cast<double>(n);
    T* dxr = dx + r * n;
    for (index i = 0; i < n; ++i) {
      dxr[i] = static_cast<T>(s * dyr[i] * w[i] - k * xr[i]);
      if (dres != nullptr) dxr[i] += dres[r * n + i];
    }
    if (dw != nullptr) {
      for (index i = 0; i < n; ++i) dw[i] += dyr[i] * xr[i] * static_cast<T>(s);
    }
  }
}

/// y = (x - mean) / sqrt(var + eps) * w + b per row; stats (rows, 2) keeps mean and 1/std.
template <class T>
void layer_norm(const T* x, const T* w, const T* b, index rows, index n, double eps, T* y, T* stats) {
  for (index r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    double mean = 0;
    for (index i = 0; i < n; ++i) mean += xr[i];
    mean /= static_cast<double>(n);
    double var = 0;
    for (index i = 0; i < n; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= static_cast<double>(n);
    const double is = 1.0 / std::sqrt(var + eps);
    stats[2 * r] = static_cast<T>(mean);
    stats[2 * r + 1] = static_cast<T>(is);
    T* yr = y + r * n;
    for (index i = 0; i < n; ++i) yr[i] = static_cast<T>((xr[i] - mean) * is) * w[i] + b[i];
  }
}

/// dx from dy, plus dres when not null; dw, db += their gradients when not null.
template <class T>
void layer_norm_backward(const T* x, const T* w, const T* stats, index rows, index n, const T* dy, T* dx, T* dw,
                         T* db, const T* dres = nullptr) {
  for (index r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    const T* dyr = dy + r * n;
    const double mean = stats[2 * r];
    const double is = stats[2 * r + 1];
    double sg = 0, sgx = 0;
    for (index i = 0; i < n; ++i) {
      const double g = static_cast<double>(dyr[i]) * w[i];
      const double xh = (xr[i] - mean) * is;
      sg += g;
      sgx += g * xh;
    }
    sg /= static_cast<double>(n);
    sgx /= static_cast<double>(n);
    T* dxr = dx + r * n;
    for (index i = 0; i < n; ++i) {
      const double xh = (xr[i] - mean) * is;
      dxr[i] = static_cast<T>(is * (static_cast<double>(dyr[i]) * w[i] - sg - xh * sgx));
      if (dres != nullptr) dxr[i] += dres[r * n + i];
      if (dw != nullptr) dw[i] += static_cast<T>(dyr[i] * xh);
      if (db != nullptr) db[i] += dyr[i];
    }
  }
}

/// The activation function at x.
template <class T>
T activate(activation a, T x) {
  switch (a) {
    case activation::silu: return x / (T{1} + std::exp(-x));
    case activation::gelu: return T{0.5} * x * (T{1} + std::erf(x / std::sqrt(T{2})));
    case activation::gelu_tanh: {
      const T c = std::sqrt(T{2} / T{3.14159265358979323846L});
      return T{0.5} * x * (T{1} + std::tanh(c * (x + T{0.044715} * x * x * x)));
    }
    case activation::relu: return x > T{0} ? x : T{0};
  }
  return x;
}

/// Its derivative at x.
template <class T>
T activate_derivative(activation a, T x) {
  switch (a) {
    case activation::silu: {
      const T s = T{1} / (T{1} + std::exp(-x));
      return s * (T{1} + x * (T{1} - s));
    }
    case activation::gelu: {
      const T pdf = std::exp(T{-0.5} * x * x) / std::sqrt(T{2} * T{3.14159265358979323846L});
      return T{0.5} * (T{1} + std::erf(x / std::sqrt(T{2}))) + x * pdf;
    }
    case activation::gelu_tanh: {
      const T c = std::sqrt(T{2} / T{3.14159265358979323846L});
      const T u = c * (x + T{0.044715} * x * x * x);
      const T t = std::tanh(u);
      return T{0.5} * (T{1} + t) + T{0.5} * x * (T{1} - t * t) * c * (T{1} + T{3} * T{0.044715} * x * x);
    }
    case activation::relu: return x > T{0} ? T{1} : T{0};
  }
  return T{1};
}

/// The MLP's activation over `count` values: a = act(g) * u (gated, SwiGLU's form), or act(g)
/// when u is null.
template <class T>
void gated_activation(activation act, const T* g, const T* u, index count, T* a) {
  for (index i = 0; i < count; ++i) a[i] = u != nullptr ? activate(act, g[i]) * u[i] : activate(act, g[i]);
}

/// Its backward from da: dg = da * u * act'(g) and du = da * act(g) (or dg = da * act'(g) when
/// u is null; du is then not written).
template <class T>
void gated_activation_backward(activation act, const T* g, const T* u, const T* da, index count, T* dg, T* du) {
  for (index i = 0; i < count; ++i) {
    if (u != nullptr) {
      du[i] = da[i] * activate(act, g[i]);
      dg[i] = da[i] * u[i] * activate_derivative(act, g[i]);
    } else {
      dg[i] = da[i] * activate_derivative(act, g[i]);
    }
  }
}

/// Cross-entropy of rows of logits z (rows, v; rows ldz apart) against target[r] (a row whose
/// target is negative is skipped: no loss, its gradient row is left untouched). Returns the sum
/// over the rows of log sum exp(z) - z[target]; with d (rows, v; ldd apart) not null, writes
/// d = (softmax(z) - onehot(target)) * scale for every row with a target.
template <class T>
double cross_entropy(const T* z, index rows, index v, index ldz, const long long* target, double scale, T* d,
                     index ldd) {
  double total = 0;
  for (index r = 0; r < rows; ++r) {
    const long long t = target[r];
    if (t < 0) continue;
    const T* zr = z + r * ldz;
    double m = zr[0];
    for (index j = 1; j < v; ++j) m = std::fmax(m, static_cast<double>(zr[j]));
    double sum = 0;
    for (index j = 0; j < v; ++j) sum += std::exp(static_cast<double>(zr[j]) - m);
    const double lse = m + std::log(sum);
    total += lse - static_cast<double>(zr[t]);
    if (d != nullptr) {
      T* dr = d + r * ldd;
      for (index j = 0; j < v; ++j) dr[j] = static_cast<T>(std::exp(static_cast<double>(zr[j]) - lse) * scale);
      dr[t] -= static_cast<T>(scale);
    }
  }
  return total;
}

}  // namespace peft::kernels::reference
