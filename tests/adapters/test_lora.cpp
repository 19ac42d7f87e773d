// LoRA: forward against plain double loops, gradients against closed forms and central
// differences, merging, initialisation, scaling, and shape errors.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "support/adapter_checks.hpp"
#include "support/test_support.hpp"

namespace test_lora {

using ix = peft::index;

static_assert(peft::mergeable_adapter_for<peft::lora<float>, peft::dense<peft::bf16>>);
static_assert(peft::mergeable_adapter_for<peft::lora<float>, peft::dense<peft::f16>>);
static_assert(peft::mergeable_adapter_for<peft::lora<double>, peft::dense<double>>);
static_assert(peft::mergeable_adapter_for<peft::lora<double>, peft::dense<float>>);
static_assert(peft::adapter_for<peft::lora<float>, peft::dense<float>>);
static_assert(!peft::adapter_for<int, peft::dense<float>>);

namespace {

using namespace peft_test::compute_types;  // f32_on_f32, ...: an adapter in T over a weight stored as S
using peft_test::unit_roundoff;

/// Relative Frobenius tolerance for results computed in T against double references.
template <class T>
constexpr double tol() {
  return peft_test::tolerance<T>(1e-12, 2e-5);
}

struct dims {
  ix batch, in, out, rank;
};

/// Random shapes with odd sizes, rank 1, batch 1, rank == in and rank > in.
const std::vector<dims> shapes{{1, 1, 1, 1},  {1, 5, 3, 1},   {4, 7, 5, 3},  {3, 17, 9, 2},
                               {9, 16, 33, 8}, {2, 64, 31, 5}, {5, 13, 13, 13}, {7, 3, 11, 4}};

/// One frozen layer with a LoRA adapter whose A, B and b_B are all random (non-zero).
template <class T, class S>
struct fixture {
  dims d;
  peft::dense<S> base;
  peft::matrix<double> w;    // the stored weight, decoded exactly
  std::vector<double> b0;    // the stored bias, decoded (empty: none)
  peft::lora<T> adapter;
  peft::matrix<T> x;

  fixture(dims dd, peft::rng& gen, bool base_bias, bool lora_bias, double alpha = 6.0,
          bool rslora = false)
      : d(dd),
        base(make_base(dd, gen, base_bias)),
        w(peft_test::to_double(base.weight())),
        adapter(dd.in, dd.out,
                peft::lora_options{.rank = dd.rank,
                                   .alpha = alpha,
                                   .use_rslora = rslora,
                                   .bias = lora_bias,
                                   .init = peft::lora_init::random,
                                   .seed = gen.next()}),
        x(peft_test::random_matrix<T>(dd.batch, dd.in, gen)) {
    for (const S& v : base.bias()) b0.push_back(peft::convert<double>(v));
    if (lora_bias) peft_test::fill_random(adapter.bias(), gen);
  }

  static peft::dense<S> make_base(dims dd, peft::rng& gen, bool with_bias) {
    const auto wd = peft_test::random_matrix<double>(dd.out, dd.in, gen);
    const auto bd = peft_test::random_vector<double>(dd.out, gen);
    return peft::dense<S>::from(wd.view(), with_bias ? bd.data() : nullptr);
  }

  double s() const { return static_cast<double>(adapter.scale()); }

  /// y = x W^T + b + s (x A^T B^T + b_B), plain loops in double.
  peft::matrix<double> reference(const peft::matrix<T>& xx) const {
    return peft_test::add(peft_test::ref_linear(xx, w, b0),
                          peft_test::ref_lora_term(xx, adapter.A(), adapter.B(), adapter.bias(), s()));
  }

  peft::matrix<T> forward(const peft::matrix<T>& xx) const {
    peft::matrix<T> y(xx.rows(), d.out);
    typename peft::lora<T>::cache_type cache;
    adapter.forward(base, xx.view(), y.view(), cache);
    return y;
  }

  /// L = sum(forward(x) * g), in double.
  double loss(const peft::matrix<T>& g) const { return peft_test::dot(forward(x), g); }

