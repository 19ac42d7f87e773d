// PEANuT: parity with HuggingFace PEFT 0.21.2 (tests/data/peft/peanut_*, made by
// scripts/make_peanut_golden.py: relu, gelu, tanh gelu, silu, sigmoid, tanh; depth 0 to 3), the
// passes against a double reference of s B F(W0)^T written from the definition for every
// activation, gradients and activation derivatives against finite differences, quantized
// bases, PEFT's init, merge and unmerge, saving and loading, and the errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "peft/adapters/peanut.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/base/q4_0.hpp"
#include "peft/io/peft/peanut.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_peanut {

using ix = peft::index;

namespace {

using peft_test::message_of;
using peft_test::rel_error;
using peft_test::tolerance;

const std::vector<std::string> golden_cases = {"peanut_relu",        "peanut_gelu_depth2", "peanut_tanh_gelu_depth1",
                                               "peanut_silu_depth3", "peanut_sigmoid",     "peanut_tanh_depth2"};

const std::vector<std::string> all_activations = {
    "relu",       "relu2", "relu6",   "leaky_relu", "gelu",   "gelu_python", "gelu_new", "gelu_pytorch_tanh",
    "gelu_python_tanh", "gelu_fast", "quick_gelu", "silu", "swish", "sigmoid", "tanh", "linear"};

/// transformers' definitions, written out here (independently of the header's).
double act_ref(const std::string& f, double z) {
  const double pi = 3.14159265358979323846;
  auto sig = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  if (f == "relu") return std::max(z, 0.0);
  if (f == "relu2") return std::max(z, 0.0) * std::max(z, 0.0);
  if (f == "relu6") return std::min(std::max(z, 0.0), 6.0);
  if (f == "leaky_relu") return z >= 0 ? z : 0.01 * z;
  if (f == "gelu" || f == "gelu_python") return z * 0.5 * (1.0 + std::erf(z / std::sqrt(2.0)));
  if (f == "gelu_new" || f == "gelu_pytorch_tanh" || f == "gelu_python_tanh") {
    return 0.5 * z * (1.0 + std::tanh(std::sqrt(2.0 / pi) * (z + 0.044715 * std::pow(z, 3.0))));
  }
  if (f == "gelu_fast") return 0.5 * z * (1.0 + std::tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z)));
  if (f == "quick_gelu") return z * sig(1.702 * z);
  if (f == "silu" || f == "swish") return z * sig(z);
  if (f == "sigmoid") return sig(z);
  if (f == "tanh") return std::tanh(z);
  if (f == "linear") return z;
  FAIL("no activation " << f);
  return 0;
}

peft::matrix<double> transposed(const peft::matrix<double>& m) {
  peft::matrix<double> t(m.cols(), m.rows());
  for (ix i = 0; i < m.rows(); ++i)
    for (ix j = 0; j < m.cols(); ++j) t(j, i) = m(i, j);
  return t;
}

/// dW = s B F^T in double from the definition over W0 (out, in).
template <class T>
peft::matrix<double> delta_of(const peft::peanut<T>& a, const peft::matrix<double>& w0) {
  auto act = [&](peft::matrix<double> m) {
    for (auto& v : m.storage()) v = act_ref(a.act_fn(), v);
    return m;
  };
  std::vector<peft::matrix<double>> res;
  auto h = act(peft_test::ref_tn(w0, transposed(peft_test::to_double(a.A()))));  // act(W0^T A^T) (in, r)
  for (ix i = 0; i < a.depth(); ++i) {
    res.push_back(h);
    h = act(peft_test::ref_nt(h, peft_test::to_double(a.encoder(i))));
  }
  for (ix i = 0; i < a.depth(); ++i) {
    h = peft_test::add(act(peft_test::ref_nt(h, peft_test::to_double(a.decoder(i)))),
                       res[static_cast<std::size_t>(a.depth() - 1 - i)]);
  }
  return peft_test::scaled(peft_test::ref_nt(peft_test::to_double(a.B()), h), a.scaling());
}

