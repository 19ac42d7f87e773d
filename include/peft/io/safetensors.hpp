// peft/io/safetensors.hpp — reading and writing the safetensors tensor format.
//
// A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header
// ({"__metadata__": {...}, "name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...})
// and then the data section; each tensor's bytes are [b, e) of the data section, little-endian,
// row-major.
//
// `safetensors_file` maps a file read-only (POSIX mmap) and validates the whole header up front,
// so every later access is in bounds. `safetensors_writer` writes a file atomically: it goes to a
// temporary file in the target directory that is fsynced and renamed over the target.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/io/detail/file_io.hpp"

namespace peft {
namespace detail {

/// a * b, or false on overflow.
inline bool safetensors_mul(std::size_t a, std::size_t b, std::size_t& out) noexcept {
  return !__builtin_mul_overflow(a, b, &out);
}

/// A name for a message: quoted, and cut short if it is very long.
inline std::string safetensors_quote(std::string_view s) {
  constexpr std::size_t max_length = 120;
  std::string q = "'";
  if (s.size() > max_length) {
    q.append(s.substr(0, max_length));
    q += "...";
  } else {
    q.append(s);
  }
  q += '\'';
  return q;
}

/// Bytes of a tensor of `shape` and `type`; shape_error on a negative dimension or overflow.
inline std::size_t safetensors_checked_nbytes(std::string_view where, std::string_view name,
                                              dtype type, const std::vector<std::int64_t>& shape) {
  std::size_t n = size_of(type);
  for (std::int64_t d : shape) {
    if (d < 0) {
      raise<shape_error>(where, "tensor " + safetensors_quote(name) +
                                    " has a negative dimension in " +
                                    shape_text(shape));
    }
    if (!safetensors_mul(n, static_cast<std::size_t>(d), n)) {
      raise<shape_error>(where, "tensor " + safetensors_quote(name) + " of shape " +
                                    shape_text(shape) + " is too large");
    }
  }
  return n;
}

}  // namespace detail

namespace io {

/// One entry of a safetensors header.
struct tensor_info {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0, end = 0;  ///< data_offsets, relative to the start of the data section

  /// Product of the shape (1 for a scalar, whose shape is []).
  std::size_t numel() const {
    std::size_t n = 1;
    for (std::int64_t d : shape) n *= static_cast<std::size_t>(d);
    return n;
  }
  std::size_t nbytes() const { return end - begin; }

  bool operator==(const tensor_info&) const = default;
};

/// A validated, read-only safetensors file: memory-mapped by open(), or an owned buffer from
/// parse(). Move-only. The mapping lives as long as the object; the file must not be truncated
/// by someone else meanwhile (that is SIGBUS for any mmap reader).
class safetensors_file {
 public:
  /// The largest header accepted (as the reference implementation): 100 MB.
  static constexpr std::size_t max_header_size = 100'000'000;
  /// The deepest JSON nesting accepted in a header (serde_json's default recursion limit).
  static constexpr std::size_t max_header_depth = 128;

  /// An empty file: no tensors, no metadata.
  safetensors_file() = default;
  safetensors_file(const safetensors_file&) = delete;
  safetensors_file& operator=(const safetensors_file&) = delete;
  safetensors_file(safetensors_file&& other) noexcept { swap(other); }
  safetensors_file& operator=(safetensors_file&& other) noexcept {
    if (this != &other) {
      safetensors_file taken(std::move(other));
      swap(taken);
    }
    return *this;
  }
  ~safetensors_file() = default;

  /// Maps `path` read-only and validates it. io_error if the file cannot be opened or mapped,
  /// format_error if it is not a well-formed safetensors file.
  static safetensors_file open(const std::filesystem::path& path) {
    constexpr std::string_view where = "safetensors_file::open";
    safetensors_file f;
    f.path_ = path;
    f.map_ = detail::mapped_bytes::open(where, path);
    f.load(where, f.map_->data(), f.map_->size());
    return f;
  }

  /// Validates an in-memory safetensors image (same rules as open()); the object owns `bytes`.
  static safetensors_file parse(std::vector<std::byte> bytes) {
    safetensors_file f;
    f.owned_ = std::move(bytes);
    f.load("safetensors_file::parse", f.owned_.data(), f.owned_.size());
    return f;
  }

