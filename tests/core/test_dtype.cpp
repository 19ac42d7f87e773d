// Storage dtypes: bf16/f16 conversions against known bit patterns and an independent
// long-double rounding reference, dtype names and sizes, element load/store.
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/core/dtype.hpp"
#include "peft/core/random.hpp"

namespace test_dtype {

namespace {

using peft::bf16;
using peft::f16;

std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }
float float_of(std::uint32_t u) { return std::bit_cast<float>(u); }
std::uint16_t f16_bits(float f) { return f16(f).bits; }
std::uint16_t bf16_bits(float f) { return bf16(f).bits; }

bool f16_is_nan(std::uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool bf16_is_nan(std::uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0; }

/// The value of an IEEE binary16 bit pattern, decoded from the definition (no float tricks).
long double f16_value(std::uint16_t h) {
  const int sign = (h >> 15) & 1;
  const int exp = (h >> 10) & 0x1f;
  const int man = h & 0x3ff;
  long double v;
  if (exp == 0x1f) {
    v = man == 0 ? std::numeric_limits<long double>::infinity()
                 : std::numeric_limits<long double>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<long double>(man), -24);
  } else {
    v = std::ldexp(static_cast<long double>(1024 + man), exp - 25);
  }
  return sign ? -v : v;
}

/// Round x to binary16 with round-to-nearest-even, computed in long double: the quantum q of
/// x's binade (2^-24 below 2^-14), n = |x| / q exactly, rounded to the nearest even integer.
long double f16_round_reference(float x) {
  const long double a = std::fabs(static_cast<long double>(x));
  if (std::isnan(x)) return std::numeric_limits<long double>::quiet_NaN();
  long double r;
  if (a >= 65520.0L) {
    r = std::numeric_limits<long double>::infinity();
  } else {
    int e = 0;
    (void)std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
    const int binade = e - 1;  // a in [2^binade, 2^(binade+1))
    const int q_exp = a < std::ldexp(1.0L, -14) ? -24 : binade - 10;
    const long double n = std::ldexp(a, -q_exp);  // exact: a has 24 significant bits
    const long double floor_n = std::floor(n);
    const long double frac = n - floor_n;
    long double rounded = floor_n;
    if (frac > 0.5L || (frac == 0.5L && std::fmod(floor_n, 2.0L) != 0.0L)) rounded += 1.0L;
    r = std::ldexp(rounded, q_exp);
    if (r >= 65536.0L) r = std::numeric_limits<long double>::infinity();
  }
  return std::signbit(x) ? -r : r;
}

/// Round x to bfloat16 (8 significant bits, float's exponent range) with ties to even, in
/// long double; overflow past the largest bf16 (half-way to 2^128) gives infinity.
long double bf16_round_reference(float x) {
  if (std::isnan(x)) return std::numeric_limits<long double>::quiet_NaN();
  const long double a = std::fabs(static_cast<long double>(x));
  if (std::isinf(x) || a == 0.0L) return static_cast<long double>(x);
  int e = 0;
  (void)std::frexp(a, &e);
  const int binade = e - 1;
  const int q_exp = std::max(binade, -126) - 7;  // float subnormals keep 2^-133 as the quantum
  const long double n = std::ldexp(a, -q_exp);
  const long double floor_n = std::floor(n);
  const long double frac = n - floor_n;
  long double rounded = floor_n;
  if (frac > 0.5L || (frac == 0.5L && std::fmod(floor_n, 2.0L) != 0.0L)) rounded += 1.0L;
  long double r = std::ldexp(rounded, q_exp);
  if (r >= std::ldexp(1.0L, 128)) r = std::numeric_limits<long double>::infinity();
  return std::signbit(x) ? -r : r;
}

/// A float with a random sign, a random exponent in [lo, hi] and random mantissa bits.
float random_float(peft::rng& gen, int lo, int hi) {
  const auto exp = static_cast<std::uint32_t>(lo + static_cast<int>(gen.below(static_cast<std::uint64_t>(hi - lo + 1))) + 127);
  const auto man = static_cast<std::uint32_t>(gen.next() & 0x7fffffu);
  const auto sign = static_cast<std::uint32_t>(gen.next() & 1u) << 31;
  return float_of(sign | (exp << 23) | man);
}

}  // namespace