/// PyTorch's name of a parameter gradient: the adapter name after the first component
/// (peanut_A.default.weight, peanut_encoders.default.0.weight).
std::string reference_key(const std::string& layer, const std::string& param) {
  const auto dot = param.find('.');
  return "grad.base_model.model." + layer + "." + param.substr(0, dot) + ".default" + param.substr(dot);
}

template <class A>
void check_peanut_gradients(peft_test::golden_case<A>& c, const std::string& name, double tol) {
  std::size_t checked = 0;
  for (const auto& p : c.layer(name).adapter("default").parameters()) {
    INFO("gradient of " << p.name);
    const auto ref = c.ref(reference_key(name, p.name));
    REQUIRE(peft_test::count_nonzero(ref) > ref.size() / 2);
    CHECK(rel_error(p.grad, ref) < tol);
    ++checked;
  }
  CHECK(checked == c.reference_gradients(name));
}

template <class A>
void check_peanut_layers(peft_test::golden_case<A>& c, double tol) {
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    peft_test::check_layer_outputs(c, name, tol);
    check_peanut_gradients(c, name, tol);
  }
}

template <class A>
void check_peanut_network(peft_test::golden_case<A>& c, double tol) {
  peft_test::check_network_outputs(c, tol);
  check_peanut_gradients(c, "up", tol);
  check_peanut_gradients(c, "down", tol);
}

template <class T>
peft::peanut<T> random_peanut(ix in, ix out, ix r, ix depth, const std::string& act, double scaling, peft::rng& g) {
  std::vector<peft::matrix<T>> enc, dec;
  for (ix i = 0; i < depth; ++i) enc.push_back(peft_test::random_matrix<T>(r, r, g));
  for (ix i = 0; i < depth; ++i) dec.push_back(peft_test::random_matrix<T>(r, r, g));
  return peft::peanut<T>(peft_test::random_matrix<T>(r, out, g), std::move(enc), std::move(dec),
                         peft_test::random_matrix<T>(out, r, g), act, scaling, in);
}

template <class T>
peft::matrix<double> grad_of(peft::peanut<T>& a, const std::string& name) {
  for (auto& p : a.parameters())
    if (p.name == name) return peft_test::to_double(p.grad);
  FAIL("no parameter " << name);
  return {};
}

/// W0 of any base, dequantized in double.
template <class Base>
peft::matrix<double> weight_of(const Base& w) {
  peft::matrix<double> m(w.out_features(), w.in_features());
  for (ix o = 0; o < m.rows(); ++o) w.dequantize_row(o, m.row(o));
  return m;
}

peft::io::adapter_config peanut_config(ix r, const std::string& extra = "") {
  return peft::io::adapter_config::parse(R"({"peft_type": "PEANUT", "target_modules": ["layer"], "r": )" +
                                         std::to_string(r) + extra + "}");
}

}  // namespace

TEMPLATE_TEST_CASE("peanut reproduces PEFT: layers, network, merged weights", "[peanut][golden]", float, double) {
  using A = peft::peanut<TestType>;
  for (const auto& name : golden_cases) {
    peft_test::check_golden<A>(name, check_peanut_layers<A>, check_peanut_network<A>, peft_test::check_merge<A>);
  }
}

TEST_CASE("peanut golden checkpoints: r, depth, act_fn, scaling", "[peanut][golden]") {
  auto load = [](const std::string& name) {
    return peft::io::load_checkpoint_as<peft::peanut<double>>(peft_test::golden_dir(name) / "adapter");
  };
  auto relu = load("peanut_relu");
  const auto& up = relu.find("up.weight")->adapter;
  CHECK(up.rank() == 4);
  CHECK(up.depth() == 0);
  CHECK(up.act_fn() == "relu");
  CHECK(up.scaling() == 1.0);
  CHECK(up.in_features() == 0);  // the tensors do not hold in_features: bound by the layer
  auto silu = load("peanut_silu_depth3");
  const auto& down = silu.find("down.weight")->adapter;
  CHECK(down.rank() == 5);
  CHECK(down.depth() == 3);
  CHECK(down.activation() == peft::peanut_activation::silu);
  CHECK(down.scaling() == 2.0);
  CHECK(silu.find("down.weight")->adapter.parameters().size() == 8u);  // A, 3 encoders, 3 decoders, B
  CHECK(load("peanut_tanh_gelu_depth1").find("up.weight")->adapter.activation() ==
        peft::peanut_activation::gelu_tanh);
}

