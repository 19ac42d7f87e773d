// HiRA: parity with HuggingFace PEFT 0.21 (tests/data/peft/hira: r 8; hira_r4: r 4), the
// Hadamard delta W0 * (B A) and its gradients against double loops (over several panels of W0),
// every base format against its dequantized weights, merge and unmerge, initialisation, saving and
// loading, and the errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/hira.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/base/nf4.hpp"
#include "peft/base/q4_0.hpp"
#include "peft/io/peft/hira.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_hira {

using ix = peft::index;

namespace {

using peft_test::rel_error;
using peft_test::stored;
using peft_test::tolerance;

peft::io::adapter_config hira_config(ix r) {
  auto c = peft_test::config_of("HIRA");
  c.r = r;
  c.raw["r"] = r;
  return c;
}

template <class T>
peft::io::checkpoint_tensors<T> hira_tensors(ix in, ix out, ix r, peft::rng& g) {
  return peft_test::random_tensors<T>("layer", {{"hira_A", {r, in}}, {"hira_B", {out, r}}}, g);
}

/// W0 of any base, dequantized in double.
template <class Base>
peft::matrix<double> weight_of(const Base& w) {
  peft::matrix<double> m(w.out_features(), w.in_features());
  for (ix o = 0; o < m.rows(); ++o) w.dequantize_row(o, m.row(o));
  return m;
}

/// a * b elementwise, in double.
template <class MA, class MB>
peft::matrix<double> hadamard(const MA& a, const MB& b) {
  peft::matrix<double> c(a.rows(), a.cols());
  for (ix i = 0; i < a.rows(); ++i)
    for (ix j = 0; j < a.cols(); ++j) c(i, j) = peft_test::at(a, i, j) * peft_test::at(b, i, j);
  return c;
}

/// The adapter's forward, dx, delta and both gradients over base `w` against double loops on
/// W0 = w's dequantized weight: dW = W0 * (B A); with M = g^T x: dB = (W0 * M) A^T,
/// dA = B^T (W0 * M).
template <class T, class Base>
void check_against_loops(peft::hira<T> a, const Base& w, ix batch, peft::rng& g, double tol) {
  const auto w0 = weight_of(w);
  const auto x = peft_test::random_matrix<T>(batch, a.in_features(), g);
  const auto gy = peft_test::random_matrix<T>(batch, a.out_features(), g);
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(a.B()));
  const auto dW = hadamard(w0, peft_test::ref_nn(a.B(), a.A()));
  const auto wd = peft::dense<double>(w0);
  typename peft::hira<T>::cache_type cache;
  // forward == x (W0 + dW)^T + b0, dx == gy (W0 + dW): against the base's own product for the
  // base part, the loops for the term.
  peft::matrix<T> y(batch, a.out_features()), yb(batch, a.out_features()), dx(batch, a.in_features()),
      dxb(batch, a.in_features());
  a.forward(w, x.view(), y.view(), cache);
  w.matmul(peft::matrix_view<const T>(x.view()), yb.view());
  CHECK(rel_error(y, peft_test::add(yb, peft_test::ref_nt(x, dW))) < tol);
  a.zero_grad();
  a.backward(w, x.view(), gy.view(), dx.view(), cache);
  w.matmul_t(peft::matrix_view<const T>(gy.view()), dxb.view(), false);
  CHECK(rel_error(dx, peft_test::add(dxb, peft_test::ref_nn(gy, dW))) < tol);
  const auto n = hadamard(w0, peft_test::ref_tn(gy, x));
  CHECK(rel_error(a.grad_B(), peft_test::ref_nt(n, a.A())) < tol);
  CHECK(rel_error(a.grad_A(), peft_test::ref_tn(a.B(), n)) < tol);
  peft::matrix<T> dw(a.out_features(), a.in_features());
  a.delta_weight(w, dw.view());
  CHECK(rel_error(dw, dW) < tol);
  std::vector<T> db(static_cast<std::size_t>(a.out_features()));
  CHECK(!a.delta_bias(w, db.data()));
}

}  // namespace

