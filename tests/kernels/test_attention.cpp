// Blocked attention (kernels/attention.hpp) against its reference twin
// (kernels/reference/attention.hpp), and the twin's backward against finite differences: causal
// masks over positions with gaps (padding removed), sliding windows, a key/value cache (queries
// after the cached keys), queries that see no key, several blocks in each direction, strided
// rows, and accumulation into shared dk/dv (grouped-query attention); float on every ISA this CPU
// runs, and double.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>

#include "peft/core/random.hpp"
#include "peft/kernels/attention.hpp"
#include "peft/kernels/isa.hpp"
#include "peft/kernels/reference/attention.hpp"

namespace test_attention {

using ix = peft::index;
namespace kernels = peft::kernels;

namespace {

/// q (nq rows), k and v (nk rows) with `pad` spare values per row, positions and a window.
template <class T>
struct case_data {
  ix nq, nk, hd, ld;
  std::vector<T> q, k, v;
  std::vector<ix> qpos, kpos;
  ix window;

  case_data(ix nq_, ix nk_, ix hd_, ix window_, peft::rng& gen) : nq(nq_), nk(nk_), hd(hd_), ld(hd_ + 3), window(window_) {
    auto fill = [&](std::vector<T>& m, ix rows) {
      m.resize(static_cast<std::size_t>(rows * ld));
      for (auto& x : m) x = static_cast<T>(gen.normal());
    };
    fill(q, nq);
    fill(k, nk);
    fill(v, nk);
  }

  kernels::attention_problem<T> problem() const {
    kernels::attention_problem<T> p;
    p.nq = nq;
    p.nk = nk;
    p.head_dim = hd;
    p.q = q.data();
    p.ldq = ld;
    p.k = k.data();
    p.v = v.data();
    p.ldkv = ld;
    p.qpos = qpos.data();
    p.kpos = kpos.data();
    p.window = window;
    p.scale = 1.0 / std::sqrt(static_cast<double>(hd));
    return p;
  }
};

/// Packed rows of one sequence: positions increasing with gaps (left padding and holes removed).
template <class T>
case_data<T> packed_case(ix n, ix hd, ix window, peft::rng& gen) {
  case_data<T> c(n, n, hd, window, gen);
  ix pos = 3;
  for (ix i = 0; i < n; ++i) {
    c.qpos.push_back(pos);
    c.kpos.push_back(pos);
    pos += (i % 7 == 3) ? 2 : 1;
  }
  return c;
}

/// Decoding: nq new queries after nk - nq cached keys.
template <class T>
case_data<T> decode_case(ix nq, ix nk, ix hd, ix window, peft::rng& gen) {
  case_data<T> c(nq, nk, hd, window, gen);
  for (ix j = 0; j < nk; ++j) c.kpos.push_back(j);
  for (ix i = 0; i < nq; ++i) c.qpos.push_back(nk - nq + i);
  return c;
}

struct outputs {
  std::vector<double> out, lse, dq, dk, dv;
};

template <class T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

/// Forward and backward (dout fixed by `seed`), through the blocked kernels or the reference;
/// the backward runs twice into the same dk, dv (two heads of one key/value head).
template <class T>
outputs run(const case_data<T>& c, bool blocked, std::uint64_t seed) {
  const auto p = c.problem();
  const ix ld = c.ld, hd = c.hd;
  std::vector<T> out(static_cast<std::size_t>(c.nq * ld), T{0}), lse(static_cast<std::size_t>(c.nq * 2), T{0});
  std::vector<T> dout(out.size());
  peft::rng gen(seed);
  for (auto& x : dout) x = static_cast<T>(gen.normal());
  std::vector<T> dq(out.size(), T{0}), dk(static_cast<std::size_t>(c.nk * ld), T{0}), dv(dk.size(), T{0});
  kernels::attention_workspace<T> ws;
  if (blocked) {
    kernels::attention_forward(p, out.data(), ld, lse.data(), 2, ws);
  } else {
    kernels::reference::attention_forward(p, out.data(), ld, lse.data(), 2);
  }
  for (int head = 0; head < 2; ++head) {
    if (blocked) {
      kernels::attention_backward(p, out.data(), ld, dout.data(), ld, lse.data(), 2, dq.data(), ld, dk.data(), dv.data(), ld, ws);
    } else {
      kernels::reference::attention_backward(p, out.data(), ld, dout.data(), ld, lse.data(), 2, dq.data(), ld, dk.data(),
                                             dv.data(), ld);
    }
  }
  auto rows = [&](const std::vector<T>& m, ix n) {
    std::vector<double> r;
    for (ix i = 0; i < n; ++i)
      for (ix d = 0; d < hd; ++d) r.push_back(static_cast<double>(m[static_cast<std::size_t>(i * ld + d)]));
    return r;
  };
  outputs o;
  o.out = rows(out, c.nq);
  for (ix i = 0; i < c.nq; ++i) o.lse.push_back(static_cast<double>(lse[static_cast<std::size_t>(i * 2)]));
  o.dq = rows(dq, c.nq);
  o.dk = rows(dk, c.nk);
  o.dv = rows(dv, c.nk);
  return o;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v)
    if (std::isfinite(x)) m = std::max(m, std::abs(x));
  return m;
}

/// max |a - b| / max |b|; infinities must match exactly.
double distance(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(b[i])) {
      CHECK(a[i] == b[i]);
      continue;
    }
    d = std::max(d, std::abs(a[i] - b[i]));
  }
  return d / std::max(max_abs(b), 1.0);  // absolute below 1 (one key alone: dq = dk = 0 up to rounding)
}

