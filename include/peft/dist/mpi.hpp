// peft/dist/mpi.hpp — data-parallel adapter training over MPI (optional: needs an MPI library;
// the rest of peft-cpp never includes it).
//
//   peft::dist::environment env(argc, argv);                     // MPI_Init_thread ... Finalize
//   return peft::dist::run_or_abort(MPI_COMM_WORLD, [&] {
//     peft::dist::broadcast_parameters(MPI_COMM_WORLD, params);   // rank 0's initial adapters
//     peft::dist::gradient_allreducer<float> reduce(MPI_COMM_WORLD, params);
//     each step: backward of this rank's mean loss; reduce.allreduce(n_r, loss_r); opt.step(..);
//     peft::dist::save_on_root(MPI_COMM_WORLD, [&] { peft::io::save_peft_checkpoint(dir, ck); });
//   });
//
// Only adapter tensors travel (one fused MPI_Allreduce per step). MPI errors become
// peft::dist::mpi_error on every rank; run_or_abort turns any other exception into MPI_Abort.
// One thread per process makes MPI calls (MPI_THREAD_FUNNELED). Details: docs/distributed.md.
#pragma once

#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1  // the deprecated MPI C++ bindings are not used
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/core/parameter.hpp"

namespace peft::dist {

/// An MPI call returned an error code; code() is that code.
class mpi_error : public error {
 public:
  mpi_error(const std::string& what, int code) : error(what), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

/// How a rank's loss and gradients were reduced over its own examples (see the header comment).
enum class loss_reduction : std::uint8_t { mean, sum };

/// Which of a parameter list's tensors an operation covers.
enum class tensor_set : std::uint8_t {
  trainable,  // trainable, not integer (what an optimizer steps)
  all         // every listed tensor: also frozen adapter tensors (VeRA's projections), indices
};

/// What one reduction step learned about the global batch (identical on every rank).
struct step_result {
  double mean_loss = 0.0;     // (sum over ranks of the local loss sums) / examples
  std::int64_t examples = 0;  // sum over ranks of n_r
};

/// gradient_allreducer's settings.
struct allreduce_options {
  loss_reduction reduction = loss_reduction::mean;  // how each rank's loss and gradients are reduced
  bool check_layout = true;  // the constructor checks every rank lists the same tensors (one all-reduce)
};

/// One rank's counters, for gather_progress.
struct rank_progress {
  std::int64_t examples = 0;  // examples this rank processed
  double loss_sum = 0.0;      // sum of their losses
  double seconds = 0.0;       // time spent (e.g. in the training loop)
};

namespace detail {

/// Throws mpi_error "[where] <MPI's text> (MPI error code N)" unless code is MPI_SUCCESS.
inline void check(int code, std::string_view where) {
  if (code == MPI_SUCCESS) return;
  std::string what;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(code, text, &length) == MPI_SUCCESS && length > 0) {
    what.assign(text, static_cast<std::size_t>(std::min(length, MPI_MAX_ERROR_STRING)));
  } else {
    what = "unknown MPI error";
  }
  what += " (MPI error code ";
  what += std::to_string(code);
  what += ')';
  throw mpi_error(peft::detail::message(where, what), code);
}

template <class T>
MPI_Datatype datatype() {
  if constexpr (std::is_same_v<T, float>) {
    return MPI_FLOAT;
  } else {
    static_assert(std::is_same_v<T, double>, "peft::dist communicates float or double tensors");
    return MPI_DOUBLE;
  }
}

/// Sets MPI_ERRORS_RETURN on comm; returns its (rank, size).
inline std::pair<int, int> prepare(MPI_Comm comm, std::string_view where) {
  check(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN), where);
  int r = 0, s = 0;
  check(MPI_Comm_rank(comm, &r), where);
  check(MPI_Comm_size(comm, &s), where);
  return {r, s};
}

inline void check_root(int root, int size, std::string_view where) {
  if (root < 0 || root >= size) {
    std::string m = "root ";
    m += std::to_string(root);
    m += " is not a rank of a communicator of ";
    m += std::to_string(size);
    m += " processes";
    peft::detail::raise<error>(where, m);
  }
}

/// Calls op(pointer, count) over [data, data + n) in pieces of at most INT_MAX elements.
template <class T, class Op>
void in_chunks(T* data, std::size_t n, Op op) {
  constexpr auto limit = static_cast<std::size_t>(INT_MAX);
  if (n == 0) op(data, 0);  // still a collective call on every rank
  for (std::size_t first = 0; first < n; first += limit) op(data + first, static_cast<int>(std::min(limit, n - first)));
}

// 64-bit FNV-1a.
inline constexpr std::uint64_t fnv_offset = 14695981039346656037ull;
inline std::uint64_t fnv(std::uint64_t h, const void* data, std::size_t bytes) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}
inline std::uint64_t fnv_value(std::uint64_t h, std::uint64_t v) noexcept { return fnv(h, &v, sizeof v); }

