// peft/io/peft/road.hpp — RoAd in PEFT checkpoints: peft_type "ROAD"; tensors road_theta and
// road_alpha (no ".weight"), vectors of out / 2 (road_1), out (road_2) or 2 out (road_4) values;
// fields variant and group_size (init_weights only initialises). The checkpoint does not give
// in_features: the loader binds the base's shape when it knows it, else call bind / set_features.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/road.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<road<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "ROAD"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view config_fields[] = {"variant", "group_size"};
  static std::vector<std::string_view> module_tensors() { return {"road_theta", "road_alpha"}; }

  /// adapter_config.json's variant (absent or null: PEFT's default road_1); format_error for
  /// another value.
  static road_variant variant_of(const adapter_config& c) {
    constexpr const char* where = "road::from_checkpoint";
    const auto* v = c.field("variant");
    if (v == nullptr) return road_variant::road_1;
    if (v->is_string()) {
      for (const auto r : {road_variant::road_1, road_variant::road_2, road_variant::road_4}) {
        if (v->get<std::string>() == road_variant_name(r)) return r;
      }
    }
    peft::detail::raise<format_error>(where, "adapter_config.json: 'variant' = " + v->dump() +
                                                 ": RoAd takes \"road_1\", \"road_2\" or \"road_4\"");
  }

  /// The adapter of one module. format_error when the tensors' lengths do not fit the variant
  /// and group_size, or each other.
  static road<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "road::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const road_variant variant = variant_of(c);
    const auto g = static_cast<index>(c.integer("group_size", 64, where));
    const auto& st = m.shape("road_theta", 1);
    const auto& sa = m.shape("road_alpha", 1);
    if (st != sa) {
      peft::detail::raise<format_error>(where, mod + ": road_theta is " + detail::shape_text(st) + " but road_alpha is " +
                                                   detail::shape_text(sa));
    }
    const auto n = static_cast<index>(st[0]);
    const index out = variant == road_variant::road_1 ? 2 * n : variant == road_variant::road_2 ? n : n / 2;
    if (n < 1 || road<T>::parameter_count(variant, out) != n || g < 2 || g % 2 != 0 || out % g != 0) {
      peft::detail::raise<format_error>(where, mod + ": road_theta has " + std::to_string(n) + " values, which is not " +
                                                   std::string(road_variant_name(variant)) +
                                                   "'s count for out_features a multiple of group_size " + std::to_string(g));
    }
    index in = 0;
    if (const auto& shape = m.base_shape()) {
      if (shape->first != out) {
        peft::detail::raise<format_error>(where, mod + ": road_theta has " + std::to_string(n) + " values, " +
                                                     std::string(road_variant_name(variant)) + " for " + std::to_string(out) +
                                                     " outputs, but the base has " + std::to_string(shape->first));
      }
      in = shape->second;
    }
    return road<T>(variant, g, m.copy("road_theta").storage(), m.copy("road_alpha").storage(), out, in);
  }

  /// Makes `c` describe the adapter: peft_type ROAD, variant, group_size. unsupported_error when
  /// another module has a different variant or group_size (RoadConfig has one of each).
  static void describe_in(const road<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "road::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    const std::string variant(road_variant_name(a.variant()));
    if (c.peft_type != "ROAD") {
      c.peft_type = "ROAD";
      c.raw["variant"] = variant;
      c.raw["group_size"] = a.group_size();
    } else if (variant_of(c) != a.variant() || c.integer("group_size", 64, where) != a.group_size()) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' is " + variant + " with group_size " +
                                                        std::to_string(a.group_size()) +
                                                        ", unlike the config; PEFT's RoadConfig has one variant and "
                                                        "one group_size for every module");
    }
    c.set_default("variant", variant);
    c.set_default("group_size", a.group_size());
    c.set_default("init_weights", true);
  }
};

}  // namespace peft::io
