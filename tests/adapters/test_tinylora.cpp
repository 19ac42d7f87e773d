// TinyLoRA: parity with HuggingFace PEFT 0.21.2 on tests/data/peft/tinylora (r 2, u 8) and
// tinylora_r4 (r 4, u 5, projection_seed 7), both weight_tying = 1 (one v shared by up and
// down): each layer's output and dx, the network's y and dL/dx, v's gradient (summed over both
// layers), merged weights; v shared and saved once; save round trips; PEFT's construction (the
// SVD of W0, up to the singular vectors' signs); the codec's refusals and errors; the passes
// against the materialised B R A.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "peft/adapters/tinylora.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft/tinylora.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_tinylora {

namespace {

namespace fs = std::filesystem;
using peft::index;

template <class T>
using golden_case = peft_test::golden_case<peft::tinylora<T>>;

const std::string v_grad_key = "grad.base_model.model.up.tinylora_v.default.0";

/// y = down(relu(up(x))) and dL/dx, both layers' gradients zeroed first.
template <class T>
std::pair<peft::matrix<T>, peft::matrix<T>> network(golden_case<T>& c, const peft::matrix<T>& x,
                                                    const peft::matrix<T>& gy) {
  peft::matrix<T> h(x.rows(), c.up.out_features()), a(h.rows(), h.cols()), y(x.rows(), c.down.out_features());
  c.up.forward(x, h);
  for (index i = 0; i < h.rows(); ++i)
    for (index j = 0; j < h.cols(); ++j) a(i, j) = h(i, j) > 0 ? h(i, j) : T{0};
  c.down.forward(a, y);
  peft::matrix<T> da(a.rows(), a.cols()), dx(x.rows(), x.cols());
  c.up.zero_grad();
  c.down.zero_grad();
  c.down.backward(a, gy, da);
  for (index i = 0; i < da.rows(); ++i)
    for (index j = 0; j < da.cols(); ++j) da(i, j) = h(i, j) > 0 ? da(i, j) : T{0};
  c.up.backward(x, da, dx);
  return {std::move(y), std::move(dx)};
}

/// Network, v's gradient, each layer alone and merge_and_unload against PEFT.
template <class T>
void check_case(golden_case<T>& c, double tol) {
  const auto x = c.ref_t("x");
  const auto gy = c.ref_t("grad_y");
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(gy));
  const auto [y, dx] = network<T>(c, x, gy);
  CHECK(peft_test::rel_error(y, c.ref("y")) < tol);
  CHECK(peft_test::rel_error(dx, c.ref("grad_x")) < tol);
  const auto& v = *c.up.adapter("default").v();
  REQUIRE(c.down.adapter("default").v().get() == &v);
  const auto g_ref = c.ref(v_grad_key);
  REQUIRE(peft_test::count_nonzero(g_ref) == g_ref.size());
  CHECK(peft_test::rel_error(v.grad, g_ref) < tol);
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto& layer = c.layer(name);
    const auto xi = c.ref_t("layer." + name + ".input");
    const auto gi = c.ref_t("layer." + name + ".grad_output");
    REQUIRE(peft_test::count_nonzero(xi) > xi.size() / 4);
    peft::matrix<T> yi(xi.rows(), layer.out_features()), yb(xi.rows(), layer.out_features()),
        dxi(xi.rows(), layer.in_features());
    layer.forward(xi, yi);
    layer.zero_grad();
    layer.backward(xi, gi, dxi);
    layer.base().matmul(peft::matrix_view<const T>(xi.view()), yb.view());
    const auto y_ref = c.ref("layer." + name + ".output");
    CHECK(peft_test::rel_error(yi, y_ref) < tol);
    REQUIRE(peft_test::rel_error(yb, y_ref) > 1e-3);  // the adapter is not a no-op
    CHECK(peft_test::rel_error(dxi, c.ref("layer." + name + ".grad_input")) < tol);
    // merge_and_unload: the delta on the exact double base, then into the f32 base.
    const auto w0 = c.base.template read_matrix<double>(name + ".weight");
    const auto w_ref = c.ref("merged." + name + ".weight");
    REQUIRE(peft_test::rel_error(w0, w_ref) > 1e-3);
    const peft::dense<double> exact(w0, c.base.template read<double>(name + ".bias"));
    peft::matrix<T> dw(layer.out_features(), layer.in_features());
    const auto& a = layer.adapter("default");
    a.delta_weight(exact, dw.view());
    CHECK(peft_test::rel_error(peft_test::add(w0, dw), w_ref) < tol);
    std::vector<T> db(static_cast<std::size_t>(layer.out_features()));
    CHECK_FALSE(a.delta_bias(exact, db.data()));
    layer.merge("default");
    CHECK(peft_test::rel_error(layer.base().weight(), w_ref) < 1e-6);
    const peft::matrix<float> b(1, layer.out_features(), layer.base().bias());
    CHECK(peft_test::exactly_equal(b, c.ref("merged." + name + ".bias")));
  }
}

