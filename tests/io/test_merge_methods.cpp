// `merge_model` (what `peft merge` runs) against PEFT's merge_and_unload for every mergeable
// method in tests/data/peft: the merged up/down weights and biases, from the F32 base file.
#include <catch2/catch.hpp>

#include <filesystem>
#include <optional>
#include <string>

#include <fstream>
#include <nlohmann/json.hpp>

#include "peft/io/merge.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/file_support.hpp"
#include "support/test_support.hpp"

namespace test_merge_methods {

TEST_CASE("merge_model reproduces PEFT's merged weights for every PEFT method", "[merge][golden]") {
  namespace fs = std::filesystem;
  const fs::path data = fs::path(PEFT_TEST_DATA_DIR) / "peft";
  const std::string method = GENERATE(as<std::string>{}, "lora", "lora_rslora", "lora_bias", "lora_rank_pattern",
                                      "dora", "vera", "randlora", "shira", "lokr", "lokr_full", "loha", "adalora",
                                      "ia3", "vblora", "vblora_topk_only", "oft", "oft_neumann", "oft_block_share",
                                      "oft_coft", "hra", "hra_gs", "miss", "miss_bat", "miss_mini", "c3a", "c3a_b32",
                                      "gralora", "gralora_hybrid", "hira", "hira_r4", "fourierft", "fourierft_seed",
                                      "road_1", "road_2", "road_4", "delora", "delora_lambda",
                                      "boft", "boft_butterfly2", "beft", "pvera", "pvera_r4", "unilora", "waveft", "waveft_coif2", "waveft_direct",
                                      "tinylora", "tinylora_r4", "glora", "glora_vector",
                                      "glora_none", "deft_relu", "deft_relu_alpha", "deft_qr", "deft_qr_alpha",
                                      "deft_para_relu", "deft_para_qr", "deft_conv1d", "peanut_relu", "peanut_gelu_depth2",
                                      "peanut_tanh_gelu_depth1", "peanut_silu_depth3", "peanut_sigmoid",
                                      "peanut_tanh_depth2", "supertuning_super", "supertuning_bottom", "supertuning_supra",
                                      "supertuning_supra_alpha", "supertuning_full");
  INFO("case " << method);
  const fs::path out = peft_test::temp_path("peft_merge_methods_" + method + ".safetensors");
  const auto report = peft::io::merge_model(data / method / "base_model.safetensors", data / method / "adapter", out, {});
  CHECK(report.tensors == 4);
  const auto merged = peft::io::safetensors_file::open(out);
  const auto reference = peft::io::safetensors_file::open(data / method / "reference.safetensors");
  const auto base = peft::io::safetensors_file::open(data / method / "base_model.safetensors");
  for (const std::string t : {"up.weight", "down.weight", "up.bias", "down.bias"}) {
    INFO(t);
    const auto want = reference.read_matrix<double>("merged." + t);
    CHECK(peft_test::rel_error(merged.read_matrix<double>(t), want) < 1e-6);
    // The adapter really changed the weight (BEFT changes only the bias).
    if (t.ends_with(method == "beft" ? "bias" : "weight")) {
      CHECK(peft_test::rel_error(base.read_matrix<double>(t), want) > 1e-4);
    }
  }
  fs::remove(out);
}

TEST_CASE("every PEFT case loads with PEFT's trainable parameter count", "[golden][load]") {
  namespace fs = std::filesystem;
  const fs::path data = fs::path(PEFT_TEST_DATA_DIR) / "peft";
  const std::string method = GENERATE(as<std::string>{}, "lora", "lora_rslora", "lora_bias", "lora_rank_pattern",
                                      "dora", "vera", "randlora", "shira", "lokr", "lokr_full", "loha", "adalora",
                                      "ia3", "vblora", "oft", "oft_neumann", "oft_block_share", "oft_coft", "hra",
                                      "hra_gs", "miss", "miss_bat", "miss_mini", "c3a", "c3a_b32", "gralora",
                                      "gralora_hybrid", "hira", "hira_r4", "fourierft", "fourierft_seed",
                                      "road_1", "road_2", "road_4", "delora", "delora_lambda",
                                      "boft", "boft_butterfly2", "beft", "pvera", "pvera_r4", "unilora", "waveft", "waveft_coif2", "waveft_direct",
                                      "tinylora", "tinylora_r4", "glora", "glora_vector",
                                      "glora_none", "deft_relu", "deft_relu_alpha", "deft_qr", "deft_qr_alpha",
                                      "deft_para_relu", "deft_para_qr", "deft_conv1d", "peanut_relu", "peanut_gelu_depth2",
                                      "peanut_tanh_gelu_depth1", "peanut_silu_depth3", "peanut_sigmoid",
                                      "peanut_tanh_depth2", "supertuning_super", "supertuning_bottom", "supertuning_supra",
                                      "supertuning_supra_alpha", "supertuning_full");
  INFO("case " << method);
  std::ifstream in(data / method / "case.json");
  const auto expected = nlohmann::json::parse(in).at("trainable_parameters").get<std::size_t>();
  auto ck = peft::io::load_peft_checkpoint<double>(data / method / "adapter");
  CHECK(ck.modules.size() == 2);
  CHECK(ck.parameter_count() == expected);
}

// FRoD's cases have three adapted layers (layers.0.fc and layers.1.fc share one category's
// projection, head has its own), not up/down, and FRoD loads only with the base weights (U is
// recomputed from them): their own loop, with the base given to the loader.
TEST_CASE("merge_model reproduces PEFT's merged weights for FRoD; PEFT's parameter counts", "[merge][golden]") {
  namespace fs = std::filesystem;
  const fs::path data = fs::path(PEFT_TEST_DATA_DIR) / "peft";
  const std::string method =
      GENERATE(as<std::string>{}, "frod_basic", "frod_dense_s", "frod_default_rate", "frod_conv1d");
  INFO("case " << method);
  const fs::path out = peft_test::temp_path("peft_merge_methods_" + method + ".safetensors");
  const auto report = peft::io::merge_model(data / method / "base_model.safetensors", data / method / "adapter", out, {});
  CHECK(report.tensors == 6);
  const auto merged = peft::io::safetensors_file::open(out);
  const auto reference = peft::io::safetensors_file::open(data / method / "reference.safetensors");
  const auto base = peft::io::safetensors_file::open(data / method / "base_model.safetensors");
  for (const std::string l : {"layers.0.fc", "layers.1.fc", "head"}) {
    for (const std::string& t : {l + ".weight", l + ".bias"}) {
      INFO(t);
      const auto want = reference.read_matrix<double>("merged." + t);
      CHECK(peft_test::rel_error(merged.read_matrix<double>(t), want) < 1e-6);
      if (t.ends_with("weight")) CHECK(peft_test::rel_error(base.read_matrix<double>(t), want) > 1e-4);
    }
  }
  fs::remove(out);
  std::ifstream in(data / method / "case.json");
  const auto expected = nlohmann::json::parse(in).at("trainable_parameters").get<std::size_t>();
  const bool conv = method == "frod_conv1d";
  auto ck = peft::io::load_peft_checkpoint<double>(
      data / method / "adapter", {}, [&](const std::string& module) -> std::optional<peft::matrix<double>> {
        auto w = base.read_matrix<double>(module + ".weight");
        if (!conv) return w;
        peft::matrix<double> t(w.cols(), w.rows());
        for (peft::index i = 0; i < w.rows(); ++i)
          for (peft::index j = 0; j < w.cols(); ++j) t(j, i) = w(i, j);
        return t;
      });
  CHECK(ck.modules.size() == 3);
  CHECK(ck.parameter_count() == expected);
}

}  // namespace test_merge_methods
