// any_quantized: the run-time choice of a quantized format gives that format's own results, bit
// for bit, in every operation; the format scope and its errors.
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/base/any_quantized.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "support/test_support.hpp"

using namespace peft_test;

namespace {

using ix = peft::index;

/// Adds (i0 + 2 j0 + 1) to every element of each tile: visible, tile-position dependent.
struct mark_tiles {
  template <class T>
  void operator()(ix i0, ix j0, peft::matrix_view<T> tile) const {
    for (ix i = 0; i < tile.rows(); ++i) {
      for (ix j = 0; j < tile.cols(); ++j) tile(i, j) += static_cast<T>(i0 + 2 * j0 + 1);
    }
  }
};

template <class T, class Q>
void check_same_as(const Q& q, const peft::any_quantized& a, peft::rng& gen) {
  const ix out = q.out_features(), in = q.in_features();
  for (const ix batch : {ix{1}, ix{5}, ix{40}}) {  // skinny and panel paths
    INFO("batch " << batch);
    const auto x = random_matrix<T>(batch, in, gen);
    REQUIRE(nontrivial(x));
    peft::matrix<T> yq(batch, out), ya(batch, out);
    q.matmul(x.view(), yq.view());
    a.matmul(x.view(), ya.view());
    REQUIRE(nontrivial(yq));
    CHECK(bitwise_equal<T>(yq.view(), ya.view()));
    q.matmul(x.view(), yq.view(), mark_tiles{});
    a.matmul(x.view(), ya.view(), mark_tiles{});
    CHECK(bitwise_equal<T>(yq.view(), ya.view()));
    const auto dy = random_matrix<T>(batch, out, gen);
    peft::matrix<T> dxq(batch, in), dxa(batch, in);
    q.matmul_t(dy.view(), dxq.view());
    a.matmul_t(dy.view(), dxa.view());
    REQUIRE(nontrivial(dxq));
    CHECK(bitwise_equal<T>(dxq.view(), dxa.view()));
    q.matmul_t(dy.view(), dxq.view(), true);
    a.matmul_t(dy.view(), dxa.view(), true);
    CHECK(bitwise_equal<T>(dxq.view(), dxa.view()));
  }
  std::vector<T> rq(static_cast<std::size_t>(in)), ra(rq.size());
  for (ix i = 0; i < out; ++i) {
    q.dequantize_row(i, rq.data());
    a.dequantize_row(i, ra.data());
    CHECK(rq == ra);
    CHECK(q.template bias_value<T>(i) == a.template bias_value<T>(i));
  }
}

}  // namespace

TEST_CASE("any_quantized gives each format's own results bit for bit", "[quantized][any_quantized]") {
  peft::rng gen(41);
  const ix out = 37, in = 512;
  const auto w = random_matrix<float>(out, in, gen);
  const auto bias = random_vector<float>(out, gen);
  std::size_t visited = 0;
  peft::for_each_quantized_format([&](auto format) {
    using Q = typename decltype(format)::type;
    const std::string name(peft::quantized_cli_name<Q>);
    INFO(name);
    ++visited;
    Q q = Q::quantize(w.view(), bias.data());
    auto a = peft::any_quantized::quantize(name, w.view(), bias.data());
    CHECK(a.format_name() == name);
    CHECK(std::holds_alternative<Q>(a.get()));
    CHECK(a.out_features() == out);
    CHECK(a.in_features() == in);
    CHECK(a.has_bias());
    CHECK(a.storage_bytes() == q.storage_bytes());
    CHECK(exactly_equal(a.dequantize(), q.dequantize()));
    check_same_as<float>(q, a, gen);
    check_same_as<double>(q, a, gen);

    // Merging re-quantizes as the format does.
    const auto dw = random_matrix<double>(out, in, gen, -0.1, 0.1);
    const auto db = random_vector<double>(out, gen);
    q.add_to_weight(dw.view(), 0.5);
    a.add_to_weight(dw.view(), 0.5);
    q.add_to_bias(db.data(), -2.0);
    a.add_to_bias(db.data(), -2.0);
    CHECK(exactly_equal(a.dequantize(), q.dequantize()));
    check_same_as<float>(q, a, gen);
  });
  CHECK(visited == peft::quantized_formats::size);
}

TEST_CASE("any_quantized takes its format from the innermost scope", "[quantized][any_quantized]") {
  peft::rng gen(42);
  const auto w = random_matrix<float>(4, 64, gen);
  const float* no_bias = nullptr;
  CHECK_THROWS_WITH(peft::any_quantized::quantize(w.view(), no_bias),
                    Catch::Contains("any_quantized::quantize") && Catch::Contains("no format chosen"));
  {
    const peft::any_quantized::format_scope outer("q4_k");
    CHECK(peft::any_quantized::quantize(w.view(), no_bias).format_name() == "q4_k");
    {
      const peft::any_quantized::format_scope inner("int8");
      CHECK(peft::any_quantized::quantize(w.view(), no_bias).format_name() == "int8");
    }
    CHECK(peft::any_quantized::quantize(w.view(), no_bias).format_name() == "q4_k");
    CHECK_THROWS_WITH(peft::any_quantized::format_scope("q5_1"),
                      Catch::Contains("any_quantized::format_scope") && Catch::Contains("'q5_1'") &&
                          Catch::Contains("nf4"));
    CHECK(peft::any_quantized::quantize(w.view(), no_bias).format_name() == "q4_k");  // unchanged by the failure
  }
  CHECK_THROWS_AS(peft::any_quantized::quantize(w.view(), no_bias), peft::error);
  CHECK_THROWS_WITH(peft::any_quantized::quantize("f32", w.view(), no_bias), Catch::Contains("no quantized format is named 'f32'"));
}
