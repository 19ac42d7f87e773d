// peft/train/optimizer.hpp — AdamW and SGD over adapters' parameters, equal to torch.optim's
// (foreach=False) operation by operation, with parameter groups and saved state.
//
//   peft::train::adamw<float> opt(layer.parameters(), {.lr = 1e-3});       // + optional groups
//   opt.set_schedule(peft::train::linear_schedule_with_warmup(100, 1000));   // train/schedule.hpp
//   for (...) { layer.zero_grad(); forward; backward; opt.step(layer.parameters()); }
//   opt.save_state("optimizer.safetensors");   opt.load_state("optimizer.safetensors");
//
// Steps each trainable, non-integer tensor with a gradient once (shared tensors are recognised by
// their data pointer). Pass step() parameters fetched after the last forward, so adapters that
// cache values derived from them (DoRA's norms) see the change. Errors: peft::error for invalid
// options, shape_error for mismatched parameters, format_error from load_state (nothing changed).
// Formulas, groups and the state file format: docs/training.md.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "peft/core/dtype.hpp"
#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/core/parameter.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/train/schedule.hpp"

namespace peft::train {

/// torch.optim.AdamW's hyperparameters and defaults.
struct adamw_options {
  double lr = 1e-3;
  std::array<double, 2> betas = {0.9, 0.999};
  double eps = 1e-8;
  double weight_decay = 1e-2;
  bool amsgrad = false;
};

/// torch.optim.SGD's hyperparameters and defaults.
struct sgd_options {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

/// A parameter group: the parameters `select` accepts, stepped with `options`.
template <compute_scalar T, class Options>
struct param_group {
  std::string name;
  std::function<bool(const parameter<T>&)> select = {};
  Options options = {};
};

/// Selects parameters whose name contains `text` (e.g. "lora_gate").
struct name_contains {
  std::string text;
  template <class T>
  bool operator()(const parameter<T>& p) const {
    return p.name.find(text) != std::string::npos;
  }
};

namespace detail {

/// One de-duplicated tensor the optimizer steps, with its state.
template <class T>
struct optimizer_slot {
  std::string name;
  std::vector<std::int64_t> shape;  // logical shape (as saved)
  matrix_view<T> value;
  matrix_view<T> grad;
  std::size_t group = 0;
  std::int64_t step = 0;               // updates taken (torch's state["step"])
  std::array<matrix<T>, 3> buffers;    // the rule's buffers; empty until created
};

inline std::string quoted_name(std::string_view s) {
  std::string q = "'";
  q += s;
  q += '\'';
  return q;
}

/// "<name>::<fn>", the house prefix of a message.
inline std::string where(std::string_view name, std::string_view fn) {
  std::string w(name);
  w += "::";
  w += fn;
  return w;
}

/// "<what> must be <rule>, got <v>" for an option of group `group`.
[[noreturn]] inline void bad_option(const std::string& where, const std::string& group, const char* what,
                                    const char* rule, double v) {
  std::string m = "group ";
  m += detail::quoted_name(group);
  m += ": ";
  m += what;
  m += " must be ";
  m += rule;
  m += ", got ";
  m += std::to_string(v);
  peft::detail::raise<peft::error>(where, m);
}

/// A finite JSON number at `key` of `o`, or format_error.
inline double json_number(const std::string& where, const nlohmann::json& o, const char* key) {
  const auto it = o.find(key);
  if (it == o.end() || !it->is_number()) {
    std::string m = "options lack a number ";
    m += detail::quoted_name(key);
    peft::detail::raise<format_error>(where, m);
  }
  return it->get<double>();
}

inline bool json_bool(const std::string& where, const nlohmann::json& o, const char* key) {
  const auto it = o.find(key);
  if (it == o.end() || !it->is_boolean()) {
    std::string m = "options lack a boolean ";
    m += detail::quoted_name(key);
    peft::detail::raise<format_error>(where, m);
  }
  return it->get<bool>();
}

/// A non-negative decimal integer, or format_error.
inline std::int64_t parse_count(const std::string& where, const std::string& what, const std::string& text) {
  std::int64_t v = 0;
  bool ok = !text.empty() && text.size() <= 18;
  for (char c : text) {
    if (c < '0' || c > '9') {
      ok = false;
      break;
    }
    v = v * 10 + (c - '0');
  }
  if (!ok) {
    std::string m = what;
    m += " is ";
    m += detail::quoted_name(text);
    m += ", not a non-negative integer";
    peft::detail::raise<format_error>(where, m);
  }
  return v;
}

/// torch.maximum: NaN if either is NaN.
template <class T>
T nan_max(T a, T b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<T>::quiet_NaN();
  return a < b ? b : a;
}

}  // namespace detail

/// AdamW's update rule (torch.optim.AdamW, decoupled weight decay).
struct adamw_rule {
  using options = adamw_options;
  static constexpr std::string_view name = "adamw";
  static constexpr std::array<std::string_view, 3> buffers = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};

