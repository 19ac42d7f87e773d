// serve::adapter_registry: loading PEFT checkpoints by name over the bases of a model, mixed
// batches over several layers, memory accounting, unloading, errors, fused-mode switching.
#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/adapters/any_adapter.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/core/error.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/serve/adapter_registry.hpp"
#include "support/file_support.hpp"
#include "support/all_adapters.hpp"
#include "support/test_support.hpp"

namespace test_adapter_registry {

using ix = peft::index;
using peft_test::random_matrix;
using registry = peft::serve::adapter_registry<peft::dense<float>>;

namespace {

constexpr ix in_f = 12;
const std::string q_w = "model.layers.0.attn.q_proj.weight", v_w = "model.layers.0.attn.v_proj.weight";
const std::map<std::string, ix> outs = {{q_w, 18}, {v_w, 10}};

std::map<std::string, peft::dense<float>> make_bases(peft::rng& g) {
  std::map<std::string, peft::dense<float>> b;
  for (const auto& [w, n] : outs) {
    const auto m = random_matrix<float>(n, in_f, g);
    const auto bias = peft_test::random_vector<float>(n, g);
    b.emplace(w, peft::dense<float>::from(m.view(), bias.data()));
  }
  return b;
}

/// A checkpoint of adapter type A on both layers (or only `only`).
template <class A>
peft::io::peft_checkpoint<float> checkpoint_of(peft::rng& g, const std::string& only = "") {
  peft::io::peft_checkpoint<float> ck;
  for (const auto& [w, n] : outs) {
    if (!only.empty() && w != only) continue;
    ck.modules.push_back({w.substr(0, w.size() - 7), w, peft::any_adapter<float>(peft_test::adapter_traits<A>::make_random(in_f, n, g))});
  }
  return ck;
}

/// Row i: base(x_i) + f_i (adapter forward(x_i) - base(x_i)), each row alone, in double.
peft::matrix<double> reference(const peft::dense<float>& base, const peft::matrix<float>& x,
                               const std::vector<const peft::any_adapter<float>*>& adapter, const std::vector<double>& f) {
  const ix n = base.out_features();
  peft::matrix<double> y(x.rows(), n);
  for (ix i = 0; i < x.rows(); ++i) {
    const peft::matrix_view<const float> xi = x.view().block(i, 0, 1, in_f);
    peft::matrix<float> h(1, n), ya(1, n);
    base.matmul(xi, h.view());
    const auto* a = adapter[static_cast<std::size_t>(i)];
    if (a != nullptr) {
      peft::any_adapter<float>::cache_type c;
      a->forward(base, xi, ya.view(), c);
    }
    for (ix j = 0; j < n; ++j) {
      y(i, j) = double(h(0, j)) + (a != nullptr ? f[static_cast<std::size_t>(i)] * (double(ya(0, j)) - double(h(0, j))) : 0.0);
    }
  }
  return y;
}

}  // namespace

TEST_CASE("adapter_registry serves a mixed batch over two layers from loaded PEFT checkpoints", "[serve]") {
  peft::rng g(41);
  registry reg(make_bases(g));
  // Two checkpoints round-trip through disk, the rest are added from memory.
  const auto dir = peft_test::temp_path("peft_registry_test");
  std::filesystem::remove_all(dir);
  auto ck_lora = checkpoint_of<peft::lora<float>>(g);
  auto ck_dora = checkpoint_of<peft::dora<float>>(g);
  peft::io::save_peft_checkpoint(dir / "lora", ck_lora);
  peft::io::save_peft_checkpoint(dir / "dora", ck_dora);
  reg.load("lora", dir / "lora");
  reg.load("dora", dir / "dora", 0.5);
  const auto ck_v = checkpoint_of<peft::vera<float>>(g);
  const auto ck_h = checkpoint_of<peft::loha<float>>(g, q_w);  // targets q only
  reg.add("vera", ck_v);
  reg.add("loha_q", ck_h);
  CHECK(reg.names() == std::vector<std::string>{"dora", "loha_q", "lora", "vera"});
  CHECK(reg.method("dora") == "dora");
  CHECK(reg.low_rank("lora"));
  CHECK(reg.low_rank("vera"));
  CHECK_FALSE(reg.low_rank("dora"));
  CHECK(reg.scale("dora") == 0.5);

  const std::vector<peft::serve::request> rows = {{"lora"}, {"dora"}, {""}, {"vera", 2.0}, {"loha_q"}, {"lora", -0.5},
                                                   {"vera"}, {"dora", 3.0}, {""}, {"loha_q", 0.25}};
  const ix m = static_cast<ix>(rows.size());
  const auto x = random_matrix<float>(m, in_f, g);
  auto batch = reg.begin(rows);
  CHECK(batch.rows() == m);
  for (const auto& [w, n] : outs) {
    peft::matrix<float> y(m, n, 42.0f);
    batch.forward(w, x.view(), y.view());
    // The reference: each row through its adapter's own forward (f32 checkpoints reload exactly).
    std::vector<const peft::any_adapter<float>*> who;
    std::vector<double> f;
    const std::string weight = w;  // (clang 14 cannot capture a structured binding)
    auto module = [&](const peft::io::peft_checkpoint<float>& ck) -> const peft::any_adapter<float>* {
      const auto* mod = ck.find(weight);
      return mod ? &mod->adapter : nullptr;
    };
    for (const auto& r : rows) {
      const peft::any_adapter<float>* a = nullptr;
      double s = r.scale;
      if (r.adapter == "lora") a = module(ck_lora);
      if (r.adapter == "dora") a = module(ck_dora), s *= 0.5;
      if (r.adapter == "vera") a = module(ck_v);
      if (r.adapter == "loha_q") a = module(ck_h);
      who.push_back(a);
      f.push_back(s);
    }
    const auto ref = reference(reg.base(w), x, who, f);
    REQUIRE(peft_test::nontrivial(ref));
    INFO(w);
    CHECK(peft_test::rel_error(y, ref) < 2e-5);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("adapter_registry accounts memory and unloads", "[serve]") {
  peft::rng g(42);
  registry reg(make_bases(g));
  const auto mem0 = reg.memory();
  CHECK(mem0.base_bytes == (18 * 12 + 18 + 10 * 12 + 10) * sizeof(float));
  CHECK(mem0.adapter_bytes == 0);
  // LoRA of rank r on (out, in): A (r, in) + B (out, r), values and gradient buffers.
  peft::io::peft_checkpoint<float> ck;
  for (const auto& [w, n] : outs) {
    ck.modules.push_back({w.substr(0, w.size() - 7), w,
                          peft::lora<float>(random_matrix<float>(3, in_f, g), random_matrix<float>(n, 3, g), 1.0f)});
  }
  reg.add("a", std::move(ck));
  const std::size_t lora_bytes = 2 * ((3 * 12 + 18 * 3) + (3 * 12 + 10 * 3)) * sizeof(float);
  // VeRA folds diag(lambda) into owned factors: those count as well.
  reg.add("v", checkpoint_of<peft::vera<float>>(g));
  const auto mem = reg.memory();
  REQUIRE(mem.adapters.size() == 2);
  CHECK(mem.adapters[0] == std::pair<std::string, std::size_t>{"a", lora_bytes});
  CHECK(mem.adapters[1].second > 0);
  CHECK(mem.adapter_bytes == lora_bytes + mem.adapters[1].second);
  reg.unload("a");
  CHECK_FALSE(reg.contains("a"));
  CHECK(reg.memory().adapter_bytes == mem.adapters[1].second);
  CHECK_THROWS_WITH(reg.begin({{"a"}}), Catch::Contains("[adapter_registry::begin]") && Catch::Contains("no adapter named 'a'"));
  CHECK_THROWS_WITH(reg.unload("a"), Catch::Contains("[adapter_registry::unload]"));
}

TEST_CASE("adapter_registry refuses bad adapters, names and requests, changing nothing", "[serve]") {
  peft::rng g(43);
  registry reg(make_bases(g));
  reg.add("a", checkpoint_of<peft::lora<float>>(g));
  CHECK_THROWS_WITH(reg.add("a", checkpoint_of<peft::lora<float>>(g)), Catch::Contains("replace()"));
  CHECK_THROWS_WITH(reg.add("", checkpoint_of<peft::lora<float>>(g)), Catch::Contains("empty"));
  CHECK_THROWS_WITH(reg.replace("zz", checkpoint_of<peft::lora<float>>(g)), Catch::Contains("no adapter named 'zz'"));
  auto bad = checkpoint_of<peft::lora<float>>(g);
  bad.modules.front().weight_name = "model.other.weight";
  CHECK_THROWS_WITH(reg.add("b", std::move(bad)), Catch::Contains("not a base weight"));
  peft::io::peft_checkpoint<float> wrong;
  wrong.modules.push_back({"m", q_w, peft::lora<float>(random_matrix<float>(2, in_f + 1, g), random_matrix<float>(18, 2, g), 1.0f)});
  CHECK_THROWS_WITH(reg.add("b", std::move(wrong)), Catch::Contains("the base is (18, 12)"));
  auto saves = checkpoint_of<peft::lora<float>>(g);
  saves.saved_tensors.push_back({"classifier.weight", peft::dtype::f32, {1}, std::vector<std::byte>(4)});
  CHECK_THROWS_AS(reg.add("b", std::move(saves)), peft::unsupported_error);
  CHECK_THROWS_WITH(reg.set_scale("a", INFINITY), Catch::Contains("finite"));
  CHECK_THROWS_WITH(reg.begin({{"a", NAN}}), Catch::Contains("non-finite"));
  CHECK(reg.names() == std::vector<std::string>{"a"});
  CHECK(reg.scale("a") == 1.0);
  auto batch = reg.begin({{"a"}, {""}});
  const auto x = random_matrix<float>(3, in_f, g);
  peft::matrix<float> y(3, 18);
  CHECK_THROWS_WITH(batch.forward(q_w, x.view(), y.view()), Catch::Contains("2 requests"));
  CHECK_THROWS_WITH(batch.forward("nope.weight", x.view(), y.view()), Catch::Contains("no base weight named"));
  CHECK_THROWS_WITH(registry(std::map<std::string, peft::dense<float>>{}), Catch::Contains("no base"));
}

TEST_CASE("adapter_registry fuses LoRA and SHiRA into the base and switches between them", "[serve]") {
  peft::rng g(44);
  registry reg(make_bases(g));
  const peft::matrix<float> w0 = peft::to_matrix(reg.base(q_w).weight());
  reg.add("lora", checkpoint_of<peft::lora<float>>(g));
  reg.add("shira", checkpoint_of<peft::shira<float>>(g));
  reg.add("vera", checkpoint_of<peft::vera<float>>(g));
  reg.add("dora", checkpoint_of<peft::dora<float>>(g));
  reg.set_scale("lora", 0.75);
  const std::vector<peft::serve::request> rows = {{"lora"}, {"shira"}, {""}, {"vera"}, {"lora", 2.0}, {"shira", 0.5}};
  const ix m = static_cast<ix>(rows.size());
  const auto x = random_matrix<float>(m, in_f, g);
  auto serve = [&](const std::vector<peft::serve::request>& r) {
    std::map<std::string, peft::matrix<float>> out;
    auto batch = reg.begin(r);
    for (const auto& [w, n] : outs) {
      out[w] = peft::matrix<float>(static_cast<ix>(r.size()), n);
      batch.forward(w, x.view().block(0, 0, static_cast<ix>(r.size()), in_f), out[w].view());
    }
    return out;
  };
  const auto unfused = serve(rows);
  REQUIRE(peft_test::nontrivial(unfused.at(q_w)));

  const auto t1 = reg.fuse("lora");
  CHECK(reg.fused() == "lora");
  CHECK(t1.unfuse_seconds == 0.0);
  CHECK(t1.fuse_seconds > 0.0);
  CHECK_FALSE(peft_test::exactly_equal(reg.base(q_w).weight(), w0));
  for (const auto& [w, y] : serve(rows)) CHECK(peft_test::rel_error(y, unfused.at(w)) < 2e-5);
  CHECK_THROWS_AS(reg.begin({{"dora"}}), peft::unsupported_error);
  CHECK_THROWS_WITH(reg.unload("lora"), Catch::Contains("unfuse"));
  CHECK_THROWS_WITH(reg.replace("lora", checkpoint_of<peft::lora<float>>(g)), Catch::Contains("unfuse"));

  const auto t2 = reg.fuse("shira");  // switch: LoRA out (subtracted), SHiRA in (scattered)
  CHECK(reg.fused() == "shira");
  CHECK(t2.unfuse_seconds > 0.0);
  CHECK(t2.fuse_seconds > 0.0);
  for (const auto& [w, y] : serve(rows)) CHECK(peft_test::rel_error(y, unfused.at(w)) < 2e-5);
  reg.unfuse();
  CHECK(reg.fused().empty());
  // LoRA's subtraction leaves at most a rounding of W0 per element; SHiRA restored its bits.
  const auto& w1 = reg.base(q_w).weight();
  double worst = 0;
  for (ix i = 0; i < w1.rows(); ++i)
    for (ix j = 0; j < w1.cols(); ++j) worst = std::max(worst, std::abs(double(w1(i, j)) - double(w0(i, j))));
  CHECK(worst < 1e-6);
  reg.fuse("shira");
  reg.unfuse();
  const peft::matrix<float> w2 = peft::to_matrix(reg.base(q_w).weight());
  reg.fuse("shira");
  CHECK_FALSE(peft_test::exactly_equal(reg.base(q_w).weight(), w2));
  reg.unfuse();
  CHECK(peft_test::bitwise_equal(reg.base(q_w).weight(), w2.view()));
  for (const auto& [w, y] : serve(rows)) CHECK(peft_test::rel_error(y, unfused.at(w)) < 2e-5);

  CHECK_THROWS_WITH(reg.fuse("dora"), Catch::Contains("neither low-rank nor SHiRA"));
  CHECK(reg.fused().empty());
}

TEST_CASE("adapter_registry over a quantized base serves mixed batches but does not fuse", "[serve]") {
  peft::rng g(45);
  const auto w = random_matrix<float>(18, in_f, g);
  peft::serve::adapter_registry<peft::int8_rowwise> reg(q_w, peft::int8_rowwise::quantize(peft::matrix_view<const float>(w.view())));
  reg.add("a", checkpoint_of<peft::lora<float>>(g, q_w));
  reg.add("b", checkpoint_of<peft::ia3<float>>(g, q_w));
  const auto x = random_matrix<float>(4, in_f, g);
  peft::matrix<float> y(4, 18);
  reg.forward(q_w, x.view(), y.view(), std::vector<peft::serve::request>{{"a"}, {"b"}, {""}, {"a", 0.5}});
  REQUIRE(peft_test::nontrivial(y));
  CHECK(reg.memory().base_bytes == reg.base(q_w).storage_bytes());
  CHECK_THROWS_WITH(reg.fuse("a"), Catch::Contains("quantized"));
}

TEST_CASE("adapter_registry in double agrees with each row's own forward to 1e-12", "[serve]") {
  peft::rng g(46);
  const ix in = 9, out = 7, m = 11;
  peft::serve::adapter_registry<peft::dense<double>, double> reg("l.weight", peft::dense<double>(random_matrix<double>(out, in, g)));
  std::vector<peft::any_adapter<double>> ad;
  ad.emplace_back(peft_test::adapter_traits<peft::lora<double>>::make_random(in, out, g));
  ad.emplace_back(peft_test::adapter_traits<peft::adalora<double>>::make_random(in, out, g));
  ad.emplace_back(peft_test::adapter_traits<peft::lokr<double>>::make_random(in, out, g));
  const std::vector<std::string> names = {"lora", "adalora", "lokr"};
  for (std::size_t a = 0; a < ad.size(); ++a) reg.add(names[a], "l.weight", ad[a]);
  reg.set_scale("adalora", -0.5);
  std::vector<peft::serve::request> rows;
  for (ix i = 0; i < m; ++i) rows.push_back({i % 4 == 3 ? std::string() : names[static_cast<std::size_t>(i % 4)], 1.0 + 0.25 * double(i % 3)});
  const auto x = random_matrix<double>(m, in, g);
  peft::matrix<double> y(m, out);
  reg.forward("l.weight", x.view(), y.view(), rows);
  const auto& base = reg.base("l.weight");
  double worst = 0, scale = 0;
  for (ix i = 0; i < m; ++i) {
    const peft::matrix_view<const double> xi = x.view().block(i, 0, 1, in);
    peft::matrix<double> h(1, out), ya(1, out);
    base.matmul(xi, h.view());
    const auto k = static_cast<std::size_t>(i % 4);
    double f = rows[static_cast<std::size_t>(i)].scale * (k == 1 ? -0.5 : 1.0);
    if (k < 3) {
      peft::any_adapter<double>::cache_type c;
      ad[k].forward(base, xi, ya.view(), c);
    } else {
      ya = h, f = 0;
    }
    for (ix j = 0; j < out; ++j) {
      const double ref = h(0, j) + f * (ya(0, j) - h(0, j));
      worst = std::max(worst, std::abs(y(i, j) - ref));
      scale = std::max(scale, std::abs(ref));
    }
  }
  REQUIRE(scale > 0.1);
  CHECK(worst <= 1e-12 * scale);
}

}  // namespace test_adapter_registry
