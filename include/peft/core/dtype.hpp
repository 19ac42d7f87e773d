// peft/core/dtype.hpp — storage dtypes and conversions.
//
// `dtype` names the element types a tensor can be stored in (the safetensors set this library
// reads). `bf16` and `f16` are 16-bit storage types with exact widening to float and
// round-to-nearest-even narrowing, as PyTorch converts.
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <type_traits>

namespace peft {

/// Element types of stored tensors.
enum class dtype : std::uint8_t { f64, f32, f16, bf16, i64, i32, i8, u8 };

/// Bytes per element.
constexpr std::size_t size_of(dtype t) noexcept {
  switch (t) {
    case dtype::f64:
    case dtype::i64: return 8;
    case dtype::f32:
    case dtype::i32: return 4;
    case dtype::f16:
    case dtype::bf16: return 2;
    case dtype::i8:
    case dtype::u8: return 1;
  }
  return 0;
}

/// True for f64, f32, f16 and bf16.
constexpr bool is_floating(dtype t) noexcept {
  return t == dtype::f64 || t == dtype::f32 || t == dtype::f16 || t == dtype::bf16;
}

/// The safetensors spelling: "F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8".
constexpr std::string_view safetensors_name(dtype t) noexcept {
  switch (t) {
    case dtype::f64: return "F64";
    case dtype::f32: return "F32";
    case dtype::f16: return "F16";
    case dtype::bf16: return "BF16";
    case dtype::i64: return "I64";
    case dtype::i32: return "I32";
    case dtype::i8: return "I8";
    case dtype::u8: return "U8";
  }
  return "?";
}

/// Parses a safetensors dtype name; nullopt for names this library does not read.
constexpr std::optional<dtype> dtype_from_safetensors_name(std::string_view s) noexcept {
  for (dtype t : {dtype::f64, dtype::f32, dtype::f16, dtype::bf16, dtype::i64, dtype::i32,
                  dtype::i8, dtype::u8}) {
    if (safetensors_name(t) == s) return t;
  }
  return std::nullopt;
}

/// bfloat16 storage: the upper half of an IEEE binary32.
struct bf16 {
  std::uint16_t bits = 0;

  constexpr bf16() = default;
  static constexpr bf16 from_bits(std::uint16_t b) noexcept {
    bf16 v;
    v.bits = b;
    return v;
  }
  /// Round to nearest even; NaN stays NaN (quiet).
  explicit bf16(float f) noexcept : bits(narrow(f)) {}
  explicit operator float() const noexcept {
    return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
  }

 private:
  static std::uint16_t narrow(float f) noexcept {
    const auto u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
    const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>((u + rounding) >> 16);
  }
};

/// IEEE binary16 storage.
struct f16 {
  std::uint16_t bits = 0;

  constexpr f16() = default;
  static constexpr f16 from_bits(std::uint16_t b) noexcept {
    f16 v;
    v.bits = b;
    return v;
  }
  /// Round to nearest even, overflow to infinity, NaN stays NaN.
  explicit f16(float f) noexcept : bits(narrow(f)) {}
  explicit operator float() const noexcept { return widen(bits); }

 private:
  static float widen(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu;
    const std::uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
      const float v = static_cast<float>(man) * 0x1p-24f;
      return sign ? -v : v;
    }
    return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (man << 13));
  }
  static std::uint16_t narrow(float f) noexcept {
    const auto u = std::bit_cast<std::uint32_t>(f);
    const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
    const std::uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
    if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: inf
    if (a < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
      // Round |f| * 2^24 to the nearest integer, ties to even (exact in float arithmetic).
      const float scaled = std::bit_cast<float>(a) * 0x1p24f;
      return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(std::nearbyint(scaled)));
    }
    // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits.
    const std::uint32_t rebased = a - 0x38000000u;
    const std::uint32_t rounding = 0xfffu + ((rebased >> 13) & 1u);
    return static_cast<std::uint16_t>(sign | ((rebased + rounding) >> 13));
  }
};

