// Language models against transformers + PEFT (tests/data/lm, written by
// scripts/make_lm_references.py): logits, loss, every adapter gradient, 4 AdamW steps and greedy
// decoding for Llama (plain, llama3 rope + tied, biases + linear rope in f16), Mistral (sliding
// window, sharded), Qwen2 (bf16), Qwen3 and GPT-2, with several adapter methods each.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "peft/base/any_quantized.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/models/generate.hpp"
#include "peft/models/peft_model.hpp"
#include "peft/models/token_file.hpp"
#include "peft/train/dynamic_rank_trainer.hpp"
#include "peft/train/optimizer.hpp"
#include "peft/train/sora_trainer.hpp"
#include "support/file_support.hpp"
#include "support/test_support.hpp"

namespace test_causal_lm {

namespace {

namespace fs = std::filesystem;
using peft::index;
using namespace peft::models;

const fs::path lm_data = fs::path(PEFT_TEST_DATA_DIR) / "lm";

/// max |a - b| / max |b| over the unmasked rows (masked rows of the reference are 0).
template <class T>
double logits_error(const peft::matrix<T>& got, const std::vector<double>& ref) {
  double diff = 0, scale = 0;
  for (index i = 0; i < got.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(got.data()[i]) - ref[static_cast<std::size_t>(i)]));
    scale = std::max(scale, std::abs(ref[static_cast<std::size_t>(i)]));
  }
  REQUIRE(scale > 0.1);  // the reference is not trivially zero
  return diff / scale;
}

double tensor_error(peft::matrix_view<const double> got, const std::vector<double>& ref) {
  REQUIRE(static_cast<std::size_t>(got.size()) == ref.size());
  double diff = 0, scale = 0;
  for (index i = 0; i < got.rows(); ++i) {
    for (index j = 0; j < got.cols(); ++j) {
      const double r = ref[static_cast<std::size_t>(i * got.cols() + j)];
      diff = std::max(diff, std::abs(got(i, j) - r));
      scale = std::max(scale, std::abs(r));
    }
  }
  REQUIRE(scale > 0);
  return diff / scale;
}

struct lm_case {
  const char* name;
  std::vector<const char*> adapters;
};

const std::vector<lm_case> cases = {
    {"llama", {"lora", "lora_all", "dora", "vera", "ia3", "loha"}},
    {"llama3_tied", {"lora", "lokr"}},
    {"llama_bias", {"lora"}},
    {"mistral", {"lora"}},
    {"qwen2", {"lora", "dora"}},
    {"qwen3", {"lora", "adalora"}},
    {"gpt2", {"lora", "dora"}},
};

token_batch batch_of(const fs::path& dir) { return token_batch::from_rows(read_token_file(dir / "tokens.txt")); }

/// f(model directory, adapter directory, the adapter's references, the batch) for every case.
template <class F>
void for_each_adapter(F&& f) {
  for (const auto& c : cases) {
    for (const char* a : c.adapters) {
      const fs::path dir = lm_data / c.name;
      INFO("model " << c.name << ", adapter " << a);
      const auto ref = peft::io::safetensors_file::open(dir / "adapters" / (std::string(a) + ".reference.safetensors"));
      f(dir, dir / "adapters" / a, ref, batch_of(dir));
    }
  }
}

template <class T>
void check_outputs(peft_model<T>& pm, const peft::io::safetensors_file& ref, const token_batch& b) {
  const bool f64 = std::is_same_v<T, double>;
  const auto logits = pm.model().forward(b);
  const double err = logits_error(logits, ref.read<double>(f64 ? "logits_f64" : "logits"));
  CHECK(err < (f64 ? 1e-10 : 1e-5));
  const double loss = pm.model().loss(b, b.causal_labels());
  const double want = ref.read<double>(f64 ? "loss_f64" : "loss")[0];
  CHECK(std::abs(loss - want) < (f64 ? 1e-10 : 1e-5) * std::abs(want));
}

}  // namespace

