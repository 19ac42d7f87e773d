// `peft logits | generate | finetune`: language models from a HuggingFace model directory.
// See docs/models.md for the contracts; every failure is a one-line message and exit status 2.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef PEFT_CLI_MPI
#include <peft/dist/mpi.hpp>
#endif

#include <peft/base/any_quantized.hpp>
#include <peft/base/quantized_formats.hpp>
#include <peft/io/detail/file_io.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/models/generate.hpp>
#include <peft/models/memory.hpp>
#include <peft/models/peft_model.hpp>
#include <peft/models/text_data.hpp>
#include <peft/models/token_file.hpp>
#include <peft/train/dynamic_rank_trainer.hpp>
#include <peft/train/loraplus.hpp>
#include <peft/train/optimizer.hpp>
#include <peft/train/sora_trainer.hpp>

#include "cli_common.hpp"

namespace peft_cli {

namespace {

namespace fs = std::filesystem;
using peft::index;

/// Options every LM command shares.
struct model_args {
  std::optional<std::string> model, adapter, tokens, quantize;
  std::optional<std::string> text, jsonl, tokenizer;  // text data and the tokenizer that reads it
  index seq_len = 0;                                   // 0: min(512, the model's positions)
  bool f64 = false, int8 = false;
  int threads = 0;

  /// Consumes the current flag if it is one of these; false otherwise.
  bool read(arg_reader& r) {
    const std::string& a = r.flag();
    if (a == "--model") {
      model = r.value();
    } else if (a == "--adapter") {
      adapter = r.value();
    } else if (a == "--tokens") {
      tokens = r.value();
    } else if (a == "--text") {
      text = r.value();
    } else if (a == "--jsonl") {
      jsonl = r.value();
    } else if (a == "--tokenizer") {
      tokenizer = r.value();
    } else if (a == "--seq-len") {
      seq_len = static_cast<index>(r.integer(2));
    } else if (a == "--quantize-base") {
      quantize = r.value();
      if (!peft::quantized_format_index(*quantize)) {
        throw usage_error("--quantize-base must be one of " + peft::quantized_format_names() + ", not '" + *quantize + "'");
      }
    } else if (a == "--precision") {
      const std::string p = r.value();
      if (p != "f32" && p != "f64") throw usage_error("--precision must be f32 or f64, not '" + p + "'");
      f64 = p == "f64";
    } else if (a == "--threads") {
      threads = static_cast<int>(r.integer(1));
    } else if (a == "--int8-activations") {
      int8 = true;
    } else {
      return false;
    }
    return true;
  }
  /// text_inputs: the command also reads --text and --jsonl; needs_input: one of them is required.
  void require(const char* command, bool text_inputs = false, bool needs_input = true) const {
    if (!model) throw usage_error(std::string(command) + " needs --model");
    const int given = (tokens ? 1 : 0) + (text ? 1 : 0) + (jsonl ? 1 : 0);
    if (!text_inputs && (text || jsonl)) throw usage_error(std::string(command) + " reads --tokens, not --text or --jsonl");
    if (given > 1) throw usage_error("give one of --tokens, --text and --jsonl");
    if (given == 0 && needs_input) {
      throw usage_error(std::string(command) + (text_inputs ? " needs --tokens, --text or --jsonl" : " needs --tokens"));
    }
    if (tokenizer && tokens) throw usage_error("--tokenizer reads text; a --tokens file is ids already");
    if (seq_len && tokens) throw usage_error("--seq-len applies to --text and --jsonl; a --tokens file's lines are its rows");
    if (f64 && quantize) throw usage_error("--precision f64 runs dense bases only; drop --quantize-base");
    if (int8 && (f64 || quantize || !peft::models::is_gguf_path(*model))) {
      throw usage_error("--int8-activations needs a .gguf model in f32, without --quantize-base");
    }
  }
  void apply_threads() const {
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#endif
  }
};

/// Calls f.template operator()<T, Base>() for the compute type and base the arguments choose.
template <class F>
int with_model_type(const model_args& m, F&& f) {
  if (m.f64) return f.template operator()<double, peft::dense<double>>();
  // A llama.cpp model file: its tensors are the bases, in place.
  if (!m.quantize && peft::models::is_gguf_path(*m.model)) return f.template operator()<float, peft::gguf_weight>();
  if (!m.quantize) return f.template operator()<float, peft::dense<float>>();
  // Every format through one run-time base: the language-model stack is compiled once for them.
  const peft::any_quantized::format_scope format(*m.quantize);
  return f.template operator()<float, peft::any_quantized>();
}

template <class T, class Base>
peft::models::peft_model<T, Base> open_model(const model_args& m, bool checkpointing = false) {
  peft::models::load_options lo;
  lo.activation_checkpointing = checkpointing;
  lo.int8_activations = m.int8;
  peft::models::peft_model<T, Base> pm(peft::models::causal_lm<T, Base>::load(*m.model, lo), *m.model);
  if (m.adapter) pm.load_adapter(*m.adapter);
  return pm;
}

void check_lengths(const std::vector<std::vector<long long>>& rows, index max_positions, index extra = 0) {
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (static_cast<index>(rows[i].size()) + extra > max_positions) {
      throw peft::error("[peft] line " + std::to_string(i + 1) + " has " + std::to_string(rows[i].size()) +
                        " tokens" + (extra ? " + " + std::to_string(extra) + " new" : std::string()) +
                        "; the model has " + std::to_string(max_positions) + " positions");
    }
  }
}

/// The model's configuration (directory or .gguf) without its weights.
peft::models::lm_config model_config(const std::string& model) {
  return peft::models::is_gguf_path(model) ? peft::models::gguf_config(peft::io::gguf_file::open(model))
                                           : peft::models::lm_config::load(model);
}

/// The tokenizer: --tokenizer, else the model directory's tokenizer.json.
peft::models::tokenizer open_tokenizer(const model_args& m) {
  if (m.tokenizer) return peft::models::tokenizer::load(*m.tokenizer);
  if (peft::models::is_gguf_path(*m.model)) {
    throw usage_error("a .gguf model needs --tokenizer TOKENIZER.json to read text (the GGUF vocabulary is not read)");
  }
  const fs::path file = fs::path(*m.model) / "tokenizer.json";
  if (!fs::exists(file)) throw peft::io_error("[tokenizer] " + file.string() + " does not exist; give --tokenizer FILE");
  return peft::models::tokenizer::load(file);
}

/// Training or validation rows from `file` in the form the flags chose (--tokens, --text, --jsonl).
peft::models::text_data read_rows(const model_args& m, const std::string& file, const peft::models::lm_config& cfg,
                                  const std::optional<peft::models::tokenizer>& tok) {
  peft::models::text_data d;
  if (m.tokens) {
    for (auto& r : peft::models::read_token_file(file)) d.rows.push_back({std::move(r), 0});
    d.examples = d.rows.size();
    return d;
  }
  peft::models::text_data_options o;
  o.seq_len = m.seq_len ? m.seq_len : std::min<index>(512, cfg.max_positions);
  if (o.seq_len > cfg.max_positions) {
    throw usage_error("--seq-len " + std::to_string(o.seq_len) + " exceeds the model's " + std::to_string(cfg.max_positions) + " positions");
  }
  if (!cfg.eos_token_ids.empty()) o.eos = cfg.eos_token_ids.front();
  o.format = m.jsonl ? peft::models::text_format::jsonl : peft::models::text_format::text;
  d = peft::models::read_text_data(file, *tok, o);
  for (const auto& r : d.rows) {
    for (const long long id : r.ids) {
      if (id >= cfg.vocab_size) {
        throw peft::error("[tokenizer] token id " + std::to_string(id) + " of " + file + " is outside the model's vocabulary of " +
                          std::to_string(cfg.vocab_size) + ": the tokenizer is not this model's");
      }
    }
  }
  return d;
}

/// Whether mpirun (Open MPI, MPICH, PMIx launchers) started this process.
bool launched_by_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) {
    if (std::getenv(v) != nullptr) return true;
  }
  return false;
}