static_assert(sizeof(bf16) == 2 && sizeof(f16) == 2);

/// The dtype tag of a C++ element type.
template <class T>
struct dtype_of;
template <> struct dtype_of<double> { static constexpr dtype value = dtype::f64; };
template <> struct dtype_of<float> { static constexpr dtype value = dtype::f32; };
template <> struct dtype_of<f16> { static constexpr dtype value = dtype::f16; };
template <> struct dtype_of<bf16> { static constexpr dtype value = dtype::bf16; };
template <> struct dtype_of<std::int64_t> { static constexpr dtype value = dtype::i64; };
template <> struct dtype_of<std::int32_t> { static constexpr dtype value = dtype::i32; };
template <> struct dtype_of<std::int8_t> { static constexpr dtype value = dtype::i8; };
template <> struct dtype_of<std::uint8_t> { static constexpr dtype value = dtype::u8; };
template <class T>
inline constexpr dtype dtype_of_v = dtype_of<T>::value;

/// The scalar types adapters compute in.
template <class T>
concept compute_scalar = std::is_same_v<T, float> || std::is_same_v<T, double>;

/// The element types a dense frozen weight may be stored in.
template <class S>
concept storage_scalar = compute_scalar<S> || std::is_same_v<S, bf16> || std::is_same_v<S, f16>;

/// Converts between storage and compute scalars (16-bit types go through float).
template <class To, class From>
constexpr To convert(From v) noexcept {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<From, bf16> || std::is_same_v<From, f16>) {
    return static_cast<To>(static_cast<float>(v));
  } else if constexpr (std::is_same_v<To, bf16> || std::is_same_v<To, f16>) {
    return To(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

/// Reads element `i` of a little-endian buffer of dtype `t` as `To` (floating or integer).
/// Used by the readers to convert stored tensors; the buffer may be unaligned.
template <class To>
To load_element(const std::byte* p, dtype t, std::size_t i) noexcept {
  auto read = [&]<class S>(S*) {
    S s;
    std::memcpy(&s, p + i * sizeof(S), sizeof(S));
    return s;
  };
  switch (t) {
    case dtype::f64: return static_cast<To>(read(static_cast<double*>(nullptr)));
    case dtype::f32: return static_cast<To>(read(static_cast<float*>(nullptr)));
    case dtype::f16: return static_cast<To>(static_cast<float>(read(static_cast<f16*>(nullptr))));
    case dtype::bf16: return static_cast<To>(static_cast<float>(read(static_cast<bf16*>(nullptr))));
    case dtype::i64: return static_cast<To>(read(static_cast<std::int64_t*>(nullptr)));
    case dtype::i32: return static_cast<To>(read(static_cast<std::int32_t*>(nullptr)));
    case dtype::i8: return static_cast<To>(read(static_cast<std::int8_t*>(nullptr)));
    case dtype::u8: return static_cast<To>(read(static_cast<std::uint8_t*>(nullptr)));
  }
  return To{};
}

/// Writes `v` as element `i` of a buffer of floating dtype `t` (rounding to nearest even).
template <class From>
void store_element(std::byte* p, dtype t, std::size_t i, From v) noexcept {
  auto write = [&]<class S>(S s) { std::memcpy(p + i * sizeof(S), &s, sizeof(S)); };
  switch (t) {
    case dtype::f64: write(static_cast<double>(v)); break;
    case dtype::f32: write(static_cast<float>(v)); break;
    case dtype::f16: write(f16(static_cast<float>(v))); break;
    case dtype::bf16: write(bf16(static_cast<float>(v))); break;
    case dtype::i64: write(static_cast<std::int64_t>(v)); break;
    case dtype::i32: write(static_cast<std::int32_t>(v)); break;
    case dtype::i8: write(static_cast<std::int8_t>(v)); break;
    case dtype::u8: write(static_cast<std::uint8_t>(v)); break;
  }
}

}  // namespace peft