  /// Closed-form gradients of L = sum(y * G), in double.
  struct grads {
    peft::matrix<double> da, db, dbias, dx;
  };
  grads closed_form(const peft::matrix<double>& g) const {
    const auto t = peft_test::ref_nt(x, adapter.A());  // x A^T (batch, r)
    const auto u = peft_test::ref_nn(g, adapter.B());  // G B (batch, r)
    grads r;
    r.db = peft_test::scaled(peft_test::ref_tn(g, t), s());
    r.da = peft_test::scaled(peft_test::ref_tn(u, x), s());
    r.dbias = peft_test::scaled(peft_test::column_sums(g), s());
    r.dx = peft_test::add(peft_test::ref_nn(g, w), peft_test::ref_nn(u, adapter.A()), s());
    return r;
  }
};

template <class T>
void require_nontrivial_adapter(const peft::lora<T>& a) {
  REQUIRE(peft_test::nontrivial(a.A()));
  REQUIRE(peft_test::nontrivial(a.B()));
  if (a.has_bias()) REQUIRE(peft_test::nontrivial(a.bias()));
}

/// Runs f and checks it throws peft::shape_error whose message starts with `prefix`.
template <class F>
void check_shape_error(F&& f, const std::string& prefix) {
  peft_test::check_error<peft::shape_error>(std::forward<F>(f), prefix);
}

}  // namespace

TEMPLATE_TEST_CASE("lora forward equals the double reference", "[lora]", f32_on_f32, f32_on_f64,
                   f32_on_bf16, f64_on_f64, f64_on_f32, f64_on_bf16) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  peft::rng gen(101);
  for (const auto& d : shapes) {
    for (bool base_bias : {false, true}) {
      for (bool lora_bias : {false, true}) {
        fixture<T, S> f(d, gen, base_bias, lora_bias);
        INFO("batch " << d.batch << " in " << d.in << " out " << d.out << " rank " << d.rank
                      << " base bias " << base_bias << " lora bias " << lora_bias);
        REQUIRE(peft_test::nontrivial(f.x));
        REQUIRE(peft_test::nontrivial(f.w));
        require_nontrivial_adapter(f.adapter);
        const auto y = f.forward(f.x);
        const auto ref = f.reference(f.x);
        CHECK(peft_test::rel_error(y, ref) <= tol<T>());
        // The adapter's term is a real part of the output, not lost in rounding.
        const auto base_only = peft_test::ref_linear(f.x, f.w, f.b0);
        CHECK(peft_test::rel_error(base_only, ref) > 100 * tol<T>());
      }
    }
  }
}

TEMPLATE_TEST_CASE("lora forward on strided x and y views", "[lora]", f32_on_bf16, f64_on_f64) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  peft::rng gen(7);
  fixture<T, S> f({5, 9, 7, 3}, gen, true, true);
  // x and y are windows of larger buffers; y's padding must survive.
  auto xbuf = peft_test::random_matrix<T>(8, 14, gen);
  auto ybuf = peft::matrix<T>(9, 12, T{-7});
  auto xv = xbuf.view().block(2, 3, 5, 9);
  auto yv = ybuf.view().block(1, 2, 5, 7);
  const auto xc = peft::to_matrix(peft::matrix_view<const T>(xv));
  REQUIRE(peft_test::nontrivial(xc));
  typename peft::lora<T>::cache_type cache;
  f.adapter.forward(f.base, peft::matrix_view<const T>(xv), yv, cache);
  CHECK(peft_test::rel_error(yv, f.reference(xc)) <= tol<T>());
  ix untouched = 0;
  for (ix i = 0; i < 9; ++i) {
    for (ix j = 0; j < 12; ++j) untouched += ybuf(i, j) == T{-7} ? 1 : 0;
  }
  CHECK(untouched == 9 * 12 - 5 * 7);
}

TEMPLATE_TEST_CASE("lora backward equals closed forms", "[lora]", f32_on_f32, f32_on_f64,
                   f32_on_bf16, f64_on_f64, f64_on_f32, f64_on_bf16) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  peft::rng gen(202);
  for (const auto& d : shapes) {
    for (bool lora_bias : {false, true}) {
      fixture<T, S> f(d, gen, true, lora_bias);
      INFO("batch " << d.batch << " in " << d.in << " out " << d.out << " rank " << d.rank
                    << " lora bias " << lora_bias);
      const auto g = peft_test::random_matrix<T>(d.batch, d.out, gen);
      REQUIRE(peft_test::nontrivial(g));
      require_nontrivial_adapter(f.adapter);
      peft::matrix<T> y(d.batch, d.out), dx(d.batch, d.in, T{123});  // dx is overwritten
      typename peft::lora<T>::cache_type cache;
      f.adapter.forward(f.base, f.x.view(), y.view(), cache);
      f.adapter.backward(f.base, f.x.view(), g.view(), dx.view(), cache);
      const auto want = f.closed_form(peft_test::to_double(g));
      CHECK(peft_test::rel_error(f.adapter.grad_A(), want.da) <= tol<T>());
      CHECK(peft_test::rel_error(f.adapter.grad_B(), want.db) <= tol<T>());
      CHECK(peft_test::rel_error(dx, want.dx) <= tol<T>());
      if (lora_bias) {
        CHECK(peft_test::rel_error(f.adapter.grad_bias(), want.dbias) <= tol<T>());
      } else {
        CHECK(f.adapter.grad_bias().empty());
      }
      REQUIRE(peft_test::nontrivial(want.da));
      REQUIRE(peft_test::nontrivial(want.db));
    }
  }
}

