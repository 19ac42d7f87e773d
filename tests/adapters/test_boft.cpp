// BOFT: parity with HuggingFace PEFT 0.21 (tests/data/peft/boft: one block-diagonal factor of
// 8 x 8 blocks; boft_butterfly2: two butterfly factors of 4 blocks, made with
// scripts/make_boft_golden.py), M against PEFT's matrices built in double, the passes against a
// materialised delta over dense and int8 bases, PEFT's layout rules, the multiplicative merge and
// its inverse, saving and loading, errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/boft.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/io/peft/boft.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_boft {

using ix = peft::index;

namespace {

using peft_test::rel_error;
using peft_test::tolerance;

/// PEFT's block_butterfly_perm, transcribed loop for loop (n inputs, b blocks, r = H / 2).
std::vector<ix> peft_perm(ix n, ix b, ix r, ix extra) {
  std::vector<ix> idx(static_cast<std::size_t>(n));
  for (ix k = 0; k < n; ++k) idx[static_cast<std::size_t>(k)] = k;
  if (extra == 0) return idx;
  const ix bs = n / b;
  std::vector<ix> seq;
  for (ix p = 0; p < bs / r; p += 2) seq.push_back(p);
  for (ix p = 1; p < bs / r; p += 2) seq.push_back(p);
  std::vector<ix> sorted(static_cast<std::size_t>(bs));
  for (std::size_t i = 0; i < seq.size(); ++i)
    for (ix t = 0; t < r; ++t) sorted[i * static_cast<std::size_t>(r) + static_cast<std::size_t>(t)] = seq[i] * r + t;
  std::vector<ix> out = idx;
  for (ix s = 0; s < n; s += bs)
    for (ix t = 0; t < bs; ++t) out[static_cast<std::size_t>(s + t)] = idx[static_cast<std::size_t>(s + sorted[static_cast<std::size_t>(t)])];
  return out;
}

/// M in double as PEFT builds it: P_i blockdiag(cayley) P_i^T, multiplied M_{N-1} ... M_0, with
/// the Cayley map by Gauss-Jordan (I - S)(I + S)^{-1}.
template <class T>
peft::matrix<double> reference_rotation(const peft::boft<T>& a) {
  const auto& l = a.layout();
  const ix n = a.in_features(), h = l.size;
  peft::matrix<double> m(n, n);
  for (ix i = 0; i < n; ++i) m(i, i) = 1.0;
  for (ix f = 0; f < l.factors; ++f) {
    peft::matrix<double> bd(n, n);
    for (ix j = 0; j < l.blocks; ++j) {
      // S, then X (I + S) = I - S by Gauss-Jordan on the transposed system (I + S)^T X^T = (I - S)^T.
      std::vector<double> aug(static_cast<std::size_t>(h * 2 * h));
      auto at = [&](ix r, ix c) -> double& { return aug[static_cast<std::size_t>(r * 2 * h + c)]; };
      for (ix r = 0; r < h; ++r)
        for (ix c = 0; c < h; ++c) {
          const ix row = (f * l.blocks + j) * h;
          const double s = 0.5 * (static_cast<double>(a.r()(row + r, c)) - static_cast<double>(a.r()(row + c, r)));
          // (I + S)^T = I - S, (I - S)^T = I + S
          at(r, c) = (r == c ? 1.0 : 0.0) - s;
          at(r, h + c) = (r == c ? 1.0 : 0.0) + s;
        }
      for (ix p = 0; p < h; ++p) {
        ix piv = p;
        for (ix r = p + 1; r < h; ++r)
          if (std::abs(at(r, p)) > std::abs(at(piv, p))) piv = r;
        for (ix c = 0; c < 2 * h; ++c) std::swap(at(p, c), at(piv, c));
        const double d = at(p, p);
        for (ix c = 0; c < 2 * h; ++c) at(p, c) /= d;
        for (ix r = 0; r < h; ++r) {
          if (r == p) continue;
          const double fct = at(r, p);
          for (ix c = 0; c < 2 * h; ++c) at(r, c) -= fct * at(p, c);
        }
      }
      for (ix r = 0; r < h; ++r)
        for (ix c = 0; c < h; ++c) bd(j * h + r, j * h + c) = at(c, h + r);  // X = (X^T)^T
    }
    const auto perm = peft_perm(n, l.blocks >> f, h / 2, l.factors - 1);
    peft::matrix<double> pm(n, n);
    for (ix i = 0; i < n; ++i) pm(i, perm[static_cast<std::size_t>(i)]) = 1.0;
    const auto mi = peft_test::ref_nt(peft_test::ref_nn(pm, bd), pm);  // P B P^T
    m = peft_test::ref_nn(mi, m);
  }
  return m;
}

/// diag(s) W0 M^T - W0 in double.
template <class T, class S>
peft::matrix<double> reference_delta(const peft::boft<T>& a, const peft::dense<S>& w) {
  auto d = peft_test::ref_nt(w.weight(), reference_rotation(a));
  for (ix i = 0; i < d.rows(); ++i)
    for (ix j = 0; j < d.cols(); ++j) d(i, j) = static_cast<double>(a.s()(i, 0)) * d(i, j) - static_cast<double>(w.weight()(i, j));
  return d;
}

peft::io::adapter_config boft_config(ix block_size, ix block_num, ix factor) {
  auto c = peft_test::config_of("BOFT");
  c.raw["boft_block_size"] = block_size;
  c.raw["boft_block_num"] = block_num;
  c.raw["boft_n_butterfly_factor"] = factor;
  return c;
}

}  // namespace

