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
// peft-cpp provides the layers and their gradients; the rest of a training loop (relu, softmax
// cross-entropy, the Adam optimizer) is written out here.
#include <peft/peft.hpp>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace {

using peft::index;
using peft::matrix;
using peft::matrix_view;
using cview = matrix_view<const float>;
using lora_layer = peft::adapted_linear<peft::dense<float>, peft::lora<float>>;
using clock_type = std::chrono::steady_clock;

constexpr index side = 8, pixels = side * side, hidden = 128, classes = 10;

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

// ---- data --------------------------------------------------------------------------------------

struct dataset {
  matrix<float> x;     // (n, 64): 8x8 images, row by row, pixels scaled to [0, 1]
  std::vector<int> y;  // (n) labels 0..9
  index size() const { return x.rows(); }
};

struct data_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// The file's text; a path ending in .gz is decompressed through `gzip -dc` (POSIX popen).
std::string read_text(const std::string& path) {
  std::FILE* probe = std::fopen(path.c_str(), "rb");
  if (probe == nullptr) throw data_error("cannot open " + path + ": " + std::strerror(errno));
  std::fclose(probe);
  const bool gz = path.ends_with(".gz");
  std::string quoted = "'";  // the path single-quoted for the shell
  for (char c : path) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  quoted += '\'';
  std::FILE* f = gz ? popen(("gzip -dc " + quoted).c_str(), "r") : std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw data_error("cannot read " + path);
  std::string text;
  char buffer[1 << 16];
  for (std::size_t n; (n = std::fread(buffer, 1, sizeof buffer, f)) > 0;) text.append(buffer, n);
  const bool read_error = std::ferror(f) != 0;
  if ((gz ? pclose(f) : std::fclose(f)) != 0 || read_error) {
    throw data_error((gz ? "cannot decompress " : "cannot read ") + path);
  }
  return text;
}

/// Rows of 64 pixel values 0..16 followed by the label 0..9, comma separated.
dataset parse_digits(std::string_view text, const std::string& path) {
  std::vector<float> x;
  std::vector<int> y;
  for (index line_no = 1; !text.empty(); ++line_no) {
    const std::size_t eol = std::min(text.find('\n'), text.size());
    std::string_view line = text.substr(0, eol);
    text.remove_prefix(std::min(eol + 1, text.size()));
    if (line.ends_with('\r')) line.remove_suffix(1);
    if (line.empty()) continue;
    auto fail = [&](const std::string& what) {
      throw data_error(path + ":" + std::to_string(line_no) + ": " + what);
    };
    int v[pixels + 1];
    index n = 0;
    for (const char *p = line.data(), *end = p + line.size();; ++p) {
      if (n > pixels) fail("more than 65 comma-separated values");
      const auto [next, ec] = std::from_chars(p, end, v[n++]);
      if (ec != std::errc{}) fail("column " + std::to_string(n) + " is not an integer");
      if ((p = next) == end) break;
      if (*p != ',') fail("expected ',' after column " + std::to_string(n));
    }
    if (n <= pixels) fail(std::to_string(n) + " values, expected 64 pixels and a label");
    for (index j = 0; j < pixels; ++j) {
      if (v[j] < 0 || v[j] > 16) fail("pixel value " + std::to_string(v[j]) + " outside 0..16");
      x.push_back(static_cast<float>(v[j]) / 16.0f);
    }
    const int label = v[pixels];
    if (label < 0 || label > 9) fail("label " + std::to_string(label) + " outside 0..9");
    y.push_back(label);
  }
  if (y.size() < 10) throw data_error(path + ": " + std::to_string(y.size()) + " rows, too few");
  const auto n = static_cast<index>(y.size());
  return {matrix<float>(n, pixels, std::move(x)), std::move(y)};
}

/// The rows [first, last) of `order`, taken from `d`.
dataset subset(const dataset& d, const std::vector<index>& order, index first, index last) {
  dataset s{matrix<float>(last - first, pixels), {}};
  for (index i = first; i < last; ++i) {
    const index row = order[static_cast<std::size_t>(i)];
    std::copy(d.x.row(row), d.x.row(row) + pixels, s.x.row(i - first));
    s.y.push_back(d.y[static_cast<std::size_t>(row)]);
  }
  return s;
}

/// 0, 1, ..., n - 1 in a random order (Fisher-Yates).
std::vector<index> permutation(index n, peft::rng& gen) {
  std::vector<index> p(static_cast<std::size_t>(n));
  for (index i = 0; i < n; ++i) p[static_cast<std::size_t>(i)] = i;
  for (std::size_t i = p.size(); i > 1; --i) std::swap(p[i - 1], p[gen.below(i)]);
  return p;
}

/// The same digits rotated 90 degrees clockwise: new(r, c) = old(7 - c, r).
dataset rotated(const dataset& d) {
  dataset out{matrix<float>(d.size(), pixels), d.y};
  for (index i = 0; i < d.size(); ++i) {
    for (index r = 0; r < side; ++r) {
      for (index c = 0; c < side; ++c) out.x(i, r * side + c) = d.x(i, (side - 1 - c) * side + r);
    }
  }
  return out;
}

// ---- model -------------------------------------------------------------------------------------

