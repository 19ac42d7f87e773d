// The tokenizer against HuggingFace `tokenizers` (golden ids and decodings of five pipelines:
// GPT-2, Llama-3, Qwen2, Llama-2, Mistral; tests/data/tokenizers, made by
// scripts/make_tokenizer_references.py), its refusals, and the text data built on it.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "peft/models/text_data.hpp"
#include "peft/models/tokenizer.hpp"
#include "support/file_support.hpp"

namespace test_tokenizer {

namespace fs = std::filesystem;
using peft::models::tokenizer;
const fs::path dir = fs::path(PEFT_TEST_DATA_DIR) / "tokenizers";

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const peft::error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST_CASE("tokenizer encodes and decodes as HuggingFace tokenizers on every golden sample", "[tokenizer]") {
  for (const char* family : {"gpt2", "llama3", "qwen2", "llama2", "mistral"}) {
    INFO(family);
    const auto tok = tokenizer::load(dir / family / "tokenizer.json");
    const auto cases = nlohmann::json::parse(peft_test::slurp(dir / family / "golden.json"));
    REQUIRE(cases.size() >= 100);
    std::size_t tokens = 0, multibyte = 0;
    for (const auto& c : cases) {
      const std::string text = c["text"].get<std::string>();
      INFO(text);
      const auto want = c["ids"].get<std::vector<long long>>();
      const auto ids = tok.encode(text, c["add_special_tokens"].get<bool>());
      CHECK(ids == want);
      CHECK(tok.decode(want) == c["decoded"].get<std::string>());
      CHECK(tok.decode(want, true) == c["decoded_skip"].get<std::string>());
      tokens += want.size();
      for (const unsigned char ch : text) multibyte += ch >= 0x80;
    }
    CHECK(tokens > 3000);     // the samples are not trivial
    CHECK(multibyte > 1000);  // and not ASCII only
  }
}

TEST_CASE("tokenizer refuses what it does not implement by name and malformed files clearly", "[tokenizer][errors]") {
  auto base = nlohmann::json::parse(peft_test::slurp(dir / "gpt2" / "tokenizer.json"));
  auto with = [&](const std::function<void(nlohmann::json&)>& edit) {
    auto j = base;
    edit(j);
    return message_of([&] { (void)tokenizer::from_json_text(j.dump(), "t.json"); });
  };
  CHECK_THAT(with([](auto& j) { j["model"]["type"] = "Unigram"; }), Catch::Contains("model type 'Unigram'"));
  CHECK_THAT(with([](auto& j) { j["model"]["dropout"] = 0.1; }), Catch::Contains("BPE dropout"));
  CHECK_THAT(with([](auto& j) { j["model"]["continuing_subword_prefix"] = "##"; }), Catch::Contains("continuing_subword_prefix"));
  CHECK_THAT(with([](auto& j) { j["truncation"] = nlohmann::json::object({{"max_length", 8}}); }), Catch::Contains("truncation"));
  CHECK_THAT(with([](auto& j) { j["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", "AA=="}}; }),
             Catch::Contains("Precompiled normalizer"));
  CHECK_THAT(with([](auto& j) { j["pre_tokenizer"]["frobnicate"] = true; }), Catch::Contains("field 'frobnicate'"));
  CHECK_THAT(with([](auto& j) { j["model"]["merges"].push_back("zzqq xxyy"); }), Catch::Contains("outside the vocabulary"));
  CHECK_THAT(with([](auto& j) { j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}}; }),
             Catch::Contains("does not compile"));
  CHECK_THAT(message_of([] { (void)tokenizer::from_json_text("{\"model\": ", "t.json"); }), Catch::Contains("t.json is not JSON"));
  const auto tok = tokenizer::from_json_text(base.dump());
  CHECK_THAT(message_of([&] { (void)tok.encode("ok \xC3\x28 bad"); }), Catch::Contains("not valid UTF-8 (byte 3)"));
  CHECK_THAT(message_of([&] { (void)tok.decode(std::vector<long long>{5, 99999}); }), Catch::Contains("token id 99999"));
  CHECK_THAT(message_of([&] { (void)tokenizer::load(dir / "missing.json"); }), Catch::Contains("cannot open"));
}

