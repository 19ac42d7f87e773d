// LoKr: parity with HuggingFace PEFT 0.21 (tests/data/peft/lokr, lokr_full), PEFT's
// factorization and choice of forms, the low-rank forms against a double reference built from
// the formed Kronecker delta, initialisation, saving and loading, and the errors.
#include <catch2/catch.hpp>

#include <filesystem>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "peft/adapted_linear.hpp"
#include "peft/adapters/lokr.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/test_support.hpp"

using ix = peft::index;

namespace {

namespace fs = std::filesystem;
using peft::index;
using peft_test::rel_error;

const fs::path data_dir = fs::path(PEFT_TEST_DATA_DIR) / "peft";

template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 1e-5;
}

// ---- golden harness (the same in test_lokr/loha/adalora/ia3.cpp) ------------------------------

peft::dense<float> load_base(const peft::io::safetensors_file& f, const std::string& name) {
  return peft::dense<float>(f.read_matrix<float>(name + ".weight"), f.read<float>(name + ".bias"));
}

/// A PEFT case loaded with load_checkpoint_as<A>, each adapter on its frozen layer.
template <class A>
struct golden_case {
  using T = typename A::scalar;
  using layer_type = peft::adapted_linear<peft::dense<float>, A>;
  peft::io::safetensors_file base;
  peft::io::safetensors_file reference;
  peft::io::basic_peft_checkpoint<A> checkpoint;
  layer_type up;
  layer_type down;

  explicit golden_case(const std::string& name)
      : base(peft::io::safetensors_file::open(data_dir / name / "base_model.safetensors")),
        reference(peft::io::safetensors_file::open(data_dir / name / "reference.safetensors")),
        checkpoint(peft::io::load_checkpoint_as<A>(data_dir / name / "adapter")),
        up(load_base(base, "up")),
        down(load_base(base, "down")) {
    REQUIRE(checkpoint.modules.size() == 2);
    for (auto* l : {&up, &down}) {
      A a = checkpoint.find((l == &up ? "up" : "down") + std::string(".weight"))->adapter;
      if constexpr (requires { a.bind(index{}, index{}); }) a.bind(l->in_features(), l->out_features());
      l->add_adapter("default", std::move(a));
    }
  }
  layer_type& layer(const std::string& n) { return n == "up" ? up : down; }
  peft::matrix<double> ref(const std::string& n) const { return reference.read_matrix<double>(n); }
  peft::matrix<T> ref_t(const std::string& n) const { return reference.read_matrix<T>(n); }
  /// How many gradients the reference holds for a layer.
  std::size_t reference_gradients(const std::string& n) const {
    std::size_t k = 0;
    for (const auto& t : reference.tensors()) k += t.name.starts_with("grad.base_model.model." + n + ".") ? 1 : 0;
    return k;
  }
};

/// Every parameter gradient of the layer's adapter against PEFT's; all of PEFT's are covered.
template <class A>
void check_gradients(golden_case<A>& c, const std::string& name, double tol) {
  std::size_t checked = 0;
  for (const auto& p : c.layer(name).adapter("default").parameters()) {
    INFO("gradient of " << p.name);
    const auto ref = c.ref("grad.base_model.model." + name + "." + p.name + ".default");
    REQUIRE(peft_test::count_nonzero(ref) > ref.size() / 2);
    CHECK(rel_error(p.grad, ref) < tol);
    ++checked;
  }
  CHECK(checked == c.reference_gradients(name));
}

