// VeRA: parity with HuggingFace PEFT 0.21 (tests/data/peft/vera: the two-layer MLP, up 64 -> 96,
// down 96 -> 48, projections vera_A (16, 96), vera_B (96, 16) shared by both layers), sharing of
// the projections (one object, never copied, saved once), slicing for layers smaller than the
// projections, identity at init, and the errors: save_projection=false, malformed shapes.
#include <catch2/catch.hpp>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "peft/io/peft/vera.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/vera.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/shared_projection_checks.hpp"
#include "support/test_support.hpp"

namespace test_vera {

namespace {

namespace fs = std::filesystem;
using peft_test::rewrite_adapter;

const fs::path case_dir = peft_test::golden_dir("vera");

template <class T>
using golden_case = peft_test::golden_case<peft::vera<T>>;

}  // namespace

TEMPLATE_TEST_CASE("vera golden: each layer's output, dx and lambda gradients match PEFT", "[vera][golden]", float,
                   double) {
  using T = TestType;
  golden_case<T> c("vera");
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    const auto& a = c.layer(name).adapter("default");
    REQUIRE(peft_test::nontrivial(a.lambda_b()));  // the golden adapter is not the identity
    REQUIRE(peft_test::nontrivial(a.lambda_d()));
    peft_test::check_layer_outputs(c, name, peft_test::tolerance<T>());
    peft_test::check_trainable_gradients(c, name, peft_test::tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("vera golden: the two-layer network's output, dL/dx and gradients match PEFT", "[vera][golden]",
                   float, double) {
  golden_case<TestType> c("vera");
  peft_test::check_network_trainable(c, peft_test::tolerance<TestType>());
}

TEMPLATE_TEST_CASE("vera golden: delta_weight and merge give PEFT's merged weights", "[vera][golden][merge]", float,
                   double) {
  golden_case<TestType> c("vera");
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    peft_test::check_merged_delta(c, name, 1e-4);
  }
}

TEST_CASE("vera: the projections are shared, never copied", "[vera][shared]") {
  const auto base = peft::io::safetensors_file::open(case_dir / "base_model.safetensors");
  auto ck = peft_test::load_bound<peft::vera<double>>(case_dir / "adapter", base);
  auto& up = ck.find("up.weight")->adapter;
  auto& down = ck.find("down.weight")->adapter;
  // One object for both modules, and the slices are views into it.
  peft_test::check_one_projection_object(up, down);
  // Copying an adapter (adapted_linear::add_adapter takes a copy) shares, it does not copy.
  peft::adapted_linear<peft::dense<float>, peft::vera<double>> layer(peft_test::load_base(base, "up"));
  const auto& held = layer.add_adapter("default", up);
  CHECK(held.shared_A().get() == up.shared_A().get());
  CHECK(held.A_slice().data() == up.shared_A()->data());
  CHECK(up.shared_A().use_count() == 3);
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
  // Changing the projection through one module changes what the other computes: column 70 is
  // beyond up's 64 inputs, inside down's 96.
  peft_test::check_change_reaches_other(up, down, peft_test::load_base(base, "down"), "vera_A", 0, 70, 1e-6);
}

TEST_CASE("vera: save_peft_checkpoint writes the projections once and reloads to identical outputs",
          "[vera][shared][io]") {
  const auto base = peft::io::safetensors_file::open(case_dir / "base_model.safetensors");
  const auto reference = peft::io::safetensors_file::open(case_dir / "reference.safetensors");
  auto ck = peft_test::load_bound<peft::vera<double>>(case_dir / "adapter", base);
  const auto dir = peft_test::scratch_path("peft_vera_roundtrip");
  peft_test::check_saved_once(ck, dir, "vera",
                              {{"base_model.model.down.vera_lambda_b", {}},
                               {"base_model.model.down.vera_lambda_d", {}},
                               {"base_model.model.up.vera_lambda_b", {}},
                               {"base_model.model.up.vera_lambda_d", {}},
                               {"base_model.vera_A", {16, 96}}, {"base_model.vera_B", {96, 16}}});
  const auto cfg = peft::io::adapter_config::load(dir);
  CHECK(cfg.peft_type == "VERA");
  CHECK(cfg.r == 16);
  CHECK(cfg.raw["save_projection"] == true);
  CHECK(cfg.raw["d_initial"] == 0.1);
  CHECK(cfg.raw["projection_prng_key"] == 1234);  // kept from the loaded config
  peft_test::check_reloaded(ck, dir, base, reference);
  fs::remove_all(dir);
}

TEST_CASE("vera: saving refuses modules whose shared projections differ; equal copies save once",
          "[vera][shared][io]") {
  const auto base = peft::io::safetensors_file::open(case_dir / "base_model.safetensors");
  auto ck = peft_test::load_bound<peft::vera<double>>(case_dir / "adapter", base);
  auto& down = ck.find("down.weight")->adapter;
  auto copy_of = [](const peft::matrix<double>& m) { return std::make_shared<peft::matrix<double>>(m); };
  auto rebuilt = [&](std::shared_ptr<peft::matrix<double>> a) {
    const auto ld = down.lambda_d(), lb = down.lambda_b();
    return peft::vera<double>(std::move(a), down.shared_B(), down.in_features(), down.out_features(),
                              std::vector<double>(ld.data(), ld.data() + ld.size()),
                              std::vector<double>(lb.data(), lb.data() + lb.size()));
  };
  const auto dir = peft_test::scratch_path("peft_vera_shared_differ");
  // An equal copy (another object, the same values) is the same tensor: saved once.
  down = rebuilt(copy_of(*down.shared_A()));
  REQUIRE(down.shared_A().get() != ck.find("up.weight")->adapter.shared_A().get());
  fs::remove_all(dir);
  peft::io::save_peft_checkpoint(dir, ck);
  CHECK(peft::io::safetensors_file::open(dir / "adapter_model.safetensors").tensors().size() == 6);
  // Different values under the one name: refused, nothing silently dropped.
  auto changed = copy_of(*down.shared_A());
  (*changed)(0, 0) += 0.5;
  down = rebuilt(changed);
  fs::remove_all(dir);
  CHECK_THROWS_WITH(peft::io::save_peft_checkpoint(dir, ck),
                    Catch::Contains("[save_peft_checkpoint]") && Catch::Contains("'up'") && Catch::Contains("'down'") &&
                        Catch::Contains("different 'base_model.vera_A'"));
  CHECK_FALSE(fs::exists(dir / "adapter_model.safetensors"));
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
    CHECK(peft_test::rel_error(y, y_ref) < (std::is_same_v<T, double> ? 1e-14 : 1e-6));
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
  peft_test::check_identity_at_init(a, 4, g);
  // ... yet lambda_b gets a gradient, so training moves it off the identity.
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
  peft_test::check_projection_required<peft::vera<float>>("vera");
}

TEST_CASE("vera: malformed checkpoints are rejected", "[vera][errors][io]") {
  const auto dir = peft_test::scratch_path("peft_vera_malformed");
  auto keep = [](auto&) {};
  SECTION("vera_lambda_d longer than r") {
    rewrite_adapter("vera", dir, keep, {{"base_model.model.up.vera_lambda_d", {{17}, std::vector<float>(17, 0.5f)}}});
    const auto msg = peft_test::message_of([&] { peft::io::load_checkpoint_as<peft::vera<double>>(dir); });
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
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::none, 0, 0,
                                  "[vera::forward] base weight is (6, 8), adapter expects (6, 3)",
                                  peft_test::match::prefix}});
  a.set_features(8, 6);
  peft_test::check_shape_errors(a, w, 2, {{pass::forward, arg::y, 2, 5}});
  peft_test::check_unset_rejected<V, peft::error>(w);
  CHECK(V{}.parameters().size() == 2);
}

}  // namespace test_vera
