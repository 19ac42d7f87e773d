// peft/models/token_file.hpp — sequences of token ids as text: one sequence per line, ids
// separated by spaces or tabs (the `peft logits|finetune|generate --tokens FILE` format).
//
//   auto rows = peft::models::read_token_file("tokens.txt");   // vector<vector<long long>>
//
// format_error naming the file and line for anything but non-negative decimal integers, for a
// line without ids, and for a file without lines; io_error when the file cannot be read.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include "peft/core/error.hpp"

namespace peft::models {

/// Parses the text of a token file; `source` names it in errors.
inline std::vector<std::vector<long long>> parse_token_text(std::string_view text, const std::string& source) {
  constexpr const char* where = "read_token_file";
  std::vector<std::vector<long long>> rows;
  std::size_t line_no = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    std::vector<long long> ids;
    std::size_t i = 0;
    while (i < line.size()) {
      if (line[i] == ' ' || line[i] == '\t') {
        ++i;
        continue;
      }
      if (line[i] < '0' || line[i] > '9') {
        detail::raise<format_error>(where, source + " line " + std::to_string(line_no) + ": '" +
                                               std::string(line.substr(i, 12)) + "' is not a token id");
      }
      long long v = 0;
      while (i < line.size() && line[i] >= '0' && line[i] <= '9') {
        if (v > (INT64_MAX - 9) / 10) {
          detail::raise<format_error>(where, source + " line " + std::to_string(line_no) + ": a token id is too large");
        }
        v = v * 10 + (line[i++] - '0');
      }
      if (i < line.size() && line[i] != ' ' && line[i] != '\t') {
        detail::raise<format_error>(where, source + " line " + std::to_string(line_no) + ": '" +
                                               std::string(line.substr(i, 12)) + "' is not a token id");
      }
      ids.push_back(v);
    }
    if (ids.empty()) {
      if (pos >= text.size() && line.empty()) break;  // the newline ending the last line
      detail::raise<format_error>(where, source + " line " + std::to_string(line_no) + " holds no token id");
    }
    rows.push_back(std::move(ids));
  }
  if (rows.empty()) detail::raise<format_error>(where, source + " holds no sequence");
  return rows;
}

/// Reads a token file.
inline std::vector<std::vector<long long>> read_token_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::raise<io_error>("read_token_file", "cannot open " + path.string());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return parse_token_text(text, path.string());
}

}  // namespace peft::models
