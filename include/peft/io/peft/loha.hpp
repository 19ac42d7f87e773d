// peft/io/peft/loha.hpp — LoHa in PEFT checkpoints: peft_type "LOHA"; tensors hada_w1_a,
// hada_w1_b, hada_w2_a, hada_w2_b (no ".weight"); fields r, alpha, rank_pattern, alpha_pattern.
// hada_t1 / hada_t2 (the effective-conv2d form of a convolution) are refused.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/loha.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<loha<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "LOHA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view config_fields[] = {"r", "alpha", "rank_pattern", "alpha_pattern"};
  static std::vector<std::string_view> module_tensors() {
    return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"};
  }

  /// LoHa's alpha for a module: alpha_pattern first, then "alpha" (PEFT's default 8).
  static double alpha_for(const adapter_config& c, const std::string& module) {
    return c.pattern_alpha(module, c.number("alpha", 8.0, "loha::from_checkpoint"));
  }

  /// The adapter of one module: rank from the tensors, checked against r / rank_pattern;
  /// s = alpha / r with alpha from alpha / alpha_pattern.
  static loha<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                              const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "loha::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    if (m.contains("hada_t1") || m.contains("hada_t2")) {
      peft::detail::raise<unsupported_error>(where, mod + " has hada_t1/hada_t2, LoHa's effective-conv2d form of a "
                                                    "convolution: peft-cpp adapts linear layers only");
    }
    for (const auto& [name, t] : m.all()) {
      if (t.shape.size() != 2) {
        peft::detail::raise<unsupported_error>(where, mod + ": '" + name + "' is " + detail::shape_text(t.shape) +
                                                    ", not a matrix: peft-cpp adapts linear layers only");
      }
    }
    const auto& s1a = m.shape("hada_w1_a", 2);
    const auto& s1b = m.shape("hada_w1_b", 2);
    const auto& s2a = m.shape("hada_w2_a", 2);
    const auto& s2b = m.shape("hada_w2_b", 2);
    const bool ok = s1a[1] >= 1 && s1a[0] >= 1 && s1b[1] >= 1 && s1b[0] == s1a[1] && s2a == s1a && s2b == s1b;
    if (!ok) {
      peft::detail::raise<format_error>(where, mod + ": hada_w1_a " + detail::shape_text(s1a) + ", hada_w1_b " +
                                             detail::shape_text(s1b) + ", hada_w2_a " + detail::shape_text(s2a) +
                                             ", hada_w2_b " + detail::shape_text(s2b) +
                                             " are not (out, r), (r, in), (out, r), (r, in)");
    }
    const auto rank = static_cast<index>(s1a[1]);
    if (rank != c.rank_for(m.module())) {
      peft::detail::raise<format_error>(where, mod + " has rank " + std::to_string(rank) + " but adapter_config.json gives " +
                                             std::to_string(c.rank_for(m.module())));
    }
    return loha<T>(m.copy("hada_w1_a"), m.copy("hada_w1_b"), m.copy("hada_w2_a"), m.copy("hada_w2_b"),
                alpha_for(c, m.module()));
  }

  /// Makes `c` describe this module: peft_type LOHA; "alpha" when `c` has none; exact
  /// rank_pattern / alpha_pattern entries where r / alpha do not give this module's.
  static void describe_in(const loha<T>& a, adapter_config& c, const std::string& module) {
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "LOHA") c.raw.erase("alpha");
    if (c.fresh()) c.r = a.rank();  // the first module of a config built in C++ sets r
    c.peft_type = "LOHA";
    if (c.field("alpha") == nullptr) c.set_number("alpha", a.alpha());
    if (c.rank_for(module) != a.rank()) c.rank_pattern.insert(c.rank_pattern.begin(), {module, a.rank()});
    const double tol = 8.0 * std::numeric_limits<double>::epsilon() * std::max(1.0, std::abs(a.alpha()));
    if (std::abs(alpha_for(c, module) - a.alpha()) > tol) c.alpha_pattern.insert(c.alpha_pattern.begin(), {module, a.alpha()});
  }
};

}  // namespace peft::io
