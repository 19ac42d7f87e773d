// The `peft` command-line tool as a user runs it: exit codes, one-line errors, no output file
// left behind on failure, and the merge reproducing PEFT's merged Llama.
#include <catch2/catch.hpp>

#ifdef PEFT_CLI_PATH

#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "peft/base/int8_rowwise.hpp"
#include "peft/base/q4_0.hpp"
#include "peft/base/quantized_formats.hpp"
#include "peft/io/gguf.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/models/peft_model.hpp"
#include "peft/models/text_data.hpp"
#include "peft/models/token_file.hpp"
#include "peft/train/dynamic_rank_trainer.hpp"
#include "peft/train/loraplus.hpp"
#include "peft/train/optimizer.hpp"
#include "peft/train/sora_trainer.hpp"
#include "support/cli_support.hpp"
#include "support/file_support.hpp"
#include "support/test_support.hpp"

namespace test_cli {

namespace {

namespace fs = std::filesystem;
const fs::path data = fs::path(PEFT_TEST_DATA_DIR);
const fs::path llama = data / "models" / "llama_lora";

using peft_test::lines;
using peft_test::run_cli;
using peft_test::run_result;
using peft_test::slurp;

struct scratch_dir : peft_test::scratch_dir {
  explicit scratch_dir(const std::string& n) : peft_test::scratch_dir("peft_cli_" + n) {}
};

}  // namespace

TEST_CASE("peft merge reproduces PEFT's merged Llama tensor by tensor", "[cli]") {
  scratch_dir s("merge");
  const auto out = s.dir / "merged.safetensors";
  const auto r = run_cli("merge --base '" + (llama / "base" / "model.safetensors").string() + "' --adapter '" +
                             (llama / "adapter").string() + "' --out '" + out.string() + "'",
                         s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(r.err.empty());
  const auto merged = peft::io::safetensors_file::open(out);
  const auto reference = peft::io::safetensors_file::open(llama / "reference.safetensors");
  REQUIRE(merged.tensors().size() == 21);
  int changed = 0;
  for (const auto& t : reference.tensors()) {
    INFO(t.name);
    const auto got = merged.read_matrix<double>(t.name), want = reference.read_matrix<double>(t.name);
    CHECK(peft_test::rel_error(got, want) < 1e-6);
    const auto base = peft::io::safetensors_file::open(llama / "base" / "model.safetensors");
    if (!peft_test::exactly_equal(base.read_matrix<double>(t.name), want)) ++changed;
  }
  CHECK(changed == 4);
}

TEST_CASE("peft merge --dtype bf16 writes BF16 tensors", "[cli]") {
  scratch_dir s("dtype");
  const auto out = s.dir / "merged.safetensors";
  const auto r = run_cli("merge --base '" + (llama / "base").string() + "' --adapter '" + (llama / "adapter").string() +
                             "' --out '" + out.string() + "' --dtype bf16",
                         s.dir);
  REQUIRE(r.status == 0);
  const auto merged = peft::io::safetensors_file::open(out);
  for (const auto& t : merged.tensors()) CHECK(t.type == peft::dtype::bf16);
}

TEST_CASE("peft merge --quantized-base re-quantizes the merged weights and says so", "[cli][quantized]") {
  const auto base = peft::io::safetensors_file::open(llama / "base" / "model.safetensors");
  const auto reference = peft::io::safetensors_file::open(llama / "reference.safetensors");
  for (const std::string format : {"int8", "q4_0"}) {
    INFO(format);
    scratch_dir s("quantized_" + format);
    const auto out = s.dir / "merged.safetensors";
    const auto r = run_cli("merge --base '" + (llama / "base").string() + "' --adapter '" + (llama / "adapter").string() +
                               "' --out '" + out.string() + "' --quantized-base " + format,
                           s.dir);
    INFO(r.err);
    REQUIRE(r.status == 0);
    CHECK(r.err.find("re-quantized to " + format) != std::string::npos);
    CHECK(lines(r.err) == 1);
    const auto merged = peft::io::safetensors_file::open(out);
    int requantized = 0;
    for (const auto& t : reference.tensors()) {
      INFO(t.name);
      const auto w0 = base.read_matrix<double>(t.name), want = reference.read_matrix<double>(t.name);
      const auto got = merged.read_matrix<double>(t.name);
      if (peft_test::exactly_equal(w0, want)) {  // not adapted: copied bit for bit
        CHECK(peft_test::exactly_equal(got, w0));
        continue;
      }
      ++requantized;
      // Independently: Wq = deq(Q(W0)); LoRA's delta does not depend on the base, so the merged
      // weight is deq(Q(Wq + (reference - W0))).
      const peft::matrix_view<const double> w0v = w0.view();
      peft::matrix<double> expect_in(w0.rows(), w0.cols());
      auto requant = [&](auto q0) {
        using Q = decltype(q0);
        std::vector<double> row(static_cast<std::size_t>(w0.cols()));
        for (peft::index i = 0; i < w0.rows(); ++i) {
          q0.dequantize_row(i, row.data());
          for (peft::index j = 0; j < w0.cols(); ++j) expect_in(i, j) = row[static_cast<std::size_t>(j)] + (want(i, j) - w0(i, j));
        }
        const Q q1 = Q::quantize(peft::matrix_view<const double>(expect_in.view()));
        peft::matrix<double> expect(w0.rows(), w0.cols());
        for (peft::index i = 0; i < w0.rows(); ++i) q1.dequantize_row(i, expect.view().row(i));
        return expect;
      };
      const auto expect = format == "int8" ? requant(peft::int8_rowwise::quantize(w0v)) : requant(peft::q4_0::quantize(w0v));
      REQUIRE(peft_test::max_abs(got) > 0.0);  // 4-bit rounds many small weights to 0: not "nontrivial"
      CHECK(peft_test::rel_error(got, expect) < 1e-6);
      // Re-quantization is visible: the output differs from the exact merge, but not by much.
      CHECK_FALSE(peft_test::exactly_equal(got, want));
      CHECK(peft_test::rel_error(got, want) < (format == "int8" ? 0.02 : 0.2));
    }
    CHECK(requantized == 4);
  }
}

TEST_CASE("peft inspect reports method, targets, shapes, parameter count and dtype", "[cli]") {
  scratch_dir s("inspect");
  const auto r = run_cli("inspect '" + (llama / "adapter").string() + "'", s.dir);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.out, Catch::Contains("lora") && Catch::Contains("q_proj, v_proj") && Catch::Contains("F32") &&
                        Catch::Contains("3584") && Catch::Contains("model.layers.1.self_attn.v_proj.weight") &&
                        Catch::Contains("32 x 64"));
}

TEST_CASE("peft exits 2 with one line on stderr and leaves no output on bad input", "[cli][errors]") {
  scratch_dir s("errors");
  const auto out = s.dir / "out.safetensors";
  const std::string base = "'" + (llama / "base" / "model.safetensors").string() + "'";
  const std::string adapter = "'" + (llama / "adapter").string() + "'";
  std::ofstream(s.dir / "garbage.safetensors") << "this is not a safetensors file at all";
  const std::string cases[] = {
      "",                                                                                   // no command
      "frobnicate",                                                                         // unknown command
      "inspect",                                                                            // missing argument
      "inspect '" + (s.dir / "missing").string() + "'",                                    // no such adapter
      "merge --base " + base + " --adapter " + adapter,                                    // no --out
      "merge --base " + base + " --adapter " + adapter + " --out '" + out.string() + "' --dtype q7",
      "merge --base " + base + " --adapter " + adapter + " --out '" + out.string() + "' --quantized-base q3",
      "merge --base '" + (s.dir / "garbage.safetensors").string() + "' --adapter " + adapter + " --out '" + out.string() + "'",
      "merge --base " + base + " --adapter '" + (data / "peft" / "lora" / "adapter").string() + "' --out '" + out.string() + "'",
      "merge --base '" + (s.dir / "missing.safetensors").string() + "' --adapter " + adapter + " --out '" + out.string() + "'",
  };
  for (const auto& args : cases) {
    INFO("peft " << args);
    const auto r = run_cli(args, s.dir);
    CHECK(r.status == 2);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.rfind("peft: ", 0) == 0);
    CHECK_FALSE(fs::exists(out));
  }
  for (const auto& e : fs::directory_iterator(s.dir)) {
    CHECK(e.path().filename().string().find(".tmp") == std::string::npos);
  }
}


