// peft/adapters/shira.hpp — SHiRA, sparse high-rank adapters (Bhardwaj et al., NeurIPS 2024), as
// HuggingFace PEFT implements them (tuners/shira/).
//
//   Delta W = scatter(indices, s v)    v (K) trainable values, indices (2, K) fixed: row 0 the
//                                      output index, row 1 the input index; s = 1 (PEFT's
//                                      `scaling`, not saved; set_scale() changes it)
//   y = x W0^T + b0 + x Delta W^T      the base product plus a sparse term, y[:, r_k] += s v_k x[:, c_k];
//                                      Delta W is never made dense in forward or backward
//
//   peft::shira<float> a(in, out, {.rank = 32, .seed = 7});       // random mask, v = 0
//   peft::shira<float> b(in, out, peft::shira_snip_mask(base, G, k));   // any mask (train/shira_masks.hpp)
//   a.forward(base, x, y, cache);   a.backward(base, x, dy, dx, cache);
//
// Gradients (g = dL/dy): dv_k += s sum_batch g[:, r_k] x[:, c_k]; dx = g W0 + s g[:, r_k] v_k
// scattered to dx[:, c_k]. Checkpoint names: shira_weight (K), shira_indices (2, K) int32 (some
// writers store it as float32: accepted when every value is integral).
//
// Fused switching, the point of SHiRA (paper §3.2: a scatter instead of a fusion):
//   a.apply(base);    // W0[r_k, c_k] += s v_k in place, the K overwritten values kept bit for bit
//   ...               // serve with the base alone: the adapter must not also run (forward raises)
//   a.remove(base);   // writes the kept values back: W0 is restored BIT FOR BIT (no subtraction)
// Both are O(K), with no dense work and no dense temporary. The adapter records which base it is
// applied to (by the base's weight storage, so moving the base object is fine): applying twice to
// one base, or removing from a base it is not applied to, raises peft::error. A serving system
// switching among many adapters on one base does `current.remove(base); next.apply(base);` per
// layer. Several adapters may be applied to one base at once (their deltas add, as PEFT sums
// active adapters); they must then be removed in reverse order where their entries overlap:
// remove() checks, by a fingerprint of the values apply() wrote, that nothing wrote over this
// adapter's entries since, and raises with W0 untouched if something did. One adapter may be
// applied to several bases (replicas). The record is part of the adapter's value: a copy of an
// applied adapter is applied too (remove through one of them only); a base destroyed while
// applied leaves a stale record, dropped with discard_applications().
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

#include "peft/base/dense.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/kernels/epilogue.hpp"
#include "peft/core/random.hpp"
#include "peft/io/adapter_config.hpp"
#include "peft/io/checkpoint_tensors.hpp"
#include "peft/train/shira_masks.hpp"

namespace peft {

struct shira_options {
  index rank = 32;           // PEFT's r: K = r (d_out + d_in) entries (PEFT's default 32)
  bool random_init = false;  // PEFT's init_weights=False: v ~ N(0, 1) (tests only); default v = 0
  std::uint64_t seed = 0;    // seeds the random mask (shira_random_mask) and the values
};

template <compute_scalar T>
class shira {
 public:
  using scalar = T;
  static constexpr std::string_view method = "shira";

  /// SHiRA's sparse term needs nothing from forward but x itself.
  struct cache_type {};

  shira() = default;

  /// A fresh adapter with PEFT's random mask of K = r (in + out) entries (seeded peft::rng, not
  /// torch's generator: see train/shira_masks.hpp) and zero values (the identity).
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

  /// y = x W0^T + b0 + x Delta W^T.
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& /*cache*/) const {
    check_io("shira::forward", w, x, y);
    if constexpr (fused_base_weight<Base, T>) {
      // Each output tile of the base product gets the entries of its output rows while in cache.
      w.matmul(x, y, [this, x](index i0, index j0, matrix_view<T> tile) { add_sparse_tile(x, i0, j0, tile); });
    } else {
      w.matmul(x, y);
      add_sparse(x, y);
    }
  }

