// HRA: parity with HuggingFace PEFT 0.21 (tests/data/peft/hra: a chain of r = 6 Householder
// reflections; hra_gs: r = 5 with apply_GS), R against the explicit product of reflections, the
// passes against a materialised delta over dense and int8 bases, PEFT's init, the multiplicative
// merge and its inverse, saving and loading, errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/hra.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/io/peft/hra.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_hra {

using ix = peft::index;

namespace {

using peft_test::rel_error;
using peft_test::tolerance;

/// R in double, straight from PEFT's definition: H_1 ... H_r (Householder), or I - 2 Q Q^T with
/// Q from classical Gram-Schmidt (apply_GS).
template <class T>
peft::matrix<double> reference_rotation(const peft::hra<T>& a) {
  const ix n = a.in_features(), r = a.rank();
  const auto u = a.u();
  std::vector<std::vector<double>> cols(static_cast<std::size_t>(r), std::vector<double>(static_cast<std::size_t>(n)));
  for (ix j = 0; j < r; ++j) {
    auto& c = cols[static_cast<std::size_t>(j)];
    for (ix i = 0; i < n; ++i) c[static_cast<std::size_t>(i)] = static_cast<double>(u(i, j));
    if (a.apply_gs()) {
      for (ix k = 0; k < j; ++k) {
        const auto& q = cols[static_cast<std::size_t>(k)];
        double d = 0;
        for (ix i = 0; i < n; ++i) d += q[static_cast<std::size_t>(i)] * static_cast<double>(u(i, j));
        for (ix i = 0; i < n; ++i) c[static_cast<std::size_t>(i)] -= d * q[static_cast<std::size_t>(i)];
      }
    }
    double s = 0;
    for (const double v : c) s += v * v;
    for (double& v : c) v /= std::sqrt(s);
  }
  peft::matrix<double> rot(n, n);
  for (ix i = 0; i < n; ++i) rot(i, i) = 1.0;
  if (a.apply_gs()) {
    for (const auto& q : cols)
      for (ix i = 0; i < n; ++i)
        for (ix k = 0; k < n; ++k) rot(i, k) -= 2.0 * q[static_cast<std::size_t>(i)] * q[static_cast<std::size_t>(k)];
    return rot;
  }
  for (const auto& v : cols) {  // rot <- rot (I - 2 v v^T)
    for (ix i = 0; i < n; ++i) {
      double d = 0;
      for (ix k = 0; k < n; ++k) d += rot(i, k) * v[static_cast<std::size_t>(k)];
      for (ix k = 0; k < n; ++k) rot(i, k) -= 2.0 * d * v[static_cast<std::size_t>(k)];
    }
  }
  return rot;
}

/// W0 (R - I) in double.
template <class T, class S>
peft::matrix<double> reference_delta(const peft::hra<T>& a, const peft::dense<S>& w) {
  const auto rot = reference_rotation(a);
  auto d = peft_test::ref_nn(w.weight(), rot);
  return peft_test::add(d, w.weight(), -1.0);
}

peft::io::adapter_config hra_config(ix r, bool gs) {
  auto c = peft_test::config_of("HRA");
  c.r = r;
  c.raw["r"] = r;
  c.raw["apply_GS"] = gs;
  return c;
}

}  // namespace

TEMPLATE_TEST_CASE("hra reproduces PEFT: layers, network, merged weights (Householder chain)", "[hra][golden]", float,
                   double) {
  peft_test::check_golden<peft::hra<TestType>>("hra");
}

TEMPLATE_TEST_CASE("hra reproduces PEFT: layers, network, merged weights (apply_GS)", "[hra][golden]", float, double) {
  peft_test::check_golden<peft::hra<TestType>>("hra_gs");
}

TEST_CASE("hra golden checkpoints: r, apply_GS and the layer's shape", "[hra][golden]") {
  for (const std::string name : {"hra", "hra_gs"}) {
    INFO("case " << name);
    const auto base = peft::io::safetensors_file::open(peft_test::golden_dir(name) / "base_model.safetensors");
    auto ck = peft_test::load_bound<peft::hra<double>>(peft_test::golden_dir(name) / "adapter", base);
    const auto& up = ck.find("up.weight")->adapter;
    const auto& down = ck.find("down.weight")->adapter;
    CHECK(up.rank() == (name == "hra" ? 6 : 5));
    CHECK(up.apply_gs() == (name == "hra_gs"));
    CHECK(up.in_features() == 64);
    CHECK(up.out_features() == 96);
    CHECK(down.in_features() == 96);
    CHECK(down.out_features() == 48);
    REQUIRE(peft_test::nontrivial(up.u()));
    // R is orthogonal and is PEFT's product of reflections.
    const auto rot = up.rotation();
    CHECK(rel_error(rot, reference_rotation(up)) < 1e-13);
    peft::matrix<double> eye(64, 64);
    for (ix i = 0; i < 64; ++i) eye(i, i) = 1.0;
    CHECK(rel_error(peft_test::ref_tn(rot, rot), eye) < 1e-14);
  }
}

