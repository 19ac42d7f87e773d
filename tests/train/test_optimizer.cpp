// Optimizers (train/optimizer.hpp), gradient clipping (train/clip.hpp) and schedules
// (train/schedule.hpp): AdamW against torch.optim.AdamW on PEFT's float64 training traces,
// AdamW and SGD against hand-computed steps and torch's values, parameter groups, shared
// tensors, clipping, schedules, state save/restore and errors.
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/dora.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/train/clip.hpp"
#include "peft/train/loraplus.hpp"
#include "peft/train/optimizer.hpp"
#include "peft/train/schedule.hpp"
#include "support/file_support.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_optimizer {

namespace {

namespace train = peft::train;
using peft_test::message_of;

// ---- the two-layer golden model ---------------------------------------------------------------

/// Every parameter of both layers, named "<layer>.<adapter>.<parameter>"; fetched anew for each
/// step (DoRA's norms are recomputed after parameters() is called).
template <class A>
std::vector<peft::parameter<typename A::scalar>> model_parameters(peft_test::golden_case<A>& c) {
  std::vector<peft::parameter<typename A::scalar>> all;
  for (const std::string layer : {"up", "down"}) {
    for (auto p : c.layer(layer).parameters()) {
      p.name = layer + "." + p.name;
      all.push_back(std::move(p));
    }
  }
  return all;
}

/// The loss mean((y - target)^2) of y = down(relu(up(x))); every gradient written (zeroed first).
template <class A>
double forward_backward(peft_test::golden_case<A>& c, const peft::matrix<double>& x, const peft::matrix<double>& target) {
  using T = typename A::scalar;
  peft::matrix<T> h(x.rows(), c.up.out_features()), a(x.rows(), c.up.out_features());
  peft::matrix<T> y(x.rows(), c.down.out_features());
  c.up.forward(x, h);
  for (peft::index i = 0; i < h.rows(); ++i)
    for (peft::index j = 0; j < h.cols(); ++j) a(i, j) = h(i, j) > 0 ? h(i, j) : T{0};
  c.down.forward(a, y);
  const double n = static_cast<double>(y.size());
  double loss = 0.0;
  peft::matrix<T> gy(y.rows(), y.cols());
  for (peft::index i = 0; i < y.rows(); ++i) {
    for (peft::index j = 0; j < y.cols(); ++j) {
      const double d = static_cast<double>(y(i, j)) - target(i, j);
      loss += d * d;
      gy(i, j) = static_cast<T>(2.0 * d / n);
    }
  }
  c.up.zero_grad();
  c.down.zero_grad();
  peft::matrix<T> da(a.rows(), a.cols()), dx(x.rows(), x.cols());
  c.down.backward(a, gy, da);
  for (peft::index i = 0; i < da.rows(); ++i)
    for (peft::index j = 0; j < da.cols(); ++j) da(i, j) = h(i, j) > 0 ? da(i, j) : T{0};
  c.up.backward(x, da, dx);
  return loss / n;
}

/// PEFT's full name of parameter "<layer>.default.<name>": lora_A.weight -> lora_A.default.weight,
/// lora_magnitude_vector -> lora_magnitude_vector.default.weight.
std::string peft_name(const std::string& ours) {
  const auto layer_end = ours.find('.');
  const std::string layer = ours.substr(0, layer_end);
  const std::string rest = ours.substr(ours.find('.', layer_end + 1) + 1);  // after "<layer>.default."
  const auto dot = rest.find('.');
  std::string full = "base_model.model.";
  full += layer;
  full += '.';
  if (dot == std::string::npos) {
    full += rest;
    full += ".default.weight";
  } else {
    full += rest.substr(0, dot);
    full += ".default";
    full += rest.substr(dot);
  }
  return full;
}

/// Three AdamW steps (lr=1e-2 betas=(0.9,0.999) eps=1e-8 weight_decay=0.01, as every trace's
/// case.json or script says) against the trace `file` of case `name`; LoRA+'s groups with
/// `loraplus` (trace_loraplus.safetensors: scripts/make_loraplus_trace.py, PEFT's
/// create_loraplus_optimizer with loraplus_lr_ratio 16).
template <class A>
void check_trace(const std::string& name, const std::string& file = "trace.safetensors", bool loraplus = false) {
  INFO("case " << name << ", " << file);
  peft_test::golden_case<A> c(name);
  const auto trace = peft::io::safetensors_file::open(peft_test::golden_dir(name) / file);
  const auto x = trace.read_matrix<double>("x");
  const auto target = trace.read_matrix<double>("target");
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(target));
  // case.json: torch.optim.AdamW lr=1e-2 betas=(0.9,0.999) eps=1e-8 weight_decay=0.01.
  const train::adamw_options o{.lr = 1e-2, .betas = {0.9, 0.999}, .eps = 1e-8, .weight_decay = 0.01};
  train::adamw<double> opt(model_parameters(c), o,
                           loraplus ? train::loraplus_groups<double>(o, {.lr_ratio = 16.0})
                                    : std::vector<train::param_group<double, train::adamw_options>>{});
  REQUIRE(opt.size() == model_parameters(c).size());
  for (int k = 0; k < 3; ++k) {
    INFO("step " << k);
    // loss.k: the loss before update k; step<k>.*: the parameters after it.
    const double loss = forward_backward(c, x, target);
    const double loss_ref = trace.read<double>("loss." + std::to_string(k))[0];
    CHECK(std::abs(loss - loss_ref) <= 1e-12 * std::abs(loss_ref));
    std::vector<peft::matrix<double>> before;
    for (const auto& p : model_parameters(c)) before.push_back(peft_test::to_double(p.value));
    opt.step(model_parameters(c));
    std::size_t checked = 0, i = 0;
    for (const auto& p : model_parameters(c)) {
      INFO("parameter " << p.name);
      const auto ref = trace.read_matrix<double>("step" + std::to_string(k) + "." + peft_name(p.name));
      CHECK(peft_test::rel_error(p.value, ref) < 1e-12);
      CHECK(peft_test::rel_error(before[i++], ref) > 1e-4);  // the step moved it: not vacuous
      ++checked;
    }
    std::size_t in_trace = 0;
    for (const auto& t : trace.tensors()) in_trace += t.name.starts_with("step" + std::to_string(k) + ".") ? 1 : 0;
    CHECK(checked == in_trace);
  }
  CHECK(opt.steps() == 3);
}

