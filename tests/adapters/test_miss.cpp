// MiSS: parity with HuggingFace PEFT 0.21 (tests/data/peft/miss: balance with r = 10, which divides
// neither 64 nor 96, so the last shard is padded; miss_bat: r = 16; miss_mini: r = 10, mini_r =
// 12), the three modes against a delta written out from PEFT's formulas with double loops, bat
// over a quantized base, unmerging bat, checkpoints (a save round trip, config fields) and errors.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/miss.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/io/peft/miss.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_miss {

using ix = peft::index;
using peft::miss_mode;
using peft_test::rel_error;
using peft_test::tolerance;

namespace {

/// PEFT's dW (out, in) written out with loops from miss_block B (as stored) and W0:
/// balance/mini dW[o, i] = B[i mod r, o (mod mini_r)]; bat dW_{q,p} = W0_{q,p} B_q + B_q.
peft::matrix<double> reference_delta(miss_mode mode, ix r, const peft::matrix<double>& b, const peft::matrix<double>& w0) {
  const ix out = w0.rows(), in = w0.cols();
  peft::matrix<double> dw(out, in);
  for (ix o = 0; o < out; ++o) {
    for (ix i = 0; i < in; ++i) {
      if (mode == miss_mode::balance) {
        dw(o, i) = b(i % r, o);
      } else if (mode == miss_mode::mini) {
        dw(o, i) = b(i % r, o % b.cols());
      } else {
        const ix q = o / r, a = o % r, p = i / r, c = i % r;
        double s = b(q * r + a, c);
        for (ix m = 0; m < r; ++m) s += w0(o, p * r + m) * b(q * r + m, c);
        dw(o, i) = s;
      }
    }
  }
  return dw;
}

/// dL/dB for L = sum(gy * (x dW^T)), by the chain rule through reference_delta's loops:
/// dL/d(dW) = gy^T x.
peft::matrix<double> reference_grad(miss_mode mode, ix r, const peft::matrix<double>& b, const peft::matrix<double>& w0,
                                    const peft::matrix<double>& gdw) {
  const ix out = w0.rows(), in = w0.cols();
  peft::matrix<double> gb(b.rows(), b.cols());
  for (ix o = 0; o < out; ++o) {
    for (ix i = 0; i < in; ++i) {
      const double gd = gdw(o, i);
      if (mode == miss_mode::balance) {
        gb(i % r, o) += gd;
      } else if (mode == miss_mode::mini) {
        gb(i % r, o % b.cols()) += gd;
      } else {
        const ix q = o / r, a = o % r, p = i / r, c = i % r;
        gb(q * r + a, c) += gd;
        for (ix m = 0; m < r; ++m) gb(q * r + m, c) += w0(o, p * r + m) * gd;
      }
    }
  }
  return gb;
}

template <class T>
peft::miss<T> random_miss(ix in, ix out, miss_mode mode, ix r, ix mini_r, peft::rng& g, double scale = 1.0) {
  peft::miss<T> a(in, out, {.rank = r, .mode = mode, .mini_rank = mini_r});
  peft_test::fill_random(a.block(), g, -scale, scale);
  return a;
}

/// Every gradient of layer `name` against PEFT's, read flat: bat's miss_block gradient is 3-D
/// [out / r, r, r], the stacked (out, r) of parameters() in the same row-major order.
template <class T>
void check_gradients(peft_test::golden_case<peft::miss<T>>& c, const std::string& name, double tol) {
  std::size_t checked = 0;
  for (const auto& p : c.layer(name).adapter("default").parameters()) {
    INFO("gradient of " << p.name);
    const peft::matrix<double> ref(p.grad.rows(), p.grad.cols(),
                                   c.reference.template read<double>("grad.base_model.model." + name + "." + p.name + ".default"));
    REQUIRE(peft_test::count_nonzero(ref) > ref.size() / 2);
    CHECK(rel_error(p.grad, ref) < tol);
    ++checked;
  }
  CHECK(checked == c.reference_gradients(name));
}

/// A case: each layer (output, dx, gradient), the network (y, dx, gradients), the merged weights.
template <class T>
void check_golden_case(const std::string& name) {
  using A = peft::miss<T>;
  peft_test::check_golden<A>(
      name,
      [](peft_test::golden_case<A>& c, double tol) {
        for (const std::string layer : {"up", "down"}) {
          INFO("layer " << layer);
          peft_test::check_layer_outputs(c, layer, tol);
          check_gradients(c, layer, tol);
        }
      },
      [](peft_test::golden_case<A>& c, double tol) {
        peft_test::check_network_outputs(c, tol);
        check_gradients(c, "up", tol);
        check_gradients(c, "down", tol);
      },
      peft_test::check_merge<A>);
}

}  // namespace

