// Quantized frozen bases (int8_rowwise, q4_0, q8_0, q4_k, q6_k, nf4 with and without double
// quantization): exact storage sizes, round-trip error bounds, hand-derived encodings, ggml's
// quantizers bit for bit (tests/data/gguf/quantize_golden.safetensors), decoding as ggml does, the fused products of
// every kernel version the CPU runs against a double reference over the dequantized weight
// (with bias, epilogues and tails), matmul_t, LoRA and DoRA over every format against the same
// adapter over a dense copy of the dequantized weight, merging (re-quantization), errors, mutable
// input views, and the list of formats (base/quantized_formats.hpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/adapters/dora.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/int8_rowwise.hpp"
#include "peft/base/nf4.hpp"
#include "peft/base/q4_0.hpp"
#include "peft/base/q4_k.hpp"
#include "peft/base/q6_k.hpp"
#include "peft/base/q8_0.hpp"
#include "peft/base/quantized_formats.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/kernels/decode.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/quantized.hpp"
#include "support/test_support.hpp"

namespace test_quantized {

using ix = peft::index;

namespace {

// ---- formats under test ----------------------------------------------------------------------

struct int8_format {
  using type = peft::int8_rowwise;
  static constexpr const char* label = "int8_rowwise";
  template <class U>
  static type make(peft::matrix_view<const U> w, const U* b) { return type::quantize(w, b); }
};
struct q4_0_format {
  using type = peft::q4_0;
  static constexpr const char* label = "q4_0";
  template <class U>
  static type make(peft::matrix_view<const U> w, const U* b) { return type::quantize(w, b); }
};
struct q8_0_format {
  using type = peft::q8_0;
  static constexpr const char* label = "q8_0";
  template <class U>
  static type make(peft::matrix_view<const U> w, const U* b) { return type::quantize(w, b); }
};
struct q4_k_format {
  using type = peft::q4_k;
  static constexpr const char* label = "q4_k";
  template <class U>
  static type make(peft::matrix_view<const U> w, const U* b) { return type::quantize(w, b); }
};
struct q6_k_format {
  using type = peft::q6_k;
  static constexpr const char* label = "q6_k";
  template <class U>
  static type make(peft::matrix_view<const U> w, const U* b) { return type::quantize(w, b); }
};
struct nf4_dq_format {
  using type = peft::nf4;
  static constexpr const char* label = "nf4 (double quant)";
  template <class U>
  static type make(peft::matrix_view<const U> w, const U* b) { return type::quantize(w, b); }
};
struct nf4_plain_format {
  using type = peft::nf4;
  static constexpr const char* label = "nf4";
  template <class U>
  static type make(peft::matrix_view<const U> w, const U* b) {
    return type::quantize(w, b, peft::nf4_options{.double_quant = false});
  }
};

/// Relative Frobenius tolerance of a product computed in T against a double reference.
template <class T>
constexpr double tol() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

/// W0 decoded in double (the reference every product is held to).
template <class B>
peft::matrix<double> decoded(const B& b) {
  peft::matrix<double> w(b.out_features(), b.in_features());
  for (ix i = 0; i < b.out_features(); ++i) b.dequantize_row(i, w.row(i));
  return w;
}

template <class B>
std::vector<double> bias_of(const B& b) {
  std::vector<double> r;
  if (b.has_bias()) {
    for (ix j = 0; j < b.out_features(); ++j) r.push_back(b.template bias_value<double>(j));
  }
  return r;
}

// ---- error bounds per format ---------------------------------------------------------------------

/// Largest |element error| allowed, per element, for a weight w (f32 values) and its quantization.
double bound(const peft::int8_rowwise& q, const peft::matrix<float>& /*w*/, ix i, ix /*j*/) {
  // round(w / scale) is within 1/2 of w / scale; the decoded product q * scale is exact in double.
  return 0.5 * static_cast<double>(q.scales()[static_cast<std::size_t>(i)]) * (1.0 + 1e-12);
}

double bound(const peft::q4_0& q, const peft::matrix<float>& w, ix i, ix j) {
  // Recompute ggml's exact scale of the block, then: nearest code (|d| / 2) unless the element
  // clamps at q = 15 (w / d > 7.5: within |d|), plus the fp16 rounding of d times |q - 8| <= 8.
  const ix b = j / 32;
  float amax = 0.0f, max = 0.0f;
  for (ix c = b * 32; c < std::min<ix>(w.cols(), b * 32 + 32); ++c) {
    if (amax < std::abs(w(i, c))) {
      amax = std::abs(w(i, c));
      max = w(i, c);
    }
  }
  const double d = static_cast<double>(max) / -8.0;
  const double dq = peft::formats::half_to_float(
      q.blocks()[static_cast<std::size_t>(i * q.blocks_per_row() + b)].d);
  const double ratio = d != 0.0 ? static_cast<double>(w(i, j)) / d : 0.0;
  const double base = ratio > 7.5 ? std::abs(d) : 0.5 * std::abs(d);
  return base * (1.0 + 1e-6) + 8.0 * std::abs(dq - d) + 1e-30;
}

double bound(const peft::q8_0& q, const peft::matrix<float>& w, ix i, ix j) {
  // ggml's exact scale d = amax / 127 of the block (f32): the nearest code is within |d| / 2 (the
  // f32 product w * (1 / d) adds at most ~2e-5 |d|), plus the fp16 rounding of d times |q| <= 127.
  const ix b = j / 32;
  float amax = 0.0f;
  for (ix c = b * 32; c < std::min<ix>(w.cols(), b * 32 + 32); ++c) amax = std::max(amax, std::abs(w(i, c)));
  const double d = static_cast<double>(amax / 127.0f);
  const double dq = peft::formats::half_to_float(
      q.blocks()[static_cast<std::size_t>(i * q.blocks_per_row() + b)].d);
  return 0.5 * d * (1.0 + 1e-4) + 127.0 * std::abs(dq - d) + 1e-30;
}

/// max(step / 2, distance from v to [lo, hi]): the error of the nearest point of a grid with that
/// step and range (slightly loosened for the f32 division that picks it).
double grid_bound(double v, double step, double lo, double hi) {
  const double outside = std::max({0.0, lo - v, v - hi});
  return std::max(0.5 * step, outside) * (1.0 + 1e-5) + 1e-6 * step + 1e-30;
}

double bound(const peft::q4_k& q, const peft::matrix<float>& w, ix i, ix j) {
  // The nearest level of the element's sub-block grid d sc q - dmin m, q = 0..15.
  const auto& blk = q.blocks()[static_cast<std::size_t>(i * q.blocks_per_row() + j / 256)];
  std::uint8_t sc = 0, m = 0;
  peft::formats::q4_k_scale_min(blk.scales, static_cast<int>(j % 256 / 32), sc, m);
  const double ds = peft::formats::half_to_float(blk.d) * sc;
  const double dm = peft::formats::half_to_float(blk.dmin) * m;
  return grid_bound(w(i, j), ds, -dm, 15.0 * ds - dm);
}

double bound(const peft::q6_k& q, const peft::matrix<float>& w, ix i, ix j) {
  // The nearest level of the element's sub-block grid d scale (q - 32), q = 0..63.
  const auto& blk = q.blocks()[static_cast<std::size_t>(i * q.blocks_per_row() + j / 256)];
  const double s = peft::formats::half_to_float(blk.d) * blk.scales[j % 256 / 16];
  return grid_bound(w(i, j), std::abs(s), std::min(-32.0 * s, 31.0 * s), std::max(-32.0 * s, 31.0 * s));
}

/// Half the largest gap between neighbouring NF4 values (between -1 and -0.6961928).
constexpr double nf4_half_gap = 0.5 * (1.0 - 0.6961928009986877);

double bound(const peft::nf4& q, const peft::matrix<float>& w, ix i, ix j) {
  const ix e = i * w.cols() + j;
  const ix b = e / 64;
  double am = 0.0;  // the exact block absmax over the flattened tensor
  for (ix f = b * 64; f < std::min<ix>(w.rows() * w.cols(), b * 64 + 64); ++f) {
    am = std::max(am, std::abs(static_cast<double>(w.data()[f])));
  }
  const double decoded_am = q.block_absmax(b);
  return nf4_half_gap * am * (1.0 + 1e-6) + std::abs(decoded_am - am) + 1e-30;
}

/// Checks every element of q's decoded weight against w within the format's bound.
template <class Q>
void check_round_trip(const Q& q, const peft::matrix<float>& w) {
  const auto d = decoded(q);
  ix violations = 0;
  double worst = 0.0;
  for (ix i = 0; i < w.rows(); ++i) {
    for (ix j = 0; j < w.cols(); ++j) {
      const double err = std::abs(d(i, j) - static_cast<double>(w(i, j)));
      const double lim = bound(q, w, i, j);
      worst = std::max(worst, err / lim);
      if (err > lim) ++violations;
    }
  }
  INFO("worst error / bound " << worst);
  CHECK(violations == 0);
}

/// For double quantization: |decoded absmax - absmax| <= absmax2 * 0.0070313 (half the widest
/// gap of the dynamic map, including -1 -> -0.99296875) plus f32 rounding.
void check_absmax_error(const peft::nf4& q, const peft::matrix<float>& w) {
  const ix n = w.rows() * w.cols();
  for (ix b = 0; b < q.blocks(); ++b) {
    double am = 0.0;
    for (ix f = b * 64; f < std::min<ix>(n, b * 64 + 64); ++f) am = std::max(am, std::abs(static_cast<double>(w.data()[f])));
    const double a2 = q.group_absmax()[static_cast<std::size_t>(b / 256)];
    const double lim = a2 * 0.0070313 + 4e-7 * (am + a2) + 1e-30;
    REQUIRE(std::abs(q.block_absmax(b) - am) <= lim);
  }
}

/// Weight values with a spread of magnitudes per row (so scales differ), all non-zero.
peft::matrix<float> random_weight(ix out, ix in, peft::rng& gen) {
  peft::matrix<float> w(out, in);
  for (ix i = 0; i < out; ++i) {
    const double s = 0.1 + 2.0 * gen.uniform();
    for (ix j = 0; j < in; ++j) {
      double v = gen.uniform(-s, s);
      if (v == 0.0) v = s / 3;
      w(i, j) = static_cast<float>(v);
    }
  }
  return w;
}

/// Counts how often each element of y is covered by an epilogue tile and records each tile's
/// contents at the time of the call.
template <class T>
struct recording_epilogue {
  peft::matrix<int>* cover;
  peft::matrix<double>* seen;
  std::mutex* mutex;
  void operator()(ix i0, ix j0, peft::matrix_view<T> tile) const {
    const std::lock_guard<std::mutex> lock(*mutex);
    for (ix r = 0; r < tile.rows(); ++r) {
      for (ix c = 0; c < tile.cols(); ++c) {
        (*cover)(i0 + r, j0 + c) += 1;
        (*seen)(i0 + r, j0 + c) = static_cast<double>(tile(r, c));
      }
    }
  }
};

struct shape {
  ix out, in;
};
const std::vector<shape> product_shapes{{13, 45}, {33, 100}, {7, 64}, {20, 128}, {256, 256}, {5, 31}};
const std::vector<ix> batches{1, 3, 17, 40};

template <class Format, class T>
void check_products(peft::rng& gen) {
  using Q = typename Format::type;
  for (const auto& s : product_shapes) {
    for (bool with_bias : {false, true}) {
      const auto w = random_weight(s.out, s.in, gen);
      const auto b = peft_test::random_vector<float>(s.out, gen);
      const Q q = Format::make(w.view(), with_bias ? b.data() : nullptr);
      const auto wd = decoded(q);
      const auto bd = bias_of(q);
      REQUIRE(peft_test::nontrivial(wd));
      for (ix m : batches) {
        const auto x = peft_test::random_matrix<T>(m, s.in, gen);
        REQUIRE(peft_test::nontrivial(x));
        const auto ref = peft_test::ref_linear(x, wd, bd);
        const auto dy = peft_test::random_matrix<T>(m, s.out, gen);
        const auto ref_t = peft_test::ref_nn(dy, wd);
        const auto dx0 = peft_test::random_matrix<T>(m, s.in, gen);
        for (auto which : peft_test::supported_isas()) {
          peft::kernels::scoped_isa scope(which);
          INFO(Format::label << " out " << s.out << " in " << s.in << " batch " << m << " bias "
                             << with_bias << " isa " << peft::kernels::isa_name(which));
          peft::matrix<T> y(m, s.out, T{-77});
          q.matmul(x.view(), y.view());
          CHECK(peft_test::rel_error(y, ref) <= tol<T>());

          // With an epilogue: tiles are disjoint, cover y once, and hold x W^T + b when called.
          peft::matrix<T> y2(m, s.out, T{-77});
          peft::matrix<int> cover(m, s.out, 0);
          peft::matrix<double> seen(m, s.out, 0.0);
          std::mutex mutex;
          q.matmul(x.view(), y2.view(), recording_epilogue<T>{&cover, &seen, &mutex});
          CHECK(std::all_of(cover.storage().begin(), cover.storage().end(), [](int c) { return c == 1; }));
          CHECK(peft_test::rel_error(seen, ref) <= tol<T>());
          CHECK(peft_test::exactly_equal(y2, y));

          // dx = dy W, written and accumulated.
          peft::matrix<T> dx(m, s.in, T{55});
          q.matmul_t(dy.view(), dx.view(), false);
          CHECK(peft_test::rel_error(dx, ref_t) <= tol<T>());
          auto dx2 = dx0;
          q.matmul_t(dy.view(), dx2.view(), true);
          CHECK(peft_test::rel_error(dx2, peft_test::add(dx0, ref_t)) <= tol<T>());
        }
      }
    }
  }
}

/// Runs f and checks it throws peft::error of type E whose message starts with "[where]".
template <class E, class F>
void check_error(F&& f, const std::string& where) {
  try {
    f();
    FAIL("expected an error from " << where);
  } catch (const E& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).rfind("[" + where + "]", 0) == 0);
    const peft::error* base = &e;
    CHECK(base != nullptr);
  }
}

}  // namespace

