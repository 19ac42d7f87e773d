// GLoRA: parity with HuggingFace PEFT 0.21.2 (tests/data/peft/glora: A, B, C lora with r 4, D, E
// constants; glora_vector: every path a vector; glora_none: A, B constants, C, D, E none), the
// term and its gradients against double loops for every parameterisation (with and without a
// base bias, over several panels of W0), merge and unmerge, initialisation, saving and loading,
// and the errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/glora.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft/glora.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_glora {

using ix = peft::index;
using peft::glora_path;

namespace {

using peft_test::rel_error;
using peft_test::tolerance;

template <class T>
using path_of = typename peft::glora<T>::path;
template <class T>
using slot_of = typename peft::glora<T>::slot;

/// PEFT's key of a gradient: the adapter name before the tensor's own name ("glora_A.default.Xd").
std::string grad_key(const std::string& layer, const std::string& param) {
  const auto dot = param.find('.');
  return "grad.base_model.model." + layer + "." + param.substr(0, dot) + ".default" + param.substr(dot);
}

/// Every trainable gradient of a layer against PEFT's; all of PEFT's are covered.
template <class A>
void check_glora_gradients(peft_test::golden_case<A>& c, const std::string& name, double tol) {
  std::size_t checked = 0;
  for (const auto& p : c.layer(name).adapter("default").parameters()) {
    if (!p.trainable) continue;
    INFO("gradient of " << p.name);
    const auto ref = c.ref(grad_key(name, p.name));
    REQUIRE(peft_test::count_nonzero(ref) > ref.size() / 2);  // relu zeroes some outputs' gradients
    CHECK(rel_error(p.grad, ref) < tol);
    ++checked;
  }
  CHECK(checked == c.reference_gradients(name));
}

template <class A>
void check_case(const std::string& name) {
  peft_test::check_golden<A>(
      name,
      [](peft_test::golden_case<A>& c, double tol) {
        for (const std::string layer : {"up", "down"}) {
          INFO("layer " << layer);
          peft_test::check_layer_outputs(c, layer, tol);
          check_glora_gradients(c, layer, tol);
        }
      },
      [](peft_test::golden_case<A>& c, double tol) {
        peft_test::check_network_outputs(c, tol);
        check_glora_gradients(c, "up", tol);
        check_glora_gradients(c, "down", tol);
      },
      peft_test::check_merge<A>);
}

/// A path of `kind` with random values: (rows, cols) the materialised shape of a weight-shaped
/// path or C, rows = out for a bias-shaped one.
template <class T>
path_of<T> random_path(glora_path kind, ix rows, ix cols, ix r, bool bias_shaped, peft::rng& g) {
  path_of<T> p;
  p.kind = kind;
  if (kind == glora_path::lora) {
    p.xd = peft_test::random_matrix<T>(rows, r, g, -0.5, 0.5);
    p.xu = peft_test::random_matrix<T>(r, cols, g, -0.5, 0.5);
  } else if (kind == glora_path::vector) {
    p.x = bias_shaped ? peft_test::random_matrix<T>(1, rows, g, -0.5, 0.5) : peft_test::random_matrix<T>(rows, 1, g, -0.5, 0.5);
  } else if (kind == glora_path::constant) {
    p.x = peft_test::random_matrix<T>(1, 1, g, -0.5, 0.5);
  }
  return p;
}

template <class T>
peft::glora<T> random_glora(ix in, ix out, ix r, glora_path ab, glora_path c, glora_path de, peft::rng& g) {
  return peft::glora<T>(in, out, random_path<T>(ab, out, in, r, false, g), random_path<T>(ab, out, in, r, false, g),
                        random_path<T>(c, in, 1, r, false, g), random_path<T>(de, out, 1, r, true, g),
                        random_path<T>(de, out, 1, r, true, g));
}

/// A weight-shaped path (or C) materialised in double, (rows, cols).
template <class T>
peft::matrix<double> materialise(const path_of<T>& p, ix rows, ix cols) {
  peft::matrix<double> m(rows, cols);
  for (ix i = 0; i < rows; ++i) {
    for (ix j = 0; j < cols; ++j) {
      double v = 0.0;
      if (p.kind == glora_path::lora) {
        for (ix k = 0; k < p.xd.cols(); ++k) v += static_cast<double>(p.xd(i, k)) * p.xu(k, j);
      } else if (p.kind == glora_path::vector) {
        v = p.x.rows() == 1 ? p.x(0, i) : p.x(i, 0);
      } else if (p.kind == glora_path::constant) {
        v = p.x(0, 0);
      }
      m(i, j) = v;
    }
  }
  return m;
}

/// forward, dx, delta_weight, delta_bias and every gradient against double loops:
/// E = W0 * A + B, t = b0 * D + E + W0 C (with a bias); with N = g^T x and s the column sums of
/// g: dA = W0 * N, dB = N, dD = s * b0, dE = s, dC = W0^T s, reduced onto each path's values
/// (through the chain rule for lora, row sums for vectors, totals for constants).
template <class T>
void check_against_loops(peft::glora<T> a, const peft::dense<double>& w, ix batch, peft::rng& g, double tol) {
  using slot = slot_of<T>;
  const ix in = a.in_features(), out = a.out_features();
  const auto& w0 = w.weight();
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  REQUIRE(peft_test::nontrivial(x));
  const auto A = materialise<T>(a.get(slot::a), out, in);
  const auto B = materialise<T>(a.get(slot::b), out, in);
  const auto C = materialise<T>(a.get(slot::c), in, 1);
  const auto D = materialise<T>(a.get(slot::d), out, 1);
  const auto E = materialise<T>(a.get(slot::e), out, 1);
  peft::matrix<double> dW(out, in), N(out, in);
  std::vector<double> t(static_cast<std::size_t>(out), 0.0), s(static_cast<std::size_t>(out), 0.0);
  for (ix o = 0; o < out; ++o) {
    for (ix i = 0; i < in; ++i) dW(o, i) = w0(o, i) * A(o, i) + B(o, i);
    if (w.has_bias()) {
      double wc = 0.0;
      for (ix i = 0; i < in; ++i) wc += w0(o, i) * C(i, 0);
      t[static_cast<std::size_t>(o)] = w.bias()[static_cast<std::size_t>(o)] * D(o, 0) + E(o, 0) + wc;
    }
    for (ix b = 0; b < batch; ++b) s[static_cast<std::size_t>(o)] += gy(b, o);
    for (ix i = 0; i < in; ++i) {
      double n = 0.0;
      for (ix b = 0; b < batch; ++b) n += static_cast<double>(gy(b, o)) * x(b, i);
      N(o, i) = n;
    }
  }
  auto y_ref = peft_test::ref_nt(x, peft_test::add(w0, dW));
  for (ix b = 0; b < batch; ++b) {
    for (ix o = 0; o < out; ++o) y_ref(b, o) += w.bias_value<double>(o) + t[static_cast<std::size_t>(o)];
  }
  typename peft::glora<T>::cache_type cache;
  peft::matrix<T> y(batch, out), dx(batch, in);
  a.forward(w, x.view(), y.view(), cache);
  CHECK(rel_error(y, y_ref) < tol);
  a.zero_grad();
  a.backward(w, x.view(), gy.view(), dx.view(), cache);
  CHECK(rel_error(dx, peft_test::ref_nn(gy, peft_test::add(w0, dW))) < tol);
  peft::matrix<T> dw(out, in);
  a.delta_weight(w, dw.view());
  CHECK(rel_error(dw, dW) < tol);
  std::vector<T> db(static_cast<std::size_t>(out));
  CHECK(a.delta_bias(w, db.data()) == w.has_bias());
  if (w.has_bias()) CHECK(rel_error(peft::matrix<T>(1, out, db), peft::matrix<double>(1, out, t)) < tol);

  // Expected gradients of the materialised tensors.
  peft::matrix<double> dA(out, in), dC(in, 1), dD(out, 1), dE(out, 1);
  for (ix o = 0; o < out; ++o) {
    for (ix i = 0; i < in; ++i) dA(o, i) = w0(o, i) * N(o, i);
  }
  if (w.has_bias()) {
    for (ix o = 0; o < out; ++o) {
      dD(o, 0) = s[static_cast<std::size_t>(o)] * w.bias()[static_cast<std::size_t>(o)];
      dE(o, 0) = s[static_cast<std::size_t>(o)];
      for (ix i = 0; i < in; ++i) dC(i, 0) += w0(o, i) * s[static_cast<std::size_t>(o)];
    }
  }
  auto check_path = [&](slot sl, const peft::matrix<double>& d) {
    const auto& p = a.get(sl);
    INFO("path " << peft::glora<T>::slot_name(sl) << " (" << peft::glora_path_name(p.kind) << ")");
    double total = 0.0;
    for (ix i = 0; i < d.rows(); ++i)
      for (ix j = 0; j < d.cols(); ++j) total += d(i, j);
    switch (p.kind) {
      case glora_path::lora:
        CHECK(rel_error(p.gxd, peft_test::ref_nt(d, p.xu)) < tol);
        CHECK(rel_error(p.gxu, peft_test::ref_tn(p.xd, d)) < tol);
        break;
      case glora_path::vector: {
        peft::matrix<double> sums(p.gx.rows(), p.gx.cols());
        for (ix i = 0; i < d.rows(); ++i) {
          double r = 0.0;
          for (ix j = 0; j < d.cols(); ++j) r += d(i, j);
          if (p.gx.rows() == 1) {
            sums(0, i) = r;
          } else {
            sums(i, 0) = r;
          }
        }
        CHECK(rel_error(p.gx, sums) < tol);
        break;
      }
      case glora_path::constant:
        CHECK(static_cast<double>(p.gx(0, 0)) == Approx(total).epsilon(tol).margin(tol));
        break;
      case glora_path::none:
        CHECK(p.gx.empty());
        break;
    }
  };
  check_path(slot::a, dA);
  check_path(slot::b, N);
  check_path(slot::c, dC);  // zero without a bias: C, D, E do not act
  check_path(slot::d, dD);
  check_path(slot::e, dE);
}

peft::io::adapter_config glora_config(ix r, const char* ab, const char* c, const char* de) {
  auto cfg = peft_test::config_of("GLORA");
  cfg.r = r;
  cfg.raw["r"] = r;
  cfg.raw["config_A_B"] = ab;
  cfg.raw["config_C"] = c;
  cfg.raw["config_D_E"] = de;
  return cfg;
}

}  // namespace

