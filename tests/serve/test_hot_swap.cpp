// serve::adapter_registry under threads: while readers serve batches over two layers, a writer
// replaces, rescales, loads, unloads and fuses adapters. Every batch must see one version of each
// adapter across all its rows and layers, never a mix. Also built alone under ThreadSanitizer
// (tests/CMakeLists.txt: peft_thread_tests).
#include <atomic>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/adapters/lora.hpp"
#include "peft/adapters/shira.hpp"
#include "peft/base/dense.hpp"
#include "peft/serve/adapter_registry.hpp"
#include "support/test_support.hpp"

namespace test_hot_swap {

using ix = peft::index;
using peft_test::random_matrix;

namespace {

constexpr ix in_f = 16, m = 6;
const std::vector<std::string> layers = {"l0.weight", "l1.weight"};
constexpr ix out_f = 20;

peft::io::peft_checkpoint<float> lora_version(std::uint64_t seed) {
  peft::rng g(seed);
  peft::io::peft_checkpoint<float> ck;
  for (const auto& w : layers) {
    ck.modules.push_back({w.substr(0, w.size() - 7), w,
                          peft::lora<float>(random_matrix<float>(4, in_f, g), random_matrix<float>(out_f, 4, g), 0.5f)});
  }
  return ck;
}

/// Which of `expected` (per version: per layer outputs) y matches on row i of layer l, or -1.
int version_of(const std::vector<std::vector<peft::matrix<float>>>& expected, std::size_t layer, ix i,
               const peft::matrix<float>& y) {
  for (std::size_t v = 0; v < expected.size(); ++v) {
    const auto& e = expected[v][layer];
    bool same = true;
    for (ix j = 0; j < out_f && same; ++j) same = std::abs(e(i, j) - y(i, j)) <= 1e-4f * (1.0f + std::abs(e(i, j)));
    if (same) return static_cast<int>(v);
  }
  return -1;
}

}  // namespace

TEST_CASE("adapter_registry hot swap: a batch sees the old or the new adapter, never a mix", "[serve][threads]") {
  peft::rng g(51);
  std::map<std::string, peft::dense<float>> bases;
  for (const auto& w : layers) bases.emplace(w, peft::dense<float>(random_matrix<float>(out_f, in_f, g)));
  peft::serve::adapter_registry<peft::dense<float>> reg(std::move(bases));
  const auto x = random_matrix<float>(m, in_f, g);
  const std::vector<peft::serve::request> rows(m, peft::serve::request{"a"});

  // The outputs of each version of "a", computed serially first.
  std::vector<std::vector<peft::matrix<float>>> expected;
  for (std::uint64_t seed : {101, 202}) {
    reg.add("a", lora_version(seed));
    std::vector<peft::matrix<float>> per_layer;
    auto batch = reg.begin(rows);
    for (const auto& w : layers) {
      per_layer.emplace_back(m, out_f);
      batch.forward(w, x.view(), per_layer.back().view());
    }
    REQUIRE(peft_test::nontrivial(per_layer.back()));
    expected.push_back(std::move(per_layer));
    reg.unload("a");
  }
  REQUIRE(version_of(expected, 0, 0, expected[1][0]) == 1);  // the versions differ
  reg.add("a", lora_version(101));

  std::atomic<bool> stop{false};
  std::atomic<int> batches{0}, mixed{0}, unknown{0};
  std::atomic<int> seen[2] = {0, 0};
  auto reader = [&] {
    while (!stop.load()) {
      auto batch = reg.begin(rows);
      int version = -2;
      for (std::size_t l = 0; l < layers.size(); ++l) {
        peft::matrix<float> y(m, out_f);
        batch.forward(layers[l], x.view(), y.view());
        for (ix i = 0; i < m; ++i) {
          const int v = version_of(expected, l, i, y);
          if (v < 0) {
            ++unknown;
          } else if (version == -2) {
            version = v;
          } else if (v != version) {
            ++mixed;
          }
        }
      }
      if (version >= 0) ++seen[version];
      ++batches;
    }
  };
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t) readers.emplace_back(reader);
  peft::rng gw(52);
  // At least 60 changes, and until the readers have served 100 batches meanwhile (overlap).
  for (int step = 0; step < 60 || batches.load() < 100; ++step) {
    reg.replace("a", lora_version(step % 2 == 0 ? 202 : 101));
    // Unrelated changes while serving: another adapter comes and goes, gets rescaled, and the
    // base is switched into fused mode and back (outputs of "a" stay the same either way).
    reg.add("b", lora_version(300 + static_cast<std::uint64_t>(step % 7)));
    reg.set_scale("b", 0.5 + step % 5);
    if (step % 10 == 5) {
      reg.fuse("b");
      reg.unfuse();
    }
    reg.unload("b");
    std::this_thread::yield();
  }
  stop = true;
  for (auto& t : readers) t.join();
  CHECK(mixed.load() == 0);
  CHECK(unknown.load() == 0);
  CHECK(batches.load() >= 100);
  CHECK(seen[0].load() + seen[1].load() == batches.load());
  CHECK_FALSE(reg.contains("b"));
}

}  // namespace test_hot_swap