/// This process's place in a data-parallel run: rank 0 of 1 without mpirun.
struct data_parallel {
  int rank = 0, size = 1;
#ifdef PEFT_CLI_MPI
  std::optional<peft::dist::environment> env;
#endif
  data_parallel() {
    if (!launched_by_mpirun()) return;
#ifdef PEFT_CLI_MPI
    int argc = 0;
    char** argv = nullptr;
    env.emplace(argc, argv);
    rank = env->rank();
    size = env->size();
#else
    throw peft::unsupported_error("[finetune] started by mpirun, but this peft was built without MPI");
#endif
  }
  bool root() const noexcept { return rank == 0; }
};

std::string clock_text(double seconds) {
  const long s = static_cast<long>(seconds + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  return buf;
}

}  // namespace

int lm_logits(const std::vector<std::string>& args) {
  model_args m;
  std::optional<std::string> out;
  arg_reader r(args);
  while (r.next()) {
    if (m.read(r)) continue;
    if (r.flag() == "--out") {
      out = r.value();
    } else {
      r.unknown();
    }
  }
  m.require("logits");
  if (!out) throw usage_error("logits needs --out");
  m.apply_threads();
  const auto rows = peft::models::read_token_file(*m.tokens);
  return with_model_type(m, [&]<class T, class Base>() {
    auto pm = open_model<T, Base>(m);
    auto& lm = pm.model();
    check_lengths(rows, lm.config().max_positions);
    index length = 0;
    for (const auto& row : rows) length = std::max(length, static_cast<index>(row.size()));
    const index V = lm.vocab_size();
    const auto n = static_cast<index>(rows.size());
    std::vector<float> all(static_cast<std::size_t>(n * length * V), 0.0f);
    // A few sequences at a time keeps the activations small.
    constexpr std::size_t chunk = 8;
    for (std::size_t first = 0; first < rows.size(); first += chunk) {
      const std::size_t last = std::min(rows.size(), first + chunk);
      const std::vector<std::vector<long long>> part(rows.begin() + static_cast<std::ptrdiff_t>(first),
                                                     rows.begin() + static_cast<std::ptrdiff_t>(last));
      const auto b = peft::models::token_batch::from_rows(part);
      const auto logits = lm.forward(b);
      for (index s = 0; s < b.sequences; ++s) {
        for (index c = 0; c < b.length; ++c) {
          const T* src = logits.row(s * b.length + c);
          float* dst = all.data() + ((static_cast<index>(first) + s) * length + c) * V;
          for (index v = 0; v < V; ++v) dst[v] = static_cast<float>(src[v]);
        }
      }
    }
    peft::io::safetensors_writer w;
    w.set_metadata({{"format", "pt"}});
    w.add("logits", {n, length, V}, std::span<const float>(all));
    w.write(*out);
    std::fprintf(stderr, "peft: logits (%td, %td, %td) written to %s\n", static_cast<std::ptrdiff_t>(n),
                 static_cast<std::ptrdiff_t>(length), static_cast<std::ptrdiff_t>(V), out->c_str());
    return 0;
  });
}

