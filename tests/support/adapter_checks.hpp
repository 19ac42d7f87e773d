// tests/support/adapter_checks.hpp — the generic adapter checks, shared by the property harness
// (tests/adapters/test_adapter_properties.cpp) and the per-method tests: running a pass, identity
// at init (the output is exactly the base's), forward / dx / delta_weight against a materialised
// delta weight, and the shape errors of the four passes and delta_weight. Header-only; like
// golden_support.hpp it uses Catch2.
#pragma once

#include <catch2/catch.hpp>

#include <initializer_list>
#include <string>

#include "peft/base/dense.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "support/test_support.hpp"

namespace peft_test {

// ---- running an adapter --------------------------------------------------------------------------

/// A frozen dense layer (out, in) whose weight and bias are uniform in [-1, 1), stored as S.
template <class S>
peft::dense<S> random_dense(index in, index out, peft::rng& g) {
  return peft::dense<S>(random_matrix<S>(out, in, g), random_vector<S>(out, g));
}

/// The adapter's whole output on x over the frozen layer w (a fresh cache).
template <class A, class Base, class T>
peft::matrix<typename A::scalar> run_forward(const A& a, const Base& w, const peft::matrix<T>& x) {
  peft::matrix<typename A::scalar> y(x.rows(), w.out_features());
  typename A::cache_type cache;
  a.forward(w, x.view(), y.view(), cache);
  return y;
}

/// The frozen layer's output x W^T + b.
template <class Base, class T>
peft::matrix<T> base_output(const Base& w, const peft::matrix<T>& x) {
  peft::matrix<T> h(x.rows(), w.out_features());
  w.matmul(peft::matrix_view<const T>(x.view()), h.view());
  return h;
}

// ---- the checks ----------------------------------------------------------------------------------

/// The adapter's output on x is exactly the frozen layer's: identity at init, or a layer whose
/// components are all closed.
template <class A, class Base, class T>
void check_output_is_base(const A& a, const Base& w, const peft::matrix<T>& x) {
  CHECK(exactly_equal(run_forward(a, w, x), base_output(w, x)));
}

/// The adapter's output on x differs from the frozen layer's by more than `min_change`
/// (relatively): a random init, or trained parameters, do something.
template <class A, class Base, class T>
void check_not_base(const A& a, const Base& w, const peft::matrix<T>& x, double min_change) {
  CHECK(rel_error(run_forward(a, w, x), base_output(w, x)) > min_change);
}

/// The adapter over the dense base w against its delta weight dW (out, in), materialised in
/// double by the caller: y = x (W + dW)^T + b, dx = gy (W + dW) and delta_weight = dW, each to
/// `tol`. Accumulates the parameter gradients of L = sum(y * gy).
template <class A, class S, class T>
void check_against_delta(A& a, const peft::dense<S>& w, const peft::matrix<T>& x, const peft::matrix<T>& gy,
                         const peft::matrix<double>& dW, double tol) {
  const auto w_eff = add(w.weight(), dW);
  typename A::cache_type cache;
  peft::matrix<typename A::scalar> y(x.rows(), w.out_features()), dx(x.rows(), w.in_features()),
      dwt(w.out_features(), w.in_features());
  a.forward(w, x.view(), y.view(), cache);
  CHECK(rel_error(y, ref_linear(x, w_eff, w.bias())) < tol);
  a.backward(w, x.view(), gy.view(), dx.view(), cache);
  CHECK(rel_error(dx, ref_nn(gy, w_eff)) < tol);
  a.delta_weight(w, dwt.view());
  CHECK(rel_error(dwt, dW) < tol);
}

/// A fresh adapter `a` (in, out) on `batch` random inputs over a random dense base (base, x and
/// dL/dy drawn from g in that order; x REQUIREd non-trivial): its output is exactly the base's,
/// and a backward pass of L = sum(y * dL/dy) accumulates its parameter gradients (for the
/// caller to check that training can move it off the identity).
template <class A>
void check_identity_at_init(A& a, index batch, peft::rng& g) {
  using T = typename A::scalar;
  const auto w = random_dense<T>(a.in_features(), a.out_features(), g);
  const auto x = random_matrix<T>(batch, a.in_features(), g);
  REQUIRE(nontrivial(x));
  check_output_is_base(a, w, x);
  peft::matrix<T> dx(batch, a.in_features());
  typename A::cache_type cache;
  a.backward(w, x.view(), random_matrix<T>(batch, a.out_features(), g).view(), dx.view(), cache);
}

/// A default-constructed adapter (no shapes, no parameters) refuses to run: forward over w
/// throws E.
template <class A, class E, class S>
void check_unset_rejected(const peft::dense<S>& w) {
  using T = typename A::scalar;
  A empty;
  peft::matrix<T> x(2, w.in_features()), y(2, w.out_features());
  typename A::cache_type cache;
  CHECK_THROWS_AS(empty.forward(w, x.view(), y.view(), cache), E);
}

// ---- shape errors --------------------------------------------------------------------------------

/// The adapter calls a shape case makes.
enum class pass : unsigned char { forward, add_term, backward, backward_term, delta_weight };
/// The argument a shape case gets wrong: the base weight, or one of the passes' matrices
/// (h the base output, dh its gradient, dw delta_weight's output); none: every argument fits
/// the base, the adapter does not.
enum class arg : unsigned char { none, base, x, h, y, dy, dh, dx, dw };

/// How a shape case's error message is checked: it contains the message, it starts with it, or
/// the error is a peft::shape_error and its message starts with it.
enum class match : unsigned char { contains, prefix, shape_error_prefix };

/// One call of a pass with one argument of shape (rows, cols) (for arg::base: a base weight of
/// that shape), every other argument of the right shape for the base. It must throw
/// peft::shape_error, or, given `message`, an error whose message matches it as `how` says.
struct shape_case {
  pass call;
  arg wrong;
  index rows, cols;
  std::string message{};
  match how = match::contains;
};

/// Runs f and checks it throws E (or an error derived from it) whose message starts with
/// `prefix`.
template <class E, class F>
void check_error(F&& f, const std::string& prefix) {
  try {
    f();
    FAIL("expected an error starting with " << prefix);
  } catch (const E& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).rfind(prefix, 0) == 0);
  }
}

