// PiSSA and OLoRA (LoRA initialisations that decompose the base weight), the LoRA variants beside
// DoRA (VeLoRA, MonteCLoRA, BD-LoRA, KaSA) and OSF (loaded as the LoRA it equals) against PEFT: tests/data/peft/
// decomposed and tests/data/peft/lora_variants, made by scripts/make_decomposition_golden.py and
// scripts/make_lora_variant_golden.py on the tiny Llama of tests/data/models/llama_lora/base. PEFT
// computes its decompositions in float32, peft-cpp in double: merged and residual weights agree to
// float32's precision (bounds 2e-5 relative).
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "peft/adapters/lora_decomposition.hpp"
#include "peft/io/merge.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/models/peft_model.hpp"
#include "support/file_support.hpp"
#include "support/test_support.hpp"

namespace test_lora_variants {

namespace {

namespace fs = std::filesystem;
using ix = peft::index;
using peft::models::causal_lm;
using peft::models::peft_model;
using peft::models::token_batch;

const fs::path data = fs::path(PEFT_TEST_DATA_DIR) / "peft" / "decomposed";
const fs::path base_dir = fs::path(PEFT_TEST_DATA_DIR) / "models" / "llama_lora" / "base";
const char* const cases[] = {"pissa", "olora", "pissa_rslora"};

/// A fresh directory under the system's temporary one, removed afterwards.
struct scratch : peft_test::scratch_dir {
  explicit scratch(const std::string& name) : peft_test::scratch_dir("peft_decomposed_" + name) {}
};

/// max |a - b| / max |b| over two matrices of one shape.
double relative_gap(const peft::matrix<double>& a, const peft::matrix<double>& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  double gap = 0.0, scale = 0.0;
  for (ix i = 0; i < a.rows(); ++i) {
    for (ix j = 0; j < a.cols(); ++j) {
      gap = std::max(gap, std::abs(a(i, j) - b(i, j)));
      scale = std::max(scale, std::abs(b(i, j)));
    }
  }
  return gap / scale;
}

double max_abs_difference(const peft::matrix<double>& a, const peft::matrix<double>& b) {
  double gap = 0.0;
  for (ix i = 0; i < a.rows(); ++i) {
    for (ix j = 0; j < a.cols(); ++j) gap = std::max(gap, std::abs(a(i, j) - b(i, j)));
  }
  return gap;
}

/// Every tensor of `want` against the same tensor of `got` (a safetensors file each).
void check_tensors(const fs::path& got_file, const fs::path& want_file, double tol) {
  const auto got = peft::io::safetensors_file::open(got_file);
  const auto want = peft::io::safetensors_file::open(want_file);
  const auto base = peft::io::safetensors_file::open(base_dir / "model.safetensors");
  REQUIRE(!want.tensors().empty());
  for (const auto& t : want.tensors()) {
    INFO("tensor " << t.name);
    REQUIRE(got.contains(t.name));
    const auto w = want.read_matrix<double>(t.name);
    CHECK(max_abs_difference(w, base.read_matrix<double>(t.name)) > 1e-4);  // the reference moved the weight
    CHECK(relative_gap(got.read_matrix<double>(t.name), w) < tol);
  }
}

/// The adapter's configured rank, alpha and patterns as read from a directory.
peft::io::adapter_config config_of(const fs::path& dir) { return peft::io::adapter_config::load(dir); }

void copy_adapter(const fs::path& from, const fs::path& to) {
  fs::create_directories(to);
  fs::copy_file(from / "adapter_config.json", to / "adapter_config.json");
  fs::copy_file(from / "adapter_model.safetensors", to / "adapter_model.safetensors");
}

void set_config_field(const fs::path& dir, const std::string& key, const nlohmann::ordered_json& value) {
  auto c = config_of(dir);
  c.raw[key] = value;
  std::ofstream(dir / "adapter_config.json", std::ios::trunc) << c.raw.dump(2);
}

token_batch sample_batch() {
  return token_batch::from_rows({{1, 17, 33, 4, 90, 127, 5, 64}, {3, 3, 100, 2, 41, 8}});
}

/// The adapted modules' base weights of a model, by weight name.
template <class PM>
std::map<std::string, peft::matrix<double>> base_weights(PM& pm) {
  std::map<std::string, peft::matrix<double>> out;
  for (auto& [n, l] : pm.model().modules()) {
    peft::matrix<double> w(l->out_features(), l->in_features());
    for (ix i = 0; i < w.rows(); ++i) l->base().dequantize_row(i, w.row(i));
    out.emplace(n + ".weight", std::move(w));
  }
  return out;
}

peft::models::adapter_options options_of(const std::string& name) {
  const auto c = config_of(data / name / "unconverted");
  peft::models::adapter_options o;
  o.method = "lora";
  o.rank = c.r;
  o.alpha = c.lora_alpha;
  o.use_rslora = c.use_rslora;
  o.targets = c.target_modules;
  o.rank_pattern = c.rank_pattern;
  o.init = c.raw["init_lora_weights"].get<std::string>();
  return o;
}

}  // namespace

TEST_CASE("unconverted PiSSA/OLoRA checkpoints merge to PEFT's merge_and_unload", "[io][lora][decomposition]") {
  for (const char* name : cases) {
    INFO("case " << name);
    scratch s(name);
    const auto report = peft::io::merge_model(base_dir, data / name / "unconverted", s.dir / "merged.safetensors", {});
    CHECK(!report.merged.empty());
    check_tensors(s.dir / "merged.safetensors", data / name / "merged.safetensors", 2e-5);
    // PEFT's own conversion of the same adapter merges to the same weights through plain LoRA.
    peft::io::merge_model(base_dir, data / name / "converted", s.dir / "converted.safetensors", {});
    check_tensors(s.dir / "converted.safetensors", data / name / "merged.safetensors", 2e-5);
  }
}

TEST_CASE("an unconverted PiSSA/OLoRA checkpoint loads as PEFT's converted one", "[io][lora][decomposition]") {
  for (const char* name : cases) {
    INFO("case " << name);
    const auto model = peft::io::model_files::open(base_dir);
    const peft::io::base_weight_fn weights = [&](const std::string& module) -> std::optional<peft::matrix<double>> {
      const auto w = model.resolve(module, "weight");
      if (!w) return std::nullopt;
      return model.file_of(*w).read_matrix<double>(*w);
    };
    auto ck = peft::io::load_peft_checkpoint<double>(data / name / "unconverted", {}, weights);
    const auto want = peft::io::load_peft_checkpoint<double>(data / name / "converted");
    // The config says what PEFT's conversion writes.
    CHECK(ck.config.r == want.config.r);
    CHECK(ck.config.lora_alpha == Approx(want.config.lora_alpha).epsilon(1e-12));
    CHECK(ck.config.rank_pattern == want.config.rank_pattern);
    CHECK(ck.config.raw["init_lora_weights"] == true);
    REQUIRE(ck.modules.size() == want.modules.size());
    for (std::size_t k = 0; k < ck.modules.size(); ++k) {
      const auto& m = ck.modules[k];
      INFO("module " << m.path);
      REQUIRE(m.path == want.modules[k].path);
      REQUIRE(m.adapter.get_if<peft::lora<double>>() != nullptr);
      CHECK(m.adapter.get_if<peft::lora<double>>()->rank() == want.modules[k].adapter.get_if<peft::lora<double>>()->rank());
      const auto w0 = weights(m.path);
      REQUIRE(w0);
      const peft::dense<double> base(*w0);
      peft::matrix<double> got(m.adapter.out_features(), m.adapter.in_features());
      peft::matrix<double> ref(got.rows(), got.cols());
      m.adapter.delta_weight(base, got.view());
      want.modules[k].adapter.delta_weight(base, ref.view());
      REQUIRE(peft_test::nontrivial(ref.view()));
      CHECK(relative_gap(got, ref) < 2e-4);  // a difference of two float32 products of norm ~|W0|
    }
    // Re-saved, it is the converted adapter: loading it needs no base and gives the same deltas.
    scratch s(std::string(name) + "_resave");
    peft::io::save_peft_checkpoint(s.dir, ck);
    const auto again = peft::io::load_peft_checkpoint<double>(s.dir);
    REQUIRE(again.modules.size() == ck.modules.size());
    CHECK(again.modules.front().adapter.get_if<peft::lora<double>>()->rank() ==
          ck.modules.front().adapter.get_if<peft::lora<double>>()->rank());
  }
}

TEST_CASE("PiSSA/OLoRA initialised in C++ leave PEFT's residual base and the model's outputs", "[models][lora][decomposition]") {
  for (const char* name : cases) {
    INFO("case " << name);
    peft_model<double> plain(causal_lm<double>::load(base_dir));
    const auto b = sample_batch();
    const auto before = plain.model().forward(b);
    const auto original = base_weights(plain);

    peft_model<double> pm(causal_lm<double>::load(base_dir));
    pm.add_adapter("default", options_of(name));
    // The residual base is PEFT's.
    const auto residual = peft::io::safetensors_file::open(data / name / "residual.safetensors");
    const auto bases = base_weights(pm);
    for (const auto& t : residual.tensors()) {
      INFO("tensor " << t.name);
      REQUIRE(bases.count(t.name) == 1);
      const auto want = residual.read_matrix<double>(t.name);
      CHECK(max_abs_difference(want, original.at(t.name)) > 1e-3);
      CHECK(relative_gap(bases.at(t.name), want) < 2e-5);
    }
    // Residual + adapter = the model it started from.
    CHECK(relative_gap(pm.model().forward(b), before) < 1e-10);
    CHECK(pm.adapter_config().raw["init_lora_weights"] == std::string(name).substr(0, 5));

    // "Train": move every A and B.
    peft::rng gen(5);
    for (auto& [key, p] : pm.named_parameters()) {
      for (ix i = 0; i < p.value.rows(); ++i) {
        for (ix j = 0; j < p.value.cols(); ++j) p.value(i, j) += 0.05 * gen.normal(0.0, 1.0) * std::abs(p.value(i, j));
      }
    }
    const auto trained = pm.model().forward(b);
    CHECK(relative_gap(trained, before) > 1e-4);

    // Saved unconverted (PEFT's default): a fresh model over the original base gives the same logits.
    scratch s(std::string(name) + "_cpp");
    pm.save_pretrained(s.dir / "unconverted", "default", peft::dtype::f64);  // f64: exact comparisons below
    CHECK(config_of(s.dir / "unconverted").raw["init_lora_weights"] == std::string(name).substr(0, 5));
    auto reloaded = peft_model<double>::from_pretrained(causal_lm<double>::load(base_dir), s.dir / "unconverted");
    CHECK(relative_gap(reloaded.model().forward(b), trained) < 1e-9);
    // Saved converted: a plain LoRA of twice the rank over the original base, same logits.
    pm.save_pretrained_converted(s.dir / "converted", "default", peft::dtype::f64);
    const auto conv = config_of(s.dir / "converted");
    CHECK(conv.r == 2 * config_of(data / name / "unconverted").r);
    CHECK(conv.raw["init_lora_weights"] == true);
    auto converted = peft_model<double>::from_pretrained(causal_lm<double>::load(base_dir), s.dir / "converted");
    CHECK(relative_gap(converted.model().forward(b), trained) < 1e-9);
    // The offline merge of either equals merge_and_unload of the trained model.
    peft::io::merge_model(base_dir, s.dir / "converted", s.dir / "merged_c.safetensors", {.out_dtype = peft::dtype::f64});
    peft::io::merge_model(base_dir, s.dir / "unconverted", s.dir / "merged_u.safetensors", {.out_dtype = peft::dtype::f64});
    // Deleting the adapter gives the bases back.
    peft_model<double> again(causal_lm<double>::load(base_dir));
    again.add_adapter("default", options_of(name));
    again.delete_adapter("default");
    for (const auto& [n, w] : base_weights(again)) CHECK(relative_gap(w, original.at(n)) < 1e-12);
    pm.merge_and_unload();
    const auto merged = base_weights(pm);
    const auto mc = peft::io::safetensors_file::open(s.dir / "merged_c.safetensors");
    const auto mu = peft::io::safetensors_file::open(s.dir / "merged_u.safetensors");
    for (const auto& t : residual.tensors()) {
      INFO("merged tensor " << t.name);
      CHECK(relative_gap(mc.read_matrix<double>(t.name), merged.at(t.name)) < 1e-10);
      CHECK(relative_gap(mu.read_matrix<double>(t.name), merged.at(t.name)) < 1e-10);
    }
  }
}

TEST_CASE("PiSSA initialised in float leaves the model's outputs", "[models][lora][decomposition]") {
  peft_model<float> pm(causal_lm<float>::load(base_dir));
  const auto b = sample_batch();
  const auto before = pm.model().forward(b);
  pm.add_adapter("default", options_of("pissa"));
  const auto after = pm.model().forward(b);
  double gap = 0.0, scale = 0.0;
  for (ix i = 0; i < after.rows(); ++i) {
    for (ix j = 0; j < after.cols(); ++j) {
      gap = std::max(gap, static_cast<double>(std::abs(after(i, j) - before(i, j))));
      scale = std::max(scale, static_cast<double>(std::abs(before(i, j))));
    }
  }
  CHECK(scale > 0.0);
  CHECK(gap / scale < 1e-5);
}

TEST_CASE("decompositions that cannot be reproduced are refused by name", "[io][lora][decomposition]") {
  scratch s("refused");
  const fs::path src = data / "pissa" / "unconverted";
  auto expect_refusal = [&](const fs::path& dir, const std::string& needle) {
    try {
      peft::io::merge_model(base_dir, dir, s.dir / "out.safetensors", {});
      FAIL("merge_model accepted " << dir);
    } catch (const peft::unsupported_error& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(needle) != std::string::npos);
      CHECK(std::string(e.what()).find("init_lora_weights") != std::string::npos);
    }
    CHECK(!fs::exists(s.dir / "out.safetensors"));
  };
  for (const std::string init : {"pissa_niter_4", "corda", "loftq", "lora_ga", "svd"}) {
    const fs::path dir = s.dir / init;
    copy_adapter(src, dir);
    set_config_field(dir, "init_lora_weights", init);
    expect_refusal(dir, init == "pissa_niter_4" ? "randomized" : init == "svd" ? "does not know" : "residual");
  }
  // DoRA over a PiSSA initialisation: not recomputed.
  const fs::path dora = s.dir / "dora";
  copy_adapter(src, dora);
  set_config_field(dora, "use_dora", true);
  CHECK_THROWS_AS(peft::io::load_peft_checkpoint<double>(dora), peft::unsupported_error);
  // Without the base weights the adapter means nothing.
  try {
    (void)peft::io::load_peft_checkpoint<double>(src);
    FAIL("loaded without the base");
  } catch (const peft::unsupported_error& e) {
    CHECK(std::string(e.what()).find("base model") != std::string::npos);
  }
  // Merging into a quantized base: the residual was of the full-precision weight.
  CHECK_THROWS_AS(peft::io::merge_model(base_dir, src, s.dir / "q.safetensors", {.quantized_base = "int8"}),
                  peft::unsupported_error);
  // C++ initialisation: only lora, only pissa/olora.
  peft_model<double> pm(causal_lm<double>::load(base_dir));
  auto o = options_of("pissa");
  o.init = "pissa_niter_4";
  CHECK_THROWS_AS(pm.add_adapter("default", o), peft::unsupported_error);
  o.init = "olora";
  o.method = "dora";
  CHECK_THROWS_AS(pm.add_adapter("default", o), peft::unsupported_error);
  o.method = "lora";
  o.rank = 65;  // above min(out, in) of every projection
  CHECK_THROWS_AS(pm.add_adapter("default", o), peft::shape_error);
  CHECK(pm.adapter_names().empty());
  CHECK_THROWS_AS(pm.save_pretrained_converted(s.dir / "none"), peft::error);
}

