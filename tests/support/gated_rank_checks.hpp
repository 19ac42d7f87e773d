// tests/support/gated_rank_checks.hpp — what the tests of the gated-rank adapters share: SoRA (gate
// g, "lora_gate") and dynamic-rank LoRA (scaler c, "lora_scaler"), both y = x W0^T + b0 +
// s ((x A^T) * c) B^T over detail::gated_low_rank. Building layers with given or random
// components, the paper case's parity checks, compaction to a LoRA, and the errors the two
// share (constructors, no PEFT format, parameters). The trainers' tests use the builders and
// check_layer_compaction. Header-only; uses Catch2.
#pragma once

#include <catch2/catch.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"
#include "peft/io/safetensors.hpp"
#include "support/adapter_checks.hpp"
#include "support/paper_support.hpp"
#include "support/test_support.hpp"

namespace peft_test {

// ---- the component vector --------------------------------------------------------------------------

/// The component vector (1, r): SoRA's gate, dynamic-rank's c.
template <class A>
auto gate_vector(A& a) {
  if constexpr (requires { a.gate(); }) {
    return a.gate();
  } else {
    return a.c();
  }
}

/// Its gradient (1, r).
template <class A>
auto gate_gradient(const A& a) {
  if constexpr (requires { a.grad_gate(); }) {
    return a.grad_gate();
  } else {
    return a.grad_c();
  }
}

// ---- building layers -------------------------------------------------------------------------------

/// A gated-rank layer with random non-zero A (r, in), B (out, r), the components c and scale s.
template <class A>
A gated_with(index in, index out, std::vector<typename A::scalar> c, peft::rng& g, double s) {
  using T = typename A::scalar;
  const auto r = static_cast<index>(c.size());
  return A(random_matrix<T>(r, in, g), random_matrix<T>(out, r, g), std::move(c), static_cast<T>(s));
}

/// A gated-rank layer with every parameter random and non-zero: |c_i| in [0.2, 1), random signs.
template <class A>
A random_gated(index in, index out, index r, peft::rng& g, double s) {
  return gated_with<A>(in, out, random_signed_vector<typename A::scalar>(r, g, 0.2, 1.0), g, s);
}

// ---- the paper case --------------------------------------------------------------------------------

/// A paper case of one layer (tests/data/paper/<name>): W0, b0, the input x, dL/dy, and the
/// adapter from lora_A, lora_B and the component vector stored as `components`, of scale s.
template <class A>
struct gated_case {
  using T = typename A::scalar;
  peft::io::safetensors_file f;
  peft::dense<T> base;
  peft::matrix<T> x, gy;
  A adapter;

  gated_case(const std::string& name, const std::string& components, T s)
      : f(open_paper_case(name)),
        base{f.read_matrix<T>("W0"), f.read<T>("b0")},
        x(f.read_matrix<T>("x")),
        gy(f.read_matrix<T>("grad_y")),
        adapter{f.read_matrix<T>("lora_A"), f.read_matrix<T>("lora_B"), f.read<T>(components), s} {}

