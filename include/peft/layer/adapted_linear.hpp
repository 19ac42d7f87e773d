// peft/layer/adapted_linear.hpp — a frozen linear layer with any number of named adapters.
//
//   peft::adapted_linear<peft::dense<float>, peft::lora<float>> layer(std::move(base));
//   layer.add_adapter("default", peft::lora_options{.rank = 8, .alpha = 16});   // sized from the base
//   layer.forward(x, y);          // base + every enabled, unmerged adapter
//   layer.backward(x, dy, dx);    // after forward on the same x: adapter grads +=, dx written
//   layer.merge("default");       // W0 += delta (mergeable adapters over a mutable base)
//
// With one active adapter the layer calls the adapter's fused `forward`/`backward`; with
// several it computes the base product h once and sums each adapter's `add_term` (PEFT's
// semantics), and backward chains each term's gradient with respect to h through W0 once.
// Not thread-safe: forward stores what backward needs in the layer.
#pragma once

#include <algorithm>
#include <concepts>
#include <list>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"

namespace peft {

template <base_weight Base, class Adapter>
  requires adapter_for<Adapter, Base>
class adapted_linear {
 public:
  using base_type = Base;
  using adapter_type = Adapter;
  using scalar = typename Adapter::scalar;

  explicit adapted_linear(Base base) : base_(std::move(base)) {}

  index in_features() const noexcept { return base_.in_features(); }
  index out_features() const noexcept { return base_.out_features(); }
  const Base& base() const noexcept { return base_; }
  /// The base, for callers that replace or inspect it; changing it under a merged adapter
  /// makes unmerge subtract a delta computed from the changed weight.
  Base& base() noexcept {
    reset_caches();
    return base_;
  }

  /// Adds an adapter under a new name (enabled). Throws shape_error on a shape mismatch and
  /// error on a duplicate name. The reference stays valid until that adapter is removed.
  Adapter& add_adapter(std::string name, Adapter a) {
    if (find(name) != nullptr) {
      detail::raise<error>("adapted_linear::add_adapter", "an adapter named '" + name + "' exists");
    }
    if constexpr (requires { a.set_features(in_features(), out_features()); }) {
      a.set_features(in_features(), out_features());  // adapters loaded without the base's shape
    }
    if (a.in_features() != in_features() || a.out_features() != out_features()) {
      detail::raise<shape_error>(
          "adapted_linear::add_adapter",
          "adapter '" + name + "' is for " + detail::shape_string(a.out_features(), a.in_features()) +
              ", the base is " + detail::shape_string(out_features(), in_features()));
    }
    slots_.push_back(slot{std::move(name), std::move(a), true, false, {}});
    return slots_.back().adapter;
  }

  /// Adds a fresh adapter for this layer's shape from a method's options (lora_options,
  /// sora_options, ...): Options::adapter<scalar>(in_features(), out_features(), opts). DoRA needs
  /// the base itself: add_adapter(name, peft::dora<T>(layer.base(), lora_options{...})).
  template <class Options>
    requires requires { typename Options::template adapter<scalar>; } &&
             std::constructible_from<typename Options::template adapter<scalar>, index, index, const Options&> &&
             std::constructible_from<Adapter, typename Options::template adapter<scalar>>
  Adapter& add_adapter(std::string name, const Options& opt) {
    using made = typename Options::template adapter<scalar>;
    return add_adapter(std::move(name), Adapter(made(in_features(), out_features(), opt)));
  }

  /// Removes an adapter; a merged one is unmerged first.
  void remove_adapter(const std::string& name) {
    slot& s = get("adapted_linear::remove_adapter", name);
    if (s.merged) unmerge(name);
    slots_.remove_if([&](const slot& other) { return &other == &s; });
  }

  /// Drops an adapter; a merged one stays in the base weight (PEFT's merge_and_unload).
  void unload(const std::string& name) {
    slot& s = get("adapted_linear::unload", name);
    slots_.remove_if([&](const slot& other) { return &other == &s; });
  }

  Adapter& adapter(const std::string& name) { return get("adapted_linear::adapter", name).adapter; }
  const Adapter& adapter(const std::string& name) const {
    return const_cast<adapted_linear*>(this)->get("adapted_linear::adapter", name).adapter;
  }
  bool contains(const std::string& name) const { return find(name) != nullptr; }

  std::vector<std::string> adapter_names() const {
    std::vector<std::string> names;
    for (const auto& s : slots_) names.push_back(s.name);
    return names;
  }

  /// Disabled adapters take no part in forward or backward. A merged adapter cannot be disabled.
  void set_enabled(const std::string& name, bool on) {
    slot& s = get("adapted_linear::set_enabled", name);
    if (s.merged && !on) {
      detail::raise<error>("adapted_linear::set_enabled",
                           "adapter '" + name + "' is merged into the base; unmerge it first");
    }
    s.enabled = on;
  }
  bool enabled(const std::string& name) const {
    return const_cast<adapted_linear*>(this)->get("adapted_linear::enabled", name).enabled;
  }
  bool merged(const std::string& name) const {
    return const_cast<adapted_linear*>(this)->get("adapted_linear::merged", name).merged;
  }

