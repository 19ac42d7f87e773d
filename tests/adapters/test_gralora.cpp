// GraLoRA: parity with HuggingFace PEFT 0.21 (tests/data/peft/gralora: k = 2; gralora_hybrid:
// k = 4 with a hybrid LoRA part), the block delta and its gradients against double loops written
// from PEFT's einsum form, initialisation, saving and loading, and the errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/gralora.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft/gralora.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_gralora {

using ix = peft::index;

namespace {

using peft_test::rel_error;
using peft_test::stored;
using peft_test::tolerance;

peft::io::adapter_config gralora_config(ix r, ix k, ix hybrid_r, double alpha) {
  auto c = peft_test::config_of("GRALORA");
  c.r = r;
  c.raw["r"] = r;
  c.raw["gralora_k"] = k;
  c.raw["hybrid_r"] = hybrid_r;
  c.raw["alpha"] = alpha;
  return c;
}

/// A module's tensors as PEFT saves them: gralora_A (k, in / k, r), gralora_B (k, r, out / k), and
/// the hybrid pair when hybrid_r > 0.
template <class T>
peft::io::checkpoint_tensors<T> gralora_tensors(ix in, ix out, ix r, ix k, ix hr, peft::rng& g) {
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> t = {{"gralora_A", {k, in / k, r}},
                                                                       {"gralora_B", {k, r, out / k}}};
  if (hr > 0) {
    t.push_back({"gralora_A_general.weight", {hr, in}});
    t.push_back({"gralora_B_general.weight", {out, hr}});
  }
  return peft_test::random_tensors<T>("layer", t, g);
}

/// PEFT's get_delta_weight written as loops: A scattered to (in, k, r), regrouped to
/// (in, k, k * (r / k)) with the block of input i in slot n(i), contracted with B (k, r, out / k).
template <class T>
peft::matrix<double> reference_delta(const peft::gralora<T>& a) {
  const ix in = a.in_features(), out = a.out_features(), k = a.k(), r = a.rank(), rs = r / k;
  const ix ib = in / k, ob = out / k;
  peft::matrix<double> d(out, in);
  for (ix i = 0; i < in; ++i) {
    const ix n = i / ib;
    for (ix j = 0; j < k; ++j) {       // output block
      for (ix q = 0; q < r; ++q) {     // B_j's row: slot q / rs of the regrouped A, sub-rank q % rs
        if (q / rs != n) continue;     // the scattered A is zero outside block n
        const double av = a.A_block(n)(i % ib, j * rs + q % rs);
        for (ix o = 0; o < ob; ++o) d(j * ob + o, i) += av * static_cast<double>(a.B_block(j)(q, o));
      }
    }
  }
  if (a.hybrid_rank() > 0) d = peft_test::add(d, peft_test::ref_nn(a.B_general(), a.A_general()));
  return peft_test::scaled(d, static_cast<double>(a.scale()));
}

// The shared golden checks read gradients as matrices; gralora_A and gralora_B are 3-D, so these
// read every reference gradient flat, in the row-major order both sides store.

/// Every parameter gradient of layer `name` against PEFT's; all of PEFT's are covered.
template <class A>
void check_block_gradients(peft_test::golden_case<A>& c, const std::string& name, double tol) {
  std::size_t checked = 0;
  for (const auto& p : c.layer(name).adapter("default").parameters()) {
    INFO("gradient of " << p.name);
    // PyTorch's name puts the adapter name before a submodule's ".weight" (gralora_A_general).
    const bool sub = p.name.ends_with(".weight");
    const auto key = "grad.base_model.model." + name + "." + (sub ? p.name.substr(0, p.name.size() - 7) : p.name) +
                     ".default" + (sub ? ".weight" : "");
    CHECK(c.reference.info(key).shape == p.shape);
    const peft::matrix<double> ref(p.grad.rows(), p.grad.cols(), c.reference.template read<double>(key));
    REQUIRE(peft_test::count_nonzero(ref) > ref.size() / 2);
    CHECK(rel_error(p.grad, ref) < tol);
    ++checked;
  }
  CHECK(checked == c.reference_gradients(name));
}

template <class A>
void check_block_layers(peft_test::golden_case<A>& c, double tol) {
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    peft_test::check_layer_outputs(c, name, tol);
    check_block_gradients(c, name, tol);
  }
}

