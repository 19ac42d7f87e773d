// peft/train/clip.hpp — global-norm gradient clipping, torch.nn.utils.clip_grad_norm_.
//
//   const double norm = peft::train::clip_grad_norm(params, 1.0);   // between backward and step
//
// The gradients taken are those an optimizer steps: trainable, non-integer parameters with a
// non-empty gradient, each gradient once (shared tensors, listed by several layers with the same
// gradient memory, count once). With n_i the norm of gradient i,
//   total = || (n_1, n_2, ...) ||_p,   coef = min(max_norm / (total + 1e-6), 1),   g *= coef,
// every gradient multiplied (by exactly 1 when nothing is clipped). The norms are accumulated in
// double; the coefficient is rounded to T once. Returns `total`, the norm BEFORE clipping.
// p = 2 by default; any p > 0 and p = infinity (max |g|) are accepted, as in PyTorch.
// A non-finite total is returned as is (the gradients become NaN, PyTorch's default) unless
// `error_if_nonfinite`, which throws peft::error and leaves the gradients untouched.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <string>
#include <unordered_set>
#include <vector>

#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"

namespace peft::train {

/// Scales the gradients of `params` so that their joint p-norm is at most `max_norm`; returns the
/// norm before scaling. peft::error for a negative or NaN max_norm, or p <= 0 / NaN.
template <compute_scalar T>
double clip_grad_norm(std::span<const parameter<T>> params, double max_norm, double norm_type = 2.0,
                      bool error_if_nonfinite = false) {
  constexpr const char* where = "clip_grad_norm";
  if (!(max_norm >= 0)) {
    peft::detail::raise<peft::error>(where, "max_norm must be >= 0, got " + std::to_string(max_norm));
  }
  if (!(norm_type > 0)) {
    peft::detail::raise<peft::error>(where, "norm_type must be > 0 or infinity, got " + std::to_string(norm_type));
  }
  const bool inf_norm = std::isinf(norm_type);
  std::vector<matrix_view<T>> grads;
  std::unordered_set<const T*> seen;
  for (const auto& p : params) {
    if (!p.trainable || p.integer || p.grad.empty()) continue;
    if (!seen.insert(p.grad.data()).second) continue;  // a shared gradient counts once
    grads.push_back(p.grad);
  }
  // Per-tensor norms, then the norm of those (PyTorch's order), in double.
  double total = 0.0;
  for (const auto& g : grads) {
    double n = 0.0;
    for (index i = 0; i < g.rows(); ++i) {
      const T* row = g.row(i);
      for (index j = 0; j < g.cols(); ++j) {
        const double a = std::abs(static_cast<double>(row[j]));
        if (inf_norm) {
          n = std::isnan(a) || std::isnan(n) ? std::numeric_limits<double>::quiet_NaN() : std::max(n, a);
        } else if (norm_type == 2.0) {
          n += a * a;
        } else {
          n += std::pow(a, norm_type);
        }
      }
    }
    if (inf_norm) {
      total = std::isnan(n) || std::isnan(total) ? std::numeric_limits<double>::quiet_NaN() : std::max(total, n);
    } else {
      n = norm_type == 2.0 ? std::sqrt(n) : std::pow(n, 1.0 / norm_type);
      total += norm_type == 2.0 ? n * n : std::pow(n, norm_type);
    }
  }
  if (!inf_norm) total = norm_type == 2.0 ? std::sqrt(total) : std::pow(total, 1.0 / norm_type);
  if (error_if_nonfinite && !std::isfinite(total)) {
    peft::detail::raise<peft::error>(where, "the total gradient norm is " + std::to_string(total) +
                                                ", not finite (error_if_nonfinite is set)");
  }
  const double coef = max_norm / (total + 1e-6);
  const T scale = static_cast<T>(std::isnan(coef) ? coef : std::min(coef, 1.0));
  for (const auto& g : grads) {
    for (index i = 0; i < g.rows(); ++i) {
      T* row = g.row(i);
      for (index j = 0; j < g.cols(); ++j) row[j] *= scale;
    }
  }
  return total;
}

/// The same for a vector of parameters (what adapters' parameters() return).
template <compute_scalar T>
double clip_grad_norm(const std::vector<parameter<T>>& params, double max_norm, double norm_type = 2.0,
                      bool error_if_nonfinite = false) {
  return clip_grad_norm(std::span<const parameter<T>>(params), max_norm, norm_type, error_if_nonfinite);
}

}  // namespace peft::train
