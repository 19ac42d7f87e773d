// serve::adapter_registry soak: for a bounded time, reader threads serve random mixed batches
// (rows asking for different adapters, for the base alone, at different request scales) over
// three layers while writer threads load and unload adapters from PEFT checkpoint directories,
// fuse and unfuse adapters into the base and rescale one of them. Every row of every answer must
// equal that row's single-adapter forward, computed serially beforehand over a private copy of
// the base. Lasts PEFT_SOAK_SECONDS (default 5); built alone under ThreadSanitizer and
// AddressSanitizer as peft_thread_tests (tests/CMakeLists.txt: thread_soak).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/adapters/any_adapter.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/error.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/serve/adapter_registry.hpp"
#include "support/test_support.hpp"
#include "support/traits_dora.hpp"
#include "support/traits_loha.hpp"
#include "support/traits_lokr.hpp"
#include "support/traits_lora.hpp"
#include "support/traits_shira.hpp"
#include "support/traits_vera.hpp"

namespace test_soak {

using ix = peft::index;
using peft_test::random_matrix;
using clock_type = std::chrono::steady_clock;

namespace {

struct layer_spec {
  std::string weight;
  ix in, out;
  bool bias;  // v_proj has none: fusing a LoRA with a bias gives it one
};
const std::vector<layer_spec> layers = {{"model.layers.0.self_attn.q_proj.weight", 16, 24, true},
                                        {"model.layers.0.self_attn.v_proj.weight", 16, 12, false},
                                        {"model.layers.0.mlp.down_proj.weight", 24, 16, true}};
constexpr ix pool = 32;      // the input rows batches draw from, per layer
constexpr ix max_rows = 12;  // rows per batch: 1..max_rows
// Fused mode stores W0 + f dW in float and subtracts f dW again: each switch rounds W0, and the
// roundings accumulate (capped by rounding_budget: ~1e-5 on the outputs here). Any real fault (a
// wrong adapter, scale or version, a term missing or applied twice) is off by O(0.01) or more.
constexpr double tolerance = 2e-4;  // on |y - ref| / (1 + |ref|)
constexpr long rounding_budget = 1000;  // roundings of W0 by fuse/unfuse (see the fuser)
const std::vector<double> request_scales = {1.0, 1.0, 0.5, -1.0, 2.0, 0.0};
const std::vector<double> vera_scales = {0.5, 1.0, 2.0};  // the fuser rescales "vera" among these

double soak_seconds() {
  if (const char* s = std::getenv("PEFT_SOAK_SECONDS")) {
    const double v = std::strtod(s, nullptr);
    if (std::isfinite(v) && v > 0.0) return v;
  }
  return 5.0;
}

/// A random adapter of method A; LoKr with full factors (the form PEFT saves at these sizes).
template <class A>
A make_random(ix in, ix out, peft::rng& g) {
  if constexpr (std::is_same_v<A, peft::lokr<float>>) {
    return A(in, out, {.rank = 8, .alpha = 3.0, .init = peft::lokr_init::random, .seed = g.next()});
  } else {
    return peft_test::adapter_traits<A>::make_random(in, out, g);
  }
}

/// A checkpoint of method A on every layer (or the first only).
template <class A>
peft::io::peft_checkpoint<float> checkpoint_of(peft::rng& g, bool first_only = false) {
  peft::io::peft_checkpoint<float> ck;
  for (const auto& l : layers) {
    ck.modules.push_back({l.weight.substr(0, l.weight.size() - 7), l.weight, peft::any_adapter<float>(make_random<A>(l.in, l.out, g))});
    if (first_only) break;
  }
  return ck;
}

/// One adapter as the readers expect it.
struct expected_adapter {
  std::string name;
  std::vector<double> scales;               // the registry scales it may have (one per batch)
  bool may_be_absent = false;               // unloaded and loaded again while serving
  bool reads_base_output = false;           // refused while another adapter is fused
  std::vector<peft::matrix<double>> term;   // per layer (pool, out): forward - base; 0 off its layers
};

/// Counts of one thread (merged after the join).
struct tally {
  long rows = 0, batches = 0, rejected = 0, wrong = 0;  // rows served and rejected, batches served
  double worst = 0.0;                       // max |y - ref| / (1 + |ref|) over the rows that matched
  std::vector<long> rows_of;                // rows served per adapter (index into the table)
  std::string first_wrong;
  void note_wrong(const std::string& what) {
    if (wrong++ == 0) first_wrong = what;
  }
};

}  // namespace

TEST_CASE("adapter_registry soak: mixed batches served while adapters load, unload, fuse and rescale",
          "[serve][threads][soak]") {
  const double seconds = soak_seconds();
  peft::rng g(61);

  // ---- the model: three dense layers; the registry's bases and a private copy for references.
  std::map<std::string, peft::dense<float>> bases, originals;
  std::vector<peft::matrix<float>> inputs;  // per layer (pool, in)
  for (const auto& l : layers) {
    const auto w = random_matrix<float>(l.out, l.in, g);
    const auto b = peft_test::random_vector<float>(l.out, g);
    bases.emplace(l.weight, peft::dense<float>::from(w.view(), l.bias ? b.data() : nullptr));
    originals.emplace(l.weight, peft::dense<float>::from(w.view(), l.bias ? b.data() : nullptr));
    inputs.push_back(random_matrix<float>(pool, l.in, g));
    REQUIRE(peft_test::nontrivial(inputs.back()));
  }
  peft::serve::adapter_registry<peft::dense<float>> reg(std::move(bases));

  // ---- the adapters: six methods; DoRA and the two swapped ones go through PEFT checkpoint
  // directories on disk, the rest are added from memory.
  const auto dir = std::filesystem::temp_directory_path() /
                   ("peft_soak_" + std::to_string(std::random_device{}()) + "_" +
                    std::to_string(clock_type::now().time_since_epoch().count()));
  std::filesystem::remove_all(dir);
  struct source {
    std::string name;
    peft::io::peft_checkpoint<float> ck;
    bool on_disk, swapped, reads_base_output;
  };
  std::vector<source> sources;
  sources.push_back({"lora", checkpoint_of<peft::lora<float>>(g), false, false, false});
  sources.push_back({"shira", checkpoint_of<peft::shira<float>>(g), false, false, false});
  sources.push_back({"vera", checkpoint_of<peft::vera<float>>(g), false, false, false});
  sources.push_back({"loha_q", checkpoint_of<peft::loha<float>>(g, true), false, false, false});
  sources.push_back({"dora", checkpoint_of<peft::dora<float>>(g), true, false, true});
  sources.push_back({"swap_lora", checkpoint_of<peft::lora<float>>(g), true, true, false});
  sources.push_back({"swap_lokr", checkpoint_of<peft::lokr<float>>(g), true, true, false});

  std::vector<expected_adapter> table;
  for (auto& s : sources) {  // (save_peft_checkpoint completes the checkpoint's config)
    expected_adapter e{s.name, s.name == "vera" ? vera_scales : std::vector<double>{1.0}, s.swapped, s.reads_base_output, {}};
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const auto& base = originals.at(layers[l].weight);
      peft::matrix<double> term(pool, layers[l].out, 0.0);
      if (const auto* mod = s.ck.find(layers[l].weight)) {
        peft::matrix<float> h(pool, layers[l].out), ya(pool, layers[l].out);
        base.matmul(inputs[l].view(), h.view());
        peft::any_adapter<float>::cache_type c;
        mod->adapter.forward(base, inputs[l].view(), ya.view(), c);
        for (ix p = 0; p < pool; ++p)
          for (ix j = 0; j < layers[l].out; ++j) term(p, j) = double(ya(p, j)) - double(h(p, j));
        INFO(s.name << " on " << layers[l].weight);
        REQUIRE(peft_test::max_abs(term) > 0.05);  // its rows are told apart from the base's
      }
      e.term.push_back(std::move(term));
    }
    table.push_back(std::move(e));
    if (s.on_disk) peft::io::save_peft_checkpoint(dir / s.name, s.ck);
  }
  std::vector<peft::matrix<double>> base_out;  // per layer (pool, out)
  for (std::size_t l = 0; l < layers.size(); ++l) {
    peft::matrix<float> h(pool, layers[l].out);
    originals.at(layers[l].weight).matmul(inputs[l].view(), h.view());
    base_out.push_back(peft_test::to_double(h));
    REQUIRE(peft_test::nontrivial(h));
  }
  for (const auto& s : sources) {
    if (s.swapped) continue;  // the loader thread brings those in
    if (s.on_disk) {
      reg.load(s.name, dir / s.name);
    } else {
      reg.add(s.name, s.ck);
    }
  }
  const std::size_t n_adapters = table.size();

