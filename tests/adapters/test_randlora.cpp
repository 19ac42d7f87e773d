// RandLoRA: parity with HuggingFace PEFT 0.21 (tests/data/peft/randlora: the two-layer MLP,
// up 64 -> 96 (in < out), down 96 -> 48 (in > out): both of PEFT's orientations; bases
// randlora_A [8, 1, 96], randlora_B [96, 12, 8] shared by both layers, randlora_alpha 640, r 8),
// PEFT's flatten orders through a literal transcription of get_scaled_bases, gradients by finite
// differences, sharing (one object, saved once), slicing, identity at init, per-module copies of
// the bases (accepted when equal), save_projection=false and malformed shapes rejected.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>

#include "peft/io/peft/randlora.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/randlora.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/shared_projection_checks.hpp"
#include "support/test_support.hpp"

namespace test_randlora {

namespace {

namespace fs = std::filesystem;
using peft_test::rel_error;
using peft_test::rewrite_adapter;
using peft_test::tolerance;

const fs::path case_dir = peft_test::golden_dir("randlora");

template <class T>
using golden_case = peft_test::golden_case<peft::randlora<T>>;

/// PEFT's get_delta_weight transcribed literally, in double, with 3-D indexing of the bases:
///   update_A = (lambda[:, :, None] * A[:, :nb, :mn] * gamma[None]).flatten(end_dim=1)   (R, mn)
///   update_B = B[:mx, :nb, :].flatten(start_dim=1)                                       (mx, R)
///   in == mn: (update_B, update_A) = (update_A, update_B); else (update_B^T, update_A^T)
///   delta = (update_B^T @ update_A^T)^T * scaling
template <class T>
peft::matrix<double> peft_delta_weight(const peft::randlora<T>& a) {
  const peft::index in = a.in_features(), out = a.out_features(), r = a.rank();
  const peft::index mn = std::min(in, out), mx = std::max(in, out), nb = (mn + r - 1) / r;
  const peft::index nb_max = a.max_num_bases(), mn_max = a.shared_A()->cols();
  const auto A3 = [&](peft::index k, peft::index m, peft::index j) {  // A[k, m, j] of [r, 1, mn_max]
    return static_cast<double>(a.shared_A()->data()[(k * 1 + m) * mn_max + j]);
  };
  const auto B3 = [&](peft::index i, peft::index b, peft::index k) {  // B[i, b, k] of [mx_max, nb_max, r]
    return static_cast<double>(a.shared_B()->data()[(i * nb_max + b) * r + k]);
  };
  peft::matrix<double> ua(r * nb, mn), ub(mx, nb * r);
  for (peft::index k = 0; k < r; ++k)
    for (peft::index b = 0; b < nb; ++b)
      for (peft::index j = 0; j < mn; ++j)
        ua(k * nb + b, j) = static_cast<double>(a.lambda()(k, b)) * A3(k, 0, j) * static_cast<double>(a.gamma()(b, j));
  for (peft::index i = 0; i < mx; ++i)
    for (peft::index b = 0; b < nb; ++b)
      for (peft::index k = 0; k < r; ++k) ub(i, b * r + k) = B3(i, b, k);
  // in == mn: update_B := ua, update_A := ub; delta = (ua^T ub^T)^T = ub ua.
  // else:     update_B := ub^T, update_A := ua^T; delta = (ub ua)^T.
  const auto vu = peft_test::ref_nn(ub, ua);  // (mx, mn)
  const double s = static_cast<double>(a.scale());
  peft::matrix<double> d(out, in);
  for (peft::index i = 0; i < out; ++i)
    for (peft::index j = 0; j < in; ++j) d(i, j) = s * (in == mn ? vu(i, j) : vu(j, i));
  return d;
}

}  // namespace

TEMPLATE_TEST_CASE("randlora golden: each layer's output, dx and gamma/lambda gradients match PEFT",
                   "[randlora][golden]", float, double) {
  using T = TestType;
  golden_case<T> c("randlora");
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    const auto& a = c.layer(name).adapter("default");
    REQUIRE(peft_test::nontrivial(a.lambda()));  // the golden adapter is not the identity
    REQUIRE(peft_test::nontrivial(a.gamma()));
    CHECK(a.scale() == static_cast<T>(80));     // randlora_alpha 640 / r 8
    CHECK(a.num_bases() == (name == "up" ? 8 : 6));
    peft_test::check_layer_outputs(c, name, tolerance<T>());
    peft_test::check_trainable_gradients(c, name, tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("randlora golden: the two-layer network's output, dL/dx and gradients match PEFT",
                   "[randlora][golden]", float, double) {
  golden_case<TestType> c("randlora");
  peft_test::check_network_trainable(c, tolerance<TestType>());
}

TEMPLATE_TEST_CASE("randlora golden: delta_weight and merge give PEFT's merged weights", "[randlora][golden][merge]",
                   float, double) {
  using T = TestType;
  golden_case<T> c("randlora");
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    const auto dw = peft_test::check_merged_delta(c, name, 1e-2);
    CHECK(rel_error(dw, peft_delta_weight(c.layer(name).adapter("default"))) < tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("randlora: forward and delta_weight follow PEFT's flatten orders on odd shapes",
                   "[randlora][slicing]", float, double) {
  using T = TestType;
  peft::rng g(31);
  // (in, out): both orientations, ranks that do not divide min(in, out), bases larger than every layer.
  const std::vector<std::pair<peft::index, peft::index>> layers{{5, 11}, {11, 5}, {7, 7}, {1, 4}, {12, 3}};
  for (const peft::index r : {1, 3, 4}) {
    const auto p = peft::make_randlora_projections<T>(r, layers, 1000 + static_cast<std::uint64_t>(r));
    REQUIRE(p.A->cols() == 11);  // min of the largest (out, in) = (11, 12)
    REQUIRE(p.B->rows() == 12);
    REQUIRE(p.B->cols() == peft::randlora_num_bases(11, r) * r);
    for (auto [in, out] : layers) {
      INFO("r " << r << " in " << in << " out " << out);
      const peft::index mn = std::min(in, out), nb = peft::randlora_num_bases(mn, r);
      const peft::randlora<T> a(p.A, p.B, in, out, 2.5 * static_cast<double>(r), peft_test::random_matrix<T>(r, nb, g),
                                peft_test::random_matrix<T>(nb, mn, g));
      CHECK(a.A_slice().stride() == 11);
      CHECK(a.B_slice().stride() == p.B->cols());
      CHECK(a.B_slice().cols() == nb * r);
      const auto d_ref = peft_delta_weight(a);
      const peft::dense<T> w(peft_test::random_matrix<T>(out, in, g), peft_test::random_vector<T>(out, g));
      peft::matrix<T> dw(out, in);
      a.delta_weight(w, dw.view());
      const double tol = tolerance<T>(1e-13);
      CHECK(rel_error(dw, d_ref) < tol);
      const auto x = peft_test::random_matrix<T>(3, in, g);
      REQUIRE(peft_test::nontrivial(x));
      const auto y_ref = peft_test::add(peft_test::ref_linear(x, w.weight(), w.bias()), peft_test::ref_nt(x, d_ref));
      peft::matrix<T> y(3, out);
      typename peft::randlora<T>::cache_type cache;
      a.forward(w, x.view(), y.view(), cache);
      CHECK(rel_error(y, y_ref) < tol);
      // U as PEFT builds it (k-major rows).
      const auto u = a.scaled_basis();
      CHECK(u.rows() == r * nb);
      CHECK(u(r * nb - 1, mn - 1) == a.lambda()(r - 1, nb - 1) * (*p.A)(r - 1, mn - 1) * a.gamma()(nb - 1, mn - 1));
    }
  }
}

TEST_CASE("randlora: gradients of lambda, gamma and x agree with finite differences (both orientations)",
          "[randlora][gradients]") {
  const auto base = peft::io::safetensors_file::open(case_dir / "base_model.safetensors");
  const auto reference = peft::io::safetensors_file::open(case_dir / "reference.safetensors");
  auto ck = peft_test::load_bound<peft::randlora<double>>(case_dir / "adapter", base);
  peft::rng g(3);
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto a = ck.find(name + ".weight")->adapter;
    const peft::dense<double> w = peft::dense<double>::from(peft::matrix_view<const float>(base.read_matrix<float>(name + ".weight").view()));
    auto x = reference.read_matrix<double>("layer." + name + ".input");
    const auto gy = peft_test::random_matrix<double>(x.rows(), w.out_features(), g);
    peft::matrix<double> y(x.rows(), w.out_features()), dx(x.rows(), w.in_features());
    peft::randlora<double>::cache_type cache;
    a.zero_grad();
    a.forward(w, x.view(), y.view(), cache);
    a.backward(w, x.view(), gy.view(), dx.view(), cache);
    auto loss = [&] {
      peft::matrix<double> yy(x.rows(), w.out_features());
      peft::randlora<double>::cache_type c;
      a.forward(w, x.view(), yy.view(), c);
      return peft_test::dot(yy, gy);
    };
    // The loss is linear in each lambda, gamma and x entry: a large step is exact up to rounding.
    CHECK(rel_error(dx, peft_test::fd_gradient(x.view(), 1e-2, loss)) < 1e-8);
    CHECK(rel_error(a.grad_lambda(), peft_test::fd_gradient(a.lambda(), 1e-2, loss)) < 1e-8);
    CHECK(rel_error(a.grad_gamma(), peft_test::fd_gradient(a.gamma(), 1e-2, loss)) < 1e-8);
    CHECK(peft_test::nontrivial(a.grad_lambda()));
    CHECK(peft_test::nontrivial(a.grad_gamma()));
  }
}

TEST_CASE("randlora: the bases are shared, never copied; PEFT's per-module copies are checked and dropped",
          "[randlora][shared]") {
  const auto base = peft::io::safetensors_file::open(case_dir / "base_model.safetensors");
  auto ck = peft_test::load_bound<peft::randlora<double>>(case_dir / "adapter", base);
  auto& up = ck.find("up.weight")->adapter;
  auto& down = ck.find("down.weight")->adapter;
  peft_test::check_one_projection_object(up, down);  // the per-module copies were not kept
  peft::adapted_linear<peft::dense<float>, peft::randlora<double>> layer(peft_test::load_base(base, "up"));
  const auto& held = layer.add_adapter("default", up);
  CHECK(held.shared_B().get() == up.shared_B().get());
  CHECK(up.shared_B().use_count() == 3);
  for (auto& p : up.parameters()) {
    INFO(p.name);
    const bool basis = p.name == "randlora_A" || p.name == "randlora_B";
    CHECK(p.shared == basis);
    CHECK(p.trainable == !basis);
    if (p.name == "randlora_A") CHECK(p.shape == std::vector<std::int64_t>{8, 1, 96});
    if (p.name == "randlora_B") CHECK(p.shape == std::vector<std::int64_t>{96, 12, 8});
  }
  CHECK(ck.parameter_count() == (8 * 8 + 8 * 64) + (8 * 6 + 6 * 48));  // trainable only, as PEFT counts
  CHECK(ck.parameter_count() == 912);  // PEFT's trainable count (case.json)
  // The bases are the same memory: a change through one module shows in the other (row 90 <
  // max(in, out) = 96 of down).
  peft_test::check_change_reaches_other(up, down, peft_test::load_base(base, "down"), "randlora_B", 90, 0, 1e-9);
}

TEST_CASE("randlora: save_peft_checkpoint writes the bases once and reloads to identical outputs",
          "[randlora][shared][io]") {
  const auto base = peft::io::safetensors_file::open(case_dir / "base_model.safetensors");
  const auto reference = peft::io::safetensors_file::open(case_dir / "reference.safetensors");
  auto ck = peft_test::load_bound<peft::randlora<double>>(case_dir / "adapter", base);
  const auto dir = peft_test::scratch_path("peft_randlora_roundtrip");
  peft_test::check_saved_once(ck, dir, "randlora",
                              {{"base_model.model.down.randlora_gamma", {}},
                               {"base_model.model.down.randlora_lambda", {}},
                               {"base_model.model.up.randlora_gamma", {}},
                               {"base_model.model.up.randlora_lambda", {}},
                               {"base_model.randlora_A", {8, 1, 96}}, {"base_model.randlora_B", {96, 12, 8}}});
  const auto cfg = peft::io::adapter_config::load(dir);
  CHECK(cfg.peft_type == "RANDLORA");
  CHECK(cfg.r == 8);
  CHECK(cfg.raw["randlora_alpha"] == 640);
  CHECK(cfg.raw["randlora_alpha"].is_number_integer());
  CHECK(cfg.raw["save_projection"] == true);
  peft_test::check_reloaded(ck, dir, base, reference, 1e-12);  // without the per-module copies
  fs::remove_all(dir);
}

TEMPLATE_TEST_CASE("randlora: a fresh adapter is the identity (lambda = 0, gamma = 1 / max(nb, mn))",
                   "[randlora][init]", float, double) {
  using T = TestType;
  peft::rng g(8);
  const auto p = peft::make_randlora_projections<T>(4, {{10, 6}, {20, 30}}, 3);
  for (auto [in, out] : std::vector<std::pair<peft::index, peft::index>>{{10, 6}, {6, 10}, {20, 30}}) {
    INFO("in " << in << " out " << out);
    peft::randlora<T> a(p, in, out, 80.0);
    const peft::index mn = std::min(in, out), nb = peft::randlora_num_bases(mn, 4);
    CHECK(a.lambda().rows() == 4);
    CHECK(a.lambda().cols() == nb);
    CHECK(peft_test::count_nonzero(a.lambda()) == 0);
    CHECK(a.gamma()(nb - 1, mn - 1) == static_cast<T>(1.0 / static_cast<double>(std::max(nb, mn))));
    CHECK(a.scale() == static_cast<T>(20));
    peft_test::check_identity_at_init(a, 3, g);
    CHECK(peft_test::nontrivial(a.grad_lambda()));  // training moves it off the identity
  }
}

TEST_CASE("randlora: make_randlora_projections draws PEFT's distribution from peft::rng", "[randlora][init]") {
  const auto p = peft::make_randlora_projections<double>(8, {{64, 96}, {96, 48}}, 9);
  CHECK(p.A->rows() == 8);
  CHECK(p.A->cols() == 96);
  CHECK(p.B->rows() == 96);
  CHECK(p.B->cols() == 12 * 8);
  for (const auto* m : {p.A.get(), p.B.get()}) {  // unit sample standard deviation
    double mean = 0, var = 0;
    for (double v : m->storage()) mean += v;
    mean /= static_cast<double>(m->size());
    for (double v : m->storage()) var += (v - mean) * (v - mean);
    CHECK(std::sqrt(var / static_cast<double>(m->size() - 1)) == Approx(1.0).epsilon(1e-12));
  }
  const auto same = peft::make_randlora_projections<double>(8, {{64, 96}, {96, 48}}, 9);
  CHECK(peft_test::exactly_equal(*same.B, *p.B));
  CHECK_THROWS_AS(peft::make_randlora_projections<double>(0, {{4, 4}}), peft::shape_error);
}

TEST_CASE("randlora: per-module copies of the bases must equal the shared ones", "[randlora][errors][io]") {
  const auto dir = peft_test::scratch_path("peft_randlora_copies");
  const auto base = peft::io::safetensors_file::open(case_dir / "base_model.safetensors");
  const auto original = peft::io::safetensors_file::open(case_dir / "adapter" / "adapter_model.safetensors");
  auto keep = [](auto&) {};
  SECTION("a differing copy is rejected") {
    auto b = original.read<float>("base_model.model.down.randlora_B");
    b[5] += 1.0f;
    rewrite_adapter("randlora", dir, keep, {{"base_model.model.down.randlora_B", {{96, 12, 8}, b}}});
    const auto msg = peft_test::message_of([&] { peft::io::load_checkpoint_as<peft::randlora<double>>(dir); });
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::randlora<double>>(dir), peft::format_error);
    CHECK(msg.find("module 'down': its copy of randlora_B differs from base_model.randlora_B") != std::string::npos);
  }
  SECTION("a copy of another shape is rejected") {
    rewrite_adapter("randlora", dir, keep,
                    {{"base_model.model.up.randlora_A", {{8, 96}, original.read<float>("base_model.randlora_A")}}});
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::randlora<double>>(dir), peft::format_error);
  }
  SECTION("missing copies are fine") {
    rewrite_adapter("randlora", dir, keep, {}, {"base_model.model.up.randlora_A", "base_model.model.up.randlora_B"});
    auto ck = peft_test::load_bound<peft::randlora<double>>(dir, base);
    CHECK(ck.modules.size() == 2);
  }
  SECTION("the shared bases are required") {
    rewrite_adapter("randlora", dir, keep, {}, {"base_model.randlora_A"});
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::randlora<double>>(dir), peft::format_error);
  }
  fs::remove_all(dir);
}

TEST_CASE("randlora: save_projection=false is rejected with a clear message", "[randlora][errors][io]") {
  peft_test::check_projection_required<peft::randlora<float>>("randlora");
}

TEST_CASE("randlora: malformed checkpoints are rejected", "[randlora][errors][io]") {
  const auto dir = peft_test::scratch_path("peft_randlora_malformed");
  auto keep = [](auto&) {};
  SECTION("lambda with the wrong rank") {
    rewrite_adapter("randlora", dir, keep,
                    {{"base_model.model.up.randlora_lambda", {{9, 8}, std::vector<float>(72, 0.5f)}}});
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::randlora<double>>(dir), peft::format_error);
  }
  SECTION("gamma with a number of bases that is not ceil(min / r)") {
    rewrite_adapter("randlora", dir, keep,
                    {{"base_model.model.up.randlora_gamma", {{7, 64}, std::vector<float>(7 * 64, 0.5f)}},
                     {"base_model.model.up.randlora_lambda", {{8, 7}, std::vector<float>(56, 0.5f)}}});
    const auto msg = peft_test::message_of([&] { peft::io::load_checkpoint_as<peft::randlora<double>>(dir); });
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::randlora<double>>(dir), peft::format_error);
    CHECK(msg.find("ceil(min(in, out) / r)") != std::string::npos);
  }
  SECTION("gamma wider than the bases") {
    rewrite_adapter("randlora", dir, keep,
                    {{"base_model.model.up.randlora_gamma", {{13, 97}, std::vector<float>(13 * 97, 0.5f)}},
                     {"base_model.model.up.randlora_lambda", {{8, 13}, std::vector<float>(8 * 13, 0.5f)}}});
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::randlora<double>>(dir), peft::format_error);
  }
  SECTION("randlora_A without its unit middle dimension") {
    rewrite_adapter("randlora", dir, keep, {{"base_model.randlora_A", {{8, 2, 48}, std::vector<float>(8 * 96, 0.5f)}}},
                    {"base_model.model.up.randlora_A", "base_model.model.down.randlora_A"});
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::randlora<double>>(dir), peft::format_error);
  }
  SECTION("r in the config differs from the bases") {
    rewrite_adapter("randlora", dir, [](auto& c) { c["r"] = 4; });
    CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::randlora<double>>(dir), peft::format_error);
  }
  fs::remove_all(dir);
}

