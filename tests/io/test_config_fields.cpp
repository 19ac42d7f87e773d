// adapter_config.json's rule: every field honoured, known not to change the outputs, or refused by
// name (io/peft/config_fields.hpp). Real PEFT checkpoints (tests/data/lm/llama/adapters, saved by
// PEFT 0.21) with one field changed at a time.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

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

      {"target_parameters", ordered_json::parse(R"(["mlp.experts.down_proj"])"), "ParamWrapper"},
      {"trainable_token_indices", ordered_json::parse("[5, 6]"), "trainable tokens"},
      {"megatron_config", ordered_json::parse(R"({"tensor_model_parallel_size": 2})"), "Megatron"},
      {"ensure_weight_tying", true, "tying"},
      {"arrow_config", ordered_json::parse(R"({"top_k": 2})"), "variant"},
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
      if (std::string(a) == "lora" && std::string(c.field) == "trainable_token_indices") {
        // Honoured by plain LoRA (io/embedding_adapters.hpp); without a trainable_tokens_delta
        // tensor the rows keep the base's values, as PEFT initialises them.
        CHECK(msg.empty());
        continue;
      }
      CHECK(msg.find(std::string("'") + c.field + "'") != std::string::npos);
      CHECK(msg.find(c.says) != std::string::npos);
      CHECK(msg.find("from_checkpoint") != std::string::npos);
    }
  }
  // The variants plain LoRA's codec honours (tests/io/test_lora_variants.cpp) are refused with DoRA.
  for (const auto& [field, value, says] : {std::tuple{"use_bdlora", ordered_json::parse(R"({"nblocks": 2})"), "BD-LoRA"},
                                           std::tuple{"velora_config", ordered_json::parse(R"({"num_groups": 4})"), "variant"},
                                           std::tuple{"kasa_config", ordered_json::parse(R"({"beta": 0.1})"), "variant"}}) {
    INFO(field);
    auto j = config_of("dora");
    j[field] = value;
    const std::string msg = load_with("dora", j);
    CHECK(msg.find(std::string("'") + field + "'") != std::string::npos);
    CHECK(msg.find(says) != std::string::npos);
  }
  // Other methods' codecs apply the same rule: a LoRA-only field set on VeRA is not honoured.
  auto v = config_of("vera");
  v["use_rslora"] = true;
  CHECK(load_with("vera", v).find("'use_rslora'") != std::string::npos);
  auto i = config_of("ia3");
  i["layer_replication"] = ordered_json::parse("[[0, 1]]");
  CHECK(load_with("ia3", i).find("'layer_replication'") != std::string::npos);
}

TEST_CASE("PEFT methods no codec reads are refused naming the peft_type, with the reason where there is one",
          "[io][config]") {
  for (const auto& [type, says] : {std::pair{"PSOFT", "singular vectors"}, std::pair{"PREFIX_TUNING", "prompt-learning"},
                                   std::pair{"XLORA", "routes"}, std::pair{"LN_TUNING", "layer norms"},
                                   std::pair{"LILY", "other sequences of its batch"},
                                   std::pair{"SHADOW", "second, smaller transformer"},
                                   std::pair{"ADAMSS", "scatter_index"},
                                   std::pair{"NOT_A_PEFT_METHOD", "is not supported (methods: "}}) {
    INFO(type);
    auto j = config_of("lora");
    j["peft_type"] = type;
    const std::string msg = load_with("lora", j);
    CHECK(msg.find(std::string("peft_type '") + type + "'") != std::string::npos);
    CHECK(msg.find(says) != std::string::npos);
  }
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
  for (const char* init : {"gaussian", "eva", "orthogonal", "mica"}) {
    INFO(init);
    j["init_lora_weights"] = init;
    CHECK(load_with("lora", j).empty());
  }
  j["init_lora_weights"] = false;
  CHECK(load_with("lora", j).empty());
}

