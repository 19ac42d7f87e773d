// OFT: parity with HuggingFace PEFT 0.21 on the golden cases (tests/data/peft/oft: exact Cayley,
// blocks of 16; oft_neumann: PEFT's default Cayley-Neumann series, 5 terms; oft_block_share: one
// block for all; oft_coft: coft with eps 3.2, some blocks projected, some not), the rotation's
// forms against closed forms, coft's projection, merge/unmerge, a quantized base, the block
// resolution (PEFT's adjustment), saving and reloading, and the codec's errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/oft.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/q8_0.hpp"
#include "peft/io/peft/oft.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_oft {

using ix = peft::index;

namespace {

namespace fs = std::filesystem;
using peft_test::message_of;
using peft_test::rel_error;
using peft_test::tolerance;

template <class T>
using golden_case = peft_test::golden_case<peft::oft<T>>;

/// PEFT's name of oft_R's gradient: the adapter name sits before ".weight".
template <class T>
void check_oft_gradient(golden_case<T>& c, const std::string& name, double tol) {
  auto params = c.layer(name).adapter("default").parameters();
  REQUIRE(params.size() == 1);
  REQUIRE(params[0].name == "oft_R.weight");
  const auto ref = c.ref("grad.base_model.model." + name + ".oft_R.default.weight");
  REQUIRE(peft_test::count_nonzero(ref) > ref.size() / 2);
  CHECK(rel_error(params[0].grad, ref) < tol);
  CHECK(c.reference_gradients(name) == 1);
}

/// One case: each layer (output, dx, gradient), the network (y, dL/dx, gradients), the merged
/// weights (delta in double against merged.*, tolerance `merge_tol`; adapted_linear::merge into
/// the f32 base to 1e-6).
template <class T>
void check_case(const std::string& name, double tol, double merge_tol) {
  INFO("case " << name);
  {
    golden_case<T> c(name);
    for (const std::string layer : {"up", "down"}) {
      INFO("layer " << layer);
      REQUIRE(peft_test::nontrivial(c.layer(layer).adapter("default").weight()));
      peft_test::check_layer_outputs(c, layer, tol);
      check_oft_gradient(c, layer, tol);
    }
  }
  {
    golden_case<T> c(name);
    peft_test::check_network_outputs(c, tol);
    for (const std::string layer : {"up", "down"}) check_oft_gradient(c, layer, tol);
  }
  {
    golden_case<T> c(name);
    for (const std::string layer : {"up", "down"}) {
      INFO("layer " << layer);
      const auto w_ref = c.ref("merged." + layer + ".weight");
      const auto w0 = c.base.template read_matrix<double>(layer + ".weight");
      REQUIRE(rel_error(w0, w_ref) > 1e-3);
      const peft::dense<double> exact(w0, c.base.template read<double>(layer + ".bias"));
      const auto& a = c.layer(layer).adapter("default");
      peft::matrix<T> dw(w0.rows(), w0.cols());
      a.delta_weight(exact, dw.view());
      CHECK(rel_error(peft_test::add(w0, dw), w_ref) < merge_tol);
      std::vector<T> db(static_cast<std::size_t>(w0.rows()));
      CHECK_FALSE(a.delta_bias(exact, db.data()));
      CHECK(rel_error(peft::matrix<double>(1, w0.rows(), exact.bias()), c.ref("merged." + layer + ".bias")) == 0.0);
      peft_test::check_merged_base(c, layer, 1e-300);  // the bias is untouched: exactly equal
    }
  }
}

/// A random adapter of the given form, entries uniform in +-[0.05, 0.3].
template <class T>
peft::oft<T> random_oft(ix in, ix out, ix block, const peft::oft_form& f, peft::rng& g) {
  peft::oft<T> a(in, out, {.block_size = block, .form = f});
  auto w = a.weight();
  for (ix i = 0; i < w.rows(); ++i)
    for (ix j = 0; j < w.cols(); ++j) {
      const double m = g.uniform(0.05, 0.3);
      w(i, j) = static_cast<T>(g.below(2) == 0 ? m : -m);
    }
  return a;
}

/// Q_k of stored block k as a double matrix (no coft).
template <class T>
peft::matrix<double> skew_of(const peft::oft<T>& a, ix k) {
  const ix b = a.block_size();
  peft::matrix<double> q(b, b);
  ix e = 0;
  for (ix i = 0; i < b; ++i)
    for (ix j = i + 1; j < b; ++j, ++e) {
      q(i, j) = static_cast<double>(a.weight()(k, e));
      q(j, i) = -q(i, j);
    }
  return q;
}

peft::matrix<double> identity(ix n) {
  peft::matrix<double> m(n, n);
  for (ix i = 0; i < n; ++i) m(i, i) = 1.0;
  return m;
}

}  // namespace