/// A fully trainable y = x W^T + b with peft::adapted_linear's interface (forward, backward,
/// parameters, zero_grad), so one training loop serves the pretrained and the adapted model.
class linear {
 public:
  linear(index in, index out, peft::rng& gen) : w_(out, in), b_(1, out), dw_(out, in), db_(1, out) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));  // as PyTorch's nn.Linear
    for (auto& v : w_.storage()) v = static_cast<float>(gen.uniform(-bound, bound));
    for (auto& v : b_.storage()) v = static_cast<float>(gen.uniform(-bound, bound));
  }
  void forward(cview x, matrix_view<float> y) {
    peft::kernels::gemm_nt<float, float>(1.0, x, w_.view(), 0.0, y);  // y = x W^T
    for (index i = 0; i < y.rows(); ++i) {
      for (index j = 0; j < y.cols(); ++j) y(i, j) += b_(0, j);
    }
  }
  void backward(cview x, cview dy, matrix_view<float> dx) {
    peft::kernels::gemm_tn<float>(1.0, dy, x, 1.0, dw_.view());         // dW += dy^T x
    for (index i = 0; i < dy.rows(); ++i) {
      for (index j = 0; j < dy.cols(); ++j) db_(0, j) += dy(i, j);      // db += column sums
    }
    peft::kernels::gemm_nn<float, float>(1.0, dy, w_.view(), 0.0, dx);  // dx = dy W
  }
  std::vector<peft::parameter<float>> parameters() {
    return {{"weight", w_.view(), dw_.view(), {w_.rows(), w_.cols()}},
            {"bias", b_.view(), db_.view(), {b_.cols()}}};
  }
  void zero_grad() {
    dw_.fill(0.0f);
    db_.fill(0.0f);
  }
  /// The layer's weights as the frozen base of an adapted layer.
  peft::dense<float> frozen() const { return peft::dense<float>::from(w_.view(), b_.data()); }

 private:
  matrix<float> w_, b_, dw_, db_;  // W (out, in), b (1, out) and their gradients
};

/// A trained layer, frozen, with a fresh rank-r LoRA adapter in PEFT's default initialisation
/// (A kaiming-uniform, B = 0: the adapted layer starts out computing exactly what it did before).
lora_layer with_lora(const linear& trained, index rank, std::uint64_t seed) {
  lora_layer layer(trained.frozen());
  const peft::lora_options options{.rank = rank, .alpha = 2.0 * static_cast<double>(rank),
                                   .seed = seed};
  layer.add_adapter("default", {layer.in_features(), layer.out_features(), options});
  return layer;
}

/// Two layers with a relu between; Layer is `linear` (pretraining) or `lora_layer` (adapting).
template <class Layer>
struct mlp {
  Layer fc1, fc2;
  matrix<float> z, h, logits;  // the last forward's (batch, 128) before and after relu, (batch, 10)

  mlp(Layer first, Layer second) : fc1(std::move(first)), fc2(std::move(second)) {}

  cview forward(cview x) {
    if (z.rows() != x.rows()) z = h = matrix<float>(x.rows(), hidden);
    if (logits.rows() != x.rows()) logits = matrix<float>(x.rows(), classes);
    fc1.forward(x, z);
    for (index k = 0; k < z.size(); ++k) h.data()[k] = std::max(z.data()[k], 0.0f);
    fc2.forward(h.view(), logits);
    return logits.view();
  }
  /// Accumulates the parameter gradients for the x of the last forward, given dL/dlogits.
  void backward(cview x, cview dlogits) {
    matrix<float> dh(x.rows(), hidden), dx(x.rows(), pixels);
    fc2.backward(h.view(), dlogits, dh);
    for (index k = 0; k < dh.size(); ++k) dh.data()[k] *= z.data()[k] > 0.0f ? 1.0f : 0.0f;
    fc1.backward(x, dh.view(), dx);
  }
  std::vector<peft::parameter<float>> parameters() {
    auto all = fc1.parameters(), second = fc2.parameters();
    all.insert(all.end(), second.begin(), second.end());
    return all;
  }
  void zero_grad() {
    fc1.zero_grad();
    fc2.zero_grad();
  }
};

index count_weights(const std::vector<peft::parameter<float>>& params) {
  index n = 0;
  for (const auto& p : params) n += p.value.size();
  return n;
}

// ---- training ----------------------------------------------------------------------------------

/// Mean softmax cross-entropy of logits (batch, 10) against labels; writes dL/dlogits to grad.
double softmax_cross_entropy(cview logits, const int* labels, matrix_view<float> grad) {
  const auto batch = static_cast<double>(logits.rows());
  double loss = 0.0;
  for (index i = 0; i < logits.rows(); ++i) {
    const float* l = logits.row(i);
    const double top = *std::max_element(l, l + classes);  // subtracted for stability
    double sum = 0.0;
    for (index j = 0; j < classes; ++j) sum += std::exp(l[j] - top);
    for (index j = 0; j < classes; ++j) {
      const double p = std::exp(l[j] - top) / sum;
      grad(i, j) = static_cast<float>((p - (j == labels[i] ? 1.0 : 0.0)) / batch);
    }
    loss += std::log(sum) - (l[labels[i]] - top);
  }
  return loss / batch;
}

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

index predicted(cview logits, index i) {
  return std::max_element(logits.row(i), logits.row(i) + classes) - logits.row(i);
}

/// Fraction of the rows whose largest logit is at the label.
double accuracy(cview logits, const std::vector<int>& y) {
  index right = 0;
  for (index i = 0; i < logits.rows(); ++i) right += predicted(logits, i) == y[std::size_t(i)];
  return static_cast<double>(right) / static_cast<double>(logits.rows());
}

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
  const dataset all = parse_digits(read_text(path), path);

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
