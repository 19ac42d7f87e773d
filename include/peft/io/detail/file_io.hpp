// peft/io/detail/file_io.hpp — what the file formats share: a read-only memory mapping that
// several objects may keep alive, and an output file that appears whole or not at all.
//
//   auto map = io::detail::mapped_bytes::open("safetensors_file::open", path);  // shared_ptr
//   io::detail::atomic_output out("gguf_writer::write", path);  // <dir>/.<name>.tmp-<random>
//   out.write(bytes, n);
//   out.commit();          // fsync, rename over `path`, fsync the directory
//   // destroyed without commit(): the temporary file is removed, `path` untouched
//
//   io::detail::atomic_directory dir("finetune", "out/ckpt");   // <parent>/.<name>.tmp-<pid>-<random>/
//   save_files_into(dir.path());
//   dir.commit();          // fsync every file, swap the directories in one rename, remove the old one
//
// Errors are io_error naming the `where` given and the OS's reason.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>  // renameat2, RENAME_EXCHANGE (glibc, _GNU_SOURCE)
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "peft/core/error.hpp"

namespace peft::io::detail {

inline std::string errno_text(int e) { return std::system_category().message(e); }

/// 16 hex digits, distinct for concurrent callers and retries (splitmix64 over time, pid, a
/// counter and `salt`).
inline std::string random_hex(std::uintptr_t salt) {
  static std::atomic<std::uint64_t> counter{0};
  std::uint64_t z = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                    (static_cast<std::uint64_t>(::getpid()) << 32) ^ salt;
  z += 0x9e3779b97f4a7c15ull * (counter.fetch_add(1) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  std::string hex(16, '0');
  for (int i = 0; i < 16; ++i) hex[static_cast<std::size_t>(i)] = "0123456789abcdef"[(z >> (4 * i)) & 0xfu];
  return hex;
}

/// Removes the entries of `dir` named <prefix><pid>-* whose process no longer runs: what writers
/// killed mid-write left (a live writer's, or one whose pid cannot be read, is kept).
inline void remove_stale_temporaries(const std::filesystem::path& dir, const std::string& prefix) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (!n.starts_with(prefix)) continue;
    long pid = 0;
    std::size_t i = prefix.size();
    for (; i < n.size() && n[i] >= '0' && n[i] <= '9' && pid < 100000000; ++i) pid = pid * 10 + (n[i] - '0');
    if (i == prefix.size() || i >= n.size() || n[i] != '-' || pid <= 0) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM) continue;  // still running
    stale.push_back(e.path());
  }
  for (const auto& p : stale) fs::remove_all(p, ec);
}

