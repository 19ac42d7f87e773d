// peft/adapters/frod.hpp — FRoD as HuggingFace PEFT 0.21.2 computes it (peft_type "FROD";
// PEFT cites https://doi.org/10.1609/aaai.v40i31.39813).
//
//   W' = U (S + diag(lambda_l)) V^T     the WHOLE weight is re-parameterised; no scaling
//   y  = x W'^T + b0 = ((x V) S^T + (x V) * lambda_l) U^T + b0      (W0 itself is not used)
//   V (in, in), S's indices (2, nnz) and size: frozen, SHARED by the layers of one category
//   (PEFT's _category_from_key: q_proj for layers.3.q_proj; one std::shared_ptr each);
//   lambda_l (in), S's values (nnz): trainable, per layer;
//   U (out, in): frozen, never saved: U = colnorm(W0 V^-T), solved in double and rounded to
//   float32 as PEFT does (columns of norm <= 1e-12 are 0). PEFT's init: lambda_l = those column
//   norms, S = 0, so W' = W0 up to U's float32 rounding (not exactly: no identity at init).
//
//   peft::frod<double> a(layer.base(), v, indices, "fc");   // PEFT's init over this base
//   layer.add_adapter("default", std::move(a));
//
// The passes never form W' (or W0): z = x V, the sparse S, then U. delta_weight forms W' - W0
// (W0 read through dequantize_row, any base format) and remembers it so unmerge_delta on the
// merged base subtracts exactly that (PEFT restores its copy of W0). Checkpoints: io/peft/frod.hpp.
// Details: docs/methods/frod.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/adapters/detail/merge_memo.hpp"
#include "peft/core/adapter.hpp"
#include "peft/core/adapter_checks.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/parameter.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft {

