// Compacter (peft/adapters/compacter.hpp) and the LPHM kernel it shares with phm_delta
// (peft/adapters/detail/phm.hpp): parity with the paper's formulas computed in PyTorch float64
// (tests/data/paper/compacter_serial, compacter_parallel), the shared rule, the Kronecker-free
// product against an explicitly materialised H, gelu-tanh against finite differences, init, and
// errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <memory>
#include <string>

#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/compacter.hpp"
#include "peft/io/peft/compacter.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/safetensors.hpp"
#include "support/adapter_checks.hpp"
#include "support/paper_support.hpp"
#include "support/test_support.hpp"

namespace test_compacter {

namespace {

using peft::index;
using peft_test::read_rule;
using peft_test::rel_error;
using peft_test::tolerance;

template <class T>
peft::phm_factors<T> read_factors(const peft::io::safetensors_file& f, const std::string& prefix) {
  return {f.read_matrix<T>(prefix + ".W_left"), f.read_matrix<T>(prefix + ".W_right"), f.read<T>(prefix + ".bias")};
}

/// The golden layer: base W0, b0 (exact, f64 storage) and the adapter built from the stored tensors.
template <class T>
struct golden_compacter {
  peft::io::safetensors_file f;
  peft::dense<double> base;
  peft::compacter<T> adapter;

  explicit golden_compacter(const std::string& name)
      : f(peft_test::open_paper_case(name)),
        base(f.read_matrix<double>("W0"), f.read<double>("b0")),
        adapter(base.in_features(), base.out_features(),
                name == "compacter_serial" ? peft::compacter_placement::serial : peft::compacter_placement::parallel,
                std::make_shared<peft::phm_rule<T>>(4, read_rule<T>(f, "phm_rule").storage()), read_factors<T>(f, "down"),
                read_factors<T>(f, "up")) {}

  peft::matrix<double> ref(const std::string& n) const { return f.read_matrix<double>(n); }
};

template <class T>
void check_gradients(peft::compacter<T>& a, const peft::io::safetensors_file& f, double tol) {
  CHECK(rel_error(a.grad_rule(), read_rule<double>(f, "grad.phm_rule")) < tol);
  CHECK(rel_error(a.grad_down_left(), f.read_matrix<double>("grad.down.W_left")) < tol);
  CHECK(rel_error(a.grad_down_right(), f.read_matrix<double>("grad.down.W_right")) < tol);
  CHECK(rel_error(a.grad_down_bias(), f.read_matrix<double>("grad.down.bias")) < tol);
  CHECK(rel_error(a.grad_up_left(), f.read_matrix<double>("grad.up.W_left")) < tol);
  CHECK(rel_error(a.grad_up_right(), f.read_matrix<double>("grad.up.W_right")) < tol);
  CHECK(rel_error(a.grad_up_bias(), f.read_matrix<double>("grad.up.bias")) < tol);
  // the same, reached through parameters() by the golden names
  for (auto& p : a.parameters()) {
    INFO("parameter " << p.name);
    if (p.name == "phm_rule") {
      CHECK(p.shared);
      CHECK(p.shape == std::vector<std::int64_t>{4, 4, 4});
      CHECK(rel_error(p.grad, read_rule<double>(f, "grad.phm_rule")) < tol);
    } else {
      CHECK_FALSE(p.shared);
      CHECK(rel_error(p.grad, f.read_matrix<double>("grad." + p.name)) < tol);
    }
  }
}

/// H (in, out) = sum_i op(A_i) kron (l_i r_i^T), formed with plain loops in double.
template <class MR, class ML, class MRt>
peft::matrix<double> explicit_h(const MR& rule, bool transposed, const ML& left, const MRt& right) {
  const peft::index n = rule.rows(), p = left.cols(), q = right.cols();
  peft::matrix<double> h(n * p, n * q);
  for (peft::index i = 0; i < n; ++i)
    for (peft::index a = 0; a < n; ++a)
      for (peft::index c = 0; c < n; ++c) {
        const double s = peft_test::at(rule, i, transposed ? c * n + a : a * n + c);
        for (peft::index b = 0; b < p; ++b)
          for (peft::index e = 0; e < q; ++e) h(a * p + b, c * q + e) += s * peft_test::at(left, i, b) * peft_test::at(right, i, e);
      }
  return h;
}

}  // namespace

TEMPLATE_TEST_CASE("compacter: golden parity with the paper's formulas (serial, parallel)", "[compacter][golden]", float,
                   double) {
  using T = TestType;
  const std::string name = GENERATE(as<std::string>{}, "compacter_serial", "compacter_parallel");
  INFO("case " << name);
  const double tol = tolerance<T>();
  golden_compacter<T> c(name);
  auto& a = c.adapter;
  REQUIRE(a.n() == 4);
  REQUIRE(a.bottleneck() == 16);  // d = 64, R = 4
  const auto x = c.f.template read_matrix<T>("x");
  const auto gy = c.f.template read_matrix<T>("grad_y");
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(gy));
  REQUIRE(peft_test::nontrivial(a.rule()->value));
  const auto y_ref = c.ref("y");
  const auto h_ref = peft_test::ref_linear(c.ref("x"), c.ref("W0"), c.f.template read<double>("b0"));
  REQUIRE(rel_error(h_ref, y_ref) > 1e-2);  // the bottleneck contributes