TEMPLATE_TEST_CASE("lora gradients equal central differences", "[lora]", f64_on_f64, f64_on_f32,
                   f64_on_bf16, f32_on_f32) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  // L = sum(y * G) is linear in each single parameter, so central differences are exact up to
  // rounding; a large step keeps that rounding small (float needs it: L is computed from a
  // float forward pass).
  constexpr bool is_double = std::is_same_v<T, double>;
  const double h = is_double ? 1e-3 : 0.25;
  const double fd_tol = is_double ? 1e-7 : 2e-3;
  peft::rng gen(303);
  for (const dims d : {dims{4, 7, 5, 3}, dims{1, 6, 9, 1}, dims{3, 5, 4, 5}}) {
    fixture<T, S> f(d, gen, true, true);
    INFO("batch " << d.batch << " in " << d.in << " out " << d.out << " rank " << d.rank);
    const auto g = peft_test::random_matrix<T>(d.batch, d.out, gen);
    REQUIRE(peft_test::nontrivial(g));
    require_nontrivial_adapter(f.adapter);

    peft::matrix<T> y(d.batch, d.out), dx(d.batch, d.in);
    typename peft::lora<T>::cache_type cache;
    f.adapter.forward(f.base, f.x.view(), y.view(), cache);
    f.adapter.backward(f.base, f.x.view(), g.view(), dx.view(), cache);

    auto loss = [&] { return f.loss(g); };
    const auto fd_a = peft_test::fd_gradient(f.adapter.A(), h, loss);
    const auto fd_b = peft_test::fd_gradient(f.adapter.B(), h, loss);
    const auto fd_bias = peft_test::fd_gradient(f.adapter.bias(), h, loss);
    const auto fd_x = peft_test::fd_gradient(f.x.view(), h, loss);
    REQUIRE(peft_test::nontrivial(fd_a));
    REQUIRE(peft_test::nontrivial(fd_x));
    CHECK(peft_test::rel_error(f.adapter.grad_A(), fd_a) <= fd_tol);
    CHECK(peft_test::rel_error(f.adapter.grad_B(), fd_b) <= fd_tol);
    CHECK(peft_test::rel_error(f.adapter.grad_bias(), fd_bias) <= fd_tol);
    CHECK(peft_test::rel_error(dx, fd_x) <= fd_tol);
  }
}

TEMPLATE_TEST_CASE("lora gradients accumulate across backward calls; zero_grad clears them",
                   "[lora]", f32_on_f32, f64_on_f64, f64_on_bf16) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  peft::rng gen(404);
  const dims d{5, 11, 7, 3};
  fixture<T, S> f(d, gen, false, true);
  const auto g1 = peft_test::random_matrix<T>(d.batch, d.out, gen);
  const auto g2 = peft_test::random_matrix<T>(d.batch, d.out, gen);
  REQUIRE(peft_test::nontrivial(g1));
  REQUIRE(peft_test::nontrivial(g2));
  peft::matrix<T> y(d.batch, d.out), dx(d.batch, d.in);
  typename peft::lora<T>::cache_type cache;
  f.adapter.forward(f.base, f.x.view(), y.view(), cache);
  f.adapter.backward(f.base, f.x.view(), g1.view(), dx.view(), cache);
  f.adapter.backward(f.base, f.x.view(), g2.view(), dx.view(), cache);

  const auto w1 = f.closed_form(peft_test::to_double(g1));
  const auto w2 = f.closed_form(peft_test::to_double(g2));
  CHECK(peft_test::rel_error(f.adapter.grad_A(), peft_test::add(w1.da, w2.da)) <= tol<T>());
  CHECK(peft_test::rel_error(f.adapter.grad_B(), peft_test::add(w1.db, w2.db)) <= tol<T>());
  CHECK(peft_test::rel_error(f.adapter.grad_bias(), peft_test::add(w1.dbias, w2.dbias)) <= tol<T>());
  CHECK(peft_test::rel_error(dx, w2.dx) <= tol<T>());  // dx is written, not accumulated

  // The same G twice doubles the gradients.
  f.adapter.zero_grad();
  f.adapter.backward(f.base, f.x.view(), g1.view(), dx.view(), cache);
  f.adapter.backward(f.base, f.x.view(), g1.view(), dx.view(), cache);
  CHECK(peft_test::rel_error(f.adapter.grad_A(), peft_test::scaled(w1.da, 2.0)) <= tol<T>());
  CHECK(peft_test::rel_error(f.adapter.grad_B(), peft_test::scaled(w1.db, 2.0)) <= tol<T>());

  f.adapter.zero_grad();
  CHECK(peft_test::max_abs(f.adapter.grad_A()) == 0.0);
  CHECK(peft_test::max_abs(f.adapter.grad_B()) == 0.0);
  CHECK(peft_test::max_abs(f.adapter.grad_bias()) == 0.0);
  for (const auto& p : f.adapter.parameters()) CHECK(peft_test::max_abs(p.grad) == 0.0);
  // Parameters are untouched by zero_grad.
  require_nontrivial_adapter(f.adapter);
}