TEMPLATE_TEST_CASE("hira reproduces PEFT: layers, network, merged weights", "[hira][golden]", float, double) {
  peft_test::check_golden<peft::hira<TestType>>("hira");
  peft_test::check_golden<peft::hira<TestType>>("hira_r4");
}

TEST_CASE("hira golden checkpoints: rank and shapes", "[hira][golden]") {
  for (const auto& [name, r] : {std::pair<std::string, ix>{"hira", 8}, {"hira_r4", 4}}) {
    auto ck = peft::io::load_checkpoint_as<peft::hira<double>>(peft_test::golden_dir(name) / "adapter");
    const auto& up = ck.find("up.weight")->adapter;
    CHECK(up.rank() == r);
    CHECK(up.in_features() == 64);
    CHECK(up.out_features() == 96);
  }
}

TEST_CASE("hira golden checkpoints survive save and reload: tensors and config fields", "[hira][golden]") {
  for (const std::string name : {"hira", "hira_r4"}) {
    INFO("case " << name);
    auto ck = peft::io::load_checkpoint_as<peft::hira<double>>(peft_test::golden_dir(name) / "adapter");
    auto back = peft_test::save_and_load(ck, "peft_hira_golden_" + name);
    CHECK(back.config.peft_type == "HIRA");
    for (const char* f : {"r", "rank_pattern", "hira_dropout", "init_weights"}) {
      INFO("field " << f);
      CHECK(back.config.raw.at(f) == ck.config.raw.at(f));
    }
    REQUIRE(back.modules.size() == 2);
    for (auto& m : ck.modules) {
      auto& b = back.find(m.weight_name)->adapter;
      CHECK(rel_error(b.A(), m.adapter.A()) == 0.0);  // f32 values saved as f32
      CHECK(rel_error(b.B(), m.adapter.B()) == 0.0);
    }
  }
}

TEMPLATE_TEST_CASE("hira forward, dx, delta and gradients equal double loops, over several panels of W0", "[hira]",
                   float, double) {
  using T = TestType;
  peft::rng g(17);
  {
    const ix in = 13, out = 9, r = 3;
    peft::hira<T> a(peft_test::random_matrix<T>(r, in, g), peft_test::random_matrix<T>(out, r, g));
    check_against_loops(a, peft::dense<double>(peft_test::random_matrix<double>(out, in, g),
                                               peft_test::random_vector<double>(out, g)),
                        4, g, tolerance<T>());
  }
  {
    // 2^18 / 8192 = 32 rows per panel: three panels, the last one partial.
    const ix in = 8192, out = 70, r = 2;
    peft::hira<T> a(peft_test::random_matrix<T>(r, in, g), peft_test::random_matrix<T>(out, r, g));
    check_against_loops(a, peft::dense<double>(peft_test::random_matrix<double>(out, in, g)), 3, g, tolerance<T>());
  }
  // A second backward accumulates; zero_grad clears.
  const ix in = 6, out = 5;
  peft::hira<T> a(peft_test::random_matrix<T>(2, in, g), peft_test::random_matrix<T>(out, 2, g));
  const peft::dense<T> w(peft_test::random_matrix<T>(out, in, g));
  const auto x = peft_test::random_matrix<T>(3, in, g);
  const auto gy = peft_test::random_matrix<T>(3, out, g);
  typename peft::hira<T>::cache_type cache;
  peft::matrix<T> dx(3, in);
  a.backward(w, x.view(), gy.view(), dx.view(), cache);
  const auto first = peft_test::to_double(a.grad_A());
  a.backward(w, x.view(), gy.view(), dx.view(), cache);
  CHECK(rel_error(a.grad_A(), peft_test::scaled(first, 2.0)) < tolerance<T>());
  a.zero_grad();
  CHECK(peft_test::max_abs(a.grad_A()) == 0.0);
  CHECK(peft_test::max_abs(a.grad_B()) == 0.0);
}

