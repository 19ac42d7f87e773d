// FourierFT: parity with HuggingFace PEFT 0.21 (tests/data/peft/fourierft: n_frequency 100, the
// default scaling 150 and random_loc_seed 777; fourierft_seed: n_frequency 250, scaling 300, seed
// 2024; the two-layer MLP up 64 -> 96, down 96 -> 48; references made by
// scripts/make_fourierft_golden.py), the separable term against a direct evaluation of
// scaling Re(ifft2(S)), the save round trip, n_frequency_pattern, and the errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <filesystem>
#include <numbers>
#include <string>
#include <vector>

#include "peft/adapters/fourierft.hpp"
#include "peft/core/torch_generator.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft/fourierft.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_fourierft {

namespace {

namespace fs = std::filesystem;
using peft_test::message_of;
using peft_test::rewrite_adapter;

/// scaling / (out in) sum_k c_k cos(2 pi (u_k i / out + v_k j / in)) in long double, entry by entry.
template <class T>
peft::matrix<double> direct_delta(const peft::fourierft<T>& a) {
  const peft::index in = a.in_features(), out = a.out_features();
  peft::matrix<double> d(out, in);
  const long double s = static_cast<long double>(a.scaling()) / (static_cast<long double>(in) * out);
  for (peft::index i = 0; i < out; ++i) {
    for (peft::index j = 0; j < in; ++j) {
      long double sum = 0;
      for (peft::index k = 0; k < a.n_frequency(); ++k) {
        const auto u = a.rows()[static_cast<std::size_t>(k)], v = a.cols()[static_cast<std::size_t>(k)];
        // Reduce the phases exactly in integers before the angle is formed.
        const long double ang = 2 * std::numbers::pi_v<long double> *
                                (static_cast<long double>((u * i) % out) / out + static_cast<long double>((v * j) % in) / in);
        sum += static_cast<long double>(a.spectrum()(0, k)) * std::cos(ang);
      }
      d(i, j) = static_cast<double>(s * sum);
    }
  }
  return d;
}

}  // namespace

TEMPLATE_TEST_CASE("fourierft golden: layers, network, gradients and merge match PEFT", "[fourierft][golden]", float,
                   double) {
  using A = peft::fourierft<TestType>;
  for (const std::string name : {"fourierft", "fourierft_seed"}) {
    INFO("case " << name);
    {
      peft_test::golden_case<A> c(name);
      for (const std::string layer : {"up", "down"}) {
        const auto& a = c.layer(layer).adapter("default");
        REQUIRE(a.bound());
        REQUIRE(peft_test::nontrivial(a.spectrum()));  // the golden adapter is not the identity
      }
    }
    peft_test::check_golden<A>(name);
  }
}

TEST_CASE("fourierft golden: the configs' fields reach the adapters", "[fourierft][golden]") {
  peft_test::golden_case<peft::fourierft<double>> a("fourierft"), b("fourierft_seed");
  const auto& up = a.layer("up").adapter("default");
  CHECK(up.n_frequency() == 100);
  CHECK(up.scaling() == 150.0);
  CHECK(up.random_loc_seed() == 777);
  const auto& down = b.layer("down").adapter("default");
  CHECK(down.n_frequency() == 250);
  CHECK(down.scaling() == 300.0);
  CHECK(down.random_loc_seed() == 2024);
  CHECK(down.rows() != b.layer("up").adapter("default").rows());  // the locations follow the shape
}

