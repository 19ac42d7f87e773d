// peft/serve/adapter_registry.hpp — many adapters on one frozen base, served in mixed batches,
// swapped while serving, and fused into the base for single-tenant use.
//
//   peft::serve::adapter_registry<peft::dense<float>> reg(std::move(bases));   // name -> base
//   reg.load("sql", "adapters/sql");                          // a PEFT checkpoint directory
//   auto batch = reg.begin({{"sql"}, {"chat", 0.5}, {""}});   // one request per row, "" = base
//   batch.forward("model.layers.0.self_attn.q_proj.weight", x, y);   // each layer, same batch
//   reg.fuse("sql");                                          // merged into the base (timed)
//
// Thread safety: add/load, replace, unload and set_scale are atomic and safe while other threads
// serve (a batch keeps the snapshot it began with). fuse()/unfuse() wait for open batches: never
// call them from a thread holding a batch, nor open a second batch in such a thread while
// another may fuse (deadlock). Errors are peft::error / format_error / unsupported_error, with
// nothing changed. Details and lock order: docs/serving.md.
#pragma once

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/adapters/any_adapter.hpp"
#include "peft/core/base_weight.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/serve/mixed_forward.hpp"

namespace peft::serve {

/// One row of a batch: its adapter ("" for the base alone) and a scale for its term.
struct request {
  std::string adapter;
  double scale = 1.0;
};

/// Seconds spent taking the previous adapter out of the base and putting the new one in.
struct switch_times {
  double unfuse_seconds = 0.0;
  double fuse_seconds = 0.0;
};

/// Bytes held: the frozen bases, and per adapter its tensors (values and gradient buffers; a
/// tensor shared by its modules counted once).
struct memory_usage {
  std::size_t base_bytes = 0;
  std::size_t adapter_bytes = 0;
  std::vector<std::pair<std::string, std::size_t>> adapters;
};

namespace detail {

/// Whether an adapter's add_term reads the base output h: every method that is not additive
/// (core/additive_adapter.hpp), i.e. whose term is not a function of x alone (DoRA, IA3, Compacter).
template <class A>
inline constexpr bool reads_base_output = !is_additive_adapter<A>;

/// A dense base (writable weight storage): the only kind fuse() merges into.
template <class Base>
concept dense_base = dense_storage_base<Base>;

template <class Base>
std::size_t base_bytes(const Base& b) {
  if constexpr (requires { b.storage_bytes(); }) {
    return b.storage_bytes();
  } else if constexpr (requires { b.weight(); b.bias(); }) {
    using S = std::remove_cvref_t<decltype(*b.weight().data())>;
    return static_cast<std::size_t>(b.weight().size()) * sizeof(S) + b.bias().size() * sizeof(S);
  } else {
    return 0;
  }
}

}  // namespace detail

template <base_weight Base, compute_scalar T = float>
class adapter_registry {
 public:
  using adapter_type = any_adapter<T>;
  using scalar = T;

  /// Over the frozen bases of a model, by weight name ("<module path>.weight", as PEFT
  /// checkpoints name them). The set of bases is fixed for the registry's lifetime.
  explicit adapter_registry(std::map<std::string, Base> bases) : bases_(std::move(bases)) {
    if (bases_.empty()) peft::detail::raise<error>("adapter_registry::adapter_registry", "no base weight given");
    count_base_bytes();
  }
  /// Over one frozen layer named `weight_name`.
  adapter_registry(std::string weight_name, Base base) {
    bases_.emplace(std::move(weight_name), std::move(base));
    count_base_bytes();
  }
  adapter_registry(const adapter_registry&) = delete;
  adapter_registry& operator=(const adapter_registry&) = delete;

  /// The frozen base of `weight_name` (peft::error if none). While an adapter is fused it holds
  /// that adapter's delta.
  const Base& base(const std::string& weight_name) const { return base_of("adapter_registry::base", weight_name); }
  std::vector<std::string> base_names() const {
    std::vector<std::string> n;
    for (const auto& [name, b] : bases_) n.push_back(name);
    return n;
  }

  // ---- adapters (each call is one atomic change, safe while other threads serve) ------------

