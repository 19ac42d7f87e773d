// peft/kernels/isa.hpp — THE list of instruction sets the kernels are written for, which of them
// this CPU runs, and which one the kernels use now.
//
// Every kernel exists as a scalar reference (the truth the tests compare against) and a portable
// xsimd version (whatever the build's -march gives: SSE2 by default); x86 adds AVX2+FMA and
// AVX-512 versions compiled with function-level targets, so one binary built without -march
// still runs the AVX-512 code on a machine that has it; on AArch64 the NEON tier (NEON with the
// dot-product instructions, function-level target too) has the integer dot kernels. Each ISA is
// a tag type; tags inherit as xsimd's arch tags do (avx512 : avx2 : portable : reference,
// neon : portable), so a kernel an ISA does not provide falls back to its parent's, both in
// overload resolution and in the dispatch tables (kernels/dispatch.hpp) built from isa_tags.
//
// The process-wide choice starts at the best the CPU supports and can be changed (tests run every
// version); the environment variable PEFT_ISA=reference|portable|avx2|avx512|neon caps it for a
// whole run (that ISA, or where the CPU lacks it its nearest supported ancestor), and compiling
// with PEFT_FORCE_REFERENCE selects the reference.
//
//   peft::kernels::set_active_isa(peft::kernels::isa::avx2);   // throws if the CPU lacks it
//
// Adding an ISA: an enumerator, a tag and an entry of isa_tags here (plus its target macros when
// it needs them), and a folder kernels/<arch>/<isa>/ (vec.hpp and the operations it provides,
// each included by its operation's header: linear.hpp, quantized.hpp). Every dispatch table and
// every test that iterates all_isas picks it up; operations it does not provide run its parent's.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <type_traits>

#include "peft/core/error.hpp"
#include "peft/core/type_list.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define PEFT_X86_DISPATCH 1
// Regions of code compiled for one target (functions and templates defined inside keep it when
// instantiated; open them after every #include). The caller dispatches at run time.
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

#if defined(__aarch64__) && defined(__ARM_NEON)
#define PEFT_ARM_NEON 1
// The NEON tier's region: AArch64 NEON plus the dot-product instructions (FEAT_DotProd), chosen
// at run time like the x86 tiers.
#if defined(__clang__)
#define PEFT_BEGIN_TARGET_NEON_DOTPROD \
  _Pragma("clang attribute push(__attribute__((target(\"dotprod\"))), apply_to = function)")
#define PEFT_END_TARGET _Pragma("clang attribute pop")
#else
#define PEFT_BEGIN_TARGET_NEON_DOTPROD _Pragma("GCC push_options") _Pragma("GCC target(\"arch=armv8.2-a+dotprod\")")
#define PEFT_END_TARGET _Pragma("GCC pop_options")
#endif
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#else
#define PEFT_ARM_NEON 0
#endif