/// fsync of a file or directory; false when it cannot be opened or synced.
inline bool sync_path(const std::filesystem::path& p, bool directory) {
  const int fd = ::open(p.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::fsync(fd) == 0;
  ::close(fd);
  return ok;
}

/// A regular file mapped read-only (MAP_PRIVATE), unmapped when the last owner lets go. The file
/// must not be truncated by someone else meanwhile (that is SIGBUS for any mmap reader).
class mapped_bytes {
 public:
  mapped_bytes(const mapped_bytes&) = delete;
  mapped_bytes& operator=(const mapped_bytes&) = delete;
  ~mapped_bytes() {
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
  }

  /// Maps `path`; io_error if it cannot be opened, is not a regular file or cannot be mapped.
  /// An empty file gives size() == 0 and data() == nullptr.
  static std::shared_ptr<const mapped_bytes> open(std::string_view where, const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int e = errno;
      peft::detail::raise<io_error>(where, "cannot open '" + path.string() + "': " + errno_text(e));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int e = errno;
      ::close(fd);
      peft::detail::raise<io_error>(where, "cannot stat '" + path.string() + "': " + errno_text(e));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      peft::detail::raise<io_error>(where, "'" + path.string() + "' is not a regular file");
    }
    if (static_cast<std::uintmax_t>(st.st_size) > std::numeric_limits<std::size_t>::max()) {
      ::close(fd);
      peft::detail::raise<io_error>(where, "'" + path.string() + "' is too large to map");
    }
    std::shared_ptr<mapped_bytes> m(new mapped_bytes);
    m->size_ = static_cast<std::size_t>(st.st_size);
    if (m->size_ > 0) {  // mmap of length 0 is an error; an empty file is simply empty
      void* p = ::mmap(nullptr, m->size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int e = errno;
        ::close(fd);
        m->size_ = 0;
        peft::detail::raise<io_error>(where, "cannot map '" + path.string() + "': " + errno_text(e));
      }
      m->data_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);  // the mapping stays valid without the descriptor
    return m;
  }

  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

  /// Drops the whole pages inside [p, p + n) from this process's resident memory
  /// (madvise MADV_DONTNEED): the mapping stays valid and a later read faults them in from the
  /// file again (the file is mapped read-only, so nothing is lost). Loaders call it after
  /// converting a tensor, so that reading a model does not hold the whole file resident.
  void release(const std::byte* p, std::size_t n) const noexcept {
    if (data_ == nullptr || p < data_ || n == 0 || p + n > data_ + size_) return;
    const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto b = (reinterpret_cast<std::uintptr_t>(p) + page - 1) / page * page;
    const auto e = (reinterpret_cast<std::uintptr_t>(p) + n) / page * page;
    if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
  }

 private:
  mapped_bytes() = default;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/// A file written atomically: bytes go to a fresh temporary file beside `path`
/// (.<name>.tmp-<pid>-<random>); commit() fsyncs it, renames it over `path` and fsyncs the
/// directory. Without commit() (an exception on the way) the temporary file is removed and `path`
/// is untouched; one left by a killed process is removed by the next writer of `path`.
class atomic_output {
 public:
  /// io_error if `path` names no file or the temporary file cannot be created.
  atomic_output(std::string_view where, const std::filesystem::path& path) : where_(where), target_(path) {
    if (!path.has_filename()) peft::detail::raise<io_error>(where_, "'" + path.string() + "' does not name a file");
    dir_ = path.parent_path();
    if (dir_.empty()) dir_ = ".";
    create_temp(path.filename().string());
  }
  atomic_output(const atomic_output&) = delete;
  atomic_output& operator=(const atomic_output&) = delete;
  ~atomic_output() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_ && !temp_.empty()) ::unlink(temp_.c_str());
  }

  /// Appends `size` bytes (io_error on a failed write, e.g. a full disk).
  void write(const void* data, std::size_t size) {
    constexpr std::size_t chunk = std::size_t{1} << 30;
    const auto* p = static_cast<const char*>(data);
    while (size > 0) {
      const ssize_t w = ::write(fd_, p, std::min(size, chunk));
      if (w < 0) {
        if (errno == EINTR) continue;
        fail("cannot write");
      }
      p += w;
      size -= static_cast<std::size_t>(w);
      written_ += static_cast<std::size_t>(w);
    }
  }

  /// Appends `n` zero bytes.
  void write_zeros(std::size_t n) {
    static constexpr char zeros[64] = {};
    while (n > 0) {
      const std::size_t k = std::min(n, sizeof zeros);
      write(zeros, k);
      n -= k;
    }
  }

  /// Bytes written so far.
  std::size_t written() const noexcept { return written_; }

  /// Makes the file durable and puts it at `path`.
  void commit() {
    if (::fsync(fd_) != 0) fail("cannot fsync");
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail("cannot close");
    if (::rename(temp_.c_str(), target_.c_str()) != 0) {
      const int e = errno;
      peft::detail::raise<io_error>(where_, "cannot rename '" + temp_.string() + "' to '" + target_.string() +
                                                "': " + errno_text(e));
    }
    committed_ = true;
    (void)sync_path(dir_, true);  // the rename made durable; a directory that cannot be synced is no error
  }

 private:
  [[noreturn]] void fail(std::string_view what) const {
    const int e = errno;
    peft::detail::raise<io_error>(where_, std::string(what) + " '" + temp_.string() + "': " + errno_text(e));
  }

  void create_temp(const std::string& filename) {
    remove_stale_temporaries(dir_, "." + filename + ".tmp-");
    int last_errno = 0;
    std::filesystem::path candidate;
    for (int attempt = 0; attempt < 32; ++attempt) {
      candidate = dir_ / ("." + filename + ".tmp-" + std::to_string(::getpid()) + "-" +
                          random_hex(reinterpret_cast<std::uintptr_t>(this)));
      const int fd = ::open(candidate.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd >= 0) {
        fd_ = fd;
        temp_ = candidate;
        return;
      }
      last_errno = errno;
      if (last_errno != EEXIST && last_errno != EINTR) break;
    }
    peft::detail::raise<io_error>(where_, "cannot create '" + candidate.string() + "': " + errno_text(last_errno));
  }

  std::string where_;
  std::filesystem::path target_, dir_, temp_;
  int fd_ = -1;
  bool committed_ = false;
  std::size_t written_ = 0;
};