  /// Every tensor, sorted by begin offset (then end, then name).
  const std::vector<tensor_info>& tensors() const noexcept { return tensors_; }

  bool contains(std::string_view name) const noexcept { return index_.find(name) != index_.end(); }

  /// The entry of `name`; format_error if there is none.
  const tensor_info& info(std::string_view name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) {
      peft::detail::raise<format_error>(
          "safetensors_file::info",
          "no tensor named " + peft::detail::safetensors_quote(name) + " in " + source_name());
    }
    return tensors_[it->second];
  }

  /// The raw little-endian bytes of `name` (unaligned in general).
  std::span<const std::byte> bytes(std::string_view name) const {
    const tensor_info& t = info(name);
    return {data_ + t.begin, t.nbytes()};
  }

  /// Every element of `name`, converted to T (an arithmetic type, bf16 or f16) as
  /// peft::load_element does. Converting a floating tensor to an integer T truncates toward
  /// zero; a value that does not fit (or NaN) is a format_error.
  template <class T>
    requires(std::is_arithmetic_v<T> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>)
  std::vector<T> read(std::string_view name) const {
    const tensor_info& t = info(name);
    const std::byte* p = data_ + t.begin;
    const std::size_t n = t.numel();
    std::vector<T> out(n);
    if constexpr (requires { dtype_of<T>::value; }) {
      if (dtype_of_v<T> == t.type) {
        if (n != 0) std::memcpy(out.data(), p, n * sizeof(T));
        return out;
      }
    }
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      if (is_floating(t.type)) {
        const double lo = static_cast<double>(std::numeric_limits<T>::min());
        const double hi = std::ldexp(1.0, std::numeric_limits<T>::digits);  // max + 1, exact
        for (std::size_t i = 0; i < n; ++i) {
          const double v = std::trunc(load_element<double>(p, t.type, i));
          if (!(v >= lo && v < hi)) {
            peft::detail::raise<format_error>(
                "safetensors_file::read", "element " + std::to_string(i) + " of " +
                                              peft::detail::safetensors_quote(t.name) + " (" +
                                              std::to_string(load_element<double>(p, t.type, i)) +
                                              ") does not fit in the requested integer type");
          }
          out[i] = static_cast<T>(v);
        }
        return out;
      }
    }
    for (std::size_t i = 0; i < n; ++i) out[i] = load_element<T>(p, t.type, i);
    return out;
  }

  /// A 2-D tensor as a (rows, cols) matrix, a 1-D tensor as (1, n); other ranks: shape_error.
  template <class T>
  matrix<T> read_matrix(std::string_view name) const {
    const tensor_info& t = info(name);
    index rows = 1;
    index cols = 0;
    if (t.shape.size() == 2) {
      rows = static_cast<index>(t.shape[0]);
      cols = static_cast<index>(t.shape[1]);
    } else if (t.shape.size() == 1) {
      cols = static_cast<index>(t.shape[0]);
    } else {
      peft::detail::raise<shape_error>("safetensors_file::read_matrix",
                                       peft::detail::safetensors_quote(t.name) + " has shape " +
                                           peft::detail::shape_text(t.shape) +
                                           ", expected 1 or 2 dimensions");
    }
    return matrix<T>(rows, cols, read<T>(name));
  }

  /// After `name` has been read (converted or quantized): its bytes leave this process's
  /// resident memory (a mapped file only; the next read maps them in again). Model loaders call
  /// it per tensor, so peak memory is the converted weights, not also the whole file.
  void release(std::string_view name) const {
    if (!map_) return;
    const tensor_info& t = info(name);
    map_->release(data_ + t.begin, t.nbytes());
  }

  /// The "__metadata__" entry (empty when absent).
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

  /// The path given to open(); empty for parse().
  const std::filesystem::path& path() const noexcept { return path_; }

  void swap(safetensors_file& other) noexcept {
    using std::swap;
    swap(path_, other.path_);
    swap(owned_, other.owned_);  // vector swap keeps the heap buffer, so data_ stays valid
    swap(map_, other.map_);
    swap(data_, other.data_);
    swap(tensors_, other.tensors_);
    swap(index_, other.index_);
    swap(metadata_, other.metadata_);
  }

