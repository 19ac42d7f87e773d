// tests/io/test_safetensors.cpp — the safetensors reader and writer.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "peft/io/safetensors.hpp"

namespace test_safetensors {

namespace fs = std::filesystem;
using peft::dtype;
using peft::io::safetensors_file;
using peft::io::safetensors_writer;

namespace {

/// A fresh directory under the system temp directory, removed (with its contents) at scope exit.
class temp_dir {
 public:
  temp_dir() {
    static std::atomic<int> counter{0};
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    path_ =
        fs::temp_directory_path() / ("peft-safetensors-test-" + std::to_string(::getpid()) + "-" +
                                     std::to_string(stamp) + "-" + std::to_string(counter++));
    fs::create_directories(path_);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }
  /// Names of every entry in the directory, hidden ones included.
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_))
      names.push_back(e.path().filename().string());
    return names;
  }

 private:
  fs::path path_;
};

std::vector<std::byte> to_bytes(std::string_view s) {
  std::vector<std::byte> b(s.size());
  if (!s.empty()) std::memcpy(b.data(), s.data(), s.size());
  return b;
}

/// A safetensors image: the 8-byte length (the header's size unless `length` says otherwise),
/// the header text and `data_bytes` bytes counting up from 0.
std::vector<std::byte> image(std::string_view header, std::size_t data_bytes,
                             std::optional<std::uint64_t> length = std::nullopt) {
  const std::uint64_t n = length.value_or(header.size());
  std::vector<std::byte> b;
  for (int i = 0; i < 8; ++i) b.push_back(static_cast<std::byte>((n >> (8 * i)) & 0xffu));
  const auto h = to_bytes(header);
  b.insert(b.end(), h.begin(), h.end());
  for (std::size_t i = 0; i < data_bytes; ++i) b.push_back(static_cast<std::byte>(i & 0xffu));
  return b;
}

void write_file(const fs::path& p, const std::vector<std::byte>& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::vector<std::byte> read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE(in.good());
  const std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> b(c.size());
  if (!c.empty()) std::memcpy(b.data(), c.data(), c.size());
  return b;
}

template <class T>
std::span<const std::byte> as_bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

/// The message of the format_error `f` throws; fails the test if it throws anything else.
template <class F>
std::string format_error_message(F&& f) {
  try {
    f();
  } catch (const peft::format_error& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected peft::format_error, got: " << e.what());
  }
  FAIL("expected peft::format_error, nothing was thrown");
  return {};
}

}  // namespace

