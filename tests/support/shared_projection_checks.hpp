// tests/support/shared_projection_checks.hpp — what the tests of the shared-projection adapters
// share: VeRA (vera_A, vera_B) and RandLoRA (randlora_A, randlora_B) hold one frozen pair of
// projections for every module (shared_A(), shared_B(), sliced per layer by A_slice(),
// B_slice()) and train small per-module tensors. Parity of the trainable gradients on the golden
// case, the projections shared and never copied, saved once and reloaded, and the
// save_projection=false refusal. Header-only; uses Catch2 (through golden_support.hpp).
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "support/golden_support.hpp"
#include "support/test_support.hpp"

namespace peft_test {

// ---- the golden case -------------------------------------------------------------------------------

/// Layer `name`'s delta_weight in the compute type, added to W0 in double (the reference is
/// exact in double), gives PEFT's merged weight; merging leaves the bias untouched. The delta is
/// REQUIREd above `min_delta` and returned.
template <class A>
peft::matrix<typename A::scalar> check_merged_delta(golden_case<A>& c, const std::string& name, double min_delta) {
  using T = typename A::scalar;
  auto& layer = c.layer(name);
  const auto w0 = to_double(layer.base().weight());
  peft::matrix<T> dw(layer.out_features(), layer.in_features());
  layer.adapter("default").delta_weight(layer.base(), dw.view());
  REQUIRE(max_abs(dw) > min_delta);
  CHECK(rel_error(add(w0, dw), c.ref("merged." + name + ".weight")) < tolerance<T>());
  check_merged_base(c, name, 1e-7);  // the bias is untouched
  return dw;
}

// ---- sharing ---------------------------------------------------------------------------------------

/// Modules `up` and `down` of one checkpoint hold one object of each projection (nobody else
/// does), and their slices are views into it.
template <class A>
void check_one_projection_object(const A& up, const A& down) {
  REQUIRE(up.shared_A() != nullptr);
  CHECK(up.shared_A().get() == down.shared_A().get());
  CHECK(up.shared_B().get() == down.shared_B().get());
  CHECK(up.A_slice().data() == up.shared_A()->data());
  CHECK(down.B_slice().data() == up.shared_B()->data());
  CHECK(up.shared_A().use_count() == 2);
}

/// The projections are the same memory: adding 1 to element (i, j) of `projection` through
/// `up`'s parameters changes what `down` computes over w_down by more than `min_change`.
template <class A, class Base>
void check_change_reaches_other(A& up, const A& down, const Base& w_down, const std::string& projection, index i,
                                index j, double min_change) {
  peft::matrix<double> d0(w_down.out_features(), w_down.in_features()), d1(d0.rows(), d0.cols());
  down.delta_weight(w_down, d0.view());
  for (auto& p : up.parameters()) {
    if (p.name == projection) p.value(i, j) += 1.0;
  }
  down.delta_weight(w_down, d1.view());
  CHECK(rel_error(d1, d0) > min_change);
}

// ---- saving ----------------------------------------------------------------------------------------

/// save_peft_checkpoint of `ck` (loaded from golden case `name`) into dir writes exactly the
/// tensors named in `tensors` (the projections once), of the shapes given there (an empty shape
/// is not checked), each bit-exact with the case's adapter file (f32 in, f32 out).
template <class A>
void check_saved_once(peft::io::basic_peft_checkpoint<A>& ck, const std::filesystem::path& dir,
                      const std::string& name, const std::map<std::string, std::vector<std::int64_t>>& tensors) {
  std::filesystem::remove_all(dir);
  peft::io::save_peft_checkpoint(dir, ck);
  const auto saved = peft::io::safetensors_file::open(dir / "adapter_model.safetensors");
  std::vector<std::string> names, expected;
  for (const auto& t : saved.tensors()) names.push_back(t.name);
  std::sort(names.begin(), names.end());
  for (const auto& [n, shape] : tensors) expected.push_back(n);
  CHECK(names == expected);
  for (const auto& [n, shape] : tensors) {
    if (!shape.empty()) CHECK(saved.info(n).shape == shape);
  }
  const auto original = peft::io::safetensors_file::open(golden_dir(name) / "adapter" / "adapter_model.safetensors");
  for (const auto& n : names) {
    INFO(n);
    CHECK(saved.read<float>(n) == original.read<float>(n));  // f32 in, f32 out: bit-exact
  }
}

/// The checkpoint saved in dir, reloaded over the case's base: its modules share one projection
/// again, and each computes exactly what `ck`'s does on the reference input (and, given
/// `reference_tol`, the reference output to that bound).
template <class A>
void check_reloaded(const peft::io::basic_peft_checkpoint<A>& ck, const std::filesystem::path& dir,
                    const peft::io::safetensors_file& base, const peft::io::safetensors_file& reference,
                    std::optional<double> reference_tol = std::nullopt) {
  auto back = load_bound<A>(dir, base);
  CHECK(back.find("up.weight")->adapter.shared_A().get() == back.find("down.weight")->adapter.shared_A().get());
  for (const std::string name : {"up", "down"}) {
    INFO(name);
    const auto w = load_base(base, name);
    const auto x = reference.read_matrix<typename A::scalar>("layer." + name + ".input");
    peft::matrix<typename A::scalar> y0(x.rows(), w.out_features()), y1(x.rows(), w.out_features());
    typename A::cache_type c0, c1;
    ck.find(name + ".weight")->adapter.forward(w, x.view(), y0.view(), c0);
    back.find(name + ".weight")->adapter.forward(w, x.view(), y1.view(), c1);
    CHECK(exactly_equal(y1, y0));
    if (reference_tol) {
      CHECK(rel_error(y1, reference.read_matrix<double>("layer." + name + ".output")) < *reference_tol);
    }
  }
}

/// Golden case `name` with save_projection=false (the projections regenerated from PyTorch's
/// generator, which we do not reproduce) is refused by A's loader with a message that says so.
template <class A>
void check_projection_required(const std::string& name) {
  const auto dir = scratch_path("peft_" + name + "_no_projection");
  rewrite_adapter(name, dir, [](auto& c) { c["save_projection"] = false; });
  const auto msg = message_of([&] { peft::io::load_checkpoint_as<A>(dir); });
  CHECK_THROWS_AS(peft::io::load_checkpoint_as<A>(dir), peft::unsupported_error);
  CHECK(msg.rfind("[" + name + "::from_checkpoint]", 0) == 0);
  CHECK(msg.find("save_projection") != std::string::npos);
  CHECK(msg.find("PyTorch") != std::string::npos);
  std::filesystem::remove_all(dir);
}

}  // namespace peft_test
