// DoRA (weight-decomposed): parity with HuggingFace PEFT 0.21 on tests/data/peft/dora (layers,
// network, every gradient, merged weights), and against plain double loops that materialise
// W0 + s B A: row norms (including a cancelling case and zero rows), forward, the detached
// gradients (also by finite differences with the norm frozen), delta_weight, merge/unmerge,
// two DoRA adapters on one layer, the norm cache and its invalidation, and error cases.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "peft/io/peft/dora.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/any_adapter.hpp"
#include "peft/adapters/dora.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "peft/io/merge.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/file_support.hpp"
#include "support/adapter_checks.hpp"
#include "support/test_support.hpp"
#include "support/traits_dora.hpp"

namespace test_dora {

static_assert(peft::mergeable_adapter_for<peft::dora<float>, peft::dense<float>>);
static_assert(peft::mergeable_adapter_for<peft::dora<float>, peft::dense<peft::bf16>>);
static_assert(peft::mergeable_adapter_for<peft::dora<double>, peft::dense<double>>);
static_assert(peft::mergeable_adapter_for<peft::dora<double>, peft::dense<float>>);

using ix = peft::index;

namespace {

namespace fs = std::filesystem;
using peft_test::at;
using peft_test::random_dense;
using peft_test::rel_error;
using peft_test::run_forward;

const fs::path golden_dir = fs::path(PEFT_TEST_DATA_DIR) / "peft" / "dora";

/// Relative Frobenius tolerance of results computed in T against double references.
template <class T>
constexpr double tol() {
  return peft_test::tolerance<T>(1e-12, 2e-5);
}

/// Golden tolerance (tests/data README: 1e-12 double, 1e-5 float).
template <class T>
constexpr double golden_tol() {
  return peft_test::tolerance<T>();
}

// ---- an independent reference: plain double loops over a materialised W0 + s B A ----------------

struct reference_dora {
  peft::matrix<double> w;   // W0 (out, in), decoded
  std::vector<double> b0;   // bias (out) or empty
  peft::matrix<double> a;   // (r, in)
  peft::matrix<double> b;   // (out, r)
  double s = 1.0;
  std::vector<double> m;    // (out)

  template <class T, class Base>
  static reference_dora of(const peft::dora<T>& d, const Base& base) {
    reference_dora r;
    r.w = peft::matrix<double>(base.out_features(), base.in_features());
    std::vector<double> row(static_cast<std::size_t>(base.in_features()));
    for (ix i = 0; i < base.out_features(); ++i) {
      base.dequantize_row(i, row.data());
      for (ix j = 0; j < base.in_features(); ++j) r.w(i, j) = row[static_cast<std::size_t>(j)];
    }
    if (base.has_bias()) {
      for (ix j = 0; j < base.out_features(); ++j) r.b0.push_back(base.template bias_value<double>(j));
    }
    r.a = peft_test::to_double(d.A());
    r.b = peft_test::to_double(d.B());
    r.s = static_cast<double>(d.scale());
    for (ix j = 0; j < d.out_features(); ++j) r.m.push_back(static_cast<double>(d.magnitude()(0, j)));
    return r;
  }

  double bias(ix j) const { return b0.empty() ? 0.0 : b0[static_cast<std::size_t>(j)]; }
  /// W0 + s B A, materialised.
  peft::matrix<double> adapted() const { return peft_test::add(w, peft_test::ref_nn(b, a), s); }
  std::vector<double> norms() const {
    const auto v = adapted();
    std::vector<double> n;
    for (ix j = 0; j < v.rows(); ++j) {
      double q = 0.0;
      for (ix c = 0; c < v.cols(); ++c) q += v(j, c) * v(j, c);
      n.push_back(std::sqrt(q));
    }
    return n;
  }
  std::vector<double> k() const {
    const auto n = norms();
    std::vector<double> r;
    for (std::size_t j = 0; j < n.size(); ++j) r.push_back(m[j] / n[j]);
    return r;
  }
  /// u = x W0^T + s x A^T B^T (batch, out).
  template <class M>
  peft::matrix<double> u(const M& x) const {
    return peft_test::add(peft_test::ref_nt(x, w), peft_test::ref_nt(peft_test::ref_nt(x, a), b), s);
  }
  /// The DoRA term given the base output: (k - 1)(x W0^T) + k s x A^T B^T.
  template <class M>
  peft::matrix<double> term(const M& x) const {
    const auto kk = k();
    const auto z = peft_test::ref_nt(x, w);
    auto uu = u(x);
    for (ix i = 0; i < uu.rows(); ++i) {
      for (ix j = 0; j < uu.cols(); ++j) uu(i, j) = kk[static_cast<std::size_t>(j)] * uu(i, j) - z(i, j);
    }
    return uu;
  }
  /// y = b0 + k (x W0^T + s x A^T B^T).
  template <class M>
  peft::matrix<double> forward(const M& x) const {
    auto y = u(x);
    const auto kk = k();
    for (ix i = 0; i < y.rows(); ++i) {
      for (ix j = 0; j < y.cols(); ++j) y(i, j) = bias(j) + kk[static_cast<std::size_t>(j)] * y(i, j);
    }
    return y;
  }
  /// (k - 1) W0 + k s B A.
  peft::matrix<double> delta() const {
    auto v = adapted();
    const auto kk = k();
    for (ix j = 0; j < v.rows(); ++j) {
      for (ix c = 0; c < v.cols(); ++c) v(j, c) = kk[static_cast<std::size_t>(j)] * v(j, c) - w(j, c);
    }
    return v;
  }

