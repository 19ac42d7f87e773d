// peft/io/gguf.hpp — reading and writing GGUF, the file format of llama.cpp (version 3; 2 read).
//
//   auto f = peft::io::gguf_file::open("model.gguf");       // mapped, validated up front
//   std::string arch = f.string("general.architecture");
//   const auto& t = f.tensor("blk.0.attn_q.weight");         // t.type, t.ne, f.bytes(t)
//
//   peft::io::gguf_writer w;
//   w.set("general.architecture", peft::io::gguf_value::string("llama"));
//   w.add_tensor("blk.0.attn_q.weight.lora_a", peft::io::ggml_type::f32, {in, r}, bytes);
//   w.write("adapter.gguf");                                 // atomic: whole or not at all
//
// Layout (little-endian): "GGUF", u32 version, u64 tensor count, u64 key-value count; the
// key-value pairs (a string key, a u32 value type, the value); the tensor infos (a string name,
// u32 dimension count, u64 ne[dims] fastest first, u32 ggml type, u64 offset into the data
// section); padding to the alignment (general.alignment, default 32); the data section. Strings
// are a u64 length and UTF-8 bytes; arrays a u32 element type, a u64 count and the elements.
//
// open() checks everything a later access relies on: lengths and counts against the bytes left,
// nesting depth, dimension counts (<= 4) and products, each tensor's size from its type's block
// layout (ggml_type_size), offsets aligned and inside the file, no two tensors overlapping, no
// duplicate key or tensor name. A violation is format_error naming the file and the item.
// The tensor data is never copied: bytes() points into the mapping, and keep_alive() hands out
// shared ownership of it (frozen bases built over the file hold it).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/detail/file_io.hpp"

namespace peft::io {

/// ggml's tensor types (ggml.h's enum ggml_type; the ids are the file's).
enum class ggml_type : std::uint32_t {
  f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9, q2_k = 10,
  q3_k = 11, q4_k = 12, q5_k = 13, q6_k = 14, q8_k = 15, iq2_xxs = 16, iq2_xs = 17,
  iq3_xxs = 18, iq1_s = 19, iq4_nl = 20, iq3_s = 21, iq2_s = 22, iq4_xs = 23, i8 = 24,
  i16 = 25, i32 = 26, i64 = 27, f64 = 28, iq1_m = 29, bf16 = 30, tq1_0 = 34, tq2_0 = 35,
  mxfp4 = 39
};

/// A ggml type's block: `elements` consecutive values of a row stored in `bytes` bytes.
struct ggml_block {
  std::string_view name;  // as ggml prints it: "Q4_K"
  std::int64_t elements = 0;
  std::size_t bytes = 0;
};

/// The block of type id `id`; nullopt for an id ggml does not define (or has retired).
constexpr std::optional<ggml_block> ggml_block_of(std::uint32_t id) noexcept {
  constexpr std::int64_t k = 256;  // QK_K
  switch (id) {
    case 0: return ggml_block{"F32", 1, 4};
    case 1: return ggml_block{"F16", 1, 2};
    case 2: return ggml_block{"Q4_0", 32, 18};
    case 3: return ggml_block{"Q4_1", 32, 20};
    case 6: return ggml_block{"Q5_0", 32, 22};
    case 7: return ggml_block{"Q5_1", 32, 24};
    case 8: return ggml_block{"Q8_0", 32, 34};
    case 9: return ggml_block{"Q8_1", 32, 36};
    case 10: return ggml_block{"Q2_K", k, 84};
    case 11: return ggml_block{"Q3_K", k, 110};
    case 12: return ggml_block{"Q4_K", k, 144};
    case 13: return ggml_block{"Q5_K", k, 176};
    case 14: return ggml_block{"Q6_K", k, 210};
    case 15: return ggml_block{"Q8_K", k, 292};
    case 16: return ggml_block{"IQ2_XXS", k, 66};
    case 17: return ggml_block{"IQ2_XS", k, 74};
    case 18: return ggml_block{"IQ3_XXS", k, 98};
    case 19: return ggml_block{"IQ1_S", k, 50};
    case 20: return ggml_block{"IQ4_NL", 32, 18};
    case 21: return ggml_block{"IQ3_S", k, 110};
    case 22: return ggml_block{"IQ2_S", k, 82};
    case 23: return ggml_block{"IQ4_XS", k, 136};
    case 24: return ggml_block{"I8", 1, 1};
    case 25: return ggml_block{"I16", 1, 2};
    case 26: return ggml_block{"I32", 1, 4};
    case 27: return ggml_block{"I64", 1, 8};
    case 28: return ggml_block{"F64", 1, 8};
    case 29: return ggml_block{"IQ1_M", k, 56};
    case 30: return ggml_block{"BF16", 1, 2};
    case 34: return ggml_block{"TQ1_0", k, 54};
    case 35: return ggml_block{"TQ2_0", k, 66};
    case 39: return ggml_block{"MXFP4", 32, 17};
    default: return std::nullopt;
  }
}

/// "Q4_K" for a defined type, "type <id>" otherwise.
inline std::string ggml_type_name(ggml_type t) {
  const auto b = ggml_block_of(static_cast<std::uint32_t>(t));
  return b ? std::string(b->name) : "type " + std::to_string(static_cast<std::uint32_t>(t));
}

/// GGUF metadata value types (gguf.h's enum gguf_type).
enum class gguf_type : std::uint32_t {
  u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7, string = 8,
  array = 9, u64 = 10, i64 = 11, f64 = 12
};

/// One metadata value: a scalar, a string, or an array of values of one type.
class gguf_value {
 public:
  gguf_value() = default;

