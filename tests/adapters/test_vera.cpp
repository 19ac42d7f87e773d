// VeRA: parity with HuggingFace PEFT 0.21 (tests/data/peft/vera: the two-layer MLP, up 64 -> 96,
// down 96 -> 48, projections vera_A (16, 96), vera_B (96, 16) shared by both layers), sharing of
// the projections (one object, never copied, saved once), slicing for layers smaller than the
// projections, identity at init, and the errors: save_projection=false, malformed shapes.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>

#include "peft/io/peft/vera.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/vera.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace {

namespace fs = std::filesystem;
using peft_test::load_base;
using peft_test::load_bound;
using peft_test::message_of;
using peft_test::rel_error;
using peft_test::rewrite_adapter;
using peft_test::scratch_dir;
using peft_test::tolerance;

const fs::path case_dir = peft_test::golden_dir("vera");

template <class T>
using layer_t = peft::adapted_linear<peft::dense<float>, peft::vera<T>>;
template <class T>
using golden_case = peft_test::golden_case<peft::vera<T>>;

}  // namespace

TEMPLATE_TEST_CASE("vera golden: each layer's output, dx and lambda gradients match PEFT", "[vera][golden]", float,
                   double) {
  using T = TestType;
  const double tol = tolerance<T>();
  golden_case<T> c("vera");
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    const auto& a = c.layer(name).adapter("default");
    REQUIRE(peft_test::nontrivial(a.lambda_b()));  // the golden adapter is not the identity
    REQUIRE(peft_test::nontrivial(a.lambda_d()));
    const auto r = peft_test::run_layer(c, name);
    const auto y_ref = c.ref("layer." + name + ".output");
    CHECK(rel_error(r.y, y_ref) < tol);
    CHECK(rel_error(r.y_base, y_ref) > 1e-3);  // the adapter's term is a visible part of the output
    CHECK(rel_error(r.dx, c.ref("layer." + name + ".grad_input")) < tol);
    const std::string key = "grad.base_model.model." + name;
    CHECK(rel_error(a.grad_lambda_b(), c.ref(key + ".vera_lambda_b.default")) < tol);
    CHECK(rel_error(a.grad_lambda_d(), c.ref(key + ".vera_lambda_d.default")) < tol);
  }
}

TEMPLATE_TEST_CASE("vera golden: the two-layer network's output, dL/dx and gradients match PEFT", "[vera][golden]",
                   float, double) {
  using T = TestType;
  const double tol = tolerance<T>();
  golden_case<T> c("vera");
  peft_test::check_network_outputs(c, tol);
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    const auto& ad = c.layer(name).adapter("default");
    const std::string key = "grad.base_model.model." + name;
    CHECK(rel_error(ad.grad_lambda_b(), c.ref(key + ".vera_lambda_b.default")) < tol);
    CHECK(rel_error(ad.grad_lambda_d(), c.ref(key + ".vera_lambda_d.default")) < tol);
  }
}

TEMPLATE_TEST_CASE("vera golden: delta_weight and merge give PEFT's merged weights", "[vera][golden][merge]", float,
                   double) {
  using T = TestType;
  golden_case<T> c("vera");
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto& layer = c.layer(name);
    const auto w0 = peft_test::to_double(layer.base().weight());
    // delta_weight in the compute type, added in double: the reference is exact in double.
    peft::matrix<T> dw(layer.out_features(), layer.in_features());
    layer.adapter("default").delta_weight(layer.base(), dw.view());
    REQUIRE(peft_test::max_abs(dw) > 1e-4);
    peft::matrix<double> sum = w0;
    for (peft::index i = 0; i < sum.rows(); ++i)
      for (peft::index j = 0; j < sum.cols(); ++j) sum(i, j) += static_cast<double>(dw(i, j));
    CHECK(rel_error(sum, c.ref("merged." + name + ".weight")) < tolerance<T>());
    peft_test::check_merged_base(c, name, 1e-7);  // the bias is untouched
  }
}

