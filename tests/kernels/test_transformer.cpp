// The row-wise transformer kernels (kernels/transformer.hpp) against their reference twin
// (kernels/reference/transformer.hpp), and the twin's backward passes against central finite
// differences in double: RMSNorm (with the fused residual addition and residual gradient),
// LayerNorm, the gated and plain activations of every kind, the cross-entropy with skipped rows.
// Sizes leave tails after whole vectors and are large enough to be split over threads; float runs
// on every ISA this CPU has, double must equal the twin.
#include <cmath>
#include <cstddef>
#include <functional>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/core/random.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/reference/transformer.hpp"
#include "peft/kernels/transformer.hpp"

namespace test_transformer {

using ix = peft::index;
namespace kernels = peft::kernels;
namespace ref = peft::kernels::reference;
using peft::activation;

namespace {

constexpr activation all_activations[] = {activation::silu, activation::gelu, activation::gelu_tanh, activation::relu};

template <class T>
std::vector<T> normal(std::size_t n, peft::rng& gen, double scale = 1.0) {
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(scale * gen.normal());
  return v;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (const double x : v) m = std::max(m, std::abs(x));
  return m;
}

/// Central differences of f at x against g, relative to the largest |g|.
void check_gradient(std::vector<double> x, const std::function<double(const std::vector<double>&)>& f,
                    const std::vector<double>& g, double tol = 1e-7) {
  REQUIRE(max_abs(g) > 1e-3);
  const double h = 1e-5;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double up = f(x);
    x[i] = keep - h;
    const double down = f(x);
    x[i] = keep;
    INFO("coordinate " << i);
    CHECK(std::abs((up - down) / (2 * h) - g[i]) <= tol * max_abs(g));
  }
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

/// Largest |a - b| relative to the largest |b| (which must not be trivially small).
template <class T>
double relative_error(const std::vector<T>& a, const std::vector<T>& b) {
  double m = 0, e = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::abs(static_cast<double>(b[i])));
    e = std::max(e, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  }
  REQUIRE(m > 1e-3);
  return e / m;
}

}  // namespace

TEST_CASE("reference RMSNorm backward equals finite differences", "[kernels][transformer]") {
  peft::rng gen(11);
  const ix rows = 3, n = 7;
  const auto x = normal<double>(rows * n, gen), w = normal<double>(n, gen), c = normal<double>(rows * n, gen);
  const auto dres = normal<double>(rows * n, gen);
  auto loss = [&](const std::vector<double>& xv, const std::vector<double>& wv) {
    std::vector<double> y(xv.size()), inv(rows);
    ref::rms_norm(xv.data(), wv.data(), rows, n, 1e-6, y.data(), inv.data());
    return dot(c, y) + dot(dres, xv);  // the residual branch: its gradient is dres
  };
  std::vector<double> y(x.size()), inv(rows), dx(x.size()), dw(n, 0.0);
  ref::rms_norm(x.data(), w.data(), rows, n, 1e-6, y.data(), inv.data());
  ref::rms_norm_backward(x.data(), w.data(), inv.data(), rows, n, c.data(), dx.data(), dw.data(), dres.data());
  check_gradient(x, [&](const std::vector<double>& v) { return loss(v, w); }, dx);
  check_gradient(w, [&](const std::vector<double>& v) { return loss(x, v); }, dw);
}

TEST_CASE("reference LayerNorm backward equals finite differences", "[kernels][transformer]") {
  peft::rng gen(12);
  const ix rows = 3, n = 6;
  const auto x = normal<double>(rows * n, gen), w = normal<double>(n, gen), b = normal<double>(n, gen);
  const auto c = normal<double>(rows * n, gen), dres = normal<double>(rows * n, gen);
  auto loss = [&](const std::vector<double>& xv, const std::vector<double>& wv, const std::vector<double>& bv) {
    std::vector<double> y(xv.size()), st(2 * rows);
    ref::layer_norm(xv.data(), wv.data(), bv.data(), rows, n, 1e-5, y.data(), st.data());
    return dot(c, y) + dot(dres, xv);
  };
  std::vector<double> y(x.size()), st(2 * rows), dx(x.size()), dw(n, 0.0), db(n, 0.0);
  ref::layer_norm(x.data(), w.data(), b.data(), rows, n, 1e-5, y.data(), st.data());
  ref::layer_norm_backward(x.data(), w.data(), st.data(), rows, n, c.data(), dx.data(), dw.data(), db.data(),
                           dres.data());
  check_gradient(x, [&](const std::vector<double>& v) { return loss(v, w, b); }, dx);
  check_gradient(w, [&](const std::vector<double>& v) { return loss(x, v, b); }, dw);
  check_gradient(b, [&](const std::vector<double>& v) { return loss(x, w, v); }, db);
}