  static gguf_value u32(std::uint32_t v) { return gguf_value(gguf_type::u32, std::uint64_t{v}); }
  static gguf_value i32(std::int32_t v) { return gguf_value(gguf_type::i32, std::int64_t{v}); }
  static gguf_value u64(std::uint64_t v) { return gguf_value(gguf_type::u64, v); }
  static gguf_value i64(std::int64_t v) { return gguf_value(gguf_type::i64, v); }
  static gguf_value f32(float v) { return gguf_value(gguf_type::f32, static_cast<double>(v)); }
  static gguf_value f64(double v) { return gguf_value(gguf_type::f64, v); }
  static gguf_value boolean(bool v) { return gguf_value(gguf_type::boolean, v); }
  static gguf_value string(std::string v) { return gguf_value(gguf_type::string, std::move(v)); }
  /// An array of `element` values (each must have that type); format_error otherwise.
  static gguf_value array(gguf_type element, std::vector<gguf_value> items) {
    for (const auto& v : items) {
      if (v.type() != element) {
        peft::detail::raise<format_error>("gguf_value::array", "an element's type differs from the array's");
      }
    }
    gguf_value a(gguf_type::array, std::move(items));
    a.element_ = element;
    return a;
  }
  /// A value of any scalar type from its stored number (the reader's constructor).
  static gguf_value scalar(gguf_type t, std::uint64_t bits_or_value, double real, bool flag) {
    switch (t) {
      case gguf_type::u8: case gguf_type::u16: case gguf_type::u32: case gguf_type::u64:
        return gguf_value(t, bits_or_value);
      case gguf_type::i8: case gguf_type::i16: case gguf_type::i32: case gguf_type::i64:
        return gguf_value(t, static_cast<std::int64_t>(bits_or_value));
      case gguf_type::f32: case gguf_type::f64: return gguf_value(t, real);
      case gguf_type::boolean: return gguf_value(t, flag);
      default: peft::detail::raise<format_error>("gguf_value::scalar", "not a scalar type");
    }
  }

  gguf_type type() const noexcept { return type_; }
  /// The element type of an array.
  gguf_type element_type() const noexcept { return element_; }

