// peft/kernels/transformer.hpp — the row-wise pieces of a transformer block, vectorised and
// split over threads: RMSNorm (fused with the residual addition before it, and in backward with
// the residual gradient after it), LayerNorm, the MLP's gated activation (SwiGLU and the GELU
// forms) and the cross-entropy of rows of logits with its gradient.
//
//   kernels::add_rms_norm(x, a, w, rows, n, eps, h, y, inv);       // h = x + a, y = RMSNorm(h)
//   kernels::rms_norm_backward(h, w, inv, rows, n, dy, dh, nullptr, dres);   // dh = ... + dres
//   kernels::gated_activation(activation::silu, g, u, count, a);   // a = silu(g) * u
//   double loss = kernels::cross_entropy(z, rows, v, v, target, 1.0 / count, d, v);
//
// Same signatures and meaning as kernels/reference/transformer.hpp, the twin the tests compare
// against. Rows (or, for the activation, runs of values) are split over the threads of
// kernels/parallel.hpp. In float and on any ISA but the reference, the loops run on xsimd
// batches of the build's architecture (exp, erf, tanh of xsimd) with the sums in float lanes
// added in double once per row; the results then differ from the twin's by rounding (a few
// units in the last place of float). In double, and with the reference ISA active
// (PEFT_ISA=reference, PEFT_FORCE_REFERENCE), each range runs the twin's loops. Weight gradients
// of the norms (full fine-tuning) are sums over rows: those calls run the twin serially, so the
// result does not depend on the number of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <xsimd/xsimd.hpp>

#include "peft/core/activation.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/parallel.hpp"
#include "peft/kernels/reference/transformer.hpp"

