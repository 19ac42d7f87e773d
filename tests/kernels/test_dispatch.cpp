// The ISA list and the dispatch tables built from it (kernels/isa.hpp, kernels/dispatch.hpp):
// an ISA without its own overload gets its parent's entry, pointer for pointer, in a table of a
// test operation and in every table of the library; the batch-size switch; the ISA names,
// ancestry and the PEFT_ISA cap.
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/kernels/dispatch.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/linear.hpp"
#include "peft/kernels/quantized.hpp"

namespace test_dispatch {

namespace kernels = peft::kernels;
using kernels::isa;

namespace probe {
// An operation provided by the reference, portable and AVX2 ISAs only: AVX-512 and NEON must
// fall back to AVX2's and portable's overloads.
inline isa which(kernels::reference_tag, int* calls) { return ++*calls, isa::reference; }
inline isa which(kernels::portable_tag, int* calls) { return ++*calls, isa::portable; }
inline isa which(kernels::avx2_tag, int* calls) { return ++*calls, isa::avx2; }

struct which_op {
  template <class Tag, class... A>
  auto operator()(Tag tag, A&&... a) const -> decltype(which(tag, std::forward<A>(a)...)) {
    return which(tag, std::forward<A>(a)...);
  }
};
using which_fn = isa (*)(int*);
}  // namespace probe

TEST_CASE("dispatch tables give an ISA without its own overload its parent's entry", "[kernels][dispatch]") {
  constexpr auto table = kernels::make_dispatch_table<probe::which_fn, probe::which_op>();
  static_assert(table.provider(isa::avx512) == isa::avx2);
  static_assert(table.provider(isa::neon) == isa::portable);
  static_assert(table[isa::avx512] == table[isa::avx2]);
  static_assert(table[isa::neon] == table[isa::portable]);
  // Distinct entries compared at run time: under -fsanitize=address g++ does not fold the
  // comparison of two function addresses into a constant.
  CHECK(table[isa::avx2] != table[isa::portable]);
  CHECK(table[isa::portable] != table[isa::reference]);
  int calls = 0;
  for (isa i : kernels::all_isas) {
    INFO("isa " << kernels::isa_name(i));
    const isa own = i == isa::avx512 ? isa::avx2 : i == isa::neon ? isa::portable : i;
    CHECK(table.provider(i) == own);
    CHECK(table[i](&calls) == own);  // the entry runs the overload it says it runs
  }
  CHECK(calls == static_cast<int>(kernels::isa_count));
  // Overload resolution on the tags (static dispatch) agrees with the table.
  CHECK(probe::which(kernels::avx512_tag{}, &calls) == isa::avx2);
  CHECK(probe::which(kernels::neon_tag{}, &calls) == isa::portable);
  // A value outside the list reads the reference entry.
  CHECK(table[static_cast<isa>(200)] == table[isa::reference]);
}

namespace {
template <class Fn>
void check_table(const kernels::dispatch_table<Fn>& table, const char* op) {
  for (isa i : kernels::all_isas) {
    INFO(op << ": isa " << kernels::isa_name(i) << " runs " << kernels::isa_name(table.provider(i)));
    const isa p = table.provider(i);
    CHECK(kernels::isa_derives_from(i, p));
    CHECK(table[i] == table[p]);
    CHECK(table.provider(p) == p);
  }
  CHECK(table.provider(isa::reference) == isa::reference);
  CHECK(table.provider(isa::portable) == isa::portable);
#if PEFT_X86_DISPATCH
  // NEON code is absent from an x86 build: its entries are portable's.
  CHECK(table.provider(isa::neon) == isa::portable);
  CHECK(table[isa::neon] == table[isa::portable]);
  CHECK(table.provider(isa::avx2) == isa::avx2);
  CHECK(table.provider(isa::avx512) == isa::avx512);
#else
  // x86 code is absent: AVX2 and AVX-512 entries are portable's.
  CHECK(table[isa::avx2] == table[isa::portable]);
  CHECK(table[isa::avx512] == table[isa::portable]);
#endif
}
}  // namespace

TEST_CASE("every kernel table falls back to the parent where an ISA is absent", "[kernels][dispatch]") {
  check_table(kernels::detail::block_nt_table, "block_nt");
  check_table(kernels::detail::block_nn_table, "block_nn");
  check_table(kernels::detail::int8_dot_table, "int8_dot");
  check_table(kernels::detail::q4_0_dot_table, "q4_0_dot");
  check_table(kernels::detail::nf4_dot_table, "nf4_dot");
}

TEST_CASE("with_rows turns a batch size into a compile-time one", "[kernels][dispatch]") {
  for (peft::index m = -1; m <= 10; ++m) {
    int seen = 0, calls = 0;
    kernels::with_rows<8>(m, [&](auto rows) {
      static_assert(rows() >= 1 && rows() <= 8);
      seen = rows();
      ++calls;
    });
    CHECK(calls == 1);
    CHECK(seen == (m >= 1 && m < 8 ? m : 8));
  }
}

TEST_CASE("the ISAs this build compiles: NEON (with DotProd) on AArch64, AVX2 and AVX-512 on x86", "[kernels][dispatch]") {
  // Printed, so that a log says which kernels ran (tests/aarch64 runs this under qemu-user).
  WARN("kernels: active ISA " << kernels::isa_name(kernels::active_isa()));
#if PEFT_ARM_NEON
  // The NEON tier needs the dot-product instructions (qemu's default CPU and every Arm core since
  // Cortex-A55 have them); without them the portable tier, NEON through xsimd, runs.
  CHECK((kernels::active_isa() == isa::neon) == kernels::isa_supported(isa::neon));
  CHECK(kernels::isa_supported(isa::portable));
  CHECK_FALSE(kernels::isa_supported(isa::avx2));
  CHECK_FALSE(kernels::isa_supported(isa::avx512));
#else
  CHECK_FALSE(kernels::isa_supported(isa::neon));
#endif
#if !PEFT_X86_DISPATCH
  CHECK_FALSE(kernels::isa_supported(isa::avx2));
#endif
}

TEST_CASE("the ISA list: names, order, ancestry and the PEFT_ISA cap", "[kernels][dispatch]") {
  static_assert(kernels::all_isas[0] == isa::reference && kernels::isa_count == 5);
  std::vector<std::string> names;
  for (isa i : kernels::all_isas) names.emplace_back(kernels::isa_name(i));
  CHECK(names == std::vector<std::string>{"reference", "portable", "avx2", "avx512", "neon"});
  CHECK(kernels::isa_name(static_cast<isa>(77)) == "?");
  CHECK(kernels::isa_derives_from(isa::avx512, isa::avx2));
  CHECK(kernels::isa_derives_from(isa::avx512, isa::reference));
  CHECK(kernels::isa_derives_from(isa::neon, isa::portable));
  CHECK_FALSE(kernels::isa_derives_from(isa::neon, isa::avx2));
  CHECK_FALSE(kernels::isa_derives_from(isa::portable, isa::avx2));
  CHECK_FALSE(kernels::isa_derives_from(static_cast<isa>(77), isa::reference));
  CHECK(kernels::isa_supported(isa::reference));
  CHECK(kernels::isa_supported(isa::portable));
  CHECK_FALSE((kernels::isa_supported(isa::neon) && kernels::isa_supported(isa::avx2)));

  // best_isa: the most derived supported ISA, capped by PEFT_ISA to it and its ancestors.
  const char* saved = std::getenv("PEFT_ISA");
  const std::optional<std::string> previous = saved ? std::optional<std::string>(saved) : std::nullopt;
  ::unsetenv("PEFT_ISA");
  const isa best = kernels::best_isa();
  CHECK(kernels::isa_supported(best));
  for (isa i : kernels::all_isas) {
    if (kernels::isa_supported(i)) CHECK(kernels::isa_derives_from(best, i));
  }
#ifndef PEFT_FORCE_REFERENCE
  for (isa cap : kernels::all_isas) {
    ::setenv("PEFT_ISA", std::string(kernels::isa_name(cap)).c_str(), 1);
    const isa got = kernels::best_isa();
    INFO("PEFT_ISA=" << kernels::isa_name(cap) << " gives " << kernels::isa_name(got));
    CHECK(kernels::isa_derives_from(cap, got));
    CHECK(kernels::isa_supported(got));
    if (kernels::isa_supported(cap)) CHECK(got == cap);
  }
  ::setenv("PEFT_ISA", "no-such-isa", 1);
  CHECK(kernels::best_isa() == best);
#endif
  if (previous) {
    ::setenv("PEFT_ISA", previous->c_str(), 1);
  } else {
    ::unsetenv("PEFT_ISA");
  }
}

}  // namespace test_dispatch