TEST_CASE("randlora: malformed shapes are rejected by the constructors and at use", "[randlora][errors]") {
  peft::rng g(2);
  const auto p = peft::make_randlora_projections<double>(3, {{8, 6}}, 1);  // A (3, 6), B (8, 2 * 3)
  using R = peft::randlora<double>;
  CHECK_THROWS_AS(R(p.A, p.B, 8, 6, 6.0, peft::matrix<double>(3, 3), {}), peft::shape_error);  // lambda (r, nb+1)
  CHECK_THROWS_AS(R(p.A, p.B, 8, 6, 6.0, peft::matrix<double>(4, 2), {}), peft::shape_error);
  CHECK_THROWS_AS(R(p.A, p.B, 8, 6, 6.0, {}, peft::matrix<double>(2, 5)), peft::shape_error);
  CHECK_THROWS_AS(R(p.A, p.B, 9, 6, 6.0), peft::shape_error);  // max(in, out) above randlora_B's height
  CHECK_THROWS_AS(R(p.A, p.B, 8, 7, 6.0), peft::shape_error);  // min(in, out) above randlora_A's width
  CHECK_THROWS_AS(R(p.A, p.B, 0, 6, 6.0), peft::shape_error);
  CHECK_THROWS_AS(R(nullptr, p.B, 8, 6, 6.0), peft::shape_error);
  CHECK_THROWS_AS(R(p.A, std::make_shared<peft::matrix<double>>(8, 5), 8, 6, 6.0), peft::shape_error);  // 5 % 3
  R a(p, 8, 6, 6.0);
  CHECK_THROWS_AS(a.set_features(8, 5), peft::shape_error);  // min(in, out) is fixed by gamma
  a.set_features(6, 8);                                      // the other orientation
  CHECK(a.in_features() == 6);
  CHECK(a.out_features() == 8);
  const peft::dense<double> w(peft_test::random_matrix<double>(6, 8, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::none, 0, 0,
                                  "[randlora::forward] base weight is (6, 8), adapter expects (8, 6)",
                                  peft_test::match::prefix}});
  a.set_features(8, 6);
  peft_test::check_shape_errors(a, w, 2, {{pass::backward, arg::dx, 2, 7}});
  peft_test::check_unset_rejected<R, peft::error>(w);
}

}  // namespace test_randlora