/// Each layer alone: output, dL/dinput, every parameter gradient.
template <class A>
void check_layers(golden_case<A>& c, double tol) {
  using T = typename A::scalar;
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto& layer = c.layer(name);
    const auto x = c.ref_t("layer." + name + ".input");
    const auto g = c.ref_t("layer." + name + ".grad_output");
    REQUIRE(peft_test::count_nonzero(x) > x.size() / 4);  // the down input is a relu output
    REQUIRE(peft_test::count_nonzero(g) > g.size() / 4);
    peft::matrix<T> y(x.rows(), layer.out_features());
    layer.forward(x, y);
    const auto y_ref = c.ref("layer." + name + ".output");
    CHECK(rel_error(y, y_ref) < tol);
    peft::matrix<T> y0(x.rows(), layer.out_features());
    layer.base().matmul(peft::matrix_view<const T>(x.view()), y0.view());
    REQUIRE(rel_error(y0, y_ref) > 1e-3);  // the adapter is not a no-op
    peft::matrix<T> dx(x.rows(), layer.in_features());
    layer.zero_grad();
    layer.backward(x, g, dx);
    CHECK(rel_error(dx, c.ref("layer." + name + ".grad_input")) < tol);
    check_gradients(c, name, tol);
  }
}

/// The network y = down(relu(up(x))) and dL/dx, with every gradient.
template <class A>
void check_network(golden_case<A>& c, double tol) {
  using T = typename A::scalar;
  const auto x = c.ref_t("x");
  const auto gy = c.ref_t("grad_y");
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(gy));
  peft::matrix<T> h(x.rows(), c.up.out_features()), a(h.rows(), h.cols()), y(x.rows(), c.down.out_features());
  c.up.forward(x, h);
  for (index i = 0; i < h.rows(); ++i)
    for (index j = 0; j < h.cols(); ++j) a(i, j) = h(i, j) > 0 ? h(i, j) : T{0};
  c.down.forward(a, y);
  CHECK(rel_error(y, c.ref("y")) < tol);
  peft::matrix<T> da(a.rows(), a.cols()), dx(x.rows(), x.cols());
  c.up.zero_grad();
  c.down.zero_grad();
  c.down.backward(a, gy, da);
  for (index i = 0; i < da.rows(); ++i)
    for (index j = 0; j < da.cols(); ++j) da(i, j) = h(i, j) > 0 ? da(i, j) : T{0};
  c.up.backward(x, da, dx);
  CHECK(rel_error(dx, c.ref("grad_x")) < tol);
  check_gradients(c, "up", tol);
  check_gradients(c, "down", tol);
}

/// merge_and_unload: the delta in double on a double base (1e-12), and adapted_linear::merge
/// into the f32 base (rounded to f32: 1e-6), weights and biases.
template <class A>
void check_merge(golden_case<A>& c) {
  using T = typename A::scalar;
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto& layer = c.layer(name);
    const auto w_ref = c.ref("merged." + name + ".weight");
    const peft::matrix<double> b_ref(1, layer.out_features(), c.reference.template read<double>("merged." + name + ".bias"));
    const auto w0 = c.base.template read_matrix<double>(name + ".weight");
    REQUIRE(rel_error(w0, w_ref) > 1e-3);
    {
      const peft::dense<double> exact(w0, c.base.template read<double>(name + ".bias"));
      const A& a = layer.adapter("default");
      peft::matrix<T> dw(layer.out_features(), layer.in_features());
      a.delta_weight(exact, dw.view());
      CHECK(rel_error(peft_test::add(w0, dw), w_ref) < tolerance<T>());
      std::vector<T> db(static_cast<std::size_t>(layer.out_features()));
      peft::matrix<double> b(1, layer.out_features(), exact.bias());
      if (a.delta_bias(exact, db.data())) b = peft_test::add(b, peft::matrix<T>(1, layer.out_features(), db));
      CHECK(rel_error(b, b_ref) < tolerance<T>());
    }
    layer.merge("default");
    CHECK(rel_error(layer.base().weight(), w_ref) < 1e-6);
    CHECK(rel_error(peft::matrix<float>(1, layer.out_features(), layer.base().bias()), b_ref) < 1e-6);
  }
}