  struct grads {
    peft::matrix<double> dx, da, db, dm, kg;
  };
  /// Gradients of sum(y * g) with n detached.
  template <class MX, class MG>
  grads backward(const MX& x, const MG& g) const {
    grads r;
    const auto kk = k();
    const auto n = norms();
    r.kg = peft::matrix<double>(g.rows(), g.cols());
    for (ix i = 0; i < g.rows(); ++i) {
      for (ix j = 0; j < g.cols(); ++j) r.kg(i, j) = kk[static_cast<std::size_t>(j)] * at(g, i, j);
    }
    const auto uu = u(x);
    r.dm = peft::matrix<double>(1, g.cols());
    for (ix j = 0; j < g.cols(); ++j) {
      for (ix i = 0; i < g.rows(); ++i) r.dm(0, j) += at(g, i, j) * uu(i, j) / n[static_cast<std::size_t>(j)];
    }
    const auto kgb = peft_test::ref_nn(r.kg, b);                                    // (batch, r)
    r.dx = peft_test::add(peft_test::ref_nn(r.kg, w), peft_test::ref_nn(kgb, a), s);
    r.db = peft_test::scaled(peft_test::ref_tn(r.kg, peft_test::ref_nt(x, a)), s);  // s kg^T (x A^T)
    r.da = peft_test::scaled(peft_test::ref_tn(kgb, x), s);                         // s (kg B)^T x
    return r;
  }
};

/// A (1, n) matrix of a vector.
template <class V>
peft::matrix<double> row_of(const std::vector<V>& v) {
  peft::matrix<double> r(1, static_cast<ix>(v.size()));
  for (std::size_t j = 0; j < v.size(); ++j) r(0, static_cast<ix>(j)) = static_cast<double>(v[j]);
  return r;
}

/// A DoRA with random A, B (non-zero) and m = n * U(0.6, 1.4), one entry negative: k is O(1)
/// and never 1.
template <class T, class Base>
peft::dora<T> random_dora(const Base& w, ix rank, peft::rng& g, double alpha = 3.0) {
  peft::lora<T> l(w.in_features(), w.out_features(),
                  {.rank = rank, .alpha = alpha, .init = peft::lora_init::random, .seed = g.next()});
  peft::dora<T> probe(l, std::vector<T>(static_cast<std::size_t>(w.out_features()), T{1}));
  auto m = probe.row_norms(w);
  for (auto& v : m) v = static_cast<T>(static_cast<double>(v) * g.uniform(0.6, 1.4));
  m[0] = -m[0];
  return peft::dora<T>(std::move(l), std::move(m));
}

struct dims {
  ix batch, in, out, rank;
};
const std::vector<dims> shapes{{1, 1, 1, 1}, {1, 5, 3, 1}, {4, 7, 5, 3}, {3, 17, 9, 2}, {5, 13, 13, 13}, {2, 3, 11, 4}};

/// A dense base that counts the rows decoded through dequantize_row (the norm computation).
struct counting_base {
  peft::dense<double> inner;
  mutable long rows_decoded = 0;
  ix out_features() const { return inner.out_features(); }
  ix in_features() const { return inner.in_features(); }
  bool has_bias() const { return inner.has_bias(); }
  template <class T>
  void matmul(peft::matrix_view<const T> x, peft::matrix_view<T> y) const {
    inner.matmul(x, y);
  }
  template <class T>
  void matmul_t(peft::matrix_view<const T> dy, peft::matrix_view<T> dx, bool accumulate = false) const {
    inner.matmul_t(dy, dx, accumulate);
  }
  template <class T>
  void dequantize_row(ix i, T* out) const {
    ++rows_decoded;
    inner.dequantize_row(i, out);
  }
  template <class T>
  T bias_value(ix j) const {
    return inner.template bias_value<T>(j);
  }
};
static_assert(peft::base_weight<counting_base>);

// ---- golden data ---------------------------------------------------------------------------------

template <class T>
using golden_layer = peft::adapted_linear<peft::dense<float>, peft::dora<T>>;

peft::dense<float> load_base(const peft::io::safetensors_file& f, const std::string& name) {
  return peft::dense<float>(f.read_matrix<float>(name + ".weight"), f.read<float>(name + ".bias"));
}

peft::matrix<double> ref_vector(const peft::io::safetensors_file& f, const std::string& name) {
  return row_of(f.read<double>(name));
}

template <class T>
struct golden_case {
  peft::io::safetensors_file base = peft::io::safetensors_file::open(golden_dir / "base_model.safetensors");
  peft::io::safetensors_file reference = peft::io::safetensors_file::open(golden_dir / "reference.safetensors");
  peft::io::basic_peft_checkpoint<peft::dora<T>> checkpoint =
      peft::io::load_checkpoint_as<peft::dora<T>>(golden_dir / "adapter");
  golden_layer<T> up{load_base(base, "up")};
  golden_layer<T> down{load_base(base, "down")};

  golden_case() {
    REQUIRE(checkpoint.modules.size() == 2);
    up.add_adapter("default", checkpoint.find("up.weight")->adapter);
    down.add_adapter("default", checkpoint.find("down.weight")->adapter);
  }
  golden_layer<T>& layer(const std::string& n) { return n == "up" ? up : down; }
  peft::matrix<T> ref(const std::string& n) const { return reference.read_matrix<T>(n); }
  peft::matrix<double> ref64(const std::string& n) const { return reference.read_matrix<double>(n); }

  /// Every parameter gradient of layer `name` against PyTorch's.
  void check_grads(const std::string& name, double tolerance) {
    INFO("gradients of " << name);
    const auto& a = layer(name).adapter("default");
    const std::string key = "grad.base_model.model." + name;
    REQUIRE(peft_test::nontrivial(ref64(key + ".lora_A.default.weight")));
    CHECK(rel_error(a.grad_A(), ref64(key + ".lora_A.default.weight")) < tolerance);
    CHECK(rel_error(a.grad_B(), ref64(key + ".lora_B.default.weight")) < tolerance);
    const auto gm = ref_vector(reference, key + ".lora_magnitude_vector.default.weight");
    REQUIRE(peft_test::nontrivial(gm));
    CHECK(rel_error(a.grad_magnitude(), gm) < tolerance);
  }
};

template <class V>
struct has_dora : std::false_type {};
template <class... As>
struct has_dora<peft::variant_adapter<As...>> : std::bool_constant<(std::is_same_v<As, peft::dora<double>> || ...)> {};

}  // namespace

// ==================================================================================================

TEMPLATE_TEST_CASE("dora golden: each layer's output, dx and every gradient match PEFT", "[dora][golden]", float,
                   double) {
  golden_case<TestType> c;
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto& layer = c.layer(name);
    const auto x = c.ref("layer." + name + ".input");
    const auto g = c.ref("layer." + name + ".grad_output");
    REQUIRE(peft_test::count_nonzero(x) > x.size() / 4);  // the down input is a relu output
    REQUIRE(peft_test::count_nonzero(g) > g.size() / 4);
    peft::matrix<TestType> y(x.rows(), layer.out_features());
    layer.forward(x, y);
    const auto y_ref = c.ref64("layer." + name + ".output");
    CHECK(rel_error(y, y_ref) < golden_tol<TestType>());
    // the adapter changes the layer: compare with the frozen layer alone
    peft::matrix<TestType> h(x.rows(), layer.out_features());
    layer.base().matmul(x.view(), h.view());
    CHECK(rel_error(h, y_ref) > 1e-2);
    peft::matrix<TestType> dx(x.rows(), layer.in_features());
    layer.zero_grad();
    layer.backward(x, g, dx);
    CHECK(rel_error(dx, c.ref64("layer." + name + ".grad_input")) < golden_tol<TestType>());
    c.check_grads(name, golden_tol<TestType>());
  }
}

