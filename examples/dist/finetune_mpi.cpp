// examples/dist/finetune_mpi.cpp — lora_digits' fine-tuning, data-parallel over MPI ranks.
//
//   mpirun -np 2 build/examples/finetune_mpi [DATA.csv[.gz]] [--steps N] [--batch G] [--seed N]
//          [--split contiguous|strided] [--out DIR] [--fail-at-step S --fail-rank R]
//
// 1. Every rank builds the same frozen model itself: it pretrains the MLP 64 -> 128 -> relu -> 10
//    on upright 8x8 digits from the same seed (deterministic), exactly as a single process would.
//    The weights are never sent: one all-reduce of a checksum confirms the ranks agree.
// 2. Each layer gets a rank-8 LoRA adapter; rank 0's initial adapters are broadcast.
// 3. Fine-tuning on the digits rotated by 90 degrees: each step's GLOBAL batch of G images (the
//    last batch of an epoch is smaller) is split over the ranks, contiguously or strided, so the
//    shares may be uneven or empty. Each rank computes the mean loss over its share and its
//    gradients; peft::dist::gradient_allreducer turns them into the global batch's mean gradient
//    in one fused all-reduce of the adapter gradients (2,640 floats), and every rank takes the
//    same AdamW step. Rank 0 prints the global batch's mean loss after each step: the same
//    numbers, to float rounding, for any number of ranks (mpirun -np 1 gives the single-process
//    run with the same global batch).
// 4. Rank 0 reports the test accuracy and every rank's examples, mean loss and time; a checksum
//    confirms every rank ended with bit-identical adapters; with --out, rank 0 saves them as a
//    HuggingFace PEFT checkpoint (the others wait, and learn if it failed).
//
// Defaults: the bundled digits, 300 steps (about 13 epochs), global batch 64, seed 42,
// contiguous shares, no checkpoint. Under a second on 2 cores for -np 1 to 4; run one OpenMP
// thread per rank when the ranks share the cores (OMP_NUM_THREADS=1).
//
// --fail-at-step S --fail-rank R makes rank R throw at step S: the job must end (MPI_Abort through
// peft::dist::run_or_abort, "rank R: ..." on stderr) instead of hanging in the next all-reduce.
//
// Data: UCI Optical Recognition of Handwritten Digits, E. Alpaydin and C. Kaynak (1998),
// CC BY 4.0, doi:10.24432/C50P49 (examples/data/README.md).
#include <peft/dist/mpi.hpp>
#include <peft/peft.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../common/digits_mlp.hpp"

