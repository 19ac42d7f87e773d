// SoRA's training procedure (train/sora_trainer.hpp): the proximal gate step on every layer,
// the official code's threshold, the sparsifying schedule's stages and the ranks they leave,
// the parameters handed to the optimizer, the official code's L1 term, compaction to LoRAs
// (outputs preserved), a short training run on a synthetic three-layer regression, and errors.
#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/adapters/sora.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "peft/train/optimizer.hpp"
#include "peft/train/sora_trainer.hpp"
#include "support/gated_rank_checks.hpp"
#include "support/test_support.hpp"
#include "support/trainer_harness.hpp"

namespace test_sora_trainer {

namespace {

namespace train = peft::train;
using peft_test::rel_error;
using sora_run = peft_test::chain_run<peft::sora<double>>;

/// T_t(z) = sign(z) max(|z| - t, 0), written out for the tests.
double soft(double z, double t) {
  if (z > t) return z - t;
  if (z < -t) return z + t;
  return 0.0;
}

/// A sora layer with random non-zero A, B and the given gates.
peft::sora<double> layer_with_gates(peft::index in, peft::index out, const std::vector<double>& gates, peft::rng& g) {
  return peft_test::gated_with<peft::sora<double>>(in, out, gates, g, 0.5);
}

/// Forward + backward of L = sum(y * G) with random x, G: fills the layer's gradients.
void accumulate_gradients(peft::sora<double>& a, peft::rng& g) {
  const peft::dense<double> w(peft_test::random_matrix<double>(a.out_features(), a.in_features(), g));
  const auto x = peft_test::random_matrix<double>(5, a.in_features(), g);
  const auto gy = peft_test::random_matrix<double>(5, a.out_features(), g);
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(gy));
  peft::matrix<double> y(5, a.out_features()), dx(5, a.in_features());
  peft::sora<double>::cache_type cache;
  a.forward(w, x, y, cache);
  a.backward(w, x, gy, dx, cache);
}

std::vector<double> gates_of(const peft::sora<double>& a) {
  std::vector<double> v;
  for (peft::index i = 0; i < a.rank(); ++i) v.push_back(a.gate()(0, i));
  return v;
}

/// Every layer of the trained chain against its compacted LoRA (or the bare base when the
/// compaction is empty), on the inputs the layer sees in the chain: equal to 1e-12.
void check_compaction(const peft_test::regression_problem& p, const std::vector<peft::sora<double>>& layers,
                      const std::vector<std::optional<peft::lora<double>>>& loras) {
  REQUIRE(loras.size() == layers.size());
  peft::matrix<double> h = p.x;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    INFO("layer " << l);
    peft::matrix<double> y(h.rows(), layers[l].out_features()), yl(h.rows(), layers[l].out_features());
    peft::sora<double>::cache_type cache;
    layers[l].forward(p.base[l], h, y, cache);
    if (loras[l]) {
      CHECK(loras[l]->rank() == layers[l].active_rank());
      peft::lora<double>::cache_type lc;
      loras[l]->forward(p.base[l], h, yl, lc);
    } else {
      CHECK(layers[l].active_rank() == 0);
      p.base[l].matmul(peft::matrix_view<const double>(h.view()), yl.view());
    }
    CHECK(rel_error(yl, y) < 1e-12);
    h = std::move(y);
  }
}

/// Three stages of 400 steps: step(t, loss) after each step's gradients, then the stage ends.
/// Returns the log of the stages' thresholds, losses and ranks.
std::string run_stages(sora_run& run, train::sora_trainer<double>& tr, const std::function<void(int, double)>& step) {
  std::string log;
  for (peft::index stage = 0; stage < 3; ++stage) {
    run.train(400, step);
    std::ostringstream s;
    s << "stage " << stage << " xi " << tr.xi() << " loss " << run.loss() << " ranks"
      << peft_test::ranks_text(tr.ranks()) << '\n';
    log += s.str();
    tr.next_stage();
  }
  return log;
}

/// The bound of a run: the loss below 1% of the initial loss with 1 to 6 of the 12 gates open,
/// and the compacted LoRAs computing what the layers compute.
void check_fits_sparse(sora_run& run, train::sora_trainer<double>& tr, const std::string& log) {
  const double final_loss = run.loss();
  INFO("initial loss " << run.initial << "\n" << log);
  CHECK(final_loss < 0.01 * run.initial);
  CHECK(tr.total_rank() <= 6);
  CHECK(tr.total_rank() >= 1);
  check_compaction(run.problem, run.layers, tr.compact());
}

}  // namespace