  static void validate(const std::string& where, const std::string& group, const options& o) {
    if (!(o.lr >= 0) || !std::isfinite(o.lr)) detail::bad_option(where, group, "lr", "finite and >= 0", o.lr);
    for (int i = 0; i < 2; ++i) {
      const double b = o.betas[static_cast<std::size_t>(i)];
      if (!(b >= 0 && b < 1)) detail::bad_option(where, group, i == 0 ? "betas[0]" : "betas[1]", "in [0, 1)", b);
    }
    if (!(o.eps > 0) || !std::isfinite(o.eps)) detail::bad_option(where, group, "eps", "finite and > 0", o.eps);
    if (!(o.weight_decay >= 0) || !std::isfinite(o.weight_decay)) {
      detail::bad_option(where, group, "weight_decay", "finite and >= 0", o.weight_decay);
    }
  }

  /// Whether buffer b must exist after `step` updates.
  static bool required(std::size_t b, const options& o, std::int64_t step) {
    return step > 0 && (b < 2 || o.amsgrad);
  }

  static nlohmann::json to_json(const options& o) {
    return {{"lr", o.lr}, {"betas", {o.betas[0], o.betas[1]}}, {"eps", o.eps},
            {"weight_decay", o.weight_decay}, {"amsgrad", o.amsgrad}};
  }
  static options from_json(const std::string& where, const nlohmann::json& j) {
    options o;
    o.lr = detail::json_number(where, j, "lr");
    const auto b = j.find("betas");
    if (b == j.end() || !b->is_array() || b->size() != 2 || !(*b)[0].is_number() || !(*b)[1].is_number()) {
      peft::detail::raise<format_error>(where, "options lack 'betas' as two numbers");
    }
    o.betas = {(*b)[0].get<double>(), (*b)[1].get<double>()};
    o.eps = detail::json_number(where, j, "eps");
    o.weight_decay = detail::json_number(where, j, "weight_decay");
    o.amsgrad = detail::json_bool(where, j, "amsgrad");
    return o;
  }

