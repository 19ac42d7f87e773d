// peft_bench — serve: many LoRA adapters on one frozen f32 base (k = n = 4096, r = 16), a batch of
// m rows spread round-robin over min(adapters, m) distinct adapters of the `adapters` loaded.
//
//   serve/dense           the base product alone (baseline)
//   serve/single          adapter_registry, every row on one adapter (the fused LoRA path)
//   serve/mixed           adapter_registry, rows over several adapters: one base product for the
//                         batch, the groups' low-rank terms added in its epilogue
//   serve/loop            one full forward (base + fused LoRA) per adapter group on its rows: what
//                         a server that cannot mix adapters in a batch does (llama.cpp)
//   serve/gather_scatter  the base product once, then per group gather, x A^T, (.) B^T, scatter:
//                         PEFT's mixed-batch algorithm (LoraLayer._mixed_batch_forward), in C++
//   serve/fuse_lora       adapter_registry::fuse of a LoRA adapter: W0 += s B A (the time the
//                         registry reports for putting it in); serve/unfuse_lora taking it out
//   serve/fuse_shira      the same for SHiRA (scatter K values; unfuse restores the kept bits)
//   serve/unfuse_shira    (a switch between two adapters costs unfuse + fuse)
#include <string>
#include <vector>

#include <peft/adapters/lora.hpp>
#include <peft/adapters/shira.hpp>
#include <peft/base/dense.hpp>
#include <peft/kernels/gemm.hpp>
#include <peft/serve/adapter_registry.hpp>

#include "bench_common.hpp"

