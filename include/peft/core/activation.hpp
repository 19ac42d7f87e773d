// peft/core/activation.hpp — the activation functions of transformer MLPs (the kernels of
// kernels/transformer.hpp and the model configs of models/config.hpp name them).
#pragma once

#include <cstdint>

namespace peft {

/// silu (x sigmoid x), gelu (the erf form), gelu_tanh (the tanh approximation), relu.
enum class activation : std::uint8_t { silu, gelu, gelu_tanh, relu };

}  // namespace peft