/// Case `name`'s adapter copied to `dst` with base_model.tinylora_v.<g> added for g = 1 .. extra.
void with_extra_groups(const std::string& name, const fs::path& dst, int extra) {
  const auto src = peft_test::golden_dir(name) / "adapter";
  fs::create_directories(dst);
  fs::copy_file(src / "adapter_config.json", dst / "adapter_config.json", fs::copy_options::overwrite_existing);
  const auto f = peft::io::safetensors_file::open(src / "adapter_model.safetensors");
  peft::io::safetensors_writer w;
  for (const auto& t : f.tensors()) w.add(t.name, t.type, t.shape, f.bytes(t.name));
  const auto& sv = f.info("base_model.tinylora_v.0").shape;
  const std::vector<float> values(static_cast<std::size_t>(sv[0]), 0.25f);
  for (int g = 1; g <= extra; ++g) w.add("base_model.tinylora_v." + std::to_string(g), sv, std::span<const float>(values));
  w.write(dst / "adapter_model.safetensors");
}

}  // namespace

TEMPLATE_TEST_CASE("tinylora golden: layers, network, v's gradient and merge match PEFT (r 2, u 8)",
                   "[tinylora][golden]", float, double) {
  using T = TestType;
  golden_case<T> c("tinylora");
  const auto& up = c.up.adapter("default");
  REQUIRE(peft_test::nontrivial(up.v()->value));
  CHECK(up.rank() == 2);
  CHECK(up.u() == 8);
  check_case(c, peft_test::tolerance<T>());
}

TEMPLATE_TEST_CASE("tinylora golden: layers, network, v's gradient and merge match PEFT (r 4, u 5, seed 7)",
                   "[tinylora][golden]", float, double) {
  using T = TestType;
  golden_case<T> c("tinylora_r4");
  CHECK(c.up.adapter("default").rank() == 4);
  CHECK(c.down.adapter("default").u() == 5);
  check_case(c, peft_test::tolerance<T>());
}