 private:
  using json = nlohmann::json;

  std::string source_name() const {
    if (path_.empty()) return "the in-memory buffer";
    std::string s = "'";  // appended piece by piece: g++ 12 -O3 misreports "'" + s + "'" (-Wrestrict)
    s += path_.string();
    s += '\'';
    return s;
  }

  /// "[where] what" plus the file, for errors found while loading.
  [[noreturn]] void fail(std::string_view where, const std::string& what) const {
    peft::detail::raise<format_error>(where,
                                      path_.empty() ? what : what + " (in " + source_name() + ")");
  }

  /// A non-negative JSON integer no larger than `limit` (fractions, negative numbers and numbers
  /// beyond 64 bits are not).
  static bool as_size(const json& v, std::uint64_t limit, std::uint64_t& out) {
    if (v.is_number_unsigned()) {
      out = v.get<std::uint64_t>();
    } else if (v.is_number_integer() && v.get<std::int64_t>() >= 0) {  // "-0"
      out = static_cast<std::uint64_t>(v.get<std::int64_t>());
    } else {
      return false;
    }
    return out <= limit;
  }

  /// The deepest nesting of [] and {} outside strings (exact for valid JSON; any number for
  /// invalid JSON, which the parser rejects anyway).
  static std::size_t json_depth(const char* s, std::size_t n) noexcept {
    std::size_t depth = 0;
    std::size_t deepest = 0;
    bool in_string = false;
    for (std::size_t i = 0; i < n; ++i) {
      const char c = s[i];
      if (in_string) {
        if (c == '\\') {
          ++i;  // the escaped character cannot end the string
        } else if (c == '"') {
          in_string = false;
        }
      } else if (c == '"') {
        in_string = true;
      } else if (c == '[' || c == '{') {
        deepest = std::max(deepest, ++depth);
      } else if ((c == ']' || c == '}') && depth > 0) {
        --depth;
      }
    }
    return deepest;
  }

  void load(std::string_view where, const std::byte* base, std::size_t size) {
    if (size < 8) {
      fail(where,
           "truncated: " + std::to_string(size) + " bytes, too short for the 8-byte header length");
    }
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<std::uint64_t>(base[i]);
    if (n > max_header_size) {
      fail(where, "header length " + std::to_string(n) + " exceeds the limit of " +
                      std::to_string(max_header_size) + " bytes");
    }
    if (n > size - 8) {
      fail(where, "header length past the end: 8 + " + std::to_string(n) + " bytes > file size " +
                      std::to_string(size));
    }
    const auto header_size = static_cast<std::size_t>(n);
    const char* header = reinterpret_cast<const char*>(base + 8);

    // A raw NUL is never valid JSON, but nlohmann's lexer would take it for the end of input.
    if (std::memchr(header, '\0', header_size) != nullptr) {
      fail(where, "header is not valid JSON: it contains a NUL byte");
    }
    // Refuse deep nesting before building a DOM of it (a valid header nests 3 levels deep).
    if (json_depth(header, header_size) > max_header_depth) {
      fail(where, "header nests deeper than " + std::to_string(max_header_depth) + " levels");
    }
    json h;
    try {
      h = json::parse(header, header + header_size);
    } catch (const json::exception& e) {
      fail(where, std::string("header is not valid JSON: ") + e.what());
    }
    if (!h.is_object()) fail(where, "header is not a JSON object");

    const std::size_t data_size = size - 8 - header_size;
    std::vector<tensor_info> tensors;
    std::map<std::string, std::string> metadata;
    for (const auto& [key, value] : h.items()) {
      if (key == "__metadata__") {
        if (!value.is_object()) fail(where, "__metadata__ is not a JSON object");
        for (const auto& [k, v] : value.items()) {
          if (!v.is_string()) {
            fail(where, "__metadata__ value of " + peft::detail::safetensors_quote(k) +
                            " is not a string");
          }
          metadata.emplace(k, v.get<std::string>());
        }
        continue;
      }
      tensors.push_back(parse_entry(where, key, value, data_size));
    }

    std::sort(tensors.begin(), tensors.end(), [](const tensor_info& a, const tensor_info& b) {
      if (a.begin != b.begin) return a.begin < b.begin;
      if (a.end != b.end) return a.end < b.end;
      return a.name < b.name;
    });
    const tensor_info* previous = nullptr;  // the last non-empty tensor
    for (const tensor_info& t : tensors) {
      if (t.nbytes() == 0) continue;  // an empty range overlaps nothing
      if (previous != nullptr && t.begin < previous->end) {
        fail(where, "tensors " + peft::detail::safetensors_quote(previous->name) + " [" +
                        std::to_string(previous->begin) + ", " + std::to_string(previous->end) +
                        ") and " + peft::detail::safetensors_quote(t.name) + " [" +
                        std::to_string(t.begin) + ", " + std::to_string(t.end) + ") overlap");
      }
      previous = &t;
    }

    std::map<std::string, std::size_t, std::less<>> index;
    for (std::size_t i = 0; i < tensors.size(); ++i) index.emplace(tensors[i].name, i);

    tensors_ = std::move(tensors);
    index_ = std::move(index);
    metadata_ = std::move(metadata);
    data_ = base + 8 + header_size;
  }