// ---- small hand-made parameters ---------------------------------------------------------------

/// A parameter's storage: value, gradient, logical shape.
template <class T>
struct tensor {
  peft::matrix<T> value, grad;
  std::vector<std::int64_t> shape;
  tensor(peft::index rows, peft::index cols, std::vector<T> v)
      : value(rows, cols, std::move(v)), grad(rows, cols),
        shape(rows == 1 ? std::vector<std::int64_t>{cols} : std::vector<std::int64_t>{rows, cols}) {}
  peft::parameter<T> param(std::string name) { return {std::move(name), value.view(), grad.view(), shape}; }
  void set_grad(const std::vector<T>& g) { grad.storage() = g; }
};

/// |a - b| <= tol |b| for every element (tol absolute where b is 0).
template <class T>
bool close(const std::vector<T>& a, const std::vector<double>& b, double tol) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(static_cast<double>(a[i]) - b[i]);
    if (!(d <= tol * std::max(std::abs(b[i]), 1e-300))) return false;
  }
  return true;
}

template <class T>
bool bit_equal(const peft::matrix<T>& a, const peft::matrix<T>& b) {
  return peft_test::bitwise_equal(peft::matrix_view<const T>(a.view()), peft::matrix_view<const T>(b.view()));
}

/// Checks f throws E whose message starts with "[where]".
template <class E, class F>
void check_throws(F&& f, const std::string& where) {
  try {
    f();
    FAIL("expected an exception from [" << where << "]");
  } catch (const E& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).rfind("[" + where + "]", 0) == 0);
  }
}

const std::vector<double> p0{0.5, -1.25, 2.0, 0.125, -0.75};
const std::vector<std::vector<double>> grads{
    {0.3, -0.2, 0.05, 1.5, -0.7}, {-0.1, 0.4, 0.02, 1.2, 0.9}, {0.25, -0.3, -0.06, -0.8, 0.1}};

template <class T>
std::vector<T> as(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <class T>
constexpr double tol() {
  return std::is_same_v<T, double> ? 1e-15 : 1e-6;
}

/// AdamW by the closed form (no FMA, moments as b m + (1 - b) g), in double.
std::vector<std::vector<double>> adamw_by_hand(const train::adamw_options& o) {
  std::vector<double> p = p0, m(p.size()), v(p.size()), vmax(p.size());
  std::vector<std::vector<double>> out;
  for (std::size_t t = 1; t <= grads.size(); ++t) {
    const auto& g = grads[t - 1];
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1 - o.lr * o.weight_decay;
      m[i] = o.betas[0] * m[i] + (1 - o.betas[0]) * g[i];
      v[i] = o.betas[1] * v[i] + (1 - o.betas[1]) * g[i] * g[i];
      vmax[i] = std::max(vmax[i], v[i]);
      const double bc1 = 1 - std::pow(o.betas[0], static_cast<double>(t));
      const double bc2 = 1 - std::pow(o.betas[1], static_cast<double>(t));
      const double vhat = (o.amsgrad ? vmax[i] : v[i]) / bc2;
      p[i] -= o.lr * (m[i] / bc1) / (std::sqrt(vhat) + o.eps);
    }
    out.push_back(p);
  }
  return out;
}

/// SGD by the closed form, in double.
std::vector<std::vector<double>> sgd_by_hand(const train::sgd_options& o) {
  std::vector<double> p = p0, buf(p.size());
  std::vector<std::vector<double>> out;
  for (std::size_t t = 0; t < grads.size(); ++t) {
    for (std::size_t i = 0; i < p.size(); ++i) {
      double d = grads[t][i] + o.weight_decay * p[i];
      if (o.momentum != 0) {
        buf[i] = t == 0 ? d : o.momentum * buf[i] + (1 - o.dampening) * d;
        d = o.nesterov ? d + o.momentum * buf[i] : buf[i];
      }
      p[i] -= o.lr * d;
    }
    out.push_back(p);
  }
  return out;
}

/// Runs an optimizer over one (1, 5) tensor from p0 with `grads`; the values after each step.
template <class Opt, class Options>
std::vector<std::vector<typename Opt::scalar>> run_small(const Options& o) {
  using T = typename Opt::scalar;
  tensor<T> t(1, 5, as<T>(p0));
  Opt opt(std::vector{t.param("w")}, o);
  std::vector<std::vector<T>> out;
  for (const auto& g : grads) {
    t.set_grad(as<T>(g));
    opt.step();
    out.push_back(t.value.storage());
  }
  return out;
}

std::vector<double> from_hex(std::initializer_list<double> v) { return std::vector<double>(v); }

std::filesystem::path scratch(const std::string& stem) { return peft_test::process_scratch() / ("optimizer_" + stem); }

}  // namespace

// ---- AdamW against PyTorch ----------------------------------------------------------------------

TEST_CASE("adamw equals torch.optim.AdamW on the PEFT training traces", "[optimizer][golden]") {
  SECTION("lora") { check_trace<peft::lora<double>>("lora"); }
  SECTION("dora") { check_trace<peft::dora<double>>("dora"); }
  // LoRA+: B (and the 1-D magnitude) at 16x the lr; lora_B's bias also without weight decay.
  SECTION("lora+ with lora_B's bias") { check_trace<peft::lora<double>>("lora_bias", "trace_loraplus.safetensors", true); }
  SECTION("lora+ dora") { check_trace<peft::dora<double>>("dora", "trace_loraplus.safetensors", true); }
}

