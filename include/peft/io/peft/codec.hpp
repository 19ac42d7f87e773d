// peft/io/peft/codec.hpp — what every method's checkpoint codec builds on (the concept is
// core/checkpoint_codec.hpp).
//
//   template <compute_scalar T>
//   struct peft_codec<my_method<T>> : codec_defaults {      // io/peft/my_method.hpp
//     static bool handles(const adapter_config& c) { return c.peft_type == "MY_METHOD"; }
//     static constexpr std::string_view config_fields[] = {"r", "my_alpha"};  // what it honours
//     static std::vector<std::string_view> module_tensors() { return {"my_a", "my_b"}; }
//     static my_method<T> from_checkpoint(const adapter_config&, const checkpoint_tensors<T>& m,
//                                         const checkpoint_tensors<T>& shared);
//     static void describe_in(const my_method<T>&, adapter_config&, const std::string& module);
//   };
//
// io::from_checkpoint<A>(...) and io::describe_in(a, ...) call a codec and turn "no format" into
// unsupported_error with the codec's reason.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "peft/core/checkpoint_codec.hpp"
#include "peft/core/error.hpp"
#include "peft/io/adapter_config.hpp"
#include "peft/io/checkpoint_tensors.hpp"
#include "peft/io/peft/config_fields.hpp"

namespace peft::io {

/// The codec of adapter type A; specialised in io/peft/<method>.hpp.
template <class A>
struct peft_codec;

/// Defaults of a codec with a format: no shared tensors, no integer tensors.
struct codec_defaults {
  static constexpr bool has_format = true;
  static std::vector<std::string_view> shared_tensors() { return {}; }
  static bool integer_tensor(std::string_view /*name*/) { return false; }
};

/// The codec of a method PEFT has no checkpoint format for.
struct no_peft_format {
  static constexpr bool has_format = false;
};

/// The adapter of one module, read by A's codec; unsupported_error for a method without a format.
template <class A>
A from_checkpoint(const adapter_config& c, const checkpoint_tensors<typename A::scalar>& m,
                  const checkpoint_tensors<typename A::scalar>& shared) {
  using codec = peft_codec<A>;
  if constexpr (codec::has_format) {
    return codec::from_checkpoint(c, m, shared);
  } else {
    std::string w(A::method);
    w += "::from_checkpoint";
    std::string msg(A::method);
    msg += " has no PEFT checkpoint format: ";
    msg += codec::no_format_reason;
    peft::detail::raise<unsupported_error>(w, msg);
  }
}

/// Makes `c` describe module `module` holding adapter `a` (for saving); unsupported_error for a
/// method without a format or an adapter the config cannot express.
template <class A>
void describe_in(const A& a, adapter_config& c, const std::string& module) {
  using codec = peft_codec<A>;
  if constexpr (codec::has_format) {
    codec::describe_in(a, c, module);
  } else {
    std::string w(A::method);
    w += "::describe_in";
    std::string msg(A::method);
    msg += " has no PEFT checkpoint format: ";
    msg += codec::no_format_reason;
    peft::detail::raise<unsupported_error>(w, msg);
  }
}

}  // namespace peft::io
