// GGUF: the reader and writer, frozen bases over a file's tensors, LoRA adapters out and in.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "peft/adapters/dora.hpp"
#include "peft/base/dense.hpp"
#include "peft/base/gguf_weight.hpp"
#include "peft/io/gguf.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/models/gguf_lora.hpp"
#include "peft/models/gguf_model.hpp"
#include "support/file_support.hpp"

namespace test_gguf {

namespace fs = std::filesystem;
using peft::index;
using peft::io::ggml_type;
using peft::io::gguf_type;
using peft::io::gguf_value;

fs::path scratch(const std::string& name) { return peft_test::process_scratch() / ("gguf_" + name); }

std::vector<std::byte> read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> b(c.size());
  std::memcpy(b.data(), c.data(), c.size());
  return b;
}

/// Random weights with a few large entries, as real weights have.
std::vector<float> random_weights(index rows, index cols, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> n(0.0f, 0.05f);
  std::vector<float> w(static_cast<std::size_t>(rows * cols));
  for (auto& v : w) v = n(gen);
  for (std::size_t i = 0; i < w.size(); i += 97) w[i] *= 8.0f;
  return w;
}

/// The rows of w (rows, cols) encoded as ggml type t.
std::vector<std::byte> encode(ggml_type t, const std::vector<float>& w, index rows, index cols) {
  const auto blk = *peft::io::ggml_block_of(static_cast<std::uint32_t>(t));
  const std::size_t row_bytes = static_cast<std::size_t>(cols / blk.elements) * blk.bytes;
  std::vector<std::byte> out(row_bytes * static_cast<std::size_t>(rows));
  auto blocks = [&](auto quantize, auto* first, index block) {
    using B = std::remove_pointer_t<decltype(first)>;
    for (index i = 0; i < rows; ++i) {
      auto* b = reinterpret_cast<B*>(out.data() + static_cast<std::size_t>(i) * row_bytes);
      for (index k = 0; k < cols / block; ++k) REQUIRE(quantize(w.data() + i * cols + k * block, b[k]));
    }
  };
  namespace f = peft::formats;
  switch (t) {
    case ggml_type::f32: std::memcpy(out.data(), w.data(), out.size()); break;
    case ggml_type::f16:
    case ggml_type::bf16:
      for (std::size_t i = 0; i < w.size(); ++i) {
        const std::uint16_t bits = t == ggml_type::f16 ? peft::f16(w[i]).bits : peft::bf16(w[i]).bits;
        std::memcpy(out.data() + 2 * i, &bits, 2);
      }
      break;
    case ggml_type::q8_0: blocks(f::quantize_q8_0_block, static_cast<f::block_q8_0*>(nullptr), f::q8_0_block_size); break;
    case ggml_type::q4_0: blocks(f::quantize_q4_0_block, static_cast<f::block_q4_0*>(nullptr), f::q4_0_block_size); break;
    case ggml_type::q4_k: blocks(f::quantize_q4_k_block, static_cast<f::block_q4_k*>(nullptr), f::q4_k_block_size); break;
    case ggml_type::q6_k: blocks(f::quantize_q6_k_block, static_cast<f::block_q6_k*>(nullptr), f::q6_k_block_size); break;
    default: FAIL("no encoder");
  }
  return out;
}