TEST_CASE("reference gated activations' backward equals finite differences", "[kernels][transformer]") {
  peft::rng gen(13);
  const ix count = 12;
  auto g = normal<double>(count, gen, 2.0);
  for (auto& v : g) {
    if (std::abs(v) < 0.05) v = 0.3;  // relu's kink
  }
  const auto u = normal<double>(count, gen), c = normal<double>(count, gen);
  for (const activation act : all_activations) {
    INFO("activation " << static_cast<int>(act));
    for (const bool gated : {true, false}) {
      auto loss = [&](const std::vector<double>& gv, const std::vector<double>& uv) {
        std::vector<double> a(count);
        ref::gated_activation(act, gv.data(), gated ? uv.data() : nullptr, count, a.data());
        return dot(c, a);
      };
      std::vector<double> dg(count), du(count);
      ref::gated_activation_backward(act, g.data(), gated ? u.data() : nullptr, c.data(), count, dg.data(),
                                     gated ? du.data() : nullptr);
      check_gradient(g, [&](const std::vector<double>& v) { return loss(v, u); }, dg);
      if (gated) check_gradient(u, [&](const std::vector<double>& v) { return loss(g, v); }, du);
    }
  }
}

TEST_CASE("reference cross-entropy gradient equals finite differences", "[kernels][transformer]") {
  peft::rng gen(14);
  const ix rows = 3, v = 9;
  const auto z = normal<double>(rows * v, gen, 3.0);
  const std::vector<long long> target = {4, -1, 0};
  const double scale = 0.5;
  auto loss = [&](const std::vector<double>& zv) {
    return scale * ref::cross_entropy(zv.data(), rows, v, v, target.data(), 1.0, static_cast<double*>(nullptr), v);
  };
  std::vector<double> d(z.size(), 0.0);
  const double total = ref::cross_entropy(z.data(), rows, v, v, target.data(), scale, d.data(), v);
  // Rows 0 and 2 by hand: log sum exp - z[t].
  double expect = 0;
  for (const ix r : {ix{0}, ix{2}}) {
    double s = 0;
    for (ix j = 0; j < v; ++j) s += std::exp(z[static_cast<std::size_t>(r * v + j)]);
    expect += std::log(s) - z[static_cast<std::size_t>(r * v + target[static_cast<std::size_t>(r)])];
  }
  CHECK(total == Approx(expect).epsilon(1e-13));
  check_gradient(z, loss, d);
  for (ix j = 0; j < v; ++j) CHECK(d[static_cast<std::size_t>(v + j)] == 0.0);  // the skipped row
}