TEST_CASE("sora_trainer: the proximal gate step on every layer", "[sora_trainer][proximal]") {
  peft::rng g(3);
  std::vector<peft::sora<double>> layers;
  layers.push_back(layer_with_gates(7, 5, {0.9, -0.004, 0.3, -0.6}, g));
  layers.push_back(layer_with_gates(4, 6, {0.002, 1.2, -0.8}, g));
  layers.push_back(layer_with_gates(5, 5, {-0.5, 0.7, 0.001, 0.25, -1.1}, g));
  std::vector<std::vector<double>> g0, dg;
  for (auto& l : layers) {
    accumulate_gradients(l, g);
    REQUIRE(peft_test::count_nonzero(l.grad_gate()) == l.rank());
    g0.push_back(gates_of(l));
    std::vector<double> d;
    for (peft::index i = 0; i < l.rank(); ++i) d.push_back(l.grad_gate()(0, i));
    dg.push_back(d);
  }
  train::sora_trainer<double> tr({&layers[0], &layers[1], &layers[2]}, {.xi0 = 30.0, .xi_max = 60.0, .stages = 4});
  REQUIRE(tr.size() == 3);
  CHECK(tr.xi() == 30.0);
  CHECK(tr.options().rule == peft::sora_gate_rule::proximal);
  CHECK(tr.ranks() == std::vector<peft::index>{4, 3, 5});

  const double lr = 1e-3;  // threshold lr * xi = 0.03
  tr.after_step(lr);
  std::vector<peft::index> expect_ranks;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    peft::index nz = 0;
    for (std::size_t i = 0; i < g0[l].size(); ++i) {
      const double e = soft(g0[l][i] - lr * dg[l][i], lr * 30.0);
      CHECK(layers[l].gate()(0, static_cast<peft::index>(i)) == Approx(e).margin(1e-15));
      nz += e != 0.0 ? 1 : 0;
    }
    expect_ranks.push_back(nz);
    // the gradient is kept: zero_grad() is the caller's
    for (std::size_t i = 0; i < g0[l].size(); ++i) CHECK(layers[l].grad_gate()(0, static_cast<peft::index>(i)) == dg[l][i]);
  }
  CHECK(tr.ranks() == expect_ranks);
  CHECK(tr.total_rank() == expect_ranks[0] + expect_ranks[1] + expect_ranks[2]);
  CHECK(tr.total_rank() == 9);  // the three tiny gates went, no other

  // lr = 0: no step, no threshold
  for (auto& l : layers) l.zero_grad();
  const auto before = gates_of(layers[1]);
  tr.after_step(0.0);
  CHECK(gates_of(layers[1]) == before);
}

TEST_CASE("sora_trainer: the sparsifying schedule's stages and the ranks they leave", "[sora_trainer][schedule]") {
  peft::rng g(5);
  const std::vector<double> gates0{0.05, -0.15, 0.35, 0.65, -1.2, 0.25, 2.0, -0.45};
  auto a = layer_with_gates(6, 4, {gates0.begin(), gates0.begin() + 4}, g);
  auto b = layer_with_gates(3, 5, {gates0.begin() + 4, gates0.end()}, g);
  train::sora_trainer<double> tr({&a, &b}, {.xi0 = 0.1, .xi_max = 0.4, .stages = 4});
  // numpy.linspace(0.1, 0.4, 4)
  const std::array<double, 4> xs{0.1, 0.2, 0.3, 0.4};
  REQUIRE(tr.schedule().size() == 4);
  std::vector<double> expect = gates0;
  for (peft::index s = 0; s < 4; ++s) {
    INFO("stage " << s);
    CHECK(tr.stage() == s);
    CHECK(tr.xi() == Approx(xs[static_cast<std::size_t>(s)]).epsilon(1e-15));
    CHECK(tr.last_stage() == (s == 3));
    a.zero_grad();
    b.zero_grad();
    tr.after_step(1.0);  // zero gradient: g <- T_xi(g)
    for (auto& e : expect) e = soft(e, xs[static_cast<std::size_t>(s)]);
    std::vector<double> now = gates_of(a);
    for (double v : gates_of(b)) now.push_back(v);
    for (std::size_t i = 0; i < now.size(); ++i) CHECK(now[i] == Approx(expect[i]).margin(1e-15));
    tr.next_stage();
  }
  // the thresholds accumulate 0.1 + 0.2 + 0.3 + 0.4 = 1.0: only |g| > 1 survives
  CHECK(tr.ranks() == std::vector<peft::index>{0, 2});
  CHECK(tr.stage() == 3);  // past the last stage xi stays xi_max
  tr.next_stage();
  CHECK(tr.stage() == 3);
  CHECK(tr.xi() == 0.4);
  CHECK(gates_of(b)[0] == Approx(-0.2).margin(1e-15));
  CHECK(gates_of(b)[2] == Approx(1.0).margin(1e-15));

  // one stage (the default): xi0 throughout
  auto c = layer_with_gates(3, 3, {0.3, -0.3}, g);
  train::sora_trainer<double> one({&c}, {.xi0 = 0.25, .xi_max = 0.0, .stages = 1});
  CHECK(one.xi() == 0.25);
  CHECK(one.last_stage());
  one.next_stage();
  CHECK(one.xi() == 0.25);
  const train::sora_training_options defaults{};
  CHECK(defaults.xi0 == 1e-4);
  CHECK(defaults.xi_max == 1e-3);
  CHECK(defaults.stages == 1);
  CHECK(defaults.rule == peft::sora_gate_rule::proximal);
}

