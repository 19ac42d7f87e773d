// BEFT: parity with HuggingFace PEFT 0.21 (tests/data/peft/beft: beft_bias on up 64 -> 96 and
// down 96 -> 48), the passes against y = x W0^T + b0 + b written out, several adapters on one
// layer (PEFT sums their vectors), the merge into the bias (and into a base without one, which
// PEFT refuses and merge_model refuses as PEFT does), checkpoints (loading, binding, a save round
// trip, config fields) and errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <optional>
#include <span>
#include <string_view>
#include <tuple>
#include <utility>
#include <string>
#include <vector>

#include "peft/adapters/beft.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/io/merge.hpp"
#include "peft/io/peft/beft.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_beft {

using ix = peft::index;

namespace {

using peft_test::message_of;
using peft_test::rel_error;
using peft_test::tolerance;

/// Each layer alone: output, dL/dinput and beft_bias's gradient (PEFT's only one per layer).
template <class A>
void check_layers(peft_test::golden_case<A>& c, double tol) {
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    peft_test::check_layer_outputs(c, name, tol);
    CHECK(c.reference_gradients(name) == 1);
    peft_test::check_gradients(c, name, tol);
  }
}

/// merge_and_unload: the weight is PEFT's merged weight unchanged (W0), the bias b0 + b, from
/// delta_weight / delta_bias in the compute type over a double base and from adapted_linear::merge
/// into the f32 base.
template <class A>
void check_merge(peft_test::golden_case<A>& c) {
  using T = typename A::scalar;
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto& layer = c.layer(name);
    const ix out = layer.out_features(), in = layer.in_features();
    const auto w0 = c.base.template read_matrix<double>(name + ".weight");
    const auto b0 = c.base.template read<double>(name + ".bias");
    const auto w_ref = c.ref("merged." + name + ".weight");
    const peft::matrix<double> b_ref(1, out, c.reference.template read<double>("merged." + name + ".bias"));
    CHECK(peft_test::exactly_equal(w0, w_ref));  // PEFT's merge leaves the weight alone
    REQUIRE(rel_error(peft::matrix<double>(1, out, b0), b_ref) > 1e-2);  // and moves the bias
    const peft::dense<double> exact(w0, b0);
    const A& a = layer.adapter("default");
    peft::matrix<T> dw(out, in, T{1});
    a.delta_weight(exact, dw.view());
    CHECK(peft_test::count_nonzero(dw) == 0);
    std::vector<T> db(static_cast<std::size_t>(out));
    REQUIRE(a.delta_bias(exact, db.data()));
    CHECK(rel_error(peft_test::add(peft::matrix<double>(1, out, b0), peft::matrix<T>(1, out, db)), b_ref) < tolerance<T>());
    peft_test::check_merged_base(c, name, 1e-6);
  }
}

/// y = x W0^T + b0 + b in double.
template <class T, class S>
peft::matrix<double> reference_output(const peft::dense<S>& w, const peft::matrix<T>& x, const peft::beft<T>& a) {
  auto y = peft_test::ref_linear(x, w.weight(), w.bias());
  for (ix i = 0; i < y.rows(); ++i)
    for (ix j = 0; j < y.cols(); ++j) y(i, j) += static_cast<double>(a.bias()(0, j));
  return y;
}

template <class T>
peft::beft<T> random_beft(ix in, ix out, peft::rng& g) {
  peft::beft<T> a(in, out, {});
  peft_test::fill_random(a.bias(), g, -1.0, 1.0);
  return a;
}

peft::io::adapter_config beft_config(const std::string& extra = "") {
  return peft::io::adapter_config::parse(R"({"peft_type": "BEFT", "target_modules": ["layer"])" + extra + "}");
}

}  // namespace

// ---- golden parity ---------------------------------------------------------------------------

TEMPLATE_TEST_CASE("beft reproduces PEFT: layers, network, merged weights and biases", "[beft][golden]", float, double) {
  using A = peft::beft<TestType>;
  peft_test::check_golden<A>("beft", check_layers<A>, peft_test::check_network<A>, check_merge<A>);
}