  /// Loads a PEFT checkpoint directory as adapter `name`. Throws what load_peft_checkpoint throws,
  /// peft::error for a name in use, format_error for a module with no base of this registry or
  /// of another shape; nothing changes on failure.
  void load(const std::string& name, const std::filesystem::path& dir, double scale = 1.0) {
    add(name, io::load_peft_checkpoint<T>(dir, base_shape_fn()), scale);
  }
  /// Adds a loaded checkpoint under a new name.
  void add(const std::string& name, io::peft_checkpoint<T> ck, double scale = 1.0) {
    constexpr const char* where = "adapter_registry::add";
    auto data = make_data(where, name, std::move(ck));
    check_scale(where, scale);
    std::lock_guard writer(writer_mutex_);
    auto next = std::make_shared<state>(*current());
    if (next->adapters.count(name) != 0) peft::detail::raise<error>(where, "an adapter named '" + name + "' is loaded; replace() it");
    next->adapters.emplace(name, entry{std::move(data), scale});
    publish(std::move(next));
  }
  /// Adds one adapter for one base weight under a new name.
  void add(const std::string& name, const std::string& weight_name, adapter_type a, double scale = 1.0) {
    add(name, single_module(weight_name, std::move(a)), scale);
  }
  /// Replaces adapter `name` (its scale is kept). Batches begun before keep the old one.
  void replace(const std::string& name, io::peft_checkpoint<T> ck) {
    constexpr const char* where = "adapter_registry::replace";
    auto data = make_data(where, name, std::move(ck));
    std::lock_guard writer(writer_mutex_);
    auto next = std::make_shared<state>(*current());
    auto it = next->adapters.find(name);
    if (it == next->adapters.end()) peft::detail::raise<error>(where, "no adapter named '" + name + "'");
    if (next->fused && next->fused->name == name) {
      peft::detail::raise<error>(where, "adapter '" + name + "' is fused into the base; unfuse() it first");
    }
    it->second.data = std::move(data);
    publish(std::move(next));
  }
  void replace(const std::string& name, const std::filesystem::path& dir) {
    replace(name, io::load_peft_checkpoint<T>(dir, base_shape_fn()));
  }
  void replace(const std::string& name, const std::string& weight_name, adapter_type a) {
    replace(name, single_module(weight_name, std::move(a)));
  }
  /// Unloads adapter `name`; its memory is freed when the last batch using it ends.
  void unload(const std::string& name) {
    constexpr const char* where = "adapter_registry::unload";
    std::lock_guard writer(writer_mutex_);
    auto next = std::make_shared<state>(*current());
    if (next->adapters.count(name) == 0) peft::detail::raise<error>(where, "no adapter named '" + name + "'");
    if (next->fused && next->fused->name == name) {
      peft::detail::raise<error>(where, "adapter '" + name + "' is fused into the base; unfuse() it first");
    }
    next->adapters.erase(name);
    publish(std::move(next));
  }
  /// The run-time scale of adapter `name` (multiplies its term; 1 as loaded).
  void set_scale(const std::string& name, double scale) {
    constexpr const char* where = "adapter_registry::set_scale";
    check_scale(where, scale);
    std::lock_guard writer(writer_mutex_);
    auto next = std::make_shared<state>(*current());
    auto it = next->adapters.find(name);
    if (it == next->adapters.end()) peft::detail::raise<error>(where, "no adapter named '" + name + "'");
    it->second.scale = scale;
    publish(std::move(next));
  }
  double scale(const std::string& name) const { return get(*current(), "adapter_registry::scale", name).scale; }
  bool contains(const std::string& name) const { return current()->adapters.count(name) != 0; }
  std::vector<std::string> names() const {
    const auto s = current();  // held: a range-for does not keep current()'s temporary alive (C++20)
    std::vector<std::string> n;
    for (const auto& [name, e] : s->adapters) n.push_back(name);
    return n;
  }
  /// The method of adapter `name` ("lora", "dora", ...).
  std::string method(const std::string& name) const { return get(*current(), "adapter_registry::method", name).data->method; }
  /// Whether adapter `name` takes the grouped low-rank path on every module (else some groups
  /// are applied one by one).
  bool low_rank(const std::string& name) const {
    const auto s = current();
    for (const auto& [w, m] : get(*s, "adapter_registry::low_rank", name).data->modules) {
      if (!low_rank_of(m.adapter)) return false;
    }
    return true;
  }

