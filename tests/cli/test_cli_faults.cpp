// The `peft` tool when things go wrong around it: a training run killed at random moments (the
// checkpoint is always whole, --resume gives the uninterrupted run's losses), a full disk and an
// unwritable directory while saving, merging, exporting and importing (exit 2, one line, the
// earlier files intact), a loss that turns NaN, and a model too large for the machine's memory.
#include <catch2/catch.hpp>

#ifdef PEFT_CLI_PATH

#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "peft/io/safetensors.hpp"
#include "support/file_support.hpp"

namespace test_cli_faults {

namespace {

namespace fs = std::filesystem;
const fs::path data = fs::path(PEFT_TEST_DATA_DIR);
const fs::path mistral = data / "lm" / "mistral";

using peft_test::lines;
using peft_test::slurp;

/// The last line of a program's stderr (progress lines come before it).
std::string last_line(const std::string& s) {
  if (s.empty()) return s;
  const auto end = s.back() == '\n' ? s.size() - 1 : s.size();
  const auto start = s.rfind('\n', end == 0 ? 0 : end - 1);
  return s.substr(start == std::string::npos ? 0 : start + 1, end - (start == std::string::npos ? 0 : start + 1));
}

/// Exit 2, and the error as the last line of stderr, whole (one line).
void check_failed_cleanly(const std::string& err, int status) {
  INFO(err);
  CHECK(status == 2);
  CHECK(last_line(err).rfind("peft: error: ", 0) == 0);
  CHECK(err.back() == '\n');
}

struct scratch_dir : peft_test::scratch_dir {
  explicit scratch_dir(const std::string& n) : peft_test::scratch_dir("peft_faults_" + n) {}
};

/// Starts `peft args...` with stdout and stderr to files; `file_size_limit` sets RLIMIT_FSIZE in
/// the child (writes beyond it fail with EFBIG, as on a full disk: SIGXFSZ is ignored).
pid_t spawn_cli(const std::vector<std::string>& args, const fs::path& out, const fs::path& err,
                std::optional<rlim_t> file_size_limit = std::nullopt) {
  std::vector<std::string> all{PEFT_CLI_PATH};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string o = out.string(), e = err.string();
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fo = ::open(o.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644), fe = ::open(e.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fo < 0 || fe < 0) ::_exit(127);
    ::dup2(fo, 1);
    ::dup2(fe, 2);
    if (file_size_limit) {
      ::signal(SIGXFSZ, SIG_IGN);
      const rlimit r{*file_size_limit, *file_size_limit};
      ::setrlimit(RLIMIT_FSIZE, &r);
    }
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  return pid;
}

struct run_result {
  int status = -1;
  std::string out, err;
};

run_result finish(pid_t pid, const fs::path& out, const fs::path& err) {
  int raw = 0;
  ::waitpid(pid, &raw, 0);
  return {WIFEXITED(raw) ? WEXITSTATUS(raw) : -1, slurp(out), slurp(err)};
}

run_result run(const std::vector<std::string>& args, const fs::path& scratch, std::optional<rlim_t> limit = std::nullopt) {
  const auto o = scratch / "stdout.txt", e = scratch / "stderr.txt";
  return finish(spawn_cli(args, o, e, limit), o, e);
}

/// Every regular file under `dir` (relative name -> bytes).
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) files[fs::relative(e.path(), dir).string()] = slurp(e.path());
  }
  return files;
}

/// The loss column of a finetune log, checking the steps count 0, 1, ...
std::vector<std::string> log_losses(const fs::path& p) {
  std::ifstream in(p);
  std::string line;
  std::getline(in, line);
  REQUIRE(line.rfind("step,loss", 0) == 0);
  std::vector<std::string> out;
  long long want = 0;
  while (std::getline(in, line)) {
    const auto c1 = line.find(','), c2 = line.find(',', c1 + 1), c3 = line.find(',', c2 + 1);
    CHECK(std::stoll(line.substr(0, c1)) == want++);
    out.push_back(line.substr(c1 + 1, c3 - c1 - 1));  // loss and learning rate, as printed
  }
  return out;
}

long long checkpoint_step(const fs::path& dir) {
  std::ifstream in(dir / "trainer_state.json");
  return nlohmann::json::parse(in).at("step").get<long long>();
}

