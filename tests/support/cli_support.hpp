// Running the built `peft` tool from a test (PEFT_CLI_PATH): exit status, stdout and stderr.
#pragma once

#ifdef PEFT_CLI_PATH

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "support/file_support.hpp"

namespace peft_test {

struct run_result {
  int status = -1;
  std::string out, err;
};

/// `peft ARGS` through the shell (ARGS quoted by the caller), its output kept in `scratch`.
inline run_result run_cli(const std::string& args, const std::filesystem::path& scratch) {
  const auto out = scratch / "stdout.txt", err = scratch / "stderr.txt";
  const std::string cmd = std::string("'") + PEFT_CLI_PATH + "' " + args + " >'" + out.string() + "' 2>'" + err.string() + "'";
  const int raw = std::system(cmd.c_str());
  run_result r;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

/// A path in single quotes for the shell.
inline std::string quoted(const std::filesystem::path& p) { return "'" + p.string() + "'"; }

}  // namespace peft_test

#endif