  memory_usage memory() const {
    memory_usage u;
    // Counted when the bases change (fusing may give one a bias): reading the bases here would
    // race with fuse() in another thread.
    u.base_bytes = base_bytes_.load(std::memory_order_acquire);
    const auto s = current();
    for (const auto& [name, e] : s->adapters) {
      u.adapters.emplace_back(name, e.data->bytes);
      u.adapter_bytes += e.data->bytes;
    }
    return u;
  }

  // ---- serving -------------------------------------------------------------------------------

  class batch;

  /// Opens a batch: one request per row, resolved against the current adapters (peft::error
  /// for an unknown name or a non-finite scale). The batch keeps them for all its layers.
  batch begin(std::span<const request> rows) const { return batch(*this, rows); }
  batch begin(std::initializer_list<request> rows) const { return batch(*this, std::span<const request>(rows.begin(), rows.size())); }

  /// One layer for one batch of requests: begin(rows).forward(weight_name, x, y).
  void forward(const std::string& weight_name, matrix_view<const T> x, matrix_view<T> y,
               std::span<const request> rows) const {
    begin(rows).forward(weight_name, x, y);
  }

  // ---- fused mode ----------------------------------------------------------------------------

  /// Fuses adapter `name` into the bases (unfusing the one fused before). Needs a dense base;
  /// the adapter must have a low-rank term or be SHiRA. Waits for open batches to end.
  switch_times fuse(const std::string& name) {
    constexpr const char* where = "adapter_registry::fuse";
    // Lock order: turnstile, bases, writer. New batches wait at the turnstile (fuse cannot
    // starve); the writer lock comes last so a thread holding a batch may still add or unload.
    std::lock_guard turnstile(gate_);
    std::unique_lock bases_lock(base_mutex_);
    std::lock_guard writer(writer_mutex_);
    auto next = std::make_shared<state>(*current());
    const entry& e = get(*next, where, name);
    check_fusable(where, name, *e.data);
    switch_times t;
    if (next->fused && next->fused->name == name && next->fused->data == e.data && next->fused->scale == e.scale) return t;
    using clock = std::chrono::steady_clock;
    if (next->fused) {
      const auto start = clock::now();
      take_out(*next->fused);
      next->fused.reset();
      t.unfuse_seconds = std::chrono::duration<double>(clock::now() - start).count();
    }
    const auto start = clock::now();
    fused_state f{name, e.data, e.scale};
    try {
      put_in(f);  // undoes its own partial work on failure
    } catch (...) {
      publish(std::move(next));  // the old adapter is out: say so
      throw;
    }
    next->fused = std::move(f);
    t.fuse_seconds = std::chrono::duration<double>(clock::now() - start).count();
    publish(std::move(next));
    return t;
  }
  /// Takes the fused adapter out of the bases (no-op when none is fused).
  switch_times unfuse() {
    std::lock_guard turnstile(gate_);  // the lock order of fuse()
    std::unique_lock bases_lock(base_mutex_);
    std::lock_guard writer(writer_mutex_);
    auto next = std::make_shared<state>(*current());
    switch_times t;
    if (!next->fused) return t;
    const auto start = std::chrono::steady_clock::now();
    take_out(*next->fused);
    next->fused.reset();
    t.unfuse_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    publish(std::move(next));
    return t;
  }
  /// The fused adapter's name, or "".
  std::string fused() const {
    const auto s = current();
    return s->fused ? s->fused->name : std::string();
  }

 private:
  struct module_data {
    const Base* base = nullptr;
    adapter_type adapter;
    bool reads_base_output = false;
  };
  struct adapter_data {
    std::string method;
    std::map<std::string, module_data> modules;  // by weight name
    std::size_t bytes = 0;
  };
  struct entry {
    std::shared_ptr<const adapter_data> data;
    double scale = 1.0;
  };
  struct fused_state {
    std::string name;
    std::shared_ptr<const adapter_data> data;
    double scale = 1.0;
  };
  struct state {
    std::map<std::string, entry> adapters;
    std::optional<fused_state> fused;
  };

