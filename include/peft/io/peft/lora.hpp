// peft/io/peft/lora.hpp — LoRA in PEFT checkpoints: peft_type "LORA" without use_dora; tensors
// lora_A.weight (r, in), lora_B.weight (out, r), lora_B.bias (out, with lora_bias); the rank and
// scale of a module from r / rank_pattern, lora_alpha / alpha_pattern and use_rslora.
// init_lora_weights "pissa" / "olora" (saved unconverted: relative to the residual base PEFT's
// from_pretrained recomputes): loaded, when the loader is given the base weights, as PEFT's
// conversion (adapters/lora_decomposition.hpp: rank 2r over W0 itself), the config rewritten to
// say so (r and lora_alpha doubled, init_lora_weights true); refused without the base weights.
// The LoRA variants PEFT has beside DoRA that adapt and merge linear layers: VeLoRA
// (velora_config) and MonteCLoRA (monteclora_config) change only training (an activation-
// compressed backward; Monte Carlo perturbations of A) and are a plain LoRA at inference and in
// merges: their training state (lora_velora_embed, lora_monteclora_sampler.*) is read and dropped.
// BD-LoRA (use_bdlora): block-diagonal A or B, laid out as full matrices. KaSA (kasa_config): the
// base loses its r smallest singular components (recomputed from the base weights, as PiSSA) and
// lora_diag sits between B and A (folded into B); converted like PiSSA. The config is rewritten
// as a plain LoRA's (after_load); docs/methods/lora.md.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <optional>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/adapters/lora_decomposition.hpp"
#include "peft/io/peft/codec.hpp"

namespace peft::io {

template <compute_scalar T>
struct peft_codec<lora<T>> : codec_defaults {
  /// LoRA checkpoints, and OSF's (peft_type "OSF"), which are the LoRA they equal (see the top).
  static bool handles(const adapter_config& c) { return (c.peft_type == "LORA" && !c.use_dora) || c.peft_type == "OSF"; }
  /// The adapter_config.json fields it honours (io/peft/config_fields.hpp has the rule):
  /// LoRA's numbers, init_lora_weights (judged by decomposition_of) and the variants below.
  static constexpr std::string_view own_fields[] = {"init_lora_weights", "velora_config", "monteclora_config",
                                                    "use_bdlora",        "kasa_config",   "effective_rank",
                                                    "target_svd_config"};  // the last two: OSF's
  static constexpr auto config_fields = join_config_fields(lora_config_fields, own_fields);
  /// The training state of VeLoRA's and MonteCLoRA's variants, read and dropped (see the top).
  static constexpr std::string_view training_state[] = {
      "lora_velora_embed", "lora_monteclora_sampler.expert_weights", "lora_monteclora_sampler.expert_weights_prior",
      "lora_monteclora_sampler.gaussian_var_prior", "lora_monteclora_sampler.std_prior"};
  static std::vector<std::string_view> module_tensors() {
    std::vector<std::string_view> t = {"lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_diag",
                                       "osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low"};
    t.insert(t.end(), std::begin(training_state), std::end(training_state));
    return t;
  }

  /// The decomposition init_lora_weights asks PEFT to re-run on load ("pissa", "olora"), nullopt
  /// for the initialisations that leave the base alone (true, false, "gaussian", "eva",
  /// "orthogonal", "mica"); unsupported_error naming the field for the others (pissa_niter_*,
  /// corda, loftq, lora_ga, unknown strings).
  static std::optional<lora_decomposition> decomposition_of(const adapter_config& c, const char* where) {
    const auto it = c.raw.find("init_lora_weights");
    if (it == c.raw.end() || it->is_null() || it->is_boolean()) return std::nullopt;
    if (it->is_string()) {
      std::string s = it->get<std::string>();
      if (s == "pissa") return lora_decomposition::pissa;
      std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
      if (s == "olora") return lora_decomposition::olora;  // PEFT compares it lower-cased
    }
    const std::string why = detail::refused_config_field("init_lora_weights", *it);
    if (why.empty()) return std::nullopt;
    peft::detail::raise<unsupported_error>(where, "adapter_config.json: 'init_lora_weights' = " + it->dump() + ": " + why);
  }