// ---- language models: peft logits | generate | finetune ------------------------------------

namespace {
const fs::path lm = data / "lm";
std::string q(const fs::path& p) { return "'" + p.string() + "'"; }

/// Each (arguments, expected text) case exits 2 with one line on stderr holding the text, and
/// none of `outputs` exists afterwards (removed between cases, so one failure does not cascade).
void expect_usage_errors(const std::vector<std::pair<std::string, std::string>>& cases, const fs::path& dir,
                         const std::vector<fs::path>& outputs) {
  for (const auto& [args, what] : cases) {
    INFO(args);
    const auto r = run_cli(args, dir);
    INFO(r.err);
    CHECK(r.status == 2);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find(what) != std::string::npos);
    for (const auto& o : outputs) {
      CHECK(!fs::exists(o));
      fs::remove_all(o);
    }
  }
}

std::vector<double> csv_losses(const fs::path& p) {
  std::ifstream in(p);
  std::string line;
  std::getline(in, line);
  REQUIRE(line.rfind("step,loss", 0) == 0);
  std::vector<double> out;
  long long want = 0;
  while (std::getline(in, line)) {
    const auto c1 = line.find(','), c2 = line.find(',', c1 + 1);
    CHECK(std::stoll(line.substr(0, c1)) == want++);
    out.push_back(std::stod(line.substr(c1 + 1, c2 - c1 - 1)));
  }
  return out;
}

// The parameters the tool's optimizer steps.
template <class Model>
std::vector<peft::parameter<double>> trainable_parameters(Model& m) {
  std::vector<peft::parameter<double>> params;
  for (auto& p : m.parameters()) {
    if (p.trainable) params.push_back(p);
  }
  return params;
}

/// The tool's training loop in process: `logged.size()` optimizer steps of `opt` on model `m`,
/// step s on token rows (s * batch + i) % rows.size() for i < batch (how `peft finetune --batch`
/// reads a token file), each loss checked against the tool's log.
template <class Model, class Optimizer>
void replay_finetune(Model& m, Optimizer& opt, const std::vector<std::vector<long long>>& rows, long long batch,
                     const std::vector<double>& logged) {
  for (std::size_t step = 0; step < logged.size(); ++step) {
    INFO("step " << step);
    std::vector<std::vector<long long>> lines;
    for (long long i = 0; i < batch; ++i) {
      lines.push_back(rows[(step * static_cast<std::size_t>(batch) + static_cast<std::size_t>(i)) % rows.size()]);
    }
    const auto b = peft::models::token_batch::from_rows(lines);
    const auto labels = peft::models::training_labels(b, std::vector<std::size_t>(lines.size(), 0));
    m.zero_grad();
    const double loss = m.loss_and_backward(b, labels, static_cast<double>(m.predicted_tokens(b, labels)));
    CHECK(loss == Approx(logged[step]).epsilon(1e-8));
    opt.step();
  }
}
}  // namespace