TEMPLATE_TEST_CASE("hira over f32, bf16, int8, q4_0 and nf4 bases reads W0 as each base stores it", "[hira]", float,
                   double) {
  using T = TestType;
  peft::rng g(29);
  const ix in = 64, out = 12, r = 3;
  const auto wf = peft_test::random_matrix<float>(out, in, g);
  const auto bf = peft_test::random_vector<float>(out, g);
  const peft::matrix_view<const float> wv(wf.view());
  const peft::hira<T> a(peft_test::random_matrix<T>(r, in, g), peft_test::random_matrix<T>(out, r, g));
  // The base's own product and decoding are exact to float rounding; the term is computed in T.
  const double tol = std::is_same_v<T, float> ? tolerance<T>() : 1e-6;
  check_against_loops(a, peft::dense<float>::from(wv, bf.data()), 4, g, tol);
  check_against_loops(a, peft::dense<peft::bf16>::from(wv), 4, g, tol);
  check_against_loops(a, peft::int8_rowwise::quantize(wv), 4, g, tol);
  check_against_loops(a, peft::q4_0::quantize(wv, bf.data()), 4, g, tol);
  check_against_loops(a, peft::nf4::quantize(wv), 4, g, tol);
}

TEMPLATE_TEST_CASE("hira merge and unmerge: W0 * (1 + B A), undone from the merged weight", "[hira]", float, double) {
  using T = TestType;
  peft::rng g(31);
  const ix in = 9, out = 7, r = 2;
  const auto w0 = peft_test::random_matrix<T>(out, in, g);
  peft::adapted_linear<peft::dense<T>, peft::hira<T>> layer(peft::dense<T>(w0, peft_test::random_vector<T>(out, g)));
  layer.add_adapter("h", peft::hira<T>(peft_test::random_matrix<T>(r, in, g, -0.5, 0.5),
                                       peft_test::random_matrix<T>(out, r, g, -0.5, 0.5)));
  const auto x = peft_test::random_matrix<T>(4, in, g);
  peft::matrix<T> y(4, out), ym(4, out);
  layer.forward(x, y);
  layer.merge("h");
  const auto& a = layer.adapter("h");
  CHECK(rel_error(layer.base().weight(), hadamard(w0, peft_test::add(peft::matrix<double>(out, in, 1.0),
                                                                      peft_test::ref_nn(a.B(), a.A())))) <
        tolerance<T>());
  layer.forward(x, ym);
  CHECK(rel_error(ym, y) < tolerance<T>());
  layer.unmerge("h");
  CHECK(rel_error(layer.base().weight(), w0) < tolerance<T>());

  // Where 1 + B A is 0 the merged weight has lost W0: unmerge_delta refuses.
  peft::matrix<T> pa(1, 2), pb(2, 1);
  pa(0, 0) = T{1};
  pb(0, 0) = T{-1};
  pb(1, 0) = T{0.5};
  const peft::hira<T> lost(pa, pb);
  const peft::dense<T> w2(peft_test::random_matrix<T>(2, 2, g));
  peft::matrix<T> dw(2, 2);
  CHECK_THROWS_WITH(lost.unmerge_delta(w2, dw.view()),
                    Catch::StartsWith("[hira::unmerge_delta]") && Catch::Contains("1 + (B A)[0, 0] is 0"));
}

