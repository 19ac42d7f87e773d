// SHiRA: parity with HuggingFace PEFT 0.21 (tests/data/peft/shira: y = down(relu(up(x))), both
// layers adapted, r = 4), fused switching (apply/remove restore W0 bit for bit), the mask
// builders of train/shira_masks.hpp against brute force, and the checks on stored indices.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "peft/io/peft/shira.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "peft/adapters/shira.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/train/shira_masks.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_shira {

namespace {

namespace fs = std::filesystem;
using peft_test::rel_error;

const fs::path case_dir = fs::path(PEFT_TEST_DATA_DIR) / "peft" / "shira";

using peft_test::tolerance;

/// The golden case, every stored value set and none zero.
template <class T>
struct golden_case : peft_test::golden_case<peft::shira<T>> {
  golden_case() : peft_test::golden_case<peft::shira<T>>("shira") {
    for (const std::string n : {"up", "down"}) {
      const auto& a = this->checkpoint.find(n + ".weight")->adapter;
      REQUIRE(peft_test::count_nonzero(a.values()) == a.entries());
    }
  }
};

/// The (2, K) matrix of a checkpoint's shira_indices, as stored.
peft::matrix<std::int32_t> stored_indices(const fs::path& dir, const std::string& module) {
  const auto f = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
  return f.read_matrix<std::int32_t>("base_model.model." + module + ".shira_indices");
}

/// Writes an adapter directory: the golden config with `r` replaced (when > 0) and the given tensors.
struct tensor_spec {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<double> values;
  peft::dtype type;
};
fs::path write_adapter(const std::string& tag, const std::vector<tensor_spec>& tensors, peft::index r = 0) {
  const fs::path dir = peft_test::temp_path("peft_shira_test_" + tag);
  fs::create_directories(dir);
  std::ifstream in(case_dir / "adapter" / "adapter_config.json");
  std::stringstream ss;
  ss << in.rdbuf();
  auto cfg = peft::io::ordered_json::parse(ss.str());
  if (r > 0) cfg["r"] = r;
  std::ofstream(dir / "adapter_config.json") << cfg.dump(2);
  peft::io::safetensors_writer w;
  for (const auto& t : tensors) w.add(t.name, t.shape, std::span<const double>(t.values), t.type);
  w.write(dir / "adapter_model.safetensors");
  return dir;
}

/// The golden checkpoint's tensors for the `up` module only, indices as doubles.
std::vector<tensor_spec> golden_up_tensors(peft::dtype index_type) {
  const auto f = peft::io::safetensors_file::open(case_dir / "adapter" / "adapter_model.safetensors");
  const auto idx = f.read<double>("base_model.model.up.shira_indices");
  const auto val = f.read<double>("base_model.model.up.shira_weight");
  const auto k = static_cast<std::int64_t>(val.size());
  return {{"base_model.model.up.shira_weight", {k}, val, peft::dtype::f32},
          {"base_model.model.up.shira_indices", {2, k}, idx, index_type}};
}

/// Brute force: sort every position by (score desc, position asc), keep k, sort by position.
peft::matrix<std::int32_t> brute_top_k(const peft::matrix<double>& score, peft::index k) {
  std::vector<std::int64_t> pos(static_cast<std::size_t>(score.size()));
  for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<std::int64_t>(i);
  std::stable_sort(pos.begin(), pos.end(), [&](std::int64_t a, std::int64_t b) {
    return score.data()[a] > score.data()[b];
  });
  pos.resize(static_cast<std::size_t>(k));
  std::sort(pos.begin(), pos.end());
  peft::matrix<std::int32_t> idx(2, k);
  for (peft::index t = 0; t < k; ++t) {
    idx(0, t) = static_cast<std::int32_t>(pos[static_cast<std::size_t>(t)] / score.cols());
    idx(1, t) = static_cast<std::int32_t>(pos[static_cast<std::size_t>(t)] % score.cols());
  }
  return idx;
}

bool same_indices(const peft::matrix<std::int32_t>& a, const peft::matrix<std::int32_t>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && a.storage() == b.storage();
}

/// (2, K), in range, distinct, sorted row-major.
bool valid_mask(const peft::matrix<std::int32_t>& idx, peft::index d_out, peft::index d_in, peft::index k) {
  if (idx.rows() != 2 || idx.cols() != k) return false;
  std::int64_t prev = -1;
  for (peft::index t = 0; t < k; ++t) {
    if (idx(0, t) < 0 || idx(0, t) >= d_out || idx(1, t) < 0 || idx(1, t) >= d_in) return false;
    const std::int64_t p = static_cast<std::int64_t>(idx(0, t)) * d_in + idx(1, t);
    if (p <= prev) return false;
    prev = p;
  }
  return true;
}

template <class S>
std::vector<unsigned char> weight_bytes(const peft::dense<S>& w) {
  std::vector<unsigned char> b(static_cast<std::size_t>(w.weight().size()) * sizeof(S));
  std::memcpy(b.data(), w.weight().data(), b.size());
  return b;
}

template <class S>
peft::dense<S> random_dense(peft::index in, peft::index out, peft::rng& g) {
  return peft::dense<S>::from(peft::matrix_view<const double>(peft_test::random_matrix<double>(out, in, g).view()),
                              peft_test::random_vector<double>(out, g).data());
}

template <class T>
peft::shira<T> random_shira(peft::index in, peft::index out, peft::index k, peft::rng& g) {
  std::vector<T> v(static_cast<std::size_t>(k));
  for (auto& e : v) e = static_cast<T>((g.below(2) ? 1.0 : -1.0) * g.uniform(0.5, 1.0));
  return peft::shira<T>(in, out, peft::shira_random_mask(out, in, k, g.next()), std::move(v));
}

}  // namespace

