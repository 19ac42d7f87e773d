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

namespace peft_test {

/// The bytes of file `p` ("" when it cannot be read).
inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

/// How many '\n' `s` holds.
inline int lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

/// <temp>/<name>, emptied on construction and removed on destruction.
struct scratch_dir {
  std::filesystem::path dir;
  explicit scratch_dir(const std::string& name) : dir(std::filesystem::temp_directory_path() / name) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  scratch_dir(const scratch_dir&) = delete;
  scratch_dir& operator=(const scratch_dir&) = delete;
  ~scratch_dir() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

/// A directory of this test process, <temp>/peft_test_<random tag>, removed when the process
/// exits: for files several test cases share. Test binaries run concurrently (ctest -j, several
/// builds), so a fixed name would collide; callers prefix their file names with their test's name.
inline const std::filesystem::path& process_scratch() {
  static const scratch_dir d("peft_test_" + std::to_string(std::random_device{}()));
  return d.dir;
}

}  // namespace peft_test