TEMPLATE_TEST_CASE("hira init: PEFT's default zeroes hira_B (a no-op); gaussian and random", "[hira]", float, double) {
  using T = TestType;
  peft::rng g(8);
  const ix in = 40, out = 24, r = 4;
  peft::hira<T> a(in, out, {.rank = r, .seed = 1});
  peft_test::check_identity_at_init(a, 3, g);
  CHECK(peft_test::max_abs(a.B()) == 0.0);
  CHECK(peft_test::count_nonzero(a.grad_B()) > a.grad_B().size() / 2);  // training moves it off the identity
  CHECK(peft_test::count_nonzero(a.A()) == a.A().size());
  CHECK(peft_test::max_abs(a.A()) <= 1.0 / std::sqrt(in));  // kaiming-uniform, a = sqrt 5
  CHECK(peft_test::max_abs(a.A()) > 0.5 / std::sqrt(in));
  peft::hira<T> gauss(400, out, {.rank = r, .init = peft::hira_init::gaussian, .seed = 2});
  CHECK(peft_test::max_abs(gauss.B()) == 0.0);
  double ss = 0.0;
  for (ix i = 0; i < gauss.A().rows(); ++i)
    for (ix j = 0; j < gauss.A().cols(); ++j) ss += static_cast<double>(gauss.A()(i, j)) * gauss.A()(i, j);
  CHECK(std::sqrt(ss / static_cast<double>(gauss.A().size())) == Approx(1.0 / r).epsilon(0.05));  // std 1 / r
  peft::hira<T> rnd(in, out, {.rank = r, .init = peft::hira_init::random, .seed = 3});
  const auto w = peft_test::random_dense<T>(in, out, g);
  peft_test::check_not_base(rnd, w, peft_test::random_matrix<T>(3, in, g), 1e-2);
}

TEST_CASE("hira checkpoints: r, PEFT's default r, rank_pattern as PEFT 0.21 uses it; save and load", "[hira]") {
  peft::rng g(2);
  peft::io::checkpoint_tensors<double> none;
  CHECK(peft::io::from_checkpoint<peft::hira<double>>(hira_config(3), hira_tensors<double>(7, 5, 3, g), none).rank() == 3);
  // PEFT 0.21 builds every module with r (dispatch_default drops rank_pattern's rank): a module it
  // saved has rank r even where rank_pattern says otherwise; the pattern's rank is accepted too.
  auto c = hira_config(3);
  c.rank_pattern = {{"layer", 2}};
  CHECK(peft::io::from_checkpoint<peft::hira<double>>(c, hira_tensors<double>(7, 5, 3, g), none).rank() == 3);
  CHECK(peft::io::from_checkpoint<peft::hira<double>>(c, hira_tensors<double>(7, 5, 2, g), none).rank() == 2);
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::hira<double>>(c, hira_tensors<double>(7, 5, 4, g), none),
                    Catch::Contains("has rank 4 but adapter_config.json gives r = 3 (rank_pattern: 2)"));
  auto d = peft_test::config_of("HIRA");  // no "r": HiraConfig's default 32
  CHECK(peft::io::from_checkpoint<peft::hira<double>>(d, hira_tensors<double>(7, 5, 32, g), none).rank() == 32);
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::hira<double>>(d, hira_tensors<double>(7, 5, 8, g), none),
                    Catch::Contains("has rank 8 but adapter_config.json gives r = 32"));

  peft::io::basic_peft_checkpoint<peft::hira<double>> ck;
  ck.config.targets_kind = peft::io::target_kind::none;
  ck.modules.push_back({"m.a", "m.a.weight", peft::hira<double>(7, 5, {.rank = 3, .init = peft::hira_init::random, .seed = 1})});
  ck.modules.push_back({"m.b", "m.b.weight", peft::hira<double>(4, 6, {.rank = 3, .init = peft::hira_init::random, .seed = 2})});
  auto back = peft_test::save_and_load(ck, "peft_hira_roundtrip");
  CHECK(back.config.peft_type == "HIRA");
  CHECK(back.config.raw.at("r") == 3);
  CHECK(back.config.raw.at("rank_pattern").empty());
  REQUIRE(back.modules.size() == 2);
  for (auto& m : ck.modules) {
    auto& b = back.find(m.weight_name)->adapter;
    CHECK(b.rank() == m.adapter.rank());
    CHECK(rel_error(b.A(), m.adapter.A()) < 1e-7);  // stored as f32
    CHECK(rel_error(b.B(), m.adapter.B()) < 1e-7);
  }
  // Modules of different ranks: PEFT 0.21 could not load them.
  ck.modules.push_back({"m.c", "m.c.weight", peft::hira<double>(4, 6, {.rank = 5, .seed = 3})});
  const auto dir = peft_test::scratch_path("peft_hira_ranks");
  CHECK_THROWS_WITH(peft::io::save_peft_checkpoint(dir, ck),
                    Catch::StartsWith("[hira::describe_in] module 'm.c' has rank 5 but the config says r = 3"));
  std::filesystem::remove_all(dir);
}

