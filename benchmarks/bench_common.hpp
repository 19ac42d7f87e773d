// benchmarks/bench_common.hpp — shapes, inputs and counters shared by the peft_bench families.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>

#include <peft/core/matrix.hpp>
#include <peft/core/random.hpp>

namespace bench {

using peft::index;

/// A rows x cols matrix of uniform values in [-1, 1) (the same seed gives the same matrix).
inline peft::matrix<float> random_matrix(index rows, index cols, std::uint64_t seed) {
  peft::rng g(seed);
  peft::matrix<float> m(rows, cols);
  for (auto& v : m.storage()) v = static_cast<float>(g.uniform(-1, 1));
  return m;
}

/// The arguments of every linear and train_step benchmark: m, k, n, r (r unused by baselines).
struct shape {
  index m, k, n, r;
  explicit shape(const benchmark::State& s) : m(s.range(0)), k(s.range(1)), n(s.range(2)), r(s.range(3)) {}
};

/// GFLOP/s of the dense product (2 m k n flops per call, times `passes`: 1 forward, 2 forward +
/// dx, 3 with dW) and GB/s of weight bytes read per call (`weight_bytes` per pass).
inline void counters(benchmark::State& state, const shape& s, double weight_bytes, double passes = 1.0) {
  const double calls = static_cast<double>(state.iterations());
  const double flops = 2.0 * static_cast<double>(s.m) * static_cast<double>(s.k) * static_cast<double>(s.n);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * passes * calls * 1e-9, benchmark::Counter::kIsRate);
  state.counters["weight_GB/s"] =
      benchmark::Counter(weight_bytes * passes * calls * 1e-9, benchmark::Counter::kIsRate);
}

/// m in {1, 8, 64, 512}, k = n = 4096, r = 16.
inline void linear_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "k", "n", "r"});
  for (index m : {1, 8, 64, 512}) b->Args({m, 4096, 4096, 16});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

/// linear_args plus r in {4, 64} (the rank sweep of lora_f32).
inline void linear_rank_args(benchmark::internal::Benchmark* b) {
  linear_args(b);
  for (index r : {4, 64})
    for (index m : {1, 8, 64, 512}) b->Args({m, 4096, 4096, r});
}

}  // namespace bench
