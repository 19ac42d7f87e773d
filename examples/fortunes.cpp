// examples/fortunes.cpp — pretrain a small Llama on English fortune cookies, then teach it
// Italian with every adaptation method, and compare them.
//
//   fortunes [--out DIR] [--seeds N] [--pretrain-steps N] [--adapt-steps N] [--methods a,b,...]
//            [--fortunes DIR] [--threads T] [--lr LR] [--reuse-base]
//   fortunes --report [--out DIR]
//   (--lr: one learning rate for every method, instead of each method's own; --reuse-base: keep
//    DIR/base from an earlier run instead of pretraining again; --report: the report again from
//    DIR/results.json, nothing trained)
//
// 1. Reads the fortunes of Debian's `fortunes` (English) and `fortunes-it` (Italian) packages from
//    /usr/share/games/fortunes (scripts/setup.sh installs them); every tenth fortune of each
//    language is held out for validation.
// 2. Writes a randomly initialised Llama-shaped model (4 layers, hidden 128, vocabulary 2048 of
//    the byte-level BPE in examples/data/fortunes/tokenizer.json) and pretrains every weight of it
//    on the English fortunes: DIR/base is a transformers model directory.
// 3. Adapts that model to the Italian fortunes with each method (LoRA, rsLoRA, DoRA, dynamic-rank
//    LoRA, SoRA, VeRA, SHiRA, QLoRA over nf4 and q4_0 bases, and full fine-tuning as the
//    reference), once per seed, each run in a child process of its own so that its peak memory is
//    its own (VmHWM). Every adapter is saved as a PEFT checkpoint in DIR/runs/<run>
//    (dynamic-rank and SoRA compacted to the plain LoRA they equal; full fine-tuning as a model).
// 4. Prints and writes DIR/results.md (validation perplexity, trainable parameters, time, peak
//    memory: mean and spread over the seeds), DIR/results.json, DIR/loss.svg (training loss
//    curves), DIR/samples.txt (a continuation of one Italian prompt per method).
//
// examples/fortunes_check.py DIR loads every saved run with transformers + PEFT and checks that it
// gives the loss this program computed (on DIR/check_tokens.txt). docs/fortunes.md explains the
// settings and shows a run.
#include <peft/base/any_quantized.hpp>
#include <peft/models/generate.hpp>
#include <peft/models/peft_model.hpp>
#include <peft/models/tokenizer.hpp>
#include <peft/train/dynamic_rank_trainer.hpp>
#include <peft/train/optimizer.hpp>
#include <peft/train/schedule.hpp>
#include <peft/train/sora_trainer.hpp>

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

extern char** environ;

