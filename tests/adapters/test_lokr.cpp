// LoKr: parity with HuggingFace PEFT 0.21 (tests/data/peft/lokr, lokr_full), PEFT's
// factorization and choice of forms, the low-rank forms against a double reference built from
// the formed Kronecker delta, initialisation, saving and loading, and the errors.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "peft/io/peft/lokr.hpp"
#include "peft/adapters/lokr.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_lokr {

using ix = peft::index;

namespace {

using peft_test::rel_error;
using peft_test::stored;
using peft_test::tolerance;

// ---- LoKr helpers ------------------------------------------------------------------------------

peft::io::adapter_config lokr_config(ix r, double alpha, bool decompose_both, ix factor = -1) {
  auto c = peft_test::config_of("LOKR");
  c.r = r;
  c.raw["alpha"] = alpha;
  c.raw["decompose_both"] = decompose_both;
  c.raw["decompose_factor"] = factor;
  return c;
}

/// The four tensors of a module whose factors are both rank 1: W1 (p1, q1), W2 (p2, q2).
template <class T>
peft::io::checkpoint_tensors<T> low_rank_tensors(ix p1, ix q1, ix p2, ix q2, peft::rng& g) {
  return peft_test::random_tensors<T>(
      "layer", {{"lokr_w1_a", {p1, 1}}, {"lokr_w1_b", {1, q1}}, {"lokr_w2_a", {p2, 1}}, {"lokr_w2_b", {1, q2}}}, g);
}

std::vector<std::string> names_of(peft::lokr<double>& a) {
  std::vector<std::string> n;
  for (const auto& p : a.parameters()) n.push_back(p.name + " " + peft::io::detail::shape_text(p.shape));
  return n;
}

/// s kron(W1, W2) with plain loops in double.
template <class M1, class M2>
peft::matrix<double> kron(const M1& a, const M2& b, double s) {
  peft::matrix<double> k(a.rows() * b.rows(), a.cols() * b.cols());
  for (ix i = 0; i < a.rows(); ++i)
    for (ix j = 0; j < a.cols(); ++j)
      for (ix p = 0; p < b.rows(); ++p)
        for (ix q = 0; q < b.cols(); ++q)
          k(i * b.rows() + p, j * b.cols() + q) = s * peft_test::at(a, i, j) * peft_test::at(b, p, q);
  return k;
}

}  // namespace

TEMPLATE_TEST_CASE("lokr reproduces PEFT: layers, network, merged weights", "[lokr][golden]", float, double) {
  peft_test::check_golden<peft::lokr<TestType>>("lokr");
  peft_test::check_golden<peft::lokr<TestType>>("lokr_full");
}

TEST_CASE("lokr golden checkpoints: full factors, and alpha / r applies to them too", "[lokr][golden]") {
  for (const std::string name : {"lokr", "lokr_full"}) {
    auto ck = peft::io::load_checkpoint_as<peft::lokr<double>>(peft_test::golden_dir(name) / "adapter");
    const auto& up = ck.find("up.weight")->adapter;
    const auto& down = ck.find("down.weight")->adapter;
    CHECK(!up.w1().decomposed());
    CHECK(!up.w2().decomposed());
    CHECK(up.scale() == 2.0);  // alpha 16 / r 8, although both factors are full (LyCORIS would use 1)
    CHECK(up.in_features() == 64);
    CHECK(up.out_features() == 96);
    CHECK(down.W1().rows() == 6);  // 48 = 6 x 8, 96 = 8 x 12
    CHECK(down.W1().cols() == 8);
    CHECK(down.W2().rows() == 8);
    CHECK(down.W2().cols() == 12);
    CHECK(ck.config.peft_type == "LOKR");
  }
}

