// tests/fuzz/fuzz_model_config.cpp — libFuzzer target for a model's config.json
// (models/config.hpp: lm_config::from_json, what lm_config::load runs on the parsed document).
//
// Any JSON document must either give a config or raise a peft::error; a config that is given
// must hold what the model code relies on (positive sizes, one sliding-window entry per layer,
// validate() passing). Text that is not JSON is skipped: nlohmann's parser is not ours, and
// load() turns its exception into a format_error. Anything else escaping — another exception, a
// sanitizer report — is a crash.
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>

#include "peft/models/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    const auto c = peft::models::lm_config::from_json(j);
    if (c.vocab_size < 1 || c.hidden_size < 1 || c.intermediate_size < 1 || c.layers < 1 || c.heads < 1 ||
        c.kv_heads < 1 || c.head_dim < 1 || c.max_positions < 1 || c.layers > peft::models::lm_config::max_layers) {
      __builtin_trap();
    }
    if (static_cast<peft::index>(c.sliding_window.size()) != c.layers) __builtin_trap();
    for (const auto w : c.sliding_window) {
      if (w < 0) __builtin_trap();
    }
    try {
      c.validate();  // from_json validated: a second call must agree
    } catch (const peft::error&) {
      __builtin_trap();
    }
  } catch (const peft::error&) {
    // a malformed or unsupported config, reported as the library promises
  }
  return 0;
}