  /// y = the layer's output for x (batch, in); y (batch, out) is overwritten.
  void forward(matrix_view<const scalar> x, matrix_view<scalar> y) {
    detail::expect_shape("adapted_linear::forward", "x", x, x.rows(), in_features());
    detail::expect_shape("adapted_linear::forward", "y", y, x.rows(), out_features());
    auto active = active_slots();
    if (active.empty()) {
      base_.matmul(x, y);
    } else if (active.size() == 1) {
      active.front()->adapter.forward(base_, x, y, active.front()->cache);
    } else {
      if (h_.rows() != x.rows() || h_.cols() != out_features()) h_ = matrix<scalar>(x.rows(), out_features());
      base_.matmul(x, h_.view());
      for (index i = 0; i < y.rows(); ++i) std::copy(h_.row(i), h_.row(i) + y.cols(), y.row(i));
      for (slot* s : active) s->adapter.add_term(base_, x, h_.view(), y, s->cache);
    }
  }

  /// Accumulates the gradients of every active adapter and writes dx, for the x of the last
  /// forward. dy (batch, out), dx (batch, in).
  void backward(matrix_view<const scalar> x, matrix_view<const scalar> dy, matrix_view<scalar> dx) {
    detail::expect_shape("adapted_linear::backward", "x", x, x.rows(), in_features());
    detail::expect_shape("adapted_linear::backward", "dy", dy, x.rows(), out_features());
    detail::expect_shape("adapted_linear::backward", "dx", dx, x.rows(), in_features());
    auto active = active_slots();
    if (active.empty()) {
      base_.matmul_t(dy, dx, false);
    } else if (active.size() == 1) {
      active.front()->adapter.backward(base_, x, dy, dx, active.front()->cache);
    } else {
      if (h_.rows() != x.rows()) {
        detail::raise<error>("adapted_linear::backward", "call forward on the same batch first");
      }
      matrix<scalar> dh = to_matrix(dy);
      for (index i = 0; i < dx.rows(); ++i) std::fill(dx.row(i), dx.row(i) + dx.cols(), scalar{0});
      for (slot* s : active) s->adapter.backward_term(base_, x, h_.view(), dy, dh.view(), dx, s->cache);
      base_.matmul_t(matrix_view<const scalar>(dh.view()), dx, true);
    }
  }

  /// Adds the adapter's delta to the base weight (and bias); forward then skips it.
  void merge(const std::string& name)
    requires mergeable_adapter_for<Adapter, Base> && mutable_base_weight<Base>
  {
    slot& s = get("adapted_linear::merge", name);
    if (s.merged) detail::raise<error>("adapted_linear::merge", "adapter '" + name + "' is already merged");
    apply_delta(s, +1.0);
    s.merged = true;
    s.enabled = true;
  }

  /// Subtracts what merge added: recomputed from the adapter's current parameters, or, for an
  /// adapter with `unmerge_delta(merged_base, dw)` (DoRA), recovered from the merged weight.
  void unmerge(const std::string& name)
    requires mergeable_adapter_for<Adapter, Base> && mutable_base_weight<Base>
  {
    slot& s = get("adapted_linear::unmerge", name);
    if (!s.merged) detail::raise<error>("adapted_linear::unmerge", "adapter '" + name + "' is not merged");
    apply_delta(s, -1.0);
    s.merged = false;
  }

  /// Every parameter of every adapter, named "<adapter>.<parameter>".
  std::vector<parameter<scalar>> parameters() {
    std::vector<parameter<scalar>> all;
    for (auto& s : slots_) {
      for (auto p : s.adapter.parameters()) {
        p.name = s.name + "." + p.name;
        all.push_back(std::move(p));
      }
    }
    return all;
  }

  void zero_grad() {
    for (auto& s : slots_) s.adapter.zero_grad();
  }

 private:
  struct slot {
    std::string name;
    Adapter adapter;
    bool enabled = true;
    bool merged = false;
    typename Adapter::cache_type cache;
  };

  slot* find(const std::string& name) const {
    for (const auto& s : slots_) {
      if (s.name == name) return const_cast<slot*>(&s);
    }
    return nullptr;
  }
  slot& get(const char* where, const std::string& name) {
    slot* s = find(name);
    if (s == nullptr) detail::raise<error>(where, "no adapter named '" + name + "'");
    return *s;
  }
  std::vector<slot*> active_slots() {
    std::vector<slot*> active;
    for (auto& s : slots_) {
      if (s.enabled && !s.merged) active.push_back(&s);
    }
    return active;
  }

  void reset_caches() {
    for (auto& s : slots_) s.cache = {};
  }

  void apply_delta(slot& s, double sign) {
    matrix<scalar> dw(out_features(), in_features());
    if constexpr (requires { s.adapter.unmerge_delta(base_, dw.view()); }) {
      // Adapters whose delta depends on W0 (DoRA) recover it from the merged weight.
      if (sign < 0) {
        s.adapter.unmerge_delta(base_, dw.view());
      } else {
        s.adapter.delta_weight(base_, dw.view());
      }
    } else {
      s.adapter.delta_weight(base_, dw.view());
    }
    std::vector<scalar> db(static_cast<std::size_t>(out_features()));
    bool has_bias = false;
    if constexpr (requires { s.adapter.unmerge_delta_bias(base_, db.data()); }) {
      has_bias = sign < 0 ? s.adapter.unmerge_delta_bias(base_, db.data()) : s.adapter.delta_bias(base_, db.data());
    } else {
      has_bias = s.adapter.delta_bias(base_, db.data());
    }
    base_.add_to_weight(matrix_view<const scalar>(dw.view()), sign);
    if (has_bias) base_.add_to_bias(static_cast<const scalar*>(db.data()), sign);
    reset_caches();  // values derived from W0 (DoRA's row norms) are stale now
  }

  Base base_;
  std::list<slot> slots_;  // a list: references handed out survive later additions/removals
  matrix<scalar> h_;  // base output of the last multi-adapter forward (batch, out)
};

}  // namespace peft