TEST_CASE("peanut golden checkpoints save and load back: tensors and config fields", "[peanut][golden]") {
  for (const auto& name : golden_cases) {
    INFO("case " << name);
    auto ck = peft::io::load_checkpoint_as<peft::peanut<double>>(peft_test::golden_dir(name) / "adapter");
    auto back = peft_test::save_and_load(ck, "peft_peanut_golden_" + name);
    CHECK(back.config.peft_type == "PEANUT");
    for (const char* k : {"r", "depth", "act_fn", "scaling", "init_weights"}) {
      INFO(k);
      CHECK(back.config.raw.value(k, nlohmann::ordered_json()) == ck.config.raw.value(k, nlohmann::ordered_json()));
    }
    REQUIRE(back.modules.size() == 2);
    for (auto& m : ck.modules) {
      INFO(m.weight_name);
      auto pa = m.adapter.parameters();
      auto pb = back.find(m.weight_name)->adapter.parameters();
      REQUIRE(pa.size() == static_cast<std::size_t>(2 + 2 * m.adapter.depth()));
      REQUIRE(pb.size() == pa.size());
      for (std::size_t i = 0; i < pa.size(); ++i) {
        INFO(pa[i].name);
        CHECK(pb[i].name == pa[i].name);
        CHECK(pb[i].shape == pa[i].shape);
        CHECK(rel_error(pb[i].value, pa[i].value) == 0.0);  // f32 values saved as f32
      }
    }
  }
}

TEMPLATE_TEST_CASE("peanut passes equal a double reference of s B F(W0)^T for every activation", "[peanut]", float,
                   double) {
  using T = TestType;
  peft::rng g(23);
  const ix batch = 3;
  for (const auto& act : all_activations) {
    for (const auto& [in, out, r, depth] : std::vector<std::tuple<ix, ix, ix, ix>>{{12, 10, 4, 0}, {5, 9, 1, 2}, {16, 6, 6, 3}}) {
      // relu2 squares at every level: depth 3 raises W0 to the 16th power (overflow in float).
      if (act == "relu2" && depth > 1) continue;
      INFO("act " << act << ", in " << in << ", out " << out << ", r " << r << ", depth " << depth);
      auto a = random_peanut<T>(in, out, r, depth, act, 0.7, g);
      const peft::dense<double> base(peft_test::random_matrix<double>(out, in, g, -2.0, 2.0),
                                     peft_test::random_vector<double>(out, g));
      const auto x = peft_test::random_matrix<T>(batch, in, g);
      const auto gy = peft_test::random_matrix<T>(batch, out, g);
      REQUIRE(peft_test::nontrivial(x));
      REQUIRE(peft_test::nontrivial(gy));
      const auto dw = delta_of(a, peft_test::to_double(base.weight()));
      REQUIRE(peft_test::max_abs(dw) > 1e-2);
      peft_test::check_against_delta(a, base, x, gy, dw, tolerance<T>(1e-12, 2e-5));
    }
  }
}

TEST_CASE("peanut gradients equal finite differences in double (A, encoders, decoders, B, x)", "[peanut]") {
  peft::rng g(41);
  const ix in = 7, out = 6, batch = 3;
  for (const auto& act : all_activations) {
    for (const ix depth : {0, 1, 3}) {
      if (act == "relu2" && depth > 1) continue;  // W0^16: finite differences lose all digits
      INFO("act " << act << ", depth " << depth);
      auto a = random_peanut<double>(in, out, 3, depth, act, 1.3, g);
      const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
      auto x = peft_test::random_matrix<double>(batch, in, g);
      const auto gy = peft_test::random_matrix<double>(batch, out, g);
      REQUIRE(peft_test::nontrivial(x));
      typename peft::peanut<double>::cache_type cache;
      auto loss = [&] {
        peft::matrix<double> y(batch, out);
        a.forward(w, x.view(), y.view(), cache);
        double l = 0;
        for (ix i = 0; i < batch; ++i)
          for (ix o = 0; o < out; ++o) l += y(i, o) * gy(i, o);
        return l;
      };
      a.zero_grad();
      peft::matrix<double> y(batch, out), dx(batch, in);
      a.forward(w, x.view(), y.view(), cache);
      a.backward(w, x.view(), gy.view(), dx.view(), cache);
      CHECK(rel_error(dx, peft_test::fd_gradient(x.view(), 1e-6, loss)) < 1e-7);
      std::vector<peft::matrix<double>> grads;
      for (auto& p : a.parameters()) grads.push_back(peft_test::to_double(p.grad));
      REQUIRE(grads.size() == static_cast<std::size_t>(2 + 2 * depth));
      std::size_t k = 0;
      for (auto& p : a.parameters()) {
        INFO(p.name);
        // relu6 and the relus can zero a whole chain; the others must move every parameter.
        if (act != "relu6" && act != "relu" && act != "relu2") REQUIRE(peft_test::max_abs(grads[k]) > 1e-4);
        CHECK(rel_error(grads[k], peft_test::fd_gradient(p.value, 1e-6, loss)) < 1e-5);
        ++k;
      }
    }
  }
}

