// phm_delta (peft/adapters/phm_delta.hpp), the mergeable Kronecker form of Compacter's LPHM
// layer: parity with the formula computed in PyTorch float64 (tests/data/paper/phm_delta: y, dx,
// every gradient, delta_weight), merging, the shared rule, the Kronecker-free forward against an
// explicitly formed Delta W on random shapes, init, and errors.
#include <catch2/catch.hpp>

#include <filesystem>
#include <memory>
#include <string>

#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/compacter.hpp"
#include "peft/adapters/phm_delta.hpp"
#include "peft/io/peft/phm_delta.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/safetensors.hpp"
#include "support/adapter_checks.hpp"
#include "support/paper_support.hpp"
#include "support/test_support.hpp"

namespace test_phm_delta {

namespace {

using peft_test::read_rule;
using peft_test::rel_error;
using peft_test::tolerance;

/// Delta W (out, in) = sum_i A_i kron (u_i v_i^T), formed with plain loops in double.
template <class MR, class MU, class MV>
peft::matrix<double> explicit_delta(const MR& rule, const MU& u, const MV& v) {
  const peft::index n = rule.rows(), p = u.cols(), q = v.cols();
  peft::matrix<double> d(n * p, n * q);
  for (peft::index i = 0; i < n; ++i)
    for (peft::index a = 0; a < n; ++a)
      for (peft::index c = 0; c < n; ++c)
        for (peft::index b = 0; b < p; ++b)
          for (peft::index e = 0; e < q; ++e)
            d(a * p + b, c * q + e) += peft_test::at(rule, i, a * n + c) * peft_test::at(u, i, b) * peft_test::at(v, i, e);
  return d;
}

template <class T>
std::shared_ptr<peft::phm_rule<T>> random_rule(peft::index n, peft::rng& g) {
  auto r = std::make_shared<peft::phm_rule<T>>(n);
  peft_test::fill_random(r->value.view(), g);
  return r;
}

}  // namespace

TEMPLATE_TEST_CASE("phm_delta: golden parity with the formula (y, dx, gradients, delta_weight, merge)",
                   "[phm_delta][golden]", float, double) {
  using T = TestType;
  const double tol = tolerance<T>();
  const auto f = peft_test::open_paper_case("phm_delta");
  const peft::dense<double> base(f.read_matrix<double>("W0"), f.read<double>("b0"));
  peft::phm_delta<T> a(std::make_shared<peft::phm_rule<T>>(4, read_rule<T>(f, "phm_rule").storage()),
                       f.read_matrix<T>("W_left"), f.read_matrix<T>("W_right"));
  REQUIRE(a.in_features() == 64);
  REQUIRE(a.out_features() == 48);
  const auto x = f.read_matrix<T>("x");
  const auto gy = f.read_matrix<T>("grad_y");
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(gy));
  REQUIRE(peft_test::nontrivial(f.read_matrix<double>("delta_weight")));
  const auto y_ref = f.read_matrix<double>("y");
  REQUIRE(rel_error(peft_test::ref_linear(f.read_matrix<double>("x"), f.read_matrix<double>("W0"), f.read<double>("b0")),
                    y_ref) > 1e-2);  // the delta contributes

  auto check_grads = [&](peft::phm_delta<T>& ad) {
    CHECK(rel_error(ad.grad_rule(), read_rule<double>(f, "grad.phm_rule")) < tol);
    CHECK(rel_error(ad.grad_w_left(), f.read_matrix<double>("grad.W_left")) < tol);
    CHECK(rel_error(ad.grad_w_right(), f.read_matrix<double>("grad.W_right")) < tol);
    for (auto& p : ad.parameters()) {
      INFO("parameter " << p.name);
      CHECK(p.trainable);
      CHECK(p.shared == (p.name == "phm_rule"));
      const auto ref = p.name == "phm_rule" ? read_rule<double>(f, "grad.phm_rule") : f.read_matrix<double>("grad." + p.name);
      CHECK(rel_error(p.grad, ref) < tol);
    }
  };