TEST_CASE("vera: the projections are shared, never copied", "[vera][shared]") {
  const auto base = peft::io::safetensors_file::open(case_dir / "base_model.safetensors");
  auto ck = load_bound<peft::vera<double>>(case_dir / "adapter", base);
  auto& up = ck.find("up.weight")->adapter;
  auto& down = ck.find("down.weight")->adapter;
  // One object for both modules, and the slices are views into it.
  REQUIRE(up.shared_A() != nullptr);
  CHECK(up.shared_A().get() == down.shared_A().get());
  CHECK(up.shared_B().get() == down.shared_B().get());
  CHECK(up.A_slice().data() == up.shared_A()->data());
  CHECK(down.B_slice().data() == up.shared_B()->data());
  const long owners = up.shared_A().use_count();
  CHECK(owners == 2);
  // Copying an adapter (adapted_linear::add_adapter takes a copy) shares, it does not copy.
  layer_t<double> layer(load_base(base, "up"));
  const auto& held = layer.add_adapter("default", up);
  CHECK(held.shared_A().get() == up.shared_A().get());
  CHECK(held.A_slice().data() == up.shared_A()->data());
  CHECK(up.shared_A().use_count() == owners + 1);
  // parameters(): the whole projections, shared and frozen; the lambdas trainable and own.
  for (auto& p : up.parameters()) {
    INFO(p.name);
    if (p.name == "vera_A" || p.name == "vera_B") {
      CHECK(p.shared);
      CHECK_FALSE(p.trainable);
      CHECK(p.grad.empty());
      CHECK(p.value.data() == (p.name == "vera_A" ? up.shared_A()->data() : up.shared_B()->data()));
    } else {
      CHECK(p.trainable);
      CHECK_FALSE(p.shared);
    }
  }
  CHECK(ck.parameter_count() == 96 + 16 + 48 + 16);  // trainable only (the projections are frozen)
  // Changing the projection through one module changes what the other computes.
  peft::matrix<double> dw0(48, 96), dw1(48, 96);
  const auto w_down = load_base(base, "down");
  down.delta_weight(w_down, dw0.view());
  for (auto& p : up.parameters()) {
    if (p.name == "vera_A") p.value(0, 70) += 1.0;  // column 70: beyond up's 64 inputs, inside down's 96
  }
  down.delta_weight(w_down, dw1.view());
  CHECK(rel_error(dw1, dw0) > 1e-6);
}

TEST_CASE("vera: save_peft_checkpoint writes the projections once and reloads to identical outputs",
          "[vera][shared][io]") {
  const auto base = peft::io::safetensors_file::open(case_dir / "base_model.safetensors");
  const auto reference = peft::io::safetensors_file::open(case_dir / "reference.safetensors");
  auto ck = load_bound<peft::vera<double>>(case_dir / "adapter", base);
  const auto dir = scratch_dir("peft_vera_roundtrip");
  fs::remove_all(dir);
  peft::io::save_peft_checkpoint(dir, ck);
  const auto saved = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
  std::vector<std::string> names;
  for (const auto& t : saved.tensors()) names.push_back(t.name);
  std::sort(names.begin(), names.end());
  CHECK(names == std::vector<std::string>{"base_model.model.down.vera_lambda_b", "base_model.model.down.vera_lambda_d",
                                          "base_model.model.up.vera_lambda_b", "base_model.model.up.vera_lambda_d",
                                          "base_model.vera_A", "base_model.vera_B"});
  CHECK(saved.info("base_model.vera_A").shape == std::vector<std::int64_t>{16, 96});
  CHECK(saved.info("base_model.vera_B").shape == std::vector<std::int64_t>{96, 16});
  const auto original = peft::io::safetensors_file::open(case_dir / "adapter" / "adapter_model.safetensors");
  for (const auto& n : names) {
    INFO(n);
    CHECK(saved.read<float>(n) == original.read<float>(n));  // f32 in, f32 out: bit-exact
  }
  const auto cfg = peft::io::adapter_config::load(dir);
  CHECK(cfg.peft_type == "VERA");
  CHECK(cfg.r == 16);
  CHECK(cfg.raw["save_projection"] == true);
  CHECK(cfg.raw["d_initial"] == 0.1);
  CHECK(cfg.raw["projection_prng_key"] == 1234);  // kept from the loaded config

  auto back = load_bound<peft::vera<double>>(dir, base);
  CHECK(back.find("up.weight")->adapter.shared_A().get() == back.find("down.weight")->adapter.shared_A().get());
  for (const std::string name : {"up", "down"}) {
    INFO(name);
    const auto w = load_base(base, name);
    const auto x = reference.read_matrix<double>("layer." + name + ".input");
    peft::matrix<double> y0(x.rows(), w.out_features()), y1(x.rows(), w.out_features());
    peft::vera<double>::cache_type c0, c1;
    ck.find(name + ".weight")->adapter.forward(w, x.view(), y0.view(), c0);
    back.find(name + ".weight")->adapter.forward(w, x.view(), y1.view(), c1);
    CHECK(peft_test::exactly_equal(y1, y0));
  }
  fs::remove_all(dir);
}

