// peft/models/ops.hpp — the non-linear pieces of a transformer block, forward and backward.
//
// Row-major (tokens, features) buffers. Each backward takes what its forward saved and the
// gradient of the output, and writes (or adds, where it says) the gradient of the input.
// Normalisation statistics are computed in double whatever T is, as transformers computes them
// in float32 for half-precision models (for float models the difference is below rounding).
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "peft/core/matrix.hpp"
#include "peft/models/config.hpp"

namespace peft::models::ops {

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

/// dx = d rms_norm / dx applied to dy; dw += sum_r dy * x * inv (when dw is not null).
template <class T>
void rms_norm_backward(const T* x, const T* w, const T* inv, index rows, index n, const T* dy, T* dx, T* dw) {
  for (index r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    const T* dyr = dy + r * n;
    const double s = inv[r];
    double dot = 0;
    for (index i = 0; i < n; ++i) dot += static_cast<double>(dyr[i]) * w[i] * xr[i];
    const double k = s * s * s * dot / static_cast<double>(n);
    T* dxr = dx + r * n;
    for (index i = 0; i < n; ++i) dxr[i] = static_cast<T>(s * dyr[i] * w[i] - k * xr[i]);
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

/// dx from dy; dw, db += their gradients when not null.
template <class T>
void layer_norm_backward(const T* x, const T* w, const T* stats, index rows, index n, const T* dy, T* dx, T* dw,
                         T* db) {
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
      if (dw != nullptr) dw[i] += static_cast<T>(dyr[i] * xh);
      if (db != nullptr) db[i] += dyr[i];
    }
  }
}

/// The activation function and its derivative.
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

/// Rotary embeddings: cos/sin tables (positions, head_dim) in transformers' "rotate half" layout.
template <class T>
class rope_table {
 public:
  rope_table() = default;
  rope_table(const rope_config& c, index head_dim, index positions) : dim_(head_dim) {
    const index half = head_dim / 2;
    std::vector<double> inv(static_cast<std::size_t>(half));
    constexpr double pi = 3.14159265358979323846;
    for (index i = 0; i < half; ++i) {
      double f = 1.0 / std::pow(c.theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
      if (c.kind == rope_kind::linear) f /= c.factor;
      if (c.kind == rope_kind::llama3) {
        const double low_wavelen = c.original_max_positions / c.low_freq_factor;
        const double high_wavelen = c.original_max_positions / c.high_freq_factor;
        const double wavelen = 2 * pi / f;
        if (wavelen > low_wavelen) {
          f /= c.factor;
        } else if (wavelen >= high_wavelen) {  // medium frequencies: smooth interpolation
          const double smooth = (c.original_max_positions / wavelen - c.low_freq_factor) /
                                (c.high_freq_factor - c.low_freq_factor);
          f = (1 - smooth) * f / c.factor + smooth * f;
        }
      }
      // transformers keeps inv_freq in float32 and multiplies positions in float32; a double
      // model computes the table in double (see docs/models.md).
      inv[static_cast<std::size_t>(i)] = std::is_same_v<T, float> ? static_cast<double>(static_cast<float>(f)) : f;
    }
    cos_ = matrix<T>(positions, head_dim);
    sin_ = matrix<T>(positions, head_dim);
    for (index p = 0; p < positions; ++p) {
      for (index i = 0; i < half; ++i) {
        const double a = std::is_same_v<T, float>
                             ? static_cast<double>(static_cast<float>(p) * static_cast<float>(inv[static_cast<std::size_t>(i)]))
                             : static_cast<double>(p) * inv[static_cast<std::size_t>(i)];
        cos_(p, i) = cos_(p, i + half) = static_cast<T>(std::cos(a));
        sin_(p, i) = sin_(p, i + half) = static_cast<T>(std::sin(a));
      }
    }
  }
  index positions() const noexcept { return cos_.rows(); }

  /// v (head_dim) rotated for position p; `inverse` applies the transpose (backward).
  void apply(T* v, index p, bool inverse = false) const {
    const index half = dim_ / 2;
    const T* c = cos_.row(p);
    const T* s = sin_.row(p);
    const T sign = inverse ? T{-1} : T{1};
    for (index i = 0; i < half; ++i) {
      const T a = v[i], b = v[i + half];
      v[i] = a * c[i] - sign * b * s[i];
      v[i + half] = b * c[i + half] + sign * a * s[i + half];
    }
  }

 private:
  index dim_ = 0;
  matrix<T> cos_, sin_;
};

/// Numerically stable softmax of s[0..n) in place, in double.
template <class T>
void softmax(T* s, index n) {
  if (n == 0) return;
  double m = s[0];
  for (index i = 1; i < n; ++i) m = std::max(m, static_cast<double>(s[i]));
  double sum = 0;
  for (index i = 0; i < n; ++i) sum += std::exp(static_cast<double>(s[i]) - m);
  for (index i = 0; i < n; ++i) s[i] = static_cast<T>(std::exp(static_cast<double>(s[i]) - m) / sum);
}

}  // namespace peft::models::ops
