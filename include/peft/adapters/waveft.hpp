// peft/adapters/waveft.hpp — WaveFT (Bilican et al., 2025) as HuggingFace PEFT 0.21 computes it.
//
//   y = x W0^T + b0 + x Delta W^T,   Delta W = scaling crop(idwt2(S))   (out, in)
//   S (P_out, P_in) sparse: the n trainable values c = waveft_spectrum at the locations
//   (u_k, v_k) = divmod(p_k, in), p = torch.randperm(out * in, manual_seed(random_loc_seed))[:n],
//   shifted into the padded matrix; idwt2 is one level of PyTorch-Wavelet-Toolbox's waverec2d
//   (as vendored by PEFT) on the quadrants [[cA, cH], [cV, cD]] of S.
//   use_idwt = false: Delta W = scaling S (no transform, no padding).
//
//   peft::waveft<float> a(in, out, {.n_frequency = 2592, .scaling = 25, .wavelet_family = "db2"});
//
// Each coefficient adds scaling c_k f_row f_col^T, an L x L patch (L the filter length) at a
// place fixed by its location, to Delta W; so Delta W costs O(out in + n L^2), the term is the
// dense product x Delta W^T (as PEFT), dx = g Delta W, and dc_k = scaling <g^T x, patch_k> costs
// O(batch n L^2) without forming g^T x. The wavelets are those PEFT can reconstruct with:
// db1-db10, sym2-sym10, coif1-coif4, with PEFT's filter values (detail/wavelet_filters.hpp);
// the others WaveFTConfig accepts (coif5, db11-db38, sym11-sym20, coif6-coif17) are refused by
// name, since PEFT fails on them too, unless use_idwt is false. Locations are drawn with PyTorch's generator
// (core/torch_generator.hpp) once the layer's shape is known (set_features), as PEFT does at every
// load. Checkpoints: io/peft/waveft.hpp. Details: docs/methods/waveft.md.
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/detail/located_spectrum.hpp"
#include "peft/adapters/detail/wavelet_filters.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/random.hpp"
#include "peft/interop/eigen.hpp"

namespace peft {

template <compute_scalar T>
class waveft;

struct waveft_options {
  template <compute_scalar T>
  using adapter = waveft<T>;  // the adapter these options make

  index n_frequency = 2592;              // PEFT's n_frequency: trainable coefficients, <= in * out
  double scaling = 25.0;                 // PEFT's scaling
  std::string wavelet_family = "db1";    // PEFT's wavelet_family
  bool use_idwt = true;                  // PEFT's use_idwt: false places the values in Delta W directly
  std::int64_t random_loc_seed = 777;    // PEFT's random_loc_seed: torch.randperm's seed
  bool init_weights = true;              // PEFT's: true zeros the spectrum, false draws N(0, 0.01^2)
  std::uint64_t seed = 0;                // seeds that draw (peft::rng, not torch.randn)
};

template <compute_scalar T>
class waveft : public detail::located_spectrum_adapter<waveft<T>, T> {
  using base = detail::located_spectrum_adapter<waveft<T>, T>;
  friend base;
  friend class additive_adapter<waveft<T>, T>;
  using base::cols_;
  using base::grad_;
  using base::in_;
  using base::out_;
  using base::rows_;
  using base::scaling_;
  using base::spectrum_;

 public:
  static constexpr std::string_view method = "waveft";
  static constexpr std::string_view display_name = "WaveFT";
  static constexpr std::string_view location_kind = "coefficient";
  using base::n_frequency;

  /// Work space of the passes (reused from call to call); nothing is carried from forward to
  /// backward.
  struct cache_type {
    matrix<T> dw;      // (out, in) Delta W
    matrix<T> xt, gt;  // (in, batch), (out, batch): x^T and g^T for the coefficient gradients
  };

  waveft() : base(25.0, 777) {}