  bool is_integer() const noexcept {
    return std::holds_alternative<std::uint64_t>(v_) || std::holds_alternative<std::int64_t>(v_);
  }
  bool is_number() const noexcept { return is_integer() || std::holds_alternative<double>(v_); }
  bool is_string() const noexcept { return type_ == gguf_type::string; }
  bool is_array() const noexcept { return type_ == gguf_type::array; }

  /// The integer (any integer type); nullopt for another type or a u64 beyond int64.
  std::optional<std::int64_t> integer() const noexcept {
    if (const auto* u = std::get_if<std::uint64_t>(&v_)) {
      if (*u > static_cast<std::uint64_t>(INT64_MAX)) return std::nullopt;
      return static_cast<std::int64_t>(*u);
    }
    if (const auto* i = std::get_if<std::int64_t>(&v_)) return *i;
    return std::nullopt;
  }
  /// The number (integer or floating) as double; nullopt otherwise.
  std::optional<double> number() const noexcept {
    if (const auto* d = std::get_if<double>(&v_)) return *d;
    if (const auto* u = std::get_if<std::uint64_t>(&v_)) return static_cast<double>(*u);
    if (const auto* i = std::get_if<std::int64_t>(&v_)) return static_cast<double>(*i);
    return std::nullopt;
  }
  std::optional<bool> boolean_value() const noexcept {
    if (const auto* b = std::get_if<bool>(&v_)) return *b;
    return std::nullopt;
  }
  const std::string* string_value() const noexcept { return std::get_if<std::string>(&v_); }
  const std::vector<gguf_value>* array_value() const noexcept { return std::get_if<std::vector<gguf_value>>(&v_); }

  /// The raw u64 / i64 payload (for writing).
  std::uint64_t bits() const noexcept {
    if (const auto* u = std::get_if<std::uint64_t>(&v_)) return *u;
    if (const auto* i = std::get_if<std::int64_t>(&v_)) return static_cast<std::uint64_t>(*i);
    return 0;
  }

 private:
  using storage = std::variant<std::monostate, std::uint64_t, std::int64_t, double, bool, std::string,
                               std::vector<gguf_value>>;
  gguf_value(gguf_type t, storage v) : type_(t), v_(std::move(v)) {}
  gguf_type type_ = gguf_type::u8;
  gguf_type element_ = gguf_type::u8;
  storage v_;
};

/// One tensor of a GGUF file. ne is ggml's shape, fastest dimension first: a (rows, cols)
/// row-major matrix is ne = {cols, rows}.
struct gguf_tensor_info {
  std::string name;
  ggml_type type = ggml_type::f32;
  std::vector<std::int64_t> ne;
  std::uint64_t offset = 0;  ///< into the data section
  std::size_t nbytes = 0;

  /// Rows of the tensor seen as a matrix: the product of ne[1..] (1 for a vector).
  std::int64_t rows() const noexcept {
    std::int64_t r = 1;
    for (std::size_t i = 1; i < ne.size(); ++i) r *= ne[i];
    return r;
  }
  std::int64_t cols() const noexcept { return ne.empty() ? 1 : ne[0]; }
};

/// Bytes of a tensor of `type` and shape `ne`; format_error (naming `what`) when ne[0] is not a
/// whole number of blocks, a dimension is negative or the product overflows.
inline std::size_t ggml_nbytes(std::string_view where, const std::string& what, ggml_type type,
                               const std::vector<std::int64_t>& ne) {
  const auto b = ggml_block_of(static_cast<std::uint32_t>(type));
  if (!b) peft::detail::raise<format_error>(where, what + " has unknown ggml type " + std::to_string(static_cast<std::uint32_t>(type)));
  std::size_t n = 1;
  for (std::size_t i = 0; i < ne.size(); ++i) {
    if (ne[i] < 0) peft::detail::raise<format_error>(where, what + " has a negative dimension");
    std::size_t d = static_cast<std::size_t>(ne[i]);
    if (i == 0) {
      if (ne[0] % b->elements != 0) {
        peft::detail::raise<format_error>(where, what + " has " + std::to_string(ne[0]) + " values per row, not a multiple of " +
                                                      std::string(b->name) + "'s block of " + std::to_string(b->elements));
      }
      d = d / static_cast<std::size_t>(b->elements) * b->bytes;
    }
    if (__builtin_mul_overflow(n, d, &n)) peft::detail::raise<format_error>(where, what + " is too large");
  }
  return n;
}

/// A validated, read-only GGUF file (see the top of this header). Cheap to move.
class gguf_file {
 public:
  /// The deepest nesting of arrays accepted.
  static constexpr int max_depth = 8;
  /// The most dimensions a tensor may have (GGML_MAX_DIMS).
  static constexpr std::size_t max_dims = 4;