TEST_CASE("safetensors round trip of every dtype", "[safetensors]") {
  const std::vector<double> f64 = {1.0, -2.5, 3.141592653589793, 1e-300, 0.0, -0.0};
  const std::vector<float> f32 = {0.5f, -1.25f, 3.4e38f};
  const std::vector<float> f16_values = {1.0f, -0.5f, 65504.0f, 0.0009765625f};  // exact in f16
  const std::vector<float> bf16_values = {1.0f, -2.0f, 0.15625f, 3.0e38f};       // 3e38 rounds
  const std::vector<std::int64_t> i64 = {std::numeric_limits<std::int64_t>::min(), -1, 0,
                                         std::numeric_limits<std::int64_t>::max()};
  const std::vector<std::int32_t> i32 = {-123456789};  // a scalar
  const std::vector<std::int8_t> i8 = {-128, 0, 127};
  const std::vector<std::uint8_t> u8 = {};  // zero-size

  safetensors_writer w;
  w.set_metadata({{"format", "pt"}, {"note", "héllo \"quoted\"\n"}});
  w.add("f64", {2, 3}, f64);
  w.add("f32", {3}, f32);
  w.add("f16", {2, 2}, std::span<const float>(f16_values), dtype::f16);
  w.add("bf16", {4}, bf16_values, dtype::bf16);
  w.add("i64", {4}, i64);
  w.add("i32", {}, i32);
  w.add("i8", {3}, i8);
  w.add("u8", {0, 4}, u8);
  CHECK(w.size() == 8);

  temp_dir dir;
  const fs::path file = dir / "model.safetensors";
  w.write(file);
  CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});

  const std::vector<std::byte> raw = read_file(file);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i)
    n = (n << 8) | std::to_integer<std::uint64_t>(raw[static_cast<std::size_t>(i)]);
  CHECK((8 + n) % 8 == 0);
  const std::string header(reinterpret_cast<const char*>(raw.data()) + 8, n);
  CHECK(header.rfind("{\"__metadata__\":{", 0) == 0);

  auto check = [&](const safetensors_file& f) {
    REQUIRE(f.tensors().size() == 8);
    // Added order == data order == begin order.
    const std::vector<std::string> order = {"f64", "f32", "f16", "bf16", "i64", "i32", "i8", "u8"};
    std::size_t expected_begin = 0;
    for (std::size_t i = 0; i < order.size(); ++i) {
      CHECK(f.tensors()[i].name == order[i]);
      CHECK(f.tensors()[i].begin == expected_begin);
      expected_begin = f.tensors()[i].end;
    }
    CHECK(f.metadata() ==
          std::map<std::string, std::string>{{"format", "pt"}, {"note", "héllo \"quoted\"\n"}});

    CHECK(f.info("f64").type == dtype::f64);
    CHECK(f.info("f64").shape == std::vector<std::int64_t>{2, 3});
    CHECK(f.read<double>("f64") == f64);
    CHECK(f.read<float>("f32") == f32);
    CHECK(f.info("f16").type == dtype::f16);
    CHECK(f.read<float>("f16") == f16_values);
    CHECK(f.info("bf16").type == dtype::bf16);
    const auto bf = f.read<float>("bf16");
    CHECK(bf[0] == 1.0f);
    CHECK(bf[1] == -2.0f);
    CHECK(bf[2] == 0.15625f);
    CHECK(bf[3] == static_cast<float>(peft::bf16(3.0e38f)));
    CHECK(f.read<std::int64_t>("i64") == i64);
    CHECK(f.info("i32").shape.empty());
    CHECK(f.info("i32").numel() == 1);
    CHECK(f.info("i32").nbytes() == 4);
    CHECK(f.read<std::int32_t>("i32") == i32);
    CHECK(f.read<std::int8_t>("i8") == i8);
    CHECK(f.info("u8").numel() == 0);
    CHECK(f.info("u8").nbytes() == 0);
    CHECK(f.info("u8").shape == std::vector<std::int64_t>{0, 4});
    CHECK(f.read<std::uint8_t>("u8").empty());
    CHECK(f.bytes("u8").empty());

    const auto b = f.bytes("f32");
    REQUIRE(b.size() == 12);
    CHECK(std::memcmp(b.data(), f32.data(), 12) == 0);
    CHECK(f.contains("f32"));
    CHECK_FALSE(f.contains("f3"));
  };

  const safetensors_file opened = safetensors_file::open(file);
  CHECK(opened.path() == file);
  check(opened);
  const safetensors_file parsed = safetensors_file::parse(raw);
  CHECK(parsed.path().empty());
  check(parsed);
  CHECK(parsed.tensors() == opened.tensors());
}

