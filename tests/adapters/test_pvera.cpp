// PVeRA: parity with HuggingFace PEFT 0.21.2 in eval mode (tests/data/peft/pvera: r = 16,
// projection_prng_key 1234; pvera_r4: r = 4, key 7, pvera_dropout and generator_seed set; both
// the two-layer MLP up 64 -> 96, down 96 -> 48, projections pvera_A (2r, 96), pvera_B (96, r)
// shared by both layers): outputs, dx, lambda gradients, merged weights; the projections drawn
// bit for bit as PEFT draws them; logvar (lambda_d's second half) inert; sharing, saving; and
// the refusals (sample_at_inference, save_projection=false, malformed shapes, unknown fields).
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/pvera.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/torch_generator.hpp"
#include "peft/io/peft/pvera.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/shared_projection_checks.hpp"
#include "support/test_support.hpp"

namespace test_pvera {

namespace {

namespace fs = std::filesystem;
using peft_test::rewrite_adapter;

template <class T>
using golden_case = peft_test::golden_case<peft::pvera<T>>;

/// The largest |value| of lambda_d's logvar half (its last r values).
template <class V>
double max_abs_logvar(const V& d) {
  double m = 0;
  for (peft::index k = d.cols() / 2; k < d.cols(); ++k) m = std::max(m, std::abs(static_cast<double>(d(0, k))));
  return m;
}

}  // namespace

TEMPLATE_TEST_CASE("pvera golden: each layer's output, dx and lambda gradients match PEFT", "[pvera][golden]", float,
                   double) {
  using T = TestType;
  for (const std::string name : {"pvera", "pvera_r4"}) {
    INFO("case " << name);
    golden_case<T> c(name);
    for (const std::string layer : {"up", "down"}) {
      INFO("layer " << layer);
      const auto& a = c.layer(layer).adapter("default");
      REQUIRE(peft_test::nontrivial(a.lambda_b()));  // the golden adapter is not the identity
      REQUIRE(peft_test::nontrivial(a.lambda_d()));
      REQUIRE(max_abs_logvar(a.lambda_d()) > 1e-2);  // logvar is set too, and must not act
      REQUIRE(a.lambda_d().cols() == 2 * a.rank());
      peft_test::check_layer_outputs(c, layer, peft_test::tolerance<T>());
      peft_test::check_trainable_gradients(c, layer, peft_test::tolerance<T>());
      // PEFT's gradient of the logvar half is 0 in eval mode, and so is ours.
      REQUIRE(peft_test::rel_error(a.grad_lambda_d(), c.ref("grad.base_model.model." + layer +
                                                            ".pvera_lambda_d.default")) < peft_test::tolerance<T>());
      CHECK(max_abs_logvar(a.grad_lambda_d()) == 0.0);
    }
  }
}

TEMPLATE_TEST_CASE("pvera golden: the two-layer network's output, dL/dx and gradients match PEFT", "[pvera][golden]",
                   float, double) {
  for (const std::string name : {"pvera", "pvera_r4"}) {
    INFO("case " << name);
    golden_case<TestType> c(name);
    peft_test::check_network_trainable(c, peft_test::tolerance<TestType>());
  }
}

TEMPLATE_TEST_CASE("pvera golden: delta_weight and merge give PEFT's merged weights", "[pvera][golden][merge]", float,
                   double) {
  for (const std::string name : {"pvera", "pvera_r4"}) {
    INFO("case " << name);
    golden_case<TestType> c(name);
    peft_test::check_merge(c);
  }
}

TEST_CASE("pvera: make_pvera_projections draws PEFT's projections bit for bit", "[pvera][init][torch_generator]") {
  for (const auto& [name, r, key] : {std::tuple<std::string, peft::index, std::uint64_t>{"pvera", 16, 1234},
                                     std::tuple<std::string, peft::index, std::uint64_t>{"pvera_r4", 4, 7}}) {
    INFO("case " << name);
    const auto saved = peft::io::safetensors_file::open(peft_test::golden_dir(name) / "adapter" /
                                                        "adapter_model.safetensors");
    const auto a = saved.read_matrix<float>("base_model.pvera_A");
    const auto b = saved.read_matrix<float>("base_model.pvera_B");
    const auto p = peft::make_pvera_projections<float>(r, {{64, 96}, {96, 48}}, key);
    REQUIRE(p.A->rows() == 2 * r);
    REQUIRE(p.A->cols() == 96);
    REQUIRE(p.B->rows() == 96);
    REQUIRE(p.B->cols() == r);
    CHECK(peft_test::exactly_equal(*p.A, a));
    CHECK(peft_test::exactly_equal(*p.B, b));  // bound sqrt(6 / r) is not a power of 2: needs the fma
    const auto pd = peft::make_pvera_projections<double>(r, {{64, 96}, {96, 48}}, key);
    CHECK(peft_test::exactly_equal(*pd.A, peft::matrix<double>(a.rows(), a.cols(), saved.read<double>("base_model.pvera_A"))));
  }
  CHECK_THROWS_AS(peft::make_pvera_projections<double>(0, {{4, 4}}), peft::shape_error);
  CHECK_THROWS_AS(peft::make_pvera_projections<double>(4, {{0, 4}}), peft::shape_error);
}

TEST_CASE("torch_generator::uniform reproduces tensor.uniform_ on CPU (float and double)", "[torch_generator]") {
  // torch.empty(4, dtype=torch.float64).uniform_(-0.3, 0.77, generator=torch.Generator().manual_seed(99))
  peft::torch_generator g(99);
  for (double want : {0x1.2b2d79a65e7b5p-1, 0x1.4d4ac667e9368p-2, 0x1.6daafb5fd25d3p-2, 0x1.0af71520068a9p-3}) {
    CHECK(g.uniform<double>(-0.3, 0.77) == want);
  }
  // The same in float32 with seed 5.
  peft::torch_generator f(5);
  for (float want : {0x1.2d3ec2p-1f, -0x1.520baep-3f, 0x1.578c54p-1f, 0x1.2796bcp-1f}) {
    CHECK(f.uniform<float>(-0.3, 0.77) == want);
  }
}

TEMPLATE_TEST_CASE("pvera: only the mean acts: logvar (lambda_d[r:], A[r:]) leaves output and delta unchanged",
                   "[pvera][logvar]", float, double) {
  using T = TestType;
  peft::rng g(11);
  const auto p = peft::make_pvera_projections<T>(3, {{6, 5}, {8, 7}}, 2);
  auto d = peft_test::random_vector<T>(6, g, 0.2, 1.5);
  const auto lb = peft_test::random_vector<T>(5, g);
  peft::pvera<T> a(p, 6, 5), b(p, 6, 5);
  a = peft::pvera<T>(p.A, p.B, 6, 5, d, lb);
  for (std::size_t k = 3; k < 6; ++k) d[k] = T{-7};
  b = peft::pvera<T>(p.A, p.B, 6, 5, d, lb);
  const peft::dense<T> w(peft_test::random_matrix<T>(5, 6, g));
  peft::matrix<T> da(5, 6), db(5, 6);
  a.delta_weight(w, da.view());
  b.delta_weight(w, db.view());
  REQUIRE(peft_test::max_abs(da) > 1e-3);
  CHECK(peft_test::exactly_equal(da, db));
  // Reference: (lambda_b * B[:5, :]) (lambda_d[:3] * A[:3, :6]) in double, by loops.
  peft::matrix<double> ref(5, 6);
  for (peft::index i = 0; i < 5; ++i)
    for (peft::index j = 0; j < 6; ++j)
      for (peft::index k = 0; k < 3; ++k)
        ref(i, j) += static_cast<double>(lb[static_cast<std::size_t>(i)]) * static_cast<double>((*p.B)(i, k)) *
                     static_cast<double>(a.lambda_d()(0, k)) * static_cast<double>((*p.A)(k, j));
  CHECK(peft_test::rel_error(da, ref) < peft_test::tolerance<T>());
  CHECK(a.A_slice().rows() == 3);
  CHECK(a.A_slice().stride() == 8);
}

TEST_CASE("pvera: the projections are shared, never copied", "[pvera][shared]") {
  const fs::path case_dir = peft_test::golden_dir("pvera");
  const auto base = peft::io::safetensors_file::open(case_dir / "base_model.safetensors");
  auto ck = peft_test::load_bound<peft::pvera<double>>(case_dir / "adapter", base);
  auto& up = ck.find("up.weight")->adapter;
  auto& down = ck.find("down.weight")->adapter;
  peft_test::check_one_projection_object(up, down);
  for (auto& p : up.parameters()) {
    INFO(p.name);
    const bool projection = p.name == "pvera_A" || p.name == "pvera_B";
    CHECK(p.shared == projection);
    CHECK(p.trainable == !projection);
  }
  CHECK(ck.parameter_count() == 96 + 32 + 48 + 32);  // trainable only
  // Row 3 (the mean's) column 70: beyond up's 64 inputs, inside down's 96.
  peft_test::check_change_reaches_other(up, down, peft_test::load_base(base, "down"), "pvera_A", 3, 70, 1e-6);
}

TEST_CASE("pvera: save_peft_checkpoint writes the projections once and reloads to identical outputs",
          "[pvera][shared][io]") {
  const fs::path case_dir = peft_test::golden_dir("pvera_r4");
  const auto base = peft::io::safetensors_file::open(case_dir / "base_model.safetensors");
  const auto reference = peft::io::safetensors_file::open(case_dir / "reference.safetensors");
  auto ck = peft_test::load_bound<peft::pvera<double>>(case_dir / "adapter", base);
  const auto dir = peft_test::scratch_path("peft_pvera_roundtrip");
  peft_test::check_saved_once(ck, dir, "pvera_r4",
                              {{"base_model.model.down.pvera_lambda_b", {48}},
                               {"base_model.model.down.pvera_lambda_d", {8}},
                               {"base_model.model.up.pvera_lambda_b", {96}},
                               {"base_model.model.up.pvera_lambda_d", {8}},
                               {"base_model.pvera_A", {8, 96}}, {"base_model.pvera_B", {96, 4}}});
  const auto cfg = peft::io::adapter_config::load(dir);
  CHECK(cfg.peft_type == "PVERA");
  CHECK(cfg.r == 4);
  CHECK(cfg.raw["save_projection"] == true);
  CHECK(cfg.raw["sample_at_inference"] == false);
  CHECK(cfg.raw["projection_prng_key"] == 7);  // kept from the loaded config
  CHECK(cfg.raw["generator_seed"] == 3);
  peft_test::check_reloaded(ck, dir, base, reference, 1e-12);
  fs::remove_all(dir);
}

TEMPLATE_TEST_CASE("pvera: a fresh adapter is the identity (lambda_b = 0, lambda_d = d_initial)", "[pvera][init]",
                   float, double) {
  using T = TestType;
  peft::rng g(5);
  const auto p = peft::make_pvera_projections<T>(4, {{10, 6}, {20, 30}}, 3);
  peft::pvera<T> a(p, 10, 6, 0.25);
  REQUIRE(a.lambda_d().cols() == 8);
  for (peft::index k = 0; k < 8; ++k) CHECK(a.lambda_d()(0, k) == static_cast<T>(0.25));
  CHECK(peft_test::count_nonzero(a.lambda_b()) == 0);
  peft_test::check_identity_at_init(a, 4, g);
  CHECK(peft_test::nontrivial(a.grad_lambda_b()));  // training moves lambda_b off 0
  CHECK(peft_test::count_nonzero(a.grad_lambda_d()) == 0);
  CHECK(a.d_initial() == 0.25);
}

TEST_CASE("pvera: save_projection=false is rejected with a clear message", "[pvera][errors][io]") {
  peft_test::check_projection_required<peft::pvera<float>>("pvera");
}

TEST_CASE("pvera: sample_at_inference and unknown fields are refused by name", "[pvera][errors][io]") {
  const auto dir = peft_test::scratch_path("peft_pvera_fields");
  SECTION("sample_at_inference = true") {
    rewrite_adapter("pvera", dir, [](auto& c) { c["sample_at_inference"] = true; });
    const auto msg = peft_test::message_of([&] { peft::io::load_checkpoint_as<peft::pvera<double>>(dir); });
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::pvera<double>>(dir), peft::unsupported_error);
    CHECK(msg.rfind("[pvera::from_checkpoint]", 0) == 0);
    CHECK(msg.find("sample_at_inference") != std::string::npos);
  }
  SECTION("a field PVeRA's config does not have") {
    rewrite_adapter("pvera", dir, [](auto& c) { c["pvera_temperature"] = 2.0; });
    const auto msg = peft_test::message_of([&] { peft::io::load_checkpoint_as<peft::pvera<double>>(dir); });
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::pvera<double>>(dir), peft::unsupported_error);
    CHECK(msg.find("pvera_temperature") != std::string::npos);
  }
  SECTION("bias = all") {
    rewrite_adapter("pvera", dir, [](auto& c) { c["bias"] = "all"; });
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::pvera<double>>(dir), peft::unsupported_error);
  }
  SECTION("training-only fields load") {
    rewrite_adapter("pvera", dir, [](auto& c) {
      c["pvera_dropout"] = 0.3;
      c["generator_seed"] = 5;
      c["init_weights"] = false;
      c["d_initial"] = 0.5;
    });
    const auto ck = peft::io::load_checkpoint_as<peft::pvera<double>>(dir);
    CHECK(ck.modules.size() == 2);
    CHECK(ck.find("up.weight")->adapter.d_initial() == 0.5);
  }
  fs::remove_all(dir);
}