TEST_CASE("peft logits writes transformers+PEFT's logits as one F32 tensor", "[cli][models]") {
  scratch_dir s("logits");
  for (const std::string c : {"llama", "gpt2"}) {
    INFO(c);
    const auto out = s.dir / (c + ".safetensors");
    const auto r = run_cli("logits --model " + q(lm / c) + " --adapter " + q(lm / c / "adapters" / "dora") + " --tokens " +
                               q(lm / c / "tokens.txt") + " --out " + q(out),
                           s.dir);
    INFO(r.err);
    REQUIRE(r.status == 0);
    const auto got = peft::io::safetensors_file::open(out);
    REQUIRE(got.tensors().size() == 1);
    const auto& t = got.info("logits");
    CHECK(t.type == peft::dtype::f32);
    CHECK(t.shape == std::vector<std::int64_t>{3, 7, 96});
    const auto want = peft::io::safetensors_file::open(lm / c / "adapters" / "dora.reference.safetensors").read<double>("logits");
    const auto have = got.read<double>("logits");
    double diff = 0, scale = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      diff = std::max(diff, std::abs(have[i] - want[i]));
      scale = std::max(scale, std::abs(want[i]));
    }
    CHECK(scale > 0.1);
    CHECK(diff < 1e-5 * scale);
  }
}

TEST_CASE("peft logits --quantize-base runs the model over each quantized format", "[cli][models][quantized]") {
  scratch_dir s("quantize_base");
  const auto want = peft::io::safetensors_file::open(lm / "llama" / "adapters" / "dora.reference.safetensors").read<double>("logits");
  double scale = 0;
  for (const double v : want) scale = std::max(scale, std::abs(v));
  REQUIRE(scale > 0.1);
  std::vector<std::vector<double>> seen;
  peft::for_each_quantized_format([&](auto format) {
    const std::string name(peft::quantized_cli_name<typename decltype(format)::type>);
    INFO(name);
    const auto out = s.dir / (name + ".safetensors");
    const auto r = run_cli("logits --model " + q(lm / "llama") + " --adapter " + q(lm / "llama" / "adapters" / "dora") +
                               " --tokens " + q(lm / "llama" / "tokens.txt") + " --quantize-base " + name + " --out " + q(out),
                           s.dir);
    INFO(r.err);
    REQUIRE(r.status == 0);
    const auto have = peft::io::safetensors_file::open(out).read<double>("logits");
    REQUIRE(have.size() == want.size());
    double diff = 0;
    for (std::size_t i = 0; i < want.size(); ++i) diff = std::max(diff, std::abs(have[i] - want[i]));
    // The weights really were quantized, and the model is the same function to the format's
    // precision (this random tiny model measured: 8 bits 1.4%, q6_k 3.7%, 4 bits 16-23% of max |logit|).
    const double bound = name == "int8" || name == "q8_0" ? 0.03 : name == "q6_k" ? 0.08 : 0.35;
    CHECK(diff > 1e-6 * scale);
    CHECK(diff < bound * scale);
    for (const auto& other : seen) CHECK(other != have);  // each format its own weights
    seen.push_back(have);
  });
  CHECK(seen.size() == peft::quantized_formats::size);
  const auto bad = run_cli("logits --model " + q(lm / "llama") + " --tokens " + q(lm / "llama" / "tokens.txt") +
                               " --quantize-base q5_1 --out " + q(s.dir / "bad.safetensors"),
                           s.dir);
  CHECK(bad.status == 2);
  CHECK_THAT(bad.err, Catch::Contains("--quantize-base must be one of") && Catch::Contains("'q5_1'"));
  CHECK(lines(bad.err) == 1);
  CHECK_FALSE(fs::exists(s.dir / "bad.safetensors"));
}

