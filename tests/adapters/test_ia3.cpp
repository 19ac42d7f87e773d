// (IA)^3: parity with HuggingFace PEFT 0.21 (tests/data/peft/ia3: "up" scales its output, "down"
// its input), feedforward_modules matching, terms and gradients against double loops, the
// multiplicative merge and its inverse, binding the unknown side, saving and loading, errors.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "peft/io/peft/ia3.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/ia3.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_ia3 {

using ix = peft::index;

namespace {

using peft_test::rel_error;
using peft_test::stored;
using peft_test::tolerance;

// ---- IA3 helpers -------------------------------------------------------------------------------

peft::io::adapter_config ia3_config(const std::string& feedforward_json) {
  auto c = peft_test::config_of("IA3", R"(["up", "down", "layer"])");
  c.raw["feedforward_modules"] = peft::io::ordered_json::parse(feedforward_json);
  return c;
}

/// A bound adapter of either kind with l random in [0.5, 1.5].
template <class T>
peft::ia3<T> random_ia3(ix in, ix out, bool feedforward, peft::rng& g) {
  peft::ia3<T> a(in, out, {.feedforward = feedforward});
  peft_test::fill_random(a.l(), g, 0.5, 1.5);
  return a;
}

}  // namespace

TEMPLATE_TEST_CASE("ia3 reproduces PEFT: layers, network, merged weights and biases", "[ia3][golden]", float, double) {
  peft_test::check_golden<peft::ia3<TestType>>("ia3");
}

TEST_CASE("ia3 golden checkpoint: kinds from feedforward_modules, the other side unbound until bind", "[ia3][golden]") {
  auto ck = peft::io::load_checkpoint_as<peft::ia3<double>>(peft_test::golden_dir("ia3") / "adapter");
  auto& up = ck.find("up.weight")->adapter;
  auto& down = ck.find("down.weight")->adapter;
  CHECK(!up.feedforward());  // [96, 1]: scales up's output
  CHECK(down.feedforward());  // "down" is in feedforward_modules: [1, 96] scales its input
  CHECK(up.out_features() == 96);
  CHECK(up.in_features() == 0);
  CHECK(down.in_features() == 96);
  CHECK(down.out_features() == 0);
  CHECK(!up.bound());
  CHECK_THROWS_AS(up.bind(64, 95), peft::shape_error);
  up.bind(64, 96);
  CHECK(up.bound());
  CHECK(up.in_features() == 64);
  // An unbound adapter already works on a base of any size on its unknown side.
  peft::rng g(1);
  const peft::dense<double> w(peft_test::random_matrix<double>(48, 96, g));
  const auto x = peft_test::random_matrix<double>(2, 96, g);
  peft::matrix<double> y(2, 48), ref(2, 48);
  typename peft::ia3<double>::cache_type cache;
  down.forward(w, x.view(), y.view(), cache);
  auto xs = x;
  for (ix i = 0; i < 2; ++i)
    for (ix j = 0; j < 96; ++j) xs(i, j) *= down.l()(0, j);
  CHECK(rel_error(y, peft_test::ref_nt(xs, w.weight())) < 1e-14);
}

TEST_CASE("ia3 feedforward_modules: PEFT's rule (plain suffix for a list, fullmatch for a regex)", "[ia3]") {
  using peft::io::ordered_json;
  const auto list = ordered_json::parse(R"(["down_proj", "fc2"])");
  CHECK(peft::io::ia3_feedforward(list, "model.layers.0.mlp.down_proj"));
  CHECK(peft::io::ia3_feedforward(list, "down_proj"));
  CHECK(peft::io::ia3_feedforward(list, "encoder.myfc2"));  // a plain suffix, unlike target_modules
  CHECK(!peft::io::ia3_feedforward(list, "model.layers.0.mlp.up_proj"));
  CHECK(!peft::io::ia3_feedforward(list, "down_proj.inner"));
  const auto re = ordered_json(R"(.*\.mlp\.(down|gate)_proj)");
  CHECK(peft::io::ia3_feedforward(re, "model.layers.3.mlp.down_proj"));
  CHECK(!peft::io::ia3_feedforward(re, "model.layers.3.mlp.down_proj_x"));  // fullmatch
  CHECK(!peft::io::ia3_feedforward(re, "down_proj"));
  CHECK(!peft::io::ia3_feedforward(ordered_json(nullptr), "down_proj"));
  CHECK_THROWS_AS(peft::io::ia3_feedforward(ordered_json(3), "x"), peft::format_error);
  CHECK_THROWS_AS(peft::io::ia3_feedforward(ordered_json::parse("[1]"), "x"), peft::format_error);
  CHECK_THROWS_AS(peft::io::ia3_feedforward(ordered_json("(unclosed"), "x"), peft::format_error);
}