TEST_CASE("hra save and load: identical tensors and config fields", "[hra][golden][io]") {
  for (const std::string name : {"hra", "hra_gs"}) {
    INFO("case " << name);
    auto ck = peft::io::load_checkpoint_as<peft::hra<double>>(peft_test::golden_dir(name) / "adapter");
    auto back = peft_test::save_and_load(ck, "peft_hra_roundtrip_" + name);
    CHECK(back.config.peft_type == "HRA");
    CHECK(back.config.raw["r"] == ck.config.raw["r"]);
    CHECK(back.config.raw["apply_GS"] == ck.config.raw["apply_GS"]);
    CHECK(back.config.raw["init_weights"] == true);
    REQUIRE(back.modules.size() == ck.modules.size());
    for (auto& m : ck.modules) {
      auto& b = back.find(m.weight_name)->adapter;
      CHECK(b.apply_gs() == m.adapter.apply_gs());
      CHECK(peft_test::exactly_equal(b.u(), m.adapter.u()));  // f32 values, saved as f32
    }
  }
}

TEMPLATE_TEST_CASE("hra passes against the materialised delta W0 (R - I), both forms", "[hra]", float, double) {
  using T = TestType;
  peft::rng g(7);
  for (const bool gs : {false, true}) {
    for (const auto& [in, out, r] : {std::tuple<ix, ix, ix>{9, 6, 4}, {16, 5, 7}, {3, 8, gs ? 3 : 6}}) {
      INFO("gs " << gs << " in " << in << " out " << out << " r " << r);
      peft::hra<T> a(in, out, {.rank = r, .apply_gs = gs, .init = peft::hra_init::random, .seed = g.next()});
      const auto w = peft_test::random_dense<T>(in, out, g);
      const auto x = peft_test::random_matrix<T>(4, in, g);
      const auto gy = peft_test::random_matrix<T>(4, out, g);
      REQUIRE(peft_test::nontrivial(x));
      const auto dW = reference_delta(a, w);
      REQUIRE(peft_test::frobenius(dW) > 0.1 * peft_test::frobenius(w.weight()));
      peft_test::check_against_delta(a, w, x, gy, dW, tolerance<T>());
    }
  }
}

TEST_CASE("hra over an int8 base: the base is read through its own product, never dequantized whole", "[hra]") {
  peft::rng g(11);
  const ix in = 40, out = 24;
  const auto wf = peft_test::random_matrix<float>(out, in, g);
  const auto bias = peft_test::random_vector<float>(out, g);
  const auto q = peft::int8_rowwise::quantize(peft::matrix_view<const float>(wf.view()), bias.data());
  // The dense double twin of the quantized weight.
  peft::matrix<double> wq(out, in);
  for (ix i = 0; i < out; ++i) q.dequantize_row(i, wq.row(i));
  std::vector<double> bq(static_cast<std::size_t>(out));
  for (ix j = 0; j < out; ++j) bq[static_cast<std::size_t>(j)] = q.bias_value<double>(j);
  const peft::dense<double> twin(wq, bq);
  for (const bool gs : {false, true}) {
    peft::hra<double> a(in, out, {.rank = 6, .apply_gs = gs, .init = peft::hra_init::random, .seed = 3});
    const auto x = peft_test::random_matrix<double>(3, in, g);
    const auto gy = peft_test::random_matrix<double>(3, out, g);
    peft::hra<double> b = a;
    typename peft::hra<double>::cache_type ca, cb;
    peft::matrix<double> ya(3, out), yb(3, out), dxa(3, in), dxb(3, in), dwa(out, in), dwb(out, in);
    a.forward(q, x.view(), ya.view(), ca);
    b.forward(twin, x.view(), yb.view(), cb);
    CHECK(rel_error(ya, yb) < 1e-6);  // the int8 kernel rounds its input
    a.backward(q, x.view(), gy.view(), dxa.view(), ca);
    b.backward(twin, x.view(), gy.view(), dxb.view(), cb);
    CHECK(rel_error(dxa, dxb) < 1e-12);
    CHECK(rel_error(a.grad_u(), b.grad_u()) < 1e-12);
    a.delta_weight(q, dwa.view());
    b.delta_weight(twin, dwb.view());
    CHECK(rel_error(dwa, dwb) < 1e-14);
  }
}

