// peft/kernels/dispatch.hpp — run-time choices made compile-time: one table of function pointers
// per operation, built from the ISA list, and the batch-size switch.
//
//   struct int8_dot_op {   // lifts the overload set int8_dot(tag, ...) into a type
//     template <class Tag, class... A>
//     auto operator()(Tag tag, A&&... a) const -> decltype(int8_dot(tag, std::forward<A>(a)...)) {
//       return int8_dot(tag, std::forward<A>(a)...);
//     }
//   };
//   inline constexpr auto int8_dot_table = make_dispatch_table<int8_dot_fn, int8_dot_op>();
//   int8_dot_table[active_isa()](q, scale, ...);
//
// An operation is an overload set over the ISA tags of kernels/isa.hpp, one overload per ISA
// that provides it (the reference one always), each in its ISA's namespace: the unqualified call
// on a tag finds them by argument-dependent lookup. The table has an entry per ISA of isa_tags: the
// overload of the nearest ancestor that provides one (the one overload resolution on that tag
// picks), so an ISA that does not provide the operation shares its parent's entry, pointer for
// pointer. The op's operator() must be SFINAE-friendly (the trailing decltype above): that is
// how the table sees which ISAs provide the operation.
//
//   with_rows<8>(m, [&](auto rows) { kernel<rows()>(...); });   // rows: integral_constant, 1..8
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "peft/core/matrix_view.hpp"
#include "peft/kernels/isa.hpp"

namespace peft::kernels {

/// Calls f(std::integral_constant<int, M>{}) with M = m for 1 <= m < Max and M = Max otherwise:
/// one instantiation per batch size keeps a kernel's accumulators in registers.
template <int Max, class F>
void with_rows(index m, F&& f) {
  static_assert(Max >= 1);
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (void)((m == I + 1 || I + 1 == Max ? (f(std::integral_constant<int, I + 1>{}), true) : false) || ...);
  }(std::make_integer_sequence<int, Max>{});
}

/// One function pointer per ISA, indexed by isa; `provider(i)` is the ISA whose overload entry i
/// runs (i itself, or the nearest ancestor that provides the operation).
template <class Fn>
class dispatch_table {
 public:
  /// The entry of ISA i (the reference entry for a value outside the list).
  constexpr Fn operator[](isa i) const noexcept { return entries_[slot(i)]; }
  constexpr isa provider(isa i) const noexcept { return providers_[slot(i)]; }

  constexpr void set(isa i, Fn f, isa from) noexcept {
    entries_[static_cast<std::size_t>(i)] = f;
    providers_[static_cast<std::size_t>(i)] = from;
  }

 private:
  static constexpr std::size_t slot(isa i) noexcept {
    const auto s = static_cast<std::size_t>(i);
    return s < isa_count ? s : static_cast<std::size_t>(isa::reference);
  }
  std::array<Fn, isa_count> entries_{};
  std::array<isa, isa_count> providers_{};
};

namespace detail {

/// Converts to exactly Tag and to nothing else (no base tags): a call with it is viable only
/// when an overload takes Tag itself.
template <class Tag>
struct exact_tag {
  template <class U>
    requires std::same_as<U, Tag>
  constexpr operator U() const noexcept {  // NOLINT(google-explicit-constructor)
    return U{};
  }
};

template <class Fn>
struct dispatch_signature;
template <class R, class... A>
struct dispatch_signature<R (*)(A...)> {
  /// Whether Op has an overload for Tag itself.
  template <class Op, class Tag>
  static constexpr bool provides = requires(const Op& op, A&&... a) {
    op(exact_tag<Tag>{}, static_cast<A&&>(a)...);
  };
  /// The table entry: Op's overload for Tag.
  template <class Op, class Tag>
  static R call(A... a) {
    return Op{}(Tag{}, static_cast<A&&>(a)...);
  }
};

template <std::size_t I, class T, class... Ts>
struct tag_at {
  using type = typename tag_at<I - 1, Ts...>::type;
};
template <class T, class... Ts>
struct tag_at<0, T, Ts...> {
  using type = T;
};

/// The position in Tags of the nearest tag T is or derives from whose overload Op provides
/// (sizeof...(Tags) when there is none).
template <class Op, class Fn, class T, class... Tags>
consteval std::size_t provider_index() {
  std::size_t best = sizeof...(Tags), i = 0;
  int best_depth = 0;
  const auto consider = [&](bool candidate, int depth) {
    if (candidate && depth > best_depth) {
      best = i;
      best_depth = depth;
    }
    ++i;
  };
  (consider(std::is_base_of_v<Tags, T> && dispatch_signature<Fn>::template provides<Op, Tags>,
            isa_depth[static_cast<std::size_t>(Tags::value)]),
   ...);
  return best;
}

template <class Fn, class Op, class... Tags>
consteval dispatch_table<Fn> build_dispatch_table(type_list<Tags...>) {
  dispatch_table<Fn> table;
  const auto add = [&]<class T>(T) {
    constexpr std::size_t p = provider_index<Op, Fn, T, Tags...>();
    static_assert(p < sizeof...(Tags), "this operation has no reference overload");
    using provider = typename tag_at<p, Tags...>::type;
    table.set(T::value, &dispatch_signature<Fn>::template call<Op, provider>, provider::value);
  };
  (add(Tags{}), ...);
  return table;
}

}  // namespace detail

/// The table of operation Op (a function object over the overload set) for signature Fn.
template <class Fn, class Op>
consteval dispatch_table<Fn> make_dispatch_table() {
  return detail::build_dispatch_table<Fn, Op>(isa_tags{});
}

}  // namespace peft::kernels
