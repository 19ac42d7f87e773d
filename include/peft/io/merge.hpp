// peft/io/merge.hpp — the offline merge_and_unload: base model file(s) + PEFT adapter -> one
// safetensors file with every targeted weight merged and every other tensor copied unchanged.
//
//   peft::io::merge_model("model.safetensors", "adapter/", "merged.safetensors", {});
//
// Merged weights are computed in double from the stored values (W0 + s B A, transposed for
// fan_in_fan_out bases, b0 + s b_B with lora_bias) and rounded once to the output dtype.
// modules_to_save tensors of the adapter replace the base's. A LoRA adapter's embedding parts
// (io/embedding_adapters.hpp) merge as PEFT's merge_and_unload does: an embedding LoRA adds
// s (B A)^T to the table (from the base_layer.weight saved with it, if any), trainable tokens
// replace their rows. A tied base (no lm_head.weight) keeps sharing the merged table, as PEFT's
// merged model does; trainable tokens on a tied lm_head (stored under lm_head) are refused.
// Embedding tables are never quantized (quantized_base applies to the adapted linear weights).
// The output is written to a temporary file and renamed, one tensor in memory at a time: on any
// error nothing is left.
//
// Quantized bases (merge_options::quantized_base, QLoRA): when the adapter was trained over a
// frozen int8_rowwise / q4_0 / nf4 base, each targeted weight is quantized as that base was, the
// delta is computed against its dequantized values (DoRA's norms see the quantized weight), and
// the sum is RE-QUANTIZED to the format, as merging into a quantized layer must (PEFT warns the
// same for bitsandbytes layers). The output holds the dequantized values of the re-quantized
// weights (exactly representable in the format, so quantizing them again changes nothing for
// int8 and q4_0); merge_report says how far re-quantization moved them from Wq + dW. Adapters
// defined over a decomposition of the full-precision weight (PiSSA/OLoRA saved unconverted, KaSA,
// OSF) are refused there.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "peft/base/dense.hpp"
#include "peft/base/quantized_formats.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/io/model_files.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/kernels/gemm.hpp"