template <class A>
void check_golden(const std::string& name) {
  using T = typename A::scalar;
  INFO("case " << name);
  const double tol = tolerance<T>();
  {
    golden_case<A> c(name);
    check_layers(c, tol);
  }
  {
    golden_case<A> c(name);
    check_network(c, tol);
  }
  {
    golden_case<A> c(name);
    check_merge(c);
  }
}

// ---- LoKr helpers ------------------------------------------------------------------------------

template <class T>
peft::io::stored_tensor<T> stored(peft::matrix<T> m) {
  peft::io::stored_tensor<T> s;
  s.shape = {m.rows(), m.cols()};
  s.data = std::make_shared<peft::matrix<T>>(std::move(m));
  return s;
}

template <class T>
peft::io::stored_tensor<T> stored(std::vector<std::int64_t> shape, peft::rng& g) {
  index rows = shape.empty() ? 1 : static_cast<index>(shape[0]), cols = 1;
  for (std::size_t i = 1; i < shape.size(); ++i) cols *= static_cast<index>(shape[i]);
  peft::io::stored_tensor<T> s;
  s.shape = std::move(shape);
  s.data = std::make_shared<peft::matrix<T>>(peft_test::random_matrix<T>(rows, cols, g));
  return s;
}

peft::io::adapter_config lokr_config(index r, double alpha, bool decompose_both, index factor = -1) {
  auto c = peft::io::adapter_config::parse(R"({"peft_type": "LOKR", "target_modules": ["layer"]})");
  c.r = r;
  c.raw["alpha"] = alpha;
  c.raw["decompose_both"] = decompose_both;
  c.raw["decompose_factor"] = factor;
  return c;
}

std::vector<std::string> names_of(peft::lokr<double>& a) {
  std::vector<std::string> n;
  for (const auto& p : a.parameters()) n.push_back(p.name + " " + peft::io::detail::shape_text(p.shape));
  return n;
}

/// s kron(W1, W2) with plain loops in double.
template <class M1, class M2>
peft::matrix<double> kron(const M1& a, const M2& b, double s) {
  peft::matrix<double> k(a.rows() * b.rows(), a.cols() * b.cols());
  for (index i = 0; i < a.rows(); ++i)
    for (index j = 0; j < a.cols(); ++j)
      for (index p = 0; p < b.rows(); ++p)
        for (index q = 0; q < b.cols(); ++q)
          k(i * b.rows() + p, j * b.cols() + q) = s * peft_test::at(a, i, j) * peft_test::at(b, p, q);
  return k;
}

}  // namespace

TEMPLATE_TEST_CASE("lokr reproduces PEFT: layers, network, merged weights", "[lokr][golden]", float, double) {
  check_golden<peft::lokr<TestType>>("lokr");
  check_golden<peft::lokr<TestType>>("lokr_full");
}

TEST_CASE("lokr golden checkpoints: full factors, and alpha / r applies to them too", "[lokr][golden]") {
  for (const std::string name : {"lokr", "lokr_full"}) {
    auto ck = peft::io::load_checkpoint_as<peft::lokr<double>>(data_dir / name / "adapter");
    const auto& up = ck.find("up.weight")->adapter;
    const auto& down = ck.find("down.weight")->adapter;
    CHECK(!up.w1().decomposed());
    CHECK(!up.w2().decomposed());
    CHECK(up.scale() == 2.0);  // alpha 16 / r 8, although both factors are full (LyCORIS would use 1)
    CHECK(up.in_features() == 64);
    CHECK(up.out_features() == 96);
    CHECK(down.W1().rows() == 6);  // 48 = 6 x 8, 96 = 8 x 12
    CHECK(down.W1().cols() == 8);
    CHECK(down.W2().rows() == 8);
    CHECK(down.W2().cols() == 12);
    CHECK(ck.config.peft_type == "LOKR");
  }
}