namespace {

const fs::path variants = fs::path(PEFT_TEST_DATA_DIR) / "peft" / "lora_variants";
const char* const variant_cases[] = {"velora", "monteclora", "bdlora", "kasa", "kasa_rslora", "osf"};

}  // namespace

TEST_CASE("LoRA variants beside DoRA merge to PEFT's merge_and_unload", "[io][lora][variants]") {
  for (const char* name : variant_cases) {
    INFO("case " << name);
    scratch s(std::string("variant_") + name);
    peft::io::merge_model(base_dir, variants / name / "adapter", s.dir / "merged.safetensors", {});
    check_tensors(s.dir / "merged.safetensors", variants / name / "merged.safetensors", 2e-5);
  }
}

TEST_CASE("LoRA variants run unmerged as their merged model, and re-save as a plain LoRA", "[models][lora][variants]") {
  const auto b = sample_batch();
  for (const char* name : variant_cases) {
    INFO("case " << name);
    scratch s(std::string("variant_run_") + name);
    // The merged model as a model directory.
    fs::create_directories(s.dir / "merged");
    fs::copy_file(base_dir / "config.json", s.dir / "merged" / "config.json");
    peft::io::merge_model(base_dir, variants / name / "adapter", s.dir / "merged" / "model.safetensors",
                          {.out_dtype = peft::dtype::f64});
    peft_model<double> merged(causal_lm<double>::load(s.dir / "merged"));
    const auto want = merged.model().forward(b);
    auto pm = peft_model<double>::from_pretrained(causal_lm<double>::load(base_dir), variants / name / "adapter");
    const auto got = pm.model().forward(b);
    CHECK(relative_gap(got, want) < 1e-10);
    peft_model<double> plain(causal_lm<double>::load(base_dir));
    CHECK(relative_gap(plain.model().forward(b), want) > 1e-4);  // the adapter changes the outputs
    // Held as a plain LoRA: the config says so and the re-saved adapter loads without the base.
    const auto& cfg = pm.adapter_config();
    for (const char* f : {"velora_config", "monteclora_config", "use_bdlora", "kasa_config"}) {
      CHECK((!cfg.raw.contains(f) || cfg.raw[f].is_null()));
    }
    pm.save_pretrained(s.dir / "resaved", "default", peft::dtype::f64);
    const auto again = peft::io::load_peft_checkpoint<double>(s.dir / "resaved");
    auto pm2 = peft_model<double>::from_pretrained(causal_lm<double>::load(base_dir), s.dir / "resaved");
    CHECK(relative_gap(pm2.model().forward(b), want) < 1e-10);
    if (std::string(name) == "osf") {  // OSF is held as the LoRA it equals
      CHECK(cfg.peft_type == "LORA");
      CHECK(again.config.peft_type == "LORA");
      CHECK(!cfg.raw.contains("effective_rank"));
    }
    if (std::string(name).starts_with("kasa")) {
      const auto original = config_of(variants / name / "adapter");
      CHECK(cfg.r == 2 * original.r);
      CHECK(again.config.raw["init_lora_weights"] == true);
    }
  }
}