TEMPLATE_TEST_CASE("dora golden: the two-layer network, grad_x and all gradients match PEFT", "[dora][golden]", float,
                   double) {
  golden_case<TestType> c;
  const auto x = c.ref("x");
  const auto gy = c.ref("grad_y");
  REQUIRE(peft_test::nontrivial(x));
  REQUIRE(peft_test::nontrivial(gy));
  peft::matrix<TestType> h(x.rows(), c.up.out_features()), a(h.rows(), h.cols()), y(x.rows(), c.down.out_features());
  c.up.forward(x, h);
  for (ix i = 0; i < h.rows(); ++i)
    for (ix j = 0; j < h.cols(); ++j) a(i, j) = h(i, j) > 0 ? h(i, j) : TestType{0};
  c.down.forward(a, y);
  CHECK(rel_error(y, c.ref64("y")) < golden_tol<TestType>());
  peft::matrix<TestType> da(a.rows(), a.cols()), dx(x.rows(), x.cols());
  c.up.zero_grad();
  c.down.zero_grad();
  c.down.backward(a, gy, da);
  for (ix i = 0; i < da.rows(); ++i)
    for (ix j = 0; j < da.cols(); ++j) da(i, j) = h(i, j) > 0 ? da(i, j) : TestType{0};
  c.up.backward(x, da, dx);
  CHECK(rel_error(dx, c.ref64("grad_x")) < golden_tol<TestType>());
  c.check_grads("up", golden_tol<TestType>());
  c.check_grads("down", golden_tol<TestType>());
}

TEMPLATE_TEST_CASE("dora golden: adapted_linear::merge gives PEFT's merged weights; unmerge restores W0",
                   "[dora][golden][merge]", float, double) {
  golden_case<TestType> c;
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto& layer = c.layer(name);
    const auto w0 = peft_test::to_double(layer.base().weight());
    const auto merged_ref = c.ref64("merged." + name + ".weight");
    CHECK(rel_error(w0, merged_ref) > 1e-3);  // merging changes the weight
    const auto x = c.ref("layer." + name + ".input");
    peft::matrix<TestType> before(x.rows(), layer.out_features()), after(x.rows(), layer.out_features());
    layer.forward(x, before);
    layer.merge("default");
    // f32 storage: one rounding of every weight, 1e-6 is the fair bound in both compute types
    CHECK(rel_error(layer.base().weight(), merged_ref) < 1e-6);
    const peft::matrix<float> b(1, layer.out_features(), layer.base().bias());
    CHECK(rel_error(b, ref_vector(c.reference, "merged." + name + ".bias")) == 0.0);  // DoRA leaves b0 alone
    layer.forward(x, after);
    CHECK(rel_error(after, before) < 1e-6);
    layer.unmerge("default");
    CHECK(rel_error(layer.base().weight(), w0) < 1e-6);
  }
}

TEST_CASE("dora golden: io::merge_model writes PEFT's merged weights", "[dora][golden][merge]") {
  if constexpr (has_dora<peft::any_adapter<double>>::value) {
    const auto out_dir = peft_test::temp_path("peft_dora_merge_model");
    fs::create_directories(out_dir);
    const auto out = out_dir / "merged.safetensors";
    const auto report = peft::io::merge_model(golden_dir / "base_model.safetensors", golden_dir / "adapter", out, {});
    CHECK(report.tensors == 4);
    CHECK(report.merged.size() == 2);  // the weights only: DoRA never touches a bias
    const auto merged = peft::io::safetensors_file::open(out);
    const auto reference = peft::io::safetensors_file::open(golden_dir / "reference.safetensors");
    for (const std::string t : {"up.weight", "down.weight", "up.bias", "down.bias"}) {
      INFO(t);
      CHECK(merged.info(t).type == peft::dtype::f32);
      CHECK(rel_error(merged.read_matrix<double>(t), reference.read_matrix<double>("merged." + t)) < 1e-6);
    }
    fs::remove_all(out_dir);
  } else {
    WARN("io::merge_model loads any_adapter<double>, which does not hold peft::dora yet: not tested");
    CHECK_THROWS_AS(peft::io::load_peft_checkpoint<double>(golden_dir / "adapter"), peft::unsupported_error);
  }
}

TEST_CASE("dora golden: the checkpoint is read as PEFT wrote it and saves back", "[dora][golden][io]") {
  auto ck = peft::io::load_checkpoint_as<peft::dora<double>>(golden_dir / "adapter");
  CHECK(ck.config.use_dora);
  CHECK(peft::io::peft_codec<peft::dora<double>>::handles(ck.config));
  CHECK_FALSE(peft::io::peft_codec<peft::lora<double>>::handles(ck.config));
  const auto file = peft::io::safetensors_file::open(golden_dir / "adapter" / "adapter_model.safetensors");
  for (const std::string name : {"up", "down"}) {
    const auto& a = ck.find(name + ".weight")->adapter;
    CHECK(a.rank() == 8);
    CHECK(a.scale() == 2.0);  // lora_alpha 16 / r 8
    const auto m = row_of(file.read<double>("base_model.model." + name + ".lora_magnitude_vector"));
    CHECK(rel_error(a.magnitude(), m) == 0.0);
    CHECK(peft_test::nontrivial(m));
  }
  // save_peft_checkpoint writes the same tensors under the same keys, use_dora set
  const auto dir = peft_test::temp_path("peft_dora_save");
  fs::remove_all(dir);
  auto cfg = peft::io::adapter_config::lora(8, 16.0, {"up", "down"});
  peft::io::basic_peft_checkpoint<peft::dora<double>> fresh;
  fresh.config = cfg;
  fresh.modules = ck.modules;
  peft::io::save_peft_checkpoint(dir, fresh);
  const auto saved = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
  CHECK(saved.tensors().size() == file.tensors().size());
  for (const auto& t : file.tensors()) {
    INFO(t.name);
    CHECK(saved.info(t.name).shape == t.shape);
    CHECK(rel_error(saved.read_matrix<double>(t.name), file.read_matrix<double>(t.name)) == 0.0);
  }
  auto back = peft::io::load_checkpoint_as<peft::dora<double>>(dir);
  CHECK(back.config.use_dora);
  CHECK(rel_error(back.find("up.weight")->adapter.B(), ck.find("up.weight")->adapter.B()) == 0.0);
  fs::remove_all(dir);
}