namespace peft::kernels {

/// Kernel versions; the order of isa_tags below.
enum class isa : std::uint8_t { reference, portable, avx2, avx512, neon };

// ---- the tags ---------------------------------------------------------------------------------
// Each ISA's tag lives in the ISA's own namespace, where its kernels are: a call f(tag, ...)
// finds, by argument-dependent lookup, the overloads of that namespace and of every ISA the tag
// derives from, and overload resolution picks the most derived one.

/// Scalar loops, double accumulation: the truth.
namespace reference {
struct tag {
  static constexpr isa value = isa::reference;
  static constexpr std::string_view name = "reference";
  static bool supported() noexcept { return true; }
};
}  // namespace reference

/// xsimd batches of the build's default architecture.
namespace portable {
struct tag : reference::tag {
  static constexpr isa value = isa::portable;
  static constexpr std::string_view name = "portable";
  static bool supported() noexcept { return true; }
};
}  // namespace portable

/// x86 AVX2 + FMA (+ F16C), function-level target.
namespace avx2 {
struct tag : portable::tag {
  static constexpr isa value = isa::avx2;
  static constexpr std::string_view name = "avx2";
  static bool supported() noexcept {
#if PEFT_X86_DISPATCH
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }
};
}  // namespace avx2

/// x86 AVX-512 F/BW/VL/DQ, function-level target.
namespace avx512 {
struct tag : avx2::tag {
  static constexpr isa value = isa::avx512;
  static constexpr std::string_view name = "avx512";
  static bool supported() noexcept {
#if PEFT_X86_DISPATCH
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }
};
}  // namespace avx512

/// Arm NEON with the dot-product instructions (AArch64 with FEAT_DotProd, read from the
/// kernel's hardware capabilities on Linux; elsewhere not chosen: the portable tier, which is
/// NEON through xsimd on AArch64, runs instead).
namespace neon {
struct tag : portable::tag {
  static constexpr isa value = isa::neon;
  static constexpr std::string_view name = "neon";
  static bool supported() noexcept {
#if PEFT_ARM_NEON && defined(__linux__)
    constexpr unsigned long hwcap_asimddp = 1ul << 20;  // HWCAP_ASIMDDP of <asm/hwcap.h>
    return (::getauxval(AT_HWCAP) & hwcap_asimddp) != 0;
#else
    return false;
#endif
  }
};
}  // namespace neon

using reference_tag = reference::tag;
using portable_tag = portable::tag;
using avx2_tag = avx2::tag;
using avx512_tag = avx512::tag;
using neon_tag = neon::tag;

/// THE ISA list, in the enumerators' order; among the ISAs a CPU supports, a later one that
/// derives from an earlier one is preferred.
using isa_tags = type_list<reference_tag, portable_tag, avx2_tag, avx512_tag, neon_tag>;

inline constexpr std::size_t isa_count = isa_tags::size;

namespace detail {

template <class... Tags>
constexpr bool tags_in_enum_order(type_list<Tags...>) {
  std::size_t i = 0;
  return ((static_cast<std::size_t>(Tags::value) == i++) && ...);
}
static_assert(tags_in_enum_order(isa_tags{}), "isa_tags must list the tags in the order of enum isa");

/// Calls f(Tag{}) for each tag of the list, in order.
template <class... Tags, class F>
constexpr void for_each_isa_tag(type_list<Tags...>, F&& f) {
  (f(Tags{}), ...);
}

/// derives[d][b]: whether ISA d's tag is ISA b's tag or derives from it.
template <class... Tags>
constexpr auto derivation_table(type_list<Tags...>) {
  std::array<std::array<bool, sizeof...(Tags)>, sizeof...(Tags)> t{};
  auto row = [&]<class D>(D) {
    ((t[static_cast<std::size_t>(D::value)][static_cast<std::size_t>(Tags::value)] =
          std::is_base_of_v<Tags, D>),
     ...);
  };
  (row(Tags{}), ...);
  return t;
}
inline constexpr auto isa_derivation = derivation_table(isa_tags{});

/// How many tags of the list a tag derives from, itself included (reference: 1).
template <class... Tags>
constexpr std::array<int, sizeof...(Tags)> depth_table(type_list<Tags...>) {
  std::array<int, sizeof...(Tags)> d{};
  for (std::size_t i = 0; i < sizeof...(Tags); ++i) {
    for (std::size_t j = 0; j < sizeof...(Tags); ++j) d[i] += isa_derivation[i][j] ? 1 : 0;
  }
  return d;
}
inline constexpr auto isa_depth = depth_table(isa_tags{});

}  // namespace detail

/// Every ISA of the list, in order (tests iterate it and skip the unsupported ones).
inline constexpr std::array<isa, isa_count> all_isas = [] {
  std::array<isa, isa_count> a{};
  std::size_t n = 0;
  detail::for_each_isa_tag(isa_tags{}, [&](auto tag) { a[n++] = decltype(tag)::value; });
  return a;
}();

inline constexpr std::string_view isa_name(isa i) noexcept {
  std::string_view name = "?";
  detail::for_each_isa_tag(isa_tags{}, [&](auto tag) {
    if (decltype(tag)::value == i) name = decltype(tag)::name;
  });
  return name;
}

/// Whether `derived` is `base` or one of its descendants (avx512 derives from avx2, portable
/// and reference). False for values outside the list.
inline constexpr bool isa_derives_from(isa derived, isa base) noexcept {
  const auto d = static_cast<std::size_t>(derived), b = static_cast<std::size_t>(base);
  return d < isa_count && b < isa_count && detail::isa_derivation[d][b];
}

/// Whether this CPU (and this compiler) can run the version.
inline bool isa_supported(isa i) noexcept {
  bool yes = false;
  detail::for_each_isa_tag(isa_tags{}, [&](auto tag) {
    if (decltype(tag)::value == i) yes = decltype(tag)::supported();
  });
  return yes;
}

/// The best supported version: the most derived ISA this CPU runs, restricted to PEFT_ISA and
/// its ancestors when PEFT_ISA names an ISA of the list (the reference when the program is
/// compiled with PEFT_FORCE_REFERENCE).
inline isa best_isa() noexcept {
#ifdef PEFT_FORCE_REFERENCE
  return isa::reference;
#else
  const char* env = std::getenv("PEFT_ISA");
  const std::string_view cap_name = env != nullptr ? std::string_view(env) : std::string_view();
  bool capped = false;
  isa cap = isa::reference;
  for (isa i : all_isas) {
    if (cap_name == isa_name(i)) {
      capped = true;
      cap = i;
    }
  }
  isa best = isa::reference;
  for (isa i : all_isas) {
    const bool allowed = !capped || isa_derives_from(cap, i);
    if (allowed && isa_supported(i) &&
        detail::isa_depth[static_cast<std::size_t>(i)] >= detail::isa_depth[static_cast<std::size_t>(best)]) {
      best = i;
    }
  }
  return best;
#endif
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