TEST_CASE("sora_trainer: the official code's rule", "[sora_trainer][official]") {
  peft::rng g(8);
  auto a = layer_with_gates(5, 4, {0.05, -0.15, 0.1, 0.25, -0.3}, g);
  auto b = layer_with_gates(4, 4, {0.19, -0.21, 1.0}, g);
  accumulate_gradients(a, g);  // the gradient is the optimizer's business: unused here
  train::sora_trainer<double> tr({&a, &b}, {.xi0 = 0.1, .xi_max = 0.1, .stages = 1,
                                            .rule = peft::sora_gate_rule::official_code});
  tr.after_step(123.0);  // lr unused: the fixed xi = 0.1; |g| < 0.2 -> 0, else sign(g)(|g| - 0.1)
  const std::vector<double> ea{0.0, 0.0, 0.1, 0.15, -0.2}, eb{0.0, -0.11, 0.9};
  // 0.1 == xi is left as is by the strict comparisons (see sora_official_threshold)
  const auto ga = gates_of(a), gb = gates_of(b);
  for (std::size_t i = 0; i < ea.size(); ++i) CHECK(ga[i] == Approx(ea[i]).margin(1e-15));
  for (std::size_t i = 0; i < eb.size(); ++i) CHECK(gb[i] == Approx(eb[i]).margin(1e-15));
  CHECK(tr.ranks() == std::vector<peft::index>{3, 2});

  // the gates are in the optimizer's parameters with this rule, and not with the paper's
  auto names = [](const std::vector<peft::parameter<double>>& ps) {
    std::vector<std::string> n;
    for (const auto& p : ps) n.push_back(p.name);
    return n;
  };
  CHECK(names(tr.optimizer_parameters()) ==
        std::vector<std::string>{"layers.0.lora_A.weight", "layers.0.lora_B.weight", "layers.0.lora_gate",
                                 "layers.1.lora_A.weight", "layers.1.lora_B.weight", "layers.1.lora_gate"});
  train::sora_trainer<double> prox({&a, &b}, {});
  CHECK(names(prox.optimizer_parameters()) ==
        std::vector<std::string>{"layers.0.lora_A.weight", "layers.0.lora_B.weight", "layers.1.lora_A.weight",
                                 "layers.1.lora_B.weight"});
  CHECK(prox.optimizer_parameters()[2].value.data() == b.A().data());

  // the code's L1 term lambda_1 sum |g| / (number of gates)
  a.zero_grad();
  b.zero_grad();
  double l1 = 0.0;
  for (double v : gates_of(a)) l1 += std::abs(v);
  for (double v : gates_of(b)) l1 += std::abs(v);
  REQUIRE(l1 > 0.0);
  CHECK(tr.add_gate_l1(0.8) == Approx(0.8 * l1 / 8.0).epsilon(1e-14));
  for (peft::index i = 0; i < a.rank(); ++i) {
    const double v = a.gate()(0, i);
    CHECK(a.grad_gate()(0, i) == (v > 0 ? 0.1 : (v < 0 ? -0.1 : 0.0)));
  }
}

TEST_CASE("sora_trainer: compaction preserves every layer's outputs", "[sora_trainer][compact]") {
  peft::rng g(21);
  std::vector<peft::sora<double>> layers;
  layers.push_back(layer_with_gates(9, 7, {0.9, 0.01, -0.7, -0.02, 0.4}, g));
  layers.push_back(layer_with_gates(6, 8, {0.01, -0.02, 0.015}, g));  // every gate goes
  layers.push_back(layer_with_gates(5, 3, {-1.5, 0.8, 0.3, 0.6}, g));  // none goes
  train::sora_trainer<double> tr({&layers[0], &layers[1], &layers[2]}, {.xi0 = 0.05});
  tr.after_step(1.0);  // zero gradients: T_0.05
  REQUIRE(tr.ranks() == std::vector<peft::index>{3, 0, 4});
  const auto loras = tr.compact();
  REQUIRE(loras.size() == 3);
  CHECK_FALSE(loras[1].has_value());
  for (std::size_t l = 0; l < 3; ++l) {
    INFO("layer " << l);
    peft_test::check_layer_compaction(layers[l], loras[l], 6, tr.ranks()[l], g);
  }
}

