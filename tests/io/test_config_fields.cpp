// adapter_config.json's rule: every field honoured, known not to change the outputs, or refused by
// name (io/peft/config_fields.hpp). Real PEFT checkpoints (tests/data/lm/llama/adapters, saved by
// PEFT 0.21) with one field changed at a time.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "peft/io/peft_checkpoint.hpp"
#include "support/file_support.hpp"

namespace test_config_fields {

namespace {

namespace fs = std::filesystem;
using peft::io::adapter_config;
using peft::io::ordered_json;
const fs::path adapters = fs::path(PEFT_TEST_DATA_DIR) / "lm" / "llama" / "adapters";

ordered_json config_of(const std::string& adapter) {
  return ordered_json::parse(peft_test::slurp(adapters / adapter / "adapter_config.json"));
}

/// Loads `adapter`'s tensors under config `j`; the unsupported_error's message, or "" when it loads.
std::string load_with(const std::string& adapter, const ordered_json& j) {
  const auto file = peft::io::safetensors_file::open(adapters / adapter / "adapter_model.safetensors");
  try {
    const auto ck = peft::io::load_peft_checkpoint<double>(adapter_config::parse(j.dump()), file);
    REQUIRE(!ck.modules.empty());
    return "";
  } catch (const peft::unsupported_error& e) {
    return e.what();
  }
}

}  // namespace

TEST_CASE("every config PEFT wrote for the test adapters loads: each field is honoured or harmless", "[io][config]") {
  for (const char* a : {"lora", "lora_all", "dora", "vera", "ia3", "loha"}) {
    INFO(a);
    CHECK(load_with(a, config_of(a)).empty());
  }
}

TEST_CASE("fields that change what an adapter computes are refused by name when set", "[io][config]") {
  struct refused {
    const char* field;
    ordered_json value;
    const char* says;
  };
  const refused cases[] = {
      {"layer_replication", ordered_json::parse("[[0, 2], [1, 2]]"), "replicated"},
      {"alora_invocation_tokens", ordered_json::parse("[12, 7]"), "aLoRA"},
      {"use_qalora", true, "QA-LoRA"},
      {"use_bdlora", ordered_json::parse(R"({"nblocks": 2})"), "BD-LoRA"},
      {"target_parameters", ordered_json::parse(R"(["mlp.experts.down_proj"])"), "ParamWrapper"},
      {"trainable_token_indices", ordered_json::parse("[5, 6]"), "trainable tokens"},
      {"megatron_config", ordered_json::parse(R"({"tensor_model_parallel_size": 2})"), "Megatron"},
      {"ensure_weight_tying", true, "tying"},
      {"velora_config", ordered_json::parse(R"({"rank": 4})"), "variant"},
      {"bias", "all", "biases"},
      {"bias", "lora_only", "biases"},
      {"init_lora_weights", "pissa", "residual base"},
      {"init_lora_weights", "pissa_niter_4", "residual base"},
      {"init_lora_weights", "olora", "residual base"},
      {"init_lora_weights", "corda", "residual base"},
      {"init_lora_weights", "loftq", "residual base"},
      {"init_lora_weights", "lora_ga", "residual base"},
      {"init_lora_weights", "made_up", "does not know"},
      {"a_field_of_a_newer_peft", 3, "does not implement"},
      {"a_field_of_a_newer_peft", "on", "does not implement"},
  };
  for (const char* a : {"lora", "dora"}) {
    for (const auto& c : cases) {
      INFO(a << ": " << c.field << " = " << c.value.dump());
      auto j = config_of(a);
      j[c.field] = c.value;
      const std::string msg = load_with(a, j);
      CHECK(msg.find(std::string("'") + c.field + "'") != std::string::npos);
      CHECK(msg.find(c.says) != std::string::npos);
      CHECK(msg.find("from_checkpoint") != std::string::npos);
    }
  }
  // Other methods' codecs apply the same rule: a LoRA-only field set on VeRA is not honoured.
  auto v = config_of("vera");
  v["use_rslora"] = true;
  CHECK(load_with("vera", v).find("'use_rslora'") != std::string::npos);
  auto i = config_of("ia3");
  i["layer_replication"] = ordered_json::parse("[[0, 1]]");
  CHECK(load_with("ia3", i).find("'layer_replication'") != std::string::npos);
}

TEST_CASE("default values, bookkeeping and initialisations that leave the base alone load", "[io][config]") {
  auto j = config_of("lora");
  j["layer_replication"] = nullptr;
  j["use_qalora"] = false;
  j["trainable_token_indices"] = ordered_json::array();
  j["a_field_of_a_newer_peft"] = nullptr;
  j["another_new_field"] = false;
  j["bias"] = "none";
  j["lora_dropout"] = 0.1;                      // training only
  j["loftq_config"] = ordered_json::parse(R"({"loftq_bits": 4})");  // used only with init "loftq"
  j["layers_to_transform"] = ordered_json::parse("[0, 1]");         // which modules: the tensors say
  j["peft_version"] = "0.99.0";
  for (const char* init : {"gaussian", "eva", "orthogonal"}) {
    INFO(init);
    j["init_lora_weights"] = init;
    CHECK(load_with("lora", j).empty());
  }
  j["init_lora_weights"] = false;
  CHECK(load_with("lora", j).empty());
}

}  // namespace test_config_fields
