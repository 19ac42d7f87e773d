// tests/dist/mpi_tests.cpp — peft/dist/mpi.hpp on however many ranks mpirun starts (1 to 4).
//
//   mpirun -np P peft_mpi_tests [--params-out FILE]
//
// Every rank runs every check; a failed check prints "rank K: FAILED <file>:<line> <expr>" and
// the run exits 1 on every rank (the failure counts are summed at the end). Checks:
//   fused buffer      shared tensors packed once, frozen and integer ones skipped, strided views;
//                     exactly ONE MPI_Allreduce per step (counted through the PMPI interface)
//   uneven weighting  ranks with different example counts (one with none, its gradients NaN):
//                     the global mean, for the mean and the sum conventions alike
//   errors            every rank throws (no hang): empty global batch, a bad count on one rank,
//                     different tensor lists, a changed list at rebind; MPI codes -> mpi_error
//   broadcast         rank-dependent adapters become the root's; checksums detect a difference
//   training          LoRA (with bias) on a 2-layer net in double, AdamW, 7 global batches split
//                     unevenly (some ranks get none): the adapters equal, within 1e-6, those of a
//                     single process over the whole batches, computed on rank 0; they changed
//                     from the start and are non-zero. --params-out writes them (rank 0), so runs
//                     on 1, 2 and 4 ranks can also be compared with each other.
//   save_on_root      success seen by every rank after return; a failure thrown on every rank
//   progress          gather_progress on the root
#include <peft/layer/adapted_linear.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/base/dense.hpp>
#include <peft/dist/mpi.hpp>
#include <peft/train/optimizer.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

// Counts MPI_Allreduce calls: this definition interposes on the library's (MPI's profiling
// interface), which stays reachable as PMPI_Allreduce.
namespace {
std::atomic<long> allreduce_calls{0};
}
extern "C" int MPI_Allreduce(const void* send, void* recv, int count, MPI_Datatype type, MPI_Op op, MPI_Comm comm) {
  ++allreduce_calls;
  return PMPI_Allreduce(send, recv, count, type, op, comm);
}