namespace peft::io {

struct merge_options {
  std::optional<dtype> out_dtype{};  // nullopt: each tensor keeps its dtype; else floating tensors convert
  /// The adapter was trained over this frozen quantized base: a name of base/quantized_formats.hpp
  /// ("int8", "q4_0", "nf4").
  std::optional<std::string> quantized_base{};
};

struct merge_report {
  std::size_t tensors = 0;               // tensors written
  std::vector<std::string> merged;       // base tensors that received a delta
  std::vector<std::string> replaced;     // base tensors replaced by modules_to_save
  std::optional<std::string> requantized;  // the format, when merged weights were re-quantized
  double max_requantization_error = 0.0;        // max |re-quantized - (Wq + dW)| over them
};

namespace detail {

template <class Adapter>
struct merge_plan_entry {
  const adapted_module<Adapter>* module = nullptr;
  bool is_bias = false;
  const saved_tensor* replacement = nullptr;
  bool fan_in_fan_out = false;  // the module's weight is stored (in, out)
  const embedding_lora<typename Adapter::scalar>* embedding = nullptr;   // LoRA on this table
  const trainable_tokens<typename Adapter::scalar>* tokens = nullptr;    // rows replaced
};

/// The stored base weight as a dense (out, in) double matrix (transposed back for fan_in_fan_out).
inline dense<double> read_base(const model_files& model, const std::string& name, const std::optional<std::string>& bias,
                               bool fan_in_fan_out) {
  const tensor_info& info = model.info(name);
  const std::byte* src = model.bytes(name).data();
  const auto rows = static_cast<index>(info.shape[0]), cols = static_cast<index>(info.shape[1]);
  matrix<double> w = fan_in_fan_out ? matrix<double>(cols, rows) : matrix<double>(rows, cols);
  for (index i = 0; i < rows; ++i) {
    for (index j = 0; j < cols; ++j) {
      const double v = load_element<double>(src, info.type, static_cast<std::size_t>(i * cols + j));
      if (fan_in_fan_out) {
        w(j, i) = v;
      } else {
        w(i, j) = v;
      }
    }
  }
  std::vector<double> b;
  if (bias) b = model.file_of(*bias).read<double>(*bias);
  return dense<double>(std::move(w), std::move(b));
}

/// The merge into a quantized base: Wq = deq(Q(W0)), dW against Wq, out = deq(Q(Wq + dW)).
/// Returns max |out - (Wq + dW)|.
template <class Q, class Adapter>
double requantized_merge(const dense<double>& w0, const Adapter& a, matrix<double>& out) {
  Q q = Q::quantize(w0.weight(), static_cast<const double*>(nullptr));
  const index rows = w0.out_features(), cols = w0.in_features();
  matrix<double> wq(rows, cols);
  for (index i = 0; i < rows; ++i) q.dequantize_row(i, wq.view().row(i));
  const dense<double> base(std::move(wq), w0.bias());
  matrix<double> delta(rows, cols);
  a.delta_weight(base, delta.view());
  q.add_to_weight(matrix_view<const double>(delta.view()), 1.0);
  out = matrix<double>(rows, cols);
  double worst = 0.0;
  for (index i = 0; i < rows; ++i) {
    double* r = out.view().row(i);
    q.dequantize_row(i, r);
    for (index j = 0; j < cols; ++j) worst = std::max(worst, std::abs(r[j] - (base.weight()(i, j) + delta(i, j))));
  }
  return worst;
}

/// requantized_merge for the format named `format` (a quantized_formats name).
template <class Adapter>
double requantized_merge(const std::string& format, const dense<double>& w0, const Adapter& a, matrix<double>& out) {
  double err = 0.0;
  visit_quantized_format(format, [&](auto q) { err = requantized_merge<typename decltype(q)::type>(w0, a, out); });
  return err;
}

}  // namespace detail

/// Merges the adapter in `adapter_dir` into the model at `base` (a .safetensors file, a
/// model.safetensors.index.json, or a directory holding either) and writes `out`. Adapter is
/// the type the checkpoint is read as (any method by default); a template so that a program
/// that includes this header without merging does not compile the merge of every method.
template <class Adapter = any_adapter<double>>
merge_report merge_model(const std::filesystem::path& base, const std::filesystem::path& adapter_dir,
                         const std::filesystem::path& out, const merge_options& opt) {
  constexpr const char* where = "merge_model";
  if (opt.out_dtype && !is_floating(*opt.out_dtype)) {
    peft::detail::raise<unsupported_error>(where, "the output dtype must be f32, bf16, f16 or f64");
  }
  if (opt.quantized_base && !quantized_format_index(*opt.quantized_base)) {
    peft::detail::raise<unsupported_error>(where, "unknown quantized base format '" + *opt.quantized_base + "' (" +
                                                      quantized_format_names() + ")");
  }
  const auto model = model_files::open(base);
  // fan_in_fan_out per module, as PEFT decides it (model_files.hpp: stored_in_out).
  const adapter_config config = adapter_config::load(adapter_dir);
  const bool config_flag = config.fan_in_fan_out;
  const auto ck = load_checkpoint_as<Adapter>(adapter_dir, [&](const std::string& module)
                                                   -> std::optional<std::pair<index, index>> {
    const auto name = model.resolve(module, "weight");
    if (!name || model.info(*name).shape.size() != 2) return std::nullopt;
    const auto& s = model.info(*name).shape;
    const auto rows = static_cast<index>(s[0]), cols = static_cast<index>(s[1]);
    return stored_in_out(model, module, std::nullopt, config_flag) ? std::pair{cols, rows} : std::pair{rows, cols};
  }, [&](const std::string& module) -> std::optional<matrix<double>> {
    // Asked only by adapters defined over a decomposition of W0 (PiSSA/OLoRA saved unconverted,
    // KaSA, OSF, FRoD's U): PEFT recomputes it from the full-precision weight. Over a quantized
    // base that decomposition is of another weight (PEFT refuses PiSSA and KaSA there, and FRoD
    // adapts nn.Linear and Conv1D only): refused.
    if (opt.quantized_base) {
      peft::detail::raise<unsupported_error>(where, "module '" + module + "': the adapter is defined over a "
                                                    "decomposition of the full-precision base weight (PiSSA/OLoRA "
                                                    "saved unconverted, KaSA, OSF, FRoD); merging it into a quantized "
                                                    "base (" + *opt.quantized_base + ") is not supported");
    }
    const auto name = model.resolve(module, "weight");
    if (!name || model.info(*name).shape.size() != 2 || !is_floating(model.info(*name).type)) return std::nullopt;
    const bool t = stored_in_out(model, module, std::nullopt, config_flag);
    return dequantized_weight<double>(detail::read_base(model, *name, std::nullopt, t));
  });

  // Plan and validate everything before writing a byte.
  std::map<std::string, detail::merge_plan_entry<Adapter>> plan;
  merge_report report;
  for (const auto& m : ck.modules) {
    if (!m.adapter.template mergeable<dense<double>>()) {
      peft::detail::raise<unsupported_error>(where, "module '" + m.path + "': " + std::string(m.adapter.active_method()) +
                                                        " cannot be merged into a weight");
    }
    const auto name = model.resolve(m.path, "weight");
    if (!name) {
      peft::detail::raise<format_error>(where, "the base model has no weight for module '" + m.path +
                                                   "' (looked for '" + m.path + ".weight')");
    }
    const tensor_info& info = model.info(*name);
    const std::int64_t out_f = m.adapter.out_features(), in_f = m.adapter.in_features();
    const bool fan_in_fan_out = stored_in_out(model, m.path, std::pair{in_f, out_f}, config_flag);
    const std::vector<std::int64_t> expect =
        fan_in_fan_out ? std::vector<std::int64_t>{in_f, out_f} : std::vector<std::int64_t>{out_f, in_f};
    if (info.shape != expect) {
      peft::detail::raise<format_error>(where, "base weight '" + *name + "' is " + detail::shape_text(info.shape) +
                                                   ", the adapter for '" + m.path + "' needs " + detail::shape_text(expect) +
                                                   (fan_in_fan_out ? " (fan_in_fan_out)" : ""));
    }
    if (!is_floating(info.type)) {
      peft::detail::raise<unsupported_error>(where, "base weight '" + *name + "' is " +
                                                        std::string(safetensors_name(info.type)) + ", not a floating dtype");
    }
    if (plan.count(*name)) peft::detail::raise<format_error>(where, "two modules adapt '" + *name + "'");
    plan[*name] = {&m, false, nullptr, fan_in_fan_out};
    report.merged.push_back(*name);
    const auto bias = model.resolve(m.path, "bias");
    if (m.adapter.touches_bias() && (bias || m.adapter.additive())) {
      if (!bias) {
        peft::detail::raise<format_error>(where, "module '" + m.path + "': its " + std::string(m.adapter.active_method()) +
                                                     " adapter adds to the bias (lora_bias, BEFT) but the base has no '" +
                                                     m.path + ".bias'");
      }
      if (model.info(*bias).shape != std::vector<std::int64_t>{out_f} || !is_floating(model.info(*bias).type)) {
        peft::detail::raise<format_error>(where, "base bias '" + *bias + "' is not a floating vector of " +
                                                     std::to_string(out_f));
      }
      plan[*bias] = {&m, true, nullptr, fan_in_fan_out};
      report.merged.push_back(*bias);
    }
  }
  for (const auto& s : ck.saved_tensors) {
    const auto dot = s.name.rfind('.');
    const auto name = dot == std::string::npos ? std::optional<std::string>{}
                                               : model.resolve(s.name.substr(0, dot), s.name.substr(dot + 1));
    if (!name) peft::detail::raise<format_error>(where, "the base model has no tensor '" + s.name + "' to replace");
    if (model.info(*name).shape != s.shape) {
      peft::detail::raise<format_error>(where, "modules_to_save tensor '" + s.name + "' is " + detail::shape_text(s.shape) +
                                                   ", the base's is " + detail::shape_text(model.info(*name).shape));
    }
    if (plan.count(*name)) peft::detail::raise<format_error>(where, "'" + *name + "' is both adapted and replaced");
    plan[*name] = {nullptr, false, &s};
    report.replaced.push_back(*name);
  }
  // The embedding parts: the table each one changes, checked against its shape.
  auto embedding_table = [&](const std::string& path, const char* what) {
    const auto name = model.resolve(path, "weight");
    if (!name) {
      std::string why = "the base model has no weight for " + std::string(what) + " '" + path + "' (looked for '" +
                        path + ".weight')";
      if (path.ends_with("lm_head")) {
        why += "; a lm_head tied to the input embedding is not stored, and changing the shared table through it is "
               "not supported";
      }
      peft::detail::raise<format_error>(where, why);
    }
    const tensor_info& info = model.info(*name);
    if (info.shape.size() != 2 || !is_floating(info.type)) {
      peft::detail::raise<format_error>(where, "base weight '" + *name + "' is " + detail::shape_text(info.shape) + " " +
                                                   std::string(safetensors_name(info.type)) +
                                                   ", not a 2-D floating table");
    }
    if (plan.count(*name)) {
      peft::detail::raise<format_error>(where, "'" + *name + "' is changed by " + what + " '" + path +
                                                   "' and by another part of the adapter");
    }
    report.merged.push_back(*name);
    return *name;
  };
  for (const auto& e : ck.embeddings.lora) {
    const std::string name = embedding_table(e.path, "embedding LoRA");
    e.check_table(static_cast<index>(model.info(name).shape[0]), static_cast<index>(model.info(name).shape[1]), where);
    plan[name] = {nullptr, false, nullptr, false, &e, nullptr};
  }
  for (const auto& t : ck.embeddings.tokens) {
    const std::string name = embedding_table(t.path, "trainable tokens");
    t.check_table(static_cast<index>(model.info(name).shape[0]), static_cast<index>(model.info(name).shape[1]), where);
    plan[name] = {nullptr, false, nullptr, false, nullptr, &t};
  }

  safetensors_writer w;
  w.set_metadata(model.metadata());
  for (const auto& name : model.names()) {
    const tensor_info& info = model.info(name);
    const auto it = plan.find(name);
    const saved_tensor* repl = it != plan.end() ? it->second.replacement : nullptr;
    const dtype src_type = repl ? repl->type : info.type;
    const dtype out_type = (opt.out_dtype && is_floating(src_type)) ? *opt.out_dtype : src_type;
    if (it != plan.end() && (it->second.embedding || it->second.tokens)) {
      const auto* e = it->second.embedding;
      const auto* t = it->second.tokens;
      w.add_lazy(name, out_type, info.shape, [&model, name, e, t, out_type](std::span<std::byte> dst) {
        const tensor_info& ti = model.info(name);
        const auto rows = static_cast<index>(ti.shape[0]), cols = static_cast<index>(ti.shape[1]);
        const bool saved_base = e != nullptr && e->base_weight.has_value();
        const std::byte* src = saved_base ? e->base_weight->data.data() : model.bytes(name).data();
        const dtype src_t = saved_base ? e->base_weight->type : ti.type;
        matrix<double> table(rows, cols);
        for (index i = 0; i < rows * cols; ++i) {
          table.data()[i] = load_element<double>(src, src_t, static_cast<std::size_t>(i));
        }
        if (e) e->add_delta(table.view());
        if (t) t->apply(table.view());
        for (index i = 0; i < rows * cols; ++i) store_element(dst.data(), out_type, static_cast<std::size_t>(i), table.data()[i]);
      });
      continue;
    }
    if (it == plan.end() || repl) {
      const std::byte* src = repl ? repl->data.data() : model.bytes(name).data();
      const std::size_t n = info.numel();
      if (out_type == src_type) {
        w.add_lazy(name, out_type, info.shape, [src](std::span<std::byte> dst) {
          std::copy(src, src + dst.size(), dst.begin());
        });
      } else {
        w.add_lazy(name, out_type, info.shape, [src, n, src_type, out_type](std::span<std::byte> dst) {
          for (std::size_t i = 0; i < n; ++i) store_element(dst.data(), out_type, i, load_element<double>(src, src_type, i));
        });
      }
      continue;
    }
    const auto* m = it->second.module;
    const std::string weight_name = it->second.is_bias ? *model.resolve(m->path, "weight") : name;
    const auto bias_name = model.resolve(m->path, "bias");
    const bool is_bias = it->second.is_bias;
    const bool fan_in_fan_out = it->second.fan_in_fan_out;
    w.add_lazy(name, out_type, info.shape,
               [&model, &report, &opt, name, weight_name, bias_name, is_bias, m, out_type,
                fan_in_fan_out](std::span<std::byte> dst) {
      const dense<double> w0 = detail::read_base(model, weight_name, bias_name, fan_in_fan_out);
      const std::byte* src = model.bytes(name).data();
      const dtype src_type = model.info(name).type;
      if (is_bias) {
        std::vector<double> db(static_cast<std::size_t>(w0.out_features()));
        m->adapter.delta_bias(w0, db.data());
        for (std::size_t j = 0; j < db.size(); ++j) {
          store_element(dst.data(), out_type, j, load_element<double>(src, src_type, j) + db[j]);
        }
        return;
      }
      const index out_f = w0.out_features(), in_f = w0.in_features();
      if (opt.quantized_base) {
        matrix<double> merged;
        const double err = detail::requantized_merge(*opt.quantized_base, w0, m->adapter, merged);
        report.max_requantization_error = std::max(report.max_requantization_error, err);
        for (index i = 0; i < out_f; ++i) {
          for (index j = 0; j < in_f; ++j) {
            const auto k = static_cast<std::size_t>(fan_in_fan_out ? j * out_f + i : i * in_f + j);
            store_element(dst.data(), out_type, k, merged(i, j));
          }
        }
        return;
      }
      matrix<double> delta(out_f, in_f);
      m->adapter.delta_weight(w0, delta.view());
      for (index i = 0; i < out_f; ++i) {
        for (index j = 0; j < in_f; ++j) {
          const auto k = static_cast<std::size_t>(fan_in_fan_out ? j * out_f + i : i * in_f + j);
          store_element(dst.data(), out_type, k, load_element<double>(src, src_type, k) + delta(i, j));
        }
      }
    });
  }
  report.tensors = w.size();
  w.write(out);
  if (opt.quantized_base) report.requantized = opt.quantized_base;
  return report;
}

}  // namespace peft::io