// ---- golden parity --------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("SHiRA golden: each layer's output, dx and shira_weight gradient match PEFT", "[shira][golden]",
                   float, double) {
  golden_case<TestType> c;
  const double tol = tolerance<TestType>();
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    const auto r = peft_test::run_layer(c, name);
    CHECK(rel_error(r.y, c.ref("layer." + name + ".output")) < tol);
    CHECK(rel_error(r.dx, c.ref("layer." + name + ".grad_input")) < tol);
    peft_test::check_trainable_gradients(c, name, tol);
  }
}

TEMPLATE_TEST_CASE("SHiRA golden: the two-layer network's y, dL/dx and both gradients match PEFT", "[shira][golden]",
                   float, double) {
  golden_case<TestType> c;
  peft_test::check_network_trainable(c, tolerance<TestType>());
}

TEMPLATE_TEST_CASE("SHiRA golden: merged weights (merge, and apply into f32 and f64 bases) match merge_and_unload",
                   "[shira][golden][merge]", float, double) {
  golden_case<TestType> c;
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    const auto merged_w = c.ref("merged." + name + ".weight");
    const peft::matrix<double> merged_b(1, merged_w.rows(), c.reference.template read<double>("merged." + name + ".bias"));
    REQUIRE(rel_error(merged_w, c.base.template read_matrix<double>(name + ".weight")) > 1e-4);  // the delta shows
    auto a = c.layer(name).adapter("default");
    // apply() into an f64 copy of the f32 base: each sum is exact to double rounding.
    auto w64 = peft::dense<double>::from(c.layer(name).base().weight(), c.layer(name).base().bias().data());
    a.apply(w64);
    CHECK(rel_error(w64.weight(), merged_w) < 1e-15);
    // apply() into the f32 base, and adapted_linear::merge: rounded once to f32 storage, bit-identical.
    auto w32 = c.layer(name).base();
    a.apply(w32);
    CHECK(rel_error(w32.weight(), merged_w) < 1e-7);
    c.layer(name).merge("default");
    CHECK(weight_bytes(c.layer(name).base()) == weight_bytes(w32));
    CHECK(rel_error(peft::matrix<float>(1, merged_b.cols(), c.layer(name).base().bias()), merged_b) == 0.0);
  }
}

TEST_CASE("SHiRA golden: the loaded mask is the stored one, the shapes are recovered, r and config read",
          "[shira][golden]") {
  auto ck = peft::io::load_checkpoint_as<peft::shira<double>>(case_dir / "adapter");
  CHECK(ck.config.peft_type == "SHIRA");
  CHECK(ck.config.r == 4);
  const auto& up = ck.find("up.weight")->adapter;
  const auto& down = ck.find("down.weight")->adapter;
  CHECK(up.in_features() == 64);
  CHECK(up.out_features() == 96);
  CHECK(down.in_features() == 96);
  CHECK(down.out_features() == 48);
  CHECK(up.entries() == 4 * (64 + 96));
  CHECK(down.entries() == 4 * (96 + 48));
  CHECK(up.scale() == 1.0);
  CHECK(same_indices(up.indices(), stored_indices(case_dir / "adapter", "up")));
  CHECK(same_indices(down.indices(), stored_indices(case_dir / "adapter", "down")));
  CHECK(ck.parameter_count() == 1216);  // trainable values only, as PEFT counts (not the indices)
  CHECK(valid_mask(up.indices(), 96, 64, 640));                      // PEFT's torch.where order: row-major
}

TEMPLATE_TEST_CASE("SHiRA checkpoints: save writes shira_indices as I32 and reloads exactly", "[shira][io]", float,
                   double) {
  auto ck = peft::io::load_checkpoint_as<peft::shira<TestType>>(case_dir / "adapter");
  const fs::path out = peft_test::temp_path("peft_shira_test_roundtrip");
  fs::remove_all(out);
  peft::io::save_peft_checkpoint(out, ck);
  const auto saved = peft::io::safetensors_file::open(out / "adapter_model.safetensors");
  const auto original = peft::io::safetensors_file::open(case_dir / "adapter" / "adapter_model.safetensors");
  for (const std::string m : {"up", "down"}) {
    INFO("module " << m);
    const std::string key = "base_model.model." + m;
    CHECK(saved.info(key + ".shira_indices").type == peft::dtype::i32);
    CHECK(saved.info(key + ".shira_indices").shape == original.info(key + ".shira_indices").shape);
    CHECK(saved.info(key + ".shira_weight").type == peft::dtype::f32);
    CHECK(saved.info(key + ".shira_weight").shape == original.info(key + ".shira_weight").shape);
    const auto a = saved.bytes(key + ".shira_indices"), b = original.bytes(key + ".shira_indices");
    CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
    const auto c = saved.bytes(key + ".shira_weight"), d = original.bytes(key + ".shira_weight");
    CHECK(std::equal(c.begin(), c.end(), d.begin(), d.end()));
  }
  const auto cfg = peft::io::adapter_config::load(out);
  CHECK(cfg.peft_type == "SHIRA");
  CHECK(cfg.r == 4);
  CHECK(cfg.raw.at("mask_type") == "random");
  auto back = peft::io::load_checkpoint_as<peft::shira<TestType>>(out);
  for (const std::string w : {"up.weight", "down.weight"}) {
    CHECK(same_indices(back.find(w)->adapter.indices(), ck.find(w)->adapter.indices()));
    CHECK(peft_test::exactly_equal(back.find(w)->adapter.values(), ck.find(w)->adapter.values()));
  }
  fs::remove_all(out);
}