namespace {

namespace dist = peft::dist;
using peft::index;
using peft::matrix;
using peft::matrix_view;
using peft::parameter;

MPI_Comm comm = MPI_COMM_WORLD;
int me = 0, ranks = 1;
int failures = 0;

void fail(const char* file, int line, const std::string& what) {
  ++failures;
  std::fprintf(stderr, "rank %d: FAILED %s:%d %s\n", me, file, line, what.c_str());
}

#define CHECK(expr)                                          \
  do {                                                       \
    if (!(expr)) fail(__FILE__, __LINE__, #expr);            \
  } while (false)

#define CHECK_CLOSE(a, b, tol)                                                                 \
  do {                                                                                         \
    const double check_a_ = (a), check_b_ = (b);                                               \
    if (!(std::fabs(check_a_ - check_b_) <= (tol))) {                                          \
      fail(__FILE__, __LINE__,                                                                 \
           std::string(#a " == " #b ": ") + std::to_string(check_a_) + " vs " + std::to_string(check_b_)); \
    }                                                                                          \
  } while (false)

/// Runs fn, which must throw E on this rank whose message contains `text`.
template <class E, class Fn>
void check_throws(const char* file, int line, Fn fn, std::string_view text) {
  try {
    fn();
    fail(file, line, "no exception");
  } catch (const E& e) {
    if (std::string_view(e.what()).find(text) == std::string_view::npos) {
      fail(file, line, std::string("message '") + e.what() + "' lacks '" + std::string(text) + "'");
    }
  } catch (const std::exception& e) {
    fail(file, line, std::string("wrong exception type: ") + e.what());
  }
}
#define CHECK_THROWS(E, fn, text) check_throws<E>(__FILE__, __LINE__, fn, text)

// ---- fused buffer ------------------------------------------------------------------------------

template <class T>
void fused_buffer_packs_each_tensor_once() {
  const T sentinel = T(-777);
  matrix<T> a(2, 3), ga(2, 3), f(2, 2), gf(2, 2, sentinel), idx(1, 4), gidx(1, 4, sentinel), v(1, 5), gv(1, 5);
  matrix<T> s_store(3, 4), gs_store(3, 4, sentinel);  // a (3, 2) view with row stride 4
  const matrix_view<T> s = s_store.view().block(0, 1, 3, 2), gs = gs_store.view().block(0, 1, 3, 2);
  std::vector<parameter<T>> params = {
      {"a", a.view(), ga.view(), {2, 3}},
      {"f", f.view(), gf.view(), {2, 2}, false},             // frozen (its grad must stay untouched)
      {"idx", idx.view(), gidx.view(), {4}, true, false, true},  // integer: never reduced
      {"s", s, gs, {3, 2}},
      {"a_again", a.view(), ga.view(), {2, 3}, true, true},  // shared: the same tensor again
      {"v", v.view(), gv.view(), {5}},
  };
  // Rank r processed r + 1 examples (uneven); its gradients are the mean over them.
  auto local_grad = [](int r, index k) { return T(0.25) * T(k + 1) + T(r); };
  auto fill = [&](int r) {
    index k = 0;
    for (matrix<T>* g : {&ga, &gv}) {
      for (auto& x : g->storage()) x = local_grad(r, k++);
    }
    for (index i = 0; i < 3; ++i) {
      for (index j = 0; j < 2; ++j) gs(i, j) = local_grad(r, k++);
    }
  };
  fill(me);
  const long before = allreduce_calls.load();
  dist::gradient_allreducer reducer(comm, params);
  CHECK(allreduce_calls.load() - before == 1);  // the layout check
  CHECK(reducer.size() == 6 + 5 + 6);
  CHECK(reducer.tensors() == 3);
  CHECK(reducer.bytes() == (6 + 5 + 6 + 3) * sizeof(T));
  for (int step = 0; step < 3; ++step) {
    fill(me);
    const long calls = allreduce_calls.load();
    const auto result = reducer.allreduce(me + 1, 1.5 + me);
    CHECK(allreduce_calls.load() - calls == 1);  // ONE call per step
    // Expected: sum_r (r + 1) g_r / sum_r (r + 1), loss likewise.
    double n = 0, loss = 0;
    for (int r = 0; r < ranks; ++r) {
      n += r + 1;
      loss += (r + 1) * (1.5 + r);
    }
    CHECK(result.examples == static_cast<std::int64_t>(n));
    CHECK_CLOSE(result.mean_loss, loss / n, 1e-6);
    auto expected = [&](index k) {
      double sum = 0;
      for (int r = 0; r < ranks; ++r) sum += (r + 1) * static_cast<double>(local_grad(r, k));
      return sum / n;
    };
    const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
    index k = 0;
    for (T x : ga.storage()) CHECK_CLOSE(x, expected(k++), tol);
    for (T x : gv.storage()) CHECK_CLOSE(x, expected(k++), tol);
    for (index i = 0; i < 3; ++i) {
      for (index j = 0; j < 2; ++j) CHECK_CLOSE(gs(i, j), expected(k++), tol);
    }
    for (index i = 0; i < 3; ++i) {
      CHECK(gs_store(i, 0) == sentinel);  // outside the strided view
      CHECK(gs_store(i, 3) == sentinel);
    }
    for (T x : gf.storage()) CHECK(x == sentinel);
    for (T x : gidx.storage()) CHECK(x == sentinel);
  }
  // The free function: exactly one call, same result.
  fill(me);
  const long calls = allreduce_calls.load();
  const auto r2 = dist::allreduce_gradients(comm, params, me + 1, 1.5 + me);
  CHECK(allreduce_calls.load() - calls == 1);
  CHECK(r2.examples == static_cast<std::int64_t>(ranks * (ranks + 1) / 2));
}

// ---- uneven weighting --------------------------------------------------------------------------

void uneven_split_weighting() {
  // Example e (of 10 in the global batch) has loss e and gradient (e, 2e). The shares are
  // deliberately uneven: ranks 0..P-2 split the batch (rank 0 taking 2 more), the last rank of
  // P >= 2 gets none (P = 2: 10, 0; P = 4: 4, 3, 3, 0).
  constexpr int total = 10;
  auto first_of = [&](int r) {
    if (ranks == 1) return r == 0 ? 0 : total;
    // ranks 0..P-2 split the batch unevenly (rank 0 takes the most), the last one takes none.
    const int workers = ranks - 1;
    if (r >= workers) return total;
    return r == 0 ? 0 : 2 + (total - 2) * r / workers;
  };
  const int lo = first_of(me), hi = me + 1 < ranks ? first_of(me + 1) : total;
  const int n = hi - lo;
  for (const auto reduction : {dist::loss_reduction::mean, dist::loss_reduction::sum}) {
    matrix<double> w(1, 2), g(1, 2);
    std::vector<parameter<double>> params = {{"w", w.view(), g.view(), {2}}};
    double loss = 0;
    if (n == 0) {
      g(0, 0) = g(0, 1) = std::numeric_limits<double>::quiet_NaN();  // must not be read
    } else {
      for (int e = lo; e < hi; ++e) {
        loss += e;
        g(0, 0) += e;
        g(0, 1) += 2.0 * e;
      }
      if (reduction == dist::loss_reduction::mean) {
        loss /= n;
        g(0, 0) /= n;
        g(0, 1) /= n;
      }
    }
    dist::gradient_allreducer reducer(comm, params, {.reduction = reduction});
    const auto result = reducer.allreduce(n, loss);
    CHECK(result.examples == total);
    CHECK_CLOSE(result.mean_loss, 4.5, 1e-12);  // mean of 0..9
    CHECK_CLOSE(g(0, 0), 4.5, 1e-12);
    CHECK_CLOSE(g(0, 1), 9.0, 1e-12);
  }
}

// ---- errors reach every rank -------------------------------------------------------------------

void errors_reach_every_rank() {
  matrix<float> w(2, 2), g(2, 2), extra(1, 3), gextra(1, 3);
  std::vector<parameter<float>> params = {{"w", w.view(), g.view(), {2, 2}}};
  dist::gradient_allreducer reducer(comm, params);
  CHECK_THROWS(peft::error, [&] { reducer.allreduce(0, 0.0); }, "[dist::allreduce_gradients] the global batch is empty");
  // A negative count on the last rank: that rank names itself, the others learn of it.
  const bool bad = me == ranks - 1;
  CHECK_THROWS(peft::error, [&] { reducer.allreduce(bad ? -3 : 4, 1.0); },
               bad ? "passed -3 examples" : "another rank failed in this step");
  // Still usable afterwards: the failed step was a complete collective.
  g.fill(1.0f);
  CHECK(reducer.allreduce(2, 1.0).examples == 2 * ranks);
  CHECK_CLOSE(g(1, 1), 1.0, 1e-7);
  // A list differing on one rank: every rank throws at construction.
  auto different = params;
  if (me == ranks - 1 && ranks > 1) different.push_back({"extra", extra.view(), gextra.view(), {3}});
  if (ranks > 1) {
    CHECK_THROWS(peft::shape_error, [&] { dist::gradient_allreducer<float> r(comm, different); },
                 "ranks disagree on the adapter tensors");
  }
  // A changed list at rebind on one rank: every rank throws in that step.
  if (ranks > 1) {
    CHECK_THROWS(peft::error, [&] { reducer.allreduce(different, 1, 1.0); },
                 me == ranks - 1 ? "differs from the one given at construction" : "another rank failed");
  }
  // Roots outside the communicator.
  CHECK_THROWS(peft::error, [&] { dist::broadcast_parameters(comm, params, ranks); }, "[dist::broadcast_parameters] root");
  // MPI error codes become mpi_error naming the function.
  try {
    dist::detail::check(MPI_ERR_TRUNCATE, "dist::allreduce_gradients");
    CHECK(false);
  } catch (const dist::mpi_error& e) {
    CHECK(std::string_view(e.what()).starts_with("[dist::allreduce_gradients] "));
    CHECK(std::string_view(e.what()).find("MPI error code") != std::string_view::npos);
    CHECK(e.code() == MPI_ERR_TRUNCATE);
  }
  // Shared entries must share gradient memory.
  matrix<float> other(2, 2);
  std::vector<parameter<float>> broken = {{"w", w.view(), g.view(), {2, 2}},
                                          {"w2", w.view(), other.view(), {2, 2}, true, true}};
  CHECK_THROWS(peft::shape_error, [&] { dist::gradient_allreducer<float> r(comm, broken, {.check_layout = false}); },
               "shares its value with 'w' but not its gradient");
}

// ---- broadcast and checksums -------------------------------------------------------------------

void broadcast_and_checksums() {
  matrix<double> a(3, 4), ga(3, 4), frozen(2, 2);
  for (index k = 0; k < a.size(); ++k) a.data()[k] = 100.0 * me + static_cast<double>(k);
  for (index k = 0; k < frozen.size(); ++k) frozen.data()[k] = -1.0 - me;
  std::vector<parameter<double>> params = {{"a", a.view(), ga.view(), {3, 4}},
                                           {"frozen", frozen.view(), {}, {2, 2}, false}};
  CHECK(dist::parameters_consistent(comm, params) == (ranks == 1));
  const int root = ranks - 1;
  dist::broadcast_parameters(comm, params, root);  // trainable only
  for (index k = 0; k < a.size(); ++k) CHECK(a.data()[k] == 100.0 * root + static_cast<double>(k));
  CHECK(frozen(0, 0) == -1.0 - me);  // not sent
  CHECK(dist::parameters_consistent(comm, params, dist::tensor_set::trainable));
  CHECK(dist::parameters_consistent(comm, params) == (ranks == 1));
  dist::broadcast_parameters(comm, params, 0, dist::tensor_set::all);
  CHECK(frozen(1, 1) == -1.0);
  CHECK(dist::parameters_consistent(comm, params));
  // One bit of difference on one rank is seen by all.
  if (me == ranks - 1) a(2, 3) = std::nextafter(a(2, 3), 1e9);
  CHECK(dist::parameters_consistent(comm, params) == (ranks == 1));
  CHECK(dist::checksum(params) != dist::checksum(params, dist::tensor_set::trainable));
}

// ---- training equals one process ---------------------------------------------------------------

using layer_t = peft::adapted_linear<peft::dense<double>, peft::lora<double>>;

layer_t make_layer(index in, index out, index r, std::uint64_t adapter_seed) {
  peft::rng gen(1000 + static_cast<std::uint64_t>(in * 31 + out));  // the frozen base: same everywhere
  matrix<double> w(out, in);
  for (auto& v : w.storage()) v = gen.uniform(-0.5, 0.5);
  layer_t layer{peft::dense<double>(std::move(w))};
  layer.add_adapter("default", peft::lora<double>(in, out, {.rank = r, .alpha = 4.0, .bias = true,
                                                            .init = peft::lora_init::random, .seed = adapter_seed}));
  return layer;
}

/// 8 -> 6 -> tanh -> 4, LoRA on both layers; loss 0.5 |y - t|^2 per example.
struct tiny_net {
  layer_t l1, l2;
  explicit tiny_net(std::uint64_t seed) : l1(make_layer(8, 6, 3, seed)), l2(make_layer(6, 4, 2, seed + 1)) {}
  std::vector<parameter<double>> parameters() {
    auto p = l1.parameters(), q = l2.parameters();
    p.insert(p.end(), q.begin(), q.end());
    return p;
  }
  void zero_grad() {
    l1.zero_grad();
    l2.zero_grad();
  }
  /// The mean loss over the rows of x; accumulates its gradient.
  double mean_loss_and_grad(matrix_view<const double> x, matrix_view<const double> t) {
    const index n = x.rows();
    matrix<double> z(n, 6), h(n, 6), y(n, 4), dy(n, 4), dh(n, 6), dx(n, 8);
    l1.forward(x, z);
    for (index k = 0; k < z.size(); ++k) h.data()[k] = std::tanh(z.data()[k]);
    l2.forward(h.view(), y);
    double loss = 0;
    for (index i = 0; i < n; ++i) {
      for (index j = 0; j < 4; ++j) {
        const double d = y(i, j) - t(i, j);
        loss += 0.5 * d * d;
        dy(i, j) = d / static_cast<double>(n);
      }
    }
    l2.backward(h.view(), dy.view(), dh);
    for (index k = 0; k < dh.size(); ++k) dh.data()[k] *= 1.0 - h.data()[k] * h.data()[k];
    l1.backward(x, dh.view(), dx);
    return loss / static_cast<double>(n);
  }
};

std::vector<double> flatten(const std::vector<parameter<double>>& params) {
  std::vector<double> out;
  for (const auto& p : params) {
    for (index i = 0; i < p.value.rows(); ++i) out.insert(out.end(), p.value.row(i), p.value.row(i) + p.value.cols());
  }
  return out;
}

void training_matches_one_process(const std::string& params_out) {
  constexpr index rows = 40;
  peft::rng data_gen(7);
  matrix<double> x(rows, 8), t(rows, 4);
  for (auto& v : x.storage()) v = data_gen.uniform(-1.0, 1.0);
  for (index i = 0; i < rows; ++i) {
    for (index j = 0; j < 4; ++j) t(i, j) = std::sin(x(i, j) + 2.0 * x(i, j + 4)) + 0.1 * data_gen.uniform(-1.0, 1.0);
  }
  const index batches[][2] = {{0, 12}, {12, 12}, {24, 12}, {36, 4}, {0, 3}, {3, 9}, {12, 1}};  // (first, count)

  // Distributed: every rank starts from different adapters; rank 0's are broadcast.
  tiny_net net(50 + static_cast<std::uint64_t>(me));
  dist::broadcast_parameters(comm, net.parameters());
  const std::vector<double> start = flatten(net.parameters());
  dist::gradient_allreducer<double> reducer(comm, net.parameters());
  peft::train::adamw<double> opt(net.parameters(), {.lr = 0.05, .weight_decay = 0.01});
  std::vector<double> losses;
  for (const auto& [first, count] : batches) {
    const index lo = first + count * me / ranks, hi = first + count * (me + 1) / ranks;  // may be empty
    net.zero_grad();
    double loss = 0;
    if (hi > lo) loss = net.mean_loss_and_grad(x.view().row_block(lo, hi - lo), t.view().row_block(lo, hi - lo));
    const auto result = reducer.allreduce(hi - lo, loss);
    CHECK(result.examples == count);
    losses.push_back(result.mean_loss);
    opt.step(net.parameters());
  }
  CHECK(dist::parameters_consistent(comm, net.parameters()));
  const std::vector<double> end = flatten(net.parameters());

  if (me == 0) {
    // One process, whole batches, same initial adapters (rank 0's seed).
    tiny_net ref(50);
    peft::train::adamw<double> ref_opt(ref.parameters(), {.lr = 0.05, .weight_decay = 0.01});
    double max_diff = 0, max_loss_diff = 0, moved = 0, largest = 0;
    std::size_t b = 0;
    for (const auto& [first, count] : batches) {
      ref.zero_grad();
      const double loss = ref.mean_loss_and_grad(x.view().row_block(first, count), t.view().row_block(first, count));
      max_loss_diff = std::max(max_loss_diff, std::fabs(loss - losses[b++]));
      ref_opt.step(ref.parameters());
    }
    const std::vector<double> expected = flatten(ref.parameters());
    for (std::size_t k = 0; k < end.size() && k < expected.size(); ++k) {
      max_diff = std::max(max_diff, std::fabs(end[k] - expected[k]));
      moved = std::max(moved, std::fabs(end[k] - start[k]));
      largest = std::max(largest, std::fabs(end[k]));
    }
    std::printf("training on %d rank(s): %zu adapter values, largest difference from one process %.3g "
                "(losses %.3g), largest change from the start %.3g\n",
                ranks, end.size(), max_diff, max_loss_diff, moved);
    CHECK(end.size() == expected.size());
    CHECK(end.size() == static_cast<std::size_t>(3 * (8 + 6) + 6 + 2 * (6 + 4) + 4));
    CHECK(max_diff <= 1e-6);
    CHECK(max_loss_diff <= 1e-9);
    CHECK(moved > 1e-2);   // training did something
    CHECK(largest > 1e-2);  // and the values are not all zero
    if (!params_out.empty()) {
      std::ofstream out(params_out);
      for (double v : end) {
        char line[64];
        std::snprintf(line, sizeof line, "value %.17g\n", v);
        out << line;
      }
      CHECK(static_cast<bool>(out));
    }
  }
}

// ---- save_on_root and progress -----------------------------------------------------------------

void save_on_root_reports_to_every_rank() {
  namespace fs = std::filesystem;
  long long job = me == 0 ? static_cast<long long>(getpid()) : 0;  // a path every rank agrees on
  MPI_Bcast(&job, 1, MPI_LONG_LONG, 0, comm);
  const fs::path dir = fs::temp_directory_path() / ("peft_mpi_test_" + std::to_string(job));
  const fs::path file = dir / "saved.txt";
  dist::save_on_root(comm, [&] {
    fs::create_directories(dir);
    std::ofstream(dir / "saved.tmp") << "rank " << me << '\n';
    fs::rename(dir / "saved.tmp", file);
  });
  CHECK(fs::exists(file));  // every rank returns after the root has saved
  std::string text;
  std::getline(std::ifstream(file), text);
  CHECK(text == "rank 0");
  // A failed save: every rank throws the same kind, naming the root and the message.
  CHECK_THROWS(peft::io_error, [&] {
    dist::save_on_root(comm, [&] { peft::detail::raise<peft::io_error>("save_peft_checkpoint", "disk full"); }, ranks - 1);
  }, "[dist::save_on_root] rank " + std::to_string(ranks - 1) + ": [save_peft_checkpoint] disk full");
  CHECK_THROWS(peft::error, [&] { dist::save_on_root(comm, [] { throw std::runtime_error("plain"); }); },
               "rank 0: plain");
  MPI_Barrier(comm);
  if (me == 0) fs::remove_all(dir);
}

void progress_reaches_the_root() {
  const auto all = dist::gather_progress(comm, {.examples = me + 1, .loss_sum = 0.5 * me, .seconds = 1.0 + me}, 0);
  if (me == 0) {
    CHECK(all.size() == static_cast<std::size_t>(ranks));
    for (int r = 0; r < ranks && r < static_cast<int>(all.size()); ++r) {
      CHECK(all[std::size_t(r)].examples == r + 1);
      CHECK(all[std::size_t(r)].loss_sum == 0.5 * r);
      CHECK(all[std::size_t(r)].seconds == 1.0 + r);
    }
    const std::string table = dist::format_progress(all);
    CHECK(static_cast<int>(std::count(table.begin(), table.end(), '\n')) == ranks + 2);
  } else {
    CHECK(all.empty());
  }
}

}  // namespace

int main(int argc, char** argv) {
  dist::environment env(argc, argv);
  me = env.rank();
  ranks = env.size();
  std::string params_out;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string_view(argv[i]) == "--params-out") params_out = argv[i + 1];
  }
  return dist::run_or_abort(comm, [&] {
    fused_buffer_packs_each_tensor_once<float>();
    fused_buffer_packs_each_tensor_once<double>();
    uneven_split_weighting();
    errors_reach_every_rank();
    broadcast_and_checksums();
    training_matches_one_process(params_out);
    save_on_root_reports_to_every_rank();
    progress_reaches_the_root();
    int total = failures;
    MPI_Allreduce(MPI_IN_PLACE, &total, 1, MPI_INT, MPI_SUM, comm);
    if (me == 0) std::printf("%s: %d failed check(s) over %d rank(s)\n", total == 0 ? "PASSED" : "FAILED", total, ranks);
    return total == 0 ? 0 : 1;
  });
}
