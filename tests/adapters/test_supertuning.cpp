// Super-Tuning: parity with HuggingFace PEFT 0.21.2 (tests/data/peft/supertuning_*, made by
// scripts/make_supertuning_golden.py: Super top and bottom, Supra with PEFT's default and an
// explicit lora_alpha, sparsity 0), PEFT's topk indices recomputed from the base, the passes
// against the dense delta S + s B A written from the definition over every base format,
// gradients against finite differences, saving and loading, and the refusals.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/supertuning.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/quantized_formats.hpp"
#include "peft/io/peft/supertuning.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_supertuning {

using ix = peft::index;

namespace {

using peft_test::message_of;
using peft_test::rel_error;
using peft_test::tolerance;

const std::vector<std::string> cases = {"supertuning_super", "supertuning_bottom", "supertuning_supra",
                                        "supertuning_supra_alpha", "supertuning_full"};

/// PEFT's in-memory name of a parameter: supertuning_values.default, supertuning_lora_A.default.weight.
std::string peft_name(const std::string& p) {
  const std::string w = ".weight";
  if (p.ends_with(w)) return p.substr(0, p.size() - w.size()) + ".default" + w;
  return p + ".default";
}

/// Every trainable gradient of layer `name` against PEFT's; all of PEFT's are covered.
template <class T>
void check_gradients(peft_test::golden_case<peft::supertuning<T>>& c, const std::string& name, double tol) {
  std::size_t checked = 0;
  for (const auto& p : c.layer(name).adapter("default").parameters()) {
    if (!p.trainable) continue;
    INFO("gradient of " << p.name);
    const auto ref = c.ref("grad.base_model.model." + name + "." + peft_name(p.name));
    REQUIRE(peft_test::count_nonzero(ref) > ref.size() / 2);
    CHECK(rel_error(p.grad, ref) < tol);
    ++checked;
  }
  CHECK(checked == c.reference_gradients(name));
}

/// dW = S + s B A in double from the definition.
template <class T>
peft::matrix<double> delta_of(const peft::supertuning<T>& a) {
  peft::matrix<double> dw(a.out_features(), a.in_features());
  if (a.has_lora()) {
    dw = peft_test::ref_nn(peft_test::to_double(a.B()), peft_test::to_double(a.A()));
    for (auto& v : dw.storage()) v *= a.lora_alpha() / static_cast<double>(a.rank());
  }
  const auto v = peft_test::to_double(a.values());
  for (std::size_t t = 0; t < a.indices().size(); ++t) {
    dw.data()[a.indices()[t]] += v(0, static_cast<ix>(t));
  }
  return dw;
}

/// W0 of any base, dequantized in double.
template <class Base>
peft::matrix<double> weight_of(const Base& w) {
  peft::matrix<double> m(w.out_features(), w.in_features());
  for (ix o = 0; o < m.rows(); ++o) w.dequantize_row(o, m.row(o));
  return m;
}

/// Brute force: the flat positions sorted by |W0| (descending for top), ties by position.
std::vector<std::int64_t> brute_top(const peft::matrix<double>& w, ix k, bool top) {
  std::vector<std::int64_t> pos(static_cast<std::size_t>(w.size()));
  for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<std::int64_t>(i);
  std::stable_sort(pos.begin(), pos.end(), [&](std::int64_t a, std::int64_t b) {
    const double sa = std::abs(w.data()[a]), sb = std::abs(w.data()[b]);
    return top ? sa > sb : sa < sb;
  });
  pos.resize(static_cast<std::size_t>(k));
  return pos;
}

template <class T>
peft::matrix<double> grad_of(peft::supertuning<T>& a, const std::string& name) {
  for (auto& p : a.parameters())
    if (p.name == name) return peft_test::to_double(p.grad);
  FAIL("no parameter " << name);
  return {};
}

peft::rng& peft_rng() {
  static peft::rng g(17);
  return g;
}

}  // namespace