  SECTION("fused forward / backward") {
    peft::matrix<T> y(x.rows(), a.out_features()), dx(x.rows(), a.in_features());
    typename peft::compacter<T>::cache_type cache;
    a.forward(c.base, x.view(), y.view(), cache);
    CHECK(rel_error(y, y_ref) < tol);
    a.zero_grad();
    a.backward(c.base, x.view(), gy.view(), dx.view(), cache);
    CHECK(rel_error(dx, c.ref("grad_x")) < tol);
    check_gradients(a, c.f, tol);
  }
  SECTION("add_term / backward_term with the base applied outside") {
    peft::matrix<T> h(x.rows(), a.out_features()), dx(x.rows(), a.in_features());
    c.base.matmul(x.view(), h.view());
    peft::matrix<T> y = h, dh = gy;
    typename peft::compacter<T>::cache_type cache;
    a.add_term(c.base, x.view(), h.view(), y.view(), cache);
    CHECK(rel_error(y, y_ref) < tol);
    a.zero_grad();
    a.backward_term(c.base, x.view(), h.view(), gy.view(), dh.view(), dx.view(), cache);
    c.base.matmul_t(peft::matrix_view<const T>(dh.view()), dx.view(), true);
    CHECK(rel_error(dx, c.ref("grad_x")) < tol);
    check_gradients(a, c.f, tol);
  }
  SECTION("inside adapted_linear") {
    peft::adapted_linear<peft::dense<double>, peft::compacter<T>> layer(c.base);
    layer.add_adapter("default", a);
    peft::matrix<T> y(x.rows(), a.out_features()), dx(x.rows(), a.in_features());
    layer.forward(x.view(), y.view());
    CHECK(rel_error(y, y_ref) < tol);
    layer.zero_grad();
    layer.backward(x.view(), gy.view(), dx.view());
    CHECK(rel_error(dx, c.ref("grad_x")) < tol);
    check_gradients(layer.adapter("default"), c.f, tol);
  }
}

