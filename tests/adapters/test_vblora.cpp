// VB-LoRA: parity with HuggingFace PEFT 0.21 on tests/data/peft/vblora (logits, r 4, 32 vectors of
// length 16, top-2) and vblora_topk_only (save_only_topk_weights, top-3): each layer's output,
// dx and logit gradients, the network's y, dL/dx and the shared bank's gradient (summed over
// both layers), merged weights; the bank shared by the modules and saved once; save round trips
// in both forms; keep_only_topk; the codec's and constructors' errors.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>

#include "peft/adapters/vblora.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/peft/vblora.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/layer/adapted_linear.hpp"
#include "support/adapter_checks.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_vblora {

namespace {

namespace fs = std::filesystem;
using peft_test::rewrite_adapter;

template <class T>
using golden_case = peft_test::golden_case<peft::vblora<T>>;

/// The top-k case's weights are stored in f32 by PEFT while its reference was computed from the
/// f64 logits: its outputs agree to the f32 rounding of the weights only.
constexpr double topk_tol = 2e-6;

/// A reference (d0, d1, d2) tensor as the (d0 d1, d2) table of pieces the adapter stores.
template <class T>
peft::matrix<double> pieces(const golden_case<T>& c, const std::string& name) {
  const auto& s = c.reference.info(name).shape;
  REQUIRE(s.size() == 3);
  return peft::matrix<double>(static_cast<peft::index>(s[0] * s[1]), static_cast<peft::index>(s[2]),
                              c.reference.template read<double>(name));
}

/// Layer `name`'s logit gradients against PEFT's.
template <class T>
void check_logit_gradients(golden_case<T>& c, const std::string& name, double tol) {
  const auto& a = c.layer(name).adapter("default");
  const std::string key = "grad.base_model.model." + name + ".";
  const auto ga = pieces(c, key + "vblora_logits_A.default");
  const auto gb = pieces(c, key + "vblora_logits_B.default");
  // PEFT's gradient reaches only the top-k entries of each row: 2 of 32.
  REQUIRE(peft_test::count_nonzero(ga) > ga.size() / 32);
  CHECK(peft_test::count_nonzero(a.grad_logits_A()) == peft_test::count_nonzero(ga));
  CHECK(peft_test::rel_error(a.grad_logits_A(), ga) < tol);
  CHECK(peft_test::rel_error(a.grad_logits_B(), gb) < tol);
}

}  // namespace

TEMPLATE_TEST_CASE("vblora golden: each layer's output, dx and logit gradients match PEFT", "[vblora][golden]", float,
                   double) {
  using T = TestType;
  golden_case<T> c("vblora");
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    const auto& a = c.layer(name).adapter("default");
    REQUIRE(peft_test::nontrivial(a.logits_A()));
    REQUIRE(peft_test::nontrivial(a.bank()->value));
    peft_test::check_layer_outputs(c, name, peft_test::tolerance<T>());
    check_logit_gradients(c, name, peft_test::tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("vblora golden: the network's output, dL/dx, logit and bank gradients match PEFT",
                   "[vblora][golden]", float, double) {
  using T = TestType;
  golden_case<T> c("vblora");
  peft_test::check_network_outputs(c, peft_test::tolerance<T>());
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    check_logit_gradients(c, name, peft_test::tolerance<T>());
  }
  // The bank's gradient is one tensor, summed over both layers (PEFT lists it under "up").
  const auto& up = c.up.adapter("default");
  const auto& down = c.down.adapter("default");
  REQUIRE(up.bank().get() == down.bank().get());
  const auto ref = c.ref("grad.base_model.model.up.vblora_vector_bank.default");
  REQUIRE(peft_test::nontrivial(ref));
  CHECK(peft_test::rel_error(up.bank()->grad, ref) < peft_test::tolerance<T>());
}

TEMPLATE_TEST_CASE("vblora golden: delta_weight and merge give PEFT's merged weights", "[vblora][golden][merge]",
                   float, double) {
  golden_case<TestType> c("vblora");
  peft_test::check_merge(c);
}

TEMPLATE_TEST_CASE("vblora golden: the save_only_topk_weights form computes PEFT's outputs and merge",
                   "[vblora][golden][topk]", float, double) {
  using T = TestType;
  golden_case<T> c("vblora_topk_only");
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    const auto& a = c.layer(name).adapter("default");
    REQUIRE(a.topk_only());
    CHECK(a.topk() == 3);
    peft_test::check_layer_outputs(c, name, topk_tol);  // output and dx
  }
  peft_test::check_network_outputs(c, topk_tol);
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto& layer = c.layer(name);
    const auto w0 = c.base.template read_matrix<double>(name + ".weight");
    peft::matrix<T> dw(layer.out_features(), layer.in_features());
    layer.adapter("default").delta_weight(layer.base(), dw.view());
    const auto w_ref = c.ref("merged." + name + ".weight");
    // The delta itself to the f32 rounding of the weights (the merged weight hides it).
    peft::matrix<double> d_ref = w_ref;
    for (peft::index i = 0; i < d_ref.rows(); ++i)
      for (peft::index j = 0; j < d_ref.cols(); ++j) d_ref(i, j) -= w0(i, j);
    CHECK(peft_test::rel_error(dw, d_ref) < topk_tol);
    peft_test::check_merged_base(c, name, 1e-7);
  }
  // Inference only: nothing is trainable, as PEFT refuses to train such a checkpoint.
  for (auto& p : c.up.adapter("default").parameters()) {
    INFO(p.name);
    CHECK_FALSE(p.trainable);
  }
  CHECK(c.checkpoint.parameter_count() == 0);
}