TEST_CASE("safetensors metadata is omitted when empty", "[safetensors]") {
  safetensors_writer w;
  w.add("x", {2}, std::vector<float>{1.0f, 2.0f});
  temp_dir dir;
  w.write(dir / "a.safetensors");
  const auto raw = read_file(dir / "a.safetensors");
  const std::string header(reinterpret_cast<const char*>(raw.data()) + 8, raw.size() - 8 - 8);
  CHECK(header.find("__metadata__") == std::string::npos);
  CHECK(header.rfind("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 0) == 0);
  const auto f = safetensors_file::open(dir / "a.safetensors");
  CHECK(f.metadata().empty());
  CHECK(f.read<double>("x") == std::vector<double>{1.0, 2.0});
}

TEST_CASE("safetensors read<T> converts every element", "[safetensors]") {
  // bf16 values are exactly representable in float: reading them as float is exact.
  std::vector<peft::bf16> stored;
  for (std::uint16_t bits : {0x3f80, 0xc000, 0x3e20, 0x7f7f, 0x0001, 0x8000}) {
    stored.push_back(peft::bf16::from_bits(bits));
  }
  safetensors_writer w;
  w.add("bf16", {2, 3}, stored);
  w.add("rounded", {3}, std::vector<double>{1.0 + 0x1p-8, 1.0 + 0x1p-7 + 0x1p-8 + 0x1p-10, -3.0},
        dtype::bf16);
  w.add("ints", {3}, std::vector<std::int32_t>{-7, 0, 1 << 30});
  w.add("f32", {4}, std::vector<float>{2.75f, -2.75f, 0.0f, -0.5f});
  w.add("nan", {1}, std::vector<float>{std::numeric_limits<float>::quiet_NaN()});
  w.add("big", {1}, std::vector<double>{3.0e9});
  w.add("f16", {2}, std::vector<float>{0.333251953125f, -1.0f}, dtype::f16);
  temp_dir dir;
  w.write(dir / "c.safetensors");
  const auto f = safetensors_file::open(dir / "c.safetensors");

  const auto as_float = f.read<float>("bf16");
  for (std::size_t i = 0; i < stored.size(); ++i) {
    CHECK(std::bit_cast<std::uint32_t>(as_float[i]) == static_cast<std::uint32_t>(stored[i].bits)
                                                           << 16);
  }
  CHECK(f.read<double>("bf16")[2] == 0.15625);
  const auto same = f.read<peft::bf16>("bf16");
  for (std::size_t i = 0; i < stored.size(); ++i) CHECK(same[i].bits == stored[i].bits);
  // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even (1); the other rounds up.
  CHECK(f.read<double>("rounded") == std::vector<double>{1.0, 1.0 + 0x1p-6, -3.0});

  CHECK(f.read<double>("ints") == std::vector<double>{-7.0, 0.0, 1073741824.0});
  CHECK(f.read<std::int64_t>("ints") == std::vector<std::int64_t>{-7, 0, 1 << 30});
  CHECK(f.read<std::int64_t>("f32") == std::vector<std::int64_t>{2, -2, 0, 0});  // truncation
  CHECK(f.read<std::int64_t>("big") == std::vector<std::int64_t>{3000000000});
  CHECK(f.read<double>("f16") == std::vector<double>{0.333251953125, -1.0});

  const std::string nan = format_error_message([&] { (void)f.read<std::int32_t>("nan"); });
  CHECK_THAT(nan, Catch::Contains("[safetensors_file::read]"));
  const std::string big = format_error_message([&] { (void)f.read<std::int32_t>("big"); });
  CHECK_THAT(big, Catch::Contains("does not fit"));
  CHECK(std::isnan(f.read<float>("nan")[0]));
}

TEST_CASE("safetensors read_matrix shapes", "[safetensors]") {
  safetensors_writer w;
  std::vector<float> six = {1, 2, 3, 4, 5, 6};
  w.add("m", {2, 3}, six);
  w.add("v", {6}, six);
  w.add("s", {}, std::vector<float>{7});
  w.add("t", {1, 2, 3}, six);
  w.add("e", {0, 5}, std::vector<float>{});
  w.add("mat", peft::matrix<double>(3, 2, std::vector<double>{1, 2, 3, 4, 5, 6}), dtype::f32);
  temp_dir dir;
  w.write(dir / "m.safetensors");
  const auto f = safetensors_file::open(dir / "m.safetensors");

  const auto m = f.read_matrix<double>("m");
  CHECK(m.rows() == 2);
  CHECK(m.cols() == 3);
  CHECK(m(1, 0) == 4.0);
  const auto v = f.read_matrix<float>("v");
  CHECK(v.rows() == 1);
  CHECK(v.cols() == 6);
  CHECK(v(0, 5) == 6.0f);
  const auto e = f.read_matrix<float>("e");
  CHECK(e.rows() == 0);
  CHECK(e.cols() == 5);
  const auto mat = f.read_matrix<float>("mat");
  CHECK(f.info("mat").type == dtype::f32);
  CHECK(mat.rows() == 3);
  CHECK(mat(2, 1) == 6.0f);
  CHECK_THROWS_AS(f.read_matrix<float>("s"), peft::shape_error);
  CHECK_THROWS_WITH(f.read_matrix<float>("t"), Catch::Contains("[safetensors_file::read_matrix]"));
  CHECK_THROWS_AS(f.read_matrix<float>("t"), peft::shape_error);
}

TEST_CASE("safetensors info on an unknown name", "[safetensors]") {
  const auto f =
      safetensors_file::parse(image(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 2));
  CHECK_FALSE(f.contains("nope"));
  const std::string msg = format_error_message([&] { (void)f.info("nope"); });
  CHECK_THAT(msg, Catch::Contains("[safetensors_file::info] no tensor named 'nope'"));
  CHECK_THROWS_AS(f.bytes("nope"), peft::format_error);
  CHECK_THROWS_AS(f.read<float>("nope"), peft::format_error);

  temp_dir dir;
  write_file(dir / "x.safetensors",
             image(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 2));
  const auto g = safetensors_file::open(dir / "x.safetensors");
  CHECK_THAT(format_error_message([&] { (void)g.info("b"); }), Catch::Contains("x.safetensors"));
}

TEST_CASE("safetensors accepts what the format allows", "[safetensors]") {
  SECTION("offsets out of key order are sorted by begin") {
    const auto f = safetensors_file::parse(image(
        R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},"b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
        6));
    REQUIRE(f.tensors().size() == 2);
    CHECK(f.tensors()[0].name == "b");
    CHECK(f.tensors()[1].name == "a");
    CHECK(f.read<int>("a") == std::vector<int>{4, 5});
  }
  SECTION("zero-size tensors overlap nothing, gaps and trailing bytes are allowed") {
    const auto f = safetensors_file::parse(
        image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
              R"("z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
              R"("y":{"dtype":"F64","shape":[3,0],"data_offsets":[8,8]},)"
              R"("b":{"dtype":"U8","shape":[1],"data_offsets":[10,11]}}   )",
              16));
    REQUIRE(f.tensors().size() == 4);
    CHECK(f.tensors()[0].name == "a");  // by begin: a [0, 8), z [4, 4), y [8, 8), b [10, 11)
    CHECK(f.tensors()[1].name == "z");
    CHECK(f.tensors()[2].name == "y");
    CHECK(f.read<int>("b") == std::vector<int>{10});
  }
  SECTION("brackets inside strings do not count as nesting; 128 levels are fine") {
    const std::string brackets = std::string(300, '[') + "\\\"{" + std::string(300, '}');
    const auto f =
        safetensors_file::parse(image("{\"__metadata__\":{\"k\":\"" + brackets +
                                          "\"},\"a\":{\"dtype\":\"U8\",\"shape\":[],"
                                          "\"data_offsets\":[0,1],\"x\":" +
                                          std::string(126, '[') + std::string(126, ']') + "}}",
                                      1));
    CHECK(f.metadata().at("k") == std::string(300, '[') + "\"{" + std::string(300, '}'));
    CHECK(f.read<int>("a") == std::vector<int>{0});
  }
  SECTION("empty header object, empty data") {
    const auto f = safetensors_file::parse(image("{}", 0));
    CHECK(f.tensors().empty());
    CHECK(f.metadata().empty());
  }
  SECTION("unknown fields in an entry are ignored; metadata may be empty") {
    const auto f = safetensors_file::parse(image(
        R"({"__metadata__":{},"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2],"x":[1]}} )",
        2));
    CHECK(f.tensors().size() == 1);
  }
}