TEST_CASE("lokr_factorization is PEFT's factorization()", "[lokr]") {
  using p = std::pair<peft::index, peft::index>;
  // PEFT's docstring examples, then the shapes of the golden layers and edge cases.
  CHECK(peft::lokr_factorization(256) == p(16, 16));
  CHECK(peft::lokr_factorization(128) == p(8, 16));
  CHECK(peft::lokr_factorization(127) == p(1, 127));
  CHECK(peft::lokr_factorization(128, 4) == p(4, 32));
  CHECK(peft::lokr_factorization(96) == p(8, 12));
  CHECK(peft::lokr_factorization(64) == p(8, 8));
  CHECK(peft::lokr_factorization(48) == p(6, 8));
  CHECK(peft::lokr_factorization(1) == p(1, 1));
  CHECK(peft::lokr_factorization(4096) == p(64, 64));
  CHECK(peft::lokr_factorization(11008) == p(86, 128));
  CHECK(peft::lokr_factorization(128, 32) == p(32, 4));  // a dividing factor is returned unsorted
  CHECK(peft::lokr_factorization(96, 5) == p(4, 24));    // largest divisor <= 5
  CHECK(peft::lokr_factorization(96, 0) == p(1, 96));
  CHECK(peft::lokr_factorization(96, -2) == p(1, 96));
  CHECK_THROWS_AS(peft::lokr_factorization(0), peft::shape_error);
}

TEST_CASE("lokr builds the forms PEFT builds for r and decompose_both", "[lokr]") {
  // 64 -> (8, 8), 96 -> (8, 12): W1 (8, 8), W2 (12, 8).
  peft::lokr<double> full(64, 96, {.rank = 8});
  CHECK(names_of(full) == std::vector<std::string>{"lokr_w1 [8, 8]", "lokr_w2 [12, 8]"});
  peft::lokr<double> r6(64, 96, {.rank = 6});  // 12 <= 12: W2 stays full
  CHECK(names_of(r6) == std::vector<std::string>{"lokr_w1 [8, 8]", "lokr_w2 [12, 8]"});
  peft::lokr<double> r5(64, 96, {.rank = 5});  // 10 < 12: W2 low rank
  CHECK(names_of(r5) == std::vector<std::string>{"lokr_w1 [8, 8]", "lokr_w2_a [12, 5]", "lokr_w2_b [5, 8]"});
  peft::lokr<double> both(64, 96, {.rank = 3, .decompose_both = true});
  CHECK(names_of(both) == std::vector<std::string>{"lokr_w1_a [8, 3]", "lokr_w1_b [3, 8]", "lokr_w2_a [12, 3]",
                                                    "lokr_w2_b [3, 8]"});
  peft::lokr<double> both4(64, 96, {.rank = 4, .decompose_both = true});  // 8 < 8 is false: W1 full
  CHECK(names_of(both4) == std::vector<std::string>{"lokr_w1 [8, 8]", "lokr_w2_a [12, 4]", "lokr_w2_b [4, 8]"});
  peft::lokr<double> f4(64, 96, {.rank = 8, .decompose_factor = 4});  // 64 = 4 x 16, 96 = 4 x 24; 16 < 24
  CHECK(names_of(f4) == std::vector<std::string>{"lokr_w1 [4, 4]", "lokr_w2_a [24, 8]", "lokr_w2_b [8, 16]"});
  peft::lokr<double> f4r12(64, 96, {.rank = 12, .decompose_factor = 4});
  CHECK(names_of(f4r12) == std::vector<std::string>{"lokr_w1 [4, 4]", "lokr_w2 [24, 16]"});
}