TEMPLATE_TEST_CASE("lora backward without a forward, and across batch sizes", "[lora]", float,
                   double) {
  using T = TestType;
  peft::rng gen(405);
  fixture<T, T> f({3, 8, 6, 2}, gen, true, false);
  // Backward with an empty cache recomputes x A^T.
  const auto g = peft_test::random_matrix<T>(3, 6, gen);
  peft::matrix<T> dx(3, 8);
  typename peft::lora<T>::cache_type cache;
  f.adapter.backward(f.base, f.x.view(), g.view(), dx.view(), cache);
  auto want = f.closed_form(peft_test::to_double(g));
  CHECK(peft_test::rel_error(f.adapter.grad_A(), want.da) <= tol<T>());
  CHECK(peft_test::rel_error(f.adapter.grad_B(), want.db) <= tol<T>());
  CHECK(peft_test::rel_error(dx, want.dx) <= tol<T>());

  // A forward on a different batch size resizes the cache used by the next backward.
  f.adapter.zero_grad();
  f.x = peft_test::random_matrix<T>(7, 8, gen);
  const auto g7 = peft_test::random_matrix<T>(7, 6, gen);
  peft::matrix<T> y7(7, 6), dx7(7, 8);
  f.adapter.forward(f.base, f.x.view(), y7.view(), cache);
  CHECK(cache.t.rows() == 7);
  f.adapter.backward(f.base, f.x.view(), g7.view(), dx7.view(), cache);
  want = f.closed_form(peft_test::to_double(g7));
  CHECK(peft_test::rel_error(f.adapter.grad_A(), want.da) <= tol<T>());
  CHECK(peft_test::rel_error(dx7, want.dx) <= tol<T>());
}

TEMPLATE_TEST_CASE("lora add_term and backward_term are the adapter's share", "[lora]", f32_on_bf16,
                   f64_on_f64) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  peft::rng gen(505);
  const dims d{4, 10, 6, 3};
  fixture<T, S> f(d, gen, true, true);
  peft::matrix<T> h(d.batch, d.out), y(d.batch, d.out);
  f.base.template matmul<T>(f.x.view(), h.view());
  y = h;
  typename peft::lora<T>::cache_type cache;
  f.adapter.add_term(f.base, f.x.view(), h.view(), y.view(), cache);
  CHECK(peft_test::rel_error(y, f.reference(f.x)) <= tol<T>());

  const auto g = peft_test::random_matrix<T>(d.batch, d.out, gen);
  auto dx = peft_test::random_matrix<T>(d.batch, d.in, gen);  // accumulated into
  const auto dx0 = peft_test::to_double(dx);
  auto dh = peft_test::random_matrix<T>(d.batch, d.out, gen);
  const auto dh0 = peft_test::to_double(dh);
  f.adapter.backward_term(f.base, f.x.view(), h.view(), g.view(), dh.view(), dx.view(), cache);
  const auto gd = peft_test::to_double(g);
  const auto want = f.closed_form(gd);
  // dx += s (G B) A only: the base path is the caller's.
  const auto direct = peft_test::scaled(
      peft_test::ref_nn(peft_test::ref_nn(gd, f.adapter.B()), f.adapter.A()), f.s());
  CHECK(peft_test::rel_error(dx, peft_test::add(dx0, direct)) <= tol<T>());
  CHECK(peft_test::exactly_equal(dh, dh0));  // LoRA's term does not depend on h
  CHECK(peft_test::rel_error(f.adapter.grad_A(), want.da) <= tol<T>());
  CHECK(peft_test::rel_error(f.adapter.grad_B(), want.db) <= tol<T>());
  CHECK(peft_test::rel_error(f.adapter.grad_bias(), want.dbias) <= tol<T>());
}

TEMPLATE_TEST_CASE("lora delta_weight is s B A and delta_bias is s b_B", "[lora]", float, double) {
  using T = TestType;
  peft::rng gen(606);
  for (const auto& d : shapes) {
    fixture<T, T> f(d, gen, false, true);
    peft::matrix<T> dw(d.out, d.in, std::numeric_limits<T>::quiet_NaN());  // overwritten
    f.adapter.delta_weight(f.base, dw.view());
    const auto want = peft_test::scaled(peft_test::ref_nn(f.adapter.B(), f.adapter.A()), f.s());
    REQUIRE(peft_test::nontrivial(want));
    CHECK(peft_test::rel_error(dw, want) <= tol<T>());

    std::vector<T> db(static_cast<std::size_t>(d.out), T{0});
    REQUIRE(f.adapter.delta_bias(f.base, db.data()));
    for (ix j = 0; j < d.out; ++j) {
      CHECK(static_cast<double>(db[static_cast<std::size_t>(j)]) ==
            Approx(f.s() * static_cast<double>(f.adapter.bias()(0, j))).epsilon(tol<T>()));
    }
  }
  // Without lora_bias, delta_bias reports false and leaves db alone.
  fixture<T, T> nb({2, 4, 3, 2}, gen, false, false);
  std::vector<T> db(3, T{5});
  CHECK_FALSE(nb.adapter.delta_bias(nb.base, db.data()));
  CHECK(db == std::vector<T>(3, T{5}));
}

