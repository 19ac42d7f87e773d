// The fused f32 kernels (kernels/linear.hpp) in every version this CPU runs, against plain
// double loops: shapes with tails (m = 1, 3, 17; k and n not multiples of any vector width),
// strided views, bias, the epilogue contract, and the Eigen path of large batches.
#include <cmath>
#include <cstddef>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/adapters/dora.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/shira.hpp"
#include "peft/adapters/vera.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/linear.hpp"
#include "peft/kernels/low_rank_epilogue.hpp"
#include "support/test_support.hpp"

namespace test_linear {

using ix = peft::index;
namespace kernels = peft::kernels;

namespace {

/// A view with `pad` spare elements after each row (NaN-filled), so stride != cols.
struct strided_matrix {
  std::vector<float> buf;
  peft::matrix_view<float> v;
  strided_matrix(ix rows, ix cols, ix pad) {
    buf.assign(static_cast<std::size_t>(rows * (cols + pad) + 1), std::numeric_limits<float>::quiet_NaN());
    v = peft::matrix_view<float>(buf.data(), rows, cols, cols + pad);
  }
};

struct shape {
  ix m, n, k;
};

}  // namespace

TEST_CASE("linear_nt: every version equals the double product, with bias and tails", "[kernels][linear]") {
  peft::rng gen(7);
  const shape shapes[] = {{1, 5, 7},  {3, 17, 33},   {17, 70, 1100}, {40, 9, 16},  {5, 130, 2049},
                          {8, 64, 4}, {1, 1, 1},     {2, 3, 0},      {9, 67, 129}, {260, 70, 40},
                          {300, 5, 3}};
  for (auto version : peft_test::supported_isas()) {
    kernels::scoped_isa guard(version);
    for (const auto& s : shapes) {
      for (ix pad : {ix{0}, ix{3}}) {
        INFO("isa " << kernels::isa_name(version) << " m " << s.m << " n " << s.n << " k " << s.k << " pad " << pad);
        strided_matrix x(s.m, s.k, pad), w(s.n, s.k, pad), y(s.m, s.n, pad);
        peft_test::fill_random(x.v, gen);
        peft_test::fill_random(w.v, gen);
        std::vector<float> bias(static_cast<std::size_t>(s.n));
        for (auto& b : bias) b = static_cast<float>(gen.uniform(-2.0, 2.0));
        if (s.k > 0) REQUIRE(peft_test::nontrivial(x.v));
        kernels::linear_nt(x.v, w.v, bias.data(), y.v);
        double worst = 0.0;
        for (ix i = 0; i < s.m; ++i) {
          for (ix j = 0; j < s.n; ++j) {
            double exact = bias[static_cast<std::size_t>(j)], abs_sum = std::abs(exact);
            for (ix p = 0; p < s.k; ++p) {
              exact += static_cast<double>(x.v(i, p)) * w.v(j, p);
              abs_sum += std::abs(static_cast<double>(x.v(i, p)) * w.v(j, p));
            }
            worst = std::max(worst, std::abs(y.v(i, j) - exact) / peft_test::f32_dot_bound(s.k, abs_sum));
          }
        }
        CHECK(worst <= 1.0);
        // Nothing written into the padding.
        for (ix i = 0; i < s.m; ++i)
          for (ix p = 0; p < pad; ++p) CHECK(std::isnan(y.v.row(i)[s.n + p]));
      }
    }
  }
}

TEST_CASE("linear_nt: the epilogue sees each finished tile exactly once", "[kernels][linear]") {
  peft::rng gen(8);
  for (auto version : peft_test::supported_isas()) {
    kernels::scoped_isa guard(version);
    for (const shape s : {shape{3, 200, 37}, shape{17, 129, 64}, shape{270, 70, 20}}) {
      INFO("isa " << kernels::isa_name(version) << " m " << s.m << " n " << s.n);
      auto x = peft_test::random_matrix<float>(s.m, s.k, gen);
      auto w = peft_test::random_matrix<float>(s.n, s.k, gen);
      peft::matrix<float> y(s.m, s.n), plain(s.m, s.n);
      std::vector<float> bias(static_cast<std::size_t>(s.n), 0.5f);
      kernels::linear_nt(x.view(), w.view(), bias.data(), plain.view());
      peft::matrix<int> seen(s.m, s.n);
      std::mutex lock;
      bool contents_final = true;
      kernels::linear_nt(x.view(), w.view(), bias.data(), y.view(), [&](ix i0, ix j0, peft::matrix_view<float> tile) {
        const std::lock_guard<std::mutex> hold(lock);
        for (ix i = 0; i < tile.rows(); ++i) {
          for (ix j = 0; j < tile.cols(); ++j) {
            ++seen(i0 + i, j0 + j);
            contents_final = contents_final && tile(i, j) == plain(i0 + i, j0 + j);
            tile(i, j) = -tile(i, j);  // the epilogue's writes are what the caller gets
          }
        }
        CHECK(tile.data() == &y(i0, j0));
      });
      CHECK(contents_final);
      bool once = true, negated = true;
      for (ix i = 0; i < s.m; ++i) {
        for (ix j = 0; j < s.n; ++j) {
          once = once && seen(i, j) == 1;
          negated = negated && y(i, j) == -plain(i, j);
        }
      }
      CHECK(once);
      CHECK(negated);
    }
  }
}

TEST_CASE("linear_nn: every version equals the double product, overwrite and accumulate", "[kernels][linear]") {
  peft::rng gen(9);
  const shape shapes[] = {{1, 5, 7}, {2, 17, 33}, {3, 70, 1100}, {17, 9, 16}, {31, 300, 129}, {40, 33, 70}, {4, 0, 5}};
  for (auto version : peft_test::supported_isas()) {
    kernels::scoped_isa guard(version);
    for (const auto& s : shapes) {
      for (bool accumulate : {false, true}) {
        for (ix pad : {ix{0}, ix{2}}) {
          INFO("isa " << kernels::isa_name(version) << " m " << s.m << " n " << s.n << " k " << s.k
                      << " accumulate " << accumulate << " pad " << pad);
          strided_matrix dy(s.m, s.n, pad), w(s.n, s.k, pad), dx(s.m, s.k, pad);
          peft_test::fill_random(dy.v, gen);
          peft_test::fill_random(w.v, gen);
          peft_test::fill_random(dx.v, gen);
          const auto before = peft_test::to_double(dx.v);
          kernels::linear_nn(dy.v, w.v, dx.v, accumulate);
          double worst = 0.0;
          for (ix i = 0; i < s.m; ++i) {
            for (ix c = 0; c < s.k; ++c) {
              double exact = accumulate ? before(i, c) : 0.0, abs_sum = std::abs(exact);
              for (ix j = 0; j < s.n; ++j) {
                exact += static_cast<double>(dy.v(i, j)) * w.v(j, c);
                abs_sum += std::abs(static_cast<double>(dy.v(i, j)) * w.v(j, c));
              }
              worst = std::max(worst, std::abs(dx.v(i, c) - exact) / peft_test::f32_dot_bound(s.n, abs_sum));
            }
          }
          CHECK(worst <= 1.0);
          for (ix i = 0; i < s.m; ++i)
            for (ix p = 0; p < pad; ++p) CHECK(std::isnan(dx.v.row(i)[s.k + p]));
        }
      }
    }
  }
}

TEST_CASE("linear kernels reject mismatched shapes", "[kernels][linear]") {
  peft::matrix<float> x(2, 3), w(4, 5), y(2, 4), dx(2, 5);
  CHECK_THROWS_WITH(kernels::linear_nt(x.view(), w.view(), nullptr, y.view()),
                    Catch::Contains("kernels::linear_nt"));
  peft::matrix<float> dy(2, 3);
  CHECK_THROWS_WITH(kernels::linear_nn(dy.view(), w.view(), dx.view()), Catch::Contains("kernels::linear_nn"));
  CHECK_THROWS_AS(kernels::set_active_isa(static_cast<kernels::isa>(9)), peft::unsupported_error);
}

TEST_CASE("fused LoRA and DoRA forwards over dense<float> equal the unfused double computation",
          "[kernels][linear][lora][dora]") {
  peft::rng gen(10);
  for (auto version : peft_test::supported_isas()) {
    kernels::scoped_isa guard(version);
    for (const shape s : {shape{1, 70, 33}, shape{8, 129, 40}, shape{17, 129, 64}, shape{260, 20, 9}}) {
      INFO("isa " << kernels::isa_name(version) << " m " << s.m << " n " << s.n << " k " << s.k);
      auto wd = peft_test::random_matrix<double>(s.n, s.k, gen);
      std::vector<double> bd(static_cast<std::size_t>(s.n));
      for (auto& b : bd) b = gen.uniform(-1.0, 1.0);
      auto xd = peft_test::random_matrix<double>(s.m, s.k, gen);
      // Round the inputs to float first so both computations see the same numbers.
      peft::matrix<float> wf(s.n, s.k), xf(s.m, s.k);
      for (ix i = 0; i < s.n; ++i)
        for (ix j = 0; j < s.k; ++j) wd(i, j) = wf(i, j) = static_cast<float>(wd(i, j));
      for (ix i = 0; i < s.m; ++i)
        for (ix j = 0; j < s.k; ++j) xd(i, j) = xf(i, j) = static_cast<float>(xd(i, j));
      std::vector<float> bf(bd.begin(), bd.end());
      for (std::size_t j = 0; j < bd.size(); ++j) bd[j] = bf[j];
      const auto base_f = peft::dense<float>::from(peft::matrix_view<const float>(wf.view()), bf.data());
      const auto base_d = peft::dense<double>::from(peft::matrix_view<const double>(wd.view()), bd.data());

      peft::lora<float> lf(s.k, s.n, {.rank = 4, .alpha = 8, .init = peft::lora_init::random, .seed = 3});
      peft::lora<double> ld(s.k, s.n, {.rank = 4, .alpha = 8, .init = peft::lora_init::random, .seed = 3});
      for (ix i = 0; i < 4; ++i)
        for (ix j = 0; j < s.k; ++j) ld.A()(i, j) = lf.A()(i, j);
      for (ix i = 0; i < s.n; ++i)
        for (ix j = 0; j < 4; ++j) ld.B()(i, j) = lf.B()(i, j);
      REQUIRE(peft_test::nontrivial(lf.B()));
      peft::matrix<float> yf(s.m, s.n);
      peft::matrix<double> yd(s.m, s.n);
      peft::lora<float>::cache_type cf;
      peft::lora<double>::cache_type cd;
      lf.forward(base_f, xf.view(), yf.view(), cf);
      ld.forward(base_d, xd.view(), yd.view(), cd);
      CHECK(peft_test::rel_error(yf.view(), yd.view()) <= 1e-5);
      // The unfused term takes the same path: bit for bit on few rows (the dot blocks of both).
      peft::matrix<float> plain(s.m, s.n);
      base_f.matmul<float>(xf.view(), plain.view());
      peft::lora<float>::cache_type cu;
      lf.add_term(base_f, xf.view(), plain.view(), plain.view(), cu);
      if (s.m <= kernels::low_rank_block_rows) {
        CHECK(peft_test::exactly_equal(plain, yf));
      } else {
        CHECK(peft_test::rel_error(plain.view(), yf.view()) <= 1e-6);
      }

      peft::dora<float> df(base_f, {.rank = 4, .alpha = 8, .init = peft::lora_init::random, .seed = 5});
      peft::dora<double> dd(base_d, {.rank = 4, .alpha = 8, .init = peft::lora_init::random, .seed = 5});
      auto pf = df.parameters();
      auto pd = dd.parameters();
      REQUIRE(pf.size() == pd.size());
      for (std::size_t q = 0; q < pf.size(); ++q) {
        for (ix i = 0; i < pf[q].value.rows(); ++i)
          for (ix j = 0; j < pf[q].value.cols(); ++j) pd[q].value(i, j) = pf[q].value(i, j) * 1.25f;
        for (ix i = 0; i < pf[q].value.rows(); ++i)
          for (ix j = 0; j < pf[q].value.cols(); ++j) pf[q].value(i, j) = static_cast<float>(pd[q].value(i, j));
      }
      df.invalidate_norms();
      dd.invalidate_norms();
      peft::dora<float>::cache_type dcf;
      peft::dora<double>::cache_type dcd;
      df.forward(base_f, xf.view(), yf.view(), dcf);
      dd.forward(base_d, xd.view(), yd.view(), dcd);
      CHECK(peft_test::rel_error(yf.view(), yd.view()) <= 1e-5);
      // Backward after a fused forward uses what the epilogue stored (z, l): dx and dm agree.
      auto g = peft_test::random_matrix<double>(s.m, s.n, gen);
      peft::matrix<float> gf(s.m, s.n);
      for (ix i = 0; i < s.m; ++i)
        for (ix j = 0; j < s.n; ++j) g(i, j) = gf(i, j) = static_cast<float>(g(i, j));
      peft::matrix<float> dxf(s.m, s.k);
      peft::matrix<double> dxd(s.m, s.k);
      df.zero_grad();
      dd.zero_grad();
      df.backward(base_f, xf.view(), gf.view(), dxf.view(), dcf);
      dd.backward(base_d, xd.view(), g.view(), dxd.view(), dcd);
      CHECK(peft_test::rel_error(dxf.view(), dxd.view()) <= 1e-5);
      const auto gpf = df.parameters();
      const auto gpd = dd.parameters();
      for (std::size_t q = 0; q < gpf.size(); ++q) {
        INFO(gpf[q].name);
        CHECK(peft_test::rel_error(gpf[q].grad, gpd[q].grad) <= 2e-5);
      }
    }
  }
}

TEST_CASE("low_rank_epilogue on f32 tiles of a few rows (dot blocks) and more (Eigen) equals double",
          "[kernels][linear][lora]") {
  peft::rng gen(12);
  constexpr ix n = 150, r = 16;  // 150 columns: two full chunks of 64 and a tail
  for (auto version : peft_test::supported_isas()) {
    kernels::scoped_isa guard(version);
    for (const ix m : {ix{1}, ix{5}, kernels::low_rank_block_rows, kernels::low_rank_block_rows + 1}) {
      for (const bool with_col : {false, true}) {
        INFO("isa " << kernels::isa_name(version) << " m " << m << " col " << with_col);
        peft::matrix<float> p(m, r), b(n, r), y(m, n), z(m, n);
        std::vector<float> col(n), bias(n), bias_row(static_cast<std::size_t>(m));
        for (ix i = 0; i < m; ++i)
          for (ix q = 0; q < r; ++q) p(i, q) = static_cast<float>(gen.uniform(-1.0, 1.0));
        for (ix j = 0; j < n; ++j)
          for (ix q = 0; q < r; ++q) b(j, q) = static_cast<float>(gen.uniform(-1.0, 1.0));
        for (ix i = 0; i < m; ++i)
          for (ix j = 0; j < n; ++j) y(i, j) = static_cast<float>(gen.uniform(-1.0, 1.0));
        for (auto& v : col) v = static_cast<float>(gen.uniform(0.5, 1.5));
        for (auto& v : bias) v = static_cast<float>(gen.uniform(-1.0, 1.0));
        for (auto& v : bias_row) v = static_cast<float>(gen.uniform(0.5, 1.5));
        REQUIRE(peft_test::nontrivial(p));
        REQUIRE(peft_test::nontrivial(b));
        const peft::matrix<float> y0 = y;
        kernels::low_rank_epilogue<float> e;
        e.p = p.view();
        e.b = b.view();
        e.scale = 0.75f;
        e.col = with_col ? col.data() : nullptr;
        e.bias = bias.data();
        e.bias_row = bias_row.data();
        e.unscaled = with_col ? z.view() : peft::matrix_view<float>{};
        // The whole output as one tile (what bases without fused tiles pass), then column blocks.
        e(0, 0, y.view());
        for (ix i = 0; i < m; ++i) {
          for (ix j = 0; j < n; ++j) {
            double pb = 0.0;
            for (ix q = 0; q < r; ++q) pb += static_cast<double>(p(i, q)) * b(j, q);
            const double want = y0(i, j) + 0.75 * pb * (with_col ? col[j] : 1.0f) +
                                static_cast<double>(bias_row[static_cast<std::size_t>(i)]) * bias[j];
            CHECK(std::abs(y(i, j) - want) <= 1e-5 * (1.0 + std::abs(want)));
            if (with_col) CHECK(std::abs(z(i, j) - pb) <= 1e-5 * (1.0 + std::abs(pb)));
          }
        }
        peft::matrix<float> y2 = y0;
        e(0, 0, y2.view().block(0, 0, m, 64));
        e(0, 64, y2.view().block(0, 64, m, n - 64));
        CHECK(peft_test::rel_error(y2.view(), y.view()) <= 1e-6);
      }
    }
  }
}

TEST_CASE("fused VeRA and SHiRA forwards over dense<float> equal base + add_term", "[kernels][linear][vera][shira]") {
  peft::rng gen(11);
  for (auto version : peft_test::supported_isas()) {
    kernels::scoped_isa guard(version);
    for (const shape s : {shape{1, 70, 33}, shape{17, 129, 64}, shape{260, 131, 9}}) {
      INFO("isa " << kernels::isa_name(version) << " m " << s.m << " n " << s.n << " k " << s.k);
      const auto w = peft_test::random_matrix<float>(s.n, s.k, gen);
      std::vector<float> bias(static_cast<std::size_t>(s.n));
      for (auto& b : bias) b = static_cast<float>(gen.uniform(-1.0, 1.0));
      const auto base = peft::dense<float>::from(peft::matrix_view<const float>(w.view()), bias.data());
      const auto x = peft_test::random_matrix<float>(s.m, s.k, gen);
      peft::matrix<float> fused(s.m, s.n), plain(s.m, s.n);

      const std::pair<ix, ix> dims[] = {{s.k, s.n}};
      auto proj = peft::make_vera_projections<float>(8, dims, 4);
      peft::vera<float> v(proj, s.k, s.n);
      for (ix j = 0; j < s.n; ++j) v.lambda_b()(0, j) = static_cast<float>(gen.uniform(-1.0, 1.0));
      REQUIRE(peft_test::nontrivial(v.lambda_b()));
      peft::vera<float>::cache_type c1, c2;
      v.forward(base, x.view(), fused.view(), c1);
      base.matmul<float>(x.view(), plain.view());
      v.add_term(base, x.view(), plain.view(), plain.view(), c2);
      CHECK(peft_test::rel_error(fused.view(), plain.view()) <= 1e-6);
      // The cache the fused forward filled gives backward the same gradients.
      const auto g = peft_test::random_matrix<float>(s.m, s.n, gen);
      peft::matrix<float> dx1(s.m, s.k), dx2(s.m, s.k);
      v.zero_grad();
      v.backward(base, x.view(), g.view(), dx1.view(), c1);
      std::vector<peft::matrix<double>> g1;
      for (auto& p : v.parameters())
        if (p.trainable) g1.push_back(peft_test::to_double(p.grad));
      v.zero_grad();
      v.backward(base, x.view(), g.view(), dx2.view(), c2);
      CHECK(peft_test::rel_error(dx1.view(), dx2.view()) <= 1e-6);
      std::size_t q = 0;
      for (auto& p : v.parameters())
        if (p.trainable) CHECK(peft_test::rel_error(g1[q++], p.grad) <= 1e-6);

      peft::shira<float> a(s.k, s.n, {.rank = 2, .random_init = true, .seed = 9});
      REQUIRE(peft_test::nontrivial(a.values()));
      peft::shira<float>::cache_type sc;
      a.forward(base, x.view(), fused.view(), sc);
      base.matmul<float>(x.view(), plain.view());
      a.add_term(base, x.view(), plain.view(), plain.view(), sc);
      CHECK(peft_test::rel_error(fused.view(), plain.view()) <= 1e-6);
    }
  }
}

}  // namespace test_linear