  SECTION("fused forward / backward") {
    peft::matrix<T> y(x.rows(), 48), dx(x.rows(), 64);
    typename peft::phm_delta<T>::cache_type cache;
    a.forward(base, x.view(), y.view(), cache);
    CHECK(rel_error(y, y_ref) < tol);
    a.zero_grad();
    a.backward(base, x.view(), gy.view(), dx.view(), cache);
    CHECK(rel_error(dx, f.read_matrix<double>("grad_x")) < tol);
    check_grads(a);
  }
  SECTION("add_term / backward_term, and backward without a forward") {
    peft::matrix<T> h(x.rows(), 48), dx(x.rows(), 64), dh(x.rows(), 48);
    base.matmul(x.view(), h.view());
    peft::matrix<T> y = h;
    typename peft::phm_delta<T>::cache_type cache;
    a.add_term(base, x.view(), h.view(), y.view(), cache);
    CHECK(rel_error(y, y_ref) < tol);
    a.zero_grad();
    a.backward_term(base, x.view(), h.view(), gy.view(), dh.view(), dx.view(), cache);
    CHECK(peft_test::max_abs(dh) == 0.0);  // the delta does not read h
    base.matmul_t(peft::matrix_view<const T>(gy.view()), dx.view(), true);
    CHECK(rel_error(dx, f.read_matrix<double>("grad_x")) < tol);
    check_grads(a);
    typename peft::phm_delta<T>::cache_type fresh;
    a.zero_grad();
    a.backward(base, x.view(), gy.view(), dx.view(), fresh);
    CHECK(rel_error(dx, f.read_matrix<double>("grad_x")) < tol);
    check_grads(a);
  }
  SECTION("delta_weight and merging") {
    peft::matrix<T> dw(48, 64);
    a.delta_weight(base, dw.view());
    CHECK(rel_error(dw, f.read_matrix<double>("delta_weight")) < tol);
    T db[48] = {};
    CHECK_FALSE(a.delta_bias(base, db));
    peft::adapted_linear<peft::dense<double>, peft::phm_delta<T>> layer(base);
    layer.add_adapter("default", a);
    layer.merge("default");
    CHECK(rel_error(layer.base().weight(), peft_test::add(f.read_matrix<double>("W0"), f.read_matrix<double>("delta_weight"))) <
          tol);
    peft::matrix<T> y(x.rows(), 48);
    layer.forward(x.view(), y.view());
    CHECK(rel_error(y, y_ref) < tol);
    layer.unmerge("default");
    CHECK(rel_error(layer.base().weight(), f.read_matrix<double>("W0")) < tol);
  }
}

TEST_CASE("phm_delta: the Kronecker-free forward equals x (W0 + Delta W)^T with Delta W formed", "[phm_delta][phm]") {
  peft::rng g(31);
  for (int trial = 0; trial < 16; ++trial) {
    const peft::index n = 1 + static_cast<peft::index>(g.below(4));
    const peft::index in = n * (1 + static_cast<peft::index>(g.below(6)));
    const peft::index out = n * (1 + static_cast<peft::index>(g.below(6)));
    const peft::index batch = 1 + static_cast<peft::index>(g.below(4));
    INFO("n " << n << " in " << in << " out " << out << " batch " << batch);
    peft::phm_delta<double> a(in, out, random_rule<double>(n, g), {.n = n, .init = peft::phm_delta_init::random, .seed = g.next()});
    const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
    const auto x = peft_test::random_matrix<double>(batch, in, g);
    const auto gy = peft_test::random_matrix<double>(batch, out, g);
    const auto delta = explicit_delta(a.rule()->value, a.w_left(), a.w_right());
    REQUIRE(peft_test::nontrivial(delta));
    const auto merged = peft_test::add(peft_test::to_double(w.weight()), delta);
    peft::matrix<double> y(batch, out), dx(batch, in), dw(out, in);
    typename peft::phm_delta<double>::cache_type cache;
    a.forward(w, x.view(), y.view(), cache);
    CHECK(rel_error(y, peft_test::ref_linear(x, merged, w.bias())) < 1e-13);
    a.backward(w, x.view(), gy.view(), dx.view(), cache);
    CHECK(rel_error(dx, peft_test::ref_nn(gy, merged)) < 1e-13);
    a.delta_weight(w, dw.view());
    CHECK(rel_error(dw, delta) < 1e-14);
  }
}

