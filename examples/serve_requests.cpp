// examples/serve_requests.cpp — a serving loop: many adapters on one frozen model, requests read
// from a file, each batch mixing adapters (peft::serve::adapter_registry).
//
//   serve_requests                     make the demo model in a temporary directory, then serve it
//   serve_requests --make DIR          only make it: DIR/base.safetensors, DIR/adapters/<name>/
//                                      (PEFT checkpoints), DIR/requests.txt
//   serve_requests --serve DIR [--requests FILE] [--batch N] [--out FILE] [--check]
//
// The model: an MLP 64 -> 128 -> relu -> 10 pretrained on upright 8x8 handwritten digits (UCI
// optdigits, E. Alpaydin and C. Kaynak, 1998, CC BY 4.0, doi:10.24432/C50P49). Four adapters of
// fc1 and fc2, each fine-tuned for one task and saved as a HuggingFace PEFT checkpoint: "rot90",
// "rot180", "rot270" (LoRA rank 4 on digits rotated by that angle) and "rot180_shira" (SHiRA on
// a random mask of the same size, the 180-degree task again).
//
// A request is one line: ADAPTER LABEL P0 .. P63, where ADAPTER names a loaded adapter or is "-"
// for the base model alone, LABEL is the true class 0..9 or "?" (not scored), and P0..P63 are
// the pixels 0..16 row by row; '#' starts a comment. The server loads the base into an
// adapter_registry (the frozen weights once), every directory of DIR/adapters as an adapter named
// after it, and answers the requests in file order, `--batch` at a time (default 32): one batch
// mixes adapters freely, each layer computes the base product once for all its rows. It prints
// the accuracy per adapter, the memory held, then shows run-time control while serving: an
// adapter's scale set to 0 (its rows fall back to the base), and fused mode (one adapter merged
// into the base for single-tenant speed; LoRA merged, SHiRA scattered) with the switching times.
// Predictions go to --out (default: DIR/predictions.txt), one line per request.
//
// --check: exit 1 unless every adapter answers its own task at >= 85% and the base answers
// upright digits at >= 85%, and predictions are the same in fused and unfused mode (a test).
#include <peft/peft.hpp>
#include <peft/io/model_bases.hpp>
#include <peft/serve/adapter_registry.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/digits_mlp.hpp"

