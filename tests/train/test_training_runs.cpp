// Short training runs, one per method: every adapter learns, through its own forward and
// backward and peft::train::adamw, to fit a small regression problem. A frozen random two-layer
// model y = relu(x W1^T + b1) W2^T + b2 (16 -> 32 -> 8) is the base; the target is the output of
// a perturbed copy of it (W1 and W2 each plus a rank-2 perturbation; over q4_0 and nf4 bases the
// quantization error is to be learned as well). The loss is the mean squared error over a fixed
// batch of 64 inputs; a run must bring it below a stated fraction of its initial value within a
// stated number of full-batch AdamW steps. The inputs are checked to be nontrivial: the initial
// loss is large and the adapted model starts out computing the base model (identity at init,
// where the method's init is an identity).
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/compacter.hpp"
#include "peft/adapters/dora.hpp"
#include "peft/adapters/lokr.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/shira.hpp"
#include "peft/adapters/vera.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/nf4.hpp"
#include "peft/base/q4_0.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/train/optimizer.hpp"
#include "support/test_support.hpp"

namespace test_training_runs {

namespace {

using peft::index;
using peft::matrix;
using peft::matrix_view;
using cview = matrix_view<const float>;

constexpr index d_in = 16, d_hidden = 32, d_out = 8, batch = 64;

/// The frozen model's weights, the inputs and the perturbed model's outputs.
struct problem {
  matrix<float> w1, b1, w2, b2;  // W1 (32, 16), b1 (1, 32), W2 (8, 32), b2 (1, 8)
  matrix<float> x;               // (64, 16)
  matrix<float> target;          // (64, 8)
};

/// w + sum of `rank` outer products u v^T with entries ~ N(0, scale^2 / cols).
matrix<float> perturbed(const matrix<float>& w, index rank, double scale, peft::rng& gen) {
  matrix<float> p = w;
  const double s = scale / std::sqrt(static_cast<double>(w.cols()));
  for (index k = 0; k < rank; ++k) {
    const matrix<float> u = peft_test::normal_matrix<float>(w.rows(), 1, gen, 1.0);
    const matrix<float> v = peft_test::normal_matrix<float>(1, w.cols(), gen, s);
    for (index i = 0; i < w.rows(); ++i) {
      for (index j = 0; j < w.cols(); ++j) p(i, j) += u(i, 0) * v(0, j);
    }
  }
  return p;
}

/// relu(x W1^T + b1) W2^T + b2, plain loops in double.
matrix<float> reference_forward(const matrix<float>& x, const matrix<float>& w1, const matrix<float>& b1,
                                const matrix<float>& w2, const matrix<float>& b2) {
  matrix<float> y(x.rows(), w2.rows());
  std::vector<double> h(static_cast<std::size_t>(w1.rows()));
  for (index n = 0; n < x.rows(); ++n) {
    for (index i = 0; i < w1.rows(); ++i) {
      double s = b1(0, i);
      for (index j = 0; j < x.cols(); ++j) s += static_cast<double>(x(n, j)) * w1(i, j);
      h[static_cast<std::size_t>(i)] = std::max(s, 0.0);
    }
    for (index i = 0; i < w2.rows(); ++i) {
      double s = b2(0, i);
      for (index j = 0; j < w1.rows(); ++j) s += h[static_cast<std::size_t>(j)] * w2(i, j);
      y(n, i) = static_cast<float>(s);
    }
  }
  return y;
}

problem make_problem(std::uint64_t seed) {
  peft::rng gen(seed);
  problem p;
  p.w1 = peft_test::normal_matrix<float>(d_hidden, d_in, gen, 1.0 / std::sqrt(double(d_in)));
  p.b1 = peft_test::normal_matrix<float>(1, d_hidden, gen, 0.1);
  p.w2 = peft_test::normal_matrix<float>(d_out, d_hidden, gen, 1.0 / std::sqrt(double(d_hidden)));
  p.b2 = peft_test::normal_matrix<float>(1, d_out, gen, 0.1);
  p.x = peft_test::normal_matrix<float>(batch, d_in, gen, 1.0);
  p.target = reference_forward(p.x, perturbed(p.w1, 2, 0.6, gen), p.b1, perturbed(p.w2, 2, 0.6, gen), p.b2);
  return p;
}

double mean_square(cview a, cview b) {
  double s = 0.0;
  for (index i = 0; i < a.rows(); ++i) {
    for (index j = 0; j < a.cols(); ++j) s += std::pow(static_cast<double>(a(i, j)) - b(i, j), 2);
  }
  return s / static_cast<double>(a.size());
}

template <class Base>
Base frozen(const matrix<float>& w, const matrix<float>& b) {
  if constexpr (std::is_same_v<Base, peft::dense<float>>) {
    return peft::dense<float>::from(w.view(), b.data());
  } else {
    return Base::quantize(w.view(), b.data());
  }
}

/// The two frozen layers with adapters, relu between, trained on the problem.
template <class Base, class Adapter>
struct two_layer_model {
  peft::adapted_linear<Base, Adapter> fc1, fc2;
  matrix<float> z, h, y;  // (batch, 32) before and after relu, (batch, 8)