TEST_CASE("language models give transformers' logits and loss, in float and double", "[models]") {
  for (const auto& c : cases) {
    const fs::path dir = lm_data / c.name;
    INFO("model " << c.name);
    const auto ref = peft::io::safetensors_file::open(dir / "reference.safetensors");
    const auto b = batch_of(dir);
    peft_model<float> pf(causal_lm<float>::load(dir));
    check_outputs(pf, ref, b);
    peft_model<double> pd(causal_lm<double>::load(dir));
    check_outputs(pd, ref, b);
  }
}

TEST_CASE("adapters attached from PEFT checkpoints give PEFT's logits and loss", "[models]") {
  for_each_adapter([](const fs::path& dir, const fs::path& adapter, const peft::io::safetensors_file& ref, const token_batch& b) {
    auto pf = peft_model<float>::from_pretrained(causal_lm<float>::load(dir), adapter);
    check_outputs(pf, ref, b);
    auto pd = peft_model<double>::from_pretrained(causal_lm<double>::load(dir), adapter);
    check_outputs(pd, ref, b);
  });
}

TEST_CASE("every adapter gradient of the LM loss equals torch autograd's", "[models]") {
  for_each_adapter([](const fs::path& dir, const fs::path& adapter, const peft::io::safetensors_file& ref, const token_batch& b) {
    for (const bool checkpointing : {false, true}) {
      INFO("activation checkpointing " << checkpointing);
      load_options lo;
      lo.activation_checkpointing = checkpointing;
      auto pm = peft_model<double>::from_pretrained(causal_lm<double>::load(dir, lo), adapter);
      pm.model().zero_grad();
      pm.model().loss_and_backward(b, b.causal_labels());
      std::size_t compared = 0;
      for (auto& [key, p] : pm.named_parameters()) {
        if (!p.trainable || p.integer) continue;
        INFO("tensor " << key);
        REQUIRE(ref.contains("grad." + key));
        CHECK(tensor_error(p.grad, ref.read<double>("grad." + key)) < 1e-9);
        ++compared;
      }
      std::size_t expected = 0;
      for (const auto& t : ref.tensors()) expected += t.name.rfind("grad.", 0) == 0;
      CHECK(compared == expected);
    }
  });
}

TEST_CASE("four AdamW steps follow PEFT + torch's trajectory", "[models]") {
  for_each_adapter([](const fs::path& dir, const fs::path& adapter, const peft::io::safetensors_file& ref, const token_batch& b) {
    auto pm = peft_model<double>::from_pretrained(causal_lm<double>::load(dir), adapter);
    std::vector<peft::parameter<double>> params;
    for (auto& p : pm.model().parameters()) {
      if (p.trainable && !p.integer) params.push_back(p);
    }
    peft::train::adamw<double> opt(params, {.lr = 1e-2, .weight_decay = 0.01});
    const auto losses = ref.read<double>("train.losses");
    for (std::size_t s = 0; s < 4; ++s) {
      pm.model().zero_grad();
      const double loss = pm.model().loss_and_backward(b, b.causal_labels());
      CHECK(std::abs(loss - losses[s]) < 1e-9 * std::abs(losses[s]));
      opt.step();
    }
    CHECK(losses[3] < losses[0]);
    for (auto& [key, p] : pm.named_parameters()) {
      if (!p.trainable || p.integer) continue;
      INFO("tensor " << key);
      CHECK(tensor_error(p.value, ref.read<double>("train." + key)) < 1e-8);
    }
  });
}