 public:
  /// A batch of requests bound to one snapshot of the registry (see begin()). Move-only; holds
  /// the bases in shared mode until destroyed.
  class batch {
   public:
    /// One layer: y = base(x) plus each row's adapter term. x (rows, in), y (rows, out).
    void forward(const std::string& weight_name, matrix_view<const T> x, matrix_view<T> y) const {
      constexpr const char* where = "adapter_registry::batch::forward";
      const Base& b = registry_->base_of(where, weight_name);
      if (x.rows() != rows_) {
        peft::detail::raise<shape_error>(where, "x has " + std::to_string(x.rows()) + " rows, the batch has " +
                                                    std::to_string(rows_) + " requests");
      }
      std::vector<batch_group<adapter_type>> groups;
      groups.reserve(groups_.size());
      for (const auto& g : groups_) {
        const auto it = g.data->modules.find(weight_name);
        if (it == g.data->modules.end()) continue;  // this adapter does not target this layer
        const module_data& md = it->second;
        groups.push_back(group_of(md.adapter, g.rows, g.factors));
      }
      mixed_forward(b, x, y, std::span<const batch_group<adapter_type>>(groups));
    }
    index rows() const noexcept { return rows_; }

   private:
    friend class adapter_registry;
    struct group {
      std::shared_ptr<const adapter_data> data;
      std::vector<index> rows;
      std::vector<T> factors;
    };

    batch(const adapter_registry& reg, std::span<const request> rows)
        : registry_(&reg), lock_(reg.shared_bases()), state_(reg.current()), rows_(static_cast<index>(rows.size())) {
      constexpr const char* where = "adapter_registry::begin";
      std::map<std::string, std::size_t> gid;
      const fused_state* fused = state_->fused ? &*state_->fused : nullptr;
      std::vector<index> fused_rows;
      std::vector<T> fused_factors;
      for (std::size_t i = 0; i < rows.size(); ++i) {
        const request& q = rows[i];
        if (!std::isfinite(q.scale)) {
          peft::detail::raise<error>(where, "request " + std::to_string(i) + " has a non-finite scale");
        }
        const auto r = static_cast<index>(i);
        double fused_factor = fused ? -fused->scale : 0.0;  // the fused term this row must not get
        if (!q.adapter.empty()) {
          const entry& e = get(*state_, where, q.adapter);
          const double f = e.scale * q.scale;
          if (fused && fused->name == q.adapter) {
            fused_factor = f - fused->scale;
          } else {
            if (fused && std::any_of(e.data->modules.begin(), e.data->modules.end(),
                                     [](const auto& kv) { return kv.second.reads_base_output; })) {
              peft::detail::raise<unsupported_error>(where, "adapter '" + q.adapter + "' (" + e.data->method +
                                                                ") reads the base output and cannot be served while '" +
                                                                fused->name + "' is fused into it; unfuse() first");
            }
            auto [it, inserted] = gid.try_emplace(q.adapter, groups_.size());
            if (inserted) groups_.push_back({e.data, {}, {}});
            groups_[it->second].rows.push_back(r);
            groups_[it->second].factors.push_back(static_cast<T>(f));
          }
        }
        if (fused && fused_factor != 0.0) {
          fused_rows.push_back(r);
          fused_factors.push_back(static_cast<T>(fused_factor));
        }
      }
      if (!fused_rows.empty()) groups_.push_back({fused->data, std::move(fused_rows), std::move(fused_factors)});
    }

    const adapter_registry* registry_;
    std::shared_lock<std::shared_mutex> lock_;
    std::shared_ptr<const state> state_;
    index rows_ = 0;
    std::vector<group> groups_;
  };

 private:
  static void check_scale(const char* where, double s) {
    if (!std::isfinite(s)) peft::detail::raise<error>(where, "the scale must be finite");
  }

