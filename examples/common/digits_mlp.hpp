// examples/common/digits_mlp.hpp — the small digits classifier the examples adapt:
// 64 -> hidden -> relu -> 10, its fully trainable layer for pretraining, the loss and the metric.
//
//   digits::mlp<digits::linear> net(digits::linear(64, 128, gen), digits::linear(128, 10, gen));
//   digits::pretrain(net, train, gen);                        // Adam, 10 epochs, batches of 32
//   digits::mlp<layer> adapted(make(net.fc1.frozen()), make(net.fc2.frozen()));
//
// Any layer type with forward(x, y), backward(x, dy, dx), parameters() and zero_grad() fits
// (peft::adapted_linear does).
#pragma once

#include <peft/peft.hpp>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "digits_data.hpp"

namespace digits {

using cview = peft::matrix_view<const float>;

/// A fully trainable y = x W^T + b (nn.Linear's initialisation), for pretraining.
class linear {
 public:
  linear(index in, index out, peft::rng& gen) : w_(out, in), b_(1, out), dw_(out, in), db_(1, out) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    for (auto& v : w_.storage()) v = static_cast<float>(gen.uniform(-bound, bound));
    for (auto& v : b_.storage()) v = static_cast<float>(gen.uniform(-bound, bound));
  }
  void forward(cview x, peft::matrix_view<float> y) {
    peft::kernels::gemm_nt<float, float>(1.0, x, w_.view(), 0.0, y);  // y = x W^T
    for (index i = 0; i < y.rows(); ++i) {
      for (index j = 0; j < y.cols(); ++j) y(i, j) += b_(0, j);
    }
  }
  void backward(cview x, cview dy, peft::matrix_view<float> dx) {
    peft::kernels::gemm_tn<float>(1.0, dy, x, 1.0, dw_.view());         // dW += dy^T x
    for (index i = 0; i < dy.rows(); ++i) {
      for (index j = 0; j < dy.cols(); ++j) db_(0, j) += dy(i, j);      // db += column sums
    }
    peft::kernels::gemm_nn<float, float>(1.0, dy, w_.view(), 0.0, dx);  // dx = dy W
  }
  std::vector<peft::parameter<float>> parameters() {
    return {{"weight", w_.view(), dw_.view(), {w_.rows(), w_.cols()}}, {"bias", b_.view(), db_.view(), {b_.cols()}}};
  }
  void zero_grad() {
    dw_.fill(0.0f);
    db_.fill(0.0f);
  }
  index out_features() const noexcept { return w_.rows(); }
  cview weight() const noexcept { return w_.view(); }
  cview bias() const noexcept { return b_.view(); }
  /// The trained weights as a frozen base.
  peft::dense<float> frozen() const { return peft::dense<float>::from(w_.view(), b_.data()); }

 private:
  peft::matrix<float> w_, b_, dw_, db_;  // W (out, in), b (1, out) and their gradients
};

/// fc1 -> relu -> fc2, keeping what backward needs.
template <class Layer>
struct mlp {
  Layer fc1, fc2;
  peft::matrix<float> z, h, logits;  // the last forward's pre- and post-relu (batch, hidden), (batch, 10)

  mlp(Layer first, Layer second) : fc1(std::move(first)), fc2(std::move(second)) {}

  index hidden() const { return fc1.out_features(); }
  cview forward(cview x) {
    if (z.rows() != x.rows() || z.cols() != hidden()) z = h = peft::matrix<float>(x.rows(), hidden());
    if (logits.rows() != x.rows()) logits = peft::matrix<float>(x.rows(), classes);
    fc1.forward(x, z);
    for (index k = 0; k < z.size(); ++k) h.data()[k] = std::max(z.data()[k], 0.0f);
    fc2.forward(h.view(), logits);
    return logits.view();
  }
  void backward(cview x, cview dlogits) {
    peft::matrix<float> dh(x.rows(), hidden()), dx(x.rows(), pixels);
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

/// Mean softmax cross-entropy of logits (n, 10) against labels; writes dL/dlogits to grad.
inline double softmax_cross_entropy(cview logits, const int* labels, peft::matrix_view<float> grad) {
  const auto n = static_cast<double>(logits.rows());
  double loss = 0.0;
  for (index i = 0; i < logits.rows(); ++i) {
    const float* l = logits.row(i);
    const double top = *std::max_element(l, l + classes);
    double sum = 0.0;
    for (index j = 0; j < classes; ++j) sum += std::exp(l[j] - top);
    for (index j = 0; j < classes; ++j) {
      const double p = std::exp(l[j] - top) / sum;
      grad(i, j) = static_cast<float>((p - (j == labels[i] ? 1.0 : 0.0)) / n);
    }
    loss += std::log(sum) - (l[labels[i]] - top);
  }
  return loss / n;
}

/// The class with the largest logit of row i.
inline int predicted(cview logits, index i) {
  return static_cast<int>(std::max_element(logits.row(i), logits.row(i) + classes) - logits.row(i));
}

inline double accuracy(cview logits, const std::vector<int>& y) {
  index right = 0;
  for (index i = 0; i < logits.rows(); ++i) right += predicted(logits, i) == y[static_cast<std::size_t>(i)];
  return static_cast<double>(right) / static_cast<double>(logits.rows());
}

/// `epochs` of AdamW (lr, no decay) on shuffled batches of 32 of `train`, drawing the order from
/// `gen` (deterministic). Trains whatever net.parameters() lists as trainable.
template <class Layer>
void train(mlp<Layer>& net, const dataset& train, peft::rng& gen, int epochs, double lr) {
  constexpr index batch = 32;
  auto params = net.parameters();
  peft::train::adamw<float> opt(params, {.lr = lr, .weight_decay = 0.0});
  peft::matrix<float> dlogits(batch, classes);
  for (int epoch = 0; epoch < epochs; ++epoch) {
    const dataset d = subset(train, permutation(train.size(), gen), 0, train.size());
    for (index first = 0; first < d.size(); first += batch) {
      const index n = std::min(batch, d.size() - first);
      const cview x = d.x.view().row_block(first, n);
      const auto g = dlogits.view().row_block(0, n);
      softmax_cross_entropy(net.forward(x), &d.y[static_cast<std::size_t>(first)], g);
      net.zero_grad();
      net.backward(x, g);
      opt.step(net.parameters());
    }
  }
}

/// The pretraining of the examples: 10 epochs at lr 5e-3.
inline void pretrain(mlp<linear>& net, const dataset& data, peft::rng& gen) { train(net, data, gen, 10, 5e-3); }

}  // namespace digits
