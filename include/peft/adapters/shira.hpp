// peft/adapters/shira.hpp — SHiRA (Bhardwaj et al., NeurIPS 2024) as HuggingFace PEFT computes it.
//
//   y = x W0^T + b0 + x Delta W^T,  Delta W = scatter(indices, s v),  s = 1 (never made dense)
//   v (K) trainable; indices (2, K) int32, fixed: row 0 output index, row 1 input index
//
//   peft::shira<float> a(in, out, {.rank = 32, .seed = 7});   // random mask, v = 0
//   a.apply(base);  ...  a.remove(base);   // O(K) in place; W0 restored bit for bit
//
// The passes come from additive_adapter (the sparse term joins the base product's tiles). apply
// and remove record the bases and raise peft::error rather than apply twice or restore over a
// change. Checkpoints: io/peft/shira.hpp; masks: train/shira_masks.hpp.
// Details: docs/methods/shira.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/adapters/detail/shira_random_mask.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/additive_adapter.hpp"
#include "peft/kernels/parallel.hpp"
#include "peft/kernels/sparse_rows_epilogue.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"

namespace peft {

template <compute_scalar T>
class shira;

struct shira_options {
  template <compute_scalar T>
  using adapter = shira<T>;  // the adapter these options make

  index rank = 32;           // PEFT's r: K = r (d_out + d_in) entries (PEFT's default 32)
  bool random_init = false;  // PEFT's init_weights=False: v ~ N(0, 1) (tests only); default v = 0
  std::uint64_t seed = 0;    // seeds the random mask (shira_random_mask) and the values
};

template <compute_scalar T>
class shira : public additive_adapter<shira<T>, T> {
  friend class additive_adapter<shira<T>, T>;

 public:
  static constexpr std::string_view method = "shira";

  /// SHiRA's sparse term needs nothing from forward but x itself.
  struct cache_type {};

  shira() = default;

  /// A fresh adapter with PEFT's random mask of K = r (in + out) entries (seeded peft::rng, not
  /// torch's generator: see adapters/detail/shira_random_mask.hpp) and zero values (the identity).
  shira(index in_features, index out_features, const shira_options& opt)
      : shira(in_features, out_features,
              shira_random_mask(out_features, in_features, shira_mask_size(out_features, in_features, opt.rank),
                                opt.seed)) {
    if (opt.random_init) {
      rng gen(opt.seed ^ 0x5b1a5b1a5b1a5b1aull);
      for (auto& v : values_.storage()) v = static_cast<T>(gen.normal());
    }
  }

  /// An adapter on a given mask: indices (2, K), row 0 output index in [0, out), row 1 input index
  /// in [0, in), no entry twice; values K entries (empty: zeros). shape_error on sizes,
  /// format_error on the entries (out of range, duplicated).
  shira(index in_features, index out_features, matrix<std::int32_t> indices, std::vector<T> values = {},
        T scale = T{1})
      : in_(in_features), out_(out_features), idx_(std::move(indices)), scale_(scale) {
    constexpr const char* where = "shira::shira";
    if (in_ < 1 || out_ < 1) {
      detail::raise<shape_error>(where, "the weight is " + detail::shape_string(out_, in_) + ", both sizes must be >= 1");
    }
    if (in_ - 1 > max_exact_index() || out_ - 1 > max_exact_index()) {
      detail::raise<shape_error>(where, "the weight is " + detail::shape_string(out_, in_) +
                                            ": indices above 2^24 are not exact in float, use shira<double>");
    }
    if (idx_.rows() != 2 || idx_.cols() < 1) {
      detail::raise<shape_error>(where, "indices are " + detail::shape_string(idx_.rows(), idx_.cols()) +
                                            ", expected (2, K) with K >= 1");
    }
    if (values.empty()) values.assign(static_cast<std::size_t>(idx_.cols()), T{0});
    if (static_cast<index>(values.size()) != idx_.cols()) {
      detail::raise<shape_error>(where, std::to_string(values.size()) + " values for " +
                                            std::to_string(idx_.cols()) + " indices");
    }
    check_entries(where, "", in_, out_, idx_);
    index_by_row();
    values_ = matrix<T>(1, idx_.cols(), std::move(values));
    grad_ = matrix<T>(1, idx_.cols());
    mirror_ = matrix<T>(2, idx_.cols());
  }