namespace {

namespace fs = std::filesystem;
using peft::index;
using json = nlohmann::json;
using rows_t = std::vector<std::vector<long long>>;
using clock_type = std::chrono::steady_clock;

constexpr index seq_len = 128;
constexpr long long bos = 0, eos = 1;  // the tokenizer's <s> and </s>

struct settings {
  fs::path out = "fortunes_out";
  fs::path fortunes = "/usr/share/games/fortunes";
  fs::path tokenizer = fs::path(PEFT_EXAMPLE_DATA_DIR) / "fortunes" / "tokenizer.json";
  int seeds = 3;
  long long pretrain_steps = 300;
  long long adapt_steps = 60;
  index pretrain_batch = 16;
  index adapt_batch = 8;
  index val_rows = 32;  // held-out rows of 128 tokens each language is scored on
  int threads = 0;
  double lr = 0;  // > 0: every method's learning rate (for sweeps)
  bool reuse_base = false;
  bool report_only = false;
  std::vector<std::string> methods = {"lora",       "rslora",     "dora",  "dynamic_rank", "sora", "vera", "shira",
                                      "qlora_nf4", "qlora_q4_0", "full"};
};

/// How each method is set up: rank 8 (dynamic-rank: 8 on average, from 12; SoRA: at most 8),
/// alpha 16, every linear layer; learning rates from a short sweep (docs/fortunes.md).
struct method_setup {
  std::string method;  // adapter_options::method, or "full"
  double lr;
  std::string quantized;  // nf4, q4_0 or empty
  bool rslora = false;
  bool frozen_embeddings = false;  // full fine-tuning without the embedding (an ablation)
};

method_setup setup_of(const std::string& name) {
  if (name == "lora") return {"lora", 1e-2, ""};
  if (name == "rslora") return {"lora", 4e-3, "", true};  // its scale, alpha / sqrt(r), is 2.8x LoRA's
  if (name == "dora") return {"dora", 1e-2, ""};
  if (name == "dynamic_rank") return {"dynamic_rank", 1e-2, ""};
  if (name == "sora") return {"sora", 1e-2, ""};
  if (name == "vera") return {"vera", 1e-1, ""};
  if (name == "shira") return {"shira", 1e-2, ""};
  if (name == "qlora_nf4") return {"lora", 1e-2, "nf4"};
  if (name == "qlora_q4_0") return {"lora", 1e-2, "q4_0"};
  if (name == "full") return {"full", 3e-3, ""};
  if (name == "full_frozen_embeddings") return {"full", 3e-3, "", false, true};
  throw std::invalid_argument("unknown method '" + name +
                              "' (lora, rslora, dora, dynamic_rank, sora, vera, shira, qlora_nf4, qlora_q4_0, full, "
                              "full_frozen_embeddings)");
}

// ---- data ---------------------------------------------------------------------------------------

struct corpus {
  std::vector<std::string> train, val;
};

/// The fortunes of the plain files directly in `dir` (no symbolic links, no .dat/.u8 indexes, not
/// `skip`), split at "%" lines; every tenth one goes to val.
corpus read_fortunes(const fs::path& dir, const std::vector<std::string>& skip) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto p = e.path();
    if (e.is_symlink() || !e.is_regular_file() || p.extension() == ".dat" || p.extension() == ".u8") continue;
    if (std::find(skip.begin(), skip.end(), p.filename().string()) != skip.end()) continue;
    files.push_back(p);
  }
  std::sort(files.begin(), files.end());
  corpus c;
  std::size_t k = 0;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::string line, cur;
    auto flush = [&] {
      while (!cur.empty() && cur.back() == '\n') cur.pop_back();
      if (cur.find_first_not_of(" \t\n") != std::string::npos) (k++ % 10 == 9 ? c.val : c.train).push_back(cur);
      cur.clear();
    };
    while (std::getline(in, line)) {
      if (line == "%") {
        flush();
      } else {
        cur += line;
        cur += '\n';
      }
    }
    flush();
  }
  if (c.train.empty() || c.val.empty()) {
    throw std::runtime_error("no fortunes in " + dir.string() + " (Debian packages fortunes and fortunes-it)");
  }
  return c;
}

/// Every text tokenized (<s> text </s>), concatenated, and cut into rows of seq_len tokens.
rows_t pack(const std::vector<std::string>& texts, const peft::models::tokenizer& tok) {
  std::vector<long long> stream;
  for (const auto& t : texts) {
    const auto ids = tok.encode(t);
    stream.insert(stream.end(), ids.begin(), ids.end());
    stream.push_back(eos);
  }
  rows_t rows;
  for (std::size_t i = 0; i + seq_len <= stream.size(); i += seq_len) {
    rows.emplace_back(stream.begin() + static_cast<std::ptrdiff_t>(i), stream.begin() + static_cast<std::ptrdiff_t>(i + seq_len));
  }
  return rows;
}

void shuffle(rows_t& rows, std::uint64_t seed) {
  peft::rng gen(seed);
  for (std::size_t i = rows.size(); i > 1; --i) std::swap(rows[i - 1], rows[gen.below(i)]);
}

struct datasets {
  rows_t en_train, en_val, it_train, it_val;
  std::size_t en_fortunes = 0, it_fortunes = 0;
};

/// The Italian rows, and the English ones too when `english` (pretraining).
datasets load_data(const settings& s, const peft::models::tokenizer& tok, bool english) {
  datasets d;
  if (english) {
    const corpus en = read_fortunes(s.fortunes, {"ascii-art"});  // drawings, not text
    d.en_fortunes = en.train.size() + en.val.size();
    d.en_train = pack(en.train, tok);
    d.en_val = pack(en.val, tok);
  }
  const corpus it = read_fortunes(s.fortunes / "it", {});
  d.it_fortunes = it.train.size() + it.val.size();
  d.it_train = pack(it.train, tok);
  d.it_val = pack(it.val, tok);
  d.en_val.resize(std::min<std::size_t>(d.en_val.size(), static_cast<std::size_t>(s.val_rows)));
  d.it_val.resize(std::min<std::size_t>(d.it_val.size(), static_cast<std::size_t>(s.val_rows)));
  shuffle(d.en_train, 1);
  return d;
}