// ---- golden parity ---------------------------------------------------------------------------

TEMPLATE_TEST_CASE("miss reproduces PEFT (balance, padded shards): layers, network, merged weights", "[miss][golden]",
                   float, double) {
  check_golden_case<TestType>("miss");
}

TEMPLATE_TEST_CASE("miss reproduces PEFT (bat): layers, network, merged weights", "[miss][golden]", float, double) {
  check_golden_case<TestType>("miss_bat");
}

TEMPLATE_TEST_CASE("miss reproduces PEFT (mini): layers, network, merged weights", "[miss][golden]", float, double) {
  check_golden_case<TestType>("miss_mini");
}

TEST_CASE("miss golden checkpoints: modes, ranks and bound shapes from adapter_config.json and the base", "[miss][golden]") {
  struct expect {
    const char* name;
    miss_mode mode;
    ix r, mini_r;
    std::vector<ix> up_block;  // miss_block as stored (rows, cols)
  };
  for (const auto& e : {expect{"miss", miss_mode::balance, 10, 0, {10, 96}}, expect{"miss_bat", miss_mode::bat, 16, 0, {96, 16}},
                        expect{"miss_mini", miss_mode::mini, 10, 12, {10, 12}}}) {
    INFO(e.name);
    const auto base = peft::io::safetensors_file::open(peft_test::golden_dir(e.name) / "base_model.safetensors");
    auto unbound = peft::io::load_checkpoint_as<peft::miss<double>>(peft_test::golden_dir(e.name) / "adapter");
    const auto& u = unbound.find("up.weight")->adapter;
    CHECK(u.mode() == e.mode);
    CHECK(u.rank() == e.r);
    CHECK(u.mini_rank() == e.mini_r);
    CHECK(u.block().rows() == e.up_block[0]);
    CHECK(u.block().cols() == e.up_block[1]);
    CHECK(u.in_features() == 0);  // miss_block does not say in_features
    CHECK(u.out_features() == (e.mode == miss_mode::mini ? 0 : 96));
    const auto ck = peft_test::load_bound<peft::miss<double>>(peft_test::golden_dir(e.name) / "adapter", base);
    CHECK(ck.find("up.weight")->adapter.in_features() == 64);
    CHECK(ck.find("down.weight")->adapter.out_features() == 48);
    // Running an unbound adapter says what to do.
    peft::matrix<double> x(1, 64), y(1, 96);
    typename peft::miss<double>::cache_type cache;
    CHECK_THROWS_WITH(u.forward(peft_test::load_base(base, "up"), peft::matrix_view<const double>(x.view()), y.view(), cache),
                      Catch::Contains("[miss::forward]") && Catch::Contains("set_features"));
  }
}

TEMPLATE_TEST_CASE("miss golden checkpoints: saved and reloaded, tensors and config fields are identical", "[miss][golden][io]",
                   float, double) {
  using T = TestType;
  for (const std::string name : {"miss", "miss_bat", "miss_mini"}) {
    INFO(name);
    const auto base = peft::io::safetensors_file::open(peft_test::golden_dir(name) / "base_model.safetensors");
    auto ck = peft_test::load_bound<peft::miss<T>>(peft_test::golden_dir(name) / "adapter", base);
    auto back = peft_test::save_and_load(ck, "peft_miss_roundtrip_" + name);
    CHECK(back.config.peft_type == "MISS");
    for (const char* field : {"r", "init_weights", "mini_r", "miss_dropout"}) {
      INFO(field);
      CHECK(back.config.raw[field] == ck.config.raw[field]);
    }
    for (const auto& m : ck.modules) {
      const auto& b = back.find(m.weight_name)->adapter;
      CHECK(b.mode() == m.adapter.mode());
      CHECK(b.rank() == m.adapter.rank());
      CHECK(b.mini_rank() == m.adapter.mini_rank());
      CHECK(rel_error(b.block(), m.adapter.block()) == 0.0);  // f32 in, f32 out
    }
  }
}

// ---- the modes against PEFT's formulas ---------------------------------------------------------