TEST_CASE("sora_trainer: a short training run fits and sparsifies", "[sora_trainer][training]") {
  // The teacher adds deltas of ranks 1, 1, 2 to the three frozen layers (10 x 10, near the
  // identity); every student layer has r_max = 4 gated components (12 in all). Bound: the loss
  // falls below 1% of the initial loss while at most 6 of the 12 gates stay non-zero (the
  // teacher's change of the whole chain has rank <= 4).
  sora_run run({1, 1, 2}, 11, [](std::uint64_t l) {
    return peft::sora<double>(peft_test::chain_width, peft_test::chain_width,
                              peft::sora_options{.rank = 4, .alpha = 4, .seed = 40 + l});
  });

  SECTION("the paper's proximal rule") {
    // AdamW steps A and B; the gates take the proximal step with a gate lr of 0.05 and xi
    // raised over 3 stages of 400 steps from 0.01 to 0.03.
    train::sora_trainer<double> tr(run.pointers(), {.xi0 = 0.01, .xi_max = 0.03, .stages = 3});
    train::adamw<double> opt(tr.optimizer_parameters(), {.lr = 1e-2, .weight_decay = 1e-2});
    REQUIRE(tr.ranks() == std::vector<peft::index>{4, 4, 4});
    const auto log = run_stages(run, tr, [&](int, double) {
      opt.step(tr.optimizer_parameters());
      tr.after_step(0.05);
    });
    check_fits_sparse(run, tr, log);
  }

  SECTION("the official code's rule") {
    // AdamW steps A, B and (weight decay 0) the gates; the code's L1 term lambda_1 = 0.1 and
    // its threshold with xi from 1e-4 to 1e-3 over 3 stages of 400 steps.
    train::sora_trainer<double> tr(run.pointers(),
                                   {.xi0 = 1e-4, .xi_max = 1e-3, .stages = 3, .rule = peft::sora_gate_rule::official_code});
    train::adamw<double> opt(tr.optimizer_parameters(), {.lr = 1e-2, .weight_decay = 1e-2},
                             {{.name = "gates", .select = train::name_contains{"lora_gate"},
                               .options = {.lr = 1e-2, .weight_decay = 0.0}}});
    const auto log = run_stages(run, tr, [&](int, double) {
      tr.add_gate_l1(0.1);
      opt.step(tr.optimizer_parameters());
      tr.after_step(1e-2);
    });
    check_fits_sparse(run, tr, log);
  }
}

TEST_CASE("sora_trainer: errors", "[sora_trainer][errors]") {
  peft::rng g(2);
  auto a = layer_with_gates(3, 3, {0.5, 0.5}, g);
  auto b = layer_with_gates(3, 3, {0.5, 0.5}, g);
  const std::string ctor = "[sora_trainer::sora_trainer]";
  peft_test::check_layer_list_errors(ctor, a, b, [](const std::vector<peft::sora<double>*>& layers) {
    return train::sora_trainer<double>(layers, {});
  });
  CHECK_THROWS_WITH(train::sora_trainer<double>({&a}, {.xi0 = -1e-4}), Catch::StartsWith(ctor));
  CHECK_THROWS_WITH(train::sora_trainer<double>({&a}, {.xi_max = -1.0}), Catch::StartsWith(ctor));
  CHECK_THROWS_WITH(train::sora_trainer<double>({&a}, {.xi0 = std::numeric_limits<double>::quiet_NaN()}),
                    Catch::StartsWith(ctor));
  CHECK_THROWS_WITH(train::sora_trainer<double>({&a}, {.xi_max = std::numeric_limits<double>::infinity()}),
                    Catch::StartsWith(ctor));
  CHECK_THROWS_WITH(train::sora_trainer<double>({&a}, {.stages = 0}), Catch::StartsWith(ctor) && Catch::Contains("stages"));
  CHECK_THROWS_WITH(train::sora_trainer<double>({&a}, {.xi0 = 1e-2, .xi_max = 1e-3, .stages = 3}),
                    Catch::StartsWith(ctor) && Catch::Contains("decrease"));
  CHECK_NOTHROW(train::sora_trainer<double>({&a}, {.xi0 = 1e-2, .xi_max = 1e-3, .stages = 1}));  // xi_max unused

  train::sora_trainer<double> tr({&a, &b}, {});
  CHECK_THROWS_WITH(tr.after_step(-0.1), Catch::StartsWith("[sora_trainer::after_step]"));
  CHECK_THROWS_WITH(tr.after_step(std::numeric_limits<double>::quiet_NaN()), Catch::StartsWith("[sora_trainer::after_step]"));
  CHECK_THROWS_WITH(tr.add_gate_l1(-1.0), Catch::StartsWith("[sora_trainer::add_gate_l1]"));
  CHECK(tr.ranks() == std::vector<peft::index>{2, 2});  // nothing changed
}

}  // namespace test_sora_trainer