TEST_CASE("loraplus_groups: PEFT's grouping, and its errors", "[optimizer][loraplus]") {
  peft_test::golden_case<peft::lora<double>> c("lora_bias");
  const train::adamw_options o{.lr = 1e-3, .weight_decay = 0.05};
  const auto groups = train::loraplus_groups<double>(o, {.lr_ratio = 4.0, .embedding_lr = 1e-5});
  REQUIRE(groups.size() == 3);
  std::size_t a = 0, b = 0, b_bias = 0;
  for (const auto& p : model_parameters(c)) {
    if (groups[1].select(p)) {
      ++b_bias;
      CHECK(p.name.ends_with("lora_B.bias"));
    } else if (groups[2].select(p)) {
      ++b;
      CHECK(p.name.ends_with("lora_B.weight"));
    } else {
      ++a;
      CHECK(!groups[0].select(p));
    }
  }
  CHECK((a == 2 && b == 2 && b_bias == 2));
  CHECK(groups[0].options.lr == 1e-5);
  CHECK((groups[1].options.lr == 4e-3 && groups[1].options.weight_decay == 0.0));
  CHECK((groups[2].options.lr == 4e-3 && groups[2].options.weight_decay == 0.05));
  CHECK_THROWS_WITH((train::loraplus_groups<double>(o, {.lr_ratio = 0.0})),
                    Catch::Contains("loraplus_groups") && Catch::Contains("lr_ratio"));
  CHECK_THROWS_WITH((train::loraplus_groups<double>(o, {.lr_ratio = 2.0, .embedding_lr = -1.0})),
                    Catch::Contains("embedding_lr"));
}

TEST_CASE("adamw and sgd equal torch's values on a small tensor", "[optimizer]") {
  // torch 2.15 (CPU, float64), p0 and grads above; Python's float.hex() of the values after
  // each of three steps.
  const std::vector<std::vector<double>> adamw_ams{
      from_hex({0x1.ca3d7bd324593p-2, -0x1.31999dcb5621fp+0, 0x1.f0a3e7d11f13fp+0, 0x1.30a3dffce3402p-4, -0x1.647ae3ad3ef20p-1}),
      from_hex({0x1.b61aa6a419c5fp-2, -0x1.3575fc69eced1p+0, 0x1.e2ee9d96ac766p+0, 0x1.97e2f9c2f0244p-6, -0x1.68b112b040403p-1}),
      from_hex({0x1.933f8bb9d535cp-2, -0x1.3217c905fd338p+0, 0x1.e1de5f8a3393fp+0, 0x1.71124a71cc808p-8, -0x1.6ccc7b9f1b801p-1})};
  const std::vector<std::vector<double>> adamw_plain{
      from_hex({0x1.ca3d70c0791e0p-2, -0x1.319999a456610p+0, 0x1.f0a3d735308ddp+0, 0x1.30a3d72125808p-4, -0x1.647ae14dd0cf9p-1}),
      from_hex({0x1.bc4050050d91bp-2, -0x1.370bd64d263f5p+0, 0x1.e3723a6e186dep+0, 0x1.a048097c4375cp-6, -0x1.6c299019159f7p-1}),
      from_hex({0x1.984e7be7278b0p-2, -0x1.32bdd6e972ab2p+0, 0x1.e532abad871bdp+0, 0x1.f5e35674cfd5ep-7, -0x1.722b4ed79084ap-1})};
  const std::vector<std::vector<double>> sgd_nesterov{
      from_hex({0x1.c4a8c154c985fp-2, -0x1.35a9fbe76c8b4p+0, 0x1.fc985f06f6944p+0, -0x1.482a9930be0dfp-3, -0x1.3b2ca57a786c2p-1}),
      from_hex({0x1.bdf50cdcdd3b3p-2, -0x1.44200f9fb0341p+0, 0x1.f9345d54c4d35p+0, -0x1.04e1adfaa4a16p-1, -0x1.74c93fb9ff3fcp-1}),
      from_hex({0x1.7da128abb3566p-2, -0x1.38fec640dfcdcp+0, 0x1.f907aec25eceap+0, -0x1.204bb23a7279dp-1, -0x1.8877d1f9e41edp-1})};
  const std::vector<std::vector<double>> sgd_dampening{
      from_hex({0x1.e0c49ba5e353fp-2, -0x1.3a8f5c28f5c29p+0, 0x1.fe353f7ced917p+0, -0x1.9ba5e353f7cefp-6, -0x1.5bc6a7ef9db23p-1}),
      from_hex({0x1.cb7d9c0d11607p-2, -0x1.3c9c9f72f76e6p+0, 0x1.fbe13107dfc86p+0, -0x1.f42991c9c17fap-3, -0x1.5b2fdc669dc3dp-1}),
      from_hex({0x1.a61973448b6c4p-2, -0x1.38dc5dd7df6b0p+0, 0x1.fa80fad881119p+0, -0x1.8a7ae19a562e7p-2, -0x1.5dff6ef8dd274p-1})};
  const auto check = [](const auto& got, const std::vector<std::vector<double>>& want) {
    for (std::size_t k = 0; k < want.size(); ++k) {
      INFO("step " << k);
      CHECK(close(got[k], want[k], 1e-15));
    }
  };
  check(run_small<train::adamw<double>>(train::adamw_options{
            .lr = 0.05, .betas = {0.8, 0.99}, .eps = 1e-6, .weight_decay = 0.1, .amsgrad = true}),
        adamw_ams);
  check(run_small<train::adamw<double>>(train::adamw_options{.lr = 0.05, .betas = {0.6, 0.9}, .weight_decay = 0.1}),
        adamw_plain);
  check(run_small<train::sgd<double>>(train::sgd_options{.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01, .nesterov = true}),
        sgd_nesterov);
  check(run_small<train::sgd<double>>(train::sgd_options{.lr = 0.1, .momentum = 0.9, .dampening = 0.3, .weight_decay = 0.01}),
        sgd_dampening);
}

// ---- hand-computed steps -----------------------------------------------------------------------

TEMPLATE_TEST_CASE("sgd equals hand-computed steps", "[optimizer]", float, double) {
  using T = TestType;
  const std::vector<train::sgd_options> cases{
      {.lr = 0.1},
      {.lr = 0.1, .weight_decay = 0.05},
      {.lr = 0.1, .momentum = 0.9},
      {.lr = 0.05, .momentum = 0.8, .dampening = 0.25, .weight_decay = 0.01},
      {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01, .nesterov = true},
  };
  for (const auto& o : cases) {
    INFO("lr " << o.lr << " momentum " << o.momentum << " dampening " << o.dampening << " wd " << o.weight_decay
               << " nesterov " << o.nesterov);
    const auto got = run_small<train::sgd<T>>(o);
    const auto want = sgd_by_hand(o);
    for (std::size_t k = 0; k < want.size(); ++k) {
      INFO("step " << k);
      CHECK(close(got[k], want[k], tol<T>()));
    }
  }
}