TEST_CASE("beft golden checkpoint: beft_bias as stored, in_features from the base, PEFT's parameter count",
          "[beft][golden]") {
  const auto dir = peft_test::golden_dir("beft") / "adapter";
  const auto stored = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
  auto ck = peft::io::load_checkpoint_as<peft::beft<double>>(dir);
  REQUIRE(ck.modules.size() == 2);
  for (const auto& [name, out] : {std::pair<std::string, ix>{"up", 96}, std::pair<std::string, ix>{"down", 48}}) {
    INFO(name);
    auto& a = ck.find(name + ".weight")->adapter;
    CHECK(a.out_features() == out);
    CHECK(a.in_features() == 0);  // the tensor does not say it
    CHECK_FALSE(a.bound());
    const auto want = stored.read_matrix<double>("base_model.model." + name + ".beft_bias");
    REQUIRE(peft_test::nontrivial(want));
    CHECK(peft_test::exactly_equal(a.bias(), want));
    CHECK_THROWS_AS(a.bind(64, out + 1), peft::shape_error);
    a.bind(name == "up" ? 64 : 96, out);
    CHECK(a.bound());
    CHECK_THROWS_AS(a.bind(65, out), peft::shape_error);  // bound already, to another width
  }
  // Through the run-time variant and the loader's base shapes.
  const auto base = peft::io::safetensors_file::open(peft_test::golden_dir("beft") / "base_model.safetensors");
  auto any = peft::io::load_peft_checkpoint<double>(dir, [&](const std::string& m) -> std::optional<std::pair<ix, ix>> {
    const auto& s = base.info(m + ".weight").shape;
    return std::pair<ix, ix>{static_cast<ix>(s[0]), static_cast<ix>(s[1])};
  });
  CHECK(any.parameter_count() == 96 + 48);  // case.json's trainable_parameters
  CHECK(any.find("up.weight")->adapter.active_method() == "beft");
  CHECK(any.find("up.weight")->adapter.in_features() == 64);
  CHECK(any.find("down.weight")->adapter.in_features() == 96);
}

TEMPLATE_TEST_CASE("beft golden checkpoint saved and loaded back: tensors and PEFT's config fields", "[beft][golden][io]",
                   float, double) {
  using T = TestType;
  auto ck = peft::io::load_checkpoint_as<peft::beft<T>>(peft_test::golden_dir("beft") / "adapter");
  auto back = peft_test::save_and_load(ck, "peft_beft_roundtrip");
  CHECK(back.config.peft_type == "BEFT");
  CHECK(back.config.raw["init_weights"] == true);
  CHECK(back.config.raw["target_modules"] == ck.config.raw["target_modules"]);
  const auto json = back.config.to_json();
  CHECK_FALSE(json.contains("r"));  // BeftConfig has no r (nor LoRA's other fields)
  CHECK_FALSE(json.contains("lora_alpha"));
  REQUIRE(back.modules.size() == 2);
  for (auto& m : ck.modules) {
    INFO(m.weight_name);
    auto pa = m.adapter.parameters();
    auto pb = back.find(m.weight_name)->adapter.parameters();
    REQUIRE(pb.size() == 1);
    CHECK(pb[0].name == "beft_bias");
    CHECK(pb[0].shape == std::vector<std::int64_t>{1, m.adapter.out_features()});  // PEFT's (1, out)
    CHECK(rel_error(pb[0].value, pa[0].value) == 0.0);  // f32 in, f32 out
  }
  // A config made in C++ says what PEFT's BeftConfig says.
  peft::io::adapter_config c;
  peft::io::describe_in(peft::beft<T>(4, 6, {}), c, "layer");
  CHECK(c.peft_type == "BEFT");
  CHECK(c.raw["init_weights"] == true);
  CHECK_FALSE(c.to_json().contains("r"));
}

// ---- the passes against the definition -------------------------------------------------------