  tensor_info parse_entry(std::string_view where, const std::string& name, const json& value,
                          std::size_t data_size) const {
    const std::string q = "tensor " + peft::detail::safetensors_quote(name);
    if (!value.is_object()) fail(where, q + " is not a JSON object");
    tensor_info t;
    t.name = name;

    const auto dt = value.find("dtype");
    if (dt == value.end()) fail(where, q + " has no dtype");
    if (!dt->is_string()) fail(where, q + ": dtype is not a string");
    const auto& dt_name = dt->get_ref<const std::string&>();
    const auto type = dtype_from_safetensors_name(dt_name);
    if (!type) fail(where, q + " has unknown dtype " + peft::detail::safetensors_quote(dt_name));
    t.type = *type;

    const auto sh = value.find("shape");
    if (sh == value.end()) fail(where, q + " has no shape");
    if (!sh->is_array()) fail(where, q + ": shape is not an array");
    std::size_t numel = 1;
    t.shape.reserve(sh->size());
    for (const json& d : *sh) {
      std::uint64_t dim = 0;
      if (d.is_number_integer() && !d.is_number_unsigned() && d.get<std::int64_t>() < 0) {
        fail(where, q + " has a negative dimension " + std::to_string(d.get<std::int64_t>()));
      }
      if (!as_size(d, static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), dim)) {
        fail(where, q + ": dimension " + std::to_string(t.shape.size()) +
                        " of its shape is not an integer in [0, 2^63)");
      }
      t.shape.push_back(static_cast<std::int64_t>(dim));
      if (dim > std::numeric_limits<std::size_t>::max() ||
          !peft::detail::safetensors_mul(numel, static_cast<std::size_t>(dim), numel)) {
        fail(where, q + ": the element count of its shape overflows");
      }
    }

    const auto off = value.find("data_offsets");
    if (off == value.end()) fail(where, q + " has no data_offsets");
    std::uint64_t b = 0;
    std::uint64_t e = 0;
    constexpr auto size_max = static_cast<std::uint64_t>(std::numeric_limits<std::size_t>::max());
    if (!off->is_array() || off->size() != 2 || !as_size((*off)[0], size_max, b) ||
        !as_size((*off)[1], size_max, e)) {
      fail(where, q + ": data_offsets is not two non-negative integers");
    }
    if (b > e) {
      fail(where, q + " has data_offsets [" + std::to_string(b) + ", " + std::to_string(e) +
                      "] with begin > end");
    }
    if (e > data_size) {
      fail(where, q + " has data_offsets [" + std::to_string(b) + ", " + std::to_string(e) +
                      "] past the end of the " + std::to_string(data_size) + "-byte data section");
    }
    t.begin = static_cast<std::size_t>(b);
    t.end = static_cast<std::size_t>(e);

    std::size_t nbytes = 0;
    if (!peft::detail::safetensors_mul(numel, size_of(t.type), nbytes)) {
      fail(where, q + ": the byte size of its shape overflows");
    }
    if (nbytes != t.nbytes()) {
      fail(where, q + " is " + std::string(safetensors_name(t.type)) + " " +
                      peft::detail::shape_text(t.shape) + " = " +
                      std::to_string(nbytes) + " bytes, but its data_offsets span " +
                      std::to_string(t.nbytes()) + " bytes");
    }
    return t;
  }

  std::filesystem::path path_;
  std::vector<std::byte> owned_;  // parse(): the image
  std::shared_ptr<const detail::mapped_bytes> map_;  // open(): the mapping
  const std::byte* data_ = nullptr;  // start of the data section
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