TEST_CASE("lokr_factorization is PEFT's factorization()", "[lokr]") {
  using p = std::pair<peft::index, peft::index>;
  // PEFT's docstring examples, then the shapes of the golden layers and edge cases.
  CHECK(peft::lokr_factorization(256) == p(16, 16));
  CHECK(peft::lokr_factorization(128) == p(8, 16));
  CHECK(peft::lokr_factorization(127) == p(1, 127));
  CHECK(peft::lokr_factorization(128, 4) == p(4, 32));
  CHECK(peft::lokr_factorization(96) == p(8, 12));
  CHECK(peft::lokr_factorization(64) == p(8, 8));
  CHECK(peft::lokr_factorization(48) == p(6, 8));
  CHECK(peft::lokr_factorization(1) == p(1, 1));
  CHECK(peft::lokr_factorization(4096) == p(64, 64));
  CHECK(peft::lokr_factorization(11008) == p(86, 128));
  CHECK(peft::lokr_factorization(128, 32) == p(32, 4));  // a dividing factor is returned unsorted
  CHECK(peft::lokr_factorization(96, 5) == p(4, 24));    // largest divisor <= 5
  CHECK(peft::lokr_factorization(96, 0) == p(1, 96));
  CHECK(peft::lokr_factorization(96, -2) == p(1, 96));
  CHECK_THROWS_AS(peft::lokr_factorization(0), peft::shape_error);
}

TEST_CASE("lokr builds the forms PEFT builds for r and decompose_both", "[lokr]") {
  // 64 -> (8, 8), 96 -> (8, 12): W1 (8, 8), W2 (12, 8).
  peft::lokr<double> full(64, 96, {.rank = 8});
  CHECK(names_of(full) == std::vector<std::string>{"lokr_w1 [8, 8]", "lokr_w2 [12, 8]"});
  peft::lokr<double> r6(64, 96, {.rank = 6});  // 12 <= 12: W2 stays full
  CHECK(names_of(r6) == std::vector<std::string>{"lokr_w1 [8, 8]", "lokr_w2 [12, 8]"});
  peft::lokr<double> r5(64, 96, {.rank = 5});  // 10 < 12: W2 low rank
  CHECK(names_of(r5) == std::vector<std::string>{"lokr_w1 [8, 8]", "lokr_w2_a [12, 5]", "lokr_w2_b [5, 8]"});
  peft::lokr<double> both(64, 96, {.rank = 3, .decompose_both = true});
  CHECK(names_of(both) == std::vector<std::string>{"lokr_w1_a [8, 3]", "lokr_w1_b [3, 8]", "lokr_w2_a [12, 3]",
                                                    "lokr_w2_b [3, 8]"});
  peft::lokr<double> both4(64, 96, {.rank = 4, .decompose_both = true});  // 8 < 8 is false: W1 full
  CHECK(names_of(both4) == std::vector<std::string>{"lokr_w1 [8, 8]", "lokr_w2_a [12, 4]", "lokr_w2_b [4, 8]"});
  peft::lokr<double> f4(64, 96, {.rank = 8, .decompose_factor = 4});  // 64 = 4 x 16, 96 = 4 x 24; 16 < 24
  CHECK(names_of(f4) == std::vector<std::string>{"lokr_w1 [4, 4]", "lokr_w2_a [24, 8]", "lokr_w2_b [8, 16]"});
  peft::lokr<double> f4r12(64, 96, {.rank = 12, .decompose_factor = 4});
  CHECK(names_of(f4r12) == std::vector<std::string>{"lokr_w1 [4, 4]", "lokr_w2 [24, 16]"});
}