// ---- storage -------------------------------------------------------------------------------------

TEST_CASE("quantized storage sizes are exact per format", "[quantized]") {
  peft::rng gen(1);
  for (const shape s : {shape{1, 1}, shape{3, 32}, shape{5, 40}, shape{7, 64}, shape{2, 100},
                        shape{4, 130}, shape{300, 64}, shape{9, 1000}}) {
    INFO("out " << s.out << " in " << s.in);
    const auto w = random_weight(s.out, s.in, gen);
    const std::size_t out = static_cast<std::size_t>(s.out), in = static_cast<std::size_t>(s.in);
    const std::size_t n = out * in;
    CHECK(peft::int8_rowwise::quantize(w.view()).storage_bytes() == n + 4 * out);
    CHECK(peft::q4_0::quantize(w.view()).storage_bytes() == out * ((in + 31) / 32) * 18);
    CHECK(peft::q8_0::quantize(w.view()).storage_bytes() == out * ((in + 31) / 32) * 34);
    CHECK(peft::q4_k::quantize(w.view()).storage_bytes() == out * ((in + 255) / 256) * 144);
    CHECK(peft::q6_k::quantize(w.view()).storage_bytes() == out * ((in + 255) / 256) * 210);
    CHECK(peft::q4_k::quantize(w.view()).blocks_per_row() == (s.in + 255) / 256);
    const std::size_t blocks = (n + 63) / 64;
    const std::size_t groups = (blocks + 255) / 256;
    const auto dq = peft::nf4::quantize(w.view());
    CHECK(dq.storage_bytes() == (n + 1) / 2 + blocks + 4 * groups + 4);
    CHECK(static_cast<std::size_t>(dq.groups()) == groups);
    CHECK(peft::nf4::quantize(w.view(), static_cast<const float*>(nullptr), {.double_quant = false})
              .storage_bytes() == (n + 1) / 2 + 4 * blocks);
  }
  static_assert(sizeof(peft::formats::block_q4_0) == 18);
  static_assert(sizeof(peft::formats::block_q8_0) == 34 && peft::formats::q8_0_block_size == 32);
  static_assert(sizeof(peft::formats::block_q4_k) == 144 && peft::formats::q4_k_block_size == 256);
  static_assert(sizeof(peft::formats::block_q6_k) == 210 && peft::formats::q6_k_block_size == 256);
}

// ---- round trips -----------------------------------------------------------------------------------