// ---- norms ---------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("dora row_norms: the expansion equals the materialised ||W0 + s B A|| per row", "[dora][norm]", float,
                   double) {
  using T = TestType;
  peft::rng g(101);
  for (const auto& d : shapes) {
    INFO("in " << d.in << " out " << d.out << " rank " << d.rank);
    auto check = [&](const auto& base) {
      const auto a = random_dora<T>(base, d.rank, g);
      const auto ref = reference_dora::of(a, base);
      const auto n = a.row_norms(base);
      const auto nr = ref.norms();
      CHECK(rel_error(row_of(n), row_of(nr)) < (std::is_same_v<T, float> ? 1e-6 : 1e-14));
      // the adapter matters: n differs from the norms of W0 alone
      CHECK(rel_error(row_of(nr), row_of(reference_dora{ref.w, {}, ref.a, peft_test::scaled(ref.b, 0.0), 1.0, ref.m}.norms())) >
            1e-3);
    };
    check(random_dense<double>(d.in, d.out, g));
    check(random_dense<float>(d.in, d.out, g));
    check(random_dense<peft::bf16>(d.in, d.out, g));
  }
}

TEST_CASE("dora row_norms: rows where W0 nearly cancels s B A are recomputed directly", "[dora][norm]") {
  // W0 = -s B A + E: |s B A| ~ 1, |E| ~ 1e-6 on some rows and 0 on others. Expanding
  // ||w_j||^2 + 2 s B_j A w_j + s^2 ||B_j A||^2 would lose about 12 of 16 digits here; the
  // reference materialises W0 + s B A in long double from the same double values.
  const ix in = 9, out = 6, r = 3;
  peft::rng g(7);
  const auto a = peft_test::random_matrix<double>(r, in, g);
  const auto b = peft_test::random_matrix<double>(out, r, g);
  const double s = 1.7;
  const auto sba = peft_test::scaled(peft_test::ref_nn(b, a), s);
  peft::matrix<double> w(out, in);
  for (ix j = 0; j < out; ++j) {
    for (ix c = 0; c < in; ++c) {
      const double e = (j % 3 != 2 && (c + j) % 2 == 0) ? 1e-6 * static_cast<double>(1 + c) : 0.0;
      w(j, c) = -sba(j, c) + e;
    }
  }
  std::vector<double> expect;
  for (ix j = 0; j < out; ++j) {
    long double q = 0.0L;
    for (ix c = 0; c < in; ++c) {
      long double v = static_cast<long double>(w(j, c));
      for (ix p = 0; p < r; ++p) {
        v += static_cast<long double>(s) * static_cast<long double>(b(j, p)) * static_cast<long double>(a(p, c));
      }
      q += v * v;
    }
    expect.push_back(static_cast<double>(std::sqrt(q)));
  }
  REQUIRE(peft_test::frobenius(sba) > 1.0);
  const peft::dense<double> base(w);
  const peft::dora<double> d(a, b, s, std::vector<double>(out, 1.0));
  const auto n = d.row_norms(base);
  const peft::dora<float> df(peft_test::convert_matrix<float>(a), peft_test::convert_matrix<float>(b),
                             static_cast<float>(s), std::vector<float>(out, 1.0f));
  for (ix j = 0; j < out; ++j) {
    INFO("row " << j << " expected " << expect[static_cast<std::size_t>(j)] << " got " << n[static_cast<std::size_t>(j)]);
    const double e = expect[static_cast<std::size_t>(j)];
    if (j % 3 == 2) {
      CHECK(e < 1e-14);  // E = 0: only the rounding of -s B A in W0 is left
      CHECK(n[static_cast<std::size_t>(j)] < 1e-13);
    } else {
      REQUIRE(e > 1e-6);
      CHECK(std::abs(n[static_cast<std::size_t>(j)] - e) <= 1e-7 * e);
    }
  }
  // A float adapter over the same double weight: B, A rounded to float no longer cancel W0, so
  // only compare against its own materialised reference.
  const auto nf = df.row_norms(base);
  const auto rf = reference_dora::of(df, base).norms();
  CHECK(rel_error(row_of(nf), row_of(rf)) < 1e-6);
}

