// C3A: parity with HuggingFace PEFT 0.21 (tests/data/peft/c3a, c3a_b32: block sizes 16, and 32
// with a block_size_pattern giving the down layer 48), the passes against a double reference of
// the circular convolution written from its definition, initialisation, saving and loading
// (block_size_pattern), and the errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/adapters/c3a.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft/c3a.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_c3a {

using ix = peft::index;

namespace {

using peft_test::message_of;
using peft_test::rel_error;
using peft_test::tolerance;

/// K[p, q, l] of the adapter in double.
template <class T>
double kernel_at(const peft::c3a<T>& a, ix p, ix q, ix l) {
  return static_cast<double>(a.kernel()(p, q * a.block_size() + l));
}

/// The delta PEFT merges, from its definition: column q b + j of block row p is the response of
/// y_p[t] = sum_l K[p, q, l] x_q[(t + l) mod b] / in to the unit input e_{q b + j}.
template <class T>
peft::matrix<double> delta_of(const peft::c3a<T>& a) {
  const ix b = a.block_size(), in = a.in_features();
  peft::matrix<double> d(a.out_features(), in);
  for (ix p = 0; p < a.out_features() / b; ++p)
    for (ix q = 0; q < in / b; ++q)
      for (ix t = 0; t < b; ++t)
        for (ix l = 0; l < b; ++l) d(p * b + t, q * b + (t + l) % b) += kernel_at(a, p, q, l) / static_cast<double>(in);
  return d;
}

peft::io::adapter_config c3a_config(const std::string& extra = "") {
  return peft::io::adapter_config::parse(R"({"peft_type": "C3A", "target_modules": ["layer"], "block_size": 4)" +
                                         extra + "}");
}

/// The kernel gradient of layer `name` against PEFT's (a 3-D reference tensor, read flat: the
/// kernel's (out / b, (in / b) b) storage is its row-major flattening).
template <class A>
void check_kernel_gradient(peft_test::golden_case<A>& c, const std::string& name, double tol) {
  const auto params = c.layer(name).adapter("default").parameters();
  REQUIRE(params.size() == 1);
  const auto& p = params[0];
  const std::string key = "grad.base_model.model." + name + ".c3a_kernel.default";
  REQUIRE(c.reference_gradients(name) == 1);
  const peft::matrix<double> ref(p.grad.rows(), p.grad.cols(), c.reference.template read<double>(key));
  REQUIRE(peft_test::count_nonzero(ref) > ref.size() / 2);
  CHECK(rel_error(p.grad, ref) < tol);
}

template <class A>
void check_layers(peft_test::golden_case<A>& c, double tol) {
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    peft_test::check_layer_outputs(c, name, tol);
    check_kernel_gradient(c, name, tol);
  }
}

template <class A>
void check_network(peft_test::golden_case<A>& c, double tol) {
  peft_test::check_network_outputs(c, tol);
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    check_kernel_gradient(c, name, tol);
  }
}

}  // namespace

// The references are PEFT's forward in double, differentiated by autograd (scripts/
// make_c3a_golden.py: PEFT's hand-written backward returns a wrong dx; docs/methods/c3a.md).
TEMPLATE_TEST_CASE("c3a reproduces PEFT: layers, network, merged weights", "[c3a][golden]", float, double) {
  using A = peft::c3a<TestType>;
  for (const std::string name : {"c3a", "c3a_b32"}) {
    peft_test::check_golden<A>(name, check_layers<A>, check_network<A>, peft_test::check_merge<A>);
  }
}

TEST_CASE("c3a golden checkpoints: block sizes from block_size and block_size_pattern", "[c3a][golden]") {
  auto ck = peft::io::load_checkpoint_as<peft::c3a<double>>(peft_test::golden_dir("c3a") / "adapter");
  CHECK(ck.find("up.weight")->adapter.block_size() == 16);
  CHECK(ck.find("down.weight")->adapter.block_size() == 16);
  CHECK(ck.find("up.weight")->adapter.kernel().rows() == 6);  // (96 / 16, 64 / 16, 16)
  auto b32 = peft::io::load_checkpoint_as<peft::c3a<double>>(peft_test::golden_dir("c3a_b32") / "adapter");
  const auto& up = b32.find("up.weight")->adapter;
  const auto& down = b32.find("down.weight")->adapter;
  CHECK(up.block_size() == 32);
  CHECK(down.block_size() == 48);  // block_size_pattern {"down": 48}
  CHECK(down.in_features() == 96);
  CHECK(down.out_features() == 48);
  CHECK(down.scale() == 1.0 / 96.0);
  auto params = b32.find("down.weight")->adapter.parameters();
  REQUIRE(params.size() == 1);
  CHECK(params[0].name == "c3a_kernel");
  CHECK(params[0].shape == std::vector<std::int64_t>{1, 2, 48});
}