// ---- the model ----------------------------------------------------------------------------------

json model_config() {
  return {{"architectures", {"LlamaForCausalLM"}},
          {"model_type", "llama"},
          {"vocab_size", 2048},
          {"hidden_size", 128},
          {"intermediate_size", 384},
          {"num_hidden_layers", 4},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"max_position_embeddings", 256},
          {"rms_norm_eps", 1e-5},
          {"rope_theta", 10000.0},
          {"hidden_act", "silu"},
          {"tie_word_embeddings", true},
          {"attention_bias", false},
          {"mlp_bias", false},
          {"bos_token_id", bos},
          {"eos_token_id", eos},
          {"torch_dtype", "float32"}};
}

/// A model directory with transformers' initialisation (normal(0, 0.02) weights, unit norms).
void write_initial_model(const fs::path& dir, std::uint64_t seed) {
  const json c = model_config();
  const std::int64_t h = c["hidden_size"], f = c["intermediate_size"], v = c["vocab_size"];
  const std::int64_t heads = c["num_attention_heads"], kv = c["num_key_value_heads"];
  const std::int64_t kvd = h / heads * kv;
  peft::rng gen(seed);
  peft::io::safetensors_writer w;
  auto add = [&](const std::string& name, std::int64_t rows, std::int64_t cols, bool norm) {
    std::vector<float> x(static_cast<std::size_t>(rows * cols));
    for (auto& e : x) e = norm ? 1.0f : static_cast<float>(gen.normal(0.0, 0.02));
    std::vector<std::int64_t> shape = norm ? std::vector<std::int64_t>{cols} : std::vector<std::int64_t>{rows, cols};
    w.add(name, shape, std::span<const float>(x));
  };
  add("model.embed_tokens.weight", v, h, false);
  for (int l = 0; l < c["num_hidden_layers"].get<int>(); ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", 1, h, true);
    add(p + "post_attention_layernorm.weight", 1, h, true);
    add(p + "self_attn.q_proj.weight", h, h, false);
    add(p + "self_attn.k_proj.weight", kvd, h, false);
    add(p + "self_attn.v_proj.weight", kvd, h, false);
    add(p + "self_attn.o_proj.weight", h, h, false);
    add(p + "mlp.gate_proj.weight", f, h, false);
    add(p + "mlp.up_proj.weight", f, h, false);
    add(p + "mlp.down_proj.weight", h, f, false);
  }
  add("model.norm.weight", 1, h, true);
  fs::create_directories(dir);
  w.write(dir / "model.safetensors");
  std::ofstream(dir / "config.json") << c.dump(2) << "\n";
}

/// Token-weighted mean loss of `lm` over `rows`, in batches.
template <class LM>
double mean_loss(LM& lm, const rows_t& rows, index batch = 16) {
  double sum = 0, count = 0;
  for (std::size_t f = 0; f < rows.size(); f += static_cast<std::size_t>(batch)) {
    const std::size_t e = std::min(rows.size(), f + static_cast<std::size_t>(batch));
    const auto b = peft::models::token_batch::from_rows(rows_t(rows.begin() + static_cast<std::ptrdiff_t>(f), rows.begin() + static_cast<std::ptrdiff_t>(e)));
    const auto labels = b.causal_labels();
    const auto k = static_cast<double>(lm.predicted_tokens(b, labels));
    sum += lm.loss(b, labels) * k;
    count += k;
  }
  return sum / count;
}

peft::models::token_batch batch_at(const rows_t& rows, long long step, index batch) {
  rows_t part;
  for (index i = 0; i < batch; ++i) part.push_back(rows[static_cast<std::size_t>((step * batch + i) % static_cast<long long>(rows.size()))]);
  return peft::models::token_batch::from_rows(part);
}

/// A field of /proc/self/status in MiB: VmRSS (resident now) or VmHWM (the peak); 0 where there
/// is none.
double status_mib(const std::string& field) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.starts_with(field + ":")) return std::strtod(line.c_str() + field.size() + 1, nullptr) / 1024.0;  // kB
  }
  return 0.0;
}

double seconds_since(clock_type::time_point t0) { return std::chrono::duration<double>(clock_type::now() - t0).count(); }

std::string sample(auto& lm, const peft::models::tokenizer& tok, const std::string& prompt) {
  peft::models::sampling_options so;
  so.max_new_tokens = 48;
  so.temperature = 0.7;
  so.top_k = 40;
  so.seed = 1;
  const auto ids = tok.encode(prompt);
  auto all = ids;
  const auto more = peft::models::generate(lm, ids, so);
  all.insert(all.end(), more.begin(), more.end());
  return tok.decode(all, true);
}