TEST_CASE("quantized round trips stay within each format's bound", "[quantized]") {
  peft::rng gen(2);
  for (const shape s : {shape{3, 32}, shape{5, 40}, shape{7, 64}, shape{4, 130}, shape{300, 64},
                        shape{6, 1000}, shape{1, 1}}) {
    INFO("out " << s.out << " in " << s.in);
    const auto w = random_weight(s.out, s.in, gen);
    REQUIRE(peft_test::nontrivial(w));
    check_round_trip(peft::int8_rowwise::quantize(w.view()), w);
    check_round_trip(peft::q4_0::quantize(w.view()), w);
    check_round_trip(peft::q8_0::quantize(w.view()), w);
    check_round_trip(peft::q4_k::quantize(w.view()), w);
    check_round_trip(peft::q6_k::quantize(w.view()), w);
    const auto dq = peft::nf4::quantize(w.view());
    check_round_trip(dq, w);
    check_absmax_error(dq, w);
    check_round_trip(peft::nf4::quantize(w.view(), static_cast<const float*>(nullptr), {.double_quant = false}), w);
    // Round trips are not trivially exact: the formats do lose information.
    if (s.in >= 32) CHECK(peft_test::rel_error(decoded(peft::q4_0::quantize(w.view())), w) > 1e-3);
    if (s.in >= 32) {
      // The documented typical errors (relative RMS on this uniform data), and their order.
      const double e8 = peft_test::rel_error(decoded(peft::q8_0::quantize(w.view())), w);
      const double e4 = peft_test::rel_error(decoded(peft::q4_k::quantize(w.view())), w);
      const double e6 = peft_test::rel_error(decoded(peft::q6_k::quantize(w.view())), w);
      INFO("q8_0 " << e8 << " q4_k " << e4 << " q6_k " << e6);
      CHECK(e8 > 1e-4);
      CHECK(e8 < 0.006);
      CHECK(e6 > e8);
      CHECK(e6 < 0.025);
      CHECK(e4 > e6);
      CHECK(e4 < 0.09);
    }
  }
  // Double input is rounded to f32 first: the same quantization as its f32 rounding.
  const auto wd = peft_test::random_matrix<double>(4, 70, gen);
  const auto wf = peft_test::convert_matrix<float>(wd);
  CHECK(peft::q4_0::quantize(wd.view()).blocks().size() == peft::q4_0::quantize(wf.view()).blocks().size());
  CHECK(peft_test::exactly_equal(decoded(peft::q4_0::quantize(wd.view())), decoded(peft::q4_0::quantize(wf.view()))));
  CHECK(peft_test::exactly_equal(decoded(peft::nf4::quantize(wd.view())), decoded(peft::nf4::quantize(wf.view()))));
  CHECK(peft_test::exactly_equal(decoded(peft::q8_0::quantize(wd.view())), decoded(peft::q8_0::quantize(wf.view()))));
  CHECK(peft_test::exactly_equal(decoded(peft::q4_k::quantize(wd.view())), decoded(peft::q4_k::quantize(wf.view()))));
  CHECK(peft_test::exactly_equal(decoded(peft::q6_k::quantize(wd.view())), decoded(peft::q6_k::quantize(wf.view()))));
  CHECK(peft_test::exactly_equal(decoded(peft::int8_rowwise::quantize(wd.view())),
                                 decoded(peft::int8_rowwise::quantize(wf.view()))));
}

// ---- hand-derived encodings -------------------------------------------------------------------------

TEST_CASE("q4_0 encodes a block as ggml's quantize_row_q4_0_ref does", "[quantized][q4_0]") {
  // max = -4 (the first of two values of magnitude 4), so d = -4 / -8 = 0.5 (fp16 0x3800) and
  // id = 2: w[k] = (k - 8) / 2 for k < 16 gives q = k; w[16 + k] = (7 - k) / 2 gives q = 15 - k;
  // then three edits: w[15] = 0.25 -> 0.5 + 8.5 = 9 (halves round up), w[17] = 4 -> 8 + 8.5 = 16.5
  // -> clamped to 15, w[31] = -3.9 -> -7.8 + 8.5 = 0.7 -> 0.
  std::vector<float> w(40, 0.0f);
  for (int k = 0; k < 16; ++k) w[static_cast<std::size_t>(k)] = static_cast<float>(k - 8) * 0.5f;
  for (int k = 0; k < 16; ++k) w[static_cast<std::size_t>(16 + k)] = static_cast<float>(7 - k) * 0.5f;
  w[15] = 0.25f;
  w[17] = 4.0f;
  w[31] = -3.9f;
  // A second, partial block (in = 40): 8 values then 24 zeros of padding; max = 1, d = -0.125.
  for (int k = 0; k < 8; ++k) w[static_cast<std::size_t>(32 + k)] = static_cast<float>(k) / 7.0f;
  const peft::matrix<float> wm(1, 40, w);
  const auto q = peft::q4_0::quantize(wm.view());
  REQUIRE(q.blocks().size() == 2);
  const auto& b0 = q.blocks()[0];
  CHECK(b0.d == 0x3800);
  for (int k = 0; k < 16; ++k) {
    int lo = k, hi = 15 - k;
    if (k == 15) {
      lo = 9;
      hi = 0;  // w[31] = -3.9 -> q = 0
    }
    if (k == 1) hi = 15;  // w[17] = 4 clamps
    INFO("byte " << k);
    CHECK(static_cast<int>(b0.qs[k]) == (lo | (hi << 4)));
  }
  const auto& b1 = q.blocks()[1];
  CHECK(b1.d == peft::f16(-0.125f).bits);
  // x * id + 8.5 with id = -8: k / 7 * -8 + 8.5 -> q = (int)(8.5 - 8k/7), padding (0) -> 8.
  for (int k = 0; k < 16; ++k) {
    const int lo = k < 8 ? static_cast<int>(static_cast<float>(k) / 7.0f * -8.0f + 8.5f) : 8;
    CHECK(static_cast<int>(b1.qs[k]) == (lo | (8 << 4)));
  }
  // Decoding: (q - 8) * d.
  std::vector<double> row(40);
  q.dequantize_row(0, row.data());
  CHECK(row[0] == -4.0);
  CHECK(row[15] == 0.5);
  CHECK(row[17] == 3.5);
  CHECK(row[31] == -4.0);
  CHECK(row[32] == 0.0);
}

TEST_CASE("nf4 encodes table values exactly, first element in the high nibble", "[quantized][nf4]") {
  // Block absmax 2: w = 2 * nf4_values[q] for a chosen code sequence (including 0 and 15).
  const std::vector<int> codes{15, 0, 7, 8, 3, 12, 1, 14, 5, 9, 2, 11, 6, 13, 4, 10};
  peft::matrix<float> w(2, 64);
  for (ix e = 0; e < 128; ++e) {
    const int c = codes[static_cast<std::size_t>(e % 16)];
    w.data()[e] = 2.0f * peft::formats::nf4_values[static_cast<std::size_t>(c)] * (e < 64 ? 1.0f : 0.5f);
  }
  for (bool dq : {false, true}) {
    const auto q = peft::nf4::quantize(std::as_const(w).view(), static_cast<const float*>(nullptr), {.double_quant = dq});
    INFO("double quant " << dq);
    for (ix e = 0; e < 128; ++e) CHECK(static_cast<int>(q.code(e)) == codes[static_cast<std::size_t>(e % 16)]);
    CHECK(q.packed()[0] == 0xF0);  // codes 15 (element 0, high) and 0 (element 1, low)
    CHECK(q.packed()[1] == 0x78);
    if (!dq) {
      CHECK(q.block_absmax(0) == 2.0f);
      CHECK(q.block_absmax(1) == 1.0f);
      CHECK(peft_test::exactly_equal(q.dequantize(), w));
    } else {
      // Absmaxes 2 and 1: offset 1.5, centred +-0.5 with group absmax 0.5 -> codes of +-1.
      CHECK(q.absmax_offset() == 1.5f);
      CHECK(q.group_absmax()[0] == 0.5f);
      CHECK(q.absmax_codes()[0] == 255);
      CHECK(q.absmax_codes()[1] == 0);
      CHECK(q.block_absmax(0) == 2.0f);
      CHECK(q.block_absmax(1) == 1.5f - 0.5f * 0.99296873807907104f);
    }
  }
  // Ties at a threshold go down (x > t): the midpoint between codes 14 and 15 encodes as 14.
  CHECK(peft::formats::nf4_encode(0.8614784181118011f) == 14);
  CHECK(peft::formats::nf4_encode(std::nextafter(0.8614784181118011f, 2.0f)) == 15);
  CHECK(peft::formats::nf4_encode(-1.0f) == 0);
  CHECK(peft::formats::nf4_encode(0.0f) == 7);
}