TEMPLATE_TEST_CASE("fourierft: the separable forward, backward and delta equal scaling Re(ifft2(S))", "[fourierft]",
                   float, double) {
  using T = TestType;
  peft::rng g(11);
  // Odd sizes, a single row or column, every entry selected, and more frequencies than a block.
  const std::vector<std::array<peft::index, 3>> cases = {{7, 5, 9}, {1, 3, 3}, {13, 1, 13}, {33, 17, 300}, {4, 2, 8}};
  for (const auto& [in, out, n] : cases) {
    INFO(in << " -> " << out << ", n " << n);
    std::vector<T> c(static_cast<std::size_t>(n));
    for (auto& v : c) v = static_cast<T>(g.uniform(-1, 1));
    peft::fourierft<T> a(std::move(c), 40.0, static_cast<std::int64_t>(g.below(1000)), in, out);
    // The locations are distinct and in range.
    std::vector<std::int64_t> flat;
    for (peft::index k = 0; k < n; ++k) {
      const auto u = a.rows()[static_cast<std::size_t>(k)], v = a.cols()[static_cast<std::size_t>(k)];
      REQUIRE((u >= 0 && u < out && v >= 0 && v < in));
      flat.push_back(u * in + v);
    }
    std::sort(flat.begin(), flat.end());
    CHECK(std::adjacent_find(flat.begin(), flat.end()) == flat.end());
    const auto ref = direct_delta(a);
    REQUIRE(peft_test::nontrivial(ref));
    const auto w = peft_test::random_dense<T>(in, out, g);
    const auto x = peft_test::random_matrix<T>(6, in, g);
    const auto gy = peft_test::random_matrix<T>(6, out, g);
    a.zero_grad();
    // y, dx and delta_weight against the direct delta.
    peft_test::check_against_delta(a, w, x, gy, ref, peft_test::tolerance<T>());
    // d L / d c_k = s sum_ij (gy^T x)[i, j] cos(2 pi (u_k i / out + v_k j / in)), directly.
    const long double s = 40.0L / (static_cast<long double>(in) * out);
    peft::matrix<double> grad_ref(1, n);
    for (peft::index k = 0; k < n; ++k) {
      const auto u = a.rows()[static_cast<std::size_t>(k)], v = a.cols()[static_cast<std::size_t>(k)];
      long double sum = 0;
      for (peft::index i = 0; i < out; ++i) {
        for (peft::index j = 0; j < in; ++j) {
          long double gx = 0;
          for (peft::index b = 0; b < x.rows(); ++b) gx += static_cast<long double>(gy(b, i)) * x(b, j);
          const long double ang = 2 * std::numbers::pi_v<long double> *
                                  (static_cast<long double>((u * i) % out) / out + static_cast<long double>((v * j) % in) / in);
          sum += gx * std::cos(ang);
        }
      }
      grad_ref(0, k) = static_cast<double>(s * sum);
    }
    CHECK(peft_test::rel_error(a.grad_spectrum(), grad_ref) < peft_test::tolerance<T>());
    // backward without the forward's cache recomputes x F_in: the same gradient again.
    peft::matrix<T> dx(6, in);
    typename peft::fourierft<T>::cache_type fresh;
    a.zero_grad();
    a.backward(w, x.view(), gy.view(), dx.view(), fresh);
    CHECK(peft_test::rel_error(a.grad_spectrum(), grad_ref) < peft_test::tolerance<T>());
  }
}

TEST_CASE("fourierft: the locations are torch.randperm(out * in, manual_seed(seed))[:n] split by in", "[fourierft]") {
  // PEFT 0.21: indices = randperm(...)[:n]; rows = p // in, cols = p % in. A Llama-sized layer.
  const peft::index in = 4096, out = 4096, n = 1000;
  const peft::fourierft<float> a(in, out, {.n_frequency = n, .random_loc_seed = 777});
  const auto p = peft::torch_generator(777).randperm(in * out);  // the whole permutation
  for (peft::index k = 0; k < n; ++k) {
    const auto want = p[static_cast<std::size_t>(k)];
    REQUIRE(a.rows()[static_cast<std::size_t>(k)] == want / in);
    REQUIRE(a.cols()[static_cast<std::size_t>(k)] == want % in);
  }
}

TEST_CASE("fourierft: the checkpoint round trip keeps the spectrum and the config", "[fourierft][io]") {
  const auto base = peft::io::safetensors_file::open(peft_test::golden_dir("fourierft_seed") / "base_model.safetensors");
  auto ck = peft_test::load_bound<peft::fourierft<double>>(peft_test::golden_dir("fourierft_seed") / "adapter", base);
  auto back = peft_test::save_and_load(ck, "fourierft_round_trip");
  REQUIRE(back.modules.size() == ck.modules.size());
  for (std::size_t i = 0; i < ck.modules.size(); ++i) {
    auto& a = ck.modules[i].adapter;
    auto& b = back.modules[i].adapter;
    INFO(ck.modules[i].path);
    CHECK(back.modules[i].path == ck.modules[i].path);
    CHECK(b.n_frequency() == a.n_frequency());
    CHECK(b.scaling() == a.scaling());
    CHECK(b.random_loc_seed() == a.random_loc_seed());
    CHECK(peft_test::rel_error(b.spectrum(), a.spectrum()) == 0.0);  // f32 values stored in f32
    b.set_features(a.in_features(), a.out_features());
    CHECK(b.rows() == a.rows());
    CHECK(b.cols() == a.cols());
  }
  for (const char* f : {"n_frequency", "scaling", "random_loc_seed", "n_frequency_pattern", "fan_in_fan_out"}) {
    INFO(f);
    CHECK(back.config.raw.at(f) == ck.config.raw.at(f));
  }
  CHECK(back.config.peft_type == "FOURIERFT");
  CHECK_FALSE(back.config.raw.contains("r"));  // FourierFTConfig has no r
}