TEMPLATE_TEST_CASE("ia3 forward, dx, dl, terms and merge equal double loops for both kinds", "[ia3]", float, double) {
  using T = TestType;
  peft::rng g(21);
  const ix in = 9, out = 7, batch = 3;
  const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  REQUIRE(peft_test::nontrivial(x));
  const auto h = peft_test::ref_linear(x, w.weight(), w.bias());
  for (const bool ff : {true, false}) {
    INFO("feedforward " << ff);
    auto a = random_ia3<T>(in, out, ff, g);
    auto l = [&](ix k) { return static_cast<double>(ff ? a.l()(0, k) : a.l()(k, 0)); };
    // Reference: W' = W0 * l (columns or rows), b' = b0 * l for output scaling.
    peft::matrix<double> w_eff = peft_test::to_double(w.weight());
    peft::matrix<double> b_eff(1, out, w.bias());
    for (ix i = 0; i < out; ++i)
      for (ix j = 0; j < in; ++j) w_eff(i, j) *= ff ? l(j) : l(i);
    if (!ff)
      for (ix i = 0; i < out; ++i) b_eff(0, i) *= l(i);
    const std::vector<double> bias(b_eff.storage());
    typename peft::ia3<T>::cache_type cache;
    peft::matrix<T> y(batch, out), dx(batch, in);
    a.forward(w, x.view(), y.view(), cache);
    CHECK(rel_error(y, peft_test::ref_linear(x, w_eff, bias)) < tolerance<T>());
    a.backward(w, x.view(), gy.view(), dx.view(), cache);
    CHECK(rel_error(dx, peft_test::ref_nn(gy, w_eff)) < tolerance<T>());
    // dl: input scaling sum_b (g W0)_bi x_bi; output scaling sum_b g_bj h_bj.
    peft::matrix<double> dl(a.l().rows(), a.l().cols());
    const auto gw = peft_test::ref_nn(gy, w.weight());
    for (ix b = 0; b < batch; ++b) {
      if (ff) {
        for (ix i = 0; i < in; ++i) dl(0, i) += gw(b, i) * peft_test::at(x, b, i);
      } else {
        for (ix j = 0; j < out; ++j) dl(j, 0) += peft_test::at(gy, b, j) * h(b, j);
      }
    }
    CHECK(rel_error(a.grad_l(), dl) < tolerance<T>());
    // The term and its backward, as the brief states them.
    const peft::matrix<T> ht = peft_test::convert_matrix<T>(h);
    peft::matrix<T> yt = ht, dh = gy, dxt(batch, in);
    a.zero_grad();
    a.add_term(w, x.view(), ht.view(), yt.view(), cache);
    a.backward_term(w, x.view(), ht.view(), gy.view(), dh.view(), dxt.view(), cache);
    peft::matrix<double> term(batch, out), dh_ref = peft_test::to_double(gy), dx_ref(batch, in);
    if (ff) {
      auto xs = peft_test::to_double(x);
      for (ix b = 0; b < batch; ++b)
        for (ix i = 0; i < in; ++i) xs(b, i) *= l(i) - 1;
      term = peft_test::ref_nt(xs, w.weight());  // W0 ((l - 1) x), no bias
      for (ix b = 0; b < batch; ++b)
        for (ix i = 0; i < in; ++i) dx_ref(b, i) = (l(i) - 1) * gw(b, i);
    } else {
      for (ix b = 0; b < batch; ++b)
        for (ix j = 0; j < out; ++j) {
          term(b, j) = (l(j) - 1) * h(b, j);
          dh_ref(b, j) += (l(j) - 1) * peft_test::at(gy, b, j);
        }
    }
    CHECK(rel_error(peft_test::add(yt, ht, -1.0), term) < 10 * tolerance<T>());
    CHECK(rel_error(dh, dh_ref) < tolerance<T>());
    CHECK(rel_error(dxt, dx_ref) < tolerance<T>());
    CHECK(rel_error(a.grad_l(), dl) < tolerance<T>());
    // delta_weight = W' - W0, delta_bias = b' - b0 (only for output scaling).
    peft::matrix<T> dw(out, in);
    a.delta_weight(w, dw.view());
    CHECK(rel_error(dw, peft_test::add(w_eff, w.weight(), -1.0)) < tolerance<T>());
    std::vector<T> db(static_cast<std::size_t>(out));
    CHECK(a.delta_bias(w, db.data()) == !ff);
    if (!ff) CHECK(rel_error(peft::matrix<T>(1, out, db), peft_test::add(b_eff, peft::matrix<double>(1, out, w.bias()), -1.0)) < tolerance<T>());
    CHECK(a.touches_bias() == !ff);
  }
}