TEST_CASE("compacter: layers built from one rule share it and accumulate into one gradient", "[compacter][shared]") {
  peft::rng g(7);
  auto rule = std::make_shared<peft::phm_rule<double>>(4);
  peft_test::fill_random(rule->value.view(), g);
  const peft::compacter_options serial{.n = 4, .reduction_factor = 2, .seed = 1};
  const peft::compacter_options parallel{
      .n = 4, .reduction_factor = 4, .placement = peft::compacter_placement::parallel, .seed = 2};
  peft::compacter<double> l1(12, 8, rule, serial);    // down 8 -> 4, up 4 -> 8
  peft::compacter<double> l2(16, 12, rule, parallel); // down 16 -> 4, up 4 -> 12
  const peft::dense<double> w1(peft_test::random_matrix<double>(8, 12, g), peft_test::random_vector<double>(8, g));
  const peft::dense<double> w2(peft_test::random_matrix<double>(12, 16, g), peft_test::random_vector<double>(12, g));
  const auto x1 = peft_test::random_matrix<double>(3, 12, g), g1 = peft_test::random_matrix<double>(3, 8, g);
  const auto x2 = peft_test::random_matrix<double>(2, 16, g), g2 = peft_test::random_matrix<double>(2, 12, g);

  // one memory: the rule the two layers list is the same tensor, value and gradient
  auto p1 = l1.parameters();
  auto p2 = l2.parameters();
  REQUIRE(p1.front().name == "phm_rule");
  CHECK(p1.front().shared);
  CHECK(p1.front().trainable);
  CHECK(p1.front().value.data() == p2.front().value.data());
  CHECK(p1.front().grad.data() == p2.front().grad.data());
  CHECK(p1.front().value.data() == rule->value.data());
  CHECK(l1.rule() == l2.rule());

  // run both layers; the shared gradient is the sum of what each layer gives alone
  auto run = [](peft::compacter<double>& a, const peft::dense<double>& w, const peft::matrix<double>& x,
                const peft::matrix<double>& gy) {
    peft::matrix<double> y(x.rows(), a.out_features()), dx(x.rows(), a.in_features());
    typename peft::compacter<double>::cache_type cache;
    a.forward(w, x.view(), y.view(), cache);
    a.backward(w, x.view(), gy.view(), dx.view(), cache);
  };
  l1.zero_grad();
  l2.zero_grad();
  run(l1, w1, x1, g1);
  run(l2, w2, x2, g2);
  const auto shared_grad = peft::to_matrix(l1.grad_rule());

  // independent computations: each layer with its own copy of the rule
  auto copy_of = [&] { return std::make_shared<peft::phm_rule<double>>(4, rule->value.storage()); };
  auto own = [&](const peft::compacter<double>& l) {
    peft::compacter<double> a = l;
    return peft::compacter<double>(a.in_features(), a.out_features(), a.placement(), copy_of(),
                                   {peft::to_matrix(a.down_left()), peft::to_matrix(a.down_right()),
                                    peft::to_matrix(a.down_bias()).storage()},
                                   {peft::to_matrix(a.up_left()), peft::to_matrix(a.up_right()),
                                    peft::to_matrix(a.up_bias()).storage()});
  };
  auto i1 = own(l1);
  auto i2 = own(l2);
  REQUIRE(i1.rule() != l1.rule());
  i1.zero_grad();
  i2.zero_grad();
  run(i1, w1, x1, g1);
  run(i2, w2, x2, g2);
  REQUIRE(peft_test::nontrivial(i1.grad_rule()));
  REQUIRE(peft_test::nontrivial(i2.grad_rule()));
  CHECK(rel_error(shared_grad, peft_test::add(i1.grad_rule(), i2.grad_rule())) < 1e-13);
  CHECK(rel_error(shared_grad, i1.grad_rule()) > 1e-3);  // neither layer alone

  // the fast weights are not shared: each layer's own gradients equal the independent ones
  CHECK(rel_error(l1.grad_up_left(), i1.grad_up_left()) < 1e-13);
  CHECK(rel_error(l2.grad_down_right(), i2.grad_down_right()) < 1e-13);

  // a change to the rule through one layer is seen by the other, and by copies of it
  const peft::compacter<double> copy = l2;
  CHECK(copy.rule() == l2.rule());
  peft::matrix<double> before(2, 12), after(2, 12);
  typename peft::compacter<double>::cache_type cache;
  l2.forward(w2, x2.view(), before.view(), cache);
  p1.front().value(1, 5) += 0.25;
  copy.forward(w2, x2.view(), after.view(), cache);
  CHECK(rel_error(after, before) > 1e-6);

  // zero_grad of any layer clears the shared gradient
  l2.zero_grad();
  CHECK(peft_test::max_abs(l1.grad_rule()) == 0.0);
}