  index in_features() const noexcept { return in_; }
  index out_features() const noexcept { return out_; }
  /// K, the number of trainable entries.
  index entries() const noexcept { return idx_.cols(); }
  T scale() const noexcept { return scale_; }
  /// PEFT's set_scale: s multiplies the delta; not saved in checkpoints (PEFT does not save it).
  void set_scale(T s) noexcept { scale_ = s; }

  /// The mask (2, K): row 0 output indices, row 1 input indices. Fixed for the adapter's life.
  const matrix<std::int32_t>& indices() const noexcept { return idx_; }
  /// shira_weight as a (1, K) view.
  matrix_view<T> values() noexcept { return values_.view(); }
  matrix_view<const T> values() const noexcept { return values_.view(); }
  matrix_view<const T> grad_values() const noexcept { return grad_.view(); }

  // forward, add_term, backward, backward_term: core/additive_adapter.hpp over the hooks below
  // (the sparse term joins the base product's tiles through kernels::sparse_rows_epilogue).

  /// dW = scatter(indices, s v) (out, in), zero elsewhere. For switching, apply() is the O(K) form.
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    this->check_base("shira::delta_weight", w);
    detail::expect_shape("shira::delta_weight", "dw", dw, out_, in_);
    for (index i = 0; i < out_; ++i) std::fill(dw.row(i), dw.row(i) + in_, T{0});
    for (index k = 0; k < entries(); ++k) dw(idx_(0, k), idx_(1, k)) = scale_ * values_(0, k);
  }

  /// SHiRA leaves the bias alone.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  // ---- fused switching --------------------------------------------------------------------------

  /// W0[r_k, c_k] = round_S(W0[r_k, c_k] + s v_k) in place (each sum in double, rounded once to the
  /// storage type, as adapted_linear::merge does), keeping the K overwritten values. peft::error
  /// if this adapter is already applied to `base`; shape_error on a shape mismatch.
  template <dense_storage_base Base>
  void apply(Base& base) {
    using S = storage_scalar_of<Base>;
    constexpr const char* where = "shira::apply";
    detail::check_adapter_base(where, *this, base);
    matrix_view<S> w = base.mutable_weight();
    if (find_application(w.data()) != applied_.end()) {
      detail::raise<error>(where, "this adapter is already applied to this base; remove() it first "
                                  "(applying twice would add its delta twice)");
    }
    application a;
    a.storage = w.data();
    a.type = dtype_of_v<S>;
    a.saved.resize(static_cast<std::size_t>(entries()) * sizeof(S));
    applied_.reserve(applied_.size() + 1);  // nothing can fail once W0 is being written
    // One pass over the K entries (each is a cache miss on a large W0): keep, write, fingerprint.
    std::uint64_t h = fingerprint_seed;
    std::byte* kept = a.saved.data();
    for (index k = 0; k < entries(); ++k, kept += sizeof(S)) {
      prefetch_entry(w, k + prefetch_distance);
      S& e = w(idx_(0, k), idx_(1, k));
      std::memcpy(kept, &e, sizeof(S));
      e = convert<S>(convert<double>(e) + static_cast<double>(static_cast<T>(scale_ * values_(0, k))));
      h = fingerprint_step(h, e);
    }
    a.written = h;
    applied_.push_back(std::move(a));
  }