TEST_CASE("vblora: keep_only_topk leaves the outputs unchanged and the top-k form is exact", "[vblora][topk]") {
  golden_case<double> c("vblora");
  const auto x = c.ref_t("layer.up.input");
  auto a = c.checkpoint.find("up.weight")->adapter;
  const auto w = peft_test::load_base(c.base, "up");
  const auto y_logits = peft_test::run_forward(a, w, x);
  a.keep_only_topk();
  CHECK(a.topk_only());
  CHECK(a.logits_A().empty());
  CHECK(peft_test::rel_error(peft_test::run_forward(a, w, x), y_logits) < 1e-15);
  a.keep_only_topk();  // a no-op the second time
  CHECK(peft_test::rel_error(peft_test::run_forward(a, w, x), y_logits) < 1e-15);
  // dx still flows through a frozen top-k adapter.
  peft::matrix<double> dx(x.rows(), x.cols()), dx_ref(x.rows(), x.cols());
  const auto g = c.ref_t("layer.up.grad_output");
  peft::vblora<double>::cache_type c1, c2;
  peft::matrix<double> y(x.rows(), w.out_features());
  a.forward(w, x.view(), y.view(), c1);
  a.backward(w, x.view(), g.view(), dx.view(), c1);
  auto full = c.checkpoint.find("up.weight")->adapter;
  full.forward(w, x.view(), y.view(), c2);
  full.backward(w, x.view(), g.view(), dx_ref.view(), c2);
  CHECK(peft_test::rel_error(dx, dx_ref) < 1e-15);
}

TEST_CASE("vblora: the bank is shared by the modules, counted and saved once", "[vblora][shared][io]") {
  golden_case<double> c("vblora");
  auto& up = c.checkpoint.find("up.weight")->adapter;
  auto& down = c.checkpoint.find("down.weight")->adapter;
  REQUIRE(up.bank() != nullptr);
  CHECK(up.bank().get() == down.bank().get());
  CHECK(c.up.adapter("default").bank().get() == up.bank().get());  // a copy shares it
  CHECK(up.rank() == 4);
  CHECK(up.topk() == 2);
  CHECK(up.num_vectors() == 32);
  CHECK(up.vector_length() == 16);
  CHECK(c.checkpoint.parameter_count() == 2944);  // PEFT's count: logits + the bank once
  for (auto& p : up.parameters()) {
    INFO(p.name);
    CHECK(p.trainable);
    CHECK(p.shared == (p.name == "vblora_vector_bank"));
  }
  // Changing the bank through one module changes what the other computes.
  const auto w = peft_test::load_base(c.base, "down");
  const auto x = c.ref_t("layer.down.input");
  const auto before = peft_test::run_forward(down, w, x);
  for (auto& p : up.parameters()) {
    if (p.name != "vblora_vector_bank") continue;
    for (peft::index i = 0; i < p.value.rows(); ++i)
      for (peft::index j = 0; j < p.value.cols(); ++j) p.value(i, j) = 0.0;
  }
  CHECK(peft_test::rel_error(peft_test::run_forward(down, w, x), peft_test::base_output(w, x)) < 1e-15);
  CHECK(peft_test::rel_error(before, peft_test::base_output(w, x)) > 1e-3);
}

