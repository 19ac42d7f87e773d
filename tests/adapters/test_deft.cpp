// DeFT: parity with HuggingFace PEFT 0.21.2 (tests/data/peft/deft_*, made by
// scripts/make_deft_golden.py: relu and qr, para, alpha, r capped at out_features, a Conv1D
// model), the passes against a double reference of Q (s R - right^T W0) written from the
// definition, gradients against finite differences, quantized bases, PEFT's init, merge and
// unmerge, saving and loading, and the errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "peft/adapters/deft.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/base/q4_0.hpp"
#include "peft/io/peft/deft.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_deft {

using ix = peft::index;
using peft::deft_projection;

namespace {

using peft_test::message_of;
using peft_test::rel_error;
using peft_test::tolerance;

const std::vector<std::string> linear_cases = {"deft_relu",    "deft_relu_alpha", "deft_qr",
                                               "deft_qr_alpha", "deft_para_relu", "deft_para_qr"};
const std::vector<std::string> all_cases = {"deft_relu",      "deft_relu_alpha", "deft_qr",     "deft_qr_alpha",
                                            "deft_para_relu", "deft_para_qr",    "deft_conv1d"};

/// W0 of any base, dequantized in double.
template <class Base>
peft::matrix<double> weight_of(const Base& w) {
  peft::matrix<double> m(w.out_features(), w.in_features());
  for (ix o = 0; o < m.rows(); ++o) w.dequantize_row(o, m.row(o));
  return m;
}

/// Gram-Schmidt in double (the thin Q of P with R's diagonal positive), then each column's sign
/// set as LAPACK's Householder QR gives it: R[k, k] = -sign(a_kk) |.|, a_kk the k-th diagonal of
/// P after the first k reflections; here recomputed by a plain Householder sweep. An independent
/// reference for qr: modified Gram-Schmidt for the subspace, Householder only for the signs.
peft::matrix<double> reference_q(const peft::matrix<double>& p) {
  const ix m = p.rows(), n = p.cols();
  // Householder for the diagonal signs of R.
  peft::matrix<double> a = p;
  std::vector<double> diag(static_cast<std::size_t>(n));
  for (ix k = 0; k < n; ++k) {
    double xs = 0;
    for (ix i = k + 1; i < m; ++i) xs += a(i, k) * a(i, k);
    const double alpha = a(k, k);
    if (xs == 0) {
      diag[static_cast<std::size_t>(k)] = alpha;
      continue;
    }
    const double beta = -std::copysign(std::sqrt(alpha * alpha + xs), alpha);
    diag[static_cast<std::size_t>(k)] = beta;
    std::vector<double> v(static_cast<std::size_t>(m), 0.0);
    v[static_cast<std::size_t>(k)] = 1;
    for (ix i = k + 1; i < m; ++i) v[static_cast<std::size_t>(i)] = a(i, k) / (alpha - beta);
    const double tau = (beta - alpha) / beta;
    for (ix j = k; j < n; ++j) {
      double d = 0;
      for (ix i = k; i < m; ++i) d += v[static_cast<std::size_t>(i)] * a(i, j);
      for (ix i = k; i < m; ++i) a(i, j) -= tau * d * v[static_cast<std::size_t>(i)];
    }
  }
  peft::matrix<double> q = p;
  for (ix k = 0; k < n; ++k) {
    for (ix j = 0; j < k; ++j) {
      double d = 0;
      for (ix i = 0; i < m; ++i) d += q(i, j) * q(i, k);
      for (ix i = 0; i < m; ++i) q(i, k) -= d * q(i, j);
    }
    double nn = 0;
    for (ix i = 0; i < m; ++i) nn += q(i, k) * q(i, k);
    const double sgn = diag[static_cast<std::size_t>(k)] < 0 ? -1.0 : 1.0;
    for (ix i = 0; i < m; ++i) q(i, k) *= sgn / std::sqrt(nn);
  }
  return q;
}

/// dW = Q (s R - right^T W0) in double from the definition (para: -Q right^T W0).
template <class T>
peft::matrix<double> delta_of(const peft::deft<T>& a, const peft::matrix<double>& w0) {
  const auto p = peft_test::to_double(a.P());
  peft::matrix<double> q = p, right = p;
  if (a.projection() == deft_projection::relu) {
    for (auto& v : right.storage()) v = std::max(v, 0.0);
  } else {
    q = reference_q(p);
    right = q;
  }
  auto m = peft_test::ref_tn(right, w0);  // right^T W0 (r, in)
  peft::matrix<double> inj(m.rows(), m.cols());
  if (!a.para()) inj = peft_test::scaled(peft_test::to_double(a.R()), a.scaling());
  return peft_test::ref_nn(q, peft_test::add(inj, m, -1.0));
}

template <class T>
peft::matrix<double> grad_of(peft::deft<T>& a, const std::string& name) {
  for (auto& p : a.parameters())
    if (p.name == name) return peft_test::to_double(p.grad);
  FAIL("no parameter " << name);
  return {};
}

peft::io::adapter_config deft_config(ix r, const std::string& extra = "") {
  return peft::io::adapter_config::parse(R"({"peft_type": "DEFT", "target_modules": ["layer"], "r": )" +
                                         std::to_string(r) + extra + "}");
}

peft::dense<float> conv1d_base(const peft::io::safetensors_file& base, const std::string& name) {
  const auto wt = base.read_matrix<float>(name + ".weight");  // (in, out)
  peft::matrix<float> w(wt.cols(), wt.rows());
  for (ix i = 0; i < wt.rows(); ++i)
    for (ix o = 0; o < wt.cols(); ++o) w(o, i) = wt(i, o);
  return peft::dense<float>(std::move(w), base.read<float>(name + ".bias"));
}

}  // namespace

