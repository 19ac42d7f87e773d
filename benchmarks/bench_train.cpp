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
//   train_step/lora_term_f32      the low-rank path alone: add_term and backward_term (x A^T,
//                                 p B^T, dy B, dy^T p, u^T x, u A), no base products
//   train_step/lora_rowblock_f32  the step laid out as LoRAFusion fuses it on GPUs: per block of
//                                 64 rows, x's block read once for x A^T and the base product
//                                 (the term joins its tiles), dy's block once for dy W0, dy B and
//                                 dy^T p; dA, dB summed per block in order. Kept to measure the
//                                 layout against lora_f32 (benchmarks/RESULTS.md), not a library path
//
// Counters as linear/*: GFLOP/s counts the dense products (2 per adapter step, 3 for full).
#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/base/dense.hpp>
#include <peft/base/q4_0.hpp>
#include <peft/kernels/gemm.hpp>
#include <peft/kernels/parallel.hpp>

#include <algorithm>
#include <initializer_list>
#include <vector>

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

/// A batch of 4 x 128 tokens through square projections of each side, rank 16 (512 and 768: the
/// 33.5 M and 97.2 M Llamas' hidden sizes).
void token_batch_args(benchmark::internal::Benchmark* b, std::initializer_list<index> sides) {
  for (index d : sides) b->Args({512, d, d, 16});
}

/// linear_args plus the two benchmark Llamas' square projections.
void train_llm_args(benchmark::internal::Benchmark* b) {
  bench::linear_args(b);
  token_batch_args(b, {512, 768});
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

/// The two benchmark Llamas' square projections, and k = n = 4096.
void step_layout_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "k", "n", "r"});
  token_batch_args(b, {512, 768, 4096});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

/// Counters of the low-rank products alone: 2 m r (3 k + 3 n) flops per step.
void low_rank_counters(benchmark::State& state, const shape& s) {
  const double flops = 6.0 * static_cast<double>(s.m) * static_cast<double>(s.r) * static_cast<double>(s.k + s.n);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * static_cast<double>(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
}

void train_step_lora_term_f32(benchmark::State& state) {
  const shape s(state);
  const peft::dense<float> w(bench::random_matrix(s.n, s.k, 1));
  peft::lora<float> a(s.k, s.n, lora_opts(s));
  const auto x = bench::random_matrix(s.m, s.k, 2), dy = bench::random_matrix(s.m, s.n, 4);
  peft::matrix<float> y(s.m, s.n), dx(s.m, s.k), dh(s.m, s.n);
  peft::lora<float>::cache_type cache;
  for (auto _ : state) {
    a.add_term(w, x.view(), y.view(), y.view(), cache);
    a.backward_term(w, x.view(), y.view(), dy.view(), dh.view(), dx.view(), cache);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  low_rank_counters(state, s);
}

void train_step_lora_rowblock_f32(benchmark::State& state) {
  using peft::kernels::gemm_nn;
  using peft::kernels::gemm_tn;
  const shape s(state);
  const peft::dense<float> w(bench::random_matrix(s.n, s.k, 1));
  peft::lora<float> a(s.k, s.n, lora_opts(s));
  const auto x = bench::random_matrix(s.m, s.k, 2), dy = bench::random_matrix(s.m, s.n, 4);
  peft::matrix<float> y(s.m, s.n), dx(s.m, s.k), u(s.m, s.r);
  constexpr index rows = 64;
  const index blocks = (s.m + rows - 1) / rows;
  std::vector<peft::matrix<float>> db(static_cast<std::size_t>(blocks), peft::matrix<float>(s.n, s.r));
  std::vector<peft::matrix<float>> da(static_cast<std::size_t>(blocks), peft::matrix<float>(s.r, s.k));
  const auto grads = a.low_rank_grads();
  const peft::low_rank_term<float> term = a.low_rank();
  std::vector<peft::low_rank_cache<float>> caches(static_cast<std::size_t>(blocks));
  for (auto _ : state) {
    // Inside parallel_ranges the library's products run on the calling thread.
    peft::kernels::parallel_ranges(blocks, 1, 1e9, [&](index first, index last) {
      for (index b = first; b < last; ++b) {
        const index i0 = b * rows, mb = std::min(rows, s.m - i0);
        const auto xb = x.view().block(i0, 0, mb, s.k);
        const auto dyb = dy.view().block(i0, 0, mb, s.n);
        auto& cache = caches[static_cast<std::size_t>(b)];
        peft::low_rank::project(term, xb, cache);                                      // t = x A^T
        w.matmul<float>(xb, y.view().block(i0, 0, mb, s.n), peft::low_rank::epilogue(term, cache));
        const auto dxb = dx.view().block(i0, 0, mb, s.k);
        const auto ub = u.view().block(i0, 0, mb, s.r);
        w.matmul_t<float>(dyb, dxb);                                                   // dx = dy W0
        gemm_nn<float, float>(1.0, dyb, term.b, 0.0, ub);                              // u = dy B
        gemm_tn<float>(1.0, dyb, cache.t.view(), 0.0, db[static_cast<std::size_t>(b)].view());  // dy^T t
        gemm_nn<float, float>(term.scale, peft::matrix_view<const float>(ub), term.a, 1.0, dxb);  // += s u A
        gemm_tn<float>(1.0, peft::matrix_view<const float>(ub), xb, 0.0, da[static_cast<std::size_t>(b)].view());
      }
    });
    // dB and dA: the blocks' parts summed in block order, threads over the outputs.
    peft::kernels::parallel_ranges(s.n, 16, 1e9, [&](index first, index last) {
      for (index j = first; j < last; ++j) {
        for (index q = 0; q < s.r; ++q) {
          float sum = 0.0f;
          for (const auto& part : db) sum += part(j, q);
          grads.b(j, q) += term.scale * sum;
        }
      }
    });
    peft::kernels::parallel_ranges(s.k, 16, 1e9, [&](index first, index last) {
      for (index q = 0; q < s.r; ++q) {
        for (index c = first; c < last; ++c) {
          float sum = 0.0f;
          for (const auto& part : da) sum += part(q, c);
          grads.a(q, c) += term.scale * sum;
        }
      }
    });
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  bench::counters(state, s, 4.0 * static_cast<double>(s.k) * static_cast<double>(s.n), 2.0);
}
}  // namespace

BENCHMARK(train_step_full_f32)->Name("train_step/full_f32")->Apply(bench::linear_args);
BENCHMARK(train_step_frozen_f32)->Name("train_step/frozen_f32")->Apply(train_llm_args);
BENCHMARK(train_step_lora_f32)->Name("train_step/lora_f32")->Apply(train_llm_args);
BENCHMARK(train_step_dora_f32)->Name("train_step/dora_f32")->Apply(bench::linear_args);
BENCHMARK(train_step_lora_q4_0)->Name("train_step/lora_q4_0")->Apply(bench::linear_args);
BENCHMARK(train_step_lora_term_f32)->Name("train_step/lora_term_f32")->Apply(step_layout_args);
BENCHMARK(train_step_lora_rowblock_f32)->Name("train_step/lora_rowblock_f32")->Apply(step_layout_args);
