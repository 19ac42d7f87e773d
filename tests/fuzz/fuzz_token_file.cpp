// tests/fuzz/fuzz_token_file.cpp — libFuzzer target for the token-id file
// (models/token_file.hpp: parse_token_text, what read_token_file runs on the file's text).
//
// Any text must either give sequences or raise a peft::error. Sequences that are given are
// non-empty lists of non-negative ids, and printing them back one line each (ids separated by
// one space) parses to the same sequences. Anything else escaping — another exception, a
// sanitizer report — is a crash.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "peft/models/token_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const auto rows = peft::models::parse_token_text(text, "tokens.txt");
    if (rows.empty()) __builtin_trap();
    std::string printed;
    for (const auto& row : rows) {
      if (row.empty()) __builtin_trap();
      for (std::size_t i = 0; i < row.size(); ++i) {
        if (row[i] < 0) __builtin_trap();
        if (i != 0) printed += ' ';
        printed += std::to_string(row[i]);
      }
      printed += '\n';
    }
    if (peft::models::parse_token_text(printed, "printed") != rows) __builtin_trap();
  } catch (const peft::error&) {
    // a malformed file, reported as the library promises
  }
  return 0;
}