TEST_CASE("training_labels ignores padding and prompt positions, keeps the first completion prediction", "[tokenizer][data]") {
  const auto b = peft::models::token_batch::from_rows({{5, 6, 7, 8, 9}, {10, 11, 12}});
  const std::vector<std::size_t> prompts{2, 0};
  const auto l = peft::models::training_labels(b, prompts);
  const long long x = peft::models::ignore_label;
  CHECK(l == std::vector<long long>{x, x, 7, 8, 9, 10, 11, 12, x, x});
  // Logits at c predict labels[c + 1]: 3 predictions in row 0 (of 7, 8, 9), 2 in row 1.
  CHECK(peft::models::causal_lm<float, peft::dense<float>>::predicted_tokens(b, l) == 5);
  CHECK_THROWS_AS(peft::models::training_labels(b, std::vector<std::size_t>{1}), peft::shape_error);
}

TEST_CASE("text data: plain text packed into rows, JSONL text and prompt/completion rows", "[tokenizer][data]") {
  const auto tok = tokenizer::load(dir / "llama2" / "tokenizer.json");
  const std::string text = "The quick brown fox jumps over the lazy dog.\nDer schnelle braune Fuchs.\n\nIl cane pigro dorme.\n";
  peft::models::text_data_options o;
  o.seq_len = 7;
  o.eos = 2;
  const auto d = peft::models::parse_text_data(text, "t.txt", tok, o, false);
  auto all = tok.encode(text, true);
  all.push_back(2);
  REQUIRE(all.size() > 20);
  std::vector<long long> joined;
  for (const auto& r : d.rows) {
    CHECK(r.ids.size() <= 7);
    CHECK(r.prompt_tokens == 0);
    joined.insert(joined.end(), r.ids.begin(), r.ids.end());
  }
  CHECK(d.rows.front().ids.size() == 7);
  CHECK(joined.size() >= all.size() - 1);  // a lone last token is dropped
  CHECK(std::equal(joined.begin(), joined.end(), all.begin()));

  const std::string jsonl =
      "{\"text\": \"Hello there, world.\", \"id\": 7}\n"
      "\n"
      "{\"prompt\": \"Q: capital of Italy?\\nA:\", \"completion\": \" Rome\"}\n"
      "{\"prompt\": \"This prompt is long enough to fill every position of the row, and then some more words, "
      "and then yet more words.\", \"completion\": \" x\"}\n";
  o.seq_len = 24;
  const auto j = peft::models::parse_text_data(jsonl, "t.jsonl", tok, o, true);
  CHECK(j.examples == 3);
  CHECK(j.dropped == 1);  // the third: its completion cut away
  CHECK(j.truncated == 1);
  REQUIRE(j.rows.size() == 2);
  auto first = tok.encode("Hello there, world.", true);
  first.push_back(2);
  CHECK(j.rows[0].ids == first);
  const auto p = tok.encode("Q: capital of Italy?\nA:", true);
  auto second = p;
  for (const long long id : tok.encode(" Rome", false)) second.push_back(id);
  second.push_back(2);
  CHECK(j.rows[1].prompt_tokens == p.size());
  CHECK(j.rows[1].ids == std::vector<long long>(second.begin(), second.begin() + static_cast<std::ptrdiff_t>(std::min<std::size_t>(24, second.size()))));

  CHECK_THAT(message_of([&] { (void)peft::models::parse_text_data("{\"text\": 3}\n", "b.jsonl", tok, o, true); }),
             Catch::Contains("b.jsonl line 1: \"text\" is not a string"));
  CHECK_THAT(message_of([&] { (void)peft::models::parse_text_data("\n{\"prompt\": \"a\"}\n", "b.jsonl", tok, o, true); }),
             Catch::Contains("b.jsonl line 2 has neither"));
  CHECK_THAT(message_of([&] { (void)peft::models::parse_text_data("{\"messages\": []}\n", "b.jsonl", tok, o, true); }),
             Catch::Contains("chat data"));
  CHECK_THAT(message_of([&] { (void)peft::models::parse_text_data("not json\n", "b.jsonl", tok, o, true); }),
             Catch::Contains("b.jsonl line 1 is not a JSON object"));
  CHECK_THAT(message_of([&] { (void)peft::models::parse_text_data("\xFF", "b.txt", tok, o, false); }), Catch::Contains("not UTF-8"));
}

}  // namespace test_tokenizer
