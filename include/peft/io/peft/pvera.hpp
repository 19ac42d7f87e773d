// peft/io/peft/pvera.hpp — PVeRA in PEFT checkpoints: peft_type "PVERA"; per module
// pvera_lambda_b (out), pvera_lambda_d (2r); shared base_model.pvera_A (2r, in_max),
// base_model.pvera_B (out_max, r), written once; fields r, save_projection, d_initial,
// projection_prng_key, pvera_dropout and generator_seed (training only), sample_at_inference
// (false only). save_projection=false is refused: the checkpoint then lacks the projections and
// the layer shapes make_pvera_projections needs to regenerate them.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/pvera.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<pvera<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "PVERA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  /// pvera_dropout and generator_seed only act while PEFT samples (training); sample_at_inference
  /// is read and refused when true.
  static constexpr std::string_view config_fields[] = {"r",          "projection_prng_key", "save_projection",
                                                       "fan_in_fan_out", "pvera_dropout", "generator_seed",
                                                       "sample_at_inference"};
  static std::vector<std::string_view> module_tensors() { return {"pvera_lambda_b", "pvera_lambda_d"}; }
  static std::vector<std::string_view> shared_tensors() { return {"pvera_A", "pvera_B"}; }

  /// The adapter of one module: pvera_A / pvera_B referenced from `shared` (the same objects for
  /// every module), the lambdas copied. in_features is set to pvera_A's width: the loader calls
  /// set_features with the base layer's shape when it knows it. unsupported_error for
  /// save_projection=false and sample_at_inference=true; format_error for shapes that disagree.
  static pvera<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                  const checkpoint_tensors<T>& shared) {
    constexpr const char* where = "pvera::from_checkpoint";
    if (c.boolean("sample_at_inference", false, where)) {
      peft::detail::raise<unsupported_error>(
          where, "adapter_config.json: 'sample_at_inference' = true: PEFT then samples the adapter's output "
                 "(mu + eps exp(logvar / 2)) at every call; peft-cpp computes the learned mean only, which is "
                 "PEFT's output with sample_at_inference=false");
    }
    if (!c.boolean("save_projection", true, where)) {
      peft::detail::raise<unsupported_error>(
          where, "the adapter was saved with save_projection=false: pvera_A and pvera_B are not in the checkpoint, "
                 "and PEFT regenerates them from projection_prng_key with PyTorch's random generator over the "
                 "largest adapted layer, whose shape the checkpoint does not record (make_pvera_projections "
                 "reproduces them given the layers); load the adapter in PEFT and save it again with "
                 "save_projection=True");
    }
    if (!shared.contains("pvera_A") || !shared.contains("pvera_B")) {
      peft::detail::raise<format_error>(where, "the checkpoint has no base_model.pvera_A / base_model.pvera_B "
                                               "although save_projection is true");
    }
    const auto& sa = shared.shape("pvera_A", 2);
    const auto& sb = shared.shape("pvera_B", 2);
    if (sb[1] < 1 || sa[0] != 2 * sb[1]) {
      peft::detail::raise<format_error>(where, "pvera_A " + detail::shape_text(sa) + " and pvera_B " +
                                                   detail::shape_text(sb) +
                                                   " disagree: pvera_A needs 2 r rows for pvera_B's rank r");
    }
    if (c.raw.contains("r") && c.r != static_cast<index>(sb[1])) {
      peft::detail::raise<format_error>(where, "pvera_B has rank " + std::to_string(sb[1]) +
                                                   " but adapter_config.json gives r = " + std::to_string(c.r));
    }
    const auto& sd = m.shape("pvera_lambda_d", 1);
    const auto& sl = m.shape("pvera_lambda_b", 1);
    if (sd[0] != sa[0]) {
      peft::detail::raise<format_error>(where, "module '" + m.module() + "': pvera_lambda_d has " +
                                                   std::to_string(sd[0]) + " values, expected 2 r = " +
                                                   std::to_string(sa[0]));
    }
    if (sl[0] < 1 || sl[0] > sb[0]) {
      peft::detail::raise<format_error>(where, "module '" + m.module() + "': pvera_lambda_b has " +
                                                   std::to_string(sl[0]) + " values, but pvera_B has " +
                                                   std::to_string(sb[0]) + " rows");
    }
    const double d0 = c.number("d_initial", 0.1, where);
    return pvera<T>(shared.shared("pvera_A"), shared.shared("pvera_B"), static_cast<index>(sa[1]),
                    static_cast<index>(sl[0]), m.copy("pvera_lambda_d").storage(), m.copy("pvera_lambda_b").storage(),
                    d0);
  }

  /// Makes `c` describe the adapter: peft_type PVERA, r, save_projection true (the projections
  /// are always written), sample_at_inference false (what was computed), d_initial (kept when the
  /// config has one), projection_prng_key and pvera_dropout defaults when absent.
  static void describe_in(const pvera<T>& a, adapter_config& c, const std::string& /*module*/) {
    c.peft_type = "PVERA";
    c.r = a.rank();
    c.raw["save_projection"] = true;
    c.raw["sample_at_inference"] = false;
    c.set_default("d_initial", a.d_initial());
    if (!c.raw.contains("projection_prng_key")) c.raw["projection_prng_key"] = 0;
    if (!c.raw.contains("pvera_dropout")) c.raw["pvera_dropout"] = 0.0;
  }
};

}  // namespace peft::io