/// Row i of an encoded tensor decoded in double with the formats' reference decoders.
std::vector<double> reference_row(ggml_type t, const std::vector<std::byte>& bytes, index i, index cols) {
  const auto blk = *peft::io::ggml_block_of(static_cast<std::uint32_t>(t));
  const std::size_t row_bytes = static_cast<std::size_t>(cols / blk.elements) * blk.bytes;
  const std::byte* row = bytes.data() + static_cast<std::size_t>(i) * row_bytes;
  std::vector<double> out(static_cast<std::size_t>(cols));
  namespace f = peft::formats;
  auto blocks = [&](auto decode, auto* first, index block) {
    using B = std::remove_pointer_t<decltype(first)>;
    const auto* b = reinterpret_cast<const B*>(row);
    for (index k = 0; k < cols / block; ++k) decode(b[k], out.data() + k * block);
  };
  switch (t) {
    case ggml_type::f32:
      for (index p = 0; p < cols; ++p) {
        float v;
        std::memcpy(&v, row + 4 * p, 4);
        out[static_cast<std::size_t>(p)] = v;
      }
      break;
    case ggml_type::f16:
    case ggml_type::bf16:
      for (index p = 0; p < cols; ++p) {
        std::uint16_t bits;
        std::memcpy(&bits, row + 2 * p, 2);
        out[static_cast<std::size_t>(p)] = t == ggml_type::f16 ? static_cast<double>(static_cast<float>(peft::f16::from_bits(bits)))
                                                               : static_cast<double>(static_cast<float>(peft::bf16::from_bits(bits)));
      }
      break;
    case ggml_type::q8_0: blocks([](const auto& b, double* o) { f::decode_q8_0_block(b, o); }, static_cast<const f::block_q8_0*>(nullptr), f::q8_0_block_size); break;
    case ggml_type::q4_0: blocks([](const auto& b, double* o) { f::decode_q4_0_block(b, o); }, static_cast<const f::block_q4_0*>(nullptr), f::q4_0_block_size); break;
    case ggml_type::q4_k: blocks([](const auto& b, double* o) { f::decode_q4_k_block(b, o); }, static_cast<const f::block_q4_k*>(nullptr), f::q4_k_block_size); break;
    case ggml_type::q6_k: blocks([](const auto& b, double* o) { f::decode_q6_k_block(b, o); }, static_cast<const f::block_q6_k*>(nullptr), f::q6_k_block_size); break;
    default: FAIL("no decoder");
  }
  return out;
}

/// A small GGUF file with every metadata type and two tensors.
peft::io::gguf_writer sample_writer() {
  peft::io::gguf_writer w;
  w.set("general.architecture", gguf_value::string("llama"));
  w.set("t.u32", gguf_value::u32(4000000000u));
  w.set("t.i32", gguf_value::i32(-7));
  w.set("t.u64", gguf_value::u64(1ull << 40));
  w.set("t.i64", gguf_value::i64(-(1ll << 40)));
  w.set("t.f32", gguf_value::f32(0.25f));
  w.set("t.f64", gguf_value::f64(1e-300));
  w.set("t.bool", gguf_value::boolean(true));
  w.set("t.strings", gguf_value::array(gguf_type::string, {gguf_value::string("a"), gguf_value::string("héllo")}));
  w.set("t.nested", gguf_value::array(gguf_type::array, {gguf_value::array(gguf_type::i32, {gguf_value::i32(1), gguf_value::i32(2)})}));
  const std::vector<float> a = {1, 2, 3, 4, 5, 6};
  w.add_f32("a", 2, 3, a);
  const auto q = encode(ggml_type::q8_0, random_weights(2, 64, 1), 2, 64);
  w.add_tensor("q", ggml_type::q8_0, {64, 2}, q);
  return w;
}

TEST_CASE("gguf files round-trip every metadata type and tensor", "[gguf]") {
  const fs::path p = scratch("sample.gguf");
  sample_writer().write(p);
  const auto f = peft::io::gguf_file::open(p);
  CHECK(f.version() == 3);
  CHECK(f.alignment() == 32);
  CHECK(f.string("general.architecture") == "llama");
  CHECK(f.integer("t.u32") == 4000000000ll);
  CHECK(f.integer("t.i32") == -7);
  CHECK(f.integer("t.u64") == (1ll << 40));
  CHECK(f.integer("t.i64") == -(1ll << 40));
  CHECK(f.number("t.f32") == 0.25);
  CHECK(f.number("t.f64") == 1e-300);
  CHECK(f.find("t.bool")->boolean_value() == true);
  CHECK(*f.find("t.strings")->array_value()->at(1).string_value() == "héllo");
  CHECK(f.find("t.nested")->array_value()->at(0).array_value()->at(1).integer() == 2);
  CHECK_FALSE(f.integer("absent").has_value());
  CHECK_THROWS_AS(f.string("t.u32"), peft::format_error);
  const auto& a = f.tensor("a");
  CHECK(a.rows() == 2);
  CHECK(a.cols() == 3);
  CHECK(a.offset % 32 == 0);
  float v[6];
  std::memcpy(v, f.bytes(a).data(), sizeof v);
  CHECK(v[5] == 6.0f);
  CHECK(f.tensor("q").nbytes == 2 * 2 * 34);
  CHECK_THROWS_WITH(f.tensor("nope"), Catch::Contains("no tensor 'nope'"));
  // An image in memory reads the same.
  const auto g = peft::io::gguf_file::parse(read_all(p));
  CHECK(g.tensors().size() == 2);
}

