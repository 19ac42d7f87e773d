// Zero-copy bridges to Eigen and xtensor: same memory, same strides, writes visible both ways.
#include <cstddef>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xtensor.hpp>
#include <xtensor/xview.hpp>

#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "peft/interop/eigen.hpp"
#include "peft/interop/xtensor.hpp"
#include "support/test_support.hpp"

namespace test_interop {

using ix = peft::index;

namespace {

/// A 6 x 11 buffer of distinct non-zero values and a 4 x 5 strided window into it at (1, 3).
struct strided_fixture {
  std::vector<double> buf = std::vector<double>(6 * 11);
  peft::matrix_view<double> whole{buf.data(), 6, 11};
  peft::matrix_view<double> win = whole.block(1, 3, 4, 5);
  strided_fixture() { std::iota(buf.begin(), buf.end(), 1.0); }
};

}  // namespace

TEST_CASE("as_eigen maps a strided view without copying", "[interop]") {
  strided_fixture f;
  REQUIRE(peft_test::nontrivial(f.win));
  auto m = peft::as_eigen(f.win);
  static_assert(std::is_same_v<typename decltype(m)::Scalar, double>);
  CHECK(m.data() == f.win.data());
  CHECK(m.rows() == 4);
  CHECK(m.cols() == 5);
  CHECK(m.outerStride() == 11);
  CHECK(m.innerStride() == 1);
  for (ix i = 0; i < 4; ++i) {
    for (ix j = 0; j < 5; ++j) REQUIRE(m(i, j) == f.win(i, j));
  }
  m(2, 4) = -7.0;  // through Eigen into the buffer
  CHECK(f.buf[(1 + 2) * 11 + 3 + 4] == -7.0);
  f.buf[(1 + 0) * 11 + 3 + 1] = 123.0;  // through the buffer into Eigen
  CHECK(m(0, 1) == 123.0);
  m.setZero();  // only the window is touched
  CHECK(f.buf[1 * 11 + 2] == 1 * 11 + 2 + 1.0);
  CHECK(f.buf[1 * 11 + 8] == 1 * 11 + 8 + 1.0);
  CHECK(peft_test::count_nonzero(f.whole) == 6 * 11 - 20);

  // A const view gives a read-only map.
  strided_fixture g;
  auto cm = peft::as_eigen(peft::matrix_view<const double>(g.win));
  static_assert(!std::is_assignable_v<decltype(cm(0, 0)), double>);
  CHECK(cm.data() == g.win.data());
  CHECK(cm(3, 4) == g.win(3, 4));

  // Eigen arithmetic on the map agrees with loops over the view.
  const Eigen::MatrixXd prod = cm * cm.transpose();
  const auto ref = peft_test::ref_nt(g.win, g.win);
  for (ix i = 0; i < 4; ++i) {
    for (ix j = 0; j < 4; ++j) CHECK(prod(i, j) == Approx(ref(i, j)).epsilon(1e-15));
  }
}

TEST_CASE("view_of an Eigen row-major matrix shares its memory", "[interop]") {
  peft::rng gen(3);
  peft::eigen_row_major<float> e(5, 7);
  for (ix i = 0; i < 5; ++i) {
    for (ix j = 0; j < 7; ++j) e(i, j) = static_cast<float>(gen.uniform(0.5, 1.5));
  }
  auto v = peft::view_of(e);
  static_assert(std::is_same_v<decltype(v), peft::matrix_view<float>>);
  REQUIRE(peft_test::nontrivial(v));
  CHECK(v.data() == e.data());
  CHECK(v.rows() == 5);
  CHECK(v.cols() == 7);
  CHECK(v.stride() == 7);
  for (ix i = 0; i < 5; ++i) {
    for (ix j = 0; j < 7; ++j) REQUIRE(v(i, j) == e(i, j));
  }
  v(4, 6) = 42.0f;
  CHECK(e(4, 6) == 42.0f);
  e(0, 0) = -1.0f;
  CHECK(v(0, 0) == -1.0f);

  const auto& ce = e;
  auto cv = peft::view_of(ce);
  static_assert(std::is_same_v<decltype(cv), peft::matrix_view<const float>>);
  CHECK(cv.data() == e.data());
  CHECK(cv(4, 6) == 42.0f);
}

TEST_CASE("view_of Eigen vectors gives (n, 1) and (1, n) views", "[interop]") {
  Eigen::VectorXd col(4);
  col << 1.0, 2.0, 3.0, 4.0;
  auto vc = peft::view_of(col);
  CHECK(vc.rows() == 4);
  CHECK(vc.cols() == 1);
  CHECK(vc.data() == col.data());
  for (ix i = 0; i < 4; ++i) CHECK(vc(i, 0) == col(i));  // rows are adjacent in memory
  CHECK(vc.row(3) == col.data() + 3);
  vc(2, 0) = 30.0;
  CHECK(col(2) == 30.0);
  // The view works with the library's own copy, which walks rows by stride.
  const auto copy = peft::to_matrix(peft::matrix_view<const double>(vc));
  CHECK(copy(3, 0) == 4.0);

  const Eigen::VectorXd& ccol = col;
  auto cvc = peft::view_of(ccol);
  static_assert(std::is_same_v<decltype(cvc), peft::matrix_view<const double>>);
  CHECK(cvc(3, 0) == 4.0);

  Eigen::RowVectorXd row(3);
  row << 5.0, 6.0, 7.0;
  auto vr = peft::view_of(row);
  CHECK(vr.rows() == 1);
  CHECK(vr.cols() == 3);
  CHECK(vr(0, 2) == 7.0);
}

TEST_CASE("view_of(as_eigen(v)) round-trips the view exactly", "[interop]") {
  strided_fixture f;
  const auto back = peft::view_of(peft::as_eigen(f.win));
  static_assert(std::is_same_v<decltype(back), const peft::matrix_view<double>>);
  CHECK(back.data() == f.win.data());
  CHECK(back.rows() == f.win.rows());
  CHECK(back.cols() == f.win.cols());
  CHECK(back.stride() == f.win.stride());

  const auto cback = peft::view_of(peft::as_eigen(peft::matrix_view<const double>(f.win)));
  static_assert(std::is_same_v<decltype(cback), const peft::matrix_view<const double>>);
  CHECK(cback.data() == f.win.data());
  CHECK(cback.stride() == 11);

  // A one-row view whose stride is smaller than its width is mapped with a safe stride.
  auto one = peft::as_eigen(peft::matrix_view<double>(f.buf.data(), 1, 5, 0));
  CHECK(one.outerStride() == 5);
  CHECK(one(0, 4) == 5.0);
}

TEST_CASE("view_of an Eigen map with a non-unit inner stride is rejected", "[interop]") {
  std::vector<float> buf(24, 1.0f);
  using plain = peft::eigen_row_major<float>;
  Eigen::Map<plain, Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>> m(
      buf.data(), 3, 4, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(8, 2));
  CHECK_THROWS_AS(peft::view_of(m), peft::shape_error);
  // A unit inner stride with a wide outer stride is fine.
  Eigen::Map<plain, Eigen::Unaligned, Eigen::OuterStride<>> ok(buf.data() + 1, 3, 4,
                                                                 Eigen::OuterStride<>(8));
  const auto v = peft::view_of(ok);
  CHECK(v.data() == buf.data() + 1);
  CHECK(v.stride() == 8);
}

TEST_CASE("as_xtensor adapts a strided view without copying", "[interop]") {
  strided_fixture f;
  auto t = peft::as_xtensor(f.win);
  REQUIRE(t.dimension() == 2);
  CHECK(t.shape()[0] == 4);
  CHECK(t.shape()[1] == 5);
  CHECK(t.strides()[0] == 11);
  CHECK(t.strides()[1] == 1);
  CHECK(t.data() == f.win.data());
  for (std::size_t i = 0; i < 4; ++i) {
    for (std::size_t j = 0; j < 5; ++j) {
      REQUIRE(t(i, j) == f.win(static_cast<ix>(i), static_cast<ix>(j)));
    }
  }
  t(3, 0) = -3.0;
  CHECK(f.buf[(1 + 3) * 11 + 3] == -3.0);
  f.win(1, 1) = 77.0;
  CHECK(t(1, 1) == 77.0);
  // Reductions over the adaptor see exactly the window.
  double sum = 0.0;
  for (const double v : t) sum += v;
  CHECK(t.size() == 20);
  double ref = 0.0;
  for (ix i = 0; i < 4; ++i) {
    for (ix j = 0; j < 5; ++j) ref += f.win(i, j);
  }
  CHECK(sum == ref);

  // Whole-tensor operations touch the window only, never the padding between its rows.
  const std::vector<double> outside_before = [&] {
    std::vector<double> o;
    for (ix i = 0; i < 6; ++i) {
      for (ix j = 0; j < 11; ++j) {
        if (i < 1 || i >= 5 || j < 3 || j >= 8) o.push_back(f.whole(i, j));
      }
    }
    return o;
  }();
  t.fill(0.5);
  t += 1.0;
  t *= 2.0;
  for (ix i = 0; i < 4; ++i) {
    for (ix j = 0; j < 5; ++j) REQUIRE(f.win(i, j) == 3.0);
  }
  std::vector<double> outside_after;
  for (ix i = 0; i < 6; ++i) {
    for (ix j = 0; j < 11; ++j) {
      if (i < 1 || i >= 5 || j < 3 || j >= 8) outside_after.push_back(f.whole(i, j));
    }
  }
  CHECK(outside_after == outside_before);
  f.win(3, 0) = -3.0;
  f.win(1, 1) = 77.0;

  // Const views adapt read-only.
  const auto ct = peft::as_xtensor(peft::matrix_view<const double>(f.win));
  CHECK(ct(3, 0) == -3.0);

  // Round trip: the view of the adaptor is the original view.
  const auto back = peft::view_of(t);
  CHECK(back.data() == f.win.data());
  CHECK(back.rows() == 4);
  CHECK(back.cols() == 5);
  CHECK(back.stride() == 11);

  // One row: the row stride is irrelevant and becomes the width.
  auto one = peft::as_xtensor(f.whole.block(2, 1, 1, 4));
  CHECK(one.shape()[0] == 1);
  CHECK(one(0, 3) == f.whole(2, 4));
}

TEST_CASE("view_of an xtensor container shares its memory", "[interop]") {
  xt::xtensor<float, 2> t = xt::zeros<float>({3, 4});
  for (std::size_t i = 0; i < 3; ++i) {
    for (std::size_t j = 0; j < 4; ++j) t(i, j) = static_cast<float>(10 * i + j + 1);
  }
  auto v = peft::view_of(t);
  static_assert(std::is_same_v<decltype(v), peft::matrix_view<float>>);
  REQUIRE(peft_test::nontrivial(v));
  CHECK(v.data() == t.data());
  CHECK(v.rows() == 3);
  CHECK(v.cols() == 4);
  CHECK(v.stride() == 4);
  CHECK(v(2, 3) == 24.0f);
  v(1, 2) = -1.0f;
  CHECK(t(1, 2) == -1.0f);
  t(0, 0) = 5.0f;
  CHECK(v(0, 0) == 5.0f);

  const auto& ct = t;
  auto cv = peft::view_of(ct);
  static_assert(std::is_same_v<decltype(cv), peft::matrix_view<const float>>);
  CHECK(cv(1, 2) == -1.0f);

  xt::xarray<double> a = xt::ones<double>({2, 5});
  auto va = peft::view_of(a);
  CHECK(va.data() == a.data());
  CHECK(va.stride() == 5);
  CHECK(va(1, 4) == 1.0);

  // Degenerate extents: xtensor gives size-1 dimensions stride 0.
  xt::xtensor<double, 2> colv = xt::zeros<double>({3, 1});
  colv(2, 0) = 9.0;
  auto vcol = peft::view_of(colv);
  CHECK(vcol.stride() == 1);
  CHECK(vcol(2, 0) == 9.0);
  xt::xtensor<double, 2> rowv = xt::zeros<double>({1, 3});
  auto vrow = peft::view_of(rowv);
  CHECK(vrow.stride() == 3);
}

TEST_CASE("view_of a strided xtensor view points into the parent", "[interop]") {
  xt::xtensor<double, 2> t = xt::zeros<double>({6, 9});
  for (std::size_t i = 0; i < 6; ++i) {
    for (std::size_t j = 0; j < 9; ++j) t(i, j) = static_cast<double>(100 * i + j + 1);
  }
  auto sub = xt::view(t, xt::range(2, 5), xt::range(3, 7));
  auto v = peft::view_of(sub);
  CHECK(v.rows() == 3);
  CHECK(v.cols() == 4);
  CHECK(v.stride() == 9);
  CHECK(v.data() == &t(2, 3));
  for (ix i = 0; i < 3; ++i) {
    for (ix j = 0; j < 4; ++j) {
      REQUIRE(v(i, j) == t(static_cast<std::size_t>(i + 2), static_cast<std::size_t>(j + 3)));
    }
  }
  v(2, 3) = -8.0;
  CHECK(t(4, 6) == -8.0);
}

TEST_CASE("view_of rejects tensors that are not 2-D row-major", "[interop]") {
  xt::xtensor<float, 3> t3 = xt::zeros<float>({2, 3, 4});
  CHECK_THROWS_AS(peft::view_of(t3), peft::shape_error);
  xt::xarray<float> a1 = xt::zeros<float>({5});
  CHECK_THROWS_AS(peft::view_of(a1), peft::shape_error);
  try {
    peft::view_of(t3);
  } catch (const peft::shape_error& e) {
    CHECK(std::string(e.what()).rfind("[peft::view_of]", 0) == 0);
  }
  xt::xtensor<float, 2, xt::layout_type::column_major> cm = xt::zeros<float>({3, 4});
  CHECK_THROWS_AS(peft::view_of(cm), peft::shape_error);
}

}  // namespace test_interop
