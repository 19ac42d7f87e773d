// peft/kernels/isa.hpp — which instruction set the kernels use, chosen at run time.
//
// Every kernel exists as a scalar reference (the truth the tests compare against), a portable
// xsimd version (whatever the build's -march gives: SSE2 by default), and AVX2+FMA and AVX-512
// versions compiled with function-level target attributes, so one binary built without -march
// still runs the AVX-512 code on a machine that has it. The process-wide choice starts at the
// best the CPU supports and can be changed (tests run every version; the environment variable
// PEFT_ISA=reference|portable|avx2|avx512 caps it for a whole run).
//
//   peft::kernels::set_active_isa(peft::kernels::isa::avx2);   // throws if the CPU lacks it
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "peft/core/error.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define PEFT_X86_DISPATCH 1
#include <immintrin.h>
// Function-level targets of the x86 kernel versions (the caller dispatches at run time).
#define PEFT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PEFT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
// Regions of code compiled for one target (templates defined inside keep it when instantiated).
#if defined(__clang__)
#define PEFT_BEGIN_TARGET_AVX2 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define PEFT_BEGIN_TARGET_AVX512                                                                 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\"))), apply_to = function)")
#define PEFT_END_TARGET _Pragma("clang attribute pop")
#else
#define PEFT_BEGIN_TARGET_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define PEFT_BEGIN_TARGET_AVX512 \
  _Pragma("GCC push_options")    \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")")
#define PEFT_END_TARGET _Pragma("GCC pop_options")
#endif
#else
#define PEFT_X86_DISPATCH 0
#endif

namespace peft::kernels {

/// Kernel versions, from the truth to the fastest.
enum class isa : std::uint8_t { reference, portable, avx2, avx512 };

inline constexpr std::string_view isa_name(isa i) noexcept {
  switch (i) {
    case isa::reference: return "reference";
    case isa::portable: return "portable";
    case isa::avx2: return "avx2";
    case isa::avx512: return "avx512";
  }
  return "?";
}

/// Whether this CPU (and this compiler) can run the version.
inline bool isa_supported(isa i) noexcept {
  switch (i) {
    case isa::reference:
    case isa::portable: return true;
#if PEFT_X86_DISPATCH
    case isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
#else
    case isa::avx2:
    case isa::avx512: return false;
#endif
  }
  return false;
}

/// The best supported version, capped by PEFT_ISA when it is set to a known name (and the
/// reference when the program is compiled with PEFT_FORCE_REFERENCE).
inline isa best_isa() noexcept {
#ifdef PEFT_FORCE_REFERENCE
  return isa::reference;
#endif
  isa cap = isa::avx512;
  if (const char* env = std::getenv("PEFT_ISA")) {
    const std::string_view v(env);
    for (isa i : {isa::reference, isa::portable, isa::avx2, isa::avx512}) {
      if (v == isa_name(i)) cap = i;
    }
  }
  for (isa i : {isa::avx512, isa::avx2, isa::portable}) {
    if (static_cast<int>(i) <= static_cast<int>(cap) && isa_supported(i)) return i;
  }
  return isa::reference;
}

namespace detail {
inline std::atomic<isa>& active_isa_slot() noexcept {
  static std::atomic<isa> slot{best_isa()};
  return slot;
}
}  // namespace detail

/// The version the kernels use now.
inline isa active_isa() noexcept { return detail::active_isa_slot().load(std::memory_order_relaxed); }

/// Selects the version for the whole process; throws unsupported_error when the CPU cannot run it.
inline void set_active_isa(isa i) {
  if (!isa_supported(i)) {
    std::string msg = "this CPU cannot run the ";
    msg += isa_name(i);
    msg += " kernels";
    peft::detail::raise<unsupported_error>("kernels::set_active_isa", msg);
  }
  detail::active_isa_slot().store(i, std::memory_order_relaxed);
}

/// Sets the version for a scope and restores the previous one (tests, benchmarks).
class scoped_isa {
 public:
  explicit scoped_isa(isa i) : previous_(active_isa()) { set_active_isa(i); }
  ~scoped_isa() { detail::active_isa_slot().store(previous_, std::memory_order_relaxed); }
  scoped_isa(const scoped_isa&) = delete;
  scoped_isa& operator=(const scoped_isa&) = delete;

 private:
  isa previous_;
};

}  // namespace peft::kernels