  gguf_file() = default;

  /// Maps `path` and validates it: io_error if it cannot be read, format_error if it is not a
  /// well-formed GGUF file.
  static gguf_file open(const std::filesystem::path& path) {
    constexpr std::string_view where = "gguf_file::open";
    gguf_file f;
    f.path_ = path;
    f.map_ = detail::mapped_bytes::open(where, path);
    f.load(where, f.map_->data(), f.map_->size());
    return f;
  }

  /// Validates an in-memory image (same rules as open()); the object owns the bytes.
  static gguf_file parse(std::vector<std::byte> bytes) {
    gguf_file f;
    auto owned = std::make_shared<std::vector<std::byte>>(std::move(bytes));
    f.owner_ = owned;
    f.load("gguf_file::parse", owned->data(), owned->size());
    return f;
  }

  std::uint32_t version() const noexcept { return version_; }
  std::size_t alignment() const noexcept { return alignment_; }
  const std::filesystem::path& path() const noexcept { return path_; }

  /// Every key-value pair, in file order.
  const std::vector<std::pair<std::string, gguf_value>>& metadata() const noexcept { return kv_; }
  /// The value of `key`, or nullptr.
  const gguf_value* find(std::string_view key) const noexcept {
    const auto it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
  }
  /// The string at `key`; format_error when absent or not a string.
  std::string string(std::string_view key) const {
    const gguf_value* v = find(key);
    if (v == nullptr || !v->is_string()) fail_key("gguf_file::string", key, "a string");
    return *v->string_value();
  }
  /// The integer at `key` (any integer type), nullopt when absent; format_error when not an
  /// integer.
  std::optional<std::int64_t> integer(std::string_view key) const {
    const gguf_value* v = find(key);
    if (v == nullptr) return std::nullopt;
    const auto i = v->integer();
    if (!i) fail_key("gguf_file::integer", key, "an integer");
    return i;
  }
  /// The number at `key` (integer or floating), nullopt when absent; format_error otherwise.
  std::optional<double> number(std::string_view key) const {
    const gguf_value* v = find(key);
    if (v == nullptr) return std::nullopt;
    const auto d = v->number();
    if (!d) fail_key("gguf_file::number", key, "a number");
    return d;
  }

  /// Every tensor, in file order.
  const std::vector<gguf_tensor_info>& tensors() const noexcept { return tensors_; }
  /// The tensor named `name`, or nullptr.
  const gguf_tensor_info* find_tensor(std::string_view name) const noexcept {
    const auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
  }
  /// The tensor named `name`; format_error when there is none.
  const gguf_tensor_info& tensor(std::string_view name) const {
    const gguf_tensor_info* t = find_tensor(name);
    if (t == nullptr) {
      peft::detail::raise<format_error>("gguf_file::tensor", "no tensor '" + std::string(name) + "' in " + source_name());
    }
    return *t;
  }
  /// A tensor's bytes, inside the mapping (aligned to alignment() from the data section start).
  std::span<const std::byte> bytes(const gguf_tensor_info& t) const noexcept { return {data_ + t.offset, t.nbytes}; }

  /// Shared ownership of the bytes: keep it while using pointers from bytes() after this object
  /// is gone.
  std::shared_ptr<const void> keep_alive() const noexcept {
    if (map_) return map_;
    return owner_;
  }