TEMPLATE_TEST_CASE("merging into the base equals the unmerged forward; unmerge restores it",
                   "[lora]", f32_on_f32, f32_on_f64, f32_on_bf16, f64_on_f64, f64_on_f32,
                   f64_on_bf16) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  // Merged outputs differ from unmerged ones by the rounding of W0 + dW to S (and of T).
  const double merge_tol = tol<T>() + 4 * unit_roundoff<S>();
  // W0 + dW - dW rounded twice to S: for double storage within 1e-15 relative.
  const double restore_tol = std::is_same_v<S, double> ? 1e-15 : 4 * unit_roundoff<S>();
  peft::rng gen(707);
  for (const dims d : {dims{4, 9, 7, 3}, dims{1, 16, 5, 1}, dims{6, 5, 12, 5}}) {
    for (bool base_bias : {false, true}) {
      for (bool lora_bias : {false, true}) {
        INFO("in " << d.in << " out " << d.out << " rank " << d.rank << " base bias " << base_bias
                   << " lora bias " << lora_bias);
        fixture<T, S> f(d, gen, base_bias, lora_bias);
        require_nontrivial_adapter(f.adapter);
        const auto w_before = peft_test::to_double(f.base.weight());
        const std::vector<double> b_before = f.b0;
        peft::adapted_linear<peft::dense<S>, peft::lora<T>> layer(f.base);
        layer.add_adapter("default", f.adapter);

        peft::matrix<T> y_unmerged(d.batch, d.out), y_merged(d.batch, d.out);
        layer.forward(f.x.view(), y_unmerged.view());
        CHECK(peft_test::rel_error(y_unmerged, f.reference(f.x)) <= tol<T>());

        layer.merge("default");
        CHECK(layer.merged("default"));
        CHECK(layer.base().has_bias() == (base_bias || lora_bias));
        // The merged weight is W0 + s B A.
        const auto dw = peft_test::scaled(peft_test::ref_nn(f.adapter.B(), f.adapter.A()), f.s());
        CHECK(peft_test::rel_error(layer.base().weight(), peft_test::add(w_before, dw)) <=
              tol<T>() + 2 * unit_roundoff<S>());
        layer.forward(f.x.view(), y_merged.view());
        CHECK(peft_test::rel_error(y_merged, y_unmerged) <= merge_tol);

        layer.unmerge("default");
        CHECK_FALSE(layer.merged("default"));
        const auto w_after = peft_test::to_double(layer.base().weight());
        CHECK(peft_test::rel_error(w_after, w_before) <= restore_tol);
        if (base_bias) {
          peft::matrix<double> bb(1, d.out), ba(1, d.out);
          for (ix j = 0; j < d.out; ++j) {
            bb(0, j) = b_before[static_cast<std::size_t>(j)];
            ba(0, j) = peft::convert<double>(layer.base().bias()[static_cast<std::size_t>(j)]);
          }
          CHECK(peft_test::rel_error(ba, bb) <= restore_tol);
        } else if (lora_bias) {
          // The base had no bias: merging gave it one, unmerging leaves it (close to) zero.
          double biggest = 0.0;
          for (const S& v : layer.base().bias()) biggest = std::max(biggest, std::abs(peft::convert<double>(v)));
          CHECK(biggest <= restore_tol * (1.0 + f.s()));
        }
        // Unmerged again: the forward is the adapter's again.
        peft::matrix<T> y_again(d.batch, d.out);
        layer.forward(f.x.view(), y_again.view());
        CHECK(peft_test::rel_error(y_again, y_unmerged) <= merge_tol);
      }
    }
  }
}

TEST_CASE("merge then unmerge on a dense<double> base restores W to the last bits", "[lora]") {
  peft::rng gen(708);
  fixture<double, double> f({3, 40, 30, 4}, gen, true, true);
  const auto w0 = peft_test::to_double(f.base.weight());
  peft::adapted_linear<peft::dense<double>, peft::lora<double>> layer(f.base);
  layer.add_adapter("a", f.adapter);
  layer.merge("a");
  REQUIRE(peft_test::rel_error(layer.base().weight(), w0) > 1e-3);  // the merge changed W
  layer.unmerge("a");
  CHECK(peft_test::rel_error(layer.base().weight(), w0) <= 1e-15);
  // Elementwise: each weight is within a couple of ulps of (|W| + |dW|).
  const auto dw = peft_test::scaled(peft_test::ref_nn(f.adapter.B(), f.adapter.A()), f.s());
  for (ix i = 0; i < 30; ++i) {
    for (ix j = 0; j < 40; ++j) {
      const double bound = 2 * 0x1p-53 * (std::abs(w0(i, j)) + 2 * std::abs(dw(i, j)));
      REQUIRE(std::abs(layer.base().weight()(i, j) - w0(i, j)) <= bound);
    }
  }
}

