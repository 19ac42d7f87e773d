// peft/base/any_quantized.hpp — a frozen weight in any quantized format, chosen at run time.
//
//   auto w = peft::any_quantized::quantize("q4_k", weight_view, bias_ptr);
//   w.matmul(x, y);                       // the q4_k base's product, bit for bit
//   w.format_name();                      // "q4_k"
//
//   {  // models built through Base::quantize(weight, bias) (io::load_base, causal_lm::load)
//     peft::any_quantized::format_scope scope("nf4");
//     auto lm = peft::models::causal_lm<float, peft::any_quantized>::load(dir);
//   }
//
// It holds one of the formats of base/quantized_formats.hpp (int8, q4_0, nf4, q8_0, q4_k, q6_k)
// and forwards every operation to it, so results are those of that format's own base. What it
// saves is compile time: a program that offers every format (the peft tool's --quantize-base)
// instantiates its models, adapters and trainers once for any_quantized instead of once per
// format; only the base's own products are compiled per format.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

#include "peft/base/quantized_formats.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/epilogue.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/type_list.hpp"

namespace peft {

class any_quantized {
  template <class F>
  decltype(auto) visit(F&& f) const {
    return std::visit(std::forward<F>(f), q_);
  }

 public:
  /// One of the formats of quantized_formats.
  using variant_type = rebind_list_t<std::variant, quantized_formats>;

  static constexpr std::string_view name = "any_quantized";

  /// Sets the format quantize(weight, bias) uses on this thread while the scope lives (scopes
  /// nest; the previous format comes back at its end). error naming the format when
  /// quantized_formats has no format of that name.
  class format_scope {
   public:
    explicit format_scope(std::string_view format) : previous_(current()) {
      current() = index_of("any_quantized::format_scope", format);
    }
    ~format_scope() { current() = previous_; }
    format_scope(const format_scope&) = delete;
    format_scope& operator=(const format_scope&) = delete;

   private:
    std::optional<std::size_t> previous_;
  };

  any_quantized() = default;
  /// Takes a weight of one of the formats.
  template <class Q>
    requires contains_type_v<Q, quantized_formats>
  explicit any_quantized(Q q) : q_(std::move(q)) {}

  /// Quantizes a weight (out, in) and an optional bias (nullptr: none) in the format of that
  /// CLI name ("int8", "q4_0", "nf4", ...). error for an unknown name; otherwise the format's own
  /// errors.
  template <class U>
  static any_quantized quantize(std::string_view format, matrix_view<const U> weight, const U* bias = nullptr) {
    return quantize_at(index_of("any_quantized::quantize", format), weight, bias);
  }

  /// Quantizes in the format of the innermost format_scope of this thread; error when there is
  /// none.
  template <class U>
  static any_quantized quantize(matrix_view<const U> weight, const U* bias = nullptr) {
    if (!current()) {
      detail::raise<error>("any_quantized::quantize", "no format chosen (open an any_quantized::format_scope first)");
    }
    return quantize_at(*current(), weight, bias);
  }

  /// The held format's CLI name ("q4_0", ...).
  std::string_view format_name() const noexcept {
    return std::visit([](const auto& q) { return quantized_cli_name<std::remove_cvref_t<decltype(q)>>; }, q_);
  }
  /// The held weight.
  const variant_type& get() const noexcept { return q_; }

  index out_features() const noexcept { return visit([](const auto& q) { return q.out_features(); }); }
  index in_features() const noexcept { return visit([](const auto& q) { return q.in_features(); }); }
  bool has_bias() const noexcept { return visit([](const auto& q) { return q.has_bias(); }); }
  /// Bytes of the quantized weight (bias excluded).
  std::size_t storage_bytes() const noexcept { return visit([](const auto& q) { return q.storage_bytes(); }); }

  template <compute_scalar T>
  T bias_value(index j) const noexcept {
    return visit([j](const auto& q) { return q.template bias_value<T>(j); });
  }
  /// The whole weight decoded to f32 (out, in): for tests and inspection.
  matrix<float> dequantize() const {
    return visit([](const auto& q) { return q.dequantize(); });
  }
  template <compute_scalar T>
  void dequantize_row(index i, T* out) const {
    visit([&](const auto& q) { q.dequantize_row(i, out); });
  }

  /// y = x W0^T + b0 (x (batch, in), y (batch, out) overwritten).
  template <compute_scalar T>
  void matmul(std::type_identity_t<matrix_view<const T>> x, matrix_view<T> y) const {
    visit([&](const auto& q) { q.matmul(x, y); });
  }
  /// The same, then epi on each finished tile (core/epilogue.hpp).
  template <compute_scalar T, class Epilogue>
    requires epilogue_for<Epilogue, T>
  void matmul(std::type_identity_t<matrix_view<const T>> x, matrix_view<T> y, const Epilogue& epi) const {
    visit([&](const auto& q) { q.matmul(x, y, epi); });
  }
  /// dx = dy W0 (dx += dy W0 when `accumulate`).
  template <compute_scalar T>
  void matmul_t(std::type_identity_t<matrix_view<const T>> dy, matrix_view<T> dx, bool accumulate = false) const {
    visit([&](const auto& q) { q.matmul_t(dy, dx, accumulate); });
  }

  /// Merging: as the held format's (lossy re-quantization).
  template <compute_scalar T>
  void add_to_weight(matrix_view<const T> dw, double alpha) {
    std::visit([&](auto& q) { q.add_to_weight(dw, alpha); }, q_);
  }
  template <compute_scalar T>
  void add_to_bias(const T* db, double alpha) {
    std::visit([&](auto& q) { q.add_to_bias(db, alpha); }, q_);
  }

 private:
  static std::optional<std::size_t>& current() noexcept {
    thread_local std::optional<std::size_t> format;
    return format;
  }

  static std::size_t index_of(std::string_view where, std::string_view format) {
    const auto i = quantized_format_index(format);
    if (!i) {
      detail::raise<error>(where, "no quantized format is named '" + std::string(format) + "' (" +
                                      quantized_format_names() + ")");
    }
    return *i;
  }

  template <class U>
  static any_quantized quantize_at(std::size_t index, matrix_view<const U> weight, const U* bias) {
    std::optional<any_quantized> out;
    visit_quantized_format_at(index, [&](auto format) {
      using Q = typename decltype(format)::type;
      out.emplace(Q::quantize(weight, bias));
    });
    return std::move(*out);
  }

  variant_type q_;
};

static_assert(mutable_base_weight<any_quantized>);
static_assert(fused_base_weight<any_quantized, float> && fused_base_weight<any_quantized, double>);

}  // namespace peft