// ---- parity with PEFT ---------------------------------------------------------------------------

TEMPLATE_TEST_CASE("oft golden: exact Cayley, Neumann series and block_share reproduce PEFT", "[oft][golden]", float,
                   double) {
  for (const std::string name : {"oft", "oft_neumann", "oft_block_share"}) {
    check_case<TestType>(name, tolerance<TestType>(), tolerance<TestType>());
  }
}

// PEFT's golden script runs the float32 model first, and coft's projection writes into the
// parameter during that forward: the double reference then starts from weights projected (and
// rounded) in float32, ours from the saved (unprojected) weights projected in double. The blocks
// the projection leaves alone agree to 1e-12; the projected ones differ by float32 rounding
// (about 3e-8 relative in the outputs).
TEMPLATE_TEST_CASE("oft golden: coft projects the blocks outside the ball as PEFT does", "[oft][golden][coft]", float,
                   double) {
  // Measured: 3e-8 in double, 4e-7 in float.
  const double tol = std::is_same_v<TestType, double> ? 1e-7 : tolerance<float>();
  check_case<TestType>("oft_coft", tol, tol);
  // The projection matters: the same adapter without coft is far off.
  golden_case<TestType> c("oft_coft");
  const auto& down = c.down.adapter("default");
  peft::matrix<TestType> w_copy(down.weight().rows(), down.weight().cols());
  for (ix i = 0; i < w_copy.rows(); ++i)
    for (ix j = 0; j < w_copy.cols(); ++j) w_copy(i, j) = down.weight()(i, j);
  const peft::oft<TestType> plain(std::move(w_copy), 16, {.use_cayley_neumann = false}, 96, 48);
  const auto x = c.ref_t("layer.down.input");
  const auto w = peft_test::load_base(c.base, "down");
  peft::matrix<TestType> y(x.rows(), 48);
  typename peft::oft<TestType>::cache_type cache;
  plain.forward(w, x.view(), y.view(), cache);
  CHECK(rel_error(y, c.ref("layer.down.output")) > 1e-3);
}

TEST_CASE("oft golden: which coft blocks PEFT projects; constrain() writes the projection", "[oft][golden][coft]") {
  golden_case<double> c("oft_coft");
  auto& up = c.up.adapter("default");
  auto& down = c.down.adapter("default");
  REQUIRE(up.form().coft);
  REQUIRE(up.form().eps == 3.2);
  // radius eps / sqrt(#blocks) in float32: up 4 blocks, down 6.
  const double r_up = static_cast<double>(3.2f / std::sqrt(4.0f)), r_down = static_cast<double>(3.2f / std::sqrt(6.0f));
  auto norms = [](const peft::oft<double>& a) {
    std::vector<double> n;
    for (ix k = 0; k < a.stored_blocks(); ++k) {
      double s = 0;
      for (ix e = 0; e < a.weight().cols(); ++e) s += 2 * a.weight()(k, e) * a.weight()(k, e);
      n.push_back(std::sqrt(s));
    }
    return n;
  };
  const auto before_up = norms(up), before_down = norms(down);
  int inside = 0, outside = 0;
  for (double v : before_up) (v <= r_up ? inside : outside)++;
  for (double v : before_down) (v <= r_down ? inside : outside)++;
  CHECK(inside >= 2);  // the case covers both branches
  CHECK(outside >= 2);
  up.constrain();
  down.constrain();
  const auto after_up = norms(up), after_down = norms(down);
  for (std::size_t k = 0; k < after_up.size(); ++k) {
    CHECK(after_up[k] == Approx(std::min(before_up[k], r_up)).epsilon(1e-14));
  }
  for (std::size_t k = 0; k < after_down.size(); ++k) {
    CHECK(after_down[k] == Approx(std::min(before_down[k], r_down)).epsilon(1e-14));
  }
  // Projecting again changes nothing measurable; the outputs are those of the projection.
  peft_test::check_layer_outputs(c, "up", 1e-6);
  peft_test::check_layer_outputs(c, "down", 1e-6);
}