TEMPLATE_TEST_CASE("supertuning reproduces PEFT: layers, network, merged weights", "[supertuning][golden]", float,
                   double) {
  using A = peft::supertuning<TestType>;
  for (const auto& name : cases) {
    peft_test::check_golden<A>(
        name,
        [](auto& c, double tol) {
          for (const std::string l : {"up", "down"}) {
            INFO("layer " << l);
            const auto& a = c.layer(l).adapter("default");
            REQUIRE(peft_test::count_nonzero(a.values()) == a.entries());
            peft_test::check_layer_outputs(c, l, tol);
            check_gradients(c, l, tol);
          }
        },
        [](auto& c, double tol) {
          peft_test::check_network_outputs(c, tol);
          check_gradients(c, "up", tol);
          check_gradients(c, "down", tol);
        },
        peft_test::check_merge<A>);
  }
}

TEST_CASE("supertuning golden checkpoints: K, r, lora_alpha as PEFT sized them", "[supertuning][golden]") {
  struct expect {
    const char* name;
    ix k_up, rank;
    double alpha;
  };
  // supertuning_super: 0.9 of 120 entries leaves int(120 (1 - 0.9)) = 11, not 12.
  for (const auto& e : {expect{"supertuning_super", 11, 0, 0.0}, expect{"supertuning_bottom", 37, 0, 0.0},
                        expect{"supertuning_supra", 23, 4, 8.0}, expect{"supertuning_supra_alpha", 8, 2, 3.0},
                        expect{"supertuning_full", 63, 3, 6.0}}) {
    INFO("case " << e.name);
    peft_test::golden_case<peft::supertuning<double>> c(e.name);
    const auto& a = c.up.adapter("default");
    CHECK(a.entries() == e.k_up);
    CHECK(a.entries() == peft::supertuning_entries(a.out_features(), a.in_features(),
                                                   c.checkpoint.config.number("sparsity", 0.99, "test")));
    CHECK(a.rank() == e.rank);
    CHECK(a.lora_alpha() == e.alpha);
    CHECK(a.has_lora() == (e.rank > 0));
  }
}

TEST_CASE("supertuning's indices from the base equal PEFT's topk (order included)", "[supertuning][golden]") {
  for (const auto& name : cases) {
    INFO("case " << name);
    peft_test::golden_case<peft::supertuning<double>> c(name);
    const auto& cfg = c.checkpoint.config;
    for (const std::string l : {"up", "down"}) {
      const auto& stored = c.layer(l).adapter("default");
      peft::supertuning_options o;
      o.sparsity = cfg.number("sparsity", 0.99, "test");
      o.select_top = cfg.boolean("select_top", true, "test");
      o.rank = stored.rank();
      const peft::supertuning<double> fresh(c.layer(l).base(), o);
      CHECK(fresh.indices() == stored.indices());
      peft_test::check_output_is_base(fresh, c.layer(l).base(), c.ref_t("layer." + l + ".input"));
    }
  }
}