TEST_CASE("hra init: PEFT's symmetric pairs make R = I exactly; odd r and init_weights=false do not", "[hra]") {
  peft::rng g(5);
  const peft::hra<double> sym(12, 7, {.rank = 6, .seed = 9});
  for (ix j = 0; j < 6; j += 2) {
    for (ix i = 0; i < 12; ++i) CHECK(sym.u()(i, j) == sym.u()(i, j + 1));
  }
  // kaiming-uniform on the (in, r / 2) half: |u| < 1 / sqrt(3), every value used once per pair.
  CHECK(peft_test::max_abs(sym.u()) < 1.0 / std::sqrt(3.0));
  CHECK(peft_test::max_abs(sym.u()) > 0.8 / std::sqrt(3.0));
  peft::hra<double> fresh = sym;
  peft_test::check_identity_at_init(fresh, 3, g);
  CHECK(peft_test::nontrivial(fresh.grad_u()));  // training moves it off the identity
  const auto w = peft_test::random_dense<double>(12, 7, g);
  peft::matrix<double> dw(7, 12);
  sym.delta_weight(w, dw.view());
  CHECK(peft_test::max_abs(dw) == 0.0);

  // Odd r: PEFT warns and draws every column (not the identity); init_weights=false likewise.
  const auto x = peft_test::random_matrix<double>(2, 12, g);
  const peft::hra<double> odd(12, 7, {.rank = 5, .seed = 9});
  peft_test::check_not_base(odd, w, x, 1e-3);
  const peft::hra<double> rnd(12, 7, {.rank = 6, .init = peft::hra_init::random, .seed = 9});
  peft_test::check_not_base(rnd, w, x, 1e-3);
  CHECK(peft_test::max_abs(rnd.u()) < 1.0 / std::sqrt(6.0));
  // Gram-Schmidt cannot take PEFT's symmetric init (equal columns); random or odd r works.
  peft_test::check_error<peft::error>([] { peft::hra<double>(12, 7, {.rank = 4, .apply_gs = true}); }, "[hra::hra]");
  CHECK_NOTHROW(peft::hra<double>(12, 7, {.rank = 3, .apply_gs = true}));
}

TEST_CASE("hra merge and unmerge: W0 R in place, recovered exactly from the merged weight", "[hra]") {
  peft::rng g(13);
  for (const bool gs : {false, true}) {
    const auto w = peft_test::random_dense<double>(10, 6, g);
    peft::hra<double> a(10, 6, {.rank = 4, .apply_gs = gs, .init = peft::hra_init::random, .seed = 4});
    peft::adapted_linear<peft::dense<double>, peft::hra<double>> layer(w);
    layer.add_adapter("a", a);
    const auto x = peft_test::random_matrix<double>(3, 10, g);
    peft::matrix<double> before(3, 6), after(3, 6);
    layer.forward(x.view(), before.view());
    layer.merge("a");
    CHECK(rel_error(layer.base().weight(), peft_test::ref_nn(w.weight(), reference_rotation(a))) < 1e-14);
    layer.forward(x.view(), after.view());
    CHECK(rel_error(after, before) < 1e-14);
    // unmerge_delta reads the merged weight: W' - W' R^T.
    peft::matrix<double> d(6, 10);
    a.unmerge_delta(layer.base(), d.view());
    CHECK(rel_error(peft_test::add(layer.base().weight(), d, -1.0), w.weight()) < 1e-14);
    layer.unmerge("a");
    CHECK(rel_error(layer.base().weight(), w.weight()) < 1e-14);
  }
}