/// The tensors of `params` an operation covers, each once, in list order.
template <class T>
struct tensor_plan {
  std::vector<matrix_view<T>> views;  // values or gradients
  std::size_t elements = 0;
  std::uint64_t layout = fnv_offset;  // hash of names and shapes
};

inline bool eligible(bool trainable, bool integer, tensor_set which) {
  return which == tensor_set::all || (trainable && !integer);
}

/// The gradients to reduce: trainable, not integer, non-empty gradient; a value listed twice
/// once (its entries must share gradient memory and shape). shape_error otherwise.
template <class T>
tensor_plan<T> plan_gradients(std::span<const parameter<T>> params, std::string_view where) {
  tensor_plan<T> plan;
  std::vector<const parameter<T>*> seen;
  for (const auto& p : params) {
    if (!p.trainable || p.integer || p.grad.empty()) continue;
    const auto dup = std::find_if(seen.begin(), seen.end(),
                                  [&](const parameter<T>* q) { return q->value.data() == p.value.data(); });
    if (dup != seen.end()) {
      const parameter<T>& q = **dup;
      if (q.grad.data() != p.grad.data() || q.grad.rows() != p.grad.rows() || q.grad.cols() != p.grad.cols()) {
        std::string m = "'";
        m += p.name;
        m += "' shares its value with '";
        m += q.name;
        m += "' but not its gradient";
        peft::detail::raise<shape_error>(where, m);
      }
      continue;
    }
    peft::detail::expect_shape(std::string(where).c_str(), ("gradient of '" + p.name + "'").c_str(), p.grad,
                               p.value.rows(), p.value.cols());
    seen.push_back(&p);
    plan.views.push_back(p.grad);
    plan.elements += static_cast<std::size_t>(p.grad.size());
    plan.layout = fnv(plan.layout, p.name.data(), p.name.size());
    plan.layout = fnv_value(plan.layout, static_cast<std::uint64_t>(p.grad.rows()));
    plan.layout = fnv_value(plan.layout, static_cast<std::uint64_t>(p.grad.cols()));
  }
  return plan;
}

/// The values an operation covers (tensor_set), each data pointer once.
template <class T>
tensor_plan<T> plan_values(std::span<const parameter<T>> params, tensor_set which) {
  tensor_plan<T> plan;
  std::vector<const T*> seen;
  for (const auto& p : params) {
    if (!eligible(p.trainable, p.integer, which) || p.value.empty()) continue;
    if (std::find(seen.begin(), seen.end(), p.value.data()) != seen.end()) continue;
    seen.push_back(p.value.data());
    plan.views.push_back(p.value);
    plan.elements += static_cast<std::size_t>(p.value.size());
    plan.layout = fnv(plan.layout, p.name.data(), p.name.size());
    plan.layout = fnv_value(plan.layout, static_cast<std::uint64_t>(p.value.rows()));
    plan.layout = fnv_value(plan.layout, static_cast<std::uint64_t>(p.value.cols()));
  }
  return plan;
}