TEST_CASE("pvera: malformed checkpoints are rejected", "[pvera][errors][io]") {
  const auto dir = peft_test::scratch_path("peft_pvera_malformed");
  auto keep = [](auto&) {};
  SECTION("pvera_lambda_d of r values (VeRA's length) instead of 2r") {
    rewrite_adapter("pvera", dir, keep, {{"base_model.model.up.pvera_lambda_d", {{16}, std::vector<float>(16, 0.5f)}}});
    const auto msg = peft_test::message_of([&] { peft::io::load_checkpoint_as<peft::pvera<double>>(dir); });
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::pvera<double>>(dir), peft::format_error);
    CHECK(msg.find("pvera_lambda_d has 16 values, expected 2 r = 32") != std::string::npos);
  }
  SECTION("pvera_lambda_b longer than pvera_B") {
    rewrite_adapter("pvera", dir, keep, {{"base_model.model.down.pvera_lambda_b", {{97}, std::vector<float>(97, 0.5f)}}});
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::pvera<double>>(dir), peft::format_error);
  }
  SECTION("pvera_A with r rows instead of 2r") {
    rewrite_adapter("pvera", dir, keep, {{"base_model.pvera_A", {{16, 96}, std::vector<float>(16 * 96, 0.5f)}}});
    const auto msg = peft_test::message_of([&] { peft::io::load_checkpoint_as<peft::pvera<double>>(dir); });
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::pvera<double>>(dir), peft::format_error);
    CHECK(msg.find("2 r rows") != std::string::npos);
  }
  SECTION("a 3-D pvera_B") {
    rewrite_adapter("pvera", dir, keep, {{"base_model.pvera_B", {{96, 1, 16}, std::vector<float>(96 * 16, 0.5f)}}});
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::pvera<double>>(dir), peft::format_error);
  }
  SECTION("no shared projections") {
    rewrite_adapter("pvera", dir, keep, {}, {"base_model.pvera_A", "base_model.pvera_B"});
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::pvera<double>>(dir), peft::format_error);
  }
  SECTION("r in the config differs from the projections") {
    rewrite_adapter("pvera", dir, [](auto& c) { c["r"] = 8; });
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::pvera<double>>(dir), peft::format_error);
  }
  fs::remove_all(dir);
}

