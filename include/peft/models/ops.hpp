// peft/models/ops.hpp — rotary position embeddings: the tables of a model's config and their
// application to one head's vector (forward, and its transpose for backward). The other row-wise
// pieces of a block (norms, activations, the loss) are kernels/transformer.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "peft/core/matrix.hpp"
#include "peft/kernels/parallel.hpp"
#include "peft/models/config.hpp"

namespace peft::models::ops {

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

  /// apply() on every head of every row of x (rows, heads * head_dim): row r at position
  /// pos[r]; rows are split over threads.
  void apply_rows(T* x, index rows, index heads, const index* pos, bool inverse = false) const {
    const index ld = heads * dim_;
    kernels::parallel_ranges(rows, 1, 3.0 * static_cast<double>(rows) * static_cast<double>(ld),
                             [&](index first, index last) {
                               for (index r = first; r < last; ++r) {
                                 for (index h = 0; h < heads; ++h) apply(x + r * ld + h * dim_, pos[r], inverse);
                               }
                             });
  }

 private:
  index dim_ = 0;
  matrix<T> cos_, sin_;
};

}  // namespace peft::models::ops