TEST_CASE("compacter: the Kronecker-free LPHM product equals z H with H materialised", "[compacter][phm]") {
  namespace phm = peft::detail::phm;
  peft::rng g(99);
  for (int trial = 0; trial < 24; ++trial) {
    const peft::index n = 1 + static_cast<peft::index>(g.below(4));
    const peft::index p = 1 + static_cast<peft::index>(g.below(7));
    const peft::index q = 1 + static_cast<peft::index>(g.below(7));
    const bool transposed = trial % 2 == 1;
    const bool strided = trial % 3 == 2;  // views into wider buffers: the row-by-row path
    const peft::index batch = (strided ? 2 : 1) + static_cast<peft::index>(g.below(5));
    const auto side = transposed ? phm::rule_side::transposed : phm::rule_side::as_stored;
    INFO("n " << n << " p " << p << " q " << q << " batch " << batch << " transposed " << transposed << " strided "
              << strided);
    const auto rule = peft_test::random_matrix<double>(n, n * n, g);
    const auto left = peft_test::random_matrix<double>(n, p, g);
    const auto right = peft_test::random_matrix<double>(n, q, g);
    const peft::index pad = strided ? 3 : 0;
    auto zbuf = peft_test::random_matrix<double>(batch, n * p + pad, g);
    auto gbuf = peft_test::random_matrix<double>(batch, n * q + pad, g);
    peft::matrix<double> obuf(batch, n * q + pad, 5.0), dzbuf(batch, n * p + pad, 7.0);
    const peft::matrix_view<const double> z = zbuf.view().block(0, 0, batch, n * p);
    const peft::matrix_view<const double> gz = gbuf.view().block(0, 0, batch, n * q);
    const auto out = obuf.view().block(0, 0, batch, n * q);
    const auto dz = dzbuf.view().block(0, 0, batch, n * p);
    REQUIRE(z.contiguous() == !strided);

    const auto h = explicit_h(rule, transposed, left, right);  // (n p, n q)
    phm::workspace<double> ws;
    phm::apply<double>(rule.view(), side, left.view(), right.view(), z, out, false, ws);
    CHECK(rel_error(out, peft_test::ref_nn(z, h)) < 1e-13);
    if (strided) CHECK(obuf(0, n * q) == 5.0);  // padding untouched

    // accumulate adds
    phm::apply<double>(rule.view(), side, left.view(), right.view(), z, out, true, ws);
    CHECK(rel_error(out, peft_test::scaled(peft_test::ref_nn(z, h), 2.0)) < 1e-13);

    // backward against the chain through the materialised H: dH = z^T g, dz = g H^T
    peft::matrix<double> grule(n, n * n), gleft(n, p), gright(n, q);
    phm::apply_backward<double>(rule.view(), side, left.view(), right.view(), z, gz, ws, grule.view(), gleft.view(),
                                gright.view(), dz, false);
    CHECK(rel_error(dz, peft_test::ref_nt(gz, h)) < 1e-13);
    const auto dh = peft_test::ref_tn(z, gz);  // (n p, n q)
    peft::matrix<double> rrule(n, n * n), rleft(n, p), rright(n, q);
    for (peft::index i = 0; i < n; ++i)
      for (peft::index a = 0; a < n; ++a)
        for (peft::index c = 0; c < n; ++c) {
          const double s = rule(i, transposed ? c * n + a : a * n + c);
          for (peft::index b = 0; b < p; ++b)
            for (peft::index e = 0; e < q; ++e) {
              const double d = dh(a * p + b, c * q + e);
              rrule(i, transposed ? c * n + a : a * n + c) += d * left(i, b) * right(i, e);
              rleft(i, b) += d * s * right(i, e);
              rright(i, e) += d * s * left(i, b);
            }
        }
    CHECK(rel_error(grule, rrule) < 1e-13);
    CHECK(rel_error(gleft, rleft) < 1e-13);
    CHECK(rel_error(gright, rright) < 1e-13);

    // kron_sum writes H itself
    peft::matrix<double> hk(n * p, n * q);
    phm::kron_sum<double>(rule.view(), side, left.view(), right.view(), hk.view());
    CHECK(rel_error(hk, h) < 1e-14);
    REQUIRE(peft_test::nontrivial(h));
  }
}

