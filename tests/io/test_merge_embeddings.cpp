// LoRA on embeddings and trainable tokens (trainable_token_indices) in PEFT LoRA checkpoints:
// loading, saving and merge_model against PEFT's merge_and_unload. The data is
// tests/data/models/embeddings, made by scripts/make_embedding_golden.py (peft 0.21.2,
// transformers 5.25): a tiny Llama, untied and tied (no lm_head.weight), and five adapters.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "peft/io/merge.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/file_support.hpp"
#include "support/test_support.hpp"

namespace test_merge_embeddings {

namespace {

namespace fs = std::filesystem;
using ix = peft::index;
using peft_test::rel_error;

const fs::path data = fs::path(PEFT_TEST_DATA_DIR) / "models" / "embeddings";

/// A fresh directory under the system's temporary one, removed afterwards.
struct scratch : peft_test::scratch_dir {
  explicit scratch(const std::string& name) : peft_test::scratch_dir("peft_merge_emb_" + name) {}
};

fs::path base_of(const std::string& c) { return data / (c.starts_with("tied") ? "base_tied" : "base_untied"); }

peft::io::ordered_json read_json(const fs::path& p) {
  std::ifstream in(p);
  return peft::io::ordered_json::parse(in);
}

/// A copy of case `c`'s adapter in `dst` with its config edited by `edit`.
template <class F>
void copy_adapter_with(const std::string& c, const fs::path& dst, F edit) {
  fs::create_directories(dst);
  fs::copy_file(data / c / "adapter" / "adapter_model.safetensors", dst / "adapter_model.safetensors",
                fs::copy_options::overwrite_existing);
  auto j = read_json(data / c / "adapter" / "adapter_config.json");
  edit(j);
  std::ofstream(dst / "adapter_config.json") << j.dump(2);
}

/// A copy of case `c`'s adapter in `dst` with tensor `key` replaced (or, with an empty matrix, removed).
void copy_adapter_with_tensor(const std::string& c, const fs::path& dst, const std::string& key,
                              const peft::matrix<float>& m) {
  fs::create_directories(dst);
  fs::copy_file(data / c / "adapter" / "adapter_config.json", dst / "adapter_config.json",
                fs::copy_options::overwrite_existing);
  const auto f = peft::io::safetensors_file::open(data / c / "adapter" / "adapter_model.safetensors");
  peft::io::safetensors_writer w;
  for (const auto& t : f.tensors()) {
    if (t.name == key) continue;
    w.add(t.name, f.read_matrix<float>(t.name));
  }
  if (m.size() > 0) w.add(key, m);
  w.write(dst / "adapter_model.safetensors");
}

/// merge_model's output against PEFT's merged model: the base's tensors; those PEFT changed
/// (merged.safetensors holds exactly these, checked to be `changed`) within `tol` relative, the
/// others bit-exact. Returns the worst relative error.
double check_merged(const fs::path& out, const std::string& c, const std::vector<std::string>& changed, double tol) {
  const auto got = peft::io::safetensors_file::open(out);
  const auto want = peft::io::safetensors_file::open(data / c / "merged.safetensors");
  const auto base = peft::io::safetensors_file::open(base_of(c) / "model.safetensors");
  std::vector<std::string> names;
  for (const auto& t : want.tensors()) names.push_back(t.name);
  std::vector<std::string> expect = changed;
  std::sort(names.begin(), names.end());
  std::sort(expect.begin(), expect.end());
  CHECK(names == expect);
  REQUIRE(got.tensors().size() == base.tensors().size());
  double worst = 0.0;
  for (const auto& t : base.tensors()) {
    INFO(c << ": " << t.name);
    REQUIRE(got.contains(t.name));
    CHECK(got.info(t.name).shape == t.shape);
    CHECK(got.info(t.name).type == t.type);
    const auto g = got.read_matrix<double>(t.name);
    const auto b = base.read_matrix<double>(t.name);
    if (want.contains(t.name)) {
      const auto w = want.read_matrix<double>(t.name);
      CHECK(rel_error(w, b) > 1e-2);  // the adapter does change it
      const double e = rel_error(g, w);
      CHECK(e < tol);
      worst = std::max(worst, e);
    } else {
      CHECK(rel_error(g, b) == 0.0);
    }
  }
  return worst;
}

const std::string embed = "model.embed_tokens.weight";
const std::string q0 = "model.layers.0.self_attn.q_proj.weight", q1 = "model.layers.1.self_attn.q_proj.weight";
const std::string v0 = "model.layers.0.self_attn.v_proj.weight", v1 = "model.layers.1.self_attn.v_proj.weight";

}  // namespace

TEST_CASE("merge_model merges embedding LoRA and trainable tokens as PEFT's merge_and_unload", "[io][merge][embedding]") {
  scratch s("golden");
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"emb_lora", {embed}},
      {"tokens", {embed, q0, q1}},
      {"combined", {embed, q0, q1, v0, v1, "lm_head.weight"}},
      {"tied_tokens", {embed, q0, q1}},
      {"tied_emb_lora", {embed, v0, v1}},
  };
  for (const auto& [c, changed] : cases) {
    INFO(c);
    const fs::path out = s.dir / (c + ".safetensors");
    const auto report = peft::io::merge_model(base_of(c), data / c / "adapter", out, {});
    std::vector<std::string> merged = report.merged;
    std::sort(merged.begin(), merged.end());
    std::vector<std::string> expect = changed;
    std::sort(expect.begin(), expect.end());
    CHECK(merged == expect);
    // Merged in double and rounded once, PEFT in float: measured 4.9e-8 .. 6.5e-8.
    CHECK(check_merged(out, c, changed, 2e-7) < 2e-7);
  }
  // An output dtype: the table is merged in double and rounded once to bf16.
  {
    peft::io::merge_options opt;
    opt.out_dtype = peft::dtype::bf16;
    peft::io::merge_model(base_of("combined"), data / "combined" / "adapter", s.dir / "bf16.safetensors", opt);
    const auto got = peft::io::safetensors_file::open(s.dir / "bf16.safetensors");
    const auto want = peft::io::safetensors_file::open(data / "combined" / "merged.safetensors");
    for (const std::string& n : {embed, std::string("lm_head.weight")}) {
      INFO(n);
      CHECK(got.info(n).type == peft::dtype::bf16);
      CHECK(rel_error(got.read_matrix<double>(n), want.read_matrix<double>(n)) < 4e-3);
    }
  }
  // Tied bases stay tied: no lm_head.weight appears.
  CHECK_FALSE(peft::io::safetensors_file::open(s.dir / "tied_emb_lora.safetensors").contains("lm_head.weight"));
}

