// peft_model with LoRA checkpoints that adapt the token table (LoRA on embed_tokens,
// trainable_token_indices), run unmerged, against PEFT 0.21.2: logits, the causal-LM loss and its
// gradient w.r.t. every adapter tensor (tests/data/models/embeddings, made by
// scripts/make_embedding_golden.py), tied and untied embeddings; then merge_and_unload and save.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "peft/io/safetensors.hpp"
#include "peft/models/gguf_lora.hpp"
#include "peft/models/peft_model.hpp"
#include "peft/serve/adapter_registry.hpp"
#include "support/file_support.hpp"
#include "support/test_support.hpp"

namespace test_embedding_adapters {

namespace {
namespace fs = std::filesystem;
using namespace peft::models;
using ix = peft::index;
using peft_test::rel_error;
const fs::path data = fs::path(PEFT_TEST_DATA_DIR) / "models" / "embeddings";
fs::path base_of(const std::string& c) { return data / (c.starts_with("tied") ? "base_tied" : "base_untied"); }

token_batch input_of(const peft::io::safetensors_file& ref) {
  const auto ids = ref.read<long long>("input_ids");
  return token_batch::from_rows({ids});
}

/// PEFT's gradient key ("grad.<module>.lora_A.default.weight") as the checkpoint key.
std::string checkpoint_key(std::string k) {
  k = k.substr(5);
  const auto at = k.find(".default");
  return k.erase(at, 8);
}
}  // namespace

TEST_CASE("Embedding LoRA and trainable tokens run unmerged as PEFT's forward and backward", "[models][embedding]") {
  for (const std::string c : {"emb_lora", "tokens", "combined", "tied_tokens", "tied_emb_lora"}) {
    INFO(c);
    const auto ref = peft::io::safetensors_file::open(data / c / "logits.safetensors");
    auto pm = peft_model<double>::from_pretrained(causal_lm<double>::load(base_of(c)), data / c / "adapter");
    const token_batch b = input_of(ref);
    const auto logits = pm.model().forward(b);
    const auto flat = ref.read<double>("logits");  // (1, length, vocab)
    const peft::matrix<double> want2(b.length, static_cast<ix>(flat.size()) / b.length, flat);
    const double le = rel_error(logits, want2);
    CHECK(le < 2e-6);  // PEFT computes in float: measured 1.5e-7 .. 3.5e-7
    // The adapter matters: without it the logits differ.
    auto base = causal_lm<double>::load(base_of(c));
    CHECK(rel_error(base.forward(b), want2) > 1e-3);
    pm.model().zero_grad();
    const double loss = pm.model().loss_and_backward(b, b.causal_labels());
    CHECK(loss == Approx(ref.read<double>("loss").front()).epsilon(1e-5));
    auto params = pm.named_parameters();
    std::size_t compared = 0;
    double worst = 0.0;
    for (const auto& t : ref.tensors()) {
      if (!t.name.starts_with("grad.")) continue;
      const std::string key = checkpoint_key(t.name);
      INFO(key);
      REQUIRE(params.count(key));
      const auto& p = params.at(key);
      peft::matrix<double> g(p.grad.rows(), p.grad.cols());
      for (ix i = 0; i < g.rows(); ++i)
        for (ix j = 0; j < g.cols(); ++j) g(i, j) = p.grad(i, j);
      const auto gw = ref.read_matrix<double>(t.name);
      CHECK(peft_test::max_abs(gw) > 0.0);
      const double e = rel_error(g, gw);
      CHECK(e < 2e-5);  // measured up to 1.8e-6
      worst = std::max(worst, e);
      ++compared;
    }
    CHECK(compared == params.size());
    INFO("logits " << le << ", gradients " << worst);
    CHECK(worst < 2e-5);
  }
}

TEST_CASE("merge_and_unload and save_pretrained of table adapters", "[models][embedding]") {
  const fs::path tmp = peft_test::temp_path("peft_emb_models");
  fs::remove_all(tmp);
  for (const std::string c : {"combined", "tied_tokens", "tied_emb_lora"}) {
    INFO(c);
    const auto ref = peft::io::safetensors_file::open(data / c / "logits.safetensors");
    auto pm = peft_model<double>::from_pretrained(causal_lm<double>::load(base_of(c)), data / c / "adapter");
    const token_batch b = input_of(ref);
    pm.save_pretrained(tmp / c);
    const auto again = peft_model<double>::from_pretrained(causal_lm<double>::load(base_of(c)), tmp / c);
    const auto unmerged = pm.model().forward(b);
    pm.merge_and_unload();
    CHECK(pm.model().table_adapters().empty());
    const auto merged = pm.model().forward(b);
    if (c == "tied_emb_lora") {
      // PEFT's merge adds the LoRA to the shared table, so the tied head changes too: merged
      // and unmerged outputs differ (PEFT warns), as in PEFT.
      CHECK(rel_error(merged, unmerged) > 1e-3);
    } else {
      CHECK(rel_error(merged, unmerged) < 1e-12);
    }
  }
  fs::remove_all(tmp);
}

TEST_CASE("Table adapters: one enabled at a time, wrong tables refused", "[models][embedding]") {
  peft_model<double> pm(causal_lm<double>::load(data / "base_untied"));
  pm.load_adapter(data / "emb_lora" / "adapter", "a");
  pm.load_adapter(data / "tokens" / "adapter", "b");
  const token_batch b = token_batch::from_rows({{1, 3, 7, 60}});
  CHECK_THROWS_WITH(pm.model().forward(b), Catch::Contains("both enabled"));
  pm.set_adapter("b");
  CHECK_NOTHROW(pm.model().forward(b));
  CHECK_THROWS_AS(pm.forward_per_sequence(b, {"a"}), peft::unsupported_error);
  pm.delete_adapter("a");
  pm.delete_adapter("b");
  CHECK(pm.model().table_adapters().empty());
  // Trainable tokens on a tied model's embedding (the head follows).
  peft_model<double> tied(causal_lm<double>::load(data / "base_tied"));
  CHECK_NOTHROW(tied.load_adapter(data / "tied_tokens" / "adapter"));
}

TEST_CASE("The GGUF LoRA export refuses table adapters by name", "[models][embedding]") {
  const auto cfg = causal_lm<float>::load(data / "base_untied").config();
  const auto ck = peft::io::load_peft_checkpoint<double>(data / "combined" / "adapter");
  const fs::path out = peft_test::temp_path("peft_emb_export.gguf");
  CHECK_THROWS_WITH(peft::models::export_gguf_lora(ck, cfg, out),
                    Catch::Contains("[export_gguf_lora]") && Catch::Contains("embedding table"));
  CHECK_FALSE(fs::exists(out));
}

TEST_CASE("The serving registry refuses table adapters by name", "[serve][embedding]") {
  peft::serve::adapter_registry<peft::dense<float>> reg("model.layers.0.self_attn.q_proj.weight",
                                                        peft::dense<float>(peft::matrix<float>(16, 16)));
  for (const std::string c : {"emb_lora", "tokens"}) {
    INFO(c);
    CHECK_THROWS_AS(reg.load(c, data / c / "adapter"), peft::unsupported_error);
    CHECK_THROWS_WITH(reg.load(c, data / c / "adapter"), Catch::Contains("embedding table of 'model.embed_tokens'"));
  }
}

}  // namespace test_embedding_adapters