TEMPLATE_TEST_CASE("miss forward, dx, miss_block gradient and delta equal PEFT's formulas in each mode", "[miss]", float,
                   double) {
  using T = TestType;
  peft::rng g(41);
  struct shape {
    ix in, out, r, mini_r;
    miss_mode mode;
  };
  for (const auto& s : {shape{13, 7, 4, 0, miss_mode::balance}, shape{12, 6, 3, 0, miss_mode::balance},
                        shape{5, 9, 5, 0, miss_mode::balance}, shape{11, 12, 3, 4, miss_mode::mini},
                        shape{8, 6, 8, 6, miss_mode::mini}, shape{12, 8, 4, 0, miss_mode::bat},
                        shape{6, 9, 3, 0, miss_mode::bat}, shape{5, 7, 1, 0, miss_mode::bat}}) {
    INFO("in " << s.in << " out " << s.out << " r " << s.r << " mode " << peft::miss_mode_name(s.mode));
    const peft::dense<double> w(peft_test::random_matrix<double>(s.out, s.in, g), peft_test::random_vector<double>(s.out, g));
    const auto x = peft_test::random_matrix<T>(3, s.in, g);
    const auto gy = peft_test::random_matrix<T>(3, s.out, g);
    REQUIRE(peft_test::nontrivial(x));
    auto a = random_miss<T>(s.in, s.out, s.mode, s.r, s.mini_r, g, s.mode == miss_mode::bat ? 0.3 : 1.0);
    const auto b = peft_test::to_double(a.block());
    const auto w0 = peft_test::to_double(w.weight());
    const auto dw = reference_delta(s.mode, s.r, b, w0);
    a.zero_grad();
    peft_test::check_against_delta(a, w, x, gy, dw, tolerance<T>());
    // L = sum(gy * y): dL/d(dW) = gy^T x.
    const auto gdw = peft_test::ref_tn(gy, x);
    CHECK(rel_error(a.grad_block(), reference_grad(s.mode, s.r, b, w0, gdw)) < tolerance<T>());
    std::vector<T> db(static_cast<std::size_t>(s.out));
    CHECK(!a.delta_bias(w, db.data()));
  }
}

TEMPLATE_TEST_CASE("miss bat reads a quantized base a panel of rows at a time", "[miss]", float, double) {
  using T = TestType;
  peft::rng g(43);
  const ix in = 40, out = 24, r = 8;
  const auto w = peft::int8_rowwise::quantize(peft::matrix_view<const double>(peft_test::random_matrix<double>(out, in, g).view()));
  peft::matrix<double> w0(out, in);
  for (ix i = 0; i < out; ++i) w.dequantize_row(i, w0.row(i));
  const peft::dense<double> exact(w0);
  auto a = random_miss<T>(in, out, miss_mode::bat, r, 0, g, 0.1);
  auto ref = a;
  const auto x = peft_test::random_matrix<T>(4, in, g);
  const auto gy = peft_test::random_matrix<T>(4, out, g);
  typename peft::miss<T>::cache_type cache;
  peft::matrix<T> y(4, out), y_ref(4, out), dx(4, in), dx_ref(4, in);
  a.forward(w, x.view(), y.view(), cache);
  ref.forward(exact, x.view(), y_ref.view(), cache);
  CHECK(rel_error(y, y_ref) < tolerance<T>());
  a.backward(w, x.view(), gy.view(), dx.view(), cache);
  ref.backward(exact, x.view(), gy.view(), dx_ref.view(), cache);
  CHECK(rel_error(dx, dx_ref) < tolerance<T>());
  CHECK(rel_error(a.grad_block(), ref.grad_block()) < tolerance<T>());
  REQUIRE(peft_test::nontrivial(a.grad_block()));
}