TEMPLATE_TEST_CASE("adamw equals hand-computed steps", "[optimizer]", float, double) {
  using T = TestType;
  const std::vector<train::adamw_options> cases{
      {},
      {.lr = 0.05, .betas = {0.8, 0.99}, .eps = 1e-6, .weight_decay = 0.1},
      {.lr = 0.05, .betas = {0.8, 0.99}, .eps = 1e-6, .weight_decay = 0.1, .amsgrad = true},
      {.lr = 0.01, .betas = {0.0, 0.5}, .weight_decay = 0.0},
      {.lr = 0.02, .betas = {0.7, 0.0}},  // lerp weight >= 0.5: torch's other branch
  };
  for (const auto& o : cases) {
    INFO("lr " << o.lr << " betas " << o.betas[0] << ", " << o.betas[1] << " eps " << o.eps << " wd "
               << o.weight_decay << " amsgrad " << o.amsgrad);
    const auto got = run_small<train::adamw<T>>(o);
    const auto want = adamw_by_hand(o);
    for (std::size_t k = 0; k < want.size(); ++k) {
      INFO("step " << k);
      CHECK(close(got[k], want[k], std::is_same_v<T, double> ? 1e-14 : 1e-5));
    }
  }
}

TEST_CASE("adamw keeps torch's state: moments, step counts, amsgrad's maximum", "[optimizer]") {
  tensor<double> t(1, 5, p0);
  train::adamw<double> opt(std::vector{t.param("w")}, {.lr = 0.05, .betas = {0.8, 0.99}, .amsgrad = true});
  CHECK(opt.state(0, "exp_avg").empty());
  t.set_grad(grads[0]);
  opt.step();
  t.set_grad(grads[1]);
  opt.step();
  CHECK(opt.tensor_steps(0) == 2);
  CHECK(opt.steps() == 2);
  for (std::size_t i = 0; i < 5; ++i) {
    const auto idx = static_cast<peft::index>(i);
    const double m = 0.2 * 0.8 * grads[0][i] + 0.2 * grads[1][i];
    const double v = 0.01 * 0.99 * grads[0][i] * grads[0][i] + 0.01 * grads[1][i] * grads[1][i];
    CHECK(opt.state(0, "exp_avg")(0, idx) == Approx(m).epsilon(1e-14));
    CHECK(opt.state(0, "exp_avg_sq")(0, idx) == Approx(v).epsilon(1e-14));
    CHECK(opt.state(0, "max_exp_avg_sq")(0, idx) ==
          Approx(std::max(v, 0.01 * grads[0][i] * grads[0][i])).epsilon(1e-14));
  }
  check_throws<peft::error>([&] { (void)opt.state(0, "momentum_buffer"); }, "adamw::state");
  check_throws<peft::error>([&] { (void)opt.state(1, "exp_avg"); }, "adamw::state");
}

// ---- what is stepped ---------------------------------------------------------------------------

TEST_CASE("parameter groups have their own lr, weight decay and betas", "[optimizer]") {
  SECTION("sgd: SoRA's gates by name, with their own lr and no decay") {
    tensor<double> a(2, 2, {1.0, 2.0, -1.0, 0.5}), gate(1, 2, {0.25, -0.75});
    a.set_grad({0.1, -0.2, 0.3, 0.4});
    gate.set_grad({1.0, -2.0});
    train::sgd<double> opt(std::vector{a.param("up.default.lora_A.weight"), gate.param("up.default.lora_gate")},
                           {.lr = 0.01, .weight_decay = 0.1},
                           {{.name = "gates", .select = train::name_contains{"lora_gate"}, .options = {.lr = 0.5}}});
    REQUIRE(opt.groups().size() == 2);
    CHECK(opt.groups()[0].name == "default");
    CHECK(opt.groups()[1].name == "gates");
    CHECK(opt.group_of(0) == 0);
    CHECK(opt.group_of(1) == 1);
    CHECK(opt.lr("gates") == 0.5);
    opt.step();
    CHECK(close(a.value.storage(), {1.0 - 0.01 * (0.1 + 0.1 * 1.0), 2.0 - 0.01 * (-0.2 + 0.1 * 2.0),
                                    -1.0 - 0.01 * (0.3 - 0.1), 0.5 - 0.01 * (0.4 + 0.1 * 0.5)},
                1e-15));
    CHECK(close(gate.value.storage(), {0.25 - 0.5 * 1.0, -0.75 + 0.5 * 2.0}, 1e-15));
    // Options are changed through options(); step() uses them.
    opt.options("gates").lr = 0.0;
    opt.step();
    CHECK(close(gate.value.storage(), {-0.25, 0.25}, 1e-15));
    check_throws<peft::error>([&] { (void)opt.options("nope"); }, "sgd::options");
  }
  SECTION("adamw: a group equals a separate optimizer with the group's options") {
    peft::rng gen(5);
    tensor<double> a(3, 4, peft_test::random_vector<double>(12, gen)), m(1, 4, peft_test::random_vector<double>(4, gen));
    tensor<double> a2 = a, m2 = m;
    const train::adamw_options base{.lr = 0.01, .weight_decay = 0.05};
    const train::adamw_options mag{.lr = 0.03, .betas = {0.5, 0.9}, .weight_decay = 0.0};
    train::adamw<double> grouped(std::vector{a.param("x.lora_A.weight"), m.param("x.lora_magnitude_vector")}, base,
                                 {{.name = "magnitude",
                                   .select = [](const peft::parameter<double>& p) { return p.shape.size() == 1; },
                                   .options = mag}});
    train::adamw<double> alone_a(std::vector{a2.param("x.lora_A.weight")}, base);
    train::adamw<double> alone_m(std::vector{m2.param("x.lora_magnitude_vector")}, mag);
    for (int k = 0; k < 3; ++k) {
      const auto ga = peft_test::random_vector<double>(12, gen), gm = peft_test::random_vector<double>(4, gen);
      a.set_grad(ga);
      a2.set_grad(ga);
      m.set_grad(gm);
      m2.set_grad(gm);
      grouped.step();
      alone_a.step();
      alone_m.step();
    }
    CHECK(bit_equal(a.value, a2.value));
    CHECK(bit_equal(m.value, m2.value));
    CHECK_FALSE(bit_equal(a.value, tensor<double>(3, 4, std::vector<double>(12)).value));
  }
}