const char* const prompt_it = "Il cervello";

// ---- pretraining (in this process) --------------------------------------------------------------

json pretrain(const settings& s, const datasets& d, const peft::models::tokenizer& tok) {
  const fs::path init = s.out / "init", base = s.out / "base";
  write_initial_model(init, 20261203);
  peft::models::load_options lo;
  lo.full_finetuning = true;
  auto lm = peft::models::causal_lm<float>::load(init, lo);
  std::vector<peft::parameter<float>> params;
  for (auto& p : lm.parameters()) params.push_back(p);
  std::size_t n = 0;
  for (const auto& p : params) n += static_cast<std::size_t>(p.value.size());
  peft::train::adamw<float> opt(params, {.lr = 3e-3, .weight_decay = 0.0});
  opt.set_schedule(peft::train::cosine_schedule_with_warmup(s.pretrain_steps / 10, s.pretrain_steps));
  std::printf("pretraining %zu weights on %zu English rows of %td tokens, %lld steps of %td rows\n", n, d.en_train.size(),
              seq_len, s.pretrain_steps, s.pretrain_batch);
  std::vector<double> losses;
  const auto t0 = clock_type::now();
  for (long long step = 0; step < s.pretrain_steps; ++step) {
    const auto b = batch_at(d.en_train, step, s.pretrain_batch);
    lm.zero_grad();
    losses.push_back(lm.loss_and_backward(b, b.causal_labels()));
    opt.step();
    if ((step + 1) % 25 == 0 || step + 1 == s.pretrain_steps) {
      std::printf("\r  step %lld/%lld  loss %.3f  %.0f tok/s   ", step + 1, s.pretrain_steps, losses.back(),
                  static_cast<double>((step + 1) * s.pretrain_batch * seq_len) / seconds_since(t0));
      std::fflush(stdout);
    }
  }
  const double secs = seconds_since(t0);
  std::printf("\n");
  lm.save_pretrained(base, init);
  fs::copy_file(s.tokenizer, base / "tokenizer.json", fs::copy_options::overwrite_existing);
  json r{{"steps", s.pretrain_steps}, {"seconds", secs}, {"parameters", n}, {"losses", losses},
         {"en_val_loss", mean_loss(lm, d.en_val)}, {"it_val_loss", mean_loss(lm, d.it_val)},
         {"sample_it", sample(lm, tok, prompt_it)}, {"sample_en", sample(lm, tok, "The brain")}};
  std::ofstream(base / "pretrain.json") << r.dump(1) << "\n";
  return r;
}

// ---- one adaptation run (a child process) -------------------------------------------------------