TEMPLATE_TEST_CASE("supertuning passes equal the dense delta S + s B A over every base format", "[supertuning]", float,
                   double) {
  using T = TestType;
  peft::rng g(31);
  const ix in = 256, out = 6, batch = 3;  // in: a multiple of every block format's size
  const auto wf = peft_test::random_matrix<float>(out, in, g);
  const auto bf = peft_test::random_vector<float>(out, g);
  const peft::matrix_view<const float> wv(wf.view());
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(gy));
  std::vector<std::int64_t> idx;
  for (std::int64_t f = 5; f < out * in; f += 37) idx.push_back(f);
  std::reverse(idx.begin(), idx.end());  // any order
  const auto vals = peft_test::random_vector<T>(static_cast<ix>(idx.size()), g);
  for (const bool supra : {false, true}) {
    INFO("supra " << supra);
    const peft::supertuning<T> a0 = supra ? peft::supertuning<T>(idx, vals, in, out, peft_test::random_matrix<T>(3, in, g),
                                                                 peft_test::random_matrix<T>(out, 3, g), 2.5)
                                          : peft::supertuning<T>(idx, vals, in, out);
    const auto dw = delta_of(a0);
    REQUIRE(peft_test::max_abs(dw) > 1e-2);
    auto check = [&](const auto& w) {
      INFO("base " << typeid(w).name());
      const auto w0 = weight_of(w);
      const double tol = tolerance<T>(1e-12, 2e-5);
      // forward: x (W0 + dW)^T + b
      peft::supertuning<T> a = a0;
      typename peft::supertuning<T>::cache_type cache;
      peft::matrix<T> y(batch, out), dx(batch, in), y_base(batch, out);
      a.forward(w, x.view(), y.view(), cache);
      w.matmul(peft::matrix_view<const T>(x.view()), y_base.view());
      const auto xd = peft_test::to_double(x);
      CHECK(rel_error(peft_test::add(y, y_base, -1.0), peft_test::ref_nt(xd, dw)) < tol);
      // backward: dx = g (W0 + dW), dv = (g^T x)[idx], dA, dB
      a.zero_grad();
      a.backward(w, x.view(), gy.view(), dx.view(), cache);
      const auto gd = peft_test::to_double(gy);
      CHECK(rel_error(dx, peft_test::ref_nn(gd, peft_test::add(w0, dw))) < tol);
      const auto gw = peft_test::ref_tn(gd, xd);  // dL/dW (out, in)
      peft::matrix<double> dv(1, static_cast<ix>(idx.size()));
      for (std::size_t t = 0; t < idx.size(); ++t) dv(0, static_cast<ix>(t)) = gw.data()[idx[t]];
      CHECK(rel_error(grad_of(a, "supertuning_values"), dv) < tol);
      if (supra) {
        const double s = 2.5 / 3.0;
        auto da = peft_test::ref_tn(peft_test::to_double(a.B()), gw);   // B^T dL/dW (r, in)
        auto db = peft_test::ref_nt(gw, peft_test::to_double(a.A()));   // dL/dW A^T (out, r)
        for (auto& v : da.storage()) v *= s;
        for (auto& v : db.storage()) v *= s;
        CHECK(rel_error(grad_of(a, "supertuning_lora_A.weight"), da) < tol);
        CHECK(rel_error(grad_of(a, "supertuning_lora_B.weight"), db) < tol);
      }
      peft::matrix<T> dwa(out, in);
      a.delta_weight(w, dwa.view());
      CHECK(rel_error(dwa, dw) < tol);
      std::vector<T> db(static_cast<std::size_t>(out));
      CHECK_FALSE(a.delta_bias(w, db.data()));
    };
    check(peft::dense<float>::from(wv, bf.data()));
    check(peft::dense<peft::bf16>::from(wv, bf.data()));
    check(peft::dense<double>(peft_test::to_double(wf), std::vector<double>(bf.begin(), bf.end())));
    peft::for_each_quantized_format([&](auto f) {
      using Q = typename decltype(f)::type;
      check(Q::quantize(wv, bf.data()));
    });
  }
}

TEST_CASE("supertuning's topk over a quantized base reads W0 as the base stores it", "[supertuning]") {
  peft::rng g(5);
  const ix in = 64, out = 5;
  const auto wf = peft_test::random_matrix<float>(out, in, g);
  const peft::matrix_view<const float> wv(wf.view());
  // int8 and nf4 (blocks of 64): codes repeat, so ties are many; they go to the lower index.
  for (const bool top : {true, false}) {
    const auto check = [&](const auto& w) {
      peft::supertuning_options o;
      o.sparsity = 0.9;
      o.select_top = top;
      const peft::supertuning<double> a(w, o);
      const ix k = peft::supertuning_entries(out, in, 0.9);
      CHECK(a.entries() == k);
      CHECK(a.indices() == brute_top(weight_of(w), k, top));
    };
    check(peft::int8_rowwise::quantize(wv));
    check(peft::nf4::quantize(wv));
    check(peft::q4_0::quantize(wv));
  }
}