template <class T>
void compare(const case_data<T>& c, double tol) {
  const outputs ref = run(c, false, 11);
  const outputs got = run(c, true, 11);
  REQUIRE(max_abs(ref.out) > 0.1);
  REQUIRE(max_abs(ref.dv) > 0.1);
  if (c.nk > 1) {  // one key alone: the softmax is constant, dq = dk = 0
    REQUIRE(max_abs(ref.dq) > 0.1);
    REQUIRE(max_abs(ref.dk) > 0.1);
  }
  CHECK(distance(got.out, ref.out) < tol);
  CHECK(distance(got.lse, ref.lse) < tol);
  CHECK(distance(got.dq, ref.dq) < tol);
  CHECK(distance(got.dk, ref.dk) < tol);
  CHECK(distance(got.dv, ref.dv) < tol);
}

template <class T>
void compare_all_cases(double tol) {
  peft::rng gen(2026);
  { INFO("case line " << __LINE__); compare(packed_case<T>(150, 24, 0, gen), tol); }
  { INFO("case line " << __LINE__); compare(packed_case<T>(130, 64, 37, gen), tol); }
  { INFO("case line " << __LINE__); compare(packed_case<T>(64, 5, 0, gen), tol); }
  { INFO("case line " << __LINE__); compare(decode_case<T>(3, 200, 16, 0, gen), tol); }
  { INFO("case line " << __LINE__); compare(decode_case<T>(70, 140, 8, 50, gen), tol); }
  { INFO("case line " << __LINE__); compare(packed_case<T>(1, 8, 0, gen), tol); }
}

}  // namespace

TEST_CASE("attention reference: backward equals finite differences of the forward", "[kernels][attention]") {
  peft::rng gen(5);
  // Positions with a gap, a window of 3, and a query placed before every key (it sees none).
  case_data<double> c(6, 7, 3, 3, gen);
  c.kpos = {1, 2, 4, 5, 6, 7, 8};
  c.qpos = {0, 2, 4, 5, 7, 8};
  const auto p = c.problem();
  const ix ld = c.ld;
  std::vector<double> g(static_cast<std::size_t>(c.nq * ld));
  for (auto& x : g) x = gen.normal();
  auto loss = [&]() {
    std::vector<double> out(g.size(), 0.0), lse(static_cast<std::size_t>(c.nq));
    kernels::reference::attention_forward(c.problem(), out.data(), ld, lse.data(), 1);
    double s = 0;
    for (ix i = 0; i < c.nq; ++i)
      for (ix d = 0; d < c.hd; ++d) s += g[static_cast<std::size_t>(i * ld + d)] * out[static_cast<std::size_t>(i * ld + d)];
    return s;
  };
  std::vector<double> out(g.size(), 0.0), lse(static_cast<std::size_t>(c.nq));
  kernels::reference::attention_forward(p, out.data(), ld, lse.data(), 1);
  CHECK(lse[0] == -std::numeric_limits<double>::infinity());
  CHECK(out[0] == 0.0);
  std::vector<double> dq(g.size(), 0.0), dk(c.k.size(), 0.0), dv(c.v.size(), 0.0);
  kernels::reference::attention_backward(p, out.data(), ld, g.data(), ld, lse.data(), 1, dq.data(), ld, dk.data(), dv.data(), ld);
  auto check = [&](std::vector<double>& x, const std::vector<double>& grad, ix rows) {
    double worst = 0, largest = 0;
    for (ix i = 0; i < rows; ++i) {
      for (ix d = 0; d < c.hd; ++d) {
        const auto at = static_cast<std::size_t>(i * ld + d);
        const double keep = x[at], h = 1e-6;
        x[at] = keep + h;
        const double up = loss();
        x[at] = keep - h;
        const double down = loss();
        x[at] = keep;
        const double fd = (up - down) / (2 * h);
        worst = std::max(worst, std::abs(fd - grad[at]));
        largest = std::max(largest, std::abs(grad[at]));
      }
    }
    REQUIRE(largest > 0.05);
    CHECK(worst < 1e-8 * std::max(1.0, largest));
  };
  check(c.q, dq, c.nq);
  check(c.k, dk, c.nk);
  check(c.v, dv, c.nk);
}

TEST_CASE("attention blocks: double equals the reference", "[kernels][attention]") {
  compare_all_cases<double>(1e-12);
}

TEST_CASE("attention blocks: float equals the reference on every ISA", "[kernels][attention]") {
  for (auto version : kernels::all_isas) {
    if (!kernels::isa_supported(version)) continue;
    INFO("isa " << kernels::isa_name(version));
    kernels::scoped_isa guard(version);
    compare_all_cases<float>(2e-5);
  }
}

}  // namespace test_attention