TEST_CASE("peanut activation derivatives equal finite differences; aliases are the same function", "[peanut]") {
  for (const auto& name : all_activations) {
    INFO(name);
    const auto f = peft::peanut_activation_of(name);
    REQUIRE(f.has_value());
    for (const double z : {-7.5, -3.1, -1.2, -0.4, -0.05, 0.05, 0.3, 1.1, 2.7, 5.5, 6.5, 9.0}) {
      INFO("z " << z);
      CHECK(std::abs(peft::detail::peanut_act(*f, z) - act_ref(name, z)) <= 1e-15 * (1.0 + std::abs(z * z)));
      const double h = 1e-6;
      const double fd = (peft::detail::peanut_act(*f, z + h) - peft::detail::peanut_act(*f, z - h)) / (2 * h);
      CHECK(std::abs(peft::detail::peanut_act_grad(*f, z) - fd) < 1e-8 * (1.0 + std::abs(z)));
    }
  }
  // PyTorch's derivatives at the kinks: relu' (0) = 0, relu6' (0) = relu6' (6) = 0, leaky 0.01.
  using peft::peanut_activation;
  CHECK(peft::detail::peanut_act_grad(peanut_activation::relu, 0.0) == 0.0);
  CHECK(peft::detail::peanut_act_grad(peanut_activation::relu6, 0.0) == 0.0);
  CHECK(peft::detail::peanut_act_grad(peanut_activation::relu6, 6.0) == 0.0);
  CHECK(peft::detail::peanut_act_grad(peanut_activation::leaky_relu, 0.0) == 0.01);
  for (const char* refused : {"mish", "gelu_10", "gelu_accurate", "hardswish", "laplace", "prelu", "sqrtsoftplus",
                              "xielu", "Relu", ""}) {
    INFO(refused);
    CHECK(!peft::peanut_activation_of(refused).has_value());
  }
}