TEMPLATE_TEST_CASE("vera: layers smaller than the projections use their leading slices", "[vera][slicing]", float,
                   double) {
  using T = TestType;
  peft::rng g(77);
  const std::vector<std::pair<peft::index, peft::index>> layers{{9, 4}, {5, 11}, {12, 7}};  // (in, out)
  const auto p = peft::make_vera_projections<T>(6, layers, 42);
  REQUIRE(p.A->rows() == 6);
  REQUIRE(p.A->cols() == 12);  // max in
  REQUIRE(p.B->rows() == 11);  // max out
  REQUIRE(p.B->cols() == 6);
  for (auto [in, out] : layers) {
    INFO("in " << in << " out " << out);
    peft::vera<T> a(p.A, p.B, in, out, peft_test::random_vector<T>(6, g), peft_test::random_vector<T>(out, g));
    CHECK(a.A_slice().stride() == 12);
    CHECK(a.A_slice().cols() == in);
    CHECK(a.B_slice().rows() == out);
    // Reference: explicit copies of A[:, :in] and B[:out, :], plain loops in double.
    peft::matrix<double> as(6, in), bs(out, 6);
    for (peft::index k = 0; k < 6; ++k)
      for (peft::index j = 0; j < in; ++j) as(k, j) = static_cast<double>((*p.A)(k, j));
    for (peft::index i = 0; i < out; ++i)
      for (peft::index k = 0; k < 6; ++k) bs(i, k) = static_cast<double>((*p.B)(i, k));
    const peft::dense<T> w(peft_test::random_matrix<T>(out, in, g), peft_test::random_vector<T>(out, g));
    const auto x = peft_test::random_matrix<T>(3, in, g);
    REQUIRE(peft_test::nontrivial(x));
    auto t = peft_test::ref_nt(x, as);  // (3, r)
    for (peft::index i = 0; i < 3; ++i)
      for (peft::index k = 0; k < 6; ++k) t(i, k) *= static_cast<double>(a.lambda_d()(0, k));
    auto z = peft_test::ref_nt(t, bs);  // (3, out)
    auto y_ref = peft_test::ref_nt(x, w.weight());
    for (peft::index i = 0; i < 3; ++i)
      for (peft::index j = 0; j < out; ++j)
        y_ref(i, j) += static_cast<double>(w.bias()[static_cast<std::size_t>(j)]) +
                       static_cast<double>(a.lambda_b()(0, j)) * z(i, j);
    peft::matrix<T> y(3, out);
    typename peft::vera<T>::cache_type cache;
    a.forward(w, x.view(), y.view(), cache);
    CHECK(rel_error(y, y_ref) < (std::is_same_v<T, double> ? 1e-14 : 1e-6));
  }
}