TEST_CASE("phm_delta: layers built from one rule share it and accumulate into one gradient", "[phm_delta][shared]") {
  peft::rng g(17);
  auto rule = random_rule<double>(3, g);
  const peft::phm_delta_options o{.n = 3, .init = peft::phm_delta_init::random};
  peft::phm_delta<double> l1(6, 9, rule, o);
  peft::phm_delta<double> l2(12, 3, rule, {.n = 3, .init = peft::phm_delta_init::random, .seed = 4});
  // a Compacter layer may read the same rule: one slow tensor for the whole model
  peft::compacter<double> l3(9, 6, rule, {.n = 3, .reduction_factor = 2});
  auto p1 = l1.parameters();
  REQUIRE(p1.front().name == "phm_rule");
  CHECK(p1.front().shared);
  CHECK(p1.front().value.data() == l2.parameters().front().value.data());
  CHECK(p1.front().grad.data() == l3.parameters().front().grad.data());

  const peft::dense<double> w1(peft_test::random_matrix<double>(9, 6, g)), w2(peft_test::random_matrix<double>(3, 12, g));
  const peft::dense<double> w3(peft_test::random_matrix<double>(6, 9, g));
  const auto x1 = peft_test::random_matrix<double>(2, 6, g), g1 = peft_test::random_matrix<double>(2, 9, g);
  const auto x2 = peft_test::random_matrix<double>(3, 12, g), g2 = peft_test::random_matrix<double>(3, 3, g);
  const auto x3 = peft_test::random_matrix<double>(2, 9, g), g3 = peft_test::random_matrix<double>(2, 6, g);
  auto run = [](auto& a, const peft::dense<double>& w, const peft::matrix<double>& x, const peft::matrix<double>& gy) {
    peft::matrix<double> y(x.rows(), a.out_features()), dx(x.rows(), a.in_features());
    typename std::decay_t<decltype(a)>::cache_type cache;
    a.forward(w, x.view(), y.view(), cache);
    a.backward(w, x.view(), gy.view(), dx.view(), cache);
  };
  l1.zero_grad();  // clears the shared gradient for all three
  l2.zero_grad();
  l3.zero_grad();
  run(l1, w1, x1, g1);
  run(l2, w2, x2, g2);
  run(l3, w3, x3, g3);
  const auto shared_grad = peft::to_matrix(l1.grad_rule());

  // independent: each layer on its own copy of the rule
  auto copy_of = [&] { return std::make_shared<peft::phm_rule<double>>(3, rule->value.storage()); };
  peft::phm_delta<double> i1(copy_of(), peft::to_matrix(l1.w_left()), peft::to_matrix(l1.w_right()));
  peft::phm_delta<double> i2(copy_of(), peft::to_matrix(l2.w_left()), peft::to_matrix(l2.w_right()));
  peft::compacter<double> i3(9, 6, l3.placement(), copy_of(),
                             {peft::to_matrix(l3.down_left()), peft::to_matrix(l3.down_right()), {}},
                             {peft::to_matrix(l3.up_left()), peft::to_matrix(l3.up_right()), {}});
  for (auto* r : {i1.rule().get(), i2.rule().get(), i3.rule().get()}) REQUIRE(r != rule.get());
  run(i1, w1, x1, g1);
  run(i2, w2, x2, g2);
  run(i3, w3, x3, g3);
  REQUIRE(peft_test::nontrivial(i1.grad_rule()));
  REQUIRE(peft_test::nontrivial(i2.grad_rule()));
  REQUIRE(peft_test::nontrivial(i3.grad_rule()));
  const auto sum = peft_test::add(peft_test::add(i1.grad_rule(), i2.grad_rule()), i3.grad_rule());
  CHECK(rel_error(shared_grad, sum) < 1e-13);
  CHECK(rel_error(l2.grad_w_right(), i2.grad_w_right()) < 1e-13);
}