TEST_CASE("SHiRA checkpoints: describe_in refuses what PEFT cannot load", "[shira][io]") {
  peft::rng g(5);
  peft::io::adapter_config c;
  // K = 7 is not r (d_out + d_in) = r * 9.
  CHECK_THROWS_AS(peft::io::describe_in(random_shira<double>(4, 5, 7, g), c, "m"), peft::unsupported_error);
  auto a = random_shira<double>(4, 5, 18, g);  // r = 2
  a.set_scale(0.5);
  CHECK_THROWS_AS(peft::io::describe_in(a, c, "m"), peft::unsupported_error);
  a.set_scale(1.0);
  peft::io::describe_in(a, c, "m");
  CHECK(c.peft_type == "SHIRA");
  CHECK(c.r == 2);
  CHECK_THROWS_AS(peft::io::describe_in(random_shira<double>(4, 5, 9, g), c, "n"), peft::unsupported_error);  // r = 1 != 2
}

// ---- stored indices -------------------------------------------------------------------------------

TEST_CASE("SHiRA checkpoints: float32- and int64-stored indices load as the int32 ones", "[shira][io]") {
  const auto reference = stored_indices(case_dir / "adapter", "up");
  for (auto type : {peft::dtype::f32, peft::dtype::f64, peft::dtype::i64}) {
    INFO("indices stored as " << peft::safetensors_name(type));
    const auto dir = write_adapter("indices_type", golden_up_tensors(type));
    for (int pass = 0; pass < 2; ++pass) {
      if (pass == 0) {
        auto ck = peft::io::load_checkpoint_as<peft::shira<float>>(dir);
        CHECK(same_indices(ck.find("up.weight")->adapter.indices(), reference));
      } else {
        auto ck = peft::io::load_checkpoint_as<peft::shira<double>>(dir);
        CHECK(same_indices(ck.find("up.weight")->adapter.indices(), reference));
        CHECK(ck.find("up.weight")->adapter.out_features() == 96);
      }
    }
    fs::remove_all(dir);
  }
}

TEST_CASE("SHiRA checkpoints: bad indices are a format_error", "[shira][io][errors]") {
  auto load = [](const std::vector<tensor_spec>& t, peft::index r = 0) {
    const auto dir = write_adapter("bad", t, r);
    try {
      (void)peft::io::load_checkpoint_as<peft::shira<double>>(dir);
    } catch (...) {
      fs::remove_all(dir);
      throw;
    }
    fs::remove_all(dir);
  };
  const auto good = golden_up_tensors(peft::dtype::f32);
  REQUIRE_NOTHROW(load(good));
  const auto k = static_cast<std::size_t>(good[0].values.size());
  auto with_index = [&](std::size_t at, double v) {
    auto t = good;
    t[1].values[at] = v;
    return t;
  };
  SECTION("non-integral") { CHECK_THROWS_AS(load(with_index(3, 2.5)), peft::format_error); }
  SECTION("negative") { CHECK_THROWS_AS(load(with_index(k + 3, -1.0)), peft::format_error); }
  SECTION("out of range: beyond d_out + d_in = K / r") { CHECK_THROWS_AS(load(with_index(5, 200.0)), peft::format_error); }
  SECTION("duplicated entry") {
    auto t = good;
    t[1].values[1] = t[1].values[0];
    t[1].values[k + 1] = t[1].values[k];
    CHECK_THROWS_AS(load(t), peft::format_error);
  }
  SECTION("wrong shape: [3, K]") {
    auto t = good;
    t[1].shape = {3, static_cast<std::int64_t>(k)};
    t[1].values.resize(3 * k, 0.0);
    CHECK_THROWS_AS(load(t), peft::format_error);
  }
  SECTION("wrong shape: flat [2K]") {
    auto t = good;
    t[1].shape = {static_cast<std::int64_t>(2 * k)};
    CHECK_THROWS_AS(load(t), peft::format_error);
  }
  SECTION("wrong shape: [2, K - 1] against K values") {
    auto t = good;
    t[1].shape = {2, static_cast<std::int64_t>(k - 1)};
    t[1].values.erase(t[1].values.begin() + static_cast<std::ptrdiff_t>(k - 1));
    t[1].values.pop_back();
    CHECK_THROWS_AS(load(t), peft::format_error);
  }
  SECTION("K not a multiple of r") { CHECK_THROWS_AS(load(good, 3), peft::format_error); }
  SECTION("shape ambiguous: the mask leaves the last row empty") {
    // d_out = 6, d_in = 4, r = 1, K = 10 entries none of which is in row 5: d_out >= 5, d_in >= 4, sum 10.
    std::vector<double> idx(20), val(10, 0.5);
    for (int t = 0; t < 10; ++t) {
      idx[static_cast<std::size_t>(t)] = t / 2;              // rows 0..4
      idx[static_cast<std::size_t>(10 + t)] = (t % 2) * 3;   // columns 0 and 3
    }
    const std::vector<tensor_spec> t = {{"base_model.model.up.shira_weight", {10}, val, peft::dtype::f32},
                                        {"base_model.model.up.shira_indices", {2, 10}, idx, peft::dtype::i32}};
    try {
      load(t, 1);
      FAIL("an ambiguous shape loaded");
    } catch (const peft::format_error& e) {
      CHECK(std::string(e.what()).find("cannot tell d_out from d_in") != std::string::npos);
    }
  }
}