namespace {

using digits::accuracy;
using digits::classes;
using digits::dataset;
using digits::linear;
using digits::mlp;
using digits::pixels;
using digits::softmax_cross_entropy;
using peft::index;
using peft::matrix;
using peft::matrix_view;
using lora_layer = peft::adapted_linear<peft::dense<float>, peft::lora<float>>;
using clock_type = std::chrono::steady_clock;

constexpr index hidden = 128, lora_rank = 8;

struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct options {
  std::string data = PEFT_EXAMPLE_DATA_DIR "/digits.csv.gz";
  int steps = 300;
  index batch = 64;
  std::uint64_t seed = 42;
  bool strided = false;
  std::string out = {};
  int fail_at_step = -1;
  int fail_rank = -1;
  bool help = false;
};

/// A checksum of a layer's weights, to confirm every rank built the same model.
std::uint64_t checksum(const linear& l, std::uint64_t seed) {
  return peft::dist::checksum(l.bias(), peft::dist::checksum(l.weight(), seed));
}

lora_layer with_lora(const linear& trained, std::uint64_t seed) {
  lora_layer layer(trained.frozen());
  const peft::lora_options o{.rank = lora_rank, .alpha = 2.0 * static_cast<double>(lora_rank), .seed = seed};
  layer.add_adapter("default", {layer.in_features(), layer.out_features(), o});
  return layer;
}

// ---- the data-parallel fine-tuning -------------------------------------------------------------

/// This rank's rows of a global batch of `count` rows starting at `first`: contiguous
/// [first + count r / P, first + count (r + 1) / P), or strided first + r, first + r + P, ...
std::vector<index> share(index first, index count, int r, int p, bool strided) {
  std::vector<index> rows;
  if (strided) {
    for (index i = r; i < count; i += p) rows.push_back(first + i);
  } else {
    for (index i = count * r / p; i < count * (r + 1) / p; ++i) rows.push_back(first + i);
  }
  return rows;
}

int run(const options& opt) {
  MPI_Comm comm = MPI_COMM_WORLD;
  const int me = peft::dist::rank(comm), ranks = peft::dist::size(comm);
  const bool root = me == 0;
  if (root) {
    std::printf("Data: UCI Optical Recognition of Handwritten Digits, E. Alpaydin and C. Kaynak "
                "(1998), CC BY 4.0, doi:10.24432/C50P49\n");
  }
  const dataset all = digits::load(opt.data);
  peft::rng gen(opt.seed);
  const std::vector<index> order = digits::permutation(all.size(), gen);
  const index n_test = all.size() / 5;
  const dataset test = digits::subset(all, order, 0, n_test);
  const dataset train = digits::subset(all, order, n_test, all.size());
  const dataset test_rot = digits::rotated(test), train_rot = digits::rotated(train);

  // 1. The frozen model, built by every rank; only a checksum travels.
  mlp<linear> source(linear(pixels, hidden, gen), linear(hidden, classes, gen));
  digits::pretrain(source, train, gen);
  if (!peft::dist::same_on_all_ranks(comm, checksum(source.fc2, checksum(source.fc1, opt.seed)))) {
    throw peft::error("[finetune_mpi] the ranks pretrained different models (same binary, data and seed?)");
  }
  if (root) {
    std::printf("%d rank(s); pretrained 64-128-10 MLP: %.1f%% on upright test digits, %.1f%% on rotated\n",
                ranks, 100.0 * accuracy(source.forward(test.x.view()), test.y),
                100.0 * accuracy(source.forward(test_rot.x.view()), test_rot.y));
  }

  // 2. LoRA adapters; rank 0's initial values everywhere.
  mlp<lora_layer> net(with_lora(source.fc1, gen.next()), with_lora(source.fc2, gen.next()));
  peft::dist::broadcast_parameters(comm, net.parameters());
  const auto params = net.parameters();
  peft::dist::gradient_allreducer<float> reduce(comm, params);
  peft::train::adamw<float> optimizer(params, {.lr = 1e-2, .weight_decay = 0.0});
  if (root) {
    std::printf("LoRA rank %td on fc1, fc2: %zu trainable weights, %zu bytes all-reduced per step "
                "(global batch %td, %s shares over %d rank(s))\n",
                lora_rank, reduce.size(), reduce.bytes(), opt.batch, opt.strided ? "strided" : "contiguous", ranks);
  }

  // 3. Training: step s takes global batch s of the epoch's shuffled order.
  const index per_epoch = (train_rot.size() + opt.batch - 1) / opt.batch;
  dataset epoch_data;
  peft::dist::rank_progress progress;
  matrix<float> dlogits(opt.batch, classes);
  const auto start = clock_type::now();
  for (int step = 1; step <= opt.steps; ++step) {
    if (step == opt.fail_at_step && me == opt.fail_rank) {
      throw std::runtime_error("injected failure at step " + std::to_string(step) + " (--fail-at-step)");
    }
    const index b = (step - 1) % per_epoch;
    if (b == 0) {  // a new epoch: every rank draws the same order from the same generator
      epoch_data = digits::subset(train_rot, digits::permutation(train_rot.size(), gen), 0, train_rot.size());
    }
    const index first = b * opt.batch, count = std::min(opt.batch, train_rot.size() - first);
    const std::vector<index> rows = share(first, count, me, ranks, opt.strided);
    const auto n = static_cast<index>(rows.size());
    net.zero_grad();
    double loss = 0.0;
    if (n > 0) {
      const dataset mine = digits::subset(epoch_data, rows, 0, n);
      const auto g = dlogits.view().row_block(0, n);
      loss = softmax_cross_entropy(net.forward(mine.x.view()), mine.y.data(), g);  // mean over n
      net.backward(mine.x.view(), g);
    }
    const peft::dist::step_result global = reduce.allreduce(n, loss);  // global mean gradients
    optimizer.step(net.parameters());
    progress.examples += n;
    progress.loss_sum += loss * static_cast<double>(n);
    if (root) {
      std::printf("step %4d   loss %.7f   examples %lld\n", step, global.mean_loss,
                  static_cast<long long>(global.examples));
      std::fflush(stdout);  // progress as it happens under mpirun
    }
  }
  progress.seconds = std::chrono::duration<double>(clock_type::now() - start).count();

  // 4. Report, check, save.
  const auto per_rank = peft::dist::gather_progress(comm, progress);
  const bool identical = peft::dist::parameters_consistent(comm, net.parameters());
  if (root) {
    std::printf("rotated test digits after %d steps: %.1f%%\nper rank:\n%s", opt.steps,
                100.0 * accuracy(net.forward(test_rot.x.view()), test_rot.y),
                peft::dist::format_progress(per_rank).c_str());
    std::printf("adapters bit-identical on all %d rank(s): %s\n", ranks, identical ? "yes" : "NO");
  }
  if (!identical) throw peft::error("[finetune_mpi] the ranks' adapters diverged");
  if (!opt.out.empty()) {
    peft::dist::save_on_root(comm, [&] {
      peft::io::basic_peft_checkpoint<peft::lora<float>> ck;
      ck.config = peft::io::adapter_config::lora(lora_rank, 2.0 * static_cast<double>(lora_rank), {"fc1", "fc2"});
      ck.modules.push_back({"fc1", "fc1.weight", net.fc1.adapter("default")});
      ck.modules.push_back({"fc2", "fc2.weight", net.fc2.adapter("default")});
      peft::io::save_peft_checkpoint(opt.out, ck);
    });
    if (root) std::printf("saved the adapters to %s (PEFT checkpoint, rank 0)\n", opt.out.c_str());
  }
  return 0;
}

template <class Int>
Int parse_int(std::string_view name, std::string_view s, Int min) {
  Int v{};
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc{} || end != s.data() + s.size() || v < min) {
    std::string m = std::string(name);
    m += " takes an integer >= ";
    m += std::to_string(min);
    m += ", not '";
    m += s;
    m += "'";
    throw usage_error(m);
  }
  return v;
}