TEST_CASE("supertuning gradients equal finite differences in double (values, A, B, x)", "[supertuning]") {
  peft::rng g(41);
  const ix in = 7, out = 6, batch = 3;
  auto a = peft::supertuning<double>({3, 17, 41, 0, 29}, peft_test::random_vector<double>(5, g), in, out,
                                     peft_test::random_matrix<double>(2, in, g), peft_test::random_matrix<double>(out, 2, g),
                                     3.0);
  const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
  auto x = peft_test::random_matrix<double>(batch, in, g);
  const auto gy = peft_test::random_matrix<double>(batch, out, g);
  REQUIRE(peft_test::nontrivial(x));
  typename peft::supertuning<double>::cache_type cache;
  auto loss = [&] {
    peft::matrix<double> y(batch, out);
    a.forward(w, x.view(), y.view(), cache);
    return peft_test::dot(y, gy);
  };
  a.zero_grad();
  peft::matrix<double> y(batch, out), dx(batch, in);
  a.forward(w, x.view(), y.view(), cache);
  a.backward(w, x.view(), gy.view(), dx.view(), cache);
  CHECK(rel_error(dx, peft_test::fd_gradient(x.view(), 1e-6, loss)) < 1e-7);
  std::vector<peft::matrix<double>> grads;
  for (auto& p : a.parameters()) grads.push_back(peft_test::to_double(p.grad));
  std::size_t k = 0, trained = 0;
  for (auto& p : a.parameters()) {
    INFO(p.name);
    if (p.trainable) {
      REQUIRE(peft_test::max_abs(grads[k]) > 1e-3);
      CHECK(rel_error(grads[k], peft_test::fd_gradient(p.value, 1e-6, loss)) < 1e-7);
      ++trained;
    }
    ++k;
  }
  CHECK(trained == 3);
}

TEMPLATE_TEST_CASE("supertuning at PEFT's init: v = 0, B = 0, lora_alpha 2 r, K = int(out in (1 - sparsity))",
                   "[supertuning]", float, double) {
  using T = TestType;
  peft::rng g(7);
  const ix in = 40, out = 30;
  const auto w = peft_test::random_dense<T>(in, out, g);
  const auto x = peft_test::random_matrix<T>(4, in, g);
  for (const ix r : {0, 4}) {
    peft::supertuning_options o;
    o.sparsity = 0.99;
    o.rank = r;
    o.seed = 3;
    peft::supertuning<T> a(w, o);
    CHECK(a.entries() == 12);  // int(1200 * 0.01)
    CHECK(a.rank() == r);
    CHECK(a.lora_alpha() == 2.0 * static_cast<double>(r));
    peft_test::check_output_is_base(a, w, x);
    if (r > 0) {
      CHECK(peft_test::count_nonzero(a.A()) == a.A().size());
      CHECK(peft_test::max_abs(a.B()) == 0.0);
    }
    o.init_weights = false;
    o.alpha = r > 0 ? 3.0 : 0.0;
    peft::supertuning<T> b(w, o);
    CHECK(peft_test::count_nonzero(b.values()) == b.entries());
    if (r > 0) {
      CHECK(b.lora_alpha() == 3.0);
      CHECK(peft_test::count_nonzero(b.B()) == b.B().size());
    }
    peft_test::check_not_base(b, w, x, 1e-3);
  }
  peft::supertuning_options bad;
  bad.sparsity = 1.0;
  CHECK_THROWS_WITH((peft::supertuning<T>(w, bad)), Catch::Contains("sparsity must be in [0, 1)"));
  bad.sparsity = 0.9999;
  CHECK_THROWS_WITH((peft::supertuning<T>(w, bad)), Catch::Contains("leaves no entry"));
  bad.sparsity = 0.5;
  bad.alpha = 4;
  CHECK_THROWS_WITH((peft::supertuning<T>(w, bad)), Catch::Contains("without a rank"));
}

TEST_CASE("supertuning merge and unmerge over adapted_linear", "[supertuning]") {
  peft::rng g(13);
  const ix in = 9, out = 7;
  const auto w = peft_test::random_dense<double>(in, out, g);
  const auto x = peft_test::random_matrix<double>(3, in, g);
  peft::adapted_linear<peft::dense<double>, peft::supertuning<double>> layer(w);
  layer.add_adapter("st", peft::supertuning<double>({62, 0, 30, 8}, {0.5, -1.0, 0.25, 2.0}, in, out,
                                                    peft_test::random_matrix<double>(2, in, g),
                                                    peft_test::random_matrix<double>(out, 2, g)));
  CHECK(layer.adapter("st").lora_alpha() == 4.0);  // PEFT's default 2 r
  peft::matrix<double> before(3, out), after(3, out);
  layer.forward(x.view(), before.view());
  layer.merge("st");
  CHECK(rel_error(layer.base().weight(), peft_test::add(peft_test::to_double(w.weight()), delta_of(layer.adapter("st")))) <
        1e-14);
  layer.forward(x.view(), after.view());
  CHECK(rel_error(after, before) < 1e-13);
  layer.unmerge("st");
  CHECK(rel_error(layer.base().weight(), w.weight()) < 1e-14);
}

