// RoAd: parity with HuggingFace PEFT 0.21 (tests/data/peft/road_1, road_2, road_4: group sizes 16,
// 8, 16 on outputs 96 and 48, so several groups per layer), the three variants against the
// rotation matrix R written out from PEFT's formulas, gradients against finite differences, the
// multiplicative merge and its inverse, checkpoints (a save round trip, config fields) and errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "peft/adapters/road.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/io/peft/road.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_road {

using ix = peft::index;
using peft::road_variant;
using peft_test::rel_error;
using peft_test::tolerance;

namespace {

/// R (out, out) as PEFT's _get_delta_weight builds it: c1 on the diagonal; inside each group,
/// R[j, j + G/2] = -c2[j] and R[j + G/2, j] = c2[j + G/2], with c1, c2 from _prepare_cols.
template <class T>
peft::matrix<double> reference_rotation(const peft::road<T>& a) {
  const ix out = a.out_features(), g = a.group_size(), half = g / 2;
  std::vector<double> c1(static_cast<std::size_t>(out)), c2(static_cast<std::size_t>(out));
  for (ix o = 0; o < out; ++o) {
    const ix grp = o / g, m = o % g;
    double t1 = 0, a1 = 0, t2 = 0, a2 = 0;
    if (a.variant() == road_variant::road_1) {
      const ix k = grp * half + m % half;  // reshape(-1, G/2).repeat_interleave(2, dim=0)
      t1 = t2 = a.theta()(0, k);
      a1 = a2 = a.alpha()(0, k);
    } else if (a.variant() == road_variant::road_2) {
      t1 = t2 = a.theta()(0, o);
      a1 = a2 = a.alpha()(0, o);
    } else {  // reshape(-1, 2, G): [:, 0, :] for c1, [:, 1, :] for c2
      t1 = a.theta()(0, grp * 2 * g + m);
      a1 = a.alpha()(0, grp * 2 * g + m);
      t2 = a.theta()(0, grp * 2 * g + g + m);
      a2 = a.alpha()(0, grp * 2 * g + g + m);
    }
    c1[static_cast<std::size_t>(o)] = a1 * std::cos(t1);
    c2[static_cast<std::size_t>(o)] = a2 * std::sin(t2);
  }
  peft::matrix<double> r(out, out);
  for (ix o = 0; o < out; ++o) {
    r(o, o) = c1[static_cast<std::size_t>(o)];
    const ix m = o % g;
    if (m < half) {
      r(o, o + half) = -c2[static_cast<std::size_t>(o)];
    } else {
      r(o, o - half) = c2[static_cast<std::size_t>(o)];
    }
  }
  return r;
}

template <class T>
peft::road<T> random_road(ix in, ix out, road_variant v, ix group, peft::rng& g) {
  peft::road<T> a(in, out, {.variant = v, .group_size = group});
  peft_test::fill_random(a.theta(), g, -1.5, 1.5);
  peft_test::fill_random(a.alpha(), g, 0.5, 1.5);
  return a;
}

}  // namespace

// ---- golden parity ---------------------------------------------------------------------------

TEMPLATE_TEST_CASE("road reproduces PEFT (road_1): layers, network, merged weights and biases", "[road][golden]", float,
                   double) {
  peft_test::check_golden<peft::road<TestType>>("road_1");
}

TEMPLATE_TEST_CASE("road reproduces PEFT (road_2): layers, network, merged weights and biases", "[road][golden]", float,
                   double) {
  peft_test::check_golden<peft::road<TestType>>("road_2");
}

TEMPLATE_TEST_CASE("road reproduces PEFT (road_4): layers, network, merged weights and biases", "[road][golden]", float,
                   double) {
  peft_test::check_golden<peft::road<TestType>>("road_4");
}

