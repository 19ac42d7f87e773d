// peft_bench — switch: changing which adapter is fused into the base, at k = n = 4096, r = 16.
//
//   switch/lora_merge   adapted_linear::merge then unmerge (W0 += s B A, then -=)
//   switch/shira        shira::apply then remove: scatter K = r (k + n) values, restore bit for bit
#include <peft/layer/adapted_linear.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/adapters/shira.hpp>
#include <peft/base/dense.hpp>

#include "bench_common.hpp"

namespace {

using bench::index;

void switch_lora_merge(benchmark::State& state) {
  const index k = state.range(0), n = state.range(1), r = state.range(2);
  peft::adapted_linear<peft::dense<float>, peft::lora<float>> layer{peft::dense<float>(bench::random_matrix(n, k, 1))};
  layer.add_adapter("a", peft::lora<float>(k, n, {.rank = r, .alpha = 16, .init = peft::lora_init::random}));
  for (auto _ : state) {
    layer.merge("a");
    layer.unmerge("a");
    benchmark::ClobberMemory();
  }
}

void switch_shira(benchmark::State& state) {
  const index k = state.range(0), n = state.range(1), r = state.range(2);
  peft::dense<float> base(bench::random_matrix(n, k, 1));
  peft::shira<float> a(k, n, {.rank = r, .random_init = true, .seed = 5});  // K = r (k + n) values
  for (auto _ : state) {
    a.apply(base);
    a.remove(base);
    benchmark::ClobberMemory();
  }
}

void switch_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"k", "n", "r"})->Args({4096, 4096, 16})->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(switch_lora_merge)->Name("switch/lora_merge")->Apply(switch_args);
BENCHMARK(switch_shira)->Name("switch/shira")->Apply(switch_args);
