// tests/support/paper_support.hpp — the cases computed from a paper's formulas in PyTorch float64
// (tests/data/paper/<case>/reference.safetensors), for the methods PEFT has no format for:
// locating a case, reading PHM rule tensors, and checking that the PEFT codec refuses the
// method. Header-only; uses Catch2.
#pragma once

#include <catch2/catch.hpp>

#include <filesystem>
#include <string>

#include "peft/core/error.hpp"
#include "peft/core/matrix.hpp"
#include "peft/io/adapter_config.hpp"
#include "peft/io/checkpoint_tensors.hpp"
#include "peft/io/peft/codec.hpp"
#include "peft/io/safetensors.hpp"

namespace peft_test {

/// tests/data/paper/<name>: the directory of one paper case.
inline std::filesystem::path paper_dir(const std::string& name) {
  return std::filesystem::path(PEFT_TEST_DATA_DIR) / "paper" / name;
}

/// The reference file of paper case `name`.
inline peft::io::safetensors_file open_paper_case(const std::string& name) {
  return peft::io::safetensors_file::open(paper_dir(name) / "reference.safetensors");
}

/// A (n, n, n) tensor of the file as the (n, n n) matrix phm_rule stores.
template <class T>
peft::matrix<T> read_rule(const peft::io::safetensors_file& f, const std::string& name) {
  const auto& info = f.info(name);
  REQUIRE(info.shape.size() == 3);
  const auto n = static_cast<peft::index>(info.shape[0]);
  return peft::matrix<T>(n, n * n, f.read<T>(name));
}

/// PEFT has no format for A: the codec says so, and both loading a module and describing `a` in
/// a config throw peft::unsupported_error. A non-empty `load_advice` / `describe_advice` must
/// appear in the message (the describe check then checks the message instead of the type).
template <class A>
void check_no_peft_format(const A& a, const std::string& load_advice = "", const std::string& describe_advice = "") {
  static_assert(!peft::io::peft_codec<A>::has_format);
  const peft::io::checkpoint_tensors<typename A::scalar> m("layer");
  CHECK_THROWS_AS(peft::io::from_checkpoint<A>(peft::io::adapter_config{}, m, m), peft::unsupported_error);
  if (!load_advice.empty()) {
    CHECK_THROWS_WITH(peft::io::from_checkpoint<A>(peft::io::adapter_config{}, m, m), Catch::Contains(load_advice));
  }
  peft::io::adapter_config cfg;
  if (describe_advice.empty()) {
    CHECK_THROWS_AS(peft::io::describe_in(a, cfg, "layer"), peft::unsupported_error);
  } else {
    CHECK_THROWS_WITH(peft::io::describe_in(a, cfg, "layer"), Catch::Contains(describe_advice));
  }
}

}  // namespace peft_test