TEST_CASE("pvera: malformed shapes are rejected by the constructors and at use", "[pvera][errors]") {
  peft::rng g(1);
  const auto p = peft::make_pvera_projections<double>(4, {{8, 6}}, 1);
  using V = peft::pvera<double>;
  CHECK_THROWS_AS(V(p.A, p.B, 8, 6, std::vector<double>(4, 0.1), {}), peft::shape_error);  // r, not 2r
  CHECK_THROWS_AS(V(p.A, p.B, 8, 6, std::vector<double>(9, 0.1), {}), peft::shape_error);
  CHECK_THROWS_AS(V(p.A, p.B, 8, 6, {}, std::vector<double>(7, 0.0)), peft::shape_error);
  CHECK_THROWS_AS(V(p.A, p.B, 9, 6), peft::shape_error);  // wider than pvera_A
  CHECK_THROWS_AS(V(p.A, p.B, 8, 7), peft::shape_error);  // taller than pvera_B
  CHECK_THROWS_AS(V(p.A, p.B, 0, 6), peft::shape_error);
  CHECK_THROWS_AS(V(nullptr, p.B, 8, 6), peft::shape_error);
  const auto msg = peft_test::message_of([&] { V(p.A, std::make_shared<peft::matrix<double>>(6, 3), 8, 6); });
  CHECK(msg.rfind("[pvera::pvera] pvera_A is (8, 8) but pvera_B is (6, 3)", 0) == 0);
  V a(p, 8, 6);
  CHECK(a.rank() == 4);
  CHECK_THROWS_AS(a.set_features(8, 5), peft::shape_error);  // out is fixed by lambda_b
  CHECK_THROWS_AS(a.set_features(9, 6), peft::shape_error);
  a.set_features(3, 6);
  CHECK(a.in_features() == 3);
  const peft::dense<double> w(peft_test::random_matrix<double>(6, 8, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::none, 0, 0,
                                  "[pvera::forward] base weight is (6, 8), adapter expects (6, 3)",
                                  peft_test::match::prefix}});
  a.set_features(8, 6);
  peft_test::check_shape_errors(a, w, 2, {{pass::forward, arg::y, 2, 5}});
  peft_test::check_unset_rejected<V, peft::error>(w);
  CHECK(V{}.parameters().size() == 2);
}

}  // namespace test_pvera