TEST_CASE("road golden checkpoints: variant and group_size from adapter_config.json, in_features from the base",
          "[road][golden]") {
  struct expect {
    const char* name;
    road_variant variant;
    ix group, n_up;
  };
  for (const auto& e : {expect{"road_1", road_variant::road_1, 16, 48}, expect{"road_2", road_variant::road_2, 8, 96},
                        expect{"road_4", road_variant::road_4, 16, 192}}) {
    INFO(e.name);
    auto ck = peft::io::load_checkpoint_as<peft::road<double>>(peft_test::golden_dir(e.name) / "adapter");
    auto& up = ck.find("up.weight")->adapter;
    CHECK(up.variant() == e.variant);
    CHECK(up.group_size() == e.group);
    CHECK(up.theta().cols() == e.n_up);
    CHECK(up.out_features() == 96);
    CHECK(up.in_features() == 0);  // the tensors do not say it
    CHECK_THROWS_AS(up.bind(64, 95), peft::shape_error);
    up.bind(64, 96);
    CHECK(up.in_features() == 64);
    CHECK(ck.find("down.weight")->adapter.out_features() == 48);
  }
}

TEMPLATE_TEST_CASE("road golden checkpoints: saved and reloaded, tensors and config fields are identical",
                   "[road][golden][io]", float, double) {
  using T = TestType;
  for (const std::string name : {"road_1", "road_2", "road_4"}) {
    INFO(name);
    auto ck = peft::io::load_checkpoint_as<peft::road<T>>(peft_test::golden_dir(name) / "adapter");
    auto back = peft_test::save_and_load(ck, "peft_road_roundtrip_" + name);
    CHECK(back.config.peft_type == "ROAD");
    for (const char* field : {"variant", "group_size", "init_weights"}) {
      INFO(field);
      CHECK(back.config.raw[field] == ck.config.raw[field]);
    }
    for (const auto& m : ck.modules) {
      const auto& b = back.find(m.weight_name)->adapter;
      CHECK(b.variant() == m.adapter.variant());
      CHECK(b.group_size() == m.adapter.group_size());
      CHECK(rel_error(b.theta(), m.adapter.theta()) == 0.0);  // f32 in, f32 out
      CHECK(rel_error(b.alpha(), m.adapter.alpha()) == 0.0);
    }
  }
}

// ---- the variants against PEFT's formulas ------------------------------------------------------

TEMPLATE_TEST_CASE("road forward, dx, terms and merge equal R (x W0^T + b0) in each variant", "[road]", float, double) {
  using T = TestType;
  peft::rng g(61);
  const ix in = 9, batch = 3;
  for (const auto v : {road_variant::road_1, road_variant::road_2, road_variant::road_4}) {
    for (const auto& [out, group] : {std::pair<ix, ix>{12, 4}, std::pair<ix, ix>{6, 6}, std::pair<ix, ix>{8, 2}}) {
      INFO(peft::road_variant_name(v) << " out " << out << " group " << group);
      const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
      const auto x = peft_test::random_matrix<T>(batch, in, g);
      const auto gy = peft_test::random_matrix<T>(batch, out, g);
      REQUIRE(peft_test::nontrivial(x));
      auto a = random_road<T>(in, out, v, group, g);
      const auto r = reference_rotation(a);
      // W' = R W0, b' = R b0.
      const auto w_eff = peft_test::ref_nn(r, w.weight());
      const peft::matrix<double> b0(out, 1, w.bias());
      const auto b_eff = peft_test::ref_nn(r, b0);
      const std::vector<double> bias(b_eff.storage());
      typename peft::road<T>::cache_type cache;
      peft::matrix<T> y(batch, out), dx(batch, in);
      a.forward(w, x.view(), y.view(), cache);
      CHECK(rel_error(y, peft_test::ref_linear(x, w_eff, bias)) < tolerance<T>());
      a.backward(w, x.view(), gy.view(), dx.view(), cache);
      CHECK(rel_error(dx, peft_test::ref_nn(gy, w_eff)) < tolerance<T>());
      peft::matrix<T> dw(out, in);
      a.delta_weight(w, dw.view());
      CHECK(rel_error(dw, peft_test::add(w_eff, w.weight(), -1.0)) < tolerance<T>());
      std::vector<T> db(static_cast<std::size_t>(out));
      REQUIRE(a.delta_bias(w, db.data()));
      CHECK(rel_error(peft::matrix<T>(out, 1, db), peft_test::add(b_eff, b0, -1.0)) < tolerance<T>());
      // The term form: y = h + (R h - h), dh = g + (R^T g - g).
      const auto h = peft_test::ref_linear(x, w.weight(), w.bias());
      const auto ht = peft_test::convert_matrix<T>(h);
      peft::matrix<T> yt = ht, dh = gy, dxt(batch, in);
      a.add_term(w, x.view(), ht.view(), yt.view(), cache);
      CHECK(rel_error(yt, peft_test::ref_nt(h, r)) < tolerance<T>());
      a.backward_term(w, x.view(), ht.view(), gy.view(), dh.view(), dxt.view(), cache);
      CHECK(rel_error(dh, peft_test::ref_nn(gy, r)) < tolerance<T>());
      CHECK(peft_test::count_nonzero(dxt) == 0);  // the term reads h only
    }
  }
}