template <class A>
void check_block_network(peft_test::golden_case<A>& c, double tol) {
  peft_test::check_network_outputs(c, tol);
  check_block_gradients(c, "up", tol);
  check_block_gradients(c, "down", tol);
}

template <class T>
void check_golden_case(const std::string& name) {
  using A = peft::gralora<T>;
  peft_test::check_golden<A>(name, check_block_layers<A>, check_block_network<A>, peft_test::check_merge<A>);
}

}  // namespace

TEMPLATE_TEST_CASE("gralora reproduces PEFT: layers, network, merged weights", "[gralora][golden]", float, double) {
  check_golden_case<TestType>("gralora");
  check_golden_case<TestType>("gralora_hybrid");
}

TEST_CASE("gralora golden checkpoints: r, k, hybrid_r and the scale from the config", "[gralora][golden]") {
  auto ck = peft::io::load_checkpoint_as<peft::gralora<double>>(peft_test::golden_dir("gralora") / "adapter");
  const auto& up = ck.find("up.weight")->adapter;
  CHECK(up.rank() == 8);
  CHECK(up.k() == 2);
  CHECK(up.hybrid_rank() == 0);
  CHECK(up.scale() == 2.0);  // 16 / 8
  CHECK(up.in_features() == 64);
  CHECK(up.out_features() == 96);
  auto hy = peft::io::load_checkpoint_as<peft::gralora<double>>(peft_test::golden_dir("gralora_hybrid") / "adapter");
  const auto& down = hy.find("down.weight")->adapter;
  CHECK(down.k() == 4);
  CHECK(down.hybrid_rank() == 4);
  CHECK(down.scale() == 1.0);  // 12 / (8 + 4)
  CHECK(down.in_features() == 96);
  CHECK(down.out_features() == 48);
}

TEST_CASE("gralora golden checkpoints survive save and reload: tensors and config fields", "[gralora][golden]") {
  for (const std::string name : {"gralora", "gralora_hybrid"}) {
    INFO("case " << name);
    auto ck = peft::io::load_checkpoint_as<peft::gralora<double>>(peft_test::golden_dir(name) / "adapter");
    auto back = peft_test::save_and_load(ck, "peft_gralora_golden_" + name);
    CHECK(back.config.peft_type == "GRALORA");
    for (const char* f : {"r", "alpha", "gralora_k", "hybrid_r", "gralora_dropout"}) {
      INFO("field " << f);
      CHECK(back.config.raw.at(f) == ck.config.raw.at(f));
    }
    REQUIRE(back.modules.size() == 2);
    for (auto& m : ck.modules) {
      auto& b = back.find(m.weight_name)->adapter;
      auto p = m.adapter.parameters();
      auto q = b.parameters();
      REQUIRE(p.size() == q.size());
      for (std::size_t i = 0; i < p.size(); ++i) {
        CHECK(p[i].name == q[i].name);
        CHECK(p[i].shape == q[i].shape);
        CHECK(rel_error(p[i].value, q[i].value) == 0.0);  // f32 values saved as f32
      }
      CHECK(b.scale() == m.adapter.scale());
    }
  }
}

