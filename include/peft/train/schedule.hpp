// peft/train/schedule.hpp — learning-rate schedules as multipliers of the step count
// (transformers' warm-up, linear and cosine closed forms).
//
//   peft::train::adamw<float> opt(params, {.lr = 2e-4});
//   opt.set_schedule(peft::train::cosine_schedule_with_warmup(100, 1000));
//   for (...) { ...; opt.step(); }   // step k (0-based) uses lr * schedule(k)
//
// This is torch's LambdaLR with scheduler.step() after optimizer.step(): the first update uses
// schedule(0), which is 0 with warm-up. A negative step, warm-up or total is an error naming the
// schedule. Formulas: docs/training.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numbers>
#include <string>

#include "peft/core/error.hpp"

namespace peft::train {

/// The lr multiplier for the update that follows `step` completed optimizer steps.
using lr_schedule = std::function<double(std::int64_t step)>;

namespace detail {

inline void check_count(const char* where, const char* what, std::int64_t v) {
  if (v < 0) {
    std::string m = what;
    m += " must be >= 0, got ";
    m += std::to_string(v);
    peft::detail::raise<peft::error>(where, m);
  }
}

/// transformers' warm-up ramp: k / max(1, w).
inline double warmup_ramp(std::int64_t k, std::int64_t w) {
  return static_cast<double>(k) / static_cast<double>(std::max<std::int64_t>(1, w));
}

}  // namespace detail

/// 1 at every step (transformers' get_constant_schedule).
inline lr_schedule constant_schedule() {
  return [](std::int64_t step) {
    detail::check_count("constant_schedule", "step", step);
    return 1.0;
  };
}

/// Linear warm-up from 0 over `warmup` steps, then 1 (get_constant_schedule_with_warmup).
inline lr_schedule constant_schedule_with_warmup(std::int64_t warmup) {
  constexpr const char* where = "constant_schedule_with_warmup";
  detail::check_count(where, "warmup", warmup);
  return [warmup](std::int64_t step) {
    detail::check_count(where, "step", step);
    return step < warmup ? detail::warmup_ramp(step, warmup) : 1.0;
  };
}

/// Linear warm-up over `warmup` steps, then linear decay to 0 at `total` steps and 0 after
/// (get_linear_schedule_with_warmup).
inline lr_schedule linear_schedule_with_warmup(std::int64_t warmup, std::int64_t total) {
  constexpr const char* where = "linear_schedule_with_warmup";
  detail::check_count(where, "warmup", warmup);
  detail::check_count(where, "total", total);
  return [warmup, total](std::int64_t step) {
    detail::check_count(where, "step", step);
    if (step < warmup) return detail::warmup_ramp(step, warmup);
    const double left = static_cast<double>(total - step);
    const double span = static_cast<double>(std::max<std::int64_t>(1, total - warmup));
    return std::max(0.0, left / span);
  };
}

/// Linear warm-up over `warmup` steps, then a cosine from 1 down to 0 at `total` steps over
/// `num_cycles` periods (0.5: half a period, a single decay), clamped at 0
/// (get_cosine_schedule_with_warmup).
inline lr_schedule cosine_schedule_with_warmup(std::int64_t warmup, std::int64_t total,
                                               double num_cycles = 0.5) {
  constexpr const char* where = "cosine_schedule_with_warmup";
  detail::check_count(where, "warmup", warmup);
  detail::check_count(where, "total", total);
  if (!std::isfinite(num_cycles) || num_cycles < 0) {
    peft::detail::raise<peft::error>(where, "num_cycles must be finite and >= 0, got " + std::to_string(num_cycles));
  }
  return [warmup, total, num_cycles](std::int64_t step) {
    detail::check_count(where, "step", step);
    if (step < warmup) return detail::warmup_ramp(step, warmup);
    const double progress = static_cast<double>(step - warmup) /
                            static_cast<double>(std::max<std::int64_t>(1, total - warmup));
    const double angle = std::numbers::pi * num_cycles * 2.0 * progress;  // Python's left-to-right order
    return std::max(0.0, 0.5 * (1.0 + std::cos(angle)));
  };
}

}  // namespace peft::train