template <class T>
void pack(const std::vector<matrix_view<T>>& views, T* out) {
  for (const auto& v : views) {
    for (index i = 0; i < v.rows(); ++i) out = std::copy(v.row(i), v.row(i) + v.cols(), out);
  }
}

template <class T>
void unpack(const T* in, const std::vector<matrix_view<T>>& views, T scale) {
  for (const auto& v : views) {
    for (index i = 0; i < v.rows(); ++i) {
      T* row = v.row(i);
      for (index j = 0; j < v.cols(); ++j) row[j] = *in++ * scale;
    }
  }
}

/// One all-reduce checking that every rank has the same (elements, layout); throws the same
/// error on every rank otherwise.
inline void verify_layout(MPI_Comm comm, std::size_t elements, std::uint64_t layout, std::string_view where) {
  std::uint64_t v[4] = {elements, ~static_cast<std::uint64_t>(elements), layout, ~layout};
  check(MPI_Allreduce(MPI_IN_PLACE, v, 4, MPI_UINT64_T, MPI_MAX, comm), where);
  const std::uint64_t max_n = v[0], min_n = ~v[1];
  if (max_n != min_n || v[2] != ~v[3]) {
    std::string m = "ranks disagree on the adapter tensors (between ";
    m += std::to_string(min_n);
    m += " and ";
    m += std::to_string(max_n);
    m += " elements";
    m += max_n == min_n ? ", different names or shapes)" : ")";
    m += ": every rank must list the same tensors in the same order";
    peft::detail::raise<shape_error>(where, m);
  }
}

[[noreturn]] inline void abort_job(MPI_Comm comm, const char* what, int exit_code) noexcept {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  const bool live = initialized != 0 && finalized == 0;
  int r = -1;
  if (live && MPI_Comm_rank(comm, &r) != MPI_SUCCESS) r = -1;
  char line[1024];  // one write of one line, so ranks' lines do not interleave; no allocation
  const int n = r >= 0 ? std::snprintf(line, sizeof line, "rank %d: %s", r, what)
                       : std::snprintf(line, sizeof line, "rank ?: %s", what);
  const std::size_t end = n < 0 ? 0 : std::min(static_cast<std::size_t>(n), sizeof line - 2);
  std::replace(line, line + end, '\n', ' ');
  line[end] = '\n';
  line[end + 1] = '\0';
  std::fflush(stdout);
  std::fputs(line, stderr);
  std::fflush(stderr);
  if (live) MPI_Abort(comm, exit_code);
  std::_Exit(exit_code);
}

enum class error_kind : std::int32_t { none, error, shape, format, io, unsupported, other };

[[noreturn]] inline void throw_kind(error_kind k, const std::string& m) {
  switch (k) {
    case error_kind::shape: throw shape_error(m);
    case error_kind::format: throw format_error(m);
    case error_kind::io: throw io_error(m);
    case error_kind::unsupported: throw unsupported_error(m);
    default: throw error(m);
  }
}

}  // namespace detail

/// Sets MPI_ERRORS_RETURN on comm (MPI errors become codes, which this header turns into
/// mpi_error) and returns this process's rank in it.
inline int rank(MPI_Comm comm) { return detail::prepare(comm, "dist::rank").first; }
/// The number of processes in comm (and sets MPI_ERRORS_RETURN on it).
inline int size(MPI_Comm comm) { return detail::prepare(comm, "dist::size").second; }