TEST_CASE("Trainable tokens replace rows, embedding LoRA adds s (B A)^T", "[io][embedding]") {
  const auto base = peft::io::safetensors_file::open(data / "base_untied" / "model.safetensors");
  const auto table = base.read_matrix<double>(embed);
  {
    const auto ck = peft::io::load_peft_checkpoint<double>(data / "tokens" / "adapter");
    REQUIRE(ck.embeddings.tokens.size() == 1);
    CHECK(ck.embeddings.lora.empty());
    const auto& t = ck.embeddings.tokens.front();
    CHECK(t.path == "model.embed_tokens");
    CHECK(t.indices == std::vector<ix>{3, 7, 60});
    CHECK(peft_test::nontrivial(t.values));
    auto w = table;
    t.apply(w.view());
    for (ix i = 0; i < w.rows(); ++i) {
      const auto it = std::find(t.indices.begin(), t.indices.end(), i);
      for (ix j = 0; j < w.cols(); ++j) {
        CHECK(w(i, j) == (it == t.indices.end() ? table(i, j) : t.values(it - t.indices.begin(), j)));
      }
    }
  }
  {
    const auto ck = peft::io::load_peft_checkpoint<double>(data / "emb_lora" / "adapter");
    CHECK(ck.modules.empty());
    REQUIRE(ck.embeddings.lora.size() == 1);
    const auto& e = ck.embeddings.lora.front();
    CHECK(e.path == "model.embed_tokens");
    CHECK(e.rank() == 4);
    CHECK(e.num_embeddings() == 64);
    CHECK(e.embedding_dim() == 16);
    CHECK(e.scale == 2.0);  // lora_alpha 8 / r 4
    CHECK(e.base_weight.has_value());
    CHECK(peft_test::nontrivial(e.a));
    CHECK(peft_test::nontrivial(e.b));
    auto w = table;
    e.add_delta(w.view());
    const ix t = 5, j = 3;
    double want = table(t, j);
    for (ix k = 0; k < 4; ++k) want += 2.0 * e.b(j, k) * e.a(k, t);
    CHECK(w(t, j) == Approx(want).epsilon(1e-14));
  }
  {
    auto ck = peft::io::load_peft_checkpoint<float>(data / "combined" / "adapter");
    CHECK(ck.modules.size() == 4);
    REQUIRE(ck.embeddings.lora.size() == 1);
    REQUIRE(ck.embeddings.tokens.size() == 1);
    CHECK(ck.embeddings.lora.front().rank() == 3);  // rank_pattern
    CHECK(ck.embeddings.lora.front().scale == Approx(6.0 / std::sqrt(3.0)).epsilon(1e-15));  // use_rslora
    CHECK_FALSE(ck.embeddings.lora.front().base_weight.has_value());  // not saved with trainable tokens
    CHECK(ck.embeddings.tokens.front().path == "lm_head");
    CHECK(ck.embeddings.tokens.front().indices == std::vector<ix>{0, 5, 63});
    // As PEFT counts them: embedding A, B (3 x 64 + 16 x 3), 3 token rows of 16, 4 linears of 128.
    CHECK(ck.parameter_count() == 240 + 48 + 4 * 128);
  }
}

