// Files in tests: a whole file as a string, counting lines, and scratch directories that are
// removed with their contents at the end of a test or of the test process.
#pragma once

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <system_error>
#include <utility>

#include <unistd.h>

namespace peft_test {

/// The bytes of file `p` ("" when it cannot be read).
inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

/// How many '\n' `s` holds.
inline int lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

namespace detail {
/// Directory `dir`, emptied on construction and removed with its contents on destruction.
struct owned_dir {
  std::filesystem::path dir;
  explicit owned_dir(std::filesystem::path p) : dir(std::move(p)) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  owned_dir(const owned_dir&) = delete;
  owned_dir& operator=(const owned_dir&) = delete;
  ~owned_dir() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};
}  // namespace detail

/// This test process's directory, <temp>/peft_test_<pid>_<random tag>, removed when the process
/// exits. Every file a test writes goes under it: test binaries run concurrently (ctest -j runs
/// the unit shards side by side, and a test case of one shard may share a helper, or a template,
/// with a test case of the other), so a fixed name directly under <temp> would be shared.
inline const std::filesystem::path& process_scratch() {
  static const detail::owned_dir d(std::filesystem::temp_directory_path() /
                                   ("peft_test_" + std::to_string(::getpid()) + "_" +
                                    std::to_string(std::random_device{}())));
  return d.dir;
}

/// process_scratch() / name: a file or directory name of this process (not created).
inline std::filesystem::path temp_path(const std::string& name) { return process_scratch() / name; }

/// temp_path(name) as a directory of one test: emptied on construction, removed on destruction.
struct scratch_dir : detail::owned_dir {
  explicit scratch_dir(const std::string& name) : owned_dir(temp_path(name)) {}
};

}  // namespace peft_test