TEMPLATE_TEST_CASE("deft reproduces PEFT: layers, network, merged weights", "[deft][golden]", float, double) {
  using A = peft::deft<TestType>;
  for (const auto& name : linear_cases) peft_test::check_golden<A>(name);
}

TEMPLATE_TEST_CASE("deft reproduces PEFT on GPT-2's Conv1D layout (fan_in_fan_out)", "[deft][golden]", float, double) {
  using T = TestType;
  const auto dir = peft_test::golden_dir("deft_conv1d");
  const auto base = peft::io::safetensors_file::open(dir / "base_model.safetensors");
  const auto ref = peft::io::safetensors_file::open(dir / "reference.safetensors");
  auto ck = peft::io::load_checkpoint_as<peft::deft<T>>(dir / "adapter");
  CHECK(ck.config.fan_in_fan_out);
  const double tol = tolerance<T>();
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    peft::adapted_linear<peft::dense<float>, peft::deft<T>> layer(conv1d_base(base, name));
    layer.add_adapter("default", ck.find(name + ".weight")->adapter);
    CHECK(layer.adapter("default").scaling() == 2.0);  // alpha 8 / r 4
    const auto x = ref.read_matrix<T>("layer." + name + ".input");
    const auto g = ref.read_matrix<T>("layer." + name + ".grad_output");
    REQUIRE(peft_test::count_nonzero(x) > x.size() / 4);  // the down input is a relu output
    REQUIRE(peft_test::count_nonzero(g) > g.size() / 4);  // up's is masked by the relu
    peft::matrix<T> y(x.rows(), layer.out_features()), dx(x.rows(), layer.in_features());
    layer.forward(x, y);
    layer.zero_grad();
    layer.backward(x, g, dx);
    CHECK(rel_error(y, ref.read_matrix<double>("layer." + name + ".output")) < tol);
    CHECK(rel_error(dx, ref.read_matrix<double>("layer." + name + ".grad_input")) < tol);
    for (auto& p : layer.adapter("default").parameters()) {
      INFO(p.name);
      CHECK(rel_error(p.grad, ref.read_matrix<double>("grad.base_model.model." + name + "." + p.name + ".default")) < tol);
    }
    // merged weight, stored (in, out) by PEFT
    layer.merge("default");
    const auto mt = ref.read_matrix<double>("merged." + name + ".weight");
    peft::matrix<double> m(mt.cols(), mt.rows());
    for (ix i = 0; i < mt.rows(); ++i)
      for (ix o = 0; o < mt.cols(); ++o) m(o, i) = mt(i, o);
    CHECK(rel_error(layer.base().weight(), m) < 1e-6);
  }
}

