// The `peft` command-line tool as a user runs it: exit codes, one-line errors, no output file
// left behind on failure, and the merge reproducing PEFT's merged Llama.
#include <catch2/catch.hpp>

#ifdef PEFT_CLI_PATH

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "peft/base/int8_rowwise.hpp"
#include "peft/base/q4_0.hpp"
#include "peft/io/safetensors.hpp"
#include "support/test_support.hpp"

namespace test_cli {

namespace {

namespace fs = std::filesystem;
const fs::path data = fs::path(PEFT_TEST_DATA_DIR);
const fs::path llama = data / "models" / "llama_lora";

struct run_result {
  int status = -1;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

run_result run_cli(const std::string& args, const fs::path& scratch) {
  const auto out = scratch / "stdout.txt", err = scratch / "stderr.txt";
  const std::string cmd = std::string("'") + PEFT_CLI_PATH + "' " + args + " >'" + out.string() + "' 2>'" + err.string() + "'";
  const int raw = std::system(cmd.c_str());
  run_result r;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

struct scratch_dir {
  fs::path dir;
  explicit scratch_dir(const std::string& n) : dir(fs::temp_directory_path() / ("peft_cli_" + n)) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

int lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

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

}  // namespace test_cli
#endif  // PEFT_CLI_PATH