TEST_CASE("the dynamic map has bitsandbytes' shape", "[quantized][nf4]") {
  const auto& m = peft::formats::dynamic_map();
  CHECK(std::is_sorted(m.begin(), m.end()));
  CHECK(m[127] == 0.0f);
  CHECK(m[255] == 1.0f);
  CHECK(m[0] == -0.99296873807907104f);
  CHECK(m[254] == 0.99296873807907104f);
  CHECK(m[128] == 5.5e-7f);  // 1e-6 * (0.1 + 1) / 2, the smallest positive entry
  CHECK(m[200] == -m[54]);
  CHECK(peft::formats::dynamic_encode(1.0f) == 255);
  CHECK(peft::formats::dynamic_encode(-1.0f) == 0);
  CHECK(peft::formats::dynamic_encode(0.0f) == 127);
  for (int i = 0; i < 256; ++i) CHECK(peft::formats::dynamic_encode(m[static_cast<std::size_t>(i)]) == i);
}

TEST_CASE("int8_rowwise rounds w / scale to nearest, ties to even", "[quantized][int8]") {
  const peft::matrix<float> w(2, 5, std::vector<float>{127.f, -63.f, 2.5f, 0.5f, -1.5f,  //
                                                       0.f, 0.f, 0.f, 0.f, 0.f});
  const auto q = peft::int8_rowwise::quantize(w.view());
  CHECK(q.scales()[0] == 1.0f);
  CHECK(q.scales()[1] == 0.0f);
  const std::vector<std::int8_t> want{127, -63, 2, 0, -2, 0, 0, 0, 0, 0};
  CHECK(q.values() == want);
}

// ---- ggml's q8_0, q4_k and q6_k ------------------------------------------------------------------

namespace {

/// The bytes of a vector of blocks.
template <class Block>
std::vector<std::uint8_t> block_bytes(const std::vector<Block>& blocks) {
  std::vector<std::uint8_t> r(blocks.size() * sizeof(Block));
  if (!r.empty()) std::memcpy(r.data(), blocks.data(), r.size());
  return r;
}

std::uint16_t random_finite_half(peft::rng& gen) {
  for (;;) {
    const auto h = static_cast<std::uint16_t>(gen.below(65536));
    if ((h & 0x7c00u) != 0x7c00u) return h;
  }
}

/// Blocks of random bytes whose fp16 scales are finite (any sign, subnormals included).
template <class Block>
std::vector<Block> random_blocks(ix count, peft::rng& gen) {
  std::vector<Block> r(static_cast<std::size_t>(count));
  for (auto& b : r) {
    auto* p = reinterpret_cast<std::uint8_t*>(&b);
    for (std::size_t k = 0; k < sizeof(Block); ++k) p[k] = static_cast<std::uint8_t>(gen.below(256));
    b.d = random_finite_half(gen);
    if constexpr (std::is_same_v<Block, peft::formats::block_q4_k>) b.dmin = random_finite_half(gen);
  }
  return r;
}

// ggml's dequantize_row_q8_0 / _q4_K / _q6_K, as written there: f32 arithmetic in its order of
// operations, each product rounded (written independently of the library, which decodes in double).
void ggml_f32_decode(const peft::formats::block_q8_0& b, float* out) {
  const float d = peft::formats::half_to_float(b.d);
  for (int k = 0; k < 32; ++k) out[k] = static_cast<float>(b.qs[k]) * d;
}
void ggml_f32_decode(const peft::formats::block_q4_k& b, float* out) {
  const float d = peft::formats::half_to_float(b.d);
  const float dmin = peft::formats::half_to_float(b.dmin);
  for (int c = 0; c < 4; ++c) {
    for (int h = 0; h < 2; ++h) {
      std::uint8_t sc = 0, m = 0;
      peft::formats::q4_k_scale_min(b.scales, 2 * c + h, sc, m);
      const float ds = d * static_cast<float>(sc);
      const float dm = dmin * static_cast<float>(m);
      for (int l = 0; l < 32; ++l) {
        const int q = h == 0 ? (b.qs[32 * c + l] & 15) : (b.qs[32 * c + l] >> 4);
        volatile float p = ds * static_cast<float>(q);  // rounded before the subtraction
        out[64 * c + 32 * h + l] = p - dm;
      }
    }
  }
}
void ggml_f32_decode(const peft::formats::block_q6_k& b, float* out) {
  const float d = peft::formats::half_to_float(b.d);
  for (int p = 0; p < 256; ++p) {
    const float ds = d * static_cast<float>(b.scales[p / 16]);
    out[p] = ds * static_cast<float>(peft::formats::q6_k_code(b, p) - 32);
  }
}

// The library's entry points per block type.
template <class T>
void decode_block(const peft::formats::block_q8_0& b, T* out) { peft::formats::decode_q8_0_block(b, out); }
template <class T>
void decode_block(const peft::formats::block_q4_k& b, T* out) { peft::formats::decode_q4_k_block(b, out); }
template <class T>
void decode_block(const peft::formats::block_q6_k& b, T* out) { peft::formats::decode_q6_k_block(b, out); }
void decode_row(const peft::formats::block_q8_0* b, ix nb, float* out) { peft::kernels::decode_q8_0_row(b, nb, out); }
void decode_row(const peft::formats::block_q4_k* b, ix nb, float* out) { peft::kernels::decode_q4_k_row(b, nb, out); }
void decode_row(const peft::formats::block_q6_k* b, ix nb, float* out) { peft::kernels::decode_q6_k_row(b, nb, out); }
void isa_dot(peft::kernels::isa which, const peft::formats::block_q8_0* b, ix nb, ix n, const float* x, ix ldx,
             ix m, float* y, ix ldy) {
  peft::kernels::q8_0_dot(which, b, nb, n, x, ldx, m, y, ldy);
}
void isa_dot(peft::kernels::isa which, const peft::formats::block_q4_k* b, ix nb, ix n, const float* x, ix ldx,
             ix m, float* y, ix ldy) {
  peft::kernels::q4_k_dot(which, b, nb, n, x, ldx, m, y, ldy);
}
void isa_dot(peft::kernels::isa which, const peft::formats::block_q6_k* b, ix nb, ix n, const float* x, ix ldx,
             ix m, float* y, ix ldy) {
  peft::kernels::q6_k_dot(which, b, nb, n, x, ldx, m, y, ldy);
}
void reference_dot(const peft::formats::block_q8_0* b, ix nb, ix n, const float* x, ix ldx, ix m, float* y, ix ldy) {
  peft::kernels::reference::q8_0_dot(b, nb, n, x, ldx, m, y, ldy);
}
void reference_dot(const peft::formats::block_q4_k* b, ix nb, ix n, const float* x, ix ldx, ix m, float* y, ix ldy) {
  peft::kernels::reference::q4_k_dot(b, nb, n, x, ldx, m, y, ldy);
}
void reference_dot(const peft::formats::block_q6_k* b, ix nb, ix n, const float* x, ix ldx, ix m, float* y, ix ldy) {
  peft::kernels::reference::q6_k_dot(b, nb, n, x, ldx, m, y, ldy);
}

}  // namespace

TEMPLATE_TEST_CASE("ggml blocks decode to ggml's f32 values, in every decoder", "[quantized][ggml]",
                   q8_0_format, q4_k_format, q6_k_format) {
  // decode_*_block computes in double and rounds once; ggml computes in f32 with exact products
  // and one rounded subtraction (q4_k): the same f32 values, which this checks on random bytes.
  using Q = typename TestType::type;
  using block = typename Q::block_type;
  constexpr ix bs = Q::block_size;
  peft::rng gen(11);
  const auto blocks = random_blocks<block>(200, gen);
  std::vector<float> ggml(static_cast<std::size_t>(bs)), f(static_cast<std::size_t>(bs));
  std::vector<double> d(static_cast<std::size_t>(bs));
  std::vector<float> row(static_cast<std::size_t>(bs * 200));
  decode_row(blocks.data(), 200, row.data());
  ix differ = 0, rounded = 0, nonzero = 0;
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    ggml_f32_decode(blocks[i], ggml.data());
    decode_block(blocks[i], f.data());
    decode_block(blocks[i], d.data());
    for (ix p = 0; p < bs; ++p) {
      const auto k = static_cast<std::size_t>(p);
      if (!(f[k] == ggml[k] && row[i * static_cast<std::size_t>(bs) + k] == ggml[k] &&
            static_cast<float>(d[k]) == f[k])) {
        ++differ;
      }
      if (static_cast<double>(f[k]) != d[k]) ++rounded;
      if (f[k] != 0.0f) ++nonzero;
    }
  }
  CHECK(differ == 0);
  CHECK(nonzero > 100 * bs);
  // q8_0 and q6_k are exact in f32; q4_k's subtraction does round (so the claim is not vacuous).
  if constexpr (std::is_same_v<Q, peft::q4_k>) {
    CHECK(rounded > 0);
  } else {
    CHECK(rounded == 0);
  }
}