TEST_CASE("full fine-tuning: every weight's gradient and four AdamW steps equal torch's", "[models]") {
  for (const char* c : {"llama3_tied", "qwen3", "gpt2"}) {
    const fs::path dir = lm_data / c;
    INFO("model " << c);
    const auto ref = peft::io::safetensors_file::open(dir / "full.reference.safetensors");
    const auto b = batch_of(dir);
    load_options lo;
    lo.full_finetuning = true;
    auto lm = causal_lm<double>::load(dir, lo);
    // Compares a parameter (stored as this class keeps it) with a reference in the file's layout.
    // GPT-2's Conv1D weights are stored (in, out), kept (out, in).
    const bool gpt2 = lm.config().is_gpt2();
    auto error_of = [&](const peft::parameter<double>& p, const std::vector<double>& want, bool grad) {
      const auto v = grad ? p.grad : p.value;
      const bool transposed = gpt2 && p.name.find(".c_") != std::string::npos && p.name.ends_with(".weight");
      peft::matrix<double> m(transposed ? v.cols() : v.rows(), transposed ? v.rows() : v.cols());
      for (index i = 0; i < v.rows(); ++i) {
        for (index j = 0; j < v.cols(); ++j) (transposed ? m(j, i) : m(i, j)) = v(i, j);
      }
      return tensor_error(peft::matrix_view<const double>(m.view()), want);
    };
    lm.zero_grad();
    lm.loss_and_backward(b, b.causal_labels());
    std::size_t compared = 0;
    for (const auto& p : lm.parameters()) {
      INFO("tensor " << p.name);
      REQUIRE(ref.contains("grad." + p.name));
      CHECK(error_of(p, ref.read<double>("grad." + p.name), true) < 1e-9);
      ++compared;
    }
    std::size_t expected = 0;
    for (const auto& t : ref.tensors()) expected += t.name.rfind("grad.", 0) == 0;
    CHECK(compared == expected);

    auto params = lm.parameters();
    peft::train::adamw<double> opt(params, {.lr = 1e-3, .weight_decay = 0.0});
    const auto losses = ref.read<double>("train.losses");
    for (std::size_t s = 0; s < 4; ++s) {
      lm.zero_grad();
      CHECK(std::abs(lm.loss_and_backward(b, b.causal_labels()) - losses[s]) < 1e-9 * losses[s]);
      opt.step();
    }
    for (const auto& p : lm.parameters()) {
      INFO("tensor " << p.name);
      CHECK(error_of(p, ref.read<double>("train." + p.name), false) < 1e-8);
    }
    // Saved as a model directory, it loads back with the trained weights.
    const fs::path out = peft_test::temp_path(std::string("peft_test_full_") + c);
    fs::remove_all(out);
    lm.save_pretrained(out, dir, peft::dtype::f64);
    auto again = causal_lm<double>::load(out);
    const auto l1 = lm.forward(b), l2 = again.forward(b);
    CHECK(peft_test::max_abs(peft_test::add(l1, l2, -1.0)) == 0.0);
    fs::remove_all(out);
  }
}

TEST_CASE("greedy decoding with the key/value cache equals transformers' generate", "[models]") {
  for (const auto& c : cases) {
    const fs::path dir = lm_data / c.name;
    const auto rows = read_token_file(dir / "tokens.txt");
    std::vector<std::string> adapters = {""};
    for (const char* a : c.adapters) adapters.emplace_back(a);
    for (const auto& a : adapters) {
      INFO("model " << c.name << ", adapter " << (a.empty() ? "(none)" : a));
      const auto ref = peft::io::safetensors_file::open(a.empty() ? dir / "reference.safetensors"
                                                                  : dir / "adapters" / (a + ".reference.safetensors"));
      peft_model<float> pm(causal_lm<float>::load(dir));
      if (!a.empty()) pm.load_adapter(dir / "adapters" / a);
      const auto want = ref.read<double>("generated");
      for (std::size_t s = 0; s < rows.size(); ++s) {
        const auto got = generate(pm.model(), rows[s], {.max_new_tokens = 6, .stop_at_eos = false});
        REQUIRE(got.size() == 6);
        for (std::size_t t = 0; t < 6; ++t) CHECK(got[t] == static_cast<long long>(want[s * 6 + t]));
      }
    }
  }
}

TEST_CASE("the key/value cache gives the logits of a full forward, token by token", "[models]") {
  const fs::path dir = lm_data / "mistral";  // sliding window: the cache must honour it
  auto pm = peft_model<double>::from_pretrained(causal_lm<double>::load(dir), dir / "adapters" / "lora");
  auto& lm = pm.model();
  const std::vector<long long> ids = {3, 17, 42, 8, 91, 5, 60, 12, 33};
  const auto full = lm.forward(token_batch::from_rows({ids}));
  auto cache = lm.new_cache(static_cast<index>(ids.size()));
  auto first = lm.decode(cache, {ids[0], ids[1], ids[2]});
  for (index v = 0; v < lm.vocab_size(); ++v) CHECK(first[static_cast<std::size_t>(v)] == Approx(full(2, v)).epsilon(1e-12));
  for (std::size_t t = 3; t < ids.size(); ++t) {
    const auto step = lm.decode(cache, {ids[t]});
    for (index v = 0; v < lm.vocab_size(); ++v) {
      CHECK(std::abs(step[static_cast<std::size_t>(v)] - full(static_cast<index>(t), v)) < 1e-11);
    }
  }
  CHECK_THROWS_AS(lm.decode(cache, {1}), peft::error);  // the cache is full
}