  /// "'path'" or "the in-memory buffer", for messages.
  std::string source_name() const {
    if (path_.empty()) return "the in-memory buffer";
    std::string s = "'";
    s += path_.string();
    s += '\'';
    return s;
  }

 private:
  /// A bounds-checked little-endian cursor over the header.
  struct cursor {
    const std::byte* p;
    std::size_t size;
    std::size_t at = 0;
    const gguf_file* file;
    std::string_view where;

    [[noreturn]] void fail(const std::string& what) const { file->fail(where, what + " at byte " + std::to_string(at)); }
    std::size_t left() const noexcept { return size - at; }
    void need(std::size_t n, const char* what) const {
      if (n > left()) fail(std::string("the file ends inside ") + what);
    }
    template <class U>
    U read(const char* what) {
      need(sizeof(U), what);
      U v;
      std::memcpy(&v, p + at, sizeof(U));
      at += sizeof(U);
      return v;
    }
    std::string text(const char* what) {
      const auto n = read<std::uint64_t>(what);
      if (n > left()) fail(std::string("a string of ") + std::to_string(n) + " bytes runs past the end (" + what + ")");
      std::string s(reinterpret_cast<const char*>(p + at), static_cast<std::size_t>(n));
      at += static_cast<std::size_t>(n);
      return s;
    }
  };

  [[noreturn]] void fail(std::string_view where, const std::string& what) const {
    peft::detail::raise<format_error>(where, source_name() + ": " + what);
  }
  [[noreturn]] void fail_key(std::string_view where, std::string_view key, const char* what) const {
    peft::detail::raise<format_error>(where, "metadata '" + std::string(key) + "' in " + source_name() +
                                                 (find(key) == nullptr ? " is missing" : " is not " + std::string(what)));
  }

  static std::size_t min_size(gguf_type t) noexcept {
    switch (t) {
      case gguf_type::u8: case gguf_type::i8: case gguf_type::boolean: return 1;
      case gguf_type::u16: case gguf_type::i16: return 2;
      case gguf_type::u32: case gguf_type::i32: case gguf_type::f32: return 4;
      case gguf_type::string: case gguf_type::u64: case gguf_type::i64: case gguf_type::f64: return 8;
      case gguf_type::array: return 12;
    }
    return 1;
  }

  gguf_value read_value(cursor& c, gguf_type t, int depth) const {
    switch (t) {
      case gguf_type::u8: return gguf_value::scalar(t, c.read<std::uint8_t>("a u8"), 0, false);
      case gguf_type::i8: return gguf_value::scalar(t, static_cast<std::uint64_t>(std::int64_t{c.read<std::int8_t>("an i8")}), 0, false);
      case gguf_type::u16: return gguf_value::scalar(t, c.read<std::uint16_t>("a u16"), 0, false);
      case gguf_type::i16: return gguf_value::scalar(t, static_cast<std::uint64_t>(std::int64_t{c.read<std::int16_t>("an i16")}), 0, false);
      case gguf_type::u32: return gguf_value::scalar(t, c.read<std::uint32_t>("a u32"), 0, false);
      case gguf_type::i32: return gguf_value::scalar(t, static_cast<std::uint64_t>(std::int64_t{c.read<std::int32_t>("an i32")}), 0, false);
      case gguf_type::u64: return gguf_value::scalar(t, c.read<std::uint64_t>("a u64"), 0, false);
      case gguf_type::i64: return gguf_value::scalar(t, c.read<std::uint64_t>("an i64"), 0, false);
      case gguf_type::f32: return gguf_value::scalar(t, 0, static_cast<double>(c.read<float>("an f32")), false);
      case gguf_type::f64: return gguf_value::scalar(t, 0, c.read<double>("an f64"), false);
      case gguf_type::boolean: {
        const auto b = c.read<std::uint8_t>("a bool");
        if (b > 1) c.fail("a bool holds " + std::to_string(b));
        return gguf_value::scalar(t, 0, 0, b != 0);
      }
      case gguf_type::string: return gguf_value::string(c.text("a string value"));
      case gguf_type::array: {
        if (depth >= max_depth) c.fail("arrays are nested more than " + std::to_string(max_depth) + " deep");
        const auto raw = c.read<std::uint32_t>("an array's type");
        if (raw > static_cast<std::uint32_t>(gguf_type::f64)) c.fail("an array has unknown element type " + std::to_string(raw));
        const auto et = static_cast<gguf_type>(raw);
        const auto n = c.read<std::uint64_t>("an array's length");
        if (n > c.left() / min_size(et)) c.fail("an array of " + std::to_string(n) + " elements runs past the end");
        std::vector<gguf_value> items;
        items.reserve(static_cast<std::size_t>(n));
        for (std::uint64_t i = 0; i < n; ++i) items.push_back(read_value(c, et, depth + 1));
        return gguf_value::array(et, std::move(items));
      }
    }
    c.fail("unknown value type " + std::to_string(static_cast<std::uint32_t>(t)));
  }