TEST_CASE("safetensors rejects malformed files with format_error", "[safetensors]") {
  struct bad {
    const char* label;
    std::vector<std::byte> bytes;
    const char* what;  // part of the message
  };
  const auto entry = [](const std::string& body) { return "{\"t\":{" + body + "}}"; };
  const std::vector<bad> cases = {
      {"empty file", {}, "truncated"},
      {"5 bytes", std::vector<std::byte>(5), "truncated"},
      {"header past the end", image("{}", 0, 100), "header length past the end"},
      {"header one byte too long", image("{}", 0, 3), "header length past the end"},
      {"header over 100 MB", image("{}", 0, 100'000'001), "exceeds the limit"},
      {"header length 2^64-1", image("{}", 0, std::numeric_limits<std::uint64_t>::max()),
       "exceeds the limit"},
      {"empty header", image("", 0), "not valid JSON"},
      {"not JSON", image("{\"a\":", 0), "not valid JSON"},
      {"trailing garbage", image("{}x", 0), "not valid JSON"},
      {"invalid UTF-8", image("{\"\xff\":{}}", 0), "not valid JSON"},
      {"NUL in header", image(std::string("{}\0", 3), 0), "not valid JSON"},
      {"array header", image("[]", 0), "not a JSON object"},
      {"string header", image("\"x\"", 0), "not a JSON object"},
      {"entry not an object", image("{\"t\":3}", 0), "is not a JSON object"},
      {"missing dtype", image(entry(R"("shape":[1],"data_offsets":[0,1])"), 1), "has no dtype"},
      {"dtype not a string", image(entry(R"("dtype":4,"shape":[1],"data_offsets":[0,1])"), 1),
       "dtype is not a string"},
      {"unknown dtype", image(entry(R"("dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1])"), 1),
       "unknown dtype 'F8_E4M3'"},
      {"lower-case dtype", image(entry(R"("dtype":"f32","shape":[1],"data_offsets":[0,4])"), 4),
       "unknown dtype"},
      {"missing shape", image(entry(R"("dtype":"U8","data_offsets":[0,1])"), 1), "has no shape"},
      {"shape not an array", image(entry(R"("dtype":"U8","shape":1,"data_offsets":[0,1])"), 1),
       "shape is not an array"},
      {"negative dimension", image(entry(R"("dtype":"U8","shape":[-1],"data_offsets":[0,1])"), 1),
       "negative dimension -1"},
      {"fractional dimension",
       image(entry(R"("dtype":"U8","shape":[1.0],"data_offsets":[0,1])"), 1), "not an integer"},
      {"string dimension", image(entry(R"("dtype":"U8","shape":["1"],"data_offsets":[0,1])"), 1),
       "not an integer"},
      {"dimension 2^63",
       image(entry(R"("dtype":"U8","shape":[9223372036854775808,0],"data_offsets":[0,0])"), 0),
       "not an integer"},
      {"dimension 2^64",
       image(entry(R"("dtype":"U8","shape":[18446744073709551616,0],"data_offsets":[0,0])"), 0),
       "not an integer"},
      {"numel overflow",
       image(entry(R"("dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0])"), 0),
       "overflows"},
      {"byte size overflow",
       image(entry(R"("dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0])"), 0),
       "overflows"},
      {"missing data_offsets", image(entry(R"("dtype":"U8","shape":[1])"), 1),
       "has no data_offsets"},
      {"data_offsets not an array", image(entry(R"("dtype":"U8","shape":[1],"data_offsets":0)"), 1),
       "data_offsets is not two"},
      {"one offset", image(entry(R"("dtype":"U8","shape":[1],"data_offsets":[1])"), 1),
       "data_offsets is not two"},
      {"three offsets", image(entry(R"("dtype":"U8","shape":[1],"data_offsets":[0,1,2])"), 2),
       "data_offsets is not two"},
      {"negative offset", image(entry(R"("dtype":"U8","shape":[1],"data_offsets":[-1,0])"), 1),
       "data_offsets is not two"},
      {"fractional offset", image(entry(R"("dtype":"U8","shape":[1],"data_offsets":[0,1.5])"), 2),
       "data_offsets is not two"},
      {"begin > end", image(entry(R"("dtype":"U8","shape":[0],"data_offsets":[2,1])"), 2),
       "begin > end"},
      {"end past the data", image(entry(R"("dtype":"U8","shape":[4],"data_offsets":[0,4])"), 3),
       "past the end of the 3-byte data section"},
      {"huge end",
       image(
           entry(
               R"("dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615])"),
           3),
       "past the end"},
      {"size mismatch", image(entry(R"("dtype":"F32","shape":[2],"data_offsets":[0,4])"), 8),
       "F32 [2] = 8 bytes, but its data_offsets span 4 bytes"},
      {"scalar size mismatch", image(entry(R"("dtype":"I64","shape":[],"data_offsets":[0,4])"), 8),
       "data_offsets span 4 bytes"},
      {"overlap",
       image(
           R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
           12),
       "overlap"},
      {"identical ranges",
       image(
           R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}})",
           2),
       "overlap"},
      {"nested overlap",
       image(
           R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
           8),
       "overlap"},
      {"nested too deep", image("{\"t\":" + std::string(128, '[') + std::string(128, ']') + "}", 0),
       "nests deeper than 128 levels"},
      {"metadata not an object", image(R"({"__metadata__":"pt"})", 0),
       "__metadata__ is not a JSON object"},
      {"metadata null", image(R"({"__metadata__":null})", 0), "__metadata__ is not a JSON object"},
      {"metadata value not a string", image(R"({"__metadata__":{"format":1}})", 0),
       "__metadata__ value of 'format' is not a string"},
  };
  for (const bad& c : cases) {
    INFO(c.label);
    const std::string msg = format_error_message([&] { (void)safetensors_file::parse(c.bytes); });
    CHECK_THAT(msg, Catch::StartsWith("[safetensors_file::parse] "));
    CHECK_THAT(msg, Catch::Contains(c.what));
  }

  // The same through open() on a real file (the zero-length one is never mapped).
  temp_dir dir;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    INFO(cases[i].label);
    const fs::path p = dir / ("bad" + std::to_string(i) + ".safetensors");
    write_file(p, cases[i].bytes);
    const std::string msg = format_error_message([&] { (void)safetensors_file::open(p); });
    CHECK_THAT(msg, Catch::StartsWith("[safetensors_file::open] "));
    CHECK_THAT(msg, Catch::Contains(cases[i].what));
    CHECK_THAT(msg, Catch::Contains(p.string()));
  }
}