TEST_CASE("c3a golden checkpoints save and load back: tensors and config fields", "[c3a][golden]") {
  for (const std::string name : {"c3a", "c3a_b32"}) {
    INFO("case " << name);
    auto ck = peft::io::load_checkpoint_as<peft::c3a<double>>(peft_test::golden_dir(name) / "adapter");
    auto back = peft_test::save_and_load(ck, "peft_c3a_golden_" + name);
    CHECK(back.config.peft_type == "C3A");
    CHECK(back.config.raw["block_size"] == ck.config.raw["block_size"]);
    CHECK(back.config.raw.value("block_size_pattern", nlohmann::ordered_json::object()) ==
          ck.config.raw.value("block_size_pattern", nlohmann::ordered_json::object()));
    CHECK(!back.config.raw.contains("r"));  // C3AConfig has no r
    REQUIRE(back.modules.size() == ck.modules.size());
    for (auto& m : ck.modules) {
      INFO(m.weight_name);
      auto& b = back.find(m.weight_name)->adapter;
      CHECK(b.block_size() == m.adapter.block_size());
      CHECK(rel_error(b.kernel(), m.adapter.kernel()) == 0.0);  // f32 values, saved as f32
    }
  }
}

TEMPLATE_TEST_CASE("c3a passes equal a double reference of the circular convolution", "[c3a]", float, double) {
  using T = TestType;
  peft::rng g(17);
  const ix batch = 3;
  for (const auto& [in, out, b] : std::vector<std::tuple<ix, ix, ix>>{{12, 8, 4}, {10, 15, 5}, {6, 9, 3}, {4, 6, 1}, {8, 8, 8}}) {
    INFO("in " << in << ", out " << out << ", block " << b);
    peft::c3a<T> a(in, out, {.block_size = b, .init = peft::c3a_init::gaussian, .seed = g.next()});
    const peft::dense<double> w(peft_test::random_matrix<double>(out, in, g), peft_test::random_vector<double>(out, g));
    const auto x = peft_test::random_matrix<T>(batch, in, g);
    const auto gy = peft_test::random_matrix<T>(batch, out, g);
    REQUIRE(peft_test::nontrivial(x));
    REQUIRE(peft_test::nontrivial(gy));
    a.zero_grad();
    peft_test::check_against_delta(a, w, x, gy, delta_of(a), tolerance<T>());

    // dK[p, q, l] = sum_r sum_t gy[r, p b + t] x[r, q b + (t + l) mod b] / in.
    peft::matrix<double> dk(out / b, in);
    for (ix r = 0; r < batch; ++r)
      for (ix p = 0; p < out / b; ++p)
        for (ix q = 0; q < in / b; ++q)
          for (ix t = 0; t < b; ++t)
            for (ix l = 0; l < b; ++l)
              dk(p, q * b + l) += static_cast<double>(gy(r, p * b + t)) * static_cast<double>(x(r, q * b + (t + l) % b)) /
                                  static_cast<double>(in);
    REQUIRE(peft_test::nontrivial(dk));
    CHECK(rel_error(a.parameters()[0].grad, dk) < tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("c3a inits: zeros is the identity, the others PEFT's distributions", "[c3a]", float, double) {
  using T = TestType;
  peft::rng g(5);
  const ix in = 64, out = 96;
  const auto w = peft_test::random_dense<T>(in, out, g);
  const auto x = peft_test::random_matrix<T>(2, in, g);
  peft::c3a<T> zero(in, out, {.block_size = 16, .init = peft::c3a_init::zeros});
  peft_test::check_output_is_base(zero, w, x);
  peft_test::check_identity_at_init(zero, 3, g);
  CHECK(peft_test::max_abs(zero.parameters()[0].grad) > 0.0);  // training moves it off the identity

  const peft::c3a<T> xavier(in, out, {.block_size = 16, .seed = 3});  // PEFT's default
  const double xb = std::sqrt(6.0 / (in + out));
  CHECK(peft_test::max_abs(xavier.kernel()) <= xb);
  CHECK(peft_test::max_abs(xavier.kernel()) > 0.9 * xb);
  CHECK(peft_test::count_nonzero(xavier.kernel()) == xavier.kernel().size());
  peft_test::check_not_base(xavier, w, x, 1e-3);

  const peft::c3a<T> kaiming(in, out, {.block_size = 16, .init = peft::c3a_init::kaiming_uniform, .seed = 3});
  CHECK(peft_test::max_abs(kaiming.kernel()) <= 1.0 / 8.0);
  CHECK(peft_test::max_abs(kaiming.kernel()) > 0.9 / 8.0);

  peft::c3a<T> gauss(in, out, {.block_size = 16, .init = peft::c3a_init::gaussian, .seed = 3});
  double sq = 0;
  for (const auto v : gauss.kernel().storage()) sq += static_cast<double>(v) * static_cast<double>(v);
  CHECK(std::abs(sq / static_cast<double>(gauss.kernel().size()) - 1.0) < 0.15);  // N(0, 1), 384 draws
  CHECK(gauss.parameters()[0].shape == std::vector<std::int64_t>{6, 4, 16});
}

TEST_CASE("c3a save and load: block_size_pattern entries for modules of other block sizes", "[c3a]") {
  peft::io::basic_peft_checkpoint<peft::c3a<double>> ck;
  ck.config = peft::io::adapter_config::lora(8, 8.0, {});  // a LoRA config: r and LoRA's fields go
  ck.config.targets_kind = peft::io::target_kind::none;
  ck.modules.push_back({"model.a", "model.a.weight", peft::c3a<double>(24, 20, {.block_size = 4, .seed = 1})});
  ck.modules.push_back({"model.b", "model.b.weight", peft::c3a<double>(24, 36, {.block_size = 12, .seed = 2})});
  ck.modules.push_back({"model.c", "model.c.weight", peft::c3a<double>(8, 8, {.block_size = 4, .seed = 3})});
  auto back = peft_test::save_and_load(ck, "peft_c3a_roundtrip");
  CHECK(back.config.peft_type == "C3A");
  CHECK(back.config.raw["block_size"] == 4);
  CHECK(back.config.raw["block_size_pattern"] == nlohmann::ordered_json{{"model.b", 12}});
  CHECK(!back.config.raw.contains("r"));
  REQUIRE(back.modules.size() == 3);
  for (auto& m : ck.modules) {
    INFO(m.weight_name);
    auto& b = back.find(m.weight_name)->adapter;
    CHECK(b.block_size() == m.adapter.block_size());
    CHECK(rel_error(b.kernel(), m.adapter.kernel()) < 1e-7);  // stored as f32
  }
}

TEST_CASE("c3a_block_size_for follows PEFT's rule", "[c3a]") {
  using peft::io::c3a_block_size_for;
  const auto c = peft::io::adapter_config::parse(
      R"({"peft_type": "C3A", "block_size": 8, "block_size_pattern": {"q_proj": 16, "layers\\.1\\..*": 4, "up": 32}})");
  CHECK(c3a_block_size_for(c, "model.layers.0.q_proj") == 16);  // ".*\.q_proj$"
  CHECK(c3a_block_size_for(c, "model.layers.1.k_proj") == 4);   // ".*\.layers\.1\..*$"
  CHECK(c3a_block_size_for(c, "model.layers.1.q_proj") == 16);  // the first matching key wins
  CHECK(c3a_block_size_for(c, "model.layers.0.k_proj") == 8);
  CHECK(c3a_block_size_for(c, "up") == 32);   // no regex matches a top-level name; the key itself does
  CHECK(c3a_block_size_for(c, "q_proj") == 16);
  CHECK(c3a_block_size_for(c, "model.q_proj_x") == 8);  // "$" anchors the end
  CHECK(c3a_block_size_for(peft::io::adapter_config::parse(R"({"peft_type": "C3A"})"), "x") == 256);  // PEFT's default
  CHECK_THROWS_AS(c3a_block_size_for(peft::io::adapter_config::parse(R"({"block_size_pattern": [1]})"), "x"),
                  peft::format_error);
  CHECK_THROWS_AS(c3a_block_size_for(peft::io::adapter_config::parse(R"({"block_size_pattern": {"(": 4}})"), "x"),
                  peft::format_error);
  CHECK_THROWS_AS(c3a_block_size_for(peft::io::adapter_config::parse(R"({"block_size": 0})"), "x"), peft::format_error);
  CHECK_THROWS_AS(c3a_block_size_for(peft::io::adapter_config::parse(R"({"block_size_pattern": {"x": 2.5}})"), "x"),
                  peft::format_error);
}

TEMPLATE_TEST_CASE("c3a rejects bad shapes, bad checkpoints and configs with clear errors", "[c3a]", float, double) {
  using T = TestType;
  using peft_test::arg;
  using peft_test::pass;
  peft::rng g(3);
  peft::c3a<T> a(12, 8, {.block_size = 4, .seed = 1});
  const auto w = peft_test::random_dense<T>(12, 8, g);
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::base, 8, 16, "[c3a::forward] base weight is (8, 16)"},
                                 {pass::forward, arg::x, 2, 11},
                                 {pass::backward, arg::dx, 2, 11},
                                 {pass::delta_weight, arg::dw, 8, 11, "[c3a::delta_weight]"}});
  CHECK(message_of([] { peft::c3a<T>(12, 8, {.block_size = 3}); }).starts_with("[c3a::c3a] block_size 3 must divide"));
  CHECK_THROWS_AS(peft::c3a<T>(12, 8, {.block_size = 0}), peft::shape_error);
  CHECK_THROWS_AS(peft::c3a<T>(0, 8, {.block_size = 1}), peft::shape_error);
  CHECK_THROWS_AS(peft::c3a<T>(peft::matrix<T>(2, 10), 4), peft::shape_error);

  const auto cfg = c3a_config();
  const peft::io::checkpoint_tensors<T> none;
  // The kernel's block size must be the config's for the module.
  auto m8 = peft_test::random_tensors<T>("layer", {{"c3a_kernel", {2, 3, 8}}}, g);
  CHECK(message_of([&] { peft::io::from_checkpoint<peft::c3a<T>>(cfg, m8, none); })
            .starts_with("[c3a::from_checkpoint] module 'layer': c3a_kernel is [2, 3, 8], but the config's block size"));
  CHECK(peft::io::from_checkpoint<peft::c3a<T>>(c3a_config(R"(, "block_size_pattern": {"layer": 8})"), m8, none).block_size() == 8);
  auto m2d = peft_test::random_tensors<T>("layer", {{"c3a_kernel", {2, 12}}}, g);
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::c3a<T>>(cfg, m2d, none), peft::format_error);
  auto m4 = peft_test::random_tensors<T>("layer", {{"c3a_kernel", {2, 3, 4}}}, g);
  m4.set_base_shape(std::pair<ix, ix>{8, 16});
  CHECK(message_of([&] { peft::io::from_checkpoint<peft::c3a<T>>(cfg, m4, none); }).find("the base is (8, 16)") !=
        std::string::npos);
  m4.set_base_shape(std::pair<ix, ix>{8, 12});
  const auto ok = peft::io::from_checkpoint<peft::c3a<T>>(cfg, m4, none);
  CHECK(ok.in_features() == 12);
  CHECK(ok.out_features() == 8);
  CHECK_THROWS_AS(peft::io::from_checkpoint<peft::c3a<T>>(cfg, none, none), peft::format_error);
}