  void load(std::string_view where, const std::byte* base, std::size_t size) {
    cursor c{base, size, 0, this, where};
    if (size < 4 || std::memcmp(base, "GGUF", 4) != 0) fail(where, "not a GGUF file (no 'GGUF' magic)");
    c.at = 4;
    version_ = c.read<std::uint32_t>("the version");
    if (version_ != 2 && version_ != 3) fail(where, "GGUF version " + std::to_string(version_) + " is not supported (2, 3)");
    const auto n_tensors = c.read<std::uint64_t>("the tensor count");
    const auto n_kv = c.read<std::uint64_t>("the key-value count");
    // Each key-value pair takes at least 8 + 4 + 1 bytes, each tensor info 8 + 4 + 4 + 8.
    if (n_kv > c.left() / 13) fail(where, std::to_string(n_kv) + " key-value pairs cannot fit in the file");
    if (n_tensors > c.left() / 24) fail(where, std::to_string(n_tensors) + " tensors cannot fit in the file");
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      std::string key = c.text("a key");
      const auto raw = c.read<std::uint32_t>("a value type");
      if (raw > static_cast<std::uint32_t>(gguf_type::f64)) c.fail("key '" + key + "' has unknown value type " + std::to_string(raw));
      gguf_value v = read_value(c, static_cast<gguf_type>(raw), 0);
      if (!kv_index_.emplace(key, kv_.size()).second) fail(where, "duplicate key '" + key + "'");
      kv_.emplace_back(std::move(key), std::move(v));
    }
    alignment_ = 32;
    if (const gguf_value* a = find("general.alignment")) {
      const auto i = a->integer();
      if (a->type() != gguf_type::u32 || !i || *i <= 0 || (*i & (*i - 1)) != 0) {
        fail(where, "general.alignment must be a u32 power of two");
      }
      alignment_ = static_cast<std::size_t>(*i);
    }
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      gguf_tensor_info t;
      t.name = c.text("a tensor name");
      const auto dims = c.read<std::uint32_t>("a dimension count");
      if (dims > max_dims) c.fail("tensor '" + t.name + "' has " + std::to_string(dims) + " dimensions (at most 4)");
      for (std::uint32_t d = 0; d < dims; ++d) {
        const auto n = c.read<std::uint64_t>("a dimension");
        if (n > static_cast<std::uint64_t>(INT64_MAX)) c.fail("tensor '" + t.name + "' has a dimension beyond int64");
        t.ne.push_back(static_cast<std::int64_t>(n));
      }
      std::int64_t product = 1;  // of the nonzero dimensions: rows() and friends cannot overflow
      for (auto d : t.ne) {
        if (d != 0 && __builtin_mul_overflow(product, d, &product)) c.fail("tensor '" + t.name + "' has too many elements");
      }
      const auto type = c.read<std::uint32_t>("a tensor type");
      if (!ggml_block_of(type)) c.fail("tensor '" + t.name + "' has unknown ggml type " + std::to_string(type));
      t.type = static_cast<ggml_type>(type);
      t.offset = c.read<std::uint64_t>("a tensor offset");
      t.nbytes = ggml_nbytes(where, source_name() + ": tensor '" + t.name + "'", t.type, t.ne);
      if (t.offset % alignment_ != 0) {
        fail(where, "tensor '" + t.name + "' is at offset " + std::to_string(t.offset) + ", not a multiple of the alignment " +
                        std::to_string(alignment_));
      }
      if (!tensor_index_.emplace(t.name, tensors_.size()).second) fail(where, "duplicate tensor '" + t.name + "'");
      tensors_.push_back(std::move(t));
    }
    const std::size_t data_start = (c.at + alignment_ - 1) / alignment_ * alignment_;
    if (data_start > size && !tensors_.empty()) fail(where, "the file ends before its data section");
    const std::size_t data_size = data_start <= size ? size - data_start : 0;
    std::vector<const gguf_tensor_info*> order;
    for (const auto& t : tensors_) {
      if (t.offset > data_size || t.nbytes > data_size - t.offset) {
        fail(where, "tensor '" + t.name + "' (" + std::to_string(t.nbytes) + " bytes at data offset " + std::to_string(t.offset) +
                        ") runs past the end of the file: truncated?");
      }
      if (t.nbytes > 0) order.push_back(&t);
    }
    std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) { return a->offset < b->offset; });
    for (std::size_t i = 1; i < order.size(); ++i) {
      if (order[i]->offset < order[i - 1]->offset + order[i - 1]->nbytes) {
        fail(where, "tensors '" + order[i - 1]->name + "' and '" + order[i]->name + "' overlap");
      }
    }
    data_ = base + std::min(data_start, size);
  }

  std::filesystem::path path_;
  std::shared_ptr<const detail::mapped_bytes> map_;
  std::shared_ptr<const std::vector<std::byte>> owner_;
  const std::byte* data_ = nullptr;
  std::uint32_t version_ = 0;
  std::size_t alignment_ = 32;
  std::vector<std::pair<std::string, gguf_value>> kv_;
  std::map<std::string, std::size_t, std::less<>> kv_index_;
  std::vector<gguf_tensor_info> tensors_;
  std::map<std::string, std::size_t, std::less<>> tensor_index_;
};

