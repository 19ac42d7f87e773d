// tests/fuzz/fuzz_tokenizer_json.cpp — libFuzzer target for a model's tokenizer.json
// (models/tokenizer.hpp: tokenizer::from_json_text, then encode and decode).
//
// Any input must either give a tokenizer or raise a peft::error. A tokenizer that loads must
// encode a few texts (ASCII, multilingual, special-token-like, whitespace runs) into ids inside
// its vocabulary, and decode those ids back into valid UTF-8 — or raise a peft::error. Anything
// else escaping (another exception, a sanitizer report, a hang) is a crash.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "peft/models/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const auto tok = peft::models::tokenizer::from_json_text(text, "fuzz.json");
    for (const char* sample : {"Hello, world! It's 2024.", "Grüße, 世界 🤗 e\xCC\x81", "<s>[INST] hi <|endoftext|>",
                               "  \t\n\n  x  ", ""}) {
      for (const bool special : {false, true}) {
        const auto ids = tok.encode(sample, special);
        for (const long long id : ids) {
          if (id < 0 || id >= tok.vocab_size()) __builtin_trap();
        }
        try {
          const std::string back = tok.decode(ids, special);
          if (peft::detail::invalid_utf8_offset(back) != std::string_view::npos && !back.empty()) {
            // ByteLevel and ByteFallback decoding repair bytes; a token string from the file
            // itself may still be anything the JSON allowed, which is valid UTF-8 too.
            __builtin_trap();
          }
        } catch (const peft::shape_error&) {
          // an id the file's model does not name (a gap in the vocabulary)
        }
      }
    }
  } catch (const peft::error&) {
    // a malformed or unsupported tokenizer.json, reported as the library promises
  }
  return 0;
}
