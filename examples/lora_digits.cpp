// examples/lora_digits.cpp — peft-cpp's main example: adapt a pretrained classifier with LoRA.
//
//   lora_digits [DATA.csv[.gz]] [--seed N]
//
// 1. Pretrain a small MLP (64 -> 128 -> relu -> 10) on 8x8 handwritten digits; every weight trains.
// 2. Rotate the digits by 90 degrees: a task the pretrained model mostly gets wrong.
// 3. Freeze the model. Each layer becomes a peft::adapted_linear: the trained weights as a frozen
//    peft::dense<float> base plus a peft::lora<float> adapter, whose two small factors A and B are
//    the only weights that train.
// 4. Merge the adapters into the frozen weights and check that the predictions do not change.
//
// peft-cpp provides the layers and their gradients; the data, the MLP (relu between the layers)
// and the softmax cross-entropy come from examples/common/, and the Adam optimizer and the
// training loop are written out here.
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
#include <vector>

#include "common/digits_mlp.hpp"

namespace {

using peft::index;
using peft::matrix;
using peft::matrix_view;
using digits::cview;
using lora_layer = peft::adapted_linear<peft::dense<float>, peft::lora<float>>;
using clock_type = std::chrono::steady_clock;

constexpr index hidden = 128;

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

// The data (examples/common/digits_data.hpp: reading, split, rotation) and the model
// (examples/common/digits_mlp.hpp: a trainable linear layer, fc1 -> relu -> fc2, the loss).
using digits::accuracy;
using digits::classes;
using digits::data_error;
using digits::dataset;
using digits::linear;
using digits::mlp;
using digits::permutation;
using digits::pixels;
using digits::predicted;
using digits::rotated;
using digits::softmax_cross_entropy;
using digits::subset;

/// A trained layer, frozen, with a fresh rank-r LoRA adapter in PEFT's default initialisation
/// (A kaiming-uniform, B = 0: the adapted layer starts out computing exactly what it did before).
lora_layer with_lora(const linear& trained, index rank, std::uint64_t seed) {
  lora_layer layer(trained.frozen());
  const peft::lora_options options{.rank = rank, .alpha = 2.0 * static_cast<double>(rank),
                                   .seed = seed};
  layer.add_adapter("default", {layer.in_features(), layer.out_features(), options});
  return layer;
}

index count_weights(const std::vector<peft::parameter<float>>& params) {
  index n = 0;
  for (const auto& p : params) n += p.value.size();
  return n;
}

// ---- training ----------------------------------------------------------------------------------

/// Adam (Kingma and Ba, 2015): value -= lr * m^ / (sqrt(v^) + eps) for each trainable parameter.
class adam {
 public:
  adam(const std::vector<peft::parameter<float>>& params, double lr) : lr_(lr) {
    for (const auto& p : params) {
      if (!p.trainable) continue;
      params_.push_back(p);
      m_.emplace_back(p.value.rows(), p.value.cols());
      v_.emplace_back(p.value.rows(), p.value.cols());
    }
  }
  void step() {
    ++t_;
    const double c1 = 1.0 - std::pow(0.9, t_), c2 = 1.0 - std::pow(0.999, t_);  // bias corrections
    for (std::size_t k = 0; k < params_.size(); ++k) {
      const peft::parameter<float>& p = params_[k];
      for (index i = 0; i < p.value.rows(); ++i) {
        for (index j = 0; j < p.value.cols(); ++j) {
          const float g = p.grad(i, j);
          float& m = m_[k](i, j);
          float& v = v_[k](i, j);
          m = 0.9f * m + 0.1f * g;
          v = 0.999f * v + 0.001f * g * g;
          p.value(i, j) -= static_cast<float>(lr_ * (m / c1) / (std::sqrt(v / c2) + 1e-8));
        }
      }
    }
  }

 private:
  std::vector<peft::parameter<float>> params_;
  std::vector<matrix<float>> m_, v_;  // first and second moments, one per parameter
  double lr_;
  int t_ = 0;
};

template <class Net>
double accuracy(Net& net, const dataset& d) {
  return accuracy(net.forward(d.x.view()), d.y);
}

/// Adam on shuffled mini-batches of 32 for `epochs` passes, one progress line per epoch.
template <class Net>
void train(Net& net, double lr, int epochs, const dataset& train_set, const dataset& test_set,
           peft::rng& gen) {
  constexpr index batch = 32;
  adam optimizer(net.parameters(), lr);
  matrix<float> dlogits(batch, classes);
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    const auto start = clock_type::now();
    const dataset d = subset(train_set, permutation(train_set.size(), gen), 0, train_set.size());
    double loss = 0.0;
    for (index first = 0; first < d.size(); first += batch) {
      const index n = std::min(batch, d.size() - first);
      const cview x = d.x.view().row_block(first, n);
      const auto g = dlogits.view().row_block(0, n);
      loss += softmax_cross_entropy(net.forward(x), &d.y[std::size_t(first)], g) * double(n);
      net.zero_grad();
      net.backward(x, g);
      optimizer.step();
    }
    std::printf("  epoch %2d   loss %.3f   train %5.1f%%   test %5.1f%%   %4.1f ms\n", epoch,
                loss / double(d.size()), 100.0 * accuracy(net, train_set),
                100.0 * accuracy(net, test_set), 1e3 * seconds_since(start));
  }
}