TEMPLATE_TEST_CASE("gralora forward, dx, delta and every gradient equal PEFT's form in double loops", "[gralora]",
                   float, double) {
  using T = TestType;
  for (const ix hr : {ix{0}, ix{3}}) {
    INFO("hybrid_r " << hr);
    peft::rng g(17 + static_cast<std::uint64_t>(hr));
    const ix in = 12, out = 9, batch = 4, k = 3, r = 6, rs = r / k, ib = in / k, ob = out / k;
    peft::gralora<T> a(in, out, {.rank = r, .k = k, .hybrid_rank = hr, .alpha = 5.0, .init = peft::gralora_init::random, .seed = 3});
    const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
    const auto x = peft_test::random_matrix<T>(batch, in, g);
    const auto gy = peft_test::random_matrix<T>(batch, out, g);
    REQUIRE(peft_test::nontrivial(x));
    REQUIRE(peft_test::nontrivial(a.B()));
    const double s = 5.0 / static_cast<double>(r + hr);
    CHECK(a.scale() == static_cast<T>(s));
    const auto dW = reference_delta(a);
    peft_test::check_against_delta(a, w, x, gy, dW, tolerance<T>());
    std::vector<T> db(static_cast<std::size_t>(out));
    CHECK(!a.delta_bias(w, db.data()));
    // dL/d(dW) = M = g^T x; dW[j ob + o, n ib + i] = s sum_t A_n[i, j rs + t] B_j[n rs + t, o].
    const auto M = peft_test::ref_tn(gy, x);
    peft::matrix<double> dA(k, ib * r), dB(k, r * ob);
    for (ix n = 0; n < k; ++n)
      for (ix j = 0; j < k; ++j)
        for (ix t = 0; t < rs; ++t)
          for (ix i = 0; i < ib; ++i)
            for (ix o = 0; o < ob; ++o) {
              const double m = s * M(j * ob + o, n * ib + i);
              dA(n, i * r + j * rs + t) += m * static_cast<double>(a.B_block(j)(n * rs + t, o));
              dB(j, (n * rs + t) * ob + o) += m * static_cast<double>(a.A_block(n)(i, j * rs + t));
            }
    CHECK(rel_error(a.grad_A(), dA) < tolerance<T>());
    CHECK(rel_error(a.grad_B(), dB) < tolerance<T>());
    if (hr > 0) {
      CHECK(rel_error(a.grad_B_general(), peft_test::scaled(peft_test::ref_nt(M, a.A_general()), s)) < tolerance<T>());
      CHECK(rel_error(a.grad_A_general(), peft_test::scaled(peft_test::ref_tn(a.B_general(), M), s)) < tolerance<T>());
    }
    // A second backward accumulates; zero_grad clears.
    const auto first = peft_test::to_double(a.grad_A());
    typename peft::gralora<T>::cache_type cache;
    peft::matrix<T> dx(batch, in);
    a.backward(w, x.view(), gy.view(), dx.view(), cache);
    CHECK(rel_error(a.grad_A(), peft_test::scaled(first, 2.0)) < tolerance<T>());
    a.zero_grad();
    CHECK(peft_test::max_abs(a.grad_B()) == 0.0);
    CHECK(peft_test::max_abs(a.grad_A_general()) == 0.0);
  }
}

TEMPLATE_TEST_CASE("gralora with k = 1 is LoRA of rank r + hybrid_r", "[gralora]", float, double) {
  using T = TestType;
  peft::rng g(5);
  const ix in = 7, out = 5, r = 3;
  peft::gralora<T> a(in, out, {.rank = r, .k = 1, .hybrid_rank = 2, .alpha = 10.0, .init = peft::gralora_init::random, .seed = 9});
  // gralora_A (1, in, r) is lora_A^T, gralora_B (1, r, out) is lora_B^T.
  peft::matrix<double> la(r, in), lb(out, r);
  for (ix i = 0; i < in; ++i)
    for (ix q = 0; q < r; ++q) la(q, i) = a.A()(0, i * r + q);
  for (ix q = 0; q < r; ++q)
    for (ix o = 0; o < out; ++o) lb(o, q) = a.B()(0, q * out + o);
  const auto d = peft_test::scaled(peft_test::add(peft_test::ref_nn(lb, la), peft_test::ref_nn(a.B_general(), a.A_general())),
                                   10.0 / 5.0);
  const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g));
  peft::matrix<T> dw(out, in);
  a.delta_weight(w, dw.view());
  CHECK(rel_error(dw, d) < tolerance<T>());
}

TEMPLATE_TEST_CASE("gralora init: PEFT's default zeroes gralora_B and the hybrid B (a no-op); random is not",
                   "[gralora]", float, double) {
  using T = TestType;
  peft::rng g(8);
  const ix in = 40, out = 24, r = 8, k = 4;
  peft::gralora<T> a(in, out, {.rank = r, .k = k, .hybrid_rank = 2, .alpha = 16.0, .seed = 1});
  peft_test::check_identity_at_init(a, 3, g);
  CHECK(peft_test::max_abs(a.B()) == 0.0);
  CHECK(peft_test::max_abs(a.B_general()) == 0.0);
  CHECK(peft_test::count_nonzero(a.grad_B()) == a.grad_B().size());  // training moves it off the identity
  // kaiming-uniform with a = sqrt 5 on PEFT's (r, in / k) and (hybrid_r, in): bound 1 / sqrt(fan_in)
  CHECK(peft_test::count_nonzero(a.A()) == a.A().size());
  CHECK(peft_test::max_abs(a.A()) <= 1.0 / std::sqrt(in / k));
  CHECK(peft_test::max_abs(a.A()) > 0.5 / std::sqrt(in / k));
  CHECK(peft_test::max_abs(a.A_general()) <= 1.0 / std::sqrt(in));
  CHECK(a.scale() == static_cast<T>(16.0 / 10.0));
  peft::gralora<T> b(in, out, {.rank = r, .k = k, .alpha = 16.0, .init = peft::gralora_init::random, .seed = 1});
  const auto w = peft_test::random_dense<T>(in, out, g);
  peft_test::check_not_base(b, w, peft_test::random_matrix<T>(3, in, g), 1e-4);
  CHECK(b.parameters().size() == 2);  // no hybrid tensors without hybrid_r
}