TEMPLATE_TEST_CASE("PEFT's default and gaussian inits leave the output exactly the base's",
                   "[lora]", f32_on_f32, f32_on_bf16, f64_on_f64, f64_on_f32) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  peft::rng gen(808);
  for (const auto& d : shapes) {
    for (auto init : {peft::lora_init::kaiming_uniform, peft::lora_init::gaussian}) {
      for (bool lora_bias : {false, true}) {
        const auto base = fixture<T, S>::make_base(d, gen, true);
        const auto x = peft_test::random_matrix<T>(d.batch, d.in, gen);
        peft::lora<T> a(d.in, d.out,
                        {.rank = d.rank, .alpha = 16.0, .bias = lora_bias, .init = init, .seed = 9});
        REQUIRE(peft_test::nontrivial(a.A()));
        CHECK(peft_test::count_nonzero(a.B()) == 0);
        peft::matrix<T> y(d.batch, d.out), h(d.batch, d.out);
        typename peft::lora<T>::cache_type cache;
        a.forward(base, x.view(), y.view(), cache);
        base.matmul(x.view(), h.view());
        REQUIRE(peft_test::nontrivial(h));
        CHECK(peft_test::bitwise_equal<T>(y, h));
        // Through the layer as well.
        peft::adapted_linear<peft::dense<S>, peft::lora<T>> layer(base);
        layer.add_adapter("default", a);
        peft::matrix<T> yl(d.batch, d.out);
        layer.forward(x.view(), yl.view());
        CHECK(peft_test::bitwise_equal<T>(yl, h));
      }
    }
  }
  // PEFT's init_lora_weights=False is not a no-op.
  const dims d{3, 8, 5, 2};
  const auto base = fixture<T, S>::make_base(d, gen, false);
  const auto x = peft_test::random_matrix<T>(d.batch, d.in, gen);
  peft::lora<T> a(d.in, d.out, {.rank = 2, .init = peft::lora_init::random});
  peft::matrix<T> y(d.batch, d.out), h(d.batch, d.out);
  typename peft::lora<T>::cache_type cache;
  a.forward(base, x.view(), y.view(), cache);
  base.matmul(x.view(), h.view());
  CHECK(peft_test::rel_error(y, h) > 1e-3);
}

TEMPLATE_TEST_CASE("lora init distributions", "[lora]", float, double) {
  using T = TestType;
  const double slack = std::is_same_v<T, float> ? 1.0 + 1e-6 : 1.0;
  SECTION("kaiming-uniform A is U(-1/sqrt(in), 1/sqrt(in)), B is zero") {
    const ix in = 300, out = 20, r = 16;
    peft::lora<T> a(in, out, {.rank = r, .seed = 1});
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    REQUIRE(peft_test::nontrivial(a.A()));
    CHECK(peft_test::max_abs(a.A()) <= bound * slack);
    CHECK(peft_test::max_abs(a.A()) > 0.95 * bound);  // the range is used
    const auto m = peft_test::moments_of(a.A());
    CHECK(std::abs(m.mean) < 5 * bound / std::sqrt(3 * m.n));
    CHECK(m.mean_square == Approx(bound * bound / 3).epsilon(0.1));
    CHECK(peft_test::count_nonzero(a.B()) == 0);
    CHECK(a.B().rows() == out);
    CHECK(a.B().cols() == r);
  }
  SECTION("gaussian A has std 1/r, B is zero") {
    const ix in = 512, out = 10, r = 8;
    peft::lora<T> a(in, out, {.rank = r, .init = peft::lora_init::gaussian, .seed = 2});
    REQUIRE(peft_test::nontrivial(a.A()));
    const auto m = peft_test::moments_of(a.A());
    const double sd = std::sqrt(m.mean_square - m.mean * m.mean);
    CHECK(sd == Approx(1.0 / r).epsilon(0.05));
    CHECK(std::abs(m.mean) < 5.0 / r / std::sqrt(m.n));
    CHECK(peft_test::max_abs(a.A()) > 2.5 / r);  // Gaussian tails, not a bounded uniform
    CHECK(peft_test::count_nonzero(a.B()) == 0);
  }
  SECTION("random init: B is U(-1/sqrt(r), 1/sqrt(r))") {
    const ix in = 16, out = 400, r = 9;
    peft::lora<T> a(in, out, {.rank = r, .init = peft::lora_init::random, .seed = 3});
    REQUIRE(peft_test::nontrivial(a.B()));
    const double bound = 1.0 / 3.0;
    CHECK(peft_test::max_abs(a.B()) <= bound * slack);
    CHECK(peft_test::max_abs(a.B()) > 0.95 * bound);
    CHECK(peft_test::max_abs(a.A()) <= 0.25 * slack);
    CHECK(peft_test::moments_of(a.B()).mean_square == Approx(bound * bound / 3).epsilon(0.1));
  }
  SECTION("the seed decides A (and B)") {
    for (auto init : {peft::lora_init::kaiming_uniform, peft::lora_init::gaussian,
                      peft::lora_init::random}) {
      peft::lora<T> a(20, 12, {.rank = 4, .init = init, .seed = 77});
      peft::lora<T> b(20, 12, {.rank = 4, .init = init, .seed = 77});
      peft::lora<T> c(20, 12, {.rank = 4, .init = init, .seed = 78});
      CHECK(peft_test::exactly_equal(a.A(), b.A()));
      CHECK(peft_test::exactly_equal(a.B(), b.B()));
      CHECK(peft_test::rel_error(a.A(), c.A()) > 0.1);
      if (init == peft::lora_init::random) CHECK(peft_test::rel_error(a.B(), c.B()) > 0.1);
    }
    // The default seed is fixed too.
    peft::lora<T> d1(20, 12, {.rank = 4});
    peft::lora<T> d2(20, 12, {.rank = 4});
    CHECK(peft_test::exactly_equal(d1.A(), d2.A()));
  }
}