TEST_CASE("SHiRA: constructor and call errors", "[shira][errors]") {
  peft::rng g(11);
  const auto mask = peft::shira_random_mask(5, 4, 6, 1);
  CHECK_NOTHROW(peft::shira<double>(4, 5, mask));
  CHECK_THROWS_AS(peft::shira<double>(4, 5, peft::matrix<std::int32_t>(3, 6)), peft::shape_error);
  CHECK_THROWS_AS(peft::shira<double>(4, 5, mask, std::vector<double>(5, 1.0)), peft::shape_error);
  CHECK_THROWS_AS(peft::shira<double>(0, 5, mask), peft::shape_error);
  CHECK_THROWS_AS(peft::shira<double>(4, 4, mask), peft::format_error);  // an output peft::index is 4
  auto out_of_range = mask;
  out_of_range(1, 0) = 4;
  CHECK_THROWS_AS(peft::shira<double>(4, 5, out_of_range), peft::format_error);
  auto negative = mask;
  negative(0, 2) = -1;
  CHECK_THROWS_AS(peft::shira<double>(4, 5, negative), peft::format_error);
  auto dup = mask;
  dup(0, 1) = dup(0, 0);
  dup(1, 1) = dup(1, 0);
  CHECK_THROWS_AS(peft::shira<double>(4, 5, dup), peft::format_error);
  CHECK_THROWS_AS(peft::shira<double>(4, 5, {.rank = 3}), peft::shape_error);  // 27 entries > 20

  // indices_from: float-stored indices must be integral, non-negative, (2, K).
  peft::matrix<float> f(2, 3, std::vector<float>{0, 1, 2, 3, 2, 1});
  CHECK(peft::shira<float>::indices_from(f.view())(1, 0) == 3);
  f(0, 1) = 1.5f;
  CHECK_THROWS_AS(peft::shira<float>::indices_from(f.view()), peft::format_error);
  CHECK_THROWS_AS(peft::shira<float>::indices_from(peft::matrix<float>(1, 3).view()), peft::format_error);

  const peft::dense<double> w = random_dense<double>(4, 5, g);
  auto a = random_shira<double>(4, 5, 6, g);
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::y, 2, 3},
                                 {pass::forward, arg::x, 2, 3},
                                 {pass::backward, arg::dx, 2, 3},
                                 {pass::forward, arg::base, 4, 5},
                                 {pass::delta_weight, arg::dw, 4, 4}});
}

TEST_CASE("SHiRA: forward, backward and delta_weight against a dense reference", "[shira]") {
  peft::rng g(3);
  const peft::index in = 9, out = 7, k = 20;
  const auto w = random_dense<double>(in, out, g);
  auto a = random_shira<double>(in, out, k, g);
  a.set_scale(0.75);
  const auto x = peft_test::random_matrix<double>(3, in, g);
  const auto gy = peft_test::random_matrix<double>(3, out, g);
  REQUIRE(peft_test::nontrivial(x));
  // Dense reference of W0 + Delta W.
  peft::matrix<double> delta(out, in);
  for (peft::index t = 0; t < k; ++t) delta(a.indices()(0, t), a.indices()(1, t)) = 0.75 * a.values()(0, t);
  peft::matrix<double> dw(out, in);
  a.delta_weight(w, dw.view());
  CHECK(peft_test::exactly_equal(dw, delta));
  const auto w_eff = peft_test::add(w.weight(), delta);
  peft::matrix<double> y(3, out), dx(3, in);
  peft::shira<double>::cache_type cache;
  a.forward(w, x.view(), y.view(), cache);
  CHECK(rel_error(y, peft_test::ref_linear(x, w_eff, w.bias())) < 1e-14);
  a.zero_grad();
  a.backward(w, x.view(), gy.view(), dx.view(), cache);
  CHECK(rel_error(dx, peft_test::ref_nn(gy, w_eff)) < 1e-14);
  const auto full = peft_test::ref_tn(gy, x);  // dL/dW (out, in)
  peft::matrix<double> expect(1, k);
  for (peft::index t = 0; t < k; ++t) expect(0, t) = 0.75 * full(a.indices()(0, t), a.indices()(1, t));
  CHECK(rel_error(a.grad_values(), expect) < 1e-14);
  // parameters(): the trainable values, then the integer, frozen indices mirrored as T.
  auto p = a.parameters();
  REQUIRE(p.size() == 2);
  CHECK(p[0].name == "shira_weight");
  CHECK(p[0].trainable);
  CHECK(p[0].shape == std::vector<std::int64_t>{k});
  CHECK(p[1].name == "shira_indices");
  CHECK(!p[1].trainable);
  CHECK(p[1].integer);
  CHECK(p[1].shape == std::vector<std::int64_t>{2, k});
  CHECK(p[1].value(1, 5) == a.indices()(1, 5));
  CHECK(peft::io::peft_codec<peft::shira<double>>::integer_tensor("shira_indices"));
  CHECK(!peft::io::peft_codec<peft::shira<double>>::integer_tensor("shira_weight"));
}