/// MPI_Init_thread(MPI_THREAD_FUNNELED) unless MPI is initialised already, MPI_ERRORS_RETURN on
/// MPI_COMM_WORLD; the destructor calls MPI_Finalize if this object initialised MPI. One per
/// process, in main. (After an exception on one rank, wrap the work in run_or_abort: finalizing
/// while another rank waits in a collective would hang.)
class environment {
 public:
  environment(int& argc, char**& argv) {
    constexpr std::string_view where = "dist::environment";
    int initialized = 0;
    detail::check(MPI_Initialized(&initialized), where);
    if (initialized == 0) {
      detail::check(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided_), where);
      owns_ = true;
    } else {
      detail::check(MPI_Query_thread(&provided_), where);
    }
    try {
      std::tie(rank_, size_) = detail::prepare(MPI_COMM_WORLD, where);
    } catch (...) {
      if (owns_) MPI_Finalize();
      throw;
    }
  }
  environment(const environment&) = delete;
  environment& operator=(const environment&) = delete;
  ~environment() {
    int finalized = 1;
    if (owns_ && MPI_Finalized(&finalized) == MPI_SUCCESS && finalized == 0) MPI_Finalize();
  }

  int rank() const noexcept { return rank_; }  // in MPI_COMM_WORLD
  int size() const noexcept { return size_; }
  int thread_level() const noexcept { return provided_; }  // MPI_THREAD_SINGLE ... _MULTIPLE

 private:
  bool owns_ = false;
  int provided_ = MPI_THREAD_SINGLE;
  int rank_ = 0, size_ = 1;
};

/// Returns fn() (0 when fn returns void). If fn throws, prints "rank K: <what>" as one line on
/// stderr and calls MPI_Abort(comm, exit_code), ending every process of the job (without MPI
/// initialised: exits with exit_code). Use it around all the work of main on every rank.
template <class Fn>
  requires std::invocable<Fn&> &&
           (std::is_void_v<std::invoke_result_t<Fn&>> || std::is_convertible_v<std::invoke_result_t<Fn&>, int>)
int run_or_abort(MPI_Comm comm, Fn&& fn, int exit_code = 1) noexcept {
  try {
    if constexpr (std::is_void_v<std::invoke_result_t<Fn&>>) {
      std::invoke(fn);
      return 0;
    } else {
      return static_cast<int>(std::invoke(fn));
    }
  } catch (const std::exception& e) {
    detail::abort_job(comm, e.what(), exit_code);
  } catch (...) {
    detail::abort_job(comm, "unknown exception", exit_code);
  }
}

/// Averages the gradients of `params` over the ranks of comm in one fused all-reduce; see the
/// header comment for the convention. Construct it on every rank with the same tensor list
/// (names, shapes, order): the constructor checks that with one all-reduce (shape_error on every
/// rank otherwise; skipped with .check_layout = false). It keeps the gradient views: pass the list again (allreduce(params, ...))
/// if the adapters were moved or re-created.
template <compute_scalar T>
class gradient_allreducer {
 public:
  gradient_allreducer(MPI_Comm comm, std::span<const parameter<T>> params, allreduce_options options = {})
      : comm_(comm), reduction_(options.reduction) {
    std::tie(rank_, size_) = detail::prepare(comm, where);
    plan_ = detail::plan_gradients(params, where);
    if (options.check_layout) detail::verify_layout(comm, plan_.elements, plan_.layout, where);
    buffer_.resize(plan_.elements + trailer);
  }

  /// Gradient elements reduced per step (each tensor once).
  std::size_t size() const noexcept { return plan_.elements; }
  /// Tensors reduced per step (each once).
  std::size_t tensors() const noexcept { return plan_.views.size(); }
  /// Bytes of the fused buffer per step: gradients + 3 trailing values (loss, count, error flag).
  std::size_t bytes() const noexcept { return buffer_.size() * sizeof(T); }
  /// Steps reduced so far.
  std::int64_t steps() const noexcept { return steps_; }

