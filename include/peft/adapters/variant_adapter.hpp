// peft/adapters/variant_adapter.hpp — runtime choice among a closed set of adapter types.
//
//   using my_adapter = peft::variant_adapter<peft::lora<float>, peft::dora<float>>;
//   my_adapter a = peft::lora<float>(in, out, {});      // chosen at run time (e.g. by a checkpoint)
//   a.forward(base, x, y, cache);                        // one std::visit, no virtual call
//
// A variant_adapter satisfies the adapter concept itself, so layers, loaders and tools take it
// wherever they take a single adapter type. Its cache holds the cache of the active alternative.
// `delta_weight` on an alternative that is not mergeable (Compacter) throws unsupported_error.
#pragma once

#include <cstddef>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"

namespace peft {

namespace detail {
template <class A, class... As>
constexpr std::size_t index_in() {
  constexpr bool matches[] = {std::is_same_v<A, As>...};
  for (std::size_t i = 0; i < sizeof...(As); ++i) {
    if (matches[i]) return i;
  }
  return sizeof...(As);
}
template <class T, class... Ts>
struct first_of {
  using type = T;
};
}  // namespace detail

template <class... As>
class variant_adapter {
  static_assert(sizeof...(As) > 0, "variant_adapter needs at least one adapter type");

 public:
  using scalar = typename detail::first_of<As...>::type::scalar;
  static_assert((std::is_same_v<typename As::scalar, scalar> && ...),
                "every alternative of a variant_adapter must compute in the same scalar type");
  static constexpr std::string_view method = "variant";
  /// One slot per alternative, in order, after an empty state.
  using cache_type = std::variant<std::monostate, typename As::cache_type...>;

  variant_adapter() = default;
  template <class A>
    requires(detail::index_in<std::decay_t<A>, As...>() < sizeof...(As))
  variant_adapter(A&& a) : v_(std::forward<A>(a)) {}  // NOLINT(google-explicit-constructor)

  /// The active alternative's method name ("lora", "dora", ...).
  std::string_view active_method() const {
    return std::visit([](const auto& a) { return std::string_view(std::decay_t<decltype(a)>::method); }, v_);
  }
  template <class A>
  bool holds() const noexcept { return std::holds_alternative<A>(v_); }
  /// The alternative of type A; peft::error if another one is active.
  template <class A>
  A& get() {
    if (auto* p = std::get_if<A>(&v_)) return *p;
    peft::detail::raise<error>("variant_adapter::get", "the adapter is " + std::string(active_method()) +
                                                           ", not " + std::string(A::method));
  }
  template <class A>
  const A& get() const {
    return const_cast<variant_adapter*>(this)->template get<A>();
  }
  template <class A>
  A* get_if() noexcept { return std::get_if<A>(&v_); }
  template <class A>
  const A* get_if() const noexcept { return std::get_if<A>(&v_); }
  std::variant<As...>& variant() noexcept { return v_; }
  const std::variant<As...>& variant() const noexcept { return v_; }

  /// Calls f(alternative) on the active one.
  template <class F>
  decltype(auto) visit(F&& f) { return std::visit(std::forward<F>(f), v_); }
  template <class F>
  decltype(auto) visit(F&& f) const { return std::visit(std::forward<F>(f), v_); }

  index in_features() const {
    return visit([](const auto& a) -> index { return a.in_features(); });
  }
  index out_features() const {
    return visit([](const auto& a) -> index { return a.out_features(); });
  }

  template <class Base>
  void forward(const Base& w, matrix_view<const scalar> x, matrix_view<scalar> y, cache_type& cache) const {
    visit([&](const auto& a) { a.forward(w, x, y, cache_for(a, cache)); });
  }
  template <class Base>
  void add_term(const Base& w, matrix_view<const scalar> x, matrix_view<const scalar> h, matrix_view<scalar> y,
                cache_type& cache) const {
    visit([&](const auto& a) { a.add_term(w, x, h, y, cache_for(a, cache)); });
  }
  template <class Base>
  void backward(const Base& w, matrix_view<const scalar> x, matrix_view<const scalar> g, matrix_view<scalar> dx,
                cache_type& cache) {
    visit([&](auto& a) { a.backward(w, x, g, dx, cache_for(a, cache)); });
  }
  template <class Base>
  void backward_term(const Base& w, matrix_view<const scalar> x, matrix_view<const scalar> h,
                     matrix_view<const scalar> g, matrix_view<scalar> dh, matrix_view<scalar> dx, cache_type& cache) {
    visit([&](auto& a) { a.backward_term(w, x, h, g, dh, dx, cache_for(a, cache)); });
  }

