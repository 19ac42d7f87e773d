// peft/serve/low_rank_form.hpp — an adapter's term as plain low-rank factors, for serving.
//
//   term(x) = s (x A^T B^T + b)        A (r, in), B (out, r), b (out) or none, s a scalar
//
// Every adapter whose delta is a product of two thin factors (plus an optional bias) is served by
// the grouped low-rank path of serve/mixed_forward.hpp, whatever its method: LoRA (A, B, s,
// lora_B.bias), AdaLoRA (diag(E) folded into A, s = scaling / ranknum), VeRA (diag(lambda_d) folded
// into the shared A slice, diag(lambda_b) into the B slice, s = 1), SoRA and dynamic-rank LoRA
// (the gate diag(c) folded into A, components with c_i = 0 dropped: the effective rank). The other
// methods (DoRA rescales rows of the base output, IA3 scales activations, LoHa/LoKr/RandLoRA/SHiRA/
// Compacter are not two thin factors) have no low-rank form and are applied group by group.
//
//   std::optional<peft::serve::low_rank_form<float>> f = peft::serve::to_low_rank(adapter);
//
// LoRA's factors are referenced, not copied: the form must not outlive the adapter (the registry
// keeps both in one immutable entry). The folded forms own their factors.
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <vector>

#include "peft/adapters/adalora.hpp"
#include "peft/adapters/dynamic_rank.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/sora.hpp"
#include "peft/adapters/variant_adapter.hpp"
#include "peft/adapters/vera.hpp"
#include "peft/core/matrix.hpp"

namespace peft::serve {

template <compute_scalar T>
struct low_rank_form {
  matrix_view<const T> a;         // (r, in)
  matrix_view<const T> b;         // (out, r)
  matrix_view<const T> bias;      // (1, out), or empty
  T scale = T{1};
  std::shared_ptr<const matrix<T>> owned_a, owned_b;  // the storage of folded factors

  index rank() const noexcept { return a.rows(); }
  index in_features() const noexcept { return a.cols(); }
  index out_features() const noexcept { return b.rows(); }
  /// Bytes of the factors this form owns (referenced ones belong to the adapter).
  std::size_t owned_bytes() const noexcept {
    return ((owned_a ? owned_a->size() : 0) + (owned_b ? owned_b->size() : 0)) * sizeof(T);
  }
};

namespace detail {

/// Owns a' = diag(d) a (rows with d_i = 0 dropped) and b' = b diag(e) (the same columns kept).
template <compute_scalar T>
low_rank_form<T> folded(matrix_view<const T> a, const T* d, matrix_view<const T> b, const T* e, T scale) {
  std::vector<index> keep;
  for (index i = 0; i < a.rows(); ++i) {
    if (d == nullptr || d[i] != T{0}) keep.push_back(i);
  }
  const auto r = static_cast<index>(keep.size());
  auto fa = std::make_shared<matrix<T>>(r, a.cols());
  auto fb = std::make_shared<matrix<T>>(b.rows(), r);
  for (index k = 0; k < r; ++k) {
    const index i = keep[static_cast<std::size_t>(k)];
    const T di = d == nullptr ? T{1} : d[i];
    for (index j = 0; j < a.cols(); ++j) (*fa)(k, j) = di * a(i, j);
  }
  for (index o = 0; o < b.rows(); ++o) {
    const T eo = e == nullptr ? T{1} : e[o];
    for (index k = 0; k < r; ++k) (*fb)(o, k) = eo * b(o, keep[static_cast<std::size_t>(k)]);
  }
  low_rank_form<T> f;
  f.a = fa->view();
  f.b = fb->view();
  f.scale = scale;
  f.owned_a = std::move(fa);
  f.owned_b = std::move(fb);
  return f;
}

}  // namespace detail

/// LoRA: its own A, B, lora_B.bias and scale (referenced).
template <compute_scalar T>
std::optional<low_rank_form<T>> to_low_rank(const lora<T>& a) {
  low_rank_form<T> f;
  f.a = a.A();
  f.b = a.B();
  f.bias = a.bias();
  f.scale = a.scale();
  return f;
}

/// AdaLoRA: B diag(E) A times scaling / (ranknum + eps).
template <compute_scalar T>
std::optional<low_rank_form<T>> to_low_rank(const adalora<T>& a) {
  const matrix_view<const T> e = a.E();  // (r, 1)
  std::vector<T> d(static_cast<std::size_t>(a.rank()));
  for (index i = 0; i < a.rank(); ++i) d[static_cast<std::size_t>(i)] = e(i, 0);
  return detail::folded<T>(a.A(), d.data(), a.B(), nullptr, a.factor());
}

/// VeRA: diag(lambda_b) B_slice diag(lambda_d) A_slice.
template <compute_scalar T>
std::optional<low_rank_form<T>> to_low_rank(const vera<T>& a) {
  return detail::folded<T>(a.A_slice(), a.lambda_d().data(), a.B_slice(), a.lambda_b().data(), T{1});
}

/// SoRA: s B diag(g) A; closed gates (g_i = 0) are dropped.
template <compute_scalar T>
std::optional<low_rank_form<T>> to_low_rank(const sora<T>& a) {
  return detail::folded<T>(a.A(), a.gate().data(), a.B(), nullptr, a.scale());
}

/// Dynamic-rank LoRA: s B diag(c) A; pruned components (c_i = 0) are dropped.
template <compute_scalar T>
std::optional<low_rank_form<T>> to_low_rank(const dynamic_rank<T>& a) {
  return detail::folded<T>(a.A(), a.c().data(), a.B(), nullptr, a.scale());
}

/// Adapters without a low-rank form: nullopt (served group by group through add_term).
template <class Adapter>
std::optional<low_rank_form<typename Adapter::scalar>> to_low_rank(const Adapter& /*a*/) {
  return std::nullopt;
}

/// A variant_adapter (any_adapter): the active alternative's form.
template <class... As>
std::optional<low_rank_form<typename variant_adapter<As...>::scalar>> to_low_rank(const variant_adapter<As...>& a) {
  return a.visit([](const auto& alt) { return to_low_rank(alt); });
}

}  // namespace peft::serve