TEST_CASE("Embedding parts survive a save round trip", "[io][embedding]") {
  scratch s("roundtrip");
  for (const std::string c : {"combined", "emb_lora", "tied_tokens"}) {
    INFO(c);
    auto ck = peft::io::load_peft_checkpoint<double>(data / c / "adapter");
    peft::io::save_peft_checkpoint(s.dir / c, ck);
    // The same keys, shapes and values as PEFT's file.
    const auto mine = peft::io::safetensors_file::open(s.dir / c / "adapter_model.safetensors");
    const auto theirs = peft::io::safetensors_file::open(data / c / "adapter" / "adapter_model.safetensors");
    REQUIRE(mine.tensors().size() == theirs.tensors().size());
    for (const auto& t : theirs.tensors()) {
      INFO(t.name);
      REQUIRE(mine.contains(t.name));
      CHECK(mine.info(t.name).shape == t.shape);
      CHECK(rel_error(mine.read_matrix<double>(t.name), theirs.read_matrix<double>(t.name)) == 0.0);
    }
    const auto back = peft::io::load_peft_checkpoint<double>(s.dir / c);
    REQUIRE(back.embeddings.lora.size() == ck.embeddings.lora.size());
    REQUIRE(back.embeddings.tokens.size() == ck.embeddings.tokens.size());
    for (std::size_t i = 0; i < back.embeddings.lora.size(); ++i) {
      CHECK(back.embeddings.lora[i].scale == Approx(ck.embeddings.lora[i].scale).epsilon(1e-15));
      CHECK(back.embeddings.lora[i].path == ck.embeddings.lora[i].path);
    }
    for (std::size_t i = 0; i < back.embeddings.tokens.size(); ++i) {
      CHECK(back.embeddings.tokens[i].indices == ck.embeddings.tokens[i].indices);
    }
    // And it merges to PEFT's result again.
    peft::io::merge_model(base_of(c), s.dir / c, s.dir / (c + ".safetensors"), {});
    const auto got = peft::io::safetensors_file::open(s.dir / (c + ".safetensors"));
    const auto want = peft::io::safetensors_file::open(data / c / "merged.safetensors");
    CHECK(rel_error(got.read_matrix<double>(embed), want.read_matrix<double>(embed)) < 1e-6);
  }
  // A BF16 adapter (beside its F32 base table) is re-saved as BF16.
  {
    fs::create_directories(s.dir / "bf16");
    fs::copy_file(data / "emb_lora" / "adapter" / "adapter_config.json", s.dir / "bf16" / "adapter_config.json");
    const auto f = peft::io::safetensors_file::open(data / "emb_lora" / "adapter" / "adapter_model.safetensors");
    peft::io::safetensors_writer w;
    for (const auto& t : f.tensors()) {
      const bool base = t.name.ends_with("base_layer.weight");
      w.add(t.name, f.read_matrix<float>(t.name), base ? peft::dtype::f32 : peft::dtype::bf16);
    }
    w.write(s.dir / "bf16" / "adapter_model.safetensors");
    auto ck = peft::io::load_peft_checkpoint<float>(s.dir / "bf16");
    CHECK(ck.stored_dtype == peft::dtype::bf16);
    peft::io::save_peft_checkpoint(s.dir / "bf16_again", ck);
    const auto back = peft::io::safetensors_file::open(s.dir / "bf16_again" / "adapter_model.safetensors");
    CHECK(back.info("base_model.model.model.embed_tokens.lora_embedding_A").type == peft::dtype::bf16);
    CHECK(back.info("base_model.model.model.embed_tokens.base_layer.weight").type == peft::dtype::f32);
  }
  // Moved to another table, the tokens' config names it by path.
  {
    auto ck = peft::io::load_peft_checkpoint<double>(data / "tokens" / "adapter");
    ck.embeddings.tokens.front().path = "lm_head";
    ck.embeddings.tokens.front().indices = {1, 2, 4};
    peft::io::save_peft_checkpoint(s.dir / "moved", ck);
    const auto j = read_json(s.dir / "moved" / "adapter_config.json");
    CHECK(j["trainable_token_indices"].dump() == R"({"lm_head":[1,2,4]})");
    const auto back = peft::io::load_peft_checkpoint<double>(s.dir / "moved");
    CHECK(back.embeddings.tokens.front().path == "lm_head");
    CHECK(back.embeddings.tokens.front().indices == std::vector<ix>{1, 2, 4});
  }
}