  /// This rank processed `local_count` examples with loss `local_loss` (mean or sum over them,
  /// as constructed) and holds the matching gradients; on return every rank holds the global
  /// mean's gradients. Collective. peft::error on every rank if the global batch is empty or
  /// some rank passed a negative count or more examples than T counts exactly.
  step_result allreduce(index local_count, double local_loss) { return run(local_count, local_loss, {}); }

  /// The same, first taking the gradient views of `params` (the same tensors as at construction;
  /// if not, every rank throws shape_error in this step).
  step_result allreduce(std::span<const parameter<T>> params, index local_count, double local_loss) {
    std::string problem;
    try {
      auto plan = detail::plan_gradients(params, where);
      if (plan.elements != plan_.elements || plan.layout != plan_.layout) {
        problem = "the parameter list differs from the one given at construction";
      } else {
        plan_ = std::move(plan);
      }
    } catch (const error& e) {
      problem = e.what();
    }
    return run(local_count, local_loss, std::move(problem));
  }

 private:
  static constexpr std::string_view where = "dist::allreduce_gradients";
  static constexpr std::size_t trailer = 3;  // loss, count, error flag

  step_result run(index local_count, double local_loss, std::string problem) {
    // 2^24 (float) or 2^53 (double): the largest count T holds exactly.
    constexpr auto exact = static_cast<index>(std::int64_t{1} << std::numeric_limits<T>::digits);
    if (problem.empty() && (local_count < 0 || local_count > exact)) {
      problem = "rank ";
      problem += std::to_string(rank_);
      problem += " passed ";
      problem += std::to_string(local_count);
      problem += " examples (0 to ";
      problem += std::to_string(exact);
      problem += " allowed)";
    }
    const std::size_t g = plan_.elements;
    T* buf = buffer_.data();
    if (!problem.empty() || local_count == 0) {
      std::fill(buffer_.begin(), buffer_.end(), T{0});
    } else {
      detail::pack(plan_.views, buf);
      const T w = reduction_ == loss_reduction::mean ? static_cast<T>(local_count) : T{1};
      if (w != T{1}) {
        for (std::size_t k = 0; k < g; ++k) buf[k] *= w;
      }
      buf[g] = static_cast<T>(static_cast<double>(w) * local_loss);
      buf[g + 1] = static_cast<T>(local_count);
    }
    buf[g + 2] = problem.empty() ? T{0} : T{1};
    const MPI_Datatype type = detail::datatype<T>();
    detail::in_chunks(buf, buffer_.size(), [&](T* p, int n) {
      detail::check(MPI_Allreduce(MPI_IN_PLACE, p, n, type, MPI_SUM, comm_), where);
    });
    ++steps_;
    if (!problem.empty()) peft::detail::raise<error>(where, problem);
    if (buf[g + 2] != T{0}) {
      std::string m = "another rank failed in this step (";
      m += std::to_string(static_cast<long long>(buf[g + 2]));
      m += " of ";
      m += std::to_string(size_);
      m += " ranks); see its message";
      peft::detail::raise<error>(where, m);
    }
    const T n = buf[g + 1];
    if (!(n > T{0})) peft::detail::raise<error>(where, "the global batch is empty: every rank passed 0 examples");
    detail::unpack(buf, plan_.views, T{1} / n);
    return {static_cast<double>(buf[g]) / static_cast<double>(n), static_cast<std::int64_t>(n)};
  }

  MPI_Comm comm_;
  loss_reduction reduction_;
  int rank_ = 0, size_ = 1;
  detail::tensor_plan<T> plan_;
  std::vector<T> buffer_;  // (gradients..., loss, count, error flag)
  std::int64_t steps_ = 0;
};

template <class T>
gradient_allreducer(MPI_Comm, const std::vector<parameter<T>>&) -> gradient_allreducer<T>;
template <class T>
gradient_allreducer(MPI_Comm, const std::vector<parameter<T>>&, allreduce_options) -> gradient_allreducer<T>;