TEMPLATE_TEST_CASE("lora scale: alpha/r, rsLoRA alpha/sqrt(r), set_scale is linear", "[lora]",
                   f32_on_f32, f64_on_f64, f64_on_bf16) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  CHECK(peft::lora_scale(32.0, 16, false) == 2.0);
  CHECK(peft::lora_scale(32.0, 16, true) == 8.0);
  CHECK(peft::lora_scale(8.0, 3, true) == Approx(8.0 / std::sqrt(3.0)).epsilon(1e-15));
  for (ix r : {1, 3, 16}) {
    peft::lora<T> plain(5, 4, {.rank = r, .alpha = 12.0});
    peft::lora<T> rs(5, 4, {.rank = r, .alpha = 12.0, .use_rslora = true});
    CHECK(static_cast<double>(plain.scale()) ==
          Approx(12.0 / static_cast<double>(r)).epsilon(tol<T>()));
    CHECK(static_cast<double>(rs.scale()) ==
          Approx(12.0 / std::sqrt(static_cast<double>(r))).epsilon(tol<T>()));
  }

  peft::rng gen(909);
  const dims d{4, 12, 9, 4};
  // rsLoRA and plain adapters with the same seed differ only in scale: the terms differ by sqrt(r).
  fixture<T, S> plain(d, gen, true, true, 8.0, false);
  peft::rng gen_copy(909);
  fixture<T, S> rs(d, gen_copy, true, true, 8.0, true);
  REQUIRE(peft_test::exactly_equal(plain.adapter.A(), rs.adapter.A()));
  REQUIRE(peft_test::exactly_equal(plain.x, rs.x));
  peft::matrix<T> h(d.batch, d.out);
  plain.base.template matmul<T>(plain.x.view(), h.view());
  const auto term_plain = peft_test::add(plain.forward(plain.x), h, -1.0);
  const auto term_rs = peft_test::add(rs.forward(rs.x), h, -1.0);
  REQUIRE(peft_test::nontrivial(term_plain));
  CHECK(peft_test::rel_error(term_rs, peft_test::scaled(term_plain, 2.0)) <= 100 * tol<T>());

  // set_scale: y - h scales linearly with s; forward matches the reference at each scale.
  fixture<T, S> f(d, gen, true, true);
  const auto term1 = peft_test::add(f.forward(f.x), peft_test::ref_linear(f.x, f.w, f.b0), -1.0);
  const double s1 = f.s();
  for (double s2 : {0.0, 0.5, -3.0, 7.25}) {
    f.adapter.set_scale(static_cast<T>(s2));
    CHECK(static_cast<double>(f.adapter.scale()) == s2);
    const auto y2 = f.forward(f.x);
    CHECK(peft_test::rel_error(y2, f.reference(f.x)) <= tol<T>());
    const auto term2 = peft_test::add(y2, peft_test::ref_linear(f.x, f.w, f.b0), -1.0);
    if (s2 == 0.0) {
      CHECK(peft_test::max_abs(term2) <= 10 * tol<T>() * peft_test::max_abs(y2));
    } else {
      CHECK(peft_test::rel_error(term2, peft_test::scaled(term1, s2 / s1)) <= 1000 * tol<T>());
    }
  }
}

