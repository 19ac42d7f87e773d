// peft/adapters/fourierft.hpp — FourierFT (Gao et al., ICML 2024) as HuggingFace PEFT computes it.
//
//   y = x W0^T + b0 + x Delta W^T,   Delta W = scaling * Re(ifft2(S))   (out, in)
//   S sparse: S[u_k, v_k] = c_k for the n spectral locations; c = fourierft_spectrum (n), trainable
//   (u_k, v_k) = divmod(p_k, in), p = torch.randperm(out * in, manual_seed(random_loc_seed))[:n]
//
//   Delta W[i, j] = scaling / (out in) sum_k c_k cos(2 pi (u_k i / out + v_k j / in))
//
//   peft::fourierft<float> a(in, out, {.n_frequency = 1000, .scaling = 150});
//
// The locations are drawn with PyTorch's generator (core/torch_generator.hpp), as PEFT does at
// every load: checkpoints store only the spectrum. An adapter built from a spectrum alone has no
// layer shape until set_features(in, out) (adapted_linear::add_adapter calls it).
// The term is never made dense: with cos(a + b) = cos a cos b - sin a sin b it is
// x Delta W^T = (x F_in) D F_out^T, F_in = [cos | sin](2 pi v_k j / in) (in, 2n), F_out likewise
// (out, 2n), D = s [diag(c), -diag(c)], built from two trigonometric tables in blocks of
// frequencies: forward and backward cost O(batch n (in + out)), memory O(batch n + block (in +
// out)); delta_weight costs O(n in out). backward reuses x F_in from the forward's cache when
// given the same x buffer (else recomputes it); one cache per concurrent forward.
// Checkpoints: io/peft/fourierft.hpp. Details: docs/methods/fourierft.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/detail/located_spectrum.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "peft/interop/eigen.hpp"

namespace peft {

template <compute_scalar T>
class fourierft;

struct fourierft_options {
  template <compute_scalar T>
  using adapter = fourierft<T>;  // the adapter these options make

  index n_frequency = 1000;              // PEFT's n_frequency: trainable spectral entries, <= in * out
  double scaling = 150.0;                // PEFT's scaling
  std::int64_t random_loc_seed = 777;    // PEFT's random_loc_seed: torch.randperm's seed
  bool init_weights = false;             // PEFT's: false draws the spectrum from N(0, 1), true zeros it
  std::uint64_t seed = 0;                // seeds the N(0, 1) draw (peft::rng, not torch.randn)
};

template <compute_scalar T>
class fourierft : public detail::located_spectrum_adapter<fourierft<T>, T> {
  using base = detail::located_spectrum_adapter<fourierft<T>, T>;
  friend base;
  friend class additive_adapter<fourierft<T>, T>;
  using base::cols_;
  using base::grad_;
  using base::in_;
  using base::out_;
  using base::rows_;
  using base::scaling_;
  using base::spectrum_;

 public:
  static constexpr std::string_view method = "fourierft";
  static constexpr std::string_view display_name = "FourierFT";
  static constexpr std::string_view location_kind = "spectral";
  using base::n_frequency;

  /// The projections x F_in (batch, 2n) of the last forward, for backward, and the work space
  /// of both passes (reused from call to call).
  struct cache_type {
    matrix<T> z;                // (batch, 2n): [x cos | x sin]
    const T* x_data = nullptr;  // the x they were computed from
    matrix<T> f_in, f_out;      // one block of the factors: (in, 2 block), (out, 2 block)
    matrix<T> work, work2;      // (batch, 2 block)
  };

  fourierft() : base(150.0, 777) {}

  /// A fresh adapter on an (out, in) layer with PEFT's locations and initialisation.
  /// shape_error as the next constructor.
  fourierft(index in_features, index out_features, const fourierft_options& opt)
      : fourierft(std::vector<T>(static_cast<std::size_t>(base::positive_n(opt.n_frequency)), T{0}), opt.scaling,
                  opt.random_loc_seed, in_features, out_features) {
    if (!opt.init_weights) {
      rng gen(opt.seed ^ 0xf0c1e2f7f0c1e2f7ull);
      for (auto& v : spectrum_.storage()) v = static_cast<T>(gen.normal());
    }
  }

