// Parity with HuggingFace PEFT 0.21 on the LoRA-family golden cases (tests/data/peft/*):
// the two-layer MLP y = down(relu(up(x))), each layer adapted, in float and double.
// Per layer: output, dx and every parameter gradient; the whole network: y and dL/dx; merged
// weights through adapted_linear::merge and through the offline merge_model.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>

#include "peft/adapted_linear.hpp"
#include "peft/base/dense.hpp"
#include "peft/io/merge.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/test_support.hpp"

namespace {

namespace fs = std::filesystem;
using peft::index;
using peft_test::rel_error;

const fs::path data_dir = fs::path(PEFT_TEST_DATA_DIR) / "peft";

template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 1e-5;
}

template <class T>
using layer_t = peft::adapted_linear<peft::dense<float>, peft::lora<T>>;

/// The frozen layer `name` ("up", "down") of a case's base model, with its bias.
peft::dense<float> load_base(const peft::io::safetensors_file& f, const std::string& name) {
  auto w = f.read_matrix<float>(name + ".weight");
  return peft::dense<float>(std::move(w), f.read<float>(name + ".bias"));
}

template <class T>
peft::matrix<T> ref(const peft::io::safetensors_file& f, const std::string& name) {
  return f.read_matrix<T>(name);
}

template <class T>
struct golden_case {
  peft::io::safetensors_file base;
  peft::io::safetensors_file reference;
  peft::io::basic_peft_checkpoint<peft::lora<T>> checkpoint;
  layer_t<T> up;
  layer_t<T> down;

  explicit golden_case(const std::string& name, const std::string& adapter = "adapter")
      : base(peft::io::safetensors_file::open(data_dir / name / "base_model.safetensors")),
        reference(peft::io::safetensors_file::open(data_dir / name / "reference.safetensors")),
        checkpoint(peft::io::load_checkpoint_as<peft::lora<T>>(data_dir / name / adapter)),
        up(load_base(base, "up")),
        down(load_base(base, "down")) {
    REQUIRE(checkpoint.modules.size() == 2);
    up.add_adapter("default", checkpoint.find("up.weight")->adapter);
    down.add_adapter("default", checkpoint.find("down.weight")->adapter);
  }

  layer_t<T>& layer(const std::string& n) { return n == "up" ? up : down; }
};

template <class T>
void check_layers(golden_case<T>& c, double tol) {
  for (const std::string name : {"up", "down"}) {
    INFO("layer " << name);
    auto& layer = c.layer(name);
    const auto x = ref<T>(c.reference, "layer." + name + ".input");
    const auto g = ref<T>(c.reference, "layer." + name + ".grad_output");
    REQUIRE(peft_test::count_nonzero(x) > x.size() / 4);  // the down input is relu output
    REQUIRE(peft_test::count_nonzero(g) > g.size() / 4);  // after relu: about half are zero
    peft::matrix<T> y(x.rows(), layer.out_features());
    layer.forward(x, y);
    CHECK(rel_error(y, ref<double>(c.reference, "layer." + name + ".output")) < tol);
    peft::matrix<T> dx(x.rows(), layer.in_features());
    layer.zero_grad();
    layer.backward(x, g, dx);
    CHECK(rel_error(dx, ref<double>(c.reference, "layer." + name + ".grad_input")) < tol);
    auto& a = layer.adapter("default");
    const std::string key = "grad.base_model.model." + name;
    CHECK(rel_error(a.grad_A(), ref<double>(c.reference, key + ".lora_A.default.weight")) < tol);
    CHECK(rel_error(a.grad_B(), ref<double>(c.reference, key + ".lora_B.default.weight")) < tol);
    if (a.has_bias()) {
      CHECK(rel_error(a.grad_bias(), ref<double>(c.reference, key + ".lora_B.default.bias")) < tol);
    }
  }
}

template <class T>
void check_network(golden_case<T>& c, double tol) {
  const auto x = ref<T>(c.reference, "x");
  const auto gy = ref<T>(c.reference, "grad_y");
  peft::matrix<T> h(x.rows(), c.up.out_features()), a(h.rows(), h.cols()), y(x.rows(), c.down.out_features());
  c.up.forward(x, h);
  for (peft::index i = 0; i < h.rows(); ++i)
    for (peft::index j = 0; j < h.cols(); ++j) a(i, j) = h(i, j) > 0 ? h(i, j) : T{0};
  c.down.forward(a, y);
  CHECK(rel_error(y, ref<double>(c.reference, "y")) < tol);
  peft::matrix<T> da(a.rows(), a.cols()), dx(x.rows(), x.cols());
  c.up.zero_grad();
  c.down.zero_grad();
  c.down.backward(a, gy, da);
  for (peft::index i = 0; i < da.rows(); ++i)
    for (peft::index j = 0; j < da.cols(); ++j) da(i, j) = h(i, j) > 0 ? da(i, j) : T{0};
  c.up.backward(x, da, dx);
  CHECK(rel_error(dx, ref<double>(c.reference, "grad_x")) < tol);
  CHECK(rel_error(c.up.adapter("default").grad_A(),
                  ref<double>(c.reference, "grad.base_model.model.up.lora_A.default.weight")) < tol);
  CHECK(rel_error(c.down.adapter("default").grad_B(),
                  ref<double>(c.reference, "grad.base_model.model.down.lora_B.default.weight")) < tol);
}