/// A directory replaced as a whole: the new contents are written into a fresh temporary directory
/// beside `path` (path() names it); commit() fsyncs them, hard-links into it whatever `path` holds
/// that the new contents do not replace (a log being appended to stays the same file), and swaps
/// the two directories with one rename (Linux renameat2 RENAME_EXCHANGE) before removing the old
/// one. A reader of `path`, or a process killed at any moment, sees the old contents or the new,
/// never a mix. Without commit() the temporary directory is removed. Temporary directories left by
/// killed processes (.<name>.tmp-<pid>-*, pid no longer running) are removed by the next writer.
/// Where the file system cannot exchange (EINVAL), the old directory is renamed aside first: a
/// crash between the two renames leaves it as .<name>.old-*, not at `path`.
class atomic_directory {
 public:
  atomic_directory(std::string_view where, const std::filesystem::path& path) : where_(where) {
    namespace fs = std::filesystem;
    target_ = path.lexically_normal();
    if (!target_.has_filename()) target_ = target_.parent_path();  // "dir/"
    if (!target_.has_filename() || target_.filename() == "." || target_.filename() == "..") {
      peft::detail::raise<io_error>(where_, "'" + path.string() + "' does not name a directory");
    }
    std::error_code ec;
    if (fs::exists(target_, ec) && !fs::is_directory(target_, ec)) {
      peft::detail::raise<io_error>(where_, "'" + path.string() + "' exists and is not a directory");
    }
    parent_ = target_.parent_path();
    if (parent_.empty()) parent_ = ".";
    fs::create_directories(parent_, ec);
    if (ec) peft::detail::raise<io_error>(where_, "cannot create '" + parent_.string() + "': " + ec.message());
    remove_stale_temporaries(parent_, "." + target_.filename().string() + ".tmp-");
    const std::string prefix = "." + target_.filename().string() + ".tmp-" + std::to_string(::getpid()) + "-";
    int last_errno = 0;
    for (int attempt = 0; attempt < 32; ++attempt) {
      temp_ = parent_ / (prefix + random_hex(reinterpret_cast<std::uintptr_t>(this)));
      if (::mkdir(temp_.c_str(), 0777) == 0) return;
      last_errno = errno;
      if (last_errno != EEXIST && last_errno != EINTR) break;
    }
    const auto failed = temp_;
    temp_.clear();
    peft::detail::raise<io_error>(where_, "cannot create '" + failed.string() + "': " + errno_text(last_errno));
  }
  atomic_directory(const atomic_directory&) = delete;
  atomic_directory& operator=(const atomic_directory&) = delete;
  ~atomic_directory() {
    std::error_code ec;
    if (!committed_ && !temp_.empty()) std::filesystem::remove_all(temp_, ec);
  }

  /// The temporary directory to write the new contents into.
  const std::filesystem::path& path() const noexcept { return temp_; }
  /// The directory commit() replaces.
  const std::filesystem::path& target() const noexcept { return target_; }