TEMPLATE_TEST_CASE("ia3 merge is multiplicative; unmerge_delta and unmerge_delta_bias recover W0 and b0", "[ia3]", float,
                   double) {
  using T = TestType;
  peft::rng g(23);
  const ix in = 8, out = 6;
  const peft::dense<double> w0(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
  const auto x = peft_test::random_matrix<T>(2, in, g);
  for (const bool ff : {true, false}) {
    INFO("feedforward " << ff);
    const auto a = random_ia3<T>(in, out, ff, g);
    peft::adapted_linear<peft::dense<double>, peft::ia3<T>> layer(w0);
    layer.add_adapter("a", a);
    peft::matrix<T> before(2, out), after(2, out);
    layer.forward(x, before);
    layer.merge("a");
    layer.forward(x, after);
    CHECK(rel_error(after, before) < tolerance<T>());
    // unmerge_delta: what merge added, from the merged weight alone.
    peft::matrix<T> dw(out, in), added(out, in);
    a.unmerge_delta(layer.base(), dw.view());
    a.delta_weight(w0, added.view());
    CHECK(rel_error(dw, added) < tolerance<T>());
    std::vector<T> db(static_cast<std::size_t>(out)), db_added(static_cast<std::size_t>(out));
    CHECK(a.unmerge_delta_bias(layer.base(), db.data()) == !ff);
    if (!ff) {
      a.delta_bias(w0, db_added.data());
      CHECK(rel_error(peft::matrix<T>(1, out, db), peft::matrix<T>(1, out, db_added)) < tolerance<T>());
    }
    layer.unmerge("a");  // adapted_linear uses unmerge_delta for the weight
    CHECK(rel_error(layer.base().weight(), w0.weight()) < tolerance<T>());
  }
  // A zero in l loses W0: unmerging says so.
  auto z = random_ia3<T>(in, out, false, g);
  z.l()(2, 0) = T{0};
  peft::matrix<T> dw(out, in);
  CHECK_THROWS_WITH(z.unmerge_delta(w0, dw.view()), Catch::Contains("[ia3::unmerge_delta]") && Catch::Contains("zero"));
  std::vector<T> db(static_cast<std::size_t>(out));
  CHECK_THROWS_AS(z.unmerge_delta_bias(w0, db.data()), peft::error);
  // A base without bias: output scaling leaves the (absent) bias alone.
  const peft::dense<double> nb(peft_test::random_matrix<double>(out, in, g));
  CHECK(!random_ia3<T>(in, out, false, g).delta_bias(nb, db.data()));
}

TEMPLATE_TEST_CASE("ia3 init: PEFT's ones are an exact no-op; random (randn) is not", "[ia3]", float, double) {
  using T = TestType;
  peft::rng g(2);
  const ix in = 10, out = 12;
  const auto w = peft_test::random_dense<T>(in, out, g);
  const auto x = peft_test::random_matrix<T>(3, in, g);
  for (const bool ff : {true, false}) {
    peft::ia3<T> a(in, out, {.feedforward = ff});
    CHECK(a.l().rows() == (ff ? 1 : out));
    CHECK(a.l().cols() == (ff ? in : 1));
    peft_test::check_output_is_base(a, w, x);
    peft::ia3<T> r(in, out, {.feedforward = ff, .init = peft::ia3_init::random, .seed = 4});
    peft_test::check_not_base(r, w, x, 1e-2);
  }
}

TEST_CASE("ia3 checkpoints: from_checkpoint, describe_in and a save/load round trip", "[ia3]") {
  peft::rng g(5);
  peft::io::checkpoint_tensors<double> none;
  peft::io::checkpoint_tensors<double> ffm("layer"), outm("layer"), one("layer");
  ffm.add("ia3_l", stored<double>({1, 7}, g, 0.5, 1.5));
  outm.add("ia3_l", stored<double>({5, 1}, g, 0.5, 1.5));
  one.add("ia3_l", stored<double>({1, 1}, g, 0.5, 1.5));
  CHECK(peft::io::from_checkpoint<peft::ia3<double>>(ia3_config(R"(["layer"])"), ffm, none).feedforward());
  CHECK(!peft::io::from_checkpoint<peft::ia3<double>>(ia3_config(R"(["other"])"), outm, none).feedforward());
  CHECK(peft::io::from_checkpoint<peft::ia3<double>>(ia3_config(R"(["layer"])"), one, none).feedforward());  // [1, 1]: the config decides
  CHECK(!peft::io::from_checkpoint<peft::ia3<double>>(ia3_config("null"), one, none).feedforward());
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::ia3<double>>(ia3_config(R"(["layer"])"), outm, none),
                    Catch::Contains("is a feedforward module") && Catch::Contains("[1, in]"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::ia3<double>>(ia3_config("[]"), ffm, none), Catch::Contains("[out, 1]"));
  peft::io::checkpoint_tensors<double> conv("layer"), vec("layer");
  conv.add("ia3_l", stored<double>({1, 7, 1, 1}, g, 0.5, 1.5));
  vec.add("ia3_l", stored<double>({7}, g, 0.5, 1.5));
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::ia3<double>>(ia3_config("[]"), conv, none), peft::unsupported_error);
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::ia3<double>>(ia3_config("[]"), vec, none), peft::format_error);
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::ia3<double>>(ia3_config("5"), vec, none), peft::format_error);

  // describe_in: a feedforward module joins the list (and a list target_modules), or the regex.
  auto c = ia3_config(R"(["fc2"])");
  c.target_modules = {"q_proj", "fc2"};
  const peft::ia3<double> ff(4, 3, {.feedforward = true}), out(4, 3, {});
  peft::io::describe_in(ff, c, "model.l0.mlp.down_proj");
  CHECK(c.raw["feedforward_modules"] == peft::io::ordered_json::parse(R"(["fc2", "model.l0.mlp.down_proj"])"));
  CHECK(c.target_modules.back() == "model.l0.mlp.down_proj");
  peft::io::describe_in(ff, c, "model.l1.fc2");  // already matched: unchanged
  CHECK(c.raw["feedforward_modules"].size() == 2);
  peft::io::describe_in(out, c, "model.l0.q_proj");
  CHECK_THROWS_AS(peft::io::describe_in(out, c, "model.l2.fc2"), peft::unsupported_error);
  auto cr = ia3_config(R"(".*\\.fc2")");
  peft::io::describe_in(ff, cr, "model.x+y");
  CHECK(peft::io::peft_codec<peft::ia3<double>>::is_feedforward(cr, "model.x+y"));
  CHECK(peft::io::peft_codec<peft::ia3<double>>::is_feedforward(cr, "a.fc2"));
  CHECK(!peft::io::peft_codec<peft::ia3<double>>::is_feedforward(cr, "model.xxy"));
  CHECK(cr.peft_type == "IA3");

  peft::io::basic_peft_checkpoint<peft::ia3<double>> ck;
  ck.config.targets_kind = peft::io::target_kind::none;
  ck.modules.push_back({"m.up", "m.up.weight", random_ia3<double>(5, 8, false, g)});
  ck.modules.push_back({"m.down", "m.down.weight", random_ia3<double>(8, 3, true, g)});
  auto back = peft_test::save_and_load(ck, "peft_ia3_roundtrip");
  CHECK(back.config.peft_type == "IA3");
  CHECK(back.config.raw["feedforward_modules"] == peft::io::ordered_json::parse(R"(["m.down"])"));
  for (auto& m : ck.modules) {
    auto& b = back.find(m.weight_name)->adapter;
    CHECK(b.feedforward() == m.adapter.feedforward());
    CHECK(rel_error(b.l(), m.adapter.l()) < 1e-7);  // stored as f32
  }
}