  /// W' - W0 of the active alternative; unsupported_error when it is not mergeable.
  template <class Base>
  void delta_weight(const Base& w, matrix_view<scalar> dw) const {
    visit([&](const auto& a) {
      using A = std::decay_t<decltype(a)>;
      if constexpr (mergeable_adapter_for<A, Base>) {
        a.delta_weight(w, dw);
      } else {
        peft::detail::raise<unsupported_error>("variant_adapter::delta_weight",
                                               std::string(A::method) + " is not mergeable (not linear in x)");
      }
    });
  }
  /// W' - W0 recovered from a merged base: the alternative's `unmerge_delta` (DoRA), else its
  /// delta_weight.
  template <class Base>
  void unmerge_delta(const Base& merged, matrix_view<scalar> dw) const {
    visit([&](const auto& a) {
      if constexpr (requires { a.unmerge_delta(merged, dw); }) {
        a.unmerge_delta(merged, dw);
      } else {
        delta_weight(merged, dw);
      }
    });
  }
  /// b' - b0 recovered from a merged base: the alternative's `unmerge_delta_bias` (IA3's
  /// multiplicative merge), else its delta_bias.
  template <class Base>
  bool unmerge_delta_bias(const Base& merged, scalar* db) const {
    return visit([&](const auto& a) -> bool {
      if constexpr (requires { a.unmerge_delta_bias(merged, db); }) {
        return a.unmerge_delta_bias(merged, db);
      } else {
        return delta_bias(merged, db);
      }
    });
  }
  /// Whether merging changes the bias: the alternative's touches_bias() or has_bias(), else no.
  bool touches_bias() const {
    return visit([](const auto& a) -> bool {
      if constexpr (requires { a.touches_bias(); }) {
        return a.touches_bias();
      } else if constexpr (requires { a.has_bias(); }) {
        return a.has_bias();
      } else {
        return false;
      }
    });
  }
  /// Tells an alternative whose checkpoint does not fix the layer's shape (VeRA, RandLoRA, IA3)
  /// the base's; a no-op for the others.
  void set_features(index in_features, index out_features) {
    visit([&](auto& a) {
      if constexpr (requires { a.set_features(in_features, out_features); }) a.set_features(in_features, out_features);
    });
  }
  template <class Base>
  bool delta_bias(const Base& w, scalar* db) const {
    return visit([&](const auto& a) -> bool {
      using A = std::decay_t<decltype(a)>;
      if constexpr (mergeable_adapter_for<A, Base>) {
        return a.delta_bias(w, db);
      } else {
        peft::detail::raise<unsupported_error>("variant_adapter::delta_bias",
                                               std::string(A::method) + " is not mergeable (not linear in x)");
      }
    });
  }
  /// Whether the active alternative is additive (core/additive_adapter.hpp): its term is a
  /// function of x alone, and a bias it merges is added (so the base must have one).
  bool additive() const {
    return visit([](const auto& a) { return is_additive_adapter<std::decay_t<decltype(a)>>; });
  }
  /// Whether the active alternative can be merged into a `Base`.
  template <class Base>
  bool mergeable() const {
    return visit([](const auto& a) { return mergeable_adapter_for<std::decay_t<decltype(a)>, Base>; });
  }

  std::vector<parameter<scalar>> parameters() {
    return visit([](auto& a) {
      std::vector<parameter<scalar>> out;
      for (auto&& p : a.parameters()) out.push_back(p);
      return out;
    });
  }
  void zero_grad() {
    visit([](auto& a) { a.zero_grad(); });
  }

 private:
  template <class A>
  static typename A::cache_type& cache_for(const A&, cache_type& cache) {
    constexpr std::size_t slot = detail::index_in<A, As...>() + 1;
    if (cache.index() != slot) cache.template emplace<slot>();
    return std::get<slot>(cache);
  }

  std::variant<As...> v_;
};

}  // namespace peft