  /// Whether the variant configured by `field` (velora_config, kasa_config, ...) is on.
  static bool uses(const adapter_config& c, const char* field) {
    const auto it = c.raw.find(field);
    return it != c.raw.end() && !it->is_null() && !(it->is_boolean() && !it->get<bool>());
  }

  /// After a load: the config of what was built, as PEFT would write it for a plain LoRA. PiSSA,
  /// OLoRA and KaSA modules were converted to twice the rank (r, rank_pattern doubled; lora_alpha,
  /// alpha_pattern scaled to keep each scale; init_lora_weights true, as PEFT's
  /// path_initial_model_for_weight_conversion writes); BD-LoRA blocks were laid out as full
  /// matrices; VeLoRA's and MonteCLoRA's training state was dropped. Their fields become null.
  template <class Checkpoint>
  static void after_load(adapter_config& c, const Checkpoint& ck) {
    if (c.peft_type == "OSF") {  // a LoRA config describing each converted module exactly
      adapter_config l;
      l.peft_type = "LORA";
      l.targets_kind = c.targets_kind;
      l.target_modules = c.target_modules;
      l.raw = c.raw;
      for (const char* f : {"effective_rank", "target_svd_config", "rank_pattern", "init_weights"}) l.raw.erase(f);
      l.raw["peft_type"] = "LORA";
      bool first = true;
      for (const auto& m : ck.modules) {
        const lora<T>* a = nullptr;
        if constexpr (requires { m.adapter.template get_if<lora<T>>(); }) {
          a = m.adapter.template get_if<lora<T>>();
        } else {
          a = &m.adapter;
        }
        if (a == nullptr) continue;
        if (first) {
          l.r = a->rank();
          l.lora_alpha = static_cast<double>(a->rank()) * static_cast<double>(a->scale());
          first = false;
        }
        describe_in(*a, l, m.path);
      }
      l.raw = l.to_json();
      c = std::move(l);
      return;
    }
    after_load(c);
  }
  static void after_load(adapter_config& c) {
    const bool doubled = decomposition_of(c, "lora::from_checkpoint").has_value() || uses(c, "kasa_config");
    for (const char* f : {"velora_config", "monteclora_config", "use_bdlora", "kasa_config"}) {
      if (c.raw.contains(f)) c.raw[f] = nullptr;
    }
    if (doubled) {
      const double alpha_factor = c.use_rslora ? std::sqrt(2.0) : 2.0;
      c.r *= 2;
      c.lora_alpha *= alpha_factor;
      for (auto& [k, v] : c.rank_pattern) v *= 2;
      for (auto& [k, v] : c.alpha_pattern) v *= alpha_factor;
      c.raw["init_lora_weights"] = true;
    }
    c.raw = c.to_json();
  }

