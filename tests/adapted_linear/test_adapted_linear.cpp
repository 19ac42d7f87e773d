// adapted_linear: several LoRA adapters on one frozen layer (PEFT sums their terms), enabling,
// merging, removal and the errors of the adapter registry.
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "support/adapter_checks.hpp"
#include "support/test_support.hpp"

namespace test_adapted_linear {

using ix = peft::index;

namespace {

using namespace peft_test::compute_types;  // f32_on_f32, ...: adapters in T over a weight stored as S
using peft_test::unit_roundoff;

template <class T>
constexpr double tol() {
  return peft_test::tolerance<T>(1e-12, 2e-5);
}

constexpr ix batch = 5, in = 11, out = 9;

/// Three named adapters of different ranks, all with random (non-zero) A, B and, for "b" and
/// "c", a random lora_bias.
struct adapter_spec {
  const char* name;
  ix rank;
  double alpha;
  bool bias;
};
const std::vector<adapter_spec> specs{{"a", 1, 2.0, false}, {"b", 3, 6.0, true}, {"c", 4, 3.0, true}};

template <class T>
peft::lora<T> random_adapter(const adapter_spec& s, peft::rng& gen) {
  peft::lora<T> a(in, out, {.rank = s.rank, .alpha = s.alpha, .bias = s.bias,
                            .init = peft::lora_init::random, .seed = gen.next()});
  if (s.bias) peft_test::fill_random(a.bias(), gen);
  return a;
}

template <class S>
peft::dense<S> random_base(peft::rng& gen) {
  const auto w = peft_test::random_matrix<double>(out, in, gen);
  const auto b = peft_test::random_vector<double>(out, gen);
  return peft::dense<S>::from(w.view(), b.data());
}

template <class S>
std::vector<double> decoded_bias(const peft::dense<S>& base) {
  std::vector<double> b;
  for (const S& v : base.bias()) b.push_back(peft::convert<double>(v));
  return b;
}

template <class T, class S>
using layer_t = peft::adapted_linear<peft::dense<S>, peft::lora<T>>;

/// A layer over a random base holding every adapter in `specs`.
template <class T, class S>
layer_t<T, S> make_layer(peft::rng& gen) {
  layer_t<T, S> layer(random_base<S>(gen));
  for (const auto& s : specs) layer.add_adapter(s.name, random_adapter<T>(s, gen));
  return layer;
}

/// base(x) + the sum of the named adapters' terms, all in double from the layer's own tensors.
template <class T, class S>
peft::matrix<double> reference(const layer_t<T, S>& layer, const peft::matrix<T>& x,
                               const std::vector<std::string>& names) {
  auto y = peft_test::ref_linear(x, layer.base().weight(), decoded_bias(layer.base()));
  for (const auto& n : names) {
    const auto& a = layer.adapter(n);
    y = peft_test::add(y, peft_test::ref_lora_term(x, a.A(), a.B(), a.bias(),
                                                   static_cast<double>(a.scale())));
  }
  return y;
}

template <class T, class S>
peft::matrix<T> forward(layer_t<T, S>& layer, const peft::matrix<T>& x) {
  peft::matrix<T> y(x.rows(), out);
  layer.forward(x.view(), y.view());
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("the layer's output is the base plus every enabled adapter's term",
                   "[adapted_linear]", f32_on_f32, f32_on_bf16, f64_on_f64, f64_on_bf16) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  peft::rng gen(1);
  auto layer = make_layer<T, S>(gen);
  const auto x = peft_test::random_matrix<T>(batch, in, gen);
  REQUIRE(peft_test::nontrivial(x));
  for (const auto& s : specs) {
    REQUIRE(peft_test::nontrivial(layer.adapter(s.name).B()));
    REQUIRE(peft_test::nontrivial(layer.adapter(s.name).A()));
  }
  CHECK(layer.adapter_names() == std::vector<std::string>{"a", "b", "c"});

  const auto all = reference<T, S>(layer, x, {"a", "b", "c"});
  CHECK(peft_test::rel_error(forward<T, S>(layer, x), all) <= tol<T>());
  // Each term matters: dropping any one moves the output well beyond the tolerance.
  for (const auto& s : specs) {
    std::vector<std::string> others;
    for (const auto& o : specs) {
      if (o.name != std::string(s.name)) others.push_back(o.name);
    }
    CHECK(peft_test::rel_error(reference<T, S>(layer, x, others), all) > 1000 * tol<T>());
  }

  // Disabling one removes exactly its term.
  layer.set_enabled("b", false);
  CHECK_FALSE(layer.enabled("b"));
  CHECK(peft_test::rel_error(forward<T, S>(layer, x), reference<T, S>(layer, x, {"a", "c"})) <= tol<T>());
  // One left: the adapter's fused forward.
  layer.set_enabled("c", false);
  CHECK(peft_test::rel_error(forward<T, S>(layer, x), reference<T, S>(layer, x, {"a"})) <= tol<T>());
  // None: the base alone.
  layer.set_enabled("a", false);
  CHECK(peft_test::rel_error(forward<T, S>(layer, x), reference<T, S>(layer, x, {})) <= tol<T>());
  // All back.
  for (const auto& s : specs) layer.set_enabled(s.name, true);
  CHECK(peft_test::rel_error(forward<T, S>(layer, x), all) <= tol<T>());

  // Batch of one, and a batch size change between calls.
  const auto x1 = peft_test::random_matrix<T>(1, in, gen);
  CHECK(peft_test::rel_error(forward<T, S>(layer, x1), reference<T, S>(layer, x1, {"a", "b", "c"})) <=
        tol<T>());
  CHECK(peft_test::rel_error(forward<T, S>(layer, x), all) <= tol<T>());
}

TEMPLATE_TEST_CASE("backward with several active adapters: independent gradients, dx exact",
                   "[adapted_linear]", f32_on_f32, f32_on_bf16, f64_on_f64, f64_on_bf16) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  peft::rng gen(2);
  auto layer = make_layer<T, S>(gen);
  layer.set_enabled("a", false);  // "b" and "c" active
  const auto x = peft_test::random_matrix<T>(batch, in, gen);
  const auto g = peft_test::random_matrix<T>(batch, out, gen);
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(g));