TEMPLATE_TEST_CASE("lokr low-rank forms equal a double reference built from the formed delta", "[lokr]", float,
                   double) {
  using T = TestType;
  peft::rng g(41);
  // in 24 -> (4, 6), out 20 -> (4, 5): with r = 1 and decompose_both both factors are low rank.
  const ix in = 24, out = 20, batch = 3;
  for (const bool both : {true, false}) {
    INFO("decompose_both " << both);
    peft::lokr<T> a(in, out, {.rank = 1, .alpha = 3.0, .decompose_both = both, .init = peft::lokr_init::random, .seed = 7});
    REQUIRE(a.w1().decomposed() == both);
    REQUIRE(a.w2().decomposed());
    const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
    const auto x = peft_test::random_matrix<T>(batch, in, g);
    const auto gy = peft_test::random_matrix<T>(batch, out, g);
    REQUIRE(peft_test::nontrivial(x));
    const auto W1 = peft_test::to_double(a.W1()), W2 = peft_test::to_double(a.W2());
    REQUIRE(peft_test::nontrivial(W1));
    REQUIRE(peft_test::nontrivial(W2));
    const double s = 3.0;
    const auto dW = kron(W1, W2, s);
    const auto w_eff = peft_test::add(w.weight(), dW);

    typename peft::lokr<T>::cache_type cache;
    peft::matrix<T> y(batch, out), dx(batch, in);
    a.forward(w, x.view(), y.view(), cache);
    CHECK(rel_error(y, peft_test::ref_linear(x, w_eff, w.bias())) < tolerance<T>());
    a.backward(w, x.view(), gy.view(), dx.view(), cache);
    CHECK(rel_error(dx, peft_test::ref_nn(gy, w_eff)) < tolerance<T>());

    peft::matrix<T> dwt(out, in);
    a.delta_weight(w, dwt.view());
    CHECK(rel_error(dwt, dW) < tolerance<T>());

    // dW1[i, j] = s sum_pq D[i ok + p, j in_n + q] W2[p, q] with D = g^T x; likewise dW2.
    const auto D = peft_test::ref_tn(gy, x);
    peft::matrix<double> d1(W1.rows(), W1.cols()), d2(W2.rows(), W2.cols());
    for (ix i = 0; i < W1.rows(); ++i)
      for (ix j = 0; j < W1.cols(); ++j)
        for (ix p = 0; p < W2.rows(); ++p)
          for (ix q = 0; q < W2.cols(); ++q) {
            const double dd = s * D(i * W2.rows() + p, j * W2.cols() + q);
            d1(i, j) += dd * W2(p, q);
            d2(p, q) += dd * W1(i, j);
          }
    auto params = a.parameters();
    auto grad = [&](const std::string& n) {
      for (auto& p : params)
        if (p.name == n) return peft_test::to_double(p.grad);
      FAIL("no parameter " << n);
      return peft::matrix<double>();
    };
    if (both) {
      CHECK(rel_error(grad("lokr_w1_a"), peft_test::ref_nt(d1, a.w1().b)) < tolerance<T>());
      CHECK(rel_error(grad("lokr_w1_b"), peft_test::ref_tn(a.w1().a, d1)) < tolerance<T>());
    } else {
      CHECK(rel_error(grad("lokr_w1"), d1) < tolerance<T>());
    }
    CHECK(rel_error(grad("lokr_w2_a"), peft_test::ref_nt(d2, a.w2().b)) < tolerance<T>());
    CHECK(rel_error(grad("lokr_w2_b"), peft_test::ref_tn(a.w2().a, d2)) < tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("lokr inits: standard and lycoris are no-ops, random is not; kaiming bounds", "[lokr]", float,
                   double) {
  using T = TestType;
  peft::rng g(5);
  const ix in = 64, out = 96;
  const peft::dense<T> w(peft_test::random_matrix<T>(out, in, g), peft_test::random_vector<T>(out, g));
  const auto x = peft_test::random_matrix<T>(2, in, g);
  peft::matrix<T> h(2, out);
  w.matmul(x.view(), h.view());
  auto run = [&](const peft::lokr<T>& a) {
    peft::matrix<T> y(2, out);
    typename peft::lokr<T>::cache_type cache;
    a.forward(w, x.view(), y.view(), cache);
    return y;
  };
  for (const ix r : {ix{8}, ix{2}}) {
    INFO("rank " << r);
    peft::lokr<T> std_init(in, out, {.rank = r, .alpha = 16, .decompose_both = true, .seed = 3});
    CHECK(peft_test::exactly_equal(run(std_init), h));
    CHECK(peft_test::max_abs(std_init.W1()) == 0.0);
    CHECK(peft_test::count_nonzero(std_init.W2()) == std_init.W2().size());
    if (!std_init.w2().decomposed()) CHECK(peft_test::max_abs(std_init.W2()) <= 1.0 / std::sqrt(8.0));  // W2 (12, 8)
    peft::lokr<T> lyc(in, out, {.rank = r, .alpha = 16, .decompose_both = true, .init = peft::lokr_init::lycoris, .seed = 3});
    CHECK(peft_test::exactly_equal(run(lyc), h));
    CHECK(peft_test::max_abs(lyc.W2()) == 0.0);
    CHECK(peft_test::count_nonzero(lyc.W1()) == lyc.W1().size());
    peft::lokr<T> rnd(in, out, {.rank = r, .alpha = 16, .decompose_both = true, .init = peft::lokr_init::random, .seed = 3});
    CHECK(rel_error(run(rnd), h) > 1e-3);
    CHECK(rnd.scale() == static_cast<T>(16.0 / static_cast<double>(r)));
  }
  // Same seed, same adapter.
  peft::lokr<T> a(in, out, {.rank = 2, .init = peft::lokr_init::random, .seed = 9});
  peft::lokr<T> b(in, out, {.rank = 2, .init = peft::lokr_init::random, .seed = 9});
  CHECK(peft_test::exactly_equal(a.W2(), b.W2()));
}

TEST_CASE("lokr checkpoints: low-rank forms load from tensors and a config", "[lokr]") {
  peft::rng g(3);
  // in 24 -> (4, 6), out 20 -> (4, 5); r = 1 with decompose_both: all four low-rank tensors.
  const auto c = lokr_config(1, 6.0, true);
  peft::io::checkpoint_tensors<double> m("layer"), none;
  m.add("lokr_w1_a", stored<double>({4, 1}, g));
  m.add("lokr_w1_b", stored<double>({1, 4}, g));
  m.add("lokr_w2_a", stored<double>({5, 1}, g));
  m.add("lokr_w2_b", stored<double>({1, 6}, g));
  const auto a = peft::lokr<double>::from_checkpoint(c, m, none);
  CHECK(a.in_features() == 24);
  CHECK(a.out_features() == 20);
  CHECK(a.scale() == 6.0);
  const auto w1 = peft_test::ref_nn(*m.get("lokr_w1_a").data, *m.get("lokr_w1_b").data);
  CHECK(rel_error(a.W1(), w1) < 1e-15);
  // rank_pattern / alpha_pattern override r and alpha per module.
  auto c2 = lokr_config(4, 6.0, true);
  c2.rank_pattern = {{"layer", 1}};
  c2.alpha_pattern = {{"layer", 2.5}};
  CHECK(peft::lokr<double>::from_checkpoint(c2, m, none).scale() == 2.5);
}

TEST_CASE("lokr save and load keep every module: describe_in writes what PEFT needs", "[lokr]") {
  peft::io::basic_peft_checkpoint<peft::lokr<double>> ck;
  ck.config = peft::io::adapter_config::lora(8, 8.0, {});
  ck.config.targets_kind = peft::io::target_kind::none;
  const peft::lokr_options o1{.rank = 1, .alpha = 3.0, .decompose_both = true, .init = peft::lokr_init::random, .seed = 1};
  const peft::lokr_options o2{.rank = 8, .alpha = 5.0, .decompose_both = true, .init = peft::lokr_init::random, .seed = 2};
  ck.modules.push_back({"model.a", "model.a.weight", peft::lokr<double>(24, 20, o1)});
  ck.modules.push_back({"model.b", "model.b.weight", peft::lokr<double>(64, 96, o2)});
  const auto dir = fs::temp_directory_path() / "peft_lokr_roundtrip";
  fs::remove_all(dir);
  peft::io::save_peft_checkpoint(dir, ck);
  auto back = peft::io::load_checkpoint_as<peft::lokr<double>>(dir);
  CHECK(back.config.peft_type == "LOKR");
  CHECK(back.config.raw["decompose_both"] == true);
  CHECK(back.config.raw["alpha"] == 3);
  REQUIRE(back.modules.size() == 2);
  for (std::size_t k = 0; k < 2; ++k) {
    auto& a = ck.modules[k].adapter;
    auto& b = back.find(ck.modules[k].weight_name)->adapter;
    CHECK(b.rank() == a.rank());
    CHECK(b.scale() == a.scale());
    auto pa = a.parameters();
    auto pb = b.parameters();
    REQUIRE(pa.size() == pb.size());
    for (std::size_t i = 0; i < pa.size(); ++i) {
      CHECK(pa[i].name == pb[i].name);
      CHECK(rel_error(pb[i].value, pa[i].value) < 1e-7);  // stored as f32
    }
  }
  CHECK(back.find("model.a.weight")->adapter.w1().decomposed());
  CHECK(!back.find("model.b.weight")->adapter.w1().decomposed());
  fs::remove_all(dir);

  // A module PEFT would shape differently under the config cannot be described.
  auto c = lokr_config(8, 8.0, false);
  const peft::lokr<double> f4(64, 96, {.rank = 8, .decompose_factor = 4});
  CHECK_THROWS_AS(f4.describe_in(c, "model.c"), peft::unsupported_error);
  auto c2 = lokr_config(1, 8.0, false);
  const peft::lokr<double> low(24, 20, {.rank = 1, .decompose_both = true});
  CHECK_THROWS_AS(low.describe_in(c2, "model.d"), peft::unsupported_error);  // W1 low rank, decompose_both false
}

TEMPLATE_TEST_CASE("lokr rejects bad shapes, bad checkpoints and convolutions with clear errors", "[lokr]", float,
                   double) {
  using T = TestType;
  peft::rng g(11);
  peft::lokr<T> a(24, 20, {.rank = 2, .init = peft::lokr_init::random});
  const peft::dense<T> w(peft_test::random_matrix<T>(20, 24, g));
  const peft::dense<T> wrong(peft_test::random_matrix<T>(20, 25, g));
  peft::matrix<T> x(2, 24), y(2, 20), dx(2, 24), bad(2, 23);
  typename peft::lokr<T>::cache_type cache;
  CHECK_THROWS_WITH(a.forward(wrong, x.view(), y.view(), cache), Catch::Contains("[lokr::forward] base weight is (20, 25)"));
  CHECK_THROWS_AS(a.forward(w, bad.view(), y.view(), cache), peft::shape_error);
  CHECK_THROWS_AS(a.backward(w, x.view(), y.view(), bad.view(), cache), peft::shape_error);
  peft::matrix<T> dw(20, 23);
  CHECK_THROWS_AS(a.delta_weight(w, dw.view()), peft::shape_error);
  CHECK_THROWS_AS(peft::lokr<T>(24, 20, {.rank = 0}), peft::shape_error);
  CHECK_THROWS_AS(peft::lokr<T>(0, 20, {}), peft::shape_error);
  CHECK_THROWS_AS(peft::lokr<T>(peft::lokr_factor<T>::product(peft::matrix<T>(4, 2), peft::matrix<T>(3, 4)),
                                peft::lokr_factor<T>::whole(peft::matrix<T>(5, 6)), 2, 1.0),
                  peft::shape_error);

  const auto c = lokr_config(1, 6.0, true);
  peft::io::checkpoint_tensors<T> none;
  auto base_tensors = [&] {
    peft::io::checkpoint_tensors<T> m("layer");
    m.add("lokr_w1_a", stored<T>({4, 1}, g));
    m.add("lokr_w1_b", stored<T>({1, 4}, g));
    m.add("lokr_w2_a", stored<T>({5, 1}, g));
    m.add("lokr_w2_b", stored<T>({1, 6}, g));
    return m;
  };
  REQUIRE_NOTHROW(peft::lokr<T>::from_checkpoint(c, base_tensors(), none));
  {
    auto m = base_tensors();
    m.add("lokr_t2", stored<T>({1, 1, 3, 3}, g));
    CHECK_THROWS_WITH(peft::lokr<T>::from_checkpoint(c, m, none),
                      Catch::Contains("[lokr::from_checkpoint]") && Catch::Contains("lokr_t2"));
    CHECK_THROWS_AS(peft::lokr<T>::from_checkpoint(c, m, none), peft::unsupported_error);
  }
  {
    peft::io::checkpoint_tensors<T> m("conv");
    m.add("lokr_w1", stored<T>({4, 4}, g));
    m.add("lokr_w2", stored<T>({5, 6, 3, 3}, g));
    CHECK_THROWS_AS(peft::lokr<T>::from_checkpoint(lokr_config(8, 8, false), m, none), peft::unsupported_error);
  }
  {
    auto m = base_tensors();
    m.add("lokr_w1", stored<T>({4, 4}, g));  // both forms
    CHECK_THROWS_AS(peft::lokr<T>::from_checkpoint(c, m, none), peft::format_error);
  }
  {
    peft::io::checkpoint_tensors<T> m("layer");
    m.add("lokr_w1_a", stored<T>({4, 1}, g));
    m.add("lokr_w1_b", stored<T>({1, 4}, g));
    CHECK_THROWS_WITH(peft::lokr<T>::from_checkpoint(c, m, none), Catch::Contains("neither lokr_w2"));
  }
  CHECK_THROWS_WITH(peft::lokr<T>::from_checkpoint(lokr_config(2, 6.0, true), base_tensors(), none),
                    Catch::Contains("rank 1") && Catch::Contains("gives 2"));
  {
    auto m = base_tensors();
    m.add("lokr_w2_b", stored<T>({2, 6}, g));  // a (5, 1), b (2, 6)
    CHECK_THROWS_AS(peft::lokr<T>::from_checkpoint(c, m, none), peft::format_error);
  }
  {
    // W1 (5, 4), W2 (4, 6): a (20, 24) weight, which PEFT factors as (4, 5) x (4, 6).
    peft::io::checkpoint_tensors<T> m("layer");
    m.add("lokr_w1_a", stored<T>({5, 1}, g));
    m.add("lokr_w1_b", stored<T>({1, 4}, g));
    m.add("lokr_w2_a", stored<T>({4, 1}, g));
    m.add("lokr_w2_b", stored<T>({1, 6}, g));
    CHECK_THROWS_WITH(peft::lokr<T>::from_checkpoint(c, m, none), Catch::Contains("factors as W1 (4, 4), W2 (5, 6)"));
  }
  {
    // Full lokr_w2 (5, 6) where r = 1 makes PEFT build lokr_w2_a / lokr_w2_b.
    peft::io::checkpoint_tensors<T> m("layer");
    m.add("lokr_w1", stored<T>({4, 4}, g));
    m.add("lokr_w2", stored<T>({5, 6}, g));
    CHECK_THROWS_WITH(peft::lokr<T>::from_checkpoint(lokr_config(1, 1.0, false), m, none),
                      Catch::Contains("PEFT builds lokr_w2_a/lokr_w2_b"));
  }
  {
    auto c3 = lokr_config(1, 6.0, true);
    c3.raw["decompose_both"] = "yes";
    CHECK_THROWS_AS(peft::lokr<T>::from_checkpoint(c3, base_tensors(), none), peft::format_error);
  }
  // A LoRA checkpoint is not LoKr's.
  CHECK_THROWS_AS(peft::io::load_checkpoint_as<peft::lokr<T>>(data_dir / "lora" / "adapter"), peft::unsupported_error);
}