TEMPLATE_TEST_CASE("dora zero-norm guard: zero rows give finite outputs and gradients, no NaN", "[dora][norm]", float,
                   double) {
  using T = TestType;
  peft::rng g(55);
  const ix in = 6, out = 5, batch = 3;
  auto wm = peft_test::random_matrix<double>(out, in, g);
  for (ix c = 0; c < in; ++c) wm(1, c) = 0.0;  // a zero row of W0
  for (ix c = 0; c < in; ++c) wm(3, c) = 0.0;
  const peft::dense<double> base(wm, peft_test::random_vector<double>(out, g));
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  peft::matrix<T> h(batch, out);
  base.matmul(x.view(), h.view());

  SECTION("default init (B = 0): the identity, zero rows included") {
    peft::dora<T> a(base, {.rank = 2, .alpha = 4.0, .seed = 3});
    CHECK(a.magnitude()(0, 1) == peft::dora<T>::norm_floor());
    const auto y = run_forward(a, base, x);
    CHECK(peft_test::exactly_equal(y, h));
  }
  SECTION("zero rows of W0 and of B with a trained magnitude") {
    peft::dora<T> a = random_dora<T>(base, 2, g);
    for (ix p = 0; p < a.rank(); ++p) a.B()(1, p) = T{0};  // row 1: W0 + s B A is exactly zero
    a.magnitude()(0, 1) = T(0.7);
    typename peft::dora<T>::cache_type cache;
    peft::matrix<T> y(batch, out), dx(batch, in);
    a.forward(base, x.view(), y.view(), cache);
    a.backward(base, x.view(), gy.view(), dx.view(), cache);
    CHECK(peft_test::nontrivial(y));  // finite
    CHECK(peft_test::nontrivial(dx));
    for (ix i = 0; i < batch; ++i) CHECK(y(i, 1) == static_cast<T>(base.bias_value<double>(1)));
    CHECK(std::isfinite(a.grad_magnitude()(0, 1)));
    CHECK(a.grad_magnitude()(0, 1) == T{0});
    CHECK(std::isfinite(peft_test::frobenius(a.grad_A())));
    CHECK(std::isfinite(peft_test::frobenius(a.grad_B())));
    // merging and unmerging stay finite too
    peft::adapted_linear<peft::dense<double>, peft::dora<T>> layer(base);
    layer.add_adapter("a", a);
    layer.merge("a");
    CHECK(std::isfinite(peft_test::frobenius(layer.base().weight())));
    layer.unmerge("a");
    CHECK(rel_error(layer.base().weight(), wm) < (std::is_same_v<T, float> ? 1e-6 : 1e-14));
  }
}

// ---- forward, gradients, init --------------------------------------------------------------------

TEMPLATE_TEST_CASE("dora forward and backward equal the materialised reference", "[dora]", float, double) {
  using T = TestType;
  peft::rng g(2024);
  for (const auto& d : shapes) {
    INFO("batch " << d.batch << " in " << d.in << " out " << d.out << " rank " << d.rank);
    const auto base = random_dense<float>(d.in, d.out, g);
    auto a = random_dora<T>(base, d.rank, g);
    const auto ref = reference_dora::of(a, base);
    const auto x = peft_test::random_matrix<T>(d.batch, d.in, g);
    const auto gy = peft_test::random_matrix<T>(d.batch, d.out, g);
    REQUIRE(peft_test::nontrivial(x));
    typename peft::dora<T>::cache_type cache;
    peft::matrix<T> y(d.batch, d.out), dx(d.batch, d.in);
    a.forward(base, x.view(), y.view(), cache);
    const auto y_ref = ref.forward(x);
    CHECK(rel_error(y, y_ref) < tol<T>());
    CHECK(rel_error(y, peft_test::ref_linear(x, ref.w, ref.b0)) > 1e-3);
    a.zero_grad();
    a.backward(base, x.view(), gy.view(), dx.view(), cache);
    const auto gr = ref.backward(x, gy);
    CHECK(rel_error(dx, gr.dx) < tol<T>());
    CHECK(rel_error(a.grad_A(), gr.da) < tol<T>());
    CHECK(rel_error(a.grad_B(), gr.db) < tol<T>());
    CHECK(rel_error(a.grad_magnitude(), gr.dm) < tol<T>());
    REQUIRE(peft_test::nontrivial(gr.dm));
    // backward without a forward on this cache computes what it needs
    a.zero_grad();
    typename peft::dora<T>::cache_type cold;
    peft::matrix<T> dx2(d.batch, d.in);
    a.backward(base, x.view(), gy.view(), dx2.view(), cold);
    CHECK(rel_error(dx2, gr.dx) < tol<T>());
    CHECK(rel_error(a.grad_magnitude(), gr.dm) < tol<T>());
    // add_term / backward_term: the same numbers through the shared base output
    peft::matrix<T> h(d.batch, d.out), y2(d.batch, d.out), dh(d.batch, d.out), dx3(d.batch, d.in);
    base.matmul(x.view(), h.view());
    y2 = h;
    typename peft::dora<T>::cache_type c2;
    a.add_term(base, x.view(), h.view(), y2.view(), c2);
    CHECK(peft_test::exactly_equal(y2, y));
    a.zero_grad();
    dh = gy;
    a.backward_term(base, x.view(), h.view(), gy.view(), dh.view(), dx3.view(), c2);
    CHECK(rel_error(dh, gr.kg) < tol<T>());  // g + (k - 1) g
    base.matmul_t(peft::matrix_view<const T>(dh.view()), dx3.view(), true);
    CHECK(rel_error(dx3, gr.dx) < tol<T>());
    CHECK(rel_error(a.grad_A(), gr.da) < tol<T>());
  }
}

TEST_CASE("dora gradients: finite differences with n frozen agree; without, A and B do not (n is detached)",
          "[dora][gradients]") {
  peft::rng g(77);
  for (const auto& d : shapes) {
    INFO("batch " << d.batch << " in " << d.in << " out " << d.out << " rank " << d.rank);
    const auto base = random_dense<double>(d.in, d.out, g);
    auto a = random_dora<double>(base, d.rank, g);
    auto x = peft_test::random_matrix<double>(d.batch, d.in, g);
    const auto gy = peft_test::random_matrix<double>(d.batch, d.out, g);
    peft::matrix<double> dx(d.batch, d.in);
    {
      typename peft::dora<double>::cache_type cache;
      peft::matrix<double> y(d.batch, d.out);
      a.zero_grad();
      a.forward(base, x.view(), y.view(), cache);
      a.backward(base, x.view(), gy.view(), dx.view(), cache);
    }
    const std::vector<peft::matrix<double>> grads{peft_test::to_double(a.grad_A()), peft_test::to_double(a.grad_B()),
                                                  peft_test::to_double(a.grad_magnitude())};
    auto loss = [&] {
      (void)a.parameters();  // the mutable access point: invalidates cached norms
      return peft_test::dot(run_forward(a, base, x), gy);
    };
    CHECK(rel_error(dx, peft_test::fd_gradient(x.view(), 1e-6, loss)) < 1e-7);
    // the true derivative of the forward differs for A and B (n depends on them), not for m
    {
      auto params = a.parameters();
      REQUIRE(params.size() == 3);
      const auto fd_b = peft_test::fd_gradient(params[1].value, 1e-6, loss);
      CHECK(rel_error(grads[1], fd_b) > 1e-4);
      CHECK(rel_error(grads[2], peft_test::fd_gradient(params[2].value, 1e-6, loss)) < 1e-7);
    }
    // n frozen at its current value: every gradient is the derivative of the forward
    a.freeze_norms(base);
    REQUIRE(a.norms_pinned());
    auto params = a.parameters();
    for (std::size_t k = 0; k < params.size(); ++k) {
      INFO("parameter " << params[k].name);
      CHECK(rel_error(grads[k], peft_test::fd_gradient(params[k].value, 1e-6, loss)) < 1e-7);
    }
    a.unpin_norms();
    CHECK_FALSE(a.norms_pinned());
  }
}