  template <class Make>
  two_layer_model(const problem& p, Make&& make)
      : fc1(frozen<Base>(p.w1, p.b1)), fc2(frozen<Base>(p.w2, p.b2)), z(batch, d_hidden), h(batch, d_hidden),
        y(batch, d_out) {
    fc1.add_adapter("default", make(fc1.base(), 0));
    fc2.add_adapter("default", make(fc2.base(), 1));
  }
  cview forward(cview x) {
    fc1.forward(x, z.view());
    for (index k = 0; k < z.size(); ++k) h.data()[k] = std::max(z.data()[k], 0.0f);
    fc2.forward(h.view(), y.view());
    return y.view();
  }
  void backward(cview x, cview dy) {
    matrix<float> dh(batch, d_hidden), dx(batch, d_in);
    fc2.backward(h.view(), dy, dh.view());
    for (index k = 0; k < dh.size(); ++k) dh.data()[k] *= z.data()[k] > 0.0f ? 1.0f : 0.0f;
    fc1.backward(x, dh.view(), dx.view());
  }
  std::vector<peft::parameter<float>> parameters() {
    auto all = fc1.parameters(), second = fc2.parameters();
    all.insert(all.end(), second.begin(), second.end());
    return all;
  }
  void zero_grad() {
    fc1.zero_grad();
    fc2.zero_grad();
  }
};

struct fit_result {
  double base_loss;   // the frozen base model's loss (before any adapter)
  double initial;     // the adapted model's loss before training
  double final_loss;  // after the last step
};

/// Full-batch AdamW (weight decay 0) for `steps` steps on the MSE; make(base, layer) builds the
/// adapter of each layer.
template <class Base, class Adapter, class Make>
fit_result fit(const problem& p, Make&& make, double lr, int steps) {
  two_layer_model<Base, Adapter> model(p, make);
  const cview x = p.x.view(), t = p.target.view();
  fit_result r{};
  {
    peft::adapted_linear<Base, Adapter> b1(frozen<Base>(p.w1, p.b1)), b2(frozen<Base>(p.w2, p.b2));
    matrix<float> z(batch, d_hidden), y(batch, d_out);
    b1.forward(x, z.view());
    for (auto& v : z.storage()) v = std::max(v, 0.0f);
    b2.forward(z.view(), y.view());
    r.base_loss = mean_square(y.view(), t);
  }
  peft::train::adamw<float> optimizer(model.parameters(), {.lr = lr, .weight_decay = 0.0});
  matrix<float> dy(batch, d_out);
  for (int step = 0; step <= steps; ++step) {
    const cview y = model.forward(x);
    const double loss = mean_square(y, t);
    if (step == 0) r.initial = loss;
    r.final_loss = loss;
    if (step == steps) break;
    for (index i = 0; i < batch; ++i) {
      for (index j = 0; j < d_out; ++j) dy(i, j) = static_cast<float>(2.0 * (y(i, j) - t(i, j)) / double(batch * d_out));
    }
    model.zero_grad();
    model.backward(x, dy.view());
    optimizer.step(model.parameters());  // re-fetched: DoRA recomputes its norms
  }
  return r;
}

/// The checks every run shares: a nontrivial problem, and the loss below `fraction` of its start.
void check_fit(const fit_result& r, double fraction, bool identity_at_init = true) {
  INFO("base loss " << r.base_loss << ", initial " << r.initial << ", final " << r.final_loss);
  REQUIRE(r.base_loss > 0.05);  // the perturbation matters: not a vacuous fit
  if (identity_at_init) CHECK(r.initial == Approx(r.base_loss).epsilon(1e-5));
  CHECK(std::isfinite(r.final_loss));
  CHECK(r.final_loss < fraction * r.initial);
}

template <class Base>
peft::lora<float> make_lora(const Base& base, int layer) {
  return peft::lora<float>(base.in_features(), base.out_features(),
                           {.rank = 4, .alpha = 8.0, .seed = 10 + std::uint64_t(layer)});
}

}  // namespace

TEST_CASE("training runs: the inputs are nontrivial", "[train][runs]") {
  const problem p = make_problem(1);
  double x_norm = 0.0;
  for (float v : p.x.storage()) x_norm += double(v) * v;
  CHECK(x_norm > 0.5 * double(p.x.size()));  // x ~ N(0, 1): about one per entry
  const matrix<float> base = reference_forward(p.x, p.w1, p.b1, p.w2, p.b2);
  CHECK(mean_square(base.view(), p.target.view()) > 0.05);
  double t_norm = 0.0;
  for (float v : p.target.storage()) t_norm += double(v) * v;
  CHECK(t_norm > 0.1 * double(p.target.size()));
}

TEST_CASE("training runs: LoRA", "[train][runs][lora]") {
  const problem p = make_problem(1);
  check_fit(fit<peft::dense<float>, peft::lora<float>>(p, make_lora<peft::dense<float>>, 1e-2, 150), 0.05);
}

TEST_CASE("training runs: DoRA", "[train][runs][dora]") {
  const problem p = make_problem(1);
  const auto r = fit<peft::dense<float>, peft::dora<float>>(
      p,
      [](const peft::dense<float>& base, int layer) {
        return peft::dora<float>(base, {.rank = 4, .alpha = 8.0, .seed = 20 + std::uint64_t(layer)});
      },
      1e-2, 150);
  check_fit(r, 0.05);
}

TEST_CASE("training runs: VeRA (projections shared by both layers)", "[train][runs][vera]") {
  const problem p = make_problem(1);
  const auto projections = peft::make_vera_projections<float>(64, {{d_in, d_hidden}, {d_hidden, d_out}}, 3);
  const auto r = fit<peft::dense<float>, peft::vera<float>>(
      p,
      [&](const peft::dense<float>& base, int /*layer*/) {
        return peft::vera<float>(projections, base.in_features(), base.out_features());
      },
      3e-2, 300);
  check_fit(r, 0.3);
}

TEST_CASE("training runs: SHiRA (random mask)", "[train][runs][shira]") {
  const problem p = make_problem(1);
  const auto r = fit<peft::dense<float>, peft::shira<float>>(
      p,
      [](const peft::dense<float>& base, int layer) {
        return peft::shira<float>(base.in_features(), base.out_features(),
                                  {.rank = 4, .seed = 30 + std::uint64_t(layer)});
      },
      1e-2, 200);
  check_fit(r, 0.15);
}

TEST_CASE("training runs: Compacter (serial, one rule for both layers)", "[train][runs][compacter]") {
  const problem p = make_problem(1);
  const auto rule = peft::make_phm_rule<float>(2, 1e-4, 4);
  const auto r = fit<peft::dense<float>, peft::compacter<float>>(
      p,
      [&](const peft::dense<float>& base, int layer) {
        return peft::compacter<float>(base.in_features(), base.out_features(), rule,
                                      {.n = 2, .reduction_factor = 2, .seed = 40 + std::uint64_t(layer)});
      },
      1e-2, 300);
  check_fit(r, 0.3, /*identity_at_init=*/false);  // the paper's near-identity init
  CHECK(r.initial == Approx(r.base_loss).epsilon(1e-2));
}

TEST_CASE("training runs: LoKr", "[train][runs][lokr]") {
  const problem p = make_problem(1);
  const auto r = fit<peft::dense<float>, peft::lokr<float>>(
      p,
      [](const peft::dense<float>& base, int layer) {
        return peft::lokr<float>(base.in_features(), base.out_features(),
                                 {.rank = 8, .alpha = 8.0, .decompose_factor = 2, .seed = 50 + std::uint64_t(layer)});
      },
      1e-2, 200);
  check_fit(r, 0.3);
}

TEST_CASE("training runs: LoRA over a q4_0 base (QLoRA)", "[train][runs][lora][q4_0]") {
  const problem p = make_problem(1);
  check_fit(fit<peft::q4_0, peft::lora<float>>(p, make_lora<peft::q4_0>, 1e-2, 150), 0.05);
}

TEST_CASE("training runs: LoRA over an nf4 base (QLoRA)", "[train][runs][lora][nf4]") {
  const problem p = make_problem(1);
  check_fit(fit<peft::nf4, peft::lora<float>>(p, make_lora<peft::nf4>, 1e-2, 150), 0.05);
}

}  // namespace test_training_runs