TEST_CASE("compacter: gelu-tanh and its derivative", "[compacter][gelu]") {
  namespace phm = peft::detail::phm;
  // values of 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) computed independently in Python
  CHECK(phm::gelu_tanh(1.0) == Approx(0.8411919906082768).epsilon(1e-15));
  CHECK(phm::gelu_tanh(-0.5) == Approx(-0.15428599017485606).epsilon(1e-15));
  CHECK(phm::gelu_tanh(2.5) == Approx(2.484915733910001).epsilon(1e-15));
  CHECK(phm::gelu_tanh(0.0) == 0.0);
  CHECK(phm::gelu_tanh_derivative(0.0) == 0.5);
  for (double x = -7.0; x <= 7.0; x += 0.173) {
    INFO("x " << x);
    const double h = 1e-5;
    const double fd = (phm::gelu_tanh(x + h) - phm::gelu_tanh(x - h)) / (2 * h);
    CHECK(std::abs(phm::gelu_tanh_derivative(x) - fd) < 1e-9);
    CHECK(std::abs(static_cast<double>(phm::gelu_tanh_derivative(static_cast<float>(x))) -
                   phm::gelu_tanh_derivative(x)) < 1e-6);
  }
}

TEST_CASE("compacter: init follows the paper's code", "[compacter][init]") {
  peft::rng g(5);
  const peft::index d = 256;
  peft::compacter<double> a(d, d, {.n = 4, .reduction_factor = 16, .seed = 11});  // k = 16
  REQUIRE(a.bottleneck() == 16);
  // rule ~ N(0, 1e-4^2)
  const auto& r = a.rule()->value;
  double s2 = 0.0;
  for (double v : r.storage()) s2 += v * v;
  const double sd = std::sqrt(s2 / static_cast<double>(r.size()));
  CHECK(sd > 0.5e-4);
  CHECK(sd < 1.5e-4);
  // glorot-uniform per rank-one factor: |w| < sqrt(2) sqrt(6 / (fan + 1)), filling the range
  auto within = [](peft::matrix_view<double> m) {
    const double bound = std::sqrt(2.0) * std::sqrt(6.0 / static_cast<double>(m.cols() + 1));
    return peft_test::max_abs(m) <= bound && peft_test::max_abs(m) > 0.5 * bound;
  };
  CHECK(within(a.down_left()));
  CHECK(within(a.down_right()));
  CHECK(within(a.up_left()));
  CHECK(within(a.up_right()));
  CHECK(peft_test::max_abs(a.down_bias()) == 0.0);
  CHECK(peft_test::max_abs(a.up_bias()) == 0.0);
  // near-identity: the bottleneck output is small but not zero
  const peft::dense<double> w(peft_test::random_matrix<double>(d, d, g), peft_test::random_vector<double>(d, g));
  const auto x = peft_test::random_matrix<double>(2, d, g);
  peft::matrix<double> y(2, d), h(2, d);
  typename peft::compacter<double>::cache_type cache;
  a.forward(w, x.view(), y.view(), cache);
  w.matmul(x.view(), h.view());
  CHECK(rel_error(y, h) > 0.0);
  CHECK(rel_error(y, h) < 1e-3);
  // the same seed gives the same adapter; the rule comes from its own stream
  peft::compacter<double> b(d, d, {.n = 4, .reduction_factor = 16, .seed = 11});
  CHECK(peft_test::exactly_equal(a.rule()->value, b.rule()->value));
  CHECK(peft_test::exactly_equal(a.down_left(), b.down_left()));
  // defaults: n = 4, R = 32
  const peft::compacter_options o;
  CHECK(o.n == 4);
  CHECK(o.reduction_factor == 32);
  CHECK(o.placement == peft::compacter_placement::serial);
  CHECK(peft::compacter<float>(512, 512, {}).bottleneck() == 16);
}