template <class T>
void check_merge(golden_case<T>& c) {
  // adapted_linear::merge into an f32 base: the reference is exact in double, the result is
  // rounded to f32 storage, so 1e-6 is the fair bound in both compute types.
  for (const std::string name : {"up", "down"}) {
    auto& layer = c.layer(name);
    layer.merge("default");
    CHECK(rel_error(layer.base().weight(), ref<double>(c.reference, "merged." + name + ".weight")) < 1e-6);
    const peft::matrix<float> b(1, layer.out_features(), layer.base().bias());
    const peft::matrix<double> rb(1, layer.out_features(), c.reference.template read<double>("merged." + name + ".bias"));
    CHECK(rel_error(b, rb) < 1e-6);
  }
}

void check_offline_merge(const std::string& name, const std::string& adapter, double tol = 1e-6) {
  const auto out_dir = fs::temp_directory_path() / ("peft_golden_merge_" + name);
  fs::create_directories(out_dir);
  const auto out = out_dir / "merged.safetensors";
  const auto report = peft::io::merge_model(data_dir / name / "base_model.safetensors", data_dir / name / adapter, out, {});
  CHECK(report.tensors == 4);
  const auto merged = peft::io::safetensors_file::open(out);
  const auto reference = peft::io::safetensors_file::open(data_dir / name / "reference.safetensors");
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
  INFO("case " << name);
  const double tol = tolerance<TestType>();
  {
    golden_case<TestType> c(name);
    check_layers(c, tol);
  }
  {
    golden_case<TestType> c(name);
    check_network(c, tol);
  }
  {
    golden_case<TestType> c(name);
    check_merge(c);
  }
}

TEST_CASE("PEFT golden LoRA cases: offline merge_model reproduces merge_and_unload", "[golden][lora][merge]") {
  for (const std::string name : {"lora", "lora_rslora", "lora_bias", "lora_rank_pattern"}) {
    INFO("case " << name);
    check_offline_merge(name, "adapter");
  }
}

TEST_CASE("PEFT golden: config fields behind each case are read as PEFT reads them", "[golden][lora]") {
  auto rsl = peft::io::load_checkpoint_as<peft::lora<double>>(data_dir / "lora_rslora" / "adapter");
  CHECK(rsl.config.use_rslora);
  CHECK(rsl.find("up.weight")->adapter.scale() == Approx(16.0 / std::sqrt(8.0)).epsilon(1e-15));
  auto rp = peft::io::load_checkpoint_as<peft::lora<double>>(data_dir / "lora_rank_pattern" / "adapter");
  CHECK(rp.find("up.weight")->adapter.rank() == 8);
  CHECK(rp.find("down.weight")->adapter.rank() == 4);
  CHECK(rp.find("up.weight")->adapter.scale() == 2.0);
  CHECK(rp.find("down.weight")->adapter.scale() == 8.0);  // alpha_pattern 32 / rank_pattern 4
  auto bias = peft::io::load_checkpoint_as<peft::lora<double>>(data_dir / "lora_bias" / "adapter");
  CHECK(bias.find("up.weight")->adapter.has_bias());
}

TEMPLATE_TEST_CASE("PEFT golden: the BF16-saved adapter loads as the F32 one rounded", "[golden][lora][bf16]", float,
                   double) {
  auto f32 = peft::io::load_checkpoint_as<peft::lora<TestType>>(data_dir / "lora" / "adapter");
  auto b16 = peft::io::load_checkpoint_as<peft::lora<TestType>>(data_dir / "lora" / "adapter_bf16");
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
  const auto x = ref<TestType>(c.reference, "layer.up.input");
  peft::matrix<TestType> y(x.rows(), c.up.out_features());
  c.up.forward(x, y);
  const double err = rel_error(y, ref<double>(c.reference, "layer.up.output"));
  CHECK(err < 1e-2);
  CHECK(err > 1e-7);  // the BF16 values really are different numbers
  check_offline_merge("lora", "adapter_bf16", 1e-2);
}