/// One step of gradient_allreducer without its layout check (so exactly one MPI_Allreduce, and
/// a buffer allocated per call): the caller guarantees every rank lists the same tensors.
template <compute_scalar T>
step_result allreduce_gradients(MPI_Comm comm, const std::vector<parameter<T>>& params, index local_count,
                                double local_loss, loss_reduction reduction = loss_reduction::mean) {
  gradient_allreducer<T> reducer(comm, params, {.reduction = reduction, .check_layout = false});
  return reducer.allreduce(local_count, local_loss);
}

/// Sets every rank's tensors of `params` (trainable ones, or all) to rank `root`'s: one
/// layout check (an all-reduce of 4 integers) and one fused MPI_Bcast. Adapters that cache
/// something derived from their values (DoRA's norms) must have parameters() called again.
template <compute_scalar T>
void broadcast_parameters(MPI_Comm comm, const std::vector<parameter<T>>& params, int root = 0,
                          tensor_set which = tensor_set::trainable) {
  constexpr std::string_view where = "dist::broadcast_parameters";
  const auto [r, s] = detail::prepare(comm, where);
  detail::check_root(root, s, where);
  const auto plan = detail::plan_values(std::span<const parameter<T>>(params), which);
  detail::verify_layout(comm, plan.elements, plan.layout, where);
  std::vector<T> buffer(plan.elements);
  if (r == root) detail::pack(plan.views, buffer.data());
  const MPI_Datatype type = detail::datatype<T>();
  detail::in_chunks(buffer.data(), buffer.size(), [&](T* p, int n) {
    detail::check(MPI_Bcast(p, n, type, root, comm), where);
  });
  if (r != root) detail::unpack(buffer.data(), plan.views, T{1});
}

/// A 64-bit checksum (FNV-1a) of the bytes of `params`' values (trainable ones, or all), each
/// tensor once; chain with `seed` to cover several lists. Local: no communication.
template <compute_scalar T>
std::uint64_t checksum(const std::vector<parameter<T>>& params, tensor_set which = tensor_set::all,
                       std::uint64_t seed = detail::fnv_offset) {
  const auto plan = detail::plan_values(std::span<const parameter<T>>(params), which);
  std::uint64_t h = seed;
  for (const auto& v : plan.views) {
    for (index i = 0; i < v.rows(); ++i) h = detail::fnv(h, v.row(i), static_cast<std::size_t>(v.cols()) * sizeof(T));
  }
  return h;
}

/// The checksum of one matrix (e.g. a frozen base weight, to confirm every rank built the same).
template <class T>
std::uint64_t checksum(matrix_view<T> v, std::uint64_t seed = detail::fnv_offset) {
  std::uint64_t h = seed;
  for (index i = 0; i < v.rows(); ++i) h = detail::fnv(h, v.row(i), static_cast<std::size_t>(v.cols()) * sizeof(T));
  return h;
}

/// Whether every rank of comm passed the same value (one MPI_Allreduce; same answer everywhere).
inline bool same_on_all_ranks(MPI_Comm comm, std::uint64_t value) {
  constexpr std::string_view where = "dist::same_on_all_ranks";
  detail::prepare(comm, where);
  std::uint64_t v[2] = {value, ~value};
  detail::check(MPI_Allreduce(MPI_IN_PLACE, v, 2, MPI_UINT64_T, MPI_MAX, comm), where);
  return v[0] == ~v[1];  // max == min
}

/// Whether every rank holds bit-identical values of `params` (a checksum compared over comm).
template <compute_scalar T>
bool parameters_consistent(MPI_Comm comm, const std::vector<parameter<T>>& params,
                           tensor_set which = tensor_set::all) {
  return same_on_all_ranks(comm, checksum(params, which));
}

/// Runs save() on rank `root` only; every rank returns when it has finished (the others wait in
/// one MPI_Bcast of the outcome). If save() threw, every rank throws the same kind of peft error
/// (io_error, format_error, ...; peft::error for other exceptions) with the message
/// "[dist::save_on_root] rank <root>: <what>" (at most 1,000 bytes of it).
template <class Fn>
  requires std::invocable<Fn&>