  /// One update of one tensor with learning rate `lr` (the schedule already applied).
  template <class T>
  static void update(const options& o, double lr, detail::optimizer_slot<T>& s) {
    const index rows = s.value.rows(), cols = s.value.cols();
    for (std::size_t b = 0; b < 3; ++b) {
      if ((b < 2 || o.amsgrad) && s.buffers[b].empty()) s.buffers[b] = matrix<T>(rows, cols);  // zeros
    }
    ++s.step;
    const double b1 = o.betas[0], b2 = o.betas[1];
    // Scalars as Python computes them (in double), then rounded to T as torch's kernels do.
    const double lr_wd = lr * o.weight_decay;
    const T decay = static_cast<T>(1.0 - lr_wd);
    const T w = static_cast<T>(1.0 - b1);  // lerp weight
    const T w_minus_one = w - T{1};
    const bool small_weight = std::abs(w) < T{0.5};
    const T beta2 = static_cast<T>(b2);
    const T one_minus_beta2 = static_cast<T>(1.0 - b2);
    const double t = static_cast<double>(s.step);
    const double bias_correction1 = 1.0 - std::pow(b1, t);
    const double bias_correction2 = 1.0 - std::pow(b2, t);
    const double step_size = lr / bias_correction1;
    const T neg_step_size = static_cast<T>(-step_size);
    const T bc2_sqrt = static_cast<T>(std::pow(bias_correction2, 0.5));
    const T eps = static_cast<T>(o.eps);
    const bool decays = o.weight_decay != 0;
    for (index i = 0; i < rows; ++i) {
      T* p = s.value.row(i);
      const T* g = s.grad.row(i);
      T* m = s.buffers[0].row(i);
      T* v = s.buffers[1].row(i);
      T* vmax = o.amsgrad ? s.buffers[2].row(i) : nullptr;
      for (index j = 0; j < cols; ++j) {
        T pj = p[j];
        if (decays) pj *= decay;
        const T diff = g[j] - m[j];
        m[j] = small_weight ? std::fma(w, diff, m[j]) : std::fma(w_minus_one, diff, g[j]);
        const T scaled_g = one_minus_beta2 * g[j];
        const T decayed_v = v[j] * beta2;
        v[j] = std::fma(scaled_g, g[j], decayed_v);
        T second = v[j];
        if (vmax != nullptr) {
          vmax[j] = detail::nan_max(vmax[j], v[j]);
          second = vmax[j];
        }
        const T denom = std::sqrt(second) / bc2_sqrt + eps;
        const T delta = (neg_step_size * m[j]) / denom;
        p[j] = pj + delta;
      }
    }
  }
};

/// SGD's update rule (torch.optim.SGD: momentum, dampening, Nesterov, L2 weight decay).
struct sgd_rule {
  using options = sgd_options;
  static constexpr std::string_view name = "sgd";
  static constexpr std::array<std::string_view, 1> buffers = {"momentum_buffer"};

  static void validate(const std::string& where, const std::string& group, const options& o) {
    if (!(o.lr >= 0) || !std::isfinite(o.lr)) detail::bad_option(where, group, "lr", "finite and >= 0", o.lr);
    if (!(o.momentum >= 0) || !std::isfinite(o.momentum)) {
      detail::bad_option(where, group, "momentum", "finite and >= 0", o.momentum);
    }
    if (!std::isfinite(o.dampening)) detail::bad_option(where, group, "dampening", "finite", o.dampening);
    if (!(o.weight_decay >= 0) || !std::isfinite(o.weight_decay)) {
      detail::bad_option(where, group, "weight_decay", "finite and >= 0", o.weight_decay);
    }
    if (o.nesterov && (o.momentum <= 0 || o.dampening != 0)) {
      std::string m = "group ";
      m += detail::quoted_name(group);
      m += ": Nesterov momentum needs momentum > 0 and dampening 0, got momentum ";
      m += std::to_string(o.momentum);
      m += " and dampening ";
      m += std::to_string(o.dampening);
      peft::detail::raise<peft::error>(where, m);
    }
  }

  static bool required(std::size_t /*b*/, const options& o, std::int64_t step) {
    return step > 0 && o.momentum != 0;
  }

  static nlohmann::json to_json(const options& o) {
    return {{"lr", o.lr}, {"momentum", o.momentum}, {"dampening", o.dampening},
            {"weight_decay", o.weight_decay}, {"nesterov", o.nesterov}};
  }
  static options from_json(const std::string& where, const nlohmann::json& j) {
    options o;
    o.lr = detail::json_number(where, j, "lr");
    o.momentum = detail::json_number(where, j, "momentum");
    o.dampening = detail::json_number(where, j, "dampening");
    o.weight_decay = detail::json_number(where, j, "weight_decay");
    o.nesterov = detail::json_bool(where, j, "nesterov");
    return o;
  }