  /// The bases in shared mode, behind the turnstile a pending fuse()/unfuse() holds.
  std::shared_lock<std::shared_mutex> shared_bases() const {
    std::lock_guard turnstile(gate_);
    return std::shared_lock<std::shared_mutex>(base_mutex_);
  }

  std::shared_ptr<const state> current() const {
    std::lock_guard g(state_mutex_);
    return state_;
  }
  void publish(std::shared_ptr<const state> next) {
    std::lock_guard g(state_mutex_);
    state_ = std::move(next);
  }

  static const entry& get(const state& s, const char* where, const std::string& name) {
    const auto it = s.adapters.find(name);
    if (it == s.adapters.end()) peft::detail::raise<error>(where, "no adapter named '" + name + "'");
    return it->second;
  }

  const Base& base_of(const char* where, const std::string& weight_name) const {
    const auto it = bases_.find(weight_name);
    if (it == bases_.end()) peft::detail::raise<error>(where, "no base weight named '" + weight_name + "'");
    return it->second;
  }

  io::base_shape_fn base_shape_fn() const {
    return [this](const std::string& module) -> std::optional<std::pair<index, index>> {
      const auto it = bases_.find(module + ".weight");
      if (it == bases_.end()) return std::nullopt;
      return std::pair<index, index>{it->second.out_features(), it->second.in_features()};
    };
  }

  io::peft_checkpoint<T> single_module(const std::string& weight_name, adapter_type a) const {
    io::peft_checkpoint<T> ck;
    std::string path = weight_name;
    if (path.ends_with(".weight")) path.resize(path.size() - 7);
    ck.modules.push_back({path, weight_name, std::move(a)});
    return ck;
  }

  /// Checks a checkpoint against the bases and builds its immutable entry (outside any lock).
  std::shared_ptr<const adapter_data> make_data(const char* where, const std::string& name, io::peft_checkpoint<T> ck) const {
    if (name.empty()) peft::detail::raise<error>(where, "an adapter name must not be empty (\"\" means the base alone)");
    if (!ck.embeddings.empty()) {
      peft::detail::raise<unsupported_error>(where, "adapter '" + name + "' changes the embedding table of '" +
                                                        ck.embeddings.first_path() +
                                                        "' (LoRA on embeddings or trainable_token_indices), which serving "
                                                        "does not run; merge it into the base");
    }
    if (ck.modules.empty()) peft::detail::raise<error>(where, "adapter '" + name + "' has no module");
    if (!ck.saved_tensors.empty()) {
      peft::detail::raise<unsupported_error>(where, "adapter '" + name + "' replaces whole tensors (modules_to_save, e.g. '" +
                                                        ck.saved_tensors.front().name + "'); a shared base cannot serve it");
    }
    auto data = std::make_shared<adapter_data>();
    data->method = std::string(ck.modules.front().adapter.active_method());
    std::vector<const void*> shared_seen;
    for (auto& m : ck.modules) {
      const auto it = bases_.find(m.weight_name);
      if (it == bases_.end()) {
        peft::detail::raise<format_error>(where, "adapter '" + name + "' targets '" + m.weight_name +
                                                     "', which is not a base weight of this registry");
      }
      const Base& b = it->second;
      m.adapter.set_features(b.in_features(), b.out_features());
      if (m.adapter.in_features() != b.in_features() || m.adapter.out_features() != b.out_features()) {
        peft::detail::raise<format_error>(where, "adapter '" + name + "' is " +
                                                     peft::detail::shape_string(m.adapter.out_features(), m.adapter.in_features()) +
                                                     " at '" + m.weight_name + "', the base is " +
                                                     peft::detail::shape_string(b.out_features(), b.in_features()));
      }
      for (const auto& p : m.adapter.parameters()) {
        if (p.shared) {
          if (std::find(shared_seen.begin(), shared_seen.end(), p.value.data()) != shared_seen.end()) continue;
          shared_seen.push_back(p.value.data());
        }
        data->bytes += static_cast<std::size_t>(p.value.size() + p.grad.size()) * sizeof(T);
      }
      auto [slot, inserted] = data->modules.try_emplace(m.weight_name);
      if (!inserted) peft::detail::raise<format_error>(where, "adapter '" + name + "' targets '" + m.weight_name + "' twice");
      slot->second.base = &b;
      slot->second.adapter = std::move(m.adapter);
      slot->second.reads_base_output = slot->second.adapter.visit(
          [](const auto& a) { return detail::reads_base_output<std::decay_t<decltype(a)>>; });
    }
    return data;
  }

