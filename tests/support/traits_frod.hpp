// adapter_traits for FRoD (see adapter_traits.hpp). Not an identity at init: PEFT's U is
// rounded to float32, so U diag(lambda_l) V^T equals W0 only to about 1e-7 (golden tests and
// test_frod.cpp check the init against that bound).
#pragma once

#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "peft/adapters/frod.hpp"
#include "peft/base/dense.hpp"
#include "support/adapter_traits.hpp"
#include "support/test_support.hpp"

namespace peft_test {

/// A well-conditioned V (in, in): 2 I + uniform noise in [-0.5, 0.5).
template <class T>
std::shared_ptr<peft::matrix<T>> frod_random_v(peft::index in, peft::rng& g) {
  auto v = std::make_shared<peft::matrix<T>>(in, in);
  for (peft::index i = 0; i < in; ++i)
    for (peft::index j = 0; j < in; ++j) (*v)(i, j) = static_cast<T>((i == j ? 2.0 : 0.0) + g.uniform(-0.5, 0.5));
  return v;
}

/// nnz distinct off-diagonal positions of an (in, in) matrix as a (2, nnz) index tensor.
template <class T>
std::shared_ptr<peft::matrix<T>> frod_random_indices(peft::index in, peft::index nnz, peft::rng& g) {
  std::vector<std::pair<peft::index, peft::index>> all;
  for (peft::index i = 0; i < in; ++i)
    for (peft::index j = 0; j < in; ++j)
      if (i != j) all.emplace_back(i, j);
  for (std::size_t k = all.size(); k > 1; --k) std::swap(all[k - 1], all[static_cast<std::size_t>(g.below(k))]);
  auto idx = std::make_shared<peft::matrix<T>>(2, nnz);
  for (peft::index k = 0; k < nnz; ++k) {
    (*idx)(0, k) = static_cast<T>(all[static_cast<std::size_t>(k)].first);
    (*idx)(1, k) = static_cast<T>(all[static_cast<std::size_t>(k)].second);
  }
  return idx;
}

template <class T>
struct adapter_traits<peft::frod<T>> {
  static constexpr bool identity_at_init = false;  // U rounded to float32 (see above)
  static std::vector<std::pair<peft::index, peft::index>> shapes() { return {{7, 5}, {2, 3}, {13, 2}, {16, 24}}; }

  /// U from a random W0 (not the base the test uses: the passes are defined for any base), a
  /// random V, 1 to 2 in S entries, lambda_l and S's values random and non-zero.
  static peft::frod<T> make_random(peft::index in, peft::index out, peft::rng& g) {
    const peft::dense<double> w(random_matrix<double>(out, in, g));
    const peft::index nnz = std::min<peft::index>(in * in - in, 1 + static_cast<peft::index>(g.below(2 * in)));
    auto v = frod_random_v<T>(in, g);
    auto idx = frod_random_indices<T>(in, nnz, g);
    return peft::frod<T>(w, v, idx, nullptr, "fc", random_vector<T>(in, g, 0.2, 1.5), random_vector<T>(nnz, g, 0.2, 1.0));
  }
  /// PEFT's init over a random W0: lambda_l the column norms of W0 V^-T, S = 0.
  static peft::frod<T> make_default(peft::index in, peft::index out, peft::rng& g) {
    const peft::dense<double> w(random_matrix<double>(out, in, g));
    return peft::frod<T>(w, frod_random_v<T>(in, g), frod_random_indices<T>(in, std::min<peft::index>(in * in - in, 2), g),
                         "fc");
  }
};

}  // namespace peft_test