TEST_CASE("deft golden deviations from PEFT (printed)", "[.deft_report]") {
  for (const auto& name : linear_cases) {
    peft_test::golden_case<peft::deft<double>> c(name);
    double worst = 0;
    for (const std::string l : {"up", "down"}) {
      const auto r = peft_test::run_layer(c, l);
      worst = std::max(worst, rel_error(r.y, c.ref("layer." + l + ".output")));
      worst = std::max(worst, rel_error(r.dx, c.ref("layer." + l + ".grad_input")));
      for (const auto& p : c.layer(l).adapter("default").parameters()) {
        worst = std::max(worst, rel_error(p.grad, c.ref("grad.base_model.model." + l + "." + p.name + ".default")));
      }
    }
    std::cout << name << ": max rel deviation (double) " << worst << "\n";
  }
}

TEST_CASE("deft's init from the base equals PEFT's: R = right^T W0 / s for PEFT's P", "[deft][golden]") {
  // init.safetensors: PEFT's P and R right after get_peft_model (float32, init_weights true).
  for (const std::string name : {"deft_relu_alpha", "deft_qr_alpha"}) {
    INFO("case " << name);
    const auto dir = peft_test::golden_dir(name);
    const auto base = peft::io::safetensors_file::open(dir / "base_model.safetensors");
    const auto init = peft::io::safetensors_file::open(dir / "init.safetensors");
    auto ck = peft::io::load_checkpoint_as<peft::deft<double>>(dir / "adapter");
    for (const std::string l : {"up", "down"}) {
      INFO("layer " << l);
      const auto& trained = ck.find(l + ".weight")->adapter;
      const peft::dense<double> w(base.read_matrix<double>(l + ".weight"), base.read<double>(l + ".bias"));
      const auto p = init.read_matrix<double>(l + ".deft_P");
      const auto r_peft = init.read_matrix<double>(l + ".deft_R");
      REQUIRE(p.cols() == trained.rank());  // r capped at out_features on down (qr_alpha: 8 -> 6)
      // The adapter with PEFT's P and R is a no-op to float rounding...
      const peft::deft<double> a(p, r_peft, trained.projection(), trained.alpha(), 0);
      peft::matrix<double> dw(w.out_features(), w.in_features());
      a.delta_weight(w, dw.view());
      CHECK(peft_test::max_abs(dw) < 1e-6);
      // ... and R is right^T W0 / s from PEFT's P, as the init constructor computes it.
      peft::matrix<double> right = p;
      if (trained.projection() == deft_projection::qr) {
        right = reference_q(p);
      } else {
        for (auto& v : right.storage()) v = std::max(v, 0.0);
      }
      const auto r_ref = peft_test::scaled(peft_test::ref_tn(right, w.weight()), 1.0 / trained.scaling());
      CHECK(rel_error(r_peft, r_ref) < 1e-6);  // PEFT computed it in float32
    }
  }
}