TEMPLATE_TEST_CASE("glora reproduces PEFT: layers, network, merged weights", "[glora][golden]", float, double) {
  check_case<peft::glora<TestType>>("glora");
  check_case<peft::glora<TestType>>("glora_vector");
  check_case<peft::glora<TestType>>("glora_none");
}

TEST_CASE("glora golden checkpoints: the parameterisations read from the config and tensors", "[glora][golden]") {
  using G = peft::glora<double>;
  using slot = G::slot;
  struct expect {
    std::string name;
    glora_path ab, c, de;
    ix rank;
  };
  for (const auto& e : {expect{"glora", glora_path::lora, glora_path::lora, glora_path::constant, 4},
                        expect{"glora_vector", glora_path::vector, glora_path::vector, glora_path::vector, 0},
                        expect{"glora_none", glora_path::constant, glora_path::none, glora_path::none, 0}}) {
    INFO("case " << e.name);
    auto ck = peft::io::load_checkpoint_as<G>(peft_test::golden_dir(e.name) / "adapter");
    const auto* up = ck.find("up.weight");
    REQUIRE(up != nullptr);
    CHECK(up->adapter.kind(slot::a) == e.ab);
    CHECK(up->adapter.kind(slot::b) == e.ab);
    CHECK(up->adapter.kind(slot::c) == e.c);
    CHECK(up->adapter.kind(slot::d) == e.de);
    CHECK(up->adapter.kind(slot::e) == e.de);
    CHECK(up->adapter.rank() == e.rank);
    CHECK(up->adapter.touches_bias() == (e.c != glora_path::none || e.de != glora_path::none));
    CHECK(up->adapter.in_features() == 64);
    CHECK(up->adapter.out_features() == 96);

    // Saved and read back: every tensor (zero buffers included) and PEFT's fields.
    auto back = peft_test::save_and_load(ck, "peft_glora_golden_" + e.name);
    CHECK(back.config.peft_type == "GLORA");
    for (const char* f : {"r", "config_A_B", "config_C", "config_D_E", "init_weights"}) {
      INFO("field " << f);
      CHECK(back.config.raw.at(f) == ck.config.raw.at(f));
    }
    REQUIRE(back.modules.size() == 2);
    for (auto& m : ck.modules) {
      auto orig = m.adapter.parameters();
      auto again = back.find(m.weight_name)->adapter.parameters();
      REQUIRE(orig.size() == again.size());
      for (std::size_t i = 0; i < orig.size(); ++i) {
        CHECK(orig[i].name == again[i].name);
        CHECK(orig[i].shape == again[i].shape);
        CHECK(rel_error(again[i].value, orig[i].value) == 0.0);
      }
    }
  }
}