TEMPLATE_TEST_CASE("dora init: m = n, so with B = 0 the layer is exactly the base (k == 1)", "[dora][init]", float,
                   double) {
  using T = TestType;
  peft::rng g(9);
  for (const auto& d : shapes) {
    INFO("batch " << d.batch << " in " << d.in << " out " << d.out << " rank " << d.rank);
    auto check = [&](const auto& base) {
      const auto x = peft_test::random_matrix<T>(d.batch, d.in, g);
      const auto gy = peft_test::random_matrix<T>(d.batch, d.out, g);
      for (auto init : {peft::lora_init::kaiming_uniform, peft::lora_init::gaussian}) {
        peft::dora<T> a(base, {.rank = d.rank, .alpha = 2.0 * static_cast<double>(d.rank) + 1, .init = init, .seed = g.next()});
        CHECK(peft_test::count_nonzero(a.A()) == a.A().size());  // A random, B zero
        CHECK(peft_test::count_nonzero(a.B()) == 0);
        const auto n = a.row_norms(base);
        for (ix j = 0; j < d.out; ++j) CHECK(a.magnitude()(0, j) == n[static_cast<std::size_t>(j)]);
        peft::matrix<T> h(d.batch, d.out), y(d.batch, d.out), dx(d.batch, d.in), dx0(d.batch, d.in);
        base.matmul(x.view(), h.view());
        typename peft::dora<T>::cache_type cache;
        a.forward(base, x.view(), y.view(), cache);
        CHECK(peft_test::exactly_equal(y, h));
        for (T k : cache.k) CHECK(k == T{1});
        a.backward(base, x.view(), gy.view(), dx.view(), cache);
        base.matmul_t(gy.view(), dx0.view(), false);
        CHECK(peft_test::exactly_equal(dx, dx0));
        peft::matrix<T> dw(d.out, d.in);
        a.delta_weight(base, dw.view());
        CHECK(peft_test::count_nonzero(dw) == 0);  // merging at init is a no-op
      }
    };
    check(random_dense<float>(d.in, d.out, g));
    check(random_dense<double>(d.in, d.out, g));
    check(random_dense<peft::bf16>(d.in, d.out, g));
  }
  // the traits' make_default_for is this init
  const auto base = random_dense<double>(7, 5, g);
  const auto a = peft_test::adapter_traits<peft::dora<double>>::make_default_for(base, g);
  const auto x = peft_test::random_matrix<double>(3, 7, g);
  peft::matrix<double> h(3, 5);
  base.matmul(x.view(), h.view());
  CHECK(peft_test::exactly_equal(run_forward(a, base, x), h));
}

// ---- the norm cache ------------------------------------------------------------------------------

TEST_CASE("dora norm cache: reused while the parameters are unchanged, recomputed after any mutable access",
          "[dora][cache]") {
  peft::rng g(31);
  const ix in = 11, out = 7, batch = 2;
  counting_base base{random_dense<double>(in, out, g)};
  auto a = random_dora<double>(base.inner, 3, g);
  const auto x = peft_test::random_matrix<double>(batch, in, g);
  typename peft::dora<double>::cache_type cache;
  peft::matrix<double> y(batch, out);
  auto fwd = [&] {
    a.forward(base, x.view(), y.view(), cache);
    return y;
  };
  auto fresh = [&] { return run_forward(a, base.inner, x); };

  const auto y0 = fwd();
  CHECK(base.rows_decoded == out);  // one pass over W0
  CHECK(peft_test::exactly_equal(fwd(), y0));
  CHECK(peft_test::exactly_equal(fwd(), y0));
  CHECK(base.rows_decoded == out);  // cached: no further pass
  CHECK(rel_error(y0, reference_dora::of(a, base.inner).forward(x)) < 1e-13);

  (void)a.parameters();
  CHECK(peft_test::exactly_equal(fwd(), y0));
  CHECK(base.rows_decoded == 2 * out);  // recomputed after the mutable access

  SECTION("B changed through parameters()") {
    a.parameters()[1].value(2, 0) += 0.5;
    const auto y1 = fwd();
    CHECK(rel_error(y1, y0) > 1e-6);
    CHECK(peft_test::exactly_equal(y1, fresh()));
    CHECK(rel_error(y1, reference_dora::of(a, base.inner).forward(x)) < 1e-13);
  }
  SECTION("A, B, magnitude and the scale through their accessors") {
    a.A()(0, 3) -= 0.25;
    CHECK(peft_test::exactly_equal(fwd(), fresh()));
    a.B()(4, 1) += 0.25;
    CHECK(peft_test::exactly_equal(fwd(), fresh()));
    a.magnitude()(0, 5) *= 2.0;
    CHECK(peft_test::exactly_equal(fwd(), fresh()));
    a.set_scale(a.scale() * 3.0);
    const auto y1 = fwd();
    CHECK(peft_test::exactly_equal(y1, fresh()));
    CHECK(rel_error(y1, y0) > 1e-6);
    CHECK(rel_error(y1, reference_dora::of(a, base.inner).forward(x)) < 1e-13);
  }
  SECTION("a view kept from earlier: stale until invalidate_norms() or zero_grad()") {
    auto b = a.B();
    (void)fwd();
    b(0, 0) += 1.0;  // no accessor call: the cached n belongs to the old B
    const auto stale = fwd();
    CHECK(rel_error(stale, fresh()) > 1e-9);
    a.invalidate_norms();
    CHECK(peft_test::exactly_equal(fwd(), fresh()));
    b(1, 1) -= 1.0;
    a.zero_grad();  // what a training step calls
    CHECK(peft_test::exactly_equal(fwd(), fresh()));
  }
  SECTION("another base object is noticed; a base changed in place needs cache.invalidate()") {
    counting_base other{random_dense<double>(in, out, g)};
    a.forward(other, x.view(), y.view(), cache);
    CHECK(peft_test::exactly_equal(y, run_forward(a, other.inner, x)));
    (void)fwd();
    base.inner.mutable_weight()(2, 2) += 1.0;
    const auto stale = fwd();
    CHECK(rel_error(stale, fresh()) > 1e-9);
    cache.invalidate();
    CHECK(peft_test::exactly_equal(fwd(), fresh()));
  }
}