  /// A fresh adapter on an (out, in) layer with PEFT's locations and initialisation.
  /// shape_error / unsupported_error as the next constructor.
  waveft(index in_features, index out_features, const waveft_options& opt)
      : waveft(std::vector<T>(static_cast<std::size_t>(base::positive_n(opt.n_frequency)), T{0}), opt.scaling,
               opt.wavelet_family, opt.use_idwt, opt.random_loc_seed, in_features, out_features) {
    if (!opt.init_weights) {
      rng gen(opt.seed ^ 0x3a7ef70c3a7ef70cull);
      for (auto& v : spectrum_.storage()) v = static_cast<T>(0.01 * gen.normal());
    }
  }

  /// An adapter from its spectrum (n values), scaling, wavelet and seed. With in_features and
  /// out_features > 0 the locations are drawn now; with both 0 the shape is left for set_features.
  /// shape_error on n < 1, n > in * out or a negative size; error for a wavelet_family PEFT's
  /// WaveFTConfig refuses; unsupported_error for one it accepts but cannot reconstruct with
  /// (use_idwt only).
  waveft(std::vector<T> spectrum, double scaling, std::string wavelet_family, bool use_idwt,
         std::int64_t random_loc_seed, index in_features = 0, index out_features = 0)
      : base(scaling, random_loc_seed), family_(std::move(wavelet_family)), use_idwt_(use_idwt) {
    constexpr const char* where = "waveft::waveft";
    this->init_spectrum(where, std::move(spectrum));
    reduction_ = reduction_of(family_);
    if (reduction_ < 0) {
      detail::raise<error>(where, "wavelet_family '" + family_ +
                                      "' is not one of PEFT's (db1-db38, sym2-sym20, coif1-coif17)");
    }
    if (use_idwt_) {
      load_filters(where);
    } else {
      lo_ = {T{1}};  // the direct placement as a 1 x 1 patch
      hi_ = {T{1}};
    }
    if (in_features != 0 || out_features != 0) this->bind(where, in_features, out_features);
  }