  // ---- one batch: its requests, their pool rows, the answers; checked against the table.
  struct batch_rows {
    std::vector<peft::serve::request> requests;
    std::vector<int> who;  // index into table, -1 for the base alone
    std::vector<ix> pick;  // pool row
  };
  auto check = [&](const batch_rows& b, const std::vector<peft::matrix<float>>& ys, tally& t) {
    const ix m = static_cast<ix>(b.requests.size());
    std::vector<unsigned> versions(n_adapters, ~0u);  // the registry scales every row so far agrees with
    for (std::size_t l = 0; l < layers.size(); ++l) {
      for (ix i = 0; i < m; ++i) {
        const auto k = static_cast<std::size_t>(i);
        const ix p = b.pick[k];
        const int a = b.who[k];
        const std::size_t n_scales = a < 0 ? 1 : table[static_cast<std::size_t>(a)].scales.size();
        unsigned fits = 0;
        double best = INFINITY;
        for (std::size_t c = 0; c < n_scales; ++c) {
          double worst = 0.0;
          for (ix j = 0; j < layers[l].out; ++j) {
            double ref = base_out[l](p, j);
            if (a >= 0) {
              const auto& e = table[static_cast<std::size_t>(a)];
              ref += b.requests[k].scale * e.scales[c] * e.term[l](p, j);
            }
            worst = std::max(worst, std::abs(double(ys[l](i, j)) - ref) / (1.0 + std::abs(ref)));
          }
          if (worst <= tolerance) fits |= 1u << c;
          best = std::min(best, worst);
        }
        if (fits == 0) {
          t.note_wrong("row " + std::to_string(i) + " (" + (a < 0 ? std::string("base") : table[static_cast<std::size_t>(a)].name) +
                       ", request scale " + std::to_string(b.requests[k].scale) + ") of layer " + layers[l].weight +
                       " is off by " + std::to_string(best));
          continue;
        }
        t.worst = std::max(t.worst, best);
        if (a >= 0) versions[static_cast<std::size_t>(a)] &= fits;
      }
    }
    for (std::size_t a = 0; a < n_adapters; ++a) {
      if (versions[a] == 0) t.note_wrong("a batch saw two scales of '" + table[a].name + "' across its rows or layers");
    }
    t.rows += m;
    ++t.batches;
    for (int a : b.who) {
      if (a >= 0) ++t.rows_of[static_cast<std::size_t>(a)];
    }
  };
  auto draw = [&](peft::rng& r, batch_rows& b) {
    const ix m = 1 + static_cast<ix>(r.below(static_cast<std::uint64_t>(max_rows)));
    b.requests.clear(), b.who.clear(), b.pick.clear();
    for (ix i = 0; i < m; ++i) {
      const int a = static_cast<int>(r.below(n_adapters + 2)) - 2;  // base alone twice as often
      const int who = std::max(a, -1);
      b.who.push_back(who);
      b.pick.push_back(static_cast<ix>(r.below(static_cast<std::uint64_t>(pool))));
      b.requests.push_back({who < 0 ? std::string() : table[static_cast<std::size_t>(who)].name,
                            who < 0 ? 1.0 : request_scales[r.below(request_scales.size())]});
    }
  };
  // Serves b: -1, or the adapter the registry refused, for a documented reason (then nothing
  // is served; any other failure counts as wrong and gives -2).
  constexpr int served = -1, failed = -2;
  auto serve = [&](const batch_rows& b, std::vector<peft::matrix<float>>& ys, tally& t) -> int {
    const ix m = static_cast<ix>(b.requests.size());
    // The adapter of b the message names, if it has the property.
    auto named = [&](auto&& property, const std::string& what) -> int {
      for (int a : b.who) {
        if (a >= 0 && property(table[static_cast<std::size_t>(a)]) &&
            what.find("'" + table[static_cast<std::size_t>(a)].name + "'") != std::string::npos)
          return a;
      }
      return failed;
    };
    int refused = failed;
    try {
      auto batch = reg.begin(b.requests);
      for (std::size_t l = 0; l < layers.size(); ++l) {
        ys[l] = peft::matrix<float>(m, layers[l].out, NAN);
        peft::matrix<float> x(m, layers[l].in);
        for (ix i = 0; i < m; ++i)
          for (ix j = 0; j < layers[l].in; ++j) x(i, j) = inputs[l](b.pick[static_cast<std::size_t>(i)], j);
        batch.forward(layers[l].weight, x.view(), ys[l].view());
      }
      return served;
    } catch (const peft::unsupported_error& e) {
      // DoRA reads the base output: refused while another adapter is fused into the base.
      const std::string what = e.what();
      if (what.find("reads the base output") != std::string::npos)
        refused = named([](const expected_adapter& x) { return x.reads_base_output; }, what);
      if (refused == failed) t.note_wrong(std::string("unexpected refusal: ") + e.what());
    } catch (const peft::error& e) {
      // An adapter the loader has unloaded.
      const std::string what = e.what();
      if (what.find("no adapter named") != std::string::npos)
        refused = named([](const expected_adapter& x) { return x.may_be_absent; }, what);
      if (refused == failed) t.note_wrong(std::string("unexpected error: ") + e.what());
    } catch (const std::exception& e) {
      t.note_wrong(std::string("unexpected exception: ") + e.what());
    }
    return refused;
  };
  // As a server would: rows of a refused adapter are rejected, the rest of the batch is served.
  auto serve_and_check = [&](batch_rows& b, std::vector<peft::matrix<float>>& ys, tally& t) {
    while (!b.requests.empty()) {
      const int refused = serve(b, ys, t);
      if (refused == served) {
        check(b, ys, t);  // after the batch has closed: fuse() waits for open batches
        return;
      }
      if (refused == failed) return;
      batch_rows rest;
      for (std::size_t k = 0; k < b.who.size(); ++k) {
        if (b.who[k] == refused) {
          ++t.rejected;
          continue;
        }
        rest.requests.push_back(b.requests[k]), rest.who.push_back(b.who[k]), rest.pick.push_back(b.pick[k]);
      }
      b = std::move(rest);
    }
  };