// ---- fused switching ------------------------------------------------------------------------------

namespace {

/// apply() writes round_S(W0 + s v) at the K entries only; remove() restores every byte.
template <class S, class T>
void check_apply_remove() {
  peft::rng g(20240611);
  const peft::index in = 37, out = 29, k = 4 * (in + out);
  auto base = random_dense<S>(in, out, g);
  const auto before = weight_bytes(base);
  const auto w0 = peft_test::to_double(base.weight());
  auto a = random_shira<T>(in, out, k, g);
  a.set_scale(static_cast<T>(1.5));
  REQUIRE(peft_test::nontrivial(w0));

  a.apply(base);
  CHECK(a.applied_to(base));
  CHECK(a.applications() == 1);
  const auto after_apply = weight_bytes(base);
  std::set<std::pair<peft::index, peft::index>> masked;
  peft::index changed = 0;
  bool all_rounded = true;
  for (peft::index t = 0; t < k; ++t) {
    const peft::index r = a.indices()(0, t), c = a.indices()(1, t);
    masked.insert({r, c});
    const S expect = peft::convert<S>(w0(r, c) + static_cast<double>(static_cast<T>(a.scale() * a.values()(0, t))));
    all_rounded = all_rounded && std::memcmp(&base.weight()(r, c), &expect, sizeof(S)) == 0;
    changed += peft::convert<double>(base.weight()(r, c)) != w0(r, c) ? 1 : 0;
  }
  CHECK(all_rounded);
  CHECK(changed == k);  // |s v| >= 0.75 > any rounding: every entry moved
  bool others_untouched = true;
  for (peft::index i = 0; i < out; ++i)
    for (peft::index j = 0; j < in; ++j)
      if (!masked.count({i, j})) others_untouched = others_untouched && peft::convert<double>(base.weight()(i, j)) == w0(i, j);
  CHECK(others_untouched);

  // Double apply, and running the adapter over the base that holds its values, are errors.
  CHECK_THROWS_AS(a.apply(base), peft::error);
  CHECK(weight_bytes(base) == after_apply);
  peft::matrix<T> x(2, in), y(2, out);
  typename peft::shira<T>::cache_type cache;
  CHECK_THROWS_AS(a.forward(base, x.view(), y.view(), cache), peft::error);

  // Moving the base object keeps its storage: remove() finds it.
  peft::dense<S> moved = std::move(base);
  a.remove(moved);
  CHECK(weight_bytes(moved) == before);  // bit for bit
  CHECK(!a.applied_to(moved));
  CHECK(a.applications() == 0);
  CHECK_THROWS_AS(a.remove(moved), peft::error);  // remove without apply
  CHECK(weight_bytes(moved) == before);

  // A copy of an applied base is another base; discard_applications() forgets stale records.
  a.apply(moved);
  peft::dense<S> copy = moved;
  CHECK_THROWS_AS(a.remove(copy), peft::error);
  a.remove(moved);
  CHECK(weight_bytes(moved) == before);
  a.apply(copy);
  a.discard_applications();
  CHECK(!a.applied_to(copy));
}

}  // namespace

TEST_CASE("SHiRA switching: apply writes the K entries, remove restores W0 bit for bit (f32, bf16, f64 bases)",
          "[shira][switch]") {
  SECTION("f32 base, float adapter") { check_apply_remove<float, float>(); }
  SECTION("f32 base, double adapter") { check_apply_remove<float, double>(); }
  SECTION("bf16 base, float adapter") { check_apply_remove<peft::bf16, float>(); }
  SECTION("bf16 base, double adapter") { check_apply_remove<peft::bf16, double>(); }
  SECTION("f64 base, double adapter") { check_apply_remove<double, double>(); }
  SECTION("f64 base, float adapter") { check_apply_remove<double, float>(); }
  SECTION("f16 base, float adapter") { check_apply_remove<peft::f16, float>(); }
}

