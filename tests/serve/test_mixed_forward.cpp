// serve::mixed_forward and the low-rank terms it groups: a batch whose rows use different adapters
// of every method (and none), on dense and quantized bases, against each row's own adapter forward.
#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/adapters/any_adapter.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/base/q4_0.hpp"
#include "peft/core/error.hpp"
#include "peft/serve/mixed_forward.hpp"
#include "support/all_adapters.hpp"
#include "support/test_support.hpp"

namespace test_mixed_forward {

using ix = peft::index;
using peft_test::random_matrix;

namespace {

constexpr ix in_f = 12, out_f = 18;  // shapes every method's test maker accepts

/// One random adapter of every method, as any_adapter<float>.
std::vector<peft::any_adapter<float>> one_of_each(peft::rng& g) {
  std::vector<peft::any_adapter<float>> all;
  std::apply([&](auto... tag) {
    (all.emplace_back(peft_test::adapter_traits<decltype(tag)>::make_random(in_f, out_f, g)), ...);
  }, peft_test::all_adapters<float>{});
  return all;
}

/// Row i of the reference: h_i + f (forward(x_i) - h_i), each row on its own through the
/// adapter's own forward (the path the PEFT parity tests cover), in double.
template <class Base>
peft::matrix<double> reference(const Base& base, const peft::matrix<float>& x,
                               const std::vector<peft::serve::batch_group<peft::any_adapter<float>>>& groups) {
  peft::matrix<double> y(x.rows(), out_f);
  for (ix i = 0; i < x.rows(); ++i) {
    const peft::matrix_view<const float> xi = x.view().block(i, 0, 1, in_f);
    peft::matrix<float> h(1, out_f);
    base.matmul(xi, h.view());
    std::vector<double> row(h.storage().begin(), h.storage().end());
    for (const auto& grp : groups) {
      for (std::size_t k = 0; k < grp.rows.size(); ++k) {
        if (grp.rows[k] != i) continue;
        peft::matrix<float> yi(1, out_f);
        peft::any_adapter<float>::cache_type cache;
        grp.adapter->forward(base, xi, yi.view(), cache);
        for (ix j = 0; j < out_f; ++j) row[static_cast<std::size_t>(j)] += grp.factors[k] * (double(yi(0, j)) - double(h(0, j)));
      }
    }
    for (ix j = 0; j < out_f; ++j) y(i, j) = row[static_cast<std::size_t>(j)];
  }
  return y;
}

/// Groups over every adapter, rows assigned at random (some to none), factors in [-1.5, 1.5]
/// with most at 1; the low-rank term set where the method has one.
std::vector<peft::serve::batch_group<peft::any_adapter<float>>> random_groups(
    const std::vector<peft::any_adapter<float>>& adapters, ix m, peft::rng& g) {
  std::vector<peft::serve::batch_group<peft::any_adapter<float>>> groups(adapters.size());
  for (std::size_t a = 0; a < adapters.size(); ++a) groups[a] = peft::serve::group_of(adapters[a], {}, {});
  for (ix i = 0; i < m; ++i) {
    const auto a = static_cast<std::size_t>(g.below(adapters.size() + 1));
    if (a == adapters.size()) continue;  // the base alone
    groups[a].rows.push_back(i);
    groups[a].factors.push_back(g.below(3) == 0 ? static_cast<float>(g.uniform(-1.5, 1.5)) : 1.0f);
  }
  return groups;
}

template <class Base>
void check_mixed(const Base& base, std::uint64_t seed) {
  peft::rng g(seed);
  const auto adapters = one_of_each(g);
  for (ix m : {1, 7, 40}) {
    const auto x = random_matrix<float>(m, in_f, g);
    const auto groups = random_groups(adapters, m, g);
    peft::matrix<float> y(m, out_f, 123.0f), yl(m, out_f, -5.0f);
    peft::serve::mixed_forward(base, x.view(), y.view(), groups);
    const auto ref = reference(base, x, groups);
    REQUIRE(peft_test::nontrivial(ref));
    CHECK(peft_test::rel_error(y, ref) < 2e-5);
    peft::serve::looped_forward(base, x.view(), yl.view(), groups);
    CHECK(peft_test::rel_error(yl, ref) < 2e-5);
  }
}

}  // namespace

TEST_CASE("the low-rank term reproduces delta_weight for every method that has one", "[serve]") {
  peft::rng g(11);
  const auto adapters = one_of_each(g);
  const peft::dense<double> base(random_matrix<double>(out_f, in_f, g));
  // The methods built on the low-rank core (adapters/detail/low_rank_core.hpp).
  const std::vector<std::string> low_rank = {"lora", "adalora", "vera", "sora", "dynamic_rank", "pvera"};
  std::size_t with_term = 0;
  for (const auto& a : adapters) {
    const auto f = peft::serve::low_rank_of(a);
    const std::string method(a.active_method());
    const bool expected = std::find(low_rank.begin(), low_rank.end(), method) != low_rank.end();
    INFO(method);
    CHECK(f.has_value() == expected);
    if (!f) continue;
    ++with_term;
    peft::matrix<float> dw(out_f, in_f);
    a.delta_weight(base, dw.view());
    REQUIRE(peft_test::nontrivial(dw));
    peft::matrix<double> sba(out_f, in_f);  // s diag(lambda) B diag(c) A in double
    for (ix i = 0; i < out_f; ++i) {
      for (ix j = 0; j < in_f; ++j) {
        double acc = 0;
        for (ix q = 0; q < f->rank(); ++q) acc += double(f->b(i, q)) * (f->c ? double(f->c[q]) : 1.0) * double(f->a(q, j));
        sba(i, j) = double(f->scale) * (f->lambda ? double(f->lambda[i]) : 1.0) * acc;
      }
    }
    CHECK(peft_test::rel_error(dw, sba) < 1e-5);
  }
  CHECK(with_term == low_rank.size());
}

TEST_CASE("low-rank terms: closed gates serve as the compacted LoRA; LoRA's term is its own tensors", "[serve]") {
  peft::rng g(12);
  auto s = peft_test::adapter_traits<peft::sora<float>>::make_random(in_f, out_f, g);
  for (ix i = 0; i < s.rank(); i += 2) s.gate()(0, i) = 0.0f;
  const auto compact = s.compact();
  REQUIRE(compact);
  CHECK(compact->rank() == s.rank() / 2);
  const peft::dense<float> base(random_matrix<float>(out_f, in_f, g));
  const peft::any_adapter<float> sa = s, la = *compact;
  const auto x = random_matrix<float>(5, in_f, g);
  peft::matrix<float> ys(5, out_f), yl(5, out_f);
  peft::serve::mixed_forward(base, x.view(), ys.view(), std::vector{peft::serve::group_of(sa, {0, 1, 2, 3, 4}, {1, 1, 1, 1, 1})});
  peft::serve::mixed_forward(base, x.view(), yl.view(), std::vector{peft::serve::group_of(la, {0, 1, 2, 3, 4}, {1, 1, 1, 1, 1})});
  REQUIRE(peft_test::nontrivial(yl));
  CHECK(peft_test::rel_error(ys, yl) < 1e-5);

  peft::lora<float> l(random_matrix<float>(3, in_f, g), random_matrix<float>(out_f, 3, g), 0.75f,
                      peft_test::random_vector<float>(out_f, g));
  const auto fl = peft::serve::low_rank_of(l);
  REQUIRE(fl);
  CHECK(fl->bias == l.bias().data());
  CHECK(fl->scale == 0.75f);
  CHECK(fl->a.data() == l.A().data());  // referenced, not copied
}

TEST_CASE("mixed_forward: every method in one batch equals each row's own forward (dense f32)", "[serve]") {
  peft::rng g(21);
  const auto w = random_matrix<float>(out_f, in_f, g);
  const auto b = peft_test::random_vector<float>(out_f, g);
  check_mixed(peft::dense<float>::from(w.view(), b.data()), 31);
}

TEST_CASE("mixed_forward on bf16, int8 and q4_0 bases", "[serve]") {
  peft::rng g(22);
  const auto w = random_matrix<float>(out_f, in_f, g);
  check_mixed(peft::dense<peft::bf16>::from(w.view()), 32);
  check_mixed(peft::int8_rowwise::quantize(peft::matrix_view<const float>(w.view())), 33);
  // q4_0 blocks are 32 wide: a wider layer for it, LoRA groups of different ranks only.
  const ix k = 64, n = 40, m = 23;
  const auto wq = random_matrix<float>(n, k, g);
  const peft::q4_0 q = peft::q4_0::quantize(peft::matrix_view<const float>(wq.view()));
  std::vector<peft::any_adapter<float>> ad;
  for (ix r : {1, 4, 16}) ad.emplace_back(peft::lora<float>(random_matrix<float>(r, k, g), random_matrix<float>(n, r, g), 0.5f));
  std::vector<peft::serve::batch_group<peft::any_adapter<float>>> groups(3);
  for (ix i = 0; i < m; ++i) {
    auto& grp = groups[static_cast<std::size_t>(i % 3)];
    grp.adapter = &ad[static_cast<std::size_t>(i % 3)];
    grp.low_rank = peft::serve::low_rank_of(ad[static_cast<std::size_t>(i % 3)]);
    grp.rows.push_back(m - 1 - i);  // reversed: the batch is regrouped internally
    grp.factors.push_back(i % 5 == 0 ? 2.0f : 1.0f);
  }
  const auto x = random_matrix<float>(m, k, g);
  peft::matrix<float> y(m, n), yl(m, n);
  peft::serve::mixed_forward(q, x.view(), y.view(), groups);
  peft::serve::looped_forward(q, x.view(), yl.view(), groups);
  REQUIRE(peft_test::nontrivial(yl));
  CHECK(peft_test::rel_error(y, yl) < 2e-5);
}

TEST_CASE("mixed_forward: a row in two groups gets both terms (the fused-adapter correction)", "[serve]") {
  peft::rng g(23);
  const peft::dense<float> base(random_matrix<float>(out_f, in_f, g));
  std::vector<peft::any_adapter<float>> ad;
  ad.emplace_back(peft_test::adapter_traits<peft::lora<float>>::make_random(in_f, out_f, g));
  ad.emplace_back(peft_test::adapter_traits<peft::shira<float>>::make_random(in_f, out_f, g));
  ad.emplace_back(peft_test::adapter_traits<peft::vera<float>>::make_random(in_f, out_f, g));
  const ix m = 9;
  std::vector<peft::serve::batch_group<peft::any_adapter<float>>> groups(3);
  groups[0] = peft::serve::group_of(ad[0], {0, 1, 2, 3}, {1, 1, 1, 1});
  groups[1] = peft::serve::group_of(ad[1], {3, 4, 5}, {1, -1, 0.5f});
  groups[2] = peft::serve::group_of(ad[2], {0, 5, 6, 8}, {-1, -1, -0.25f, 2});
  REQUIRE(groups[0].low_rank);
  REQUIRE(!groups[1].low_rank);
  REQUIRE(groups[2].low_rank);
  const auto x = random_matrix<float>(m, in_f, g);
  peft::matrix<float> y(m, out_f);
  peft::serve::mixed_forward(base, x.view(), y.view(), groups);
  const auto ref = reference(base, x, groups);
  CHECK(peft_test::rel_error(y, ref) < 2e-5);
  peft::matrix<float> yl(m, out_f);
  CHECK_THROWS_AS(peft::serve::looped_forward(base, x.view(), yl.view(), groups), peft::error);
}

TEST_CASE("mixed_forward refuses bad groups before writing anything", "[serve]") {
  peft::rng g(24);
  const peft::dense<float> base(random_matrix<float>(out_f, in_f, g));
  const peft::any_adapter<float> a = peft_test::adapter_traits<peft::lora<float>>::make_random(in_f, out_f, g);
  const peft::any_adapter<float> wrong = peft_test::adapter_traits<peft::lora<float>>::make_random(in_f + 1, out_f, g);
  const auto x = random_matrix<float>(4, in_f, g);
  peft::matrix<float> y(4, out_f, 7.0f);
  using group = peft::serve::batch_group<peft::any_adapter<float>>;
  auto run = [&](std::vector<group> gs) { peft::serve::mixed_forward(base, x.view(), y.view(), gs); };
  CHECK_THROWS_WITH(run({{&a, std::nullopt, {0, 4}, {1, 1}}}), Catch::Contains("[serve::mixed_forward]") && Catch::Contains("row 4"));
  CHECK_THROWS_WITH(run({{&a, std::nullopt, {1, 1}, {1, 1}}}), Catch::Contains("twice"));
  CHECK_THROWS_WITH(run({{&a, std::nullopt, {1}, {1, 2}}}), Catch::Contains("factors"));
  CHECK_THROWS_WITH(run({{&a, std::nullopt, {1}, {NAN}}}), Catch::Contains("non-finite"));
  CHECK_THROWS_AS(run({{&wrong, std::nullopt, {1}, {1}}}), peft::shape_error);
  CHECK_THROWS_WITH(run({{nullptr, std::nullopt, {1}, {1}}}), Catch::Contains("neither"));
  peft::matrix<float> y_bad(3, out_f);
  CHECK_THROWS_AS(peft::serve::mixed_forward(base, x.view(), y_bad.view(), std::vector<group>{}), peft::shape_error);
  for (float v : y.storage()) REQUIRE(v == 7.0f);
}

}  // namespace test_mixed_forward
