// tests/fuzz/fuzz_adapter_config.cpp — libFuzzer target for a PEFT checkpoint: adapter_config.json
// (adapter_config::parse and its pattern rules) and every method's codec (load_checkpoint_as from
// memory: the tensors of adapter_model.safetensors mapped to adapters by the config).
//
// Input: three parts split at the first two NUL bytes (JSON text holds no raw NUL): the text of
// adapter_config.json, the JSON header of adapter_model.safetensors, and its tensor data; the
// harness puts the header's 8-byte length in front (so mutating the header keeps the file
// consistent; fuzz_safetensors covers the length field). corpus/adapter_config/ is written by
// make_adapter_config_corpus.py. A config field "fuzz_base_shape": [out, in] (small) is passed
// to the loader as every module's base shape, as merge_model passes the base's.
//
// Any input must either load or raise a peft::error. What loads must be usable: every adapter
// runs forward (and delta_weight where mergeable) on a small dense base of its shape, and
// describes itself into a config again (the save path). Anything else escaping — another
// exception, a sanitizer report — is a crash.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/base/dense.hpp"
#include "peft/io/adapter_config.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"

namespace {

using adapter = peft::any_adapter<float>;

/// Module paths the config's rules are asked about (the corpus's modules and typical LLM ones).
const char* const probe_modules[] = {"up", "down", "model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj",
                                     "lm_head", ""};

void exercise_config(const peft::io::adapter_config& c) {
  for (const char* m : probe_modules) {
    (void)c.targets(m);
    (void)c.rank_for(m);
    (void)c.alpha_for(m);
    (void)c.saves_module(m);
  }
  (void)c.targets_string();
  (void)c.to_json().dump();
}

std::optional<std::pair<peft::index, peft::index>> base_shape_of(const peft::io::adapter_config& c) {
  const auto* v = c.field("fuzz_base_shape");
  if (v == nullptr || !v->is_array() || v->size() != 2 || !(*v)[0].is_number_integer() ||
      !(*v)[1].is_number_integer()) {
    return std::nullopt;
  }
  const auto out = (*v)[0].get<long long>(), in = (*v)[1].get<long long>();
  if (out < 1 || in < 1 || out > 4096 || in > 4096) return std::nullopt;
  return std::pair<peft::index, peft::index>{out, in};
}

/// Runs a loaded adapter on a dense base of its shape, when that is small.
void exercise_adapter(adapter& a) {
  if (a.out_features() == 0 || a.in_features() == 0) {  // IA3's unbound side: bind it as a base would
    try {
      a.set_features(a.in_features() == 0 ? 3 : a.in_features(), a.out_features() == 0 ? 5 : a.out_features());
    } catch (const peft::error&) {
      return;
    }
  }
  const peft::index out = a.out_features(), in = a.in_features();
  if (out < 0 || in < 0) __builtin_trap();
  for (const auto& p : a.parameters()) {  // what saving writes: the logical shape over the values
    std::int64_t n = 1;
    for (const auto d : p.shape) n *= d;
    if (n != p.value.size()) __builtin_trap();
  }
  if (out == 0 || in == 0 || out > (1 << 16) / in) return;
  peft::matrix<float> w(out, in);
  for (peft::index i = 0; i < out; ++i) {
    for (peft::index j = 0; j < in; ++j) w(i, j) = 0.25f * static_cast<float>((i + 2 * j) % 7) - 0.75f;
  }
  const peft::dense<float> base(std::move(w), std::vector<float>(static_cast<std::size_t>(out), 0.5f));
  peft::matrix<float> x(2, in, 0.5f), y(2, out);
  adapter::cache_type cache;
  try {
    a.forward(base, std::as_const(x).view(), y.view(), cache);
  } catch (const peft::error&) {
  }
  if (a.mergeable<peft::dense<float>>()) {
    peft::matrix<float> dw(out, in);
    try {
      a.delta_weight(base, dw.view());
    } catch (const peft::error&) {
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto* end = data + size;
  const auto* nul = static_cast<const std::uint8_t*>(std::memchr(data, 0, size));
  const std::string json(reinterpret_cast<const char*>(data), nul == nullptr ? size : static_cast<std::size_t>(nul - data));
  try {
    auto config = peft::io::adapter_config::parse(json);
    exercise_config(config);
    if (nul == nullptr) return 0;
    // adapter_model.safetensors: the header's length (u64, little-endian), the header, the data.
    const auto* header = nul + 1;
    const auto* nul2 = static_cast<const std::uint8_t*>(std::memchr(header, 0, static_cast<std::size_t>(end - header)));
    const auto* header_end = nul2 == nullptr ? end : nul2;
    const auto* tensors = nul2 == nullptr ? end : nul2 + 1;
    const auto header_size = static_cast<std::uint64_t>(header_end - header);
    std::vector<std::byte> bytes(8 + static_cast<std::size_t>(header_size) + static_cast<std::size_t>(end - tensors));
    for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<std::byte>((header_size >> (8 * i)) & 0xff);
    if (header_size != 0) std::memcpy(bytes.data() + 8, header, static_cast<std::size_t>(header_size));
    if (tensors != end) std::memcpy(bytes.data() + 8 + header_size, tensors, static_cast<std::size_t>(end - tensors));
    const auto file = peft::io::safetensors_file::parse(std::move(bytes));
    const auto shape = base_shape_of(config);
    peft::io::base_shape_fn base_shape;
    if (shape) base_shape = [shape](const std::string&) { return shape; };
    auto ck = peft::io::load_checkpoint_as<adapter>(std::move(config), file, base_shape);
    (void)ck.parameter_count();
    for (auto& m : ck.modules) {
      if (m.weight_name != m.path + ".weight" || ck.find(m.weight_name) != &m) __builtin_trap();
      exercise_adapter(m.adapter);
    }
    // The save path without the files: each module describes itself into the config.
    auto saved = ck.config;
    for (auto& m : ck.modules) {
      try {
        m.adapter.visit([&](const auto& a) { peft::io::describe_in(a, saved, m.path); });
      } catch (const peft::error&) {
      }
    }
    exercise_config(saved);
  } catch (const peft::error&) {
    // a malformed input, reported as the library promises
  }
  return 0;
}
