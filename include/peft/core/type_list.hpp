// peft/core/type_list.hpp — a compile-time list of types and the few operations on it that the
// registries (methods, weight formats, ISAs) need: apply a template to it, visit each type.
#pragma once

#include <cstddef>
#include <type_traits>

namespace peft {

template <class... Ts>
struct type_list {
  static constexpr std::size_t size = sizeof...(Ts);
};

/// Apply<type_list<A, B>> is Apply<A, B>.
template <template <class...> class Apply, class List>
struct rebind_list;
template <template <class...> class Apply, class... Ts>
struct rebind_list<Apply, type_list<Ts...>> {
  using type = Apply<Ts...>;
};
template <template <class...> class Apply, class List>
using rebind_list_t = typename rebind_list<Apply, List>::type;

/// Calls f(static_cast<T*>(nullptr)) for each T of the list, in order.
template <class... Ts, class F>
constexpr void for_each_type(type_list<Ts...>, F&& f) {
  (f(static_cast<Ts*>(nullptr)), ...);
}

/// Whether T is one of the list's types.
template <class T, class List>
inline constexpr bool contains_type_v = false;
template <class T, class... Ts>
inline constexpr bool contains_type_v<T, type_list<Ts...>> = (std::is_same_v<T, Ts> || ...);

/// The position of T in Ts (sizeof...(Ts) when absent).
template <class T, class... Ts>
constexpr std::size_t index_of_type() {
  constexpr bool matches[] = {std::is_same_v<T, Ts>..., false};
  for (std::size_t i = 0; i < sizeof...(Ts); ++i) {
    if (matches[i]) return i;
  }
  return sizeof...(Ts);
}

}  // namespace peft