// ---- merging -------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("dora delta_weight, merge and unmerge: W' = (m / n) (W0 + s B A), and back", "[dora][merge]", float,
                   double) {
  using T = TestType;
  peft::rng g(404);
  for (const auto& d : shapes) {
    INFO("batch " << d.batch << " in " << d.in << " out " << d.out << " rank " << d.rank);
    const auto base = random_dense<double>(d.in, d.out, g);
    auto a = random_dora<T>(base, d.rank, g);
    const auto ref = reference_dora::of(a, base);
    peft::matrix<T> dw(d.out, d.in);
    a.delta_weight(base, dw.view());
    CHECK(rel_error(dw, ref.delta()) < tol<T>());
    REQUIRE(peft_test::nontrivial(ref.delta()));
    T db = 0;
    CHECK_FALSE(a.delta_bias(base, &db));

    peft::adapted_linear<peft::dense<double>, peft::dora<T>> layer(base);
    layer.add_adapter("a", a);
    const auto x = peft_test::random_matrix<T>(d.batch, d.in, g);
    peft::matrix<T> before(d.batch, d.out), after(d.batch, d.out);
    layer.forward(x, before);
    layer.merge("a");
    CHECK(rel_error(layer.base().weight(), peft_test::add(ref.w, ref.delta())) < tol<T>());
    layer.forward(x, after);
    CHECK(rel_error(after, before) < tol<T>());
    layer.unmerge("a");
    // W0 comes back as W' - dW: a few roundings of W' and s B A, which may be several times W0
    // (1 x 1 on AArch64, whose g++ draws random_dense's arguments in another order: W0 = 0.39,
    // W' = -3.43, one ulp of W' is 1.1e-15 of W0).
    CHECK(rel_error(layer.base().weight(), ref.w) < (std::is_same_v<T, float> ? 1e-6 : 1e-14));
    // unmerge must use the norms of merge time, not those of the merged weight
    peft::matrix<T> wrong(d.out, d.in);
    peft::dora<T> probe = a;
    probe.delta_weight(peft::dense<double>(peft_test::add(ref.w, ref.delta())), wrong.view());
    CHECK(rel_error(wrong, ref.delta()) > 1e-4);
  }
}

TEST_CASE("dora unmerge_delta: needs a delta_weight first and a non-zero magnitude", "[dora][merge]") {
  peft::rng g(5);
  const auto base = random_dense<double>(6, 4, g);
  auto a = random_dora<double>(base, 2, g);
  peft::matrix<double> dw(4, 6);
  CHECK_THROWS_AS(a.unmerge_delta(base, dw.view()), peft::error);
  a.magnitude()(0, 2) = 0.0;
  peft::adapted_linear<peft::dense<double>, peft::dora<double>> layer(base);
  layer.add_adapter("a", a);
  layer.merge("a");
  const auto merged = peft_test::to_double(layer.base().weight());
  CHECK_THROWS_WITH(layer.unmerge("a"), Catch::Contains("[dora::unmerge_delta]") && Catch::Contains("magnitude[2]"));
  CHECK(layer.merged("a"));
  CHECK(rel_error(layer.base().weight(), merged) == 0.0);  // nothing changed
}

// ---- several adapters on one layer ----------------------------------------------------------------

TEMPLATE_TEST_CASE("dora: two adapters on one layer rescale the shared base output, each adding its term",
                   "[dora][multi]", float, double) {
  using T = TestType;
  peft::rng g(88);
  const ix in = 9, out = 7, batch = 4;
  const auto base = random_dense<double>(in, out, g);
  peft::adapted_linear<peft::dense<double>, peft::dora<T>> layer(base);
  layer.add_adapter("a", random_dora<T>(base, 3, g, 5.0));
  layer.add_adapter("b", random_dora<T>(base, 2, g, 1.5));
  const auto ra = reference_dora::of(layer.adapter("a"), base);
  const auto rb = reference_dora::of(layer.adapter("b"), base);
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  // y = h + [(k_a - 1) x W0^T + k_a s_a x A_a^T B_a^T] + [the same for b]
  const auto h = peft_test::ref_linear(x, ra.w, ra.b0);
  const auto y_ref = peft_test::add(peft_test::add(h, ra.term(x)), rb.term(x));
  peft::matrix<T> y(batch, out), dx(batch, in);
  layer.forward(x, y);
  CHECK(rel_error(y, y_ref) < tol<T>());
  CHECK(rel_error(y, ra.forward(x)) > 1e-3);  // b contributes
  layer.zero_grad();
  layer.backward(x, gy, dx);
  // dx = (k_a + k_b - 1) g W0 + s_a ((k_a g) B_a) A_a + s_b ((k_b g) B_b) A_b
  const auto ga = ra.backward(x, gy);
  const auto gb = rb.backward(x, gy);
  const auto dx_ref = peft_test::add(peft_test::add(ga.dx, gb.dx), peft_test::ref_nn(gy, ra.w), -1.0);
  CHECK(rel_error(dx, dx_ref) < tol<T>());
  for (const auto& [name, gr] : {std::pair{std::string("a"), ga}, std::pair{std::string("b"), gb}}) {
    INFO("adapter " << name);
    const auto& ad = layer.adapter(name);
    CHECK(rel_error(ad.grad_A(), gr.da) < tol<T>());
    CHECK(rel_error(ad.grad_B(), gr.db) < tol<T>());
    CHECK(rel_error(ad.grad_magnitude(), gr.dm) < tol<T>());
  }
  // with b disabled the layer is adapter a alone
  layer.set_enabled("b", false);
  layer.forward(x, y);
  CHECK(rel_error(y, ra.forward(x)) < tol<T>());
}

// ---- checkpoint hooks and errors -----------------------------------------------------------------