/// PEFT's _category_from_key: the module path's last component when the one before it is a
/// layer index ("layers.3.q_proj" -> "q_proj"), else the last two joined by '_'
/// ("encoder.layer.0.attention.self.query" -> "self_query"), with BERT's attention output dense
/// named "attention_output"; a one-component path is its own category.
inline std::string frod_category(std::string_view path) {
  std::vector<std::string_view> parts;
  std::size_t start = 0;
  for (;;) {
    const auto dot = path.find('.', start);
    parts.push_back(path.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start));
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  if (parts.size() == 1) return std::string(parts[0]);
  const auto prev = parts[parts.size() - 2];
  // Python's str.isdigit: non-empty, every character a digit.
  if (!prev.empty() && std::all_of(prev.begin(), prev.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return std::string(parts.back());
  }
  std::string category = std::string(prev) + "_" + std::string(parts.back());
  if (category == "output_dense" && parts.size() >= 3 && parts[parts.size() - 3] == "attention") {
    return "attention_output";
  }
  return category;
}

/// U and the column norms PEFT derives from W0 (out, in) and V (in, in): B = W0 V^-T solved in
/// double (LU with partial pivoting, as LAPACK's gesv), lambda_j = ||B[:, j]||, U[:, j] =
/// B[:, j] / lambda_j (0 where lambda_j <= 1e-12); both rounded to float32 (PEFT's .float()).
/// error when V is singular (PEFT then falls back to a pseudo-inverse with rtol 1e-6, which
/// peft-cpp does not reproduce).
struct frod_basis {
  matrix<double> u;              // (out, in), float32 values
  std::vector<double> lambda_l;  // (in), float32 values
};

template <class S>
frod_basis frod_basis_of(matrix_view<const double> w0, matrix_view<const S> v) {
  constexpr const char* where = "frod_basis_of";
  const index out = w0.rows(), in = w0.cols();
  if (v.rows() != in || v.cols() != in) {
    detail::raise<shape_error>(where, "frod_V is " + detail::shape_string(v.rows(), v.cols()) + ", the weight " +
                                          detail::shape_string(out, in) + ": expected (in, in)");
  }
  // Solve V X = W0^T (X = B^T, (in, out)).
  matrix<double> a(in, in), x(in, out);
  for (index i = 0; i < in; ++i)
    for (index j = 0; j < in; ++j) a(i, j) = static_cast<double>(v(i, j));
  for (index i = 0; i < in; ++i)
    for (index o = 0; o < out; ++o) x(i, o) = w0(o, i);
  for (index k = 0; k < in; ++k) {
    index piv = k;
    for (index i = k + 1; i < in; ++i)
      if (std::abs(a(i, k)) > std::abs(a(piv, k))) piv = i;
    if (a(piv, k) == 0.0) {
      detail::raise<error>(where, "frod_V is singular: PEFT then takes U from a pseudo-inverse (rtol 1e-6), "
                                  "which peft-cpp does not reproduce");
    }
    if (piv != k) {
      for (index j = 0; j < in; ++j) std::swap(a(k, j), a(piv, j));
      for (index j = 0; j < out; ++j) std::swap(x(k, j), x(piv, j));
    }
    for (index i = k + 1; i < in; ++i) {
      const double f = a(i, k) / a(k, k);
      if (f == 0) continue;
      for (index j = k + 1; j < in; ++j) a(i, j) -= f * a(k, j);
      for (index j = 0; j < out; ++j) x(i, j) -= f * x(k, j);
    }
  }
  for (index k = in - 1; k >= 0; --k) {
    for (index j = 0; j < out; ++j) {
      double s = x(k, j);
      for (index l = k + 1; l < in; ++l) s -= a(k, l) * x(l, j);
      x(k, j) = s / a(k, k);
    }
  }
  frod_basis b{matrix<double>(out, in), std::vector<double>(static_cast<std::size_t>(in))};
  for (index j = 0; j < in; ++j) {
    double sq = 0;
    for (index o = 0; o < out; ++o) sq += x(j, o) * x(j, o);
    const double norm = std::sqrt(sq);
    b.lambda_l[static_cast<std::size_t>(j)] = static_cast<double>(static_cast<float>(norm));
    if (norm > 1e-12) {
      for (index o = 0; o < out; ++o) b.u(o, j) = static_cast<double>(static_cast<float>(x(j, o) / norm));
    }
  }
  return b;
}

template <compute_scalar T>
class frod : public detail::adapter_checks<frod<T>, T> {
 public:
  using scalar = T;
  static constexpr std::string_view method = "frod";

  /// What forward leaves for backward: z = x V, t = z S^T + z * lambda_l (batch, in).
  struct cache_type {
    matrix<T> z, t, dt, dz;
  };

  frod() = default;

  /// PEFT's init over the base w: U and lambda_l from W0 and V (frod_basis_of), S's values 0.
  /// `v` (in, in) and `indices` (2, nnz: row, column of S, as numbers) are the category's shared
  /// tensors; `category` names them in checkpoints (base_model.frod_V.<category>).
  template <base_weight Base>
  frod(const Base& w, std::shared_ptr<matrix<T>> v, std::shared_ptr<matrix<T>> indices, std::string category)
      : frod(basis_or_throw(w, v), v, std::move(indices), nullptr, std::move(category), {}, {}) {}

  /// An adapter over the base w with given trainables: lambda_l (in values), s_values (nnz
  /// values); U derived from w (as a checkpoint is loaded). `size` is frod_s_size (1, 2) =
  /// [in, in], shared by the category (made when null).
  template <base_weight Base>
  frod(const Base& w, std::shared_ptr<matrix<T>> v, std::shared_ptr<matrix<T>> indices,
       std::shared_ptr<matrix<T>> size, std::string category, std::vector<T> lambda_l, std::vector<T> s_values)
      : frod(basis_or_throw(w, v), v, std::move(indices), std::move(size), std::move(category),
             std::move(lambda_l), std::move(s_values)) {}

  /// From U itself (out, in) (frod_basis_of's u for a W0), the shared tensors and the trainables
  /// (empty vectors: PEFT's init, lambda_l from `basis` and S = 0).
  frod(const frod_basis& basis, std::shared_ptr<matrix<T>> v, std::shared_ptr<matrix<T>> indices,
       std::shared_ptr<matrix<T>> size, std::string category, std::vector<T> lambda_l, std::vector<T> s_values)
      : v_(std::move(v)), idx_(std::move(indices)), size_(std::move(size)), category_(std::move(category)) {
    constexpr const char* where = "frod::frod";
    if (!v_ || !idx_) detail::raise<shape_error>(where, "frod_V and frod_s_indices must not be null");
    const index in = v_->rows();
    if (in < 1 || v_->cols() != in) {
      detail::raise<shape_error>(where, "frod_V is " + detail::shape_string(v_->rows(), v_->cols()) +
                                            ", expected (in, in) with in >= 1");
    }
    if (basis.u.cols() != in || basis.u.rows() < 1) {
      detail::raise<shape_error>(where, "frod_U is " + detail::shape_string(basis.u.rows(), basis.u.cols()) +
                                            ", expected (out, " + std::to_string(in) + ")");
    }
    if (idx_->rows() != 2) {
      detail::raise<shape_error>(where, "frod_s_indices is " + detail::shape_string(idx_->rows(), idx_->cols()) +
                                            ", expected (2, nnz)");
    }
    const index nnz = idx_->cols();
    rows_.resize(static_cast<std::size_t>(nnz));
    cols_.resize(static_cast<std::size_t>(nnz));
    for (index k = 0; k < nnz; ++k) {
      const double r = static_cast<double>((*idx_)(0, k)), c = static_cast<double>((*idx_)(1, k));
      if (!(r >= 0 && r < static_cast<double>(in) && c >= 0 && c < static_cast<double>(in)) || r != std::floor(r) ||
          c != std::floor(c)) {
        detail::raise<shape_error>(where, "frod_s_indices entry " + std::to_string(k) + " is (" + std::to_string(r) +
                                              ", " + std::to_string(c) + "), not a position of the (" +
                                              std::to_string(in) + ", " + std::to_string(in) + ") matrix S");
      }
      rows_[static_cast<std::size_t>(k)] = static_cast<index>(r);
      cols_[static_cast<std::size_t>(k)] = static_cast<index>(c);
    }
    if (!size_) {
      size_ = std::make_shared<matrix<T>>(1, 2, std::vector<T>{static_cast<T>(in), static_cast<T>(in)});
    }
    if (size_->size() != 2 || static_cast<double>(size_->data()[0]) != static_cast<double>(in) ||
        static_cast<double>(size_->data()[1]) != static_cast<double>(in)) {
      detail::raise<shape_error>(where, "frod_s_size must be [" + std::to_string(in) + ", " + std::to_string(in) +
                                            "] (frod_V's size)");
    }
    if (lambda_l.empty()) {
      lambda_l.resize(basis.lambda_l.size());
      for (std::size_t i = 0; i < lambda_l.size(); ++i) lambda_l[i] = static_cast<T>(basis.lambda_l[i]);
    }
    if (s_values.empty()) s_values.assign(static_cast<std::size_t>(nnz), T{0});
    if (static_cast<index>(lambda_l.size()) != in) {
      detail::raise<shape_error>(where, "frod_lambda_l has " + std::to_string(lambda_l.size()) +
                                            " values, expected in_features " + std::to_string(in));
    }
    if (static_cast<index>(s_values.size()) != nnz) {
      detail::raise<shape_error>(where, "frod_lambda_s_values has " + std::to_string(s_values.size()) +
                                            " values, frod_s_indices " + std::to_string(nnz) + " positions");
    }
    u_ = matrix<T>(basis.u.rows(), in);
    for (std::size_t i = 0; i < u_.storage().size(); ++i) u_.storage()[i] = static_cast<T>(basis.u.storage()[i]);
    lambda_ = matrix<T>(1, in, std::move(lambda_l));
    s_ = matrix<T>(1, nnz, std::move(s_values));
    gl_ = matrix<T>(1, in);
    gs_ = matrix<T>(1, nnz);
  }

  index in_features() const noexcept { return u_.cols(); }
  index out_features() const noexcept { return u_.rows(); }
  /// The number of entries of S (its values).
  index nnz() const noexcept { return s_.cols(); }
  const std::string& category() const noexcept { return category_; }
  /// U (out, in): derived from W0, frozen, not saved.
  matrix_view<const T> U() const noexcept { return u_.view(); }
  /// The shared V (in, in), S indices (2, nnz) and size (1, 2).
  const std::shared_ptr<matrix<T>>& shared_V() const noexcept { return v_; }
  const std::shared_ptr<matrix<T>>& shared_indices() const noexcept { return idx_; }
  const std::shared_ptr<matrix<T>>& shared_size() const noexcept { return size_; }
  matrix_view<T> lambda_l() noexcept { return lambda_.view(); }
  matrix_view<const T> lambda_l() const noexcept { return lambda_.view(); }
  matrix_view<T> s_values() noexcept { return s_.view(); }
  matrix_view<const T> s_values() const noexcept { return s_.view(); }
  matrix_view<const T> grad_lambda_l() const noexcept { return gl_.view(); }
  matrix_view<const T> grad_s_values() const noexcept { return gs_.view(); }

  /// y = t U^T + b0 (PEFT's path with one adapter and no dropout: the base product is skipped).
  template <base_weight Base>
  void forward(const Base& w, matrix_view<const T> x, matrix_view<T> y, cache_type& cache) const {
    check_io("frod::forward", w, x, y);
    project(x, cache);
    kernels::gemm_nt<T, T>(1.0, cache.t.view(), u_.view(), 0.0, y);
    if (w.has_bias()) {
      for (index b = 0; b < y.rows(); ++b) {
        T* yb = y.row(b);
        for (index o = 0; o < y.cols(); ++o) yb[o] += w.template bias_value<T>(o);
      }
    }
  }
  /// y += t U^T - (h - b0) = x (W' - W0)^T: PEFT's term for one of several adapters.
  template <base_weight Base>
  void add_term(const Base& w, matrix_view<const T> x, matrix_view<const T> h, matrix_view<T> y,
                cache_type& cache) const {
    check_io("frod::add_term", w, x, y);
    detail::expect_shape("frod::add_term", "h", h, x.rows(), out_features());
    project(x, cache);
    kernels::gemm_nt<T, T>(1.0, cache.t.view(), u_.view(), 1.0, y);
    for (index b = 0; b < y.rows(); ++b) {
      T* yb = y.row(b);
      const T* hb = h.row(b);
      for (index o = 0; o < y.cols(); ++o) yb[o] -= hb[o] - w.template bias_value<T>(o);
    }
  }
  /// dlambda_l, ds += ; dx = dz V^T (W0 takes no part).
  template <base_weight Base>
  void backward(const Base& w, matrix_view<const T> x, matrix_view<const T> g, matrix_view<T> dx, cache_type& cache) {
    check_grad("frod::backward", w, x, g, dx);
    grads(x, g, cache);
    kernels::gemm_nt<T, T>(1.0, cache.dz.view(), v_->view(), 0.0, dx);
  }
  /// dlambda_l, ds += ; dx += dz V^T; dh -= g (the term subtracts h).
  template <base_weight Base>
  void backward_term(const Base& w, matrix_view<const T> x, matrix_view<const T> /*h*/, matrix_view<const T> g,
                     matrix_view<T> dh, matrix_view<T> dx, cache_type& cache) {
    check_grad("frod::backward_term", w, x, g, dx);
    detail::expect_shape("frod::backward_term", "dh", dh, x.rows(), out_features());
    grads(x, g, cache);
    kernels::gemm_nt<T, T>(1.0, cache.dz.view(), v_->view(), 1.0, dx);
    for (index b = 0; b < dh.rows(); ++b) {
      T* d = dh.row(b);
      const T* gb = g.row(b);
      for (index o = 0; o < dh.cols(); ++o) d[o] -= gb[o];
    }
  }

  /// dW = U (S + diag(lambda_l)) V^T - W0 (out, in), W0 read a row at a time. Remembers dW and
  /// the base, so that unmerge_delta on that base (merged) subtracts exactly this (PEFT copies
  /// W0 back).
  template <base_weight Base>
  void delta_weight(const Base& w, matrix_view<T> dw) const {
    constexpr const char* where = "frod::delta_weight";
    check_base(where, w);
    detail::expect_shape(where, "dw", dw, out_features(), in_features());
    const index in = in_features(), out = out_features();
    matrix<T> m(in, in);  // (S + diag(lambda_l)) V^T
    const matrix<T>& v = *v_;
    for (index i = 0; i < in; ++i) {
      const T l = lambda_(0, i);
      T* mi = m.row(i);
      for (index j = 0; j < in; ++j) mi[j] = l * v(j, i);
    }
    for (index k = 0; k < nnz(); ++k) {
      const index r = rows_[static_cast<std::size_t>(k)], c = cols_[static_cast<std::size_t>(k)];
      const T s = s_(0, k);
      T* mr = m.row(r);
      for (index j = 0; j < in; ++j) mr[j] += s * v(j, c);
    }
    kernels::gemm_nn<T, T>(1.0, u_.view(), m.view(), 0.0, dw);
    std::vector<T> row(static_cast<std::size_t>(in));
    for (index o = 0; o < out; ++o) {
      w.dequantize_row(o, row.data());
      T* d = dw.row(o);
      for (index j = 0; j < in; ++j) d[j] -= row[static_cast<std::size_t>(j)];
    }
    matrix<T> delta(out, in);
    for (index o = 0; o < out; ++o) std::copy(dw.row(o), dw.row(o) + in, delta.row(o));
    merged_.remember({std::move(delta), static_cast<const void*>(&w)});
  }

  /// FRoD does not change the bias.
  template <base_weight Base>
  bool delta_bias(const Base& /*w*/, T* /*db*/) const {
    return false;
  }

  /// What merge added to `merged` (W' = W0 + dW): the dW delta_weight remembered for this base.
  /// The merged weight alone is U (S + diag(lambda_l)) V^T, which no longer holds W0: error
  /// otherwise (merge and unmerge with the same adapter and base, as PEFT keeps W0's copy).
  template <base_weight Base>
  void unmerge_delta(const Base& merged, matrix_view<T> dw) const {
    constexpr const char* where = "frod::unmerge_delta";
    check_base(where, merged);
    detail::expect_shape(where, "dw", dw, out_features(), in_features());
    const remembered last = merged_.recall();
    if (last.base != static_cast<const void*>(&merged) || last.delta.rows() != out_features()) {
      detail::raise<error>(where, "the merged weight U (S + diag(lambda_l)) V^T no longer determines W0; unmerge "
                                  "needs the delta that merging this base remembered (PEFT keeps a copy of W0)");
    }
    for (index o = 0; o < out_features(); ++o) std::copy(last.delta.row(o), last.delta.row(o) + in_features(), dw.row(o));
  }

  /// frod_lambda_l (in) and frod_lambda_s_values (nnz): trainable, PEFT's names; the category's
  /// frod_V.<c> (in, in), frod_s_indices.<c> (2, nnz, integer) and frod_s_size.<c> (2, integer):
  /// frozen, shared (saved once as base_model.frod_V.<c>, ...). U is not a parameter.
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    p.push_back({"frod_lambda_l", lambda_.view(), gl_.view(), detail::shape_of(lambda_.view(), true)});
    p.push_back({"frod_lambda_s_values", s_.view(), gs_.view(), detail::shape_of(s_.view(), true)});
    if (v_) {
      p.push_back({"frod_V." + category_, v_->view(), {}, detail::shape_of(v_->view(), false), false, true});
      p.push_back({"frod_s_indices." + category_, idx_->view(), {}, detail::shape_of(idx_->view(), false), false, true,
                   true});
      p.push_back({"frod_s_size." + category_, size_->view(), {}, detail::shape_of(size_->view(), true), false, true,
                   true});
    }
    return p;
  }

  void zero_grad() {
    gl_.fill(T{0});
    gs_.fill(T{0});
  }

 private:
  template <class Base>
  static frod_basis basis_or_throw(const Base& w, const std::shared_ptr<matrix<T>>& v) {
    if (!v) detail::raise<shape_error>("frod::frod", "frod_V must not be null");
    const auto w0 = dequantized_weight<double>(w);
    return frod_basis_of<T>(w0.view(), matrix_view<const T>(v->view()));
  }
  void check_ready(const char* where) const {
    if (!v_) detail::raise<error>(where, "the adapter is default-constructed (no frod_V)");
  }
  using checks = detail::adapter_checks<frod, T>;  // check_base / check_io / check_grad
  friend checks;
  using checks::check_base;
  using checks::check_io;
  using checks::check_grad;

  /// k.z = x V, k.t = z S^T + z * lambda_l: t[b, r_k] += s_k z[b, c_k].
  void project(matrix_view<const T> x, cache_type& k) const {
    const index batch = x.rows(), in = in_features();
    k.z = matrix<T>(batch, in);
    k.t = matrix<T>(batch, in);
    kernels::gemm_nn<T, T>(1.0, x, v_->view(), 0.0, k.z.view());
    for (index b = 0; b < batch; ++b) {
      const T* zb = k.z.row(b);
      T* tb = k.t.row(b);
      for (index j = 0; j < in; ++j) tb[j] = zb[j] * lambda_(0, j);
      for (index q = 0; q < nnz(); ++q) {
        tb[rows_[static_cast<std::size_t>(q)]] += s_(0, q) * zb[cols_[static_cast<std::size_t>(q)]];
      }
    }
  }

  /// dt = g U; dlambda_l += sum_b dt * z; ds_k += sum_b dt[b, r_k] z[b, c_k];
  /// dz = dt * lambda_l + dt S (dz[b, c_k] += s_k dt[b, r_k]).
  void grads(matrix_view<const T> x, matrix_view<const T> g, cache_type& k) {
    const index batch = x.rows(), in = in_features();
    project(x, k);
    k.dt = matrix<T>(batch, in);
    k.dz = matrix<T>(batch, in);
    kernels::gemm_nn<T, T>(1.0, g, u_.view(), 0.0, k.dt.view());
    for (index b = 0; b < batch; ++b) {
      const T* zb = k.z.row(b);
      const T* db = k.dt.row(b);
      T* dzb = k.dz.row(b);
      for (index j = 0; j < in; ++j) {
        gl_(0, j) += db[j] * zb[j];
        dzb[j] = db[j] * lambda_(0, j);
      }
      for (index q = 0; q < nnz(); ++q) {
        const index r = rows_[static_cast<std::size_t>(q)], c = cols_[static_cast<std::size_t>(q)];
        gs_(0, q) += db[r] * zb[c];
        dzb[c] += s_(0, q) * db[r];
      }
    }
  }

  std::shared_ptr<matrix<T>> v_;     // (in, in), shared by the category
  std::shared_ptr<matrix<T>> idx_;   // (2, nnz), shared
  std::shared_ptr<matrix<T>> size_;  // (1, 2) = [in, in], shared
  std::string category_;
  std::vector<index> rows_, cols_;   // idx_ as integers
  matrix<T> u_;                      // (out, in)
  matrix<T> lambda_;                 // (1, in)
  matrix<T> s_;                      // (1, nnz)
  matrix<T> gl_, gs_;
  // What the last delta_weight wrote, and the base it was for (PEFT's copy of W0).
  struct remembered {
    matrix<T> delta;
    const void* base = nullptr;
  };
  detail::merge_memo<remembered> merged_;
};

}  // namespace peft