TEMPLATE_TEST_CASE("boft reproduces PEFT: layers, network, merged weights (one factor)", "[boft][golden]", float, double) {
  peft_test::check_golden<peft::boft<TestType>>("boft");
}

TEMPLATE_TEST_CASE("boft reproduces PEFT: layers, network, merged weights (butterfly, 2 factors)", "[boft][golden]", float,
                   double) {
  peft_test::check_golden<peft::boft<TestType>>("boft_butterfly2");
}

TEST_CASE("boft golden checkpoints: layouts, permutations and M", "[boft][golden]") {
  for (const std::string name : {"boft", "boft_butterfly2"}) {
    INFO("case " << name);
    auto ck = peft::io::load_checkpoint_as<peft::boft<double>>(peft_test::golden_dir(name) / "adapter");
    const auto& up = ck.find("up.weight")->adapter;
    const auto& down = ck.find("down.weight")->adapter;
    CHECK(up.in_features() == 64);
    CHECK(up.out_features() == 96);
    CHECK(down.in_features() == 96);
    CHECK(down.out_features() == 48);
    CHECK(up.layout().factors == (name == "boft" ? 1 : 2));
    CHECK(up.layout().size == (name == "boft" ? 8 : 16));
    CHECK(down.layout().blocks == (name == "boft" ? 12 : 4));
    REQUIRE(peft_test::nontrivial(up.r()));
    for (ix f = 0; f < up.layout().factors; ++f) {
      CHECK(up.permutation(f) == peft_perm(64, up.layout().blocks >> f, up.layout().size / 2, up.layout().factors - 1));
    }
    const auto m = up.rotation_matrix();
    CHECK(rel_error(m, reference_rotation(up)) < 1e-13);
    peft::matrix<double> eye(64, 64);
    for (ix i = 0; i < 64; ++i) eye(i, i) = 1.0;
    CHECK(rel_error(peft_test::ref_tn(m, m), eye) < 1e-14);
  }
  // The second butterfly factor really permutes: runs of H / 2 = 8, even runs first.
  auto ck = peft::io::load_checkpoint_as<peft::boft<double>>(peft_test::golden_dir("boft_butterfly2") / "adapter");
  const auto& p1 = ck.find("up.weight")->adapter.permutation(1);
  CHECK(p1[8] == 16);
  CHECK(p1[16] == 8);
  CHECK(ck.find("up.weight")->adapter.permutation(0) == peft_perm(64, 64, 1, 0));
}

TEST_CASE("boft save and load: identical tensors and config fields", "[boft][golden][io]") {
  for (const std::string name : {"boft", "boft_butterfly2"}) {
    INFO("case " << name);
    auto ck = peft::io::load_checkpoint_as<peft::boft<double>>(peft_test::golden_dir(name) / "adapter");
    auto back = peft_test::save_and_load(ck, "peft_boft_roundtrip_" + name);
    CHECK(back.config.peft_type == "BOFT");
    for (const char* f : {"boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout", "init_weights"}) {
      INFO(f);
      CHECK(back.config.raw[f] == ck.config.raw[f]);
    }
    CHECK(!back.config.raw.contains("r"));  // BOFTConfig has no r
    REQUIRE(back.modules.size() == ck.modules.size());
    for (auto& m : ck.modules) {
      auto& b = back.find(m.weight_name)->adapter;
      CHECK(b.layout().factors == m.adapter.layout().factors);
      CHECK(b.layout().blocks == m.adapter.layout().blocks);
      CHECK(peft_test::exactly_equal(b.r(), m.adapter.r()));  // f32 values, saved as f32
      CHECK(peft_test::exactly_equal(b.s(), m.adapter.s()));
    }
  }
}

