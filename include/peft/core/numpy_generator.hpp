// peft/core/numpy_generator.hpp — NumPy's default generator, bit for bit.
//
// UniLoRA (PEFT's tuners/unilora) assigns its shared-vector indices with
// numpy.random.default_rng(seed) rather than torch's generator. Loading or rebuilding such an
// adapter needs the same numbers, so this file reproduces, for a non-negative integer seed:
//   - SeedSequence(seed).generate_state(4, uint64) (pool of 4 words, NumPy's hash mixing);
//   - PCG64 seeded from it (128-bit LCG, XSL-RR output), next_uint64 and the buffered
//     next_uint32 (the low half of a 64-bit draw first, the high half on the next call);
//   - Generator.integers' bounded draws (Lemire's method, random_bounded_uint64) and the masked
//     rejection draw behind Generator.shuffle (random_interval);
//   - Generator.choice(n, size, replace=False) (Floyd's algorithm then a shuffle of the sample,
//     or a partial tail shuffle of arange(n) when n > 10000 and size > n / 50) and
//     Generator.shuffle of a 1-D array.
// Checked against numpy 2.4 by tests/adapters/test_unilora.cpp (tests/data/unilora_index, made by
// scripts/make_unilora_index_reference.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"

namespace peft {

class numpy_generator {
 public:
  /// numpy.random.default_rng(seed) for a non-negative integer seed (of at most 64 bits).
  explicit numpy_generator(std::uint64_t seed) {
    const auto s = seed_state(seed);
    const u128 init = (u128(s[0]) << 64) | s[1];
    const u128 seq = (u128(s[2]) << 64) | s[3];
    state_ = 0;
    inc_ = (seq << 1) | 1u;
    step();
    state_ += init;
    step();
  }

  /// PCG64.random_raw(): one 64-bit draw.
  std::uint64_t next_uint64() {
    step();
    const auto x = static_cast<std::uint64_t>(state_ >> 64) ^ static_cast<std::uint64_t>(state_);
    const unsigned rot = static_cast<unsigned>(state_ >> 122);
    return (x >> rot) | (x << ((64u - rot) & 63u));
  }
  /// next_uint32: the low half of a 64-bit draw, its high half kept for the next call.
  std::uint32_t next_uint32() {
    if (has_uint32_) {
      has_uint32_ = false;
      return uinteger_;
    }
    const std::uint64_t v = next_uint64();
    has_uint32_ = true;
    uinteger_ = static_cast<std::uint32_t>(v >> 32);
    return static_cast<std::uint32_t>(v);
  }

  /// A uniform integer in [0, rng] by Lemire's method (NumPy's random_bounded_uint64, unmasked).
  std::uint64_t bounded(std::uint64_t rng) {
    if (rng == 0) return 0;
    if (rng <= 0xffffffffULL) {
      if (rng == 0xffffffffULL) return next_uint32();
      const auto r32 = static_cast<std::uint32_t>(rng);
      const std::uint32_t excl = r32 + 1u;
      std::uint64_t m = std::uint64_t{next_uint32()} * excl;
      auto left = static_cast<std::uint32_t>(m);
      if (left < excl) {
        const std::uint32_t threshold = (0xffffffffu - r32) % excl;
        while (left < threshold) {
          m = std::uint64_t{next_uint32()} * excl;
          left = static_cast<std::uint32_t>(m);
        }
      }
      return m >> 32;
    }
    if (rng == ~std::uint64_t{0}) return next_uint64();
    const std::uint64_t excl = rng + 1;
    u128 m = u128(next_uint64()) * excl;
    auto left = static_cast<std::uint64_t>(m);
    if (left < excl) {
      const std::uint64_t threshold = (~std::uint64_t{0} - rng) % excl;
      while (left < threshold) {
        m = u128(next_uint64()) * excl;
        left = static_cast<std::uint64_t>(m);
      }
    }
    return static_cast<std::uint64_t>(m >> 64);
  }

  /// A uniform integer in [0, max] by masked rejection (NumPy's random_interval).
  std::uint64_t interval(std::uint64_t max) {
    if (max == 0) return 0;
    std::uint64_t mask = max;
    for (unsigned s : {1u, 2u, 4u, 8u, 16u, 32u}) mask |= mask >> s;
    std::uint64_t v;
    if (max <= 0xffffffffULL) {
      while ((v = (next_uint32() & mask)) > max) {
      }
    } else {
      while ((v = (next_uint64() & mask)) > max) {
      }
    }
    return v;
  }