TEST_CASE("supertuning golden checkpoints save and load back: tensors and config fields", "[supertuning][golden]") {
  for (const auto& name : cases) {
    INFO("case " << name);
    auto ck = peft::io::load_checkpoint_as<peft::supertuning<double>>(peft_test::golden_dir(name) / "adapter");
    auto back = peft_test::save_and_load(ck, "peft_supertuning_roundtrip");
    CHECK(back.config.peft_type == "SUPERTUNING");
    const auto j = back.config.to_json();
    CHECK(j["sparsity"] == ck.config.raw["sparsity"]);
    CHECK(j["r"] == ck.config.raw["r"]);  // null for Super
    CHECK(j["lora_alpha"] == ck.config.raw["lora_alpha"]);
    CHECK(j["save_precomputed_indices"] == true);
    for (const std::string l : {"up.weight", "down.weight"}) {
      auto& a = ck.find(l)->adapter;
      auto& b = back.find(l)->adapter;
      CHECK(a.indices() == b.indices());
      CHECK(rel_error(b.values(), peft_test::to_double(a.values())) < 1e-7);  // saved as f32
      CHECK(a.rank() == b.rank());
      if (a.has_lora()) CHECK(rel_error(b.A(), peft_test::to_double(a.A())) < 1e-7);
    }
  }
}

TEST_CASE("supertuning: an adapter made in C++ saves a config PEFT sizes the same way", "[supertuning]") {
  peft::rng g(3);
  const auto w = peft_test::random_dense<double>(12, 10, g);
  for (const ix r : {0, 2}) {
    peft::supertuning_options o;
    o.sparsity = 0.9;  // K = 11 of 120
    o.rank = r;
    o.init_weights = false;
    peft::io::basic_peft_checkpoint<peft::supertuning<double>> ck;
    ck.modules.push_back({"layer", "layer.weight", peft::supertuning<double>(w, o)});
    auto back = peft_test::save_and_load(ck, "peft_supertuning_fresh");
    const auto j = back.config.to_json();
    const double s = j["sparsity"].get<double>();
    CHECK(peft::supertuning_entries(10, 12, s) == 11);
    CHECK(j["r"] == (r > 0 ? peft::io::ordered_json(r) : peft::io::ordered_json(nullptr)));
    const auto& b = back.modules.front().adapter;
    CHECK(b.entries() == 11);
    CHECK(b.rank() == r);
  }
}