TEMPLATE_TEST_CASE("boft passes against the materialised delta diag(s) W0 M^T - W0", "[boft]", float, double) {
  using T = TestType;
  peft::rng g(7);
  struct layout_case {
    ix in, out;
    peft::boft_options o;
  };
  const std::vector<layout_case> cases = {
      {12, 5, {.block_size = 3, .block_num = 0}},
      {16, 7, {.block_size = 0, .block_num = 4, .n_butterfly_factor = 3}},
      {24, 6, {.block_size = 6, .block_num = 0, .n_butterfly_factor = 2}},
      {32, 9, {.block_size = 2, .block_num = 0, .n_butterfly_factor = 4}},
  };
  for (auto c : cases) {
    INFO("in " << c.in << " block_size " << c.o.block_size << " block_num " << c.o.block_num << " factor "
               << c.o.n_butterfly_factor);
    c.o.init = peft::boft_init::random;
    c.o.seed = g.next();
    peft::boft<T> a(c.in, c.out, c.o);
    peft_test::fill_random(a.r(), g, -0.8, 0.8);
    const auto w = peft_test::random_dense<T>(c.in, c.out, g);
    const auto x = peft_test::random_matrix<T>(4, c.in, g);
    const auto gy = peft_test::random_matrix<T>(4, c.out, g);
    REQUIRE(peft_test::nontrivial(x));
    const auto dW = reference_delta(a, w);
    REQUIRE(peft_test::frobenius(dW) > 0.1 * peft_test::frobenius(w.weight()));
    peft_test::check_against_delta(a, w, x, gy, dW, tolerance<T>());
  }
}

TEST_CASE("boft over an int8 base: the base is read through its own product", "[boft]") {
  peft::rng g(11);
  const ix in = 32, out = 24;
  const auto wf = peft_test::random_matrix<float>(out, in, g);
  const auto bias = peft_test::random_vector<float>(out, g);
  const auto q = peft::int8_rowwise::quantize(peft::matrix_view<const float>(wf.view()), bias.data());
  peft::matrix<double> wq(out, in);
  for (ix i = 0; i < out; ++i) q.dequantize_row(i, wq.row(i));
  std::vector<double> bq(static_cast<std::size_t>(out));
  for (ix j = 0; j < out; ++j) bq[static_cast<std::size_t>(j)] = q.bias_value<double>(j);
  const peft::dense<double> twin(wq, bq);
  peft::boft<double> a(in, out, {.block_size = 4, .block_num = 0, .n_butterfly_factor = 2, .init = peft::boft_init::random, .seed = 3});
  const auto x = peft_test::random_matrix<double>(3, in, g);
  const auto gy = peft_test::random_matrix<double>(3, out, g);
  peft::boft<double> b = a;
  typename peft::boft<double>::cache_type ca, cb;
  peft::matrix<double> ya(3, out), yb(3, out), dxa(3, in), dxb(3, in), dwa(out, in), dwb(out, in);
  a.forward(q, x.view(), ya.view(), ca);
  b.forward(twin, x.view(), yb.view(), cb);
  CHECK(rel_error(ya, yb) < 1e-6);  // the int8 kernel rounds its input
  a.backward(q, x.view(), gy.view(), dxa.view(), ca);
  b.backward(twin, x.view(), gy.view(), dxb.view(), cb);
  CHECK(rel_error(dxa, dxb) < 1e-12);
  CHECK(rel_error(a.grad_r(), b.grad_r()) < 1e-5);  // through the rounded z W0^T and x
  CHECK(rel_error(a.grad_s(), b.grad_s()) < 1e-5);
  a.delta_weight(q, dwa.view());
  b.delta_weight(twin, dwb.view());
  CHECK(rel_error(dwa, dwb) < 1e-14);
}