TEST_CASE("tinylora: PEFT's construction is the rank-r truncated SVD of W0 with sqrt(S) on both sides",
          "[tinylora][init]") {
  golden_case<double> c("tinylora_r4");
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    const auto w0 = peft_test::load_base(c.base, name);
    const auto& stored = c.checkpoint.find(name + ".weight")->adapter;
    const peft::tinylora<double> fresh(peft::dense<double>(c.base.read_matrix<double>(name + ".weight")),
                                       {.rank = 4, .u = 5, .projection_seed = 7});
    REQUIRE(fresh.rank() == 4);
    CHECK(fresh.u() == 5);
    // v = 0: the identity.
    CHECK(peft_test::count_nonzero(fresh.v()->value) == 0);
    // PEFT's SVD is in float32 with LAPACK's signs: each row of A (and column of B) agrees up to
    // its sign, and B A (sign-free) agrees to float32's SVD accuracy.
    for (index k = 0; k < 4; ++k) {
      double same = 0, flip = 0, norm = 0;
      for (index j = 0; j < fresh.in_features(); ++j) {
        same += std::abs(fresh.A()(k, j) - stored.A()(k, j));
        flip += std::abs(fresh.A()(k, j) + stored.A()(k, j));
        norm += std::abs(stored.A()(k, j));
      }
      CHECK(std::min(same, flip) / norm < 1e-4);  // singular vectors: float32's accuracy over the gaps of S
    }
    peft::matrix<double> ba(fresh.out_features(), fresh.in_features()), ba_ref(ba.rows(), ba.cols());
    for (index i = 0; i < ba.rows(); ++i)
      for (index j = 0; j < ba.cols(); ++j)
        for (index k = 0; k < 4; ++k) {
          ba(i, j) += fresh.B()(i, k) * fresh.A()(k, j);
          ba_ref(i, j) += stored.B()(i, k) * stored.A()(k, j);
        }
    CHECK(peft_test::rel_error(ba, ba_ref) < 1e-5);
    REQUIRE(peft_test::rel_error(ba, w0.weight()) > 1e-2);  // a truncation, not W0 itself
    // P ~ N(0, 1/r): drawn from projection_seed + layer_index, not torch's stream.
    const peft::tinylora<double> again(w0, {.rank = 4, .u = 5, .projection_seed = 7});
    const peft::tinylora<double> next(w0, {.rank = 4, .u = 5, .projection_seed = 7, .layer_index = 1});
    CHECK(peft_test::exactly_equal(again.P(), fresh.P()));
    CHECK_FALSE(peft_test::exactly_equal(next.P(), fresh.P()));
  }
  // The rank is min(r, in, out); init_weights="uniform" draws v in [-bound, bound].
  peft::rng g(5);
  const auto small = peft_test::random_dense<double>(3, 7, g);
  const peft::tinylora<double> a(small, {.rank = 5, .u = 4, .init_uniform = true, .init_v_bound = 0.5, .seed = 3});
  CHECK(a.rank() == 3);
  CHECK(a.P().cols() == 9);
  CHECK(peft_test::count_nonzero(a.v()->value) == 4);
  for (const double e : a.v()->value.storage()) CHECK(std::abs(e) <= 0.5);
}