  /// An adapter from its spectrum (n values), scaling and seed. With in_features and
  /// out_features > 0 the locations are drawn now; with both 0 the layer's shape is left for
  /// set_features. shape_error on n < 1, n > in * out or a negative size.
  fourierft(std::vector<T> spectrum, double scaling, std::int64_t random_loc_seed, index in_features = 0,
            index out_features = 0)
      : base(scaling, random_loc_seed) {
    constexpr const char* where = "fourierft::fourierft";
    this->init_spectrum(where, std::move(spectrum));
    if (in_features != 0 || out_features != 0) this->bind(where, in_features, out_features);
  }

  /// dW = scaling Re(ifft2(S)) (out, in), as F_out D F_in^T block by block: O(n in out).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("fourierft::delta_weight", w);
    detail::expect_shape("fourierft::delta_weight", "dw", dw, out_, in_);
    auto d = as_eigen(dw);
    d.setZero();
    matrix<T> f_in, f_out;
    for (index k0 = 0; k0 < n_frequency(); k0 += block) {
      const index nb = std::min(block, n_frequency() - k0);
      factor(cos_in_, sin_in_, cols_, k0, nb, f_in);
      factor(cos_out_, sin_out_, rows_, k0, nb, f_out);
      scale_columns(f_out.view(), k0, nb);  // F_out D
      d.noalias() += as_eigen(f_out.view()) * as_eigen(f_in.view()).transpose();
    }
  }

 private:
  /// Frequencies per block of the factors F_in, F_out (2 block columns each).
  static constexpr index block = 128;

  /// The trigonometric tables of both sides, once the locations are drawn (the base's bind).
  void locate(index in, index out) {
    table(in, cos_in_, sin_in_);
    table(out, cos_out_, sin_out_);
  }

  /// cos and sin of 2 pi t / m for t in [0, m), computed in double.
  static void table(index m, std::vector<T>& c, std::vector<T>& s) {
    c.resize(static_cast<std::size_t>(m));
    s.resize(static_cast<std::size_t>(m));
    for (index t = 0; t < m; ++t) {
      const double a = 2.0 * std::numbers::pi * static_cast<double>(t) / static_cast<double>(m);
      c[static_cast<std::size_t>(t)] = static_cast<T>(std::cos(a));
      s[static_cast<std::size_t>(t)] = static_cast<T>(std::sin(a));
    }
  }

  /// f (m, 2 nb): f(j, t) = cos(2 pi f_k j / m), f(j, nb + t) = sin(...), k = k0 + t; filled row
  /// by row, each phase index f_k j mod m advanced by one addition per row.
  static void factor(const std::vector<T>& c, const std::vector<T>& s, const std::vector<std::int64_t>& freq,
                     index k0, index nb, matrix<T>& f) {
    const auto m = static_cast<std::int64_t>(c.size());
    if (f.rows() != m || f.cols() != 2 * nb) f = matrix<T>(m, 2 * nb);
    std::int64_t phase[block] = {};
    const std::int64_t* step = freq.data() + k0;
    for (std::int64_t j = 0; j < m; ++j) {
      T* row = f.row(j);
      for (index t = 0; t < nb; ++t) {
        row[t] = c[static_cast<std::size_t>(phase[t])];
        row[nb + t] = s[static_cast<std::size_t>(phase[t])];
        phase[t] += step[t];
        if (phase[t] >= m) phase[t] -= m;
      }
    }
  }

  /// Multiplies the columns of a (rows, 2 nb) block by D: t by s c_k, nb + t by -s c_k, with
  /// s = scaling / (in out).
  void scale_columns(matrix_view<T> v, index k0, index nb) const {
    const T s = static_cast<T>(scaling_ / (static_cast<double>(in_) * static_cast<double>(out_)));
    for (index r = 0; r < v.rows(); ++r) {
      T* row = v.row(r);
      for (index t = 0; t < nb; ++t) {
        const T d = s * spectrum_(0, k0 + t);
        row[t] *= d;
        row[nb + t] *= -d;
      }
    }
  }