namespace peft::kernels {

namespace detail {

/// Whether the f32 loops run vectorised now (every ISA but the reference).
inline bool rowwise_simd() { return active_isa() != isa::reference; }

using fbatch = xsimd::batch<float>;
inline constexpr index fwidth = static_cast<index>(fbatch::size);
inline constexpr std::size_t detail_lanes = fbatch::size;

/// sum a[i] * b[i] * c[i] (c null: sum a[i] * b[i]) over n floats, in float lanes, added in
/// double.
inline double dot_lanes(const float* a, const float* b, const float* c, index n) {
  fbatch acc(0.0f);
  index i = 0;
  for (; i + fwidth <= n; i += fwidth) {
    fbatch ab = fbatch::load_unaligned(a + i) * fbatch::load_unaligned(b + i);
    if (c != nullptr) ab *= fbatch::load_unaligned(c + i);
    acc += ab;
  }
  double s = static_cast<double>(xsimd::hadd(acc));
  for (; i < n; ++i) s += static_cast<double>(a[i]) * b[i] * (c != nullptr ? c[i] : 1.0f);
  return s;
}

/// The RMSNorm of one row of floats: y = w * x * s, s = 1 / sqrt(mean(x^2) + eps); returns s.
inline float rms_row(const float* x, const float* w, index n, double eps, float* y) {
  const auto s = static_cast<float>(1.0 / std::sqrt(dot_lanes(x, x, nullptr, n) / static_cast<double>(n) + eps));
  const fbatch vs(s);
  index i = 0;
  for (; i + fwidth <= n; i += fwidth) {
    (fbatch::load_unaligned(w + i) * (fbatch::load_unaligned(x + i) * vs)).store_unaligned(y + i);
  }
  for (; i < n; ++i) y[i] = w[i] * (x[i] * s);
  return s;
}

/// act(g) and, with `derivative`, act'(g) for a batch (or one value: B = float).
template <class B>
B act_value(activation a, B g) {
  switch (a) {
    case activation::silu: return g / (B(1.0f) + xsimd::exp(-g));
    case activation::gelu: return B(0.5f) * g * (B(1.0f) + xsimd::erf(g * B(0.70710678118654752f)));
    case activation::gelu_tanh:
      return B(0.5f) * g * (B(1.0f) + xsimd::tanh(B(0.79788456080286536f) * (g + B(0.044715f) * g * g * g)));
    case activation::relu: return xsimd::max(g, B(0.0f));
  }
  return g;
}

/// act(g) in `value` and act'(g) as the result.
template <class B>
B act_derivative(activation a, B g, B& value) {
  switch (a) {
    case activation::silu: {
      const B s = B(1.0f) / (B(1.0f) + xsimd::exp(-g));
      value = g * s;
      return s * (B(1.0f) + g * (B(1.0f) - s));
    }
    case activation::gelu: {
      const B cdf = B(0.5f) * (B(1.0f) + xsimd::erf(g * B(0.70710678118654752f)));
      value = g * cdf;
      return cdf + g * (xsimd::exp(B(-0.5f) * g * g) * B(0.39894228040143268f));
    }
    case activation::gelu_tanh: {
      const B c(0.79788456080286536f);
      const B t = xsimd::tanh(c * (g + B(0.044715f) * g * g * g));
      value = B(0.5f) * g * (B(1.0f) + t);
      return B(0.5f) * (B(1.0f) + t) + B(0.5f) * g * (B(1.0f) - t * t) * c * (B(1.0f) + B(3.0f * 0.044715f) * g * g);
    }
    case activation::relu: {
      value = xsimd::max(g, B(0.0f));
      return xsimd::select(g > B(0.0f), B(1.0f), B(0.0f));
    }
  }
  value = g;
  return B(1.0f);
}

/// One row of the cross-entropy in floats: returns log sum exp(z) - z[t], writes d when given.
inline double cross_entropy_row(const float* z, index v, long long t, double scale, float* d) {
  fbatch vm(-std::numeric_limits<float>::infinity());
  index j = 0;
  for (; j + fwidth <= v; j += fwidth) vm = xsimd::max(vm, fbatch::load_unaligned(z + j));
  alignas(64) float lanes[detail_lanes];
  vm.store_aligned(lanes);
  float m = lanes[0];
  for (index l = 1; l < fwidth; ++l) m = std::max(m, lanes[l]);
  for (; j < v; ++j) m = std::max(m, z[j]);
  if (!std::isfinite(m)) m = 0.0f;  // all -inf, or a NaN / +inf: let the sums say so
  const fbatch bm(m);
  fbatch acc(0.0f);
  j = 0;
  for (; j + fwidth <= v; j += fwidth) acc += xsimd::exp(fbatch::load_unaligned(z + j) - bm);
  double sum = static_cast<double>(xsimd::hadd(acc));
  for (; j < v; ++j) sum += static_cast<double>(std::exp(z[j] - m));
  const double lse = static_cast<double>(m) + std::log(sum);
  if (d != nullptr) {
    const auto lf = static_cast<float>(lse);
    const auto sf = static_cast<float>(scale);
    const fbatch bl(lf), bs(sf);
    j = 0;
    for (; j + fwidth <= v; j += fwidth) (xsimd::exp(fbatch::load_unaligned(z + j) - bl) * bs).store_unaligned(d + j);
    for (; j < v; ++j) d[j] = std::exp(z[j] - lf) * sf;
    d[t] -= sf;
  }
  return lse - static_cast<double>(z[t]);
}

}  // namespace detail

/// y = RMSNorm(x) with weight w per row; inv (rows) keeps 1/sqrt(mean(x^2) + eps).
template <class T>
void rms_norm(const T* x, const T* w, index rows, index n, double eps, T* y, T* inv) {
  const double work = 4.0 * static_cast<double>(rows) * static_cast<double>(n);
  parallel_ranges(rows, 1, work, [&](index first, index last) {
    if constexpr (std::is_same_v<T, float>) {
      if (detail::rowwise_simd()) {
        for (index r = first; r < last; ++r) inv[r] = detail::rms_row(x + r * n, w, n, eps, y + r * n);
        return;
      }
    }
    reference::rms_norm(x + first * n, w, last - first, n, eps, y + first * n, inv + first);
  });
}

/// h = x + a (a residual addition), then y = RMSNorm(h) as rms_norm: one pass over the rows.
template <class T>
void add_rms_norm(const T* x, const T* a, const T* w, index rows, index n, double eps, T* h, T* y, T* inv) {
  const double work = 5.0 * static_cast<double>(rows) * static_cast<double>(n);
  parallel_ranges(rows, 1, work, [&](index first, index last) {
    for (index r = first; r < last; ++r) {
      for (index i = r * n; i < (r + 1) * n; ++i) h[i] = x[i] + a[i];
      if constexpr (std::is_same_v<T, float>) {
        if (detail::rowwise_simd()) {
          inv[r] = detail::rms_row(h + r * n, w, n, eps, y + r * n);
          continue;
        }
      }
      reference::rms_norm(h + r * n, w, 1, n, eps, y + r * n, inv + r);
    }
  });
}

/// dx = (d RMSNorm / dx)^T dy (+ dres when not null) from the forward's x and inv; dw += the
/// weight's gradient when not null (then serially, the twin's loops).
template <class T>
void rms_norm_backward(const T* x, const T* w, const T* inv, index rows, index n, const T* dy, T* dx, T* dw,
                       const T* dres = nullptr) {
  if (dw != nullptr) {
    reference::rms_norm_backward(x, w, inv, rows, n, dy, dx, dw, dres);
    return;
  }
  const double work = 6.0 * static_cast<double>(rows) * static_cast<double>(n);
  parallel_ranges(rows, 1, work, [&](index first, index last) {
    if constexpr (std::is_same_v<T, float>) {
      if (detail::rowwise_simd()) {
        using B = detail::fbatch;
        constexpr index W = detail::fwidth;
        for (index r = first; r < last; ++r) {
          const float* xr = x + r * n;
          const float* dyr = dy + r * n;
          float* dxr = dx + r * n;
          const double s = inv[r];
          const double k = s * s * s * detail::dot_lanes(dyr, w, xr, n) / static_cast<double>(n);
          const B bs(static_cast<float>(s)), bk(static_cast<float>(k));
          index i = 0;
          for (; i + W <= n; i += W) {
            B v = xsimd::fms(bs * B::load_unaligned(dyr + i), B::load_unaligned(w + i), bk * B::load_unaligned(xr + i));
            if (dres != nullptr) v += B::load_unaligned(dres + r * n + i);
            v.store_unaligned(dxr + i);
          }
          for (; i < n; ++i) {
            dxr[i] = static_cast<float>(s) * dyr[i] * w[i] - static_cast<float>(k) * xr[i];
            if (dres != nullptr) dxr[i] += dres[r * n + i];
          }
        }
        return;
      }
    }
    reference::rms_norm_backward(x + first * n, w, inv + first, last - first, n, dy + first * n, dx + first * n,
                                 static_cast<T*>(nullptr), dres != nullptr ? dres + first * n : nullptr);
  });
}

/// y = LayerNorm(x) per row (the twin's loops over ranges of rows); stats (rows, 2).
template <class T>
void layer_norm(const T* x, const T* w, const T* b, index rows, index n, double eps, T* y, T* stats) {
  parallel_ranges(rows, 1, 6.0 * static_cast<double>(rows) * static_cast<double>(n), [&](index first, index last) {
    reference::layer_norm(x + first * n, w, b, last - first, n, eps, y + first * n, stats + 2 * first);
  });
}

/// LayerNorm's backward (+ dres); with dw or db (full fine-tuning) serially.
template <class T>
void layer_norm_backward(const T* x, const T* w, const T* stats, index rows, index n, const T* dy, T* dx, T* dw,
                         T* db, const T* dres = nullptr) {
  if (dw != nullptr || db != nullptr) {
    reference::layer_norm_backward(x, w, stats, rows, n, dy, dx, dw, db, dres);
    return;
  }
  parallel_ranges(rows, 1, 8.0 * static_cast<double>(rows) * static_cast<double>(n), [&](index first, index last) {
    reference::layer_norm_backward(x + first * n, w, stats + 2 * first, last - first, n, dy + first * n,
                                   dx + first * n, static_cast<T*>(nullptr), static_cast<T*>(nullptr),
                                   dres != nullptr ? dres + first * n : nullptr);
  });
}

/// out = a + b over count values (out may be a or b).
template <class T>
void add(const T* a, const T* b, index count, T* out) {
  parallel_ranges(count, 4096, static_cast<double>(count), [&](index first, index last) {
    for (index i = first; i < last; ++i) out[i] = a[i] + b[i];
  });
}

/// a = act(g) * u, or act(g) when u is null, over count values.
template <class T>
void gated_activation(activation act, const T* g, const T* u, index count, T* a) {
  parallel_ranges(count, 1024, 30.0 * static_cast<double>(count), [&](index first, index last) {
    if constexpr (std::is_same_v<T, float>) {
      if (detail::rowwise_simd()) {
        using B = detail::fbatch;
        index i = first;
        for (; i + detail::fwidth <= last; i += detail::fwidth) {
          B v = detail::act_value(act, B::load_unaligned(g + i));
          if (u != nullptr) v *= B::load_unaligned(u + i);
          v.store_unaligned(a + i);
        }
        reference::gated_activation(act, g + i, u != nullptr ? u + i : nullptr, last - i, a + i);
        return;
      }
    }
    reference::gated_activation(act, g + first, u != nullptr ? u + first : nullptr, last - first, a + first);
  });
}

/// dg = da * u * act'(g), du = da * act(g) (u null: dg = da * act'(g), du not written).
template <class T>
void gated_activation_backward(activation act, const T* g, const T* u, const T* da, index count, T* dg, T* du) {
  parallel_ranges(count, 1024, 40.0 * static_cast<double>(count), [&](index first, index last) {
    if constexpr (std::is_same_v<T, float>) {
      if (detail::rowwise_simd()) {
        using B = detail::fbatch;
        index i = first;
        for (; i + detail::fwidth <= last; i += detail::fwidth) {
          B value;
          const B d = detail::act_derivative(act, B::load_unaligned(g + i), value);
          const B dai = B::load_unaligned(da + i);
          if (u != nullptr) {
            (dai * value).store_unaligned(du + i);
            (dai * B::load_unaligned(u + i) * d).store_unaligned(dg + i);
          } else {
            (dai * d).store_unaligned(dg + i);
          }
        }
        reference::gated_activation_backward(act, g + i, u != nullptr ? u + i : nullptr, da + i, last - i, dg + i,
                                             u != nullptr ? du + i : nullptr);
        return;
      }
    }
    reference::gated_activation_backward(act, g + first, u != nullptr ? u + first : nullptr, da + first,
                                         last - first, dg + first, u != nullptr ? du + first : nullptr);
  });
}

/// The cross-entropy of rows of logits against targets (negative: skipped) and, with d, its
/// gradient times scale; returns the sum of the rows' losses, added in row order whatever the
/// number of threads.
template <class T>
double cross_entropy(const T* z, index rows, index v, index ldz, const long long* target, double scale, T* d,
                     index ldd) {
  std::vector<double> loss(static_cast<std::size_t>(rows), 0.0);
  parallel_ranges(rows, 1, 30.0 * static_cast<double>(rows) * static_cast<double>(v), [&](index first, index last) {
    for (index r = first; r < last; ++r) {
      if (target[r] < 0) continue;
      if constexpr (std::is_same_v<T, float>) {
        if (detail::rowwise_simd()) {
          loss[static_cast<std::size_t>(r)] =
              detail::cross_entropy_row(z + r * ldz, v, target[r], scale, d != nullptr ? d + r * ldd : nullptr);
          continue;
        }
      }
      loss[static_cast<std::size_t>(r)] = reference::cross_entropy(z + r * ldz, 1, v, ldz, target + r, scale,
                                                                   d != nullptr ? d + r * ldd : nullptr, ldd);
    }
  });
  double total = 0;
  for (const double l : loss) total += l;
  return total;
}

}  // namespace peft::kernels