  template <class T>
  static void update(const options& o, double lr, detail::optimizer_slot<T>& s) {
    const index rows = s.value.rows(), cols = s.value.cols();
    const bool use_momentum = o.momentum != 0;
    const bool first = use_momentum && s.buffers[0].empty();
    if (first) s.buffers[0] = matrix<T>(rows, cols);
    ++s.step;
    const T wd = static_cast<T>(o.weight_decay);
    const T momentum = static_cast<T>(o.momentum);
    const T one_minus_dampening = static_cast<T>(1.0 - o.dampening);
    const T neg_lr = static_cast<T>(-lr);
    const bool decays = o.weight_decay != 0;
    for (index i = 0; i < rows; ++i) {
      T* p = s.value.row(i);
      const T* g = s.grad.row(i);
      T* buf = use_momentum ? s.buffers[0].row(i) : nullptr;
      for (index j = 0; j < cols; ++j) {
        T d = decays ? std::fma(p[j], wd, g[j]) : g[j];
        if (buf != nullptr) {
          if (first) {
            buf[j] = d;
          } else {
            const T kept = buf[j] * momentum;
            buf[j] = std::fma(d, one_minus_dampening, kept);
          }
          d = o.nesterov ? std::fma(buf[j], momentum, d) : buf[j];
        }
        p[j] = std::fma(d, neg_lr, p[j]);
      }
    }
  }
};

/// An optimizer applying `Rule` (adamw_rule, sgd_rule) to a list of parameters; see the header
/// comment. Use the aliases adamw<T> and sgd<T>.
template <compute_scalar T, class Rule>
class basic_optimizer {
 public:
  using scalar = T;
  using options_type = typename Rule::options;
  using group_type = param_group<T, options_type>;

  /// A group's name and options (change the options freely; step() checks them).
  struct group_state {
    std::string name;
    options_type options;
  };

  /// Steps the eligible tensors of `params` with `defaults`, or with the options of the first of
  /// `groups` selecting them. peft::error for invalid options, an empty or duplicate group name
  /// (or "default") or a group without `select`; shape_error for inconsistent parameters.
  basic_optimizer(std::span<const parameter<T>> params, options_type defaults = {}, std::vector<group_type> groups = {}) {
    const std::string where = detail::where(Rule::name, Rule::name);
    groups_.push_back({"default", defaults});
    for (auto& g : groups) {
      if (g.name.empty() || g.name == "default") {
        peft::detail::raise<peft::error>(where, "a group needs a name other than '' and 'default'");
      }
      for (const auto& h : groups_) {
        if (h.name == g.name) peft::detail::raise<peft::error>(where, "two groups are named " + detail::quoted_name(g.name));
      }
      if (!g.select) peft::detail::raise<peft::error>(where, "group " + detail::quoted_name(g.name) + " has no select function");
      groups_.push_back({g.name, g.options});
      selectors_.push_back(std::move(g.select));
    }
    for (const auto& g : groups_) Rule::validate(where, g.name, g.options);
    slots_ = collect(where, params);
  }

  /// Number of tensors stepped (after de-duplication).
  std::size_t size() const noexcept { return slots_.size(); }
  /// Tensor i's name (its first entry's).
  const std::string& name(std::size_t i) const { return slot_at("name", i).name; }
  /// The position in groups() of tensor i's group.
  std::size_t group_of(std::size_t i) const { return slot_at("group_of", i).group; }
  /// Updates tensor i has received.
  std::int64_t tensor_steps(std::size_t i) const { return slot_at("tensor_steps", i).step; }
  /// Tensor i's state buffer `buffer` (e.g. "exp_avg"), empty before it exists.
  matrix_view<const T> state(std::size_t i, std::string_view buffer) const {
    const auto& s = slot_at("state", i);
    for (std::size_t b = 0; b < Rule::buffers.size(); ++b) {
      if (Rule::buffers[b] == buffer) return s.buffers[b].view();
    }
    peft::detail::raise<peft::error>(detail::where(Rule::name, "state"),
                                     "no state buffer named " + detail::quoted_name(buffer));
  }

  /// "default" first, then the constructor's groups in order.
  const std::vector<group_state>& groups() const noexcept { return groups_; }
  /// The options of the group `group` (peft::error if there is none).
  options_type& options(std::string_view group) { return find_group("options", group).options; }
  const options_type& options(std::string_view group) const {
    return const_cast<basic_optimizer*>(this)->find_group("options", group).options;
  }

