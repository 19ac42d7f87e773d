// peft/io/peft/oft.hpp — OFT in PEFT checkpoints: peft_type "OFT"; tensor oft_R.weight
// (#blocks or 1 with block_share, b (b - 1) / 2); fields r / oft_block_size (one of them 0, PEFT
// adjusting a value that does not divide in_features), coft, eps, block_share,
// use_cayley_neumann, num_cayley_neumann_terms. A config without oft_block_size is PEFT < 0.14's
// OFT, a different parameterisation, refused as PEFT refuses it.
#pragma once

#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/oft.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<oft<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "OFT"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  /// fan_in_fan_out: PEFT resets it to false for nn.Linear, the only linear layer OFT adapts.
  static constexpr std::string_view config_fields[] = {"r",
                                                       "oft_block_size",
                                                       "coft",
                                                       "eps",
                                                       "block_share",
                                                       "use_cayley_neumann",
                                                       "num_cayley_neumann_terms",
                                                       "fan_in_fan_out"};
  static std::vector<std::string_view> module_tensors() { return {"oft_R.weight"}; }

  /// The rotation's form from the config, PEFT's defaults for absent fields.
  static oft_form form_of(const adapter_config& c, const char* where) {
    oft_form f;
    f.block_share = c.boolean("block_share", false, where);
    f.coft = c.boolean("coft", false, where);
    f.eps = c.number("eps", 6e-5, where);
    f.use_cayley_neumann = c.boolean("use_cayley_neumann", true, where);
    const long long terms = c.integer("num_cayley_neumann_terms", 5, where);
    if (terms < 0 || terms > 1000) {
      peft::detail::raise<format_error>(where, "adapter_config.json: 'num_cayley_neumann_terms' = " + std::to_string(terms) +
                                                   " is not a term count (0 to 1000)");
    }
    f.num_cayley_neumann_terms = static_cast<int>(terms);
    if (f.coft && !(f.eps > 0.0)) {
      peft::detail::raise<format_error>(where, "adapter_config.json: coft needs 'eps' > 0, got " + std::to_string(f.eps));
    }
    return f;
  }

  /// The adapter of one module. The block size comes from the tensor (b (b - 1) / 2 columns);
  /// it and the block count must be what PEFT derives from r / oft_block_size for the layer
  /// (when its in_features is known: from the tensor, or the base's shape for block_share).
  static oft<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "oft::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    if (c.field("oft_block_size") == nullptr) {
      peft::detail::raise<format_error>(where, "adapter_config.json has no 'oft_block_size': an OFT adapter of PEFT < 0.14, "
                                               "whose parameterisation PEFT itself no longer loads; retrain or convert it");
    }
    const oft_form form = form_of(c, where);
    const long long r_cfg = c.integer("r", 0, where), b_cfg = c.integer("oft_block_size", 32, where);
    const auto& s = m.shape("oft_R.weight", 2);
    const index rows = static_cast<index>(s[0]), n = static_cast<index>(s[1]);
    const auto b = static_cast<index>(std::llround((1.0 + std::sqrt(1.0 + 8.0 * static_cast<double>(n))) / 2.0));
    if (rows < 1 || b * (b - 1) / 2 != n) {
      peft::detail::raise<format_error>(where, mod + ": oft_R.weight is " + detail::shape_text(s) +
                                             ", expected (#blocks, b (b - 1) / 2) for a block size b");
    }
    if (form.block_share && rows != 1) {
      peft::detail::raise<format_error>(where, mod + ": block_share stores one block, oft_R.weight is " + detail::shape_text(s));
    }
    index in = form.block_share ? 0 : rows * b, out = 0;
    if (const auto& bs = m.base_shape()) {
      out = bs->first;
      if ((!form.block_share && bs->second != in) || bs->second % b != 0) {
        peft::detail::raise<format_error>(where, mod + ": oft_R.weight " + detail::shape_text(s) + " rotates " +
                                               (form.block_share ? std::string("a multiple of ") : std::to_string(rows * b)) + " inputs in blocks of " + std::to_string(b) +
                                               ", the base layer has " + std::to_string(bs->second));
      }
      in = bs->second;
    }
    if (in != 0) {
      const index b_peft = oft_blocks(in, static_cast<index>(r_cfg), static_cast<index>(b_cfg), where).second;
      if (b_peft != b) {
        peft::detail::raise<format_error>(where, mod + ": blocks of " + std::to_string(b) + " (oft_R.weight " + detail::shape_text(s) +
                                               "), but r = " + std::to_string(r_cfg) + " and oft_block_size = " +
                                               std::to_string(b_cfg) + " give PEFT blocks of " + std::to_string(b_peft) +
                                               " for " + std::to_string(in) + " input features");
      }
    }
    return oft<T>(m.copy("oft_R.weight"), b, form, in, out);
  }

  /// Makes `c` describe this module: peft_type OFT, r = 0 and oft_block_size = the module's
  /// block size and the form's fields when `c` is not yet an OFT config. unsupported_error when
  /// `c` already gives another form, or a block size PEFT would not derive for this module.
  static void describe_in(const oft<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "oft::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    const auto& f = a.form();
    if (c.peft_type != "OFT" || c.fresh()) {
      for (const char* k : {"oft_block_size", "coft", "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms",
                            "module_dropout", "init_weights", "bias"}) {
        c.raw.erase(k);
      }
      c.peft_type = "OFT";
      c.r = 0;
      c.raw["oft_block_size"] = a.block_size();
      c.raw["coft"] = f.coft;
      c.raw["eps"] = f.eps;
      c.raw["block_share"] = f.block_share;
      c.raw["use_cayley_neumann"] = f.use_cayley_neumann;
      c.raw["num_cayley_neumann_terms"] = f.num_cayley_neumann_terms;
      c.set_default("module_dropout", 0.0);
      c.set_default("init_weights", true);
      c.set_default("bias", "none");
    }
    const oft_form g = form_of(c, where);
    if (g.block_share != f.block_share || g.coft != f.coft || (f.coft && g.eps != f.eps) ||
        g.use_cayley_neumann != f.use_cayley_neumann ||
        (f.use_cayley_neumann && g.num_cayley_neumann_terms != f.num_cayley_neumann_terms)) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' builds its rotation with other block_share, coft, "
                                                  "eps, use_cayley_neumann or num_cayley_neumann_terms than the config's "
                                                  "(one OFT config has one form)");
    }
    const index in = a.in_features() != 0 ? a.in_features() : (f.block_share ? 0 : a.stored_blocks() * a.block_size());
    if (in == 0) return;  // a block-shared adapter of unknown width: any multiple of b
    const auto r_cfg = static_cast<index>(c.integer("r", 0, where));
    const auto b_cfg = static_cast<index>(c.integer("oft_block_size", 0, where));
    const index b_peft = oft_blocks(in, r_cfg, b_cfg, where).second;
    if (b_peft != a.block_size()) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' has blocks of " + std::to_string(a.block_size()) +
                                                  ", but the config's r = " + std::to_string(r_cfg) + ", oft_block_size = " +
                                                  std::to_string(b_cfg) + " give PEFT blocks of " + std::to_string(b_peft) +
                                                  " for its " + std::to_string(in) + " input features");
    }
  }
};

}  // namespace peft::io
