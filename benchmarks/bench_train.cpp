// peft_bench — train_step: one forward and one backward (adapter gradients and dx) of a layer,
// k = n = 4096, against full fine-tuning of the same layer (dW as well) in the same run.
//
//   train_step/full_f32   y = x W^T, dx = dy W, dW += dy^T x (the dense baseline)
//   train_step/frozen_f32 y = x W^T, dx = dy W: what every adapter's step asks of its frozen base;
//                         lora_f32 minus this is the low-rank path's own cost (also at the
//                         projection shapes of the Llamas of benchmarks/compare_pytorch_llm.py)
//   train_step/lora_f32   peft::lora<float> forward + backward over dense<float>
//   train_step/dora_f32   peft::dora<float> forward + backward; the weight norms are recomputed
//                         every step (parameters change every optimizer step in training)
//   train_step/lora_q4_0  LoRA over a frozen q4_0 base (QLoRA-style)
//
// Counters as linear/*: GFLOP/s counts the dense products (2 per adapter step, 3 for full).
#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/base/dense.hpp>
#include <peft/base/q4_0.hpp>
#include <peft/kernels/gemm.hpp>

#include "bench_common.hpp"

namespace {

using bench::index;
using bench::shape;

peft::lora_options lora_opts(const shape& s) {
  return {.rank = s.r, .alpha = 2.0 * static_cast<double>(s.r), .init = peft::lora_init::random, .seed = 3};
}

void train_step_full_f32(benchmark::State& state) {
  const shape s(state);
  const peft::dense<float> w(bench::random_matrix(s.n, s.k, 1));
  peft::matrix<float> dw(s.n, s.k);
  const auto x = bench::random_matrix(s.m, s.k, 2), dy = bench::random_matrix(s.m, s.n, 4);
  peft::matrix<float> y(s.m, s.n), dx(s.m, s.k);
  for (auto _ : state) {
    w.matmul<float>(x, y);
    w.matmul_t<float>(dy, dx);
    peft::kernels::gemm_tn<float>(1.0, dy.view(), x.view(), 1.0, dw.view());
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
    benchmark::DoNotOptimize(dw.data());
  }
  bench::counters(state, s, 4.0 * static_cast<double>(s.k) * static_cast<double>(s.n), 3.0);
}

void train_step_frozen_f32(benchmark::State& state) {
  const shape s(state);
  const peft::dense<float> w(bench::random_matrix(s.n, s.k, 1));
  const auto x = bench::random_matrix(s.m, s.k, 2), dy = bench::random_matrix(s.m, s.n, 4);
  peft::matrix<float> y(s.m, s.n), dx(s.m, s.k);
  for (auto _ : state) {
    w.matmul<float>(x, y);
    w.matmul_t<float>(dy, dx);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  bench::counters(state, s, 4.0 * static_cast<double>(s.k) * static_cast<double>(s.n), 2.0);
}

/// linear_args plus a batch of 4 x 128 tokens through the square projections of the 33.5 M and
/// 97.2 M Llamas (hidden 512 and 768).
void train_llm_args(benchmark::internal::Benchmark* b) {
  bench::linear_args(b);
  for (index d : {512, 768}) b->Args({512, d, d, 16});
}

template <class Adapter, class Base>
void run_step(benchmark::State& state, const shape& s, const Base& w, Adapter& a, bool invalidate) {
  const auto x = bench::random_matrix(s.m, s.k, 2), dy = bench::random_matrix(s.m, s.n, 4);
  peft::matrix<float> y(s.m, s.n), dx(s.m, s.k);
  typename Adapter::cache_type cache;
  for (auto _ : state) {
    if constexpr (requires { a.invalidate_norms(); }) {
      if (invalidate) a.invalidate_norms();
    }
    a.forward(w, x.view(), y.view(), cache);
    a.backward(w, x.view(), dy.view(), dx.view(), cache);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  double bytes = 4.0 * static_cast<double>(s.k) * static_cast<double>(s.n);
  if constexpr (requires { w.storage_bytes(); }) bytes = static_cast<double>(w.storage_bytes());
  bench::counters(state, s, bytes, 2.0);
}

void train_step_lora_f32(benchmark::State& state) {
  const shape s(state);
  const peft::dense<float> w(bench::random_matrix(s.n, s.k, 1));
  peft::lora<float> a(s.k, s.n, lora_opts(s));
  run_step(state, s, w, a, false);
}

void train_step_dora_f32(benchmark::State& state) {
  const shape s(state);
  const peft::dense<float> w(bench::random_matrix(s.n, s.k, 1));
  peft::dora<float> a(w, lora_opts(s));
  run_step(state, s, w, a, true);
}

void train_step_lora_q4_0(benchmark::State& state) {
  const shape s(state);
  const auto dense = bench::random_matrix(s.n, s.k, 1);
  const auto w = peft::q4_0::quantize(peft::matrix_view<const float>(dense.view()));
  peft::lora<float> a(s.k, s.n, lora_opts(s));
  run_step(state, s, w, a, false);
}

}  // namespace

BENCHMARK(train_step_full_f32)->Name("train_step/full_f32")->Apply(bench::linear_args);
BENCHMARK(train_step_frozen_f32)->Name("train_step/frozen_f32")->Apply(train_llm_args);
BENCHMARK(train_step_lora_f32)->Name("train_step/lora_f32")->Apply(train_llm_args);
BENCHMARK(train_step_dora_f32)->Name("train_step/dora_f32")->Apply(bench::linear_args);
BENCHMARK(train_step_lora_q4_0)->Name("train_step/lora_q4_0")->Apply(bench::linear_args);