TEMPLATE_TEST_CASE("vera: a fresh adapter is the identity (lambda_b = 0, lambda_d = d_initial)", "[vera][init]", float,
                   double) {
  using T = TestType;
  peft::rng g(5);
  const auto p = peft::make_vera_projections<T>(8, {{10, 6}, {20, 30}}, 3);
  peft::vera<T> a(p, 10, 6, 0.25);
  for (peft::index k = 0; k < 8; ++k) CHECK(a.lambda_d()(0, k) == static_cast<T>(0.25));
  CHECK(peft_test::count_nonzero(a.lambda_b()) == 0);
  const peft::dense<T> w(peft_test::random_matrix<T>(6, 10, g), peft_test::random_vector<T>(6, g));
  const auto x = peft_test::random_matrix<T>(4, 10, g);
  REQUIRE(peft_test::nontrivial(x));
  peft::matrix<T> y(4, 6), h(4, 6);
  typename peft::vera<T>::cache_type cache;
  a.forward(w, x.view(), y.view(), cache);
  w.matmul(peft::matrix_view<const T>(x.view()), h.view());
  CHECK(peft_test::exactly_equal(y, h));
  // ... yet lambda_b gets a gradient, so training moves it off the identity.
  peft::matrix<T> dx(4, 10);
  const auto gy = peft_test::random_matrix<T>(4, 6, g);
  a.backward(w, x.view(), gy.view(), dx.view(), cache);
  CHECK(peft_test::nontrivial(a.grad_lambda_b()));
  CHECK(peft_test::count_nonzero(a.grad_lambda_d()) == 0);  // lambda_b = 0 blocks lambda_d's path
  CHECK(a.d_initial() == 0.25);
}

TEST_CASE("vera: make_vera_projections draws PEFT's distribution from peft::rng", "[vera][init]") {
  const auto p = peft::make_vera_projections<double>(16, {{64, 96}, {96, 48}}, 9);
  CHECK(p.A->rows() == 16);
  CHECK(p.A->cols() == 96);
  CHECK(p.B->rows() == 96);
  CHECK(p.B->cols() == 16);
  CHECK(peft_test::max_abs(*p.A) <= std::sqrt(6.0 / 96));
  CHECK(peft_test::max_abs(*p.A) > 0.9 * std::sqrt(6.0 / 96));
  CHECK(peft_test::max_abs(*p.B) <= std::sqrt(6.0 / 16));
  CHECK(peft_test::max_abs(*p.B) > 0.9 * std::sqrt(6.0 / 16));
  const auto same = peft::make_vera_projections<double>(16, {{64, 96}, {96, 48}}, 9);
  const auto other = peft::make_vera_projections<double>(16, {{64, 96}, {96, 48}}, 10);
  CHECK(peft_test::exactly_equal(*same.A, *p.A));
  CHECK_FALSE(peft_test::exactly_equal(*other.A, *p.A));
  CHECK_THROWS_AS(peft::make_vera_projections<double>(0, {{4, 4}}), peft::shape_error);
  CHECK_THROWS_AS(peft::make_vera_projections<double>(4, {{4, 0}}), peft::shape_error);
}