TEST_CASE("phm_delta: default init is an exact no-op; init draws are reproducible", "[phm_delta][init]") {
  peft::rng g(3);
  const peft::phm_delta<double> a(8, 12, {.seed = 9});
  CHECK(a.n() == 4);
  peft::phm_delta<double> b(8, 12, {.seed = 9});
  CHECK(peft_test::max_abs(b.w_left()) == 0.0);
  CHECK(peft_test::nontrivial(b.w_right()));
  CHECK(peft_test::nontrivial(b.rule()->value));
  CHECK(peft_test::max_abs(b.rule()->value) < 1e-3);  // N(0, 1e-4^2)
  const peft::dense<double> w(peft_test::random_matrix<double>(12, 8, g), peft_test::random_vector<double>(12, g));
  const auto x = peft_test::random_matrix<double>(3, 8, g);
  peft::matrix<double> y(3, 12), h(3, 12), dw(12, 8, 1.0);
  typename peft::phm_delta<double>::cache_type cache;
  a.forward(w, x.view(), y.view(), cache);
  w.matmul(x.view(), h.view());
  CHECK(peft_test::exactly_equal(y, h));
  a.delta_weight(w, dw.view());
  CHECK(peft_test::max_abs(dw) == 0.0);
  // not stuck: W_left gets a gradient at init
  b.zero_grad();
  peft::matrix<double> dx(3, 8);
  const auto gy = peft_test::random_matrix<double>(3, 12, g);
  b.backward(w, x.view(), gy.view(), dx.view(), cache);
  CHECK(peft_test::max_abs(b.grad_w_left()) > 0.0);
  const peft::phm_delta<double> r(8, 12, {.init = peft::phm_delta_init::random, .seed = 9});
  CHECK(peft_test::exactly_equal(r.rule()->value, b.rule()->value));
  CHECK(peft_test::nontrivial(r.w_left()));
}

TEST_CASE("phm_delta: bad shapes and missing checkpoint support are reported", "[phm_delta][errors]") {
  using A = peft::phm_delta<double>;
  CHECK_THROWS_AS(A(10, 12, {.n = 4}), peft::shape_error);
  CHECK_THROWS_AS(A(12, 10, {.n = 4}), peft::shape_error);
  CHECK_THROWS_AS(A(0, 12, {.n = 4}), peft::shape_error);
  CHECK_THROWS_AS(A(12, 12, {.n = 0}), peft::shape_error);
  CHECK_THROWS_WITH(A(10, 12, {.n = 4}), Catch::Contains("[phm_delta::phm_delta] in_features = 10"));
  auto rule = std::make_shared<peft::phm_rule<double>>(2);
  CHECK_THROWS_AS(A(12, 12, rule, {.n = 4}), peft::shape_error);  // rule of another order
  CHECK_THROWS_AS(A(nullptr, peft::matrix<double>(2, 3), peft::matrix<double>(2, 3)), peft::shape_error);
  CHECK_THROWS_AS(A(rule, peft::matrix<double>(3, 3), peft::matrix<double>(2, 3)), peft::shape_error);
  CHECK_THROWS_AS(A(rule, peft::matrix<double>(2, 3), peft::matrix<double>(4, 3)), peft::shape_error);
  CHECK_THROWS_AS(A(rule, peft::matrix<double>(2, 0), peft::matrix<double>(2, 3)), peft::shape_error);

  A a(rule, peft::matrix<double>(2, 3), peft::matrix<double>(2, 4));  // in 8, out 6
  const peft::dense<double> w(peft::matrix<double>(6, 8));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 8, 6},
                                 {pass::forward, arg::y, 2, 5},
                                 {pass::forward, arg::x, 2, 5},
                                 {pass::backward, arg::dx, 2, 5},
                                 {pass::backward_term, arg::dy, 2, 5},
                                 {pass::delta_weight, arg::dw, 8, 6}});
  peft::matrix<double> dw(6, 8);
  CHECK_NOTHROW(a.delta_weight(w, dw.view()));
  peft_test::check_shape_errors(a, w, 2, {{pass::forward, arg::x, 2, 5, "[phm_delta::forward] x is (2, 5)"}});

  peft_test::check_no_peft_format(a);  // PEFT has no format: the codec says so
  A empty;
  CHECK(empty.parameters().empty());
  peft_test::check_unset_rejected<A, peft::shape_error>(w);
}

}  // namespace test_phm_delta