TEST_CASE("gguf rejects every truncation and corruption with format_error", "[gguf]") {
  const fs::path p = scratch("sample_bad.gguf");
  sample_writer().write(p);
  const auto good = read_all(p);
  // Every prefix that cuts the header or a tensor short (the last 24 bytes are the padding after
  // the last tensor, 136 bytes of Q8_0).
  for (std::size_t n = 0; n < good.size() - 24; n += (n < 600 ? 1 : 7)) {
    std::vector<std::byte> cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    CHECK_THROWS_AS(peft::io::gguf_file::parse(cut), peft::format_error);
  }
  auto corrupt = [&](std::size_t at, std::uint32_t value) {
    auto b = good;
    std::memcpy(b.data() + at, &value, 4);
    return b;
  };
  CHECK_THROWS_WITH(peft::io::gguf_file::parse(corrupt(0, 0x12345678)), Catch::Contains("magic"));
  CHECK_THROWS_WITH(peft::io::gguf_file::parse(corrupt(4, 9)), Catch::Contains("version 9"));
  // A huge tensor count cannot fit.
  auto b = good;
  const std::uint64_t huge = 1ull << 60;
  std::memcpy(b.data() + 8, &huge, 8);
  CHECK_THROWS_WITH(peft::io::gguf_file::parse(b), Catch::Contains("cannot fit"));
  // The type of tensor "q" (after its name, dims and ne) made unknown, then a misaligned offset.
  const std::string needle = "q";
  std::size_t at = 0;
  for (std::size_t i = 0; i + 9 < good.size(); ++i) {
    std::uint64_t len;
    std::memcpy(&len, good.data() + i, 8);
    if (len == 1 && static_cast<char>(good[i + 8]) == 'q') {
      std::uint32_t dims;
      std::memcpy(&dims, good.data() + i + 9, 4);
      if (dims == 2) at = i + 9 + 4 + 16;  // the type field
    }
  }
  REQUIRE(at > 0);
  CHECK_THROWS_WITH(peft::io::gguf_file::parse(corrupt(at, 5)), Catch::Contains("unknown ggml type 5"));
  CHECK_THROWS_WITH(peft::io::gguf_file::parse(corrupt(at + 4, 3)), Catch::Contains("not a multiple of the alignment"));
  CHECK_THROWS_WITH(peft::io::gguf_file::parse(corrupt(at + 4, 0)), Catch::Contains("overlap"));
  CHECK_THROWS_AS(peft::io::gguf_file::open(scratch("missing.gguf")), peft::io_error);
}

TEST_CASE("gguf_writer checks sizes and names, and never leaves a partial file", "[gguf]") {
  peft::io::gguf_writer w;
  const std::vector<std::byte> bytes(10);
  CHECK_THROWS_WITH(w.add_tensor("x", ggml_type::q4_k, {100, 1}, bytes), Catch::Contains("multiple of Q4_K's block of 256"));
  CHECK_THROWS_WITH(w.add_tensor("x", ggml_type::f32, {3, 1}, bytes), Catch::Contains("needs 12 bytes"));
  const std::vector<float> v(4);
  w.add_f32("x", 1, 4, v);
  CHECK_THROWS_WITH(w.add_f32("x", 1, 4, v), Catch::Contains("duplicate"));
  CHECK_THROWS_AS(w.write(fs::path("/nonexistent-dir/x.gguf")), peft::io_error);
  CHECK_FALSE(fs::exists("/nonexistent-dir/x.gguf"));
}