void save_on_root(MPI_Comm comm, Fn&& save, int root = 0) {
  constexpr std::string_view where = "dist::save_on_root";
  const auto [r, s] = detail::prepare(comm, where);
  detail::check_root(root, s, where);
  struct outcome {
    std::int32_t kind;
    char text[1020];
  } o{};
  if (r == root) {
    auto record = [&](detail::error_kind k, const char* what) {
      o.kind = static_cast<std::int32_t>(k);
      std::strncpy(o.text, what, sizeof o.text - 1);
    };
    try {
      std::invoke(save);
    } catch (const shape_error& e) {
      record(detail::error_kind::shape, e.what());
    } catch (const format_error& e) {
      record(detail::error_kind::format, e.what());
    } catch (const io_error& e) {
      record(detail::error_kind::io, e.what());
    } catch (const unsupported_error& e) {
      record(detail::error_kind::unsupported, e.what());
    } catch (const std::exception& e) {
      record(detail::error_kind::error, e.what());
    } catch (...) {
      record(detail::error_kind::other, "unknown exception");
    }
  }
  detail::check(MPI_Bcast(&o, static_cast<int>(sizeof o), MPI_BYTE, root, comm), where);
  if (o.kind != 0) {
    std::string m = "rank ";
    m += std::to_string(root);
    m += ": ";
    m += std::string_view(o.text, static_cast<std::size_t>(std::find(o.text, o.text + sizeof o.text, '\0') - o.text));
    detail::throw_kind(static_cast<detail::error_kind>(o.kind), peft::detail::message(where, m));
  }
}

/// Gathers every rank's counters on `root` (one MPI_Gather): there, one entry per rank in rank
/// order; elsewhere an empty vector.
inline std::vector<rank_progress> gather_progress(MPI_Comm comm, const rank_progress& mine, int root = 0) {
  constexpr std::string_view where = "dist::gather_progress";
  const auto [r, s] = detail::prepare(comm, where);
  detail::check_root(root, s, where);
  const double send[3] = {static_cast<double>(mine.examples), mine.loss_sum, mine.seconds};
  std::vector<double> all(r == root ? 3 * static_cast<std::size_t>(s) : 0);
  detail::check(MPI_Gather(send, 3, MPI_DOUBLE, all.data(), 3, MPI_DOUBLE, root, comm), where);
  std::vector<rank_progress> out;
  for (std::size_t k = 0; k + 2 < all.size(); k += 3) {
    out.push_back({static_cast<std::int64_t>(all[k]), all[k + 1], all[k + 2]});
  }
  return out;
}

/// gather_progress's result as a table: one line per rank (examples, mean loss, seconds,
/// examples per second) and a total line.
inline std::string format_progress(const std::vector<rank_progress>& ranks) {
  std::string s = "  rank   examples   mean loss   seconds   examples/s\n";
  rank_progress total;
  char line[128];
  auto add = [&](const char* name, const rank_progress& p) {
    const double mean = p.examples > 0 ? p.loss_sum / static_cast<double>(p.examples) : 0.0;
    const double rate = p.seconds > 0 ? static_cast<double>(p.examples) / p.seconds : 0.0;
    std::snprintf(line, sizeof line, "  %4s %10lld %11.5f %9.3f %12.0f\n", name, static_cast<long long>(p.examples),
                  mean, p.seconds, rate);
    s += line;
  };
  for (std::size_t k = 0; k < ranks.size(); ++k) {
    add(std::to_string(k).c_str(), ranks[k]);
    total.examples += ranks[k].examples;
    total.loss_sum += ranks[k].loss_sum;
    total.seconds = std::max(total.seconds, ranks[k].seconds);
  }
  add("all", total);
  return s;
}

}  // namespace peft::dist