/// A small tmpfs mounted at `dir` for the life of the object, where this process may mount (root
/// with CAP_SYS_ADMIN); mounted() says whether it is.
struct tmpfs_mount {
  fs::path dir;
  bool ok = false;
  tmpfs_mount(fs::path d, const std::string& options) : dir(std::move(d)) {
    fs::create_directories(dir);
    ok = ::mount("tmpfs", dir.c_str(), "tmpfs", 0, options.c_str()) == 0;
  }
  ~tmpfs_mount() {
    if (ok) ::umount2(dir.c_str(), MNT_DETACH);
  }
  bool mounted() const { return ok; }
};

/// Fills the file system holding `dir` (a file of zeros until ENOSPC).
void fill_up(const fs::path& dir) {
  const int fd = ::open((dir / "filler").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  REQUIRE(fd >= 0);
  std::vector<char> zeros(4096, 0);
  while (::write(fd, zeros.data(), zeros.size()) > 0) {
  }
  zeros.resize(1);
  while (::write(fd, zeros.data(), 1) > 0) {
  }
  ::close(fd);
}

std::vector<std::string> train_args(const fs::path& out, long long steps, bool resume, const fs::path& log) {
  std::vector<std::string> a{"finetune", "--model", mistral.string(), "--tokens", (mistral / "tokens.txt").string(),
                             "--batch", "2", "--lr", "1e-2", "--steps", std::to_string(steps), "--save-every", "1",
                             "--log", log.string(), "--out", out.string(), "--threads", "1"};
  if (resume) {
    a.push_back("--resume");
  } else {
    for (const char* x : {"--method", "lora", "--rank", "4", "--alpha", "8", "--targets", "all-linear", "--seed", "5"}) a.push_back(x);
  }
  return a;
}

}  // namespace

TEST_CASE("peft finetune killed at random moments: the checkpoint is always whole, --resume gives the same losses",
          "[cli][faults]") {
  scratch_dir s("kill");
  constexpr long long steps = 40;
  // The uninterrupted run (saving every step, as the killed ones do), timed.
  const auto t0 = std::chrono::steady_clock::now();
  const auto ref = run(train_args(s.dir / "ref", steps, false, s.dir / "ref.csv"), s.dir);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(ref.err);
  REQUIRE(ref.status == 0);
  const auto want = log_losses(s.dir / "ref.csv");
  REQUIRE(want.size() == steps);
  REQUIRE(want.front() != want.back());

  // Runs killed with SIGKILL at random moments, each resuming from what the last one left.
  std::mt19937_64 g(2026);
  const fs::path out = s.dir / "ck", log = s.dir / "run.csv";
  int kills = 0, killed_after_save = 0;
  long long last_step = -1;
  for (int attempt = 0; attempt < 40 && kills < 12; ++attempt) {
    const bool resume = fs::exists(out / "trainer_state.json");
    const long long done = resume ? checkpoint_step(out) : 0;
    if (done >= steps) break;
    const pid_t pid = spawn_cli(train_args(out, steps, resume, log), s.dir / "o.txt", s.dir / "e.txt");
    // A moment within the time the steps left take (so that most runs die before finishing).
    const double left = seconds * static_cast<double>(steps - done) / static_cast<double>(steps);
    std::uniform_real_distribution<double> when(0.0, 0.8 * left);
    std::this_thread::sleep_for(std::chrono::duration<double>(when(g)));
    ::kill(pid, SIGKILL);
    const auto r = finish(pid, s.dir / "o.txt", s.dir / "e.txt");
    if (r.status == -1) ++kills;
    if (!fs::exists(out)) continue;  // killed before the first save
    // Whatever the moment: the directory holds one whole checkpoint, never part of two.
    ++killed_after_save;
    const auto inspected = run({"inspect", out.string()}, s.dir);
    INFO(inspected.err);
    CHECK(inspected.status == 0);
    const long long step = checkpoint_step(out);
    CHECK(step >= last_step);
    last_step = step;
    const auto opt = peft::io::safetensors_file::open(out / "optimizer.safetensors");
    CHECK(opt.tensors().size() > 0);
  }
  INFO("kills " << kills << ", after the first save " << killed_after_save);
  CHECK(kills >= 5);
  CHECK(killed_after_save >= 3);
  // Finished with --resume: the losses of the run that was never interrupted, step for step.
  const auto last = run(train_args(out, steps, fs::exists(out / "trainer_state.json"), log), s.dir);
  INFO(last.err);
  REQUIRE(last.status == 0);
  const auto got = log_losses(log);
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    INFO("step " << i);
    CHECK(got[i] == want[i]);
  }
  CHECK(slurp(out / "adapter_model.safetensors") == slurp(s.dir / "ref" / "adapter_model.safetensors"));
  // No temporary directory is left beside the checkpoint.
  for (const auto& e : fs::directory_iterator(s.dir)) CHECK(e.path().filename().string().find(".tmp-") == std::string::npos);
}

