// peft_bench — the linear family: y = x W^T (+ adapter) at LLM shapes (k = n = 4096), against
// the dense baselines measured in the same run.
//
//   linear/eigen_dense     Y.noalias() = X * W.transpose() on row-major Eigen matrices (baseline)
//   linear/openblas_dense  cblas_sgemm (cblas_sgemv at m = 1), when OpenBLAS was found
//   linear/lora_naive      Eigen's product plus (X A^T) B^T added: what a careless user writes
//   linear/dense_f32       peft::dense<float>::matmul, the base alone
//   linear/lora_f32        peft::lora<float>::forward, base + adapter, fused (also r = 4, 64)
//   linear/dora_f32        peft::dora<float>::forward (norms cached: inference)
//   linear/dense_<q>, linear/lora_<q>   the same over a quantized base, q = int8, q4_0, nf4
//   linear/dense_packed, linear/lora_packed   over peft::packed_f32 (f32 pre-packed in panels)
//
// Counters: GFLOP/s of the dense product (2 m k n per call) and weight GB/s (bytes of the
// stored weight per call: 4 k n for f32, storage_bytes() for a quantized base).
#include <Eigen/Core>

#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/base/dense.hpp>
#include <peft/base/int8_rowwise.hpp>
#include <peft/base/nf4.hpp>
#include <peft/base/packed_f32.hpp>
#include <peft/base/q4_0.hpp>

#include "bench_common.hpp"

#ifdef PEFT_BENCH_OPENBLAS
#include <cblas.h>
#endif

namespace {

using bench::index;
using bench::shape;
using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

double f32_bytes(const shape& s) { return 4.0 * static_cast<double>(s.k) * static_cast<double>(s.n); }

void linear_eigen_dense(benchmark::State& state) {
  const shape s(state);
  row_major x = row_major::Random(s.m, s.k), w = row_major::Random(s.n, s.k), y(s.m, s.n);
  for (auto _ : state) {
    y.noalias() = x * w.transpose();
    benchmark::DoNotOptimize(y.data());
  }
  bench::counters(state, s, f32_bytes(s));
}

#ifdef PEFT_BENCH_OPENBLAS
void linear_openblas_dense(benchmark::State& state) {
  const shape s(state);
  const auto x = bench::random_matrix(s.m, s.k, 2), w = bench::random_matrix(s.n, s.k, 1);
  peft::matrix<float> y(s.m, s.n);
  const auto m = static_cast<int>(s.m), k = static_cast<int>(s.k), n = static_cast<int>(s.n);
  for (auto _ : state) {
    if (m == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, w.data(), k, x.data(), 1, 0.0f, y.data(), 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x.data(), k, w.data(), k, 0.0f,
                  y.data(), n);
    }
    benchmark::DoNotOptimize(y.data());
  }
  bench::counters(state, s, f32_bytes(s));
}
#endif

void linear_lora_naive(benchmark::State& state) {
  const shape s(state);
  row_major x = row_major::Random(s.m, s.k), w = row_major::Random(s.n, s.k), y(s.m, s.n);
  row_major a = row_major::Random(s.r, s.k), b = row_major::Random(s.n, s.r);
  for (auto _ : state) {
    y.noalias() = x * w.transpose();
    y.noalias() += 2.0f * ((x * a.transpose()) * b.transpose());
    benchmark::DoNotOptimize(y.data());
  }
  bench::counters(state, s, f32_bytes(s));
}

peft::lora_options lora_opts(const shape& s) {
  return {.rank = s.r, .alpha = 2.0 * static_cast<double>(s.r), .init = peft::lora_init::random, .seed = 3};
}

template <class Base>
double weight_bytes(const Base& w, const shape& s) {
  if constexpr (requires { w.storage_bytes(); }) {
    return static_cast<double>(w.storage_bytes());
  } else {
    return f32_bytes(s);
  }
}

template <class Base>
void run_dense(benchmark::State& state, const Base& w, const shape& s) {
  const auto x = bench::random_matrix(s.m, s.k, 2);
  peft::matrix<float> y(s.m, s.n);
  for (auto _ : state) {
    w.template matmul<float>(x, y);
    benchmark::DoNotOptimize(y.data());
  }
  bench::counters(state, s, weight_bytes(w, s));
}

