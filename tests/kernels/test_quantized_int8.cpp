// The integer dot kernels with 8-bit activations (kernels/quantized_int8.hpp) and their
// activation formats (base/formats/q8_k.hpp): ggml's Q8_K and x86 Q8_0 activation quantizers on
// hand-checked blocks; every kernel version the CPU runs against the reference on odd shapes
// (every batch size, strided activations and outputs); the reference against a plain double
// product of the dequantized weights and dequantized activations; and the int8 result against
// the exact f32-activation kernels (kernels/quantized.hpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/base/formats/q4_0.hpp"
#include "peft/base/formats/q4_k.hpp"
#include "peft/base/formats/q6_k.hpp"
#include "peft/base/formats/q8_0.hpp"
#include "peft/base/formats/q8_k.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/quantized.hpp"
#include "peft/kernels/quantized_int8.hpp"
#include "support/test_support.hpp"

namespace test_quantized_int8 {

namespace formats = peft::formats;
namespace kernels = peft::kernels;
using ix = peft::index;
using kernels::isa;

// ---- the four weight formats, each with its activation format --------------------------------
// decode_abs writes per weight the sum of the magnitudes of the parts the kernels add up
// (q4_k: |d sc q| + |dmin m|; the others |w|): the scale of the float rounding of a dot.

struct q4_k_case {
  using block = formats::block_q4_k;
  using act = formats::block_q8_k;
  static constexpr ix size = 256;
  static constexpr const char* name = "q4_k . q8_k";
  static bool quantize(const float* x, block& b) { return formats::quantize_q4_k_block(x, b); }
  static void quantize_rows(const float* x, ix ldx, ix m, ix nb, act* out) {
    kernels::quantize_q8_k_rows(x, ldx, m, nb, out);
  }
  static void decode(const block& b, double* w) { formats::decode_q4_k_block(b, w); }
  static void decode_abs(const block& b, double* w) {
    std::uint8_t sc[8], mn[8];
    formats::q4_k_scale_mins(b, sc, mn);
    const double d = formats::half_to_float(b.d), dmin = formats::half_to_float(b.dmin);
    for (int p = 0; p < 256; ++p) {
      const int s = p / 32, c = p / 64;
      const std::uint8_t byte = b.qs[32 * c + p % 32];
      const int q = (p % 64) < 32 ? (byte & 15) : (byte >> 4);
      w[p] = std::abs(d * sc[s] * q) + std::abs(dmin * mn[s]);
    }
  }
  static void decode_act(const act& a, double* x) { formats::decode_q8_k_block(a, x); }
  static void dot(isa i, const block* w, ix nb, ix n, const act* x, ix ldx, ix m, float* y, ix ldy) {
    kernels::q4_k_q8_k_dot(i, w, nb, n, x, ldx, m, y, ldy);
  }
  static void exact(isa i, const block* w, ix nb, ix n, const float* x, ix ldx, ix m, float* y, ix ldy) {
    kernels::q4_k_dot(i, w, nb, n, x, ldx, m, y, ldy);
  }
};

struct q6_k_case {
  using block = formats::block_q6_k;
  using act = formats::block_q8_k;
  static constexpr ix size = 256;
  static constexpr const char* name = "q6_k . q8_k";
  static bool quantize(const float* x, block& b) { return formats::quantize_q6_k_block(x, b); }
  static void quantize_rows(const float* x, ix ldx, ix m, ix nb, act* out) {
    kernels::quantize_q8_k_rows(x, ldx, m, nb, out);
  }
  static void decode(const block& b, double* w) { formats::decode_q6_k_block(b, w); }
  static void decode_abs(const block& b, double* w) {
    decode(b, w);
    for (int p = 0; p < 256; ++p) w[p] = std::abs(w[p]);
  }
  static void decode_act(const act& a, double* x) { formats::decode_q8_k_block(a, x); }
  static void dot(isa i, const block* w, ix nb, ix n, const act* x, ix ldx, ix m, float* y, ix ldy) {
    kernels::q6_k_q8_k_dot(i, w, nb, n, x, ldx, m, y, ldy);
  }
  static void exact(isa i, const block* w, ix nb, ix n, const float* x, ix ldx, ix m, float* y, ix ldy) {
    kernels::q6_k_dot(i, w, nb, n, x, ldx, m, y, ldy);
  }
};

struct q8_0_case {
  using block = formats::block_q8_0;
  using act = formats::block_q8_0;
  static constexpr ix size = 32;
  static constexpr const char* name = "q8_0 . q8_0";
  static bool quantize(const float* x, block& b) { return formats::quantize_q8_0_block(x, b); }
  static void quantize_rows(const float* x, ix ldx, ix m, ix nb, act* out) {
    kernels::quantize_q8_0_rows(x, ldx, m, nb, out);
  }
  static void decode(const block& b, double* w) { formats::decode_q8_0_block(b, w); }
  static void decode_abs(const block& b, double* w) {
    decode(b, w);
    for (int p = 0; p < 32; ++p) w[p] = std::abs(w[p]);
  }
  static void decode_act(const act& a, double* x) { formats::decode_q8_0_block(a, x); }
  static void dot(isa i, const block* w, ix nb, ix n, const act* x, ix ldx, ix m, float* y, ix ldy) {
    kernels::q8_0_q8_0_dot(i, w, nb, n, x, ldx, m, y, ldy);
  }
  static void exact(isa i, const block* w, ix nb, ix n, const float* x, ix ldx, ix m, float* y, ix ldy) {
    kernels::q8_0_dot(i, w, nb, n, x, ldx, m, y, ldy);
  }
};

struct q4_0_case {
  using block = formats::block_q4_0;
  using act = formats::block_q8_0;
  static constexpr ix size = 32;
  static constexpr const char* name = "q4_0 . q8_0";
  static bool quantize(const float* x, block& b) { return formats::quantize_q4_0_block(x, b); }
  static void quantize_rows(const float* x, ix ldx, ix m, ix nb, act* out) {
    kernels::quantize_q8_0_rows(x, ldx, m, nb, out);
  }
  static void decode(const block& b, double* w) { formats::decode_q4_0_block(b, w); }
  static void decode_abs(const block& b, double* w) {
    decode(b, w);
    for (int p = 0; p < 32; ++p) w[p] = std::abs(w[p]);
  }
  static void decode_act(const act& a, double* x) { formats::decode_q8_0_block(a, x); }
  static void dot(isa i, const block* w, ix nb, ix n, const act* x, ix ldx, ix m, float* y, ix ldy) {
    kernels::q4_0_q8_0_dot(i, w, nb, n, x, ldx, m, y, ldy);
  }
  static void exact(isa i, const block* w, ix nb, ix n, const float* x, ix ldx, ix m, float* y, ix ldy) {
    kernels::q4_0_dot(i, w, nb, n, x, ldx, m, y, ldy);
  }
};

/// A product to test: n weight rows of nb blocks, m activation rows (f32, ldx_f floats apart, and
/// quantized, ldx blocks apart with unused blocks between rows).
template <class C>
struct problem {
  ix nb, n, m, ldx;
  ix x_ld;  // floats between the rows of x
  std::vector<typename C::block> w;
  std::vector<float> x;
  std::vector<typename C::act> xq;