TEST_CASE("a full disk while saving, merging, exporting or importing: exit 2, one line, earlier files intact",
          "[cli][faults]") {
  scratch_dir s("disk");
  const fs::path g = data / "gguf" / "llama";
  tmpfs_mount disk(s.dir / "disk", "size=4m");
  // Without the right to mount, a file size limit (RLIMIT_FSIZE) fails the writes the same way.
  WARN((disk.mounted() ? "full disk: a 4 MiB tmpfs" : "full disk: RLIMIT_FSIZE (no permission to mount a tmpfs)"));
  const fs::path d = disk.dir;
  // Earlier outputs of each command, complete.
  auto r = run(train_args(d / "ck", 2, false, d / "log.csv"), s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  r = run({"merge", "--base", (data / "models" / "llama_lora" / "base").string(), "--adapter",
           (data / "models" / "llama_lora" / "adapter").string(), "--out", (d / "merged.safetensors").string()},
          s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  r = run({"export", "--gguf", (g / "peft_lora").string(), "--model", (g / "q4_k_m.gguf").string(), "--out",
           (d / "a.gguf").string()},
          s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  r = run({"import", "--gguf", (d / "a.gguf").string(), "--out", (d / "imported").string()}, s.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  const auto before = snapshot(d);
  std::optional<rlim_t> limit;
  if (disk.mounted()) {
    fill_up(d);
  } else {
    limit = 4096;  // room for stderr's lines, not for the outputs
  }
  const std::vector<std::vector<std::string>> commands = {
      train_args(d / "ck", 4, true, s.dir / "log2.csv"),
      {"merge", "--base", (data / "models" / "llama_lora" / "base").string(), "--adapter",
       (data / "models" / "llama_lora" / "adapter").string(), "--out", (d / "merged.safetensors").string()},
      {"export", "--gguf", (g / "peft_lora_patterns").string(), "--model", (g / "q4_k_m.gguf").string(), "--out",
       (d / "a.gguf").string()},
      {"import", "--gguf", (g / "lora_by_llama_cpp.gguf").string(), "--model", (g / "q4_k_m.gguf").string(), "--out",
       (d / "imported").string()},
  };
  for (const auto& c : commands) {
    INFO(c[0]);
    const auto f = run(c, s.dir, limit);
    check_failed_cleanly(f.err, f.status);
  }
  fs::remove(d / "filler");
  auto after = snapshot(d);
  CHECK(after.size() == before.size());
  for (const auto& [name, bytes] : before) {
    INFO(name);
    CHECK(after.count(name) == 1);
    CHECK(after[name] == bytes);
  }
  CHECK(run({"inspect", (d / "ck").string()}, s.dir).status == 0);
}

TEST_CASE("an unwritable output directory: exit 2, one line, nothing changed", "[cli][faults]") {
  scratch_dir s("readonly");
  // A read-only tmpfs where this process may mount; otherwise a directory under /proc (which no
  // one, root included, can create files in).
  tmpfs_mount ro(s.dir / "ro", "size=1m,mode=0755");
  fs::path d = "/proc/peft_unwritable";
  if (ro.mounted()) {
    REQUIRE(::mount(nullptr, ro.dir.c_str(), nullptr, MS_REMOUNT | MS_RDONLY, nullptr) == 0);
    d = ro.dir;
  }
  const fs::path g = data / "gguf" / "llama";
  const std::vector<std::vector<std::string>> commands = {
      train_args(d / "ck", 2, false, s.dir / "log.csv"),
      {"merge", "--base", (data / "models" / "llama_lora" / "base").string(), "--adapter",
       (data / "models" / "llama_lora" / "adapter").string(), "--out", (d / "merged.safetensors").string()},
      {"export", "--gguf", (g / "peft_lora").string(), "--model", (g / "q4_k_m.gguf").string(), "--out", (d / "a.gguf").string()},
      {"import", "--gguf", (g / "lora_by_llama_cpp.gguf").string(), "--model", (g / "q4_k_m.gguf").string(), "--out",
       (d / "imported").string()},
  };
  for (const auto& c : commands) {
    INFO(c[0]);
    const auto f = run(c, s.dir);
    check_failed_cleanly(f.err, f.status);
  }
  if (ro.mounted()) CHECK(fs::is_empty(d));
}

TEST_CASE("peft finetune stops at a NaN loss naming the step and keeps the last checkpoint; --skip-nonfinite skips",
          "[cli][faults]") {
  scratch_dir s("nan");
  // A learning rate of 1e30 makes the weights ~1e30 after the first step: the next loss overflows.
  std::vector<std::string> a{"finetune", "--model", mistral.string(), "--tokens", (mistral / "tokens.txt").string(),
                             "--method", "lora", "--rank", "4", "--alpha", "8", "--targets", "all-linear", "--batch", "2",
                             "--lr", "1e30", "--steps", "6", "--save-every", "1", "--threads", "1", "--out",
                             (s.dir / "ck").string()};
  auto r = run(a, s.dir);
  INFO(r.err);
  check_failed_cleanly(r.err, r.status);
  CHECK(last_line(r.err).rfind("peft: error: [finetune] step 1: ", 0) == 0);
  CHECK((r.err.find("the loss is NaN") != std::string::npos || r.err.find("the loss is infinite") != std::string::npos ||
         r.err.find("is not finite") != std::string::npos));
  CHECK(r.err.find("the checkpoint of step 1") != std::string::npos);
  REQUIRE(fs::exists(s.dir / "ck" / "trainer_state.json"));
  CHECK(checkpoint_step(s.dir / "ck") == 1);
  CHECK(run({"inspect", (s.dir / "ck").string()}, s.dir).status == 0);

  a.push_back("--skip-nonfinite");
  a[a.size() - 2] = (s.dir / "ck2").string();
  r = run(a, s.dir);
  INFO(r.err);
  CHECK(r.status == 0);
  CHECK(r.err.find("peft: step 1 skipped: ") != std::string::npos);
  CHECK(r.err.find("5 of 6 steps skipped") != std::string::npos);
  CHECK(checkpoint_step(s.dir / "ck2") == 6);
  // The saved adapter is the last good one: finite.
  const auto f = peft::io::safetensors_file::open(s.dir / "ck2" / "adapter_model.safetensors");
  for (const auto& t : f.tensors()) {
    for (float v : f.read<float>(t.name)) CHECK(std::isfinite(v));
  }
}

TEST_CASE("peft finetune refuses, before reading weights, a run its memory estimate says will not fit", "[cli][faults]") {
  scratch_dir s("memory");
  // A config of a model far beyond this machine, and no weights at all: the estimate comes first.
  auto cfg = nlohmann::json::parse(slurp(mistral / "config.json"));
  cfg["hidden_size"] = 16384;
  cfg["intermediate_size"] = 53248;
  cfg["num_hidden_layers"] = 126;
  cfg["num_attention_heads"] = 128;
  cfg["num_key_value_heads"] = 8;
  cfg["head_dim"] = 128;
  cfg["vocab_size"] = 128256;
  fs::create_directories(s.dir / "huge");
  std::ofstream(s.dir / "huge" / "config.json") << cfg.dump(2);
  std::vector<std::string> a{"finetune", "--model", (s.dir / "huge").string(), "--tokens", (mistral / "tokens.txt").string(),
                             "--method", "lora", "--rank", "8", "--alpha", "16", "--batch", "2", "--lr", "1e-3",
                             "--steps", "2", "--out", (s.dir / "out").string()};
  auto r = run(a, s.dir);
  INFO(r.err);
  CHECK(r.status == 2);
  CHECK(lines(r.err) == 1);
  CHECK(r.err.find("[finetune] training needs about ") != std::string::npos);
  CHECK(r.err.find(" TiB (weights ") != std::string::npos);  // 405B parameters at 4 bytes
  CHECK(r.err.find(" is available") != std::string::npos);
  CHECK(!fs::exists(s.dir / "out"));
  // The small model against a budget it exceeds, and one it fits in.
  a[2] = mistral.string();
  a.insert(a.end(), {"--memory-budget", "64M"});
  r = run(a, s.dir);
  CHECK(r.status == 2);
  CHECK(r.err.find("is the --memory-budget") != std::string::npos);
  a.back() = "1G";
  r = run(a, s.dir);
  INFO(r.err);
  CHECK(r.status == 0);
}

}  // namespace test_cli_faults

#endif  // PEFT_CLI_PATH