TEMPLATE_TEST_CASE("peanut over f32, int8 and q4_0 bases reads W0 as each base stores it", "[peanut]", float, double) {
  using T = TestType;
  peft::rng g(29);
  const ix in = 64, out = 12, batch = 4;
  const auto wf = peft_test::random_matrix<float>(out, in, g);
  const auto bf = peft_test::random_vector<float>(out, g);
  const peft::matrix_view<const float> wv(wf.view());
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  REQUIRE(peft_test::nontrivial(x));
  const auto a0 = random_peanut<T>(in, out, 4, 2, "gelu", 0.5, g);
  auto check = [&](const auto& w) {
    // The term over the quantized base against the same adapter over its dequantized W0 in
    // double, and against the definition.
    const auto w0 = weight_of(w);
    const peft::dense<double> exact(w0);
    peft::peanut<T> a = a0, b = a0;
    a.zero_grad();
    b.zero_grad();
    typename peft::peanut<T>::cache_type ca, cb;
    peft::matrix<T> ya(batch, out), yb(batch, out), dxa(batch, in), dxb(batch, in), dh(batch, out);
    const peft::matrix_view<const T> h(dh.view());  // not read
    a.add_term(w, x.view(), h, ya.view(), ca);
    b.add_term(exact, x.view(), h, yb.view(), cb);
    const double tol = tolerance<T>(1e-12, 2e-5);
    CHECK(rel_error(ya, yb) < tol);
    CHECK(rel_error(ya, peft_test::ref_nt(peft_test::to_double(x), delta_of(a0, w0))) < tol);
    a.backward_term(w, x.view(), h, gy.view(), dh.view(), dxa.view(), ca);
    b.backward_term(exact, x.view(), h, gy.view(), dh.view(), dxb.view(), cb);
    CHECK(rel_error(dxa, dxb) < tol);
    for (const char* p : {"peanut_A.weight", "peanut_encoders.1.weight", "peanut_decoders.0.weight", "peanut_B.weight"}) {
      INFO(p);
      CHECK(rel_error(grad_of(a, p), grad_of(b, p)) < tol);
    }
    peft::matrix<T> dwa(out, in);
    a.delta_weight(w, dwa.view());
    CHECK(rel_error(dwa, delta_of(a0, w0)) < tol);
  };
  check(peft::dense<float>::from(wv, bf.data()));
  check(peft::int8_rowwise::quantize(wv));
  check(peft::q4_0::quantize(wv, bf.data()));
}

TEMPLATE_TEST_CASE("peanut at PEFT's init: kaiming-uniform A and chain, B = 0 (a no-op)", "[peanut]", float, double) {
  using T = TestType;
  peft::rng g(7);
  const ix in = 40, out = 30, batch = 4;
  const auto w = peft_test::random_dense<T>(in, out, g);
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  REQUIRE(peft_test::nontrivial(x));
  peft::peanut<T> a(in, out, {.rank = 8, .depth = 2, .act_fn = "tanh", .scaling = 1.0, .init_weights = true, .seed = 2});
  CHECK(a.rank() == 8);
  CHECK(a.depth() == 2);
  CHECK(peft_test::max_abs(a.B()) == 0.0);
  CHECK(peft_test::count_nonzero(a.A()) == a.A().size());
  CHECK(peft_test::max_abs(a.A()) <= 1.0 / std::sqrt(30.0));  // fan_in = out_features
  CHECK(peft_test::max_abs(a.A()) > 0.8 / std::sqrt(30.0));
  CHECK(peft_test::max_abs(a.encoder(1)) <= 1.0 / std::sqrt(8.0));
  CHECK(peft_test::max_abs(a.decoder(0)) > 0.5 / std::sqrt(8.0));
  peft_test::check_output_is_base(a, w, x);
  peft::matrix<T> dw(out, in);
  a.delta_weight(w, dw.view());
  CHECK(peft_test::max_abs(dw) == 0.0);
  // init_weights false: B kaiming-uniform too, a visible change
  peft::peanut<T> rnd(in, out, {.rank = 8, .depth = 0, .act_fn = "relu", .scaling = 1.0, .init_weights = false, .seed = 3});
  CHECK(peft_test::max_abs(rnd.B()) <= 1.0 / std::sqrt(8.0));
  peft_test::check_not_base(rnd, w, x, 1e-3);
}