TEST_CASE("supertuning checkpoints: fields honoured or refused by name, bad tensors refused", "[supertuning]") {
  const auto dst = peft_test::scratch_path("peft_supertuning_refusals");
  auto load = [&] { return peft::io::load_checkpoint_as<peft::supertuning<double>>(dst); };
  // save_precomputed_indices false without the indices: refused naming the field and why.
  peft_test::rewrite_adapter("supertuning_super", dst, [](auto& j) { j["save_precomputed_indices"] = false; }, {},
                             {"base_model.model.up.supertuning_indices", "base_model.model.down.supertuning_indices"});
  auto msg = message_of([&] { load(); });
  CHECK_THAT(msg, Catch::Contains("save_precomputed_indices") && Catch::Contains("topk") &&
                      Catch::StartsWith("[supertuning::from_checkpoint]"));
  // ... but accepted when the checkpoint carries them nevertheless.
  std::filesystem::remove_all(dst);
  peft_test::rewrite_adapter("supertuning_super", dst, [](auto& j) { j["save_precomputed_indices"] = false; });
  CHECK(load().modules.size() == 2);
  // sparsity that does not give K on the layer (known from the LoRA part)
  std::filesystem::remove_all(dst);
  peft_test::rewrite_adapter("supertuning_supra", dst, [](auto& j) { j["sparsity"] = 0.5; });
  CHECK_THAT(message_of([&] { load(); }), Catch::Contains("entries, but sparsity 0.5") && Catch::Contains("gives int(out in (1 - sparsity))"));
  // lora_alpha without r; r without the LoRA tensors; LoRA tensors without r
  std::filesystem::remove_all(dst);
  peft_test::rewrite_adapter("supertuning_super", dst, [](auto& j) { j["lora_alpha"] = 4; });
  CHECK_THAT(message_of([&] { load(); }), Catch::Contains("'lora_alpha' is set but 'r' is null"));
  std::filesystem::remove_all(dst);
  peft_test::rewrite_adapter("supertuning_super", dst, [](auto& j) { j["r"] = 2; });
  CHECK_THAT(message_of([&] { load(); }), Catch::Contains("lacks supertuning_lora_A.weight"));
  std::filesystem::remove_all(dst);
  peft_test::rewrite_adapter("supertuning_supra", dst, [](auto& j) { j["r"] = nullptr; j["lora_alpha"] = nullptr; });
  CHECK_THAT(message_of([&] { load(); }), Catch::Contains("'r' is null"));
  // a field SupertuningConfig does not have
  std::filesystem::remove_all(dst);
  peft_test::rewrite_adapter("supertuning_super", dst, [](auto& j) { j["fan_in_fan_out"] = true; });
  CHECK_THAT(message_of([&] { load(); }), Catch::Contains("'fan_in_fan_out'"));
  std::filesystem::remove_all(dst);
  peft_test::rewrite_adapter("supertuning_super", dst, [](auto& j) { j["sparsity"] = 1.0; });
  CHECK_THAT(message_of([&] { load(); }), Catch::Contains("'sparsity' must be in [0, 1)"));
  // repeated, negative, fractional indices
  const std::string key = "base_model.model.up.supertuning_indices";
  const auto f = peft::io::safetensors_file::open(peft_test::golden_dir("supertuning_super") / "adapter" /
                                                  "adapter_model.safetensors");
  const auto stored = f.read<float>(key);
  const std::vector<std::int64_t> shape{static_cast<std::int64_t>(stored.size())};
  for (const auto& [edit, says] : {std::pair{0, "more than once"}, std::pair{1, "not an integer"},
                                   std::pair{2, "not an integer"}}) {
    auto v = stored;
    v[1] = edit == 0 ? v[0] : edit == 1 ? -1.0f : 2.5f;
    std::filesystem::remove_all(dst);
    peft_test::rewrite_adapter("supertuning_super", dst, [](auto&) {}, {{key, {shape, v}}});
    CHECK_THAT(message_of([&] { load(); }), Catch::Contains(says));
  }
  std::filesystem::remove_all(dst);
  // an index outside the layer, found when the shape is bound
  auto a = peft::supertuning<double>({3, 200}, {1.0, 2.0});
  CHECK(!a.bound());
  CHECK_THAT(message_of([&] { a.set_features(10, 12); }), Catch::Contains("outside the (12, 10) weight"));
  // float runs layers above 2^24 entries (indices are kept as integers) but cannot save them:
  // checkpoints go through T.
  peft::io::basic_peft_checkpoint<peft::supertuning<float>> big;
  big.modules.push_back({"layer", "layer.weight", peft::supertuning<float>({16785001, 5}, {1.0f, 2.0f}, 4097, 4097)});
  REQUIRE(big.modules.front().adapter.bound());
  CHECK(big.modules.front().adapter.sparse_part().indices()(0, 0) == 16785001 / 4097);
  CHECK(big.modules.front().adapter.sparse_part().indices()(1, 0) == 16785001 % 4097);
  CHECK_THAT(message_of([&] { peft_test::save_and_load(big, "peft_supertuning_big"); }),
             Catch::StartsWith("[supertuning::describe_in]") && Catch::Contains("save a supertuning<double>"));
  auto u = peft::supertuning<double>({3, 100}, {1.0, 2.0});
  const auto w = peft_test::random_dense<double>(10, 12, peft_rng());
  peft::matrix<double> x(1, 10), y(1, 12);
  typename peft::supertuning<double>::cache_type cache;
  CHECK_THAT(message_of([&] { u.forward(w, x.view(), y.view(), cache); }),
             Catch::StartsWith("[supertuning::forward]") && Catch::Contains("shape is unknown"));
  u.set_features(10, 12);
  CHECK(u.bound());
  CHECK_THAT(message_of([&] { u.set_features(12, 10); }), Catch::Contains("cannot bind"));
}

}  // namespace test_supertuning
