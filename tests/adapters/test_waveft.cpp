// WaveFT: parity with HuggingFace PEFT 0.21 (tests/data/peft/waveft: db2, n_frequency 300, the
// default scaling 25 and random_loc_seed 777; waveft_coif2: coif2, n 500, scaling 10, seed 2024;
// waveft_direct: use_idwt false, n 400, scaling 5, seed 31; the two-layer MLP up 64 -> 96, down
// 96 -> 48; made by scripts/make_peft_golden.py), PEFT's delta weight and autograd gradient on
// small odd layers for every wavelet it reconstructs with (waveft_transforms.json, made by
// scripts/make_waveft_golden.py), finite differences, the save round trip and the refusals.
#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "peft/adapters/waveft.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/torch_generator.hpp"
#include "peft/io/peft/waveft.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_waveft {

namespace {

namespace fs = std::filesystem;
using peft_test::message_of;
using peft_test::rewrite_adapter;

const nlohmann::json& transforms() {
  static const nlohmann::json doc = [] {
    std::ifstream in(peft_test::golden_dir("waveft_transforms.json"));
    REQUIRE(in.good());
    return nlohmann::json::parse(in);
  }();
  return doc;
}

/// A row-major (rows, cols) matrix from a flat JSON list.
peft::matrix<double> json_matrix(const nlohmann::json& v, peft::index rows, peft::index cols) {
  REQUIRE(v.size() == static_cast<std::size_t>(rows * cols));
  peft::matrix<double> m(rows, cols);
  for (peft::index i = 0; i < rows; ++i) {
    for (peft::index j = 0; j < cols; ++j) m(i, j) = v[static_cast<std::size_t>(i * cols + j)].get<double>();
  }
  return m;
}

template <class T>
peft::waveft<T> from_case(const nlohmann::json& c) {
  std::vector<T> spectrum;
  for (const auto& v : c.at("spectrum")) spectrum.push_back(static_cast<T>(v.get<double>()));
  return peft::waveft<T>(std::move(spectrum), c.at("scaling").get<double>(), c.at("wavelet_family").get<std::string>(),
                         c.at("use_idwt").get<bool>(), c.at("random_loc_seed").get<std::int64_t>(),
                         c.at("in").get<peft::index>(), c.at("out").get<peft::index>());
}

}  // namespace