TEST_CASE("gralora checkpoints: save and load keep every module, with and without the hybrid part", "[gralora]") {
  peft::io::basic_peft_checkpoint<peft::gralora<double>> ck;
  ck.config.targets_kind = peft::io::target_kind::none;
  const peft::gralora_options opt{.rank = 4, .k = 2, .hybrid_rank = 3, .alpha = 6.0, .init = peft::gralora_init::random};
  ck.modules.push_back({"m.a", "m.a.weight", peft::gralora<double>(8, 6, opt)});
  ck.modules.push_back({"m.b", "m.b.weight", peft::gralora<double>(4, 10, {.rank = 4, .k = 2, .hybrid_rank = 3, .alpha = 6.0,
                                                                           .init = peft::gralora_init::random, .seed = 2})});
  auto back = peft_test::save_and_load(ck, "peft_gralora_roundtrip");
  CHECK(back.config.peft_type == "GRALORA");
  CHECK(back.config.raw.at("gralora_k") == 2);
  CHECK(back.config.raw.at("hybrid_r") == 3);
  CHECK(back.config.raw.at("alpha") == 6);
  REQUIRE(back.modules.size() == 2);
  for (auto& m : ck.modules) {
    auto& b = back.find(m.weight_name)->adapter;
    CHECK(b.in_features() == m.adapter.in_features());
    CHECK(b.out_features() == m.adapter.out_features());
    CHECK(b.scale() == m.adapter.scale());
    CHECK(rel_error(b.A(), m.adapter.A()) < 1e-7);  // stored as f32
    CHECK(rel_error(b.B(), m.adapter.B()) < 1e-7);
    CHECK(rel_error(b.B_general(), m.adapter.B_general()) < 1e-7);
  }
  // GraloraConfig has one r, gralora_k, hybrid_r and alpha: modules that differ cannot be saved.
  ck.modules.push_back({"m.c", "m.c.weight", peft::gralora<double>(4, 4, {.rank = 4, .k = 4, .hybrid_rank = 3, .alpha = 6.0})});
  const auto dir = peft_test::scratch_path("peft_gralora_mixed");
  CHECK_THROWS_WITH(peft::io::save_peft_checkpoint(dir, ck),
                    Catch::Contains("[gralora::describe_in]") && Catch::Contains("gralora_k = 4"));
  std::filesystem::remove_all(dir);
}

