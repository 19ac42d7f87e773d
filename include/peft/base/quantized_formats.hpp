// peft/base/quantized_formats.hpp — THE list of the quantized frozen-weight formats, and the
// helpers that turn a run-time name into the format's type.
//
//   peft::visit_quantized_format("q4_0", [&](auto format) {
//     using Q = typename decltype(format)::type;   // peft::q4_0
//     auto w = Q::quantize(weight);
//   });                                            // false for an unknown name
//
// Code that enumerates formats (command-line choices, merging into a quantized base, tests)
// derives from quantized_formats instead of listing them: a new format is its base/formats/
// header, its base policy, its kernels and one entry here. A format is known by
// quantized_cli_name<Q>: Q::cli_name when it declares one ("int8" for int8_rowwise), else Q::name.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

#include "peft/base/int8_rowwise.hpp"
#include "peft/base/nf4.hpp"
#include "peft/base/q4_0.hpp"
#include "peft/base/q4_k.hpp"
#include "peft/base/q6_k.hpp"
#include "peft/base/q8_0.hpp"
#include "peft/core/type_list.hpp"

namespace peft {

/// THE quantized base formats, in the order they are offered.
using quantized_formats = type_list<int8_rowwise, q4_0, nf4, q8_0, q4_k, q6_k>;

/// The name format Q goes by on the command line and in files.
template <class Q>
inline constexpr std::string_view quantized_cli_name = [] {
  if constexpr (requires { Q::cli_name; }) {
    return std::string_view(Q::cli_name);
  } else {
    return std::string_view(Q::name);
  }
}();

namespace detail {
template <template <class...> class List, class... Formats, class F>
constexpr void for_each_format(List<Formats...>, F&& f) {
  (f(std::type_identity<Formats>{}), ...);
}
}  // namespace detail

/// Calls f(std::type_identity<Q>{}) for each format Q of the list, in order.
template <class F>
constexpr void for_each_quantized_format(F&& f) {
  detail::for_each_format(quantized_formats{}, f);
}

/// The position in the list of the format named `name` (its CLI name); nullopt when none is.
constexpr std::optional<std::size_t> quantized_format_index(std::string_view name) noexcept {
  std::optional<std::size_t> found;
  std::size_t i = 0;
  for_each_quantized_format([&](auto format) {
    if (quantized_cli_name<typename decltype(format)::type> == name) found = i;
    ++i;
  });
  return found;
}

/// Calls f(std::type_identity<Q>{}) for the format at position `index` of the list; returns
/// false, without calling f, when there is none.
template <class F>
constexpr bool visit_quantized_format_at(std::size_t index, F&& f) {
  bool called = false;
  std::size_t i = 0;
  for_each_quantized_format([&](auto format) {
    if (i++ == index) {
      f(format);
      called = true;
    }
  });
  return called;
}

/// Calls f(std::type_identity<Q>{}) for the format named `name` ("int8", "q4_0", "q6_k", ...); returns
/// false, without calling f, for an unknown name.
template <class F>
constexpr bool visit_quantized_format(std::string_view name, F&& f) {
  const auto index = quantized_format_index(name);
  return index && visit_quantized_format_at(*index, f);
}

/// The CLI names of the list joined by `separator` ("int8, q4_0, nf4, q8_0, q4_k, q6_k"), for
/// usage and errors.
inline std::string quantized_format_names(std::string_view separator = ", ") {
  std::string s;
  for_each_quantized_format([&](auto format) {
    if (!s.empty()) s += separator;
    s += quantized_cli_name<typename decltype(format)::type>;
  });
  return s;
}

}  // namespace peft