TEMPLATE_TEST_CASE("waveft golden: layers, network, gradients and merge match PEFT", "[waveft][golden]", float,
                   double) {
  using A = peft::waveft<TestType>;
  for (const std::string name : {"waveft", "waveft_coif2", "waveft_direct"}) {
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

TEST_CASE("waveft golden: the configs' fields reach the adapters", "[waveft][golden]") {
  peft_test::golden_case<peft::waveft<double>> a("waveft"), b("waveft_coif2"), d("waveft_direct");
  const auto& up = a.layer("up").adapter("default");
  CHECK(up.n_frequency() == 300);
  CHECK(up.scaling() == 25.0);
  CHECK(up.wavelet_family() == "db2");
  CHECK(up.use_idwt());
  CHECK(up.random_loc_seed() == 777);
  CHECK(up.rec_lo().size() == 4);
  const auto& down = b.layer("down").adapter("default");
  CHECK(down.n_frequency() == 500);
  CHECK(down.scaling() == 10.0);
  CHECK(down.wavelet_family() == "coif2");
  CHECK(down.rec_lo().size() == 12);
  CHECK(down.random_loc_seed() == 2024);
  CHECK(down.rows() != b.layer("up").adapter("default").rows());  // the locations follow the shape
  const auto& direct = d.layer("up").adapter("default");
  CHECK_FALSE(direct.use_idwt());
  CHECK(direct.wavelet_family() == "db20");  // no filter, and none needed without the transform
  CHECK(direct.n_frequency() == 400);
}

TEMPLATE_TEST_CASE("waveft: delta weight, forward, dx and the spectrum gradient match PEFT for every wavelet",
                   "[waveft]", float, double) {
  using T = TestType;
  const auto& cases = transforms().at("cases");
  REQUIRE(cases.size() == 26);  // db1-db10, sym2-sym10, coif1-coif4, a larger coif4, two direct
  peft::rng g(17);
  for (const auto& c : cases) {
    const auto out = c.at("out").get<peft::index>(), in = c.at("in").get<peft::index>();
    INFO(c.at("wavelet_family").get<std::string>() << (c.at("use_idwt").get<bool>() ? "" : " direct") << ", " << out
                                                    << " x " << in);
    auto a = from_case<T>(c);
    // PEFT's locations.
    CHECK(a.rows() == c.at("rows").get<std::vector<std::int64_t>>());
    CHECK(a.cols() == c.at("cols").get<std::vector<std::int64_t>>());
    const auto delta = json_matrix(c.at("delta"), out, in);
    REQUIRE(peft_test::max_abs(delta) > 1e-6);  // 1e-5 where a long filter's tails fall on a 1 x 3 layer
    // y, dx and delta_weight against PEFT's get_delta_weight.
    const auto w = peft_test::random_dense<T>(in, out, g);
    const auto x = peft_test::random_matrix<T>(3, in, g);
    const auto gy = peft_test::random_matrix<T>(3, out, g);
    peft_test::check_against_delta(a, w, x, gy, delta, peft_test::tolerance<T>());
    // The gradient of sum(G * Delta W) (PEFT's autograd): backward with x = I and dL/dy = G^T,
    // for which the weight's gradient g^T x is G.
    const auto G = json_matrix(c.at("g"), out, in);
    peft::matrix<T> eye(in, in), gt(in, out), dx(in, in);
    for (peft::index i = 0; i < in; ++i) eye(i, i) = T{1};
    for (peft::index i = 0; i < out; ++i) {
      for (peft::index j = 0; j < in; ++j) gt(j, i) = static_cast<T>(G(i, j));
    }
    a.zero_grad();
    typename peft::waveft<T>::cache_type cache;
    a.backward(w, eye.view(), gt.view(), dx.view(), cache);
    const auto grad = json_matrix(c.at("grad"), 1, a.n_frequency());
    CHECK(peft_test::rel_error(a.grad_spectrum(), grad) < peft_test::tolerance<T>());
  }
}

TEST_CASE("waveft: the spectrum gradient is the inverse transform's adjoint (finite differences)", "[waveft]") {
  // L = sum(y * gy) is linear in each coefficient: central differences are exact up to rounding.
  peft::rng g(23);
  for (const char* family : {"db1", "sym7", "coif4", "db10"}) {
    INFO(family);
    const peft::index in = 19, out = 23, n = 60;
    std::vector<double> s(static_cast<std::size_t>(n));
    for (auto& v : s) v = g.uniform(-1, 1);
    peft::waveft<double> a(std::move(s), 3.0, family, true, 5, in, out);
    const auto w = peft_test::random_dense<double>(in, out, g);
    const auto x = peft_test::random_matrix<double>(4, in, g);
    const auto gy = peft_test::random_matrix<double>(4, out, g);
    peft::matrix<double> y(4, out), dx(4, in);
    peft::waveft<double>::cache_type cache;
    a.zero_grad();
    a.forward(w, x.view(), y.view(), cache);
    a.backward(w, x.view(), gy.view(), dx.view(), cache);
    REQUIRE(peft_test::nontrivial(a.grad_spectrum()));
    const auto loss = [&] {
      peft::matrix<double> yy(4, out);
      peft::waveft<double>::cache_type c2;
      a.forward(w, x.view(), yy.view(), c2);
      return peft_test::dot(yy, gy);
    };
    peft::matrix<double> fd(1, n);
    const double h = 1e-3;
    for (peft::index k = 0; k < n; ++k) {
      const double v = a.spectrum()(0, k);
      a.spectrum()(0, k) = v + h;
      const double up = loss();
      a.spectrum()(0, k) = v - h;
      const double down = loss();
      a.spectrum()(0, k) = v;
      fd(0, k) = (up - down) / (2 * h);
    }
    CHECK(peft_test::rel_error(a.grad_spectrum(), fd) < 1e-9);
  }
}

TEST_CASE("waveft: the locations are torch.randperm(out * in, manual_seed(seed))[:n] split by in", "[waveft]") {
  const peft::index in = 1024, out = 768, n = 2592;
  const peft::waveft<float> a(in, out, {.n_frequency = n, .wavelet_family = "sym4", .random_loc_seed = 777});
  const auto p = peft::torch_generator(777).randperm(in * out);
  for (peft::index k = 0; k < n; ++k) {
    const auto want = p[static_cast<std::size_t>(k)];
    REQUIRE(a.rows()[static_cast<std::size_t>(k)] == want / in);
    REQUIRE(a.cols()[static_cast<std::size_t>(k)] == want % in);
  }
  // PEFT's default init zeros the spectrum; init_weights = false draws it small and non-zero.
  CHECK(peft_test::max_abs(a.spectrum()) == 0.0);
  const peft::waveft<double> b(in, out, {.n_frequency = 100, .init_weights = false, .seed = 3});
  CHECK(peft_test::nontrivial(b.spectrum()));
  CHECK(peft_test::max_abs(b.spectrum()) < 0.1);
}

TEST_CASE("waveft: the checkpoint round trip keeps the spectrum and the config", "[waveft][io]") {
  for (const std::string name : {"waveft_coif2", "waveft_direct"}) {
    INFO(name);
    const auto base = peft::io::safetensors_file::open(peft_test::golden_dir(name) / "base_model.safetensors");
    auto ck = peft_test::load_bound<peft::waveft<double>>(peft_test::golden_dir(name) / "adapter", base);
    auto back = peft_test::save_and_load(ck, name + "_round_trip");
    REQUIRE(back.modules.size() == ck.modules.size());
    for (std::size_t i = 0; i < ck.modules.size(); ++i) {
      auto& a = ck.modules[i].adapter;
      auto& b = back.modules[i].adapter;
      INFO(ck.modules[i].path);
      CHECK(back.modules[i].path == ck.modules[i].path);
      CHECK(b.n_frequency() == a.n_frequency());
      CHECK(b.scaling() == a.scaling());
      CHECK(b.wavelet_family() == a.wavelet_family());
      CHECK(b.use_idwt() == a.use_idwt());
      CHECK(b.random_loc_seed() == a.random_loc_seed());
      CHECK(peft_test::rel_error(b.spectrum(), a.spectrum()) == 0.0);  // f32 values stored in f32
      b.set_features(a.in_features(), a.out_features());
      CHECK(b.rows() == a.rows());
      CHECK(b.cols() == a.cols());
    }
    for (const char* f : {"n_frequency", "scaling", "wavelet_family", "use_idwt", "random_loc_seed",
                          "n_frequency_pattern", "fan_in_fan_out", "proportional_parameters"}) {
      INFO(f);
      CHECK(back.config.raw.at(f) == ck.config.raw.at(f));
    }
    CHECK(back.config.peft_type == "WAVEFT");
    CHECK_FALSE(back.config.raw.contains("r"));  // WaveFTConfig has no r
  }
}

TEST_CASE("waveft: n_frequency_pattern follows PEFT's re.match('.*\\.key$')", "[waveft][io]") {
  using codec = peft::io::peft_codec<peft::waveft<double>>;
  const auto c = peft::io::adapter_config::parse(
      R"({"peft_type": "WAVEFT", "n_frequency": 64, "n_frequency_pattern": {"q_proj": 8}, "wavelet_family": "sym3"})");
  CHECK(codec::n_frequency_for(c, "model.layers.0.self_attn.q_proj") == 8);
  CHECK(codec::n_frequency_for(c, "model.layers.0.mlp.up_proj") == 64);
  CHECK(codec::n_frequency_for(c, "q_proj") == 64);  // no dot before the key: PEFT keeps n_frequency
  CHECK(codec::n_frequency_for(peft::io::adapter_config::parse(R"({"peft_type": "WAVEFT"})"), "a.b") == 2592);
  peft::rng g(3);
  auto m = peft_test::random_tensors<double>("model.layers.0.self_attn.q_proj", {{"waveft_spectrum", {8}}}, g);
  m.set_base_shape(std::pair<peft::index, peft::index>{12, 10});
  const auto a = codec::from_checkpoint(c, m, peft::io::checkpoint_tensors<double>("base_model"));
  CHECK(a.n_frequency() == 8);
  CHECK(a.wavelet_family() == "sym3");
  CHECK((a.in_features() == 10 && a.out_features() == 12));
}

TEST_CASE("waveft: bad configs, refused wavelets and fields are refused by name", "[waveft][io]") {
  const fs::path dir = peft_test::scratch_path("waveft_bad");
  const auto load = [&](const std::function<void(nlohmann::ordered_json&)>& edit) {
    fs::remove_all(dir);
    rewrite_adapter("waveft", dir, edit);
    return message_of([&] { (void)peft::io::load_checkpoint_as<peft::waveft<float>>(dir); });
  };
  const auto where = Catch::StartsWith("[waveft::from_checkpoint]");
  CHECK_THAT(load([](auto& j) { j["n_frequency"] = 299; }), where && Catch::Contains("waveft_spectrum has 300 values"));
  CHECK_THAT(load([](auto& j) { j["random_loc_seed"] = nullptr; }), where && Catch::Contains("'random_loc_seed' is null"));
  CHECK_THAT(load([](auto& j) { j["scaling"] = "big"; }), where && Catch::Contains("'scaling'"));
  CHECK_THAT(load([](auto& j) { j["use_idwt"] = 1; }), where && Catch::Contains("'use_idwt'"));
  CHECK_THAT(load([](auto& j) { j["wavelet_family"] = 2; }), where && Catch::Contains("'wavelet_family'"));
  // Names WaveFTConfig refuses, and ones it accepts but PEFT cannot reconstruct with.
  for (const char* bad : {"haar", "db0", "db39", "sym1", "coif18", "DB2", "db02"}) {
    INFO(bad);
    CHECK_THAT(load([&](auto& j) { j["wavelet_family"] = bad; }),
               where && Catch::Contains(std::string("wavelet_family '") + bad + "' is not one"));
  }
  CHECK_THAT(load([](auto& j) { j["wavelet_family"] = "coif5"; }),
             where && Catch::Contains("wavelet 'coif5'") && Catch::Contains("48 taps"));
  for (const char* missing : {"db11", "sym20", "coif17"}) {
    INFO(missing);
    CHECK_THAT(load([&](auto& j) { j["wavelet_family"] = missing; }),
               where && Catch::Contains(std::string("wavelet '") + missing + "'") && Catch::Contains("no filter"));
  }
  CHECK_THAT(load([](auto& j) { j["proportional_parameters"] = true; }),
             where && Catch::Contains("'proportional_parameters'"));
  CHECK_THAT(load([](auto& j) { j["bias"] = "waveft_only"; }), where && Catch::Contains("'bias'"));
  CHECK_THAT(load([](auto& j) { j["wavelet_levels"] = 2; }), where && Catch::Contains("'wavelet_levels'"));
  // Training-only fields load, and so does any family without the transform.
  CHECK(load([](auto& j) { j["init_weights"] = false; }).empty());
  CHECK(load([](auto& j) {
          j["wavelet_family"] = "db38";
          j["use_idwt"] = false;
        }).empty());
  fs::remove_all(dir);
}

TEST_CASE("waveft: shapes, wavelets and an unbound adapter are refused by name", "[waveft]") {
  peft::rng g(5);
  CHECK_THROWS_WITH(peft::waveft<double>(3, 2, {.n_frequency = 7}),
                    Catch::StartsWith("[waveft::waveft]") && Catch::Contains("n_frequency 7 exceeds"));
  CHECK_THROWS_WITH(peft::waveft<double>(3, 2, {.n_frequency = 0}),
                    Catch::StartsWith("[waveft::waveft]") && Catch::Contains("positive integer, got 0"));
  CHECK_THROWS_WITH(peft::waveft<double>(std::vector<double>{}, 1.0, "db1", true, 1), Catch::StartsWith("[waveft::waveft]"));
  CHECK_THROWS_AS(peft::waveft<double>(4, 4, {.n_frequency = 2, .wavelet_family = "db12"}), peft::unsupported_error);
  CHECK_THROWS_WITH(peft::waveft<double>(4, 4, {.n_frequency = 2, .wavelet_family = "coif5"}),
                    Catch::StartsWith("[waveft::waveft] wavelet 'coif5'"));
  CHECK_THROWS_WITH(peft::waveft<double>(4, 4, {.n_frequency = 2, .wavelet_family = "morlet"}),
                    Catch::StartsWith("[waveft::waveft] wavelet_family 'morlet'"));
  CHECK_NOTHROW(peft::waveft<double>(4, 4, {.n_frequency = 2, .wavelet_family = "db12", .use_idwt = false}));
  CHECK(peft::waveft<double>::reduction_of("coif17") == 100);  // PEFT's WAVELET_REDUCTIONS
  CHECK(peft::waveft<double>::reduction_of("db38") == 74);
  CHECK(peft::waveft<double>::reduction_of("sym2") == 2);
  // Without the layer's shape the adapter cannot run; set_features binds it once.
  peft::waveft<double> a(std::vector<double>{1.0, -2.0, 0.5}, 10.0, "db2", true, 9);
  CHECK_FALSE(a.bound());
  const auto w = peft_test::random_dense<double>(4, 3, g);
  peft::matrix<double> x(2, 4), y(2, 3);
  peft::waveft<double>::cache_type cache;
  CHECK_THROWS_WITH(a.forward(w, x.view(), y.view(), cache),
                    Catch::StartsWith("[waveft::forward]") && Catch::Contains("set_features"));
  a.set_features(4, 3);
  CHECK(a.bound());
  a.set_features(4, 3);
  CHECK_THROWS_WITH(a.set_features(3, 4), Catch::StartsWith("[waveft::set_features]"));
  a.forward(w, x.view(), y.view(), cache);
  peft_test::check_unset_rejected<peft::waveft<double>, peft::error>(w);
  peft_test::check_shape_errors(a, w, 2,
                                {{peft_test::pass::forward, peft_test::arg::x, 2, 5},
                                 {peft_test::pass::forward, peft_test::arg::y, 2, 4},
                                 {peft_test::pass::backward, peft_test::arg::dx, 2, 3},
                                 {peft_test::pass::delta_weight, peft_test::arg::dw, 4, 4},
                                 {peft_test::pass::forward, peft_test::arg::base, 3, 5}});
}

}  // namespace test_waveft
