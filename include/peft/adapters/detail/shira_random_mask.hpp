// peft/adapters/detail/shira_random_mask.hpp — SHiRA's size rule and its seeded random mask (the
// mask a fresh peft::shira starts with); the data-driven masks are in train/shira_masks.hpp.
// A mask is a (2, K) int32 matrix as PEFT stores shira_indices: row 0 output indices, row 1
// input indices, K distinct entries sorted row-major.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <unordered_set>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"

namespace peft {

/// PEFT's SHiRA size: K = r (d_out + d_in), the parameter count of a rank-r LoRA. shape_error
/// for r < 1, and (as PEFT raises) when K exceeds the d_out d_in entries of the weight.
inline index shira_mask_size(index d_out, index d_in, index r) {
  constexpr const char* where = "shira_mask_size";
  if (d_out < 1 || d_in < 1) {
    detail::raise<shape_error>(where, "the weight is " + detail::shape_string(d_out, d_in) + ", both sizes must be >= 1");
  }
  if (r < 1) detail::raise<shape_error>(where, "r must be >= 1, got " + std::to_string(r));
  const index k = r * (d_out + d_in);
  if (k > d_out * d_in) {
    detail::raise<shape_error>(where, "r = " + std::to_string(r) + " gives K = " + std::to_string(k) +
                                          " entries, more than the " + std::to_string(d_out * d_in) +
                                          " of a " + detail::shape_string(d_out, d_in) + " weight");
  }
  return k;
}

namespace detail {

/// Checks a mask request: sizes in [1, 2^31) (indices are int32), 0 <= k <= d_out d_in.
inline void shira_check_request(const char* where, index d_out, index d_in, index k) {
  constexpr index limit = std::numeric_limits<std::int32_t>::max();
  if (d_out < 1 || d_in < 1 || d_out > limit || d_in > limit) {
    raise<shape_error>(where, "the weight is " + shape_string(d_out, d_in) +
                                  ", both sizes must be in [1, 2^31) (indices are int32)");
  }
  if (k < 0 || k > d_out * d_in) {
    raise<shape_error>(where, "K = " + std::to_string(k) + " entries requested from a " + shape_string(d_out, d_in) +
                                  " weight (" + std::to_string(d_out * d_in) + " entries)");
  }
}

/// Flat row-major positions (row * d_in + col), sorted, as the (2, K) int32 index matrix.
inline matrix<std::int32_t> shira_positions_to_indices(std::vector<std::int64_t> pos, index d_in) {
  std::sort(pos.begin(), pos.end());
  const auto k = static_cast<index>(pos.size());
  matrix<std::int32_t> idx(2, k);
  for (index t = 0; t < k; ++t) {
    idx(0, t) = static_cast<std::int32_t>(pos[static_cast<std::size_t>(t)] / d_in);
    idx(1, t) = static_cast<std::int32_t>(pos[static_cast<std::size_t>(t)] % d_in);
  }
  return idx;
}

}  // namespace detail

/// SHiRA-Rand: K distinct entries drawn uniformly with peft::rng(seed) (Floyd's sampling, O(K)
/// memory), sorted row-major. The same seed gives the same mask on every platform; it is not
/// PEFT's torch.randperm mask (docs/methods/shira.md).
inline matrix<std::int32_t> shira_random_mask(index d_out, index d_in, index k, std::uint64_t seed) {
  detail::shira_check_request("shira_random_mask", d_out, d_in, k);
  const auto n = static_cast<std::uint64_t>(d_out * d_in);
  rng gen(seed);
  std::unordered_set<std::uint64_t> chosen;  // membership only: the output order is sorted
  chosen.reserve(static_cast<std::size_t>(k));
  std::vector<std::int64_t> pos;
  pos.reserve(static_cast<std::size_t>(k));
  for (std::uint64_t j = n - static_cast<std::uint64_t>(k); j < n; ++j) {
    const std::uint64_t t = gen.below(j + 1);
    if (chosen.insert(t).second) {
      pos.push_back(static_cast<std::int64_t>(t));
    } else {  // t was drawn before; j never was (every earlier draw is < j)
      chosen.insert(j);
      pos.push_back(static_cast<std::int64_t>(j));
    }
  }
  return detail::shira_positions_to_indices(std::move(pos), d_in);
}

}  // namespace peft
