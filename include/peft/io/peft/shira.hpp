// peft/io/peft/shira.hpp — SHiRA in PEFT checkpoints: peft_type "SHIRA"; tensors shira_weight (K)
// and shira_indices (2, K) int32 (float32 accepted when integral); fields r, mask_type,
// random_seed, init_weights. The layer's shape comes from the base when the loader knows it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/shira.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<shira<T>> : codec_defaults {
  /// PEFT's "SHIRA".
  static bool handles(const adapter_config& c) { return c.peft_type == "SHIRA"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  static constexpr std::string_view config_fields[] = {"r", "mask_type", "random_seed", "fan_in_fan_out"};
  static std::vector<std::string_view> module_tensors() { return {"shira_weight", "shira_indices"}; }
  /// shira_indices is stored as an integer tensor (I32; I64 and floats are accepted too).
  static bool integer_tensor(std::string_view name) { return name == "shira_indices"; }

  /// The adapter of one module. The checkpoint does not store the layer's shape: it comes from
  /// the base when the loader knows it (merge_model passes it), else it is recovered from
  /// K = r (d_out + d_in) (r from adapter_config.json) and the largest indices, which must reach
  /// the last row and column; otherwise d_out and d_in cannot be told apart and this is a
  /// format_error (pass the base shapes to load_peft_checkpoint).
  static shira<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                               const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "shira::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const auto& sw = m.shape("shira_weight", 1);
    const auto& si = m.shape("shira_indices", 2);
    if (si[0] != 2 || si[1] != sw[0] || sw[0] < 1) {
      peft::detail::raise<format_error>(where, mod + ": shira_indices is " + detail::shape_text(si) +
                                             ", expected [2, K] for the K = " + std::to_string(sw[0]) +
                                             " entries of shira_weight (K >= 1)");
    }
    matrix<std::int32_t> idx = shira<T>::indices_from(m.get("shira_indices").data->view(), where, mod);
    const index k = idx.cols();
    const index r = c.rank_for(m.module());
    if (k % r != 0) {
      peft::detail::raise<format_error>(where, mod + " has K = " + std::to_string(k) + " entries, not a multiple of r = " +
                                             std::to_string(r) + " (PEFT sizes SHiRA as r (d_out + d_in))");
    }
    const index dims = k / r;
    index need_out = 0, need_in = 0;
    for (index t = 0; t < k; ++t) {
      need_out = std::max<index>(need_out, idx(0, t) + 1);
      need_in = std::max<index>(need_in, idx(1, t) + 1);
    }
    if (const auto& shape = m.base_shape()) {  // the caller knows the layer: no guessing
      const auto [out, in] = *shape;
      if (need_out > out || need_in > in) {
        peft::detail::raise<format_error>(where, mod + ": the indices reach row " + std::to_string(need_out - 1) +
                                               " and column " + std::to_string(need_in - 1) + ", outside the base's " +
                                               peft::detail::shape_string(out, in));
      }
      shira<T>::check_entries(where, mod, in, out, idx);
      std::vector<T> values = m.copy("shira_weight").storage();
      return shira<T>(in, out, std::move(idx), std::move(values));
    }
    if (need_out + need_in > dims) {
      peft::detail::raise<format_error>(where, mod + ": the indices reach row " + std::to_string(need_out - 1) + " and column " +
                                             std::to_string(need_in - 1) + ", but K = r (d_out + d_in) gives d_out + d_in = " +
                                             std::to_string(dims) + " (K = " + std::to_string(k) + ", r = " +
                                             std::to_string(r) + ")");
    }
    if (need_out + need_in < dims) {
      peft::detail::raise<format_error>(where, mod + ": cannot tell d_out from d_in: the indices need d_out >= " +
                                             std::to_string(need_out) + " and d_in >= " + std::to_string(need_in) +
                                             ", and K = r (d_out + d_in) gives d_out + d_in = " + std::to_string(dims) +
                                             " (the mask leaves the last rows or columns empty); build "
                                             "peft::shira(in, out, indices, values) with the base's shape");
    }
    shira<T>::check_entries(where, mod, need_in, need_out, idx);
    std::vector<T> values = m.copy("shira_weight").storage();
    return shira<T>(need_in, need_out, std::move(idx), std::move(values));
  }

  /// Makes `c` describe this module when saving: peft_type SHIRA, r = K / (d_out + d_in), and
  /// PEFT's mask_type / init_weights fields when absent. unsupported_error where PEFT cannot
  /// represent the adapter: K not a multiple of d_out + d_in, an r differing between modules
  /// (ShiraConfig has one r), or a scale other than 1 (PEFT does not save it).
  static void describe_in(const shira<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "shira::describe_in";
    const index dims = a.in_features() + a.out_features();
    if (a.entries() % dims != 0) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' has K = " + std::to_string(a.entries()) +
                                                  " entries, not r (d_out + d_in) = r * " + std::to_string(dims) +
                                                  ": PEFT cannot load it");
    }
    if (a.scale() != T{1}) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' has scale " + std::to_string(a.scale()) +
                                                  ", which PEFT does not save: multiply the values by it and "
                                                  "set_scale(1) first");
    }
    const index r = a.entries() / dims;
    if (c.peft_type != "SHIRA") {
      c.peft_type = "SHIRA";
      c.r = r;
    } else if (c.r != r) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "' has r = " + std::to_string(r) +
                                                  " but the config says r = " + std::to_string(c.r) +
                                                  "; PEFT's ShiraConfig has one r for every module "
                                                  "(set config.r if all modules share it)");
    }
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (!c.raw.contains("r")) c.raw["r"] = r;  // to_json updates it from c.r from here on
    if (!c.raw.contains("mask_type")) c.raw["mask_type"] = "random";
    if (!c.raw.contains("random_seed")) c.raw["random_seed"] = nullptr;
    if (!c.raw.contains("init_weights")) c.raw["init_weights"] = true;
  }
};

}  // namespace peft::io