TEMPLATE_TEST_CASE("SHiRA switching: stacked adapters, reverse-order rule, and many-adapter switching",
                   "[shira][switch]", float, peft::bf16, double) {
  using S = TestType;
  peft::rng g(77);
  const peft::index in = 16, out = 12;
  auto base = random_dense<S>(in, out, g);
  const auto before = weight_bytes(base);
  auto a = random_shira<double>(in, out, 40, g);
  // b shares half of a's entries; c is disjoint from a.
  peft::matrix<std::int32_t> shared_idx(2, 30);
  std::set<std::pair<int, int>> used;
  for (peft::index t = 0; t < 20; ++t) {
    shared_idx(0, t) = a.indices()(0, 2 * t);
    shared_idx(1, t) = a.indices()(1, 2 * t);
    used.insert({shared_idx(0, t), shared_idx(1, t)});
  }
  std::set<std::pair<int, int>> in_a;
  for (peft::index t = 0; t < a.entries(); ++t) in_a.insert({a.indices()(0, t), a.indices()(1, t)});
  peft::index t = 20;
  for (int i = 0; i < out && t < 30; ++i)
    for (int j = 0; j < in && t < 30; ++j)
      if (!used.count({i, j}) && !in_a.count({i, j})) {
        shared_idx(0, t) = i;
        shared_idx(1, t) = j;
        used.insert({i, j});
        ++t;
      }
  peft::shira<double> b(in, out, shared_idx, std::vector<double>(30, 0.875));
  std::vector<std::int32_t> cr, cc;
  for (int i = 0; i < out; ++i)
    for (int j = 0; j < in; ++j)
      if (!in_a.count({i, j}) && cr.size() < 25) {
        cr.push_back(i);
        cc.push_back(j);
      }
  std::vector<std::int32_t> cflat(cr);
  cflat.insert(cflat.end(), cc.begin(), cc.end());
  peft::shira<double> c(in, out, peft::matrix<std::int32_t>(2, 25, cflat), std::vector<double>(25, -0.625));

  // Overlapping: a then b; removing a first is refused with W0 untouched, reverse order restores.
  a.apply(base);
  b.apply(base);
  const auto stacked = weight_bytes(base);
  CHECK_THROWS_AS(a.remove(base), peft::error);
  CHECK(weight_bytes(base) == stacked);
  b.remove(base);
  a.remove(base);
  CHECK(weight_bytes(base) == before);

  // Disjoint: any order restores exactly.
  a.apply(base);
  c.apply(base);
  a.remove(base);
  c.remove(base);
  CHECK(weight_bytes(base) == before);

  // A serving loop: switch among three adapters many times, then remove the last one.
  std::vector<peft::shira<double>*> pool{&a, &b, &c};
  peft::shira<double>* current = nullptr;
  for (int step = 0; step < 30; ++step) {
    auto* next = pool[static_cast<std::size_t>(g.below(3))];
    if (current == next) continue;
    if (current) current->remove(base);
    next->apply(base);
    current = next;
  }
  if (current) current->remove(base);
  CHECK(weight_bytes(base) == before);
}

TEMPLATE_TEST_CASE("SHiRA switching: apply, then the base alone == the unmerged adapted forward", "[shira][switch]",
                   float, peft::bf16, double) {
  using S = TestType;
  peft::rng g(99);
  const peft::index in = 48, out = 40, batch = 3;
  for (int pass = 0; pass < 2; ++pass) {
    auto run = [&]<class T>(T*) {
      peft::adapted_linear<peft::dense<S>, peft::shira<T>> layer(random_dense<S>(in, out, g));
      layer.add_adapter("a", random_shira<T>(in, out, peft::shira_mask_size(out, in, 4), g));
      const auto x = peft_test::random_matrix<T>(batch, in, g);
      REQUIRE(peft_test::nontrivial(x));
      const auto before = weight_bytes(layer.base());
      peft::matrix<T> unmerged(batch, out), applied(batch, out), restored(batch, out), base_only(batch, out);
      layer.forward(x, unmerged);
      layer.base().matmul(x.view(), base_only.view());
      REQUIRE(rel_error(unmerged, base_only) > 1e-3);  // the adapter does something
      layer.adapter("a").apply(layer.base());
      layer.set_enabled("a", false);
      layer.forward(x, applied);
      // The base now holds W0 + Delta W rounded to S: equal to the unmerged forward to that rounding.
      const double eps = std::max(static_cast<double>(std::numeric_limits<T>::epsilon()),
                                  std::is_same_v<S, peft::bf16> ? 0x1p-8 : std::is_same_v<S, float> ? 0x1p-23 : 0.0);
      CHECK(rel_error(applied, unmerged) < 8 * eps);
      layer.adapter("a").remove(layer.base());
      CHECK(weight_bytes(layer.base()) == before);
      layer.set_enabled("a", true);
      layer.forward(x, restored);
      CHECK(peft_test::exactly_equal(restored, unmerged));
    };
    if (pass == 0) run(static_cast<float*>(nullptr));
    else run(static_cast<double*>(nullptr));
  }
}

// ---- mask builders --------------------------------------------------------------------------------