TEMPLATE_TEST_CASE("glora forward, dx, merge deltas and gradients equal double loops for every parameterisation",
                   "[glora]", float, double) {
  using T = TestType;
  peft::rng g(17);
  const glora_path ab[] = {glora_path::lora, glora_path::vector, glora_path::constant, glora_path::none};
  const glora_path cs[] = {glora_path::lora, glora_path::vector, glora_path::none};
  const glora_path des[] = {glora_path::vector, glora_path::constant, glora_path::none};
  for (glora_path kab : ab) {
    for (glora_path kc : cs) {
      for (glora_path kde : des) {
        INFO("A_B " << peft::glora_path_name(kab) << ", C " << peft::glora_path_name(kc) << ", D_E "
                    << peft::glora_path_name(kde));
        const ix in = 11, out = 7;
        const auto w0 = peft_test::random_matrix<double>(out, in, g);
        check_against_loops(random_glora<T>(in, out, 3, kab, kc, kde, g),
                            peft::dense<double>(w0, peft_test::random_vector<double>(out, g)), 4, g, tolerance<T>());
        check_against_loops(random_glora<T>(in, out, 2, kab, kc, kde, g), peft::dense<double>(w0), 3, g, tolerance<T>());
      }
    }
  }
  // 2^18 / 8192 = 32 rows per panel: three panels, the last one partial.
  const ix in = 8192, out = 70;
  check_against_loops(random_glora<T>(in, out, 2, glora_path::lora, glora_path::lora, glora_path::vector, g),
                      peft::dense<double>(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g)),
                      2, g, tolerance<T>());
}