  /// The multiplier of every group's lr at step k = steps(); an empty function means 1.
  void set_schedule(lr_schedule schedule) { schedule_ = std::move(schedule); }
  /// Optimizer steps taken (the schedule's k for the next step).
  std::int64_t steps() const noexcept { return steps_; }
  /// The lr the next step uses in group `group`: its lr times schedule(steps()).
  double lr(std::string_view group) const { return options(group).lr * multiplier(detail::where(Rule::name, "lr")); }

  /// One update of every tensor from its current gradient.
  void step() {
    const std::string where = detail::where(Rule::name, "step");
    for (const auto& g : groups_) Rule::validate(where, g.name, g.options);
    const double k = multiplier(where);
    for (auto& s : slots_) Rule::update(groups_[s.group].options, groups_[s.group].options.lr * k, s);
    ++steps_;
  }

  /// rebind(params), then step().
  void step(std::span<const parameter<T>> params) {
    rebind_at(detail::where(Rule::name, "step"), params);
    step();
  }

  /// Takes the views of `params` (the same tensors as at construction: names, shapes, groups, in
  /// order; shape_error otherwise, nothing changed), keeping the state.
  void rebind(std::span<const parameter<T>> params) { rebind_at(detail::where(Rule::name, "rebind"), params); }

  /// Sets every stepped gradient to zero.
  void zero_grad() {
    for (auto& s : slots_) {
      for (index i = 0; i < s.grad.rows(); ++i) std::fill(s.grad.row(i), s.grad.row(i) + s.grad.cols(), T{0});
    }
  }

  /// Writes the state to `path` atomically (see the header comment); io_error if it cannot, and
  /// then `path` is untouched.
  void save_state(const std::filesystem::path& path) const {
    nlohmann::json groups = nlohmann::json::array();
    for (const auto& g : groups_) groups.push_back({{"name", g.name}, {"options", Rule::to_json(g.options)}});
    nlohmann::json tensors = nlohmann::json::array();
    io::safetensors_writer w;
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      const auto& s = slots_[i];
      tensors.push_back({{"name", s.name}, {"shape", s.shape}, {"group", groups_[s.group].name}});
      const std::string prefix = tensor_prefix(i);
      w.add(prefix + "step", {}, std::vector<std::int64_t>{s.step});
      for (std::size_t b = 0; b < Rule::buffers.size(); ++b) {
        if (s.buffers[b].empty()) continue;
        w.add(prefix + std::string(Rule::buffers[b]), s.shape, std::span<const T>(s.buffers[b].storage()));
      }
    }
    w.set_metadata({{"format", std::string(format_tag)},
                    {"version", "1"},
                    {"optimizer", std::string(Rule::name)},
                    {"step", std::to_string(steps_)},
                    {"groups", groups.dump()},
                    {"tensors", tensors.dump()}});
    try {
      w.write(path);
    } catch (const io_error& e) {
      peft::detail::raise<io_error>(detail::where(Rule::name, "save_state"), e.what());
    }
  }

