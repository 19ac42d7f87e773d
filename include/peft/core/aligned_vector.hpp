// peft/core/aligned_vector.hpp — a std::vector whose storage starts on a cache line.
//
//   peft::aligned_vector<float> v(n);   // v.data() % 64 == 0
//
// For layouts whose kernels load whole cache lines (base/packed_f32.hpp's panels): malloc
// aligns large blocks to 16 bytes only, which makes every 64-byte vector load straddle two lines.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace peft {

/// std::allocator with `Align`-byte aligned storage (C++17 aligned operator new).
template <class T, std::size_t Align = 64>
struct aligned_allocator {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = aligned_allocator<U, Align>;
  };

  aligned_allocator() noexcept = default;
  template <class U>
  aligned_allocator(const aligned_allocator<U, Align>&) noexcept {}  // NOLINT(google-explicit-constructor)

  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{Align}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{Align}); }

  template <class U>
  bool operator==(const aligned_allocator<U, Align>&) const noexcept {
    return true;
  }
};

/// A vector of T aligned to 64 bytes.
template <class T>
using aligned_vector = std::vector<T, aligned_allocator<T, 64>>;

}  // namespace peft