TEMPLATE_TEST_CASE("lokr low-rank forms equal a double reference built from the formed delta", "[lokr]", float,
                   double) {
  using T = TestType;
  peft::rng g(41);
  // in 24 -> (4, 6), out 20 -> (4, 5): with r = 1 and decompose_both both factors are low rank.
  const ix in = 24, out = 20, batch = 3;
  for (const bool both : {true, false}) {
    INFO("decompose_both " << both);
    peft::lokr<T> a(in, out, {.rank = 1, .alpha = 3.0, .decompose_both = both, .init = peft::lokr_init::random, .seed = 7});
    REQUIRE(a.w1().decomposed() == both);
    REQUIRE(a.w2().decomposed());
    const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
    const auto x = peft_test::random_matrix<T>(batch, in, g);
    const auto gy = peft_test::random_matrix<T>(batch, out, g);
    REQUIRE(peft_test::nontrivial(x));
    const auto W1 = peft_test::to_double(a.W1()), W2 = peft_test::to_double(a.W2());
    REQUIRE(peft_test::nontrivial(W1));
    REQUIRE(peft_test::nontrivial(W2));
    const double s = 3.0;
    const auto dW = kron(W1, W2, s);
    peft_test::check_against_delta(a, w, x, gy, dW, tolerance<T>());

    // dW1[i, j] = s sum_pq D[i ok + p, j in_n + q] W2[p, q] with D = g^T x; likewise dW2.
    const auto D = peft_test::ref_tn(gy, x);
    peft::matrix<double> d1(W1.rows(), W1.cols()), d2(W2.rows(), W2.cols());
    for (ix i = 0; i < W1.rows(); ++i)
      for (ix j = 0; j < W1.cols(); ++j)
        for (ix p = 0; p < W2.rows(); ++p)
          for (ix q = 0; q < W2.cols(); ++q) {
            const double dd = s * D(i * W2.rows() + p, j * W2.cols() + q);
            d1(i, j) += dd * W2(p, q);
            d2(p, q) += dd * W1(i, j);
          }
    auto params = a.parameters();
    auto grad = [&](const std::string& n) {
      for (auto& p : params)
        if (p.name == n) return peft_test::to_double(p.grad);
      FAIL("no parameter " << n);
      return peft::matrix<double>();
    };
    if (both) {
      CHECK(rel_error(grad("lokr_w1_a"), peft_test::ref_nt(d1, a.w1().b)) < tolerance<T>());
      CHECK(rel_error(grad("lokr_w1_b"), peft_test::ref_tn(a.w1().a, d1)) < tolerance<T>());
    } else {
      CHECK(rel_error(grad("lokr_w1"), d1) < tolerance<T>());
    }
    CHECK(rel_error(grad("lokr_w2_a"), peft_test::ref_nt(d2, a.w2().b)) < tolerance<T>());
    CHECK(rel_error(grad("lokr_w2_b"), peft_test::ref_tn(a.w2().a, d2)) < tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("lokr inits: standard and lycoris are no-ops, random is not; kaiming bounds", "[lokr]", float,
                   double) {
  using T = TestType;
  peft::rng g(5);
  const ix in = 64, out = 96;
  const auto w = peft_test::random_dense<T>(in, out, g);
  const auto x = peft_test::random_matrix<T>(2, in, g);
  for (const ix r : {ix{8}, ix{2}}) {
    INFO("rank " << r);
    peft::lokr<T> std_init(in, out, {.rank = r, .alpha = 16, .decompose_both = true, .seed = 3});
    peft_test::check_output_is_base(std_init, w, x);
    CHECK(peft_test::max_abs(std_init.W1()) == 0.0);
    CHECK(peft_test::count_nonzero(std_init.W2()) == std_init.W2().size());
    if (!std_init.w2().decomposed()) CHECK(peft_test::max_abs(std_init.W2()) <= 1.0 / std::sqrt(8.0));  // W2 (12, 8)
    peft::lokr<T> lyc(in, out, {.rank = r, .alpha = 16, .decompose_both = true, .init = peft::lokr_init::lycoris, .seed = 3});
    peft_test::check_output_is_base(lyc, w, x);
    CHECK(peft_test::max_abs(lyc.W2()) == 0.0);
    CHECK(peft_test::count_nonzero(lyc.W1()) == lyc.W1().size());
    peft::lokr<T> rnd(in, out, {.rank = r, .alpha = 16, .decompose_both = true, .init = peft::lokr_init::random, .seed = 3});
    peft_test::check_not_base(rnd, w, x, 1e-3);
    CHECK(rnd.scale() == static_cast<T>(16.0 / static_cast<double>(r)));
  }
  // Same seed, same adapter.
  peft::lokr<T> a(in, out, {.rank = 2, .init = peft::lokr_init::random, .seed = 9});
  peft::lokr<T> b(in, out, {.rank = 2, .init = peft::lokr_init::random, .seed = 9});
  CHECK(peft_test::exactly_equal(a.W2(), b.W2()));
}

TEST_CASE("lokr checkpoints: low-rank forms load from tensors and a config", "[lokr]") {
  peft::rng g(3);
  // in 24 -> (4, 6), out 20 -> (4, 5); r = 1 with decompose_both: all four low-rank tensors.
  const auto c = lokr_config(1, 6.0, true);
  peft::io::checkpoint_tensors<double> none;
  auto m = low_rank_tensors<double>(4, 4, 5, 6, g);
  const auto a = peft::io::from_checkpoint<peft::lokr<double>>(c, m, none);
  CHECK(a.in_features() == 24);
  CHECK(a.out_features() == 20);
  CHECK(a.scale() == 6.0);
  const auto w1 = peft_test::ref_nn(*m.get("lokr_w1_a").data, *m.get("lokr_w1_b").data);
  CHECK(rel_error(a.W1(), w1) < 1e-15);
  // rank_pattern / alpha_pattern override r and alpha per module.
  auto c2 = lokr_config(4, 6.0, true);
  c2.rank_pattern = {{"layer", 1}};
  c2.alpha_pattern = {{"layer", 2.5}};
  CHECK(peft::io::from_checkpoint<peft::lokr<double>>(c2, m, none).scale() == 2.5);
}

TEST_CASE("lokr save and load keep every module: describe_in writes what PEFT needs", "[lokr]") {
  peft::io::basic_peft_checkpoint<peft::lokr<double>> ck;
  ck.config = peft::io::adapter_config::lora(8, 8.0, {});
  ck.config.targets_kind = peft::io::target_kind::none;
  const peft::lokr_options o1{.rank = 1, .alpha = 3.0, .decompose_both = true, .init = peft::lokr_init::random, .seed = 1};
  const peft::lokr_options o2{.rank = 8, .alpha = 5.0, .decompose_both = true, .init = peft::lokr_init::random, .seed = 2};
  ck.modules.push_back({"model.a", "model.a.weight", peft::lokr<double>(24, 20, o1)});
  ck.modules.push_back({"model.b", "model.b.weight", peft::lokr<double>(64, 96, o2)});
  auto back = peft_test::save_and_load(ck, "peft_lokr_roundtrip");
  CHECK(back.config.peft_type == "LOKR");
  CHECK(back.config.raw["decompose_both"] == true);
  CHECK(back.config.raw["alpha"] == 3);
  REQUIRE(back.modules.size() == 2);
  for (std::size_t k = 0; k < 2; ++k) {
    auto& a = ck.modules[k].adapter;
    auto& b = back.find(ck.modules[k].weight_name)->adapter;
    CHECK(b.rank() == a.rank());
    CHECK(b.scale() == a.scale());
    auto pa = a.parameters();
    auto pb = b.parameters();
    REQUIRE(pa.size() == pb.size());
    for (std::size_t i = 0; i < pa.size(); ++i) {
      CHECK(pa[i].name == pb[i].name);
      CHECK(rel_error(pb[i].value, pa[i].value) < 1e-7);  // stored as f32
    }
  }
  CHECK(back.find("model.a.weight")->adapter.w1().decomposed());
  CHECK(!back.find("model.b.weight")->adapter.w1().decomposed());

  // A module PEFT would shape differently under the config cannot be described.
  auto c = lokr_config(8, 8.0, false);
  const peft::lokr<double> f4(64, 96, {.rank = 8, .decompose_factor = 4});
  CHECK_THROWS_AS(peft::io::describe_in(f4, c, "model.c"), peft::unsupported_error);
  auto c2 = lokr_config(1, 8.0, false);
  const peft::lokr<double> low(24, 20, {.rank = 1, .decompose_both = true});
  CHECK_THROWS_AS(peft::io::describe_in(low, c2, "model.d"), peft::unsupported_error);  // W1 low rank, decompose_both false
}

TEMPLATE_TEST_CASE("lokr rejects bad shapes, bad checkpoints and convolutions with clear errors", "[lokr]", float,
                   double) {
  using T = TestType;
  peft::rng g(11);
  peft::lokr<T> a(24, 20, {.rank = 2, .init = peft::lokr_init::random});
  const peft::dense<T> w(peft_test::random_matrix<T>(20, 24, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 20, 25, "[lokr::forward] base weight is (20, 25)"},
                                 {pass::forward, arg::x, 2, 23},
                                 {pass::backward, arg::dx, 2, 23},
                                 {pass::delta_weight, arg::dw, 20, 23}});
  CHECK_THROWS_AS(peft::lokr<T>(24, 20, {.rank = 0}), peft::shape_error);
  CHECK_THROWS_AS(peft::lokr<T>(0, 20, {}), peft::shape_error);
  CHECK_THROWS_AS(peft::lokr<T>(peft::lokr_factor<T>::product(peft::matrix<T>(4, 2), peft::matrix<T>(3, 4)),
                                peft::lokr_factor<T>::whole(peft::matrix<T>(5, 6)), 2, 1.0),
                  peft::shape_error);

  const auto c = lokr_config(1, 6.0, true);
  peft::io::checkpoint_tensors<T> none;
  auto base_tensors = [&] { return low_rank_tensors<T>(4, 4, 5, 6, g); };
  REQUIRE_NOTHROW(peft::io::from_checkpoint<peft::lokr<T>>(c, base_tensors(), none));
  {
    auto m = base_tensors();
    m.add("lokr_t2", stored<T>({1, 1, 3, 3}, g));
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::lokr<T>>(c, m, none),
                      Catch::Contains("[lokr::from_checkpoint]") && Catch::Contains("lokr_t2"));
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::lokr<T>>(c, m, none), peft::unsupported_error);
  }
  {
    peft::io::checkpoint_tensors<T> m("conv");
    m.add("lokr_w1", stored<T>({4, 4}, g));
    m.add("lokr_w2", stored<T>({5, 6, 3, 3}, g));
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::lokr<T>>(lokr_config(8, 8, false), m, none), peft::unsupported_error);
  }
  {
    auto m = base_tensors();
    m.add("lokr_w1", stored<T>({4, 4}, g));  // both forms
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::lokr<T>>(c, m, none), peft::format_error);
  }
  {
    peft::io::checkpoint_tensors<T> m("layer");
    m.add("lokr_w1_a", stored<T>({4, 1}, g));
    m.add("lokr_w1_b", stored<T>({1, 4}, g));
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::lokr<T>>(c, m, none), Catch::Contains("neither lokr_w2"));
  }
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::lokr<T>>(lokr_config(2, 6.0, true), base_tensors(), none),
                    Catch::Contains("rank 1") && Catch::Contains("gives 2"));
  {
    auto m = base_tensors();
    m.add("lokr_w2_b", stored<T>({2, 6}, g));  // a (5, 1), b (2, 6)
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::lokr<T>>(c, m, none), peft::format_error);
  }
  {
    // W1 (5, 4), W2 (4, 6): a (20, 24) weight, which PEFT factors as (4, 5) x (4, 6).
    auto m = low_rank_tensors<T>(5, 4, 4, 6, g);
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::lokr<T>>(c, m, none), Catch::Contains("factors as W1 (4, 4), W2 (5, 6)"));
  }
  {
    // Full lokr_w2 (5, 6) where r = 1 makes PEFT build lokr_w2_a / lokr_w2_b.
    peft::io::checkpoint_tensors<T> m("layer");
    m.add("lokr_w1", stored<T>({4, 4}, g));
    m.add("lokr_w2", stored<T>({5, 6}, g));
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::lokr<T>>(lokr_config(1, 1.0, false), m, none),
                      Catch::Contains("PEFT builds lokr_w2_a/lokr_w2_b"));
  }
  {
    auto c3 = lokr_config(1, 6.0, true);
    c3.raw["decompose_both"] = "yes";
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::lokr<T>>(c3, base_tensors(), none), peft::format_error);
  }
  // A LoRA checkpoint is not LoKr's.
  CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::lokr<T>>(peft_test::golden_dir("lora") / "adapter"),
                  peft::unsupported_error);
}

}  // namespace test_lokr