TEST_CASE("lora from existing factors", "[lora]") {
  peft::rng gen(111);
  const auto a = peft_test::random_matrix<double>(3, 6, gen);
  const auto b = peft_test::random_matrix<double>(4, 3, gen);
  const auto bias = peft_test::random_vector<double>(4, gen);
  peft::lora<double> l(a, b, 0.75, bias);
  CHECK(l.rank() == 3);
  CHECK(l.in_features() == 6);
  CHECK(l.out_features() == 4);
  CHECK(l.scale() == 0.75);
  CHECK(l.has_bias());
  CHECK(peft_test::exactly_equal(l.A(), a));
  CHECK(peft_test::exactly_equal(l.B(), b));
  const auto base = peft::dense<double>(peft_test::random_matrix<double>(4, 6, gen));
  const auto x = peft_test::random_matrix<double>(2, 6, gen);
  peft::matrix<double> y(2, 4);
  peft::lora<double>::cache_type cache;
  l.forward(base, x.view(), y.view(), cache);
  peft::matrix<double> bias_row(1, 4, bias);
  const auto ref = peft_test::add(peft_test::ref_linear(x, base.weight(), std::vector<double>{}),
                                  peft_test::ref_lora_term(x, a, b, bias_row, 0.75));
  CHECK(peft_test::rel_error(y, ref) <= 1e-14);
}

TEST_CASE("lora parameters are named views of its tensors", "[lora]") {
  peft::lora<float> l(6, 5, {.rank = 2, .bias = true});
  auto params = l.parameters();
  REQUIRE(params.size() == 3);
  CHECK(params[0].name == "lora_A.weight");
  CHECK(params[0].shape == std::vector<std::int64_t>{2, 6});
  CHECK(params[0].value.data() == l.A().data());
  CHECK(params[0].grad.data() == l.grad_A().data());
  CHECK(params[1].name == "lora_B.weight");
  CHECK(params[1].shape == std::vector<std::int64_t>{5, 2});
  CHECK(params[1].value.data() == l.B().data());
  CHECK(params[2].name == "lora_B.bias");
  CHECK(params[2].shape == std::vector<std::int64_t>{5});
  CHECK(params[2].value.data() == l.bias().data());
  for (const auto& p : params) {
    CHECK(p.trainable);
    CHECK_FALSE(p.shared);
    CHECK(p.grad.rows() == p.value.rows());
    CHECK(p.grad.cols() == p.value.cols());
  }
  params[1].value(4, 1) = 2.5f;  // writes through
  CHECK(l.B()(4, 1) == 2.5f);
  CHECK(peft::lora<float>(6, 5, {.rank = 2}).parameters().size() == 2);
}

TEMPLATE_TEST_CASE("lora shape errors name the function", "[lora]", float, double) {
  using T = TestType;
  peft::rng gen(121);
  const auto base = peft::dense<T>(peft_test::random_matrix<T>(5, 7, gen));
  peft::lora<T> a(7, 5, {.rank = 3});
  using peft_test::arg;
  using peft_test::pass;
  const auto named = peft_test::match::shape_error_prefix;
  peft_test::check_shape_errors(a, base, 2,
                                {{pass::forward, arg::x, 2, 6, "[lora::forward]", named},
                                 {pass::forward, arg::y, 3, 5, "[lora::forward]", named},
                                 {pass::forward, arg::base, 5, 8, "[lora::forward]", named},
                                 {pass::add_term, arg::x, 2, 6, "[lora::add_term]", named},
                                 {pass::add_term, arg::base, 5, 8, "[lora::add_term]", named},
                                 {pass::backward, arg::dy, 2, 4, "[lora::backward]", named},
                                 {pass::backward, arg::dx, 2, 6, "[lora::backward]", named},
                                 {pass::backward, arg::base, 5, 8, "[lora::backward]", named},
                                 {pass::backward_term, arg::dx, 2, 6, "[lora::backward_term]", named},
                                 {pass::delta_weight, arg::dw, 7, 5, "[lora::delta_weight]", named},
                                 {pass::delta_weight, arg::base, 5, 8, "[lora::delta_weight]", named}});

  check_shape_error([] { peft::lora<T>(7, 5, {.rank = 0}); }, "[lora::lora]");
  check_shape_error([] { peft::lora<T>(7, 5, {.rank = -2}); }, "[lora::lora]");
  check_shape_error([] { peft::lora<T>(0, 5, {.rank = 2}); }, "[lora::lora]");
  check_shape_error([] { peft::lora<T>(7, 0, {.rank = 2}); }, "[lora::lora]");
  check_shape_error([] { peft::lora<T>(peft::matrix<T>(3, 7), peft::matrix<T>(5, 2), T{1}); },
                    "[lora::lora]");
  check_shape_error([] { peft::lora<T>(peft::matrix<T>(0, 7), peft::matrix<T>(5, 0), T{1}); },
                    "[lora::lora]");
  check_shape_error(
      [] { peft::lora<T>(peft::matrix<T>(3, 7), peft::matrix<T>(5, 3), T{1}, std::vector<T>(4)); },
      "[lora::lora]");
  // Nothing was computed into the gradients by the failed calls.
  CHECK(peft_test::max_abs(a.grad_A()) == 0.0);
  CHECK(peft_test::max_abs(a.grad_B()) == 0.0);
}

}  // namespace test_lora
