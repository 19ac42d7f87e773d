// Adapters that remember their merge for unmerge (DeFT, PEANuT, FRoD: delta_weight is const and
// writes a memo) used from two threads at once: each thread's delta equals the serial one, copies
// taken meanwhile are whole, and the memo ends up as one thread's merge. Tagged [threads]: the
// ThreadSanitizer build (scripts/setup.sh test) runs it for data races.
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/base/dense.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "support/test_support.hpp"
#include "support/traits_deft.hpp"
#include "support/traits_frod.hpp"
#include "support/traits_peanut.hpp"

namespace test_merge_memo {

using ix = peft::index;

TEMPLATE_TEST_CASE("merge memo: delta_weight from two threads, copies meanwhile", "[adapters][threads]",
                   peft::deft<double>, peft::peanut<double>, peft::frod<double>) {
  peft::rng g(41);
  const ix in = 12, out = 9;
  const TestType a = peft_test::adapter_traits<TestType>::make_random(in, out, g);
  const peft::dense<double> w1(peft_test::random_matrix<double>(out, in, g));
  const peft::dense<double> w2(peft_test::random_matrix<double>(out, in, g));
  peft::matrix<double> serial1(out, in), serial2(out, in);
  {
    const TestType fresh = a;
    fresh.delta_weight(w1, serial1.view());
    fresh.delta_weight(w2, serial2.view());
  }
  REQUIRE(peft_test::nontrivial(serial1));
  REQUIRE_FALSE(peft_test::exactly_equal(serial1, serial2));

  constexpr int rounds = 20;
  bool same1 = true, same2 = true;
  std::vector<TestType> copies;
  copies.reserve(rounds);
  {
    std::thread t1([&] {
      peft::matrix<double> dw(out, in);
      for (int i = 0; i < rounds; ++i) {
        a.delta_weight(w1, dw.view());
        same1 = same1 && peft_test::exactly_equal(dw, serial1);
      }
    });
    std::thread t2([&] {
      peft::matrix<double> dw(out, in);
      for (int i = 0; i < rounds; ++i) {
        a.delta_weight(w2, dw.view());
        same2 = same2 && peft_test::exactly_equal(dw, serial2);
      }
    });
    for (int i = 0; i < rounds; ++i) copies.push_back(a);  // reads the memo while both write it
    t1.join();
    t2.join();
  }
  CHECK(same1);
  CHECK(same2);

  // The memo is one thread's merge, whole: unmerging that base gives back its delta exactly.
  const auto unmerges_exactly = [&](const TestType& b, const peft::dense<double>& base, const peft::matrix<double>& want) {
    peft::matrix<double> back(out, in);
    try {
      b.unmerge_delta(base, back.view());
    } catch (const peft::error&) {
      return false;
    }
    return peft_test::rel_error(back.view(), want.view()) <= 1e-12;
  };
  CHECK((unmerges_exactly(a, w1, serial1) || unmerges_exactly(a, w2, serial2)));
  // A copy made after both merged remembers the same.
  const TestType after = a;
  CHECK((unmerges_exactly(after, w1, serial1) || unmerges_exactly(after, w2, serial2)));
}

}  // namespace test_merge_memo
