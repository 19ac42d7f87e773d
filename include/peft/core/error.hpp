// peft/core/error.hpp — the exception hierarchy.
//
// Every error the library raises derives from peft::error. Messages start with the function
// that detected the problem in brackets, then say what is wrong: "[lora::forward] x has 63
// columns, expected 64".
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace peft {

/// Base class of every exception thrown by peft-cpp.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Shapes or sizes that do not fit together (a caller's mistake).
class shape_error : public error {
 public:
  using error::error;
};

/// Malformed input data: a corrupt safetensors file, a bad adapter_config.json.
class format_error : public error {
 public:
  using error::error;
};

/// The operating system refused: a file that cannot be opened, mapped, written or renamed.
class io_error : public error {
 public:
  using error::error;
};

/// Well-formed input asking for something this library does not do (yet).
class unsupported_error : public error {
 public:
  using error::error;
};

namespace detail {

/// "[where] what" — the house format of every message.
inline std::string message(std::string_view where, std::string_view what) {
  std::string m;
  m.reserve(where.size() + what.size() + 3);
  m += '[';
  m += where;
  m += "] ";
  m += what;
  return m;
}

template <class Error>
[[noreturn]] inline void raise(std::string_view where, std::string_view what) {
  throw Error(message(where, what));
}

}  // namespace detail
}  // namespace peft