TEST_CASE("vblora: save round trips in both forms", "[vblora][io]") {
  const auto dir = peft_test::scratch_path("peft_vblora_roundtrip");
  for (const std::string name : {"vblora", "vblora_topk_only"}) {
    INFO("case " << name);
    const bool topk = name == "vblora_topk_only";
    golden_case<double> c(name);
    fs::remove_all(dir);
    peft::io::save_peft_checkpoint(dir, c.checkpoint);
    const auto saved = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
    const auto original = peft::io::safetensors_file::open(peft_test::golden_dir(name) / "adapter" /
                                                           "adapter_model.safetensors");
    std::vector<std::string> names, expected;
    for (const auto& t : saved.tensors()) names.push_back(t.name);
    for (const auto& t : original.tensors()) expected.push_back(t.name);
    std::sort(names.begin(), names.end());
    std::sort(expected.begin(), expected.end());
    CHECK(names == expected);
    for (const auto& n : expected) {
      INFO(n);
      CHECK(saved.info(n).shape == original.info(n).shape);
      CHECK(saved.read<double>(n) == original.read<double>(n));  // f32 (indices: integers) in and out
    }
    const auto cfg = peft::io::adapter_config::load(dir);
    CHECK(cfg.peft_type == "VBLORA");
    CHECK(cfg.r == 4);
    CHECK(cfg.raw["topk"] == (topk ? 3 : 2));
    CHECK(cfg.raw["num_vectors"] == 32);
    CHECK(cfg.raw["vector_length"] == 16);
    CHECK(cfg.raw["save_only_topk_weights"] == topk);
    auto back = peft::io::load_checkpoint_as<peft::vblora<double>>(dir);
    CHECK(back.find("up.weight")->adapter.bank().get() == back.find("down.weight")->adapter.bank().get());
    for (const std::string layer : {"up", "down"}) {
      const auto w = peft_test::load_base(c.base, layer);
      const auto x = c.ref_t("layer." + layer + ".input");
      CHECK(peft_test::exactly_equal(peft_test::run_forward(back.find(layer + ".weight")->adapter, w, x),
                                     peft_test::run_forward(c.checkpoint.find(layer + ".weight")->adapter, w, x)));
    }
  }
  // The top-k form of a trained adapter: keep_only_topk, then save as PEFT does.
  {
    golden_case<double> c("vblora");
    c.checkpoint.config.raw["save_only_topk_weights"] = true;
    fs::remove_all(dir);
    const auto msg = peft_test::message_of([&] { peft::io::save_peft_checkpoint(dir, c.checkpoint); });
    CHECK(msg.rfind("[vblora::describe_in]", 0) == 0);
    CHECK(msg.find("keep_only_topk") != std::string::npos);
    for (auto& m : c.checkpoint.modules) m.adapter.keep_only_topk();
    peft::io::save_peft_checkpoint(dir, c.checkpoint);
    const auto saved = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
    CHECK(saved.info("base_model.model.up.vblora_logits_A_topk_indices").shape == std::vector<std::int64_t>{4, 4, 2});
    CHECK(saved.info("base_model.model.up.vblora_logits_A_topk_weights").shape == std::vector<std::int64_t>{4, 4, 1});
    auto back = peft::io::load_checkpoint_as<peft::vblora<double>>(dir);
    const auto w = peft_test::load_base(c.base, "up");
    const auto x = c.ref_t("layer.up.input");
    CHECK(peft_test::rel_error(peft_test::run_forward(back.find("up.weight")->adapter, w, x),
                               c.ref("layer.up.output")) < topk_tol);
  }
  fs::remove_all(dir);
}

