// peft/io/detail/json_depth.hpp — how deeply a JSON document from outside nests.
//
//   if (io::detail::json_nests_deeper(doc, 128)) raise<format_error>(...);
//
// nlohmann's parser is iterative, but copying, comparing and dumping a document recurse once per
// level of nesting: a malformed file of a few hundred kilobytes ("[[[[...") overflows the stack.
// The readers of outside JSON (adapter_config.json, a model's config.json) check the depth first.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

namespace peft::io::detail {

/// Whether `j` (nlohmann::json or ordered_json) nests arrays and objects more than `limit` levels
/// deep (a top-level object or array is one level, a scalar none). Iterative.
template <class Json>
bool json_nests_deeper(const Json& j, std::size_t limit) {
  std::vector<std::pair<const Json*, std::size_t>> todo{{&j, 0}};
  while (!todo.empty()) {
    const auto [v, depth] = todo.back();
    todo.pop_back();
    if (!v->is_structured()) continue;
    if (depth == limit) return true;
    for (const auto& e : *v) todo.emplace_back(&e, depth + 1);
  }
  return false;
}

}  // namespace peft::io::detail
