// Parity with HuggingFace PEFT 0.21 on the LoRA-family golden cases (tests/data/peft/*):
// the two-layer MLP y = down(relu(up(x))), each layer adapted, in float and double.
// Per layer: output, dx and every parameter gradient; the whole network: y and dL/dx; merged
// weights through adapted_linear::merge and through the offline merge_model.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>

#include "peft/layer/adapted_linear.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/merge.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace test_peft_golden {

namespace {

namespace fs = std::filesystem;
using peft_test::golden_dir;
using peft_test::rel_error;

template <class T>
using golden_case = peft_test::golden_case<peft::lora<T>>;

/// Each layer alone: output, dx, and the gradients of lora_A, lora_B and (if any) the bias.
template <class T>
void check_lora_layers(golden_case<T>& c, double tol) {
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    const auto r = peft_test::run_layer(c, name);
    CHECK(rel_error(r.y, c.ref("layer." + name + ".output")) < tol);
    CHECK(rel_error(r.dx, c.ref("layer." + name + ".grad_input")) < tol);
    auto& a = c.layer(name).adapter("default");
    const std::string key = "grad.base_model.model." + name;
    CHECK(rel_error(a.grad_A(), c.ref(key + ".lora_A.default.weight")) < tol);
    CHECK(rel_error(a.grad_B(), c.ref(key + ".lora_B.default.weight")) < tol);
    if (a.has_bias()) {
      CHECK(rel_error(a.grad_bias(), c.ref(key + ".lora_B.default.bias")) < tol);
    }
  }
}

/// The network's y and dL/dx, and the gradients of up's lora_A and down's lora_B.
template <class T>
void check_lora_network(golden_case<T>& c, double tol) {
  const auto r = peft_test::run_network(c, c.ref_t("x"), c.ref_t("grad_y"));
  CHECK(rel_error(r.y, c.ref("y")) < tol);
  CHECK(rel_error(r.dx, c.ref("grad_x")) < tol);
  CHECK(rel_error(c.up.adapter("default").grad_A(), c.ref("grad.base_model.model.up.lora_A.default.weight")) < tol);
  CHECK(rel_error(c.down.adapter("default").grad_B(), c.ref("grad.base_model.model.down.lora_B.default.weight")) < tol);
}

/// adapted_linear::merge into an f32 base: the reference is exact in double, the result is
/// rounded to f32 storage, so 1e-6 is the fair bound in both compute types.
template <class T>
void check_lora_merge(golden_case<T>& c) {
  for (const std::string name : {"up", "down"}) peft_test::check_merged_base(c, name, 1e-6);
}

void check_offline_merge(const std::string& name, const std::string& adapter, double tol = 1e-6) {
  const auto out_dir = peft_test::temp_path("peft_golden_merge_" + name);
  fs::create_directories(out_dir);
  const auto out = out_dir / "merged.safetensors";
  const auto report = peft::io::merge_model(golden_dir(name) / "base_model.safetensors", golden_dir(name) / adapter, out, {});
  CHECK(report.tensors == 4);
  const auto merged = peft::io::safetensors_file::open(out);
  const auto reference = peft::io::safetensors_file::open(golden_dir(name) / "reference.safetensors");
  for (const std::string t : {"up.weight", "down.weight", "up.bias", "down.bias"}) {
    INFO(t);
    CHECK(merged.info(t).type == peft::dtype::f32);
    CHECK(rel_error(merged.read_matrix<double>(t), reference.read_matrix<double>("merged." + t)) < tol);
  }
  fs::remove_all(out_dir);
}

}  // namespace

TEMPLATE_TEST_CASE("PEFT golden LoRA cases: layers, network, merge", "[golden][lora]", float, double) {
  const std::string name = GENERATE(as<std::string>{}, "lora", "lora_rslora", "lora_bias", "lora_rank_pattern");
  peft_test::check_golden<peft::lora<TestType>>(name, check_lora_layers<TestType>, check_lora_network<TestType>,
                                                check_lora_merge<TestType>);
}

TEST_CASE("PEFT golden LoRA cases: offline merge_model reproduces merge_and_unload", "[golden][lora][merge]") {
  for (const std::string name : {"lora", "lora_rslora", "lora_bias", "lora_rank_pattern"}) {
    INFO("case " << name);
    check_offline_merge(name, "adapter");
  }
}

