// peft/adapters/lora_decomposition.hpp — the LoRA initialisations that move part of the base
// weight into the adapter (PEFT's init_lora_weights = "pissa" and "olora"), and PEFT's conversion
// of such an adapter into a plain LoRA of twice the rank relative to the original base.
//
//   PiSSA (Meng et al. 2024): W0 = U S V^T;  A0 = diag(sqrt(S_r / s)) V_r^T,  B0 = U_r diag(sqrt(S_r / s))
//   OLoRA (Büyükakyüz 2024):  W0 = Q R;      A0 = R[:r, :],                  B0 = Q[:, :r]
//   KaSA (Wang et al. 2024):  W0 = U S V^T;  A0 = V_d^T,  B0 = U_d diag(S_d) / s  (d: the r smallest)
//   PiSSA/OLoRA: the adapter starts at A = A0, B = B0 over the residual base W0 - s B0 A0 (outputs
//   unchanged); KaSA: the base loses s B0 A0 and the adapter (B diag(lora_diag) A) starts at zero;
//   converted: A' = [A; A0] (2r, in), B' = [B, -B0] (out, 2r), same s, over W0 itself:
//              W0 + s B' A' = (W0 - s B0 A0) + s B A.
//
//   auto f = peft::decompose_base<float>(peft::lora_decomposition::pissa, layer.base(), 16, 2.0);
//   peft::lora<float> plain = peft::with_initial_factors(trained, f);   // PEFT's conversion
//
// s B0 A0 does not depend on the singular vectors' or Q's column signs (LAPACK's in PEFT, Eigen's
// here), so the residual, the converted adapter and merged weights are PEFT's; the factors
// themselves may differ from PEFT's by the sign of a component (training is symmetric under it).
// Decompositions are computed in double (PEFT: float32); PiSSA needs distinct r-th and (r+1)-th
// singular values for s B0 A0 to be unique. docs/methods/lora.md has the details.
#pragma once

#include <Eigen/QR>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"

