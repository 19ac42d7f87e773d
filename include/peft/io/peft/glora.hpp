// peft/io/peft/glora.hpp — GLoRA in PEFT checkpoints: peft_type "GLORA"; per module and per
// support tensor S in A..E: glora_S.Xd, glora_S.Xu (lora), glora_S.X (vector, constant) or
// glora_S.zeros (none: PEFT saves its zero buffer). Fields r (default 8), config_A_B ("lora"),
// config_C ("lora"), config_D_E ("constant"); init_weights is initialisation only. PEFT builds
// C, D and E as zero buffers on a base without a bias whatever the config says: such a module
// loads as "none" there. A "zeros" buffer that is not zero is refused (PEFT would add it).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/glora.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<glora<T>> : codec_defaults {
  using adapter = glora<T>;
  using slot = typename adapter::slot;
  using path = typename adapter::path;

  static bool handles(const adapter_config& c) { return c.peft_type == "GLORA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view config_fields[] = {"r", "config_A_B", "config_C", "config_D_E"};
  static std::vector<std::string_view> module_tensors() {
    return {"glora_A.Xd", "glora_A.Xu", "glora_A.X", "glora_A.zeros", "glora_B.Xd", "glora_B.Xu", "glora_B.X",
            "glora_B.zeros", "glora_C.Xd", "glora_C.Xu", "glora_C.X", "glora_C.zeros", "glora_D.X", "glora_D.zeros",
            "glora_E.X", "glora_E.zeros"};
  }

  /// A path field (config_A_B, config_C, config_D_E) with PEFT's default and allowed values.
  static glora_path path_field(const adapter_config& c, std::string_view name, glora_path fallback,
                               std::initializer_list<glora_path> allowed) {
    constexpr const char* where = "glora::from_checkpoint";
    const auto* v = c.field(name);
    if (v == nullptr) return fallback;
    if (!v->is_string()) {
      peft::detail::raise<format_error>(where, "adapter_config.json: '" + std::string(name) + "' must be a string");
    }
    const std::string s = v->get<std::string>();
    for (glora_path k : allowed) {
      if (s == glora_path_name(k)) return k;
    }
    std::string list;
    for (glora_path k : allowed) list += (list.empty() ? "" : ", ") + std::string(glora_path_name(k));
    peft::detail::raise<format_error>(where, "adapter_config.json: '" + std::string(name) + "' = \"" + s +
                                                 "\" is not one of " + list);
  }
  struct kinds {
    glora_path a_b, c, d_e;
  };
  static kinds kinds_of(const adapter_config& c) {
    using enum glora_path;
    return {path_field(c, "config_A_B", lora, {lora, vector, constant, none}),
            path_field(c, "config_C", lora, {lora, vector, none}), path_field(c, "config_D_E", constant, {vector, constant, none})};
  }
  static index r_of(const adapter_config& c) {
    return static_cast<index>(c.integer("r", 8, "glora::from_checkpoint"));
  }

  /// The adapter of one module: each path's kind from its tensors, checked against the config.
  static adapter from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "glora::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const kinds k = kinds_of(c);
    const index r = r_of(c);
    const glora_path expected[5] = {k.a_b, k.a_b, k.c, k.d_e, k.d_e};
    path p[5];
    for (int s = 0; s < 5; ++s) {
      const std::string n(adapter::slot_name(static_cast<slot>(s)));
      const std::string cfg = s < 2 ? "config_A_B" : (s == 2 ? "config_C" : "config_D_E");
      const bool has_lora = m.contains(n + ".Xd") || m.contains(n + ".Xu");
      const bool has_x = m.contains(n + ".X"), has_zeros = m.contains(n + ".zeros");
      const int present = (has_lora ? 1 : 0) + (has_x ? 1 : 0) + (has_zeros ? 1 : 0);
      if (present > 1) {
        peft::detail::raise<format_error>(where, mod + ": " + n + " has tensors of more than one parameterisation");
      }
      glora_path kind = expected[s];
      if (has_zeros || present == 0) {
        // none; on a base without a bias PEFT writes zeros for C, D, E whatever the config says.
        if (expected[s] != glora_path::none && s < 2) {
          peft::detail::raise<format_error>(where, mod + ": " + n + " is " + (has_zeros ? "a zero buffer" : "missing") +
                                                       " but " + cfg + " is '" + std::string(glora_path_name(expected[s])) + "'");
        }
        kind = glora_path::none;
      } else if (expected[s] == glora_path::none || (has_lora != (expected[s] == glora_path::lora))) {
        peft::detail::raise<format_error>(where, mod + ": " + n + " has " + (has_lora ? "Xd/Xu" : "X") + " but " + cfg +
                                                     " is '" + std::string(glora_path_name(expected[s])) + "'");
      }
      p[s].kind = kind;
      switch (kind) {
        case glora_path::lora: {
          const auto& sd = m.shape(n + ".Xd", 2);
          const auto& su = m.shape(n + ".Xu", 2);
          if (sd[1] != r || su[0] != r) {
            peft::detail::raise<format_error>(where, mod + ": " + n + ".Xd " + detail::shape_text(sd) + " and " + n +
                                                         ".Xu " + detail::shape_text(su) + " do not have rank r = " +
                                                         std::to_string(r));
          }
          p[s].xd = m.copy(n + ".Xd");
          p[s].xu = m.copy(n + ".Xu");
          break;
        }
        case glora_path::vector: {
          const auto& sx = m.get(n + ".X").shape;
          if (sx.size() != (s < 3 ? 2u : 1u) || (s < 3 && sx[1] != 1)) {
            peft::detail::raise<format_error>(where, mod + ": " + n + ".X is " + detail::shape_text(sx) + ", expected " +
                                                         (s < 3 ? "(n, 1)" : "(n)") + " for a vector");
          }
          p[s].x = m.copy(n + ".X");
          break;
        }
        case glora_path::constant: {
          const auto& sx = m.get(n + ".X").shape;
          if (sx.size() != 1 || sx[0] != 1) {
            peft::detail::raise<format_error>(where, mod + ": " + n + ".X is " + detail::shape_text(sx) +
                                                         ", expected (1) for a constant");
          }
          p[s].x = m.copy(n + ".X");
          break;
        }
        case glora_path::none:
          if (has_zeros) {
            p[s].zeros = m.copy(n + ".zeros");
            for (T v : p[s].zeros.storage()) {
              if (v != T{0}) {
                peft::detail::raise<unsupported_error>(where, mod + ": " + n + ".zeros holds non-zero values; PEFT's "
                                                                   "'none' path is a zero buffer");
              }
            }
          }
          break;
      }
    }
    index in = 0, out = 0;
    if (const auto& shape = m.base_shape()) {
      out = shape->first;
      in = shape->second;
    }
    try {
      return adapter(in, out, std::move(p[0]), std::move(p[1]), std::move(p[2]), std::move(p[3]), std::move(p[4]));
    } catch (const shape_error& e) {
      peft::detail::raise<format_error>(where, mod + ": " + e.what());
    }
  }

  /// Makes `c` describe this module: peft_type GLORA, r, the three path fields (a "none" C, D, E
  /// is accepted under any config_C / config_D_E, as PEFT writes for a base without a bias),
  /// init_weights. unsupported_error for a module that the config cannot describe.
  static void describe_in(const adapter& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "glora::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    const glora_path ab = a.kind(slot::a), cc = a.kind(slot::c), de = a.kind(slot::d);
    if (c.peft_type != "GLORA") {
      c.peft_type = "GLORA";
      c.r = a.rank() > 0 ? a.rank() : 8;
      c.rank_pattern.clear();
      c.alpha_pattern.clear();
      c.raw["r"] = c.r;
      c.raw["config_A_B"] = std::string(glora_path_name(ab));
      c.raw["config_C"] = std::string(glora_path_name(cc));
      c.raw["config_D_E"] = std::string(glora_path_name(de));
    }
    const kinds k = kinds_of(c);
    const index r = r_of(c);
    c.r = r;
    c.raw["r"] = r;
    auto refuse = [&](const std::string& what) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' " + what);
    };
    if (a.kind(slot::b) != ab) refuse("has A and B of different parameterisations (PEFT's config_A_B sets both)");
    if (a.kind(slot::e) != de) refuse("has D and E of different parameterisations (PEFT's config_D_E sets both)");
    if (ab != k.a_b) refuse("has A, B '" + std::string(glora_path_name(ab)) + "' but config_A_B is '" + std::string(glora_path_name(k.a_b)) + "'");
    if (cc != k.c && cc != glora_path::none) refuse("has C '" + std::string(glora_path_name(cc)) + "' but config_C is '" + std::string(glora_path_name(k.c)) + "'");
    if (de != k.d_e && de != glora_path::none) refuse("has D, E '" + std::string(glora_path_name(de)) + "' but config_D_E is '" + std::string(glora_path_name(k.d_e)) + "'");
    if (a.rank() != 0 && a.rank() != r) {
      refuse("has rank " + std::to_string(a.rank()) + " but the config says r = " + std::to_string(r) +
             "; PEFT builds every GLoRA module with rank r");
    }
    c.set_default("init_weights", true);
  }
};

}  // namespace peft::io