template <class Base>
json adapt(const settings& s, const datasets& d, const peft::models::tokenizer& tok, const std::string& name, int seed) {
  method_setup m = setup_of(name);
  if (s.lr > 0) m.lr = s.lr;
  const bool full = m.method == "full";
  const fs::path base = s.out / "base", dir = s.out / "runs" / (name + "-seed" + std::to_string(seed));
  peft::models::load_options lo;
  lo.full_finetuning = full;
  peft::models::peft_model<float, Base> pm(peft::models::causal_lm<float, Base>::load(base, lo), base.string());
  auto& lm = pm.model();
  if (!full) {
    peft::models::adapter_options ao;
    ao.method = m.method;
    ao.rank = 8;
    ao.alpha = 16;
    ao.use_rslora = m.rslora;
    ao.targets = {"all-linear"};
    ao.seed = static_cast<std::uint64_t>(seed);
    pm.add_adapter("default", ao);
  }
  std::vector<peft::parameter<float>> params;
  for (auto& p : lm.parameters()) {
    // SoRA's gates are stepped by its trainer (the proximal rule), not by AdamW.
    if (p.trainable && !p.integer && !(m.method == "sora" && p.name.ends_with("lora_gate")) &&
        !(m.frozen_embeddings && p.name.find("embed_tokens") != std::string::npos)) {
      params.push_back(p);
    }
  }
  std::size_t trainable = 0;
  for (const auto& p : lm.parameters()) {
    if (p.trainable && !p.integer && !(m.frozen_embeddings && p.name.find("embed_tokens") != std::string::npos)) {
      trainable += static_cast<std::size_t>(p.value.size());
    }
  }
  std::optional<peft::train::dynamic_rank_trainer<float>> dyn;
  std::optional<peft::train::sora_trainer<float>> so;
  if constexpr (std::is_same_v<Base, peft::dense<float>>) {
    if (m.method == "dynamic_rank") {
      dyn.emplace(pm.template adapters_of<peft::dynamic_rank<float>>(),
                  peft::train::dynamic_rank_schedule_options{.total_steps = s.adapt_steps, .interval = 5, .target_rank = 8});
    }
    if (m.method == "sora") so.emplace(pm.template adapters_of<peft::sora<float>>(), peft::train::sora_training_options{.xi0 = 2.0});
  }
  peft::train::adamw<float> opt(params, {.lr = m.lr, .weight_decay = 0.0});
  opt.set_schedule(peft::train::linear_schedule_with_warmup(s.adapt_steps / 10, s.adapt_steps));
  rows_t rows = d.it_train;
  shuffle(rows, 1000 + static_cast<std::uint64_t>(seed));
  std::vector<double> losses;
  const auto t0 = clock_type::now();
  for (long long step = 0; step < s.adapt_steps; ++step) {
    const auto b = batch_at(rows, step, s.adapt_batch);
    lm.zero_grad();
    losses.push_back(lm.loss_and_backward(b, b.causal_labels()));
    if (dyn) dyn->add_regularizer(step + 1);
    const double lr = opt.lr("default");
    opt.step();
    if (dyn) dyn->after_step(step + 1);
    if (so) so->after_step(lr);
  }
  const double secs = seconds_since(t0);
  json r{{"method", name}, {"seed", seed}, {"seconds", secs}, {"trainable", trainable}, {"losses", losses}};
  if (dyn || so) {
    index rank = 0, layers = 0;
    for (auto k : dyn ? dyn->ranks() : so->ranks()) {
      rank += k;
      ++layers;
    }
    r["mean_rank"] = static_cast<double>(rank) / static_cast<double>(layers);
    pm.compact_adapter();
    // What the saved LoRA holds: the components left.
    r["trainable_after"] = pm.trainable_parameters();
  }
  r["val_loss"] = mean_loss(lm, d.it_val);
  r["sample"] = sample(lm, tok, prompt_it);
  const rows_t check(d.it_val.begin(), d.it_val.begin() + std::min<std::ptrdiff_t>(4, static_cast<std::ptrdiff_t>(d.it_val.size())));
  const double trained_loss = mean_loss(lm, check);
  fs::remove_all(dir);
  if (full) {
    if constexpr (std::is_same_v<Base, peft::dense<float>>) lm.save_pretrained(dir, base);
  } else {
    pm.save_pretrained(dir);
  }
  // The check fortunes_check.py repeats with transformers + PEFT: the saved run reloaded over the
  // dense f32 base (QLoRA adapters too: PEFT loads them over the unquantized model).
  if (full) {
    auto again = peft::models::causal_lm<float>::load(dir);
    r["check_loss"] = mean_loss(again, check);
  } else {
    auto again = peft::models::peft_model<float>::from_pretrained(peft::models::causal_lm<float>::load(base), dir);
    r["check_loss"] = mean_loss(again.model(), check);
  }
  // What was saved is what was trained (QLoRA's reload runs over the unquantized base instead).
  const double reloaded = r["check_loss"];
  if (m.quantized.empty() && !(std::abs(reloaded - trained_loss) <= 1e-5 * std::abs(trained_loss))) {
    throw std::runtime_error(name + ": the saved run reloads with loss " + std::to_string(reloaded) + ", trained " +
                             std::to_string(trained_loss));
  }
  r["dir"] = fs::relative(dir, s.out).string();
  return r;
}

json adapt_any(const settings& s, const datasets& d, const peft::models::tokenizer& tok, const std::string& name, int seed) {
  const auto q = setup_of(name).quantized;
  if (q.empty()) return adapt<peft::dense<float>>(s, d, tok, name, seed);
  // nf4 and q4_0 through one run-time base: the model stack is compiled once for both.
  const peft::any_quantized::format_scope format(q);
  return adapt<peft::any_quantized>(s, d, tok, name, seed);
}

// ---- the report ---------------------------------------------------------------------------------

struct stats {
  double mean = 0, sd = 0;
};

