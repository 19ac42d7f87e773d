// tests/fuzz/fuzz_safetensors.cpp — libFuzzer target for the safetensors reader.
//
// Any input must either parse or raise a peft::error; every tensor of a file that parses must
// read back (as double, as a matrix where the rank allows) without touching memory out of
// bounds. Anything else escaping — another exception, a sanitizer report — is a crash.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "peft/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> bytes(size);
  if (size != 0) std::memcpy(bytes.data(), data, size);
  try {
    const auto file = peft::io::safetensors_file::parse(std::move(bytes));
    for (const auto& t : file.tensors()) {
      const std::vector<double> values = file.read<double>(t.name);
      if (values.size() != t.numel()) __builtin_trap();
      if (file.bytes(t.name).size() != t.numel() * peft::size_of(t.type)) __builtin_trap();
      if (&file.info(t.name) != &t || !file.contains(t.name)) __builtin_trap();
      if (t.shape.size() == 1 || t.shape.size() == 2) {
        const auto m = file.read_matrix<float>(t.name);
        if (static_cast<std::size_t>(m.size()) != t.numel()) __builtin_trap();
      }
    }
    for (const auto& [key, value] : file.metadata()) {
      if (key.empty() && value.size() > size) __builtin_trap();
    }
  } catch (const peft::error&) {
    // a malformed input, reported as the library promises
  }
  return 0;
}
