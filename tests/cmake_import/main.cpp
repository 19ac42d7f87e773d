// Uses the umbrella header and checks one LoRA forward against a hand computation.
#include <cmath>
#include <cstdio>
#include <peft/peft.hpp>

int main() {
  peft::matrix<float> w(2, 3, {1, 2, 3, 4, 5, 6});
  peft::adapted_linear<peft::dense<float>, peft::lora<float>> layer(peft::dense<float>(std::move(w)));
  peft::matrix<float> a(1, 3, {1, 0, -1}), b(2, 1, {0.5f, -1});
  layer.add_adapter("default", peft::lora<float>(std::move(a), std::move(b), 2.0f));
  peft::matrix<float> x(1, 3, {1, 1, 1}), y(1, 2);
  layer.forward(x, y);
  // base: (6, 15); x A^T = 0, so the adapter adds nothing.
  const bool ok = std::abs(y(0, 0) - 6) < 1e-6f && std::abs(y(0, 1) - 15) < 1e-6f;
  std::printf("consumer: %s\n", ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