TEMPLATE_TEST_CASE("miss merge and unmerge: bat inverts I + B_q (PEFT's unmerge), the others subtract", "[miss]", float,
                   double) {
  using T = TestType;
  peft::rng g(47);
  const ix in = 12, out = 8;
  const peft::dense<double> w0(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
  const auto x = peft_test::random_matrix<T>(2, in, g);
  for (const auto mode : {miss_mode::balance, miss_mode::mini, miss_mode::bat}) {
    INFO(peft::miss_mode_name(mode));
    const auto a = random_miss<T>(in, out, mode, 4, 2, g, 0.3);
    peft::adapted_linear<peft::dense<double>, peft::miss<T>> layer(w0);
    layer.add_adapter("a", a);
    peft::matrix<T> before(2, out), after(2, out);
    layer.forward(x, before);
    layer.merge("a");
    layer.forward(x, after);
    CHECK(rel_error(after, before) < tolerance<T>());
    peft::matrix<T> dw(out, in), added(out, in);
    a.unmerge_delta(layer.base(), dw.view());  // from the merged weight alone
    a.delta_weight(w0, added.view());
    CHECK(rel_error(dw, added) < 10 * tolerance<T>());
    layer.unmerge("a");
    CHECK(rel_error(layer.base().weight(), w0.weight()) < 10 * tolerance<T>());
  }
  // A singular I + B_q loses W0: unmerging says so.
  auto s = random_miss<T>(in, out, miss_mode::bat, 4, 0, g, 0.3);
  for (ix c = 0; c < 4; ++c) s.block()(1, c) = c == 1 ? T{-1} : T{0};  // row 1 of I + B_0 is zero
  peft::matrix<T> dw(out, in);
  CHECK_THROWS_WITH(s.unmerge_delta(w0, dw.view()), Catch::Contains("[miss::unmerge_delta]") && Catch::Contains("singular"));
}

TEMPLATE_TEST_CASE("miss init: zeros are an exact no-op in every mode; init_weights=False is kaiming-uniform", "[miss]",
                   float, double) {
  using T = TestType;
  peft::rng g(3);
  for (const auto mode : {miss_mode::balance, miss_mode::mini, miss_mode::bat}) {
    peft::miss<T> a(12, 8, {.rank = 4, .mode = mode, .mini_rank = 4});
    CHECK(a.block().rows() == (mode == miss_mode::bat ? 8 : 4));
    CHECK(a.block().cols() == (mode == miss_mode::balance ? 8 : 4));
    peft_test::check_identity_at_init(a, 3, g);
    CHECK(peft_test::nontrivial(a.grad_block()));  // training moves it off the identity
  }
  peft::miss<T> r(12, 16, {.rank = 4, .random_init = true, .seed = 9});
  double lo = 1, hi = -1;
  for (const T v : std::vector<T>(r.block().data(), r.block().data() + r.block().size())) {
    lo = std::min<double>(lo, v);
    hi = std::max<double>(hi, v);
  }
  CHECK(lo >= -0.25);  // 1 / sqrt(out)
  CHECK(hi <= 0.25);
  CHECK(hi - lo > 0.3);
  CHECK_THROWS_WITH((peft::miss<T>(12, 8, {.rank = 4, .mode = miss_mode::bat, .random_init = true})),
                    Catch::Contains("[miss::miss]") && Catch::Contains("balance"));
}

// ---- checkpoints and errors --------------------------------------------------------------------

TEST_CASE("miss checkpoints: init_weights selects the mode; shapes and fields that disagree are refused", "[miss][io]") {
  peft::rng g(5);
  const peft::io::checkpoint_tensors<double> none;
  auto cfg = [](const std::string& extra) {
    return peft::io::adapter_config::parse(R"({"peft_type": "MISS", "target_modules": ["layer"], "r": 4)" + extra + "}");
  };
  using codec = peft::io::peft_codec<peft::miss<double>>;
  CHECK(codec::handles(cfg("")));
  CHECK(codec::mode_of(cfg(R"(, "init_weights": false)")) == miss_mode::balance);
  CHECK(codec::mode_of(cfg(R"(, "init_weights": "bat")")) == miss_mode::bat);
  CHECK_THROWS_WITH(codec::mode_of(cfg(R"(, "init_weights": "pissa")")),
                    Catch::Contains("[miss::from_checkpoint]") && Catch::Contains("'init_weights'"));

  const auto bal = peft_test::random_tensors<double>("layer", {{"miss_block", {4, 6}}}, g);
  const auto bat = peft_test::random_tensors<double>("layer", {{"miss_block", {2, 4, 4}}}, g);
  const auto a = peft::io::from_checkpoint<peft::miss<double>>(cfg(""), bal, none);
  CHECK(a.mode() == miss_mode::balance);
  CHECK(a.out_features() == 6);
  const auto b = peft::io::from_checkpoint<peft::miss<double>>(cfg(R"(, "init_weights": "bat")"), bat, none);
  CHECK(b.block().rows() == 8);
  CHECK(b.out_features() == 8);
  const auto m = peft::io::from_checkpoint<peft::miss<double>>(cfg(R"(, "init_weights": "mini", "mini_r": 6)"), bal, none);
  CHECK(m.mini_rank() == 6);
  CHECK(m.out_features() == 0);
  auto bound = bal;
  bound.set_base_shape(std::pair<ix, ix>{6, 10});
  CHECK(peft::io::from_checkpoint<peft::miss<double>>(cfg(""), bound, none).in_features() == 10);
  bound.set_base_shape(std::pair<ix, ix>{7, 10});
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::miss<double>>(cfg(""), bound, none), peft::format_error);

  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::miss<double>>(cfg(R"(, "init_weights": "bat")"), bal, none),
                    Catch::Contains("[miss::from_checkpoint]") && Catch::Contains("[out / r, r, r]"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::miss<double>>(cfg(""), bat, none), Catch::Contains("[r, out_features]"));
  const auto r3 = peft::io::adapter_config::parse(R"({"peft_type": "MISS", "target_modules": ["layer"], "r": 3})");
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::miss<double>>(r3, bal, none), Catch::Contains("r = 3"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::miss<double>>(cfg(R"(, "init_weights": "mini", "mini_r": 5)"), bal, none),
                    Catch::Contains("mini_r = 5"));
  // Fields: bias and unknown non-default fields are refused by the shared rule; ours pass.
  const std::string_view* f = codec::config_fields;
  CHECK(std::find(f, f + std::size(codec::config_fields), "mini_r") != f + std::size(codec::config_fields));
  CHECK_NOTHROW(peft::io::check_config_fields(cfg(R"(, "mini_r": 3, "miss_dropout": 0.1, "init_weights": "bat")"),
                                              codec::config_fields, "miss"));
  CHECK_THROWS_WITH(peft::io::check_config_fields(cfg(R"(, "bias": "all")"), codec::config_fields, "miss"),
                    Catch::Contains("'bias'"));
  CHECK_THROWS_WITH(peft::io::check_config_fields(cfg(R"(, "miss_alpha": 2)"), codec::config_fields, "miss"),
                    Catch::Contains("[miss::from_checkpoint]") && Catch::Contains("'miss_alpha'"));

  // describe_in: one r, mode and mini_r per config.
  peft::io::adapter_config c;
  peft::io::describe_in(peft::miss<double>(8, 8, {.rank = 4, .mode = miss_mode::mini, .mini_rank = 2}), c, "l0");
  CHECK(c.peft_type == "MISS");
  CHECK(c.raw["init_weights"] == "mini");
  CHECK(c.raw["mini_r"] == 2);
  CHECK_THROWS_AS(peft::io::describe_in(peft::miss<double>(8, 8, {.rank = 4}), c, "l1"), peft::unsupported_error);
  CHECK_THROWS_AS(peft::io::describe_in(peft::miss<double>(8, 8, {.rank = 2, .mode = miss_mode::mini, .mini_rank = 2}), c, "l1"),
                  peft::unsupported_error);
}

