// peft/io/peft/lokr.hpp — LoKr in PEFT checkpoints: peft_type "LOKR"; tensors lokr_w1 or
// lokr_w1_a/lokr_w1_b, lokr_w2 or lokr_w2_a/lokr_w2_b (no ".weight"); fields r, alpha,
// rank_pattern, alpha_pattern, decompose_both, decompose_factor. Factor shapes and forms must be
// those PEFT builds; lokr_t2 and convolution-shaped tensors are refused.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/adapters/lokr.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<lokr<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "LOKR"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view config_fields[] = {"r",           "alpha",          "rank_pattern",
                                                       "alpha_pattern", "decompose_both", "decompose_factor"};
  static std::vector<std::string_view> module_tensors() {
    return {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"};
  }

  /// LoKr's alpha for a module: alpha_pattern first, then "alpha" (PEFT's default 8).
  static double alpha_for(const adapter_config& c, const std::string& module) {
    return c.pattern_alpha(module, c.number("alpha", 8.0, "lokr::from_checkpoint"));
  }

  /// The adapter of one module. r and alpha come from the config (rank_pattern, alpha_pattern);
  /// the factors' shapes must be PEFT's factorization of the layer, and their forms (full or
  /// low rank) those PEFT builds for that r and decompose_both: anything else is a format_error,
  /// since PEFT itself could not load it.
  static lokr<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                              const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "lokr::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    if (m.contains("lokr_t2")) {
      peft::detail::raise<unsupported_error>(where, mod + " has lokr_t2, LoKr's effective-conv2d form of a convolution: "
                                                    "peft-cpp adapts linear layers only");
    }
    for (const auto& [name, t] : m.all()) {
      if (t.shape.size() != 2) {
        peft::detail::raise<unsupported_error>(where, mod + ": '" + name + "' is " + detail::shape_text(t.shape) +
                                                    ", a convolution's factor: peft-cpp adapts linear layers only");
      }
    }
    const index r = c.rank_for(m.module());
    const double alpha = alpha_for(c, m.module());
    const bool both = c.boolean("decompose_both", false, where);
    const auto factor = static_cast<index>(c.integer("decompose_factor", -1, where));
    lokr_factor<T> f1 = read_factor(m, "lokr_w1", r);
    lokr_factor<T> f2 = read_factor(m, "lokr_w2", r);
    const index out = f1.rows() * f2.rows(), in = f1.cols() * f2.cols();
    const auto [out_l, out_k] = lokr_factorization(out, factor);
    const auto [in_m, in_n] = lokr_factorization(in, factor);
    if (f1.rows() != out_l || f2.rows() != out_k || f1.cols() != in_m || f2.cols() != in_n) {
      peft::detail::raise<format_error>(
          where, mod + ": W1 " + peft::detail::shape_string(f1.rows(), f1.cols()) + " and W2 " +
                     peft::detail::shape_string(f2.rows(), f2.cols()) + " make a " + peft::detail::shape_string(out, in) +
                     " weight, which PEFT (decompose_factor " + std::to_string(factor) + ") factors as W1 " +
                     peft::detail::shape_string(out_l, in_m) + ", W2 " + peft::detail::shape_string(out_k, in_n));
    }
    check_forms(where, mod, f1.decomposed(), f2.decomposed(), r, both, out_l, out_k, in_m, in_n, format_tag{});
    return lokr<T>(std::move(f1), std::move(f2), r, alpha, both, factor);
  }

  /// Makes `c` describe this module: peft_type LOKR; alpha, decompose_both and decompose_factor
  /// when `c` has none yet; exact rank_pattern / alpha_pattern entries where r / alpha do not
  /// give this module's. unsupported_error when `c` already says something (decompose_both,
  /// decompose_factor) under which PEFT would build this module with other shapes or forms.
  static void describe_in(const lokr<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "lokr::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "LOKR") {
      c.raw.erase("decompose_both");
      c.raw.erase("decompose_factor");
      c.raw.erase("alpha");
    }
    if (c.fresh()) c.r = a.rank();  // the first module of a config built in C++ sets r
    c.peft_type = "LOKR";
    c.set_default("decompose_both", a.decompose_both());
    c.set_default("decompose_factor", static_cast<long long>(a.decompose_factor()));
    if (c.field("alpha") == nullptr) c.set_number("alpha", a.alpha());
    if (c.rank_for(module) != a.rank()) c.rank_pattern.insert(c.rank_pattern.begin(), {module, a.rank()});
    const double tol = 8.0 * std::numeric_limits<double>::epsilon() * std::max(1.0, std::abs(a.alpha()));
    if (std::abs(alpha_for(c, module) - a.alpha()) > tol) c.alpha_pattern.insert(c.alpha_pattern.begin(), {module, a.alpha()});
    const auto factor = static_cast<index>(c.integer("decompose_factor", -1, where));
    const auto [out_l, out_k] = lokr_factorization(a.out_features(), factor);
    const auto [in_m, in_n] = lokr_factorization(a.in_features(), factor);
    if (a.w1().rows() != out_l || a.w2().rows() != out_k || a.w1().cols() != in_m || a.w2().cols() != in_n) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' is factored as W1 " +
                                                  peft::detail::shape_string(a.w1().rows(), a.w1().cols()) + ", W2 " +
                                                  peft::detail::shape_string(a.w2().rows(), a.w2().cols()) +
                                                  ", but under the config's decompose_factor " + std::to_string(factor) +
                                                  " PEFT factors it as W1 " + peft::detail::shape_string(out_l, in_m) +
                                                  ", W2 " + peft::detail::shape_string(out_k, in_n));
    }
    check_forms(where, "module '" + module + "'", a.w1().decomposed(), a.w2().decomposed(), a.rank(),
                c.boolean("decompose_both", false, where), out_l, out_k, in_m, in_n, unsupported_tag{});
  }

 private:
  struct format_tag {};
  struct unsupported_tag {};

  template <class Tag>
  static void check_forms(const char* where, const std::string& mod, bool dec1, bool dec2, index r, bool both,
                          index out_l, index out_k, index in_m, index in_n, Tag) {
    using error_type = std::conditional_t<std::is_same_v<Tag, format_tag>, format_error, unsupported_error>;
    const bool full1 = lokr_w1_full(r, both, out_l, in_m), full2 = lokr_w2_full(r, out_k, in_n);
    if (full1 == dec1) {
      std::string what = mod + " has ";
      what += dec1 ? "lokr_w1_a/lokr_w1_b" : "lokr_w1";
      what += ", but for r = " + std::to_string(r) + (both ? " with" : " without") + " decompose_both PEFT builds ";
      what += full1 ? "a full lokr_w1" : "lokr_w1_a/lokr_w1_b";
      what += " (full unless decompose_both and 2 r < max(" + std::to_string(out_l) + ", " + std::to_string(in_m) + "))";
      peft::detail::raise<error_type>(where, what);
    }
    if (full2 == dec2) {
      std::string what = mod + " has ";
      what += dec2 ? "lokr_w2_a/lokr_w2_b" : "lokr_w2";
      what += ", but for r = " + std::to_string(r) + " PEFT builds ";
      what += full2 ? "a full lokr_w2" : "lokr_w2_a/lokr_w2_b";
      what += " (full unless 2 r < max(" + std::to_string(out_k) + ", " + std::to_string(in_n) + "))";
      peft::detail::raise<error_type>(where, what);
    }
  }

  /// `base` ("lokr_w1"): the full tensor, or `base`_a and `base`_b of rank r.
  static lokr_factor<T> read_factor(const checkpoint_tensors<T>& m, const std::string& base, index r) {
    constexpr const char* where = "lokr::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const bool full = m.contains(base), has_a = m.contains(base + "_a"), has_b = m.contains(base + "_b");
    if (full && (has_a || has_b)) {
      peft::detail::raise<format_error>(where, mod + " has both " + base + " and " + base + "_a/" + base + "_b");
    }
    if (full) {
      lokr_factor<T> f = lokr_factor<T>::whole(m.copy(base));
      if (f.full.empty()) peft::detail::raise<format_error>(where, mod + ": '" + base + "' is empty");
      return f;
    }
    if (!has_a || !has_b) {
      peft::detail::raise<format_error>(where, mod + " has neither " + base + " nor both " + base + "_a and " + base + "_b");
    }
    const auto& sa = m.shape(base + "_a", 2);
    const auto& sb = m.shape(base + "_b", 2);
    if (sa[1] != sb[0] || sa[0] < 1 || sb[1] < 1) {
      peft::detail::raise<format_error>(where, mod + ": " + base + "_a " + detail::shape_text(sa) + " and " + base + "_b " +
                                             detail::shape_text(sb) + " do not multiply");
    }
    if (sa[1] != r) {
      peft::detail::raise<format_error>(where, mod + " has rank " + std::to_string(sa[1]) + " (" + base +
                                             "_a) but adapter_config.json gives " + std::to_string(r));
    }
    return lokr_factor<T>::product(m.copy(base + "_a"), m.copy(base + "_b"));
  }
};

}  // namespace peft::io
