// peft_model and the serving registry with a LoRA checkpoint that adapts embeddings (LoRA on
// embed_tokens, trainable_token_indices): models/ does not run them unmerged, so loading one is
// refused in one line naming the table, never run without its embedding part. Data:
// tests/data/models/embeddings (scripts/make_embedding_golden.py).
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>

#include "peft/models/peft_model.hpp"
#include "support/test_support.hpp"

namespace test_embedding_adapters {

namespace {
namespace fs = std::filesystem;
using namespace peft::models;
const fs::path data = fs::path(PEFT_TEST_DATA_DIR) / "models" / "embeddings";
}  // namespace

TEST_CASE("peft_model::load_adapter refuses embedding adapters by name", "[models][embedding]") {
  peft_model<float> pm(causal_lm<float>::load(data / "base_untied"));
  for (const std::string c : {"emb_lora", "tokens", "combined"}) {
    INFO(c);
    CHECK_THROWS_AS(pm.load_adapter(data / c / "adapter", c), peft::unsupported_error);
    CHECK_THROWS_WITH(pm.load_adapter(data / c / "adapter", c),
                      Catch::Contains("[peft_model::load_adapter]") && Catch::Contains("embedding table") &&
                          (Catch::Contains("model.embed_tokens") || Catch::Contains("lm_head")));
    CHECK(pm.adapter_names().empty());  // nothing half-attached
  }
}

}  // namespace test_embedding_adapters