TEST_CASE("tinylora: v is shared by the modules, counted and saved once; save round trips", "[tinylora][shared][io]") {
  golden_case<double> c("tinylora");
  auto& up = c.checkpoint.find("up.weight")->adapter;
  auto& down = c.checkpoint.find("down.weight")->adapter;
  CHECK(up.v().get() == down.v().get());
  CHECK(c.up.adapter("default").v().get() == up.v().get());  // a copy shares it
  CHECK(c.checkpoint.parameter_count() == 8);                // PEFT's count: v once
  for (auto& p : up.parameters()) {
    INFO(p.name);
    CHECK(p.trainable == (p.name == "tinylora_v.0"));
    CHECK(p.shared == (p.name == "tinylora_v.0"));
  }
  const auto dir = peft_test::scratch_path("peft_tinylora_roundtrip");
  fs::remove_all(dir);
  peft::io::save_peft_checkpoint(dir, c.checkpoint);
  const auto saved = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
  const auto original =
      peft::io::safetensors_file::open(peft_test::golden_dir("tinylora") / "adapter" / "adapter_model.safetensors");
  std::vector<std::string> names, expected;
  for (const auto& t : saved.tensors()) names.push_back(t.name);
  for (const auto& t : original.tensors()) expected.push_back(t.name);
  std::sort(names.begin(), names.end());
  std::sort(expected.begin(), expected.end());
  CHECK(names == expected);
  for (const auto& n : expected) {
    INFO(n);
    CHECK(saved.info(n).shape == original.info(n).shape);
    CHECK(saved.read<double>(n) == original.read<double>(n));
  }
  const auto cfg = peft::io::adapter_config::load(dir);
  CHECK(cfg.peft_type == "TINYLORA");
  CHECK(cfg.r == 2);
  CHECK(cfg.raw["u"] == 8);
  CHECK(cfg.raw["weight_tying"] == 1.0);
  CHECK(cfg.raw["save_projection"] == true);
  auto back = peft::io::load_checkpoint_as<peft::tinylora<double>>(dir);
  CHECK(back.find("up.weight")->adapter.v().get() == back.find("down.weight")->adapter.v().get());
  for (const std::string layer : {"up", "down"}) {
    const auto w = peft_test::load_base(c.base, layer);
    const auto x = c.ref_t("layer." + layer + ".input");
    CHECK(peft_test::exactly_equal(peft_test::run_forward(back.find(layer + ".weight")->adapter, w, x),
                                   peft_test::run_forward(c.checkpoint.find(layer + ".weight")->adapter, w, x)));
  }
  // Fresh layers over one v carry their numbers into a fresh config.
  peft::rng g(9);
  const auto w1 = peft_test::random_dense<double>(6, 4, g), w2 = peft_test::random_dense<double>(4, 5, g);
  peft::tinylora<double> f1(w1, {.rank = 2, .u = 3, .init_uniform = true, .seed = 1});
  peft::tinylora<double> f2(w2, {.rank = 2, .u = 3, .layer_index = 1}, f1.v());
  peft::io::basic_peft_checkpoint<peft::tinylora<double>> f;
  f.add("a", f1);
  f.add("b", f2);
  auto fb = peft_test::save_and_load(f, "peft_tinylora_fresh");
  CHECK(fb.config.raw["u"] == 3);
  CHECK(fb.config.r == 2);
  CHECK(peft_test::rel_error(fb.find("b.weight")->adapter.P(), f2.P()) < 1e-7);  // saved as f32
  CHECK(peft_test::rel_error(fb.find("b.weight")->adapter.v()->value, f1.v()->value) < 1e-7);
  REQUIRE(peft_test::nontrivial(f1.v()->value));
  fs::remove_all(dir);
}