TEST_CASE("a shared tensor is stepped once; frozen, integer and gradient-less ones never", "[optimizer]") {
  tensor<double> shared(2, 2, {1.0, 2.0, 3.0, 4.0}), own1(1, 2, {1.0, 1.0}), own2(1, 2, {2.0, 2.0});
  tensor<double> frozen(1, 2, {5.0, 5.0}), ints(1, 2, {7.0, 8.0});
  for (auto* t : {&shared, &own1, &own2, &frozen, &ints}) t->set_grad(std::vector<double>(t->value.size(), 1.0));
  auto f = frozen.param("down.frozen");
  f.trainable = false;
  auto i = ints.param("down.indices");
  i.integer = true;
  peft::parameter<double> no_grad{"down.no_grad", own2.value.view(), {}, own2.shape};
  // Compacter's rule: listed by every layer, one memory and one gradient.
  std::vector<peft::parameter<double>> params{shared.param("up.default.phm_rule"), own1.param("up.default.bias"),
                                              shared.param("down.default.phm_rule"), own2.param("down.default.bias"),
                                              f, i, no_grad};
  train::sgd<double> opt(params, {.lr = 0.1});
  REQUIRE(opt.size() == 3);
  CHECK(opt.name(0) == "up.default.phm_rule");
  CHECK(opt.name(2) == "down.default.bias");
  opt.step();
  CHECK(close(shared.value.storage(), {0.9, 1.9, 2.9, 3.9}, 1e-15));  // once, not twice
  CHECK(close(own1.value.storage(), {0.9, 0.9}, 1e-15));
  CHECK(close(own2.value.storage(), {1.9, 1.9}, 1e-15));
  CHECK(frozen.value.storage() == std::vector<double>{5.0, 5.0});
  CHECK(ints.value.storage() == std::vector<double>{7.0, 8.0});
  opt.zero_grad();
  CHECK(shared.grad.storage() == std::vector<double>(4, 0.0));
  CHECK(frozen.grad.storage() == std::vector<double>(2, 1.0));  // not the optimizer's

  // One memory with two gradients (or two shapes) is not a shared tensor but a mistake.
  tensor<double> other(2, 2, {0, 0, 0, 0});
  peft::parameter<double> alias{"down.alias", shared.value.view(), other.grad.view(), shared.shape};
  check_throws<peft::shape_error>([&] { train::sgd<double>(std::vector{shared.param("a"), alias}); }, "sgd::sgd");
}

TEST_CASE("step(params) rebinds to fresh views of the same tensors", "[optimizer]") {
  tensor<double> a(1, 3, {1, 2, 3}), b(1, 3, {4, 5, 6});
  a.set_grad({1, 1, 1});
  b.set_grad({1, 1, 1});
  train::sgd<double> opt(std::vector{a.param("a")}, {.lr = 0.5});
  tensor<double> moved = a;  // the same tensor, now elsewhere in memory
  opt.step(std::vector{moved.param("a")});
  CHECK(moved.value.storage() == std::vector<double>{0.5, 1.5, 2.5});
  CHECK(a.value.storage() == std::vector<double>{1, 2, 3});
  check_throws<peft::shape_error>([&] { opt.step(std::vector{b.param("b")}); }, "sgd::step");
  check_throws<peft::shape_error>([&] { opt.rebind(std::vector{a.param("a"), b.param("b")}); }, "sgd::rebind");
  tensor<double> longer(1, 4, {1, 2, 3, 4});
  longer.set_grad({1, 1, 1, 1});
  check_throws<peft::shape_error>([&] { opt.step(std::vector{longer.param("a")}); }, "sgd::step");
  CHECK(opt.steps() == 1);
  CHECK(moved.value.storage() == std::vector<double>{0.5, 1.5, 2.5});
}

// ---- clipping ----------------------------------------------------------------------------------

TEST_CASE("clip_grad_norm equals torch.nn.utils.clip_grad_norm_", "[optimizer][clip]") {
  tensor<double> a(1, 2, {0, 0}), b(1, 1, {0}), frozen(1, 1, {0});
  auto params = [&] {
    auto f = frozen.param("frozen");
    f.trainable = false;
    return std::vector{a.param("a"), b.param("b"), a.param("a again"), f};
  };
  const auto reset = [&] {
    a.set_grad({3.0, -4.0});  // norm 5
    b.set_grad({12.0});       // norm 12: total 13 (the shared "a" once; frozen not at all)
    frozen.set_grad({100.0});
  };
  SECTION("clipped") {
    reset();
    const double total = train::clip_grad_norm(params(), 6.5);
    CHECK(total == 13.0);
    const double coef = 6.5 / (13.0 + 1e-6);
    CHECK(a.grad.storage() == std::vector<double>{3.0 * coef, -4.0 * coef});
    CHECK(b.grad.storage() == std::vector<double>{12.0 * coef});
    CHECK(frozen.grad.storage() == std::vector<double>{100.0});
    CHECK(std::hypot(std::hypot(a.grad(0, 0), a.grad(0, 1)), b.grad(0, 0)) == Approx(13.0 * coef).epsilon(1e-15));
  }
  SECTION("below the limit: unchanged") {
    reset();
    CHECK(train::clip_grad_norm(params(), 13.5) == 13.0);
    CHECK(a.grad.storage() == std::vector<double>{3.0, -4.0});
    CHECK(b.grad.storage() == std::vector<double>{12.0});
  }
  SECTION("other norms") {
    reset();
    CHECK(train::clip_grad_norm(params(), 100.0, std::numeric_limits<double>::infinity()) == 12.0);
    CHECK(train::clip_grad_norm(params(), 100.0, 1.0) == Approx(19.0).epsilon(1e-15));
    const double total = train::clip_grad_norm(params(), 1.0, 1.0);
    CHECK(total == Approx(19.0).epsilon(1e-15));
    CHECK(b.grad(0, 0) == Approx(12.0 / (19.0 + 1e-6)).epsilon(1e-15));
  }
  SECTION("float gradients") {
    tensor<float> f(1, 2, {0.f, 0.f});
    f.set_grad({0.6f, 0.8f});
    const double total = train::clip_grad_norm(std::vector{f.param("f")}, 0.5);
    CHECK(total == Approx(1.0).epsilon(1e-7));
    CHECK(f.grad(0, 0) == Approx(0.3f).epsilon(1e-6));
  }
  SECTION("errors and non-finite norms") {
    reset();
    check_throws<peft::error>([&] { train::clip_grad_norm(params(), -1.0); }, "clip_grad_norm");
    check_throws<peft::error>([&] { train::clip_grad_norm(params(), 1.0, 0.0); }, "clip_grad_norm");
    b.set_grad({std::numeric_limits<double>::quiet_NaN()});
    check_throws<peft::error>([&] { train::clip_grad_norm(params(), 1.0, 2.0, true); }, "clip_grad_norm");
    CHECK(a.grad.storage() == std::vector<double>{3.0, -4.0});  // untouched
    CHECK(std::isnan(train::clip_grad_norm(params(), 1.0)));
    CHECK(std::isnan(a.grad(0, 0)));
  }
}