TEST_CASE("gguf_weight over each type equals the reference decode, in place", "[gguf][quantized]") {
  const index out = 19, in = 512;
  for (ggml_type t : {ggml_type::f32, ggml_type::f16, ggml_type::bf16, ggml_type::q8_0, ggml_type::q4_0, ggml_type::q4_k,
                      ggml_type::q6_k}) {
    DYNAMIC_SECTION(peft::io::ggml_type_name(t)) {
      const auto w = random_weights(out, in, 7);
      const auto bytes = encode(t, w, out, in);
      std::vector<float> bias(static_cast<std::size_t>(out));
      for (index j = 0; j < out; ++j) bias[static_cast<std::size_t>(j)] = 0.01f * static_cast<float>(j);
      peft::io::gguf_writer wr;
      wr.add_tensor("w", t, {in, out}, bytes);
      const fs::path p = scratch("w.gguf");
      wr.write(p);
      const auto f = peft::io::gguf_file::open(p);
      const auto base = peft::gguf_weight::view(f, f.tensor("w"), bias);
      CHECK(base.in_place());
      CHECK(base.data().data() == f.bytes(f.tensor("w")).data());
      std::vector<std::vector<double>> ref;
      double norm = 0;
      for (index i = 0; i < out; ++i) {
        ref.push_back(reference_row(t, bytes, i, in));
        for (double v : ref.back()) norm += v * v;
      }
      REQUIRE(norm > 1.0);  // not trivially zero
      std::vector<float> row(static_cast<std::size_t>(in));
      for (index i = 0; i < out; ++i) {
        base.dequantize_row(i, row.data());
        for (index p2 = 0; p2 < in; ++p2) REQUIRE(row[static_cast<std::size_t>(p2)] == static_cast<float>(ref[static_cast<std::size_t>(i)][static_cast<std::size_t>(p2)]));
      }
      for (index m : {1, 3, 9, 40}) {  // the skinny dot kernels and the panel path
        peft::matrix<float> x(m, in), y(m, out), dx(m, in);
        std::mt19937 gen(static_cast<unsigned>(m));
        std::normal_distribution<float> n(0.0f, 1.0f);
        for (auto& v : x.storage()) v = n(gen);
        base.matmul(x.view(), y.view());
        peft::matrix<float> dy(m, out);
        for (auto& v : dy.storage()) v = n(gen);
        base.matmul_t(dy.view(), dx.view());
        for (index r = 0; r < m; ++r) {
          for (index j = 0; j < out; ++j) {
            double e = bias[static_cast<std::size_t>(j)], mag = 0;
            for (index p2 = 0; p2 < in; ++p2) {
              e += ref[static_cast<std::size_t>(j)][static_cast<std::size_t>(p2)] * x(r, p2);
              mag += std::abs(ref[static_cast<std::size_t>(j)][static_cast<std::size_t>(p2)] * x(r, p2));
            }
            REQUIRE(std::abs(y(r, j) - e) <= 1e-5 * mag + 1e-6);
          }
          for (index p2 = 0; p2 < in; p2 += 37) {
            double e = 0, mag = 0;
            for (index j = 0; j < out; ++j) {
              e += dy(r, j) * ref[static_cast<std::size_t>(j)][static_cast<std::size_t>(p2)];
              mag += std::abs(dy(r, j) * ref[static_cast<std::size_t>(j)][static_cast<std::size_t>(p2)]);
            }
            REQUIRE(std::abs(dx(r, p2) - e) <= 1e-5 * mag + 1e-6);
          }
        }
      }
      // Rows moved, not decoded; a merge copies the tensor out of the file and leaves it intact.
      std::vector<index> perm(static_cast<std::size_t>(out));
      for (index i = 0; i < out; ++i) perm[static_cast<std::size_t>(i)] = (i * 7) % out;
      const auto moved = base.permuted_rows(perm);
      moved.dequantize_row(3, row.data());
      CHECK(row[5] == static_cast<float>(ref[static_cast<std::size_t>(perm[3])][5]));
      CHECK(moved.bias_value<float>(3) == bias[static_cast<std::size_t>(perm[3])]);
      auto merged = base;
      peft::matrix<double> dw(out, in);
      dw(2, 10) = 0.5;
      merged.add_to_weight(peft::matrix_view<const double>(dw.view()), 1.0);
      CHECK_FALSE(merged.in_place());
      merged.dequantize_row(2, row.data());
      CHECK(std::abs(row[10] - (ref[2][10] + 0.5)) < 0.05);
      base.dequantize_row(2, row.data());
      CHECK(row[10] == static_cast<float>(ref[2][10]));
      CHECK(f.bytes(f.tensor("w"))[0] == bytes[0]);
    }
  }
}