TEST_CASE("tinylora: refused configurations and malformed checkpoints", "[tinylora][errors][io]") {
  const auto dir = peft_test::scratch_path("peft_tinylora_malformed");
  auto keep = [](auto&) {};
  auto load = [&] { peft::io::load_checkpoint_as<peft::tinylora<double>>(dir); };
  auto rejects = [&](const std::function<void(nlohmann::ordered_json&)>& edit,
                     const std::map<std::string, std::pair<std::vector<std::int64_t>, std::vector<float>>>& tensors,
                     const std::vector<std::string>& drop, const std::string& expected) {
    fs::remove_all(dir);
    peft_test::rewrite_adapter("tinylora", dir, edit, tensors, drop);
    const auto msg = peft_test::message_of(load);
    INFO(msg);
    CHECK(msg.find(expected) != std::string::npos);
  };
  // Refusals (unsupported_error), each naming its reason.
  fs::remove_all(dir);
  peft_test::rewrite_adapter("tinylora", dir, [](auto& j) { j["save_projection"] = false; }, {},
                             {"base_model.model.up.tinylora_P", "base_model.model.down.tinylora_P"});
  CHECK(peft_test::message_of(load).rfind(
            "[tinylora::from_checkpoint] adapter_config.json: 'save_projection' = false: PEFT redraws tinylora_P", 0) ==
        0);
  CHECK_THROWS_AS(load(), peft::unsupported_error);
  rejects([](auto& j) { j["fan_in_fan_out"] = true; }, {}, {}, "'fan_in_fan_out' = true");
  rejects([](auto& j) { j["bias"] = "tinylora_only"; }, {}, {}, "'bias'");
  rejects([](auto& j) { j["use_magic"] = true; }, {}, {}, "'use_magic'");
  fs::remove_all(dir);
  with_extra_groups("tinylora", dir, 1);
  {
    const auto msg = peft_test::message_of(load);
    CHECK(msg.rfind("[tinylora::from_checkpoint] the checkpoint holds 2 tinylora_v groups", 0) == 0);
    CHECK_THROWS_AS(load(), peft::unsupported_error);
  }
  // Format errors.
  rejects([](auto& j) { j["r"] = 3; }, {}, {}, "r = 3");
  rejects([](auto& j) { j["u"] = 9; }, {}, {}, "u = 9");
  rejects([](auto& j) { j["weight_tying"] = 1.5; }, {}, {}, "weight_tying = 1.5");
  rejects(keep, {}, {"base_model.tinylora_v.0"}, "no base_model.tinylora_v.0");
  rejects(keep, {}, {"base_model.model.up.tinylora_P"}, "has no tinylora_P");
  rejects(keep, {}, {"base_model.model.up.tinylora_B"}, "tinylora_B");
  rejects(keep, {{"base_model.model.up.tinylora_P", {{8, 2, 3}, std::vector<float>(48, 0.5f)}}}, {},
          "expected (u, r, r)");
  rejects(keep, {{"base_model.model.up.tinylora_P", {{7, 2, 2}, std::vector<float>(28, 0.5f)}}}, {},
          "tinylora_P has 7 projections");
  rejects(keep, {{"base_model.model.up.tinylora_B", {{96, 3}, std::vector<float>(288, 0.5f)}}}, {},
          "are not (r, in) and (out, r)");
  rejects(keep, {{"base_model.tinylora_v.0", {{2, 4}, std::vector<float>(8, 0.1f)}}}, {}, "expected 1 dimensions");
  // The training-only fields pass.
  fs::remove_all(dir);
  peft_test::rewrite_adapter("tinylora", dir, [](auto& j) {
    j["tinylora_dropout"] = 0.1;
    j["init_v_bound"] = 0.5;
    j["init_weights"] = "uniform";
    j["projection_seed"] = 3;
  });
  CHECK_NOTHROW(load());
  // A module over a base of another shape.
  {
    peft::rng g(2);
    const auto cfg = peft_test::config_of("TINYLORA");
    peft::io::checkpoint_tensors<double> shared;
    shared.add("tinylora_v.0", peft_test::stored<double>({3}, g));
    auto m = peft_test::random_tensors<double>(
        "layer", {{"tinylora_A", {2, 6}}, {"tinylora_B", {4, 2}}, {"tinylora_P", {3, 2, 2}}}, g);
    using codec = peft::io::peft_codec<peft::tinylora<double>>;
    CHECK_NOTHROW(codec::from_checkpoint(cfg, m, shared));
    m.set_base_shape(std::pair<index, index>{4, 6});
    CHECK_NOTHROW(codec::from_checkpoint(cfg, m, shared));
    m.set_base_shape(std::pair<index, index>{4, 7});
    CHECK(peft_test::message_of([&] { codec::from_checkpoint(cfg, m, shared); }).find("the base is (4, 7)") !=
          std::string::npos);
  }
  // Modules that disagree on u cannot be saved under one TinyLoraConfig.
  {
    peft::rng g(4);
    const auto w = peft_test::random_dense<double>(6, 4, g);
    peft::io::basic_peft_checkpoint<peft::tinylora<double>> ck;
    ck.add("a", peft::tinylora<double>(w, {.rank = 2, .u = 3}));
    ck.add("b", peft::tinylora<double>(w, {.rank = 2, .u = 4}));
    const auto msg = peft_test::message_of([&] { peft::io::save_peft_checkpoint(dir, ck); });
    CHECK(msg.rfind("[tinylora::describe_in]", 0) == 0);
    CHECK(msg.find("u = 4") != std::string::npos);
  }
  fs::remove_all(dir);
}