TEST_CASE("vblora: malformed checkpoints and unsupported fields are rejected", "[vblora][errors][io]") {
  const auto dir = peft_test::scratch_path("peft_vblora_malformed");
  auto keep = [](auto&) {};
  auto load = [&] { peft::io::load_checkpoint_as<peft::vblora<double>>(dir); };
  SECTION("num_vectors disagrees with the bank") {
    rewrite_adapter("vblora", dir, [](auto& c) { c["num_vectors"] = 16; });
    CHECK_THROWS_AS(load(), peft::format_error);
    CHECK(peft_test::message_of(load).find("num_vectors = 16") != std::string::npos);
  }
  SECTION("r disagrees with the logits") {
    rewrite_adapter("vblora", dir, [](auto& c) { c["r"] = 8; });
    CHECK_THROWS_AS(load(), peft::format_error);
  }
  SECTION("topk larger than the bank") {
    rewrite_adapter("vblora", dir, [](auto& c) { c["topk"] = 33; });
    CHECK_THROWS_AS(load(), peft::format_error);
  }
  SECTION("logits whose last dimension is not num_vectors") {
    rewrite_adapter("vblora", dir, keep,
                    {{"base_model.model.up.vblora_logits_A", {{4, 4, 31}, std::vector<float>(4 * 4 * 31, 0.5f)}}});
    CHECK_THROWS_AS(load(), peft::format_error);
  }
  SECTION("logits saved while the config says save_only_topk_weights") {
    rewrite_adapter("vblora", dir, [](auto& c) { c["save_only_topk_weights"] = true; });
    CHECK_THROWS_AS(load(), peft::format_error);
    CHECK(peft_test::message_of(load).find("save_only_topk_weights is true") != std::string::npos);
  }
  SECTION("a top-k index outside the bank") {
    rewrite_adapter("vblora_topk_only", dir, keep,
                    {{"base_model.model.up.vblora_logits_A_topk_indices",
                      {{4, 4, 3}, std::vector<float>(4 * 4 * 3, 32.0f)}}});
    CHECK_THROWS_AS(load(), peft::shape_error);
    CHECK(peft_test::message_of(load).rfind("[vblora::from_topk]", 0) == 0);
  }
  SECTION("no vector bank") {
    rewrite_adapter("vblora", dir, keep, {}, {"base_model.vblora_vector_bank"});
    CHECK_THROWS_AS(load(), peft::format_error);
  }
  SECTION("bias other than none (base biases trained)") {
    rewrite_adapter("vblora", dir, [](auto& c) { c["bias"] = "all"; });
    CHECK_THROWS_AS(load(), peft::unsupported_error);
    CHECK(peft_test::message_of(load).find("'bias'") != std::string::npos);
  }
  SECTION("an unknown field with a non-default value") {
    rewrite_adapter("vblora", dir, [](auto& c) { c["vblora_future_option"] = 3; });
    CHECK_THROWS_AS(load(), peft::unsupported_error);
    CHECK(peft_test::message_of(load).rfind("[vblora::from_checkpoint]", 0) == 0);
  }
  SECTION("training-only fields are accepted") {
    rewrite_adapter("vblora", dir, [](auto& c) {
      c["vblora_dropout"] = 0.1;
      c["init_logits_std"] = 0.5;
      c["init_vector_bank_bound"] = 0.1;
    });
    CHECK_NOTHROW(load());
  }
  fs::remove_all(dir);
}

