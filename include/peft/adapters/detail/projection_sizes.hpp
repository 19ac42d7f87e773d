// peft/adapters/detail/projection_sizes.hpp — the sizes of projections shared by every adapted layer
// of a model (VeRA's, RandLoRA's): the largest in_features and out_features over the layers.
#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <utility>

#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"

namespace peft::detail {

struct projection_sizes {
  index in_max = 0;
  index out_max = 0;
};

/// The largest (in, out) over `layers` given as (in_features, out_features) pairs; shape_error
/// naming `where` for rank < 1, no layer, or a size < 1.
inline projection_sizes shared_projection_sizes(const char* where, index rank,
                                                std::span<const std::pair<index, index>> layers) {
  if (rank < 1) raise<shape_error>(where, "rank must be >= 1, got " + std::to_string(rank));
  if (layers.empty()) raise<shape_error>(where, "no layer given");
  projection_sizes s;
  for (const auto& [in, out] : layers) {
    if (in < 1 || out < 1) {
      raise<shape_error>(where, "a layer has in_features " + std::to_string(in) + " and out_features " +
                                    std::to_string(out) + "; both must be >= 1");
    }
    s.in_max = std::max(s.in_max, in);
    s.out_max = std::max(s.out_max, out);
  }
  return s;
}

}  // namespace peft::detail