TEST_CASE("boft init and layout rules: PEFT's checks, by name", "[boft][errors]") {
  peft::rng g(5);
  peft::boft<double> fresh(12, 7, {.block_size = 4});
  CHECK(peft_test::max_abs(fresh.r()) == 0.0);
  CHECK(peft_test::max_abs(fresh.s()) == 1.0);
  peft_test::check_identity_at_init(fresh, 3, g);
  CHECK(peft_test::max_abs(fresh.grad_r()) > 1e-3);  // skew blocks: zero diagonals
  CHECK(peft_test::nontrivial(fresh.grad_s()));
  const peft::boft<double> rnd(12, 7, {.block_size = 4, .init = peft::boft_init::random, .seed = 2});
  const auto m = peft_test::moments_of(rnd.s());
  CHECK(std::abs(m.mean - 1.0) < 0.1);

  auto rule = [](ix in, ix bs, ix bn, ix f, const std::string& msg) {
    peft_test::check_error<peft::error>([&] { peft::boft<double>(in, 4, {.block_size = bs, .block_num = bn, .n_butterfly_factor = f}); },
                                        "[boft::boft] " + msg);
  };
  rule(12, 0, 0, 1, "exactly one of boft_block_size");
  rule(12, 4, 3, 1, "exactly one of boft_block_size");
  rule(12, 5, 0, 1, "in_features (12) must be divisible by boft_block_size (5)");
  rule(12, 0, 5, 1, "in_features (12) must be divisible by boft_block_num (5)");
  rule(12, 0, 6, 3, "boft_block_num (6) must be a multiple of 2^(boft_n_butterfly_factor - 1) = 4");
  rule(12, 4, 0, 2, "in_features (12) must be a multiple of boft_block_size x 2^(boft_n_butterfly_factor - 1) = 8");
  rule(12, 3, 0, 2, "a butterfly (boft_n_butterfly_factor > 1) needs an even number of blocks and an even block size");
  rule(12, 4, 0, 0, "boft_n_butterfly_factor must be >= 1");
  CHECK_THROWS_AS(peft::boft<double>(0, 4, {}), peft::shape_error);
  CHECK_THROWS_AS(peft::boft<double>(peft::matrix<double>(8, 3), std::vector<double>(4, 1.0), peft::boft_layout{1, 2, 4}),
                  peft::shape_error);
}

TEST_CASE("boft merge and unmerge: diag(s) W0 M^T in place, recovered from the merged weight", "[boft]") {
  peft::rng g(13);
  const auto w = peft_test::random_dense<double>(16, 6, g);
  peft::boft<double> a(16, 6, {.block_size = 2, .block_num = 0, .n_butterfly_factor = 3, .init = peft::boft_init::random, .seed = 4});
  peft::adapted_linear<peft::dense<double>, peft::boft<double>> layer(w);
  layer.add_adapter("a", a);
  const auto x = peft_test::random_matrix<double>(3, 16, g);
  peft::matrix<double> before(3, 6), after(3, 6);
  layer.forward(x.view(), before.view());
  layer.merge("a");
  CHECK(rel_error(layer.base().weight(), peft_test::add(w.weight(), reference_delta(a, w))) < 1e-14);
  layer.forward(x.view(), after.view());
  CHECK(rel_error(after, before) < 1e-14);
  layer.unmerge("a");
  CHECK(rel_error(layer.base().weight(), w.weight()) < 1e-14);
  a.s()(2, 0) = 0.0;
  peft::matrix<double> d(6, 16);
  peft_test::check_error<peft::error>([&] { a.unmerge_delta(w, d.view()); }, "[boft::unmerge_delta] boft_s has a zero entry");
}