TEST_CASE("SHiRA masks: random is K distinct sorted entries, seeded and deterministic", "[shira][masks]") {
  CHECK(peft::shira_mask_size(96, 64, 4) == 640);
  CHECK_THROWS_AS(peft::shira_mask_size(4, 4, 3), peft::shape_error);  // 24 > 16, as PEFT refuses
  for (auto [out, in, k] : {std::tuple<peft::index, peft::index, peft::index>{96, 64, 640}, {7, 5, 35}, {1, 9, 4}, {13, 1, 13}, {5, 5, 0}}) {
    INFO(out << " x " << in << " K " << k);
    const auto m = peft::shira_random_mask(out, in, k, 42);
    CHECK(valid_mask(m, out, in, k));
    CHECK(same_indices(m, peft::shira_random_mask(out, in, k, 42)));
    if (k > 0 && k < out * in) CHECK(!same_indices(m, peft::shira_random_mask(out, in, k, 43)));
  }
  // Every entry is reachable: over seeds, the K = 3 masks of a 4 x 4 weight cover all 16 entries.
  std::set<int> seen;
  for (std::uint64_t s = 0; s < 200; ++s) {
    const auto m = peft::shira_random_mask(4, 4, 3, s);
    for (peft::index t = 0; t < 3; ++t) seen.insert(m(0, t) * 4 + m(1, t));
  }
  CHECK(seen.size() == 16);
  CHECK_THROWS_AS(peft::shira_random_mask(4, 4, 17, 0), peft::shape_error);
  CHECK_THROWS_AS(peft::shira_random_mask(4, 4, -1, 0), peft::shape_error);
  CHECK_THROWS_AS(peft::shira_random_mask(0, 4, 1, 0), peft::shape_error);
}

TEST_CASE("SHiRA masks: weight magnitude, gradient and SNIP are the brute-force top K, ties in row-major order",
          "[shira][masks]") {
  peft::rng g(8);
  const peft::index out = 23, in = 17;
  // Values from a small set: many ties, so the tie-breaking rule decides most of the mask.
  peft::matrix<float> w(out, in), grad(out, in);
  for (auto& v : w.storage()) v = static_cast<float>(static_cast<int>(g.below(7)) - 3) * 0.5f;
  for (auto& v : grad.storage()) v = static_cast<float>(static_cast<int>(g.below(5)) - 2);
  REQUIRE(peft_test::count_nonzero(w) > w.size() / 2);
  peft::matrix<double> s_wm(out, in), s_g(out, in), s_snip(out, in);
  for (peft::index i = 0; i < out; ++i)
    for (peft::index j = 0; j < in; ++j) {
      s_wm(i, j) = std::abs(static_cast<double>(w(i, j)));
      s_g(i, j) = std::abs(static_cast<double>(grad(i, j)));
      s_snip(i, j) = std::abs(static_cast<double>(w(i, j)) * static_cast<double>(grad(i, j)));
    }
  const auto base = peft::dense<peft::bf16>::from(peft::matrix_view<const float>(w.view()));  // exact in bf16
  for (peft::index k : {peft::index{0}, peft::index{1}, peft::index{37}, peft::index{80}, out * in - 1, out * in}) {
    INFO("K " << k);
    const auto wm = peft::shira_weight_magnitude_mask(w.view(), k);
    CHECK(valid_mask(wm, out, in, k));
    CHECK(same_indices(wm, brute_top_k(s_wm, k)));
    CHECK(same_indices(peft::shira_weight_magnitude_mask(base, k), wm));
    CHECK(same_indices(peft::shira_gradient_mask(grad.view(), k), brute_top_k(s_g, k)));
    const auto snip = peft::shira_snip_mask(w.view(), grad.view(), k);
    CHECK(same_indices(snip, brute_top_k(s_snip, k)));
    CHECK(same_indices(peft::shira_snip_mask(base, grad.view(), k), snip));
  }
  // Continuous values: the plain top K.
  const auto wc = peft_test::random_matrix<double>(out, in, g);
  peft::matrix<double> sc(out, in);
  for (peft::index i = 0; i < out; ++i)
    for (peft::index j = 0; j < in; ++j) sc(i, j) = std::abs(wc(i, j));
  CHECK(same_indices(peft::shira_weight_magnitude_mask(wc.view(), 50), brute_top_k(sc, 50)));
  // Errors.
  peft::matrix<double> nan_w = wc;
  nan_w(3, 4) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(peft::shira_weight_magnitude_mask(nan_w.view(), 5), peft::format_error);
  CHECK_THROWS_AS(peft::shira_gradient_mask(wc.view(), out * in + 1), peft::shape_error);
  CHECK_THROWS_AS(peft::shira_snip_mask(wc.view(), peft::matrix<double>(out, in + 1).view(), 3), peft::shape_error);
}

