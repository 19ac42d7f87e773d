// DoRA's (dynamic rank distribution) training procedure (train/dynamic_rank_trainer.hpp): the
// budget schedule against its closed form, how many components the global selection prunes at
// given steps on a toy model of three layers with importances set by hand, global (not
// per-layer) selection, deterministic ties, regrowth before and the frozen mask after the end,
// the regulariser only until pruning ends, the importance EMA, compaction (outputs preserved),
// a short training run on a synthetic three-layer regression, and errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/dynamic_rank.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "peft/train/dynamic_rank_trainer.hpp"
#include "peft/train/optimizer.hpp"
#include "support/gated_rank_checks.hpp"
#include "support/test_support.hpp"
#include "support/trainer_harness.hpp"

namespace test_dynamic_rank_trainer {

namespace {

namespace train = peft::train;

/// A layer with random A, B and r0 non-zero c_i (|c_i| in [0.2, 1), random signs).
peft::dynamic_rank<double> random_layer(peft::index in, peft::index out, peft::index r0, peft::rng& g) {
  return peft_test::random_gated<peft::dynamic_rank<double>>(in, out, r0, g, 0.5);
}

/// A layer with random A, B and c = 0 (its importance update is exactly S <- 0.9 S).
peft::dynamic_rank<double> zero_c_layer(peft::index in, peft::index out, peft::index r0, peft::rng& g) {
  std::vector<double> c(static_cast<std::size_t>(r0), 0.0);
  return peft_test::gated_with<peft::dynamic_rank<double>>(in, out, std::move(c), g, 0.5);
}

/// The toy model: three layers of r0 = 8 (N = 24), every c_i non-zero.
struct toy_model {
  std::vector<peft::dynamic_rank<double>> layers;
  explicit toy_model(std::uint64_t seed) {
    peft::rng g(seed);
    layers.push_back(random_layer(6, 5, 8, g));
    layers.push_back(random_layer(4, 7, 8, g));
    layers.push_back(random_layer(5, 5, 8, g));
  }
  std::vector<peft::dynamic_rank<double>*> pointers() { return {&layers[0], &layers[1], &layers[2]}; }
  /// Sets S of layer l to values[8 l .. 8 l + 7].
  void set_importance(const std::vector<double>& values) {
    for (std::size_t l = 0; l < 3; ++l) {
      layers[l].set_importance(std::span<const double>(values.data() + 8 * l, 8));
    }
  }
};

// The toy schedule: T = 100, pruning from s0 = floor(0.15 T) = 15 to s1 = floor(0.5 T) = 50
// (Tp = 35), an event every 5 steps, N = 24, r = 3 over L = 3 layers: D = N - r L = 15.
const train::dynamic_rank_schedule_options toy_schedule{
    .total_steps = 100, .start_fraction = 0.15, .end_fraction = 0.5, .interval = 5, .target_rank = 3, .regularizer = 0.1};

/// The budget after `step`, written out: N - floor(D (t_e / Tp)^3), t_e the last event.
peft::index toy_budget(peft::index step) {
  const peft::index s0 = 15, tp = 35, interval = 5;
  if (step < s0) return 24;
  const peft::index t = std::min(step - s0, tp);
  const peft::index te = t == tp ? tp : t - t % interval;
  return 24 - static_cast<peft::index>(std::floor(15.0 * std::pow(static_cast<double>(te) / 35.0, 3.0)));
}

peft::index sum(const std::vector<peft::index>& v) {
  peft::index s = 0;
  for (peft::index x : v) s += x;
  return s;
}

/// Components whose c_i is exactly zero, over all layers.
peft::index zero_components(const toy_model& m) {
  peft::index n = 0;
  for (const auto& l : m.layers) n += l.rank() - l.active_rank();
  return n;
}

/// Every layer against its compacted LoRA (or the bare base when the compaction is empty) on
/// random inputs: equal to 1e-12.
void check_compaction(const std::vector<peft::dynamic_rank<double>>& layers,
                      const std::vector<std::optional<peft::lora<double>>>& loras, peft::rng& g) {
  REQUIRE(loras.size() == layers.size());
  for (std::size_t l = 0; l < layers.size(); ++l) {
    INFO("layer " << l);
    if (!loras[l]) CHECK(layers[l].active_rank() == 0);
    peft_test::check_layer_compaction(layers[l], loras[l], 7, layers[l].active_rank(), g);
  }
}

}  // namespace

TEST_CASE("dynamic_rank_trainer: the budget follows the cubic schedule", "[dynamic_rank_trainer][budget]") {
  toy_model m(1);
  train::dynamic_rank_trainer<double> tr(m.pointers(), toy_schedule);
  CHECK(tr.initial_budget() == 24);
  CHECK(tr.final_budget() == 9);  // ceil(3 * 3)
  CHECK(tr.pruning_start() == 15);
  CHECK(tr.pruning_end() == 50);
  // hand-computed: 24 - floor(15 (t / 35)^3) at the events t = 0, 5, ..., 35 (steps 15 .. 50)
  //   t = 10: 0.35 -> 24;  15: 1.18 -> 23;  20: 2.80 -> 22;  25: 5.47 -> 19;  30: 9.45 -> 15;  35: 9
  const std::vector<std::pair<peft::index, peft::index>> table{
      {0, 24},  {1, 24},  {14, 24}, {15, 24}, {25, 24}, {29, 24}, {30, 23}, {34, 23}, {35, 22},
      {39, 22}, {40, 19}, {44, 19}, {45, 15}, {49, 15}, {50, 9},  {51, 9},  {100, 9}, {1000, 9}};
  for (const auto& [step, b] : table) {
    INFO("step " << step);
    CHECK(tr.budget(step) == b);
  }
  for (peft::index step = 0; step <= 120; ++step) {
    INFO("step " << step);
    CHECK(tr.budget(step) == toy_budget(step));
    const bool event = step >= 15 && step <= 50 && (step - 15) % 5 == 0;
    CHECK(tr.is_pruning_step(step) == event);
    CHECK(tr.regularizer_active(step) == (step <= 50));
  }

  // the end is an event even off the interval: T = 90, s0 = floor(13.5) = 13, s1 = 45, Tp = 32;
  // events at t = 0, 10, 20, 30 and 32 (steps 13, 23, 33, 43, 45)
  auto o = toy_schedule;
  o.total_steps = 90;
  o.interval = 10;
  train::dynamic_rank_trainer<double> odd(m.pointers(), o);
  CHECK(odd.pruning_start() == 13);
  CHECK(odd.pruning_end() == 45);
  std::vector<peft::index> events;
  for (peft::index s = 0; s <= 90; ++s) {
    if (odd.is_pruning_step(s)) events.push_back(s);
  }
  CHECK(events == std::vector<peft::index>{13, 23, 33, 43, 45});
  // 24 - floor(15 (30/32)^3) = 24 - floor(12.36) = 12; then the final 9
  CHECK(odd.budget(44) == 12);
  CHECK(odd.budget(45) == 9);

  // fractions whose product falls a rounding error below an integer: 0.29 * 100 = 28.999999999999996
  o = toy_schedule;
  o.start_fraction = 0.29;
  o.end_fraction = 0.57;
  train::dynamic_rank_trainer<double> fuzz(m.pointers(), o);
  CHECK(fuzz.pruning_start() == 29);
  CHECK(fuzz.pruning_end() == 57);

  // a non-integer target: the final budget is ceil(r L) = ceil(7.5) = 8
  o = toy_schedule;
  o.target_rank = 2.5;
  CHECK(train::dynamic_rank_trainer<double>(m.pointers(), o).final_budget() == 8);
  // the target equal to r0: nothing is ever pruned
  o.target_rank = 8;
  train::dynamic_rank_trainer<double> none(m.pointers(), o);
  for (peft::index s = 0; s <= 100; ++s) CHECK(none.budget(s) == 24);

  const train::dynamic_rank_schedule_options defaults{.total_steps = 10};
  CHECK(defaults.start_fraction == 0.15);
  CHECK(defaults.end_fraction == 0.5);
  CHECK(defaults.interval == 10);
  CHECK(defaults.target_rank == 8.0);
  CHECK(defaults.regularizer == 0.1);
}

TEST_CASE("dynamic_rank_trainer: components pruned at given steps (global selection)", "[dynamic_rank_trainer][prune]") {
  toy_model m(2);
  REQUIRE(zero_components(m) == 0);
  // distinct importances 10, 20, ..., 240 in a shuffled order over the 24 components; set again
  // before every step so that the EMA update (S <- 0.9 S + 0.1 s, s ~ 1) keeps the order
  std::vector<double> s(24);
  for (std::size_t i = 0; i < 24; ++i) s[i] = 10.0 * static_cast<double>((i * 7) % 24 + 1);
  train::dynamic_rank_trainer<double> tr(m.pointers(), toy_schedule);
  CHECK(tr.ranks() == std::vector<peft::index>{8, 8, 8});
  for (peft::index step = 1; step <= 50; ++step) {
    INFO("step " << step);
    m.set_importance(s);
    tr.after_step(step);
    const peft::index keep = toy_budget(step);
    CHECK(sum(tr.ranks()) == keep);
    CHECK(zero_components(m) == 24 - keep);  // no optimizer here: pruned c_i stay zero
    // the kept components are the `keep` largest S over all layers
    std::vector<double> sorted = s;
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    const double kth = sorted[static_cast<std::size_t>(keep - 1)];
    for (std::size_t l = 0; l < 3; ++l) {
      for (std::size_t i = 0; i < 8; ++i) {
        const bool kept = s[8 * l + i] >= kth;
        CHECK(m.layers[l].mask()[i] == !kept);
        CHECK((m.layers[l].c()(0, static_cast<peft::index>(i)) != 0.0) == kept);
      }
    }
    CHECK(m.layers[0].mask_frozen() == (step >= 50));
  }
  // how many were pruned at given steps: 0 until step 29, 1 at 30, 2 at 35, 5 at 40, 9 at 45, 15 at 50
  CHECK(tr.finished());
  CHECK(sum(tr.ranks()) == 9);
  CHECK(sum(tr.active_ranks()) == 9);
}

TEST_CASE("dynamic_rank_trainer: the selection is global, a layer may lose all or none", "[dynamic_rank_trainer][global]") {
  toy_model m(3);
  // layer 0 holds the 8 least important components, layer 2 the middle, layer 1 the most
  std::vector<double> s(24);
  for (std::size_t i = 0; i < 8; ++i) {
    s[i] = 10.0 * static_cast<double>(i + 1);
    s[16 + i] = 10.0 * static_cast<double>(i + 9);
    s[8 + i] = 10.0 * static_cast<double>(i + 17);
  }
  train::dynamic_rank_trainer<double> tr(m.pointers(), toy_schedule);
  for (peft::index step = 1; step <= 50; ++step) {
    m.set_importance(s);
    tr.after_step(step);
    if (step == 45) CHECK(tr.ranks() == std::vector<peft::index>{0, 8, 7});  // budget 15
  }
  // budget 9: layer 1 keeps all 8 and layer 2 its best one; layer 0 loses everything (a
  // per-layer allocation would keep 3 of each)
  CHECK(tr.ranks() == std::vector<peft::index>{0, 8, 1});
  CHECK(tr.active_ranks() == std::vector<peft::index>{0, 8, 1});
  CHECK(m.layers[2].c()(0, 7) != 0.0);
  const auto loras = tr.compact();
  REQUIRE(loras.size() == 3);
  CHECK_FALSE(loras[0].has_value());
  REQUIRE(loras[1].has_value());
  REQUIRE(loras[2].has_value());
  CHECK(loras[1]->rank() == 8);
  CHECK(loras[2]->rank() == 1);
  peft::rng g(9);
  check_compaction(m.layers, loras, g);
}

TEST_CASE("dynamic_rank_trainer: ties are broken by layer, then component", "[dynamic_rank_trainer][ties]") {
  peft::rng g(4);
  std::vector<peft::dynamic_rank<double>> layers;
  for (int l = 0; l < 3; ++l) layers.push_back(zero_c_layer(5, 4, 4, g));  // N = 12
  auto o = toy_schedule;  // s0 = 15, s1 = 50
  SECTION("all equal: the first components in (layer, component) order are kept") {
    o.target_rank = 2;  // final budget 6
    for (auto& l : layers) l.set_importance(std::vector<double>(4, 1.0));
    train::dynamic_rank_trainer<double> tr({&layers[0], &layers[1], &layers[2]}, o);
    tr.after_step(50);  // the first call is the last event: S = 0.9 for every component
    CHECK(tr.ranks() == std::vector<peft::index>{4, 2, 0});
    CHECK(layers[1].mask() == std::vector<bool>{false, false, true, true});
  }
  SECTION("ties at the threshold") {
    o.target_rank = 2.2;  // 3 r = 6.6: final budget 12 - floor(5.4) = 7
    layers[0].set_importance(std::vector<double>{1, 1, 2, 2});
    layers[1].set_importance(std::vector<double>{2, 2, 1, 1});
    layers[2].set_importance(std::vector<double>{1, 2, 1, 2});
    train::dynamic_rank_trainer<double> tr({&layers[0], &layers[1], &layers[2]}, o);
    REQUIRE(tr.final_budget() == 7);
    tr.after_step(50);
    // the six 2s, then the first 1: layer 0, component 0
    CHECK(layers[0].mask() == std::vector<bool>{false, true, false, false});
    CHECK(layers[1].mask() == std::vector<bool>{false, false, true, true});
    CHECK(layers[2].mask() == std::vector<bool>{true, false, true, false});
    CHECK(tr.ranks() == std::vector<peft::index>{3, 2, 2});
  }
}

TEST_CASE("dynamic_rank_trainer: regrowth until the end, the frozen mask after", "[dynamic_rank_trainer][freeze]") {
  toy_model m(5);
  std::vector<double> s(24);
  for (std::size_t i = 0; i < 24; ++i) s[i] = 10.0 * static_cast<double>(24 - i);  // the last ones go first
  train::dynamic_rank_trainer<double> tr(m.pointers(), toy_schedule);
  for (peft::index step = 1; step <= 30; ++step) {
    m.set_importance(s);
    tr.after_step(step);
  }
  REQUIRE(m.layers[2].mask()[7]);  // step 30 pruned 1: layer 2's last component
  REQUIRE(m.layers[2].c()(0, 7) == 0.0);
  CHECK_FALSE(m.layers[2].mask_frozen());
  m.layers[2].c()(0, 7) = 0.5;  // as an optimizer step would move it: it may regrow
  m.set_importance(s);
  tr.after_step(31);  // not an event: the mask is not re-applied
  CHECK(m.layers[2].c()(0, 7) == 0.5);
  CHECK(sum(tr.ranks()) == 23);         // the mask still counts it pruned
  CHECK(sum(tr.active_ranks()) == 24);  // but its c is non-zero again

  for (peft::index step = 32; step <= 50; ++step) {
    m.set_importance(s);
    tr.after_step(step);
  }
  CHECK(tr.finished());
  for (const auto& l : m.layers) CHECK(l.mask_frozen());
  CHECK(tr.ranks() == std::vector<peft::index>{8, 1, 0});
  m.layers[1].c()(0, 5) = 0.25;  // a masked c_i moved (momentum, weight decay)
  tr.after_step(51);             // after the end every step re-applies the frozen mask
  CHECK(m.layers[1].c()(0, 5) == 0.0);
  CHECK(tr.ranks() == std::vector<peft::index>{8, 1, 0});
  // the frozen mask stays as it is whatever the importance does now
  std::vector<double> reversed(s.rbegin(), s.rend());
  m.set_importance(reversed);
  tr.after_step(60);
  CHECK(tr.ranks() == std::vector<peft::index>{8, 1, 0});

  SECTION("a skipped end step: the first call after it makes the final event") {
    toy_model m2(6);
    train::dynamic_rank_trainer<double> late(m2.pointers(), toy_schedule);
    m2.set_importance(s);
    late.after_step(40);  // an event (budget 19)
    CHECK(sum(late.ranks()) == 19);
    m2.set_importance(s);
    late.after_step(57);
    CHECK(late.finished());
    CHECK(m2.layers[0].mask_frozen());
    CHECK(sum(late.ranks()) == 9);
  }
}

TEST_CASE("dynamic_rank_trainer: the importance EMA after every step", "[dynamic_rank_trainer][importance]") {
  toy_model m(7);
  std::vector<double> s0(24);
  for (std::size_t i = 0; i < 24; ++i) s0[i] = 0.01 * static_cast<double>(i);
  m.set_importance(s0);
  std::vector<std::vector<double>> now;
  for (const auto& l : m.layers) now.push_back(l.component_importance());
  for (const auto& v : now) REQUIRE(peft_test::count_nonzero(peft::matrix<double>(1, 8, v)) == 8);
  train::dynamic_rank_trainer<double> tr(m.pointers(), toy_schedule);
  tr.after_step(3);
  for (std::size_t l = 0; l < 3; ++l) {
    for (std::size_t i = 0; i < 8; ++i) {
      CHECK(m.layers[l].importance()[i] == Approx(0.9 * s0[8 * l + i] + 0.1 * now[l][i]).epsilon(1e-14));
    }
  }
}

TEST_CASE("dynamic_rank_trainer: the regulariser until pruning ends", "[dynamic_rank_trainer][regularizer]") {
  toy_model m(8);
  train::dynamic_rank_trainer<double> tr(m.pointers(), toy_schedule);
  // lambda_R R, R = sum of every layer's sum_i (var(A_i,:) + var(B_:,i)) over 2 N = 48
  double r = 0.0;
  for (const auto& l : m.layers) r += l.regularizer();
  REQUIRE(r > 0.0);
  for (peft::index step : {1, 17, 50}) {
    INFO("step " << step);
    std::vector<peft::dynamic_rank<double>> copies = m.layers;
    for (auto& l : m.layers) l.zero_grad();
    CHECK(tr.add_regularizer(step) == Approx(0.1 * r / 48.0).epsilon(1e-14));
    for (std::size_t l = 0; l < 3; ++l) {
      copies[l].zero_grad();
      copies[l].add_regularizer(0.1 / 48.0);
      CHECK(peft_test::count_nonzero(m.layers[l].grad_A()) > 0);  // the gradients change
      CHECK(peft_test::exactly_equal(m.layers[l].grad_A(), copies[l].grad_A()));
      CHECK(peft_test::exactly_equal(m.layers[l].grad_B(), copies[l].grad_B()));
      CHECK(peft_test::count_nonzero(m.layers[l].grad_c()) == 0);
    }
  }
  // written out for layer 0, A row 2: d/dA_2j of 0.1/48 var(A_2,:) = 0.1/48 * 2 (a_2j - mean) / (in - 1)
  {
    const auto a = m.layers[0].A();
    double mean = 0.0;
    for (peft::index j = 0; j < a.cols(); ++j) mean += a(2, j);
    mean /= static_cast<double>(a.cols());
    for (peft::index j = 0; j < a.cols(); ++j) {
      CHECK(m.layers[0].grad_A()(2, j) ==
            Approx(0.1 / 48.0 * 2.0 * (a(2, j) - mean) / static_cast<double>(a.cols() - 1)).epsilon(1e-12));
    }
  }
  // after the end: no term, the gradients do not change
  for (peft::index step : {51, 80, 200}) {
    for (auto& l : m.layers) l.zero_grad();
    CHECK(tr.add_regularizer(step) == 0.0);
    for (const auto& l : m.layers) {
      CHECK(peft_test::count_nonzero(l.grad_A()) == 0);
      CHECK(peft_test::count_nonzero(l.grad_B()) == 0);
    }
  }
  // lambda_R = 0: nothing
  auto o = toy_schedule;
  o.regularizer = 0.0;
  train::dynamic_rank_trainer<double> off(m.pointers(), o);
  CHECK(off.add_regularizer(1) == 0.0);
  for (const auto& l : m.layers) CHECK(peft_test::count_nonzero(l.grad_A()) == 0);
}

TEST_CASE("dynamic_rank_trainer: a short training run fits at the target rank", "[dynamic_rank_trainer][training]") {
  // The teacher adds deltas of ranks 1, 2, 3 to three frozen 10 x 10 layers near the identity.
  // Students: dynamic_rank with target average rank 2, r0 = ceil(1.5 * 2) = 3 per layer (N = 9);
  // 600 AdamW steps, pruning from step 90 to 300 every 10 steps down to 6 components.
  // Bound: the loss falls below 1% of the initial loss with 6 components kept in all.
  peft_test::chain_run<peft::dynamic_rank<double>> run({1, 2, 3}, 12, [](std::uint64_t l) {
    return peft::dynamic_rank<double>(peft_test::chain_width, peft_test::chain_width,
                                      peft::dynamic_rank_options{.rank = 2, .alpha = 3, .seed = 50 + l});
  });
  REQUIRE(run.layers[0].rank() == 3);
  const peft::index total = 600;
  train::dynamic_rank_trainer<double> tr(run.pointers(), {.total_steps = total, .interval = 10, .target_rank = 2});
  REQUIRE(tr.pruning_start() == 90);
  REQUIRE(tr.pruning_end() == 300);
  train::adamw<double> opt(tr.parameters(), {.lr = 1e-2, .weight_decay = 1e-2});
  std::ostringstream log;
  run.train(static_cast<int>(total), [&](int step, double loss) {
    const double reg = tr.add_regularizer(step);
    opt.step(tr.parameters());
    tr.after_step(step);
    if (step % 50 == 0) {
      log << "step " << step << " loss " << loss << " reg " << reg << " ranks" << peft_test::ranks_text(tr.ranks())
          << '\n';
    }
  });
  const double final_loss = run.loss();
  INFO("initial loss " << run.initial << "\n" << log.str());
  CHECK(final_loss < 0.01 * run.initial);
  CHECK(sum(tr.ranks()) == 6);  // the target: average rank 2 over 3 layers
  CHECK(sum(tr.active_ranks()) == 6);
  CHECK(tr.finished());
  peft::rng g(13);
  check_compaction(run.layers, tr.compact(), g);
}

TEST_CASE("dynamic_rank_trainer: errors", "[dynamic_rank_trainer][errors]") {
  toy_model m(10);
  const std::string ctor = "[dynamic_rank_trainer::dynamic_rank_trainer]";
  using trainer = train::dynamic_rank_trainer<double>;
  const auto with = [](auto change) {
    auto o = toy_schedule;
    change(o);
    return o;
  };
  using opts = train::dynamic_rank_schedule_options;
  peft_test::check_layer_list_errors(ctor, m.layers[0], m.layers[1],
                                     [](const std::vector<peft::dynamic_rank<double>*>& layers) {
                                       return trainer(layers, toy_schedule);
                                     });
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.total_steps = 0; })),
                    Catch::StartsWith(ctor) && Catch::Contains("total_steps"));
  CHECK_THROWS_WITH(trainer(m.pointers(), opts{}), Catch::StartsWith(ctor) && Catch::Contains("total_steps"));
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.start_fraction = -0.1; })), Catch::StartsWith(ctor));
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.end_fraction = 1.5; })), Catch::StartsWith(ctor));
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.start_fraction = 0.5; })), Catch::StartsWith(ctor));
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.start_fraction = 0.6; })), Catch::StartsWith(ctor));
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.end_fraction = std::numeric_limits<double>::quiet_NaN(); })),
                    Catch::StartsWith(ctor));
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.total_steps = 1; })),
                    Catch::StartsWith(ctor) && Catch::Contains("empty"));  // floor(0.15) == floor(0.5)
  CHECK_NOTHROW(trainer(m.pointers(), with([](opts& o) { o.total_steps = 2; })));  // steps 0 .. 1
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.interval = 0; })), Catch::StartsWith(ctor) && Catch::Contains("interval"));
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.target_rank = 8.5; })),
                    Catch::StartsWith(ctor) && Catch::Contains("target_rank"));  // above r0 = 8
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.target_rank = 0.0; })), Catch::StartsWith(ctor));
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.target_rank = -1.0; })), Catch::StartsWith(ctor));
  CHECK_THROWS_WITH(trainer(m.pointers(), with([](opts& o) { o.regularizer = -0.1; })),
                    Catch::StartsWith(ctor) && Catch::Contains("regularizer"));

  trainer tr(m.pointers(), toy_schedule);
  CHECK_THROWS_WITH(tr.after_step(0), Catch::StartsWith("[dynamic_rank_trainer::after_step]"));
  CHECK_THROWS_WITH(tr.add_regularizer(0), Catch::StartsWith("[dynamic_rank_trainer::add_regularizer]"));
  CHECK_THROWS_WITH(tr.budget(-1), Catch::StartsWith("[dynamic_rank_trainer::budget]"));
  tr.after_step(5);
  CHECK_THROWS_WITH(tr.after_step(5), Catch::StartsWith("[dynamic_rank_trainer::after_step]") && Catch::Contains("increase"));
  CHECK_THROWS_WITH(tr.after_step(4), Catch::StartsWith("[dynamic_rank_trainer::after_step]"));
  std::vector<double> nan_s(24, 1.0);
  nan_s[3] = std::numeric_limits<double>::quiet_NaN();
  m.set_importance(nan_s);
  CHECK_THROWS_WITH(tr.after_step(15), Catch::StartsWith("[dynamic_rank_trainer::after_step]") && Catch::Contains("NaN"));
}

}  // namespace test_dynamic_rank_trainer
