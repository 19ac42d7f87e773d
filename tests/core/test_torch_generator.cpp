// torch_generator against numbers drawn with PyTorch (tests/data/torch_generator/reference.txt,
// made by scripts/make_torch_generator_reference.py): randperm for sizes from 1 to 4096^2 and
// seeds including one above 2^32 and a negative one, its prefix form, and the 32/64-bit draws.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/core/torch_generator.hpp"

namespace test_torch_generator {

namespace {

struct record {
  std::string kind;
  std::uint64_t seed = 0;
  std::int64_t n = 0;  // randperm only
  std::uint64_t checksum = 0;
  std::vector<std::int64_t> values;
};

std::vector<record> load() {
  const auto path = std::filesystem::path(PEFT_TEST_DATA_DIR) / "torch_generator" / "reference.txt";
  std::ifstream in(path);
  REQUIRE(in.good());
  std::vector<record> out;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ss(line);
    record r;
    std::int64_t k = 0;
    ss >> r.kind >> r.seed;
    if (r.kind == "randperm") ss >> r.n >> k >> r.checksum;
    else ss >> k;
    r.values.resize(static_cast<std::size_t>(k));
    for (auto& v : r.values) ss >> v;
    REQUIRE(!ss.fail());
    out.push_back(std::move(r));
  }
  return out;
}

std::uint64_t checksum(const std::vector<std::int64_t>& perm) {
  std::uint64_t s = 0;
  for (std::size_t i = 0; i < perm.size(); ++i) s += static_cast<std::uint64_t>(perm[i]) * (i + 1);
  return s;
}

}  // namespace

TEST_CASE("torch_generator::randperm reproduces torch.randperm on CPU", "[torch_generator]") {
  const auto records = load();
  int checked = 0;
  for (const auto& r : records) {
    if (r.kind != "randperm" || r.n >= peft::torch_generator::randperm_threshold) continue;
    INFO("seed " << r.seed << ", n " << r.n);
    const auto k = static_cast<std::int64_t>(r.values.size());
    peft::torch_generator g(r.seed);
    const auto perm = g.randperm(r.n);
    REQUIRE(perm.size() == static_cast<std::size_t>(r.n));
    CHECK(std::vector<std::int64_t>(perm.begin(), perm.begin() + k) == r.values);
    CHECK(checksum(perm) == r.checksum);
    // The prefix form: the same first entries, for every k up to the recorded ones.
    for (const std::int64_t kk : {std::int64_t{0}, std::int64_t{1}, k / 3, k}) {
      const auto prefix = peft::torch_generator(r.seed).randperm_prefix(r.n, kk);
      CHECK(prefix == std::vector<std::int64_t>(r.values.begin(), r.values.begin() + kk));
    }
    ++checked;
  }
  CHECK(checked >= 40);
}

TEST_CASE("torch_generator::random64 matches torch.randint(0, 2^62) (high word first)", "[torch_generator]") {
  // randperm below the threshold already holds random() to torch; this pins random64's word order.
  int checked = 0;
  for (const auto& r : load()) {
    if (r.kind != "random64") continue;
    INFO("seed " << r.seed);
    peft::torch_generator g(r.seed);
    bool any_high = false;  // the data must exercise the bits the word order decides
    for (const std::int64_t v : r.values) {
      CHECK(static_cast<std::int64_t>(g.random64() % (std::uint64_t{1} << 62)) == v);
      any_high = any_high || v >= (std::int64_t{1} << 32);
    }
    CHECK(any_high);
    ++checked;
  }
  CHECK(checked == 6);
}

TEST_CASE("torch_generator: randperm above 2^32/20 (64-bit inside-out shuffle, 1.7 GB)", "[.][torch_generator_large]") {
  for (const auto& r : load()) {
    if (r.kind != "randperm" || r.n < peft::torch_generator::randperm_threshold) continue;
    peft::torch_generator g(r.seed);
    const auto perm = g.randperm(r.n);
    CHECK(std::vector<std::int64_t>(perm.begin(), perm.begin() + static_cast<std::ptrdiff_t>(r.values.size())) ==
          r.values);
    CHECK(checksum(perm) == r.checksum);
    CHECK(peft::torch_generator(r.seed).randperm_prefix(r.n, 7) ==
          std::vector<std::int64_t>(r.values.begin(), r.values.begin() + 7));
  }
}

TEST_CASE("torch_generator: bad sizes name the function", "[torch_generator]") {
  peft::torch_generator g(1);
  CHECK_THROWS_WITH(g.randperm(-1), Catch::Contains("[torch_generator::randperm]"));
  CHECK_THROWS_WITH(g.randperm_prefix(3, 4), Catch::Contains("[torch_generator::randperm_prefix]"));
  CHECK(g.randperm(0).empty());
}

}  // namespace test_torch_generator