stats stats_of(const std::vector<double>& x) {
  stats s;
  for (double v : x) s.mean += v;
  s.mean /= static_cast<double>(x.size());
  for (double v : x) s.sd += (v - s.mean) * (v - s.mean);
  s.sd = x.size() > 1 ? std::sqrt(s.sd / static_cast<double>(x.size() - 1)) : 0.0;
  return s;
}

std::string fmt(const char* f, double a, double b = 0) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, a, b);
  return buf;
}

/// Training-loss curves (moving average over 5 steps), one per method (mean over seeds).
void write_svg(const fs::path& path, const std::string& title, const std::vector<std::pair<std::string, std::vector<double>>>& series) {
  const double W = 760, H = 440, L = 60, R = 170, T = 40, B = 50;
  double lo = 1e30, hi = -1e30;
  std::size_t n = 0;
  for (const auto& [name, y] : series) {
    for (double v : y) lo = std::min(lo, v), hi = std::max(hi, v);
    n = std::max(n, y.size());
  }
  lo = std::floor(lo * 2) / 2;
  hi = std::ceil(hi * 2) / 2;
  auto X = [&](double i) { return L + (W - L - R) * i / std::max<double>(1, static_cast<double>(n - 1)); };
  auto Y = [&](double v) { return T + (H - T - B) * (hi - v) / std::max(1e-9, hi - lo); };
  static const char* colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  std::ostringstream o;
  o << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H << "' font-family='sans-serif' font-size='12'>\n"
    << "<rect width='100%' height='100%' fill='white'/>\n"
    << "<text x='" << L << "' y='24' font-size='14'>" << title << "</text>\n";
  for (double v = lo; v <= hi + 1e-9; v += 0.5) {
    o << "<line x1='" << L << "' x2='" << W - R << "' y1='" << Y(v) << "' y2='" << Y(v) << "' stroke='#ddd'/>"
      << "<text x='" << L - 8 << "' y='" << Y(v) + 4 << "' text-anchor='end'>" << fmt("%.1f", v) << "</text>\n";
  }
  for (std::size_t i = 0; i < n; i += std::max<std::size_t>(1, n / 6)) {
    o << "<text x='" << X(static_cast<double>(i)) << "' y='" << H - B + 18 << "' text-anchor='middle'>" << i << "</text>\n";
  }
  o << "<text x='" << (L + W - R) / 2 << "' y='" << H - 12 << "' text-anchor='middle'>step</text>\n"
    << "<text x='16' y='" << (T + H - B) / 2 << "' transform='rotate(-90 16 " << (T + H - B) / 2 << ")' text-anchor='middle'>training loss</text>\n";
  for (std::size_t k = 0; k < series.size(); ++k) {
    const auto& y = series[k].second;
    const char* c = colors[k % 10];
    o << "<polyline fill='none' stroke='" << c << "' stroke-width='1.5' points='";
    for (std::size_t i = 0; i < y.size(); ++i) {
      double m = 0;
      std::size_t a = i >= 4 ? i - 4 : 0;
      for (std::size_t j = a; j <= i; ++j) m += y[j];
      o << X(static_cast<double>(i)) << "," << Y(m / static_cast<double>(i - a + 1)) << " ";
    }
    o << "'/>\n<text x='" << W - R + 10 << "' y='" << T + 16 * static_cast<double>(k) + 10 << "' fill='" << c << "'>"
      << series[k].first << "</text>\n";
  }
  o << "</svg>\n";
  std::ofstream(path) << o.str();
}

/// Writes one line of token ids per row (the rows fortunes_check.py scores).
void write_tokens(const fs::path& path, const rows_t& rows) {
  std::ofstream o(path);
  for (const auto& r : rows) {
    for (std::size_t i = 0; i < r.size(); ++i) o << (i ? " " : "") << r[i];
    o << "\n";
  }
}

// ---- the driver ---------------------------------------------------------------------------------

/// Runs `self --child METHOD SEED ...`; std::runtime_error unless it exits with status 0.
void run_child(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ) != 0) {
    throw std::runtime_error("cannot start a child process");
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error("the run '" + args[2] + "', seed " + std::to_string(std::stoi(args[3]) - 1) + " failed");
  }
}