TEST_CASE("SHiRA masks: the gradient accumulator sums dy^T x over batches", "[shira][masks]") {
  peft::rng g(21);
  const peft::index in = 11, out = 6;
  peft::shira_gradient_accumulator<double> acc(in, out);
  peft::matrix<double> expect(out, in);
  for (peft::index b : {peft::index{1}, peft::index{4}, peft::index{3}}) {
    const auto x = peft_test::random_matrix<double>(b, in, g);
    const auto dy = peft_test::random_matrix<double>(b, out, g);
    acc.add(x.view(), dy.view());
    expect = peft_test::add(expect, peft_test::ref_tn(dy, x));
  }
  CHECK(acc.batches() == 3);
  REQUIRE(peft_test::nontrivial(expect));
  CHECK(rel_error(acc.gradient(), expect) < 1e-14);
  peft::matrix<double> score(out, in);
  for (peft::index i = 0; i < out; ++i)
    for (peft::index j = 0; j < in; ++j) score(i, j) = std::abs(expect(i, j));
  CHECK(same_indices(peft::shira_gradient_mask(acc.gradient(), 20), brute_top_k(score, 20)));
  CHECK_THROWS_AS(acc.add(peft::matrix<double>(2, in).view(), peft::matrix<double>(3, out).view()), peft::shape_error);
  acc.reset();
  CHECK(acc.batches() == 0);
  CHECK(peft_test::max_abs(acc.gradient()) == 0.0);
}

TEST_CASE("SHiRA masks: struct is the diagonal plus evenly spaced lines, exactly K entries", "[shira][masks]") {
  // Pinned: (4, 6), K = 10: the diagonal, row 0 (5 new entries), then the first entry of row 2.
  const auto m = peft::shira_struct_mask(4, 6, 10);
  const std::vector<std::int32_t> expect_rows{0, 0, 0, 0, 0, 0, 1, 2, 2, 3};
  const std::vector<std::int32_t> expect_cols{0, 1, 2, 3, 4, 5, 1, 0, 2, 3};
  std::vector<std::int32_t> flat(expect_rows);
  flat.insert(flat.end(), expect_cols.begin(), expect_cols.end());
  CHECK(same_indices(m, peft::matrix<std::int32_t>(2, 10, flat)));

  for (auto lines : {peft::shira_struct_lines::rows, peft::shira_struct_lines::columns,
                     peft::shira_struct_lines::rows_and_columns}) {
    for (auto [out, in, r] : {std::tuple<peft::index, peft::index, peft::index>{96, 64, 4}, {64, 96, 4}, {30, 30, 1}, {12, 20, 2}}) {
      const peft::index k = peft::shira_mask_size(out, in, r);
      INFO("lines " << static_cast<int>(lines) << " " << out << " x " << in << " K " << k);
      const auto idx = peft::shira_struct_mask(out, in, k, lines);
      REQUIRE(valid_mask(idx, out, in, k));
      CHECK(same_indices(idx, peft::shira_struct_mask(out, in, k, lines)));
      std::set<std::pair<int, int>> e;
      for (peft::index t = 0; t < k; ++t) e.insert({idx(0, t), idx(1, t)});
      for (peft::index i = 0; i < std::min(out, in); ++i) CHECK(e.count({static_cast<int>(i), static_cast<int>(i)}));
      // Off the diagonal, every entry lies on a used row (rows) / column (columns) / either; all
      // used lines but one are complete.
      std::map<int, int> row_count, col_count;
      for (auto [i, j] : e)
        if (i != j) {
          ++row_count[i];
          ++col_count[j];
        }
      if (lines == peft::shira_struct_lines::rows) {
        int partial = 0;
        for (auto [i, n] : row_count) partial += (n + (i < std::min(out, in) ? 1 : 0)) != in ? 1 : 0;
        CHECK(partial <= 1);
        CHECK(row_count.size() < static_cast<std::size_t>(out));  // a few rows, not all
      } else if (lines == peft::shira_struct_lines::columns) {
        int partial = 0;
        for (auto [j, n] : col_count) partial += (n + (j < std::min(out, in) ? 1 : 0)) != out ? 1 : 0;
        CHECK(partial <= 1);
      } else {
        // Rows and columns alternate: each off-diagonal entry is on a full row or a full column
        // (but for the last, partial line).
        std::set<int> full_rows, full_cols;
        for (peft::index i = 0; i < out; ++i) {
          bool full = true;
          for (peft::index j = 0; j < in; ++j) full = full && e.count({static_cast<int>(i), static_cast<int>(j)});
          if (full) full_rows.insert(static_cast<int>(i));
        }
        for (peft::index j = 0; j < in; ++j) {
          bool full = true;
          for (peft::index i = 0; i < out; ++i) full = full && e.count({static_cast<int>(i), static_cast<int>(j)});
          if (full) full_cols.insert(static_cast<int>(j));
        }
        CHECK(!full_rows.empty());  // row 0 comes first; a column may be the partial last line
        peft::index off_lines = 0;
        for (auto [i, j] : e) off_lines += (i != j && !full_rows.count(i) && !full_cols.count(j)) ? 1 : 0;
        CHECK(off_lines < std::max(out, in));  // only the last line may be partial
      }
    }
  }
  CHECK_THROWS_AS(peft::shira_struct_mask(10, 8, 7), peft::shape_error);  // fewer than the 8 diagonal entries
  CHECK(valid_mask(peft::shira_struct_mask(10, 8, 80), 10, 8, 80));      // the whole weight
  // A struct mask trains like any other.
  peft::shira<double> a(8, 10, peft::shira_struct_mask(10, 8, 36));
  CHECK(a.entries() == 36);
}

}  // namespace test_shira