  /// Restores a state written by save_state of an optimizer over the same tensors (names, shapes,
  /// groups, order): step counts, buffers and the groups' options. format_error naming
  /// load_state on any mismatch, io_error if the file cannot be read; on error nothing changes.
  void load_state(const std::filesystem::path& path) {
    const std::string where = detail::where(Rule::name, "load_state");
    const std::string file = detail::quoted_name(path.string());
    io::safetensors_file f;
    try {
      f = io::safetensors_file::open(path);
    } catch (const format_error& e) {
      peft::detail::raise<format_error>(where, file + " is not a valid state file: " + e.what());
    } catch (const io_error& e) {
      peft::detail::raise<io_error>(where, std::string("cannot read ") + file + ": " + e.what());
    }
    const auto& meta = f.metadata();
    const auto field = [&](const char* key) -> const std::string& {
      const auto it = meta.find(key);
      if (it == meta.end()) {
        peft::detail::raise<format_error>(where, file + " has no metadata " + detail::quoted_name(key) +
                                                     ": not an optimizer state");
      }
      return it->second;
    };
    if (field("format") != format_tag || field("version") != "1") {
      peft::detail::raise<format_error>(where, file + " is not a peft-cpp optimizer state (version 1)");
    }
    if (field("optimizer") != Rule::name) {
      peft::detail::raise<format_error>(where, file + " holds the state of " + detail::quoted_name(field("optimizer")) +
                                                   ", not of " + detail::quoted_name(Rule::name));
    }
    const std::int64_t steps = detail::parse_count(where, "the step count", field("step"));

    // Groups: the same names in the same order; their options are restored.
    std::vector<group_state> groups = groups_;
    {
      const nlohmann::json j = parse_json(where, file, field("groups"));
      if (!j.is_array() || j.size() != groups_.size()) {
        peft::detail::raise<format_error>(where, file + " has " + std::to_string(j.is_array() ? j.size() : 0) +
                                                     " parameter groups, this optimizer " + std::to_string(groups_.size()));
      }
      for (std::size_t g = 0; g < groups.size(); ++g) {
        const auto& e = j[g];
        if (!e.is_object() || !e.contains("name") || !e["name"].is_string() || !e.contains("options") ||
            !e["options"].is_object()) {
          peft::detail::raise<format_error>(where, file + ": group " + std::to_string(g) + " is malformed");
        }
        if (e["name"].get<std::string>() != groups[g].name) {
          peft::detail::raise<format_error>(where, file + ": group " + std::to_string(g) + " is " +
                                                       detail::quoted_name(e["name"].get<std::string>()) + ", expected " +
                                                       detail::quoted_name(groups[g].name));
        }
        groups[g].options = Rule::from_json(where, e["options"]);
        try {
          Rule::validate(where, groups[g].name, groups[g].options);
        } catch (const peft::error& err) {
          peft::detail::raise<format_error>(where, file + " has invalid options: " + err.what());
        }
      }
    }

    // Tensors: the same names, shapes and groups in the same order.
    {
      const nlohmann::json j = parse_json(where, file, field("tensors"));
      if (!j.is_array() || j.size() != slots_.size()) {
        peft::detail::raise<format_error>(where, file + " has the state of " +
                                                     std::to_string(j.is_array() ? j.size() : 0) +
                                                     " tensors, this optimizer steps " + std::to_string(slots_.size()));
      }
      for (std::size_t i = 0; i < slots_.size(); ++i) {
        const auto& s = slots_[i];
        const auto& e = j[i];
        const bool ok = e.is_object() && e.contains("name") && e["name"].is_string() && e.contains("shape") &&
                        e["shape"].is_array() && e.contains("group") && e["group"].is_string();
        std::vector<std::int64_t> shape;
        if (ok) {
          for (const auto& d : e["shape"]) shape.push_back(d.is_number_integer() ? d.get<std::int64_t>() : -1);
        }
        if (!ok || e["name"].get<std::string>() != s.name || shape != s.shape ||
            e["group"].get<std::string>() != groups_[s.group].name) {
          peft::detail::raise<format_error>(
              where, file + ": tensor " + std::to_string(i) + " is " + (ok ? e.dump() : std::string("malformed")) +
                         ", expected " + detail::quoted_name(s.name) + " " + peft::detail::shape_text(s.shape) + " in group " +
                         detail::quoted_name(groups_[s.group].name));
        }
      }
    }

    // Per-tensor step counts and buffers.
    std::vector<std::int64_t> tensor_steps(slots_.size());
    std::vector<std::array<matrix<T>, 3>> buffers(slots_.size());
    std::size_t used = 0;
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      const auto& s = slots_[i];
      const std::string prefix = tensor_prefix(i);
      const std::string step_name = prefix + "step";
      if (!f.contains(step_name)) {
        peft::detail::raise<format_error>(where, file + " has no tensor " + detail::quoted_name(step_name));
      }
      const auto& si = f.info(step_name);
      if (si.type != dtype::i64 || !si.shape.empty()) {
        peft::detail::raise<format_error>(where, file + ": " + detail::quoted_name(step_name) +
                                                     " must be an I64 scalar (shape [])");
      }
      tensor_steps[i] = f.read<std::int64_t>(step_name)[0];
      if (tensor_steps[i] < 0) {
        peft::detail::raise<format_error>(where, file + ": " + detail::quoted_name(step_name) + " is negative");
      }
      ++used;
      const auto& opts = groups[s.group].options;
      for (std::size_t b = 0; b < Rule::buffers.size(); ++b) {
        const std::string name = prefix + std::string(Rule::buffers[b]);
        if (!f.contains(name)) {
          if (Rule::required(b, opts, tensor_steps[i])) {
            peft::detail::raise<format_error>(where, file + " has no tensor " + detail::quoted_name(name) + " (after " +
                                                         std::to_string(tensor_steps[i]) + " steps)");
          }
          continue;
        }
        const auto& info = f.info(name);
        if (info.type != dtype::f32 && info.type != dtype::f64) {
          peft::detail::raise<format_error>(where, file + ": " + detail::quoted_name(name) + " is " +
                                                       std::string(safetensors_name(info.type)) + ", expected F32 or F64");
        }
        if (info.shape != s.shape) {
          peft::detail::raise<format_error>(where, file + ": " + detail::quoted_name(name) + " has shape " +
                                                       peft::detail::shape_text(info.shape) + ", expected " +
                                                       peft::detail::shape_text(s.shape));
        }
        buffers[i][b] = matrix<T>(s.value.rows(), s.value.cols(), f.read<T>(name));
        ++used;
      }
    }
    if (used != f.tensors().size()) {
      for (const auto& t : f.tensors()) {
        if (!expected_tensor(t.name)) {
          peft::detail::raise<format_error>(where, file + " has an unexpected tensor " + detail::quoted_name(t.name));
        }
      }
    }