  /// Writes back the values apply() overwrote: W0 is bit-for-bit what it was before apply().
  /// peft::error (W0 untouched) if this adapter is not applied to `base`, or if W0's values at
  /// this adapter's entries changed since apply() (an overlapping adapter applied later and not
  /// removed first, a merge or an update of W0).
  template <dense_storage_base Base>
  void remove(Base& base) {
    using S = storage_scalar_of<Base>;
    constexpr const char* where = "shira::remove";
    detail::check_adapter_base(where, *this, base);
    matrix_view<S> w = base.mutable_weight();
    const auto it = find_application(w.data());
    if (it == applied_.end() || it->type != dtype_of_v<S>) {
      detail::raise<error>(where, "this adapter is not applied to this base (apply() it first; a copy of "
                                  "an applied base is another base)");
    }
    // One pass: swap the kept values with W0's (entries are distinct, so order does not matter)
    // while fingerprinting what W0 held; on a mismatch a second swap puts everything back.
    auto swap_all = [&]() {
      std::uint64_t h = fingerprint_seed;
      std::byte* kept = it->saved.data();
      for (index k = 0; k < entries(); ++k, kept += sizeof(S)) {
        prefetch_entry(w, k + prefetch_distance);
        S& e = w(idx_(0, k), idx_(1, k));
        const S current = e;
        std::memcpy(&e, kept, sizeof(S));
        std::memcpy(kept, &current, sizeof(S));
        h = fingerprint_step(h, current);
      }
      return h;
    };
    if (swap_all() != it->written) {
      swap_all();
      detail::raise<error>(where, "W0 changed at this adapter's entries since apply(): remove the adapters "
                                  "applied after it first (they share entries), or undo the change; "
                                  "nothing was restored");
    }
    applied_.erase(it);
  }

  /// Whether apply(base) is in effect (and not yet removed).
  template <dense_storage_base Base>
  bool applied_to(const Base& base) const noexcept {
    return find_application(static_cast<const void*>(base.weight().data())) != applied_.end();
  }
  /// How many bases this adapter is applied to.
  std::size_t applications() const noexcept { return applied_.size(); }
  /// Forgets every apply() record without touching any base: for bases destroyed or replaced
  /// while applied. Their W0 keep the adapter's values.
  void discard_applications() noexcept { applied_.clear(); }

  /// shira_weight (trainable) and shira_indices (integer, frozen: its view mirrors indices() as T,
  /// refreshed by each call; writing to it changes nothing).
  std::vector<parameter<T>> parameters() {
    for (index k = 0; k < entries(); ++k) {
      mirror_(0, k) = static_cast<T>(idx_(0, k));
      mirror_(1, k) = static_cast<T>(idx_(1, k));
    }
    std::vector<parameter<T>> p;
    p.push_back({"shira_weight", values_.view(), grad_.view(), detail::shape_of(values_.view(), true)});
    p.push_back({"shira_indices", mirror_.view(), matrix_view<T>{}, detail::shape_of(mirror_.view(), false),
                 /*trainable=*/false, /*shared=*/false, /*integer=*/true});
    return p;
  }

  void zero_grad() { grad_.fill(T{0}); }

  /// Validates stored indices (2, K) given as any scalar (PEFT writes int32, some writers float32)
  /// and converts them: each value integral, >= 0 and < 2^31. format_error naming `context`.
  template <class U>
  static matrix<std::int32_t> indices_from(matrix_view<U> stored, const char* where = "shira::indices_from",
                                           const std::string& context = "shira_indices") {
    if (stored.rows() != 2 || stored.cols() < 1) {
      detail::raise<format_error>(where, context + ": indices are " + detail::shape_string(stored.rows(), stored.cols()) +
                                             ", expected (2, K) with K >= 1");
    }
    matrix<std::int32_t> idx(2, stored.cols());
    for (index i = 0; i < 2; ++i) {
      for (index t = 0; t < stored.cols(); ++t) {
        const double v = convert<double>(stored(i, t));
        if (!(v >= 0.0 && v <= static_cast<double>(max_exact_index())) || v != std::floor(v)) {
          std::string what = context;
          what += ": shira_indices[";
          what += std::to_string(i);
          what += ", ";
          what += std::to_string(t);
          what += "] = ";
          what += std::to_string(v);
          what += " is not an integer in [0, ";
          what += std::to_string(max_exact_index());
          what += "]";
          detail::raise<format_error>(where, what);
        }
        idx(i, t) = static_cast<std::int32_t>(v);
      }
    }
    return idx;
  }