TEMPLATE_TEST_CASE("glora merge and unmerge: W0 (1 + A) + B and b0 (1 + D) + E + W0 C, undone from the merged layer",
                   "[glora]", float, double) {
  using T = TestType;
  peft::rng g(31);
  const ix in = 9, out = 7;
  const auto w0 = peft_test::random_matrix<T>(out, in, g);
  const auto b0 = peft_test::random_vector<T>(out, g);
  const auto x = peft_test::random_matrix<T>(4, in, g);
  {
    // One adapter: the merged layer computes what the adapter did.
    peft::adapted_linear<peft::dense<T>, peft::glora<T>> layer(peft::dense<T>(w0, b0));
    layer.add_adapter("g", random_glora<T>(in, out, 2, glora_path::lora, glora_path::lora, glora_path::vector, g));
    peft::matrix<T> y(4, out), ym(4, out);
    layer.forward(x, y);
    layer.merge("g");
    CHECK(rel_error(layer.base().weight(), w0) > 1e-2);
    layer.forward(x, ym);
    CHECK(rel_error(ym, y) < tolerance<T>());
    layer.unmerge("g");
    CHECK(rel_error(layer.base().weight(), w0) < tolerance<T>());
    CHECK(rel_error(peft::matrix<T>(1, out, layer.base().bias()), peft::matrix<T>(1, out, b0)) < tolerance<T>());
  }
  {
    // Two adapters merged one after the other, unmerged in reverse order: W0 and b0 come back
    // (each merge acts on the weight it finds; docs/methods/glora.md).
    peft::adapted_linear<peft::dense<T>, peft::glora<T>> layer(peft::dense<T>(w0, b0));
    layer.add_adapter("g", random_glora<T>(in, out, 2, glora_path::lora, glora_path::lora, glora_path::vector, g));
    layer.add_adapter("h", random_glora<T>(in, out, 1, glora_path::vector, glora_path::vector, glora_path::constant, g));
    layer.merge("g");
    layer.merge("h");
    layer.unmerge("h");
    layer.unmerge("g");
    CHECK(rel_error(layer.base().weight(), w0) < tolerance<T>());
    CHECK(rel_error(peft::matrix<T>(1, out, layer.base().bias()), peft::matrix<T>(1, out, b0)) < tolerance<T>());
  }

  // Where 1 + A is 0 the merged weight has lost W0: unmerge_delta refuses; likewise 1 + D.
  path_of<T> a, b, c, d, e;
  a.kind = glora_path::constant;
  a.x = peft::matrix<T>(1, 1, std::vector<T>{T{-1}});
  b.kind = glora_path::none;
  c.kind = glora_path::none;
  d.kind = glora_path::constant;
  d.x = peft::matrix<T>(1, 1, std::vector<T>{T{-1}});
  e.kind = glora_path::none;
  const peft::glora<T> lost(2, 2, a, b, c, d, e);
  const peft::dense<T> w2(peft_test::random_matrix<T>(2, 2, g), peft_test::random_vector<T>(2, g));
  peft::matrix<T> dw(2, 2);
  CHECK_THROWS_WITH(lost.unmerge_delta(w2, dw.view()),
                    Catch::StartsWith("[glora::unmerge_delta]") && Catch::Contains("1 + A[0, 0] is 0"));
  a.x(0, 0) = T{0.5};
  const peft::glora<T> lost_bias(2, 2, a, b, c, d, e);
  std::vector<T> db(2);
  CHECK_THROWS_WITH(lost_bias.unmerge_delta_bias(w2, db.data()),
                    Catch::StartsWith("[glora::unmerge_delta_bias]") && Catch::Contains("1 + D[0] is 0"));
}