TEST_CASE("gguf_weight refuses types it does not implement, by name", "[gguf]") {
  peft::io::gguf_writer wr;
  const std::vector<std::byte> q5(176);
  wr.add_tensor("blk.0.ffn_down.weight", ggml_type::q5_k, {256, 1}, q5);
  const fs::path p = scratch("q5k.gguf");
  wr.write(p);
  const auto f = peft::io::gguf_file::open(p);
  CHECK_THROWS_WITH(peft::gguf_weight::view(f, f.tensor("blk.0.ffn_down.weight")),
                    Catch::Contains("'blk.0.ffn_down.weight' has type Q5_K") && Catch::Contains("gguf_weight::view"));
}

TEST_CASE("llama.cpp's q/k row order is a per-head interleave", "[gguf]") {
  // permute() of convert_hf_to_gguf.py: reshape(heads, 2, hd/2).swapaxes(1, 2).
  const auto perm = peft::models::gguf_qk_permutation(8, 2);  // 2 heads of 4 rows
  // HF rows 0,1 (first half) and 2,3 (second half) of head 0 go to GGUF rows 0,2 and 1,3.
  CHECK(perm == std::vector<index>{0, 2, 1, 3, 4, 6, 5, 7});
  CHECK(peft::models::gguf_tensor_name(peft::models::architecture::llama, "model.layers.11.mlp.down_proj", "weight") ==
        "blk.11.ffn_down.weight");
  CHECK(peft::models::gguf_tensor_name(peft::models::architecture::gpt2, "transformer.h.0.attn.c_attn", "bias") ==
        "blk.0.attn_qkv.bias");
  CHECK_FALSE(peft::models::gguf_tensor_name(peft::models::architecture::llama, "model.layers.x.mlp.down_proj", "weight"));
}

/// A llama-shaped config: 4 heads, 2 kv heads, head_dim 8.
peft::models::lm_config small_llama() {
  peft::models::lm_config c;
  c.arch = peft::models::architecture::llama;
  c.hidden_size = 32;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 8;
  c.intermediate_size = 48;
  c.layers = 2;
  c.vocab_size = 50;
  c.max_positions = 64;
  return c;
}

peft::matrix<double> random_matrix(index r, index c, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> n(0.0, 0.3);
  peft::matrix<double> m(r, c);
  for (auto& v : m.storage()) v = n(gen);
  return m;
}

/// scale * B A of a LoRA alternative.
peft::matrix<double> delta_of(const peft::lora<double>& a) {
  peft::matrix<double> d(a.out_features(), a.in_features());
  for (index i = 0; i < d.rows(); ++i) {
    for (index j = 0; j < d.cols(); ++j) {
      double s = 0;
      for (index k = 0; k < a.rank(); ++k) s += a.B()(i, k) * a.A()(k, j);
      d(i, j) = s * a.scale();
    }
  }
  return d;
}

