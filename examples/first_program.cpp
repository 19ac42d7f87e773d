// The README's first program, compiled so that it stays correct.
// [readme]
#include <peft/adapters/lora.hpp>
#include <peft/base/dense.hpp>
#include <peft/layer/adapted_linear.hpp>

int main() {
  // A frozen nn.Linear(64 -> 96, bias=False): the weight is (out, in), as in PyTorch.
  peft::rng gen(1);
  peft::matrix<float> w(96, 64);
  for (auto& v : w.storage()) v = static_cast<float>(gen.normal(0.0, 0.1));
  peft::adapted_linear<peft::dense<float>, peft::lora<float>> layer{peft::dense<float>(std::move(w))};

  // LoRA with PEFT's defaults (kaiming-uniform A, B = 0: an exact no-op at first), sized from the
  // layer; peft::lora<float>(in_features, out_features, options) makes one without a layer.
  layer.add_adapter("default", peft::lora_options{.rank = 8, .alpha = 16});

  peft::matrix<float> x(5, 64, 0.5f), y(5, 96), dy(5, 96, 1.0f), dx(5, 64);
  layer.forward(x, y);        // y = x W^T + s (x A^T) B^T
  layer.backward(x, dy, dx);  // accumulates dA, dB; writes dx
  for (auto& p : layer.parameters())          // one SGD step on the adapter only
    for (peft::index i = 0; i < p.value.rows(); ++i)
      for (peft::index j = 0; j < p.value.cols(); ++j) p.value(i, j) -= 0.01f * p.grad(i, j);
  layer.merge("default");     // W += s B A: plain dense inference from here on
}
// [/readme]