TEST_CASE("road theta and alpha gradients equal central finite differences in each variant", "[road]") {
  peft::rng g(67);
  const ix in = 5, out = 12, batch = 4;
  const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
  const auto x = peft_test::random_matrix<double>(batch, in, g);
  const auto gy = peft_test::random_matrix<double>(batch, out, g);
  for (const auto v : {road_variant::road_1, road_variant::road_2, road_variant::road_4}) {
    INFO(peft::road_variant_name(v));
    auto a = random_road<double>(in, out, v, 4, g);
    const auto loss = [&] {
      const auto y = peft_test::run_forward(a, w, x);
      double s = 0;
      for (ix i = 0; i < batch; ++i)
        for (ix j = 0; j < out; ++j) s += y(i, j) * gy(i, j);
      return s;
    };
    a.zero_grad();
    typename peft::road<double>::cache_type cache;
    peft::matrix<double> y(batch, out), dx(batch, in);
    a.forward(w, x.view(), y.view(), cache);
    a.backward(w, x.view(), gy.view(), dx.view(), cache);
    CHECK(rel_error(a.grad_theta(), peft_test::fd_gradient(a.theta(), 1e-6, loss)) < 1e-8);
    CHECK(rel_error(a.grad_alpha(), peft_test::fd_gradient(a.alpha(), 1e-6, loss)) < 1e-8);
  }
}

TEMPLATE_TEST_CASE("road over a quantized base reads two rows at a time for merging", "[road]", float, double) {
  using T = TestType;
  peft::rng g(71);
  const ix in = 40, out = 16;
  const auto q = peft::int8_rowwise::quantize(peft::matrix_view<const double>(peft_test::random_matrix<double>(out, in, g).view()));
  peft::matrix<double> w0(out, in);
  for (ix i = 0; i < out; ++i) q.dequantize_row(i, w0.row(i));
  const peft::dense<double> exact(w0);
  const auto a = random_road<T>(in, out, road_variant::road_4, 8, g);
  peft::matrix<T> dw(out, in), dw_ref(out, in);
  a.delta_weight(q, dw.view());
  a.delta_weight(exact, dw_ref.view());
  CHECK(rel_error(dw, dw_ref) < tolerance<T>());
  const auto x = peft_test::random_matrix<T>(3, in, g);
  CHECK(rel_error(peft_test::run_forward(a, q, x), peft_test::run_forward(a, exact, x)) < tolerance<T>());
}

