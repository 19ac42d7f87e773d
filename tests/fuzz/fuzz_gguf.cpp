// tests/fuzz/fuzz_gguf.cpp — libFuzzer target for the GGUF reader and what reads GGUF files
// (frozen bases over their tensors, the model config, GGUF LoRA import).
//
// Any input must either parse or raise a peft::error; every tensor of a file that parses must be
// readable within its bounds (decoded through gguf_weight when it is a matrix of an implemented
// type). Anything else escaping — another exception, a sanitizer report — is a crash.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "peft/base/gguf_weight.hpp"
#include "peft/io/gguf.hpp"
#include "peft/models/gguf_lora.hpp"
#include "peft/models/gguf_model.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> bytes(size);
  if (size != 0) std::memcpy(bytes.data(), data, size);
  try {
    const auto file = peft::io::gguf_file::parse(std::move(bytes));
    for (const auto& t : file.tensors()) {
      const auto b = file.bytes(t);
      if (b.size() != t.nbytes || file.find_tensor(t.name) != &t) __builtin_trap();
      if (t.ne.size() == 2 && peft::gguf_weight::implemented(t.type) && t.ne[0] > 0 && t.ne[1] > 0 &&
          t.ne[0] <= (1 << 16) && t.ne[1] <= 64) {
        try {
          const auto w = peft::gguf_weight::view(file, t);
          std::vector<float> row(static_cast<std::size_t>(t.ne[0]));
          for (peft::index i = 0; i < w.out_features(); ++i) w.dequantize_row(i, row.data());
        } catch (const peft::error&) {
        }
      }
    }
    for (const auto& [key, value] : file.metadata()) {
      if (key.size() > size) __builtin_trap();
      (void)value.number();
    }
    try {
      (void)peft::models::gguf_config(file);
    } catch (const peft::error&) {
    }
    try {
      (void)peft::models::import_gguf_lora(file);
    } catch (const peft::error&) {
    }
  } catch (const peft::error&) {
    // a malformed input, reported as the library promises
  }
  return 0;
}