TEMPLATE_TEST_CASE("peanut merge and unmerge: unmerge subtracts what merge added, or refuses", "[peanut]", float, double) {
  using T = TestType;
  peft::rng g(11);
  const ix in = 9, out = 7, batch = 3;
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto a = random_peanut<T>(in, out, 3, 1, "silu", 0.8, g);
  const peft::dense<T> w0(peft_test::random_matrix<T>(out, in, g), peft_test::random_vector<T>(out, g));
  peft::adapted_linear<peft::dense<T>, peft::peanut<T>> layer(w0);
  layer.add_adapter("a", a);
  peft::matrix<T> before(batch, out), after(batch, out);
  layer.forward(x, before);
  layer.merge("a");
  layer.forward(x, after);
  CHECK(rel_error(after, before) < tolerance<T>(1e-13, 1e-5));
  // Training after a merge changes the parameters; unmerge still takes off what was added.
  for (auto& p : layer.adapter("a").parameters()) {
    for (ix i = 0; i < p.value.rows(); ++i)
      for (ix j = 0; j < p.value.cols(); ++j) p.value(i, j) *= T{2};
  }
  layer.unmerge("a");
  CHECK(rel_error(layer.base().weight(), w0.weight()) < tolerance<T>(1e-15, 1e-6));

  // Another base object: the remembered delta is used when the base minus it gives back the
  // remembered F (a copy of the merged base), refused otherwise; an adapter that never merged
  // refuses (the merged weight does not determine W0).
  peft::matrix<T> dw(out, in);
  const peft::peanut<T> fresh = a;
  peft::dense<T> merged(w0);
  fresh.delta_weight(w0, dw.view());
  merged.add_to_weight(peft::matrix_view<const T>(dw.view()), 1.0);
  const peft::dense<T> copy(merged);
  peft::matrix<T> back(out, in);
  fresh.unmerge_delta(copy, back.view());
  CHECK(rel_error(back, dw) == 0.0);
  fresh.unmerge_delta(w0, back.view());  // the base object it merged: used as remembered
  CHECK(rel_error(back, dw) == 0.0);
  peft::dense<T> other(merged);
  other.add_to_weight(peft::matrix_view<const T>(peft_test::random_matrix<T>(out, in, g).view()), 0.1);
  CHECK(message_of([&] { fresh.unmerge_delta(other, back.view()); })
            .starts_with("[peanut::unmerge_delta] PEANuT's delta is a function of W0"));
  CHECK(message_of([&] { a.unmerge_delta(merged, back.view()); })
            .starts_with("[peanut::unmerge_delta] PEANuT's delta is a function of W0"));
}