  /// Makes the new contents durable and puts them at target() (io_error if any step fails; the
  /// old contents are then still at target()).
  void commit() {
    namespace fs = std::filesystem;
    std::error_code ec;
    for (const auto& e : fs::recursive_directory_iterator(temp_, ec)) {
      const bool dir = e.is_directory(ec);
      if (!dir && !e.is_regular_file(ec)) continue;
      if (!sync_path(e.path(), dir)) fail("cannot fsync '" + e.path().string() + "'", errno);
    }
    if (ec) fail("cannot list '" + temp_.string() + "'", ec.value());
    if (!sync_path(temp_, true)) fail("cannot fsync '" + temp_.string() + "'", errno);
    if (!fs::exists(target_, ec)) {
      if (::rename(temp_.c_str(), target_.c_str()) != 0) fail("cannot rename '" + temp_.string() + "'", errno);
    } else {
      keep_old_entries(target_, temp_);
      if (!exchange()) {
        // No exchange here: the old directory aside, the new one in place, the old one removed.
        const auto aside = parent_ / ("." + target_.filename().string() + ".old-" + std::to_string(::getpid()) + "-" +
                                      random_hex(reinterpret_cast<std::uintptr_t>(this)));
        if (::rename(target_.c_str(), aside.c_str()) != 0) fail("cannot rename '" + target_.string() + "'", errno);
        if (::rename(temp_.c_str(), target_.c_str()) != 0) {
          const int e = errno;
          (void)::rename(aside.c_str(), target_.c_str());
          fail("cannot rename '" + temp_.string() + "'", e);
        }
        temp_ = aside;
      }
    }
    committed_ = true;
    (void)sync_path(parent_, true);
    if (fs::exists(temp_, ec)) fs::remove_all(temp_, ec);  // the old contents, now at the temporary name
    temp_.clear();
  }

 private:
  [[noreturn]] void fail(const std::string& what, int e) const {
    peft::detail::raise<io_error>(where_, what + ": " + errno_text(e));
  }

  /// Swaps temp_ and target_; false where the file system cannot (the caller falls back).
  bool exchange() const {
#if defined(__linux__) && defined(RENAME_EXCHANGE)
    if (::renameat2(AT_FDCWD, temp_.c_str(), AT_FDCWD, target_.c_str(), RENAME_EXCHANGE) == 0) return true;
    if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP) fail("cannot swap '" + temp_.string() + "' in", errno);
#endif
    return false;
  }

  /// Hard-links into `to` each entry of `from` that `to` lacks (directories recreated).
  void keep_old_entries(const std::filesystem::path& from, const std::filesystem::path& to) const {
    namespace fs = std::filesystem;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(from, ec)) {
      const auto name = e.path().filename();
      const std::string n = name.string();
      if (n.starts_with(".") && n.find(".tmp-") != std::string::npos) continue;  // someone's temporary file
      const auto dest = to / name;
      if (fs::exists(fs::symlink_status(dest, ec))) {
        if (e.is_directory(ec) && fs::is_directory(dest, ec)) keep_old_entries(e.path(), dest);
        continue;
      }
      if (e.is_directory(ec) && !e.is_symlink(ec)) {
        if (::mkdir(dest.c_str(), 0777) != 0) fail("cannot create '" + dest.string() + "'", errno);
        keep_old_entries(e.path(), dest);
      } else if (::link(e.path().c_str(), dest.c_str()) != 0) {
        fs::copy(e.path(), dest, fs::copy_options::copy_symlinks, ec);  // where hard links are not allowed
        if (ec) fail("cannot keep '" + e.path().string() + "'", ec.value());
      }
    }
    if (ec) fail("cannot list '" + from.string() + "'", ec.value());
  }

  std::string where_;
  std::filesystem::path target_, parent_, temp_;
  bool committed_ = false;
};

}  // namespace peft::io::detail