namespace {

namespace fs = std::filesystem;
using digits::classes;
using digits::dataset;
using digits::pixels;
using peft::index;
using peft::matrix;
using registry = peft::serve::adapter_registry<peft::dense<float>>;
using adapter_layer = peft::adapted_linear<peft::dense<float>, peft::any_adapter<float>>;
using clock_type = std::chrono::steady_clock;

constexpr index hidden = 128, lora_rank = 4;
const std::vector<std::string> layer_names = {"fc1", "fc2"};

struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

dataset rotated(const dataset& d, int quarter_turns) {
  dataset r = d;
  for (int q = 0; q < quarter_turns; ++q) r = digits::rotated(r);
  return r;
}

// ---- making the demo ---------------------------------------------------------------------------

/// Fine-tunes `make(layer)` adapters on both layers of the frozen `base` for `task`; returns the
/// checkpoint.
template <class Make>
peft::io::peft_checkpoint<float> fine_tune(const digits::mlp<digits::linear>& base, const dataset& task, peft::rng& gen,
                                           const peft::io::adapter_config& config, Make make, double lr) {
  digits::mlp<adapter_layer> net(adapter_layer(base.fc1.frozen()), adapter_layer(base.fc2.frozen()));
  net.fc1.add_adapter("default", make(pixels, hidden, gen.next()));
  net.fc2.add_adapter("default", make(hidden, classes, gen.next()));
  digits::train(net, task, gen, 15, lr);
  peft::io::peft_checkpoint<float> ck;
  ck.config = config;
  ck.modules.push_back({"fc1", "fc1.weight", net.fc1.adapter("default")});
  ck.modules.push_back({"fc2", "fc2.weight", net.fc2.adapter("default")});
  return ck;
}

void make_demo(const fs::path& dir, const std::string& data) {
  const auto start = clock_type::now();
  const dataset all = digits::load(data);
  peft::rng gen(7);
  const auto order = digits::permutation(all.size(), gen);
  const index n_test = all.size() / 5;
  const dataset test = digits::subset(all, order, 0, n_test), train = digits::subset(all, order, n_test, all.size());

  digits::mlp<digits::linear> base(digits::linear(pixels, hidden, gen), digits::linear(hidden, classes, gen));
  digits::pretrain(base, train, gen);
  fs::create_directories(dir / "adapters");
  peft::io::safetensors_writer w;
  for (const auto* l : {&base.fc1, &base.fc2}) {
    const std::string name = l == &base.fc1 ? "fc1" : "fc2";
    w.add(name + ".weight", peft::to_matrix(l->weight()));
    w.add(name + ".bias", {l->out_features()}, std::span<const float>(l->bias().data(), static_cast<std::size_t>(l->out_features())));
  }
  w.write(dir / "base.safetensors");

  auto lora = [](index in, index out, std::uint64_t seed) {
    return peft::any_adapter<float>(peft::lora<float>(in, out, {.rank = lora_rank, .alpha = 2.0 * lora_rank, .seed = seed}));
  };
  auto shira = [](index in, index out, std::uint64_t seed) {
    return peft::any_adapter<float>(peft::shira<float>(in, out, {.rank = lora_rank, .seed = seed}));
  };
  for (int q = 1; q <= 3; ++q) {
    auto ck = fine_tune(base, rotated(train, q), gen, peft::io::adapter_config::lora(lora_rank, 2.0 * lora_rank, layer_names),
                        lora, 1e-2);
    peft::io::save_peft_checkpoint(dir / "adapters" / ("rot" + std::to_string(90 * q)), ck);
  }
  peft::io::adapter_config shira_config;
  shira_config.peft_type = "SHIRA";
  shira_config.r = lora_rank;
  shira_config.target_modules = layer_names;
  auto ck = fine_tune(base, rotated(train, 2), gen, shira_config, shira, 5e-2);
  peft::io::save_peft_checkpoint(dir / "adapters" / "rot180_shira", ck);

  // Requests: every test digit once, at a random angle, naming the adapter for that angle.
  std::ofstream out(dir / "requests.txt");
  out << "# adapter label pixels(64); '-' = the base model. UCI optdigits test split, rotated.\n";
  const char* names[] = {"-", "rot90", "rot180", "rot270"};
  std::vector<dataset> turned;
  for (int q = 0; q < 4; ++q) turned.push_back(rotated(test, q));
  for (index i = 0; i < test.size(); ++i) {
    const int q = static_cast<int>(gen.below(4));
    const bool use_shira = q == 2 && gen.below(2) == 0;
    out << (use_shira ? "rot180_shira" : names[q]) << ' ' << test.y[static_cast<std::size_t>(i)];
    for (index p = 0; p < pixels; ++p) out << ' ' << static_cast<int>(std::lround(turned[static_cast<std::size_t>(q)].x(i, p) * 16.0f));
    out << '\n';
  }
  if (!out.flush()) throw std::runtime_error("cannot write " + (dir / "requests.txt").string());
  std::printf("made %s in %.1f s: base.safetensors, adapters/{rot90,rot180,rot270,rot180_shira}, requests.txt (%td)\n",
              dir.string().c_str(), std::chrono::duration<double>(clock_type::now() - start).count(), test.size());
}

// ---- serving -----------------------------------------------------------------------------------

struct request_line {
  std::string adapter;  // "" = the base
  int label = -1;       // -1: not scored
  std::vector<float> x;
};

std::vector<request_line> read_requests(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  std::vector<request_line> reqs;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (const auto hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::istringstream s(line);
    request_line r;
    std::string label;
    if (!(s >> r.adapter)) continue;  // blank
    auto bad = [&](const std::string& what) {
      return std::runtime_error(path.string() + ":" + std::to_string(number) + ": " + what);
    };
    if (!(s >> label)) throw bad("no label (a class 0..9 or '?')");
    if (label != "?") {
      if (label.size() != 1 || label[0] < '0' || label[0] > '9') throw bad("label '" + label + "' is not 0..9 or '?'");
      r.label = label[0] - '0';
    }
    if (r.adapter == "-") r.adapter.clear();
    for (double v; s >> v;) {
      if (!(v >= 0 && v <= 16)) throw bad("a pixel outside 0..16");
      r.x.push_back(static_cast<float>(v / 16.0));
    }
    if (!s.eof()) throw bad("a pixel that is not a number");
    if (static_cast<index>(r.x.size()) != pixels) throw bad(std::to_string(r.x.size()) + " pixels, expected 64");
    reqs.push_back(std::move(r));
  }
  return reqs;
}

std::unique_ptr<registry> load_model(const fs::path& dir) {
  // [readme]
  // The model's frozen bases, held once: weight name ("fc1.weight") -> W0 and its bias.
  const auto model = peft::io::model_files::open(dir / "base.safetensors");
  auto bases = peft::io::load_bases<peft::dense<float>>(
      model, [](const std::string& module) { return module == "fc1" || module == "fc2"; });
  auto reg = std::make_unique<peft::serve::adapter_registry<peft::dense<float>>>(std::move(bases));
  for (const auto& entry : fs::directory_iterator(dir / "adapters")) {  // PEFT checkpoints, any method
    if (entry.is_directory()) reg->load(entry.path().filename().string(), entry.path());
  }
  // [/readme]
  return reg;
}

/// Answers every request, `batch` rows at a time; returns the predicted classes.
std::vector<int> serve(const registry& reg, const std::vector<request_line>& reqs, index batch) {
  std::vector<int> predictions;
  matrix<float> x, z, logits;
  for (std::size_t first = 0; first < reqs.size(); first += static_cast<std::size_t>(batch)) {
    const auto n = static_cast<index>(std::min(reqs.size() - first, static_cast<std::size_t>(batch)));
    std::vector<peft::serve::request> rows;
    x = matrix<float>(n, pixels);
    z = matrix<float>(n, hidden);
    logits = matrix<float>(n, classes);
    for (index i = 0; i < n; ++i) {
      const auto& r = reqs[first + static_cast<std::size_t>(i)];
      rows.push_back({r.adapter});
      std::copy(r.x.begin(), r.x.end(), x.row(i));
    }
    // [readme]
    // One request per row: its adapter's name ("" = the base alone) and optionally a scale.
    auto batch = reg.begin(rows);  // one snapshot of the adapters for every layer of this batch
    batch.forward("fc1.weight", x.view(), z.view());  // one base product, each row's adapter term
    for (auto& v : z.storage()) v = std::max(v, 0.0f);
    batch.forward("fc2.weight", z.view(), logits.view());
    // [/readme]
    for (index i = 0; i < n; ++i) predictions.push_back(digits::predicted(logits.view(), i));
  }
  return predictions;
}

/// Accuracy per adapter name ("-" for the base), over the labelled requests.
std::map<std::string, std::pair<int, int>> score(const std::vector<request_line>& reqs, const std::vector<int>& pred) {
  std::map<std::string, std::pair<int, int>> s;  // name -> (right, total)
  for (std::size_t i = 0; i < reqs.size(); ++i) {
    if (reqs[i].label < 0) continue;
    auto& [right, total] = s[reqs[i].adapter.empty() ? "-" : reqs[i].adapter];
    right += pred[i] == reqs[i].label;
    ++total;
  }
  return s;
}

void print_scores(const char* title, const std::map<std::string, std::pair<int, int>>& s) {
  std::printf("%s\n", title);
  for (const auto& [name, rt] : s) {
    std::printf("  %-14s %4d requests  %5.1f%% right\n", name.c_str(), rt.second, 100.0 * rt.first / std::max(rt.second, 1));
  }
}

int serve_demo(const fs::path& dir, const fs::path& requests, index batch, const fs::path& out, bool check) {
  const auto owner = load_model(dir);
  registry& reg = *owner;
  const auto reqs = read_requests(requests);
  const auto mem = reg.memory();
  std::printf("loaded %s: base %zu bytes; %zu adapters, %zu bytes:", dir.string().c_str(), mem.base_bytes,
              mem.adapters.size(), mem.adapter_bytes);
  for (const auto& [name, bytes] : mem.adapters) std::printf(" %s (%s, %zu)", name.c_str(), reg.method(name).c_str(), bytes);
  std::printf("\n%zu requests from %s, batches of %td\n", reqs.size(), requests.string().c_str(), batch);

  auto start = clock_type::now();
  const auto pred = serve(reg, reqs, batch);
  const double ms = 1e3 * std::chrono::duration<double>(clock_type::now() - start).count();
  const auto scores = score(reqs, pred);
  print_scores(("served in " + std::to_string(ms).substr(0, 5) + " ms, mixed batches:").c_str(), scores);
  {
    std::ofstream o(out);
    for (int p : pred) o << p << '\n';
    if (!o.flush()) throw std::runtime_error("cannot write " + out.string());
  }

  // Run-time control while serving: a scale of 0 turns rot90 off (its rows get the base alone).
  reg.set_scale("rot90", 0.0);
  const auto off = score(reqs, serve(reg, reqs, batch));
  reg.set_scale("rot90", 1.0);
  if (off.count("rot90") != 0) {
    std::printf("rot90 at scale 0: %.1f%% right (the base alone on rotated digits)\n",
                100.0 * off.at("rot90").first / off.at("rot90").second);
  }

  // Fused mode: merge one adapter for single-tenant speed, then switch to another.
  bool same = true;
  for (const char* name : {"rot90", "rot180_shira", "rot270"}) {
    if (!reg.contains(name)) continue;
    const auto t = reg.fuse(name);
    const auto fused_pred = serve(reg, reqs, batch);
    std::size_t differ = 0;
    for (std::size_t i = 0; i < pred.size(); ++i) differ += fused_pred[i] != pred[i];
    same = same && differ == 0;
    std::printf("fused %-13s (%-5s): previous one out in %.3f ms, this one in %.3f ms; %zu of %zu predictions differ\n",
                name, reg.method(name).c_str(), 1e3 * t.unfuse_seconds, 1e3 * t.fuse_seconds, differ, pred.size());
  }
  const auto t = reg.unfuse();
  std::printf("unfused in %.3f ms\n", 1e3 * t.unfuse_seconds);
  std::printf("predictions: %s\n", out.string().c_str());

  if (!check) return 0;
  bool ok = same;
  for (const auto& [name, rt] : scores) {
    if (rt.first < 0.85 * rt.second) {
      std::printf("CHECK FAILED: %s answers %d of %d\n", name.c_str(), rt.first, rt.second);
      ok = false;
    }
  }
  if (!same) std::printf("CHECK FAILED: fused predictions differ\n");
  if (scores.size() < 5) {
    std::printf("CHECK FAILED: expected the base and four adapters in the requests\n");
    ok = false;
  }
  std::printf("check: %s\n", ok ? "passed" : "FAILED");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  constexpr const char* usage =
      "usage: serve_requests [--make DIR | --serve DIR] [--requests FILE] [--batch N] [--out FILE]\n"
      "                      [--data DIGITS.csv[.gz]] [--check]\n";
  try {
    std::string make_dir, serve_dir, requests, out, data = PEFT_EXAMPLE_DATA_DIR "/digits.csv.gz";
    peft::index batch = 32;
    bool check = false;
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw usage_error(arg + " needs a value");
        return argv[++i];
      };
      if (arg == "--make") {
        make_dir = value();
      } else if (arg == "--serve") {
        serve_dir = value();
      } else if (arg == "--requests") {
        requests = value();
      } else if (arg == "--out") {
        out = value();
      } else if (arg == "--data") {
        data = value();
      } else if (arg == "--batch") {
        const std::string v = value();
        std::size_t used = 0;
        batch = static_cast<peft::index>(std::stoll(v, &used));
        if (used != v.size() || batch < 1) throw usage_error("--batch takes an integer >= 1");
      } else if (arg == "--check") {
        check = true;
      } else if (arg == "-h" || arg == "--help") {
        std::printf("%s", usage);
        return 0;
      } else {
        throw usage_error("unknown argument '" + arg + "'");
      }
    }
    if (!make_dir.empty()) {
      make_demo(make_dir, data);
      if (serve_dir.empty()) return 0;
    }
    if (serve_dir.empty()) {  // the whole demo in a temporary directory
      serve_dir = (fs::temp_directory_path() / "peft_serve_demo").string();
      make_demo(serve_dir, data);
    }
    const fs::path dir = serve_dir;
    return serve_demo(dir, requests.empty() ? dir / "requests.txt" : fs::path(requests), batch,
                      out.empty() ? dir / "predictions.txt" : fs::path(out), check);
  } catch (const usage_error& e) {
    std::fprintf(stderr, "serve_requests: %s\n%s", e.what(), usage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "serve_requests: %s\n", e.what());
    return 1;
  }
}
