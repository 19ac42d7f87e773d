// peft_bench — the linear family: y = x W^T (+ adapter) at LLM shapes, against Eigen's dense
// product measured in the same run, and the LoRA merge/unmerge switch.
//
//   linear/eigen_dense   Y.noalias() = X * W.transpose() on row-major Eigen matrices (baseline)
//   linear/lora_naive    the same plus (X A^T) B^T added: what a careless user writes
//   linear/dense_f32     peft::dense<float>::matmul, the base alone
//   linear/lora_f32      peft::lora<float>::forward, base + adapter in one call
//   switch/lora_merge    adapted_linear::merge then unmerge (k x n weight)
//   switch/shira         shira::apply then remove: scatter K = r (k + n) values, restore bit for bit
//
// Counters: GFLOP/s of the dense product (2 m k n per call) and weight GB/s (4 k n bytes per call).
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <peft/peft.hpp>

namespace {

using peft::index;
using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

peft::matrix<float> random_matrix(index rows, index cols, std::uint64_t seed) {
  peft::rng g(seed);
  peft::matrix<float> m(rows, cols);
  for (auto& v : m.storage()) v = static_cast<float>(g.uniform(-1, 1));
  return m;
}

void counters(benchmark::State& state, index m, index k, index n) {
  const double calls = static_cast<double>(state.iterations());
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * m * k * n * calls * 1e-9, benchmark::Counter::kIsRate);
  state.counters["weight_GB/s"] = benchmark::Counter(4.0 * k * n * calls * 1e-9, benchmark::Counter::kIsRate);
}

struct shape {
  index m, k, n, r;
  explicit shape(const benchmark::State& s) : m(s.range(0)), k(s.range(1)), n(s.range(2)), r(s.range(3)) {}
};

void linear_eigen_dense(benchmark::State& state) {
  const shape s(state);
  row_major x = row_major::Random(s.m, s.k), w = row_major::Random(s.n, s.k), y(s.m, s.n);
  for (auto _ : state) {
    y.noalias() = x * w.transpose();
    benchmark::DoNotOptimize(y.data());
  }
  counters(state, s.m, s.k, s.n);
}

void linear_lora_naive(benchmark::State& state) {
  const shape s(state);
  row_major x = row_major::Random(s.m, s.k), w = row_major::Random(s.n, s.k), y(s.m, s.n);
  row_major a = row_major::Random(s.r, s.k), b = row_major::Random(s.n, s.r);
  for (auto _ : state) {
    y.noalias() = x * w.transpose();
    y.noalias() += 2.0f * ((x * a.transpose()) * b.transpose());
    benchmark::DoNotOptimize(y.data());
  }
  counters(state, s.m, s.k, s.n);
}

void linear_dense_f32(benchmark::State& state) {
  const shape s(state);
  const peft::dense<float> w(random_matrix(s.n, s.k, 1));
  const auto x = random_matrix(s.m, s.k, 2);
  peft::matrix<float> y(s.m, s.n);
  for (auto _ : state) {
    w.matmul<float>(x, y);
    benchmark::DoNotOptimize(y.data());
  }
  counters(state, s.m, s.k, s.n);
}

void linear_lora_f32(benchmark::State& state) {
  const shape s(state);
  const peft::dense<float> w(random_matrix(s.n, s.k, 1));
  const peft::lora<float> a(s.k, s.n, {.rank = s.r, .alpha = 2.0 * static_cast<double>(s.r),
                                       .init = peft::lora_init::random, .seed = 3});
  const auto x = random_matrix(s.m, s.k, 2);
  peft::matrix<float> y(s.m, s.n);
  peft::lora<float>::cache_type cache;
  for (auto _ : state) {
    a.forward(w, x.view(), y.view(), cache);
    benchmark::DoNotOptimize(y.data());
  }
  counters(state, s.m, s.k, s.n);
}

void switch_lora_merge(benchmark::State& state) {
  const index k = state.range(0), n = state.range(1), r = state.range(2);
  peft::adapted_linear<peft::dense<float>, peft::lora<float>> layer{peft::dense<float>(random_matrix(n, k, 1))};
  layer.add_adapter("a", peft::lora<float>(k, n, {.rank = r, .alpha = 16, .init = peft::lora_init::random}));
  for (auto _ : state) {
    layer.merge("a");
    layer.unmerge("a");
    benchmark::ClobberMemory();
  }
}

void switch_shira(benchmark::State& state) {
  const index k = state.range(0), n = state.range(1), r = state.range(2);
  peft::dense<float> base(random_matrix(n, k, 1));
  peft::shira<float> a(k, n, {.rank = r, .random_init = true, .seed = 5});  // K = r (k + n) values
  for (auto _ : state) {
    a.apply(base);
    a.remove(base);
    benchmark::ClobberMemory();
  }
}

void linear_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "k", "n", "r"});
  for (index m : {1, 8, 64, 512}) b->Args({m, 4096, 4096, 16});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(linear_eigen_dense)->Name("linear/eigen_dense")->Apply(linear_args);
BENCHMARK(linear_lora_naive)->Name("linear/lora_naive")->Apply(linear_args);
BENCHMARK(linear_dense_f32)->Name("linear/dense_f32")->Apply(linear_args);
BENCHMARK(linear_lora_f32)->Name("linear/lora_f32")->Apply(linear_args);
BENCHMARK(switch_lora_merge)
    ->Name("switch/lora_merge")
    ->ArgNames({"k", "n", "r"})
    ->Args({4096, 4096, 16})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(switch_shira)
    ->Name("switch/shira")
    ->ArgNames({"k", "n", "r"})
    ->Args({4096, 4096, 16})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