  const std::string& wavelet_family() const noexcept { return family_; }
  bool use_idwt() const noexcept { return use_idwt_; }
  /// The reconstruction filters rec_lo and rec_hi, as PEFT builds them ({1}, {1} without IDWT).
  const std::vector<T>& rec_lo() const noexcept { return lo_; }
  const std::vector<T>& rec_hi() const noexcept { return hi_; }
  /// Why a wavelet WaveFTConfig accepts is refused with use_idwt (one line, naming it).
  static std::string unsupported_reason(std::string_view family) {
    if (family == "coif5") {
      return "wavelet 'coif5': PEFT 0.21's filter table has 48 taps where its padding expects 30, so its forward "
             "fails on every layer; not implemented";
    }
    return "wavelet '" + std::string(family) +
           "': PEFT 0.21's WaveFT has no filter for it (only db1-db10, sym2-sym10, coif1-coif5), so its forward "
           "fails; not implemented";
  }
  /// Whether PEFT 0.21's WaveFT can reconstruct with this wavelet (it has a working filter).
  static bool has_filter(std::string_view family) { return find_filter(family) != nullptr; }
  /// WAVELET_REDUCTIONS of PEFT's WaveFTConfig: the padding added to each side length before the
  /// transform (2N - 2 for dbN and symN, 6N - 2 for coifN); -1 for a name the config refuses.
  static index reduction_of(std::string_view family) {
    const auto number = [&](std::string_view prefix, int lo, int hi) -> int {
      if (!family.starts_with(prefix)) return -1;
      const std::string_view digits = family.substr(prefix.size());
      if (digits.empty() || digits.front() == '0') return -1;
      int v = 0;
      const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), v);
      if (ec != std::errc{} || end != digits.data() + digits.size() || v < lo || v > hi) return -1;
      return v;
    };
    if (const int v = number("db", 1, 38); v > 0) return 2 * v - 2;
    if (const int v = number("sym", 2, 20); v > 0) return 2 * v - 2;
    if (const int v = number("coif", 1, 17); v > 0) return 6 * v - 2;
    return -1;
  }

  /// dW = scaling crop(idwt2(S)) (out, in): O(out in + n L^2).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("waveft::delta_weight", w);
    detail::expect_shape("waveft::delta_weight", "dw", dw, out_, in_);
    materialise(dw);
  }

 private:
  static const detail::wavelet::base_filter* find_filter(std::string_view family) {
    for (const auto& f : detail::wavelet::base_filters) {
      if (f.name == family) return &f;
    }
    return nullptr;
  }

  /// rec_lo = the table's taps (times sqrt 2 for coiflets), rec_hi[i] = (-1)^i rec_lo[L - 1 - i],
  /// formed in double and rounded to T, as PEFT's Wavelet and torch.tensor(..., dtype) do.
  void load_filters(const char* where) {
    const auto* f = find_filter(family_);
    if (f == nullptr) detail::raise<unsupported_error>(where, unsupported_reason(family_));
    const double scale = family_.starts_with("coif") ? std::sqrt(2.0) : 1.0;
    const std::size_t len = f->taps.size();
    lo_.resize(len);
    hi_.resize(len);
    for (std::size_t i = 0; i < len; ++i) {
      lo_[i] = static_cast<T>(f->taps[i] * scale);
      const double mirrored = f->taps[len - 1 - i] * scale;
      hi_[i] = static_cast<T>(i % 2 == 0 ? mirrored : -mirrored);
    }
  }

  /// Places each coefficient's patch, once the locations are drawn (the base's bind): its
  /// top-left corner in Delta W and which filter runs along its rows and columns.
  void locate(index in, index out) {
    top_.resize(rows_.size());
    left_.resize(rows_.size());
    row_hi_.assign(rows_.size(), 0);
    col_hi_.assign(rows_.size(), 0);
    if (!use_idwt_) {
      top_ = rows_;
      left_ = cols_;
    } else {
      const axis r = place(out, reduction_, static_cast<index>(lo_.size()));
      const axis c = place(in, reduction_, static_cast<index>(lo_.size()));
      for (std::size_t k = 0; k < rows_.size(); ++k) {
        // The coefficient's place in the padded matrix, then its quadrant and its place in it.
        const std::int64_t a = rows_[k] + r.offset, b = cols_[k] + c.offset;
        const bool lower = a >= r.half, right = b >= c.half;
        const std::int64_t i = lower ? a - r.half : a, j = right ? b - c.half : b;
        // conv_transpose2d with stride 2 puts it at (2i, 2j); the crops shift it back.
        top_[k] = 2 * i - r.shift;
        left_[k] = 2 * j - c.shift;
        // The quadrants' 2-D filters are rec_lo/hi (rows) times rec_lo/hi (columns): cA lo lo,
        // cH (upper right) hi lo, cV (lower left) lo hi, cD hi hi.
        row_hi_[k] = right ? 1 : 0;
        col_hi_[k] = lower ? 1 : 0;
      }
    }
  }

  /// One side of the transform's geometry (PEFT's get_delta_weight and waverec2d).
  struct axis {
    std::int64_t half;    // the padded length's half: the quadrants' size
    std::int64_t offset;  // where the weight's rows (columns) start in the padded matrix
    std::int64_t shift;   // waverec2d's crop plus get_delta_weight's centred crop
  };
  static axis place(index len, index reduction, index filter_len) {
    index padded = len + reduction;
    if (padded % 2 != 0) ++padded;
    const index half = padded / 2;
    const index full = 2 * half + filter_len - 2;  // conv_transpose2d's output length
    const index pad = (2 * filter_len - 3) / 2;    // cropped from each side by waverec2d
    const index rec = full - 2 * pad;
    if (rec < len) {
      detail::raise<error>("waveft::set_features", "the reconstruction is shorter than the weight (internal)");
    }
    return {half, (padded - len) / 2, pad + (rec - len) / 2};
  }

  /// dw = scaling sum_k c_k patch_k, clipped to the weight.
  void materialise(matrix_view<T> dw) const {
    as_eigen(dw).setZero();
    const index len = static_cast<index>(lo_.size());
    for (index k = 0; k < n_frequency(); ++k) {
      const auto kk = static_cast<std::size_t>(k);
      const T* fr = row_hi_[kk] ? hi_.data() : lo_.data();
      const T* fc = col_hi_[kk] ? hi_.data() : lo_.data();
      const T v = spectrum_(0, k);
      const index p0 = std::max<index>(0, -top_[kk]), p1 = std::min<index>(len, out_ - top_[kk]);
      const index q0 = std::max<index>(0, -left_[kk]), q1 = std::min<index>(len, in_ - left_[kk]);
      for (index p = p0; p < p1; ++p) {
        T* row = dw.row(top_[kk] + p) + left_[kk];
        const T vr = v * fr[p];
        for (index q = q0; q < q1; ++q) row[q] += vr * fc[q];
      }
    }
    const T s = static_cast<T>(scaling_);
    for (index i = 0; i < out_; ++i) {
      T* row = dw.row(i);
      for (index j = 0; j < in_; ++j) row[j] *= s;
    }
  }

  static void ensure(matrix<T>& m, index rows, index cols) {
    if (m.rows() != rows || m.cols() != cols) m = matrix<T>(rows, cols);
  }

  // ---- additive_adapter hooks -----------------------------------------------------------------

  /// y += x Delta W^T.
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    ensure(cache.dw, out_, in_);
    materialise(cache.dw.view());
    as_eigen(y).noalias() += as_eigen(x) * as_eigen(matrix_view<const T>(cache.dw.view())).transpose();
  }

  /// dx += g Delta W;  d c_k += scaling sum_{p,q} (g^T x)[top_k + p, left_k + q] f_row[p] f_col[q],
  /// each entry of g^T x a dot product over the batch of a column of g and one of x.
  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    const index batch = x.rows();
    ensure(cache.dw, out_, in_);
    materialise(cache.dw.view());
    as_eigen(dx).noalias() += as_eigen(g) * as_eigen(matrix_view<const T>(cache.dw.view()));
    ensure(cache.xt, in_, batch);
    ensure(cache.gt, out_, batch);
    as_eigen(cache.xt.view()) = as_eigen(x).transpose();
    as_eigen(cache.gt.view()) = as_eigen(g).transpose();
    const index len = static_cast<index>(lo_.size());
    const T s = static_cast<T>(scaling_);
    for (index k = 0; k < n_frequency(); ++k) {
      const auto kk = static_cast<std::size_t>(k);
      const T* fr = row_hi_[kk] ? hi_.data() : lo_.data();
      const T* fc = col_hi_[kk] ? hi_.data() : lo_.data();
      const index p0 = std::max<index>(0, -top_[kk]), p1 = std::min<index>(len, out_ - top_[kk]);
      const index q0 = std::max<index>(0, -left_[kk]), q1 = std::min<index>(len, in_ - left_[kk]);
      T sum{0};
      for (index p = p0; p < p1; ++p) {
        const T* gr = cache.gt.row(top_[kk] + p);
        T inner{0};
        for (index q = q0; q < q1; ++q) {
          const T* xr = cache.xt.row(left_[kk] + q);
          T dot{0};
          for (index b = 0; b < batch; ++b) dot += gr[b] * xr[b];
          inner += dot * fc[q];
        }
        sum += inner * fr[p];
      }
      grad_(0, k) += s * sum;
    }
  }

  std::string family_ = "db1";
  bool use_idwt_ = true;
  index reduction_ = 0;
  std::vector<T> lo_, hi_;            // (L) rec_lo, rec_hi
  std::vector<std::int64_t> top_;     // (n) patch k's first row in Delta W (may be < 0)
  std::vector<std::int64_t> left_;    // (n) patch k's first column
  std::vector<std::uint8_t> row_hi_;  // (n) rec_hi along the patch's rows, else rec_lo
  std::vector<std::uint8_t> col_hi_;  // (n) rec_hi along its columns
};

}  // namespace peft