  // Each adapter alone on the same base, as a separate copy.
  struct alone {
    std::string name;
    peft::lora<T> adapter;
  };
  std::vector<alone> singles;
  for (const char* n : {"b", "c"}) singles.push_back({n, layer.adapter(n)});
  for (auto& s : singles) {
    peft::matrix<T> y(batch, out), dx(batch, in);
    typename peft::lora<T>::cache_type cache;
    s.adapter.forward(layer.base(), x.view(), y.view(), cache);
    s.adapter.backward(layer.base(), x.view(), g.view(), dx.view(), cache);
    REQUIRE(peft_test::nontrivial(s.adapter.grad_A()));
    REQUIRE(peft_test::nontrivial(s.adapter.grad_B()));
  }

  peft::matrix<T> y(batch, out), dx(batch, in, T{99});
  layer.forward(x.view(), y.view());
  layer.backward(x.view(), g.view(), dx.view());
  for (const auto& s : singles) {
    INFO("adapter " << s.name);
    const auto& a = layer.adapter(s.name);
    CHECK(peft_test::rel_error(a.grad_A(), s.adapter.grad_A()) <= tol<T>());
    CHECK(peft_test::rel_error(a.grad_B(), s.adapter.grad_B()) <= tol<T>());
    CHECK(peft_test::rel_error(a.grad_bias(), s.adapter.grad_bias()) <= tol<T>());
  }
  // The disabled adapter got nothing.
  CHECK(peft_test::max_abs(layer.adapter("a").grad_A()) == 0.0);
  CHECK(peft_test::max_abs(layer.adapter("a").grad_B()) == 0.0);

  // dx = G W0 + sum_k s_k (G B_k) A_k.
  const auto gd = peft_test::to_double(g);
  auto dx_ref = peft_test::ref_nn(gd, layer.base().weight());
  for (const char* n : {"b", "c"}) {
    const auto& a = layer.adapter(n);
    dx_ref = peft_test::add(dx_ref, peft_test::ref_nn(peft_test::ref_nn(gd, a.B()), a.A()),
                            static_cast<double>(a.scale()));
  }
  CHECK(peft_test::rel_error(dx, dx_ref) <= tol<T>());