TEMPLATE_TEST_CASE("ggml block dot kernels agree with the reference kernels on every isa", "[quantized][ggml]",
                   q8_0_format, q4_k_format, q6_k_format) {
  using Q = typename TestType::type;
  using block = typename Q::block_type;
  constexpr ix bs = Q::block_size;
  peft::rng gen(12);
  constexpr ix nb = 3, n = 9, ldy = 12;
  const ix ldx = nb * bs + 5;
  const auto w = random_weight(n, nb * bs, gen);
  const auto q = Q::quantize(w.view());
  const auto raw = random_blocks<block>(n * nb, gen);  // every code and scale, both signs
  const auto x = peft_test::random_matrix<float>(8, ldx, gen);
  for (const auto* blocks : {q.blocks().data(), raw.data()}) {
    for (ix m = 1; m <= 8; ++m) {
      peft::matrix<float> want(m, ldy, 0.0f);
      reference_dot(blocks, nb, n, x.data(), ldx, m, want.data(), ldy);
      REQUIRE(peft_test::nontrivial(want.view().block(0, 0, m, n)));
      for (auto which : peft_test::supported_isas()) {
        INFO(TestType::label << " m " << m << " isa " << peft::kernels::isa_name(which) << " raw "
                             << (blocks == raw.data()));
        peft::matrix<float> got(m, ldy, 0.0f);
        isa_dot(which, blocks, nb, n, x.data(), ldx, m, got.data(), ldy);
        CHECK(peft_test::rel_error(got, want) <= 1e-5);
        for (ix r = 0; r < m; ++r) {
          for (ix j = n; j < ldy; ++j) CHECK(got(r, j) == 0.0f);  // nothing past n is written
        }
      }
    }
  }
}

TEST_CASE("q8_0 encodes a block as ggml's quantize_row_q8_0_ref does", "[quantized][ggml]") {
  // amax = 63.5, so d = 63.5 / 127 = 0.5 (fp16 0x3800) and id = 2: w[k] = (k - 16) / 2 gives
  // q = k - 16; then w[3] = 63.5 -> 127, w[7] = -63.5 -> -127, w[5] = 0.25 -> 0.5 -> 1 and
  // w[6] = -0.25 -> -1 (halves away from zero). A second, partial block (in = 40): 8 values
  // of 1..8 (d = 8 / 127, q = round(k * 127 / 8)) then 24 zeros of padding, which stay 0.
  std::vector<float> w(40, 0.0f);
  for (int k = 0; k < 32; ++k) w[static_cast<std::size_t>(k)] = static_cast<float>(k - 16) * 0.5f;
  w[3] = 63.5f;
  w[7] = -63.5f;
  w[5] = 0.25f;
  w[6] = -0.25f;
  for (int k = 0; k < 8; ++k) w[static_cast<std::size_t>(32 + k)] = static_cast<float>(k + 1);
  const peft::matrix<float> wm(1, 40, w);
  const auto q = peft::q8_0::quantize(wm.view());
  REQUIRE(q.blocks().size() == 2);
  const auto& b0 = q.blocks()[0];
  CHECK(b0.d == 0x3800);
  for (int k = 0; k < 32; ++k) {
    int want = k - 16;
    if (k == 3) want = 127;
    if (k == 7) want = -127;
    if (k == 5) want = 1;
    if (k == 6) want = -1;
    INFO("k " << k);
    CHECK(static_cast<int>(b0.qs[k]) == want);
  }
  const auto& b1 = q.blocks()[1];
  CHECK(b1.d == peft::f16(8.0f / 127.0f).bits);
  for (int k = 0; k < 32; ++k) {
    const int want = k < 8 ? static_cast<int>(std::round(static_cast<float>(k + 1) * (1.0f / (8.0f / 127.0f)))) : 0;
    CHECK(static_cast<int>(b1.qs[k]) == want);
  }
  CHECK(b1.qs[7] == 127);
  float out[32];
  peft::formats::decode_q8_0_block(b1, out);
  for (int k = 8; k < 32; ++k) CHECK(out[k] == 0.0f);  // the padding decodes to exact zeros
  std::vector<double> row(40);
  q.dequantize_row(0, row.data());
  CHECK(row[3] == 63.5);
  CHECK(row[10] == -3.0);
  // A zero block: d = 0, codes 0.
  peft::formats::block_q8_0 z{};
  const std::vector<float> zeros(32, 0.0f);
  z.d = 1;
  REQUIRE(peft::formats::quantize_q8_0_block(zeros.data(), z));
  CHECK(block_bytes(std::vector<peft::formats::block_q8_0>{z}) == std::vector<std::uint8_t>(34, 0));
}

TEST_CASE("q4_k packs its 6-bit codes and nibbles as ggml does", "[quantized][ggml]") {
  // Scale and min codes: s < 4 in the low 6 bits of bytes s and s + 4; s >= 4 in the nibbles of
  // byte s + 4 with their top 2 bits in the top bits of bytes s - 4 and s.
  peft::formats::block_q4_k b{};
  const std::uint8_t bytes[12] = {0xC1, 0x42, 0x83, 0x04, 0x45, 0x86, 0xC7, 0x08, 0x9A, 0xBC, 0xDE, 0xF0};
  std::memcpy(b.scales, bytes, 12);
  std::uint8_t sc[8], m[8];
  peft::formats::q4_k_scale_mins(b, sc, m);
  const std::vector<int> want_sc{1, 2, 3, 4, 0x3A, 0x1C, 0x2E, 0x00};
  const std::vector<int> want_m{5, 6, 7, 8, 0x19, 0x2B, 0x3D, 0x0F};
  CHECK(std::vector<int>(sc, sc + 8) == want_sc);
  CHECK(std::vector<int>(m, m + 8) == want_m);

  // Zeros: every byte 0 (d = dmin = 0, codes 0).
  const std::vector<float> zeros(256, 0.0f);
  peft::formats::block_q4_k z;
  std::memset(&z, 0xAB, sizeof z);
  REQUIRE(peft::formats::quantize_q4_k_block(zeros.data(), z));
  CHECK(block_bytes(std::vector<peft::formats::block_q4_k>{z}) == std::vector<std::uint8_t>(144, 0));

  // All weights 2: each sub-block fits min 0 (min is capped at 0) and scale 1 / 7.5 with codes 15
  // (the search's least-squares steps are degenerate: all codes equal); every sc = 63, m = 0, so
  // bytes 0..3 = 63 | 3 << 6, bytes 4..7 = 0, bytes 8..11 = 15; dmin = 0.
  const std::vector<float> twos(256, 2.0f);
  peft::formats::block_q4_k t{};
  REQUIRE(peft::formats::quantize_q4_k_block(twos.data(), t));
  CHECK(t.d == peft::f16((1.0f / 7.5f) / 63.0f).bits);
  CHECK(t.dmin == 0);
  const std::vector<int> want_bytes{0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 15, 15, 15, 15};
  CHECK(std::vector<int>(t.scales, t.scales + 12) == want_bytes);
  CHECK(std::all_of(t.qs, t.qs + 128, [](std::uint8_t v) { return v == 0xFF; }));

  // Weights on a grid of 1/16 with 0 and 15/16 in every sub-block: the codes are the grid indices,
  // low nibble of byte 32 c + l = weight 64 c + l, high nibble = weight 64 c + 32 + l.
  std::vector<int> code(256);
  std::vector<float> x(256);
  for (int p = 0; p < 256; ++p) {
    code[static_cast<std::size_t>(p)] = p % 32 == 0 ? 0 : p % 32 == 1 ? 15 : (p * 7 + p / 32) % 16;
    x[static_cast<std::size_t>(p)] = static_cast<float>(code[static_cast<std::size_t>(p)]) / 16.0f;
  }
  peft::formats::block_q4_k g{};
  REQUIRE(peft::formats::quantize_q4_k_block(x.data(), g));
  peft::formats::q4_k_scale_mins(g, sc, m);
  for (int s = 0; s < 8; ++s) {
    CHECK(sc[s] == 63);
    CHECK(m[s] == 0);
  }
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      INFO("c " << c << " l " << l);
      CHECK((g.qs[32 * c + l] & 15) == code[static_cast<std::size_t>(64 * c + l)]);
      CHECK((g.qs[32 * c + l] >> 4) == code[static_cast<std::size_t>(64 * c + 32 + l)]);
    }
  }
  float out[256];
  peft::formats::decode_q4_k_block(g, out);
  for (int p = 0; p < 256; ++p) CHECK(std::abs(out[p] - x[static_cast<std::size_t>(p)]) <= 1e-3f);

  // Random data: the sub-block with the largest scale (and the one with the largest -min) gets
  // code 63, which needs the top bits of the packing for s >= 4.
  peft::rng gen(13);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<float> r(256);
    for (int p = 0; p < 256; ++p) r[static_cast<std::size_t>(p)] = static_cast<float>(gen.uniform(-1.0, 1.0) * (1 + p / 32));
    peft::formats::block_q4_k rb{};
    REQUIRE(peft::formats::quantize_q4_k_block(r.data(), rb));
    peft::formats::q4_k_scale_mins(rb, sc, m);
    CHECK(*std::max_element(sc, sc + 8) == 63);
    CHECK(*std::max_element(m, m + 8) == 63);
    CHECK(sc[7] == 63);  // the widest sub-block
  }
}