TEST_CASE("vblora: constructors and passes reject bad shapes", "[vblora][errors]") {
  using V = peft::vblora<double>;
  auto bank = peft::make_vblora_vector_bank<double>(8, 4, 0.02, 1);
  CHECK_THROWS_AS(V(6, 8, bank, {}), peft::shape_error);                 // 6 is not a multiple of 4
  CHECK_THROWS_AS(V(8, 8, bank, {.rank = 0}), peft::shape_error);
  CHECK_THROWS_AS(V(8, 8, bank, {.topk = 9}), peft::shape_error);        // more than the bank
  CHECK_THROWS_AS(V(8, 8, nullptr, {}), peft::shape_error);
  CHECK_THROWS_AS(V(bank, 2, 8, 8, 2, peft::matrix<double>(4, 8), peft::matrix<double>(3, 8)), peft::shape_error);
  CHECK_THROWS_AS(peft::make_vblora_vector_bank<double>(0, 4), peft::shape_error);
  CHECK_THROWS_WITH(V(bank, 2, 8, 8, 2, peft::matrix<double>(4, 7), peft::matrix<double>(4, 8)),
                    Catch::StartsWith("[vblora::vblora] vblora_logits_A is (4, 7)"));
  V a(8, 12, bank, {.rank = 2, .topk = 2, .seed = 3});
  CHECK(a.bank().get() == bank.get());
  CHECK(a.logits_A().rows() == 2 * 2);
  CHECK(a.logits_B().rows() == 3 * 2);
  peft::rng g(2);
  const peft::dense<double> w(peft_test::random_matrix<double>(12, 8, g));
  using peft_test::arg;
  using peft_test::pass;
  peft_test::check_shape_errors(a, w, 2,
                                {{pass::forward, arg::x, 2, 7},
                                 {pass::forward, arg::y, 2, 11},
                                 {pass::backward, arg::dx, 2, 9},
                                 {pass::delta_weight, arg::dw, 12, 7},
                                 {pass::forward, arg::base, 12, 4, "[vblora::forward] base weight is (12, 4)",
                                  peft_test::match::prefix}});
  peft_test::check_unset_rejected<V, peft::error>(w);
  CHECK(V{}.parameters().empty());
}

TEMPLATE_TEST_CASE("vblora: PEFT's initialisation and the exact delta", "[vblora][init]", float, double) {
  using T = TestType;
  peft::rng g(11);
  peft::vblora<T> a(32, 16, {.rank = 3, .topk = 2, .num_vectors = 64, .vector_length = 8, .seed = 5});
  const auto& bank = a.bank()->value;
  CHECK(peft_test::max_abs(bank) <= 0.02);
  CHECK(peft_test::max_abs(bank) > 0.018);
  // logits ~ N(0, 0.1^2): the sample standard deviation over 3 * 4 * 64 values.
  double s2 = 0.0;
  for (peft::index i = 0; i < a.logits_A().rows(); ++i)
    for (peft::index j = 0; j < a.logits_A().cols(); ++j) s2 += static_cast<double>(a.logits_A()(i, j)) * a.logits_A()(i, j);
  CHECK(std::abs(std::sqrt(s2 / static_cast<double>(a.logits_A().size())) - 0.1) < 0.01);
  // Not the identity: the delta is B A with both random, and forward, dx and delta agree with it.
  const auto [am, bm] = a.lora_matrices();
  const auto dw = peft_test::ref_nn(bm, am);
  REQUIRE(peft_test::max_abs(dw) > 1e-6);
  const auto w = peft_test::random_dense<T>(32, 16, g);
  const auto x = peft_test::random_matrix<T>(3, 32, g);
  const auto gy = peft_test::random_matrix<T>(3, 16, g);
  peft_test::check_against_delta(a, w, x, gy, dw, peft_test::tolerance<T>());
  // Each piece of A is a convex mixture of exactly topk bank vectors: here, row 0's first piece.
  const auto& l = a.logits_A();
  peft::index i1 = 0, i2 = 1;
  if (l(0, i2) > l(0, i1)) std::swap(i1, i2);
  for (peft::index v = 2; v < 64; ++v) {
    if (l(0, v) > l(0, i1)) {
      i2 = i1;
      i1 = v;
    } else if (l(0, v) > l(0, i2)) {
      i2 = v;
    }
  }
  const double e = std::exp(static_cast<double>(l(0, i2)) - static_cast<double>(l(0, i1)));
  for (peft::index k = 0; k < 8; ++k) {
    const double want = (static_cast<double>(bank(i1, k)) + e * static_cast<double>(bank(i2, k))) / (1.0 + e);
    CHECK(std::abs(static_cast<double>(am(0, k)) - want) < 1e-6);
  }
}

}  // namespace test_vblora
