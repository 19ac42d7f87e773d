// peft/peft.hpp — the umbrella header: everything public in peft-cpp.
#pragma once

#include "peft/core/adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/interop/eigen.hpp"
#include "peft/interop/xtensor.hpp"
#include "peft/base/dense.hpp"
#include "peft/kernels/gemm.hpp"
#include "peft/kernels/reference/gemm.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapted_linear.hpp"
