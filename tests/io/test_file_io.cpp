// io/detail/file_io.hpp's outputs that appear whole or not at all: a file (atomic_output) and a
// directory (atomic_directory), including what killed writers leave behind.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <string>

#include "peft/io/detail/file_io.hpp"
#include "support/file_support.hpp"

namespace test_file_io {

namespace {
namespace fs = std::filesystem;

using peft_test::slurp;

void put(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary) << text; }

struct scratch : peft_test::scratch_dir {
  scratch() : peft_test::scratch_dir("peft_file_io_" + std::to_string(::getpid())) {}
};

int entries(const fs::path& dir) {
  int n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++n;
  return n;
}

/// A pid no process has now (the highest pid Linux allows is below 2^22).
const std::string dead_pid = "99999999";
}  // namespace

TEST_CASE("atomic_directory replaces a directory whole, keeps the files it does not write", "[io][file_io]") {
  scratch s;
  const auto target = s.dir / "ck";
  {
    peft::io::detail::atomic_directory d("test", target);
    put(d.path() / "a.txt", "one");
    CHECK(!fs::exists(target));  // nothing before commit
    d.commit();
  }
  CHECK(slurp(target / "a.txt") == "one");
  put(target / "log.csv", "kept");
  fs::create_directories(target / "sub");
  put(target / "sub" / "x", "x");
  {
    peft::io::detail::atomic_directory d("test", target);
    put(d.path() / "a.txt", "two");
    put(d.path() / "b.txt", "new");
    CHECK(slurp(target / "a.txt") == "one");
    d.commit();
  }
  CHECK(slurp(target / "a.txt") == "two");
  CHECK(slurp(target / "b.txt") == "new");
  CHECK(slurp(target / "log.csv") == "kept");  // the same file, by a hard link
  CHECK(slurp(target / "sub" / "x") == "x");
  CHECK(entries(s.dir) == 1);                  // no temporary left
  // Destroyed without commit: the old contents stay, the temporary goes.
  {
    peft::io::detail::atomic_directory d("test", target);
    put(d.path() / "a.txt", "three");
  }
  CHECK(slurp(target / "a.txt") == "two");
  CHECK(entries(s.dir) == 1);
}

TEST_CASE("atomic outputs remove what killed writers left, and only that", "[io][file_io]") {
  scratch s;
  const auto stale_dir = s.dir / (".ck.tmp-" + dead_pid + "-0123456789abcdef");
  const auto live_dir = s.dir / (".ck.tmp-" + std::to_string(::getpid()) + "-0123456789abcdef");
  const auto stale_file = s.dir / (".f.bin.tmp-" + dead_pid + "-0123456789abcdef");
  const auto other = s.dir / ".unrelated.tmp-1-x";
  for (const auto& d : {stale_dir, live_dir}) fs::create_directories(d);
  put(stale_file, "half");
  put(other, "?");
  {
    peft::io::detail::atomic_directory d("test", s.dir / "ck");
    d.commit();
  }
  CHECK(!fs::exists(stale_dir));
  CHECK(fs::exists(live_dir));  // a running writer's (this process's) is left alone
  {
    peft::io::detail::atomic_output o("test", s.dir / "f.bin");
    o.write("abc", 3);
    o.commit();
  }
  CHECK(!fs::exists(stale_file));
  CHECK(fs::exists(other));
  CHECK(slurp(s.dir / "f.bin") == "abc");
}

TEST_CASE("atomic_directory refuses a path that is not a directory name", "[io][file_io][errors]") {
  scratch s;
  put(s.dir / "file", "x");
  CHECK_THROWS_AS(peft::io::detail::atomic_directory("test", s.dir / "file"), peft::io_error);
  CHECK_THROWS_WITH(peft::io::detail::atomic_directory("test", s.dir / "file"), Catch::Contains("test") && Catch::Contains("not a directory"));
  CHECK_THROWS_AS(peft::io::detail::atomic_directory("test", "/"), peft::io_error);
  CHECK(slurp(s.dir / "file") == "x");
}

}  // namespace test_file_io