  /// y += x Delta W^T; h (the base output) is not needed.
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<T> y,
                cache_type& /*cache*/) const {
    check_io("shira::add_term", w, x, y);
    add_sparse(x, y);
  }

  /// Accumulates dv; writes dx = g W0 + g Delta W.
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx,
                cache_type& /*cache*/) {
    check_grad("shira::backward", w, x, g, dx);
    w.matmul_t(g, dx, false);
    sparse_backward(x, g, dx);
  }

  /// Accumulates dv and dx += g Delta W; the term does not depend on h.
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<const T> g,
                     matrix_view<T> /*dh*/, matrix_view<T> dx, cache_type& /*cache*/) {
    check_grad("shira::backward_term", w, x, g, dx);
    sparse_backward(x, g, dx);
  }

  /// dW = scatter(indices, s v) (out, in), zero elsewhere. For switching, apply() is the O(K) form.
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    check_base("shira::delta_weight", w);
    check_not_applied("shira::delta_weight", w);
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
  template <storage_scalar S>
  void apply(dense<S>& base) {
    constexpr const char* where = "shira::apply";
    check_base(where, base);
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
  template <storage_scalar S>
  void remove(dense<S>& base) {
    constexpr const char* where = "shira::remove";
    check_base(where, base);
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
  template <storage_scalar S>
  bool applied_to(const dense<S>& base) const noexcept {
    return find_application(static_cast<const void*>(base.weight().data())) != applied_.end();
  }
  /// How many bases this adapter is applied to.
  std::size_t applications() const noexcept { return applied_.size(); }
  /// Forgets every apply() record without touching any base: for bases destroyed or replaced
  /// while applied. Their W0 keep the adapter's values.
  void discard_applications() noexcept { applied_.clear(); }

  // ---- PEFT checkpoints (io/peft_checkpoint.hpp calls these) ------------------------------------

  /// PEFT's "SHIRA".
  static bool handles(const io::adapter_config& c) { return c.peft_type == "SHIRA"; }
  static std::vector<std::string_view> checkpoint_parameters() { return {"shira_weight", "shira_indices"}; }
  static std::vector<std::string_view> shared_parameters() { return {}; }
  /// shira_indices is stored as an integer tensor (I32; I64 and floats are accepted too).
  static bool integer_parameter(std::string_view name) { return name == "shira_indices"; }

  /// The adapter of one module. The checkpoint does not store the layer's shape: it comes from
  /// the base when the loader knows it (merge_model passes it), else it is recovered from
  /// K = r (d_out + d_in) (r from adapter_config.json) and the largest indices, which must reach
  /// the last row and column; otherwise d_out and d_in cannot be told apart and this is a
  /// format_error (pass the base shapes to load_peft_checkpoint).
  static shira from_checkpoint(const io::adapter_config& c, const io::checkpoint_tensors<T>& m,
                               const io::checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "shira::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const auto& sw = m.shape("shira_weight", 1);
    const auto& si = m.shape("shira_indices", 2);
    if (si[0] != 2 || si[1] != sw[0] || sw[0] < 1) {
      detail::raise<format_error>(where, mod + ": shira_indices is " + io::detail::shape_text(si) +
                                             ", expected [2, K] for the K = " + std::to_string(sw[0]) +
                                             " entries of shira_weight (K >= 1)");
    }
    matrix<std::int32_t> idx = indices_from(m.get("shira_indices").data->view(), where, mod);
    const index k = idx.cols();
    const index r = c.rank_for(m.module());
    if (k % r != 0) {
      detail::raise<format_error>(where, mod + " has K = " + std::to_string(k) + " entries, not a multiple of r = " +
                                             std::to_string(r) + " (PEFT sizes SHiRA as r (d_out + d_in))");
    }
    const index dims = k / r;
    index need_out = 0, need_in = 0;
    for (index t = 0; t < k; ++t) {
      need_out = std::max<index>(need_out, idx(0, t) + 1);
      need_in = std::max<index>(need_in, idx(1, t) + 1);
    }
    if (const auto& shape = m.base_shape()) {  // the caller knows the layer: no guessing
      const auto [out, in] = *shape;
      if (need_out > out || need_in > in) {
        detail::raise<format_error>(where, mod + ": the indices reach row " + std::to_string(need_out - 1) +
                                               " and column " + std::to_string(need_in - 1) + ", outside the base's " +
                                               detail::shape_string(out, in));
      }
      check_entries(where, mod, in, out, idx);
      std::vector<T> values = m.copy("shira_weight").storage();
      return shira(in, out, std::move(idx), std::move(values));
    }
    if (need_out + need_in > dims) {
      detail::raise<format_error>(where, mod + ": the indices reach row " + std::to_string(need_out - 1) + " and column " +
                                             std::to_string(need_in - 1) + ", but K = r (d_out + d_in) gives d_out + d_in = " +
                                             std::to_string(dims) + " (K = " + std::to_string(k) + ", r = " +
                                             std::to_string(r) + ")");
    }
    if (need_out + need_in < dims) {
      detail::raise<format_error>(where, mod + ": cannot tell d_out from d_in: the indices need d_out >= " +
                                             std::to_string(need_out) + " and d_in >= " + std::to_string(need_in) +
                                             ", and K = r (d_out + d_in) gives d_out + d_in = " + std::to_string(dims) +
                                             " (the mask leaves the last rows or columns empty); build "
                                             "peft::shira(in, out, indices, values) with the base's shape");
    }
    check_entries(where, mod, need_in, need_out, idx);
    std::vector<T> values = m.copy("shira_weight").storage();
    return shira(need_in, need_out, std::move(idx), std::move(values));
  }

  /// Makes `c` describe this module when saving: peft_type SHIRA, r = K / (d_out + d_in), and
  /// PEFT's mask_type / init_weights fields when absent. unsupported_error where PEFT cannot
  /// represent the adapter: K not a multiple of d_out + d_in, an r differing between modules
  /// (ShiraConfig has one r), or a scale other than 1 (PEFT does not save it).
  void describe_in(io::adapter_config& c, const std::string& module) const {
    constexpr const char* where = "shira::describe_in";
    const index dims = in_ + out_;
    if (entries() % dims != 0) {
      detail::raise<unsupported_error>(where, "module '" + module + "' has K = " + std::to_string(entries()) +
                                                  " entries, not r (d_out + d_in) = r * " + std::to_string(dims) +
                                                  ": PEFT cannot load it");
    }
    if (scale_ != T{1}) {
      detail::raise<unsupported_error>(where, "module '" + module + "' has scale " + std::to_string(scale_) +
                                                  ", which PEFT does not save: multiply the values by it and "
                                                  "set_scale(1) first");
    }
    const index r = entries() / dims;
    if (c.peft_type != "SHIRA") {
      c.peft_type = "SHIRA";
      c.r = r;
    } else if (c.r != r) {
      detail::raise<unsupported_error>(where, "module '" + module + "' has r = " + std::to_string(r) +
                                                  " but the config says r = " + std::to_string(c.r) +
                                                  "; PEFT's ShiraConfig has one r for every module "
                                                  "(set config.r if all modules share it)");
    }
    if (!c.raw.is_object()) c.raw = io::ordered_json::object();
    if (!c.raw.contains("r")) c.raw["r"] = r;  // to_json updates it from c.r from here on
    if (!c.raw.contains("mask_type")) c.raw["mask_type"] = "random";
    if (!c.raw.contains("random_seed")) c.raw["random_seed"] = nullptr;
    if (!c.raw.contains("init_weights")) c.raw["init_weights"] = true;
  }

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

 private:
  /// One apply() in effect.
  struct application {
    const void* storage = nullptr;  // the base's weight buffer: identifies the base
    dtype type = dtype::f32;        // its storage type
    std::vector<std::byte> saved;   // the K values apply() overwrote, bit for bit
    std::uint64_t written = 0;      // fingerprint of the K values apply() wrote
  };

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

  template <class Base>
  void check_base(const char* where, const Base& w) const {
    detail::check_adapter_base(where, *this, w);
  }
  /// Running the adapter over a base that already holds its values would count them twice.
  template <class Base>
  void check_not_applied(const char* where, const Base& w) const {
    if constexpr (requires { w.weight().data(); }) {
      if (!applied_.empty() && find_application(static_cast<const void*>(w.weight().data())) != applied_.end()) {
        detail::raise<error>(where, "this adapter is applied to this base (its values are in W0): run the "
                                    "base alone (disable the adapter) or remove() it first");
      }
    }
  }
  template <class Base>
  void check_io(const char* where, const Base& w, matrix_view<const T> x, matrix_view<T> y) const {
    check_base(where, w);
    check_not_applied(where, w);
    detail::expect_shape(where, "x", x, x.rows(), in_);
    detail::expect_shape(where, "y", y, x.rows(), out_);
  }
  template <class Base>
  void check_grad(const char* where, const Base& w, matrix_view<const T> x, matrix_view<const T> g,
                  matrix_view<T> dx) const {
    check_base(where, w);
    check_not_applied(where, w);
    detail::expect_shape(where, "x", x, x.rows(), in_);
    detail::expect_shape(where, "dy", g, x.rows(), out_);
    detail::expect_shape(where, "dx", dx, x.rows(), in_);
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

  /// tile[i, j] += s v_k x[i0 + i, c_k] for the entries k of output rows j0 .. j0 + tile.cols().
  void add_sparse_tile(matrix_view<const T> x, index i0, index j0, matrix_view<T> tile) const {
    const std::int32_t* cols = idx_.row(1);
    const T* v = values_.data();
    const auto first = static_cast<std::size_t>(row_start_[static_cast<std::size_t>(j0)]);
    const auto last = static_cast<std::size_t>(row_start_[static_cast<std::size_t>(j0 + tile.cols())]);
    for (std::size_t e = first; e < last; ++e) {
      const index k = by_row_[e];
      const index j = idx_(0, k) - j0;
      const T f = scale_ * v[k];
      const index c = cols[k];
      for (index i = 0; i < tile.rows(); ++i) tile(i, j) += f * x(i0 + i, c);
    }
  }

  /// y[:, r_k] += s v_k x[:, c_k].
  void add_sparse(matrix_view<const T> x, matrix_view<T> y) const {
    const std::int32_t* rows = idx_.row(0);
    const std::int32_t* cols = idx_.row(1);
    const T* v = values_.data();
    for (index b = 0; b < x.rows(); ++b) {
      const T* xb = x.row(b);
      T* yb = y.row(b);
      for (index k = 0; k < entries(); ++k) yb[rows[k]] += scale_ * v[k] * xb[cols[k]];
    }
  }

  /// dv_k += s sum_b g[b, r_k] x[b, c_k];  dx[:, c_k] += s v_k g[:, r_k].
  void sparse_backward(matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx) {
    const std::int32_t* rows = idx_.row(0);
    const std::int32_t* cols = idx_.row(1);
    const T* v = values_.data();
    T* gv = grad_.data();
    for (index b = 0; b < x.rows(); ++b) {
      const T* xb = x.row(b);
      const T* gb = g.row(b);
      T* dxb = dx.row(b);
      for (index k = 0; k < entries(); ++k) {
        gv[k] += scale_ * gb[rows[k]] * xb[cols[k]];
        dxb[cols[k]] += scale_ * v[k] * gb[rows[k]];
      }
    }
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

static_assert(mergeable_adapter_for<shira<float>, dense<float>>);
static_assert(mergeable_adapter_for<shira<double>, dense<bf16>>);

}  // namespace peft