int lm_generate(const std::vector<std::string>& args) {
  model_args m;
  peft::models::sampling_options s;
  std::optional<std::string> prompt;
  arg_reader r(args);
  bool have_max = false, timings = false;
  while (r.next()) {
    if (m.read(r)) continue;
    const std::string& a = r.flag();
    if (a == "--max-new-tokens") {
      s.max_new_tokens = static_cast<index>(r.integer(0));
      have_max = true;
    } else if (a == "--temperature") {
      s.temperature = r.number();
      if (s.temperature < 0) throw usage_error("--temperature must not be negative");
    } else if (a == "--top-k") {
      s.top_k = static_cast<index>(r.integer(0));
    } else if (a == "--top-p") {
      s.top_p = r.number();
      if (!(s.top_p > 0 && s.top_p <= 1)) throw usage_error("--top-p must be in (0, 1]");
    } else if (a == "--seed") {
      s.seed = static_cast<std::uint64_t>(r.integer(0));
    } else if (a == "--timings") {
      timings = true;
    } else if (a == "--ignore-eos") {
      s.stop_at_eos = false;
    } else if (a == "--prompt") {
      prompt = r.value();
    } else {
      r.unknown();
    }
  }
  m.require("generate", false, !prompt);
  if (prompt && m.tokens) throw usage_error("give --prompt or --tokens, not both");
  if (!prompt && m.tokenizer) throw usage_error("--tokenizer is for --prompt");
  if (!have_max) throw usage_error("generate needs --max-new-tokens");
  m.apply_threads();
  // --prompt: text in, text out (the tokenizer's BOS added; the continuation printed as text).
  std::optional<peft::models::tokenizer> tok;
  std::vector<std::vector<long long>> rows;
  if (prompt) {
    tok = open_tokenizer(m);
    rows.push_back(tok->encode(*prompt, true));
    if (rows.back().empty()) throw usage_error("--prompt encodes to no token; give some text");
    const auto cfg = model_config(*m.model);
    for (const long long id : rows.back()) {
      if (id >= cfg.vocab_size) throw peft::error("[tokenizer] the prompt has token id " + std::to_string(id) + ", outside the model's vocabulary: the tokenizer is not this model's");
    }
  } else {
    rows = peft::models::read_token_file(*m.tokens);
  }
  return with_model_type(m, [&]<class T, class Base>() {
    auto pm = open_model<T, Base>(m);
    check_lengths(rows, pm.model().config().max_positions, s.max_new_tokens);
    std::string text;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      auto opt = s;
      opt.seed = s.seed + i;  // each prompt its own stream
      peft::models::generation_timing timing;
      const auto ids = peft::models::generate(pm.model(), rows[i], opt, &timing);
      if (timings) {
        std::fprintf(stderr, "peft: prompt %td tokens in %.3f s (%.1f tokens/s), %td decoding steps in %.3f s (%.2f tokens/s)\n",
                     static_cast<std::ptrdiff_t>(timing.prompt_tokens), timing.prompt_seconds,
                     static_cast<double>(timing.prompt_tokens) / timing.prompt_seconds,
                     static_cast<std::ptrdiff_t>(timing.new_tokens), timing.decode_seconds,
                     timing.new_tokens ? static_cast<double>(timing.new_tokens) / timing.decode_seconds : 0.0);
      }
      if (tok) {
        // The continuation is the decoded whole less the decoded prompt (decoding the new ids
        // alone would drop a SentencePiece-style leading space).
        std::vector<long long> all = rows[i];
        all.insert(all.end(), ids.begin(), ids.end());
        const std::string whole = tok->decode(all, true), head = tok->decode(rows[i], true);
        text += whole.compare(0, head.size(), head) == 0 ? whole.substr(head.size()) : tok->decode(ids, true);
        text.push_back('\n');
        continue;
      }
      for (std::size_t k = 0; k < ids.size(); ++k) {
        if (k) text.push_back(' ');
        text.append(std::to_string(ids[k]));
      }
      text.push_back('\n');
    }
    std::fputs(text.c_str(), stdout);
    return 0;
  });
}

