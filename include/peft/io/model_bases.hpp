// peft/io/model_bases.hpp — the frozen bases of a model's linear layers, read from its weights.
//
//   auto model = peft::io::model_files::open("path/to/model");   // file, sharded index or directory
//   auto q = peft::io::load_base<peft::dense<float>>(model, "model.layers.0.self_attn.q_proj");
//   auto ck = peft::io::load_peft_checkpoint<float>("path/to/adapter");
//   auto bases = peft::io::load_bases<peft::q4_0>(model, ck);   // weight name -> base, every
//                                                               // module the adapter targets
//
// A base is built from "<module>.weight" (out, in) and "<module>.bias" when the model has it:
// dense<S> converts the stored dtype to S; a quantized format (int8_rowwise, q4_0, nf4) quantizes
// the weight on load (QLoRA: the full-precision weight is never kept). With fan_in_fan_out (GPT-2
// Conv1D) the weight is stored (in, out) and transposed. Errors: format_error naming the module
// when the model has no such weight or it is not a floating matrix.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/core/base_weight.hpp"
#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/io/model_files.hpp"

namespace peft::io {

namespace detail {

/// Base::quantize(weight, bias) for a quantized format, Base::from(weight, bias) for dense<S>.
template <class Base, class U>
Base make_base(matrix_view<const U> w, const U* bias) {
  if constexpr (requires { Base::quantize(w, bias); }) {
    return Base::quantize(w, bias);
  } else {
    static_assert(requires { Base::from(w, bias); },
                  "load_base: the base type needs a static quantize(weight, bias) or from(weight, bias)");
    return Base::from(w, bias);
  }
}

/// Whether Base keeps its weight in double (dense<double>).
template <class Base>
constexpr bool stores_double() {
  if constexpr (requires { typename Base::storage_type; }) {
    return std::is_same_v<typename Base::storage_type, double>;
  } else {
    return false;
  }
}

}  // namespace detail

/// The base of `module` (its "<module>.weight" and, when present, "<module>.bias").
template <base_weight Base>
Base load_base(const model_files& model, const std::string& module, bool fan_in_fan_out = false) {
  constexpr const char* where = "load_base";
  // Values are read in double only for a double base; f32 keeps the transient copy small.
  using U = std::conditional_t<detail::stores_double<Base>(), double, float>;
  const auto name = model.resolve(module, "weight");
  if (!name) peft::detail::raise<format_error>(where, "the model has no weight for module '" + module + "'");
  const tensor_info& info = model.info(*name);
  if (info.shape.size() != 2 || !is_floating(info.type)) {
    peft::detail::raise<format_error>(where, "'" + *name + "' is not a floating matrix (" +
                                                 std::string(safetensors_name(info.type)) + " " +
                                                 peft::detail::shape_text(info.shape) + ")");
  }
  matrix<U> w = model.file_of(*name).template read_matrix<U>(*name);
  model.file_of(*name).release(*name);  // the file's pages need not stay resident
  if (fan_in_fan_out) {
    matrix<U> t(w.cols(), w.rows());
    for (index i = 0; i < w.rows(); ++i) {
      for (index j = 0; j < w.cols(); ++j) t(j, i) = w(i, j);
    }
    w = std::move(t);
  }
  std::vector<U> bias;
  if (const auto bname = model.resolve(module, "bias")) {
    const tensor_info& binfo = model.info(*bname);
    if (binfo.shape != std::vector<std::int64_t>{static_cast<std::int64_t>(w.rows())} || !is_floating(binfo.type)) {
      peft::detail::raise<format_error>(where, "'" + *bname + "' is not a floating vector of " +
                                                   std::to_string(w.rows()) + " values");
    }
    bias = model.file_of(*bname).template read<U>(*bname);
  }
  return detail::make_base<Base, U>(matrix_view<const U>(w.view()), bias.empty() ? nullptr : bias.data());
}

/// The bases of every module `select(module)` accepts among the model's 2-D floating
/// "<module>.weight" tensors, by weight name.
template <base_weight Base>
std::map<std::string, Base> load_bases(const model_files& model, const std::function<bool(const std::string&)>& select,
                                       bool fan_in_fan_out = false) {
  std::map<std::string, Base> bases;
  for (const auto& name : model.names()) {
    if (!name.ends_with(".weight")) continue;
    const tensor_info& info = model.info(name);
    if (info.shape.size() != 2 || !is_floating(info.type)) continue;
    const std::string module = name.substr(0, name.size() - 7);
    if (select(module)) bases.emplace(name, load_base<Base>(model, module, fan_in_fan_out));
  }
  return bases;
}

/// The bases of every module a loaded PEFT checkpoint adapts, by the checkpoint's weight names
/// ("<module path>.weight"); each module's layout as PEFT decides it (model_files.hpp:
/// stored_in_out; the config's fan_in_fan_out is the last resort).
template <base_weight Base, class Checkpoint>
  requires requires(const Checkpoint& ck) {
    ck.modules.front().path;
    ck.config.fan_in_fan_out;
    ck.modules.front().adapter.in_features();
  }
std::map<std::string, Base> load_bases(const model_files& model, const Checkpoint& ck) {
  std::map<std::string, Base> bases;
  for (const auto& m : ck.modules) {
    const std::pair<std::int64_t, std::int64_t> in_out{m.adapter.in_features(), m.adapter.out_features()};
    bases.emplace(m.weight_name, load_base<Base>(model, m.path, stored_in_out(model, m.path, in_out, ck.config.fan_in_fan_out)));
  }
  return bases;
}

}  // namespace peft::io