TEST_CASE("tinylora: constructor errors, the passes' shape checks and the term B R A", "[tinylora][errors]") {
  using peft::matrix;
  auto v = std::make_shared<peft::tinylora_vector<double>>(matrix<double>(1, 3, {0.5, -1.0, 2.0}));
  peft::rng g(3);
  const auto a = peft_test::random_matrix<double>(2, 5, g);
  const auto b = peft_test::random_matrix<double>(4, 2, g);
  const auto p = peft_test::random_matrix<double>(3, 4, g);
  CHECK_NOTHROW(peft::tinylora<double>(a, b, p, v));
  CHECK_THROWS_AS(peft::tinylora<double>(a, b, p, nullptr), peft::shape_error);
  CHECK_THROWS_AS(peft::tinylora<double>(a, peft_test::random_matrix<double>(4, 3, g), p, v), peft::shape_error);
  CHECK(peft_test::message_of([&] { peft::tinylora<double>(a, b, peft_test::random_matrix<double>(3, 5, g), v); }) ==
        "[tinylora::tinylora] tinylora_P is (3, 5), expected (u >= 1, r r = 4)");
  CHECK_THROWS_AS(peft::tinylora<double>(a, b, peft_test::random_matrix<double>(2, 4, g), v), peft::shape_error);
  CHECK_THROWS_AS(peft::tinylora_vector<double>(matrix<double>(2, 3)), peft::shape_error);
  const auto w = peft_test::random_dense<double>(5, 4, g);
  CHECK_THROWS_AS(peft::tinylora<double>(w, {.rank = 0}), peft::shape_error);
  CHECK_THROWS_AS(peft::tinylora<double>(w, {.u = 0}), peft::shape_error);
  peft::tinylora<double> empty;
  CHECK(empty.parameters().empty());
  CHECK_THROWS_AS(empty.R(), peft::error);
  peft::tinylora<double> t(a, b, p, v);
  // R = 0.5 P_0 - P_1 + 2 P_2.
  const auto r = t.R();
  for (index k = 0; k < 4; ++k) CHECK(r.storage()[static_cast<std::size_t>(k)] == 0.5 * p(0, k) - p(1, k) + 2 * p(2, k));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(t, w, 2,
                                {{pass::forward, arg::x, 2, 6},
                                 {pass::forward, arg::y, 2, 7},
                                 {pass::backward, arg::dx, 2, 4},
                                 {pass::delta_weight, arg::dw, 3, 5},
                                 {pass::forward, arg::base, 6, 5, "[tinylora::forward] base weight is (6, 5)",
                                  peft_test::match::prefix}});
  peft_test::check_unset_rejected<peft::tinylora<double>, peft::error>(w);
  // forward, dx and delta_weight against the materialised dW = B R A, and dv_i = <B^T G A^T, P_i>
  // with G = gy^T x, the gradient of L = sum(y * gy) with respect to dW.
  const auto x = peft_test::random_matrix<double>(6, 5, g);
  const auto gy = peft_test::random_matrix<double>(6, 4, g);
  REQUIRE(peft_test::nontrivial(x));
  matrix<double> dW(4, 5), G(4, 5);
  for (index i = 0; i < 4; ++i)
    for (index j = 0; j < 5; ++j) {
      for (index q = 0; q < 2; ++q)
        for (index s = 0; s < 2; ++s) dW(i, j) += b(i, q) * r(q, s) * a(s, j);
      for (index n = 0; n < 6; ++n) G(i, j) += gy(n, i) * x(n, j);
    }
  t.zero_grad();
  peft_test::check_against_delta(t, w, x, gy, dW, 1e-13);
  matrix<double> dv(1, 3);
  for (index k = 0; k < 3; ++k)
    for (index q = 0; q < 2; ++q)
      for (index s = 0; s < 2; ++s)
        for (index i = 0; i < 4; ++i)
          for (index j = 0; j < 5; ++j) dv(0, k) += b(i, q) * G(i, j) * a(s, j) * p(k, q * 2 + s);
  REQUIRE(peft_test::nontrivial(dv));
  CHECK(peft_test::rel_error(v->grad, dv) < 1e-13);
}

}  // namespace test_tinylora