TEST_CASE("padding on the left or in the middle leaves each sequence's logits alone", "[models]") {
  const fs::path dir = lm_data / "qwen3";
  auto pm = peft_model<double>::from_pretrained(causal_lm<double>::load(dir), dir / "adapters" / "lora");
  auto& lm = pm.model();
  const std::vector<long long> ids = {7, 3, 88, 41, 2};
  const auto alone = lm.forward(token_batch::from_rows({ids}));
  token_batch left;
  left.sequences = 1;
  left.length = 8;
  left.ids = {0, 0, 0, 7, 3, 88, 41, 2};
  left.mask = {0, 0, 0, 1, 1, 1, 1, 1};
  left.positions = {0, 0, 0, 0, 1, 2, 3, 4};
  const auto padded = lm.forward(left);
  for (index t = 0; t < 5; ++t) {
    for (index v = 0; v < lm.vocab_size(); ++v) CHECK(std::abs(padded(t + 3, v) - alone(t, v)) < 1e-12);
  }
  for (index v = 0; v < lm.vocab_size(); ++v) CHECK(padded(0, v) == 0.0);
}

TEST_CASE("a saved adapter reloads with the same logits; trainable counts match PEFT's", "[models]") {
  const fs::path scratch = peft_test::temp_path("peft_test_lm_save");
  fs::remove_all(scratch);
  for (const char* a : {"lora_all", "dora", "vera"}) {
    INFO("adapter " << a);
    const fs::path dir = lm_data / "llama";
    auto pm = peft_model<double>::from_pretrained(causal_lm<double>::load(dir), dir / "adapters" / a);
    const auto b = batch_of(dir);
    const auto before = pm.model().forward(b);
    pm.save_pretrained(scratch / a);
    auto again = peft_model<double>::from_pretrained(causal_lm<double>::load(dir), scratch / a);
    const auto after = again.model().forward(b);
    CHECK(peft_test::max_abs(peft_test::add(before, after, -1.0)) < 1e-7 * peft_test::max_abs(before));
    // PEFT's print_trainable_parameters: the number of values of the saved trainable tensors.
    const auto file = peft::io::safetensors_file::open(dir / "adapters" / a / "adapter_model.safetensors");
    std::size_t n = 0;
    for (const auto& t : file.tensors()) {
      if (t.name.rfind("base_model.vera_", 0) == 0) continue;  // VeRA's frozen projections
      std::size_t k = 1;
      for (auto d : t.shape) k *= static_cast<std::size_t>(d);
      n += k;
    }
    CHECK(pm.trainable_parameters() == n);
  }
  fs::remove_all(scratch);
}