TEST_CASE("fourierft: n_frequency_pattern follows PEFT's re.match('.*\\.key$')", "[fourierft][io]") {
  using codec = peft::io::peft_codec<peft::fourierft<double>>;
  const auto c = peft::io::adapter_config::parse(
      R"({"peft_type": "FOURIERFT", "n_frequency": 64, "n_frequency_pattern": {"q_proj": 8, "layers\\.1\\..*": 16}})");
  CHECK(codec::n_frequency_for(c, "model.layers.0.self_attn.q_proj") == 8);
  CHECK(codec::n_frequency_for(c, "model.layers.1.mlp.up_proj") == 16);
  CHECK(codec::n_frequency_for(c, "model.layers.0.mlp.up_proj") == 64);
  CHECK(codec::n_frequency_for(c, "q_proj") == 64);  // no dot before the key: PEFT keeps n_frequency
  // A checkpoint's spectrum sized by the pattern loads; one sized otherwise is refused by name.
  peft::rng g(3);
  auto m = peft_test::random_tensors<double>("model.layers.0.self_attn.q_proj", {{"fourierft_spectrum", {8}}}, g);
  m.set_base_shape(std::pair<peft::index, peft::index>{12, 10});
  const auto a = codec::from_checkpoint(c, m, peft::io::checkpoint_tensors<double>("base_model"));
  CHECK(a.n_frequency() == 8);
  CHECK((a.in_features() == 10 && a.out_features() == 12));
  auto wrong = peft_test::random_tensors<double>("model.layers.0.mlp.up_proj", {{"fourierft_spectrum", {8}}}, g);
  CHECK_THROWS_WITH(codec::from_checkpoint(c, wrong, peft::io::checkpoint_tensors<double>("base_model")),
                    Catch::StartsWith("[fourierft::from_checkpoint]") && Catch::Contains("n_frequency = 64"));
}

TEST_CASE("fourierft: bad configs and checkpoints are refused by name", "[fourierft][io]") {
  const fs::path dir = peft_test::scratch_path("fourierft_bad");
  const auto load = [&](const std::function<void(nlohmann::ordered_json&)>& edit) {
    fs::remove_all(dir);
    rewrite_adapter("fourierft", dir, edit);
    return message_of([&] { (void)peft::io::load_checkpoint_as<peft::fourierft<float>>(dir); });
  };
  CHECK_THAT(load([](auto& j) { j["n_frequency"] = 99; }),
             Catch::StartsWith("[fourierft::from_checkpoint]") && Catch::Contains("fourierft_spectrum has 100 values"));
  CHECK_THAT(load([](auto& j) { j["random_loc_seed"] = nullptr; }),
             Catch::StartsWith("[fourierft::from_checkpoint]") && Catch::Contains("'random_loc_seed' is null"));
  CHECK_THAT(load([](auto& j) { j["scaling"] = "big"; }),
             Catch::StartsWith("[fourierft::from_checkpoint]") && Catch::Contains("'scaling'"));
  CHECK_THAT(load([](auto& j) { j["bias"] = "fourier_only"; }),
             Catch::StartsWith("[fourierft::from_checkpoint]") && Catch::Contains("'bias'"));
  // A field FourierFTConfig does not have (a later PEFT's ifft2_norm, say) is refused, not ignored.
  CHECK_THAT(load([](auto& j) { j["ifft2_norm"] = "ortho"; }),
             Catch::StartsWith("[fourierft::from_checkpoint]") && Catch::Contains("'ifft2_norm'"));
  // Training-only fields load.
  CHECK(load([](auto& j) { j["init_weights"] = true; }).empty());
  fs::remove_all(dir);
}

TEST_CASE("fourierft: shapes and an unbound adapter are refused by name", "[fourierft]") {
  peft::rng g(5);
  // n larger than the weight (PEFT's check).
  CHECK_THROWS_WITH(peft::fourierft<double>(3, 2, {.n_frequency = 7}),
                    Catch::StartsWith("[fourierft::fourierft]") && Catch::Contains("n_frequency 7 exceeds"));
  CHECK_THROWS_WITH(peft::fourierft<double>(3, 2, {.n_frequency = 0}),
                    Catch::StartsWith("[fourierft::fourierft]") && Catch::Contains("positive integer, got 0"));
  CHECK_THROWS_WITH(peft::fourierft<double>(std::vector<double>{}, 1.0, 1),
                    Catch::StartsWith("[fourierft::fourierft]"));
  // Without the layer's shape the adapter cannot run; set_features binds it once.
  peft::fourierft<double> a(std::vector<double>{1.0, -2.0, 0.5}, 10.0, 9);
  CHECK_FALSE(a.bound());
  const auto w = peft_test::random_dense<double>(4, 3, g);
  peft::matrix<double> x(2, 4), y(2, 3);
  peft::fourierft<double>::cache_type cache;
  CHECK_THROWS_WITH(a.forward(w, x.view(), y.view(), cache),
                    Catch::StartsWith("[fourierft::forward]") && Catch::Contains("set_features"));
  a.set_features(4, 3);
  CHECK(a.bound());
  a.set_features(4, 3);  // the same shape again is fine
  CHECK_THROWS_WITH(a.set_features(3, 4), Catch::StartsWith("[fourierft::set_features]"));
  a.forward(w, x.view(), y.view(), cache);
  peft_test::check_unset_rejected<peft::fourierft<double>, peft::error>(w);
  peft_test::check_shape_errors(a, w, 2,
                                {{peft_test::pass::forward, peft_test::arg::x, 2, 5},
                                 {peft_test::pass::forward, peft_test::arg::y, 2, 4},
                                 {peft_test::pass::backward, peft_test::arg::dx, 2, 3},
                                 {peft_test::pass::delta_weight, peft_test::arg::dw, 4, 4},
                                 {peft_test::pass::forward, peft_test::arg::base, 3, 5}});
}

}  // namespace test_fourierft