/// Runs every case on adapter `a` over the dense base `w` with `batch` rows of input.
template <class A, class S>
void check_shape_errors(A& a, const peft::dense<S>& w, index batch, std::initializer_list<shape_case> cases) {
  using T = typename A::scalar;
  const index in = w.in_features(), out = w.out_features();
  for (const auto& c : cases) {
    INFO("pass " << static_cast<int>(c.call) << ", argument " << static_cast<int>(c.wrong) << " is (" << c.rows
                 << ", " << c.cols << ")");
    const auto make = [&](arg which, index rows, index cols) {
      return c.wrong == which ? peft::matrix<T>(c.rows, c.cols) : peft::matrix<T>(rows, cols);
    };
    const bool wrong_base = c.wrong == arg::base;
    const peft::dense<S> other(peft::matrix<S>(wrong_base ? c.rows : out, wrong_base ? c.cols : in));
    const peft::dense<S>& base = wrong_base ? other : w;
    const peft::matrix<T> x = make(arg::x, batch, in), h = make(arg::h, batch, out), dy = make(arg::dy, batch, out);
    peft::matrix<T> y = make(arg::y, batch, out), dh = make(arg::dh, batch, out), dx = make(arg::dx, batch, in),
                    dw = make(arg::dw, out, in);
    typename A::cache_type cache;
    const auto run = [&] {
      switch (c.call) {
        case pass::forward: a.forward(base, x.view(), y.view(), cache); break;
        case pass::add_term: a.add_term(base, x.view(), h.view(), y.view(), cache); break;
        case pass::backward: a.backward(base, x.view(), dy.view(), dx.view(), cache); break;
        case pass::backward_term:
          a.backward_term(base, x.view(), h.view(), dy.view(), dh.view(), dx.view(), cache);
          break;
        case pass::delta_weight:  // only mergeable adapters have it
          if constexpr (requires { a.delta_weight(base, dw.view()); }) a.delta_weight(base, dw.view());
          break;
      }
    };
    if (c.message.empty()) {
      CHECK_THROWS_AS(run(), peft::shape_error);
    } else if (c.how == match::shape_error_prefix) {
      check_error<peft::shape_error>(run, c.message);
    } else if (c.how == match::prefix) {
      CHECK_THROWS_WITH(run(), Catch::StartsWith(c.message));
    } else {
      CHECK_THROWS_WITH(run(), Catch::Contains(c.message));
    }
  }
}

}  // namespace peft_test
