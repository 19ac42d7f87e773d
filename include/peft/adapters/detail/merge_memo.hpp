// peft/adapters/detail/merge_memo.hpp — what a merge remembered for its unmerge, shared safely.
//
//   struct remembered { matrix<T> delta; const void* base = nullptr; };
//   detail::merge_memo<remembered> memo_;
//   memo_.remember({std::move(delta), &w});      // in delta_weight (a const member function)
//   const remembered r = memo_.recall();         // in unmerge_delta: a copy, taken under the lock
//
// Adapters whose delta is a function of W0 that W0 + dW does not determine (DeFT, PEANuT, FRoD)
// remember it when they merge, from delta_weight, which is const: two threads merging the same
// adapter into two bases (or merging while another unmerges) must not race on it. The memo holds
// its state behind a mutex; copies and moves of the adapter copy or move the state (each memo has
// its own mutex). The last remember wins, as with one thread.
#pragma once

#include <mutex>
#include <utility>

namespace peft::detail {

template <class State>
class merge_memo {
 public:
  merge_memo() = default;
  merge_memo(const merge_memo& other) : state_(other.recall()) {}
  merge_memo(merge_memo&& other) : state_(other.take()) {}
  merge_memo& operator=(const merge_memo& other) {
    if (this != &other) remember(other.recall());
    return *this;
  }
  merge_memo& operator=(merge_memo&& other) {
    if (this != &other) remember(other.take());
    return *this;
  }
  ~merge_memo() = default;

  /// Replaces what is remembered.
  void remember(State state) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    state_ = std::move(state);
  }

  /// A copy of what is remembered (a default State when nothing is).
  State recall() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return state_;
  }

 private:
  State take() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(state_, State{});
  }

  mutable std::mutex mutex_;
  mutable State state_{};
};

}  // namespace peft::detail