inline void swap(safetensors_file& a, safetensors_file& b) noexcept { a.swap(b); }

/// Collects tensors and writes them as one safetensors file. Data is laid out in the order the
/// tensors were added; the header is padded with spaces to a multiple of 8 bytes.
class safetensors_writer {
 public:
  /// The "__metadata__" entry (omitted from the file when empty).
  void set_metadata(std::map<std::string, std::string> m) { metadata_ = std::move(m); }

  /// Adds a tensor whose bytes (little-endian, row-major) are copied now. shape_error if
  /// data.size() != numel * size_of(type) or the shape is negative / too large; format_error on a
  /// duplicate name or the reserved name "__metadata__".
  void add(std::string name, dtype type, std::vector<std::int64_t> shape,
           std::span<const std::byte> data) {
    constexpr std::string_view where = "safetensors_writer::add";
    const std::size_t nbytes = peft::detail::safetensors_checked_nbytes(where, name, type, shape);
    if (data.size() != nbytes) {
      peft::detail::raise<shape_error>(
          where, "tensor " + peft::detail::safetensors_quote(name) + " is " +
                     std::string(safetensors_name(type)) + " " +
                     peft::detail::shape_text(shape) + " = " +
                     std::to_string(nbytes) + " bytes, but " + std::to_string(data.size()) +
                     " bytes were given");
    }
    claim_name(where, name);
    entries_.push_back({std::move(name),
                        type,
                        std::move(shape),
                        nbytes,
                        std::vector<std::byte>(data.begin(), data.end()),
                        {}});
  }