  problem(ix nb_, ix n_, ix m_, peft::rng& gen)
      : nb(nb_), n(n_), m(m_), ldx(nb_ + 2), x_ld(nb_ * C::size + 5) {
    std::vector<float> row(static_cast<std::size_t>(nb * C::size));
    w.resize(static_cast<std::size_t>(n * nb));
    for (ix j = 0; j < n; ++j) {
      // Rows of different scales, and some with an offset (q4_k's mins come into play).
      const double scale = 0.05 * (1 + j % 4), shift = j % 3 == 0 ? 0.03 : 0.0;
      for (auto& v : row) v = static_cast<float>(gen.normal(shift, scale));
      for (ix b = 0; b < nb; ++b) REQUIRE(C::quantize(row.data() + b * C::size, w[static_cast<std::size_t>(j * nb + b)]));
    }
    const ix ldx_f = x_ld;
    x.assign(static_cast<std::size_t>(m * ldx_f), 0.0f);
    for (ix r = 0; r < m; ++r) {
      for (ix p = 0; p < nb * C::size; ++p) x[static_cast<std::size_t>(r * ldx_f + p)] = static_cast<float>(gen.normal(0.0, 1.0 + r));
    }
    // Quantized with the library's row helper into a buffer of nb blocks per row, then spread to
    // rows ldx blocks apart (the gaps hold garbage the kernels must not read).
    std::vector<typename C::act> packed(static_cast<std::size_t>(m * nb));
    C::quantize_rows(x.data(), ldx_f, m, nb, packed.data());
    xq.resize(static_cast<std::size_t>(m * ldx));
    for (auto& a : xq) std::memset(&a, 0x5a, sizeof a);
    for (ix r = 0; r < m; ++r) {
      for (ix b = 0; b < nb; ++b) xq[static_cast<std::size_t>(r * ldx + b)] = packed[static_cast<std::size_t>(r * nb + b)];
    }
  }