TEST_CASE("fresh adapters from options: targets, all-linear, patterns; merge_and_unload keeps the logits",
          "[models]") {
  const fs::path dir = lm_data / "llama";
  const auto b = batch_of(dir);
  for (const char* method : {"lora", "dora", "vera", "loha", "lokr", "adalora", "ia3", "shira", "dynamic_rank", "sora"}) {
    INFO("method " << method);
    peft_model<double> pm(causal_lm<double>::load(dir));
    adapter_options o;
    o.method = method;
    o.rank = 4;
    o.alpha = 8;
    o.targets = {"all-linear"};
    o.feedforward_modules = {"down_proj"};
    o.rank_pattern = {{"down_proj", 2}};
    pm.add_adapter("default", o);
    CHECK(pm.trainable_parameters() > 0);
    // Move every trainable value off its initialisation so the adapter changes the output.
    peft::rng gen(7);
    for (auto& p : pm.model().parameters()) {
      if (!p.trainable || p.integer) continue;
      for (index i = 0; i < p.value.rows(); ++i) {
        for (index j = 0; j < p.value.cols(); ++j) p.value(i, j) += 0.05 * (gen.uniform() - 0.5);
      }
    }
    const auto with = pm.model().forward(b);
    pm.merge_and_unload();
    CHECK(pm.model().parameters().empty());
    const auto merged = pm.model().forward(b);
    CHECK(peft_test::max_abs(peft_test::add(with, merged, -1.0)) < 1e-9 * peft_test::max_abs(with));
  }
  peft_model<double> pm(causal_lm<double>::load(dir));
  adapter_options plain;
  plain.rank = 4;
  plain.alpha = 8;
  pm.add_adapter("default", plain);  // PEFT's default targets for Llama: q_proj, v_proj
  std::size_t adapted = 0;
  for (auto& [name, l] : pm.model().modules()) adapted += l->contains("default");
  CHECK(adapted == 4);
  CHECK(pm.trainable_parameters() == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4));
  adapter_options none = plain;
  none.targets = {"nothing_like_this"};
  CHECK_THROWS_AS(pm.add_adapter("x", none), peft::error);
  adapter_options compacter = plain;
  compacter.method = "compacter";
  CHECK_THROWS_AS(pm.add_adapter("y", compacter), peft::unsupported_error);
}

TEST_CASE("dynamic_rank and sora train with their trainers and compact to a LoRA checkpoint with the same logits",
          "[models]") {
  const fs::path dir = lm_data / "llama";
  const fs::path scratch = peft_test::temp_path("peft_test_lm_compact");
  fs::remove_all(scratch);
  const auto b = batch_of(dir);
  const auto labels = b.causal_labels();
  const auto tokens = static_cast<double>(causal_lm<double>::predicted_tokens(b, labels));
  for (const char* method : {"dynamic_rank", "sora"}) {
    INFO("method " << method);
    const bool dyn = std::string(method) == "dynamic_rank";
    peft_model<double> pm(causal_lm<double>::load(dir));
    adapter_options o;
    o.method = method;
    o.rank = 2;
    o.alpha = 4;
    o.targets = {"all-linear"};
    o.seed = 5;
    pm.add_adapter("default", o);
    auto& lm = pm.model();
    const index steps = 12;
    std::optional<peft::train::dynamic_rank_trainer<double>> dr;
    std::optional<peft::train::sora_trainer<double>> so;
    std::vector<peft::parameter<double>> params;
    for (auto& p : lm.parameters()) {
      // SoRA's proximal rule steps the gates itself; AdamW steps A and B.
      if (p.trainable && (dyn || !p.name.ends_with("lora_gate"))) params.push_back(p);
    }
    if (dyn) {
      const auto layers = pm.adapters_of<peft::dynamic_rank<double>>();
      CHECK(layers.size() == 14);  // 2 layers x 7 projections
      CHECK(layers.front()->rank() == 3);  // ceil(1.5 r)
      dr.emplace(layers, peft::train::dynamic_rank_schedule_options{.total_steps = steps, .interval = 2, .target_rank = 1.0});
    } else {
      // Gates spread over (0.05, 1): the threshold (lr xi = 0.05 a step) closes the small ones.
      peft::rng gen(11);
      for (auto& p : lm.parameters()) {
        if (!p.name.ends_with("lora_gate")) continue;
        for (index j = 0; j < p.value.cols(); ++j) p.value(0, j) = 0.05 + 0.95 * gen.uniform();
      }
      so.emplace(pm.adapters_of<peft::sora<double>>(), peft::train::sora_training_options{.xi0 = 2.5});
      CHECK_THROWS_AS(pm.adapters_of<peft::dynamic_rank<double>>(), peft::error);
    }
    peft::train::adamw<double> opt(params, {.lr = 2e-2});
    double first = 0, last = 0;
    for (index s = 1; s <= steps; ++s) {
      lm.zero_grad();
      last = lm.loss_and_backward(b, labels, tokens);
      if (s == 1) first = last;
      if (dr) dr->add_regularizer(s);
      opt.step();
      if (dr) dr->after_step(s);
      if (so) so->after_step(2e-2);
    }
    CHECK(last < first);
    index active = 0, total = 0;
    if (dr) {
      for (auto r : dr->ranks()) active += r;
      CHECK(active == 14);  // the final budget: ceil(target_rank x layers)
    } else {
      for (auto* l : pm.adapters_of<peft::sora<double>>()) total += l->rank();
      active = so->total_rank();
      CHECK(active < total);  // the threshold closed some gates
      CHECK(active > 0);
    }
    // Close every gate of the first module: compaction drops it.
    const std::string first_module = lm.modules().front().first;
    for (auto& p : lm.parameters()) {
      if (p.name.rfind(first_module + ".", 0) == 0 && (p.name.ends_with("lora_gate") || p.name.ends_with("lora_scaler"))) {
        for (index j = 0; j < p.value.cols(); ++j) p.value(0, j) = 0.0;
      }
    }
    std::size_t empty = 0;
    for (auto& [n, l] : lm.modules()) {
      const auto& a = l->adapter("default");
      if (const auto* d = a.get_if<peft::dynamic_rank<double>>()) empty += d->active_rank() == 0;
      if (const auto* g = a.get_if<peft::sora<double>>()) empty += g->active_rank() == 0;
    }
    CHECK(empty >= 1);
    const auto before = lm.forward(b);
    CHECK(pm.compact_adapter() == empty);
    CHECK(pm.compact_adapter() == 0);  // nothing gated is left
    CHECK_FALSE(lm.modules().front().second->contains("default"));
    const auto after = lm.forward(b);
    CHECK(peft_test::max_abs(peft_test::add(before, after, -1.0)) < 1e-12 * peft_test::max_abs(before));
    pm.save_pretrained(scratch / method, "default", peft::dtype::f64);
    std::ifstream in(scratch / method / "adapter_config.json");
    const auto cfg = nlohmann::json::parse(in);
    CHECK(cfg["peft_type"] == "LORA");
    CHECK(cfg["target_modules"].size() == 14 - empty);
    CHECK(cfg["rank_pattern"].size() >= 1);
    auto again = peft_model<double>::from_pretrained(causal_lm<double>::load(dir), scratch / method);
    const auto reloaded = again.model().forward(b);
    CHECK(peft_test::max_abs(peft_test::add(before, reloaded, -1.0)) < 1e-12 * peft_test::max_abs(before));
  }
  fs::remove_all(scratch);
}