  /// Largest index exact in T (below 2^24 in float) and in int32.
  static constexpr index max_exact_index() noexcept {
    return std::is_same_v<T, float> ? (index{1} << 24) - 1 : index{std::numeric_limits<std::int32_t>::max()};
  }

  /// Every entry in range and no (row, column) twice; format_error naming `context`.
  static void check_entries(const char* where, const std::string& context, index in, index out,
                            const matrix<std::int32_t>& idx) {
    const std::string pre = context.empty() ? std::string() : context + ": ";
    std::vector<std::int64_t> flat(static_cast<std::size_t>(idx.cols()));
    for (index t = 0; t < idx.cols(); ++t) {
      const index r = idx(0, t), c = idx(1, t);
      if (r < 0 || r >= out || c < 0 || c >= in) {
        detail::raise<format_error>(where, pre + "entry " + std::to_string(t) + " is " + detail::shape_string(r, c) +
                                               ", outside a " + detail::shape_string(out, in) + " weight");
      }
      flat[static_cast<std::size_t>(t)] = static_cast<std::int64_t>(r) * in + c;
    }
    std::sort(flat.begin(), flat.end());
    const auto dup = std::adjacent_find(flat.begin(), flat.end());
    if (dup != flat.end()) {
      // PEFT's torch.sparse_coo_tensor would silently sum duplicated entries; no PEFT mask makes
      // them, and apply()/remove() keep one original per entry, so they are refused.
      detail::raise<format_error>(where, pre + "entry " + detail::shape_string(*dup / in, *dup % in) +
                                             " appears more than once in the indices");
    }
  }

 private:
  /// One apply() in effect.
  struct application {
    const void* storage = nullptr;  // the base's weight buffer: identifies the base
    dtype type = dtype::f32;        // its storage type
    std::vector<std::byte> saved;   // the K values apply() overwrote, bit for bit
    std::uint64_t written = 0;      // fingerprint of the K values apply() wrote
  };

  /// Running the adapter over a base that already holds its values would count them twice.
  template <class Base>
  void check_base_state(const char* where, const Base& w) const {
    if constexpr (requires { w.weight().data(); }) {
      if (!applied_.empty() && find_application(static_cast<const void*>(w.weight().data())) != applied_.end()) {
        detail::raise<error>(where, "this adapter is applied to this base (its values are in W0): run the "
                                    "base alone (disable the adapter) or remove() it first");
      }
    }
  }

  typename std::vector<application>::const_iterator find_application(const void* storage) const noexcept {
    return std::find_if(applied_.begin(), applied_.end(), [&](const application& a) { return a.storage == storage; });
  }
  typename std::vector<application>::iterator find_application(const void* storage) noexcept {
    return std::find_if(applied_.begin(), applied_.end(), [&](const application& a) { return a.storage == storage; });
  }