TEMPLATE_TEST_CASE("glora init: PEFT's default is a no-op; init_weights false is not; the options' checks", "[glora]",
                   float, double) {
  using T = TestType;
  using slot = slot_of<T>;
  peft::rng g(8);
  const ix in = 40, out = 24;
  peft::glora<T> a(in, out, {.rank = 4, .seed = 1});
  peft_test::check_identity_at_init(a, 3, g);
  CHECK(a.rank() == 4);
  CHECK(peft_test::max_abs(a.get(slot::a).xd) == 0.0);
  CHECK(peft_test::count_nonzero(a.get(slot::a).xu) == a.get(slot::a).xu.size());
  CHECK(peft_test::max_abs(a.get(slot::a).xu) <= 1.0 / std::sqrt(in));  // kaiming-uniform, a = sqrt 5
  CHECK(peft_test::max_abs(a.get(slot::a).xu) > 0.5 / std::sqrt(in));
  CHECK(a.kind(slot::d) == glora_path::constant);
  CHECK(a.get(slot::d).x(0, 0) == T{0});
  for (auto kab : {glora_path::lora, glora_path::vector, glora_path::constant}) {
    peft::glora<T> r(in, out, {.rank = 2, .a_b = kab, .c = glora_path::vector, .d_e = glora_path::vector,
                               .init_weights = false, .seed = 3});
    const auto w = peft_test::random_dense<T>(in, out, g);
    peft_test::check_not_base(r, w, peft_test::random_matrix<T>(3, in, g), 1e-3);
  }
  CHECK_THROWS_WITH(peft::glora<T>(in, out, {.c = glora_path::constant}),
                    Catch::StartsWith("[glora::glora] config_C cannot be 'constant'"));
  CHECK_THROWS_WITH(peft::glora<T>(in, out, {.d_e = glora_path::lora}),
                    Catch::StartsWith("[glora::glora] config_D_E cannot be 'lora'"));
  CHECK_THROWS_WITH(peft::glora<T>(in, out, {.rank = 0}), Catch::StartsWith("[glora::glora] rank must be >= 1"));
  CHECK_NOTHROW(peft::glora<T>(in, out, {.rank = 0, .a_b = glora_path::none, .c = glora_path::none}));
  CHECK_THROWS_AS(peft::glora<T>(0, out, {}), peft::shape_error);
}