TEST_CASE("several adapters on one model: set_adapter and per-request adapters", "[models]") {
  const fs::path dir = lm_data / "llama";
  const auto b = batch_of(dir);
  peft_model<double> pm(causal_lm<double>::load(dir));
  pm.load_adapter(dir / "adapters" / "lora", "lora");
  pm.load_adapter(dir / "adapters" / "dora", "dora");
  auto ref_of = [&](const std::string& a) {
    return peft::io::safetensors_file::open(dir / "adapters" / (a + ".reference.safetensors")).read<double>("logits_f64");
  };
  const auto base_ref = peft::io::safetensors_file::open(dir / "reference.safetensors").read<double>("logits_f64");
  pm.set_adapter("dora");
  CHECK(logits_error(pm.model().forward(b), ref_of("dora")) < 1e-10);
  pm.set_adapter("lora");
  CHECK(logits_error(pm.model().forward(b), ref_of("lora")) < 1e-10);
  // Sequence 0 with DoRA, 1 with no adapter, 2 with LoRA: each row equals its own model's.
  const auto mixed = pm.forward_per_sequence(b, {"dora", "", "lora"});
  const auto dora_ref = ref_of("dora"), lora_ref = ref_of("lora");
  const index V = pm.model().vocab_size();
  double worst = 0;
  for (index s = 0; s < 3; ++s) {
    const auto& r = s == 0 ? dora_ref : s == 1 ? base_ref : lora_ref;
    for (index i = s * b.length * V; i < (s + 1) * b.length * V; ++i) {
      worst = std::max(worst, std::abs(mixed.data()[i] - r[static_cast<std::size_t>(i)]));
    }
  }
  CHECK(worst < 1e-9);
  // The enabled adapters are as before: only LoRA.
  CHECK(logits_error(pm.model().forward(b), lora_ref) < 1e-10);
  CHECK_THROWS_AS(pm.forward_per_sequence(b, {"dora", "nope", "lora"}), peft::error);
}