options parse_options(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) throw usage_error(std::string(arg) + " needs a value");
      return argv[++i];
    };
    if (arg == "--steps") {
      o.steps = parse_int<int>(arg, value(), 0);
    } else if (arg == "--batch") {
      o.batch = parse_int<index>(arg, value(), 1);
    } else if (arg == "--seed") {
      o.seed = parse_int<std::uint64_t>(arg, value(), 0);
    } else if (arg == "--split") {
      const std::string_view v = value();
      if (v != "contiguous" && v != "strided") throw usage_error("--split takes contiguous or strided");
      o.strided = v == "strided";
    } else if (arg == "--out") {
      o.out = value();
    } else if (arg == "--fail-at-step") {
      o.fail_at_step = parse_int<int>(arg, value(), 1);
    } else if (arg == "--fail-rank") {
      o.fail_rank = parse_int<int>(arg, value(), 0);
    } else if (arg == "-h" || arg == "--help") {
      o.help = true;
    } else if (arg.starts_with('-')) {
      throw usage_error("unknown option '" + std::string(arg) + "'");
    } else {
      o.data = arg;
    }
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  constexpr const char* usage =
      "usage: mpirun -np P finetune_mpi [DATA.csv[.gz]] [--steps N] [--batch G] [--seed N]\n"
      "         [--split contiguous|strided] [--out DIR] [--fail-at-step S --fail-rank R]\n";
  peft::dist::environment env(argc, argv);
  options opt;
  try {
    opt = parse_options(argc, argv);  // the same arguments, hence the same outcome, on every rank
  } catch (const usage_error& e) {
    if (env.rank() == 0) std::fprintf(stderr, "finetune_mpi: %s\n%s", e.what(), usage);
    return 2;
  }
  if (opt.help) {
    if (env.rank() == 0) std::printf("%s", usage);
    return 0;
  }
  return peft::dist::run_or_abort(MPI_COMM_WORLD, [&] { return run(opt); });
}