TEST_CASE("c3a checkpoints: config fields honoured or refused by name", "[c3a]") {
  namespace fs = std::filesystem;
  const auto dir = peft_test::scratch_path("peft_c3a_fields");
  auto load_with = [&](const char* key, nlohmann::ordered_json v) {
    fs::remove_all(dir);
    peft_test::rewrite_adapter("c3a", dir, [&](nlohmann::ordered_json& c) { c[key] = v; });
    return message_of([&] { peft::io::load_checkpoint_as<peft::c3a<double>>(dir); });
  };
  CHECK(load_with("init_weights", "gaussian").empty());  // initialisation only
  CHECK(load_with("init_weights", true).empty());
  CHECK(load_with("bias", "c3a_only").starts_with("[c3a::from_checkpoint] adapter_config.json: 'bias' = \"c3a_only\""));
  CHECK(load_with("r", 8).starts_with("[c3a::from_checkpoint] adapter_config.json: 'r' = 8"));
  CHECK(load_with("block_size_patern", nlohmann::ordered_json{{"up", 32}}).starts_with(
      "[c3a::from_checkpoint] adapter_config.json: 'block_size_patern'"));
  CHECK(load_with("block_size", 32).find("c3a_kernel is [3, 6, 16], but the config's block size for it is 32") !=
        std::string::npos);  // module 'down' is read first
  fs::remove_all(dir);
}

}  // namespace test_c3a