/// Collects metadata and tensors and writes one GGUF version 3 file atomically (alignment 32
/// unless general.alignment says otherwise). Keys and tensors keep the order they were given.
class gguf_writer {
 public:
  /// Sets `key` (replacing an earlier value of the same key).
  void set(const std::string& key, gguf_value v) {
    for (auto& kv : kv_) {
      if (kv.first == key) {
        kv.second = std::move(v);
        return;
      }
    }
    kv_.emplace_back(key, std::move(v));
  }

  /// Adds a tensor of ggml shape `ne` (fastest first) whose bytes are copied now; format_error
  /// when the size does not match the type and shape, or on a duplicate name.
  void add_tensor(std::string name, ggml_type type, std::vector<std::int64_t> ne, std::span<const std::byte> data) {
    constexpr std::string_view where = "gguf_writer::add_tensor";
    if (ne.size() > gguf_file::max_dims) peft::detail::raise<format_error>(where, "tensor '" + name + "' has more than 4 dimensions");
    const std::size_t n = ggml_nbytes(where, "tensor '" + name + "'", type, ne);
    if (n != data.size()) {
      peft::detail::raise<format_error>(where, "tensor '" + name + "' needs " + std::to_string(n) + " bytes, got " +
                                                   std::to_string(data.size()));
    }
    for (const auto& t : tensors_) {
      if (t.name == name) peft::detail::raise<format_error>(where, "duplicate tensor '" + name + "'");
    }
    tensors_.push_back({std::move(name), type, std::move(ne), std::vector<std::byte>(data.begin(), data.end())});
  }

  /// f32 values of a row-major (rows, cols) matrix as a tensor of ne = {cols, rows}.
  void add_f32(std::string name, std::int64_t rows, std::int64_t cols, std::span<const float> values) {
    add_tensor(std::move(name), ggml_type::f32, {cols, rows}, std::as_bytes(values));
  }