TEST_CASE("peft generate prints transformers' greedy continuation", "[cli][models]") {
  scratch_dir s("generate");
  const auto r = run_cli("generate --model " + q(lm / "qwen3") + " --adapter " + q(lm / "qwen3" / "adapters" / "lora") +
                             " --tokens " + q(lm / "qwen3" / "tokens.txt") + " --max-new-tokens 6",
                         s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  const auto want = peft::io::safetensors_file::open(lm / "qwen3" / "adapters" / "lora.reference.safetensors").read<long long>("generated");
  std::string expected;
  for (std::size_t i = 0; i < 3; ++i) {
    for (std::size_t t = 0; t < 6; ++t) expected += (t ? " " : "") + std::to_string(want[i * 6 + t]);
    expected += "\n";
  }
  CHECK(r.out == expected);
  // Sampling is reproducible from its seed.
  const std::string sample = "generate --model " + q(lm / "qwen3") + " --tokens " + q(lm / "qwen3" / "tokens.txt") +
                             " --max-new-tokens 5 --temperature 0.9 --top-k 20 --top-p 0.9 --seed 4";
  const auto a = run_cli(sample, s.dir), b = run_cli(sample, s.dir);
  REQUIRE(a.status == 0);
  CHECK(a.out == b.out);
  CHECK(lines(a.out) == 3);
}

TEST_CASE("peft finetune follows PEFT+torch's AdamW trajectory, saves a checkpoint PEFT loads, resumes exactly",
          "[cli][models]") {
  scratch_dir s("finetune");
  const fs::path model = lm / "mistral";
  const auto out = s.dir / "adapter";
  const auto r = run_cli("finetune --model " + q(model) + " --adapter " + q(model / "adapters" / "lora") + " --tokens " +
                             q(model / "tokens.txt") + " --steps 4 --batch 3 --lr 1e-2 --weight-decay 0.01 " +
                             "--precision f64 --log " + q(s.dir / "log.csv") + " --out " + q(out),
                         s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  const auto ref = peft::io::safetensors_file::open(model / "adapters" / "lora.reference.safetensors");
  const auto want = ref.read<double>("train.losses");
  const auto got = csv_losses(s.dir / "log.csv");
  REQUIRE(got.size() == 4);
  for (std::size_t i = 0; i < 4; ++i) CHECK(got[i] == Approx(want[i]).epsilon(1e-8));
  // The trained adapter equals torch's, tensor by tensor.
  const auto saved = peft::io::safetensors_file::open(out / "adapter_model.safetensors");
  for (const auto& t : saved.tensors()) {
    INFO(t.name);
    const auto a = saved.read<double>(t.name), b = ref.read<double>("train." + t.name);
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i] == Approx(b[i]).epsilon(1e-6).margin(1e-7));
  }
  CHECK(fs::exists(out / "adapter_config.json"));
  CHECK(fs::exists(out / "optimizer.safetensors"));

  // A fresh adapter, gradient accumulation over micro-batches, stopped after 3 steps and resumed:
  // the same losses as one uninterrupted run.
  const std::string fresh = "finetune --model " + q(model) + " --method lora --rank 4 --alpha 8 --targets all-linear " +
                            "--tokens " + q(model / "tokens.txt") + " --batch 2 --lr 1e-2 --seed 3 ";
  REQUIRE(run_cli(fresh + "--steps 6 --log " + q(s.dir / "a.csv") + " --out " + q(s.dir / "a"), s.dir).status == 0);
  REQUIRE(run_cli(fresh + "--steps 6 --grad-accum 2 --log " + q(s.dir / "c.csv") + " --out " + q(s.dir / "c"), s.dir).status == 0);
  REQUIRE(run_cli(fresh + "--steps 3 --log " + q(s.dir / "b.csv") + " --out " + q(s.dir / "b"), s.dir).status == 0);
  const auto resumed = run_cli("finetune --model " + q(model) + " --tokens " + q(model / "tokens.txt") +
                                   " --batch 2 --lr 1e-2 --steps 6 --resume --log " + q(s.dir / "b.csv") + " --out " +
                                   q(s.dir / "b"),
                               s.dir);
  INFO(resumed.err);
  REQUIRE(resumed.status == 0);
  const auto la = csv_losses(s.dir / "a.csv"), lb = csv_losses(s.dir / "b.csv"), lc = csv_losses(s.dir / "c.csv");
  REQUIRE(la.size() == 6);
  REQUIRE(lb.size() == 6);
  REQUIRE(lc.size() == 6);
  for (std::size_t i = 0; i < 6; ++i) {
    CHECK(lb[i] == la[i]);
    CHECK(lc[i] == Approx(la[i]).epsilon(1e-5));
  }
  CHECK(la[5] < la[0]);
}