  void check_fusable(const char* where, const std::string& name, const adapter_data& d) const {
    for (const auto& [w, md] : d.modules) {
      const bool shira_alt = md.adapter.template holds<shira<T>>();
      if (!low_rank_of(md.adapter) && !shira_alt) {
        peft::detail::raise<unsupported_error>(where, "adapter '" + name + "' (" + d.method +
                                                          ") is neither low-rank nor SHiRA: serve it unfused");
      }
      if constexpr (!detail::dense_base<Base>) {
        peft::detail::raise<unsupported_error>(where, "the base is not dense: merging into a quantized base re-quantizes "
                                                      "it (lossy, not undoable); serve the adapter unfused");
      } else if (shira_alt) {
        if constexpr (!requires(Base& b, shira<T>& s) { s.apply(b); }) {
          peft::detail::raise<unsupported_error>(where, "SHiRA fuses into dense bases only");
        }
      }
    }
  }

  /// W0 += f delta (or SHiRA's scatter) on every module; on failure the modules done are undone.
  void put_in(const fused_state& f) {
    std::vector<std::string> done;
    try {
      for (const auto& [w, md] : f.data->modules) {
        apply_module(w, md, f.scale, +1);
        done.push_back(w);
      }
    } catch (...) {
      for (const auto& w : done) apply_module(w, f.data->modules.at(w), f.scale, -1);
      count_base_bytes();
      throw;
    }
    count_base_bytes();
  }
  void take_out(const fused_state& f) {
    for (const auto& [w, md] : f.data->modules) apply_module(w, md, f.scale, -1);
    count_base_bytes();
  }
  /// base_bytes_ from the bases (under the exclusive base lock, or before any other thread runs).
  void count_base_bytes() {
    std::size_t n = 0;
    for (const auto& [name, b] : bases_) n += detail::base_bytes(b);
    base_bytes_.store(n, std::memory_order_release);
  }

  void apply_module(const std::string& w, const module_data& md, double scale, int sign) {
    if constexpr (detail::dense_base<Base>) {
      Base& b = bases_.at(w);
      if (const auto* s = md.adapter.template get_if<shira<T>>()) {
        if constexpr (requires(Base& bb, shira<T>& ss) { ss.apply(bb); }) {
          if (sign > 0) {
            shira<T> copy = *s;
            copy.discard_applications();
            copy.set_scale(static_cast<T>(static_cast<double>(copy.scale()) * scale));
            copy.apply(b);
            shira_applied_.emplace(w, std::move(copy));
          } else {
            auto it = shira_applied_.find(w);
            it->second.remove(b);
            shira_applied_.erase(it);
          }
        }
        return;
      }
      matrix<T> dw(b.out_features(), b.in_features());
      md.adapter.delta_weight(b, dw.view());
      b.add_to_weight(matrix_view<const T>(dw.view()), sign * scale);
      std::vector<T> db(static_cast<std::size_t>(b.out_features()));
      if (md.adapter.delta_bias(b, db.data())) b.add_to_bias(static_cast<const T*>(db.data()), sign * scale);
    } else {
      (void)w, (void)md, (void)scale, (void)sign;
    }
  }

  std::map<std::string, Base> bases_;
  std::atomic<std::size_t> base_bytes_{0};  // what memory() reports for the bases
  mutable std::shared_mutex base_mutex_;  // batches: shared; fuse/unfuse: exclusive
  mutable std::mutex gate_;               // taken by fuse/unfuse before base_mutex_, by batches briefly
  mutable std::mutex state_mutex_;        // guards the state_ pointer only
  std::mutex writer_mutex_;               // one change at a time
  std::shared_ptr<const state> state_ = std::make_shared<state>();
  std::map<std::string, shira<T>> shira_applied_;  // the SHiRA copies scattered into the bases
};

}  // namespace peft::serve