TEST_CASE("safetensors open reports OS failures as io_error", "[safetensors]") {
  temp_dir dir;
  CHECK_THROWS_AS(safetensors_file::open(dir / "missing.safetensors"), peft::io_error);
  CHECK_THROWS_WITH(safetensors_file::open(dir / "missing.safetensors"),
                    Catch::StartsWith("[safetensors_file::open] cannot open"));
  CHECK_THROWS_AS(safetensors_file::open(dir.path()), peft::io_error);  // a directory
}

TEST_CASE("safetensors_file is movable", "[safetensors]") {
  safetensors_writer w;
  w.add("a", {3}, std::vector<double>{1, 2, 3});
  w.set_metadata({{"k", "v"}});
  temp_dir dir;
  w.write(dir / "a.safetensors");
  w.write(dir / "b.safetensors");

  safetensors_file a = safetensors_file::open(dir / "a.safetensors");
  safetensors_file moved(std::move(a));
  CHECK(moved.read<double>("a") == std::vector<double>{1, 2, 3});
  CHECK(moved.path() == dir / "a.safetensors");

  safetensors_file b = safetensors_file::open(dir / "b.safetensors");
  b = std::move(moved);  // b's own mapping is released
  CHECK(b.read<double>("a") == std::vector<double>{1, 2, 3});
  CHECK(b.metadata().at("k") == "v");

  safetensors_file p = safetensors_file::parse(read_file(dir / "a.safetensors"));
  safetensors_file q;
  CHECK(q.tensors().empty());
  q = std::move(p);
  CHECK(q.read<float>("a") == std::vector<float>{1, 2, 3});
  std::vector<safetensors_file> files;
  for (int i = 0; i < 20; ++i)
    files.push_back(safetensors_file::parse(read_file(dir / "a.safetensors")));
  for (const auto& f : files) CHECK(f.read<int>("a") == std::vector<int>{1, 2, 3});
}