TEMPLATE_TEST_CASE("ia3 rejects bad shapes with clear errors", "[ia3]", float, double) {
  using T = TestType;
  peft::rng g(31);
  auto a = random_ia3<T>(7, 5, true, g);
  const peft::dense<T> w(peft_test::random_matrix<T>(5, 7, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 5, 8, "[ia3::forward] base weight is (5, 8)"},
                                 {pass::forward, arg::y, 2, 6},
                                 {pass::backward, arg::dx, 2, 6},
                                 {pass::delta_weight, arg::dw, 5, 6}});
  auto o = random_ia3<T>(7, 5, false, g);
  peft_test::check_shape_errors(o, w, 2, {{pass::add_term, arg::h, 2, 6}});
  CHECK_THROWS_AS(peft::ia3<T>(0, 5, {}), peft::shape_error);
  CHECK_THROWS_AS(peft::ia3<T>(std::vector<T>{}, true), peft::shape_error);
  CHECK_THROWS_AS(peft::ia3<T>(std::vector<T>(3, T{1}), true, 4, 5), peft::shape_error);
  CHECK_THROWS_AS(a.bind(7, 0), peft::shape_error);
  CHECK_THROWS_AS(a.bind(6, 5), peft::shape_error);
  CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::ia3<T>>(peft_test::golden_dir("loha") / "adapter"),
                  peft::unsupported_error);
}

}  // namespace test_ia3