TEMPLATE_TEST_CASE("road merge is multiplicative; unmerge_delta inverts each pair's rotation", "[road]", float, double) {
  using T = TestType;
  peft::rng g(73);
  const ix in = 8, out = 12;
  const peft::dense<double> w0(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
  const auto x = peft_test::random_matrix<T>(2, in, g);
  for (const auto v : {road_variant::road_1, road_variant::road_2, road_variant::road_4}) {
    INFO(peft::road_variant_name(v));
    const auto a = random_road<T>(in, out, v, 6, g);
    peft::adapted_linear<peft::dense<double>, peft::road<T>> layer(w0);
    layer.add_adapter("a", a);
    peft::matrix<T> before(2, out), after(2, out);
    layer.forward(x, before);
    layer.merge("a");
    layer.forward(x, after);
    CHECK(rel_error(after, before) < tolerance<T>());
    peft::matrix<T> dw(out, in), added(out, in);
    a.unmerge_delta(layer.base(), dw.view());
    a.delta_weight(w0, added.view());
    CHECK(rel_error(dw, added) < 10 * tolerance<T>());
    std::vector<T> db(static_cast<std::size_t>(out)), db_added(static_cast<std::size_t>(out));
    REQUIRE(a.unmerge_delta_bias(layer.base(), db.data()));
    a.delta_bias(w0, db_added.data());
    CHECK(rel_error(peft::matrix<T>(1, out, db), peft::matrix<T>(1, out, db_added)) < 10 * tolerance<T>());
    layer.unmerge("a");
    CHECK(rel_error(layer.base().weight(), w0.weight()) < 10 * tolerance<T>());
    CHECK(rel_error(peft::matrix<double>(1, out, layer.base().bias()), peft::matrix<double>(1, out, w0.bias())) <
          10 * tolerance<T>());
  }
  // A zero scale makes its pair's rotation singular: unmerging says so.
  auto z = random_road<T>(in, out, road_variant::road_2, 6, g);
  z.alpha()(0, 3) = T{0};
  z.alpha()(0, 0) = T{0};  // outputs 0 and 3 are one pair (group 6)
  peft::matrix<T> dw(out, in);
  CHECK_THROWS_WITH(z.unmerge_delta(w0, dw.view()), Catch::Contains("[road::unmerge_delta]") && Catch::Contains("singular"));
  std::vector<T> db(static_cast<std::size_t>(out));
  CHECK_THROWS_AS(z.unmerge_delta_bias(w0, db.data()), peft::error);
  // A base without a bias: nothing to rotate.
  const peft::dense<double> nb(peft_test::random_matrix<double>(out, in, g));
  CHECK(!random_road<T>(in, out, road_variant::road_1, 6, g).delta_bias(nb, db.data()));
}

TEMPLATE_TEST_CASE("road init: theta = 0, alpha = 1 is an exact no-op; init_weights=False is not", "[road]", float,
                   double) {
  using T = TestType;
  peft::rng g(2);
  for (const auto v : {road_variant::road_1, road_variant::road_2, road_variant::road_4}) {
    peft::road<T> a(10, 12, {.variant = v, .group_size = 4});
    CHECK(a.theta().cols() == peft::road<T>::parameter_count(v, 12));
    peft_test::check_identity_at_init(a, 3, g);
    // Training moves it: at theta = 0 every c1 scale and every c2 angle has a gradient.
    CHECK(peft_test::count_nonzero(a.grad_alpha()) + peft_test::count_nonzero(a.grad_theta()) >= a.theta().cols());
    peft::road<T> r(10, 12, {.variant = v, .group_size = 4, .random_init = true, .seed = 4});
    peft_test::check_not_base(r, peft_test::random_dense<T>(10, 12, g), peft_test::random_matrix<T>(3, 10, g), 1e-2);
  }
}

// ---- checkpoints and errors --------------------------------------------------------------------

TEST_CASE("road checkpoints: variant and group_size decide the sizes; disagreements are refused", "[road][io]") {
  peft::rng g(5);
  const peft::io::checkpoint_tensors<double> none;
  auto cfg = [](const std::string& fields) {
    return peft::io::adapter_config::parse(R"({"peft_type": "ROAD", "target_modules": ["layer"])" + fields + "}");
  };
  using codec = peft::io::peft_codec<peft::road<double>>;
  const auto t12 = peft_test::random_tensors<double>("layer", {{"road_theta", {12}}, {"road_alpha", {12}}}, g);
  CHECK(codec::variant_of(cfg("")) == road_variant::road_1);
  const auto r1 = peft::io::from_checkpoint<peft::road<double>>(cfg(R"(, "group_size": 8)"), t12, none);
  CHECK(r1.out_features() == 24);
  const auto r2 = peft::io::from_checkpoint<peft::road<double>>(cfg(R"(, "variant": "road_2", "group_size": 4)"), t12, none);
  CHECK(r2.out_features() == 12);
  const auto r4 = peft::io::from_checkpoint<peft::road<double>>(cfg(R"(, "variant": "road_4", "group_size": 2)"), t12, none);
  CHECK(r4.out_features() == 6);
  auto bound = t12;
  bound.set_base_shape(std::pair<ix, ix>{12, 7});
  CHECK(peft::io::from_checkpoint<peft::road<double>>(cfg(R"(, "variant": "road_2", "group_size": 4)"), bound, none)
            .in_features() == 7);
  bound.set_base_shape(std::pair<ix, ix>{24, 7});
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::road<double>>(cfg(R"(, "variant": "road_2", "group_size": 4)"), bound, none),
                  peft::format_error);
  // PEFT's default group_size 64 does not divide 24 outputs.
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::road<double>>(cfg(""), t12, none),
                    Catch::Contains("[road::from_checkpoint]") && Catch::Contains("group_size 64"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::road<double>>(cfg(R"(, "variant": "road_3")"), t12, none),
                    Catch::Contains("'variant'"));
  const auto odd = peft_test::random_tensors<double>("layer", {{"road_theta", {5}}, {"road_alpha", {5}}}, g);
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::road<double>>(cfg(R"(, "variant": "road_4", "group_size": 2)"), odd, none),
                  peft::format_error);
  const auto mismatch = peft_test::random_tensors<double>("layer", {{"road_theta", {12}}, {"road_alpha", {6}}}, g);
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::road<double>>(cfg(R"(, "group_size": 4)"), mismatch, none),
                    Catch::Contains("road_alpha is [6]"));
  // Fields: ours pass, bias and unknown non-default fields are refused by the shared rule.
  CHECK_NOTHROW(peft::io::check_config_fields(cfg(R"(, "variant": "road_4", "group_size": 8, "init_weights": false)"),
                                              codec::config_fields, "road"));
  CHECK_THROWS_WITH(peft::io::check_config_fields(cfg(R"(, "road_scale": 2)"), codec::config_fields, "road"),
                    Catch::Contains("[road::from_checkpoint]") && Catch::Contains("'road_scale'"));
  // describe_in: one variant and group_size per config.
  peft::io::adapter_config c;
  peft::io::describe_in(peft::road<double>(4, 8, {.variant = road_variant::road_4, .group_size = 4}), c, "l0");
  CHECK(c.peft_type == "ROAD");
  CHECK(c.raw["variant"] == "road_4");
  CHECK(c.raw["group_size"] == 4);
  CHECK_THROWS_AS(peft::io::describe_in(peft::road<double>(4, 8, {.variant = road_variant::road_2, .group_size = 4}), c, "l1"),
                  peft::unsupported_error);
  CHECK_THROWS_AS(peft::io::describe_in(peft::road<double>(4, 8, {.variant = road_variant::road_4, .group_size = 8}), c, "l1"),
                  peft::unsupported_error);
}