TEST_CASE("oft golden checkpoint: block size from the tensor, out_features from the base", "[oft][golden][io]") {
  const auto base = peft::io::safetensors_file::open(peft_test::golden_dir("oft_block_share") / "base_model.safetensors");
  auto ck = peft::io::load_checkpoint_as<peft::oft<double>>(peft_test::golden_dir("oft_block_share") / "adapter");
  auto& up = ck.find("up.weight")->adapter;
  CHECK(up.block_size() == 16);
  CHECK(up.stored_blocks() == 1);
  CHECK(up.form().block_share);
  CHECK_FALSE(up.form().use_cayley_neumann);
  CHECK(up.in_features() == 0);  // one shared block: any multiple of 16
  CHECK(up.out_features() == 0);
  CHECK_THROWS_AS(up.set_features(60, 96), peft::shape_error);
  up.set_features(64, 96);
  CHECK(up.in_features() == 64);
  CHECK_THROWS_AS(up.set_features(64, 95), peft::shape_error);
  auto ck2 = peft::io::load_checkpoint_as<peft::oft<double>>(peft_test::golden_dir("oft_neumann") / "adapter");
  const auto& down = ck2.find("down.weight")->adapter;
  CHECK(down.in_features() == 96);
  CHECK(down.stored_blocks() == 6);
  CHECK(down.form().use_cayley_neumann);
  CHECK(down.form().num_cayley_neumann_terms == 5);
}

TEST_CASE("oft: save_peft_checkpoint writes PEFT's tensors and fields and reloads to identical adapters",
          "[oft][golden][io]") {
  for (const std::string name : {"oft", "oft_neumann", "oft_block_share", "oft_coft"}) {
    INFO("case " << name);
    const auto base = peft::io::safetensors_file::open(peft_test::golden_dir(name) / "base_model.safetensors");
    auto ck = peft_test::load_bound<peft::oft<double>>(peft_test::golden_dir(name) / "adapter", base);
    const auto dir = peft_test::scratch_path("peft_oft_roundtrip_" + name);
    fs::remove_all(dir);
    peft::io::save_peft_checkpoint(dir, ck);
    const auto saved = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
    const auto original = peft::io::safetensors_file::open(peft_test::golden_dir(name) / "adapter" / "adapter_model.safetensors");
    REQUIRE(saved.tensors().size() == 2);
    for (const std::string n : {"base_model.model.up.oft_R.weight", "base_model.model.down.oft_R.weight"}) {
      INFO(n);
      CHECK(saved.info(n).shape == original.info(n).shape);
      CHECK(saved.read<float>(n) == original.read<float>(n));  // f32 in, f32 out: bit-exact
    }
    const auto cfg = peft::io::adapter_config::load(dir);
    const auto ref = peft::io::adapter_config::load(peft_test::golden_dir(name) / "adapter");
    CHECK(cfg.peft_type == "OFT");
    for (const char* k : {"r", "oft_block_size", "coft", "eps", "block_share", "use_cayley_neumann",
                          "num_cayley_neumann_terms", "module_dropout", "bias", "init_weights"}) {
      INFO(k);
      CHECK(cfg.raw[k] == ref.raw[k]);
    }
    auto back = peft_test::load_bound<peft::oft<double>>(dir, base);
    for (const std::string layer : {"up", "down"}) {
      const auto& a0 = ck.find(layer + ".weight")->adapter;
      const auto& a1 = back.find(layer + ".weight")->adapter;
      CHECK(peft_test::exactly_equal(a1.weight(), a0.weight()));
      CHECK(a1.block_size() == a0.block_size());
      CHECK(a1.in_features() == a0.in_features());
      CHECK(a1.out_features() == a0.out_features());
      CHECK(a1.form().block_share == a0.form().block_share);
      CHECK(a1.form().coft == a0.form().coft);
      CHECK(a1.form().eps == a0.form().eps);
      CHECK(a1.form().use_cayley_neumann == a0.form().use_cayley_neumann);
      CHECK(a1.form().num_cayley_neumann_terms == a0.form().num_cayley_neumann_terms);
    }
    fs::remove_all(dir);
  }
}