TEST_CASE("safetensors_writer checks what it is given", "[safetensors]") {
  safetensors_writer w;
  const std::vector<float> three = {1, 2, 3};
  CHECK_THROWS_AS(w.add("a", dtype::f32, {2}, as_bytes_of(three)), peft::shape_error);
  CHECK_THROWS_WITH(w.add("a", dtype::f32, {2}, as_bytes_of(three)),
                    Catch::StartsWith("[safetensors_writer::add]"));
  CHECK_THROWS_AS(w.add("a", {2}, three), peft::shape_error);
  CHECK_THROWS_AS(w.add("a", {-3}, three), peft::shape_error);
  CHECK_THROWS_AS(
      w.add_lazy("a", dtype::f64, {1 << 30, 1 << 30, 1 << 30}, [](std::span<std::byte>) {}),
      peft::shape_error);
  CHECK(w.size() == 0);
  w.add("a", dtype::f32, {3}, as_bytes_of(three));
  CHECK_THROWS_AS(w.add("a", {3}, three), peft::error);
  CHECK_THROWS_AS(w.add_lazy("a", dtype::u8, {1}, [](std::span<std::byte>) {}), peft::error);
  CHECK_THROWS_AS(w.add("__metadata__", {3}, three), peft::error);
  CHECK(w.size() == 1);

  SECTION("invalid UTF-8 in a name is refused before anything is written") {
    w.add("\xff", {3}, three);
    temp_dir dir;
    CHECK_THROWS_AS(w.write(dir / "u.safetensors"), peft::format_error);
    CHECK(dir.entries().empty());
  }
}