TEMPLATE_TEST_CASE("beft forward, dx, gradient, terms and merge equal x W0^T + b0 + b", "[beft]", float, double) {
  using T = TestType;
  peft::rng g(83);
  for (const auto& [in, out, batch] : {std::tuple<ix, ix, ix>{9, 12, 3}, std::tuple<ix, ix, ix>{1, 5, 1},
                                       std::tuple<ix, ix, ix>{17, 1, 4}}) {
    INFO("in " << in << " out " << out << " batch " << batch);
    const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
    const auto x = peft_test::random_matrix<T>(batch, in, g);
    const auto gy = peft_test::random_matrix<T>(batch, out, g);
    REQUIRE(peft_test::nontrivial(x));
    REQUIRE(peft_test::nontrivial(gy));
    auto a = random_beft<T>(in, out, g);
    REQUIRE(peft_test::nontrivial(a.bias()));
    typename peft::beft<T>::cache_type cache;
    peft::matrix<T> y(batch, out), dx(batch, in);
    a.forward(w, x.view(), y.view(), cache);
    CHECK(rel_error(y, reference_output(w, x, a)) < tolerance<T>());
    a.zero_grad();
    a.backward(w, x.view(), gy.view(), dx.view(), cache);
    CHECK(rel_error(dx, peft_test::ref_nn(gy, w.weight())) < tolerance<T>());  // b does not read x
    CHECK(rel_error(a.grad_bias(), peft_test::column_sums(gy)) < tolerance<T>());
    // The term form: y = h + b; the term reads neither h nor x.
    const auto h = peft_test::convert_matrix<T>(peft_test::ref_linear(x, w.weight(), w.bias()));
    peft::matrix<T> yt = h, dh = gy, dxt(batch, in);
    a.add_term(w, x.view(), h.view(), yt.view(), cache);
    CHECK(rel_error(yt, reference_output(w, x, a)) < tolerance<T>());
    a.zero_grad();
    a.backward_term(w, x.view(), h.view(), gy.view(), dh.view(), dxt.view(), cache);
    CHECK(peft_test::exactly_equal(dh, gy));
    CHECK(peft_test::count_nonzero(dxt) == 0);
    CHECK(rel_error(a.grad_bias(), peft_test::column_sums(gy)) < tolerance<T>());
    // Merging: dW = 0, db = b.
    peft::matrix<T> dw(out, in, T{1});
    a.delta_weight(w, dw.view());
    CHECK(peft_test::count_nonzero(dw) == 0);
    std::vector<T> db(static_cast<std::size_t>(out));
    REQUIRE(a.delta_bias(w, db.data()));
    CHECK(peft_test::exactly_equal(peft::matrix<T>(1, out, db), a.bias()));
  }
}

TEMPLATE_TEST_CASE("beft over a quantized base adds b to the quantized product", "[beft]", float, double) {
  using T = TestType;
  peft::rng g(89);
  const ix in = 40, out = 16;
  const auto q = peft::int8_rowwise::quantize(peft::matrix_view<const double>(peft_test::random_matrix<double>(out, in, g).view()));
  peft::matrix<double> w0(out, in);
  for (ix i = 0; i < out; ++i) q.dequantize_row(i, w0.row(i));
  const peft::dense<double> exact(w0);
  const auto a = random_beft<T>(in, out, g);
  const auto x = peft_test::random_matrix<T>(3, in, g);
  CHECK(rel_error(peft_test::run_forward(a, q, x), peft_test::run_forward(a, exact, x)) < tolerance<T>());
  CHECK(rel_error(peft_test::run_forward(a, q, x), reference_output(exact, x, a)) < tolerance<T>());
}