namespace {

using bench::index;
using registry = peft::serve::adapter_registry<peft::dense<float>>;
using group = peft::serve::batch_group<peft::any_adapter<float>>;
const std::string layer = "layer.weight";

struct serve_shape {
  index m, k, n, r, adapters;
  explicit serve_shape(const benchmark::State& s)
      : m(s.range(0)), k(s.range(1)), n(s.range(2)), r(s.range(3)), adapters(s.range(4)) {}
};

peft::lora<float> random_lora(const serve_shape& s, std::uint64_t seed) {
  return peft::lora<float>(s.k, s.n, {.rank = s.r, .alpha = 32, .init = peft::lora_init::random, .seed = seed});
}

/// "a<i>" (built with +=: g++ 12 reports a false -Wrestrict on "a" + std::string).
std::string adapter_name(index i) {
  std::string name = "a";
  name += std::to_string(i);
  return name;
}

/// A registry over one random base with `adapters` LoRA adapters "a0", "a1", ...
std::unique_ptr<registry> make_registry(const serve_shape& s) {
  auto reg = std::make_unique<registry>(layer, peft::dense<float>(bench::random_matrix(s.n, s.k, 1)));
  for (index a = 0; a < s.adapters; ++a) {
    reg->add(adapter_name(a), layer, random_lora(s, 100 + static_cast<std::uint64_t>(a)));
  }
  return reg;
}

/// Row i on adapter i mod min(adapters, m) (single: all on a0).
std::vector<peft::serve::request> requests(const serve_shape& s, bool single) {
  std::vector<peft::serve::request> rows;
  for (index i = 0; i < s.m; ++i) rows.push_back({adapter_name(single ? 0 : i % s.adapters)});
  return rows;
}

/// The counters of every family (the CSV reporter needs the same set in every benchmark).
void report(benchmark::State& state, const serve_shape& s) {
  bench::counters(state, bench::shape{state}, 4.0 * static_cast<double>(s.k) * static_cast<double>(s.n));
}

void serve_dense(benchmark::State& state) {
  const serve_shape s(state);
  const peft::dense<float> base(bench::random_matrix(s.n, s.k, 1));
  const auto x = bench::random_matrix(s.m, s.k, 2);
  peft::matrix<float> y(s.m, s.n);
  for (auto _ : state) {
    base.matmul(x.view(), y.view());
    benchmark::DoNotOptimize(y.data());
  }
  report(state, s);
}

void serve_registry(benchmark::State& state, bool single) {
  const serve_shape s(state);
  const auto reg = make_registry(s);
  const auto rows = requests(s, single);
  const auto x = bench::random_matrix(s.m, s.k, 2);
  peft::matrix<float> y(s.m, s.n);
  for (auto _ : state) {
    reg->forward(layer, x.view(), y.view(), rows);
    benchmark::DoNotOptimize(y.data());
  }
  report(state, s);
}
void serve_single(benchmark::State& state) { serve_registry(state, true); }
void serve_mixed(benchmark::State& state) { serve_registry(state, false); }

/// The adapters and the groups of the round-robin batch, for the baselines without a registry.
struct grouped {
  std::vector<peft::any_adapter<float>> adapters;
  std::vector<group> groups;
  explicit grouped(const serve_shape& s) {
    const index used = std::min(s.adapters, s.m);
    for (index a = 0; a < used; ++a) adapters.emplace_back(random_lora(s, 100 + static_cast<std::uint64_t>(a)));
    groups.resize(static_cast<std::size_t>(used));
    for (index a = 0; a < used; ++a) {
      groups[static_cast<std::size_t>(a)] = peft::serve::group_of(adapters[static_cast<std::size_t>(a)], {}, {});
    }
    for (index i = 0; i < s.m; ++i) {
      groups[static_cast<std::size_t>(i % used)].rows.push_back(i);
      groups[static_cast<std::size_t>(i % used)].factors.push_back(1.0f);
    }
  }
};

/// Times pass(base, groups, x, y) over a random base and the round-robin batch.
template <class Pass>
void serve_baseline(benchmark::State& state, Pass pass) {
  const serve_shape s(state);
  const peft::dense<float> base(bench::random_matrix(s.n, s.k, 1));
  const grouped g(s);
  const auto x = bench::random_matrix(s.m, s.k, 2);
  peft::matrix<float> y(s.m, s.n);
  for (auto _ : state) {
    pass(base, g, x, y);
    benchmark::DoNotOptimize(y.data());
  }
  report(state, s);
}

void serve_loop(benchmark::State& state) {
  serve_baseline(state, [](const peft::dense<float>& base, const grouped& g, const peft::matrix<float>& x,
                           peft::matrix<float>& y) { peft::serve::looped_forward(base, x.view(), y.view(), g.groups); });
}

void serve_gather_scatter(benchmark::State& state) {
  serve_baseline(state, [](const peft::dense<float>& base, const grouped& g, const peft::matrix<float>& x,
                           peft::matrix<float>& y) {
    const index k = x.cols(), n = y.cols();
    base.matmul(x.view(), y.view());
    for (std::size_t a = 0; a < g.groups.size(); ++a) {
      const auto& grp = g.groups[a];
      const auto& f = *grp.low_rank;
      const auto mg = static_cast<index>(grp.rows.size());
      peft::matrix<float> xs(mg, k), t(mg, f.rank()), d(mg, n);
      for (index i = 0; i < mg; ++i) {
        const float* src = x.row(grp.rows[static_cast<std::size_t>(i)]);
        std::copy(src, src + k, xs.row(i));
      }
      peft::kernels::gemm_nt<float, float>(1.0, xs.view(), f.a, 0.0, t.view());
      peft::kernels::gemm_nt<float, float>(static_cast<double>(f.scale), t.view(), f.b, 0.0, d.view());
      for (index i = 0; i < mg; ++i) {
        float* yr = y.view().row(grp.rows[static_cast<std::size_t>(i)]);
        for (index j = 0; j < n; ++j) yr[j] += d(i, j);
      }
    }
  });
}

/// adapter_registry::fuse then unfuse of one adapter per iteration; the benchmark's time is the
/// registry's own measurement of one half (manual time): putting the adapter in, or taking it out.
template <class Make>
void serve_fuse(benchmark::State& state, Make make, bool in) {
  const index k = state.range(0), n = state.range(1), r = state.range(2);
  registry reg(layer, peft::dense<float>(bench::random_matrix(n, k, 1)));
  reg.add("x", layer, make(k, n, r, 7));
  for (auto _ : state) {
    const double put_in = reg.fuse("x").fuse_seconds;
    const double taken_out = reg.unfuse().unfuse_seconds;
    state.SetIterationTime(in ? put_in : taken_out);
    benchmark::ClobberMemory();
  }
}
peft::lora<float> lora_of(index k, index n, index r, std::uint64_t seed) {
  return peft::lora<float>(k, n, {.rank = r, .alpha = 32, .init = peft::lora_init::random, .seed = seed});
}
peft::shira<float> shira_of(index k, index n, index r, std::uint64_t seed) {
  return peft::shira<float>(k, n, {.rank = r, .random_init = true, .seed = seed});
}
void serve_fuse_lora(benchmark::State& state) { serve_fuse(state, lora_of, true); }
void serve_unfuse_lora(benchmark::State& state) { serve_fuse(state, lora_of, false); }
void serve_fuse_shira(benchmark::State& state) { serve_fuse(state, shira_of, true); }
void serve_unfuse_shira(benchmark::State& state) { serve_fuse(state, shira_of, false); }

void serve_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "k", "n", "r", "adapters"});
  for (index m : {8, 64})
    for (index a : {1, 8, 64}) b->Args({m, 4096, 4096, 16, a});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

void fuse_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"k", "n", "r"})->Args({4096, 4096, 16})->Unit(benchmark::kMillisecond)->UseManualTime();
}

}  // namespace

BENCHMARK(serve_dense)->Name("serve/dense")->Apply(serve_args);
BENCHMARK(serve_single)->Name("serve/single")->Apply(serve_args);
BENCHMARK(serve_mixed)->Name("serve/mixed")->Apply(serve_args);
BENCHMARK(serve_loop)->Name("serve/loop")->Apply(serve_args);
BENCHMARK(serve_gather_scatter)->Name("serve/gather_scatter")->Apply(serve_args);
BENCHMARK(serve_fuse_lora)->Name("serve/fuse_lora")->Apply(fuse_args);
BENCHMARK(serve_unfuse_lora)->Name("serve/unfuse_lora")->Apply(fuse_args);
BENCHMARK(serve_fuse_shira)->Name("serve/fuse_shira")->Apply(fuse_args);
BENCHMARK(serve_unfuse_shira)->Name("serve/unfuse_shira")->Apply(fuse_args);