namespace peft {

/// PEFT's initialisations that decompose the base weight (init_lora_weights "pissa", "olora"; the
/// KaSA variant's truncation of the base).
enum class lora_decomposition : std::uint8_t { pissa, olora, kasa };

/// "pissa", "olora" (as init_lora_weights spells them), "kasa".
inline std::string_view decomposition_name(lora_decomposition k) noexcept {
  return k == lora_decomposition::pissa ? "pissa" : k == lora_decomposition::olora ? "olora" : "kasa";
}

/// The initial factors A0 (r, in) and B0 (out, r) of a decomposed base.
template <compute_scalar T>
struct lora_factors {
  matrix<T> a;  // (r, in)
  matrix<T> b;  // (out, r)
};

/// The factors of W0 (out, in) for rank r and scale s (formulas above). shape_error when r is not
/// in [1, min(out, in)]; error when s is not positive and finite (PiSSA divides by it).
template <compute_scalar T>
lora_factors<T> decompose_weight(lora_decomposition kind, matrix_view<const double> w0, index rank, double scale) {
  constexpr const char* where = "decompose_weight";
  const index out = w0.rows(), in = w0.cols();
  if (rank < 1 || rank > std::min(out, in)) {
    detail::raise<shape_error>(where, std::string(decomposition_name(kind)) + " of a " + detail::shape_string(out, in) +
                                          " weight needs a rank in [1, " + std::to_string(std::min(out, in)) +
                                          "], got " + std::to_string(rank));
  }
  if (!(scale > 0.0) || !std::isfinite(scale)) {
    detail::raise<error>(where, "the LoRA scale must be positive and finite, got " + std::to_string(scale));
  }
  using dmat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  dmat w(out, in);
  for (index i = 0; i < out; ++i) {
    for (index j = 0; j < in; ++j) w(i, j) = w0(i, j);
  }
  lora_factors<T> f{matrix<T>(rank, in), matrix<T>(out, rank)};
  if (kind == lora_decomposition::kasa && rank >= std::min(out, in)) {  // PEFT keeps at least one component
    detail::raise<shape_error>(where, "kasa of a " + detail::shape_string(out, in) + " weight needs a rank below " +
                                          std::to_string(std::min(out, in)) + ", got " + std::to_string(rank));
  }
  if (kind == lora_decomposition::pissa) {
    const Eigen::BDCSVD<dmat> svd(w, Eigen::ComputeThinU | Eigen::ComputeThinV);
    for (index k = 0; k < rank; ++k) {
      const double root = std::sqrt(svd.singularValues()(k) / scale);
      for (index j = 0; j < in; ++j) f.a(k, j) = static_cast<T>(root * svd.matrixV()(j, k));
      for (index i = 0; i < out; ++i) f.b(i, k) = static_cast<T>(svd.matrixU()(i, k) * root);
    }
    return f;
  }
  if (kind == lora_decomposition::kasa) {
    const Eigen::BDCSVD<dmat> svd(w, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const index first = std::min(out, in) - rank;  // the r smallest singular components
    for (index k = 0; k < rank; ++k) {
      const double sv = svd.singularValues()(first + k) / scale;
      for (index j = 0; j < in; ++j) f.a(k, j) = static_cast<T>(svd.matrixV()(j, first + k));
      for (index i = 0; i < out; ++i) f.b(i, k) = static_cast<T>(svd.matrixU()(i, first + k) * sv);
    }
    return f;
  }
  const Eigen::HouseholderQR<dmat> qr(w);
  const dmat q = qr.householderQ() * dmat::Identity(out, rank);  // Q[:, :r]
  const auto& packed = qr.matrixQR();                             // R in its upper triangle
  for (index k = 0; k < rank; ++k) {
    for (index j = 0; j < in; ++j) f.a(k, j) = static_cast<T>(j >= k ? packed(k, j) : 0.0);
    for (index i = 0; i < out; ++i) f.b(i, k) = static_cast<T>(q(i, k));
  }
  return f;
}

/// decompose_weight over any base (its rows dequantized into a double copy of W0).
template <compute_scalar T, base_weight Base>
lora_factors<T> decompose_base(lora_decomposition kind, const Base& base, index rank, double scale) {
  return decompose_weight<T>(kind, dequantized_weight<double>(base).view(), rank, scale);
}

/// s B0 A0 (out, in): what the initialisation takes out of the base.
template <compute_scalar T>
matrix<double> initial_delta(const lora_factors<T>& f, double scale) {
  const index out = f.b.rows(), in = f.a.cols(), r = f.a.rows();
  matrix<double> d(out, in);
  for (index i = 0; i < out; ++i) {
    for (index k = 0; k < r; ++k) {
      const double bik = scale * static_cast<double>(f.b(i, k));
      for (index j = 0; j < in; ++j) d(i, j) += bik * static_cast<double>(f.a(k, j));
    }
  }
  return d;
}

/// PEFT's conversion (save_pretrained with path_initial_model_for_weight_conversion): the LoRA
/// A' = [A; A0], B' = [B, -B0] with `trained`'s scale and bias, whose term over the original base
/// equals `trained`'s over the residual one. shape_error when the factors do not fit `trained`.
template <compute_scalar T>
lora<T> with_initial_factors(const lora<T>& trained, const lora_factors<T>& initial) {
  const index r = trained.rank(), r0 = initial.a.rows(), in = trained.in_features(), out = trained.out_features();
  if (initial.a.cols() != in || initial.b.rows() != out || initial.b.cols() != r0) {
    detail::raise<shape_error>("with_initial_factors",
                               "initial factors A0 " + detail::shape_string(initial.a.rows(), initial.a.cols()) +
                                   " and B0 " + detail::shape_string(initial.b.rows(), initial.b.cols()) +
                                   " do not fit a LoRA of " + detail::shape_string(out, in));
  }
  matrix<T> a(r + r0, in), b(out, r + r0);
  for (index k = 0; k < r; ++k) {
    for (index j = 0; j < in; ++j) a(k, j) = trained.A()(k, j);
  }
  for (index k = 0; k < r0; ++k) {
    for (index j = 0; j < in; ++j) a(r + k, j) = initial.a(k, j);
  }
  for (index i = 0; i < out; ++i) {
    for (index k = 0; k < r; ++k) b(i, k) = trained.B()(i, k);
    for (index k = 0; k < r0; ++k) b(i, r + k) = -initial.b(i, k);
  }
  std::vector<T> bias;
  if (trained.has_bias()) bias.assign(trained.bias().data(), trained.bias().data() + out);
  return lora<T>(std::move(a), std::move(b), trained.scale(), std::move(bias));
}

}  // namespace peft