    // Everything checked: commit.
    groups_ = std::move(groups);
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      slots_[i].step = tensor_steps[i];
      slots_[i].buffers = std::move(buffers[i]);
    }
    steps_ = steps;
  }

 private:
  static constexpr std::string_view format_tag = "peft-cpp optimizer state";

  std::string tensor_prefix(std::size_t i) const {
    std::string p = "state.";
    p += std::to_string(i);
    p += '.';
    p += slots_[i].name;
    p += '.';
    return p;
  }

  bool expected_tensor(const std::string& name) const {
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      const std::string prefix = tensor_prefix(i);
      if (name == prefix + "step") return true;
      for (const auto b : Rule::buffers) {
        if (name == prefix + std::string(b)) return true;
      }
    }
    return false;
  }

  static nlohmann::json parse_json(const std::string& where, const std::string& file, const std::string& text) {
    try {
      return nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      peft::detail::raise<format_error>(where, file + ": metadata is not valid JSON: " + e.what());
    }
  }

  double multiplier(const std::string& where) const {
    if (!schedule_) return 1.0;
    const double k = schedule_(steps_);
    if (!(k >= 0) || !std::isfinite(k)) {
      peft::detail::raise<peft::error>(where, "the schedule gave " + std::to_string(k) + " at step " +
                                                  std::to_string(steps_) + ", expected a finite value >= 0");
    }
    return k;
  }

  const detail::optimizer_slot<T>& slot_at(const char* fn, std::size_t i) const {
    if (i >= slots_.size()) {
      peft::detail::raise<peft::error>(detail::where(Rule::name, fn), "tensor " + std::to_string(i) + " of " +
                                                                         std::to_string(slots_.size()));
    }
    return slots_[i];
  }

  group_state& find_group(const char* fn, std::string_view group) {
    for (auto& g : groups_) {
      if (g.name == group) return g;
    }
    peft::detail::raise<peft::error>(detail::where(Rule::name, fn), "no group named " + detail::quoted_name(group));
  }

  /// The eligible, de-duplicated tensors of `params` with their groups (no state).
  std::vector<detail::optimizer_slot<T>> collect(const std::string& where, std::span<const parameter<T>> params) const {
    std::vector<detail::optimizer_slot<T>> slots;
    std::unordered_map<const T*, std::size_t> by_value;
    for (const auto& p : params) {
      if (!p.trainable || p.integer || p.grad.empty()) continue;
      const std::string q = detail::quoted_name(p.name);
      if (p.grad.rows() != p.value.rows() || p.grad.cols() != p.value.cols()) {
        peft::detail::raise<shape_error>(where, "parameter " + q + " has a gradient of " +
                                                    peft::detail::shape_string(p.grad.rows(), p.grad.cols()) +
                                                    " for a value of " +
                                                    peft::detail::shape_string(p.value.rows(), p.value.cols()));
      }
      peft::detail::expect_shape(where.c_str(), "a value", matrix_view<const T>(p.value), p.value.rows(), p.value.cols());
      peft::detail::expect_shape(where.c_str(), "a gradient", matrix_view<const T>(p.grad), p.grad.rows(), p.grad.cols());
      std::int64_t numel = 1;
      for (std::int64_t d : p.shape) numel *= d;
      if (numel != static_cast<std::int64_t>(p.value.size())) {
        peft::detail::raise<shape_error>(where, "parameter " + q + " has the logical shape " + peft::detail::shape_text(p.shape) +
                                                    " but " + std::to_string(p.value.size()) + " values");
      }
      const auto [it, fresh] = by_value.emplace(p.value.data(), slots.size());
      if (!fresh) {
        const auto& first = slots[it->second];
        if (first.value.rows() != p.value.rows() || first.value.cols() != p.value.cols() ||
            first.value.stride() != p.value.stride() || first.grad.data() != p.grad.data()) {
          peft::detail::raise<shape_error>(where, "parameter " + q + " shares its values with " +
                                                      detail::quoted_name(first.name) +
                                                      " but not its shape, layout or gradient");
        }
        continue;  // a shared tensor is stepped once
      }
      detail::optimizer_slot<T> s;
      s.name = p.name;
      s.shape = p.shape;
      s.value = p.value;
      s.grad = p.grad;
      for (std::size_t g = 0; g < selectors_.size(); ++g) {
        if (selectors_[g](p)) {
          s.group = g + 1;
          break;
        }
      }
      slots.push_back(std::move(s));
    }
    return slots;
  }

  void rebind_at(const std::string& where, std::span<const parameter<T>> params) {
    auto fresh = collect(where, params);
    if (fresh.size() != slots_.size()) {
      peft::detail::raise<shape_error>(where, "got " + std::to_string(fresh.size()) + " tensors to step, expected " +
                                                  std::to_string(slots_.size()));
    }
    for (std::size_t i = 0; i < fresh.size(); ++i) {
      const auto& a = fresh[i];
      const auto& b = slots_[i];
      if (a.name != b.name || a.shape != b.shape || a.group != b.group) {
        peft::detail::raise<shape_error>(where, "tensor " + std::to_string(i) + " is " + detail::quoted_name(a.name) + " " +
                                                    peft::detail::shape_text(a.shape) + " in group " +
                                                    detail::quoted_name(groups_[a.group].name) + ", expected " +
                                                    detail::quoted_name(b.name) + " " + peft::detail::shape_text(b.shape) +
                                                    " in group " + detail::quoted_name(groups_[b.group].name));
      }
    }
    for (std::size_t i = 0; i < fresh.size(); ++i) {
      slots_[i].value = fresh[i].value;
      slots_[i].grad = fresh[i].grad;
    }
  }

  std::vector<group_state> groups_;
  std::vector<std::function<bool(const parameter<T>&)>> selectors_;  // groups_[g + 1]'s
  std::vector<detail::optimizer_slot<T>> slots_;
  lr_schedule schedule_;
  std::int64_t steps_ = 0;
};

/// torch.optim.AdamW.
template <compute_scalar T>
using adamw = basic_optimizer<T, adamw_rule>;

/// torch.optim.SGD.
template <compute_scalar T>
using sgd = basic_optimizer<T, sgd_rule>;

}  // namespace peft::train