  // And dx equals central differences of L = sum(layer(x) * G) (double only: the loss must
  // be computed in double for 1e-7).
  if constexpr (std::is_same_v<T, double>) {
    auto xv = x;
    auto loss = [&] { return peft_test::dot(forward<T, S>(layer, xv), g); };
    const auto fd = peft_test::fd_gradient(xv.view(), 1e-3, loss);
    REQUIRE(peft_test::nontrivial(fd));
    CHECK(peft_test::rel_error(dx, fd) <= 1e-7);
    // The adapter gradients as central differences too, for one of them.
    layer.zero_grad();
    layer.forward(x.view(), y.view());
    layer.backward(x.view(), g.view(), dx.view());
    auto& c = layer.adapter("c");
    auto loss_x = [&] { return peft_test::dot(forward<T, S>(layer, x), g); };
    CHECK(peft_test::rel_error(c.grad_A(), peft_test::fd_gradient(c.A(), 1e-3, loss_x)) <= 1e-7);
    CHECK(peft_test::rel_error(c.grad_B(), peft_test::fd_gradient(c.B(), 1e-3, loss_x)) <= 1e-7);
    CHECK(peft_test::rel_error(c.grad_bias(), peft_test::fd_gradient(c.bias(), 1e-3, loss_x)) <= 1e-7);
  }

  // Gradients accumulate over a second backward; zero_grad clears every adapter.
  layer.zero_grad();
  layer.forward(x.view(), y.view());
  layer.backward(x.view(), g.view(), dx.view());
  layer.backward(x.view(), g.view(), dx.view());
  CHECK(peft_test::rel_error(layer.adapter("b").grad_B(), peft_test::scaled(singles[0].adapter.grad_B(), 2.0)) <=
        tol<T>());
  layer.zero_grad();
  for (const auto& p : layer.parameters()) CHECK(peft_test::max_abs(p.grad) == 0.0);
}

TEMPLATE_TEST_CASE("backward with no or one active adapter", "[adapted_linear]", f32_on_f32,
                   f64_on_f64) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  peft::rng gen(3);
  auto layer = make_layer<T, S>(gen);
  const auto x = peft_test::random_matrix<T>(batch, in, gen);
  const auto g = peft_test::random_matrix<T>(batch, out, gen);
  const auto gd = peft_test::to_double(g);
  peft::matrix<T> y(batch, out), dx(batch, in);
  for (const auto& s : specs) layer.set_enabled(s.name, false);
  layer.forward(x.view(), y.view());
  layer.backward(x.view(), g.view(), dx.view());
  CHECK(peft_test::rel_error(dx, peft_test::ref_nn(gd, layer.base().weight())) <= tol<T>());
  for (const auto& p : layer.parameters()) CHECK(peft_test::max_abs(p.grad) == 0.0);

  layer.set_enabled("b", true);
  layer.forward(x.view(), y.view());
  layer.backward(x.view(), g.view(), dx.view());
  const auto& b = layer.adapter("b");
  auto dx_ref = peft_test::add(peft_test::ref_nn(gd, layer.base().weight()),
                               peft_test::ref_nn(peft_test::ref_nn(gd, b.B()), b.A()),
                               static_cast<double>(b.scale()));
  CHECK(peft_test::rel_error(dx, dx_ref) <= tol<T>());
  REQUIRE(peft_test::nontrivial(b.grad_A()));
}

TEMPLATE_TEST_CASE("merging one adapter and keeping another active equals all unmerged",
                   "[adapted_linear]", f32_on_f32, f32_on_bf16, f64_on_f64, f64_on_bf16) {
  using T = typename TestType::scalar;
  using S = typename TestType::storage;
  const double merge_tol = tol<T>() + 4 * unit_roundoff<S>();
  peft::rng gen(4);
  auto layer = make_layer<T, S>(gen);
  layer.set_enabled("a", false);
  const auto x = peft_test::random_matrix<T>(batch, in, gen);
  const auto unmerged = forward<T, S>(layer, x);
  CHECK(peft_test::rel_error(unmerged, reference<T, S>(layer, x, {"b", "c"})) <= tol<T>());

  const auto w0 = peft_test::to_double(layer.base().weight());
  layer.merge("b");  // b has a lora_bias: it lands in the base bias
  CHECK(layer.merged("b"));
  CHECK(layer.enabled("b"));
  CHECK(peft_test::rel_error(layer.base().weight(), w0) > 1e-3);
  CHECK(peft_test::rel_error(forward<T, S>(layer, x), unmerged) <= merge_tol);
  // The merged adapter is part of the base now: the reference of the base alone plus c.
  CHECK(peft_test::rel_error(forward<T, S>(layer, x), reference<T, S>(layer, x, {"c"})) <= tol<T>());

  layer.merge("c");
  CHECK(peft_test::rel_error(forward<T, S>(layer, x), unmerged) <= 2 * merge_tol);
  layer.unmerge("b");
  layer.unmerge("c");
  CHECK(peft_test::rel_error(forward<T, S>(layer, x), unmerged) <= 2 * merge_tol);
  CHECK(peft_test::rel_error(layer.base().weight(), w0) <=
        (std::is_same_v<S, double> ? 1e-15 : 8 * unit_roundoff<S>()));

  // Merging a disabled adapter enables it (its delta is in the weight).
  layer.merge("a");
  CHECK(layer.enabled("a"));
  CHECK(peft_test::rel_error(forward<T, S>(layer, x), reference<T, S>(layer, x, {"b", "c"})) <=
        tol<T>());
}