TEST_CASE("q6_k packs its 6-bit codes and scales as ggml does", "[quantized][ggml]") {
  // Zeros: every byte 0.
  const std::vector<float> zeros(256, 0.0f);
  peft::formats::block_q6_k z;
  std::memset(&z, 0xAB, sizeof z);
  REQUIRE(peft::formats::quantize_q6_k_block(zeros.data(), z));
  CHECK(block_bytes(std::vector<peft::formats::block_q6_k>{z}) == std::vector<std::uint8_t>(210, 0));

  // All weights 1 (or -1): each sub-block fits scale -1/32 (1/32) with l = -32 (every other step
  // ties, and ties keep the first); d = 1 / (-128 / scale) = 2^-12 (-2^-12), scales -128, codes 0.
  for (float v : {1.0f, -1.0f}) {
    const std::vector<float> ones(256, v);
    peft::formats::block_q6_k o{};
    REQUIRE(peft::formats::quantize_q6_k_block(ones.data(), o));
    INFO("v " << v);
    CHECK(o.d == (v > 0 ? 0x0C00 : 0x8C00));
    CHECK(std::all_of(o.scales, o.scales + 16, [](std::int8_t s) { return s == -128; }));
    CHECK(std::all_of(o.ql, o.ql + 128, [](std::uint8_t c) { return c == 0; }));
    CHECK(std::all_of(o.qh, o.qh + 64, [](std::uint8_t c) { return c == 0; }));
    float out[256];
    peft::formats::decode_q6_k_block(o, out);
    CHECK(std::all_of(out, out + 256, [&](float w) { return w == v; }));
  }

  // Weights on the grid (c - 32) / 32 with -1 (c = 0) in every sub-block: every scale is -128 of
  // d = -2^-12, so the codes are c; weight p = 128 h + 32 k + l has the low (k < 2) or high
  // nibble of ql[64 h + 32 (k % 2) + l] and bits 2k, 2k + 1 of qh[32 h + l].
  std::vector<int> code(256);
  std::vector<float> x(256);
  for (int p = 0; p < 256; ++p) {
    code[static_cast<std::size_t>(p)] = p % 16 == 0 ? 0 : (p * 37 + 11) % 64;
    x[static_cast<std::size_t>(p)] = static_cast<float>(code[static_cast<std::size_t>(p)] - 32) / 32.0f;
  }
  peft::formats::block_q6_k g{};
  REQUIRE(peft::formats::quantize_q6_k_block(x.data(), g));
  CHECK(g.d == 0x8C00);
  CHECK(std::all_of(g.scales, g.scales + 16, [](std::int8_t s) { return s == -128; }));
  for (int p = 0; p < 256; ++p) {
    const int h = p / 128, k = p % 128 / 32, l = p % 32;
    const std::uint8_t byte = g.ql[64 * h + 32 * (k % 2) + l];
    const int lo = k < 2 ? byte & 15 : byte >> 4;
    const int hi = (g.qh[32 * h + l] >> (2 * k)) & 3;
    INFO("p " << p);
    CHECK((lo | hi << 4) == code[static_cast<std::size_t>(p)]);
    CHECK(peft::formats::q6_k_code(g, p) == code[static_cast<std::size_t>(p)]);
  }
  float out[256];
  peft::formats::decode_q6_k_block(g, out);
  for (int p = 0; p < 256; ++p) CHECK(out[p] == x[static_cast<std::size_t>(p)]);
}

TEST_CASE("ggml formats pad rows with zeros that decode to exact zeros", "[quantized][ggml]") {
  // in = 300: the second super-block holds 44 weights (sub-blocks of 32: one full, one with 12)
  // and 212 zeros. q8_0 and q6_k decode every zero of padding to 0; q4_k does so for the
  // sub-blocks of padding alone (a shared sub-block puts its zeros on its affine grid).
  peft::rng gen(14);
  const auto w = random_weight(3, 300, gen);
  const auto q8 = peft::q8_0::quantize(w.view());
  const auto q4 = peft::q4_k::quantize(w.view());
  const auto q6 = peft::q6_k::quantize(w.view());
  for (ix i = 0; i < 3; ++i) {
    float b8[32], b4[256], b6[256];
    peft::formats::decode_q8_0_block(q8.blocks()[static_cast<std::size_t>(i * 10 + 9)], b8);
    peft::formats::decode_q4_k_block(q4.blocks()[static_cast<std::size_t>(i * 2 + 1)], b4);
    peft::formats::decode_q6_k_block(q6.blocks()[static_cast<std::size_t>(i * 2 + 1)], b6);
    for (int k = 300 - 288; k < 32; ++k) CHECK(b8[k] == 0.0f);
    for (int k = 64; k < 256; ++k) CHECK(b4[k] == 0.0f);
    for (int k = 300 - 256; k < 256; ++k) CHECK(b6[k] == 0.0f);
  }
}

TEST_CASE("q4_0, q8_0, q4_k and q6_k quantize as llama-quantize does, bit for bit", "[quantized][ggml]") {
  // tests/data/gguf/quantize_golden.safetensors: `f32` (rows, cols) weights and, per format, the
  // raw bytes llama-quantize wrote for them (U8, 1-D, rows concatenated).
  const auto path = std::filesystem::path(PEFT_TEST_DATA_DIR) / "gguf" / "quantize_golden.safetensors";
  REQUIRE(std::filesystem::exists(path));
  const auto file = peft::io::safetensors_file::open(path);
  const auto w = file.read_matrix<float>("f32");
  REQUIRE(peft_test::nontrivial(w));
  ix compared = 0;
  auto check = [&](auto format, const char* key) {
    using Q = typename decltype(format)::type;
    INFO(key << ": weights " << w.rows() << " x " << w.cols());
    REQUIRE(file.contains(key));
    const auto want = file.bytes(key);
    const auto got = block_bytes(Q::quantize(std::as_const(w).view()).blocks());
    REQUIRE(want.size() == got.size());
    ix bad = 0, first = -1;
    for (std::size_t k = 0; k < got.size(); ++k) {
      if (std::to_integer<std::uint8_t>(want[k]) != got[k]) {
        if (bad++ == 0) first = static_cast<ix>(k / sizeof(typename Q::block_type));
      }
    }
    INFO("first differing block " << first);
    CHECK(bad == 0);
    ++compared;
  };
  check(std::type_identity<peft::q4_0>{}, "q4_0");
  check(std::type_identity<peft::q8_0>{}, "q8_0");
  check(std::type_identity<peft::q4_k>{}, "q4_k");
  check(std::type_identity<peft::q6_k>{}, "q6_k");
  CHECK(compared == 4);
}

// ---- products ---------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("quantized matmul and matmul_t equal the dequantized reference on every isa",
                   "[quantized]", int8_format, q4_0_format, q8_0_format, q4_k_format, q6_k_format,
                   nf4_dq_format, nf4_plain_format) {
  peft::rng gen(3);
  check_products<TestType, float>(gen);
  check_products<TestType, double>(gen);
}