TEST_CASE("several adapters in one directory: PEFT's subfolder layout, loaded and saved", "[models]") {
  // adapters/multi: a PeftModel holding lora (as "default") and dora, saved by PEFT 0.21.
  const fs::path dir = lm_data / "llama";
  const auto b = batch_of(dir);
  auto ref_of = [&](const std::string& a) {
    return peft::io::safetensors_file::open(dir / "adapters" / (a + ".reference.safetensors")).read<double>("logits_f64");
  };
  peft_model<double> pm(causal_lm<double>::load(dir));
  const auto names = pm.load_all_adapters(dir / "adapters" / "multi");
  REQUIRE(names == std::vector<std::string>{"default", "dora"});
  pm.set_adapter("default");
  CHECK(logits_error(pm.model().forward(b), ref_of("lora")) < 1e-10);
  pm.set_adapter("dora");
  CHECK(logits_error(pm.model().forward(b), ref_of("dora")) < 1e-10);

  // Saved back in the same layout; a second model loads it with the same outputs.
  const fs::path out = peft_test::temp_path("peft_lm_multi_adapters");
  fs::remove_all(out);
  pm.save_all_pretrained(out);
  CHECK(fs::exists(out / "adapter_config.json"));
  CHECK(fs::exists(out / "dora" / "adapter_model.safetensors"));
  peft_model<double> again(causal_lm<double>::load(dir));
  CHECK(again.load_all_adapters(out) == names);
  again.set_adapter("dora");
  CHECK(logits_error(again.model().forward(b), ref_of("dora")) < 1e-10);
  again.set_adapter("default");
  CHECK(logits_error(again.model().forward(b), ref_of("lora")) < 1e-10);

  // A failing subfolder leaves nothing attached; an empty directory is an error.
  std::ofstream(out / "dora" / "adapter_config.json") << "{}";
  peft_model<double> third(causal_lm<double>::load(dir));
  CHECK_THROWS(third.load_all_adapters(out));
  CHECK(third.adapter_names().empty());
  fs::remove_all(out);
  fs::create_directories(out);
  CHECK_THROWS_WITH(third.load_all_adapters(out), Catch::Contains("load_all_adapters") && Catch::Contains("no adapter_config.json"));
  fs::remove_all(out);
}

TEST_CASE("QLoRA: adapters over quantized bases stay close to the dense model and train", "[models]") {
  const fs::path dir = lm_data / "llama";
  const auto b = batch_of(dir);
  auto dense = peft_model<float>::from_pretrained(causal_lm<float>::load(dir), dir / "adapters" / "lora");
  // Both formats through the run-time base (base/any_quantized.hpp), as the peft tool runs them.
  using quantized_lm = causal_lm<float, peft::any_quantized>;
  auto load_as = [&](const char* format) {
    const peft::any_quantized::format_scope scope(format);
    return peft::models::peft_model<float, peft::any_quantized>(quantized_lm::load(dir));
  };
  auto i8 = load_as("int8");
  for (auto& [name, l] : i8.model().modules()) CHECK(l->base().format_name() == "int8");
  i8.load_adapter(dir / "adapters" / "lora");
  const auto ld = dense.model().forward(b);
  const auto l8 = i8.model().forward(b);
  const double rel = peft_test::max_abs(peft_test::add(ld, l8, -1.0)) / peft_test::max_abs(ld);
  CHECK(rel > 1e-5);  // int8 really quantised the weights ...
  CHECK(rel < 0.02);  // ... and the model computes the same function, to int8's precision
  auto q = load_as("nf4");
  for (auto& [name, l] : q.model().modules()) CHECK(l->base().format_name() == "nf4");
  q.load_adapter(dir / "adapters" / "lora");
  q.model().zero_grad();
  const double l0 = q.model().loss_and_backward(b, b.causal_labels());
  std::vector<peft::parameter<float>> params = q.model().parameters();
  peft::train::adamw<float> opt(params, {.lr = 1e-2, .weight_decay = 0});
  opt.step();
  CHECK(q.model().loss(b, b.causal_labels()) < l0);
}

