// dense<S> as a caller with mutable views uses it: matmul and matmul_t take a matrix_view<T>
// where they read (x, dy) as well as a matrix_view<const T>, with the same results.
#include <catch2/catch.hpp>

#include "peft/base/dense.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "peft/kernels/epilogue.hpp"
#include "support/test_support.hpp"

namespace test_dense {

using ix = peft::index;

namespace {

template <class S, class T>
struct dense_types {
  using storage = S;
  using compute = T;
};

}  // namespace

TEMPLATE_TEST_CASE("dense matmul and matmul_t accept mutable views of their inputs", "[base][dense]",
                   (dense_types<float, float>), (dense_types<float, double>),
                   (dense_types<peft::bf16, float>), (dense_types<double, double>)) {
  using S = typename TestType::storage;
  using T = typename TestType::compute;
  peft::rng gen(12);
  const auto wd = peft_test::random_matrix<double>(9, 13, gen);
  const auto bias = peft_test::random_vector<double>(9, gen);
  const auto base = peft::dense<S>::from(wd.view(), bias.data());
  auto x = peft_test::random_matrix<T>(5, 13, gen);   // not const: x.view() is matrix_view<T>
  auto dy = peft_test::random_matrix<T>(5, 9, gen);
  REQUIRE(peft_test::nontrivial(x));
  const peft::matrix_view<T> xm = x.view(), dym = dy.view();
  const peft::matrix_view<const T> xc = xm, dyc = dym;

  peft::matrix<T> y_mut(5, 9), y_const(5, 9), y_epi(5, 9);
  base.matmul(xm, y_mut.view());
  base.matmul(xc, y_const.view());
  CHECK(peft_test::exactly_equal(y_mut, y_const));
  REQUIRE(peft_test::nontrivial(y_const));
  base.matmul(xm, y_epi.view(), peft::kernels::no_epilogue{});
  CHECK(peft_test::exactly_equal(y_epi, y_const));

  peft::matrix<T> dx_mut(5, 13), dx_const(5, 13);
  base.matmul_t(dym, dx_mut.view());
  base.matmul_t(dyc, dx_const.view());
  CHECK(peft_test::exactly_equal(dx_mut, dx_const));
  base.matmul_t(dym, dx_mut.view(), true);
  base.matmul_t(dyc, dx_const.view(), true);
  CHECK(peft_test::exactly_equal(dx_mut, dx_const));
  REQUIRE(peft_test::nontrivial(dx_const));
}

}  // namespace test_dense