TEMPLATE_TEST_CASE("glora rejects bad shapes, bad checkpoints and unknown fields with clear errors", "[glora]", float,
                   double) {
  using T = TestType;
  peft::rng g(4);
  auto a = random_glora<T>(7, 5, 2, glora_path::lora, glora_path::lora, glora_path::constant, g);
  const peft::dense<T> w(peft_test::random_matrix<T>(5, 7, g), peft_test::random_vector<T>(5, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 6, 7, "[glora::forward] base weight is (6, 7)"},
                                 {pass::add_term, arg::y, 2, 6},
                                 {pass::backward, arg::dx, 2, 6},
                                 {pass::backward_term, arg::dy, 2, 4},
                                 {pass::delta_weight, arg::dw, 5, 6}});
  peft_test::check_unset_rejected<peft::glora<T>, peft::error>(w);
  {
    const auto p = random_path<T>(glora_path::lora, 5, 7, 2, false, g);
    const auto q = random_path<T>(glora_path::lora, 5, 7, 3, false, g);
    CHECK_THROWS_WITH(peft::glora<T>(7, 5, p, q, {}, {}, {}),
                      Catch::StartsWith("[glora::glora] glora_B (lora): rank 3 differs from another path's 2"));
  }

  // Checkpoints: a module's tensors against its config.
  peft::io::checkpoint_tensors<T> none;
  auto tensors = [&](std::initializer_list<std::pair<std::string, std::vector<std::int64_t>>> list) {
    return peft_test::random_tensors<T>("layer", list, g);
  };
  const auto cfg = glora_config(2, "lora", "lora", "constant");
  const std::initializer_list<std::pair<std::string, std::vector<std::int64_t>>> full = {
      {"glora_A.Xd", {5, 2}}, {"glora_A.Xu", {2, 7}}, {"glora_B.Xd", {5, 2}}, {"glora_B.Xu", {2, 7}},
      {"glora_C.Xd", {7, 2}}, {"glora_C.Xu", {2, 1}}, {"glora_D.X", {1}},     {"glora_E.X", {1}}};
  const auto ok = peft::io::from_checkpoint<peft::glora<T>>(cfg, tensors(full), none);
  CHECK(ok.rank() == 2);
  CHECK(ok.in_features() == 7);
  CHECK(ok.out_features() == 5);
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::glora<T>>(glora_config(3, "lora", "lora", "constant"), tensors(full), none),
                    Catch::StartsWith("[glora::from_checkpoint]") && Catch::Contains("do not have rank r = 3"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::glora<T>>(glora_config(2, "vector", "lora", "constant"), tensors(full), none),
                    Catch::Contains("glora_A has Xd/Xu but config_A_B is 'vector'"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::glora<T>>(glora_config(2, "lora", "lora", "sometimes"), tensors(full), none),
                    Catch::Contains("'config_D_E' = \"sometimes\" is not one of vector, constant, none"));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::glora<T>>(glora_config(2, "lora", "constant", "constant"), tensors(full), none),
                    Catch::Contains("'config_C' = \"constant\" is not one of lora, vector, none"));
  {
    // A base without a bias: PEFT saves zero buffers for C, D, E whatever the config says.
    auto m = tensors({{"glora_A.Xd", {5, 2}}, {"glora_A.Xu", {2, 7}}, {"glora_B.Xd", {5, 2}}, {"glora_B.Xu", {2, 7}}});
    m.add("glora_C.zeros", peft::io::stored_tensor<T>{{7, 1}, peft::dtype::f32, std::make_shared<peft::matrix<T>>(7, 1)});
    m.add("glora_D.zeros", peft::io::stored_tensor<T>{{5}, peft::dtype::f32, std::make_shared<peft::matrix<T>>(1, 5)});
    m.add("glora_E.zeros", peft::io::stored_tensor<T>{{5}, peft::dtype::f32, std::make_shared<peft::matrix<T>>(1, 5)});
    const auto nb = peft::io::from_checkpoint<peft::glora<T>>(cfg, m, none);
    CHECK(nb.kind(slot_of<T>::c) == glora_path::none);
    CHECK(nb.kind(slot_of<T>::d) == glora_path::none);
    // A zero buffer that is not zero would change PEFT's output: refused.
    auto bad = std::make_shared<peft::matrix<T>>(1, 5);
    (*bad)(0, 3) = T{1};
    m.add("glora_D.zeros", peft::io::stored_tensor<T>{{5}, peft::dtype::f32, bad});
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::glora<T>>(cfg, m, none),
                      Catch::Contains("glora_D.zeros holds non-zero values"));
  }
  {
    auto m = tensors(full);
    m.add("glora_A.X", peft_test::stored<T>({5, 1}, g));
    CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::glora<T>>(cfg, m, none),
                      Catch::Contains("glora_A has tensors of more than one parameterisation"));
  }
  {
    auto m = tensors(full);
    m.set_base_shape(std::pair<ix, ix>{5, 8});
    CHECK_THROWS_AS(peft::io::from_checkpoint<peft::glora<T>>(cfg, m, none), peft::format_error);
  }
  {
    // Constants for A, B, D, E: out_features only from the base (set_features).
    auto m = tensors({{"glora_A.X", {1}}, {"glora_B.X", {1}}, {"glora_C.X", {7, 1}}, {"glora_D.X", {1}}, {"glora_E.X", {1}}});
    auto c = peft::io::from_checkpoint<peft::glora<T>>(glora_config(8, "constant", "vector", "constant"), m, none);
    peft::matrix<T> x(2, 7), y(2, 5);
    typename peft::glora<T>::cache_type cache;
    CHECK_THROWS_WITH(c.forward(w, x.view(), y.view(), cache), Catch::Contains("out_features is unknown"));
    c.set_features(7, 5);
    CHECK(c.out_features() == 5);
    CHECK_NOTHROW(c.forward(w, x.view(), y.view(), cache));
    CHECK_THROWS_AS(c.set_features(7, 6), peft::shape_error);
  }
  // Saving: a config that cannot describe the module is refused.
  {
    peft::io::basic_peft_checkpoint<peft::glora<T>> ck;
    ck.config.targets_kind = peft::io::target_kind::none;
    ck.modules.push_back({"m.a", "m.a.weight", peft::glora<T>(7, 5, {.rank = 3, .init_weights = false, .seed = 1})});
    ck.modules.push_back({"m.b", "m.b.weight", peft::glora<T>(7, 5, {.rank = 2, .seed = 2})});
    const auto dir = peft_test::scratch_path("peft_glora_ranks");
    CHECK_THROWS_WITH(peft::io::save_peft_checkpoint(dir, ck),
                      Catch::StartsWith("[glora::describe_in] module 'm.b' has rank 2 but the config says r = 3"));
    ck.modules.back().adapter = peft::glora<T>(7, 5, {.rank = 3, .a_b = glora_path::vector, .seed = 2});
    CHECK_THROWS_WITH(peft::io::save_peft_checkpoint(dir, ck),
                      Catch::Contains("has A, B 'vector' but config_A_B is 'lora'"));
    std::filesystem::remove_all(dir);
  }
  // Fields: bias other than "none" and unknown fields are refused by the shared rule.
  const auto dir = peft_test::scratch_path("peft_glora_fields");
  std::filesystem::remove_all(dir);
  peft_test::rewrite_adapter("glora", dir, [](nlohmann::ordered_json& j) { j["bias"] = "glora_only"; });
  CHECK_THROWS_WITH(peft::io::load_checkpoint_as<peft::glora<T>>(dir),
                    Catch::Contains("[glora::from_checkpoint]") && Catch::Contains("'bias'"));
  std::filesystem::remove_all(dir);
  peft_test::rewrite_adapter("glora", dir, [](nlohmann::ordered_json& j) { j["glora_mystery"] = 1; });
  CHECK_THROWS_WITH(peft::io::load_checkpoint_as<peft::glora<T>>(dir), Catch::Contains("'glora_mystery'"));
  std::filesystem::remove_all(dir);
  CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::glora<T>>(peft_test::golden_dir("lokr") / "adapter"),
                  peft::unsupported_error);
}

}  // namespace test_glora