// ---- the rotation ------------------------------------------------------------------------------

TEST_CASE("oft: the exact Cayley rotation is orthogonal and (I - Q)(I + Q)^{-1}", "[oft][math]") {
  peft::rng g(3);
  const auto a = random_oft<double>(12, 5, 4, {.use_cayley_neumann = false}, g);
  const auto r = a.rotation();
  REQUIRE(r.rows() == 12);
  for (ix k = 0; k < 3; ++k) {
    INFO("block " << k);
    const auto q = skew_of(a, k);
    peft::matrix<double> rk(4, 4);
    for (ix i = 0; i < 4; ++i)
      for (ix j = 0; j < 4; ++j) rk(i, j) = r(k * 4 + i, j);
    // R (I + Q) = I - Q
    CHECK(rel_error(peft_test::ref_nn(rk, peft_test::add(identity(4), q)), peft_test::add(identity(4), q, -1.0)) < 1e-14);
    CHECK(rel_error(peft_test::ref_nt(rk, rk), identity(4)) < 1e-14);  // R R^T = I
  }
}

TEST_CASE("oft: PEFT's Neumann coefficients, including its 3- and 4-term quirk", "[oft][math]") {
  using v = std::vector<double>;
  CHECK(peft::oft_neumann_coefficients(0) == v{});
  CHECK(peft::oft_neumann_coefficients(1) == v{});
  CHECK(peft::oft_neumann_coefficients(2) == v{2});
  CHECK(peft::oft_neumann_coefficients(3) == v{2, 2, 1});
  CHECK(peft::oft_neumann_coefficients(4) == v{2, 2, 1});
  CHECK(peft::oft_neumann_coefficients(5) == v{2, 2, 2, 1});
  CHECK(peft::oft_neumann_coefficients(7) == v{2, 2, 2, 2, 2, 1});
}

TEST_CASE("oft: the Neumann rotation is I + sum c_k Q^k and tends to the exact rotation's transpose", "[oft][math]") {
  peft::rng g(5);
  auto a = random_oft<double>(6, 2, 3, {.use_cayley_neumann = true, .num_cayley_neumann_terms = 6}, g);
  const auto q = skew_of(a, 0);
  peft::matrix<double> ref = identity(3), p = identity(3);
  for (double c : peft::oft_neumann_coefficients(6)) {
    p = peft_test::ref_nn(p, q);
    ref = peft_test::add(ref, p, c);
  }
  const auto r = a.rotation();
  peft::matrix<double> r0(3, 3), r_exact_t(3, 3);
  for (ix i = 0; i < 3; ++i)
    for (ix j = 0; j < 3; ++j) r0(i, j) = r(i, j);
  CHECK(rel_error(r0, ref) < 1e-15);
  // With many terms and small Q the series reaches (I + Q)(I - Q)^{-1} = ((I - Q)(I + Q)^{-1})^T.
  auto small = random_oft<double>(6, 2, 3, {.use_cayley_neumann = true, .num_cayley_neumann_terms = 60}, g);
  auto exact = random_oft<double>(6, 2, 3, {.use_cayley_neumann = false}, g);
  for (ix i = 0; i < small.weight().rows(); ++i)
    for (ix j = 0; j < small.weight().cols(); ++j) exact.weight()(i, j) = small.weight()(i, j) *= 0.5;
  const auto rs = small.rotation(), re = exact.rotation();
  for (ix k = 0; k < 2; ++k)
    for (ix i = 0; i < 3; ++i)
      for (ix j = 0; j < 3; ++j) r_exact_t(i, j) = re(k * 3 + j, i);
  peft::matrix<double> rs0(3, 3);
  for (ix i = 0; i < 3; ++i)
    for (ix j = 0; j < 3; ++j) rs0(i, j) = rs(3 + i, j);
  CHECK(rel_error(rs0, r_exact_t) < 1e-12);
}