TEST_CASE("safetensors_writer add_lazy fills at write time", "[safetensors]") {
  safetensors_writer w;
  int calls = 0;
  w.add("first", {2}, std::vector<std::int64_t>{5, 6});
  w.add_lazy("lazy", dtype::f32, {2, 2}, [&](std::span<std::byte> buf) {
    ++calls;
    REQUIRE(buf.size() == 16);
    for (std::byte b : buf) REQUIRE(b == std::byte{0});
    for (std::size_t i = 0; i < 4; ++i)
      peft::store_element(buf.data(), dtype::f32, i, 0.5 * static_cast<double>(i));
  });
  w.add_lazy("lazy_bf16", dtype::bf16, {3}, [&](std::span<std::byte> buf) {
    ++calls;
    REQUIRE(buf.size() == 6);
    for (std::byte b : buf) REQUIRE(b == std::byte{0});
    buf[1] = std::byte{0x3f};
    buf[0] = std::byte{0x80};  // element 0 = 1.0; the rest stays zero
  });
  w.add_lazy("empty", dtype::i32, {0}, [&](std::span<std::byte> buf) { CHECK(buf.empty()); });
  CHECK(w.size() == 4);
  CHECK(calls == 0);

  temp_dir dir;
  w.write(dir / "lazy.safetensors");
  CHECK(calls == 2);
  const auto f = safetensors_file::open(dir / "lazy.safetensors");
  CHECK(f.read<double>("lazy") == std::vector<double>{0.0, 0.5, 1.0, 1.5});
  CHECK(f.read<float>("lazy_bf16") == std::vector<float>{1.0f, 0.0f, 0.0f});
  CHECK(f.read<std::int64_t>("first") == std::vector<std::int64_t>{5, 6});
  CHECK(f.tensors()[1].name == "lazy");
  CHECK(f.tensors()[1].begin == 16);

  w.write(dir / "again.safetensors");  // write() can run again
  CHECK(calls == 4);
  CHECK(read_file(dir / "again.safetensors") == read_file(dir / "lazy.safetensors"));
}

TEST_CASE("safetensors_writer write is atomic", "[safetensors]") {
  temp_dir dir;
  const fs::path target = dir / "model.safetensors";

  safetensors_writer failing;
  failing.add("ok", {2}, std::vector<float>{1, 2});
  failing.add_lazy("boom", dtype::f32, {1024},
                   [](std::span<std::byte>) { throw std::runtime_error("fill failed"); });

  SECTION("a throwing fill leaves no file at all") {
    CHECK_THROWS_WITH(failing.write(target), "fill failed");
    CHECK(dir.entries().empty());
  }
  SECTION("a throwing fill leaves an existing target byte-identical") {
    safetensors_writer good;
    good.add("x", {3}, std::vector<double>{1, 2, 3});
    good.write(target);
    const auto before = read_file(target);
    CHECK_THROWS_AS(failing.write(target), std::runtime_error);
    CHECK(read_file(target) == before);
    CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});
    CHECK(safetensors_file::open(target).read<double>("x") == std::vector<double>{1, 2, 3});
  }
  SECTION("a successful write replaces the target and leaves no temporary file") {
    write_file(target, image("{}", 0));
    safetensors_writer good;
    good.add("y", {1}, std::vector<float>{4});
    good.write(target);
    CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});
    CHECK(safetensors_file::open(target).read<float>("y") == std::vector<float>{4});
  }
  SECTION("a directory that does not exist is an io_error") {
    safetensors_writer good;
    good.add("y", {1}, std::vector<float>{4});
    CHECK_THROWS_AS(good.write(dir / "no" / "such" / "m.safetensors"), peft::io_error);
    CHECK_THROWS_WITH(good.write(dir / "no" / "m.safetensors"),
                      Catch::StartsWith("[safetensors_writer::write]"));
    CHECK(dir.entries().empty());
  }
  SECTION("renaming over a directory fails cleanly") {
    fs::create_directory(target);
    fs::create_directory(target / "inside");  // a non-empty directory cannot be replaced
    safetensors_writer good;
    good.add("y", {1}, std::vector<float>{4});
    CHECK_THROWS_AS(good.write(target), peft::io_error);
    CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});
  }
}