TEMPLATE_TEST_CASE("peanut rejects bad shapes, activations and checkpoints with clear errors", "[peanut]", float, double) {
  using T = TestType;
  using peft_test::arg;
  using peft_test::pass;
  peft::rng g(3);
  const auto w = peft_test::random_dense<T>(12, 8, g);
  peft::peanut<T> a(12, 8, {.rank = 2, .depth = 1, .act_fn = "gelu", .scaling = 1.0, .init_weights = false, .seed = 1});
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 8, 16, "[peanut::forward] base weight is (8, 16)"},
                                 {pass::forward, arg::x, 2, 11},
                                 {pass::backward, arg::dx, 2, 11},
                                 {pass::delta_weight, arg::dw, 8, 11, "[peanut::delta_weight]"}});
  CHECK(message_of([] { peft::peanut<T>(12, 8, {.rank = 0}); }).starts_with("[peanut::peanut] rank must be >= 1"));
  CHECK(message_of([] { peft::peanut<T>(12, 8, {.rank = 2, .depth = -1}); })
            .starts_with("[peanut::peanut] depth must be >= 0"));
  CHECK(message_of([] { peft::peanut<T>(12, 8, {.rank = 2, .depth = 0, .act_fn = "mish"}); })
            .starts_with("[peanut::peanut] act_fn \"mish\" is not one of the closed-form activations"));
  CHECK(message_of([] {
          peft::peanut<T>(peft::matrix<T>(2, 8), {}, {}, peft::matrix<T>(8, 3), "relu", 1.0);
        }).starts_with("[peanut::peanut] peanut_B is (8, 3)"));
  CHECK(message_of([] {
          peft::peanut<T>(peft::matrix<T>(2, 8), {peft::matrix<T>(2, 2)}, {}, peft::matrix<T>(8, 2), "relu", 1.0);
        }).starts_with("[peanut::peanut] 1 encoders and 0 decoders"));
  CHECK(message_of([] {
          peft::peanut<T>(peft::matrix<T>(2, 8), {peft::matrix<T>(2, 2)}, {peft::matrix<T>(2, 3)}, peft::matrix<T>(8, 2),
                          "relu", 1.0);
        }).starts_with("[peanut::peanut] peanut_decoders.0 is (2, 3)"));
  peft::peanut<T> unbound(peft::matrix<T>(2, 8), {}, {}, peft::matrix<T>(8, 2), "relu", 1.0);
  CHECK(unbound.in_features() == 0);
  peft::matrix<T> x(2, 12), y(2, 8);
  typename peft::peanut<T>::cache_type cache;
  CHECK(message_of([&] { unbound.forward(w, x.view(), y.view(), cache); }).starts_with("[peanut::forward] in_features is unknown"));
  unbound.set_features(12, 8);
  CHECK(unbound.in_features() == 12);
  CHECK(message_of([&] { unbound.set_features(10, 8); }).starts_with("[peanut::set_features]"));

  const peft::io::checkpoint_tensors<T> none;
  auto tensors = [&](ix r, ix out, ix depth) {
    std::vector<std::pair<std::string, std::vector<std::int64_t>>> t = {{"peanut_A.weight", {r, out}},
                                                                        {"peanut_B.weight", {out, r}}};
    for (ix i = 0; i < depth; ++i) {
      t.push_back({"peanut_encoders." + std::to_string(i) + ".weight", {r, r}});
      t.push_back({"peanut_decoders." + std::to_string(i) + ".weight", {r, r}});
    }
    return peft_test::random_tensors<T>("layer", t, g);
  };
  auto load = [&](const peft::io::adapter_config& c, const peft::io::checkpoint_tensors<T>& m) {
    return message_of([&] { peft::io::from_checkpoint<peft::peanut<T>>(c, m, none); });
  };
  const auto ok = peft::io::from_checkpoint<peft::peanut<T>>(peanut_config(2, R"(, "depth": 2)"), tensors(2, 8, 2), none);
  CHECK(ok.rank() == 2);
  CHECK(ok.depth() == 2);
  CHECK(ok.act_fn() == "relu");
  CHECK(load(peanut_config(4), tensors(2, 8, 0))
            .starts_with("[peanut::from_checkpoint] module 'layer': peanut_A.weight is [2, 8], expected (r, out_features) "
                         "with r = 4"));
  CHECK(load(peanut_config(2, R"(, "act_fn": "mish")"), tensors(2, 8, 0))
            .starts_with("[peanut::from_checkpoint] adapter_config.json: 'act_fn' = \"mish\" is not one of"));
  CHECK(load(peanut_config(2, R"(, "act_fn": 3)"), tensors(2, 8, 0))
            .starts_with("[peanut::from_checkpoint] adapter_config.json: 'act_fn' must be a string"));
  CHECK(load(peanut_config(2, R"(, "depth": -1)"), tensors(2, 8, 0))
            .starts_with("[peanut::from_checkpoint] adapter_config.json: 'depth' = -1"));
  CHECK(load(peanut_config(2, R"(, "depth": 2)"), tensors(2, 8, 1))
            .starts_with("[peanut::from_checkpoint] module 'layer' has no tensor 'peanut_encoders.1.weight' but "
                         "adapter_config.json gives depth = 2"));
  CHECK(load(peanut_config(2, R"(, "depth": 1)"), tensors(2, 8, 2))
            .starts_with("[peanut::from_checkpoint] module 'layer' has tensor 'peanut_decoders.1.weight' but "
                         "adapter_config.json gives depth = 1"));
  CHECK(load(peanut_config(2, R"(, "scaling": "big")"), tensors(2, 8, 0))
            .starts_with("[peanut::from_checkpoint] adapter_config.json: 'scaling' must be"));
  auto bad_b = peft_test::random_tensors<T>("layer", {{"peanut_A.weight", {2, 8}}, {"peanut_B.weight", {8, 3}}}, g);
  CHECK(load(peanut_config(2), bad_b).find("peanut_B.weight") != std::string::npos);
  auto wrong_base = tensors(2, 8, 0);
  wrong_base.set_base_shape(std::pair<ix, ix>{9, 13});
  CHECK(load(peanut_config(2), wrong_base).find("does not fit the base's (9, 13)") != std::string::npos);
  auto bound = tensors(2, 8, 0);
  bound.set_base_shape(std::pair<ix, ix>{8, 13});
  CHECK(peft::io::from_checkpoint<peft::peanut<T>>(peanut_config(2), bound, none).in_features() == 13);
}

