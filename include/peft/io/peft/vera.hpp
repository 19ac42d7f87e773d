// peft/io/peft/vera.hpp — VeRA in PEFT checkpoints: peft_type "VERA"; per module vera_lambda_b,
// vera_lambda_d; shared base_model.vera_A, base_model.vera_B (written once); fields r,
// save_projection, d_initial, projection_prng_key. Checkpoints saved with save_projection=false
// are refused: their projections must be regenerated with PyTorch's generator.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/vera.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<vera<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "VERA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view config_fields[] = {"r", "projection_prng_key", "save_projection", "fan_in_fan_out"};
  static std::vector<std::string_view> module_tensors() { return {"vera_lambda_b", "vera_lambda_d"}; }
  static std::vector<std::string_view> shared_tensors() { return {"vera_A", "vera_B"}; }

  /// The adapter of one module: vera_A / vera_B referenced from `shared` (the same objects for
  /// every module), the lambdas copied. in_features is set to vera_A's width: the loader calls
  /// set_features with the base layer's shape when it knows it. unsupported_error for
  /// save_projection=false; format_error for shapes that disagree.
  static vera<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& shared) {
    constexpr const char* where = "vera::from_checkpoint";
    if (!c.boolean("save_projection", true, where)) {
      peft::detail::raise<unsupported_error>(
          where, "the adapter was saved with save_projection=false: vera_A and vera_B are not in the checkpoint, "
                 "and PEFT regenerates them from projection_prng_key with PyTorch's random generator, which "
                 "peft-cpp does not reproduce; load the adapter in PEFT and save it again with save_projection=True");
    }
    if (!shared.contains("vera_A") || !shared.contains("vera_B")) {
      peft::detail::raise<format_error>(where, "the checkpoint has no base_model.vera_A / base_model.vera_B although "
                                               "save_projection is true");
    }
    const auto& sa = shared.shape("vera_A", 2);
    const auto& sb = shared.shape("vera_B", 2);
    if (sb[1] != sa[0] || sa[0] < 1) {
      peft::detail::raise<format_error>(where, "vera_A " + detail::shape_text(sa) + " and vera_B " +
                                                   detail::shape_text(sb) + " disagree on the rank");
    }
    if (c.raw.contains("r") && c.r != static_cast<index>(sa[0])) {
      peft::detail::raise<format_error>(where, "vera_A has rank " + std::to_string(sa[0]) +
                                                   " but adapter_config.json gives r = " + std::to_string(c.r));
    }
    const auto& sd = m.shape("vera_lambda_d", 1);
    const auto& sl = m.shape("vera_lambda_b", 1);
    if (sd[0] != sa[0]) {
      peft::detail::raise<format_error>(where, "module '" + m.module() + "': vera_lambda_d has " +
                                                   std::to_string(sd[0]) + " values, expected the rank " +
                                                   std::to_string(sa[0]));
    }
    if (sl[0] < 1 || sl[0] > sb[0]) {
      peft::detail::raise<format_error>(where, "module '" + m.module() + "': vera_lambda_b has " +
                                                   std::to_string(sl[0]) + " values, but vera_B has " +
                                                   std::to_string(sb[0]) + " rows");
    }
    const double d0 = c.number("d_initial", 0.1, where);
    return vera<T>(shared.shared("vera_A"), shared.shared("vera_B"), static_cast<index>(sa[1]),
                   static_cast<index>(sl[0]), m.copy("vera_lambda_d").storage(), m.copy("vera_lambda_b").storage(), d0);
  }

  /// Makes `c` describe the adapter: peft_type VERA, r, save_projection true (the projections
  /// are always written), d_initial (kept when the config has one).
  static void describe_in(const vera<T>& a, adapter_config& c, const std::string& /*module*/) {
    c.peft_type = "VERA";
    c.r = a.rank();
    c.raw["save_projection"] = true;
    c.set_default("d_initial", a.d_initial());
    if (!c.raw.contains("projection_prng_key")) c.raw["projection_prng_key"] = 0;
    if (!c.raw.contains("vera_dropout")) c.raw["vera_dropout"] = 0.0;
  }
};

}  // namespace peft::io