  /// A fingerprint of the K values apply() wrote, folded entry by entry (FNV-1a steps on whole
  /// bit patterns): remove() recognises W0 still holding exactly them.
  static constexpr std::uint64_t fingerprint_seed = 0xcbf29ce484222325ull;
  template <class S>
  static std::uint64_t fingerprint_step(std::uint64_t h, const S& v) noexcept {
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(S));  // little-endian low bytes; sizeof(S) <= 8
    h = (h ^ bits) * 0x100000001b3ull;
    return h ^ (h >> 32);
  }

  /// The switch is bound by cache misses on W0, one per entry: fetch entries this far ahead so
  /// that many misses overlap.
  static constexpr index prefetch_distance = 16;
  template <class S>
  void prefetch_entry(matrix_view<S> w, index k) const noexcept {
#if defined(__GNUC__) || defined(__clang__)
    if (k < entries()) __builtin_prefetch(&w(idx_(0, k), idx_(1, k)), 1);
#else
    (void)w;
    (void)k;
#endif
  }

  /// The entries grouped by output row (a CSR view of the mask): entries by_row_[row_start_[j] ..
  /// row_start_[j + 1]) have output index j. Built once: the mask is fixed for the adapter's life.
  void index_by_row() {
    row_start_.assign(static_cast<std::size_t>(out_ + 1), 0);
    for (index k = 0; k < idx_.cols(); ++k) ++row_start_[static_cast<std::size_t>(idx_(0, k)) + 1];
    for (std::size_t j = 1; j < row_start_.size(); ++j) row_start_[j] += row_start_[j - 1];
    by_row_.assign(static_cast<std::size_t>(idx_.cols()), 0);
    std::vector<index> next(row_start_.begin(), row_start_.end() - 1);
    for (index k = 0; k < idx_.cols(); ++k) by_row_[static_cast<std::size_t>(next[static_cast<std::size_t>(idx_(0, k))]++)] = k;
  }

  // ---- additive_adapter hooks -----------------------------------------------------------------
  kernels::sparse_rows_epilogue<T> tile_epilogue(matrix_view<const T> x, cache_type& /*cache*/) const {
    return {x, row_start_.data(), by_row_.data(), idx_.row(0), idx_.row(1), values_.data(), scale_};
  }
  void add_delta(matrix_view<const T> x, matrix_view<T> y, cache_type& /*cache*/) const { add_sparse(x, y); }
  void delta_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& /*cache*/) {
    sparse_backward(x, g, dx);
  }

  /// y[:, r_k] += s v_k x[:, c_k]; rows of x over threads (kernels/parallel.hpp).
  void add_sparse(matrix_view<const T> x, matrix_view<T> y) const {
    const std::int32_t* rows = idx_.row(0);
    const std::int32_t* cols = idx_.row(1);
    const T* v = values_.data();
    const index k_n = entries();
    kernels::parallel_ranges(x.rows(), 1, 2.0 * static_cast<double>(x.rows() * k_n), [&](index b0, index b1) {
      for (index b = b0; b < b1; ++b) {
        const T* xb = x.row(b);
        T* yb = y.row(b);
        for (index k = 0; k < k_n; ++k) yb[rows[k]] += scale_ * v[k] * xb[cols[k]];
      }
    });
  }

  /// dv_k += s sum_b g[b, r_k] x[b, c_k] (entries over threads, rows in order: the same sums
  /// whatever the thread count);  dx[:, c_k] += s v_k g[:, r_k] (rows over threads).
  void sparse_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx) {
    const std::int32_t* rows = idx_.row(0);
    const std::int32_t* cols = idx_.row(1);
    const T* v = values_.data();
    T* gv = grad_.data();
    const index k_n = entries();
    const double work = 2.0 * static_cast<double>(x.rows() * k_n);
    kernels::parallel_ranges(k_n, 64, work, [&](index k0, index k1) {
      for (index b = 0; b < x.rows(); ++b) {
        const T* xb = x.row(b);
        const T* gb = g.row(b);
        for (index k = k0; k < k1; ++k) gv[k] += scale_ * gb[rows[k]] * xb[cols[k]];
      }
    });
    kernels::parallel_ranges(x.rows(), 1, work, [&](index b0, index b1) {
      for (index b = b0; b < b1; ++b) {
        const T* gb = g.row(b);
        T* dxb = dx.row(b);
        for (index k = 0; k < k_n; ++k) dxb[cols[k]] += scale_ * v[k] * gb[rows[k]];
      }
    });
  }

  index in_ = 0;
  index out_ = 0;
  matrix<std::int32_t> idx_;  // (2, K): output indices, input indices
  std::vector<index> row_start_;  // (out + 1): CSR offsets of the entries by output row
  std::vector<index> by_row_;     // (K): entry numbers ordered by output row
  matrix<T> values_;          // (1, K) shira_weight
  matrix<T> grad_;            // (1, K)
  matrix<T> mirror_;          // (2, K) idx_ as T, for parameters()
  T scale_ = T{1};
  std::vector<application> applied_;
};


}  // namespace peft