  // ---- the soak.
  const auto start = clock_type::now();
  const auto deadline = start + std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(seconds));
  constexpr int n_readers = 3;
  std::vector<tally> tallies(n_readers + 2);
  for (auto& t : tallies) t.rows_of.assign(n_adapters, 0);
  std::atomic<long> loads{0}, unloads{0}, unload_refused{0}, fuses{0}, unfuses{0}, fuse_refused{0}, rescales{0};

  // The registry's queries, as a monitoring thread would ask them while serving and switching.
  std::size_t base_bytes = 0;
  for (const auto& l : layers) base_bytes += static_cast<std::size_t>(l.out * l.in + (l.bias ? l.out : 0)) * sizeof(float);
  auto queries = [&](tally& t) {
    const auto names = reg.names();
    const auto mem = reg.memory();
    const auto fused = reg.fused();
    const double vera = reg.scale("vera");
    const std::size_t fixed = n_adapters - 2;  // all but the two swapped ones stay loaded
    if (names.size() < fixed || names.size() > n_adapters || mem.adapters.size() < fixed ||
        mem.adapters.size() > n_adapters || mem.base_bytes < base_bytes || mem.adapter_bytes == 0 ||
        !(fused.empty() || fused == "lora" || fused == "shira" || fused == "vera" || fused == "swap_lora") ||
        std::find(vera_scales.begin(), vera_scales.end(), vera) == vera_scales.end() || !reg.contains("dora") ||
        reg.method("loha_q") != "loha" || !reg.low_rank("lora") || reg.low_rank("dora"))
      t.note_wrong("the queries see " + std::to_string(names.size()) + " adapters, " + std::to_string(mem.base_bytes) +
                   " base bytes, '" + fused + "' fused, vera's scale " + std::to_string(vera));
  };
  auto reader = [&](int id) {
    peft::rng r(1000 + static_cast<std::uint64_t>(id));
    tally& t = tallies[static_cast<std::size_t>(id)];
    batch_rows b;
    std::vector<peft::matrix<float>> ys(layers.size());
    for (long n = 0; clock_type::now() < deadline; ++n) {
      draw(r, b);
      serve_and_check(b, ys, t);
      if (n % 4 == id) queries(t);
    }
  };
  // Loads and unloads the swapped adapters from their directories; an unload of the one fused
  // is refused (counted, not wrong).
  auto loader = [&] {
    peft::rng r(71);
    tally& t = tallies[n_readers];
    std::vector<std::string> swapped;
    for (const auto& e : table)
      if (e.may_be_absent) swapped.push_back(e.name);
    std::vector<bool> loaded(swapped.size(), false);
    while (clock_type::now() < deadline) {
      const auto k = static_cast<std::size_t>(r.below(swapped.size()));
      try {
        if (loaded[k]) {
          reg.unload(swapped[k]);
          loaded[k] = false;
          ++unloads;
        } else {
          reg.load(swapped[k], dir / swapped[k]);
          loaded[k] = true;
          ++loads;
        }
      } catch (const peft::error& e) {
        if (loaded[k] && std::string(e.what()).find("unfuse() it first") != std::string::npos) {
          ++unload_refused;
        } else {
          t.note_wrong(std::string("loader: ") + e.what());
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
  };
  // Fuses one adapter after another (LoRA, SHiRA, VeRA and a swapped LoRA, which may be
  // absent), unfuses, and rescales VeRA among vera_scales (fused or not). Putting a low-rank
  // adapter in or taking it out rounds W0 once (docs/serving.md), and those roundings add up:
  // W0 drifts about linearly with the switches (~4e-8 per switch of these adapters). After
  // rounding_budget of them only SHiRA (restored bit for bit) is switched, so that `tolerance`
  // holds however long the soak runs.
  long roundings = 0;  // of W0, by the fuser (read after the join)
  auto fuser = [&] {
    peft::rng r(72);
    tally& t = tallies[n_readers + 1];
    const std::vector<std::string> fusable = {"lora", "shira", "vera", "swap_lora"};
    auto rounds = [](const std::string& n) { return n.empty() || n == "shira" ? 0L : 1L; };
    std::string fused;  // only this thread fuses
    while (clock_type::now() < deadline) {
      const auto k = r.below(10);
      std::string name;
      try {
        if (k < 4) {
          if (reg.unfuse().unfuse_seconds > 0.0) ++unfuses;
          roundings += rounds(fused);
          fused.clear();
        } else if (k < 8) {
          name = roundings < rounding_budget ? fusable[k - 4] : "shira";
          if (reg.fuse(name).fuse_seconds > 0.0) {
            ++fuses;
            roundings += rounds(fused) + rounds(name);
          }
          fused = name;
        } else {
          reg.set_scale("vera", vera_scales[r.below(vera_scales.size())]);
          ++rescales;
        }
      } catch (const peft::error& e) {
        if (name == "swap_lora" && std::string(e.what()).find("no adapter named 'swap_lora'") != std::string::npos) {
          ++fuse_refused;
        } else {
          t.note_wrong(std::string("fuser: ") + e.what());
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (reg.unfuse().unfuse_seconds > 0.0) ++unfuses;
    roundings += rounds(fused);
  };
  {
    std::vector<std::thread> threads;
    for (int id = 0; id < n_readers; ++id) threads.emplace_back(reader, id);
    threads.emplace_back(loader);
    threads.emplace_back(fuser);
    for (auto& th : threads) th.join();
  }
  const double elapsed = std::chrono::duration<double>(clock_type::now() - start).count();

  // ---- quiet again: every adapter once more, and how far switching has moved W0.
  tally total;
  total.rows_of.assign(n_adapters, 0);
  {
    for (const auto& e : table)
      if (e.may_be_absent && !reg.contains(e.name)) reg.load(e.name, dir / e.name);
    reg.set_scale("vera", 1.0);
    batch_rows b;
    for (std::size_t a = 0; a < n_adapters; ++a) {
      b.requests.push_back({table[a].name, 1.0});
      b.who.push_back(static_cast<int>(a));
      b.pick.push_back(static_cast<ix>(a));
    }
    b.requests.push_back({"", 1.0}), b.who.push_back(-1), b.pick.push_back(0);
    std::vector<peft::matrix<float>> ys(layers.size());
    tally quiet;  // not counted in the soak's numbers
    quiet.rows_of.assign(n_adapters, 0);
    serve_and_check(b, ys, quiet);
    INFO("quiet: " << quiet.first_wrong);
    CHECK(quiet.wrong == 0);
    CHECK(quiet.rejected == 0);
    CHECK(quiet.batches == 1);
  }
  double drift = 0.0;
  for (const auto& l : layers) {
    const auto now = reg.base(l.weight).weight();
    const auto was = originals.at(l.weight).weight();
    for (ix i = 0; i < l.out; ++i)
      for (ix j = 0; j < l.in; ++j) drift = std::max(drift, std::abs(double(now(i, j)) - double(was(i, j))));
  }
  std::filesystem::remove_all(dir);

  for (const auto& t : tallies) {
    total.rows += t.rows, total.batches += t.batches, total.rejected += t.rejected;
    if (total.wrong == 0 && t.wrong > 0) total.first_wrong = t.first_wrong;
    total.wrong += t.wrong;
    total.worst = std::max(total.worst, t.worst);
    for (std::size_t a = 0; a < n_adapters; ++a) total.rows_of[a] += t.rows_of[a];
  }
  std::printf("soak: %.1f s, %ld requests (rows) served in %ld batches, %ld rejected, %ld loads, %ld unloads, %ld fuses, "
              "%ld wrong (worst %.1e of %.0e allowed; %ld unfuses, %ld rescales, %ld unloads and %ld fuses refused; "
              "W0 rounded %ld times, drifted by %.1e)\n",
              elapsed, total.rows, total.batches, total.rejected, loads.load(), unloads.load(), fuses.load(), total.wrong,
              total.worst, tolerance, unfuses.load(), rescales.load(), unload_refused.load(), fuse_refused.load(), roundings, drift);
  std::fflush(stdout);

  INFO("first wrong: " << total.first_wrong);
  CHECK(total.wrong == 0);
  CHECK(total.batches >= 50);
  CHECK(total.rows >= 200);
  CHECK(loads.load() > 0);
  CHECK(unloads.load() > 0);
  CHECK(fuses.load() > 0);
  CHECK(unfuses.load() > 0);
  CHECK(rescales.load() > 0);
  for (std::size_t a = 0; a < n_adapters; ++a) {
    INFO("rows served by '" << table[a].name << "'");
    CHECK(total.rows_of[a] > 0);
  }
  CHECK(reg.fused().empty());
}

}  // namespace test_soak
