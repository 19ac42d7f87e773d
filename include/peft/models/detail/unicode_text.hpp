// peft/models/detail/unicode_text.hpp — the Unicode pieces tokenizers need: UTF-8 checks and
// lossy decoding, Unicode normalisation (utf8proc), regular expressions with Unicode classes
// (PCRE2), and GPT-2's byte-to-character table.
//
// Programs that include it link libpcre2-8 and libutf8proc (CMake: peft::text).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>
#include <utf8proc.h>

#include "peft/core/error.hpp"

namespace peft::detail {

/// Bytes of the UTF-8 sequence starting with lead byte `c` (1 for a stray byte).
inline std::size_t utf8_length(unsigned char c) noexcept {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xE) return 3;
  if ((c >> 3) == 0x1E) return 4;
  return 1;
}

/// Length of the valid UTF-8 sequence at s[i] (0 when it is not one): the rules of Unicode 3.9
/// (no overlongs, no surrogates, nothing above U+10FFFF).
inline std::size_t valid_utf8_at(std::string_view s, std::size_t i) noexcept {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  std::size_t n = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (i + 1 >= s.size() || b(i + 1) < lo || b(i + 1) > hi) return 0;
  for (std::size_t k = 2; k < n; ++k) {
    if (i + k >= s.size() || b(i + k) < 0x80 || b(i + k) > 0xBF) return 0;
  }
  return n;
}

/// Offset of the first byte that is not valid UTF-8, or npos.
inline std::size_t invalid_utf8_offset(std::string_view s) noexcept {
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = valid_utf8_at(s, i);
    if (n == 0) return i;
    i += n;
  }
  return std::string_view::npos;
}

/// Bytes as text, each maximal invalid subpart replaced by U+FFFD (Rust's from_utf8_lossy, which
/// `tokenizers` uses when decoding).
inline std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = valid_utf8_at(s, i);
    if (n) {
      out.append(s.substr(i, n));
      i += n;
      continue;
    }
    // The maximal subpart: the lead byte and the continuation bytes that could still have
    // completed a valid sequence.
    const unsigned char c = b(i);
    std::size_t len = 1;
    std::size_t want = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) want = 2;
    else if (c >= 0xE0 && c <= 0xEF) want = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) want = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    if (want) {
      if (i + 1 < s.size() && b(i + 1) >= lo && b(i + 1) <= hi) {
        len = 2;
        while (len < want && i + len < s.size() && b(i + len) >= 0x80 && b(i + len) <= 0xBF) ++len;
      }
    }
    out += "\xEF\xBF\xBD";
    i += len;
  }
  return out;
}

/// Appends code point `cp` as UTF-8.
inline void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

/// The code point of the valid UTF-8 sequence of `n` bytes at p.
inline std::uint32_t decode_utf8(const char* p, std::size_t n) noexcept {
  const auto b = [&](std::size_t k) { return static_cast<std::uint32_t>(static_cast<unsigned char>(p[k])); };
  switch (n) {
    case 1: return b(0);
    case 2: return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3: return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    default: return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
  }
}

/// Unicode normalisation forms (utf8proc).
enum class normal_form { nfc, nfd, nfkc, nfkd };

/// `s` (valid UTF-8) in normal form `form`.
inline std::string normalize_unicode(std::string_view s, normal_form form) {
  if (s.empty()) return {};
  int options = UTF8PROC_STABLE;
  switch (form) {
    case normal_form::nfc: options |= UTF8PROC_COMPOSE; break;
    case normal_form::nfd: options |= UTF8PROC_DECOMPOSE; break;
    case normal_form::nfkc: options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
    case normal_form::nfkd: options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
  }
  utf8proc_uint8_t* out = nullptr;
  const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), static_cast<utf8proc_ssize_t>(s.size()),
                              &out, static_cast<utf8proc_option_t>(options));
  if (n < 0) raise<format_error>("tokenizer", std::string("Unicode normalisation failed: ") + utf8proc_errmsg(n));
  std::string r(reinterpret_cast<const char*>(out), static_cast<std::size_t>(n));
  std::free(out);
  return r;
}