/// Merges each layer's adapter into its base and checks the test predictions do not change.
/// Returns the merged model's accuracy; throws if a prediction changed.
double merge_and_check(mlp<lora_layer>& net, const dataset& test) {
  const matrix<float> before = peft::to_matrix(net.forward(test.x.view()));
  net.fc1.merge("default");  // W0 += s B A; the adapter then takes no part in forward
  net.fc2.merge("default");
  const cview after = net.forward(test.x.view());
  index same = 0;
  double max_diff = 0.0;
  for (index i = 0; i < after.rows(); ++i) {
    same += predicted(after, i) == predicted(before.view(), i);
    for (index j = 0; j < classes; ++j) {
      max_diff = std::max(max_diff, std::fabs(static_cast<double>(after(i, j) - before(i, j))));
    }
  }
  const double acc = accuracy(after, test.y);
  std::printf("  %td of %td test predictions unchanged, largest logit difference %.1e, %.1f%%\n",
              same, after.rows(), max_diff, 100.0 * acc);
  if (same != after.rows()) throw std::runtime_error("merging changed predictions");
  return acc;
}

void run(const std::string& path, std::uint64_t seed) {
  const auto start = clock_type::now();
  std::printf("Data: UCI Optical Recognition of Handwritten Digits, E. Alpaydin and C. Kaynak "
              "(1998), CC BY 4.0, doi:10.24432/C50P49\n");
  const dataset all = digits::load(path);

  // A seeded 80/20 split; the new task is the same images rotated by 90 degrees.
  peft::rng gen(seed);
  const std::vector<index> order = permutation(all.size(), gen);
  const index n_test = all.size() / 5;
  const dataset test = subset(all, order, 0, n_test);
  const dataset train_set = subset(all, order, n_test, all.size());
  const dataset test_rot = rotated(test), train_rot = rotated(train_set);
  std::printf("%td images of 8x8 pixels: %td to train, %td to test (seed %llu)\n\n", all.size(),
              train_set.size(), test.size(), static_cast<unsigned long long>(seed));

  mlp<linear> source(linear(pixels, hidden, gen), linear(hidden, classes, gen));
  const index full = count_weights(source.parameters());
  std::printf("1. Pretrain a 64-128-10 MLP on upright digits, all %td weights trained\n", full);
  train(source, 5e-3, 10, train_set, test, gen);
  const double source_acc = accuracy(source, test), before = accuracy(source, test_rot);
  std::printf("\n2. New task: the same digits rotated 90 degrees\n"
              "  pretrained model: %.1f%% on upright test digits, %.1f%% on rotated ones\n\n",
              100.0 * source_acc, 100.0 * before);

  constexpr index rank = 8;
  mlp<lora_layer> adapted(with_lora(source.fc1, rank, gen.next()),
                          with_lora(source.fc2, rank, gen.next()));
  const index trainable = count_weights(adapted.parameters());
  std::printf("3. Freeze the MLP; train rank-%td LoRA adapters on both layers (%td weights)\n"
              "  untrained adapters change nothing (B = 0): %.1f%% on rotated digits\n",
              rank, trainable, 100.0 * accuracy(adapted, test_rot));
  train(adapted, 1e-2, 10, train_rot, test_rot, gen);
  const double after = accuracy(adapted, test_rot);

  std::printf("\n4. Merge the adapters into the frozen weights\n");
  const double merged = merge_and_check(adapted, test_rot);

  // LoRA trains r (in + out) of a layer's in * out weights: a small share of a wide layer.
  const double share = 100.0 * static_cast<double>(trainable) / static_cast<double>(full);
  const double share_4096 = 100.0 * static_cast<double>(rank) * 8192.0 / (4096.0 * 4096.0);
  std::printf("\nSummary\n"
              "  weights in the model                %6td\n"
              "  weights trained by LoRA             %6td  (%.1f%%; on a 4096x4096 layer: %.2f%%)\n"
              "  upright digits, pretrained model    %5.1f%%\n"
              "  rotated digits, pretrained model    %5.1f%%\n"
              "  rotated digits, after LoRA          %5.1f%%  (merged: %.1f%%)\n"
              "  total time                          %5.1f s\n",
              full, trainable, share, share_4096, 100.0 * source_acc, 100.0 * before,
              100.0 * after, 100.0 * merged, seconds_since(start));
}

}  // namespace

int main(int argc, char** argv) {
  constexpr const char* usage =
      "usage: lora_digits [DATA.csv[.gz]] [--seed N]\n"
      "  DATA    rows of 64 pixel values 0..16 and a label 0..9 (default: the bundled digits)\n";
  std::string path = PEFT_EXAMPLE_DATA_DIR "/digits.csv.gz";
  std::uint64_t seed = 42;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--seed") {
      const std::string_view s = i + 1 < argc ? argv[++i] : "";
      const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), seed);
      if (ec != std::errc{} || end != s.data() + s.size()) {
        std::fprintf(stderr, "lora_digits: --seed takes an integer >= 0, not '%s'\n", s.data());
        return 2;
      }
    } else if (arg == "-h" || arg == "--help") {
      std::printf("%s", usage);
      return 0;
    } else if (arg.starts_with('-')) {
      std::fprintf(stderr, "lora_digits: unknown option '%s'\n%s", argv[i], usage);
      return 2;
    } else {
      path = arg;
    }
  }
  try {
    run(path, seed);
  } catch (const data_error& e) {
    std::fprintf(stderr, "lora_digits: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lora_digits: error: %s\n", e.what());
    return 1;
  }
}
