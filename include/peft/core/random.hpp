// peft/core/random.hpp — a seedable, platform-independent generator for initialisers.
//
// xoshiro256++ seeded through splitmix64, with uniform and normal draws written here (the
// standard library's distributions differ between implementations), so a seed gives the same
// adapter on every compiler. It does not reproduce PyTorch's generator.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

namespace peft {

class rng {
 public:
  explicit rng(std::uint64_t seed = 0x5eed) noexcept {
    for (auto& s : s_) {
      seed += 0x9e3779b97f4a7c15ull;
      std::uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      s = z ^ (z >> 31);
    }
  }

  /// 64 random bits.
  std::uint64_t next() noexcept {
    const std::uint64_t result = rotl(s_[0] + s_[3], 23) + s_[0];
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }

  /// Uniform in [0, 1), 53 random bits.
  double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1p-53; }
  /// Uniform in [lo, hi).
  double uniform(double lo, double hi) noexcept { return lo + (hi - lo) * uniform(); }
  /// Normal(mean, stddev), Box-Muller.
  double normal(double mean = 0.0, double stddev = 1.0) noexcept {
    if (has_spare_) {
      has_spare_ = false;
      return mean + stddev * spare_;
    }
    double u1 = 0.0;
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform();
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double angle = 2.0 * std::numbers::pi * u2;
    spare_ = radius * std::sin(angle);
    has_spare_ = true;
    return mean + stddev * radius * std::cos(angle);
  }
  /// Uniform integer in [0, n); n > 0.
  std::uint64_t below(std::uint64_t n) noexcept {
    // Reject the 2^64 mod n lowest values so every residue is equally likely.
    const std::uint64_t threshold = (0 - n) % n;
    std::uint64_t r = next();
    while (r < threshold) r = next();
    return r % n;
  }

 private:
  static constexpr std::uint64_t rotl(std::uint64_t x, int k) noexcept {
    return (x << k) | (x >> (64 - k));
  }
  std::uint64_t s_[4]{};
  double spare_ = 0.0;
  bool has_spare_ = false;
};

}  // namespace peft