TEST_CASE("compacter: bad shapes and missing checkpoint support are reported", "[compacter][errors]") {
  using A = peft::compacter<double>;
  using P = peft::compacter_placement;
  CHECK_THROWS_AS(A(64, 62, {.n = 4, .reduction_factor = 2}), peft::shape_error);   // n does not divide out
  CHECK_THROWS_AS(A(64, 64, {.n = 4, .reduction_factor = 3}), peft::shape_error);   // R does not divide d
  CHECK_THROWS_AS(A(64, 64, {.n = 4, .reduction_factor = 32}), peft::shape_error);  // k = 2, not a multiple of 4
  CHECK_THROWS_AS(A(64, 64, {.n = 0}), peft::shape_error);
  CHECK_THROWS_AS(A(64, 64, {.n = 4, .reduction_factor = 0}), peft::shape_error);
  CHECK_THROWS_AS(A(0, 64, {.n = 4, .reduction_factor = 4}), peft::shape_error);
  CHECK_THROWS_AS(A(30, 64, {.n = 4, .reduction_factor = 4, .placement = P::parallel}), peft::shape_error);
  CHECK_NOTHROW(A(30, 64, {.n = 4, .reduction_factor = 4, .placement = P::serial}));  // serial reads h (64)
  CHECK_THROWS_WITH(A(64, 64, {.n = 4, .reduction_factor = 3}), Catch::Contains("[compacter::compacter]"));
  auto rule3 = std::make_shared<peft::phm_rule<double>>(3);
  CHECK_THROWS_AS(A(64, 64, rule3, {.n = 4, .reduction_factor = 4}), peft::shape_error);  // rule of another order
  CHECK_THROWS_AS(A(64, 64, nullptr, {.n = 4, .reduction_factor = 4}), peft::shape_error);
  CHECK_THROWS_AS(peft::phm_rule<double>(2, std::vector<double>(7)), peft::shape_error);

  // explicit tensors that disagree
  auto rule = std::make_shared<peft::phm_rule<double>>(2);
  auto factors = [](peft::index n, peft::index in, peft::index out) {
    return peft::phm_factors<double>{peft::matrix<double>(n, in / n), peft::matrix<double>(n, out / n),
                                     std::vector<double>(static_cast<std::size_t>(out))};
  };
  CHECK_NOTHROW(A(8, 8, P::serial, rule, factors(2, 8, 4), factors(2, 4, 8)));
  CHECK_THROWS_AS(A(8, 8, P::serial, rule, factors(2, 6, 4), factors(2, 4, 8)), peft::shape_error);
  CHECK_THROWS_AS(A(8, 8, P::serial, rule, factors(2, 8, 4), factors(2, 2, 8)), peft::shape_error);
  CHECK_THROWS_AS(A(8, 8, P::serial, rule, factors(2, 8, 4), factors(2, 4, 6)), peft::shape_error);
  auto bad_bias = factors(2, 8, 4);
  bad_bias.bias.resize(3);
  CHECK_THROWS_AS(A(8, 8, P::serial, rule, bad_bias, factors(2, 4, 8)), peft::shape_error);

  // calls with the wrong shapes
  A a(8, 8, P::serial, rule, factors(2, 8, 4), factors(2, 4, 8));
  const peft::dense<double> w(peft::matrix<double>(8, 8));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 8, 6},
                                 {pass::forward, arg::y, 2, 6},
                                 {pass::add_term, arg::h, 2, 6},
                                 {pass::backward, arg::dx, 2, 6},
                                 {pass::backward_term, arg::dh, 2, 6},
                                 {pass::forward, arg::y, 2, 6, "[compacter::forward] y is (2, 6)"}});
  peft::matrix<double> x(2, 8), y(2, 8);
  A::cache_type cache;
  // a rule resized behind the layers' back is caught, not read out of bounds
  rule->value = peft::matrix<double>(3, 9);
  CHECK_THROWS_AS(a.forward(w, x.view(), y.view(), cache), peft::shape_error);

  // PEFT has no Compacter: the checkpoint hooks refuse
  peft_test::check_no_peft_format(a);  // PEFT has no format: the codec says so

  // a default-constructed adapter has no parameters and refuses to run
  A empty;
  CHECK(empty.parameters().empty());
  CHECK_NOTHROW(empty.zero_grad());
  peft_test::check_unset_rejected<A, peft::shape_error>(w);
}

}  // namespace test_compacter