TEMPLATE_TEST_CASE("quantized dot kernels agree with the reference kernels", "[quantized]",
                   float) {
  // The kernels directly, on strided x and y and every batch size 1..8.
  peft::rng gen(4);
  const auto w = random_weight(9, 192, gen);
  const auto q = peft::q4_0::quantize(w.view());
  const auto i8 = peft::int8_rowwise::quantize(w.view());
  const auto x = peft_test::random_matrix<float>(8, 200, gen);  // ldx 200 > 192
  for (ix m = 1; m <= 8; ++m) {
    peft::matrix<float> want(m, 12, 0.0f), want8(m, 12, 0.0f);
    peft::kernels::reference::q4_0_dot(q.blocks().data(), 6, 9, x.data(), 200, m, want.data(), 12);
    peft::kernels::reference::int8_dot(i8.values().data(), i8.scales().data(), 192, 9, x.data(), 200, m,
                                       want8.data(), 12);
    for (auto which : peft_test::supported_isas()) {
      INFO("m " << m << " isa " << peft::kernels::isa_name(which));
      peft::matrix<float> got(m, 12, 0.0f), got8(m, 12, 0.0f);
      peft::kernels::q4_0_dot(which, q.blocks().data(), 6, 9, x.data(), 200, m, got.data(), 12);
      peft::kernels::int8_dot(which, i8.values().data(), i8.scales().data(), 192, 9, x.data(), 200, m,
                              got8.data(), 12);
      CHECK(peft_test::rel_error(got, want) <= 1e-5);
      CHECK(peft_test::rel_error(got8, want8) <= 1e-5);
      REQUIRE(peft_test::nontrivial(got.view().block(0, 0, m, 9)));
    }
  }
}

// ---- adapters over quantized bases ------------------------------------------------------------------