TEMPLATE_TEST_CASE("beft: several adapters on one layer add their vectors, as PEFT sums them", "[beft]", float, double) {
  using T = TestType;
  peft::rng g(97);
  const ix in = 6, out = 10, batch = 3;
  const peft::dense<double> w0(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  const auto a = random_beft<T>(in, out, g), b = random_beft<T>(in, out, g);
  peft::beft<T> sum(in, out, {});
  for (ix j = 0; j < out; ++j) sum.bias()(0, j) = a.bias()(0, j) + b.bias()(0, j);
  peft::adapted_linear<peft::dense<double>, peft::beft<T>> layer(w0);
  layer.add_adapter("a", a);
  layer.add_adapter("b", b);
  peft::matrix<T> y(batch, out), dx(batch, in);
  layer.forward(x, y);
  CHECK(rel_error(y, reference_output(w0, x, sum)) < tolerance<T>());
  layer.zero_grad();
  layer.backward(x, gy, dx);
  CHECK(rel_error(dx, peft_test::ref_nn(gy, w0.weight())) < tolerance<T>());
  for (const auto& p : layer.parameters()) {
    INFO(p.name);
    CHECK(rel_error(p.grad, peft_test::column_sums(gy)) < tolerance<T>());
  }
  // Merge one, then the other: the output stays; unmerging restores b0 and W0.
  layer.merge("a");
  peft::matrix<T> y1(batch, out);
  layer.forward(x, y1);
  CHECK(rel_error(y1, y) < tolerance<T>());
  CHECK(peft_test::exactly_equal(layer.base().weight(), w0.weight()));
  layer.merge("b");
  layer.forward(x, y1);
  CHECK(rel_error(y1, y) < tolerance<T>());
  layer.unmerge("b");
  layer.unmerge("a");
  CHECK(rel_error(peft::matrix<double>(1, out, layer.base().bias()), peft::matrix<double>(1, out, w0.bias())) <
        10 * tolerance<T>());
  CHECK(peft_test::exactly_equal(layer.base().weight(), w0.weight()));
}

TEMPLATE_TEST_CASE("beft init: b = 0 is an exact no-op that learns; init_weights=False draws N(0, 1)", "[beft]", float,
                   double) {
  using T = TestType;
  peft::rng g(5);
  peft::beft<T> a(10, 12, {});
  CHECK(peft_test::count_nonzero(a.bias()) == 0);
  peft_test::check_identity_at_init(a, 3, g);
  CHECK(peft_test::count_nonzero(a.grad_bias()) == 12);  // every output's bias has a gradient
  peft::beft<T> r(10, 400, {.random_init = true, .seed = 4});
  const auto m = peft_test::moments_of(r.bias());
  CHECK(std::abs(m.mean) < 0.2);
  CHECK(std::abs(m.mean_square - 1.0) < 0.2);
  peft_test::check_not_base(r, peft_test::random_dense<T>(10, 400, g), peft_test::random_matrix<T>(3, 10, g), 1e-2);
  const peft::beft<T> same(10, 400, {.random_init = true, .seed = 4});
  CHECK(peft_test::exactly_equal(same.bias(), r.bias()));  // the seed decides the draw
}

// ---- merging into a base without a bias --------------------------------------------------------

TEMPLATE_TEST_CASE("beft merges into a base without a bias by giving it one; merge_model refuses, as PEFT does",
                   "[beft][merge]", float, double) {
  using T = TestType;
  peft::rng g(101);
  const ix in = 5, out = 7;
  const peft::dense<double> nb(peft_test::random_matrix<double>(out, in, g));
  REQUIRE_FALSE(nb.has_bias());
  const auto a = random_beft<T>(in, out, g);
  const auto x = peft_test::random_matrix<T>(2, in, g);
  peft::adapted_linear<peft::dense<double>, peft::beft<T>> layer(nb);
  layer.add_adapter("a", a);
  peft::matrix<T> before(2, out), after(2, out);
  layer.forward(x, before);
  layer.merge("a");
  REQUIRE(layer.base().has_bias());
  CHECK(rel_error(peft::matrix<double>(1, out, layer.base().bias()), a.bias()) < tolerance<T>());
  layer.forward(x, after);
  CHECK(rel_error(after, before) < tolerance<T>());

  // The offline merge writes the base file's tensors: with no '<module>.bias' there is nowhere to
  // put b (PEFT: "Base layer has no bias, cannot merge bias adapter").
  namespace fs = std::filesystem;
  const auto dir = peft_test::scratch_path("peft_beft_no_bias");
  fs::remove_all(dir);
  fs::create_directories(dir);
  const auto src = peft::io::safetensors_file::open(peft_test::golden_dir("beft") / "base_model.safetensors");
  peft::io::safetensors_writer wr;
  for (const auto& t : src.tensors()) {
    if (t.name.ends_with(".weight")) wr.add(t.name, t.type, t.shape, src.bytes(t.name));
  }
  wr.write(dir / "base.safetensors");
  const std::string msg = message_of([&] {
    peft::io::merge_model(dir / "base.safetensors", peft_test::golden_dir("beft") / "adapter", dir / "merged.safetensors", {});
  });
  CHECK(msg.starts_with("[merge_model] module 'down': its beft adapter adds to the bias"));
  CHECK(msg.find("the base has no 'down.bias'") != std::string::npos);
  CHECK_FALSE(fs::exists(dir / "merged.safetensors"));
  fs::remove_all(dir);
}

// ---- checkpoints and errors --------------------------------------------------------------------

TEMPLATE_TEST_CASE("beft checkpoints: beft_bias must be [1, out]; the base's shape binds it", "[beft][io]", float, double) {
  using T = TestType;
  peft::rng g(7);
  const peft::io::checkpoint_tensors<T> none;
  const auto one = [&](std::vector<std::int64_t> shape) {
    return peft_test::random_tensors<T>("layer", {{"beft_bias", std::move(shape)}}, g);
  };
  const auto ok = peft::io::from_checkpoint<peft::beft<T>>(beft_config(), one({1, 12}), none);
  CHECK(ok.out_features() == 12);
  CHECK(ok.in_features() == 0);
  auto bound = one({1, 12});
  bound.set_base_shape(std::pair<ix, ix>{12, 7});
  CHECK(peft::io::from_checkpoint<peft::beft<T>>(beft_config(), bound, none).in_features() == 7);
  bound.set_base_shape(std::pair<ix, ix>{13, 7});
  CHECK(message_of([&] { peft::io::from_checkpoint<peft::beft<T>>(beft_config(), bound, none); }) ==
        "[beft::from_checkpoint] module 'layer': beft_bias has 12 values, the base has 13 outputs");
  for (const auto& shape : {std::vector<std::int64_t>{12}, std::vector<std::int64_t>{2, 6}, std::vector<std::int64_t>{12, 1},
                            std::vector<std::int64_t>{1, 1, 12}}) {
    INFO(peft::io::detail::shape_text(shape));
    CHECK(message_of([&] { peft::io::from_checkpoint<peft::beft<T>>(beft_config(), one(shape), none); })
              .starts_with("[beft::from_checkpoint] module 'layer': beft_bias is " + peft::io::detail::shape_text(shape) +
                           ", expected [1, out_features]"));
  }
  const peft::io::checkpoint_tensors<T> empty("layer");
  CHECK(message_of([&] { peft::io::from_checkpoint<peft::beft<T>>(beft_config(), empty, none); })
            .find("'beft_bias'") != std::string::npos);
}

TEST_CASE("beft checkpoints: config fields honoured or refused by name", "[beft][io]") {
  namespace fs = std::filesystem;
  const auto dir = peft_test::scratch_path("peft_beft_fields");
  auto load_with = [&](const char* key, nlohmann::ordered_json v) {
    fs::remove_all(dir);
    peft_test::rewrite_adapter("beft", dir, [&](nlohmann::ordered_json& c) { c[key] = v; });
    return message_of([&] { peft::io::load_peft_checkpoint<double>(dir); });
  };
  CHECK(load_with("init_weights", false).empty());  // b's initial value only; the tensor holds the trained one
  CHECK(load_with("modules_to_save", nullptr).empty());
  CHECK(load_with("target_modules", nlohmann::ordered_json::array({"up", "down", "other"})).empty());
  // BeftConfig has no other field: anything else with a value is refused, named.
  CHECK(load_with("r", 8).starts_with("[beft::from_checkpoint] adapter_config.json: 'r' = 8:"));
  CHECK(load_with("beft_scale", 2).starts_with("[beft::from_checkpoint] adapter_config.json: 'beft_scale' = 2:"));
  CHECK(load_with("bias", "all").starts_with("[beft::from_checkpoint] adapter_config.json: 'bias'"));
  CHECK(load_with("fan_in_fan_out", true).starts_with("[beft::from_checkpoint] adapter_config.json: 'fan_in_fan_out'"));
  CHECK(load_with("r", nullptr).empty());  // a default value says nothing
  fs::remove_all(dir);
  // The golden case's own config passes the rule field by field.
  CHECK_NOTHROW(peft::io::check_config_fields(
      peft::io::adapter_config::load(peft_test::golden_dir("beft") / "adapter"),
      std::span<const std::string_view>(peft::io::peft_codec<peft::beft<double>>::config_fields), "beft"));
}

TEMPLATE_TEST_CASE("beft rejects bad shapes, an unbound or empty adapter, with clear errors", "[beft][errors]", float,
                   double) {
  using T = TestType;
  using peft_test::arg;
  using peft_test::pass;
  peft::rng g(31);
  auto a = random_beft<T>(7, 4, g);
  const peft::dense<T> w(peft_test::random_matrix<T>(4, 7, g), peft_test::random_vector<T>(4, g));
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 4, 8, "[beft::forward] base weight is (4, 8)"},
                                 {pass::forward, arg::base, 5, 7, "[beft::forward] base weight is (5, 7)"},
                                 {pass::forward, arg::x, 2, 6},
                                 {pass::forward, arg::y, 2, 5},
                                 {pass::add_term, arg::y, 2, 3, "[beft::add_term]"},
                                 {pass::backward, arg::dy, 2, 5, "[beft::backward]"},
                                 {pass::backward, arg::dx, 2, 6},
                                 {pass::backward_term, arg::dx, 2, 6, "[beft::backward_term]"},
                                 {pass::delta_weight, arg::dw, 4, 6, "[beft::delta_weight]"}});
  std::vector<T> db(4);
  const peft::dense<T> wide(peft_test::random_matrix<T>(4, 8, g));
  CHECK(message_of([&] { a.delta_bias(wide, db.data()); }).starts_with("[beft::delta_bias] base weight is (4, 8)"));

  peft_test::check_unset_rejected<peft::beft<T>, peft::error>(w);
  CHECK(message_of([] { peft::beft<T>(0, 4, {}); }) == "[beft::beft] the layer is (4, 0), both sides must be >= 1");
  CHECK(message_of([] { peft::beft<T>(3, 0, {}); }) == "[beft::beft] the layer is (0, 3), both sides must be >= 1");
  CHECK_THROWS_AS(peft::beft<T>(std::vector<T>{}), peft::shape_error);
  CHECK_THROWS_AS(peft::beft<T>(std::vector<T>(3), -1), peft::shape_error);
  CHECK(message_of([] { peft::beft<T>().bind(3, 4); }) == "[beft::bind] the adapter is default-constructed");

  // An adapter loaded without the base's shape runs once bound.
  peft::beft<T> unbound(std::vector<T>(4, T{1}));
  const auto x = peft_test::random_matrix<T>(2, 7, g);
  peft::matrix<T> y(2, 4), dx(2, 7);
  typename peft::beft<T>::cache_type cache;
  CHECK(message_of([&] { unbound.forward(w, x.view(), y.view(), cache); })
            .starts_with("[beft::forward] the adapter is not bound to a layer"));
  CHECK(message_of([&] { unbound.backward(w, x.view(), y.view(), dx.view(), cache); }).starts_with("[beft::backward]"));
  CHECK(message_of([&] { unbound.delta_bias(w, db.data()); }).starts_with("[beft::delta_bias] the adapter is not bound"));
  unbound.set_features(7, 4);
  unbound.forward(w, x.view(), y.view(), cache);
  CHECK(rel_error(y, reference_output(w, x, unbound)) < tolerance<T>());
}

}  // namespace test_beft