template <class Base>
void run_lora(benchmark::State& state, const Base& w, const shape& s) {
  const peft::lora<float> a(s.k, s.n, lora_opts(s));
  const auto x = bench::random_matrix(s.m, s.k, 2);
  peft::matrix<float> y(s.m, s.n);
  peft::lora<float>::cache_type cache;
  for (auto _ : state) {
    a.forward(w, x.view(), y.view(), cache);
    benchmark::DoNotOptimize(y.data());
  }
  bench::counters(state, s, weight_bytes(w, s));
}

peft::dense<float> dense_base(const shape& s) { return peft::dense<float>(bench::random_matrix(s.n, s.k, 1)); }

template <class Q>
Q quantized_base(const shape& s) {
  const auto w = bench::random_matrix(s.n, s.k, 1);
  return Q::quantize(peft::matrix_view<const float>(w.view()));
}

peft::packed_f32 packed_base(const shape& s) {
  const auto w = bench::random_matrix(s.n, s.k, 1);
  return peft::packed_f32::pack(peft::matrix_view<const float>(w.view()));
}

void linear_dense_packed(benchmark::State& state) {
  const shape s(state);
  run_dense(state, packed_base(s), s);
}

void linear_lora_packed(benchmark::State& state) {
  const shape s(state);
  run_lora(state, packed_base(s), s);
}

void linear_dense_f32(benchmark::State& state) {
  const shape s(state);
  run_dense(state, dense_base(s), s);
}

void linear_lora_f32(benchmark::State& state) {
  const shape s(state);
  run_lora(state, dense_base(s), s);
}

void linear_dora_f32(benchmark::State& state) {
  const shape s(state);
  const auto w = dense_base(s);
  const peft::dora<float> a(w, lora_opts(s));
  const auto x = bench::random_matrix(s.m, s.k, 2);
  peft::matrix<float> y(s.m, s.n);
  peft::dora<float>::cache_type cache;
  a.forward(w, x.view(), y.view(), cache);  // norms computed once, as in inference
  for (auto _ : state) {
    a.forward(w, x.view(), y.view(), cache);
    benchmark::DoNotOptimize(y.data());
  }
  bench::counters(state, s, f32_bytes(s));
}

template <class Q>
void linear_dense_q(benchmark::State& state) {
  const shape s(state);
  run_dense(state, quantized_base<Q>(s), s);
}

template <class Q>
void linear_lora_q(benchmark::State& state) {
  const shape s(state);
  run_lora(state, quantized_base<Q>(s), s);
}

}  // namespace

BENCHMARK(linear_eigen_dense)->Name("linear/eigen_dense")->Apply(bench::linear_args);
#ifdef PEFT_BENCH_OPENBLAS
BENCHMARK(linear_openblas_dense)->Name("linear/openblas_dense")->Apply(bench::linear_args);
#endif
BENCHMARK(linear_lora_naive)->Name("linear/lora_naive")->Apply(bench::linear_args);
BENCHMARK(linear_dense_f32)->Name("linear/dense_f32")->Apply(bench::linear_args);
BENCHMARK(linear_lora_f32)->Name("linear/lora_f32")->Apply(bench::linear_rank_args);
BENCHMARK(linear_dense_packed)->Name("linear/dense_packed")->Apply(bench::linear_args);
BENCHMARK(linear_lora_packed)->Name("linear/lora_packed")->Apply(bench::linear_args);
BENCHMARK(linear_dora_f32)->Name("linear/dora_f32")->Apply(bench::linear_args);
BENCHMARK_TEMPLATE(linear_dense_q, peft::int8_rowwise)->Name("linear/dense_int8")->Apply(bench::linear_args);
BENCHMARK_TEMPLATE(linear_lora_q, peft::int8_rowwise)->Name("linear/lora_int8")->Apply(bench::linear_args);
BENCHMARK_TEMPLATE(linear_dense_q, peft::q4_0)->Name("linear/dense_q4_0")->Apply(bench::linear_args);
BENCHMARK_TEMPLATE(linear_lora_q, peft::q4_0)->Name("linear/lora_q4_0")->Apply(bench::linear_args);
BENCHMARK_TEMPLATE(linear_dense_q, peft::nf4)->Name("linear/dense_nf4")->Apply(bench::linear_args);
BENCHMARK_TEMPLATE(linear_lora_q, peft::nf4)->Name("linear/lora_nf4")->Apply(bench::linear_args);
