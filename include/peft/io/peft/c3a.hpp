// peft/io/peft/c3a.hpp — C3A in PEFT checkpoints: peft_type "C3A"; tensor c3a_kernel
// (out / b, in / b, b) (no ".weight"); fields block_size (default 256) and block_size_pattern
// (PEFT's rule: the first key k with re.match(".*\.k$", module), else the module's own path as a
// key). The kernel's last dimension must be the block size the config gives the module.
#pragma once

#include <cstdint>
#include <regex>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/c3a.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

/// PEFT's block size for `module` (C3AModel._create_and_replace): a block_size_pattern key k
/// with re.match(".*\.k$", module) first (in the file's order), else the entry keyed by the module
/// path itself, else block_size (default 256). format_error for a pattern that is not an object
/// of positive integers or a key that is not a valid regex.
inline index c3a_block_size_for(const adapter_config& c, const std::string& module) {
  constexpr const char* where = "c3a_block_size_for";
  auto positive = [&](const ordered_json& v, const std::string& what) {
    if (!v.is_number_integer() || v.get<long long>() < 1) {
      peft::detail::raise<format_error>(where, "adapter_config.json: " + what + " must be a positive integer, got " + v.dump());
    }
    return static_cast<index>(v.get<long long>());
  };
  if (const auto* p = c.field("block_size_pattern")) {
    if (!p->is_object()) peft::detail::raise<format_error>(where, "adapter_config.json: 'block_size_pattern' must be an object");
    for (const auto& [k, v] : p->items()) {
      std::regex re;
      try {
        re = std::regex(".*\\." + k + "$");
      } catch (const std::regex_error& e) {
        peft::detail::raise<format_error>(where, "adapter_config.json: block_size_pattern key '" + k +
                                                     "' is not a valid regex: " + e.what());
      }
      // re.match: anchored at the start only; "$" anchors the end.
      if (std::regex_search(module, re, std::regex_constants::match_continuous)) {
        return positive(v, "block_size_pattern['" + k + "']");
      }
    }
    if (const auto it = p->find(module); it != p->end()) return positive(*it, "block_size_pattern['" + module + "']");
  }
  if (const auto* b = c.field("block_size")) return positive(*b, "'block_size'");
  return 256;
}

template <compute_scalar T>
struct peft_codec<c3a<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "C3A"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule; init_weights
  /// is an initialisation only, bias other than "none" is refused there).
  static constexpr std::string_view config_fields[] = {"block_size", "block_size_pattern"};
  static std::vector<std::string_view> module_tensors() { return {"c3a_kernel"}; }

  /// The adapter of one module: c3a_kernel (out / b, in / b, b) with b the config's block size for
  /// the module (format_error otherwise: PEFT could not load it).
  static c3a<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                             const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "c3a::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const auto& s = m.shape("c3a_kernel", 3);
    const index b = c3a_block_size_for(c, m.module());
    if (s[0] < 1 || s[1] < 1 || s[2] != b) {
      peft::detail::raise<format_error>(where, mod + ": c3a_kernel is " + detail::shape_text(s) + ", but the config's block "
                                                   "size for it is " + std::to_string(b) + " (expected [out / " +
                                                   std::to_string(b) + ", in / " + std::to_string(b) + ", " +
                                                   std::to_string(b) + "])");
    }
    if (const auto& shape = m.base_shape()) {
      const auto [out, in] = *shape;
      if (s[0] * b != out || s[1] * b != in) {
        peft::detail::raise<format_error>(where, mod + ": c3a_kernel " + detail::shape_text(s) + " makes a " +
                                                     peft::detail::shape_string(s[0] * b, s[1] * b) + " delta, the base is " +
                                                     peft::detail::shape_string(out, in));
      }
    }
    return c3a<T>(m.copy("c3a_kernel"), b);
  }

  /// Makes `c` describe this module: peft_type C3A; block_size when `c` has none yet (or was
  /// another method's), else a block_size_pattern entry for the module when the config would give
  /// it another block size.
  static void describe_in(const c3a<T>& a, adapter_config& c, const std::string& module) {
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "C3A") {
      c.raw.erase("r");  // C3AConfig has none (adapter_config::to_json writes r only when raw has it)
      c.raw.erase("block_size");
      c.raw.erase("block_size_pattern");
    }
    c.peft_type = "C3A";
    const auto b = static_cast<long long>(a.block_size());
    if (c.field("block_size") == nullptr) c.raw["block_size"] = b;
    if (c3a_block_size_for(c, module) == a.block_size()) return;
    // Keyed by the module's path: PEFT looks a key up as is when no key matches ".*\.key$", and
    // that regex never matches the path itself (nor, in practice, another module's).
    auto& pattern = c.raw["block_size_pattern"];
    if (!pattern.is_object()) pattern = ordered_json::object();
    pattern[module] = b;
    const index got = c3a_block_size_for(c, module);
    if (got != a.block_size()) {
      peft::detail::raise<unsupported_error>("c3a::describe_in", "module '" + module + "' has block size " +
                                                                   std::to_string(b) + ", but a block_size_pattern key of the "
                                                                   "config matches it and gives " + std::to_string(got));
    }
  }
};

}  // namespace peft::io