TEST_CASE("deft golden checkpoints: ranks capped at out_features, alpha, para, projection", "[deft][golden]") {
  auto load = [](const std::string& name) {
    return peft_test::load_bound<peft::deft<double>>(
        peft_test::golden_dir(name) / "adapter",
        peft::io::safetensors_file::open(peft_test::golden_dir(name) / "base_model.safetensors"));
  };
  auto ck = load("deft_relu");  // r 8: up (10, 12) keeps 8, down (6, 10) is capped to 6
  CHECK(ck.find("up.weight")->adapter.rank() == 8);
  CHECK(ck.find("down.weight")->adapter.rank() == 6);
  CHECK(ck.find("up.weight")->adapter.scaling() == 1.0);
  CHECK(ck.find("up.weight")->adapter.projection() == deft_projection::relu);
  auto qa = load("deft_qr_alpha");  // alpha 4: s = 4 / 8 on up, 4 / 6 on down
  CHECK(qa.find("up.weight")->adapter.scaling() == 0.5);
  CHECK(std::abs(qa.find("down.weight")->adapter.scaling() - 4.0 / 6.0) < 1e-15);
  CHECK(qa.find("down.weight")->adapter.projection() == deft_projection::qr);
  auto pr = load("deft_para_qr");
  CHECK(pr.find("up.weight")->adapter.para());
  CHECK(pr.find("up.weight")->adapter.parameters().size() == 1);
  CHECK(pr.find("down.weight")->adapter.in_features() == 10);  // from the base (no deft_R)
}

TEST_CASE("deft golden checkpoints save and load back: tensors and config fields", "[deft][golden]") {
  for (const auto& name : all_cases) {
    INFO("case " << name);
    auto ck = peft::io::load_checkpoint_as<peft::deft<double>>(peft_test::golden_dir(name) / "adapter");
    auto back = peft_test::save_and_load(ck, "peft_deft_golden_" + name);
    CHECK(back.config.peft_type == "DEFT");
    for (const char* k : {"r", "decomposition_method", "alpha", "para", "init_scale", "deft_dropout", "init_weights",
                          "fan_in_fan_out", "bias"}) {
      INFO(k);
      CHECK(back.config.raw.value(k, nlohmann::ordered_json()) == ck.config.raw.value(k, nlohmann::ordered_json()));
    }
    auto again = peft_test::save_and_load(back, "peft_deft_golden2_" + name);
    REQUIRE(back.modules.size() == 2);
    REQUIRE(again.modules.size() == 2);
    for (auto& m : ck.modules) {
      INFO(m.weight_name);
      auto pa = m.adapter.parameters();
      auto pb = back.find(m.weight_name)->adapter.parameters();
      auto pc = again.find(m.weight_name)->adapter.parameters();
      REQUIRE(pa.size() == (m.adapter.para() ? 1u : 2u));
      REQUIRE(pb.size() == pa.size());
      REQUIRE(pc.size() == pa.size());
      for (std::size_t i = 0; i < pa.size(); ++i) {
        INFO(pa[i].name);
        CHECK(pb[i].name == pa[i].name);
        CHECK(pb[i].shape == pa[i].shape);
        CHECK(rel_error(pb[i].value, pa[i].value) == 0.0);  // f32 values saved as f32
        CHECK(rel_error(pc[i].value, pa[i].value) == 0.0);
      }
    }
  }
}