TEST_CASE("remove_adapter of a merged adapter restores the base", "[adapted_linear]") {
  peft::rng gen(5);
  auto layer = make_layer<double, double>(gen);
  const auto w0 = peft_test::to_double(layer.base().weight());
  const auto b0 = decoded_bias(layer.base());
  const auto x = peft_test::random_matrix<double>(batch, in, gen);
  layer.set_enabled("a", false);
  layer.set_enabled("c", false);
  const auto base_only_plus_b = forward<double, double>(layer, x);

  layer.merge("c");
  REQUIRE(peft_test::rel_error(layer.base().weight(), w0) > 1e-3);
  layer.remove_adapter("c");
  CHECK_FALSE(layer.contains("c"));
  CHECK(layer.adapter_names() == std::vector<std::string>{"a", "b"});
  CHECK(peft_test::rel_error(layer.base().weight(), w0) <= 1e-15);
  const auto b_after = decoded_bias(layer.base());
  REQUIRE(b_after.size() == b0.size());
  for (std::size_t j = 0; j < b0.size(); ++j) CHECK(b_after[j] == Approx(b0[j]).margin(1e-15));
  CHECK(peft_test::rel_error(forward<double, double>(layer, x), base_only_plus_b) <= 1e-13);

  // Removing an unmerged adapter leaves the weight bit-for-bit alone.
  const auto w1 = peft_test::to_double(layer.base().weight());
  layer.remove_adapter("a");
  CHECK(peft_test::exactly_equal(layer.base().weight(), w1));
  CHECK(layer.adapter_names() == std::vector<std::string>{"b"});
  // The survivor is still addressable and correct after the slots moved.
  CHECK(peft_test::rel_error(forward<double, double>(layer, x), reference<double, double>(layer, x, {"b"})) <=
        1e-12);
}

