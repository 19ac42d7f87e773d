// `peft finetune --text | --jsonl [--val]` and `peft generate --prompt`: text in, text out, checked
// against the token-id paths they must equal and against the loss computed in this process.
#include <catch2/catch.hpp>

#ifdef PEFT_CLI_PATH

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "peft/core/random.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/models/causal_lm.hpp"
#include "peft/models/text_data.hpp"
#include "support/cli_support.hpp"
#include "support/file_support.hpp"

namespace test_cli_text {

namespace {

namespace fs = std::filesystem;
using peft_test::quoted;
using peft_test::run_cli;
using peft_test::slurp;
const fs::path tokenizers = fs::path(PEFT_TEST_DATA_DIR) / "tokenizers";

/// A random one-layer Llama whose vocabulary is the llama2 test tokenizer's, with that tokenizer.
fs::path make_model(const fs::path& dir) {
  fs::create_directories(dir);
  fs::copy_file(tokenizers / "llama2" / "tokenizer.json", dir / "tokenizer.json");
  const auto tok = peft::models::tokenizer::load(dir / "tokenizer.json");
  const std::int64_t V = tok.vocab_size(), H = 16, F = 32;
  std::ofstream(dir / "config.json") << R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
    "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "vocab_size": )"
                                      << V << "}\n";
  peft::rng g(11);
  peft::io::safetensors_writer w;
  auto add = [&](const std::string& name, std::vector<std::int64_t> shape, double scale) {
    std::int64_t n = 1;
    for (const auto d : shape) n *= d;
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = static_cast<float>(scale * (2.0 * g.uniform() - 1.0));
    w.add(name, shape, std::span<const float>(v));
  };
  auto ones = [&](const std::string& name) {
    std::vector<float> v(static_cast<std::size_t>(H), 1.0f);
    w.add(name, {H}, std::span<const float>(v));
  };
  add("model.embed_tokens.weight", {V, H}, 0.5);
  for (const char* p : {"q_proj", "k_proj", "v_proj", "o_proj"}) add(std::string("model.layers.0.self_attn.") + p + ".weight", {H, H}, 0.3);
  add("model.layers.0.mlp.gate_proj.weight", {F, H}, 0.3);
  add("model.layers.0.mlp.up_proj.weight", {F, H}, 0.3);
  add("model.layers.0.mlp.down_proj.weight", {H, F}, 0.3);
  ones("model.layers.0.input_layernorm.weight");
  ones("model.layers.0.post_attention_layernorm.weight");
  ones("model.norm.weight");
  w.write(dir / "model.safetensors");
  return dir;
}

/// Column `name` of a finetune log (empty cells as NaN).
std::vector<double> log_column(const std::string& csv, const std::string& name) {
  std::istringstream in(csv);
  std::string line;
  std::getline(in, line);
  std::vector<std::string> head;
  std::stringstream hs(line);
  for (std::string c; std::getline(hs, c, ',');) head.push_back(c);
  const auto col = static_cast<std::size_t>(std::find(head.begin(), head.end(), name) - head.begin());
  REQUIRE(col < head.size());
  std::vector<double> out;
  while (std::getline(in, line)) {
    std::vector<std::string> cells;
    std::stringstream ls(line);
    for (std::string c; std::getline(ls, c, ',');) cells.push_back(c);
    while (cells.size() < head.size()) cells.emplace_back();
    out.push_back(cells[col].empty() ? std::nan("") : std::stod(cells[col]));
  }
  return out;
}

const std::string corpus =
    "Un uomo saggio parla poco e ascolta molto.\n"
    "A wise man speaks little and listens a lot; the fool does the opposite.\n"
    "Der Weise redet wenig und hört viel zu.\n";

}  // namespace

TEST_CASE("peft finetune --text trains on the tokenizer's ids, --val gives the held-out loss", "[cli][models][text]") {
  peft_test::scratch_dir s("peft_cli_text");
  const auto model = make_model(s.dir / "model");
  std::ofstream(s.dir / "train.txt") << corpus;
  // The rows the CLI must build: the tokenizer's ids (BOS first, EOS last) in rows of 16.
  const auto tok = peft::models::tokenizer::load(model);
  peft::models::text_data_options o;
  o.seq_len = 16;
  o.eos = 2;
  const auto d = peft::models::read_text_data(s.dir / "train.txt", tok, o);
  REQUIRE(d.rows.size() >= 3);
  {
    std::ofstream t(s.dir / "train_ids.txt");
    for (const auto& r : d.rows) {
      for (std::size_t k = 0; k < r.ids.size(); ++k) t << (k ? " " : "") << r.ids[k];
      t << "\n";
    }
  }
  const std::string common = " --method lora --rank 4 --alpha 8 --targets q_proj,v_proj,down_proj --steps 4 --lr 5e-2 --seed 5 --threads 1 --batch " +
                             std::to_string(d.rows.size());
  const auto text = run_cli("finetune --model " + quoted(model) + " --text " + quoted(s.dir / "train.txt") + " --seq-len 16 --val " +
                                quoted(s.dir / "train.txt") + " --val-every 1 --log " + quoted(s.dir / "text.csv") + " --out " +
                                quoted(s.dir / "a_text") + common,
                            s.dir);
  INFO(text.err);
  REQUIRE(text.status == 0);
  CHECK_THAT(text.err, Catch::Contains("val ") && Catch::Contains("tok/s") && Catch::Contains("left"));
  const auto ids = run_cli("finetune --model " + quoted(model) + " --tokens " + quoted(s.dir / "train_ids.txt") + " --log " +
                               quoted(s.dir / "ids.csv") + " --out " + quoted(s.dir / "a_ids") + common,
                           s.dir);
  REQUIRE(ids.status == 0);
  const auto loss_text = log_column(slurp(s.dir / "text.csv"), "loss"), loss_ids = log_column(slurp(s.dir / "ids.csv"), "loss");
  const auto val = log_column(slurp(s.dir / "text.csv"), "val_loss"), ppl = log_column(slurp(s.dir / "text.csv"), "val_ppl");
  REQUIRE(loss_text.size() == 4);
  CHECK(loss_text == loss_ids);  // the same rows
  CHECK(loss_text.front() > 1.0);
  // The validation file is the training data and one batch holds all of it: the validation loss
  // after step s is the training loss of step s + 1 (before its update).
  for (std::size_t k = 0; k + 1 < loss_text.size(); ++k) {
    CHECK(val[k] == Approx(loss_text[k + 1]).epsilon(1e-5));
    CHECK(ppl[k] == Approx(std::exp(val[k])).epsilon(1e-6));
  }
  CHECK(val.back() < loss_text.front());
  CHECK(slurp(s.dir / "a_text" / "adapter_model.safetensors") == slurp(s.dir / "a_ids" / "adapter_model.safetensors"));
}

TEST_CASE("peft finetune --jsonl prompt/completion counts the completion's loss only", "[cli][models][text]") {
  peft_test::scratch_dir s("peft_cli_jsonl");
  const auto model = make_model(s.dir / "model");
  std::ofstream(s.dir / "train.jsonl") << "{\"prompt\": \"Translate: good morning ->\", \"completion\": \" buongiorno\"}\n"
                                          "{\"prompt\": \"Translate: thank you ->\", \"completion\": \" grazie\", \"source\": \"x\"}\n"
                                          "\n"
                                          "{\"text\": \"Il mattino ha l'oro in bocca.\"}\n";
  const auto r = run_cli("finetune --model " + quoted(model) + " --jsonl " + quoted(s.dir / "train.jsonl") +
                             " --method lora --rank 2 --alpha 4 --targets q_proj,v_proj --steps 1 --batch 3 --lr 1e-2 --threads 1 --log " +
                             quoted(s.dir / "log.csv") + " --out " + quoted(s.dir / "a"),
                         s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  const double cli_loss = log_column(slurp(s.dir / "log.csv"), "loss").at(0);
  // The same loss here: the model at init (LoRA's B = 0: the base), the rows, the masked labels.
  const auto tok = peft::models::tokenizer::load(model);
  peft::models::text_data_options o;
  o.seq_len = 64;
  o.eos = 2;
  const auto d = peft::models::read_text_data(s.dir / "train.jsonl", tok, o);
  REQUIRE(d.rows.size() == 3);
  CHECK(d.rows[0].prompt_tokens > 3);
  CHECK(d.rows[2].prompt_tokens == 0);
  auto lm = peft::models::causal_lm<double, peft::dense<double>>::load(model);
  const auto b = peft::models::token_batch::from_rows(d.id_rows());
  std::vector<std::size_t> prompts;
  for (const auto& row : d.rows) prompts.push_back(row.prompt_tokens);
  const double masked = lm.loss(b, peft::models::training_labels(b, prompts));
  const double unmasked = lm.loss(b, b.causal_labels());
  CHECK(cli_loss == Approx(masked).epsilon(1e-5));
  CHECK(std::abs(masked - unmasked) > 1e-3);  // the mask matters for this data
}

TEST_CASE("peft generate --prompt prints the decoded continuation of the prompt's ids", "[cli][models][text]") {
  peft_test::scratch_dir s("peft_cli_prompt");
  const auto model = make_model(s.dir / "model");
  const auto tok = peft::models::tokenizer::load(model);
  const std::string prompt = "Il cane pigro";
  const auto ids = tok.encode(prompt, true);
  {
    std::ofstream t(s.dir / "prompt.txt");
    for (std::size_t k = 0; k < ids.size(); ++k) t << (k ? " " : "") << ids[k];
    t << "\n";
  }
  const auto by_ids = run_cli("generate --model " + quoted(model) + " --tokens " + quoted(s.dir / "prompt.txt") + " --max-new-tokens 8 --ignore-eos", s.dir);
  REQUIRE(by_ids.status == 0);
  std::vector<long long> all = ids, fresh;
  std::istringstream in(by_ids.out);
  for (long long v; in >> v;) fresh.push_back(v);
  REQUIRE(fresh.size() == 8);
  all.insert(all.end(), fresh.begin(), fresh.end());
  const auto by_text = run_cli("generate --model " + quoted(model) + " --prompt '" + prompt + "' --max-new-tokens 8 --ignore-eos", s.dir);
  INFO(by_text.err);
  REQUIRE(by_text.status == 0);
  const std::string whole = tok.decode(all, true), head = tok.decode(ids, true);
  REQUIRE(whole.substr(0, head.size()) == head);
  CHECK(by_text.out == whole.substr(head.size()) + "\n");
  CHECK(!whole.substr(head.size()).empty());

  // Bad use: one line, exit 2.
  for (const auto& [args, expect] : std::vector<std::pair<std::string, std::string>>{
           {"generate --model " + quoted(model) + " --prompt hi --tokens " + quoted(s.dir / "prompt.txt") + " --max-new-tokens 2", "not both"},
           {"finetune --model " + quoted(model) + " --text " + quoted(s.dir / "prompt.txt") + " --tokens " + quoted(s.dir / "prompt.txt") +
                " --method lora --steps 1 --batch 1 --lr 1 --out " + quoted(s.dir / "x"),
            "one of --tokens, --text and --jsonl"},
           {"finetune --model " + quoted(model) + " --text " + quoted(s.dir / "prompt.txt") + " --val-every 2 --method lora --steps 1 --batch 1 --lr 1 --out " +
                quoted(s.dir / "x"),
            "--val-every needs --val"},
           {"finetune --model " + quoted(model) + " --text " + quoted(s.dir / "prompt.txt") + " --seq-len 65 --method lora --steps 1 --batch 1 --lr 1 --out " +
                quoted(s.dir / "x"),
            "64 positions"},
           {"finetune --model " + quoted(model) + " --jsonl " + quoted(s.dir / "prompt.txt") + " --method lora --steps 1 --batch 1 --lr 1 --out " +
                quoted(s.dir / "x"),
            "line 1 is not a JSON object"},
       }) {
    const auto e = run_cli(args, s.dir);
    INFO(args << "\n" << e.err);
    CHECK(e.status == 2);
    CHECK(peft_test::lines(e.err) == 1);
    CHECK_THAT(e.err, Catch::Contains(expect));
    CHECK(!fs::exists(s.dir / "x"));
  }
}

}  // namespace test_cli_text

#endif