TEMPLATE_TEST_CASE("road rejects bad shapes with clear errors", "[road][errors]", float, double) {
  using T = TestType;
  peft::rng g(31);
  CHECK_THROWS_WITH((peft::road<T>(4, 10, {.group_size = 4})), Catch::Contains("[road::road]") && Catch::Contains("group_size 4"));
  CHECK_THROWS_WITH((peft::road<T>(4, 12, {.group_size = 3})), Catch::Contains("even"));
  CHECK_THROWS_AS((peft::road<T>(road_variant::road_2, 4, std::vector<T>(7), std::vector<T>(8), 8)), peft::shape_error);
  peft_test::check_unset_rejected<peft::road<T>, peft::error>(peft::dense<T>(peft_test::random_matrix<T>(4, 7, g)));
  auto a = random_road<T>(7, 4, road_variant::road_2, 2, g);
  const peft::dense<T> w(peft_test::random_matrix<T>(4, 7, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 4, 8, "[road::forward] base weight is (4, 8)"},
                                 {pass::forward, arg::y, 2, 6},
                                 {pass::add_term, arg::h, 2, 6},
                                 {pass::backward, arg::dx, 2, 6},
                                 {pass::backward_term, arg::dh, 2, 5},
                                 {pass::delta_weight, arg::dw, 4, 6, "[road::delta_weight]"}});
}

}  // namespace test_road