  /// Writes the file (io_error on failure; nothing is left at `path` then, an earlier file there
  /// is untouched).
  void write(const std::filesystem::path& path) const {
    constexpr std::string_view where = "gguf_writer::write";
    std::size_t align = 32;
    for (const auto& [k, v] : kv_) {
      if (k == "general.alignment") {
        const auto i = v.integer();
        if (v.type() != gguf_type::u32 || !i || *i <= 0 || (*i & (*i - 1)) != 0) {
          peft::detail::raise<format_error>(where, "general.alignment must be a u32 power of two");
        }
        align = static_cast<std::size_t>(*i);
      }
    }
    std::vector<std::byte> head;
    put(head, "GGUF", 4);
    put_le(head, std::uint32_t{3});
    put_le(head, static_cast<std::uint64_t>(tensors_.size()));
    put_le(head, static_cast<std::uint64_t>(kv_.size()));
    for (const auto& [k, v] : kv_) {
      put_string(head, k);
      put_le(head, static_cast<std::uint32_t>(v.type()));
      put_value(head, v);
    }
    std::uint64_t offset = 0;
    for (const auto& t : tensors_) {
      put_string(head, t.name);
      put_le(head, static_cast<std::uint32_t>(t.ne.size()));
      for (auto d : t.ne) put_le(head, static_cast<std::uint64_t>(d));
      put_le(head, static_cast<std::uint32_t>(t.type));
      put_le(head, offset);
      offset += (t.data.size() + align - 1) / align * align;
    }
    detail::atomic_output out(where, path);
    out.write(head.data(), head.size());
    out.write_zeros((align - head.size() % align) % align);
    for (const auto& t : tensors_) {
      out.write(t.data.data(), t.data.size());
      out.write_zeros((align - t.data.size() % align) % align);
    }
    out.commit();
  }

 private:
  struct entry {
    std::string name;
    ggml_type type;
    std::vector<std::int64_t> ne;
    std::vector<std::byte> data;
  };

  static void put(std::vector<std::byte>& out, const void* p, std::size_t n) {
    const auto* b = static_cast<const std::byte*>(p);
    out.insert(out.end(), b, b + n);
  }
  template <class U>
  static void put_le(std::vector<std::byte>& out, U v) {
    put(out, &v, sizeof v);  // x86 and aarch64 are little-endian, as GGUF
  }
  static void put_string(std::vector<std::byte>& out, const std::string& s) {
    put_le(out, static_cast<std::uint64_t>(s.size()));
    put(out, s.data(), s.size());
  }
  static void put_value(std::vector<std::byte>& out, const gguf_value& v) {
    switch (v.type()) {
      case gguf_type::u8: case gguf_type::i8: case gguf_type::boolean: {
        const auto b = static_cast<std::uint8_t>(v.type() == gguf_type::boolean ? (*v.boolean_value() ? 1 : 0) : v.bits());
        put_le(out, b);
        break;
      }
      case gguf_type::u16: case gguf_type::i16: put_le(out, static_cast<std::uint16_t>(v.bits())); break;
      case gguf_type::u32: case gguf_type::i32: put_le(out, static_cast<std::uint32_t>(v.bits())); break;
      case gguf_type::u64: case gguf_type::i64: put_le(out, v.bits()); break;
      case gguf_type::f32: put_le(out, static_cast<float>(*v.number())); break;
      case gguf_type::f64: put_le(out, *v.number()); break;
      case gguf_type::string: put_string(out, *v.string_value()); break;
      case gguf_type::array: {
        put_le(out, static_cast<std::uint32_t>(v.element_type()));
        put_le(out, static_cast<std::uint64_t>(v.array_value()->size()));
        for (const auto& e : *v.array_value()) put_value(out, e);
        break;
      }
    }
  }

  std::vector<std::pair<std::string, gguf_value>> kv_;
  std::vector<entry> tensors_;
};

}  // namespace peft::io