/// DIR/results.md, results.json, loss.svg and samples.txt from the pretraining and the runs.
void report(const settings& s, const json& pre, const json& runs, clock_type::time_point t_all) {
  std::ostringstream md;
  md << "| method | trainable parameters | Italian val. perplexity | training time (s) | peak memory (MiB) | "
        "of which model + training (MiB) |\n"
     << "|---|---:|---:|---:|---:|---:|\n";
  md << "| pretrained model, not adapted | - | " << fmt("%.2f", std::exp(pre["it_val_loss"].get<double>())) << " | - | - | - |\n";
  std::vector<std::pair<std::string, std::vector<double>>> curves;
  std::ostringstream samples;
  samples << "prompt: \"" << prompt_it << "\"\n\npretrained (English only):\n" << pre["sample_it"].get<std::string>() << "\n\n";
  std::vector<std::string> methods;  // in the order they ran
  for (const auto& r : runs) {
    if (std::find(methods.begin(), methods.end(), r["method"].get<std::string>()) == methods.end()) methods.push_back(r["method"]);
  }
  for (const auto& m : methods) {
    std::vector<double> ppl, secs, mem, above, curve;
    std::string trainable, extra;
    for (const auto& r : runs) {
      if (r["method"] != m) continue;
      ppl.push_back(std::exp(r["val_loss"].get<double>()));
      secs.push_back(r["seconds"]);
      mem.push_back(r["peak_mib"]);
      above.push_back(r["peak_mib"].get<double>() - r["rss_before_model_mib"].get<double>());
      trainable = std::to_string(r["trainable"].get<std::size_t>());
      if (r.contains("trainable_after")) trainable += " (saved " + std::to_string(r["trainable_after"].get<std::size_t>()) + ")";
      const auto l = r["losses"].get<std::vector<double>>();
      if (curve.empty()) curve.assign(l.size(), 0.0);
      for (std::size_t i = 0; i < l.size(); ++i) curve[i] += l[i];
      if (r.contains("mean_rank")) extra = fmt(" (mean rank %.1f)", r["mean_rank"].get<double>());
      if (r["seed"] == 0) samples << m << ":\n" << r["sample"].get<std::string>() << "\n\n";
    }
    for (auto& c : curve) c /= static_cast<double>(ppl.size());
    const auto p = stats_of(ppl), t = stats_of(secs), q = stats_of(mem), a = stats_of(above);
    md << "| " << m << extra << " | " << trainable << " | " << fmt("%.2f ± %.2f", p.mean, p.sd) << " | "
       << fmt("%.1f ± %.1f", t.mean, t.sd) << " | " << fmt("%.0f", q.mean) << " | " << fmt("%.1f", a.mean) << " |\n";
    curves.emplace_back(m, curve);
  }
  write_svg(s.out / "loss.svg", "Adapting to Italian fortunes: training loss (mean of " + std::to_string(s.seeds) + " seeds)", curves);
  std::ofstream(s.out / "samples.txt") << samples.str();
  std::ofstream(s.out / "results.md") << md.str();
  std::printf("\n%s\nsamples: %s, curves: %s; %.0f s\n", md.str().c_str(), (s.out / "samples.txt").c_str(),
              (s.out / "loss.svg").c_str(), seconds_since(t_all));
}

int drive(const settings& s, const std::vector<std::string>& passthrough) {
  const auto t_all = clock_type::now();
  const auto tok = peft::models::tokenizer::load(s.tokenizer);
  const datasets d = load_data(s, tok, true);
  std::printf("English: %zu fortunes -> %zu training rows of %td tokens; Italian: %zu fortunes -> %zu rows "
              "(validation: %zu + %zu rows)\n",
              d.en_fortunes, d.en_train.size(), seq_len, d.it_fortunes, d.it_train.size(), d.en_val.size(), d.it_val.size());
  fs::create_directories(s.out);
  json pre;
  if (s.reuse_base && fs::exists(s.out / "base" / "pretrain.json")) {
    std::ifstream in(s.out / "base" / "pretrain.json");
    pre = json::parse(in);
    std::printf("reusing the pretrained model in %s\n", (s.out / "base").c_str());
  } else {
    pre = pretrain(s, d, tok);
  }
  std::printf("pretrained in %.0f s: English validation perplexity %.1f, Italian %.1f\n", pre["seconds"].get<double>(),
              std::exp(pre["en_val_loss"].get<double>()), std::exp(pre["it_val_loss"].get<double>()));
  write_tokens(s.out / "check_tokens.txt", rows_t(d.it_val.begin(), d.it_val.begin() + std::min<std::ptrdiff_t>(4, static_cast<std::ptrdiff_t>(d.it_val.size()))));

  json runs = json::array();
  const std::size_t total = s.methods.size() * static_cast<std::size_t>(s.seeds);
  std::size_t k = 0;
  for (const auto& m : s.methods) {
    for (int seed = 0; seed < s.seeds; ++seed) {
      std::vector<std::string> args = {"fortunes", "--child", m, std::to_string(seed + 1)};
      args.insert(args.end(), passthrough.begin(), passthrough.end());
      run_child(args);
      const fs::path res = s.out / "runs" / (m + "-seed" + std::to_string(seed) + ".json");
      std::ifstream in(res);
      json r = json::parse(in);
      std::printf("[%zu/%zu] %-12s seed %d: val ppl %6.2f  %5.1f s  %5.0f MiB\n", ++k, total, m.c_str(), seed,
                  std::exp(r["val_loss"].get<double>()), r["seconds"].get<double>(), r["peak_mib"].get<double>());
      std::fflush(stdout);
      runs.push_back(r);
    }
  }

  json all{{"pretrain", pre}, {"runs", runs}, {"seeds", s.seeds}, {"adapt_steps", s.adapt_steps}, {"adapt_batch", s.adapt_batch},
           {"seq_len", seq_len}};
  std::ofstream(s.out / "results.json") << all.dump(1) << "\n";
  report(s, pre, runs, t_all);
  return 0;
}

