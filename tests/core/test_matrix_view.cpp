// matrix_view, matrix and peft::rng.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/core/random.hpp"
#include "support/test_support.hpp"

namespace test_matrix_view {

using ix = peft::index;

TEST_CASE("matrix_view addresses data[i * stride + j]", "[matrix_view]") {
  std::vector<int> buf(6 * 10);
  std::iota(buf.begin(), buf.end(), 0);

  peft::matrix_view<int> dense(buf.data(), 6, 10);
  CHECK(dense.rows() == 6);
  CHECK(dense.cols() == 10);
  CHECK(dense.stride() == 10);
  CHECK(dense.size() == 60);
  CHECK(dense.contiguous());
  CHECK_FALSE(dense.empty());
  CHECK(dense(3, 7) == 37);
  CHECK(dense.row(4) == buf.data() + 40);

  // A 4 x 3 view with rows 10 apart: a strided window.
  peft::matrix_view<int> strided(buf.data() + 2, 4, 3, 10);
  CHECK_FALSE(strided.contiguous());
  for (ix i = 0; i < 4; ++i) {
    for (ix j = 0; j < 3; ++j) CHECK(strided(i, j) == 10 * i + j + 2);
  }
  strided(1, 2) = -1;  // writes land in the underlying buffer
  CHECK(buf[14] == -1);

  // Deduction guides.
  peft::matrix_view deduced(buf.data(), 2, 3);
  static_assert(std::is_same_v<decltype(deduced), peft::matrix_view<int>>);
  const int* cp = buf.data();
  peft::matrix_view cdeduced(cp, 2, 3, 10);
  static_assert(std::is_same_v<decltype(cdeduced), peft::matrix_view<const int>>);
  CHECK(cdeduced(1, 0) == 10);

  // Degenerate shapes.
  CHECK(peft::matrix_view<int>().empty());
  CHECK(peft::matrix_view<int>(buf.data(), 0, 5).empty());
  CHECK(peft::matrix_view<int>(buf.data(), 5, 0).empty());
  CHECK(peft::matrix_view<int>(buf.data(), 1, 5, 99).contiguous());  // one row is contiguous
}

TEST_CASE("row_block and block are views into the same memory", "[matrix_view]") {
  std::vector<double> buf(7 * 9);
  std::iota(buf.begin(), buf.end(), 0.0);
  peft::matrix_view<double> v(buf.data(), 7, 9);

  auto rb = v.row_block(2, 3);
  CHECK(rb.rows() == 3);
  CHECK(rb.cols() == 9);
  CHECK(rb.stride() == 9);
  CHECK(rb.data() == buf.data() + 18);
  CHECK(rb(2, 8) == 4 * 9 + 8);

  auto b = v.block(1, 2, 4, 5);
  CHECK(b.rows() == 4);
  CHECK(b.cols() == 5);
  CHECK(b.stride() == 9);
  CHECK_FALSE(b.contiguous());
  for (ix i = 0; i < 4; ++i) {
    for (ix j = 0; j < 5; ++j) CHECK(b(i, j) == (i + 1) * 9 + (j + 2));
  }
  // Nested blocks compose offsets.
  auto bb = b.block(1, 1, 2, 2);
  CHECK(bb.data() == buf.data() + 2 * 9 + 3);
  CHECK(bb(1, 1) == 3 * 9 + 4);
  auto rbb = b.row_block(3, 1);
  CHECK(rbb(0, 4) == 4 * 9 + 6);

  bb(0, 0) = -5.0;
  CHECK(v(2, 3) == -5.0);
  CHECK(b(1, 1) == -5.0);
}

TEST_CASE("a mutable view converts to a const view, not the other way", "[matrix_view]") {
  std::vector<float> buf{1, 2, 3, 4, 5, 6, 7, 8};
  peft::matrix_view<float> v(buf.data(), 2, 3, 4);
  peft::matrix_view<const float> c = v;
  CHECK(c.data() == v.data());
  CHECK(c.rows() == 2);
  CHECK(c.cols() == 3);
  CHECK(c.stride() == 4);
  CHECK(c(1, 2) == 7.0f);
  static_assert(std::is_convertible_v<peft::matrix_view<float>, peft::matrix_view<const float>>);
  static_assert(!std::is_convertible_v<peft::matrix_view<const float>, peft::matrix_view<float>>);
  static_assert(!std::is_convertible_v<peft::matrix_view<float>, peft::matrix_view<const double>>);
  static_assert(std::is_same_v<peft::matrix_view<const float>::value_type, float>);
}

TEST_CASE("expect_shape reports shape, stride and null-view errors", "[matrix_view]") {
  std::vector<float> buf(12);
  peft::matrix_view<float> v(buf.data(), 3, 4);
  CHECK_NOTHROW(peft::detail::expect_shape("f", "x", v, 3, 4));
  try {
    peft::detail::expect_shape("f", "x", v, 3, 5);
    FAIL("no throw");
  } catch (const peft::shape_error& e) {
    CHECK(std::string(e.what()) == "[f] x is (3, 4), expected (3, 5)");
  }
  CHECK_THROWS_AS(peft::detail::expect_shape("f", "x", peft::matrix_view<float>(buf.data(), 3, 4, 2), 3, 4),
                  peft::shape_error);
  CHECK_THROWS_AS(peft::detail::expect_shape("f", "x", peft::matrix_view<float>(nullptr, 3, 4), 3, 4),
                  peft::shape_error);
  CHECK_NOTHROW(peft::detail::expect_shape("f", "x", peft::matrix_view<float>(nullptr, 0, 4), 0, 4));
}

TEST_CASE("matrix owns row-major storage and converts to views", "[matrix_view]") {
  peft::matrix<double> m(3, 4, 2.5);
  CHECK(m.rows() == 3);
  CHECK(m.cols() == 4);
  CHECK(m.size() == 12);
  CHECK_FALSE(m.empty());
  for (double v : m.storage()) CHECK(v == 2.5);

  peft::matrix<int> n(2, 3, std::vector<int>{1, 2, 3, 4, 5, 6});
  CHECK(n(1, 0) == 4);
  CHECK(n.row(1)[2] == 6);
  CHECK(n.data() + 3 == n.row(1));

  peft::matrix_view<int> v = n;  // implicit conversion
  CHECK(v.data() == n.data());
  CHECK(v.stride() == 3);
  v(0, 1) = 20;
  CHECK(n(0, 1) == 20);
  const auto& cn = n;
  peft::matrix_view<const int> cv = cn;
  CHECK(cv(0, 1) == 20);

  n.fill(7);
  CHECK(std::all_of(n.storage().begin(), n.storage().end(), [](int x) { return x == 7; }));

  // A deep copy of a strided view.
  std::vector<int> buf(20);
  std::iota(buf.begin(), buf.end(), 0);
  const auto copy = peft::to_matrix(peft::matrix_view<const int>(buf.data() + 1, 3, 2, 5));
  CHECK(copy.rows() == 3);
  CHECK(copy.cols() == 2);
  CHECK(copy.view().stride() == 2);
  CHECK(copy(0, 0) == 1);
  CHECK(copy(2, 1) == 12);
  buf[1] = 99;
  CHECK(copy(0, 0) == 1);  // not aliased

  CHECK(peft::matrix<float>().empty());
  CHECK(peft::matrix<float>(0, 5).empty());
}

TEST_CASE("matrix rejects a wrong value count and negative dimensions", "[matrix_view]") {
  CHECK_THROWS_AS(peft::matrix<float>(2, 3, std::vector<float>(5)), peft::shape_error);
  CHECK_THROWS_AS(peft::matrix<float>(2, 3, std::vector<float>(7)), peft::shape_error);
  try {
    peft::matrix<float>(2, 3, std::vector<float>(5));
    FAIL("no throw");
  } catch (const peft::shape_error& e) {
    CHECK(std::string(e.what()) == "[matrix::matrix] 5 values for a (2, 3) matrix");
  }
  CHECK_THROWS_AS(peft::matrix<float>(-1, 3), peft::shape_error);
  CHECK_THROWS_AS(peft::matrix<float>(3, -2), peft::shape_error);
  CHECK_NOTHROW(peft::matrix<float>(0, 0, std::vector<float>{}));
  static_assert(std::is_base_of_v<peft::error, peft::shape_error>);
  static_assert(std::is_base_of_v<std::runtime_error, peft::error>);
}

namespace {

/// xoshiro256++ seeded with splitmix64, written from the published reference code.
struct reference_rng {
  std::uint64_t s[4];
  explicit reference_rng(std::uint64_t seed) {
    std::uint64_t x = seed;
    for (auto& w : s) {
      std::uint64_t z = (x += 0x9e3779b97f4a7c15ull);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      w = z ^ (z >> 31);
    }
  }
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  std::uint64_t next() {
    const std::uint64_t result = rotl(s[0] + s[3], 23) + s[0];
    const std::uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
  }
};

}  // namespace

TEST_CASE("rng is xoshiro256++ seeded by splitmix64, deterministic per seed", "[matrix_view][rng]") {
  for (std::uint64_t seed : {0ull, 1ull, 0x5eedull, 0xffffffffffffffffull}) {
    peft::rng a(seed);
    reference_rng ref(seed);
    bool same = true;
    for (int i = 0; i < 1000; ++i) same = same && a.next() == ref.next();
    INFO("seed " << seed);
    CHECK(same);
  }
  // Same seed: same stream, across every draw kind.
  peft::rng a(42), b(42);
  for (int i = 0; i < 200; ++i) {
    REQUIRE(a.next() == b.next());
    REQUIRE(a.uniform() == b.uniform());
    REQUIRE(a.normal() == b.normal());
    REQUIRE(a.below(17) == b.below(17));
  }
  // Different seeds (even adjacent ones) give different streams.
  peft::rng c(42), d(43), e(0);
  int equal_cd = 0, equal_ce = 0;
  for (int i = 0; i < 1000; ++i) {
    const auto vc = c.next();
    equal_cd += vc == d.next() ? 1 : 0;
    equal_ce += vc == e.next() ? 1 : 0;
  }
  CHECK(equal_cd == 0);
  CHECK(equal_ce == 0);
  // The default seed is fixed.
  peft::rng f, g(0x5eed);
  CHECK(f.next() == g.next());
}

TEST_CASE("rng uniform draws are in range with the right moments", "[matrix_view][rng]") {
  peft::rng gen(7);
  const int n = 200000;
  double sum = 0.0, sum2 = 0.0, lo = 1.0, hi = 0.0;
  for (int i = 0; i < n; ++i) {
    const double u = gen.uniform();
    REQUIRE(u >= 0.0);
    REQUIRE(u < 1.0);
    sum += u;
    sum2 += u * u;
    lo = std::min(lo, u);
    hi = std::max(hi, u);
  }
  const double mean = sum / n;
  const double var = sum2 / n - mean * mean;
  CHECK(std::abs(mean - 0.5) < 0.005);        // 5 standard errors
  CHECK(std::abs(var - 1.0 / 12.0) < 0.002);
  CHECK(lo < 1e-3);
  CHECK(hi > 1.0 - 1e-3);

  double sum_ab = 0.0;
  for (int i = 0; i < 20000; ++i) {
    const double u = gen.uniform(-3.0, 5.0);
    REQUIRE(u >= -3.0);
    REQUIRE(u < 5.0);
    sum_ab += u;
  }
  CHECK(std::abs(sum_ab / 20000 - 1.0) < 0.1);
}

TEST_CASE("rng normal draws have the requested mean and deviation", "[matrix_view][rng]") {
  peft::rng gen(11);
  const int n = 200000;
  for (auto [mu, sigma] : {std::pair{0.0, 1.0}, std::pair{3.0, 0.25}, std::pair{-1.0, 4.0}}) {
    double sum = 0.0, sum2 = 0.0, beyond3 = 0.0;
    for (int i = 0; i < n; ++i) {
      const double v = gen.normal(mu, sigma);
      REQUIRE(std::isfinite(v));
      sum += v;
      sum2 += v * v;
      beyond3 += std::abs(v - mu) > 3 * sigma ? 1.0 : 0.0;
    }
    const double mean = sum / n;
    const double sd = std::sqrt(sum2 / n - mean * mean);
    INFO("mu " << mu << " sigma " << sigma);
    CHECK(std::abs(mean - mu) < 0.01 * sigma);
    CHECK(std::abs(sd - sigma) < 0.01 * sigma);
    CHECK(std::abs(beyond3 / n - 0.0027) < 0.0006);  // a Gaussian tail, not uniform
  }
}

TEST_CASE("rng below(n) is in range and covers every residue evenly", "[matrix_view][rng]") {
  peft::rng gen(5);
  for (int i = 0; i < 100; ++i) CHECK(gen.below(1) == 0);
  std::vector<int> counts(7);
  const int n = 70000;
  for (int i = 0; i < n; ++i) {
    const auto r = gen.below(7);
    REQUIRE(r < 7);
    ++counts[r];
  }
  double chi2 = 0.0;
  for (int c : counts) chi2 += (c - n / 7.0) * (c - n / 7.0) / (n / 7.0);
  CHECK(chi2 < 30.0);  // 6 degrees of freedom: p < 1e-4
  // A bound just above 2^63 rejects almost half the raw draws; results stay in range.
  const std::uint64_t big = (1ull << 63) + 12345;
  std::set<bool> upper_half;
  for (int i = 0; i < 1000; ++i) {
    const auto r = gen.below(big);
    REQUIRE(r < big);
    upper_half.insert(r >= (1ull << 62));
  }
  CHECK(upper_half.size() == 2);
}

}  // namespace test_matrix_view