namespace {
template <class T>
peft::io::stored_tensor<T> stored(std::vector<std::int64_t> shape, peft::matrix<T> m) {
  return {std::move(shape), peft::dtype::f32, std::make_shared<peft::matrix<T>>(std::move(m))};
}
}  // namespace

TEST_CASE("dora from_checkpoint: rank/alpha patterns as LoRA, magnitude checked, lora_bias refused", "[dora][io]") {
  peft::rng g(12);
  auto cfg = peft::io::adapter_config::lora(4, 8.0, {"q"}, /*use_rslora=*/true);
  cfg.use_dora = true;
  cfg.rank_pattern = {{"k", 2}};
  cfg.alpha_pattern = {{"k", 3.0}};
  CHECK(peft::io::peft_codec<peft::dora<double>>::handles(cfg));
  auto module = [&](const std::string& name, ix r, ix out) {
    peft::io::checkpoint_tensors<double> m(name);
    m.add("lora_A.weight", stored<double>({r, 5}, peft_test::random_matrix<double>(r, 5, g)));
    m.add("lora_B.weight", stored<double>({out, r}, peft_test::random_matrix<double>(out, r, g)));
    m.add("lora_magnitude_vector", stored<double>({out}, peft_test::random_matrix<double>(1, out, g)));
    return m;
  };
  const peft::io::checkpoint_tensors<double> none;
  const auto q = peft::io::from_checkpoint<peft::dora<double>>(cfg, module("layers.0.q", 4, 3), none);
  CHECK(q.scale() == Approx(8.0 / 2.0).epsilon(1e-15));  // rsLoRA: 8 / sqrt(4)
  const auto k = peft::io::from_checkpoint<peft::dora<double>>(cfg, module("layers.0.k", 2, 3), none);
  CHECK(k.rank() == 2);
  CHECK(k.scale() == Approx(3.0 / std::sqrt(2.0)).epsilon(1e-15));
  // describe_in writes use_dora and the patterns that reproduce rank and scale
  peft::io::adapter_config out = peft::io::adapter_config::lora(4, 8.0, {"q"}, true);
  peft::io::describe_in(k, out, "layers.0.k");
  CHECK(out.use_dora);
  CHECK(out.rank_for("layers.0.k") == 2);
  CHECK(peft::lora_scale(out.alpha_for("layers.0.k"), 2, true) == Approx(k.scale()).epsilon(1e-12));

  auto bad = module("layers.0.q", 4, 3);
  bad.add("lora_magnitude_vector", stored<double>({4}, peft_test::random_matrix<double>(1, 4, g)));
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::dora<double>>(cfg, bad, none), peft::format_error);
  peft::io::checkpoint_tensors<double> missing("layers.0.q");
  missing.add("lora_A.weight", stored<double>({4, 5}, peft_test::random_matrix<double>(4, 5, g)));
  missing.add("lora_B.weight", stored<double>({3, 4}, peft_test::random_matrix<double>(3, 4, g)));
  CHECK_THROWS_WITH(peft::io::from_checkpoint<peft::dora<double>>(cfg, missing, none), Catch::Contains("lora_magnitude_vector"));
  auto biased = module("layers.0.q", 4, 3);
  biased.add("lora_B.bias", stored<double>({3}, peft_test::random_matrix<double>(1, 3, g)));
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::dora<double>>(cfg, biased, none), peft::unsupported_error);
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::dora<double>>(cfg, module("layers.0.q", 2, 3), none), peft::format_error);

  auto plain = cfg;
  plain.use_dora = false;
  CHECK_FALSE(peft::io::peft_codec<peft::dora<double>>::handles(plain));
  plain.peft_type = "VERA";
  plain.use_dora = true;
  CHECK_FALSE(peft::io::peft_codec<peft::dora<double>>::handles(plain));
}

TEMPLATE_TEST_CASE("dora errors: bad shapes and options", "[dora][errors]", float, double) {
  using T = TestType;
  peft::rng g(1);
  const auto base = random_dense<float>(5, 4, g);
  CHECK_THROWS_AS(peft::dora<T>(base, {.rank = 2, .bias = true}), peft::unsupported_error);
  CHECK_THROWS_AS(peft::dora<T>(base, {.rank = 0}), peft::shape_error);
  CHECK_THROWS_AS(peft::dora<T>(peft::matrix<T>(2, 5), peft::matrix<T>(4, 3), T{1}, std::vector<T>(4)),
                  peft::shape_error);
  CHECK_THROWS_AS(peft::dora<T>(peft::matrix<T>(2, 5), peft::matrix<T>(4, 2), T{1}, std::vector<T>(3)),
                  peft::shape_error);
  CHECK_THROWS_AS(peft::dora<T>(peft::lora<T>(peft::matrix<T>(2, 5), peft::matrix<T>(4, 2), T{1}, std::vector<T>(4)),
                                std::vector<T>(4)),
                  peft::unsupported_error);

  peft::dora<T> a(base, {.rank = 2});
  using peft_test::arg;
  using peft_test::pass;
  const auto prefix = peft_test::match::prefix;
  peft_test::check_shape_errors(a, base, 3,
                                {{pass::forward, arg::x, 3, 6, "[dora::forward] x is (3, 6)", prefix},
                                 {pass::forward, arg::y, 2, 4},
                                 {pass::forward, arg::base, 3, 5, "[dora::forward] base weight", prefix},
                                 {pass::add_term, arg::h, 2, 4},
                                 {pass::backward, arg::dy, 2, 4},
                                 {pass::backward_term, arg::dh, 2, 4},
                                 {pass::delta_weight, arg::dw, 4, 4}});
  const auto other = random_dense<float>(5, 3, g);
  CHECK_THROWS_AS(a.row_norms(other), peft::shape_error);
  CHECK_THROWS_AS(a.pin_norms(std::vector<T>(3, T{1})), peft::shape_error);
  CHECK_THROWS_AS(a.pin_norms({T{1}, T{0}, T{1}, T{1}}), peft::error);
  CHECK_THROWS_AS(a.pin_norms({T{1}, T{1}, std::numeric_limits<T>::quiet_NaN(), T{1}}), peft::error);
  CHECK_FALSE(a.norms_pinned());
}

}  // namespace test_dora