// ---- schedules ---------------------------------------------------------------------------------

TEST_CASE("schedules equal transformers' closed forms", "[optimizer][schedule]") {
  const double pi = 3.14159265358979323846;
  SECTION("constant") {
    const auto s = train::constant_schedule();
    CHECK(s(0) == 1.0);
    CHECK(s(12345) == 1.0);
    const auto w = train::constant_schedule_with_warmup(4);
    CHECK(w(0) == 0.0);
    CHECK(w(1) == 0.25);
    CHECK(w(4) == 1.0);
    CHECK(w(100) == 1.0);
  }
  SECTION("linear warm-up and decay") {
    const auto s = train::linear_schedule_with_warmup(10, 100);
    CHECK(s(0) == 0.0);
    CHECK(s(3) == 0.3);
    CHECK(s(10) == 1.0);
    CHECK(s(55) == 0.5);
    CHECK(s(99) == 1.0 / 90.0);
    CHECK(s(100) == 0.0);
    CHECK(s(150) == 0.0);
    const auto none = train::linear_schedule_with_warmup(0, 4);
    CHECK(none(0) == 1.0);
    CHECK(none(1) == 0.75);
  }
  SECTION("cosine") {
    const auto s = train::cosine_schedule_with_warmup(10, 100);
    CHECK(s(0) == 0.0);
    CHECK(s(5) == 0.5);
    CHECK(s(10) == 1.0);
    CHECK(s(55) == Approx(0.5).epsilon(1e-15));
    CHECK(s(40) == Approx(0.5 * (1 + std::cos(pi * 30.0 / 90.0))).epsilon(1e-15));
    CHECK(s(100) == 0.0);  // cos(pi) = -1 exactly enough: clamped at 0
    CHECK(s(150) == Approx(0.5 * (1 + std::cos(pi * 140.0 / 90.0))).epsilon(1e-15));  // transformers rises again
    const auto two = train::cosine_schedule_with_warmup(0, 8, 1.0);  // one full period
    CHECK(two(4) == 0.0);
    CHECK(two(8) == Approx(1.0).epsilon(1e-15));
    CHECK(two(2) == Approx(0.5).epsilon(1e-15));
  }
  SECTION("errors") {
    check_throws<peft::error>([] { (void)train::linear_schedule_with_warmup(-1, 10); }, "linear_schedule_with_warmup");
    check_throws<peft::error>([] { (void)train::cosine_schedule_with_warmup(1, -10); }, "cosine_schedule_with_warmup");
    check_throws<peft::error>([] { (void)train::cosine_schedule_with_warmup(1, 10, -0.5); },
                              "cosine_schedule_with_warmup");
    check_throws<peft::error>([] { (void)train::constant_schedule_with_warmup(-2); }, "constant_schedule_with_warmup");
    check_throws<peft::error>([] { (void)train::linear_schedule_with_warmup(1, 10)(-1); },
                              "linear_schedule_with_warmup");
  }
}

TEST_CASE("the optimizer's step k uses lr * schedule(k), as scheduler.step() after optimizer.step()",
          "[optimizer][schedule]") {
  tensor<double> t(1, 1, {1.0});
  train::sgd<double> opt(std::vector{t.param("w")}, {.lr = 0.1});
  opt.set_schedule(train::linear_schedule_with_warmup(2, 4));
  const std::vector<double> multipliers{0.0, 0.5, 1.0, 0.5, 0.0};
  for (std::size_t k = 0; k < multipliers.size(); ++k) {
    INFO("step " << k);
    CHECK(opt.lr("default") == 0.1 * multipliers[k]);
    t.set_grad({1.0});
    const double before = t.value(0, 0);
    opt.step();
    CHECK(t.value(0, 0) == Approx(before - 0.1 * multipliers[k]).epsilon(1e-15));
  }
  opt.set_schedule([](std::int64_t) { return -1.0; });
  check_throws<peft::error>([&] { opt.step(); }, "sgd::step");
  opt.set_schedule({});
  CHECK(opt.lr("default") == 0.1);
}

// ---- state files -------------------------------------------------------------------------------

namespace {

/// Writes every parameter value of the model (by name) to `path`.
template <class A>
void save_values(peft_test::golden_case<A>& c, const std::filesystem::path& path) {
  peft::io::safetensors_writer w;
  for (const auto& p : model_parameters(c)) w.add(p.name, peft::to_matrix(peft::matrix_view<const double>(p.value)));
  w.write(path);
}

/// Reads them back into the model's views.
template <class A>
void load_values(peft_test::golden_case<A>& c, const std::filesystem::path& path) {
  const auto f = peft::io::safetensors_file::open(path);
  for (const auto& p : model_parameters(c)) {
    const auto m = f.read_matrix<double>(p.name);
    REQUIRE(m.rows() == p.value.rows());
    REQUIRE(m.cols() == p.value.cols());
    for (peft::index i = 0; i < m.rows(); ++i)
      for (peft::index j = 0; j < m.cols(); ++j) p.value(i, j) = m(i, j);
  }
}

/// The DoRA golden model's optimizer: two groups, amsgrad, a cosine schedule.
template <class A>
train::adamw<double> resumable_optimizer(peft_test::golden_case<A>& c) {
  train::adamw<double> opt(model_parameters(c), {.lr = 1e-2, .weight_decay = 0.01, .amsgrad = true},
                           {{.name = "magnitude",
                             .select = train::name_contains{"lora_magnitude_vector"},
                             .options = {.lr = 5e-3, .betas = {0.8, 0.99}, .weight_decay = 0.0}}});
  opt.set_schedule(train::cosine_schedule_with_warmup(1, 5));
  return opt;
}

}  // namespace

