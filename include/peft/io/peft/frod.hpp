// peft/io/peft/frod.hpp — FRoD in PEFT checkpoints: peft_type "FROD"; per module frod_lambda_l
// (in) and frod_lambda_s_values (nnz); per category c (frod_category of the module path)
// base_model.frod_V.<c> (in, in), base_model.frod_s_indices.<c> (2, nnz, integers) and
// base_model.frod_s_size.<c> ([in, in]), written once. U is never saved: it is recomputed from the
// base weight (the loader's base_weight_fn, required) and the SAVED V. Fields: save_projection
// (false refused), sparse_rate (checked against nnz), fan_in_fan_out (the loader's), and
// projection_prng_key, regularization_alpha, frod_dropout, progressbar,
// runtime_offload_base_weight, which do not change a loaded adapter's outputs.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/frod.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<frod<T>> : codec_defaults {
  static bool handles(const adapter_config& c) { return c.peft_type == "FROD"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule).
  /// projection_prng_key and regularization_alpha only made the saved indices and V;
  /// frod_dropout acts in training only; progressbar is cosmetic; runtime_offload_base_weight
  /// keeps PEFT's base weight on the CPU (memory only): a loaded adapter's outputs depend on
  /// none of them.
  static constexpr std::string_view config_fields[] = {
      "save_projection", "sparse_rate",  "fan_in_fan_out",         "projection_prng_key", "regularization_alpha",
      "frod_dropout",    "progressbar", "runtime_offload_base_weight"};
  static std::vector<std::string_view> module_tensors() { return {"frod_lambda_l", "frod_lambda_s_values"}; }
  /// base_model.frod_V.<category>, frod_s_indices.<category>, frod_s_size.<category>.
  static bool shared_tensor(std::string_view name) {
    for (std::string_view p : {"frod_V.", "frod_s_indices.", "frod_s_size."}) {
      if (name.size() > p.size() && name.starts_with(p)) return true;
    }
    return false;
  }
  static bool integer_tensor(std::string_view name) {
    return name.starts_with("frod_s_indices.") || name.starts_with("frod_s_size.");
  }

  /// PEFT's number of S entries for in_features `in` at `rate`: min(int(in^2 rate), in^2 - in),
  /// at least 1 when rate > 0 and in > 1.
  static long long expected_nnz(long long in, double rate) {
    const long long off = in * in - in;
    long long n = std::min(static_cast<long long>(static_cast<double>(in * in) * rate), off);
    if (rate > 0 && off > 0) n = std::max(1LL, n);
    return n;
  }

  static double sparse_rate_of(const adapter_config& c, const char* where) {
    const double rate = c.number("sparse_rate", 0.01, where);
    if (!(rate >= 0 && rate <= 1)) {
      peft::detail::raise<format_error>(where, "adapter_config.json: 'sparse_rate' = " + std::to_string(rate) +
                                                   " is outside [0, 1]");
    }
    return rate;
  }

  /// The adapter of one module. unsupported_error for save_projection=false and when the loader
  /// has no base weight (U is derived from it); format_error for missing or inconsistent tensors.
  static frod<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& shared) {
    constexpr const char* where = "frod::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    if (!c.boolean("save_projection", true, where)) {
      peft::detail::raise<unsupported_error>(
          where, "the adapter was saved with save_projection=false: frod_V and the S indices are not in the "
                 "checkpoint, and PEFT regenerates them from the base weights by SVD / QR / eigh (whose signs are "
                 "LAPACK's choice) and from projection_prng_key with PyTorch's torch.randperm, which peft-cpp does "
                 "not reproduce; load the adapter in PEFT and save it again with save_projection=True");
    }
    const double rate = sparse_rate_of(c, where);
    const std::string cat = frod_category(m.module());
    const std::string kv = "frod_V." + cat, ki = "frod_s_indices." + cat, ks = "frod_s_size." + cat;
    for (const auto& k : {kv, ki, ks}) {
      if (!shared.contains(k)) {
        peft::detail::raise<format_error>(where, mod + " (category '" + cat + "'): the checkpoint has no base_model." +
                                                     k + " although save_projection is true");
      }
    }
    const auto& sv = shared.shape(kv, 2);
    const auto& si = shared.shape(ki, 2);
    const auto& ss = shared.shape(ks, 1);
    const long long in = sv[0];
    if (sv[1] != in || in < 1 || si[0] != 2 || ss[0] != 2) {
      peft::detail::raise<format_error>(where, "category '" + cat + "': frod_V " + detail::shape_text(sv) +
                                                   ", frod_s_indices " + detail::shape_text(si) + ", frod_s_size " +
                                                   detail::shape_text(ss) + " are not (in, in), (2, nnz), (2)");
    }
    if (si[1] != expected_nnz(in, rate)) {
      peft::detail::raise<format_error>(where, "category '" + cat + "': frod_s_indices has " + std::to_string(si[1]) +
                                                   " entries, but adapter_config.json's 'sparse_rate' = " +
                                                   std::to_string(rate) + " gives " +
                                                   std::to_string(expected_nnz(in, rate)) + " for in_features " +
                                                   std::to_string(in) + " (PEFT would not load it)");
    }
    const auto& sl = m.shape("frod_lambda_l", 1);
    const auto& sval = m.shape("frod_lambda_s_values", 1);
    if (sl[0] != in || sval[0] != si[1]) {
      peft::detail::raise<format_error>(where, mod + ": frod_lambda_l " + detail::shape_text(sl) +
                                                   " and frod_lambda_s_values " + detail::shape_text(sval) +
                                                   " do not fit frod_V " + detail::shape_text(sv) +
                                                   " and frod_s_indices " + detail::shape_text(si));
    }
    const auto w0 = m.base_weight();
    if (!w0) {
      peft::detail::raise<unsupported_error>(where, mod + ": FRoD's U = colnorm(W0 V^-T) is never saved, PEFT "
                                                    "recomputes it from the base weight; load the adapter with its "
                                                    "base model (peft_model::load_adapter, merge_model, peft merge)");
    }
    if (w0->cols() != in || w0->rows() < 1) {
      peft::detail::raise<format_error>(where, mod + ": the base weight is " +
                                                   peft::detail::shape_string(w0->rows(), w0->cols()) +
                                                   ", frod_V is " + detail::shape_text(sv) + " (in_features differ)");
    }
    auto v = shared.shared(kv);
    return frod<T>(frod_basis_of<T>(w0->view(), matrix_view<const T>(v->view())), v, shared.shared(ki),
                   shared.shared(ks), cat, m.copy("frod_lambda_l").storage(), m.copy("frod_lambda_s_values").storage());
  }

  /// Makes `c` describe the adapter: peft_type FROD, save_projection true (the projections are
  /// always written), sparse_rate giving every module's nnz (PEFT checks the saved indices
  /// against it). unsupported_error when one sparse_rate cannot give every module's nnz.
  static void describe_in(const frod<T>& a, adapter_config& c, const std::string& module) {
    constexpr const char* where = "frod::describe_in";
    const long long in = a.in_features();
    if (!c.raw.is_object()) c.raw = ordered_json::object();
    if (c.peft_type != "FROD") {
      const ordered_json keep = c.raw;
      c.raw = ordered_json::object();
      for (const char* k : {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                            "modules_to_save", "base_model_name_or_path", "revision", "task_type", "inference_mode",
                            "fan_in_fan_out"}) {
        if (keep.contains(k)) c.raw[k] = keep[k];
      }
      c.peft_type = "FROD";
      // The smallest-error rate for this module: int(in^2 rate) = nnz.
      c.raw["sparse_rate"] = in * in - in == a.nnz() && a.nnz() > 0
                                 ? 1.0
                                 : (static_cast<double>(a.nnz()) + 0.5) / static_cast<double>(in * in);
    }
    c.raw["save_projection"] = true;
    const double rate = sparse_rate_of(c, where);
    if (expected_nnz(in, rate) != a.nnz()) {
      peft::detail::raise<unsupported_error>(
          where, "module '" + module + "' has " + std::to_string(a.nnz()) + " S entries for in_features " +
                     std::to_string(in) + ", but the config's sparse_rate " + std::to_string(rate) + " gives " +
                     std::to_string(expected_nnz(in, rate)) + ": PEFT's FrodConfig has one sparse_rate for every "
                     "module, so it could not load it");
    }
    c.set_default("projection_prng_key", 0);
    c.set_default("frod_dropout", 0.0);
    c.set_default("fan_in_fan_out", false);
    c.set_default("bias", "none");
    c.set_default("init_weights", true);
    c.set_default("regularization_alpha", 1e-3);
    c.set_default("progressbar", true);
    c.set_default("runtime_offload_base_weight", false);
  }
};

}  // namespace peft::io