TEST_CASE("Malformed embedding adapters are refused with the reason", "[io][embedding]") {
  scratch s("bad");
  peft::rng gen(7);
  const fs::path out = s.dir / "out.safetensors";
  auto merge = [&](const std::string& c, const fs::path& adapter) {
    peft::io::merge_model(base_of(c), adapter, out, {});
  };
  // Indices: a count that disagrees with the tensor, a duplicate, an id past the vocabulary, none.
  copy_adapter_with("tokens", s.dir / "count", [](auto& j) { j["trainable_token_indices"] = {3, 7}; });
  CHECK_THROWS_WITH(merge("tokens", s.dir / "count"),
                    Catch::Contains("[load_peft_checkpoint]") && Catch::Contains("2 token indices"));
  copy_adapter_with("tokens", s.dir / "dup", [](auto& j) { j["trainable_token_indices"] = {3, 7, 3}; });
  CHECK_THROWS_WITH(merge("tokens", s.dir / "dup"), Catch::Contains("twice"));
  copy_adapter_with("tokens", s.dir / "range", [](auto& j) { j["trainable_token_indices"] = {3, 7, 64}; });
  CHECK_THROWS_AS(merge("tokens", s.dir / "range"), peft::shape_error);
  CHECK_THROWS_WITH(merge("tokens", s.dir / "range"), Catch::Contains("[merge_model]") && Catch::Contains("out of range"));
  copy_adapter_with("tokens", s.dir / "neg", [](auto& j) { j["trainable_token_indices"] = {3, -7, 6}; });
  CHECK_THROWS_AS(merge("tokens", s.dir / "neg"), peft::format_error);
  copy_adapter_with("tokens", s.dir / "none", [](auto& j) { j["trainable_token_indices"] = nullptr; });
  CHECK_THROWS_WITH(merge("tokens", s.dir / "none"), Catch::Contains("gives it no indices"));
  copy_adapter_with("tokens", s.dir / "other", [](auto& j) { j["trainable_token_indices"] = {{"lm_head", {1}}}; });
  CHECK_THROWS_WITH(merge("tokens", s.dir / "other"), Catch::Contains("gives it no indices"));
  // A config entry without a tensor changes nothing (PEFT starts the rows from the base's).
  copy_adapter_with("tokens", s.dir / "extra", [](auto& j) {
    j["trainable_token_indices"] = {{"embed_tokens", {3, 7, 60}}, {"lm_head", {1}}};
  });
  merge("tokens", s.dir / "extra");
  check_merged(out, "tokens", {embed, q0, q1}, 1e-6);
  // Rows of the wrong width for the table.
  copy_adapter_with_tensor("tokens", s.dir / "width", "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
                           peft_test::random_matrix<float>(3, 15, gen));
  CHECK_THROWS_WITH(merge("tokens", s.dir / "width"), Catch::Contains("[merge_model]") && Catch::Contains("rows of 16"));
  // Embedding LoRA: a rank the config contradicts, a missing B, a vocabulary the base does not have.
  copy_adapter_with("emb_lora", s.dir / "rank", [](auto& j) { j["r"] = 5; });
  CHECK_THROWS_WITH(merge("emb_lora", s.dir / "rank"), Catch::Contains("rank 4") && Catch::Contains("gives 5"));
  copy_adapter_with_tensor("emb_lora", s.dir / "noB", "base_model.model.model.embed_tokens.lora_embedding_B", {});
  CHECK_THROWS_WITH(merge("emb_lora", s.dir / "noB"), Catch::Contains("without lora_embedding_B"));
  copy_adapter_with_tensor("combined", s.dir / "vocab", "base_model.model.model.embed_tokens.lora_embedding_A",
                           peft_test::random_matrix<float>(3, 60, gen));
  CHECK_THROWS_AS(merge("combined", s.dir / "vocab"), peft::shape_error);
  CHECK_THROWS_WITH(merge("combined", s.dir / "vocab"), Catch::Contains("64x16") && Catch::Contains("60x16"));
  copy_adapter_with_tensor("combined", s.dir / "rankAB", "base_model.model.model.embed_tokens.lora_embedding_B",
                           peft_test::random_matrix<float>(16, 2, gen));
  CHECK_THROWS_WITH(merge("combined", s.dir / "rankAB"), Catch::Contains("disagree on the rank"));
  copy_adapter_with_tensor("emb_lora", s.dir / "basew", "base_model.model.model.embed_tokens.base_layer.weight",
                           peft_test::random_matrix<float>(64, 15, gen));
  CHECK_THROWS_WITH(merge("emb_lora", s.dir / "basew"), Catch::Contains("base_layer.weight"));
  // Not targeted by the config.
  copy_adapter_with("emb_lora", s.dir / "untargeted", [](auto& j) { j["target_modules"] = {"q_proj"}; });
  CHECK_THROWS_WITH(merge("emb_lora", s.dir / "untargeted"), Catch::Contains("target_modules leaves it out"));
  // Trainable tokens on a tied lm_head: the base stores no lm_head.weight.
  copy_adapter_with("tied_tokens", s.dir / "tiedhead", [](auto& j) { j["trainable_token_indices"] = {{"lm_head", {2, 9}}}; });
  {
    fs::create_directories(s.dir / "tiedhead2");
    std::ofstream(s.dir / "tiedhead2" / "adapter_config.json") << read_json(s.dir / "tiedhead" / "adapter_config.json").dump();
    const auto f = peft::io::safetensors_file::open(data / "tied_tokens" / "adapter" / "adapter_model.safetensors");
    peft::io::safetensors_writer w;
    for (const auto& t : f.tensors()) {
      std::string name = t.name;
      if (name.find("embed_tokens") != std::string::npos) name = "base_model.model.lm_head.token_adapter.trainable_tokens_delta";
      w.add(name, f.read_matrix<float>(t.name));
    }
    w.write(s.dir / "tiedhead2" / "adapter_model.safetensors");
  }
  CHECK_THROWS_WITH(merge("tied_tokens", s.dir / "tiedhead2"), Catch::Contains("tied to the input embedding"));
  // trainable_token_indices stays refused where it is not read: a DoRA checkpoint.
  copy_adapter_with("tokens", s.dir / "dora", [](auto& j) { j["use_dora"] = true; });
  CHECK_THROWS_AS(merge("tokens", s.dir / "dora"), peft::unsupported_error);
  CHECK_THROWS_WITH(merge("tokens", s.dir / "dora"), Catch::Contains("trainable_token_indices"));
  // Nothing written on any error.
  CHECK(fs::exists(out));  // from the one good merge above
}

}  // namespace test_merge_embeddings