  peft::matrix<double> ref(const std::string& name) const { return f.read_matrix<double>(name); }
};

/// The case's checks: non-trivial data and an adapter of `rank` components, `active` of them
/// open; y, dx and the gradients of A, B and the components (reference `component_grad`) to
/// `tol`; W0 + delta_weight gives y, with no bias delta; compaction gives a LoRA of rank
/// `active` with the same output. Leaves the gradients of L = sum(y * grad_y) in the adapter.
template <class A>
void check_gated_case(gated_case<A>& c, index rank, index active, const std::string& component_grad, double tol) {
  using T = typename A::scalar;
  auto& a = c.adapter;
  REQUIRE(nontrivial(c.x));
  REQUIRE(nontrivial(c.gy));
  REQUIRE(nontrivial(a.A()));
  REQUIRE(nontrivial(a.B()));
  REQUIRE(a.rank() == rank);
  REQUIRE(count_nonzero(gate_vector(a)) == active);  // closed components are exactly zero
  REQUIRE(a.active_rank() == active);

  peft::matrix<T> y(c.x.rows(), a.out_features()), dx(c.x.rows(), a.in_features());
  typename A::cache_type cache;
  a.forward(c.base, c.x, y, cache);
  CHECK(rel_error(y, c.ref("y")) < tol);
  a.zero_grad();
  a.backward(c.base, c.x, c.gy, dx, cache);
  CHECK(rel_error(dx, c.ref("grad_x")) < tol);
  CHECK(rel_error(a.grad_A(), c.ref("grad.lora_A")) < tol);
  CHECK(rel_error(a.grad_B(), c.ref("grad.lora_B")) < tol);
  CHECK(rel_error(gate_gradient(a), c.ref(component_grad)) < tol);

  // merged: W0 + s B diag(c) A gives the same output
  peft::matrix<T> dw(a.out_features(), a.in_features());
  a.delta_weight(c.base, dw);
  peft::matrix<T> w = peft::to_matrix(c.base.weight());
  for (index i = 0; i < w.rows(); ++i)
    for (index j = 0; j < w.cols(); ++j) w(i, j) += dw(i, j);
  const peft::dense<T> merged(std::move(w), c.f.template read<T>("b0"));
  CHECK(rel_error(base_output(merged, c.x), c.ref("y")) < tol);
  T db = 0;
  CHECK_FALSE(a.delta_bias(c.base, &db));

  // compaction: the open components, same output
  const auto l = a.compact();
  REQUIRE(l.has_value());
  CHECK(l->rank() == active);
  CHECK(l->scale() == a.scale());
  CHECK(rel_error(run_forward(*l, c.base, c.x), c.ref("y")) < tol);
}

// ---- compaction ------------------------------------------------------------------------------------

/// `a` on x over w against `l`, the LoRA it compacts to: a does something, l has `rank`
/// components and a's scale, and their outputs agree to `tol`.
template <class A, class Base, class T>
void check_compacted(const A& a, const peft::lora<typename A::scalar>& l, const Base& w, const peft::matrix<T>& x,
                     index rank, double tol) {
  const auto y = run_forward(a, w, x);
  REQUIRE(rel_error(y, base_output(w, x)) > 1e-3);  // the adapter does something
  CHECK(l.rank() == rank);
  CHECK(l.scale() == a.scale());
  CHECK(rel_error(run_forward(l, w, x), y) < tol);
}

/// The delta weights of `a` and of `l`, the LoRA it compacts to, agree to `tol`.
template <class A, class Base>
void check_same_delta(const A& a, const peft::lora<typename A::scalar>& l, const Base& w, double tol) {
  using T = typename A::scalar;
  peft::matrix<T> d1(a.out_features(), a.in_features()), d2(a.out_features(), a.in_features());
  a.delta_weight(w, d1);
  l.delta_weight(w, d2);
  CHECK(rel_error(d2, d1) < tol);
}

/// Every component closed: no LoRA (rank 0 does not exist), and the layer is exactly its base.
template <class A, class Base, class T>
void check_compacts_to_base(const A& a, const Base& w, const peft::matrix<T>& x) {
  CHECK_FALSE(a.compact().has_value());
  check_output_is_base(a, w, x);
}

/// A trainer's compaction of layer `a` (`l`; std::nullopt when every component is closed) on
/// `rows` random inputs over a random base: the base alone, or check_compacted to 1e-12.
template <class A>
void check_layer_compaction(const A& a, const std::optional<peft::lora<typename A::scalar>>& l, index rows, index rank,
                            peft::rng& g) {
  using T = typename A::scalar;
  const auto w = random_dense<T>(a.in_features(), a.out_features(), g);
  const auto x = random_matrix<T>(rows, a.in_features(), g);
  REQUIRE(nontrivial(x));
  if (!l) {
    check_output_is_base(a, w, x);  // every component zero: the base
    return;
  }
  check_compacted(a, *l, w, x, rank, 1e-12);
}

// ---- errors ----------------------------------------------------------------------------------------

/// The constructors' shape errors: rank 0, in 0, out `bad_out`; B (3, 3) after A (2, 4), whose
/// message must contain `mismatch`; and a component vector of `bad_components` values.
template <class A>
void check_gated_constructor_errors(index bad_out, const std::string& mismatch,
                                    std::vector<typename A::scalar> bad_components) {
  using T = typename A::scalar;
  CHECK_THROWS_AS(A(4, 3, {.rank = 0}), peft::shape_error);
  CHECK_THROWS_AS(A(0, 3, {.rank = 2}), peft::shape_error);
  CHECK_THROWS_AS(A(4, bad_out, {.rank = 2}), peft::shape_error);
  CHECK_THROWS_WITH(A(peft::matrix<T>(2, 4), peft::matrix<T>(3, 3), {0, 0}, 1.0), Catch::Contains(mismatch));
  CHECK_THROWS_AS(A(peft::matrix<T>(2, 4), peft::matrix<T>(3, 2), std::move(bad_components), 1.0), peft::shape_error);
}

/// parameters(): lora_A.weight, lora_B.weight and the component vector `components`, in order.
template <class A>
std::vector<peft::parameter<typename A::scalar>> check_gated_parameters(A& a, const std::string& components) {
  auto p = a.parameters();
  REQUIRE(p.size() == 3);
  CHECK(p[0].name == "lora_A.weight");
  CHECK(p[1].name == "lora_B.weight");
  CHECK(p[2].name == components);
  return p;
}

}  // namespace peft_test