TEST_CASE("safetensors reads the PEFT golden LoRA adapter", "[safetensors]") {
  const fs::path file =
      fs::path(PEFT_TEST_DATA_DIR) / "peft/lora/adapter/adapter_model.safetensors";
  if (!fs::exists(file)) {
    SUCCEED("no " << file.string() << "; skipped");
    return;
  }
  const auto f = safetensors_file::open(file);
  CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"}});
  REQUIRE(f.tensors().size() == 4);
  const std::string p = "base_model.model.";
  const std::vector<std::pair<std::string, std::vector<std::int64_t>>> expected = {
      {p + "down.lora_A.weight", {8, 96}},
      {p + "down.lora_B.weight", {48, 8}},
      {p + "up.lora_A.weight", {8, 64}},
      {p + "up.lora_B.weight", {96, 8}},
  };
  for (const auto& [name, shape] : expected) {
    INFO(name);
    REQUIRE(f.contains(name));
    CHECK(f.info(name).type == dtype::f32);
    CHECK(f.info(name).shape == shape);
    const auto m = f.read_matrix<float>(name);
    CHECK(m.rows() == shape[0]);
    CHECK(m.cols() == shape[1]);
    for (float x : m.storage()) REQUIRE(std::isfinite(x));
  }

  // Our writer reproduces a readable copy with identical tensors.
  safetensors_writer w;
  w.set_metadata(f.metadata());
  for (const auto& t : f.tensors()) w.add(t.name, t.type, t.shape, f.bytes(t.name));
  temp_dir dir;
  w.write(dir / "copy.safetensors");
  const auto g = safetensors_file::open(dir / "copy.safetensors");
  CHECK(g.metadata() == f.metadata());
  for (const auto& t : f.tensors()) {
    CHECK(g.info(t.name).shape == t.shape);
    CHECK(g.read<float>(t.name) == f.read<float>(t.name));
  }
}

}  // namespace test_safetensors

TEST_CASE("safetensors release drops a read tensor's pages from resident memory and reads stay exact",
          "[safetensors]") {
  const auto path = std::filesystem::temp_directory_path() / ("peft_release_" + std::to_string(::getpid()) + ".safetensors");
  const std::size_t n = std::size_t{16} << 20;  // 64 MiB of f32
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(i % 1000) * 0.5f + 1.0f;
  {
    peft::io::safetensors_writer w;
    w.add("w", {static_cast<std::int64_t>(n / 1024), 1024}, std::span<const float>(v));
    w.add("b", {3}, std::vector<float>{1.0f, 2.0f, 3.0f});
    w.write(path);
  }
  auto resident_bytes = [] {
    std::ifstream statm("/proc/self/statm");
    long long size = 0, resident = 0;
    statm >> size >> resident;
    return resident * static_cast<long long>(::sysconf(_SC_PAGESIZE));
  };
  {
    const auto f = peft::io::safetensors_file::open(path);
    auto first = f.read<float>("w");
    const long long before = resident_bytes();
    f.release("w");
    const long long after = resident_bytes();
    if (before > 0) CHECK(before - after > (48LL << 20));  // the mapped 64 MiB left (Linux /proc)
    CHECK(f.read<float>("w") == v);                           // faulted in again from the file
    CHECK(first == v);
    f.release("b");  // a tensor smaller than a page: nothing to drop, nothing broken
    CHECK(f.read<float>("b") == std::vector<float>{1.0f, 2.0f, 3.0f});
  }
  {
    // A file parsed from memory is not a mapping: release leaves its bytes alone.
    std::ifstream in(path, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> bytes(text.size());
    std::memcpy(bytes.data(), text.data(), text.size());
    const auto f = peft::io::safetensors_file::parse(std::move(bytes));
    f.release("w");
    CHECK(f.read<float>("w") == v);
  }
  std::filesystem::remove(path);
}