  /// A (batch, 2 min(block, n)) work space kept in `m`.
  static T* workspace(matrix<T>& m, index batch, index n) {
    const index cols = 2 * std::min(block, n);
    if (m.rows() != batch || m.cols() != cols) m = matrix<T>(batch, cols);
    return m.data();
  }

  // ---- additive_adapter hooks -----------------------------------------------------------------

  /// y += (x F_in) D F_out^T, block by block; keeps x F_in in the cache.
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    const index batch = x.rows(), n = n_frequency();
    if (cache.z.rows() != batch || cache.z.cols() != 2 * n) cache.z = matrix<T>(batch, 2 * n);
    auto yy = as_eigen(y);
    const auto xx = as_eigen(x);
    matrix<T>& f_in = cache.f_in;
    matrix<T>& f_out = cache.f_out;
    T* zd = workspace(cache.work, batch, n);
    for (index k0 = 0; k0 < n; k0 += block) {
      const index nb = std::min(block, n - k0);
      factor(cos_in_, sin_in_, cols_, k0, nb, f_in);
      factor(cos_out_, sin_out_, rows_, k0, nb, f_out);
      matrix_view<T> zb(zd, batch, 2 * nb);
      auto z = as_eigen(zb);
      z.noalias() = xx * as_eigen(f_in.view());  // (batch, 2 nb)
      auto zc = as_eigen(cache.z.view());
      zc.middleCols(k0, nb) = z.leftCols(nb);
      zc.middleCols(n + k0, nb) = z.rightCols(nb);
      scale_columns(zb, k0, nb);
      yy.noalias() += z * as_eigen(f_out.view()).transpose();
    }
    cache.x_data = x.data();
  }

  /// With P = g F_out:  d c_k += s sum_b (Z_cos P_cos - Z_sin P_sin)[b, k];  dx += (P D) F_in^T.
  /// Z = x F_in from the forward's cache when it holds this x, else recomputed.
  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    const index batch = x.rows(), n = n_frequency();
    const bool cached = cache.x_data == x.data() && cache.z.rows() == batch && cache.z.cols() == 2 * n;
    const T s = static_cast<T>(scaling_ / (static_cast<double>(in_) * static_cast<double>(out_)));
    const auto xx = as_eigen(x);
    const auto gg = as_eigen(g);
    auto dxx = as_eigen(dx);
    matrix<T>& f_in = cache.f_in;
    matrix<T>& f_out = cache.f_out;
    T* pd = workspace(cache.work, batch, n);
    T* zd = workspace(cache.work2, batch, n);
    for (index k0 = 0; k0 < n; k0 += block) {
      const index nb = std::min(block, n - k0);
      factor(cos_in_, sin_in_, cols_, k0, nb, f_in);
      factor(cos_out_, sin_out_, rows_, k0, nb, f_out);
      matrix_view<T> pb(pd, batch, 2 * nb);
      auto p = as_eigen(pb);
      p.noalias() = gg * as_eigen(f_out.view());  // (batch, 2 nb)
      matrix_view<T> zb(zd, batch, 2 * nb);
      auto z = as_eigen(zb);
      if (cached) {
        const auto zc = as_eigen(matrix_view<const T>(cache.z.view()));
        z.leftCols(nb) = zc.middleCols(k0, nb);
        z.rightCols(nb) = zc.middleCols(n + k0, nb);
      } else {
        z.noalias() = xx * as_eigen(f_in.view());
      }
      for (index t = 0; t < nb; ++t) {
        const T dot = z.col(t).dot(p.col(t)) - z.col(nb + t).dot(p.col(nb + t));
        grad_(0, k0 + t) += s * dot;
      }
      scale_columns(pb, k0, nb);
      dxx.noalias() += p * as_eigen(f_in.view()).transpose();
    }
  }

  std::vector<T> cos_in_, sin_in_;     // (in) cos, sin of 2 pi t / in
  std::vector<T> cos_out_, sin_out_;   // (out) cos, sin of 2 pi t / out
};

}  // namespace peft
