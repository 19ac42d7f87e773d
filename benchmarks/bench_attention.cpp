// peft_bench — attention: one head of one causal sequence, forward and backward (dq, dk, dv),
// head_dim 64, the blocked kernels of kernels/attention.hpp against their reference twin (each
// query's whole row of probabilities, sums in double: the way the model computed attention
// before the blocked kernels) in the same run.
//
//   attention/blocked     kernels::attention_forward + attention_backward (f32, active ISA)
//   attention/reference   kernels::reference::attention_forward + attention_backward
//
// Argument: seq (queries = keys). Counter GFLOP/s counts the 4 seq^2 hd flops of the forward's
// two products (causal: half of them are masked) plus the backward's 8 seq^2 hd.
#include <cmath>
#include <vector>

#include <peft/kernels/attention.hpp>
#include <peft/kernels/isa.hpp>
#include <peft/kernels/reference/attention.hpp>

#include "bench_common.hpp"

namespace {

using bench::index;

constexpr index head_dim = 64;

struct attention_inputs {
  peft::matrix<float> q, k, v, dout, out, dq, dk, dv;
  std::vector<float> lse;
  std::vector<index> pos;
  explicit attention_inputs(index seq)
      : q(bench::random_matrix(seq, head_dim, 1)), k(bench::random_matrix(seq, head_dim, 2)),
        v(bench::random_matrix(seq, head_dim, 3)), dout(bench::random_matrix(seq, head_dim, 4)), out(seq, head_dim),
        dq(seq, head_dim), dk(seq, head_dim), dv(seq, head_dim), lse(static_cast<std::size_t>(seq)),
        pos(static_cast<std::size_t>(seq)) {
    for (index i = 0; i < seq; ++i) pos[static_cast<std::size_t>(i)] = i;
  }
  peft::kernels::attention_problem<float> problem() const {
    peft::kernels::attention_problem<float> p;
    p.nq = p.nk = q.rows();
    p.head_dim = head_dim;
    p.q = q.data();
    p.ldq = head_dim;
    p.k = k.data();
    p.v = v.data();
    p.ldkv = head_dim;
    p.qpos = p.kpos = pos.data();
    p.scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
    return p;
  }
};

void set_counters(benchmark::State& state, index seq) {
  const double flops = 12.0 * static_cast<double>(seq) * static_cast<double>(seq) * static_cast<double>(head_dim);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * static_cast<double>(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
  state.SetLabel(std::string(peft::kernels::isa_name(peft::kernels::active_isa())));
}

void attention_blocked(benchmark::State& state) {
  const index seq = state.range(0);
  attention_inputs in(seq);
  const auto p = in.problem();
  peft::kernels::attention_workspace<float> ws;
  for (auto _ : state) {
    peft::kernels::attention_forward(p, in.out.data(), head_dim, in.lse.data(), 1, ws);
    peft::kernels::attention_backward(p, in.out.data(), head_dim, in.dout.data(), head_dim, in.lse.data(), 1,
                                      in.dq.data(), head_dim, in.dk.data(), in.dv.data(), head_dim, ws);
    benchmark::DoNotOptimize(in.dq.data());
  }
  set_counters(state, seq);
}

void attention_reference(benchmark::State& state) {
  const index seq = state.range(0);
  attention_inputs in(seq);
  const auto p = in.problem();
  for (auto _ : state) {
    peft::kernels::reference::attention_forward(p, in.out.data(), head_dim, in.lse.data(), 1);
    peft::kernels::reference::attention_backward(p, in.out.data(), head_dim, in.dout.data(), head_dim, in.lse.data(),
                                                 1, in.dq.data(), head_dim, in.dk.data(), in.dv.data(), head_dim);
    benchmark::DoNotOptimize(in.dq.data());
  }
  set_counters(state, seq);
}

}  // namespace

BENCHMARK(attention_blocked)->Name("attention/blocked")->ArgName("seq")->Arg(128)->Arg(512)->Arg(2048);
BENCHMARK(attention_reference)->Name("attention/reference")->ArgName("seq")->Arg(128)->Arg(512)->Arg(2048);