TEST_CASE("module selection: target_modules, exclude_modules, layers_to_transform and layers_pattern as PEFT decides",
          "[io][config]") {
  // Expected: PEFT 0.21's check_target_module_exists on these keys (1 selected, 0 not, x excluded).
  const std::vector<std::string> keys = {"model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.q_proj",
                                         "model.layers.12.mlp.down_proj",   "transformer.h.2.attn.c_attn",
                                         "h.2.attn.c_attn",                 "model.layers.1.mlp.experts.0.up_proj",
                                         "model.decoder.blocks.4.fc1",      "q_proj"};
  const char* names = R"(["q_proj", "down_proj", "c_attn", "up_proj", "fc1"])";
  struct rule {
    std::string config;
    std::string want;
  };
  const rule rules[] = {
      {std::string(R"({"target_modules": )") + names + R"(, "layers_to_transform": [0, 1, 2]})", "10010101"},
      {std::string(R"({"target_modules": )") + names + R"(, "layers_to_transform": 3})", "01000001"},
      {std::string(R"({"target_modules": )") + names + R"(, "layers_to_transform": [1, 4], "layers_pattern": "blocks"})",
       "00000011"},
      {std::string(R"({"target_modules": )") + names +
           R"(, "layers_to_transform": [1, 2, 12], "layers_pattern": ["h", "layers"]})",
       "00111101"},
      {R"({"target_modules": ["model.layers.3.self_attn.q_proj", "down_proj"], "layers_to_transform": [0]})", "01000000"},
      {R"js({"target_modules": ".*\\.(q_proj|c_attn)"})js", "11011000"},
      {std::string(R"({"target_modules": )") + names + R"(, "exclude_modules": ["self_attn.q_proj", "c_attn"]})", "xx1xx111"},
      {std::string(R"({"target_modules": )") + names + R"js(, "exclude_modules": ".*\\.(0|12)\\..*"})js", "x1x11x11"},
      {std::string(R"({"target_modules": )") + names + R"(, "exclude_modules": ["q_proj"], "layers_to_transform": [0, 3]})",
       "xx00000x"},
  };
  for (const auto& r : rules) {
    INFO(r.config);
    auto j = ordered_json::parse(r.config);
    j["peft_type"] = "LORA";
    const auto c = adapter_config::parse(j.dump());
    std::string got;
    for (const auto& k : keys) {
      const auto why = c.unselected_by(k);
      got += why.empty() ? '1' : why == "exclude_modules" ? 'x' : '0';
    }
    CHECK(got == r.want);
  }
  CHECK(adapter_config::parse(R"({"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": [1]})")
            .unselected_by("model.layers.0.self_attn.q_proj") == "layers_to_transform");
  CHECK_THROWS_AS(adapter_config::parse(R"({"peft_type": "LORA", "layers_to_transform": "0"})"), peft::format_error);
}

TEST_CASE("a checkpoint's modules the config leaves out are refused on load; saving makes the config select them",
          "[io][config]") {
  const auto file = peft::io::safetensors_file::open(adapters / "lora" / "adapter_model.safetensors");
  auto message = [&](const ordered_json& j) -> std::string {
    try {
      (void)peft::io::load_peft_checkpoint<double>(adapter_config::parse(j.dump()), file);
      return "";
    } catch (const peft::format_error& e) {
      return e.what();
    }
  };
  auto j = config_of("lora");  // modules model.layers.{0,1}.self_attn.{q,v}_proj
  j["layers_to_transform"] = ordered_json::parse("[0]");
  const auto m1 = message(j);
  CHECK(m1.find("model.layers.1.self_attn") != std::string::npos);
  CHECK(m1.find("layers_to_transform") != std::string::npos);
  j["layers_to_transform"] = nullptr;
  j["exclude_modules"] = ordered_json::parse(R"(["layers.0.self_attn.v_proj"])");
  CHECK(message(j).find("exclude_modules") != std::string::npos);
  j["exclude_modules"] = nullptr;
  j["target_modules"] = ordered_json::parse(R"(["q_proj"])");
  CHECK(message(j).find("target_modules") != std::string::npos);
  j["target_modules"] = ordered_json::parse(R"(["q_proj", "v_proj"])");
  j["layers_to_transform"] = ordered_json::parse("[0, 1]");
  j["layers_pattern"] = "layers";
  REQUIRE(message(j).empty());

  // Saved after the config changed under it: the saved config selects every saved module.
  auto ck = peft::io::load_peft_checkpoint<double>(adapter_config::parse(j.dump()), file);
  ck.config = adapter_config::parse(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                        "exclude_modules": ["layers.1.self_attn.q_proj"], "layers_to_transform": [0, 1]})");
  const auto dir = peft_test::scratch_dir("peft_config_fields_save");
  peft::io::save_peft_checkpoint(dir.dir, ck);
  const auto saved = adapter_config::load(dir.dir);
  CHECK(saved.raw["exclude_modules"].is_null());
  CHECK(saved.raw["layers_to_transform"].is_null());
  CHECK(saved.target_modules.size() == 4);
  for (const auto& m : ck.modules) CHECK(saved.selects(m.path));
  const auto back = peft::io::load_peft_checkpoint<double>(dir.dir);
  CHECK(back.modules.size() == 4);
  // A config that already selects every module is written back as it was.
  ck.config = adapter_config::parse(j.dump());
  peft::io::save_peft_checkpoint(dir.dir, ck);
  const auto kept = adapter_config::load(dir.dir);
  CHECK(kept.raw["layers_to_transform"] == ordered_json::parse("[0, 1]"));
  CHECK(kept.raw["layers_pattern"] == "layers");
}

}  // namespace test_config_fields