TEST_CASE("vera: save_projection=false is rejected with a clear message", "[vera][errors][io]") {
  const auto dir = scratch_dir("peft_vera_no_projection");
  rewrite_adapter("vera", dir, [](auto& c) { c["save_projection"] = false; });
  const auto msg = message_of([&] { peft::io::load_checkpoint_as<peft::vera<float>>(dir); });
  CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::vera<float>>(dir), peft::unsupported_error);
  CHECK(msg.rfind("[vera::from_checkpoint]", 0) == 0);
  CHECK(msg.find("save_projection") != std::string::npos);
  CHECK(msg.find("PyTorch") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("vera: malformed checkpoints are rejected", "[vera][errors][io]") {
  const auto dir = scratch_dir("peft_vera_malformed");
  auto keep = [](auto&) {};
  SECTION("vera_lambda_d longer than r") {
    rewrite_adapter("vera", dir, keep, {{"base_model.model.up.vera_lambda_d", {{17}, std::vector<float>(17, 0.5f)}}});
    const auto msg = message_of([&] { peft::io::load_checkpoint_as<peft::vera<double>>(dir); });
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::vera<double>>(dir), peft::format_error);
    CHECK(msg.find("vera_lambda_d has 17 values") != std::string::npos);
  }
  SECTION("vera_lambda_b longer than vera_B") {
    rewrite_adapter("vera", dir, keep, {{"base_model.model.down.vera_lambda_b", {{97}, std::vector<float>(97, 0.5f)}}});
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::vera<double>>(dir), peft::format_error);
  }
  SECTION("vera_B's rank differs from vera_A's") {
    rewrite_adapter("vera", dir, keep, {{"base_model.vera_B", {{96, 15}, std::vector<float>(96 * 15, 0.5f)}}});
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::vera<double>>(dir), peft::format_error);
  }
  SECTION("a 3-D vera_A") {
    rewrite_adapter("vera", dir, keep, {{"base_model.vera_A", {{16, 1, 96}, std::vector<float>(16 * 96, 0.5f)}}});
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::vera<double>>(dir), peft::format_error);
  }
  SECTION("r in the config differs from the projections") {
    rewrite_adapter("vera", dir, [](auto& c) { c["r"] = 8; });
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::vera<double>>(dir), peft::format_error);
  }
  fs::remove_all(dir);
}

TEST_CASE("vera: malformed shapes are rejected by the constructors and at use", "[vera][errors]") {
  peft::rng g(1);
  const auto p = peft::make_vera_projections<double>(4, {{8, 6}}, 1);
  using V = peft::vera<double>;
  CHECK_THROWS_AS(V(p.A, p.B, 8, 6, std::vector<double>(5, 0.1), {}), peft::shape_error);  // lambda_d longer than r
  CHECK_THROWS_AS(V(p.A, p.B, 8, 6, std::vector<double>(3, 0.1), {}), peft::shape_error);
  CHECK_THROWS_AS(V(p.A, p.B, 8, 6, {}, std::vector<double>(7, 0.0)), peft::shape_error);
  CHECK_THROWS_AS(V(p.A, p.B, 9, 6), peft::shape_error);  // wider than vera_A
  CHECK_THROWS_AS(V(p.A, p.B, 8, 7), peft::shape_error);  // taller than vera_B
  CHECK_THROWS_AS(V(p.A, p.B, 0, 6), peft::shape_error);
  CHECK_THROWS_AS(V(nullptr, p.B, 8, 6), peft::shape_error);
  CHECK_THROWS_AS(V(p.A, std::make_shared<peft::matrix<double>>(6, 3), 8, 6), peft::shape_error);
  V a(p, 8, 6);
  CHECK_THROWS_AS(a.set_features(8, 5), peft::shape_error);  // out is fixed by lambda_b
  CHECK_THROWS_AS(a.set_features(9, 6), peft::shape_error);
  a.set_features(3, 6);
  CHECK(a.in_features() == 3);
  const peft::dense<double> w(peft_test::random_matrix<double>(6, 8, g));
  peft::matrix<double> x(2, 8), y(2, 6);
  V::cache_type cache;
  const auto msg = message_of([&] { a.forward(w, x.view(), y.view(), cache); });
  CHECK(msg.rfind("[vera::forward] base weight is (6, 8), adapter expects (6, 3)", 0) == 0);
  a.set_features(8, 6);
  peft::matrix<double> bad_y(2, 5);
  CHECK_THROWS_AS(a.forward(w, x.view(), bad_y.view(), cache), peft::shape_error);
  V empty;
  CHECK_THROWS_AS(empty.forward(w, x.view(), y.view(), cache), peft::error);
  CHECK(empty.parameters().size() == 2);
}