TEST_CASE("training resumes bit for bit from saved parameters and optimizer state", "[optimizer][state]") {
  using A = peft::dora<double>;
  const auto trace = peft::io::safetensors_file::open(peft_test::golden_dir("dora") / "trace.safetensors");
  const auto x = trace.read_matrix<double>("x");
  const auto target = trace.read_matrix<double>("target");
  const auto values_path = scratch("resume_values.safetensors");
  const auto state_path = scratch("resume_state.safetensors");

  peft_test::golden_case<A> run(std::string("dora"));
  auto opt = resumable_optimizer(run);
  for (int k = 0; k < 2; ++k) {
    (void)forward_backward(run, x, target);
    opt.step(model_parameters(run));
  }
  save_values(run, values_path);
  opt.save_state(state_path);
  const double loss3 = forward_backward(run, x, target);
  opt.step(model_parameters(run));
  CHECK(opt.steps() == 3);

  peft_test::golden_case<A> resumed(std::string("dora"));
  load_values(resumed, values_path);
  auto opt2 = resumable_optimizer(resumed);
  opt2.load_state(state_path);
  CHECK(opt2.steps() == 2);
  CHECK(opt2.tensor_steps(0) == 2);
  const double loss3_resumed = forward_backward(resumed, x, target);
  CHECK(loss3_resumed == loss3);
  opt2.step(model_parameters(resumed));

  const auto p1 = model_parameters(run), p2 = model_parameters(resumed);
  REQUIRE(p1.size() == p2.size());
  for (std::size_t i = 0; i < p1.size(); ++i) {
    INFO(p1[i].name);
    CHECK(peft_test::bitwise_equal(peft::matrix_view<const double>(p1[i].value),
                                   peft::matrix_view<const double>(p2[i].value)));
    for (const char* b : {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}) {
      CHECK(peft_test::bitwise_equal(opt.state(i, b), opt2.state(i, b)));
    }
  }

  // Without the state the third step differs: the check above is not vacuous.
  peft_test::golden_case<A> fresh(std::string("dora"));
  load_values(fresh, values_path);
  auto opt3 = resumable_optimizer(fresh);
  (void)forward_backward(fresh, x, target);
  opt3.step(model_parameters(fresh));
  CHECK_FALSE(peft_test::bitwise_equal(peft::matrix_view<const double>(p1[0].value),
                                       peft::matrix_view<const double>(model_parameters(fresh)[0].value)));
  std::filesystem::remove(values_path);
  std::filesystem::remove(state_path);
}

TEST_CASE("sgd's momentum state resumes bit for bit", "[optimizer][state]") {
  const auto path = scratch("sgd_state.safetensors");
  const train::sgd_options o{.lr = 0.1, .momentum = 0.9, .dampening = 0.2, .weight_decay = 0.01};
  tensor<float> a(1, 5, as<float>(p0)), lazy(1, 2, {1.f, 2.f});  // `lazy` has no gradient yet: no buffer
  train::sgd<float> opt(std::vector{a.param("a")}, o);
  for (int k = 0; k < 2; ++k) {
    a.set_grad(as<float>(grads[static_cast<std::size_t>(k)]));
    opt.step();
  }
  tensor<float> b = a;
  opt.save_state(path);
  a.set_grad(as<float>(grads[2]));
  opt.step();

  train::sgd<float> opt2(std::vector{b.param("a")}, {.lr = 1.0});  // options come from the file
  opt2.load_state(path);
  CHECK(opt2.options("default").lr == 0.1);
  CHECK(opt2.options("default").dampening == 0.2);
  b.set_grad(as<float>(grads[2]));
  opt2.step();
  CHECK(bit_equal(a.value, b.value));

  // A state saved before any step has no buffer and loads as such.
  train::sgd<float> unstepped(std::vector{lazy.param("a"), a.param("b")}, o);
  unstepped.save_state(path);
  train::sgd<float> reloaded(std::vector{lazy.param("a"), a.param("b")}, o);
  reloaded.load_state(path);
  CHECK(reloaded.state(0, "momentum_buffer").empty());
  std::filesystem::remove(path);
}

