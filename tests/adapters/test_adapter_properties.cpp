// Properties every adapter type must have, run over tests/support/all_adapters.hpp: a new
// adapter gets them by adding its traits (tests/support/traits_<method>.hpp) and one line there.
//
// Adapters may cache values derived from their parameters (DoRA's row norms) until the next
// non-const parameters() call, the mutable access point: the finite-difference loss calls it
// before each forward. Optional traits hooks: freeze(a, w) / thaw(a) hold a derived quantity
// fixed during the parameter finite differences; make_default_for(w, g) builds the default
// init from the base.
#include <catch2/catch.hpp>

#include <string>

#include "peft/layer/adapted_linear.hpp"
#include "peft/base/dense.hpp"
#include "peft/core/adapter.hpp"
#include "support/adapter_checks.hpp"
#include "support/all_adapters.hpp"
#include "support/test_support.hpp"

namespace test_adapter_properties {

namespace {

using dense_base = peft::dense<double>;
using peft_test::run_forward;

}  // namespace

TEMPLATE_LIST_TEST_CASE("adapter properties: forward, terms, gradients, merge, init", "[adapters][properties]",
                        peft_test::all_adapters<double>) {
  using A = TestType;
  using traits = peft_test::adapter_traits<A>;
  static_assert(peft::adapter_for<A, dense_base>, "every adapter satisfies the concept over a dense base");
  peft::rng g(20261122);
  for (auto [in, out] : traits::shapes()) {
    for (peft::index batch : {peft::index{1}, peft::index{3}}) {
      INFO(std::string(A::method) << " in " << in << " out " << out << " batch " << batch);
      const dense_base w = peft_test::random_dense<double>(in, out, g);
      A a = traits::make_random(in, out, g);
      const auto x = peft_test::random_matrix<double>(batch, in, g);
      const auto gy = peft_test::random_matrix<double>(batch, out, g);
      REQUIRE(peft_test::nontrivial(x));

      // forward == base + add_term
      const auto y = run_forward(a, w, x);
      peft::matrix<double> h(batch, out), y2(batch, out);
      w.matmul(x.view(), h.view());
      y2 = h;
      {
        typename A::cache_type cache;
        a.add_term(w, x.view(), h.view(), y2.view(), cache);
      }
      CHECK(peft_test::rel_error(y2, y) < 1e-13);
      CHECK(peft_test::rel_error(y, h) > 1e-6);  // the random adapter does something

      // backward == backward_term + (dh) W0, and gradients == central finite differences
      a.zero_grad();
      peft::matrix<double> dx(batch, in);
      {
        typename A::cache_type cache;
        peft::matrix<double> yy(batch, out);
        a.forward(w, x.view(), yy.view(), cache);
        a.backward(w, x.view(), gy.view(), dx.view(), cache);
      }
      std::vector<peft::matrix<double>> grads;
      for (auto& p : a.parameters()) grads.push_back(peft::to_matrix(p.grad));
      a.zero_grad();
      {
        typename A::cache_type cache;
        peft::matrix<double> yy(batch, out), dh = gy, dx2(batch, in);
        a.add_term(w, x.view(), h.view(), yy.view(), cache);
        a.backward_term(w, x.view(), h.view(), gy.view(), dh.view(), dx2.view(), cache);
        w.matmul_t(peft::matrix_view<const double>(dh.view()), dx2.view(), true);
        CHECK(peft_test::rel_error(dx2, dx) < 1e-12);
        std::size_t k = 0;
        for (auto& p : a.parameters()) {
          if (p.trainable) CHECK(peft_test::rel_error(p.grad, grads[k]) < 1e-12);
          ++k;
        }
      }
      auto loss = [&] {
        (void)a.parameters();
        return peft_test::dot(run_forward(a, w, x), gy);
      };
      {
        auto xv = x;
        auto loss_x = [&] { return peft_test::dot(run_forward(a, w, xv), gy); };
        CHECK(peft_test::rel_error(dx, peft_test::fd_gradient(xv.view(), 1e-6, loss_x)) < peft_test::fd_tolerance<traits>());
      }
      // Adapters whose gradient treats a derived quantity as constant (DoRA's detached row
      // norm) hold it fixed for the finite differences of the parameters.
      if constexpr (requires { traits::freeze(a, w); }) traits::freeze(a, w);
      std::size_t k = 0;
      for (auto& p : a.parameters()) {
        INFO("parameter " << p.name);
        if (p.trainable) {
          CHECK(p.grad.rows() == p.value.rows());
          CHECK(p.grad.cols() == p.value.cols());
          CHECK(peft_test::rel_error(grads[k], peft_test::fd_gradient(p.value, 1e-6, loss)) < peft_test::fd_tolerance<traits>());
        }
        ++k;
      }

      if constexpr (requires { traits::thaw(a); }) traits::thaw(a);

      // merged == unmerged
      if constexpr (peft::mergeable_adapter_for<A, dense_base>) {
        peft::adapted_linear<dense_base, A> layer(w);
        layer.add_adapter("a", a);
        peft::matrix<double> before(batch, out), after(batch, out);
        layer.forward(x.view(), before.view());
        layer.merge("a");
        layer.forward(x.view(), after.view());
        CHECK(peft_test::rel_error(after, before) < 1e-12);
        layer.unmerge("a");
        CHECK(peft_test::rel_error(layer.base().weight(), w.weight()) < 1e-13);
      }

      // identity at the method's default init
      if constexpr (requires { traits::make_default_for(w, g); }) {
        const A fresh = traits::make_default_for(w, g);  // an init that reads the base (DoRA)
        peft_test::check_output_is_base(fresh, w, x);
      } else if constexpr (traits::identity_at_init) {
        const A fresh = traits::make_default(in, out, g);
        peft_test::check_output_is_base(fresh, w, x);
      }
    }
  }
}

}  // namespace test_adapter_properties