namespace {

template <class T, class Q>
peft::dense<T> dense_copy(const Q& q) {
  peft::matrix<T> w(q.out_features(), q.in_features());
  for (ix i = 0; i < q.out_features(); ++i) q.dequantize_row(i, w.row(i));
  std::vector<T> b;
  for (ix j = 0; j < q.out_features() && q.has_bias(); ++j) b.push_back(q.template bias_value<T>(j));
  return peft::dense<T>(std::move(w), std::move(b));
}

template <class Format, class T>
void check_lora(peft::rng& gen) {
  for (const shape s : {shape{13, 45}, shape{24, 128}, shape{40, 64}}) {
    for (ix m : {ix{1}, ix{3}, ix{17}}) {
      const auto w = random_weight(s.out, s.in, gen);
      const auto bias = peft_test::random_vector<float>(s.out, gen);
      const auto q = Format::make(w.view(), bias.data());
      const auto d = dense_copy<T>(q);
      peft::lora<T> a(s.in, s.out, peft::lora_options{.rank = 4, .alpha = 8.0, .bias = true,
                                                      .init = peft::lora_init::random, .seed = gen.next()});
      peft_test::fill_random(a.bias(), gen);
      peft::lora<T> b = a;
      const auto x = peft_test::random_matrix<T>(m, s.in, gen);
      const auto g = peft_test::random_matrix<T>(m, s.out, gen);
      peft::matrix<T> ya(m, s.out), yb(m, s.out), dxa(m, s.in), dxb(m, s.in);
      typename peft::lora<T>::cache_type ca, cb;
      INFO(Format::label << " out " << s.out << " in " << s.in << " batch " << m);
      a.forward(q, x.view(), ya.view(), ca);
      b.forward(d, x.view(), yb.view(), cb);
      REQUIRE(peft_test::nontrivial(yb));
      CHECK(peft_test::rel_error(ya, yb) <= tol<T>());
      a.backward(q, x.view(), g.view(), dxa.view(), ca);
      b.backward(d, x.view(), g.view(), dxb.view(), cb);
      CHECK(peft_test::rel_error(dxa, dxb) <= tol<T>());
      CHECK(peft_test::rel_error(a.grad_A(), b.grad_A()) <= tol<T>());
      CHECK(peft_test::rel_error(a.grad_B(), b.grad_B()) <= tol<T>());
      CHECK(peft_test::rel_error(a.grad_bias(), b.grad_bias()) <= tol<T>());
      REQUIRE(peft_test::nontrivial(b.grad_A()));
    }
  }
}

template <class Format, class T>
void check_dora(peft::rng& gen) {
  for (const shape s : {shape{13, 45}, shape{24, 128}}) {
    for (ix m : {ix{1}, ix{5}, ix{18}}) {
      const auto w = random_weight(s.out, s.in, gen);
      const auto bias = peft_test::random_vector<float>(s.out, gen);
      const auto q = Format::make(w.view(), bias.data());
      const auto d = dense_copy<T>(q);
      peft::dora<T> a(d, peft::lora_options{.rank = 3, .alpha = 6.0, .init = peft::lora_init::random,
                                            .seed = gen.next()});
      peft_test::fill_random(a.magnitude(), gen, 0.5, 2.0);
      peft::dora<T> b = a;
      const auto x = peft_test::random_matrix<T>(m, s.in, gen);
      const auto g = peft_test::random_matrix<T>(m, s.out, gen);
      peft::matrix<T> ya(m, s.out), yb(m, s.out), dxa(m, s.in), dxb(m, s.in);
      typename peft::dora<T>::cache_type ca, cb;
      INFO(Format::label << " out " << s.out << " in " << s.in << " batch " << m);
      a.forward(q, x.view(), ya.view(), ca);
      b.forward(d, x.view(), yb.view(), cb);
      REQUIRE(peft_test::nontrivial(yb));
      CHECK(peft_test::rel_error(ya, yb) <= tol<T>());
      a.backward(q, x.view(), g.view(), dxa.view(), ca);
      b.backward(d, x.view(), g.view(), dxb.view(), cb);
      CHECK(peft_test::rel_error(dxa, dxb) <= tol<T>());
      CHECK(peft_test::rel_error(a.grad_A(), b.grad_A()) <= tol<T>());
      CHECK(peft_test::rel_error(a.grad_B(), b.grad_B()) <= tol<T>());
      CHECK(peft_test::rel_error(a.grad_magnitude(), b.grad_magnitude()) <= tol<T>());
      REQUIRE(peft_test::nontrivial(b.grad_B()));
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("lora and dora over a quantized base equal them over its dense copy",
                   "[quantized][lora][dora]", int8_format, q4_0_format, q8_0_format, q4_k_format,
                   q6_k_format, nf4_dq_format, nf4_plain_format) {
  peft::rng gen(5);
  check_lora<TestType, float>(gen);
  check_lora<TestType, double>(gen);
  check_dora<TestType, float>(gen);
  check_dora<TestType, double>(gen);
}

// ---- merging -----------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("add_to_weight re-quantizes W + alpha dW within the format's bound",
                   "[quantized]", int8_format, q4_0_format, q8_0_format, q4_k_format, q6_k_format,
                   nf4_dq_format, nf4_plain_format) {
  peft::rng gen(6);
  for (const shape s : {shape{5, 40}, shape{9, 128}, shape{3, 70}}) {
    const auto w = random_weight(s.out, s.in, gen);
    auto q = TestType::make(w.view(), static_cast<const float*>(nullptr));
    const auto before = decoded(q);
    const auto dw = peft_test::random_matrix<double>(s.out, s.in, gen, -0.3, 0.3);
    const double alpha = 0.75;
    q.add_to_weight(dw.view(), alpha);
    // The target: the decoded weight plus the update, in f32 as the merge rounds it.
    peft::matrix<float> target(s.out, s.in);
    for (ix i = 0; i < s.out; ++i) {
      for (ix j = 0; j < s.in; ++j) target(i, j) = static_cast<float>(before(i, j) + alpha * dw(i, j));
    }
    INFO(TestType::label << " out " << s.out << " in " << s.in);
    check_round_trip(q, target);
    CHECK(peft_test::rel_error(decoded(q), before) > 1e-2);  // the merge did change W

    // add_to_bias gives a base without bias one.
    REQUIRE_FALSE(q.has_bias());
    const auto db = peft_test::random_vector<float>(s.out, gen);
    q.add_to_bias(db.data(), 2.0);
    REQUIRE(q.has_bias());
    CHECK(q.template bias_value<double>(1) == static_cast<double>(2.0f * db[1]));
  }
}

// ---- errors ------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("quantized bases reject bad input with the function in the message",
                   "[quantized]", int8_format, q4_0_format, q8_0_format, q4_k_format, q6_k_format,
                   nf4_dq_format) {
  using Q = typename TestType::type;
  const std::string n(Q::name);
  peft::rng gen(7);
  const auto w = random_weight(6, 40, gen);
  const auto q = TestType::make(w.view(), static_cast<const float*>(nullptr));
  const peft::matrix<float> empty(0, 4);
  check_error<peft::shape_error>([&] { TestType::make(empty.view(), static_cast<const float*>(nullptr)); },
                                 n + "::quantize");
  auto bad = w;
  bad(2, 3) = std::nanf("");
  check_error<peft::format_error>([&] { TestType::make(std::as_const(bad).view(), static_cast<const float*>(nullptr)); },
                                  n + "::quantize");
  bad(2, 3) = INFINITY;
  check_error<peft::format_error>([&] { TestType::make(std::as_const(bad).view(), static_cast<const float*>(nullptr)); },
                                  n + "::quantize");
  std::vector<float> bias(6, 1.0f);
  bias[4] = std::nanf("");
  check_error<peft::format_error>([&] { TestType::make(w.view(), bias.data()); }, n + "::quantize");

  peft::matrix<float> x(3, 41), y(3, 6), xg(3, 40), yb(2, 6);
  check_error<peft::shape_error>([&] { q.matmul(peft::matrix_view<const float>(x.view()), y.view()); },
                                 n + "::matmul");
  check_error<peft::shape_error>([&] { q.matmul(peft::matrix_view<const float>(xg.view()), yb.view()); },
                                 n + "::matmul");
  check_error<peft::shape_error>(
      [&] { q.matmul(peft::matrix_view<const float>(x.view()), y.view(), peft::kernels::no_epilogue{}); },
      n + "::matmul");
  check_error<peft::shape_error>([&] { q.matmul_t(peft::matrix_view<const float>(yb.view()), xg.view()); },
                                 n + "::matmul_t");
  std::vector<double> row(40);
  check_error<peft::shape_error>([&] { q.dequantize_row(6, row.data()); }, n + "::dequantize_row");
  check_error<peft::shape_error>([&] { q.dequantize_row(-1, row.data()); }, n + "::dequantize_row");
  auto m = q;
  const peft::matrix<double> dw(6, 39);
  check_error<peft::shape_error>([&] { m.add_to_weight(dw.view(), 1.0); }, n + "::add_to_weight");
  peft::matrix<double> huge(6, 40, 1e300);
  check_error<peft::format_error>([&] { m.add_to_weight(std::as_const(huge).view(), 1.0); }, n + "::add_to_weight");
  CHECK(peft_test::exactly_equal(decoded(m), decoded(q)));  // a failed merge changes nothing
}

TEST_CASE("q4_0 rejects weights whose block scale overflows fp16", "[quantized][q4_0]") {
  peft::matrix<float> w(1, 32, 1.0f);
  w(0, 5) = 1e6f;
  check_error<peft::format_error>([&] { peft::q4_0::quantize(std::as_const(w).view()); }, "q4_0::quantize");
}

TEST_CASE("ggml's q8_0, q4_k and q6_k reject weights whose scales overflow fp16", "[quantized][ggml]") {
  peft::matrix<float> w(1, 300, 1.0f);
  w(0, 270) = 1e7f;  // q8_0: d = 1e7 / 127 > 65504
  check_error<peft::format_error>([&] { peft::q8_0::quantize(std::as_const(w).view()); }, "q8_0::quantize");
  w(0, 270) = -5e6f;  // q4_k: dmin = 5e6 / 63 > 65504
  check_error<peft::format_error>([&] { peft::q4_k::quantize(std::as_const(w).view()); }, "q4_k::quantize");
  w(0, 270) = 3e8f;  // q6_k: d ~ 3e8 / 4096 > 65504
  check_error<peft::format_error>([&] { peft::q6_k::quantize(std::as_const(w).view()); }, "q6_k::quantize");
  w(0, 270) = 1e6f;  // within range for q8_0 and q6_k
  CHECK(peft::q8_0::quantize(std::as_const(w).view()).blocks().size() == 10);
  CHECK(peft::q6_k::quantize(std::as_const(w).view()).blocks().size() == 2);
}

// ---- mutable views ----------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("quantized matmul and matmul_t accept mutable views of their inputs", "[quantized]",
                   int8_format, q4_0_format, q8_0_format, q4_k_format, q6_k_format, nf4_dq_format) {
  peft::rng gen(8);
  const auto w = random_weight(20, 128, gen);
  const auto b = peft_test::random_vector<float>(20, gen);
  const auto q = TestType::make(w.view(), b.data());
  for (ix m : {ix{3}, ix{20}}) {  // the streaming dot kernels and the decoded panels
    for (bool as_double : {false, true}) {
      INFO(TestType::label << " batch " << m << " double " << as_double);
      auto check = [&](auto zero) {
        using T = decltype(zero);
        auto x = peft_test::random_matrix<T>(m, 128, gen);  // not const: x.view() is matrix_view<T>
        auto dy = peft_test::random_matrix<T>(m, 20, gen);
        const peft::matrix_view<T> xm = x.view(), dym = dy.view();
        peft::matrix<T> y_mut(m, 20), y_const(m, 20), dx_mut(m, 128), dx_const(m, 128);
        q.matmul(xm, y_mut.view());
        q.matmul(peft::matrix_view<const T>(xm), y_const.view());
        CHECK(peft_test::exactly_equal(y_mut, y_const));
        REQUIRE(peft_test::nontrivial(y_const));
        q.matmul(xm, y_mut.view(), peft::kernels::no_epilogue{});
        CHECK(peft_test::exactly_equal(y_mut, y_const));
        q.matmul_t(dym, dx_mut.view());
        q.matmul_t(peft::matrix_view<const T>(dym), dx_const.view());
        CHECK(peft_test::exactly_equal(dx_mut, dx_const));
        REQUIRE(peft_test::nontrivial(dx_const));
      };
      if (as_double) {
        check(0.0);
      } else {
        check(0.0f);
      }
    }
  }
}

// ---- the list of formats -----------------------------------------------------------------------------

TEST_CASE("quantized_formats lists every format once, by its command-line name", "[quantized]") {
  static_assert(peft::quantized_formats::size == 6);
  static_assert(peft::quantized_cli_name<peft::int8_rowwise> == "int8");
  static_assert(peft::quantized_cli_name<peft::q4_0> == "q4_0");
  static_assert(peft::quantized_cli_name<peft::nf4> == "nf4");
  static_assert(peft::quantized_cli_name<peft::q8_0> == "q8_0");
  static_assert(peft::quantized_cli_name<peft::q4_k> == "q4_k");
  static_assert(peft::quantized_cli_name<peft::q6_k> == "q6_k");
  static_assert(peft::quantized_format_index("nf4") == 2);
  static_assert(peft::quantized_format_index("q6_k") == 5);
  CHECK(peft::quantized_format_names() == "int8, q4_0, nf4, q8_0, q4_k, q6_k");
  CHECK(peft::quantized_format_names("|") == "int8|q4_0|nf4|q8_0|q4_k|q6_k");
  std::vector<std::string> seen;
  peft::for_each_quantized_format([&](auto format) {
    using Q = typename decltype(format)::type;
    static_assert(peft::mutable_base_weight<Q> && peft::fused_base_weight<Q, float>);
    seen.emplace_back(Q::name);
  });
  CHECK(seen == std::vector<std::string>{"int8_rowwise", "q4_0", "nf4", "q8_0", "q4_k", "q6_k"});

  // A run-time name reaches the format's type: quantize with it and compare with the direct call.
  peft::rng gen(9);
  const auto w = random_weight(4, 64, gen);
  for (const char* name : {"int8", "q4_0", "nf4", "q8_0", "q4_k", "q6_k"}) {
    INFO(name);
    peft::matrix<double> via_name;
    const bool found = peft::visit_quantized_format(name, [&](auto format) {
      using Q = typename decltype(format)::type;
      CHECK(peft::quantized_cli_name<Q> == name);
      via_name = decoded(Q::quantize(w.view()));
    });
    REQUIRE(found);
    REQUIRE(peft_test::nontrivial(via_name));
    const auto index = peft::quantized_format_index(name);
    REQUIRE(index);
    CHECK(peft::visit_quantized_format_at(*index, [&](auto format) {
      CHECK(peft_test::exactly_equal(decoded(decltype(format)::type::quantize(w.view())), via_name));
    }));
  }
  int calls = 0;
  for (const char* bad : {"int8_rowwise", "Q4_0", "", "q4_K", "Q6_K", "q5_k"}) {
    CHECK_FALSE(peft::visit_quantized_format(bad, [&](auto) { ++calls; }));
    CHECK_FALSE(peft::quantized_format_index(bad));
  }
  CHECK_FALSE(peft::visit_quantized_format_at(6, [&](auto) { ++calls; }));
  CHECK(calls == 0);
}

}  // namespace test_quantized