TEST_CASE("GGUF LoRA export and import are inverse, q/k rows in llama.cpp's order", "[gguf]") {
  const auto cfg = small_llama();
  peft::io::peft_checkpoint<double> ck;
  ck.config.peft_type = "LORA";
  struct mod {
    const char* path;
    index out, in, r;
    double scale;
  };
  // Different ranks and scales: one alpha cannot express them, so scales fold into B.
  const mod mods[] = {{"model.layers.0.self_attn.q_proj", 32, 32, 4, 2.0},
                      {"model.layers.0.self_attn.k_proj", 16, 32, 4, 2.0},
                      {"model.layers.1.mlp.down_proj", 32, 48, 2, 0.75},
                      {"model.layers.1.self_attn.v_proj", 16, 32, 8, 1.0 / std::sqrt(8.0)}};
  unsigned seed = 1;
  for (const auto& m : mods) {
    ck.add(m.path, peft::any_adapter<double>(peft::lora<double>(random_matrix(m.r, m.in, seed), random_matrix(m.out, m.r, seed + 100), m.scale)));
    ++seed;
  }
  const fs::path p = scratch("lora.gguf");
  peft::models::export_gguf_lora(ck, cfg, p);
  const auto f = peft::io::gguf_file::open(p);
  CHECK(f.string("general.type") == "adapter");
  CHECK(f.string("adapter.type") == "lora");
  CHECK(f.number("adapter.lora.alpha") == Approx(8.0));  // the first module's s r
  const auto& qb = f.tensor("blk.0.attn_q.weight.lora_b");
  CHECK(qb.ne == std::vector<std::int64_t>{4, 32});
  CHECK(f.tensor("blk.0.attn_q.weight.lora_a").ne == std::vector<std::int64_t>{32, 4});
  // GGUF row 1 of q's B is HF row hd/2 = 4 (head 0, second half, j = 0).
  float g1[4];
  std::memcpy(g1, f.bytes(qb).data() + 1 * 4 * sizeof(float), sizeof g1);
  REQUIRE(ck.modules[1].path == "model.layers.0.self_attn.q_proj");
  const auto& q_hf = ck.modules[1].adapter.get<peft::lora<double>>();
  CHECK(g1[0] == Approx(q_hf.B()(4, 0)));

  const auto back = peft::models::import_gguf_lora(f);  // head counts from the file
  REQUIRE(back.modules.size() == ck.modules.size());
  for (std::size_t i = 0; i < ck.modules.size(); ++i) {
    CHECK(back.modules[i].path == ck.modules[i].path);
    const auto& a = ck.modules[i].adapter.get<peft::lora<double>>();
    const auto& b = back.modules[i].adapter.get<peft::lora<float>>();
    CHECK(b.rank() == a.rank());
    const auto da = delta_of(a);
    auto widen = [](peft::matrix_view<const float> v) {
      peft::matrix<double> m(v.rows(), v.cols());
      for (index r = 0; r < v.rows(); ++r) {
        for (index c = 0; c < v.cols(); ++c) m(r, c) = v(r, c);
      }
      return m;
    };
    peft::lora<double> bd(widen(b.A()), widen(b.B()), static_cast<double>(b.scale()));
    const auto db = delta_of(bd);
    for (index r = 0; r < da.rows(); ++r) {
      for (index c = 0; c < da.cols(); ++c) REQUIRE(db(r, c) == Approx(da(r, c)).epsilon(1e-5).margin(1e-6));
    }
  }
}

TEST_CASE("GGUF LoRA export refuses what llama.cpp cannot run, in one line", "[gguf]") {
  const auto cfg = small_llama();
  peft::io::peft_checkpoint<double> ck;
  ck.config.peft_type = "LORA";
  peft::lora_options o;
  o.rank = 2;
  const auto w0 = random_matrix(32, 32, 9);
  const auto base = peft::dense<double>::from(peft::matrix_view<const double>(w0.view()));
  ck.add("model.layers.0.self_attn.q_proj", peft::any_adapter<double>(peft::dora<double>(base, o)));
  const fs::path p = scratch("dora.gguf");
  fs::remove(p);
  CHECK_THROWS_WITH(peft::models::export_gguf_lora(ck, cfg, p), Catch::Contains("peft merge"));
  CHECK_FALSE(fs::exists(p));
  // Without head counts an imported llama q projection cannot be put back in order.
  peft::io::gguf_writer w;
  w.set("general.architecture", gguf_value::string("llama"));
  w.set("general.type", gguf_value::string("adapter"));
  w.set("adapter.type", gguf_value::string("lora"));
  w.set("adapter.lora.alpha", gguf_value::f32(16));
  const std::vector<float> a(2 * 32, 0.1f), b(32 * 2, 0.2f);
  w.add_f32("blk.0.attn_q.weight.lora_a", 2, 32, a);
  w.add_f32("blk.0.attn_q.weight.lora_b", 32, 2, b);
  w.write(p);
  const auto f = peft::io::gguf_file::open(p);
  CHECK_THROWS_WITH(peft::models::import_gguf_lora(f), Catch::Contains("--model"));
  const auto ok = peft::models::import_gguf_lora(f, &cfg);
  CHECK(ok.modules[0].adapter.get<peft::lora<float>>().scale() == Approx(8.0));
}

}  // namespace test_gguf