long long number(const std::string& flag, const std::string& v) {
  std::size_t used = 0;
  long long x = -1;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || x < 1) throw std::invalid_argument(flag + " needs a positive integer, not '" + v + "'");
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    settings s;
    std::vector<std::string> args(argv + 1, argv + argc), passthrough;
    std::optional<std::pair<std::string, int>> child;
    for (std::size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= args.size()) throw std::invalid_argument(a + " needs a value");
        return args[++i];
      };
      if (a == "--child") {
        const std::string m = value();
        child = {{m, static_cast<int>(number(a, value())) - 1}};  // 1-based on the command line
        continue;
      }
      if (a == "--out") {
        s.out = value();
      } else if (a == "--fortunes") {
        s.fortunes = value();
      } else if (a == "--seeds") {
        s.seeds = static_cast<int>(number(a, value()));
      } else if (a == "--pretrain-steps") {
        s.pretrain_steps = number(a, value());
      } else if (a == "--adapt-steps") {
        s.adapt_steps = number(a, value());
      } else if (a == "--lr") {
        s.lr = std::stod(value());
        if (!(s.lr > 0)) throw std::invalid_argument("--lr must be positive");
      } else if (a == "--threads") {
        s.threads = static_cast<int>(number(a, value()));
      } else if (a == "--methods") {
        s.methods.clear();
        std::stringstream ss(value());
        for (std::string m; std::getline(ss, m, ',');) {
          setup_of(m);
          s.methods.push_back(m);
        }
      } else if (a == "--reuse-base") {
        s.reuse_base = true;
        continue;
      } else if (a == "--report") {
        s.report_only = true;
        continue;
      } else {
        throw std::invalid_argument("unknown argument '" + a +
                                    "' (usage: fortunes [--out DIR] [--seeds N] [--pretrain-steps N] [--adapt-steps N] "
                                    "[--methods a,b] [--fortunes DIR] [--threads T] [--lr LR] [--reuse-base] | --report [--out DIR])");
      }
      passthrough.push_back(a);
      passthrough.push_back(args[i]);
    }
#ifdef _OPENMP
    if (s.threads > 0) omp_set_num_threads(s.threads);
#endif
    if (child) {
      const auto tok = peft::models::tokenizer::load(s.tokenizer);
      const datasets d = load_data(s, tok, false);
      const double before = status_mib("VmRSS");
      json r = adapt_any(s, d, tok, child->first, child->second);
      r["rss_before_model_mib"] = before;
      // The process's own peak: wait4's ru_maxrss would not do, posix_spawn's child starts in
      // the parent's memory and Linux carries that high-water mark across exec.
      r["peak_mib"] = status_mib("VmHWM");
      std::ofstream(s.out / "runs" / (child->first + "-seed" + std::to_string(child->second) + ".json")) << r.dump(1) << "\n";
      return 0;
    }
    if (s.report_only) {
      std::ifstream in(s.out / "results.json");
      if (!in) throw std::runtime_error("--report: no " + (s.out / "results.json").string());
      const json all = json::parse(in);
      s.seeds = all["seeds"];
      report(s, all["pretrain"], all["runs"], clock_type::now());
      return 0;
    }
    return drive(s, passthrough);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fortunes: %s\n", e.what());
    return 2;
  }
}