TEST_CASE("boft codec: fields honoured, refused by name, malformed tensors", "[boft][io][errors]") {
  const peft::io::checkpoint_tensors<double> none;
  peft::rng g(3);
  auto module = [&](std::vector<std::int64_t> r, std::vector<std::int64_t> s) {
    return peft_test::random_tensors<double>("layer", {{"boft_R", std::move(r)}, {"boft_s", std::move(s)}}, g, -0.3, 0.3);
  };
  using peft::io::from_checkpoint;
  {
    const auto a = from_checkpoint<peft::boft<double>>(boft_config(0, 4, 2), module({2, 4, 6, 6}, {5, 1}), none);
    CHECK(a.in_features() == 24);
    CHECK(a.out_features() == 5);
    CHECK(a.layout().factors == 2);
  }
  // PEFT without its CUDA kernel saves one factor whatever boft_n_butterfly_factor says.
  CHECK(from_checkpoint<peft::boft<double>>(boft_config(6, 0, 2), module({1, 4, 6, 6}, {5, 1}), none).layout().factors == 1);
  auto fails = [&](const peft::io::adapter_config& c, std::vector<std::int64_t> r, std::vector<std::int64_t> s, const std::string& msg) {
    const auto m = module(std::move(r), std::move(s));
    const auto text = peft_test::message_of([&] { (void)from_checkpoint<peft::boft<double>>(c, m, none); });
    INFO(text);
    CHECK(text.find(msg) != std::string::npos);
  };
  fails(boft_config(4, 0, 1), {1, 4, 6, 6}, {5, 1}, "[boft::from_checkpoint] module 'layer': boft_R is [1, 4, 6, 6] but the config");
  fails(boft_config(0, 4, 3), {2, 4, 6, 6}, {5, 1}, "but the config has");
  fails(boft_config(6, 0, 1), {1, 4, 6, 5}, {5, 1}, "expected [N, D, H, H] and [out, 1]");
  fails(boft_config(6, 0, 1), {1, 4, 6, 6}, {5, 2}, "expected [N, D, H, H] and [out, 1]");
  fails(boft_config(0, 3, 2), {2, 3, 6, 6}, {5, 1}, "[boft::from_checkpoint] boft_block_num (3) must be a multiple");
  fails(boft_config(6, 0, 1), {1, 4, 36}, {5, 1}, "expected 4 dimensions");
  // Fields BOFTConfig has and peft-cpp refuses, unknown ones, by name; dropout is training-only.
  for (const auto& [field, value] : {std::pair<std::string, std::string>{"bias", R"("boft_only")"}, {"r", "8"}}) {
    auto c = boft_config(6, 0, 1);
    c.raw[field] = peft::io::ordered_json::parse(value);
    const auto msg = peft_test::message_of(
        [&] { peft::io::check_config_fields(c, peft::io::peft_codec<peft::boft<double>>::config_fields, "boft"); });
    CHECK(msg.find("[boft::from_checkpoint]") == 0);
    CHECK(msg.find("'" + field + "'") != std::string::npos);
  }
  auto drop = boft_config(6, 0, 1);
  drop.raw["boft_dropout"] = 0.1;
  drop.raw["init_weights"] = false;
  CHECK_NOTHROW(peft::io::check_config_fields(drop, peft::io::peft_codec<peft::boft<double>>::config_fields, "boft"));

  // Saving: one layout per config.
  auto c = boft_config(4, 0, 2);
  CHECK_NOTHROW(peft::io::describe_in(peft::boft<double>(16, 3, {.block_size = 4, .n_butterfly_factor = 2}), c, "m.a"));
  peft_test::check_error<peft::unsupported_error>(
      [&] { peft::io::describe_in(peft::boft<double>(16, 3, {.block_size = 2, .n_butterfly_factor = 2}), c, "m.b"); },
      "[boft::describe_in] module 'm.b'");
  peft_test::check_error<peft::unsupported_error>(
      [&] { peft::io::describe_in(peft::boft<double>(16, 3, {.block_size = 4, .n_butterfly_factor = 3}), c, "m.c"); },
      "[boft::describe_in]");
}

TEST_CASE("boft errors: shapes of every pass", "[boft][errors]") {
  peft::rng g(17);
  const auto w = peft_test::random_dense<double>(8, 5, g);
  peft::boft<double> a(8, 5, {.block_size = 2, .init = peft::boft_init::random, .seed = 1});
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 5, 9},
                                 {pass::forward, arg::base, 4, 8},
                                 {pass::forward, arg::x, 2, 7},
                                 {pass::forward, arg::y, 2, 4},
                                 {pass::add_term, arg::h, 2, 4},
                                 {pass::backward, arg::dy, 3, 5},
                                 {pass::backward, arg::dx, 2, 9},
                                 {pass::backward_term, arg::dh, 1, 5},
                                 {pass::delta_weight, arg::dw, 5, 7}});
  peft_test::check_unset_rejected<peft::boft<double>, peft::error>(w);
}

}  // namespace test_boft