namespace {

/// Every kernel of kernels/transformer.hpp against the twin on one set of inputs; `tol` bounds
/// the relative error (0 for double: the same loops).
template <class T>
void compare_with_reference(double tol) {
  peft::rng gen(21);
  for (const ix n : {ix{37}, ix{517}}) {
    const ix rows = 300;  // rows * n large enough to be split over threads at n = 517
    INFO("n " << n);
    const auto sz = static_cast<std::size_t>(rows * n);
    const auto x = normal<T>(sz, gen), a = normal<T>(sz, gen), w = normal<T>(static_cast<std::size_t>(n), gen);
    const auto b = normal<T>(static_cast<std::size_t>(n), gen), dy = normal<T>(sz, gen), dres = normal<T>(sz, gen);
    // RMSNorm, and the residual addition fused with it
    std::vector<T> y(sz), inv(static_cast<std::size_t>(rows)), ry(sz), rinv(static_cast<std::size_t>(rows));
    kernels::rms_norm(x.data(), w.data(), rows, n, 1e-6, y.data(), inv.data());
    ref::rms_norm(x.data(), w.data(), rows, n, 1e-6, ry.data(), rinv.data());
    CHECK(relative_error(y, ry) <= tol);
    CHECK(relative_error(inv, rinv) <= tol);
    std::vector<T> h(sz), hy(sz), hinv(static_cast<std::size_t>(rows)), rh(sz);
    kernels::add_rms_norm(x.data(), a.data(), w.data(), rows, n, 1e-6, h.data(), hy.data(), hinv.data());
    for (std::size_t i = 0; i < sz; ++i) rh[i] = x[i] + a[i];
    ref::rms_norm(rh.data(), w.data(), rows, n, 1e-6, ry.data(), rinv.data());
    CHECK(h == rh);
    CHECK(relative_error(hy, ry) <= tol);
    CHECK(relative_error(hinv, rinv) <= tol);
    // its backward, with and without the residual gradient, and with the weight's gradient
    for (const bool with_res : {false, true}) {
      std::vector<T> dx(sz), rdx(sz);
      const T* dr = with_res ? dres.data() : nullptr;
      kernels::rms_norm_backward(x.data(), w.data(), rinv.data(), rows, n, dy.data(), dx.data(), static_cast<T*>(nullptr), dr);
      ref::rms_norm_backward(x.data(), w.data(), rinv.data(), rows, n, dy.data(), rdx.data(), static_cast<T*>(nullptr), dr);
      CHECK(relative_error(dx, rdx) <= tol);
    }
    std::vector<T> dx(sz), rdx(sz), dw(static_cast<std::size_t>(n), T{0}), rdw(dw);
    kernels::rms_norm_backward(x.data(), w.data(), rinv.data(), rows, n, dy.data(), dx.data(), dw.data());
    ref::rms_norm_backward(x.data(), w.data(), rinv.data(), rows, n, dy.data(), rdx.data(), rdw.data());
    CHECK(relative_error(dx, rdx) <= tol);
    CHECK(relative_error(dw, rdw) <= tol);
    // LayerNorm and its backward
    std::vector<T> st(static_cast<std::size_t>(2 * rows)), rst(st);
    kernels::layer_norm(x.data(), w.data(), b.data(), rows, n, 1e-5, y.data(), st.data());
    ref::layer_norm(x.data(), w.data(), b.data(), rows, n, 1e-5, ry.data(), rst.data());
    CHECK(relative_error(y, ry) <= tol);
    kernels::layer_norm_backward(x.data(), w.data(), rst.data(), rows, n, dy.data(), dx.data(), static_cast<T*>(nullptr),
                                 static_cast<T*>(nullptr), dres.data());
    ref::layer_norm_backward(x.data(), w.data(), rst.data(), rows, n, dy.data(), rdx.data(), static_cast<T*>(nullptr),
                             static_cast<T*>(nullptr), dres.data());
    CHECK(relative_error(dx, rdx) <= tol);
    // activations, gated and plain, forward and backward
    for (const activation act : all_activations) {
      INFO("activation " << static_cast<int>(act));
      for (const bool gated : {true, false}) {
        const T* u = gated ? a.data() : nullptr;
        std::vector<T> out(sz), rout(sz), dg(sz), rdg(sz), du(sz), rdu(sz);
        kernels::gated_activation(act, x.data(), u, rows * n, out.data());
        ref::gated_activation(act, x.data(), u, rows * n, rout.data());
        CHECK(relative_error(out, rout) <= tol);
        kernels::gated_activation_backward(act, x.data(), u, dy.data(), rows * n, dg.data(), gated ? du.data() : nullptr);
        ref::gated_activation_backward(act, x.data(), u, dy.data(), rows * n, rdg.data(), gated ? rdu.data() : nullptr);
        CHECK(relative_error(dg, rdg) <= tol);
        if (gated) CHECK(relative_error(du, rdu) <= tol);
      }
    }
    // cross-entropy over logits with a wide range, every fifth row skipped (its gradient row
    // keeps what was there), rows ld apart
    const ix ld = n + 3;
    const auto z = normal<T>(static_cast<std::size_t>(rows * ld), gen, 4.0);
    std::vector<long long> target(static_cast<std::size_t>(rows));
    for (ix r = 0; r < rows; ++r) target[static_cast<std::size_t>(r)] = r % 5 == 2 ? -1 : (r * 7) % n;
    std::vector<T> d(static_cast<std::size_t>(rows * ld), T{7}), rd(d);
    const double loss = kernels::cross_entropy(z.data(), rows, n, ld, target.data(), 0.25, d.data(), ld);
    const double rloss = ref::cross_entropy(z.data(), rows, n, ld, target.data(), 0.25, rd.data(), ld);
    REQUIRE(rloss > 1.0);
    CHECK(std::abs(loss - rloss) <= std::max(tol, 1e-15) * rloss);
    CHECK(relative_error(d, rd) <= tol);
    CHECK(d[static_cast<std::size_t>(2 * ld)] == T{7});
    const double plain = kernels::cross_entropy(z.data(), rows, n, ld, target.data(), 0.25, static_cast<T*>(nullptr), ld);
    CHECK(plain == loss);
  }
}

}  // namespace

TEST_CASE("transformer kernels: double equals the reference", "[kernels][transformer]") {
  compare_with_reference<double>(0.0);
}

TEST_CASE("transformer kernels: float equals the reference on every ISA", "[kernels][transformer]") {
  for (auto version : kernels::all_isas) {
    if (!kernels::isa_supported(version)) continue;
    INFO("isa " << kernels::isa_name(version));
    kernels::scoped_isa guard(version);
    compare_with_reference<float>(2e-6);
  }
}

TEST_CASE("cross-entropy of non-finite logits is not finite", "[kernels][transformer]") {
  for (auto version : {kernels::isa::reference, kernels::isa::portable}) {
    kernels::scoped_isa guard(version);
    std::vector<float> z = {0.5f, std::nanf(""), 1.0f, -2.0f, 0.1f, 0.2f, 0.3f, 0.4f, 0.6f};
    const long long t = 0;
    CHECK_FALSE(std::isfinite(kernels::cross_entropy(z.data(), 1, 9, 9, &t, 1.0, static_cast<float*>(nullptr), 9)));
    z[1] = std::numeric_limits<float>::infinity();
    CHECK_FALSE(std::isfinite(kernels::cross_entropy(z.data(), 1, 9, 9, &t, 1.0, static_cast<float*>(nullptr), 9)));
  }
}

}  // namespace test_transformer