  /// Adds values converted to `stored_as` (default: the dtype of T) with peft::store_element.
  /// shape_error unless values.size() equals the product of the shape.
  template <class T>
  void add(std::string name, std::vector<std::int64_t> shape, std::span<const T> values,
           dtype stored_as = dtype_of_v<T>) {
    constexpr std::string_view where = "safetensors_writer::add";
    const std::size_t nbytes =
        peft::detail::safetensors_checked_nbytes(where, name, stored_as, shape);
    const std::size_t numel = nbytes / size_of(stored_as);  // exact: nbytes did not overflow
    if (values.size() != numel) {
      peft::detail::raise<shape_error>(
          where, "tensor " + peft::detail::safetensors_quote(name) + " of shape " +
                     peft::detail::shape_text(shape) + " needs " +
                     std::to_string(numel) + " values, got " + std::to_string(values.size()));
    }
    claim_name(where, name);
    std::vector<std::byte> data(nbytes);
    if constexpr (requires { dtype_of<T>::value; }) {
      if (stored_as == dtype_of_v<T>) {
        if (nbytes != 0) std::memcpy(data.data(), values.data(), nbytes);
        entries_.push_back(
            {std::move(name), stored_as, std::move(shape), nbytes, std::move(data), {}});
        return;
      }
    }
    for (std::size_t i = 0; i < numel; ++i) {
      if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) {
        store_element(data.data(), stored_as, i, static_cast<float>(values[i]));
      } else {
        store_element(data.data(), stored_as, i, values[i]);
      }
    }
    entries_.push_back({std::move(name), stored_as, std::move(shape), nbytes, std::move(data), {}});
  }

  /// Same, from a vector.
  template <class T>
  void add(std::string name, std::vector<std::int64_t> shape, const std::vector<T>& values,
           dtype stored_as = dtype_of_v<T>) {
    add(std::move(name), std::move(shape), std::span<const T>(values), stored_as);
  }

  /// A matrix as a 2-D tensor of shape [rows, cols].
  template <class T>
  void add(std::string name, const matrix<T>& m, dtype stored_as = dtype_of_v<T>) {
    add(std::move(name), {static_cast<std::int64_t>(m.rows()), static_cast<std::int64_t>(m.cols())},
        std::span<const T>(m.storage()), stored_as);
  }

  /// A tensor whose bytes are produced only while write() runs, one tensor in memory at a time:
  /// `fill` receives a zeroed buffer of exactly numel * size_of(type) bytes to fill.
  void add_lazy(std::string name, dtype type, std::vector<std::int64_t> shape,
                std::function<void(std::span<std::byte>)> fill) {
    constexpr std::string_view where = "safetensors_writer::add_lazy";
    const std::size_t nbytes = peft::detail::safetensors_checked_nbytes(where, name, type, shape);
    if (!fill) {
      peft::detail::raise<error>(
          where, "tensor " + peft::detail::safetensors_quote(name) + " has an empty fill function");
    }
    claim_name(where, name);
    entries_.push_back({std::move(name), type, std::move(shape), nbytes, {}, std::move(fill)});
  }

  /// Number of tensors added.
  std::size_t size() const noexcept { return entries_.size(); }

  /// Writes <dir>/.<filename>.tmp-<random> next to `path`, fsyncs it and renames it over `path`.
  /// On any failure (including an exception from a fill callback) the temporary file is
  /// removed, `path` is untouched and the exception propagates (io_error for OS failures).
  void write(const std::filesystem::path& path) const {
    constexpr std::string_view where = "safetensors_writer::write";
    if (!path.has_filename()) {
      peft::detail::raise<io_error>(where, "'" + path.string() + "' does not name a file");
    }
    const std::string header = header_bytes(where);
    detail::atomic_output out(where, path);
    std::array<std::byte, 8> length{};
    for (std::size_t i = 0; i < 8; ++i) {
      length[i] =
          static_cast<std::byte>((static_cast<std::uint64_t>(header.size()) >> (8 * i)) & 0xffu);
    }
    out.write(length.data(), length.size());
    out.write(header.data(), header.size());
    std::vector<std::byte> buffer;  // reused by every lazy tensor
    for (const entry& e : entries_) {
      if (e.fill) {
        buffer.assign(e.nbytes, std::byte{0});
        e.fill(std::span<std::byte>(buffer));
        out.write(buffer.data(), buffer.size());
      } else {
        out.write(e.data.data(), e.data.size());
      }
    }
    out.commit();
  }

 private:
  struct entry {
    std::string name;
    dtype type;
    std::vector<std::int64_t> shape;
    std::size_t nbytes;
    std::vector<std::byte> data;                     // eager tensors
    std::function<void(std::span<std::byte>)> fill;  // lazy tensors
  };

  void claim_name(std::string_view where, const std::string& name) {
    if (name == "__metadata__") {
      peft::detail::raise<format_error>(where,
                                        "'__metadata__' is reserved and cannot name a tensor");
    }
    if (!names_.insert(name).second) {
      peft::detail::raise<format_error>(
          where, "duplicate tensor name " + peft::detail::safetensors_quote(name));
    }
  }

  /// The JSON header padded with spaces so that 8 + its length is a multiple of 8.
  std::string header_bytes(std::string_view where) const {
    using ojson = nlohmann::ordered_json;
    ojson h = ojson::object();
    if (!metadata_.empty()) {
      ojson m = ojson::object();
      for (const auto& [k, v] : metadata_) m[k] = v;
      h["__metadata__"] = std::move(m);
    }
    std::size_t offset = 0;
    for (const entry& e : entries_) {
      if (e.nbytes > std::numeric_limits<std::size_t>::max() - offset) {
        peft::detail::raise<shape_error>(where, "the tensors add up to more than 2^64 bytes");
      }
      ojson t = ojson::object();
      t["dtype"] = std::string(safetensors_name(e.type));
      t["shape"] = e.shape;
      t["data_offsets"] = ojson::array({offset, offset + e.nbytes});
      h[e.name] = std::move(t);
      offset += e.nbytes;
    }
    std::string s;
    try {
      s = h.dump();
    } catch (const nlohmann::json::exception&) {
      peft::detail::raise<format_error>(where,
                                        "a tensor name or metadata string is not valid UTF-8");
    }
    s.append((8 - s.size() % 8) % 8, ' ');  // 8 + size is then a multiple of 8
    return s;
  }

  std::map<std::string, std::string> metadata_;
  std::vector<entry> entries_;
  std::set<std::string, std::less<>> names_;
};

}  // namespace io
}  // namespace peft