/// `s` (valid UTF-8) with every code point lower-cased (simple case mapping).
inline std::string lowercase_unicode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_length(static_cast<unsigned char>(s[i]));
    append_utf8(out, static_cast<std::uint32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(decode_utf8(s.data() + i, n)))));
    i += n;
  }
  return out;
}

/// A compiled PCRE2 pattern in UTF mode with Unicode character classes (\s, \w, \d and the POSIX
/// classes match by Unicode properties, as in Oniguruma, which `tokenizers` uses).
class unicode_regex {
 public:
  unicode_regex() = default;
  /// format_error naming `where` when `pattern` does not compile.
  unicode_regex(std::string_view pattern, std::string_view where) {
    int code = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* c = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                                  &code, &offset, nullptr);
    if (!c) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(code, buf, sizeof buf);
      raise<format_error>(where, "the regular expression '" + std::string(pattern) + "' does not compile at offset " +
                                     std::to_string(offset) + ": " + reinterpret_cast<const char*>(buf));
    }
    code_.reset(c, code_free{});
    pcre2_jit_compile(c, PCRE2_JIT_COMPLETE);  // where the JIT is unavailable the interpreter runs
  }

  /// Byte ranges [begin, end) of the successive non-overlapping matches in `s` (valid UTF-8),
  /// empty matches included, as a regex iterator reports them.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(std::string_view s) const {
    std::vector<std::pair<std::size_t, std::size_t>> out;
    if (!code_) return out;
    std::unique_ptr<pcre2_match_data, match_data_free> md(pcre2_match_data_create_from_pattern(code_.get(), nullptr));
    std::size_t start = 0;
    while (start <= s.size()) {
      int rc = pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), start, PCRE2_NO_UTF_CHECK,
                           md.get(), nullptr);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {  // a long run for the JIT's stack: interpret instead
        rc = pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT,
                         md.get(), nullptr);
      }
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR buf[256];
        pcre2_get_error_message(rc, buf, sizeof buf);
        raise<format_error>("tokenizer", std::string("regular expression match failed: ") + reinterpret_cast<const char*>(buf));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      const std::size_t b = ov[0], e = ov[1];
      out.emplace_back(b, e);
      if (e > b) {
        start = e;
      } else {  // an empty match: step over one character
        if (b >= s.size()) break;
        start = b + utf8_length(static_cast<unsigned char>(s[b]));
      }
    }
    return out;
  }

  explicit operator bool() const noexcept { return code_ != nullptr; }

 private:
  struct code_free {
    void operator()(pcre2_code* c) const noexcept { pcre2_code_free(c); }
  };
  struct match_data_free {
    void operator()(pcre2_match_data* m) const noexcept { pcre2_match_data_free(m); }
  };
  // Shared so a tokenizer copies cheaply; the compiled code is only read (match data is per call).
  std::shared_ptr<pcre2_code> code_{nullptr, code_free{}};
};

/// GPT-2's table: each byte as a printable character (bytes that are printable Latin-1 map to
/// themselves, the others to U+0100 onwards), as UTF-8 strings; and its inverse.
struct byte_level_table {
  std::array<std::string, 256> to_char;
  std::vector<std::pair<std::uint32_t, unsigned char>> from_char;  // sorted by code point

  static const byte_level_table& get() {
    static const byte_level_table t;
    return t;
  }

  /// The byte a character stands for, or -1.
  int byte_of(std::uint32_t cp) const noexcept {
    std::size_t lo = 0, hi = from_char.size();
    while (lo < hi) {
      const std::size_t mid = (lo + hi) / 2;
      if (from_char[mid].first < cp) lo = mid + 1;
      else hi = mid;
    }
    return lo < from_char.size() && from_char[lo].first == cp ? from_char[lo].second : -1;
  }

 private:
  byte_level_table() {
    std::uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const std::uint32_t cp = printable ? static_cast<std::uint32_t>(b) : next++;
      append_utf8(to_char[static_cast<std::size_t>(b)], cp);
      from_char.emplace_back(cp, static_cast<unsigned char>(b));
    }
    std::sort(from_char.begin(), from_char.end());
  }
};

}  // namespace peft::detail