TEST_CASE("peanut checkpoints: config fields honoured or refused by name", "[peanut]") {
  namespace fs = std::filesystem;
  const auto dir = peft_test::scratch_path("peft_peanut_fields");
  auto load_with = [&](const char* key, nlohmann::ordered_json v) {
    fs::remove_all(dir);
    peft_test::rewrite_adapter("peanut_relu", dir, [&](nlohmann::ordered_json& c) { c[key] = v; });
    return message_of([&] { peft::io::load_checkpoint_as<peft::peanut<double>>(dir); });
  };
  CHECK(load_with("init_weights", true).empty());  // B's initialisation only
  CHECK(load_with("scaling", 3.5).empty());
  CHECK(load_with("act_fn", "gelu_new").empty());
  CHECK(load_with("act_fn", "swish").empty());
  CHECK(load_with("act_fn", "xielu").starts_with("[peanut::from_checkpoint] adapter_config.json: 'act_fn' = \"xielu\""));
  CHECK(load_with("act_fn", "prelu").starts_with("[peanut::from_checkpoint] adapter_config.json: 'act_fn' = \"prelu\""));
  CHECK(load_with("bias", "all").starts_with("[peanut::from_checkpoint] adapter_config.json: 'bias'"));
  CHECK(load_with("rank_pattern", nlohmann::ordered_json{{"up", 2}})
            .starts_with("[peanut::from_checkpoint] adapter_config.json: 'rank_pattern'"));
  CHECK(load_with("fan_in_fan_out", true).starts_with("[peanut::from_checkpoint] adapter_config.json: 'fan_in_fan_out'"));
  CHECK(load_with("depth", 1).find("has no tensor 'peanut_encoders.0.weight'") != std::string::npos);
  CHECK(load_with("r", 8).find("expected (r, out_features) with r = 8") != std::string::npos);
  // the golden scaling loads as given
  fs::remove_all(dir);
  peft_test::rewrite_adapter("peanut_relu", dir, [&](nlohmann::ordered_json& c) { c["scaling"] = 0.25; });
  auto ck = peft::io::load_checkpoint_as<peft::peanut<double>>(dir);
  CHECK(ck.find("up.weight")->adapter.scaling() == 0.25);
  fs::remove_all(dir);
}

TEST_CASE("peanut save: one config for every module, or refused", "[peanut]") {
  peft::io::basic_peft_checkpoint<peft::peanut<double>> ck;
  ck.config = peft::io::adapter_config::lora(8, 8.0, {});  // a LoRA config: its fields go
  ck.config.targets_kind = peft::io::target_kind::none;
  const peft::peanut_options opt{.rank = 3, .depth = 2, .act_fn = "swish", .scaling = 0.5, .init_weights = false, .seed = 1};
  ck.modules.push_back({"model.a", "model.a.weight", peft::peanut<double>(12, 8, opt)});
  ck.modules.push_back({"model.b", "model.b.weight", peft::peanut<double>(6, 2, peft::peanut_options{.rank = 3, .depth = 2, .act_fn = "swish", .scaling = 0.5, .init_weights = false, .seed = 2})});
  auto back = peft_test::save_and_load(ck, "peft_peanut_roundtrip");
  CHECK(back.config.peft_type == "PEANUT");
  CHECK(back.config.raw["r"] == 3);
  CHECK(back.config.raw["depth"] == 2);
  CHECK(back.config.raw["act_fn"] == "swish");  // the alias kept
  CHECK(back.config.raw["scaling"] == 0.5);
  CHECK(!back.config.raw.contains("lora_alpha"));
  REQUIRE(back.modules.size() == 2);
  for (auto& m : ck.modules) {
    auto pa = m.adapter.parameters();
    auto pb = back.find(m.weight_name)->adapter.parameters();
    REQUIRE(pa.size() == pb.size());
    for (std::size_t i = 0; i < pa.size(); ++i) CHECK(rel_error(pb[i].value, pa[i].value) < 1e-7);  // stored as f32
  }
  ck.modules.push_back({"model.c", "model.c.weight",
                        peft::peanut<double>(12, 8, peft::peanut_options{.rank = 3, .depth = 1, .act_fn = "swish", .scaling = 0.5, .init_weights = true, .seed = 3})});
  CHECK(message_of([&] { peft_test::save_and_load(ck, "peft_peanut_mixed"); })
            .starts_with("[peanut::describe_in] module 'model.c'"));
}

}  // namespace test_peanut
