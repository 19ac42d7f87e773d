// peft/core/torch_generator.hpp — PyTorch's CPU generator, bit for bit.
//
// Some PEFT methods derive fixed, untrained structure from torch's generator instead of storing
// it (FourierFT draws its spectral locations with torch.randperm(n, generator=
// torch.Generator().manual_seed(seed))). Loading such a checkpoint needs the same numbers, so this
// file reproduces, for the CPU device:
//   - torch.Generator().manual_seed(seed): an MT19937 engine seeded with the low 32 bits of the
//     seed (a negative Python seed wraps to uint64 first, so -1 seeds 0xffffffff);
//   - random() (one 32-bit draw) and random64() (two draws, the first the high word), the
//     primitives ATen's CPUGeneratorImpl hands to its distributions;
//   - tensor.uniform_(from, to, generator=g) on CPU (ATen's uniform_real_distribution), one draw
//     per element in storage order: float keeps the low 24 bits of random(), double the low 53
//     of random64(), scaled by 2^-digits, then x (to - from) + from in the tensor's type as one
//     fused multiply-add (ATen's CPU kernels are built for AVX2 with FMA; checked against torch
//     2.15 on x86-64: bit-exact with the fma, 1-ulp differences without);
//   - torch.randperm(n, generator=g) on CPU (ATen's randperm_cpu): for n < 2^32 / 20 a
//     Fisher-Yates shuffle from the front with random() % (n - i); above that the "inside-out"
//     variant with random64() % (i + 1).
// randperm_prefix(n, k) gives the first k entries of randperm(n) without the n-entry array when n
// is below the threshold (the forward shuffle fixes entry i at step i); above it the whole
// permutation is needed and is built.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "peft/core/error.hpp"

namespace peft {

class torch_generator {
 public:
  /// torch.Generator().manual_seed(seed). A negative Python seed is passed as its uint64 wrap.
  explicit torch_generator(std::uint64_t seed) : engine_(static_cast<std::uint32_t>(seed & 0xffffffffu)) {}

  /// One 32-bit draw (CPUGeneratorImpl::random).
  std::uint32_t random() { return static_cast<std::uint32_t>(engine_()); }
  /// One 64-bit draw from two 32-bit ones, the first the high word (CPUGeneratorImpl::random64).
  std::uint64_t random64() {
    const std::uint64_t hi = random();
    const std::uint64_t lo = random();
    return (hi << 32) | lo;
  }

  /// One value of tensor.uniform_(from, to, generator=*this) for a float or double tensor on CPU;
  /// `from` and `to` are the Python doubles, cast to T first as ATen's kernel does.
  template <class T>
    requires std::is_same_v<T, float> || std::is_same_v<T, double>
  T uniform(double from, double to) {
    constexpr int digits = std::numeric_limits<T>::digits;  // 24, 53
    constexpr std::uint64_t mask = (std::uint64_t{1} << digits) - 1;
    constexpr T divisor = T{1} / static_cast<T>(std::uint64_t{1} << digits);
    const std::uint64_t v = std::is_same_v<T, double> ? random64() : std::uint64_t{random()};
    const T x = static_cast<T>(v & mask) * divisor;
    const T lo = static_cast<T>(from);
    const T hi = static_cast<T>(to);
    return std::fma(x, hi - lo, lo);
  }

  /// n from which randperm switches from the front shuffle with 32-bit draws to the inside-out
  /// shuffle with 64-bit draws.
  static constexpr std::int64_t randperm_threshold = std::int64_t{0xffffffff} / 20;

  /// torch.randperm(n, generator=*this) on CPU; advances the generator as torch does.
  std::vector<std::int64_t> randperm(std::int64_t n) {
    if (n < 0) throw shape_error("[torch_generator::randperm] n must be non-negative, got " + std::to_string(n));
    std::vector<std::int64_t> r(static_cast<std::size_t>(n));
    if (n < randperm_threshold) {
      for (std::int64_t i = 0; i < n; ++i) r[static_cast<std::size_t>(i)] = i;
      for (std::int64_t i = 0; i + 1 < n; ++i) {
        const auto z = static_cast<std::int64_t>(random() % static_cast<std::uint64_t>(n - i));
        std::swap(r[static_cast<std::size_t>(i)], r[static_cast<std::size_t>(i + z)]);
      }
      return r;
    }
    for (std::int64_t i = 0; i < n; ++i) {
      const auto z = static_cast<std::size_t>(random64() % static_cast<std::uint64_t>(i + 1));
      r[static_cast<std::size_t>(i)] = r[z];
      r[z] = i;
    }
    return r;
  }

  /// torch.randperm(n, generator=*this)[:k] on CPU. Below randperm_threshold it costs O(k) time
  /// and memory (only the displaced entries are kept) and leaves the generator after k draws
  /// instead of n - 1 (torch's generator would be further on; callers here use a fresh one).
  std::vector<std::int64_t> randperm_prefix(std::int64_t n, std::int64_t k) {
    if (n < 0 || k < 0 || k > n) {
      throw shape_error("[torch_generator::randperm_prefix] need 0 <= k <= n, got n = " + std::to_string(n) +
                        ", k = " + std::to_string(k));
    }
    if (n >= randperm_threshold) {
      std::vector<std::int64_t> r = randperm(n);
      r.resize(static_cast<std::size_t>(k));
      r.shrink_to_fit();
      return r;
    }
    // moved[p] is the entry at position p > i once it differs from p.
    std::unordered_map<std::int64_t, std::int64_t> moved;
    moved.reserve(static_cast<std::size_t>(k));
    const auto at = [&](std::int64_t p) {
      const auto it = moved.find(p);
      return it == moved.end() ? p : it->second;
    };
    std::vector<std::int64_t> r(static_cast<std::size_t>(k));
    for (std::int64_t i = 0; i < k; ++i) {
      // Torch draws n - 1 times; the last position takes what is left without a draw.
      const std::int64_t z = i + 1 < n ? static_cast<std::int64_t>(random() % static_cast<std::uint64_t>(n - i)) : 0;
      const std::int64_t here = at(i);
      r[static_cast<std::size_t>(i)] = at(i + z);
      if (z != 0) moved[i + z] = here;
      moved.erase(i);
    }
    return r;
  }

 private:
  std::mt19937 engine_;
};

}  // namespace peft