  /// The adapter of one module: rank from lora_A, checked against r / rank_pattern; scale from
  /// lora_alpha / alpha_pattern and use_rslora; the variants and decompositions of the top.
  static lora<T> from_checkpoint(const adapter_config& c, const checkpoint_tensors<T>& m,
                                 const checkpoint_tensors<T>& /*shared*/) {
    constexpr const char* where = "lora::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    for (const auto& [field, names] : {std::pair{"velora_config", std::string_view("lora_velora_embed")},
                                       std::pair{"monteclora_config", std::string_view("lora_monteclora_sampler")}}) {
      for (const auto& [name, t] : m.all()) {
        if (name.starts_with(names) && !uses(c, field)) {
          peft::detail::raise<format_error>(where, mod + " has '" + name + "' but adapter_config.json has no " + field);
        }
      }
    }
    if (c.peft_type == "OSF") return from_osf(m);
    for (const char* f : {"effective_rank", "target_svd_config"}) {
      if (const auto* v = c.field(f)) {
        peft::detail::raise<unsupported_error>(where, "adapter_config.json: '" + std::string(f) + "' = " + v->dump() +
                                                          ": an OSF field in a LORA config");
      }
    }
    m.shape("lora_A.weight", 2);
    m.shape("lora_B.weight", 2);
    matrix<T> a_w = m.copy("lora_A.weight");
    matrix<T> b_w = m.copy("lora_B.weight");
    if (uses(c, "use_bdlora")) expand_block_diagonal(c, m, a_w, b_w);
    if (b_w.cols() != a_w.rows()) {
      peft::detail::raise<format_error>(where, mod + ": lora_A " + peft::detail::shape_string(a_w.rows(), a_w.cols()) +
                                                   " and lora_B " + peft::detail::shape_string(b_w.rows(), b_w.cols()) +
                                                   " disagree on the rank");
    }
    const index rank = a_w.rows(), out = b_w.rows(), in = a_w.cols();
    if (rank != c.rank_for(m.module())) {
      peft::detail::raise<format_error>(where, mod + " has rank " + std::to_string(rank) +
                                                   " but adapter_config.json gives " +
                                                   std::to_string(c.rank_for(m.module())));
    }
    std::vector<T> bias;
    if (m.contains("lora_B.bias")) {
      bias = m.copy("lora_B.bias", {out}).storage();
    } else if (c.lora_bias) {
      peft::detail::raise<format_error>(where, mod + " has no lora_B.bias but lora_bias is true");
    }
    const double s = lora_scale(c.alpha_for(m.module()), rank, c.use_rslora);
    const bool kasa = uses(c, "kasa_config");
    if (kasa) {  // KaSA: B diag(lora_diag) A; the diagonal folded into B
      if (!m.contains("lora_diag")) peft::detail::raise<format_error>(where, mod + " has no lora_diag although kasa_config is set");
      const matrix<T> d = m.copy("lora_diag", {rank});
      for (index i = 0; i < out; ++i) {
        for (index k = 0; k < rank; ++k) b_w(i, k) *= d(0, k);
      }
    } else if (m.contains("lora_diag")) {
      peft::detail::raise<format_error>(where, mod + " has lora_diag but adapter_config.json has no kasa_config");
    }
    lora<T> a(std::move(a_w), std::move(b_w), static_cast<T>(s), std::move(bias));
    auto kind = decomposition_of(c, where);
    if (kind && kasa) {
      peft::detail::raise<unsupported_error>(where, "adapter_config.json: kasa_config with init_lora_weights = \"" +
                                                        std::string(decomposition_name(*kind)) +
                                                        "\": both rewrite the base weights");
    }
    if (kasa) kind = lora_decomposition::kasa;
    if (!kind) return a;
    // PEFT's from_pretrained re-runs the decomposition on W0 and loads A, B over the residual.
    const std::string field = kasa ? std::string("adapter_config.json: 'kasa_config' (KaSA drops the base's r smallest "
                                                 "singular components)")
                                   : "adapter_config.json: 'init_lora_weights' = \"" +
                                         std::string(decomposition_name(*kind)) + "\"";
    if (*kind != lora_decomposition::pissa && c.fan_in_fan_out) {
      peft::detail::raise<unsupported_error>(where, field + " with fan_in_fan_out: PEFT refuses KaSA on Conv1D "
                                                    "layers and factors OLoRA's stored (in, out) weight, whose factors "
                                                    "do not fit the adapter's shapes");
    }
    const auto w0 = m.base_weight();
    if (!w0) {
      peft::detail::raise<unsupported_error>(where, field + ": the adapter is relative to a residual base PEFT "
                                                    "recomputes from the base weight; load it with its base model "
                                                    "(peft_model::load_adapter, merge_model, peft merge)");
    }
    if (w0->rows() != out || w0->cols() != in) {
      peft::detail::raise<format_error>(where, mod + ": the base weight is " +
                                                   peft::detail::shape_string(w0->rows(), w0->cols()) + ", the adapter's " +
                                                   peft::detail::shape_string(out, in));
    }
    return with_initial_factors(a, decompose_weight<T>(*kind, w0->view(), rank, s));
  }

  /// OSF: W0 = U_high S_high V_high^T + U_low S_low V_low^T split at the k largest singular values
  /// (k = min(out, in) - the length of S_low: what effective_rank / rank_pattern /
  /// target_svd_config gave); the low part is trained and the merged weight is
  /// W0 - (W0's low part) + U_low diag(S_low) V_low: the LoRA A = V_low, B = U_low diag(S_low), s = 1,
  /// converted over W0's m smallest components (lora_decomposition::kasa with rank m, scale 1).
  static lora<T> from_osf(const checkpoint_tensors<T>& m) {
    constexpr const char* where = "osf::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const auto& su = m.shape("osf_svd_params.U_low", 2);
    const auto& sv = m.shape("osf_svd_params.V_low", 2);
    const auto& ss = m.shape("osf_svd_params.S_low", 1);
    if (su[1] != ss[0] || sv[0] != ss[0] || ss[0] < 1) {
      peft::detail::raise<format_error>(where, mod + ": U_low " + detail::shape_text(su) + ", S_low " + detail::shape_text(ss) +
                                                   " and V_low " + detail::shape_text(sv) + " disagree");
    }
    const index low = static_cast<index>(ss[0]);
    const matrix<T> sl = m.copy("osf_svd_params.S_low");
    matrix<T> b = m.copy("osf_svd_params.U_low");
    for (index i = 0; i < b.rows(); ++i) {
      for (index k = 0; k < low; ++k) b(i, k) *= sl(0, k);
    }
    lora<T> a(m.copy("osf_svd_params.V_low"), std::move(b), T{1});
    const auto w0 = m.base_weight();
    if (!w0) {
      peft::detail::raise<unsupported_error>(where, "OSF's merged weight keeps the base's largest singular components, "
                                                    "recomputed from the base weight; load it with its base model "
                                                    "(peft_model::load_adapter, merge_model, peft merge)");
    }
    if (w0->rows() != su[0] || w0->cols() != sv[1]) {
      peft::detail::raise<format_error>(where, mod + ": the base weight is " +
                                                   peft::detail::shape_string(w0->rows(), w0->cols()) + ", the adapter's " +
                                                   peft::detail::shape_string(su[0], sv[1]));
    }
    if (low >= std::min(w0->rows(), w0->cols())) {
      peft::detail::raise<format_error>(where, mod + ": S_low has " + std::to_string(low) + " values, so no singular "
                                                   "component of the " + peft::detail::shape_string(w0->rows(), w0->cols()) +
                                                   " base is kept (effective_rank must be >= 1)");
    }
    return with_initial_factors(a, decompose_weight<T>(lora_decomposition::kasa, w0->view(), low, 1.0));
  }

  /// BD-LoRA (use_bdlora): lora_A (r, in / n) of a module whose name contains a
  /// target_modules_bd_a entry, or lora_B (out, r / n) of one matching target_modules_bd_b, holds
  /// the n diagonal blocks of the full factor (PEFT's BlockDiagonalLinear: block i is rows
  /// [i r / n, (i + 1) r / n) of the stored A, resp. rows [i out / n, ...) of the stored B); laid
  /// out here as the full matrix with zeros off the blocks.
  static void expand_block_diagonal(const adapter_config& c, const checkpoint_tensors<T>& m, matrix<T>& a,
                                    matrix<T>& b) {
    constexpr const char* where = "lora::from_checkpoint";
    const std::string mod = "module '" + m.module() + "'";
    const auto& bd = c.raw["use_bdlora"];
    if (!bd.is_object()) peft::detail::raise<format_error>(where, "adapter_config.json: 'use_bdlora' must be an object");
    const auto nit = bd.find("nblocks");
    const bool given = nit != bd.end() && !nit->is_null();
    if (given && !nit->is_number_integer()) {
      peft::detail::raise<format_error>(where, "adapter_config.json: use_bdlora.nblocks must be an integer");
    }
    const long long n = given ? nit->get<long long>() : 1;
    if (n < 1) peft::detail::raise<format_error>(where, "adapter_config.json: use_bdlora.nblocks must be >= 1");
    const std::string name = m.module().substr(m.module().rfind('.') + 1);  // PEFT's target_name
    auto matches = [&](const char* key) {
      const auto it = bd.find(key);
      if (it == bd.end() || it->is_null()) return false;
      if (!it->is_array()) peft::detail::raise<format_error>(where, std::string("adapter_config.json: use_bdlora.") + key + " must be a list");
      for (const auto& p : *it) {
        if (p.is_string() && name.find(p.get<std::string>()) != std::string::npos) return true;
      }
      return false;
    };
    const bool on_a = matches("target_modules_bd_a"), on_b = matches("target_modules_bd_b");
    if (on_a && on_b) peft::detail::raise<format_error>(where, mod + " matches both use_bdlora.target_modules_bd_a and _bd_b");
    if (!on_a && !on_b) {
      const auto strict = bd.find("match_strict");
      if (strict == bd.end() || !strict->is_boolean() || strict->get<bool>()) {
        peft::detail::raise<format_error>(where, mod + " matches neither use_bdlora.target_modules_bd_a nor _bd_b "
                                                       "(match_strict: PEFT refuses it)");
      }
      return;
    }
    const index nb = static_cast<index>(n);
    matrix<T>& packed = on_a ? a : b;
    // A: (r, in / n) -> (r, in), blocks of r / n rows; B: (out, r / n) -> (out, r), blocks of out / n rows.
    const index rows = packed.rows(), cols = packed.cols();
    if (rows % nb != 0) {
      peft::detail::raise<format_error>(where, mod + ": lora_" + std::string(on_a ? "A" : "B") + " has " +
                                                   std::to_string(rows) + " rows, not a multiple of nblocks " +
                                                   std::to_string(nb));
    }
    if (const auto& shape = m.base_shape(); shape && on_a && shape->second != cols * nb) {
      peft::detail::raise<format_error>(where, mod + ": block-diagonal lora_A has " + std::to_string(cols) +
                                                   " columns per block, the base " + std::to_string(shape->second) +
                                                   " inputs for " + std::to_string(nb) + " blocks");
    }
    matrix<T> full(rows, cols * nb);
    const index per = rows / nb;
    for (index blk = 0; blk < nb; ++blk) {
      for (index i = blk * per; i < (blk + 1) * per; ++i) {
        for (index j = 0; j < cols; ++j) full(i, blk * cols + j) = packed(i, j);
      }
    }
    packed = std::move(full);
  }

  /// Makes `c` describe this module: an exact rank_pattern / alpha_pattern entry where r /
  /// lora_alpha do not give its rank and scale; lora_bias when it has a bias.
  static void describe_in(const lora<T>& a, adapter_config& c, const std::string& module) {
    c.peft_type = "LORA";
    const double s = static_cast<double>(a.scale());
    if (c.fresh()) {  // the first module of a config built in C++ sets r and lora_alpha
      const double r = static_cast<double>(a.rank());
      c.r = a.rank();
      c.lora_alpha = c.use_rslora ? s * std::sqrt(r) : s * r;
    }
    const double tol = 8.0 * static_cast<double>(std::numeric_limits<T>::epsilon()) * std::max(1.0, std::abs(s));
    if (c.rank_for(module) != a.rank()) c.rank_pattern.insert(c.rank_pattern.begin(), {module, a.rank()});
    if (std::abs(lora_scale(c.alpha_for(module), a.rank(), c.use_rslora) - s) > tol) {
      const double r = static_cast<double>(a.rank());
      c.alpha_pattern.insert(c.alpha_pattern.begin(), {module, c.use_rslora ? s * std::sqrt(r) : s * r});
    }
    c.lora_bias = c.lora_bias || a.has_bias();
  }
};

}  // namespace peft::io