TEMPLATE_TEST_CASE("hira rejects bad shapes, bad checkpoints and unsupported layers with clear errors", "[hira]",
                   float, double) {
  using T = TestType;
  peft::rng g(4);
  peft::hira<T> a(peft_test::random_matrix<T>(2, 7, g), peft_test::random_matrix<T>(5, 2, g));
  const peft::dense<T> w(peft_test::random_matrix<T>(5, 7, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 6, 7, "[hira::forward] base weight is (6, 7)"},
                                 {pass::add_term, arg::y, 2, 6},
                                 {pass::backward, arg::dx, 2, 6},
                                 {pass::backward_term, arg::dy, 2, 4},
                                 {pass::delta_weight, arg::dw, 5, 6}});
  peft_test::check_unset_rejected<peft::hira<T>, peft::error>(w);
  CHECK_THROWS_WITH(peft::hira<T>(7, 5, {.rank = 0}), Catch::StartsWith("[hira::hira] rank must be >= 1"));
  CHECK_THROWS_AS(peft::hira<T>(0, 5, {.rank = 2}), peft::shape_error);
  CHECK_THROWS_WITH(peft::hira<T>(peft::matrix<T>(2, 7), peft::matrix<T>(5, 3)),
                    Catch::Contains("hira_A (2, 7) and hira_B (5, 3) are not (r, in) and (out, r)"));

  const auto c = hira_config(2);
  peft::io::checkpoint_tensors<T> none;
  REQUIRE_NOTHROW(peft::io::from_checkpoint<peft::hira<T>>(c, hira_tensors<T>(7, 5, 2, g), none));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::hira<T>>(hira_config(4), hira_tensors<T>(7, 5, 2, g), none),
                    Catch::StartsWith("[hira::from_checkpoint]") && Catch::Contains("has rank 2 but adapter_config.json gives r = 4"));
  {
    auto m = hira_tensors<T>(7, 5, 2, g);
    m.add("hira_B", stored<T>({5, 3}, g));
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::hira<T>>(c, m, none), Catch::Contains("are not (r, in) and (out, r)"));
  }
  {
    auto m = hira_tensors<T>(7, 5, 2, g);
    m.add("hira_A", stored<T>({2, 7, 3, 3}, g));  // a Conv2d's
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::hira<T>>(c, m, none), peft::unsupported_error);
  }
  {
    auto m = peft_test::random_tensors<T>("layer", {{"hira_embedding_A", {2, 7}}, {"hira_embedding_B", {5, 2}}}, g);
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::hira<T>>(c, m, none), Catch::Contains("HiRA on an embedding"));
  }
  {
    auto m = hira_tensors<T>(7, 5, 2, g);
    m.set_base_shape(std::pair<ix, ix>{5, 8});
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::hira<T>>(c, m, none), Catch::Contains("do not fit the base's (5, 8)"));
  }
  CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::hira<T>>(peft_test::golden_dir("lokr") / "adapter"),
                  peft::unsupported_error);
  // An unknown field with a value is refused by the shared rule, naming it.
  const auto dir = peft_test::scratch_path("peft_hira_unknown");
  std::filesystem::remove_all(dir);
  peft_test::rewrite_adapter("hira", dir, [](nlohmann::ordered_json& j) { j["hira_mystery"] = true; });
  CHECK_THROWS_WITH(peft::io::load_checkpoint_as<peft::hira<T>>(dir),
                    Catch::Contains("[hira::from_checkpoint]") && Catch::Contains("'hira_mystery'"));
  std::filesystem::remove_all(dir);
}

}  // namespace test_hira