TEST_CASE("bad model input: unsupported configs, token ids, lengths, adapters that do not fit", "[models]") {
  const fs::path scratch = peft_test::temp_path("peft_test_lm_bad");
  fs::remove_all(scratch);
  fs::create_directories(scratch);
  const fs::path llama = lm_data / "llama";
  auto with_config = [&](const std::string& name, auto&& edit) {
    const fs::path d = scratch / name;
    fs::create_directories(d);
    fs::copy_file(llama / "model.safetensors", d / "model.safetensors");
    std::ifstream in(llama / "config.json");
    auto j = nlohmann::json::parse(in);
    edit(j);
    std::ofstream(d / "config.json") << j.dump(2);
    return d;
  };
  auto message = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const peft::error& e) {
      return e.what();
    }
    return "(no error)";
  };
  const auto yarn = with_config("yarn", [](auto& j) { j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}}; });
  CHECK_THAT(message([&] { causal_lm<float>::load(yarn); }), Catch::Contains("rope type 'yarn'"));
  const auto arch = with_config("arch", [](auto& j) { j["model_type"] = "falcon"; });
  CHECK_THAT(message([&] { causal_lm<float>::load(arch); }), Catch::Contains("model_type 'falcon'"));
  const auto unknown = with_config("unknown", [](auto& j) { j["attn_logit_softcapping"] = 50.0; });
  CHECK_THAT(message([&] { causal_lm<float>::load(unknown); }), Catch::Contains("attn_logit_softcapping"));
  const auto field = with_config("field", [](auto& j) { j["some_new_switch"] = true; });
  CHECK_THAT(message([&] { causal_lm<float>::load(field); }), Catch::Contains("'some_new_switch'"));
  const auto shape = with_config("shape", [](auto& j) { j["intermediate_size"] = 40; });
  CHECK_THAT(message([&] { causal_lm<float>::load(shape); }), Catch::Contains("gate_proj"));

  auto lm = causal_lm<float>::load(llama);
  CHECK_THAT(message([&] { lm.forward(token_batch::from_rows({{1, 96}})); }), Catch::Contains("token id 96"));
  std::vector<long long> long_row(65, 1);
  CHECK_THAT(message([&] { lm.forward(token_batch::from_rows({long_row})); }), Catch::Contains("position 64"));
  peft_model<float> pm(std::move(lm));
  CHECK_THAT(message([&] { pm.load_adapter(lm_data / "gpt2" / "adapters" / "lora"); }),
             Catch::Contains("not a projection of the model"));
  CHECK_THAT(message([&] { pm.load_adapter(lm_data / "qwen3" / "adapters" / "lora"); }), Catch::Contains("module 'model.layers.0.self_attn.k_proj'"));
  CHECK(pm.model().parameters().empty());  // nothing half-attached

  // Truncated weights.
  const fs::path cut = scratch / "cut";
  fs::create_directories(cut);
  fs::copy_file(llama / "config.json", cut / "config.json");
  {
    std::ifstream in(llama / "model.safetensors", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(cut / "model.safetensors", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  CHECK_THROWS_AS(causal_lm<float>::load(cut), peft::error);
  // Token files.
  std::ofstream(scratch / "empty.txt") << "";
  CHECK_THAT(message([&] { read_token_file(scratch / "empty.txt"); }), Catch::Contains("holds no sequence"));
  std::ofstream(scratch / "bad.txt") << "1 2 3\n4 x 5\n";
  CHECK_THAT(message([&] { read_token_file(scratch / "bad.txt"); }), Catch::Contains("line 2"));
  std::ofstream(scratch / "blank.txt") << "1 2\n\n3\n";
  CHECK_THAT(message([&] { read_token_file(scratch / "blank.txt"); }), Catch::Contains("line 2 holds no token id"));
  std::ofstream(scratch / "ok.txt") << "1 2\t3\r\n4\n";
  CHECK(read_token_file(scratch / "ok.txt") == std::vector<std::vector<long long>>{{1, 2, 3}, {4}});
  fs::remove_all(scratch);
}

}  // namespace test_causal_lm
