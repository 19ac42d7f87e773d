// peft/io/detail/integer_pattern.hpp — an integer field with a per-module pattern override, as
// PEFT 0.21's get_pattern_key reads FourierFT's and WaveFT's n_frequency_pattern: the first key k
// (file order) for which Python's re.match(".*\.k$", module) succeeds, else the field (or its
// default). A key can only match after a dot, so a top-level module keeps the field's value.
#pragma once

#include <regex>
#include <string>
#include <string_view>

#include "peft/core/error.hpp"
#include "peft/io/adapter_config.hpp"

namespace peft::io::detail {

inline long long integer_pattern_for(const adapter_config& c, const char* field, long long fallback,
                                     const char* pattern_field, const std::string& module, const char* where) {
  const long long n = c.integer(field, fallback, where);
  const auto* pattern = c.field(pattern_field);
  if (pattern == nullptr) return n;
  if (!pattern->is_object()) {
    peft::detail::raise<format_error>(where, std::string("adapter_config.json: '") + pattern_field +
                                                 "' must be an object");
  }
  for (const auto& [key, value] : pattern->items()) {
    std::regex re;
    try {
      re = module_regex("^(?:.*\\." + key + "$)");
    } catch (const std::regex_error&) {
      peft::detail::raise<format_error>(where, std::string("adapter_config.json: ") + pattern_field + " key '" + key +
                                                   "' is not a valid regular expression");
    }
    if (!std::regex_search(module, re, std::regex_constants::match_continuous)) continue;
    if (!value.is_number_integer()) {
      peft::detail::raise<format_error>(where, std::string("adapter_config.json: ") + pattern_field + "['" + key +
                                                   "'] must be an integer");
    }
    return value.template get<long long>();
  }
  return n;
}

}  // namespace peft::io::detail
