// examples/common/digits_data.hpp — the UCI handwritten digits for compare_methods: reading the
// bundled CSV (gzip through `gzip -dc`), a seeded split, and the rotated variant of the images.
//
// Data: E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine
// Learning Repository, 1998, doi:10.24432/C50P49, CC BY 4.0 (examples/data/README.md).
// Rows: 64 pixel values 0..16 (an 8x8 image, row by row), then the label 0..9.
#pragma once

#include <peft/core/matrix.hpp>
#include <peft/core/random.hpp>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace digits {

using peft::index;

inline constexpr index side = 8, pixels = side * side, classes = 10;

struct dataset {
  peft::matrix<float> x;  // (n, 64): 8x8 images, row by row, pixels scaled to [0, 1]
  std::vector<int> y;     // (n) labels 0..9
  index size() const { return x.rows(); }
};

/// Bad input data (a missing file, a malformed row): reported as such, not as a crash.
struct data_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// The file's text; a path ending in .gz is decompressed through `gzip -dc` (POSIX popen).
inline std::string read_text(const std::string& path) {
  std::FILE* probe = std::fopen(path.c_str(), "rb");
  if (probe == nullptr) {
    std::string m = "cannot open ";
    m += path;
    m += ": ";
    m += std::strerror(errno);
    throw data_error(m);
  }
  std::fclose(probe);
  const bool gz = path.ends_with(".gz");
  std::string command = "gzip -dc '";  // the path single-quoted for the shell
  for (char c : path) {
    if (c == '\'') {
      command += "'\\''";
    } else {
      command += c;
    }
  }
  command += '\'';
  std::FILE* f = gz ? popen(command.c_str(), "r") : std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw data_error("cannot read " + path);
  std::string text;
  char buffer[1 << 16];
  for (std::size_t n; (n = std::fread(buffer, 1, sizeof buffer, f)) > 0;) text.append(buffer, n);
  const bool read_error = std::ferror(f) != 0;
  if ((gz ? pclose(f) : std::fclose(f)) != 0 || read_error) {
    std::string m = gz ? "cannot decompress " : "cannot read ";
    m += path;
    throw data_error(m);
  }
  return text;
}

/// Rows of 64 pixel values 0..16 followed by the label 0..9, comma separated.
inline dataset parse(std::string_view text, const std::string& path) {
  std::vector<float> x;
  std::vector<int> y;
  for (index line_no = 1; !text.empty(); ++line_no) {
    const std::size_t eol = std::min(text.find('\n'), text.size());
    std::string_view line = text.substr(0, eol);
    text.remove_prefix(std::min(eol + 1, text.size()));
    if (line.ends_with('\r')) line.remove_suffix(1);
    if (line.empty()) continue;
    auto fail = [&](const std::string& what) {
      std::string m = path;
      m += ':';
      m += std::to_string(line_no);
      m += ": ";
      m += what;
      throw data_error(m);
    };
    int v[pixels + 1];
    index n = 0;
    for (const char *p = line.data(), *end = p + line.size();; ++p) {
      if (n > pixels) fail("more than 65 comma-separated values");
      const auto [next, ec] = std::from_chars(p, end, v[n++]);
      if (ec != std::errc{}) fail("column " + std::to_string(n) + " is not an integer");
      if ((p = next) == end) break;
      if (*p != ',') fail("expected ',' after column " + std::to_string(n));
    }
    if (n <= pixels) fail(std::to_string(n) + " values, expected 64 pixels and a label");
    for (index j = 0; j < pixels; ++j) {
      if (v[j] < 0 || v[j] > 16) fail("pixel value " + std::to_string(v[j]) + " outside 0..16");
      x.push_back(static_cast<float>(v[j]) / 16.0f);
    }
    if (v[pixels] < 0 || v[pixels] > 9) fail("label " + std::to_string(v[pixels]) + " outside 0..9");
    y.push_back(v[pixels]);
  }
  if (y.size() < 50) throw data_error(path + ": " + std::to_string(y.size()) + " rows, too few");
  const auto n = static_cast<index>(y.size());
  return {peft::matrix<float>(n, pixels, std::move(x)), std::move(y)};
}

inline dataset load(const std::string& path) { return parse(read_text(path), path); }

/// 0, 1, ..., n - 1 in a random order (Fisher-Yates).
inline std::vector<index> permutation(index n, peft::rng& gen) {
  std::vector<index> p(static_cast<std::size_t>(n));
  for (index i = 0; i < n; ++i) p[static_cast<std::size_t>(i)] = i;
  for (std::size_t i = p.size(); i > 1; --i) std::swap(p[i - 1], p[gen.below(i)]);
  return p;
}

/// The rows order[first], ..., order[last - 1] of `d`.
inline dataset subset(const dataset& d, const std::vector<index>& order, index first, index last) {
  dataset s{peft::matrix<float>(last - first, pixels), {}};
  for (index i = first; i < last; ++i) {
    const index row = order[static_cast<std::size_t>(i)];
    std::copy(d.x.row(row), d.x.row(row) + pixels, s.x.row(i - first));
    s.y.push_back(d.y[static_cast<std::size_t>(row)]);
  }
  return s;
}

/// The same digits rotated 90 degrees clockwise: new(r, c) = old(7 - c, r).
inline dataset rotated(const dataset& d) {
  dataset out{peft::matrix<float>(d.size(), pixels), d.y};
  for (index i = 0; i < d.size(); ++i) {
    for (index r = 0; r < side; ++r) {
      for (index c = 0; c < side; ++c) out.x(i, r * side + c) = d.x(i, (side - 1 - c) * side + r);
    }
  }
  return out;
}

}  // namespace digits