TEST_CASE("LoRA variants: malformed checkpoints and missing bases are refused", "[io][lora][variants]") {
  scratch s("variant_refused");
  // KaSA without the base weights.
  try {
    (void)peft::io::load_peft_checkpoint<double>(variants / "kasa" / "adapter");
    FAIL("loaded KaSA without the base");
  } catch (const peft::unsupported_error& e) {
    CHECK(std::string(e.what()).find("kasa_config") != std::string::npos);
  }
  // KaSA and OSF over a quantized base: their decomposition is of the full-precision weight.
  for (const char* v : {"kasa", "osf"}) {
    try {
      peft::io::merge_model(base_dir, variants / v / "adapter", s.dir / "q.safetensors", {.quantized_base = "int8"});
      FAIL(std::string(v) + " merged into a quantized base");
    } catch (const peft::unsupported_error& e) {
      CHECK(std::string(e.what()).find("quantized base") != std::string::npos);
    }
    CHECK_FALSE(fs::exists(s.dir / "q.safetensors"));
  }
  // OSF without the base weights; an OSF field in a LORA config.
  CHECK_THROWS_AS(peft::io::load_peft_checkpoint<double>(variants / "osf" / "adapter"), peft::unsupported_error);
  const fs::path osf_field = s.dir / "osf_field";
  copy_adapter(variants / "velora" / "adapter", osf_field);
  set_config_field(osf_field, "effective_rank", 8);
  CHECK_THROWS_AS(peft::io::merge_model(base_dir, osf_field, s.dir / "out.safetensors", {}), peft::unsupported_error);
  // KaSA's lora_diag without kasa_config, and kasa_config with a decomposing init.
  const fs::path no_kasa = s.dir / "no_kasa";
  copy_adapter(variants / "kasa" / "adapter", no_kasa);
  set_config_field(no_kasa, "kasa_config", nullptr);
  CHECK_THROWS_AS(peft::io::merge_model(base_dir, no_kasa, s.dir / "out.safetensors", {}), peft::format_error);
  const fs::path both = s.dir / "both";
  copy_adapter(variants / "kasa" / "adapter", both);
  set_config_field(both, "init_lora_weights", "pissa");
  CHECK_THROWS_AS(peft::io::merge_model(base_dir, both, s.dir / "out.safetensors", {}), peft::unsupported_error);
  // BD-LoRA: blocks that do not fit, modules matching no pattern under match_strict.
  const fs::path blocks = s.dir / "blocks";
  copy_adapter(variants / "bdlora" / "adapter", blocks);
  set_config_field(blocks, "use_bdlora", nlohmann::ordered_json::parse(
                                             R"({"nblocks": 3, "target_modules_bd_a": ["q_proj", "o_proj"],
                                                 "target_modules_bd_b": ["v_proj"], "match_strict": true})"));
  CHECK_THROWS_AS(peft::io::merge_model(base_dir, blocks, s.dir / "out.safetensors", {}), peft::format_error);
  const fs::path strict = s.dir / "strict";
  copy_adapter(variants / "bdlora" / "adapter", strict);
  set_config_field(strict, "use_bdlora", nlohmann::ordered_json::parse(
                                             R"({"nblocks": 2, "target_modules_bd_a": ["q_proj"],
                                                 "target_modules_bd_b": ["v_proj"], "match_strict": true})"));
  try {
    peft::io::merge_model(base_dir, strict, s.dir / "out.safetensors", {});
    FAIL("o_proj matched no pattern");
  } catch (const peft::format_error& e) {
    CHECK(std::string(e.what()).find("o_proj") != std::string::npos);
  }
  // VeLoRA's training state without velora_config.
  const fs::path velora = s.dir / "velora";
  copy_adapter(variants / "velora" / "adapter", velora);
  set_config_field(velora, "velora_config", nullptr);
  CHECK_THROWS_AS(peft::io::load_peft_checkpoint<double>(velora), peft::format_error);
  CHECK(!fs::exists(s.dir / "out.safetensors"));
}

}  // namespace test_lora_variants