TEST_CASE("PEFT golden: config fields behind each case are read as PEFT reads them", "[golden][lora]") {
  auto rsl = peft::io::load_checkpoint_as<peft::lora<double>>(golden_dir("lora_rslora") / "adapter");
  CHECK(rsl.config.use_rslora);
  CHECK(rsl.find("up.weight")->adapter.scale() == Approx(16.0 / std::sqrt(8.0)).epsilon(1e-15));
  auto rp = peft::io::load_checkpoint_as<peft::lora<double>>(golden_dir("lora_rank_pattern") / "adapter");
  CHECK(rp.find("up.weight")->adapter.rank() == 8);
  CHECK(rp.find("down.weight")->adapter.rank() == 4);
  CHECK(rp.find("up.weight")->adapter.scale() == 2.0);
  CHECK(rp.find("down.weight")->adapter.scale() == 8.0);  // alpha_pattern 32 / rank_pattern 4
  auto bias = peft::io::load_checkpoint_as<peft::lora<double>>(golden_dir("lora_bias") / "adapter");
  CHECK(bias.find("up.weight")->adapter.has_bias());
}

TEMPLATE_TEST_CASE("PEFT golden: the BF16-saved adapter loads as the F32 one rounded", "[golden][lora][bf16]", float,
                   double) {
  auto f32 = peft::io::load_checkpoint_as<peft::lora<TestType>>(golden_dir("lora") / "adapter");
  auto b16 = peft::io::load_checkpoint_as<peft::lora<TestType>>(golden_dir("lora") / "adapter_bf16");
  CHECK(b16.stored_dtype == peft::dtype::bf16);
  for (const std::string w : {"up.weight", "down.weight"}) {
    const auto& a = f32.find(w)->adapter;
    const auto& b = b16.find(w)->adapter;
    REQUIRE(b.rank() == a.rank());
    bool all_rounded = true, some_differ = false;
    for (peft::index i = 0; i < a.A().rows(); ++i) {
      for (peft::index j = 0; j < a.A().cols(); ++j) {
        const auto rounded = static_cast<float>(peft::bf16(static_cast<float>(a.A()(i, j))));
        all_rounded = all_rounded && static_cast<float>(b.A()(i, j)) == rounded;
        some_differ = some_differ || b.A()(i, j) != a.A()(i, j);
      }
    }
    CHECK(all_rounded);
    CHECK(some_differ);
  }
  // Outputs stay within bf16's rounding of the F32 reference (relative 2^-8 per factor).
  golden_case<TestType> c("lora", "adapter_bf16");
  const auto x = c.ref_t("layer.up.input");
  peft::matrix<TestType> y(x.rows(), c.up.out_features());
  c.up.forward(x, y);
  const double err = rel_error(y, c.ref("layer.up.output"));
  CHECK(err < 1e-2);
  CHECK(err > 1e-7);  // the BF16 values really are different numbers
  check_offline_merge("lora", "adapter_bf16", 1e-2);
}

TEST_CASE("PEFT golden: a BF16 adapter is re-saved as BF16, bit for bit", "[golden][lora][bf16]") {
  const auto src = golden_dir("lora") / "adapter_bf16";
  auto ck = peft::io::load_checkpoint_as<peft::lora<float>>(src);
  const auto dir = peft_test::scratch_path("peft_golden_bf16_resave");
  peft::io::save_peft_checkpoint(dir, ck);
  const auto in = peft::io::safetensors_file::open(src / "adapter_model.safetensors");
  const auto out = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
  REQUIRE(out.tensors().size() == in.tensors().size());
  for (const auto& t : in.tensors()) {
    INFO(t.name);
    REQUIRE(t.type == peft::dtype::bf16);
    CHECK(out.info(t.name).type == peft::dtype::bf16);
    const auto a = in.bytes(t.name), b = out.bytes(t.name);
    CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
  }
  // An explicit dtype still wins.
  peft::io::save_peft_checkpoint(dir, ck, peft::dtype::f32);
  CHECK(peft::io::safetensors_file::open(dir / "adapter_model.safetensors").info("base_model.model.up.lora_A.weight").type ==
        peft::dtype::f32);
  std::filesystem::remove_all(dir);
}

}  // namespace test_peft_golden