TEST_CASE("hra codec: fields honoured, refused by name, malformed tensors", "[hra][io][errors]") {
  const peft::io::checkpoint_tensors<double> none;
  peft::rng g(3);
  auto module = [&](std::vector<std::int64_t> shape) {
    return peft_test::random_tensors<double>("layer", {{"hra_u", std::move(shape)}}, g);
  };
  {
    const auto a = peft::io::from_checkpoint<peft::hra<double>>(hra_config(4, true), module({10, 4}), none);
    CHECK(a.apply_gs());
    CHECK(a.rank() == 4);
    CHECK(a.in_features() == 10);
    CHECK(a.out_features() == 0);
  }
  peft_test::check_error<peft::format_error>(
      [&] { (void)peft::io::from_checkpoint<peft::hra<double>>(hra_config(4, false), module({10, 5}), none); },
      "[hra::from_checkpoint] module 'layer': hra_u is [10, 5]");
  peft_test::check_error<peft::format_error>(
      [&] { (void)peft::io::from_checkpoint<peft::hra<double>>(hra_config(4, false), module({40}), none); },
      "[");
  auto bad_gs = hra_config(4, false);
  bad_gs.raw["apply_GS"] = "yes";
  peft_test::check_error<peft::format_error>(
      [&] { (void)peft::io::from_checkpoint<peft::hra<double>>(bad_gs, module({10, 4}), none); }, "[hra::from_checkpoint]");
  // Fields HRAConfig has and peft-cpp refuses, and unknown ones, by name.
  for (const auto& [field, value] : {std::pair<std::string, std::string>{"bias", R"("hra_only")"},
                                     {"some_new_field", "3"}}) {
    auto c = hra_config(4, false);
    c.raw[field] = peft::io::ordered_json::parse(value);
    const auto msg = peft_test::message_of([&] { peft::io::check_config_fields(c, peft::io::peft_codec<peft::hra<double>>::config_fields, "hra"); });
    CHECK(msg.find("[hra::from_checkpoint]") == 0);
    CHECK(msg.find("'" + field + "'") != std::string::npos);
  }
  // init_weights shapes a fresh adapter only: accepted either way.
  auto init = hra_config(4, false);
  init.raw["init_weights"] = false;
  CHECK_NOTHROW(peft::io::check_config_fields(init, peft::io::peft_codec<peft::hra<double>>::config_fields, "hra"));

  // Saving: one r and one apply_GS per config.
  auto c = hra_config(4, false);
  CHECK_NOTHROW(peft::io::describe_in(peft::hra<double>(10, 3, {.rank = 4}), c, "m.a"));
  peft_test::check_error<peft::unsupported_error>(
      [&] { peft::io::describe_in(peft::hra<double>(10, 3, {.rank = 2}), c, "m.b"); }, "[hra::describe_in] module 'm.b'");
  peft_test::check_error<peft::unsupported_error>(
      [&] { peft::io::describe_in(peft::hra<double>(10, 3, {.rank = 3, .apply_gs = true}), c, "m.c"); },
      "[hra::describe_in]");
}

TEST_CASE("hra errors: shapes, degenerate vectors, set_features", "[hra][errors]") {
  peft::rng g(17);
  const auto w = peft_test::random_dense<double>(8, 5, g);
  peft::hra<double> a(8, 5, {.rank = 3, .init = peft::hra_init::random, .seed = 1});
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 5, 9},
                                 {pass::forward, arg::x, 2, 7},
                                 {pass::forward, arg::y, 2, 4},
                                 {pass::add_term, arg::h, 2, 4},
                                 {pass::backward, arg::dy, 3, 5},
                                 {pass::backward, arg::dx, 2, 9},
                                 {pass::backward_term, arg::dh, 1, 5},
                                 {pass::delta_weight, arg::dw, 5, 7}});
  peft_test::check_unset_rejected<peft::hra<double>, peft::error>(w);
  CHECK_THROWS_AS(peft::hra<double>(8, 5, {.rank = 0}), peft::shape_error);
  CHECK_THROWS_AS(peft::hra<double>(peft::matrix<double>(0, 3), false), peft::shape_error);
  peft_test::check_error<peft::error>([] { peft::hra<double>(3, 5, {.rank = 4, .apply_gs = true, .init = peft::hra_init::random}); },
                                      "[hra::hra] apply_gs needs r <= in_features");

  const auto x = peft_test::random_matrix<double>(2, 8, g);
  peft::matrix<double> y(2, 5);
  typename peft::hra<double>::cache_type cache;
  peft::matrix<double> u = peft_test::random_matrix<double>(8, 3, g);
  for (ix i = 0; i < 8; ++i) u(i, 1) = 0.0;
  const peft::hra<double> zero(u, false);
  peft_test::check_error<peft::error>([&] { zero.forward(w, x.view(), y.view(), cache); },
                                      "[hra::forward] hra_u column 1 is zero");
  for (ix i = 0; i < 8; ++i) u(i, 1) = 2.0 * u(i, 0);
  const peft::hra<double> dependent(u, true);
  peft_test::check_error<peft::error>([&] { dependent.forward(w, x.view(), y.view(), cache); },
                                      "[hra::forward] hra_u column 1 is linearly dependent");

  peft::hra<double> loaded(peft_test::random_matrix<double>(8, 2, g), false);
  CHECK(loaded.out_features() == 0);
  loaded.forward(w, x.view(), y.view(), cache);  // any out while unknown
  loaded.set_features(8, 5);
  CHECK(loaded.out_features() == 5);
  CHECK_THROWS_AS(loaded.set_features(8, 6), peft::shape_error);
  CHECK_THROWS_AS(loaded.set_features(9, 5), peft::shape_error);
}

}  // namespace test_hra
