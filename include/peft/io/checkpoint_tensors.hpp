// peft/io/checkpoint_tensors.hpp — what an adapter type reads from a PEFT checkpoint.
//
// The loader groups the tensors of adapter_model.safetensors by module and hands each adapter
// type's `from_checkpoint` the module's tensors (keyed by parameter name: "lora_A.weight",
// "vera_lambda_b", ...) converted to the compute scalar, plus the tensors shared by every module
// ("base_model.vera_A" -> "vera_A"), each loaded once and referenced, never copied, by every
// adapter that asks for it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"

namespace peft::io {

/// Optional access to the base model for the loader: module path -> its weight W0 (out_features,
/// in_features) in double (dequantized, transposed back for fan_in_fan_out), or nullopt.
using base_weight_fn = std::function<std::optional<matrix<double>>(const std::string& module)>;

/// One stored tensor, converted to T.
template <compute_scalar T>
struct stored_tensor {
  std::vector<std::int64_t> shape;
  dtype type = dtype::f32;           // as stored in the file
  std::shared_ptr<matrix<T>> data;   // 2-D (rows, cols); 1-D as (1, n); n-D as (d0, d1*...*dn)
};

namespace detail {
using peft::detail::shape_text;
}  // namespace detail

/// The tensors of one module (or, for `shared`, of the whole model), by parameter name.
template <compute_scalar T>
class checkpoint_tensors {
 public:
  checkpoint_tensors() = default;
  explicit checkpoint_tensors(std::string module) : module_(std::move(module)) {}

  const std::string& module() const noexcept { return module_; }
  /// The base weight's (out_features, in_features) when the caller of the loader knows it
  /// (merge_model does): for methods whose tensors do not determine the layer's shape (SHiRA).
  const std::optional<std::pair<index, index>>& base_shape() const noexcept { return base_shape_; }
  void set_base_shape(std::optional<std::pair<index, index>> s) { base_shape_ = s; }
  /// The base weight W0 (out, in) in double when the caller of the loader gave the base model
  /// (base_weight_fn): for initialisations PEFT re-runs on load (PiSSA, OLoRA). nullopt otherwise.
  std::optional<matrix<double>> base_weight() const {
    if (base_weight_ == nullptr || !*base_weight_) return std::nullopt;
    return (*base_weight_)(module_);
  }
  void set_base_weight(const base_weight_fn* f) noexcept { base_weight_ = f; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const std::map<std::string, stored_tensor<T>>& all() const noexcept { return tensors_; }
  void add(const std::string& name, stored_tensor<T> t) { tensors_[name] = std::move(t); }

  /// The tensor `name`; format_error naming the module when it is missing.
  const stored_tensor<T>& get(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) {
      peft::detail::raise<format_error>("load_peft_checkpoint", where() + " has no tensor '" + name + "'");
    }
    return it->second;
  }
  /// A copy of tensor `name` as a matrix; with `shape` given, format_error unless it matches.
  matrix<T> copy(const std::string& name, const std::vector<std::int64_t>& shape = {}) const {
    return *shared(name, shape);
  }
  /// The tensor `name` itself (shared, not copied), checked against `shape` when given.
  std::shared_ptr<matrix<T>> shared(const std::string& name, const std::vector<std::int64_t>& shape = {}) const {
    const auto& t = get(name);
    if (!shape.empty() && t.shape != shape) {
      peft::detail::raise<format_error>("load_peft_checkpoint", where() + ": '" + name + "' is " +
                                                                    detail::shape_text(t.shape) + ", expected " +
                                                                    detail::shape_text(shape));
    }
    return t.data;
  }
  /// The object `key` every module of one load shares, made by `make()` on the first request:
  /// what a method builds from a shared tensor and trains (VB-LoRA's vector bank, value and
  /// gradient). The loader hands every module the same `shared` set, alive for the whole load.
  template <class U, class Make>
  std::shared_ptr<U> shared_object(const std::string& key, Make&& make) const {
    auto& p = objects_[key];
    if (!p) p = std::make_shared<U>(std::forward<Make>(make)());
    return std::static_pointer_cast<U>(p);
  }
  /// The dimensions of tensor `name`; format_error unless it has `rank` of them.
  const std::vector<std::int64_t>& shape(const std::string& name, std::size_t rank) const {
    const auto& t = get(name);
    if (t.shape.size() != rank) {
      peft::detail::raise<format_error>("load_peft_checkpoint", where() + ": '" + name + "' is " +
                                                                    detail::shape_text(t.shape) + ", expected " +
                                                                    std::to_string(rank) + " dimensions");
    }
    return t.shape;
  }

 private:
  std::string where() const { return module_.empty() ? std::string("the checkpoint") : "module '" + module_ + "'"; }
  std::string module_;
  std::map<std::string, stored_tensor<T>> tensors_;
  mutable std::map<std::string, std::shared_ptr<void>> objects_;  // shared_object
  std::optional<std::pair<index, index>> base_shape_;
  const base_weight_fn* base_weight_ = nullptr;  // the loader's, alive while codecs read
};

}  // namespace peft::io
