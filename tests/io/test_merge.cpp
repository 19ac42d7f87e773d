// merge_model on real model files: the tiny Llama of tests/data/models/llama_lora (saved by
// transformers, PEFT LoRA on q_proj/v_proj) and variants made from it here: sharded bases,
// BF16/F16 bases, fan_in_fan_out (Conv1D layout), target_modules as a regex or "all-linear",
// rank/alpha patterns keyed by module paths, output dtype conversion.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>

#include "peft/io/merge.hpp"
#include "peft/io/safetensors.hpp"
#include "support/file_support.hpp"
#include "support/test_support.hpp"

namespace test_merge {

namespace {

namespace fs = std::filesystem;
using peft::index;
using peft_test::rel_error;

const fs::path llama = fs::path(PEFT_TEST_DATA_DIR) / "models" / "llama_lora";

struct scratch {
  fs::path dir;
  explicit scratch(const std::string& name) : dir(peft_test::temp_path("peft_merge_" + name)) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~scratch() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

const std::vector<std::string> changed = {
    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
    "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"};

bool is_changed(const std::string& n) { return std::find(changed.begin(), changed.end(), n) != changed.end(); }

/// Every tensor of `out` against the F64 reference: merged ones within `tol_merged`, the others
/// within `tol_copied` (0 = bit-exact after widening), dtypes as `expect_dtype` (nullopt: F32).
void check_against_reference(const fs::path& out, double tol_merged, double tol_copied,
                             peft::dtype expect_dtype = peft::dtype::f32, bool transposed = false) {
  const auto merged = peft::io::safetensors_file::open(out);
  const auto reference = peft::io::safetensors_file::open(llama / "reference.safetensors");
  REQUIRE(merged.tensors().size() == reference.tensors().size());
  for (const auto& t : reference.tensors()) {
    INFO(t.name);
    REQUIRE(merged.contains(t.name));
    CHECK(merged.info(t.name).type == expect_dtype);
    auto got = merged.read_matrix<double>(t.name);
    auto want = reference.read_matrix<double>(t.name);
    if (transposed && t.shape.size() == 2 && is_changed(t.name)) {
      peft::matrix<double> back(got.cols(), got.rows());
      for (peft::index i = 0; i < got.rows(); ++i)
        for (peft::index j = 0; j < got.cols(); ++j) back(j, i) = got(i, j);
      got = std::move(back);
    }
    const double err = rel_error(got, want);
    if (is_changed(t.name)) {
      CHECK(err < tol_merged);
    } else if (tol_copied == 0.0) {
      CHECK(peft_test::exactly_equal(got, want));
    } else {
      CHECK(err < tol_copied);
    }
  }
}

/// Rewrites the llama base with every floating tensor stored as `type`, or with the four
/// targeted weights transposed (Conv1D layout), or split into shards with an index.
void rewrite_base(const fs::path& out, std::optional<peft::dtype> type, bool transpose_targets) {
  const auto base = peft::io::safetensors_file::open(llama / "base" / "model.safetensors");
  peft::io::safetensors_writer w;
  w.set_metadata(base.metadata());
  for (const auto& t : base.tensors()) {
    auto v = base.read<double>(t.name);
    auto shape = t.shape;
    if (transpose_targets && is_changed(t.name)) {
      const auto r = static_cast<std::size_t>(shape[0]), c = static_cast<std::size_t>(shape[1]);
      std::vector<double> tv(v.size());
      for (std::size_t i = 0; i < r; ++i)
        for (std::size_t j = 0; j < c; ++j) tv[j * r + i] = v[i * c + j];
      v = std::move(tv);
      std::swap(shape[0], shape[1]);
    }
    w.add<double>(t.name, shape, std::span<const double>(v), type.value_or(t.type));
  }
  w.write(out);
}

void copy_adapter_with(const fs::path& dst, const std::function<void(nlohmann::ordered_json&)>& edit) {
  fs::create_directories(dst);
  fs::copy_file(llama / "adapter" / "adapter_model.safetensors", dst / "adapter_model.safetensors",
                fs::copy_options::overwrite_existing);
  std::ifstream in(llama / "adapter" / "adapter_config.json");
  auto j = nlohmann::ordered_json::parse(in);
  edit(j);
  std::ofstream(dst / "adapter_config.json") << j.dump(2);
}

}  // namespace

TEST_CASE("merge_model reproduces PEFT's merge_and_unload on a real Llama checkpoint", "[merge][llama]") {
  scratch s("llama");
  const auto report = peft::io::merge_model(llama / "base", llama / "adapter", s.dir / "out.safetensors", {});
  CHECK(report.tensors == 21);
  CHECK(report.merged == changed);
  check_against_reference(s.dir / "out.safetensors", 1e-6, 0.0);
  const auto merged = peft::io::safetensors_file::open(s.dir / "out.safetensors");
  CHECK(merged.metadata().at("format") == "pt");
}

TEST_CASE("merge_model converts the output dtype", "[merge][llama]") {
  scratch s("dtype");
  for (auto [type, tol] : {std::pair{peft::dtype::bf16, 8e-3}, std::pair{peft::dtype::f16, 1e-3}}) {
    const auto out = s.dir / "out.safetensors";
    peft::io::merge_model(llama / "base" / "model.safetensors", llama / "adapter", out, {.out_dtype = type});
    check_against_reference(out, tol, tol, type);
  }
}

TEST_CASE("merge_model reads BF16 and F16 bases and keeps their dtype", "[merge][llama]") {
  scratch s("half");
  for (auto [type, tol] : {std::pair{peft::dtype::bf16, 8e-3}, std::pair{peft::dtype::f16, 1e-3}}) {
    rewrite_base(s.dir / "base.safetensors", type, false);
    peft::io::merge_model(s.dir / "base.safetensors", llama / "adapter", s.dir / "out.safetensors", {});
    check_against_reference(s.dir / "out.safetensors", tol, tol, type);
  }
}

TEST_CASE("merge_model handles sharded bases through model.safetensors.index.json", "[merge][llama]") {
  scratch s("sharded");
  const auto base = peft::io::safetensors_file::open(llama / "base" / "model.safetensors");
  peft::io::safetensors_writer w1, w2;
  nlohmann::ordered_json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::ordered_json::object()}};
  std::size_t k = 0;
  for (const auto& t : base.tensors()) {
    auto& w = (k++ % 2 == 0) ? w1 : w2;
    w.add(t.name, t.type, t.shape, base.bytes(t.name));
    index["weight_map"][t.name] = (&w == &w1) ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  w1.write(s.dir / "model-00001-of-00002.safetensors");
  w2.write(s.dir / "model-00002-of-00002.safetensors");
  std::ofstream(s.dir / "model.safetensors.index.json") << index.dump(2);
  const auto report = peft::io::merge_model(s.dir, llama / "adapter", s.dir / "out.safetensors", {});
  CHECK(report.tensors == 21);
  check_against_reference(s.dir / "out.safetensors", 1e-6, 0.0);
}

TEST_CASE("merge_model applies fan_in_fan_out deltas to (in, out) weights", "[merge][llama]") {
  scratch s("fan_in_fan_out");
  rewrite_base(s.dir / "base.safetensors", std::nullopt, true);
  copy_adapter_with(s.dir / "adapter", [](auto& j) { j["fan_in_fan_out"] = true; });
  peft::io::merge_model(s.dir / "base.safetensors", s.dir / "adapter", s.dir / "out.safetensors", {});
  check_against_reference(s.dir / "out.safetensors", 1e-6, 0.0, peft::dtype::f32, true);
  // Without the flag (and no config.json naming the architecture) the shapes still tell the
  // non-square v_proj weights' layout, as PEFT would know it from the module type; a square
  // weight (q_proj) can only follow the flag.
  peft::io::merge_model(s.dir / "base.safetensors", llama / "adapter", s.dir / "noflag.safetensors", {});
  const auto got = peft::io::safetensors_file::open(s.dir / "noflag.safetensors");
  const auto want = peft::io::safetensors_file::open(s.dir / "out.safetensors");
  for (const char* v : {"model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.v_proj.weight"}) {
    INFO(v);
    CHECK(peft_test::exactly_equal(got.read_matrix<double>(v), want.read_matrix<double>(v)));
  }
}

TEST_CASE("merge_model decides fan_in_fan_out per module type as PEFT does (GPT-2's Conv1D)", "[merge][gpt2]") {
  // PEFT sets fan_in_fan_out to true for every Conv1D module and to false for every nn.Linear,
  // whatever the config says (and saves the flag of the last module it wrapped). Reference:
  // PEFT's merge_and_unload of tests/data/lm/gpt2/adapters/lora (c_attn, c_proj, c_fc; 32x32
  // attn.c_proj is square), in float64.
  const fs::path gpt2 = fs::path(PEFT_TEST_DATA_DIR) / "lm" / "gpt2";
  const auto reference = peft::io::safetensors_file::open(gpt2 / "adapters" / "lora.merged.safetensors");
  const auto base = peft::io::safetensors_file::open(gpt2 / "model.safetensors");
  scratch s("gpt2_fan_in_fan_out");
  fs::create_directories(s.dir / "adapter");
  fs::copy_file(gpt2 / "adapters" / "lora" / "adapter_model.safetensors", s.dir / "adapter" / "adapter_model.safetensors");
  std::ifstream in(gpt2 / "adapters" / "lora" / "adapter_config.json");
  auto j = nlohmann::ordered_json::parse(in);
  REQUIRE(j["fan_in_fan_out"] == true);
  j["fan_in_fan_out"] = false;  // as PEFT saves it when the last module it wrapped was an nn.Linear
  std::ofstream(s.dir / "adapter" / "adapter_config.json") << j.dump(2);
  for (const auto& adapter : {gpt2 / "adapters" / "lora", s.dir / "adapter"}) {
    INFO(adapter);
    const auto out = s.dir / "merged.safetensors";
    peft::io::merge_model(gpt2, adapter, out, {});  // the directory: config.json says gpt2
    const auto merged = peft::io::safetensors_file::open(out);
    std::size_t checked = 0;
    for (const auto& t : reference.tensors()) {
      const std::string name = t.name.substr(std::string("merged.").size());
      INFO(name);
      const auto want = reference.read_matrix<double>(t.name);
      CHECK(rel_error(merged.read_matrix<double>(name), want) < 1e-6);
      CHECK(rel_error(base.read_matrix<double>(name), want) > 1e-4);  // the adapter changed it
      ++checked;
    }
    CHECK(checked == 8);
  }
}

TEST_CASE("merge_model accepts target_modules as a regex or all-linear", "[merge][llama]") {
  scratch s("targets");
  for (const auto& targets : {nlohmann::ordered_json(".*\\.(q_proj|v_proj)"), nlohmann::ordered_json("all-linear")}) {
    copy_adapter_with(s.dir / "adapter", [&](auto& j) { j["target_modules"] = targets; });
    const auto cfg = peft::io::adapter_config::load(s.dir / "adapter");
    CHECK(cfg.targets("model.layers.1.self_attn.q_proj"));
    peft::io::merge_model(llama / "base", s.dir / "adapter", s.dir / "out.safetensors", {});
    check_against_reference(s.dir / "out.safetensors", 1e-6, 0.0);
  }
}

TEST_CASE("merge_model honours alpha patterns keyed by module paths", "[merge][llama]") {
  scratch s("patterns");
  // Doubling alpha for layer 0's q_proj doubles its delta and leaves the others alone.
  copy_adapter_with(s.dir / "adapter", [](auto& j) { j["alpha_pattern"] = {{"model.layers.0.self_attn.q_proj", 32}}; });
  peft::io::merge_model(llama / "base", s.dir / "adapter", s.dir / "out.safetensors", {});
  const auto out = peft::io::safetensors_file::open(s.dir / "out.safetensors");
  const auto reference = peft::io::safetensors_file::open(llama / "reference.safetensors");
  const auto base = peft::io::safetensors_file::open(llama / "base" / "model.safetensors");
  for (const auto& name : changed) {
    const auto got = out.read_matrix<double>(name), want = reference.read_matrix<double>(name),
               w0 = base.read_matrix<double>(name);
    peft::matrix<double> expect(w0.rows(), w0.cols());
    const double factor = name == changed[0] ? 2.0 : 1.0;
    for (peft::index i = 0; i < w0.rows(); ++i)
      for (peft::index j = 0; j < w0.cols(); ++j) expect(i, j) = w0(i, j) + factor * (want(i, j) - w0(i, j));
    INFO(name);
    CHECK(rel_error(got, expect) < 1e-6);
  }
}

TEST_CASE("merge_model rejects bad input before writing anything", "[merge][errors]") {
  scratch s("errors");
  const auto out = s.dir / "out.safetensors";
  std::ofstream(out) << "previous contents";
  auto untouched = [&] {
    std::ifstream in(out);
    std::string text((std::istreambuf_iterator<char>(in)), {});
    return text == "previous contents";
  };
  // An adapter for another model: shapes do not match.
  const fs::path other = fs::path(PEFT_TEST_DATA_DIR) / "peft" / "lora" / "adapter";
  CHECK_THROWS_AS(peft::io::merge_model(llama / "base", other, out, {}), peft::format_error);
  CHECK(untouched());
  // A missing adapter directory.
  CHECK_THROWS_AS(peft::io::merge_model(llama / "base", s.dir / "nope", out, {}), peft::io_error);
  CHECK(untouched());
  // A truncated base file.
  {
    std::ifstream in(llama / "base" / "model.safetensors", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(s.dir / "truncated.safetensors", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  CHECK_THROWS_AS(peft::io::merge_model(s.dir / "truncated.safetensors", llama / "adapter", out, {}), peft::format_error);
  CHECK(untouched());
  // A method not supported yet.
  copy_adapter_with(s.dir / "prefix", [](auto& j) { j["peft_type"] = "PREFIX_TUNING"; });
  CHECK_THROWS_AS(peft::io::merge_model(llama / "base", s.dir / "prefix", out, {}), peft::unsupported_error);
  CHECK(untouched());
  // A rank the config contradicts.
  copy_adapter_with(s.dir / "rank", [](auto& j) { j["r"] = 4; });
  CHECK_THROWS_WITH(peft::io::merge_model(llama / "base", s.dir / "rank", out, {}),
                    Catch::Contains("[lora::from_checkpoint]") && Catch::Contains("rank 8"));
  CHECK(untouched());
  // No temporary files left behind.
  for (const auto& e : fs::directory_iterator(s.dir)) {
    CHECK(e.path().filename().string().find(".tmp") == std::string::npos);
  }
}

}  // namespace test_merge
