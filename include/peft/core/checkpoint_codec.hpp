// peft/core/checkpoint_codec.hpp — the concept a method's checkpoint codec satisfies.
//
// An adapter type is mathematics only; what it is called in a HuggingFace PEFT checkpoint (its
// adapter_config.json fields and tensor names) is the business of its codec,
// io::peft_codec<Adapter> (io/peft/<method>.hpp). A codec either has a format:
//   static constexpr bool has_format = true;
//   static bool handles(const io::adapter_config&);                 this config is this method
//   static std::vector<std::string_view> module_tensors();          per-module tensor names
//   static std::vector<std::string_view> shared_tensors();          "base_model.<name>" tensors
//   static bool integer_tensor(std::string_view name);              stored as integers (indices)
//   static Adapter from_checkpoint(config, module tensors, shared tensors);
//   static void describe_in(const Adapter&, io::adapter_config&, const std::string& module);
// or says why there is none (has_format = false and `static constexpr std::string_view
// no_format_reason`): saving such an adapter is an unsupported_error carrying that reason.
#pragma once

#include <concepts>
#include <string>
#include <string_view>

#include "peft/core/dtype.hpp"

namespace peft::io {
struct adapter_config;
template <compute_scalar T>
class checkpoint_tensors;
}  // namespace peft::io

namespace peft {

template <class C, class A>
concept checkpoint_codec =
    std::same_as<decltype(C::has_format), const bool> &&
    (!C::has_format ||
     requires(const io::adapter_config& c, io::adapter_config& out, const io::checkpoint_tensors<typename A::scalar>& m,
              const A& a, const std::string& module, std::string_view name) {
       { C::handles(c) } -> std::convertible_to<bool>;
       C::module_tensors();
       C::shared_tensors();
       { C::integer_tensor(name) } -> std::convertible_to<bool>;
       { C::from_checkpoint(c, m, m) } -> std::same_as<A>;
       C::describe_in(a, out, module);
     }) &&
    (C::has_format || requires { { C::no_format_reason } -> std::convertible_to<std::string_view>; });

}  // namespace peft
