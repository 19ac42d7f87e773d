// tests/support/trainer_harness.hpp — what the tests of the gated-rank trainers share
// (train/sora_trainer.hpp, train/dynamic_rank_trainer.hpp): a synthetic regression on a chain of
// three frozen layers y = L3(L2(L1(x))), each L_l(x) = x W_l^T + adapter term, with a teacher
// whose layer l adds a delta of a given rank; the chain's loss and gradients; a training driver;
// and the errors every trainer raises for its layer list. Header-only; uses Catch2.
#pragma once

#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "peft/base/dense.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "support/test_support.hpp"

namespace peft_test {

/// The chain's layers are width x width; the problem has `chain_batch` inputs.
inline constexpr index chain_width = 10;
inline constexpr index chain_batch = 64;

/// Frozen bases near the identity and a teacher whose layer l adds a delta of rank ranks[l]
/// (each rank one 0.8 u v^T, u and v of norm ~1); x and the teacher chain's output.
struct regression_problem {
  std::vector<peft::dense<double>> base;
  std::vector<peft::dense<double>> teacher;
  peft::matrix<double> x;
  peft::matrix<double> target;

  regression_problem(const std::array<index, 3>& ranks, std::uint64_t seed) {
    peft::rng g(seed);
    const index width = chain_width;
    const double sd = 1.0 / std::sqrt(static_cast<double>(width));
    for (index r : ranks) {
      peft::matrix<double> w(width, width);
      for (index i = 0; i < width; ++i) {
        for (index j = 0; j < width; ++j) w(i, j) = (i == j ? 1.0 : 0.0) + 0.3 * sd * g.uniform(-1.0, 1.0);
      }
      peft::matrix<double> wt = w;
      for (index k = 0; k < r; ++k) {  // + 0.8 u v^T, u and v of norm ~1
        std::vector<double> u(width), v(width);
        for (auto& e : u) e = std::sqrt(3.0) * sd * g.uniform(-1.0, 1.0);
        for (auto& e : v) e = std::sqrt(3.0) * sd * g.uniform(-1.0, 1.0);
        for (index i = 0; i < width; ++i) {
          for (index j = 0; j < width; ++j) {
            wt(i, j) += 0.8 * u[static_cast<std::size_t>(i)] * v[static_cast<std::size_t>(j)];
          }
        }
      }
      base.emplace_back(std::move(w));
      teacher.emplace_back(std::move(wt));
    }
    x = random_matrix<double>(chain_batch, width, g);
    peft::matrix<double> h = x;
    for (const auto& t : teacher) {
      peft::matrix<double> next(chain_batch, width);
      t.matmul(peft::matrix_view<const double>(h.view()), next.view());
      h = std::move(next);
    }
    target = std::move(h);
  }
};

/// mean((y - target)^2) of the chain; with `grad`, every adapter's gradients are accumulated.
template <class A>
double chain_loss(const regression_problem& p, std::vector<A>& layers, bool grad) {
  std::vector<typename A::cache_type> caches(layers.size());
  std::vector<peft::matrix<double>> h{p.x};
  for (std::size_t l = 0; l < layers.size(); ++l) {
    peft::matrix<double> next(chain_batch, chain_width);
    layers[l].forward(p.base[l], h.back(), next, caches[l]);
    h.push_back(std::move(next));
  }
  const double n = static_cast<double>(chain_batch * chain_width);
  double loss = 0.0;
  peft::matrix<double> dy(chain_batch, chain_width);
  for (index i = 0; i < chain_batch; ++i) {
    for (index j = 0; j < chain_width; ++j) {
      const double e = h.back()(i, j) - p.target(i, j);
      loss += e * e / n;
      dy(i, j) = 2.0 * e / n;
    }
  }
  if (grad) {
    for (std::size_t l = layers.size(); l-- > 0;) {
      peft::matrix<double> dx(chain_batch, chain_width);
      layers[l].backward(p.base[l], h[l], dy, dx, caches[l]);
      dy = std::move(dx);
    }
  }
  return loss;
}

/// A training run on the regression problem: three student layers of A (width x width, made by
/// `make(l)` for l = 0, 1, 2), the problem REQUIREd non-trivial and the students' initial loss
/// REQUIREd large (the teacher's deltas matter; the students start as the identity).
template <class A>
struct chain_run {
  regression_problem problem;
  std::vector<A> layers;
  double initial = 0.0;

  template <class Make>
  chain_run(const std::array<index, 3>& teacher_ranks, std::uint64_t seed, Make&& make)
      : problem(teacher_ranks, seed) {
    REQUIRE(nontrivial(problem.x));
    REQUIRE(nontrivial(problem.target));
    for (std::uint64_t l = 0; l < 3; ++l) layers.push_back(make(l));
    initial = loss();
    REQUIRE(initial > 1e-2);
  }

  /// What a trainer takes: a pointer to every layer.
  std::vector<A*> pointers() { return {&layers[0], &layers[1], &layers[2]}; }
  /// The chain's loss (with `grad`, accumulating every layer's gradients).
  double loss(bool grad = false) { return chain_loss(problem, layers, grad); }

  /// `steps` full-batch steps: each zeroes every layer's gradients, accumulates the loss's and
  /// calls step(t, loss) for t = 1, 2, ... (the optimizer's and trainer's part).
  void train(int steps, const std::function<void(int, double)>& step) {
    for (int t = 1; t <= steps; ++t) {
      for (auto& l : layers) l.zero_grad();
      step(t, loss(true));
    }
  }
};

/// " r0 r1 ...": a trainer's per-layer ranks for a progress log.
inline std::string ranks_text(const std::vector<index>& ranks) {
  std::ostringstream s;
  for (index r : ranks) s << ' ' << r;
  return s.str();
}

/// The errors every trainer raises for its layer list (`ctor` the constructor's message
/// prefix): no layers, a null layer, a layer given twice; and no layers is a peft::error.
/// `make(list)` builds the trainer over two distinct layers a and b.
template <class A, class Make>
void check_layer_list_errors(const std::string& ctor, A& a, A& b, Make&& make) {
  CHECK_THROWS_WITH(make(std::vector<A*>{}), Catch::StartsWith(ctor) && Catch::Contains("no layers"));
  CHECK_THROWS_WITH(make(std::vector<A*>{&a, nullptr}), Catch::StartsWith(ctor) && Catch::Contains("layer 1 is null"));
  CHECK_THROWS_WITH(make(std::vector<A*>{&a, &b, &a}), Catch::StartsWith(ctor) && Catch::Contains("twice"));
  CHECK_THROWS_AS(make(std::vector<A*>{}), peft::error);
}

}  // namespace peft_test
