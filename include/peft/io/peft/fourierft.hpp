// peft/io/peft/fourierft.hpp — FourierFT in PEFT checkpoints: peft_type "FOURIERFT"; one tensor,
// fourierft_spectrum (n); fields n_frequency, n_frequency_pattern, scaling, random_loc_seed,
// fan_in_fan_out. PEFT does not store the spectral locations: the adapter draws them from
// random_loc_seed once it knows the layer's shape (from the loader, or set_features).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/fourierft.hpp"
#include "peft/io/detail/integer_pattern.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<fourierft<T>> : codec_defaults {
  /// PEFT's "FOURIERFT".
  static bool handles(const adapter_config& c) { return c.peft_type == "FOURIERFT"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  /// fan_in_fan_out only says how the base stores W0 (the base's business); the spectrum is
  /// relative to the (out, in) weight either way, as in PEFT.
  static constexpr std::string_view config_fields[] = {"n_frequency", "n_frequency_pattern", "scaling",
                                                       "random_loc_seed", "fan_in_fan_out"};
  static std::vector<std::string_view> module_tensors() { return {"fourierft_spectrum"}; }

  /// PEFT's n_frequency for a module: the first n_frequency_pattern key k (file order) for which
  /// Python's re.match(".*\.k$", module) succeeds, else n_frequency (default 1000). As in PEFT, a
  /// key can only match after a dot, so a top-level module keeps n_frequency.
  static index n_frequency_for(const adapter_config& c, const std::string& module) {
    return static_cast<index>(detail::integer_pattern_for(c, "n_frequency", 1000, "n_frequency_pattern", module,
                                                          "fourierft::from_checkpoint"));
  }

  /// The adapter of one module: the spectrum copied, scaling and random_loc_seed from the config;
  /// the locations drawn now when the loader knows the base's shape, else at set_features.
  /// format_error when the spectrum's length is not the module's n_frequency, or for a null
  /// random_loc_seed (PEFT cannot build the layer either).
  static fourierft<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                      const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "fourierft::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const auto& shape = m.shape("fourierft_spectrum", 1);
    const index n = n_frequency_for(c, m.module());
    if (shape[0] != n || n < 1) {
      peft::detail::raise<format_error>(where, mod + ": fourierft_spectrum has " + std::to_string(shape[0]) +
                                                   " values, but adapter_config.json gives n_frequency = " +
                                                   std::to_string(n) + " for it");
    }
    if (const auto it = c.raw.find("random_loc_seed"); it != c.raw.end() && it->is_null()) {
      peft::detail::raise<format_error>(where, "adapter_config.json: 'random_loc_seed' is null: the spectral "
                                               "locations cannot be drawn (PEFT cannot build the layer either)");
    }
    const long long seed = c.integer("random_loc_seed", 777, where);
    const double scaling = c.number("scaling", 150.0, where);
    index in = 0, out = 0;
    if (const auto& base = m.base_shape()) {
      out = base->first;
      in = base->second;
    }
    try {
      return fourierft<T>(m.copy("fourierft_spectrum").storage(), scaling, seed, in, out);
    } catch (const shape_error& e) {
      peft::detail::raise<format_error>(where, mod + ": " + e.what());
    }
  }

  /// Makes `c` describe this module when saving: peft_type FOURIERFT, n_frequency, scaling and
  /// random_loc_seed (from the first module written), PEFT's defaults for its other fields.
  /// unsupported_error where one FourierFTConfig cannot describe the adapter: a scaling or seed
  /// differing between modules, or an n_frequency neither the config's nor given by an existing
  /// n_frequency_pattern key (PEFT's pattern cannot name a top-level module exactly, so none is
  /// made up).
  static void describe_in(const fourierft<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "fourierft::describe_in";
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "FOURIERFT") {
      c.peft_type = "FOURIERFT";
      c.raw.erase("r");
      c.set_number("n_frequency", static_cast<double>(a.n_frequency()));
      c.raw["scaling"] = a.scaling();
      c.raw["random_loc_seed"] = a.random_loc_seed();
    }
    c.set_default("n_frequency_pattern", ordered_json::object());
    c.set_default("fan_in_fan_out", false);
    c.set_default("init_weights", false);
    c.set_default("bias", "none");
    const auto refuse = [&](const std::string& what) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' " + what +
                                                        "; PEFT's FourierFTConfig has one for every module");
    };
    if (c.number("scaling", 150.0, where) != a.scaling()) {
      refuse("has scaling " + std::to_string(a.scaling()) + " but the config says " +
             std::to_string(c.number("scaling", 150.0, where)));
    }
    if (c.integer("random_loc_seed", 777, where) != a.random_loc_seed()) {
      refuse("has random_loc_seed " + std::to_string(a.random_loc_seed()) + " but the config says " +
             std::to_string(c.integer("random_loc_seed", 777, where)));
    }
    const index n = n_frequency_for(c, module);
    if (n != a.n_frequency()) {
      peft::detail::raise<unsupported_error>(
          where, "module '" + module + "' has n_frequency " + std::to_string(a.n_frequency()) +
                     " but the config gives it " + std::to_string(n) +
                     "; add an n_frequency_pattern key for it to the config first (PEFT matches a key after a dot: "
                     "\".*\\.key$\")");
    }
  }
};

}  // namespace peft::io