TEMPLATE_TEST_CASE("deft passes equal a double reference of Q (s R - right^T W0)", "[deft]", float, double) {
  using T = TestType;
  peft::rng g(23);
  const ix batch = 3;
  for (const auto& [in, out, r] : std::vector<std::tuple<ix, ix, ix>>{{12, 10, 4}, {5, 9, 1}, {16, 6, 6}}) {
    for (const auto proj : {deft_projection::relu, deft_projection::qr}) {
      for (const bool para : {false, true}) {
        for (const double alpha : {0.0, 6.0}) {
          // qr with r = out and para removes all of W0 (Q Q^T = I): W' = 0, and relative
          // errors of a zero dx compare rounding noise. Covered by the golden deft_qr_alpha's
          // down layer with R.
          if (proj == deft_projection::qr && para && r == out) continue;
          INFO("in " << in << ", out " << out << ", r " << r << ", qr " << (proj == deft_projection::qr) << ", para "
                     << para << ", alpha " << alpha);
          peft::deft<T> a(peft_test::random_matrix<T>(out, r, g),
                          para ? peft::matrix<T>() : peft_test::random_matrix<T>(r, in, g), proj, alpha, in);
          const peft::dense<double> base(peft_test::random_matrix<double>(out, in, g),
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
  }
}

TEST_CASE("deft gradients equal finite differences in double (P, R, x)", "[deft]") {
  peft::rng g(41);
  const ix in = 7, out = 6, batch = 3;
  for (const ix r : {3, 6}) {  // r = out: a square P (qr's Q is orthogonal)
    for (const auto proj : {deft_projection::relu, deft_projection::qr}) {
      for (const bool para : {false, true}) {
        if (proj == deft_projection::qr && para && r == out) continue;  // W' = 0, P has no gradient
        INFO("r " << r << ", qr " << (proj == deft_projection::qr) << ", para " << para);
        peft::deft<double> a(peft_test::random_matrix<double>(out, r, g),
                             para ? peft::matrix<double>() : peft_test::random_matrix<double>(r, in, g), proj, 3.0, in);
        const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
        auto x = peft_test::random_matrix<double>(batch, in, g);
        const auto gy = peft_test::random_matrix<double>(batch, out, g);
        REQUIRE(peft_test::nontrivial(x));
        typename peft::deft<double>::cache_type cache;
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
        std::size_t k = 0;
        for (auto& p : a.parameters()) {
          INFO(p.name);
          REQUIRE(peft_test::max_abs(grads[k]) > 1e-3);
          CHECK(rel_error(grads[k], peft_test::fd_gradient(p.value, 1e-6, loss)) < 1e-7);
          ++k;
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("deft over f32, int8 and q4_0 bases reads W0 as each base stores it", "[deft]", float, double) {
  using T = TestType;
  peft::rng g(29);
  const ix in = 64, out = 12, r = 4, batch = 4;
  const auto wf = peft_test::random_matrix<float>(out, in, g);
  const auto bf = peft_test::random_vector<float>(out, g);
  const peft::matrix_view<const float> wv(wf.view());
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  REQUIRE(peft_test::nontrivial(x));
  for (const auto proj : {deft_projection::relu, deft_projection::qr}) {
    const peft::deft<T> a0(peft_test::random_matrix<T>(out, r, g), peft_test::random_matrix<T>(r, in, g), proj, 8.0, in);
    auto check = [&](const auto& w) {
      // The term over the quantized base against the same adapter over its dequantized W0 in
      // double, and against the definition.
      const auto w0 = weight_of(w);
      const peft::dense<double> exact(w0);
      peft::deft<T> a = a0, b = a0;
      a.zero_grad();
      b.zero_grad();
      typename peft::deft<T>::cache_type ca, cb;
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
      CHECK(rel_error(grad_of(a, "deft_P"), grad_of(b, "deft_P")) < tol);
      CHECK(rel_error(grad_of(a, "deft_R"), grad_of(b, "deft_R")) < tol);
      peft::matrix<T> dwa(out, in);
      a.delta_weight(w, dwa.view());
      CHECK(rel_error(dwa, delta_of(a0, w0)) < tol);
    };
    check(peft::dense<float>::from(wv, bf.data()));
    check(peft::int8_rowwise::quantize(wv));
    check(peft::q4_0::quantize(wv, bf.data()));
  }
}

TEMPLATE_TEST_CASE("deft at PEFT's init: R = right^T W0 / s, P ~ N(0, 0.02), r capped", "[deft]", float, double) {
  using T = TestType;
  peft::rng g(7);
  const ix in = 40, out = 30, batch = 4;
  const auto w = peft_test::random_dense<T>(in, out, g);
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  REQUIRE(peft_test::nontrivial(x));
  for (const auto proj : {deft_projection::relu, deft_projection::qr}) {
    INFO("qr " << (proj == deft_projection::qr));
    peft::deft<T> a(w, {.rank = 8, .projection = proj, .seed = 2});
    CHECK(a.rank() == 8);
    REQUIRE(peft_test::count_nonzero(a.R()) == a.R().size());
    // s = 1: A = R - M is exactly zero, the output is the base's.
    peft_test::check_output_is_base(a, w, x);
    peft::matrix<T> dw(out, in);
    a.delta_weight(w, dw.view());
    CHECK(peft_test::max_abs(dw) == 0.0);
    double sq = 0;
    const auto pd = peft_test::to_double(a.P());
    for (const double v : pd.storage()) sq += v * v;
    CHECK(std::abs(std::sqrt(sq / static_cast<double>(a.P().size())) - 0.02) < 0.003);  // 240 draws
    // with alpha the delta is zero to rounding (R = M / s, then s R - M)
    peft::deft<T> al(w, {.rank = 8, .projection = proj, .alpha = 3.0, .seed = 2});
    CHECK(al.scaling() == 3.0 / 8.0);
    al.delta_weight(w, dw.view());
    CHECK(peft_test::max_abs(dw) < tolerance<T>(1e-15, 1e-7));
    // init_weights false: R ~ N(0, 0.02 init_scale), a visible change
    peft::deft<T> rnd(w, {.rank = 8, .projection = proj, .init_weights = false, .init_scale = 50.0, .seed = 3});
    peft_test::check_not_base(rnd, w, x, 1e-3);
    // para: no R
    peft::deft<T> pa(w, {.rank = 8, .projection = proj, .para = true, .seed = 4});
    CHECK(pa.parameters().size() == 1);
    CHECK(pa.R().empty());
    peft_test::check_not_base(pa, w, x, 1e-5);
    // r > out_features is capped as PEFT does
    const auto narrow = peft_test::random_dense<T>(in, 3, g);
    const peft::deft<T> capped(narrow, {.rank = 8, .projection = proj});
    CHECK(capped.rank() == 3);
    CHECK(capped.R().rows() == 3);
  }
}

TEMPLATE_TEST_CASE("deft merge and unmerge are exact; the merged weight alone undoes relu, not qr", "[deft]", float,
                   double) {
  using T = TestType;
  peft::rng g(11);
  const ix in = 9, out = 7, r = 3, batch = 3;
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  for (const auto proj : {deft_projection::relu, deft_projection::qr}) {
    INFO("qr " << (proj == deft_projection::qr));
    const peft::deft<T> a(peft_test::random_matrix<T>(out, r, g), peft_test::random_matrix<T>(r, in, g), proj, 2.0, in);
    const peft::dense<T> w0(peft_test::random_matrix<T>(out, in, g), peft_test::random_vector<T>(out, g));
    peft::adapted_linear<peft::dense<T>, peft::deft<T>> layer(w0);
    layer.add_adapter("a", a);
    peft::matrix<T> before(batch, out), after(batch, out);
    layer.forward(x, before);
    layer.merge("a");
    layer.forward(x, after);
    CHECK(rel_error(after, before) < tolerance<T>(1e-13, 1e-5));
    layer.unmerge("a");
    CHECK(rel_error(layer.base().weight(), w0.weight()) < tolerance<T>(1e-15, 1e-6));

    // Without the M merging remembered (another adapter object, another base object).
    peft::matrix<T> dw(out, in);
    a.delta_weight(w0, dw.view());
    peft::dense<T> merged(w0);
    merged.add_to_weight(peft::matrix_view<const T>(dw.view()), 1.0);
    const peft::deft<T> fresh = a;  // remembers M of w0, not of `merged`
    peft::matrix<T> back(out, in);
    if (proj == deft_projection::relu) {
      fresh.unmerge_delta(merged, back.view());
      CHECK(rel_error(back, dw) < tolerance<T>(1e-10, 1e-4));
    } else {
      CHECK(message_of([&] { fresh.unmerge_delta(merged, back.view()); })
                .starts_with("[deft::unmerge_delta] with decomposition_method qr"));
    }
  }
}

TEMPLATE_TEST_CASE("deft rejects bad shapes and bad checkpoints with clear errors", "[deft]", float, double) {
  using T = TestType;
  using peft_test::arg;
  using peft_test::pass;
  peft::rng g(3);
  const auto w = peft_test::random_dense<T>(12, 8, g);
  peft::deft<T> a(w, {.rank = 2, .init_weights = false, .seed = 1});
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 8, 16, "[deft::forward] base weight is (8, 16)"},
                                 {pass::forward, arg::x, 2, 11},
                                 {pass::backward, arg::dx, 2, 11},
                                 {pass::delta_weight, arg::dw, 8, 11, "[deft::delta_weight]"}});
  CHECK(message_of([&] { peft::deft<T>(w, {.rank = 0}); }).starts_with("[deft::deft] rank must be >= 1"));
  CHECK(message_of([] { peft::deft<T>(peft::matrix<T>(3, 4), peft::matrix<T>(4, 5), deft_projection::relu, 0); })
            .starts_with("[deft::deft] deft_P is (3, 4), expected (out_features, r) with 1 <= r <= out_features"));
  CHECK(message_of([] { peft::deft<T>(peft::matrix<T>(6, 2), peft::matrix<T>(3, 5), deft_projection::relu, 0); })
            .starts_with("[deft::deft] deft_R is (3, 5)"));
  peft::deft<T> para(peft::matrix<T>(6, 2), peft::matrix<T>(), deft_projection::qr, 0);
  CHECK(para.in_features() == 0);
  para.set_features(9, 6);
  CHECK(para.in_features() == 9);
  CHECK(message_of([&] { para.set_features(10, 6); }).starts_with("[deft::set_features]"));

  const peft::io::checkpoint_tensors<T> none;
  auto tensors = [&](ix r, ix in, ix out) {
    return peft_test::random_tensors<T>("layer", {{"deft_P", {out, r}}, {"deft_R", {r, in}}}, g);
  };
  auto load = [&](const peft::io::adapter_config& c, const peft::io::checkpoint_tensors<T>& m) {
    return message_of([&] { peft::io::from_checkpoint<peft::deft<T>>(c, m, none); });
  };
  const auto ok = peft::io::from_checkpoint<peft::deft<T>>(deft_config(2), tensors(2, 12, 8), none);
  CHECK(ok.rank() == 2);
  CHECK(ok.in_features() == 12);
  // r = 8 on a 4-wide layer: PEFT's min(r, out) = 4
  CHECK(peft::io::from_checkpoint<peft::deft<T>>(deft_config(8), tensors(4, 12, 4), none).rank() == 4);
  CHECK(load(deft_config(4), tensors(2, 12, 8))
            .starts_with("[deft::from_checkpoint] module 'layer' has rank 2 (deft_P [8, 2]) but adapter_config.json "
                         "gives r = 4"));
  CHECK(load(deft_config(2, R"(, "decomposition_method": "svd")"), tensors(2, 12, 8))
            .starts_with("[deft::from_checkpoint] adapter_config.json: 'decomposition_method' = \"svd\""));
  CHECK(load(deft_config(2, R"(, "para": true)"), tensors(2, 12, 8))
            .starts_with("[deft::from_checkpoint] module 'layer' has deft_R but adapter_config.json says para = true"));
  CHECK(load(deft_config(2, R"(, "para": 1)"), tensors(2, 12, 8))
            .starts_with("[deft::from_checkpoint] adapter_config.json: 'para' must be"));
  auto no_r = peft_test::random_tensors<T>("layer", {{"deft_P", {8, 2}}}, g);
  CHECK(load(deft_config(2), no_r).starts_with("[deft::from_checkpoint] module 'layer' has no tensor 'deft_R'"));
  CHECK(load(deft_config(2, R"(, "para": true)"), no_r).empty());
  auto bad_r = peft_test::random_tensors<T>("layer", {{"deft_P", {8, 2}}, {"deft_R", {3, 12}}}, g);
  CHECK(load(deft_config(2), bad_r).find("deft_R [3, 12] and deft_P [8, 2] are not (r, in) and (out, r)") !=
        std::string::npos);
  auto wrong_base = tensors(2, 12, 8);
  wrong_base.set_base_shape(std::pair<ix, ix>{8, 13});
  CHECK(load(deft_config(2), wrong_base).find("do not fit the base's (8, 13)") != std::string::npos);
}

TEST_CASE("deft checkpoints: config fields honoured or refused by name", "[deft]") {
  namespace fs = std::filesystem;
  const auto dir = peft_test::scratch_path("peft_deft_fields");
  auto load_with = [&](const char* key, nlohmann::ordered_json v) {
    fs::remove_all(dir);
    peft_test::rewrite_adapter("deft_relu", dir, [&](nlohmann::ordered_json& c) { c[key] = v; });
    return message_of([&] { peft::io::load_checkpoint_as<peft::deft<double>>(dir); });
  };
  CHECK(load_with("deft_dropout", 0.1).empty());  // dropout on the input while training only
  CHECK(load_with("init_scale", 3.0).empty());    // R's initial spread
  CHECK(load_with("init_weights", false).empty());
  CHECK(load_with("fan_in_fan_out", true).empty());
  CHECK(load_with("alpha", 16).empty());
  CHECK(load_with("decomposition_method", "qr").empty());
  CHECK(load_with("decomposition_method", "cholesky")
            .starts_with("[deft::from_checkpoint] adapter_config.json: 'decomposition_method' = \"cholesky\""));
  CHECK(load_with("bias", "all").starts_with("[deft::from_checkpoint] adapter_config.json: 'bias'"));
  CHECK(load_with("bias", "deft_only").starts_with("[deft::from_checkpoint] adapter_config.json: 'bias'"));
  CHECK(load_with("use_dora", true).starts_with("[deft::from_checkpoint] adapter_config.json: 'use_dora' = true"));
  CHECK(load_with("para", true).starts_with("[deft::from_checkpoint] module '"));
  CHECK(load_with("r", 4).find("has rank") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("deft save: one config for every module, or refused", "[deft]") {
  peft::rng g(9);
  peft::io::basic_peft_checkpoint<peft::deft<double>> ck;
  ck.config = peft::io::adapter_config::lora(8, 8.0, {});  // a LoRA config: its fields go
  ck.config.targets_kind = peft::io::target_kind::none;
  const auto w1 = peft_test::random_dense<double>(12, 8, g), w2 = peft_test::random_dense<double>(6, 2, g);
  ck.modules.push_back({"model.a", "model.a.weight",
                        peft::deft<double>(w1, {.rank = 4, .projection = deft_projection::qr, .alpha = 8, .init_weights = false, .seed = 1})});
  // r 4 capped to 2 on a 2-output layer: the same config
  ck.modules.push_back({"model.b", "model.b.weight",
                        peft::deft<double>(w2, {.rank = 4, .projection = deft_projection::qr, .alpha = 8, .init_weights = false, .seed = 2})});
  auto back = peft_test::save_and_load(ck, "peft_deft_roundtrip");
  CHECK(back.config.peft_type == "DEFT");
  CHECK(back.config.raw["r"] == 4);
  CHECK(back.config.raw["alpha"] == 8);
  CHECK(back.config.raw["decomposition_method"] == "qr");
  CHECK(back.config.raw["para"] == false);
  CHECK(!back.config.raw.contains("lora_alpha"));
  REQUIRE(back.modules.size() == 2);
  CHECK(back.find("model.b.weight")->adapter.rank() == 2);
  CHECK(back.find("model.b.weight")->adapter.scaling() == 4.0);  // alpha 8 / capped r 2
  for (auto& m : ck.modules) {
    auto pa = m.adapter.parameters();
    auto pb = back.find(m.weight_name)->adapter.parameters();
    REQUIRE(pa.size() == pb.size());
    for (std::size_t i = 0; i < pa.size(); ++i) CHECK(rel_error(pb[i].value, pa[i].value) < 1e-7);  // stored as f32
  }
  ck.modules.push_back({"model.c", "model.c.weight",
                        peft::deft<double>(w1, {.rank = 4, .projection = deft_projection::relu, .alpha = 8, .seed = 3})});
  CHECK(message_of([&] { peft_test::save_and_load(ck, "peft_deft_mixed"); })
            .starts_with("[deft::describe_in] module 'model.c'"));
}

}  // namespace test_deft