TEMPLATE_TEST_CASE("oft: forward, dx, gradients and merge against a materialised rotation, every form", "[oft]", float,
                   double) {
  using T = TestType;
  peft::rng g(11);
  const ix in = 12, out = 7, batch = 4;
  const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
  const auto x = peft_test::random_matrix<T>(batch, in, g);
  const auto gy = peft_test::random_matrix<T>(batch, out, g);
  const std::vector<peft::oft_form> forms{{.use_cayley_neumann = false},
                                          {.use_cayley_neumann = true, .num_cayley_neumann_terms = 5},
                                          {.block_share = true, .use_cayley_neumann = false},
                                          {.block_share = true, .use_cayley_neumann = true, .num_cayley_neumann_terms = 2}};
  for (const auto& f : forms) {
    INFO("block_share " << f.block_share << " neumann " << f.use_cayley_neumann);
    auto a = random_oft<T>(in, out, 4, f, g);
    const auto r = a.rotation();
    // The full (in, in) block-diagonal R.
    peft::matrix<double> big(in, in);
    for (ix k = 0; k < in / 4; ++k)
      for (ix i = 0; i < 4; ++i)
        for (ix j = 0; j < 4; ++j) big(k * 4 + i, k * 4 + j) = static_cast<double>(r((f.block_share ? 0 : k) * 4 + i, j));
    const auto w_eff = peft_test::ref_nt(w.weight(), big);  // W0 R^T
    typename peft::oft<T>::cache_type cache;
    peft::matrix<T> y(batch, out), dx(batch, in);
    a.forward(w, x.view(), y.view(), cache);
    CHECK(rel_error(y, peft_test::ref_linear(x, w_eff, w.bias())) < tolerance<T>());
    a.zero_grad();
    a.backward(w, x.view(), gy.view(), dx.view(), cache);
    CHECK(rel_error(dx, peft_test::ref_nn(gy, w_eff)) < tolerance<T>());
    peft::matrix<T> dw(out, in);
    a.delta_weight(w, dw.view());
    CHECK(rel_error(dw, peft_test::add(w_eff, w.weight(), -1.0)) < tolerance<T>());
    // unmerge_delta from the merged weight recovers what merge added.
    const peft::dense<double> merged(w_eff, w.bias());
    peft::matrix<T> back(out, in);
    a.unmerge_delta(merged, back.view());
    CHECK(rel_error(back, dw) < 10 * tolerance<T>());
    // backward with an empty cache recomputes the rotation.
    auto grad = peft_test::to_double(a.grad_weight());
    a.zero_grad();
    typename peft::oft<T>::cache_type empty;
    a.backward(w, x.view(), gy.view(), dx.view(), empty);
    CHECK(rel_error(a.grad_weight(), grad) < tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("oft: merge and unmerge through adapted_linear, Neumann (not orthogonal) included", "[oft][merge]",
                   float, double) {
  using T = TestType;
  peft::rng g(13);
  const ix in = 8, out = 6;
  const peft::dense<double> w0(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
  const auto x = peft_test::random_matrix<T>(3, in, g);
  for (const bool neumann : {false, true}) {
    INFO("neumann " << neumann);
    const auto a = random_oft<T>(in, out, 4, {.use_cayley_neumann = neumann, .num_cayley_neumann_terms = 3}, g);
    peft::adapted_linear<peft::dense<double>, peft::oft<T>> layer(w0);
    layer.add_adapter("a", a);
    peft::matrix<T> before(3, out), after(3, out);
    layer.forward(x, before);
    layer.merge("a");
    CHECK(rel_error(layer.base().weight(), w0.weight()) > 1e-3);
    layer.forward(x, after);
    CHECK(rel_error(after, before) < tolerance<T>());
    layer.unmerge("a");
    CHECK(rel_error(layer.base().weight(), w0.weight()) < 10 * tolerance<T>());
  }
}

TEST_CASE("oft: over a quantized base, the same as over its dequantized dense copy", "[oft][quantized]") {
  peft::rng g(17);
  const ix in = 64, out = 5, batch = 3;
  const auto wd = peft_test::random_matrix<float>(out, in, g);
  const auto bias = peft_test::random_vector<float>(out, g);
  const auto q = peft::q8_0::quantize(peft::matrix_view<const float>(wd.view()), bias.data());
  peft::matrix<double> deq(out, in);
  for (ix i = 0; i < out; ++i) q.dequantize_row(i, deq.row(i));
  std::vector<double> b(bias.begin(), bias.end());
  const peft::dense<double> dense(deq, b);
  auto a = random_oft<double>(in, out, 16, {.use_cayley_neumann = true}, g);
  auto a2 = a;
  const auto x = peft_test::random_matrix<double>(batch, in, g);
  const auto gy = peft_test::random_matrix<double>(batch, out, g);
  typename peft::oft<double>::cache_type c1, c2;
  peft::matrix<double> y1(batch, out), y2(batch, out), dx1(batch, in), dx2(batch, in), dw1(out, in), dw2(out, in);
  a.forward(q, x.view(), y1.view(), c1);
  a2.forward(dense, x.view(), y2.view(), c2);
  CHECK(rel_error(y1, y2) < 1e-6);  // q8_0 computes in f32
  a.backward(q, x.view(), gy.view(), dx1.view(), c1);
  a2.backward(dense, x.view(), gy.view(), dx2.view(), c2);
  CHECK(rel_error(dx1, dx2) < 1e-6);
  CHECK(rel_error(a.grad_weight(), a2.grad_weight()) < 1e-6);
  a.delta_weight(q, dw1.view());
  a2.delta_weight(dense, dw2.view());
  CHECK(rel_error(dw1, dw2) < 1e-14);
}

TEMPLATE_TEST_CASE("oft: PEFT's init is the identity; init_weights=false draws N(0, 0.1)", "[oft][init]", float, double) {
  peft::rng g(19);
  peft::oft<TestType> a(32, 8, {.block_size = 8});
  CHECK(a.stored_blocks() == 4);
  CHECK(a.weight().cols() == 28);
  CHECK(peft_test::count_nonzero(a.weight()) == 0);
  peft_test::check_identity_at_init(a, 3, g);
  peft::oft<TestType> r(32, 8, {.block_size = 0, .r = 2, .init = peft::oft_init::random, .seed = 4});
  CHECK(r.block_size() == 16);
  CHECK(r.stored_blocks() == 2);
  const double s = peft_test::frobenius(r.weight()) / std::sqrt(240.0);
  CHECK(s == Approx(0.1).margin(0.02));
  peft::oft<TestType> shared(32, 8, {.block_size = 4, .form = {.block_share = true}});
  CHECK(shared.stored_blocks() == 1);
  CHECK(shared.in_features() == 32);
}

// ---- block resolution and errors ---------------------------------------------------------------

TEST_CASE("oft: r / oft_block_size resolved and adjusted as PEFT does", "[oft][blocks]") {
  using p = std::pair<ix, ix>;
  CHECK(peft::oft_blocks(64, 0, 16, "t") == p{4, 16});
  CHECK(peft::oft_blocks(64, 4, 0, "t") == p{4, 16});
  CHECK(peft::oft_blocks(96, 0, 32, "t") == p{3, 32});
  CHECK(peft::oft_blocks(100, 0, 32, "t") == p{4, 25});   // 32 -> 25 (nearer than 50)
  CHECK(peft::oft_blocks(7, 0, 4, "t") == p{7, 1});       // a tie goes to the lower divisor
  CHECK(peft::oft_blocks(12, 0, 40, "t") == p{1, 12});    // larger than in: in
  CHECK(peft::oft_blocks(12, 5, 0, "t") == p{4, 3});      // r adjusted the same way
  CHECK(peft::oft_adjust(30, 7) == 6);
  CHECK(peft::oft_adjust(30, 8) == 6);  // a tie: the lower
  CHECK(peft::oft_adjust(30, 9) == 10);
  CHECK_THROWS_AS(peft::oft_blocks(64, 4, 16, "t"), peft::error);
  CHECK_THROWS_AS(peft::oft_blocks(64, 0, 0, "t"), peft::error);
  CHECK(message_of([] { peft::oft_blocks(64, 4, 16, "oft::oft"); }).rfind("[oft::oft]", 0) == 0);
  CHECK_THROWS_AS(peft::oft<double>(0, 3, {}), peft::shape_error);
  CHECK_THROWS_AS(peft::oft<double>(8, 0, {}), peft::shape_error);
  CHECK_THROWS_AS(peft::oft<double>(8, 3, {.form = {.coft = true, .eps = 0.0}}), peft::error);
  CHECK_THROWS_AS(peft::oft<double>(peft::matrix<double>(2, 5), 4, {}), peft::shape_error);  // 6 per block of 4
  CHECK_THROWS_AS(peft::oft<double>(peft::matrix<double>(2, 6), 4, {.block_share = true}), peft::shape_error);
  CHECK_THROWS_AS(peft::oft<double>(peft::matrix<double>(2, 6), 4, {}, 12), peft::shape_error);
}

TEST_CASE("oft: shape errors of the passes name the function", "[oft][errors]") {
  peft::rng g(23);
  auto a = random_oft<double>(8, 3, 4, {}, g);
  const peft::dense<double> wrong(peft_test::random_matrix<double>(3, 12, g));
  const peft::dense<double> w(peft_test::random_matrix<double>(3, 8, g));
  peft::matrix<double> x(2, 8), y(2, 3), dx(2, 8), bad(2, 4);
  typename peft::oft<double>::cache_type c;
  CHECK(message_of([&] { a.forward(wrong, x.view(), y.view(), c); }).rfind("[oft::forward]", 0) == 0);
  CHECK(message_of([&] { a.forward(w, x.view(), bad.view(), c); }).rfind("[oft::forward]", 0) == 0);
  CHECK(message_of([&] { a.backward(w, x.view(), y.view(), bad.view(), c); }).rfind("[oft::backward]", 0) == 0);
  CHECK(message_of([&] { a.add_term(w, x.view(), y.view(), bad.view(), c); }).rfind("[oft::add_term]", 0) == 0);
  peft::matrix<double> dw(3, 7);
  CHECK(message_of([&] { a.delta_weight(w, dw.view()); }).rfind("[oft::delta_weight]", 0) == 0);
  CHECK_THROWS_AS(a.forward(wrong, x.view(), y.view(), c), peft::shape_error);
  const peft::oft<double> unset;
  CHECK(message_of([&] { unset.forward(w, x.view(), y.view(), c); }).rfind("[oft::forward]", 0) == 0);
}

TEST_CASE("oft codec: PEFT < 0.14 configs, unknown fields, bias and malformed tensors are refused by name",
          "[oft][errors][io]") {
  const auto dir = peft_test::scratch_path("peft_oft_malformed");
  using A = peft::oft<float>;
  auto load = [&] { peft::io::load_checkpoint_as<A>(dir); };
  auto keep = [](auto&) {};
  SECTION("no oft_block_size: PEFT < 0.14") {
    peft_test::rewrite_adapter("oft", dir, [](auto& c) { c.erase("oft_block_size"); });
    CHECK_THROWS_AS(load(), peft::format_error);
    CHECK(message_of(load).find("0.14") != std::string::npos);
    CHECK(message_of(load).rfind("[oft::from_checkpoint]", 0) == 0);
  }
  SECTION("bias trained") {
    peft_test::rewrite_adapter("oft", dir, [](auto& c) { c["bias"] = "oft_only"; });
    CHECK_THROWS_AS(load(), peft::unsupported_error);
    CHECK(message_of(load).find("'bias'") != std::string::npos);
  }
  SECTION("an unknown field with a non-default value") {
    peft_test::rewrite_adapter("oft", dir, [](auto& c) { c["oft_future_option"] = true; });
    CHECK_THROWS_AS(load(), peft::unsupported_error);
    CHECK(message_of(load).find("oft_future_option") != std::string::npos);
  }
  SECTION("module_dropout and init_weights are training-only") {
    peft_test::rewrite_adapter("oft", dir, [](auto& c) {
      c["module_dropout"] = 0.1;
      c["init_weights"] = false;
    });
    CHECK_NOTHROW(load());
  }
  SECTION("r and oft_block_size both set") {
    peft_test::rewrite_adapter("oft", dir, [](auto& c) { c["r"] = 4; });
    CHECK_THROWS_AS(load(), peft::error);
    CHECK(message_of(load).rfind("[oft::from_checkpoint]", 0) == 0);
  }
  SECTION("r instead of oft_block_size") {
    peft_test::rewrite_adapter("oft", dir, [](auto& c) {
      c["r"] = 4;
      c["oft_block_size"] = 0;
    });
    // up: 64 / 4 = 16, down: 96 / 4 = 24, but the tensors hold blocks of 16.
    CHECK_THROWS_AS(load(), peft::format_error);
    CHECK(message_of(load).find("blocks of 24") != std::string::npos);
  }
  SECTION("a block size the config does not give") {
    peft_test::rewrite_adapter("oft", dir, [](auto& c) { c["oft_block_size"] = 8; });
    CHECK_THROWS_AS(load(), peft::format_error);
  }
  SECTION("not a packed triangle") {
    peft_test::rewrite_adapter("oft", dir, keep, {{"base_model.model.up.oft_R.weight", {{4, 119}, std::vector<float>(4 * 119, 0.1f)}}});
    CHECK_THROWS_AS(load(), peft::format_error);
    CHECK(message_of(load).find("b (b - 1) / 2") != std::string::npos);
  }
  SECTION("block_share with several blocks") {
    peft_test::rewrite_adapter("oft", dir, [](auto& c) { c["block_share"] = true; });
    CHECK_THROWS_AS(load(), peft::format_error);
    CHECK(message_of(load).find("block_share") != std::string::npos);
  }
  SECTION("wrong types") {
    peft_test::rewrite_adapter("oft", dir, [](auto& c) { c["use_cayley_neumann"] = "yes"; });
    CHECK_THROWS_AS(load(), peft::format_error);
  }
  fs::remove_all(dir);
}

TEST_CASE("oft codec: describe_in refuses a module the config cannot describe", "[oft][io]") {
  peft::rng g(29);
  peft::io::adapter_config c;
  const auto a = random_oft<float>(16, 4, 8, {}, g);
  peft::io::peft_codec<peft::oft<float>>::describe_in(a, c, "m1");
  CHECK(c.peft_type == "OFT");
  CHECK(c.r == 0);
  CHECK(c.raw["oft_block_size"] == 8);
  CHECK(c.to_json()["r"] == 0);
  // Another module of 24 inputs in blocks of 8: PEFT derives 8 too.
  peft::io::peft_codec<peft::oft<float>>::describe_in(random_oft<float>(24, 4, 8, {}, g), c, "m2");
  // Blocks of 4 under oft_block_size 8: refused; another form: refused.
  CHECK_THROWS_AS(peft::io::peft_codec<peft::oft<float>>::describe_in(random_oft<float>(16, 4, 4, {}, g), c, "m3"),
                  peft::unsupported_error);
  CHECK_THROWS_AS(peft::io::peft_codec<peft::oft<float>>::describe_in(
                      random_oft<float>(16, 4, 8, {.use_cayley_neumann = false}, g), c, "m4"),
                  peft::unsupported_error);
  // A config whose r = 0 reads back (adapter_config accepts OFT's r = 0).
  const auto back = peft::io::adapter_config::parse(c.to_json().dump());
  CHECK(back.r == 0);
  CHECK_THROWS_AS(peft::io::adapter_config::parse(R"({"peft_type": "LORA", "r": 0})"), peft::format_error);
}

}  // namespace test_oft