TEMPLATE_TEST_CASE("miss rejects bad shapes and modes with clear errors", "[miss][errors]", float, double) {
  using T = TestType;
  peft::rng g(31);
  // PEFT's refusals: r > in_features, mini_r not dividing out, bat blocks not tiling the weight.
  CHECK_THROWS_WITH((peft::miss<T>(4, 6, {.rank = 5})), Catch::Contains("[miss::set_features]") && Catch::Contains("r = 5"));
  CHECK_THROWS_WITH((peft::miss<T>(8, 6, {.rank = 2, .mode = miss_mode::mini, .mini_rank = 4})), Catch::Contains("mini_r = 4"));
  CHECK_THROWS_WITH((peft::miss<T>(10, 8, {.rank = 4, .mode = miss_mode::bat})), Catch::Contains("r x r blocks"));
  CHECK_THROWS_AS((peft::miss<T>(10, 6, {.rank = 4, .mode = miss_mode::bat})), peft::shape_error);
  CHECK_THROWS_AS((peft::miss<T>(10, 6, {.rank = 0})), peft::shape_error);
  CHECK_THROWS_AS((peft::miss<T>(miss_mode::balance, 2, 0, std::vector<T>(5), 0, 3)), peft::shape_error);
  // Binding: the known side must agree.
  peft::miss<T> m(miss_mode::mini, 2, 3, std::vector<T>(6));
  CHECK_THROWS_AS(m.set_features(8, 7), peft::shape_error);
  m.set_features(8, 9);
  CHECK(m.bound());
  CHECK_THROWS_AS(m.set_features(8, 12), peft::shape_error);
  peft_test::check_unset_rejected<peft::miss<T>, peft::error>(peft::dense<T>(peft_test::random_matrix<T>(5, 7, g)));

  auto a = random_miss<T>(7, 5, miss_mode::balance, 3, 0, g);
  const peft::dense<T> w(peft_test::random_matrix<T>(5, 7, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 5, 8, "[miss::forward] base weight is (5, 8)"},
                                 {pass::forward, arg::x, 2, 6},
                                 {pass::add_term, arg::y, 2, 6},
                                 {pass::backward, arg::dx, 2, 6},
                                 {pass::backward_term, arg::dy, 2, 4},
                                 {pass::delta_weight, arg::dw, 5, 6, "[miss::delta_weight]"}});
}

}  // namespace test_miss
