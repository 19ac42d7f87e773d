// peft/io/detail/file_io.hpp — what the file formats share: a read-only memory mapping that
// several objects may keep alive, and an output file that appears whole or not at all.
//
//   auto map = io::detail::mapped_bytes::open("safetensors_file::open", path);  // shared_ptr
//   io::detail::atomic_output out("gguf_writer::write", path);  // <dir>/.<name>.tmp-<random>
//   out.write(bytes, n);
//   out.commit();          // fsync, rename over `path`, fsync the directory
//   // destroyed without commit(): the temporary file is removed, `path` untouched
//
// Errors are io_error naming the `where` given and the OS's reason.
#pragma once

#include <fcntl.h>
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

#include "peft/core/error.hpp"

namespace peft::io::detail {

inline std::string errno_text(int e) { return std::system_category().message(e); }

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

 private:
  mapped_bytes() = default;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/// A file written atomically: bytes go to a fresh temporary file beside `path`; commit() fsyncs
/// it, renames it over `path` and fsyncs the directory. Without commit() (an exception on the
/// way) the temporary file is removed and `path` is untouched.
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
    // Make the rename durable; a directory that cannot be synced is not an error.
    const int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  }

 private:
  [[noreturn]] void fail(std::string_view what) const {
    const int e = errno;
    peft::detail::raise<io_error>(where_, std::string(what) + " '" + temp_.string() + "': " + errno_text(e));
  }

  void create_temp(const std::string& filename) {
    static std::atomic<std::uint64_t> counter{0};
    std::uint64_t seed = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                         (static_cast<std::uint64_t>(::getpid()) << 32) ^ reinterpret_cast<std::uintptr_t>(this);
    int last_errno = 0;
    std::filesystem::path candidate;
    for (int attempt = 0; attempt < 32; ++attempt) {
      // splitmix64 over seed + counter: distinct names for concurrent writers and retries
      std::uint64_t z = (seed += 0x9e3779b97f4a7c15ull + counter.fetch_add(1));
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      char hex[17];
      for (int i = 0; i < 16; ++i) hex[i] = "0123456789abcdef"[(z >> (4 * i)) & 0xfu];
      hex[16] = '\0';
      candidate = dir_ / ("." + filename + ".tmp-" + hex);
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

}  // namespace peft::io::detail
