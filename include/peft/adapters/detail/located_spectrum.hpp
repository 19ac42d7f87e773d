// peft/adapters/detail/located_spectrum.hpp — what FourierFT and WaveFT share: n trainable
// values (PEFT's <method>_spectrum) at n locations of the (out, in) weight drawn as PEFT draws
// them, divmod(p_k, in) for p = torch.randperm(out * in, manual_seed(random_loc_seed))[:n],
// once the layer's shape is known (checkpoints store only the values).
//
// The derived adapter gives `method`, `display_name` ("FourierFT") and `location_kind`
// ("spectral"), and `void locate(index in, index out)`, which builds what it needs from rows()
// and cols() (called by set_features and the constructors after the draw, before the shape is
// recorded); it befriends this class and additive_adapter, whose hooks it implements.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/torch_generator.hpp"

namespace peft::detail {

template <class Derived, compute_scalar T>
class located_spectrum_adapter : public additive_adapter<Derived, T> {
 public:
  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  /// n, the number of trainable values.
  index n_frequency() const noexcept { return spectrum_.cols(); }
  double scaling() const noexcept { return scaling_; }
  std::int64_t random_loc_seed() const noexcept { return seed_; }
  /// Whether the layer's shape (and so the locations) is set.
  bool bound() const noexcept { return in_ > 0; }

  /// Sets the layer's shape and draws the locations (a checkpoint does not store them). Once set,
  /// the same shape is accepted again and another one is a shape_error.
  void set_features(index in_features, index out_features) {
    const std::string where = pass_name(Derived::method, "set_features");
    if (bound()) {
      if (in_features != in_ || out_features != out_) {
        raise<shape_error>(where, "the adapter is built for a " + shape_string(out_, in_) + " weight, not " +
                                      shape_string(out_features, in_features) + " (its " +
                                      std::string(Derived::location_kind) + " locations depend on the shape)");
      }
      return;
    }
    bind(where.c_str(), in_features, out_features);
  }

  /// <method>_spectrum (1, n) and its gradient.
  matrix_view<T> spectrum() noexcept { return spectrum_.view(); }
  matrix_view<const T> spectrum() const noexcept { return spectrum_.view(); }
  matrix_view<const T> grad_spectrum() const noexcept { return grad_.view(); }
  /// The locations in the (out, in) weight: output rows u_k and input columns v_k (PEFT's
  /// indices[0] and indices[1]).
  const std::vector<std::int64_t>& rows() const noexcept { return rows_; }
  const std::vector<std::int64_t>& cols() const noexcept { return cols_; }

  /// The bias is left alone.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// <method>_spectrum (n), trainable. The locations are not parameters: PEFT regenerates them.
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({std::string(Derived::method) + "_spectrum", spectrum_.view(), grad_.view(),
                 shape_of(spectrum_.view(), true)});
    return p;
  }

  void zero_grad() { grad_.fill(T{0}); }

  /// peft::error when the layer's shape is not set yet (or the adapter is default-constructed).
  void check_ready(const char* where) const {
    if (spectrum_.cols() == 0) raise<error>(where, "the adapter is default-constructed (no spectrum)");
    if (!bound()) {
      raise<error>(where, "the layer's shape is not set: a " + std::string(Derived::display_name) +
                              " checkpoint does not store it; call set_features(in, out) or add the adapter to a layer");
    }
  }

 protected:
  located_spectrum_adapter() = default;
  located_spectrum_adapter(double scaling, std::int64_t random_loc_seed) : scaling_(scaling), seed_(random_loc_seed) {}

  /// The constructors' checks of the values and the scaling (shape_error), before the derived
  /// class's own; then the values, with a zero gradient.
  void init_spectrum(const char* where, std::vector<T> spectrum) {
    if (spectrum.empty()) raise<shape_error>(where, "n_frequency must be a positive integer, got 0 spectral values");
    if (!std::isfinite(scaling_)) raise<shape_error>(where, "scaling must be finite");
    const auto n = static_cast<index>(spectrum.size());
    spectrum_ = matrix<T>(1, n, std::move(spectrum));
    grad_ = matrix<T>(1, n);
  }

  /// n, or shape_error from the constructor when n < 1 (a fresh adapter's n_frequency).
  static index positive_n(index n) {
    if (n < 1) {
      raise<shape_error>(pass_name(Derived::method, std::string(Derived::method).c_str()),
                         "n_frequency must be a positive integer, got " + std::to_string(n));
    }
    return n;
  }

  /// Draws the locations for an (out, in) weight, lets the derived class place them, and records
  /// the shape. shape_error on a size < 1 or n > in * out (PEFT's own check).
  void bind(const char* where, index in, index out) {
    if (in < 1 || out < 1) raise<shape_error>(where, "the weight is " + shape_string(out, in) + ", both sizes must be >= 1");
    const index n = n_frequency();
    if (n > in * out) {
      raise<shape_error>(where, "n_frequency " + std::to_string(n) + " exceeds the number of entries of the " +
                                    shape_string(out, in) + " weight (" + std::to_string(in * out) + ")");
    }
    torch_generator g(static_cast<std::uint64_t>(seed_));
    const std::vector<std::int64_t> p = g.randperm_prefix(in * out, n);
    rows_.resize(static_cast<std::size_t>(n));
    cols_.resize(static_cast<std::size_t>(n));
    for (std::size_t k = 0; k < p.size(); ++k) {
      rows_[k] = p[k] / in;
      cols_[k] = p[k] % in;
    }
    static_cast<Derived&>(*this).locate(in, out);
    in_ = in;
    out_ = out;
  }

  index in_ = 0;
  index out_ = 0;
  double scaling_ = 0.0;
  std::int64_t seed_ = 777;
  matrix<T> spectrum_;              // (1, n) <method>_spectrum
  matrix<T> grad_;                  // (1, n)
  std::vector<std::int64_t> rows_;  // (n) u_k in [0, out)
  std::vector<std::int64_t> cols_;  // (n) v_k in [0, in)
};

}  // namespace peft::detail