TEST_CASE("peft finetune --full trains every weight as torch does and saves a model directory", "[cli][models]") {
  scratch_dir s("finetune_full");
  const fs::path model = lm / "qwen3";
  const auto out = s.dir / "model";
  const auto r = run_cli("finetune --model " + q(model) + " --full --tokens " + q(model / "tokens.txt") +
                             " --steps 4 --batch 3 --lr 1e-3 --precision f64 --log " + q(s.dir / "log.csv") + " --out " +
                             q(out),
                         s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  const auto want = peft::io::safetensors_file::open(model / "full.reference.safetensors").read<double>("train.losses");
  const auto got = csv_losses(s.dir / "log.csv");
  REQUIRE(got.size() == 4);
  for (std::size_t i = 0; i < 4; ++i) CHECK(got[i] == Approx(want[i]).epsilon(1e-8));
  // The saved directory is a model: peft logits reads it.
  REQUIRE(fs::exists(out / "config.json"));
  const auto l = run_cli("logits --model " + q(out) + " --tokens " + q(model / "tokens.txt") + " --out " +
                             q(s.dir / "logits.safetensors"),
                         s.dir);
  INFO(l.err);
  CHECK(l.status == 0);
}

TEST_CASE("peft finetune --method dynamic_rank|sora trains the ranks as the library does and saves the compacted LoRA",
          "[cli][models]") {
  scratch_dir s("finetune_trained_rank");
  const fs::path model = lm / "llama";
  const auto rows = peft::models::read_token_file(model / "tokens.txt");
  const auto all = peft::models::token_batch::from_rows(rows);
  using peft::index;
  const index steps = 8, batch = 2;
  for (const std::string method : {"dynamic_rank", "sora"}) {
    INFO("method " << method);
    const bool dyn = method == "dynamic_rank";
    const auto out = s.dir / method;
    const auto r = run_cli("finetune --model " + q(model) + " --method " + method +
                               " --rank 2 --alpha 4 --targets all-linear --tokens " + q(model / "tokens.txt") +
                               " --steps 8 --batch 2 --lr 2e-2 --seed 3 --precision f64 --log " + q(s.dir / "log.csv") +
                               " --out " + q(out) + (dyn ? "" : " --sora-xi 4"),
                           s.dir);
    INFO(r.err);
    REQUIRE(r.status == 0);
    CHECK(r.err.find("saved as a LoRA") != std::string::npos);
    // The same training in this process: peft_model, AdamW, the method's trainer, compaction.
    peft::models::peft_model<double> pm(peft::models::causal_lm<double>::load(model), model.string());
    peft::models::adapter_options o;
    o.method = method;
    o.rank = 2;
    o.alpha = 4;
    o.targets = {"all-linear"};
    o.seed = 3;
    pm.add_adapter("default", o);
    auto& m = pm.model();
    std::vector<peft::parameter<double>> params;
    for (auto& p : m.parameters()) {
      if (p.trainable && (dyn || !p.name.ends_with("lora_gate"))) params.push_back(p);
    }
    std::optional<peft::train::dynamic_rank_trainer<double>> dr;
    std::optional<peft::train::sora_trainer<double>> so;
    if (dyn) {
      dr.emplace(pm.adapters_of<peft::dynamic_rank<double>>(),
                 peft::train::dynamic_rank_schedule_options{.total_steps = steps, .target_rank = 2});
    } else {
      so.emplace(pm.adapters_of<peft::sora<double>>(), peft::train::sora_training_options{.xi0 = 4});
    }
    peft::train::adamw<double> opt(params, {.lr = 2e-2, .weight_decay = 0.0});  // the tool's default decay
    const auto logged = csv_losses(s.dir / "log.csv");
    REQUIRE(logged.size() == 8);
    for (index step = 0; step < steps; ++step) {
      std::vector<std::vector<long long>> lines;
      for (index i = 0; i < batch; ++i) lines.push_back(rows[static_cast<std::size_t>((step * batch + i) % 3)]);
      const auto b = peft::models::token_batch::from_rows(lines);
      const std::vector<std::size_t> prompts(lines.size(), 0);
      const auto labels = peft::models::training_labels(b, prompts);
      m.zero_grad();
      const double loss = m.loss_and_backward(b, labels, static_cast<double>(m.predicted_tokens(b, labels)));
      CHECK(loss == Approx(logged[static_cast<std::size_t>(step)]).epsilon(1e-8));  // the log has 9 digits
      if (dr) dr->add_regularizer(step + 1);
      opt.step();
      if (dr) dr->after_step(step + 1);
      if (so) so->after_step(2e-2);
    }
    index kept = 0;
    for (auto k : dr ? dr->ranks() : so->ranks()) kept += k;
    CHECK(kept == (dyn ? 28 : kept));
    if (!dyn) CHECK(kept < 28);  // the threshold closed gates
    pm.compact_adapter();
    const auto want = m.forward(all);
    const auto base = peft::models::causal_lm<double>::load(model).forward(all);
    const auto got = peft::models::peft_model<double>::from_pretrained(peft::models::causal_lm<double>::load(model), out)
                         .model()
                         .forward(all);
    CHECK(peft_test::max_abs(peft_test::add(want, base, -1.0)) > 1e-3 * peft_test::max_abs(base));  // it trained
    // The saved LoRA (f32 tensors) gives the in-process model's logits.
    CHECK(peft_test::max_abs(peft_test::add(got, want, -1.0)) < 1e-6 * peft_test::max_abs(want));
    const auto cfg = nlohmann::json::parse(slurp(out / "adapter_config.json"));
    CHECK(cfg["peft_type"] == "LORA");
    CHECK(cfg["rank_pattern"].size() > 0);
  }
  const auto bad = run_cli("finetune --model " + q(model) + " --method sora --rank 2 --alpha 4 --tokens " +
                               q(model / "tokens.txt") + " --steps 4 --batch 2 --lr 1e-2 --save-every 2 --out " + q(s.dir / "x"),
                           s.dir);
  CHECK(bad.status == 2);
  CHECK(bad.err.find("--save-every") != std::string::npos);
  const auto bad_xi = run_cli("finetune --model " + q(model) + " --method lora --rank 2 --alpha 4 --tokens " +
                                  q(model / "tokens.txt") + " --steps 4 --batch 2 --lr 1e-2 --sora-xi 1 --out " + q(s.dir / "y"),
                              s.dir);
  CHECK(bad_xi.status == 2);
  CHECK(bad_xi.err.find("--sora-xi applies to --method sora") != std::string::npos);
}

TEST_CASE("peft finetune --loraplus-ratio steps B at R times the lr, as loraplus_groups does", "[cli][models][loraplus]") {
  scratch_dir s("finetune_loraplus");
  const fs::path model = lm / "llama";
  const auto rows = peft::models::read_token_file(model / "tokens.txt");
  const auto all = peft::models::token_batch::from_rows(rows);
  const auto out = s.dir / "dora";
  const auto r = run_cli("finetune --model " + q(model) + " --method dora --rank 2 --alpha 4 --targets all-linear --tokens " +
                             q(model / "tokens.txt") + " --steps 5 --batch 2 --lr 5e-3 --weight-decay 0.01 " +
                             "--loraplus-ratio 8 --seed 4 --precision f64 --log " + q(s.dir / "log.csv") + " --out " + q(out),
                         s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  peft::models::peft_model<double> pm(peft::models::causal_lm<double>::load(model), model.string());
  peft::models::adapter_options o;
  o.method = "dora";
  o.rank = 2;
  o.alpha = 4;
  o.targets = {"all-linear"};
  o.seed = 4;
  pm.add_adapter("default", o);
  auto& m = pm.model();
  const peft::train::adamw_options ao{.lr = 5e-3, .weight_decay = 0.01};
  peft::train::adamw<double> opt(trainable_parameters(m), ao, peft::train::loraplus_groups<double>(ao, {.lr_ratio = 8}));
  const auto logged = csv_losses(s.dir / "log.csv");
  REQUIRE(logged.size() == 5);
  replay_finetune(m, opt, rows, 2, logged);
  (void)m.parameters();  // DoRA's cached norms follow the last step (train/optimizer.hpp)
  const auto want = m.forward(all);
  const auto got = peft::models::peft_model<double>::from_pretrained(peft::models::causal_lm<double>::load(model), out)
                       .model()
                       .forward(all);
  CHECK(peft_test::max_abs(peft_test::add(got, want, -1.0)) < 1e-6 * peft_test::max_abs(want));
  CHECK(opt.groups()[3].name == "loraplus_B");
  CHECK(opt.groups()[3].options.lr == Approx(4e-2));
  const auto bad = run_cli("finetune --model " + q(model) + " --method lora --rank 2 --alpha 4 --tokens " +
                               q(model / "tokens.txt") + " --steps 2 --batch 2 --lr 1e-2 --loraplus-ratio 0 --out " +
                               q(s.dir / "x"),
                           s.dir);
  CHECK(bad.status == 2);
  CHECK(bad.err.find("--loraplus-ratio") != std::string::npos);
}

TEST_CASE("peft finetune --init pissa trains from PiSSA's start and saves the adapter PEFT saves", "[cli][models][decomposition]") {
  scratch_dir s("finetune_pissa");
  const fs::path model = lm / "llama";
  const auto rows = peft::models::read_token_file(model / "tokens.txt");
  const auto all = peft::models::token_batch::from_rows(rows);
  const auto out = s.dir / "pissa";
  const auto r = run_cli("finetune --model " + q(model) + " --method lora --init pissa --rank 2 --alpha 4 --targets all-linear "
                             "--tokens " + q(model / "tokens.txt") + " --steps 4 --batch 2 --lr 5e-3 --seed 4 --precision f64 "
                             "--log " + q(s.dir / "log.csv") + " --out " + q(out),
                         s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(peft::io::adapter_config::load(out).raw["init_lora_weights"] == "pissa");
  // The same training in process.
  peft::models::peft_model<double> pm(peft::models::causal_lm<double>::load(model), model.string());
  const auto before = pm.model().forward(all);
  peft::models::adapter_options o;
  o.method = "lora";
  o.init = "pissa";
  o.rank = 2;
  o.alpha = 4;
  o.targets = {"all-linear"};
  o.seed = 4;
  pm.add_adapter("default", o);
  auto& m = pm.model();
  CHECK(peft_test::max_abs(peft_test::add(m.forward(all), before, -1.0)) < 1e-10 * peft_test::max_abs(before));
  peft::train::adamw<double> opt(trainable_parameters(m), {.lr = 5e-3, .weight_decay = 0.0});  // the tool's default decay
  const auto logged = csv_losses(s.dir / "log.csv");
  REQUIRE(logged.size() == 4);
  replay_finetune(m, opt, rows, 2, logged);
  const auto want = m.forward(all);
  CHECK(peft_test::max_abs(peft_test::add(want, before, -1.0)) > 1e-6 * peft_test::max_abs(before));
  // Reloaded over the original model (the residual recomputed): the trained model's logits.
  const auto got = peft::models::peft_model<double>::from_pretrained(peft::models::causal_lm<double>::load(model), out)
                       .model()
                       .forward(all);
  CHECK(peft_test::max_abs(peft_test::add(got, want, -1.0)) < 1e-6 * peft_test::max_abs(want));
  for (const auto& [flags, says] : {std::pair{std::string("--method dora --init pissa"), "--init applies to --method lora"},
                                    std::pair{std::string("--method lora --init svd"), "--init must be pissa or olora"},
                                    std::pair{std::string("--method lora --init olora --quantize-base nf4"), "dense weights"},
                                    std::pair{std::string("--method lora --init olora --save-every 1"), "--resume or --save-every"}}) {
    const auto bad = run_cli("finetune --model " + q(model) + " " + flags + " --rank 2 --alpha 4 --tokens " +
                                 q(model / "tokens.txt") + " --steps 2 --batch 2 --lr 1e-2 --out " + q(s.dir / "x"),
                             s.dir);
    INFO(flags);
    CHECK(bad.status == 2);
    CHECK(bad.err.find(says) != std::string::npos);
    CHECK(!fs::exists(s.dir / "x"));
  }
}

#ifdef PEFT_MPIEXEC
TEST_CASE("mpirun -np 2 peft finetune gives one process's losses and adapter", "[cli][models][mpi]") {
  scratch_dir s("finetune_mpi");
  const fs::path model = lm / "gpt2";
  const std::string args = "finetune --model " + q(model) + " --method dora --rank 4 --alpha 8 --targets c_attn,c_fc " +
                           "--tokens " + q(model / "tokens.txt") + " --batch 3 --lr 1e-2 --steps 5 --threads 1 --seed 2 ";
  const auto one = run_cli(args + "--log " + q(s.dir / "one.csv") + " --out " + q(s.dir / "one"), s.dir);
  REQUIRE(one.status == 0);
  const std::string mpirun = std::string("'") + PEFT_MPIEXEC + "' --allow-run-as-root --oversubscribe -np 2 ";
  const auto out = s.dir / "stdout.txt", err = s.dir / "stderr.txt";
  const std::string cmd = mpirun + "'" + PEFT_CLI_PATH + "' " + args + "--log " + q(s.dir / "two.csv") + " --out " +
                          q(s.dir / "two") + " >" + q(out) + " 2>" + q(err);
  const int raw = std::system(cmd.c_str());
  INFO(slurp(err));
  REQUIRE(WIFEXITED(raw));
  REQUIRE(WEXITSTATUS(raw) == 0);
  const auto a = csv_losses(s.dir / "one.csv"), b = csv_losses(s.dir / "two.csv");
  REQUIRE(a.size() == 5);
  REQUIRE(b.size() == 5);
  for (std::size_t i = 0; i < 5; ++i) CHECK(b[i] == Approx(a[i]).epsilon(1e-5));
  const auto fa = peft::io::safetensors_file::open(s.dir / "one" / "adapter_model.safetensors");
  const auto fb = peft::io::safetensors_file::open(s.dir / "two" / "adapter_model.safetensors");
  REQUIRE(fa.tensors().size() == fb.tensors().size());
  for (const auto& t : fa.tensors()) {
    INFO(t.name);
    const auto x = fa.read<double>(t.name), y = fb.read<double>(t.name);
    for (std::size_t i = 0; i < x.size(); ++i) CHECK(y[i] == Approx(x[i]).epsilon(1e-4).margin(1e-6));
  }
}
#endif

TEST_CASE("peft logits|generate|finetune exit 2 with one line on bad input", "[cli][models][errors]") {
  scratch_dir s("lm_errors");
  const fs::path model = lm / "llama";
  std::ofstream(s.dir / "big.txt") << "1 2 96\n";
  std::ofstream(s.dir / "empty.txt") << "";
  std::string long_line;
  for (int i = 0; i < 65; ++i) long_line += "1 ";
  std::ofstream(s.dir / "long.txt") << long_line << "\n";
  fs::create_directories(s.dir / "falcon");
  std::ofstream(s.dir / "falcon" / "config.json") << R"({"model_type": "falcon"})";
  const std::string tokens = " --tokens " + q(model / "tokens.txt");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"logits --model " + q(model) + " --tokens " + q(s.dir / "big.txt") + " --out " + q(s.dir / "o.st"), "token id 96"},
      {"logits --model " + q(model) + " --tokens " + q(s.dir / "empty.txt") + " --out " + q(s.dir / "o.st"), "no sequence"},
      {"logits --model " + q(model) + " --tokens " + q(s.dir / "long.txt") + " --out " + q(s.dir / "o.st"), "64 positions"},
      {"logits --model " + q(s.dir / "falcon") + tokens + " --out " + q(s.dir / "o.st"), "falcon"},
      {"logits --model " + q(model) + " --adapter " + q(lm / "gpt2" / "adapters" / "lora") + tokens + " --out " +
           q(s.dir / "o.st"),
       "not a projection"},
      {"logits --model " + q(model) + tokens, "needs --out"},
      {"generate --model " + q(model) + tokens + " --max-new-tokens 60", "64 positions"},
      {"finetune --model " + q(model) + tokens + " --method lora --steps 2 --batch 1 --lr 1e-3", "needs --out"},
      {"finetune --model " + q(model) + tokens + " --method nosuch --steps 2 --batch 1 --lr 1e-3 --out " + q(s.dir / "f"),
       "nosuch"},
      {"finetune --model " + q(model) + tokens + " --steps 2 --batch 1 --lr 1e-3 --resume --out " + q(s.dir / "f"),
       "trainer_state.json"},
  };
  expect_usage_errors(cases, s.dir, {s.dir / "o.st", s.dir / "f"});
}

/// A copy of GGUF file `src` at `dst` with one tensor or key changed by `edit(writer, name,
/// info, bytes)` (return false to keep the tensor as it is).
template <class Edit>
void rewrite_gguf(const fs::path& src, const fs::path& dst, const std::string& key, peft::io::gguf_value value, Edit edit) {
  const auto f = peft::io::gguf_file::open(src);
  peft::io::gguf_writer w;
  for (const auto& [k, v] : f.metadata()) w.set(k, k == key ? value : v);
  if (!key.empty() && f.find(key) == nullptr) w.set(key, value);
  for (const auto& t : f.tensors()) {
    if (!edit(w, t)) w.add_tensor(t.name, t.type, t.ne, f.bytes(t));
  }
  w.write(dst);
}

TEST_CASE("peft logits over a llama.cpp Q4_K_M file gives its dequantized weights' logits", "[cli][gguf]") {
  scratch_dir s("gguf_logits");
  const fs::path g = data / "gguf";
  const auto out = s.dir / "logits.safetensors";
  const auto r = run_cli("logits --model " + q(g / "llama" / "q4_k_m.gguf") + " --adapter " + q(g / "llama" / "peft_lora") +
                             " --tokens " + q(g / "tokens.txt") + " --out " + q(out),
                         s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  const auto have = peft::io::safetensors_file::open(out).read<float>("logits");
  const auto ref = peft::io::safetensors_file::open(g / "llama" / "reference.safetensors");
  // Row-padded batch (2, 24, 320): line 1 has 10 tokens.
  for (int line = 0; line < 2; ++line) {
    const auto want = ref.read_matrix<float>("dequant_lora.q4_k_m." + std::to_string(line));
    double diff = 0, scale = 0;
    for (peft::index t = 0; t < want.rows(); ++t) {
      for (peft::index v = 0; v < want.cols(); ++v) {
        diff = std::max(diff, std::abs(static_cast<double>(have[static_cast<std::size_t>((line * 24 + t) * 320 + v)]) - want(t, v)));
        scale = std::max(scale, std::abs(static_cast<double>(want(t, v))));
      }
    }
    CHECK(scale > 0.5);
    CHECK(diff < 1e-4 * scale);
  }
}

TEST_CASE("peft export --gguf and import --gguf round-trip an rsLoRA adapter with patterns", "[cli][gguf]") {
  scratch_dir s("gguf_export");
  const fs::path g = data / "gguf" / "llama";
  auto r = run_cli("export --gguf " + q(g / "peft_lora_patterns") + " --model " + q(g / "q4_k_m.gguf") + " --out " +
                       q(s.dir / "a.gguf"),
                   s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  r = run_cli("import --gguf " + q(s.dir / "a.gguf") + " --out " + q(s.dir / "back"), s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  r = run_cli("logits --model " + q(g / "hf") + " --adapter " + q(s.dir / "back") + " --tokens " +
                  q(g.parent_path() / "tokens.txt") + " --out " + q(s.dir / "l.safetensors"),
              s.dir);
  REQUIRE(r.status == 0);
  const auto have = peft::io::safetensors_file::open(s.dir / "l.safetensors").read<float>("logits");
  const auto want = peft::io::safetensors_file::open(g / "reference.safetensors").read_matrix<float>("hf_lora_patterns.0");
  double diff = 0, scale = 0;
  for (peft::index i = 0; i < want.size(); ++i) {  // line 0 is the first 24 x 320 values
    diff = std::max(diff, std::abs(static_cast<double>(have[static_cast<std::size_t>(i)]) - want.data()[i]));
    scale = std::max(scale, std::abs(static_cast<double>(want.data()[i])));
  }
  CHECK(scale > 0.5);
  CHECK(diff < 1e-4 * scale);
}

TEST_CASE("peft exits 2 with one line on bad GGUF input and leaves no output", "[cli][gguf][errors]") {
  scratch_dir s("gguf_errors");
  const fs::path g = data / "gguf";
  const fs::path good = g / "llama" / "q8_0.gguf";
  {  // truncated
    const std::string bytes = slurp(good);
    std::ofstream(s.dir / "cut.gguf", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  rewrite_gguf(good, s.dir / "q5k.gguf", "", {}, [](peft::io::gguf_writer& w, const peft::io::gguf_tensor_info& t) {
    if (t.name != "blk.1.ffn_down.weight") return false;
    const std::vector<std::byte> zeros(static_cast<std::size_t>(t.ne[0] / 256 * 176 * t.ne[1]));
    w.add_tensor(t.name, peft::io::ggml_type::q5_k, t.ne, zeros);
    return true;
  });
  rewrite_gguf(good, s.dir / "falcon.gguf", "general.architecture", peft::io::gguf_value::string("falcon"),
               [](peft::io::gguf_writer&, const peft::io::gguf_tensor_info&) { return false; });
  rewrite_gguf(good, s.dir / "experts.gguf", "llama.expert_count", peft::io::gguf_value::u32(8),
               [](peft::io::gguf_writer&, const peft::io::gguf_tensor_info&) { return false; });
  const std::string tokens = " --tokens " + q(g / "tokens.txt");
  const std::string o = " --out " + q(s.dir / "o.st");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"logits --model " + q(s.dir / "cut.gguf") + tokens + o, "truncated"},
      {"logits --model " + q(s.dir / "q5k.gguf") + tokens + o, "'blk.1.ffn_down.weight' has type Q5_K"},
      {"logits --model " + q(s.dir / "falcon.gguf") + tokens + o, "'falcon'"},
      {"logits --model " + q(s.dir / "experts.gguf") + tokens + o, "llama.expert_count"},
      {"export --gguf " + q(data / "lm" / "llama" / "adapters" / "lora") + " --model " + q(good) + o, "the model's is"},
      {"export --gguf " + q(data / "lm" / "llama" / "adapters" / "dora") + " --model " + q(data / "lm" / "llama") + o,
       "a dora adapter"},
      {"export --gguf " + q(g / "llama" / "peft_lora") + o, "needs --model"},
      {"import --gguf " + q(s.dir / "cut.gguf") + o, "truncated"},
      {"import --gguf " + q(g / "llama" / "lora_by_llama_cpp.gguf") + o, "--model"},
      {"import --gguf " + q(good) + o, "not an adapter"},
  };
  expect_usage_errors(cases, s.dir, {s.dir / "o.st"});
}

}  // namespace test_cli
#endif  // PEFT_CLI_PATH