TEST_CASE("adapted_linear registry errors", "[adapted_linear]") {
  peft::rng gen(6);
  auto layer = make_layer<float, float>(gen);
  const auto names_before = layer.adapter_names();

  peft_test::check_error<peft::error>([&] { layer.add_adapter("b", random_adapter<float>(specs[0], gen)); },
                           "[adapted_linear::add_adapter]");
  CHECK(layer.adapter_names() == names_before);
  peft_test::check_error<peft::shape_error>(
      [&] { layer.add_adapter("d", peft::lora<float>(in + 1, out, {.rank = 2})); },
                                 "[adapted_linear::add_adapter]");
  peft_test::check_error<peft::shape_error>(
      [&] { layer.add_adapter("d", peft::lora<float>(in, out - 1, {.rank = 2})); },
                                 "[adapted_linear::add_adapter]");
  CHECK_FALSE(layer.contains("d"));

  peft_test::check_error<peft::error>([&] { layer.adapter("nope"); }, "[adapted_linear::adapter]");
  peft_test::check_error<peft::error>([&] { layer.set_enabled("nope", true); }, "[adapted_linear::set_enabled]");
  peft_test::check_error<peft::error>([&] { (void)layer.enabled("nope"); }, "[adapted_linear::enabled]");
  peft_test::check_error<peft::error>([&] { (void)layer.merged("nope"); }, "[adapted_linear::merged]");
  peft_test::check_error<peft::error>([&] { layer.merge("nope"); }, "[adapted_linear::merge]");
  peft_test::check_error<peft::error>([&] { layer.unmerge("nope"); }, "[adapted_linear::unmerge]");
  peft_test::check_error<peft::error>([&] { layer.remove_adapter("nope"); }, "[adapted_linear::remove_adapter]");
  const auto& clayer = layer;
  peft_test::check_error<peft::error>([&] { (void)clayer.adapter("nope"); }, "[adapted_linear::adapter]");

  // Merge state errors.
  peft_test::check_error<peft::error>([&] { layer.unmerge("a"); }, "[adapted_linear::unmerge]");
  layer.merge("a");
  peft_test::check_error<peft::error>([&] { layer.merge("a"); }, "[adapted_linear::merge]");
  peft_test::check_error<peft::error>([&] { layer.set_enabled("a", false); }, "[adapted_linear::set_enabled]");
  CHECK(layer.merged("a"));
  CHECK(layer.enabled("a"));
  CHECK_NOTHROW(layer.set_enabled("a", true));
  layer.unmerge("a");
  CHECK_NOTHROW(layer.set_enabled("a", false));

  // Shapes of forward and backward arguments.
  peft::matrix<float> x(3, in), x_bad(3, in + 1), y(3, out), y_bad(3, out + 1), g(3, out), dx(3, in),
      dx_bad(2, in);
  peft_test::check_error<peft::shape_error>([&] { layer.forward(x_bad.view(), y.view()); },
                                 "[adapted_linear::forward]");
  peft_test::check_error<peft::shape_error>([&] { layer.forward(x.view(), y_bad.view()); },
                                 "[adapted_linear::forward]");
  peft_test::check_error<peft::shape_error>([&] { layer.backward(x.view(), g.view(), dx_bad.view()); },
                                 "[adapted_linear::backward]");
  // Several active adapters: backward needs the forward of the same batch.
  layer.forward(x.view(), y.view());
  peft::matrix<float> x5(5, in), g5(5, out), dx5(5, in);
  peft_test::check_error<peft::error>([&] { layer.backward(x5.view(), g5.view(), dx5.view()); },
                           "[adapted_linear::backward]");
}

TEST_CASE("adapted_linear parameters are prefixed by the adapter name", "[adapted_linear]") {
  peft::rng gen(7);
  auto layer = make_layer<float, peft::bf16>(gen);
  const auto params = layer.parameters();
  std::vector<std::string> names;
  for (const auto& p : params) names.push_back(p.name);
  CHECK(names == std::vector<std::string>{"a.lora_A.weight", "a.lora_B.weight", "b.lora_A.weight",
                                          "b.lora_B.weight", "b.lora_B.bias", "c.lora_A.weight",
                                          "c.lora_B.weight", "c.lora_B.bias"});
  CHECK(params[2].value.data() == layer.adapter("b").A().data());
  CHECK(layer.in_features() == in);
  CHECK(layer.out_features() == out);
}

TEST_CASE("references returned by add_adapter stay valid as adapters come and go",
          "[adapted_linear]") {
  peft::rng gen(8);
  layer_t<double, double> layer(random_base<double>(gen));
  auto& a = layer.add_adapter("a", random_adapter<double>(specs[0], gen));
  auto& b = layer.add_adapter("b", random_adapter<double>(specs[1], gen));
  for (int i = 0; i < 9; ++i) {  // enough additions to outgrow any initial capacity
    layer.add_adapter("extra" + std::to_string(i), random_adapter<double>(specs[2], gen));
  }
  layer.remove_adapter("extra0");
  layer.remove_adapter("extra5");
  CHECK(&a == &layer.adapter("a"));
  CHECK(&b == &layer.adapter("b"));
  // Using the early reference changes the layer.
  for (int i = 1; i < 9; ++i) {
    if (i != 5) layer.set_enabled("extra" + std::to_string(i), false);
  }
  const auto x = peft_test::random_matrix<double>(batch, in, gen);
  a.set_scale(0.0);
  CHECK(peft_test::rel_error(forward<double, double>(layer, x), reference<double, double>(layer, x, {"b"})) <=
        1e-12);
  b.set_scale(0.0);
  CHECK(peft_test::rel_error(forward<double, double>(layer, x), reference<double, double>(layer, x, {})) <=
        1e-12);
}

}  // namespace test_adapted_linear