TEST_CASE("load_state checks every name and shape and changes nothing on failure", "[optimizer][state]") {
  const auto good = scratch("good_state.safetensors");
  const auto bad = scratch("bad_state.safetensors");
  tensor<double> a(2, 3, {1, 2, 3, 4, 5, 6}), g(1, 2, {1, -1});
  a.set_grad({0.1, 0.2, 0.3, -0.1, -0.2, -0.3});
  g.set_grad({1, 1});
  const auto groups = [] {
    return std::vector<train::param_group<double, train::adamw_options>>{
        {.name = "gates", .select = train::name_contains{"gate"}, .options = {.lr = 0.1}}};
  };
  train::adamw<double> opt(std::vector{a.param("a"), g.param("gate")}, {}, groups());
  opt.step();
  opt.save_state(good);
  const auto m_before = peft::to_matrix(opt.state(0, "exp_avg"));

  // A copy of the good file with the tensors and metadata edited.
  const auto rewrite = [&](const std::function<void(std::map<std::string, std::string>&)>& meta,
                           const std::string& drop = "", bool extra = false) {
    const auto f = peft::io::safetensors_file::open(good);
    peft::io::safetensors_writer w;
    auto m = f.metadata();
    meta(m);
    w.set_metadata(m);
    for (const auto& t : f.tensors()) {
      if (t.name != drop) w.add(t.name, t.type, t.shape, f.bytes(t.name));
    }
    if (extra) w.add("state.9.extra.exp_avg", {1}, std::vector<double>{0.0});
    w.write(bad);
  };
  const auto keep = [](std::map<std::string, std::string>&) {};
  const auto rejects = [&](const std::string& what) {
    INFO(what);
    check_throws<peft::format_error>([&] { opt.load_state(bad); }, "adamw::load_state");
    CHECK(opt.steps() == 1);
    CHECK(bit_equal(peft::to_matrix(opt.state(0, "exp_avg")), m_before));
    CHECK(opt.options("gates").lr == 0.1);
  };

  SECTION("the file itself") {
    opt.load_state(good);  // its own state loads
    CHECK(bit_equal(peft::to_matrix(opt.state(0, "exp_avg")), m_before));
    std::ofstream(bad) << "not a safetensors file";
    rejects("garbage");
    check_throws<peft::io_error>([&] { opt.load_state(scratch("missing.safetensors")); }, "adamw::load_state");
    train::sgd<double> sgd(std::vector{a.param("a"), g.param("gate")});
    sgd.save_state(bad);
    rejects("an sgd state");
    peft::io::safetensors_writer w;
    w.add("x", {1}, std::vector<double>{1.0});
    w.write(bad);
    rejects("a safetensors file without the metadata");
  }
  SECTION("metadata") {
    rewrite([](auto& m) { m["step"] = "-3"; });
    rejects("a negative step");
    rewrite([](auto& m) { m["tensors"] = R"([{"name":"a","shape":[2,3],"group":"default"}])"; });
    rejects("one tensor fewer");
    rewrite([](auto& m) {
      m["tensors"] = R"([{"name":"b","shape":[2,3],"group":"default"},{"name":"gate","shape":[2],"group":"gates"}])";
    });
    rejects("another name");
    rewrite([](auto& m) {
      m["tensors"] = R"([{"name":"a","shape":[3,2],"group":"default"},{"name":"gate","shape":[2],"group":"gates"}])";
    });
    rejects("another shape");
    rewrite([](auto& m) { m["groups"] = "[not json"; });
    rejects("broken JSON");
    rewrite([](auto& m) {
      auto j = nlohmann::json::parse(m["groups"]);
      j[1]["options"]["betas"] = {0.9, 1.5};
      m["groups"] = j.dump();
    });
    rejects("invalid options");
    rewrite([](auto& m) {
      auto j = nlohmann::json::parse(m["groups"]);
      j[1]["name"] = "other";
      m["groups"] = j.dump();
    });
    rejects("another group");
  }
  SECTION("tensors") {
    rewrite(keep, "state.0.a.exp_avg_sq");
    rejects("a missing buffer");
    rewrite(keep, "state.1.gate.step");
    rejects("a missing step");
    rewrite(keep, "", true);
    rejects("an unexpected tensor");
    {
      const auto f = peft::io::safetensors_file::open(good);
      peft::io::safetensors_writer w;
      w.set_metadata(f.metadata());
      for (const auto& t : f.tensors()) {
        if (t.name == "state.0.a.exp_avg") {
          w.add(t.name, {6}, f.read<double>(t.name));
        } else {
          w.add(t.name, t.type, t.shape, f.bytes(t.name));
        }
      }
      w.write(bad);
    }
    rejects("a buffer of another shape");
  }
  SECTION("a failed save leaves nothing") {
    const auto nowhere = scratch("no_such_dir") / "state.safetensors";
    check_throws<peft::io_error>([&] { opt.save_state(nowhere); }, "adamw::save_state");
    CHECK_FALSE(std::filesystem::exists(nowhere));
  }
  std::filesystem::remove(good);
  std::filesystem::remove(bad);
}

// ---- invalid options ---------------------------------------------------------------------------

TEST_CASE("invalid options and inconsistent parameters are refused with the function's name", "[optimizer]") {
  tensor<double> a(1, 2, {1, 2});
  a.set_grad({1, 1});
  const auto params = [&] { return std::vector{a.param("a")}; };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  SECTION("adamw") {
    for (const auto& o : std::vector<train::adamw_options>{{.lr = -1e-3},
                                                          {.lr = nan},
                                                          {.betas = {1.0, 0.999}},
                                                          {.betas = {0.9, 1.0}},
                                                          {.betas = {-0.1, 0.999}},
                                                          {.eps = 0.0},
                                                          {.eps = -1e-8},
                                                          {.weight_decay = -0.01}}) {
      check_throws<peft::error>([&] { train::adamw<double>(params(), o); }, "adamw::adamw");
    }
    const auto msg = message_of([&] {
      train::adamw<double>(params(), {}, {{.name = "gates", .select = train::name_contains{"g"}, .options = {.lr = -1}}});
    });
    CHECK(msg.find("'gates'") != std::string::npos);
    check_throws<peft::error>(
        [&] { train::adamw<double>(params(), {}, {{.name = "default", .select = train::name_contains{"g"}}}); },
        "adamw::adamw");
    check_throws<peft::error>([&] { train::adamw<double>(params(), {}, {{.name = "g"}}); }, "adamw::adamw");
    check_throws<peft::error>(
        [&] {
          train::adamw<double>(params(), {},
                               {{.name = "g", .select = train::name_contains{"g"}},
                                {.name = "g", .select = train::name_contains{"h"}}});
        },
        "adamw::adamw");
    // Options changed to something invalid: step refuses and changes nothing.
    train::adamw<double> opt(params());
    opt.options("default").betas[1] = 1.0;
    check_throws<peft::error>([&] { opt.step(); }, "adamw::step");
    CHECK(a.value.storage() == std::vector<double>{1, 2});
    CHECK(opt.steps() == 0);
  }
  SECTION("sgd") {
    for (const auto& o : std::vector<train::sgd_options>{{.lr = -0.1},
                                                        {.momentum = -0.9},
                                                        {.weight_decay = -1},
                                                        {.momentum = 0.0, .nesterov = true},
                                                        {.momentum = 0.9, .dampening = 0.1, .nesterov = true}}) {
      check_throws<peft::error>([&] { train::sgd<double>(params(), o); }, "sgd::sgd");
    }
  }
  SECTION("shapes") {
    tensor<double> b(1, 3, {1, 2, 3});
    peft::parameter<double> wrong_grad{"b", b.value.view(), a.grad.view(), b.shape};
    check_throws<peft::shape_error>([&] { train::adamw<double>(std::vector{wrong_grad}); }, "adamw::adamw");
    peft::parameter<double> wrong_shape{"b", b.value.view(), b.grad.view(), {2, 2}};
    check_throws<peft::shape_error>([&] { train::sgd<double>(std::vector{wrong_shape}); }, "sgd::sgd");
  }
}

}  // namespace test_optimizer