TEMPLATE_TEST_CASE("gralora rejects bad shapes, bad checkpoints and bad configs with clear errors", "[gralora]",
                   float, double) {
  using T = TestType;
  peft::rng g(4);
  peft::gralora<T> a(8, 6, {.rank = 4, .k = 2, .hybrid_rank = 1, .init = peft::gralora_init::random});
  const peft::dense<T> w(peft_test::random_matrix<T>(6, 8, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 6, 7, "[gralora::forward] base weight is (6, 7)"},
                                 {pass::add_term, arg::y, 2, 5},
                                 {pass::backward, arg::dx, 2, 7},
                                 {pass::backward_term, arg::dy, 2, 5},
                                 {pass::delta_weight, arg::dw, 5, 8}});
  peft_test::check_unset_rejected<peft::gralora<T>, peft::error>(w);
  CHECK_THROWS_WITH(peft::gralora<T>(8, 6, {.rank = 3, .k = 2}), Catch::Contains("[gralora::gralora]") &&
                                                                  Catch::Contains("r = 3 is not divisible by gralora_k = 2"));
  CHECK_THROWS_WITH(peft::gralora<T>(9, 6, {.rank = 4, .k = 2}), Catch::Contains("must both be divisible by gralora_k = 2"));
  CHECK_THROWS_AS(peft::gralora<T>(8, 6, {.rank = 0, .k = 1}), peft::shape_error);
  CHECK_THROWS_AS(peft::gralora<T>(8, 6, {.rank = 4, .k = 0}), peft::shape_error);
  CHECK_THROWS_AS(peft::gralora<T>(8, 6, {.rank = 4, .k = 2, .hybrid_rank = -1}), peft::shape_error);
  CHECK_THROWS_WITH(peft::gralora<T>(8, 6, 4, peft::matrix<T>(2, 16), peft::matrix<T>(2, 10), {}, {}, 1.0),
                    Catch::Contains("gralora_B (2, 10)"));
  CHECK_THROWS_WITH(peft::gralora<T>(8, 6, 4, peft::matrix<T>(2, 16), peft::matrix<T>(2, 12), peft::matrix<T>(1, 8),
                                     peft::matrix<T>(5, 1), 1.0),
                    Catch::Contains("gralora_B_general (5, 1)"));

  peft::io::checkpoint_tensors<T> none;
  const auto c = gralora_config(4, 2, 1, 4.0);
  REQUIRE_NOTHROW(peft::io::from_checkpoint<peft::gralora<T>>(c, gralora_tensors<T>(8, 6, 4, 2, 1, g), none));
  CHECK(peft::io::from_checkpoint<peft::gralora<T>>(c, gralora_tensors<T>(8, 6, 4, 2, 1, g), none).scale() ==
        static_cast<T>(0.8));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::gralora<T>>(c, gralora_tensors<T>(8, 6, 4, 2, 0, g), none),
                    Catch::Contains("[gralora::from_checkpoint]") && Catch::Contains("no gralora_A_general"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::gralora<T>>(gralora_config(4, 2, 0, 4.0), gralora_tensors<T>(8, 6, 4, 2, 1, g), none),
                    Catch::Contains("although hybrid_r = 0"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::gralora<T>>(gralora_config(4, 4, 1, 4.0), gralora_tensors<T>(8, 6, 4, 2, 1, g), none),
                    Catch::Contains("gralora_k = 4"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::gralora<T>>(gralora_config(8, 2, 1, 4.0), gralora_tensors<T>(8, 6, 4, 2, 1, g), none),
                    Catch::Contains("r = 8"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::gralora<T>>(gralora_config(6, 4, 1, 4.0), gralora_tensors<T>(8, 6, 4, 2, 1, g), none),
                    Catch::Contains("gralora_k >= 1 dividing r"));
  {
    auto m = gralora_tensors<T>(8, 6, 4, 2, 1, g);
    m.add("gralora_A_general.weight", stored<T>({1, 9}, g));
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::gralora<T>>(c, m, none), peft::format_error);
  }
  {
    auto m = gralora_tensors<T>(8, 6, 4, 2, 1, g);
    m.add("gralora_A", stored<T>({8, 4}, g));
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::gralora<T>>(c, m, none), peft::format_error);
  }
  {
    auto c2 = c;
    c2.raw["hybrid_r"] = "one";
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::gralora<T>>(c2, gralora_tensors<T>(8, 6, 4, 2, 1, g), none), peft::format_error);
  }
  // bias != "none" and unknown fields are refused by the shared rule; a wrong method's checkpoint too.
  const auto dir = peft_test::scratch_path("peft_gralora_bias");
  std::filesystem::remove_all(dir);
  peft_test::rewrite_adapter("gralora", dir, [](nlohmann::ordered_json& j) { j["bias"] = "gralora_only"; });
  CHECK_THROWS_WITH(peft::io::load_checkpoint_as<peft::gralora<T>>(dir),
                    Catch::Contains("[gralora::from_checkpoint]") && Catch::Contains("'bias'"));
  peft_test::rewrite_adapter("gralora", dir, [](nlohmann::ordered_json& j) {
    j["bias"] = "none";
    j["gralora_mystery"] = 3;
  });
  CHECK_THROWS_WITH(peft::io::load_checkpoint_as<peft::gralora<T>>(dir), Catch::Contains("'gralora_mystery'"));
  std::filesystem::remove_all(dir);
  CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::gralora<T>>(peft_test::golden_dir("lokr") / "adapter"),
                  peft::unsupported_error);
}

}  // namespace test_gralora