namespace {

/// What `finetune` saves beside the adapter so --resume can continue exactly.
struct trainer_state {
  long long step = 0;
  std::string method;
  static constexpr const char* file = "trainer_state.json";
};

void write_file_atomically(const fs::path& path, const std::string& text) {
  peft::io::detail::atomic_output out("finetune", path);
  out.write(text.data(), text.size());
  out.commit();
}

/// The log rows of steps before `start` from an earlier run's log: complete lines only (a killed
/// run may have left half a line), in order, stopping at the first that does not parse.
std::vector<std::string> log_rows_before(const fs::path& path, long long start) {
  std::ifstream in(path, std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> kept;
  std::size_t p = text.find('\n');  // after the header
  long long expect = 0;
  while (p != std::string::npos) {
    const std::size_t q = text.find('\n', p + 1);
    if (q == std::string::npos) break;  // no newline: incomplete
    const std::string line = text.substr(p + 1, q - p - 1);
    p = q;
    std::size_t used = 0;
    long long step = -1;
    try {
      step = std::stoll(line, &used);
    } catch (const std::exception&) {
      break;
    }
    if (used == 0 || line[used] != ',' || step != expect || step >= start) break;
    kept.push_back(line);
    ++expect;
  }
  return kept;
}

/// "2G", "512M", "64k", "1000" (bytes) as bytes; usage_error otherwise.
std::size_t parse_bytes(const std::string& flag, const std::string& v) {
  std::size_t used = 0;
  double x = -1;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  std::string unit = v.substr(used);
  double mult = 1;
  if (unit == "k" || unit == "K" || unit == "KiB") mult = 1024.0;
  else if (unit == "M" || unit == "MiB") mult = 1024.0 * 1024;
  else if (unit == "G" || unit == "GiB") mult = 1024.0 * 1024 * 1024;
  else if (!unit.empty()) used = 0;
  if (used == 0 || !(x >= 0) || x * mult > 1e19) throw usage_error(flag + " must be a size such as 512M or 8G, not '" + v + "'");
  return static_cast<std::size_t>(x * mult);
}

/// Bytes per element of base Base's linear weights, from a 1 x 256 example (dense: the scalar).
template <class T, class Base>
double base_bytes_per_weight() {
  if constexpr (std::is_same_v<Base, peft::dense<T>>) {
    return sizeof(T);
  } else if constexpr (requires { Base::quantize(std::declval<peft::matrix_view<const float>>()); }) {
    std::vector<float> ones(256, 1.0f);
    return static_cast<double>(Base::quantize(peft::matrix_view<const float>(ones.data(), 1, 256)).storage_bytes()) / 256.0;
  } else {
    return 0.0;  // a GGUF file: counted whole, as embedding_bytes
  }
}

template <class T>
bool all_finite(const peft::matrix_view<T>& v) {
  for (index i = 0; i < v.rows(); ++i) {
    for (index j = 0; j < v.cols(); ++j) {
      if (!std::isfinite(v(i, j))) return false;
    }
  }
  return true;
}

/// Refuses, before any weight is read, a run whose estimated memory exceeds what the machine (or
/// --memory-budget) has: an out-of-memory kill an hour in helps nobody.
template <class T, class Base>
void check_memory(const model_args& m, const peft::models::adapter_options& ao, bool full, bool checkpointing,
                  long long micro_batch, int ranks, const std::vector<std::vector<long long>>& rows,
                  std::optional<std::size_t> budget) {
  const bool gguf = peft::models::is_gguf_path(*m.model);
  const auto cfg = gguf ? peft::models::gguf_config(peft::io::gguf_file::open(*m.model)) : peft::models::lm_config::load(*m.model);
  peft::models::training_shape s;
  s.batch = std::max<long long>(1, (micro_batch + ranks - 1) / ranks);
  for (const auto& r : rows) s.seq_len = std::max<index>(s.seq_len, static_cast<index>(r.size()));
  s.checkpointing = checkpointing;
  s.full = full;
  s.scalar_bytes = sizeof(T);
  s.weight_bytes = base_bytes_per_weight<T, Base>();
  if (gguf) s.embedding_bytes = static_cast<std::size_t>(fs::file_size(*m.model));
  if (m.adapter) {
    std::error_code ec;
    const auto bytes = fs::file_size(fs::path(*m.adapter) / "adapter_model.safetensors", ec);
    s.trainable = ec ? 0 : static_cast<std::size_t>(bytes) / 2;  // at least two bytes a value
    s.adapter_rank = 64;
  } else if (!full) {
    const auto targets = ao.targets.empty() ? peft::models::default_targets(cfg) : ao.targets;
    s.trainable = peft::models::lora_parameter_count(cfg, ao.rank, targets);
    s.adapter_rank = ao.rank;
  }
  const auto need = peft::models::estimate_training_memory(cfg, s);
  const auto have = budget ? budget : peft::models::available_memory();
  if (have && need.total() > *have) {
    using peft::models::memory_text;
    throw peft::error("[finetune] training needs about " + memory_text(need.total()) + " (weights " + memory_text(need.weights) +
                      ", optimizer " + memory_text(need.optimizer) + ", activations " + memory_text(need.activations) +
                      ", logits " + memory_text(need.logits) + ") but " + memory_text(*have) +
                      (budget ? " is the --memory-budget" : " is available") +
                      "; try --checkpointing, a smaller --batch (or --grad-accum), a shorter sequence or --quantize-base");
  }
}

}  // namespace

int lm_finetune(const std::vector<std::string>& args) {
  model_args m;
  peft::models::adapter_options ao;
  bool have_method = false;
  std::optional<std::string> out, log_path;
  long long steps = -1, batch = -1, save_every = 0, accum = 1, val_every = 0;
  std::optional<std::string> val_path;
  double lr = -1, weight_decay = 0.0;
  std::optional<double> sora_xi, loraplus_ratio;
  bool resume = false, checkpointing = false, full = false, skip_nonfinite = false;
  std::optional<std::size_t> memory_budget;
  std::optional<std::string> targets_text;
  arg_reader r(args);
  while (r.next()) {
    if (m.read(r)) continue;
    const std::string& a = r.flag();
    if (a == "--method") {
      ao.method = r.value();
      have_method = true;
    } else if (a == "--rank") {
      ao.rank = static_cast<index>(r.integer(1));
    } else if (a == "--alpha") {
      ao.alpha = r.number();
    } else if (a == "--targets") {
      targets_text = r.value();
    } else if (a == "--sora-xi") {
      sora_xi = r.number();
    } else if (a == "--rslora") {
      ao.use_rslora = true;
    } else if (a == "--init") {
      ao.init = r.value();
    } else if (a == "--lora-bias") {
      ao.bias = true;
    } else if (a == "--steps") {
      steps = r.integer(1);
    } else if (a == "--batch") {
      batch = r.integer(1);
    } else if (a == "--grad-accum") {
      accum = r.integer(1);
    } else if (a == "--lr") {
      lr = r.number();
    } else if (a == "--weight-decay") {
      weight_decay = r.number();
    } else if (a == "--loraplus-ratio") {
      loraplus_ratio = r.number();
    } else if (a == "--log") {
      log_path = r.value();
    } else if (a == "--seed") {
      ao.seed = static_cast<std::uint64_t>(r.integer(0));
    } else if (a == "--out") {
      out = r.value();
    } else if (a == "--save-every") {
      save_every = r.integer(1);
    } else if (a == "--resume") {
      resume = true;
    } else if (a == "--checkpointing") {
      checkpointing = true;
    } else if (a == "--full") {
      full = true;
    } else if (a == "--skip-nonfinite") {
      skip_nonfinite = true;
    } else if (a == "--val") {
      val_path = r.value();
    } else if (a == "--val-every") {
      val_every = r.integer(1);
    } else if (a == "--memory-budget") {
      const std::string v = r.value();
      memory_budget = parse_bytes("--memory-budget", v);
    } else {
      r.unknown();
    }
  }
  m.require("finetune", true);
  if (!out) throw usage_error("finetune needs --out");
  if (val_every && !val_path) throw usage_error("--val-every needs --val FILE");
  if (steps < 0 || batch < 0 || lr < 0) throw usage_error("finetune needs --steps, --batch and --lr");
  if (m.adapter && have_method) throw usage_error("give --adapter or --method, not both");
  if (full && (m.adapter || have_method)) throw usage_error("--full trains every weight; drop --adapter and --method");
  if (full && m.quantize) throw usage_error("--full needs dense weights; drop --quantize-base");
  if (full && m.model && peft::models::is_gguf_path(*m.model)) {
    throw usage_error("--full needs a model directory (it saves one); a .gguf model trains adapters");
  }
  if (!m.adapter && !have_method && !resume && !full) {
    throw usage_error("finetune needs --adapter INIT_DIR, --method NAME or --full");
  }
  if (accum > batch) throw usage_error("--grad-accum cannot exceed --batch");
  // Dynamic-rank LoRA and SoRA train their ranks: the trainer's state (importance, masks, the
  // schedule) lives in this run only, and the adapter is saved once, compacted to a plain LoRA.
  const bool trained_rank = have_method && (ao.method == "dynamic_rank" || ao.method == "sora");
  if (trained_rank && (resume || save_every > 0)) {
    throw usage_error("--method " + ao.method + " cannot --resume or --save-every (its rank schedule is not checkpointed); train in one run");
  }
  if (sora_xi && !(have_method && ao.method == "sora")) throw usage_error("--sora-xi applies to --method sora");
  // PiSSA/OLoRA rewrite the bases into their residual (peft_model::add_adapter): dense weights,
  // one run (the residual is not checkpointed); the adapter is saved as PEFT saves it by default.
  if (!ao.init.empty()) {
    if (ao.init != "pissa" && ao.init != "olora") throw usage_error("--init must be pissa or olora");
    if (!(have_method && ao.method == "lora")) throw usage_error("--init applies to --method lora");
    if (resume || save_every > 0) throw usage_error("--init cannot --resume or --save-every (the residual base is not checkpointed); train in one run");
    if (m.quantize || (m.model && peft::models::is_gguf_path(*m.model))) {
      throw usage_error("--init rewrites the base weights into their residual; it needs a model directory's dense weights (drop --quantize-base)");
    }
  }
  if (sora_xi && !(*sora_xi >= 0)) throw usage_error("--sora-xi must be >= 0");
  if (loraplus_ratio && !(*loraplus_ratio > 0 && std::isfinite(*loraplus_ratio))) {
    throw usage_error("--loraplus-ratio must be a finite number > 0");
  }
  if (loraplus_ratio && full) throw usage_error("--loraplus-ratio applies to adapters, not --full");
  if (targets_text) {
    ao.targets.clear();
    std::string t = *targets_text;
    std::size_t p = 0;
    while (p <= t.size()) {
      const std::size_t q = std::min(t.find(',', p), t.size());
      if (q > p) ao.targets.push_back(t.substr(p, q - p));
      p = q + 1;
    }
    if (ao.targets.empty()) throw usage_error("--targets is empty");
  }
  m.apply_threads();
  data_parallel dp;
  if (dp.size > 1 && batch < dp.size) throw usage_error("--batch must be at least the number of MPI ranks");
  if (dp.size > 1 && trained_rank) throw usage_error("--method " + ao.method + " trains in one process (not over MPI)");
  // The data: token ids, or text tokenized with the model's tokenizer (rows with prompt lengths:
  // a prompt/completion JSONL's loss counts the completion only).
  const auto cfg0 = model_config(*m.model);
  std::optional<peft::models::tokenizer> tok;
  if (!m.tokens) tok = open_tokenizer(m);
  const auto data = read_rows(m, m.tokens ? *m.tokens : m.text ? *m.text : *m.jsonl, cfg0, tok);
  const auto rows = data.id_rows();
  std::vector<std::size_t> prompts;
  for (const auto& r : data.rows) prompts.push_back(r.prompt_tokens);
  std::optional<peft::models::text_data> val;
  if (val_path) val = read_rows(m, *val_path, cfg0, tok);
  if (val_path && !val_every) val_every = std::max<long long>(1, steps / 10);
  if (!m.tokens && dp.root()) {
    std::fprintf(stderr, "peft: %zu rows, %zu tokens from %zu %s", data.rows.size(), data.tokens(), data.examples,
                 m.text ? "document" : "examples");
    if (data.truncated) std::fprintf(stderr, ", %zu cut to the sequence length", data.truncated);
    if (data.dropped) std::fprintf(stderr, ", %zu dropped (no completion token left)", data.dropped);
    std::fputc('\n', stderr);
  }
  const fs::path dir = *out;
  auto train = [&]<class T, class Base>() {
    model_args opened = m;
    long long start = 0;
    if (resume) {
      if (!fs::exists(dir / trainer_state::file)) {
        throw peft::io_error("[finetune] --resume: " + (dir / trainer_state::file).string() + " does not exist");
      }
      opened.adapter = dir.string();
      std::ifstream in(dir / trainer_state::file);
      const auto j = nlohmann::json::parse(in, nullptr, false);
      if (!j.is_object() || !j.contains("step") || !j["step"].is_number_integer()) {
        throw peft::format_error("[finetune] " + (dir / trainer_state::file).string() + " is not a trainer state");
      }
      start = j["step"].get<long long>();
    }
    if (full) {
      // A fully fine-tuned model is saved as a model directory; --resume continues from it.
      opened.adapter.reset();
      if (resume) opened.model = dir.string();
    }
    check_memory<T, Base>(opened, ao, full, checkpointing, (batch + accum - 1) / accum, dp.size, rows, memory_budget);
    peft::models::load_options lo;
    lo.activation_checkpointing = checkpointing;
    lo.full_finetuning = full;
    lo.int8_activations = m.int8;
    peft::models::peft_model<T, Base> pm(peft::models::causal_lm<T, Base>::load(*opened.model, lo), *m.model);
    if (opened.adapter) pm.load_adapter(*opened.adapter);
    auto& lm = pm.model();
    check_lengths(rows, lm.config().max_positions);
    if (!opened.adapter && !full) pm.add_adapter("default", ao);
    std::vector<peft::parameter<T>> params;
    std::size_t trainable = 0;
    for (auto& p : lm.parameters()) {
      if (!p.trainable || p.integer) continue;
      trainable += static_cast<std::size_t>(p.value.size());
      // SoRA's gates take the trainer's proximal step, not AdamW's.
      if (!(trained_rank && ao.method == "sora" && p.name.ends_with("lora_gate"))) params.push_back(p);
    }
    if (params.empty()) throw peft::error("[finetune] the adapter has no trainable parameter");
    std::optional<peft::train::dynamic_rank_trainer<T>> dyn;
    std::optional<peft::train::sora_trainer<T>> sora;
    if (trained_rank && ao.method == "dynamic_rank") {
      peft::train::dynamic_rank_schedule_options o;
      o.total_steps = steps;
      o.target_rank = static_cast<double>(ao.rank);
      dyn.emplace(pm.template adapters_of<peft::dynamic_rank<T>>(), o);
    } else if (trained_rank) {
      peft::train::sora_training_options o;
      if (sora_xi) o.xi0 = *sora_xi;
      sora.emplace(pm.template adapters_of<peft::sora<T>>(), o);
    }
    peft::train::adamw_options opt;
    opt.lr = lr;
    opt.weight_decay = weight_decay;
    // LoRA+: B's tensors (and 1-D ones) at --loraplus-ratio times the lr (train/loraplus.hpp).
    peft::train::adamw<T> optimizer(params, opt,
                                    loraplus_ratio ? peft::train::loraplus_groups<T>(opt, {.lr_ratio = *loraplus_ratio})
                                                   : std::vector<peft::train::param_group<T, peft::train::adamw_options>>{});
    if (resume) optimizer.load_state(dir / "optimizer.safetensors");
#ifdef PEFT_CLI_MPI
    // Every rank starts from rank 0's adapter and sums its tokens' gradients; the all-reduce
    // divides by the batch's token count: the gradient of one process's mean loss.
    std::optional<peft::dist::gradient_allreducer<T>> reducer;
    if (dp.size > 1) {
      peft::dist::broadcast_parameters(MPI_COMM_WORLD, params);
      reducer.emplace(MPI_COMM_WORLD, std::span<const peft::parameter<T>>(params),
                      peft::dist::allreduce_options{.reduction = peft::dist::loss_reduction::sum});
    }
#endif
    std::ofstream log;
    if (log_path && dp.root()) {
      // On resume the rows up to the checkpoint are kept; later ones (lost work) are dropped.
      // The log is rewritten atomically, then appended to (a killed run leaves at most half a
      // line, which the next --resume drops).
      std::string head = val ? "step,loss,lr,tokens,seconds,val_loss,val_ppl\n" : "step,loss,lr,tokens,seconds\n";
      if (resume) {
        for (const auto& k : log_rows_before(*log_path, start)) head += k + "\n";
      }
      write_file_atomically(*log_path, head);
      log.open(*log_path, std::ios::app | std::ios::binary);
      if (!log) throw peft::io_error("[finetune] cannot write " + *log_path);
    }
    // A checkpoint (adapter or model, optimizer state, trainer state) replaces the previous one
    // as a whole: written into a temporary directory, fsynced, swapped in with one rename.
    long long last_saved = resume ? start : -1;
    auto save = [&](long long step) {
      peft::io::detail::atomic_directory ck("finetune", dir);
      if (full) {
        if constexpr (std::is_same_v<Base, peft::dense<T>>) lm.save_pretrained(ck.path(), *opened.model);
      } else {
        pm.save_pretrained(ck.path());
      }
      optimizer.save_state(ck.path() / "optimizer.safetensors");
      nlohmann::json st{{"step", step}, {"batch", batch}, {"lines", rows.size()}, {"format", "peft-cpp finetune 1"}};
      write_file_atomically(ck.path() / trainer_state::file, st.dump(2) + "\n");
      ck.commit();
      last_saved = step;
    };
    const auto n = static_cast<long long>(rows.size());
    // Validation: the token-weighted mean loss over the whole --val file, in batches of --batch.
    const auto val_rows = val ? val->id_rows() : std::vector<std::vector<long long>>{};
    auto validate = [&]() {
      double sum = 0, count = 0;
      for (std::size_t f = 0; f < val_rows.size(); f += static_cast<std::size_t>(batch)) {
        const std::size_t e = std::min(val_rows.size(), f + static_cast<std::size_t>(batch));
        const std::vector<std::vector<long long>> part(val_rows.begin() + static_cast<std::ptrdiff_t>(f), val_rows.begin() + static_cast<std::ptrdiff_t>(e));
        std::vector<std::size_t> pp;
        for (std::size_t k = f; k < e; ++k) pp.push_back(val->rows[k].prompt_tokens);
        const auto b = peft::models::token_batch::from_rows(part);
        const auto labels = peft::models::training_labels(b, pp);
        const auto k = static_cast<double>(lm.predicted_tokens(b, labels));
        if (k == 0) continue;
        sum += lm.loss(b, labels) * k;
        count += k;
      }
      return count > 0 ? sum / count : std::nan("");
    };
    if (val) check_lengths(val_rows, lm.config().max_positions);
    double last_val = std::nan("");
    long long skipped = 0;
    const bool tty = ::isatty(2) != 0;
    double next_report = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double tokens_seen = 0;  // since the run began (a resumed run counts the steps before it)
    for (long long s = 0; s < start; ++s) {
      for (long long i = 0; i < batch; ++i) tokens_seen += static_cast<double>(rows[static_cast<std::size_t>((s * batch + i) % n)].size());
    }
    const double tokens_before = tokens_seen;
    for (long long s = start; s < steps; ++s) {
      std::vector<std::vector<long long>> lines;
      std::vector<std::size_t> line_prompts;
      for (long long i = 0; i < batch; ++i) {
        const auto k = static_cast<std::size_t>((s * batch + i) % n);
        lines.push_back(rows[k]);
        line_prompts.push_back(prompts[k]);
      }
      // Micro-batches share one normaliser: the loss and gradient equal the whole batch's.
      const auto whole = peft::models::token_batch::from_rows(lines);
      const double predicted = static_cast<double>(lm.predicted_tokens(whole, peft::models::training_labels(whole, line_prompts)));
      lm.zero_grad();
      double loss = 0;
      // This rank's share of the batch (all of it in one process), in --grad-accum micro-batches.
      const long long r0 = dp.rank * batch / dp.size, r1 = (dp.rank + 1) * batch / dp.size;
      index local_tokens = 0;
      for (long long k = 0; k < accum; ++k) {
        const long long a0 = r0 + k * (r1 - r0) / accum, a1 = r0 + (k + 1) * (r1 - r0) / accum;
        if (a1 <= a0) continue;
        const std::vector<std::vector<long long>> part(lines.begin() + a0, lines.begin() + a1);
        const std::vector<std::size_t> part_prompts(line_prompts.begin() + a0, line_prompts.begin() + a1);
        const auto b = peft::models::token_batch::from_rows(part);
        const auto labels = peft::models::training_labels(b, part_prompts);
        const index n_pred = lm.predicted_tokens(b, labels);
        if (n_pred == 0) continue;
        local_tokens += n_pred;
        loss += lm.loss_and_backward(b, labels, dp.size > 1 ? 1.0 : predicted);
      }
#ifdef PEFT_CLI_MPI
      if (reducer) loss = reducer->allreduce(local_tokens, loss).mean_loss;
#else
      (void)local_tokens;
#endif
      // A loss or gradient that is not finite stops the run (the last checkpoint stays as it
      // was), or with --skip-nonfinite leaves the weights and optimizer as they were.
      std::string bad;
      if (!std::isfinite(loss)) {
        bad = "the loss is " + std::string(std::isnan(loss) ? "NaN" : "infinite");
      } else {
        for (const auto& p : params) {
          if (!all_finite(p.grad)) {
            bad = "the gradient of " + p.name + " is not finite";
            break;
          }
        }
      }
      if (!bad.empty() && !skip_nonfinite) {
        if (tty && dp.root()) std::fputc('\n', stderr);  // the error on a line of its own
        throw peft::error("[finetune] step " + std::to_string(s) + ": " + bad + "; stopped (" +
                          (last_saved >= 0 ? "the checkpoint of step " + std::to_string(last_saved) + " in " + dir.string() + " is kept"
                                           : std::string("nothing was saved")) +
                          "; --skip-nonfinite skips such steps, a lower --lr may avoid them)");
      }
      const double step_lr = optimizer.lr("default");
      if (bad.empty()) {
        if (dyn) dyn->add_regularizer(s + 1);
        optimizer.step();
        if (dyn) dyn->after_step(s + 1);
        if (sora) sora->after_step(step_lr);
      } else {
        ++skipped;
        if (dp.root()) std::fprintf(stderr, "%speft: step %lld skipped: %s\n", tty ? "\n" : "", s, bad.c_str());
      }
      for (const auto& l : lines) tokens_seen += static_cast<double>(l.size());
      const bool validated = val && ((s + 1) % val_every == 0 || s + 1 == steps);
      if (validated) last_val = validate();
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (log.is_open()) {
        char row[200];
        std::snprintf(row, sizeof row, "%lld,%.9g,%.6g,%.0f,%.3f", s, loss, step_lr, tokens_seen, secs);
        log << row;
        if (validated) {
          std::snprintf(row, sizeof row, ",%.9g,%.9g", last_val, std::exp(last_val));
          log << row;
        } else if (val) {
          log << ",,";
        }
        log << '\n';
        log.flush();
      }
      const double done = static_cast<double>(s - start + 1);
      // On a terminal one line rewritten in place; into a file or pipe a line every few seconds.
      if (dp.root() && (tty || s + 1 == steps || secs >= next_report || validated)) {
        char vt[64] = "";
        if (val && !std::isnan(last_val)) std::snprintf(vt, sizeof vt, "  val %.4f (ppl %.2f)", last_val, std::exp(last_val));
        std::fprintf(stderr, "%speft: step %lld/%lld  loss %.4f%s  lr %.3g  %.0f tok/s  left %s%s", tty ? "\r" : "", s + 1,
                     steps, loss, vt, step_lr, (tokens_seen - tokens_before) / std::max(secs, 1e-9),
                     clock_text(secs / done * static_cast<double>(steps - s - 1)).c_str(), tty ? "   " : "\n");
        next_report = secs + 5.0;
      }
      if (save_every > 0 && (s + 1) % save_every == 0 && s + 1 < steps && dp.root()) {
        try {
          save(s + 1);
        } catch (...) {
          if (tty) std::fputc('\n', stderr);
          throw;
        }
      }
    }
    if (!dp.root()) return 0;
    if (tty) std::fprintf(stderr, "\n");
    if (skipped) std::fprintf(stderr, "peft: %lld of %lld steps skipped (not finite)\n", skipped, steps - start);
    if (dyn || sora) {
      const auto ranks = dyn ? dyn->ranks() : sora->ranks();
      index total = 0;
      for (const auto k : ranks) total += k;
      const std::size_t dropped = pm.compact_adapter();
      std::fprintf(stderr, "peft: %s: mean rank %.2f over %zu modules (%zu with none left); saved as a LoRA\n",
                   ao.method.c_str(), static_cast<double>(total) / static_cast<double>(ranks.size()), ranks.size(), dropped);
    }
    save(std::max(steps, start));
    std::fprintf(stderr, "peft: %zu trainable parameters; %s saved in %s\n", trainable, full ? "model" : "adapter",
                 dir.string().c_str());
    return 0;
  };
  if (dp.size == 1) return with_model_type(m, train);
#ifdef PEFT_CLI_MPI
  // A failure on one rank ends the job (the others would wait in the all-reduce forever).
  try {
    return with_model_type(m, train);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft: error: rank %d: %s\n", dp.rank, e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
#endif
  return 2;
}

}  // namespace peft_cli