  /// The plain double product of the dequantized weights and activations, and the sum of the
  /// magnitudes of its terms, at (r, j).
  void plain(ix r, ix j, double& value, double& magnitude) const {
    std::vector<double> wv(C::size), wa(C::size), xv(C::size);
    value = 0.0;
    magnitude = 0.0;
    for (ix b = 0; b < nb; ++b) {
      C::decode(w[static_cast<std::size_t>(j * nb + b)], wv.data());
      C::decode_abs(w[static_cast<std::size_t>(j * nb + b)], wa.data());
      C::decode_act(xq[static_cast<std::size_t>(r * ldx + b)], xv.data());
      for (ix p = 0; p < C::size; ++p) {
        value += wv[p] * xv[p];
        magnitude += wa[p] * std::abs(xv[p]);
      }
    }
  }

  /// The exact product of the dequantized weights with the f32 activations, and its magnitude.
  void exact(ix r, ix j, double& value, double& magnitude) const {
    std::vector<double> wv(C::size), wa(C::size);
    value = 0.0;
    magnitude = 0.0;
    for (ix b = 0; b < nb; ++b) {
      C::decode(w[static_cast<std::size_t>(j * nb + b)], wv.data());
      C::decode_abs(w[static_cast<std::size_t>(j * nb + b)], wa.data());
      for (ix p = 0; p < C::size; ++p) {
        const double xv = x[static_cast<std::size_t>(r * x_ld + b * C::size + p)];
        value += wv[p] * xv;
        magnitude += wa[p] * std::abs(xv);
      }
    }
  }
};

template <class C>
void check_kernels_against_reference() {
  peft::rng gen(20240611);
  const auto isas = peft_test::supported_isas();
  for (ix nb : {ix{1}, ix{3}}) {
    for (ix m = 1; m <= kernels::max_dot_rows; ++m) {
      const ix n = 5 + m % 3;
      problem<C> pb(nb, n, m, gen);
      const ix ldy = n + 3;
      std::vector<float> ref(static_cast<std::size_t>(m * ldy), -7.0f);
      C::dot(isa::reference, pb.w.data(), nb, n, pb.xq.data(), pb.ldx, m, ref.data(), ldy);
      int nonzero = 0;
      for (ix r = 0; r < m; ++r) {
        for (ix j = 0; j < n; ++j) {
          double value = 0.0, magnitude = 0.0;
          pb.plain(r, j, value, magnitude);
          const double got = ref[static_cast<std::size_t>(r * ldy + j)];
          INFO(C::name << " nb " << nb << " m " << m << " (" << r << ", " << j << ")");
          CHECK(std::abs(got - value) <= 1e-6 * magnitude);
          nonzero += got != 0.0 && magnitude > 0.0 ? 1 : 0;
        }
        for (ix j = n; j < ldy; ++j) CHECK(ref[static_cast<std::size_t>(r * ldy + j)] == -7.0f);  // untouched
      }
      CHECK(nonzero == m * n);
      for (isa i : isas) {
        std::vector<float> y(static_cast<std::size_t>(m * ldy), -7.0f);
        C::dot(i, pb.w.data(), nb, n, pb.xq.data(), pb.ldx, m, y.data(), ldy);
        for (ix r = 0; r < m; ++r) {
          for (ix j = 0; j < ldy; ++j) {
            const auto at = static_cast<std::size_t>(r * ldy + j);
            INFO(C::name << " on " << kernels::isa_name(i) << " nb " << nb << " m " << m << " (" << r << ", " << j << ")");
            if (j >= n) {
              CHECK(y[at] == -7.0f);
              continue;
            }
            double value = 0.0, magnitude = 0.0;
            pb.plain(r, j, value, magnitude);
            CHECK(std::abs(static_cast<double>(y[at]) - ref[at]) <= 1e-5 * magnitude);
          }
        }
      }
    }
  }
}

template <class C>
void check_close_to_exact() {
  peft::rng gen(77);
  const ix nb = 4, n = 9, m = 3;
  problem<C> pb(nb, n, m, gen);
  for (isa i : peft_test::supported_isas()) {
    std::vector<float> yq(static_cast<std::size_t>(m * n)), yf(static_cast<std::size_t>(m * n));
    C::dot(i, pb.w.data(), nb, n, pb.xq.data(), pb.ldx, m, yq.data(), n);
    C::exact(i, pb.w.data(), nb, n, pb.x.data(), pb.x_ld, m, yf.data(), n);
    double worst = 0.0;
    for (ix r = 0; r < m; ++r) {
      for (ix j = 0; j < n; ++j) {
        double value = 0.0, magnitude = 0.0;
        pb.exact(r, j, value, magnitude);
        REQUIRE(magnitude > 0.0);
        const auto at = static_cast<std::size_t>(r * n + j);
        INFO(C::name << " on " << kernels::isa_name(i) << " (" << r << ", " << j << ")");
        CHECK(std::abs(yf[at] - value) <= 1e-5 * magnitude);  // the exact kernel
        const double err = std::abs(yq[at] - value) / magnitude;
        CHECK(err < 1e-2);
        worst = std::max(worst, err);
      }
    }
    INFO(C::name << " on " << kernels::isa_name(i) << ": worst relative error " << worst);
    CHECK(worst > 0.0);  // the activations were rounded
    CHECK(worst < 5e-3);
  }
}

TEST_CASE("integer dot kernels equal the reference on every ISA, which equals the dequantized product",
          "[kernels][quantized][int8]") {
  check_kernels_against_reference<q4_k_case>();
  check_kernels_against_reference<q6_k_case>();
  check_kernels_against_reference<q8_0_case>();
  check_kernels_against_reference<q4_0_case>();
}

TEST_CASE("integer dot kernels stay close to the exact f32-activation product", "[kernels][quantized][int8]") {
  check_close_to_exact<q4_k_case>();
  check_close_to_exact<q6_k_case>();
  check_close_to_exact<q8_0_case>();
  check_close_to_exact<q4_0_case>();
}

TEST_CASE("integer dot tables: AVX-512 runs AVX2's kernels, NEON its own on AArch64", "[kernels][quantized][int8]") {
#if PEFT_X86_DISPATCH
  static_assert(kernels::detail::q4_k_q8_k_dot_table.provider(isa::avx512) == isa::avx2);
  static_assert(kernels::detail::q6_k_q8_k_dot_table.provider(isa::avx512) == isa::avx2);
#else
  // x86 code is absent (an Arm build): AVX2 and AVX-512 entries are portable's.
  static_assert(kernels::detail::q4_k_q8_k_dot_table.provider(isa::avx512) == isa::portable);
  static_assert(kernels::detail::q6_k_q8_k_dot_table.provider(isa::avx2) == isa::portable);
#endif
#if PEFT_ARM_NEON
  static_assert(kernels::detail::q8_0_q8_0_dot_table.provider(isa::neon) == isa::neon);  // vdotq_s32
#else
  static_assert(kernels::detail::q8_0_q8_0_dot_table.provider(isa::neon) == isa::portable);
#endif
  static_assert(kernels::detail::q4_0_q8_0_dot_table.provider(isa::portable) == isa::portable);
  CHECK(kernels::detail::q4_k_q8_k_dot_table[isa::avx512] == kernels::detail::q4_k_q8_k_dot_table[isa::avx2]);
  // Empty batches write nothing.
  float y = 3.0f;
  kernels::q4_k_q8_k_dot(isa::reference, nullptr, 1, 0, nullptr, 1, 1, &y, 1);
  kernels::q8_0_q8_0_dot(isa::reference, nullptr, 1, 1, nullptr, 1, 0, &y, 1);
  CHECK(y == 3.0f);
}

TEST_CASE("quantize_q8_k_block is ggml's quantize_row_q8_K_ref", "[formats][q8_k]") {
  static_assert(sizeof(formats::block_q8_k) == 292);
  std::vector<float> x(256, 0.0f);
  SECTION("largest magnitude negative: iscale = -127 / -127 = 1, codes round(x) ties to even") {
    x[0] = 2.5f;     // 2 (even; halves away from zero would give 3)
    x[1] = -3.5f;    // -4
    x[2] = 0.5f;     // 0
    x[3] = 1.5f;     // 2
    x[4] = -0.49f;   // 0
    x[5] = 100.6f;   // 101
    x[6] = -127.0f;  // the max (first of largest magnitude): -127
    x[7] = 127.0f;   // as large, later: 127
    x[20] = 7.0f;    // group 1
    x[255] = -1.5f;  // group 15: -2
    formats::block_q8_k b{};
    formats::quantize_q8_k_block(x.data(), b);
    CHECK(b.d == 1.0f);
    const int expect[8] = {2, -4, 0, 2, 0, 101, -127, 127};
    for (int i = 0; i < 8; ++i) CHECK(b.qs[i] == expect[i]);
    CHECK(b.qs[20] == 7);
    CHECK(b.qs[255] == -2);
    CHECK(b.bsums[0] == 2 - 4 + 0 + 2 + 0 + 101 - 127 + 127);
    CHECK(b.bsums[1] == 7);
    CHECK(b.bsums[15] == -2);
    int others = 0;
    for (int g = 2; g < 15; ++g) others += b.bsums[g] != 0 ? 1 : 0;
    CHECK(others == 0);
  }
  SECTION("largest magnitude positive: the codes flip sign, d = 1 / iscale < 0") {
    x[10] = 2.0f;   // the max: iscale = -63.5
    x[11] = -2.0f;  // as large, later: 127
    x[12] = 1.0f;   // -63.5: -64 (even)
    x[13] = 0.5f;   // -31.75: -32
    x[14] = 0.01f;  // -0.635: -1
    formats::block_q8_k b{};
    formats::quantize_q8_k_block(x.data(), b);
    CHECK(b.d == 1.0f / -63.5f);
    CHECK(b.qs[10] == -127);
    CHECK(b.qs[11] == 127);
    CHECK(b.qs[12] == -64);
    CHECK(b.qs[13] == -32);
    CHECK(b.qs[14] == -1);
    CHECK(b.bsums[0] == -127 + 127 - 64 - 32 - 1);
    // Every value within |d| / 2 of its decoding.
    double v[256];
    formats::decode_q8_k_block(b, v);
    for (int i = 0; i < 256; ++i) CHECK(std::abs(v[i] - x[static_cast<std::size_t>(i)]) <= std::abs(b.d) / 2 * (1 + 1e-6));
  }
  SECTION("an all-zero block is all zeros") {
    formats::block_q8_k b;
    std::memset(&b, 0x33, sizeof b);
    formats::quantize_q8_k_block(x.data(), b);
    CHECK(b.d == 0.0f);
    int nonzero = 0;
    for (int i = 0; i < 256; ++i) nonzero += b.qs[i] != 0 ? 1 : 0;
    for (int g = 0; g < 16; ++g) nonzero += b.bsums[g] != 0 ? 1 : 0;
    CHECK(nonzero == 0);
  }
  SECTION("random blocks: codes in [-127, 127], bsums their group sums, values within |d| / 2") {
    peft::rng gen(5);
    for (int t = 0; t < 20; ++t) {
      for (auto& v : x) v = static_cast<float>(gen.normal(0.0, 0.1 + t));
      formats::block_q8_k b{};
      formats::quantize_q8_k_block(x.data(), b);
      REQUIRE(b.d != 0.0f);
      double v[256];
      formats::decode_q8_k_block(b, v);
      int extremes = 0;
      for (int g = 0; g < 16; ++g) {
        int sum = 0;
        for (int i = 0; i < 16; ++i) {
          const int q = b.qs[16 * g + i];
          CHECK(q >= -127);
          sum += q;
          extremes += std::abs(q) == 127 ? 1 : 0;
        }
        CHECK(b.bsums[g] == sum);
      }
      CHECK(extremes >= 1);
      for (int i = 0; i < 256; ++i) CHECK(std::abs(v[i] - x[static_cast<std::size_t>(i)]) <= std::abs(b.d) / 2 * (1 + 1e-6));
    }
  }
}

TEST_CASE("quantize_q8_0_activations is ggml's x86 quantize_row_q8_0", "[formats][q8_k]") {
  std::vector<float> x(32, 0.0f);
  x[0] = 2.5f;     // 2 (ties to even; the weight quantizer rounds halves away: 3)
  x[1] = -2.5f;    // -2 (-3)
  x[2] = 0.5f;     // 0 (1)
  x[3] = 126.5f;   // 126 (127)
  x[4] = -127.0f;  // amax: d = 1, 127 / amax = 1
  x[5] = 3.25f;    // 3
  formats::block_q8_0 a{}, w{};
  formats::quantize_q8_0_activations(x.data(), a);
  REQUIRE(formats::quantize_q8_0_block(x.data(), w));
  CHECK(a.d == w.d);
  CHECK(formats::half_to_float(a.d) == 1.0f);
  const int act[6] = {2, -2, 0, 126, -127, 3};
  const int weight[6] = {3, -3, 1, 127, -127, 3};
  for (int i = 0; i < 6; ++i) {
    CHECK(a.qs[i] == act[i]);
    CHECK(w.qs[i] == weight[i]);
  }
  for (int i = 6; i < 32; ++i) CHECK(a.qs[i] == 0);
  // An all-zero block: d = 0, codes 0.
  std::vector<float> zero(32, 0.0f);
  std::memset(&a, 0x11, sizeof a);
  formats::quantize_q8_0_activations(zero.data(), a);
  CHECK(a.d == 0);
  int nonzero = 0;
  for (int i = 0; i < 32; ++i) nonzero += a.qs[i] != 0 ? 1 : 0;
  CHECK(nonzero == 0);
}

}  // namespace test_quantized_int8