  /// Generator.shuffle(x) of a 1-D array.
  template <class V>
  void shuffle(std::vector<V>& x) {
    for (std::size_t i = x.size(); i-- > 1;) std::swap(x[i], x[static_cast<std::size_t>(interval(i))]);
  }

  /// Generator.choice(n, size, replace=False) (shuffle=True): `size` distinct values of [0, n).
  std::vector<std::int64_t> choice_without_replacement(std::int64_t n, std::int64_t size) {
    if (n < 0 || size < 0 || size > n) {
      throw shape_error("[numpy_generator::choice_without_replacement] need 0 <= size <= n, got n = " +
                        std::to_string(n) + ", size = " + std::to_string(size));
    }
    std::vector<std::int64_t> out;
    if (n > 10000 && size > n / 50) {
      // Tail shuffle of arange(n): positions n - 1 down to max(n - size, 1).
      std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
      for (std::int64_t i = 0; i < n; ++i) idx[static_cast<std::size_t>(i)] = i;
      const std::int64_t first = std::max<std::int64_t>(n - size, 1);
      for (std::int64_t i = n - 1; i >= first; --i) {
        const auto j = static_cast<std::size_t>(bounded(static_cast<std::uint64_t>(i)));
        std::swap(idx[static_cast<std::size_t>(i)], idx[j]);
      }
      out.assign(idx.end() - size, idx.end());
      return out;
    }
    // Floyd's algorithm, then a shuffle of the sample with bounded draws.
    out.resize(static_cast<std::size_t>(size));
    std::unordered_set<std::int64_t> seen;
    seen.reserve(static_cast<std::size_t>(size));
    for (std::int64_t j = n - size; j < n; ++j) {
      auto v = static_cast<std::int64_t>(bounded(static_cast<std::uint64_t>(j)));
      if (!seen.insert(v).second) {
        v = j;
        seen.insert(v);
      }
      out[static_cast<std::size_t>(j - n + size)] = v;
    }
    for (std::int64_t i = size - 1; i >= 1; --i) {
      const auto j = static_cast<std::size_t>(bounded(static_cast<std::uint64_t>(i)));
      std::swap(out[static_cast<std::size_t>(i)], out[j]);
    }
    return out;
  }

 private:
  __extension__ typedef unsigned __int128 u128;

  void step() {
    constexpr u128 mult = (u128(2549297995355413924ULL) << 64) | 4865540595714422341ULL;
    state_ = state_ * mult + inc_;
  }

  /// SeedSequence(seed).generate_state(4, np.uint64).
  static std::vector<std::uint64_t> seed_state(std::uint64_t seed) {
    std::vector<std::uint32_t> entropy;
    if (seed == 0) entropy.push_back(0);
    for (std::uint64_t s = seed; s > 0; s >>= 32) entropy.push_back(static_cast<std::uint32_t>(s));
    std::uint32_t hash_const = 0x43b0d7e5u;
    auto hashmix = [&](std::uint32_t v) {
      v ^= hash_const;
      hash_const *= 0x931e8875u;
      v *= hash_const;
      v ^= v >> 16;
      return v;
    };
    auto mix = [](std::uint32_t x, std::uint32_t y) {
      std::uint32_t r = 0xca01f9ddu * x - 0x4973f715u * y;
      r ^= r >> 16;
      return r;
    };
    constexpr std::size_t pool_size = 4;
    std::uint32_t pool[pool_size];
    for (std::size_t i = 0; i < pool_size; ++i) pool[i] = hashmix(i < entropy.size() ? entropy[i] : 0u);
    for (std::size_t s = 0; s < pool_size; ++s)
      for (std::size_t d = 0; d < pool_size; ++d)
        if (s != d) pool[d] = mix(pool[d], hashmix(pool[s]));
    for (std::size_t s = pool_size; s < entropy.size(); ++s)
      for (std::size_t d = 0; d < pool_size; ++d) pool[d] = mix(pool[d], hashmix(entropy[s]));
    std::uint32_t hc = 0x8b51f9ddu;
    std::vector<std::uint32_t> words(8);
    for (std::size_t i = 0; i < words.size(); ++i) {
      std::uint32_t v = pool[i % pool_size];
      v ^= hc;
      hc *= 0x58f38dedu;
      v *= hc;
      v ^= v >> 16;
      words[i] = v;
    }
    std::vector<std::uint64_t> out(4);
    for (std::size_t i = 0; i < 4; ++i) out[i] = std::uint64_t{words[2 * i]} | (std::uint64_t{words[2 * i + 1]} << 32);
    return out;
  }

  u128 state_ = 0;
  u128 inc_ = 0;
  bool has_uint32_ = false;
  std::uint32_t uinteger_ = 0;
};

}  // namespace peft