TEST_CASE("f16 known bit patterns", "[dtype]") {
  CHECK(f16_bits(1.0f) == 0x3c00);
  CHECK(f16_bits(-2.5f) == 0xc100);
  CHECK(f16_bits(0.0f) == 0x0000);
  CHECK(f16_bits(-0.0f) == 0x8000);
  CHECK(f16_bits(65504.0f) == 0x7bff);           // largest finite half
  CHECK(f16_bits(65519.99f) == 0x7bff);          // just below the overflow tie
  CHECK(f16_bits(65520.0f) == 0x7c00);           // tie between 65504 and 2^16: even is inf
  CHECK(f16_bits(-65520.0f) == 0xfc00);
  CHECK(f16_bits(1e10f) == 0x7c00);
  CHECK(f16_bits(std::ldexp(1.0f, -14)) == 0x0400);  // smallest normal
  CHECK(f16_bits(std::ldexp(1.0f, -24)) == 0x0001);  // smallest subnormal
  CHECK(f16_bits(std::ldexp(1.0f, -25)) == 0x0000);  // tie between 0 and 2^-24: even is 0
  CHECK(f16_bits(-std::ldexp(1.0f, -25)) == 0x8000);
  CHECK(f16_bits(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);  // above the tie
  CHECK(f16_bits(std::ldexp(3.0f, -25)) == 0x0002);  // 1.5 quanta: tie to even 2
  CHECK(f16_bits(std::ldexp(5.0f, -25)) == 0x0002);  // 2.5 quanta: tie to even 2
  CHECK(f16_bits(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);       // normal tie, even below
  CHECK(f16_bits(1.0f + std::ldexp(3.0f, -11)) == 0x3c02);       // normal tie, even above
  CHECK(f16_bits(2047.0f / 1024.0f + std::ldexp(1.0f, -11)) == 0x4000);  // carry into exponent
  CHECK(f16_bits(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(f16_bits(-std::numeric_limits<float>::infinity()) == 0xfc00);
  CHECK(f16_is_nan(f16_bits(std::numeric_limits<float>::quiet_NaN())));
  CHECK(f16_is_nan(f16_bits(float_of(0x7f800001u))));  // payload only in dropped bits
  CHECK(f16_is_nan(f16_bits(float_of(0xffc00000u))));
  CHECK(f16_bits(std::ldexp(1.0f, -30)) == 0x0000);  // underflow to zero

  CHECK(static_cast<float>(f16::from_bits(0x3c00)) == 1.0f);
  CHECK(static_cast<float>(f16::from_bits(0xc100)) == -2.5f);
  CHECK(static_cast<float>(f16::from_bits(0x7bff)) == 65504.0f);
  CHECK(static_cast<float>(f16::from_bits(0x0001)) == std::ldexp(1.0f, -24));
  CHECK(static_cast<float>(f16::from_bits(0x03ff)) == std::ldexp(1023.0f, -24));
  CHECK(static_cast<float>(f16::from_bits(0x7c00)) == std::numeric_limits<float>::infinity());
  CHECK(static_cast<float>(f16::from_bits(0xfc00)) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(static_cast<float>(f16::from_bits(0x7e00))));
  CHECK(std::isnan(static_cast<float>(f16::from_bits(0x7c01))));
  const float neg_zero = static_cast<float>(f16::from_bits(0x8000));
  CHECK(neg_zero == 0.0f);
  CHECK(std::signbit(neg_zero));
}

TEST_CASE("bf16 known bit patterns", "[dtype]") {
  CHECK(bf16_bits(1.0f) == 0x3f80);
  CHECK(bf16_bits(-2.5f) == 0xc020);
  CHECK(bf16_bits(0.0f) == 0x0000);
  CHECK(bf16_bits(-0.0f) == 0x8000);
  CHECK(bf16_bits(float_of(0x3f808000u)) == 0x3f80);  // 1 + 2^-8: tie, even below
  CHECK(bf16_bits(float_of(0x3f818000u)) == 0x3f82);  // tie, even above
  CHECK(bf16_bits(float_of(0x3f808001u)) == 0x3f81);  // just above the tie
  CHECK(bf16_bits(float_of(0x3f807fffu)) == 0x3f80);  // just below the tie
  CHECK(bf16_bits(float_of(0xbf818000u)) == 0xbf82);  // negative tie
  CHECK(bf16_bits(float_of(0x3fffffffu)) == 0x4000);  // carry into the exponent
  CHECK(bf16_bits(std::numeric_limits<float>::max()) == 0x7f80);  // rounds up to inf
  CHECK(bf16_bits(float_of(0x7f7f0000u)) == 0x7f7f);  // largest finite bf16
  CHECK(bf16_bits(std::numeric_limits<float>::infinity()) == 0x7f80);
  CHECK(bf16_bits(-std::numeric_limits<float>::infinity()) == 0xff80);
  CHECK(bf16_bits(std::numeric_limits<float>::denorm_min()) == 0x0000);
  CHECK(bf16_is_nan(bf16_bits(std::numeric_limits<float>::quiet_NaN())));
  CHECK(bf16_is_nan(bf16_bits(float_of(0x7f800001u))));  // would truncate to inf: must stay NaN
  CHECK(bf16_is_nan(bf16_bits(float_of(0xff800001u))));
  CHECK((bf16_bits(float_of(0xff800001u)) & 0x8000u) != 0);  // sign kept

  CHECK(static_cast<float>(bf16::from_bits(0x3f80)) == 1.0f);
  CHECK(static_cast<float>(bf16::from_bits(0xc020)) == -2.5f);
  CHECK(static_cast<float>(bf16::from_bits(0x7f80)) == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(static_cast<float>(bf16::from_bits(0x7fc0))));
}

TEST_CASE("every f16 bit pattern widens exactly and narrows back to itself", "[dtype]") {
  std::vector<std::string> failures;
  int nans = 0;
  float previous = -1.0f;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    const float f = static_cast<float>(f16::from_bits(h));
    const long double expected = f16_value(h);
    if (f16_is_nan(h)) {
      ++nans;
      if (!std::isnan(f) || !f16_is_nan(f16(f).bits)) failures.push_back("NaN " + std::to_string(b));
      continue;
    }
    if (static_cast<long double>(f) != expected || std::signbit(f) != std::signbit(expected)) {
      failures.push_back("widen " + std::to_string(b));
    }
    if (f16(f).bits != h) failures.push_back("round trip " + std::to_string(b));
    if (b <= 0x7c00u) {  // non-negative patterns are ordered like their values
      if (b > 0 && !(f > previous)) failures.push_back("order " + std::to_string(b));
      previous = f;
    }
  }
  INFO("first failures: " << (failures.empty() ? std::string("none") : failures.front()));
  CHECK(failures.empty());
  CHECK(nans == 2 * 1023);
}

TEST_CASE("every bf16 bit pattern widens exactly and narrows back to itself", "[dtype]") {
  std::vector<std::string> failures;
  int nans = 0;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    const float f = static_cast<float>(bf16::from_bits(h));
    if (bits_of(f) != (b << 16)) failures.push_back("widen " + std::to_string(b));
    if (bf16_is_nan(h)) {
      ++nans;
      if (!std::isnan(f) || !bf16_is_nan(bf16(f).bits)) failures.push_back("NaN " + std::to_string(b));
      continue;
    }
    if (bf16(f).bits != h) failures.push_back("round trip " + std::to_string(b));
  }
  INFO("first failure: " << (failures.empty() ? std::string("none") : failures.front()));
  CHECK(failures.empty());
  CHECK(nans == 2 * 127);
}

TEST_CASE("f32 -> f16 rounding matches a long-double reference", "[dtype]") {
  peft::rng gen(1234);
  std::vector<float> inputs;
  for (int i = 0; i < 60000; ++i) inputs.push_back(random_float(gen, -27, 16));  // f16 range
  for (int i = 0; i < 20000; ++i) inputs.push_back(float_of(static_cast<std::uint32_t>(gen.next())));
  // Exact ties and their neighbours: midpoints between adjacent finite halves.
  for (int i = 0; i < 20000; ++i) {
    const auto h = static_cast<std::uint16_t>(gen.below(0x7bff));  // positive, below max
    const long double lo = f16_value(h);
    const long double hi = f16_value(static_cast<std::uint16_t>(h + 1));
    const auto mid = static_cast<float>((lo + hi) / 2);  // exact: 12 significant bits
    REQUIRE(static_cast<long double>(mid) == (lo + hi) / 2);
    const float s = (gen.next() & 1u) ? -1.0f : 1.0f;
    inputs.push_back(s * mid);
    inputs.push_back(s * std::nextafter(mid, 0.0f));
    inputs.push_back(s * std::nextafter(mid, 1e9f));
  }
  int nonzero_results = 0;
  std::vector<std::string> failures;
  for (const float x : inputs) {
    const std::uint16_t got = f16(x).bits;
    const long double want = f16_round_reference(x);
    const long double have = f16_value(got);
    if (std::isnan(x)) {
      if (!f16_is_nan(got)) failures.push_back(std::to_string(bits_of(x)));
      continue;
    }
    if (have != want || std::signbit(have) != std::signbit(want)) {
      failures.push_back(std::to_string(bits_of(x)));
    }
    nonzero_results += (have != 0.0L && !std::isinf(have)) ? 1 : 0;
  }
  INFO("first failing float bits: " << (failures.empty() ? std::string("none") : failures.front()));
  CHECK(failures.empty());
  CHECK(nonzero_results > 60000);  // most inputs land on finite non-zero halves
}

TEST_CASE("f32 -> bf16 rounding matches a long-double reference", "[dtype]") {
  peft::rng gen(99);
  std::vector<float> inputs;
  for (int i = 0; i < 40000; ++i) inputs.push_back(float_of(static_cast<std::uint32_t>(gen.next())));
  for (int i = 0; i < 20000; ++i) {
    // Ties: the 16 dropped bits are exactly 0x8000.
    const auto u = (static_cast<std::uint32_t>(gen.next()) & 0xffff0000u) | 0x8000u;
    if ((u & 0x7f800000u) != 0x7f800000u) inputs.push_back(float_of(u));
  }
  std::vector<std::string> failures;
  for (const float x : inputs) {
    const std::uint16_t got = bf16(x).bits;
    if (std::isnan(x)) {
      if (!bf16_is_nan(got)) failures.push_back(std::to_string(bits_of(x)));
      continue;
    }
    const long double want = bf16_round_reference(x);
    const long double have = static_cast<long double>(static_cast<float>(bf16::from_bits(got)));
    if (have != want || std::signbit(have) != std::signbit(want)) {
      failures.push_back(std::to_string(bits_of(x)));
    }
  }
  INFO("first failing float bits: " << (failures.empty() ? std::string("none") : failures.front()));
  CHECK(failures.empty());
}

TEST_CASE("dtype names, sizes and tags", "[dtype]") {
  using peft::dtype;
  struct row {
    dtype t;
    const char* name;
    std::size_t size;
    bool floating;
  };
  const std::array<row, 8> rows{{{dtype::f64, "F64", 8, true},
                                 {dtype::f32, "F32", 4, true},
                                 {dtype::f16, "F16", 2, true},
                                 {dtype::bf16, "BF16", 2, true},
                                 {dtype::i64, "I64", 8, false},
                                 {dtype::i32, "I32", 4, false},
                                 {dtype::i8, "I8", 1, false},
                                 {dtype::u8, "U8", 1, false}}};
  for (const auto& r : rows) {
    INFO(r.name);
    CHECK(peft::safetensors_name(r.t) == r.name);
    const auto parsed = peft::dtype_from_safetensors_name(r.name);
    REQUIRE(parsed.has_value());
    CHECK(*parsed == r.t);
    CHECK(peft::size_of(r.t) == r.size);
    CHECK(peft::is_floating(r.t) == r.floating);
  }
  for (const char* bad : {"", "f32", "F8", "F8_E4M3", "BOOL", "U16", "F32 ", "BF"}) {
    INFO(bad);
    CHECK_FALSE(peft::dtype_from_safetensors_name(bad).has_value());
  }
  static_assert(peft::dtype_of_v<double> == dtype::f64);
  static_assert(peft::dtype_of_v<float> == dtype::f32);
  static_assert(peft::dtype_of_v<peft::f16> == dtype::f16);
  static_assert(peft::dtype_of_v<peft::bf16> == dtype::bf16);
  static_assert(peft::dtype_of_v<std::int64_t> == dtype::i64);
  static_assert(peft::dtype_of_v<std::uint8_t> == dtype::u8);
  static_assert(peft::size_of(dtype::bf16) == sizeof(peft::bf16));
  static_assert(peft::size_of(dtype::f16) == sizeof(peft::f16));
  static_assert(peft::compute_scalar<float> && peft::compute_scalar<double>);
  static_assert(!peft::compute_scalar<peft::bf16>);
  static_assert(peft::storage_scalar<peft::bf16> && peft::storage_scalar<peft::f16>);
  static_assert(!peft::storage_scalar<int>);
}

TEST_CASE("convert goes through float for 16-bit types", "[dtype]") {
  CHECK(peft::convert<double>(peft::bf16(1.5f)) == 1.5);
  CHECK(peft::convert<float>(peft::f16(-0.375f)) == -0.375f);
  CHECK(peft::convert<peft::f16>(2.0).bits == 0x4000);
  CHECK(peft::convert<peft::bf16>(-2.5).bits == 0xc020);
  CHECK(peft::convert<float>(0.1) == 0.1f);
  CHECK(peft::convert<double>(0.1f) == static_cast<double>(0.1f));
  CHECK(peft::convert<peft::f16>(peft::f16::from_bits(0x1234)).bits == 0x1234);
}

TEST_CASE("load_element and store_element round trip every dtype, unaligned", "[dtype]") {
  using peft::dtype;
  // One byte of offset makes every element unaligned.
  std::array<std::byte, 1 + 8 * 4> buffer{};
  std::byte* p = buffer.data() + 1;
  const std::array<double, 4> values{1.0, -2.5, 48.0, 0.0};  // x2 fits every type
  for (dtype t : {dtype::f64, dtype::f32, dtype::f16, dtype::bf16, dtype::i64, dtype::i32,
                  dtype::i8, dtype::u8}) {
    INFO(peft::safetensors_name(t));
    for (std::size_t i = 0; i < values.size(); ++i) {
      const double v = (t == dtype::u8) ? std::abs(values[i]) * 2 : values[i] * 2;  // integral
      peft::store_element(p, t, i, v);
    }
    for (std::size_t i = 0; i < values.size(); ++i) {
      const double v = (t == dtype::u8) ? std::abs(values[i]) * 2 : values[i] * 2;
      CHECK(peft::load_element<double>(p, t, i) == v);
      CHECK(peft::load_element<float>(p, t, i) == static_cast<float>(v));
    }
  }
  // Little-endian layout of known patterns (the buffers are little-endian on such hosts).
  if constexpr (std::endian::native == std::endian::little) {
    peft::store_element(p, dtype::f16, 0, 1.0f);
    CHECK(std::to_integer<int>(p[0]) == 0x00);
    CHECK(std::to_integer<int>(p[1]) == 0x3c);
    peft::store_element(p, dtype::bf16, 1, -2.5);
    CHECK(std::to_integer<int>(p[2]) == 0x20);
    CHECK(std::to_integer<int>(p[3]) == 0xc0);
  }
  // Narrowing rounds to nearest even, as the constructors do.
  peft::store_element(p, dtype::f16, 2, 1.0 + std::ldexp(3.0, -11));
  CHECK(peft::load_element<double>(p, dtype::f16, 2) == 1.0 + std::ldexp(1.0, -9));
}

}  // namespace test_dtype
