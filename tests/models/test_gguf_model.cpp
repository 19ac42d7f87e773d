// llama.cpp model files as frozen bases, and GGUF LoRA adapters, against the references of
// tests/data/gguf (written by scripts/llama_cpp/make_gguf_references.py with llama.cpp itself,
// transformers and PEFT; see tests/data/gguf/README.md): the logits of each GGUF file (F16, Q8_0,
// Q4_0, Q4_K, Q6_K, llama.cpp's Q4_K_M mix) equal those of its dequantized weights; llama.cpp's
// logits agree with ours as its 8-bit activations allow; LoRA adapters exported for llama.cpp and
// imported from its converter give PEFT's logits. (Quantization against llama-quantize's bytes:
// tests/base/test_quantized.cpp.)
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "peft/base/gguf_weight.hpp"
#include "peft/io/gguf.hpp"
#include "peft/io/peft_checkpoint.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/models/gguf_lora.hpp"
#include "peft/models/gguf_model.hpp"
#include "peft/models/peft_model.hpp"
#include "peft/models/token_file.hpp"
#include "support/file_support.hpp"

namespace test_gguf_model {

namespace fs = std::filesystem;
using peft::index;
using namespace peft::models;

const fs::path data = fs::path(PEFT_TEST_DATA_DIR) / "gguf";

struct gguf_case {
  const char* name;
  std::vector<const char*> files;
};
const std::vector<gguf_case> cases = {
    {"llama", {"f16", "q8_0", "q4_0", "q4_k", "q6_k", "q4_k_m"}},
    {"qwen2", {"f16", "q4_k_m"}},
};

std::vector<std::vector<long long>> lines() { return read_token_file(data / "tokens.txt"); }

/// The logits of line `l` under `pm`.
template <class PM>
peft::matrix<float> logits_of(PM& pm, const std::vector<long long>& line) {
  return pm.model().forward(token_batch::from_rows({line}));
}

/// max |got - ref| / max |ref|.
double relative_error(const peft::matrix<float>& got, const peft::matrix<float>& ref) {
  REQUIRE(got.rows() == ref.rows());
  REQUIRE(got.cols() == ref.cols());
  double diff = 0, scale = 0;
  for (index i = 0; i < got.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(got.data()[i]) - ref.data()[i]));
    scale = std::max(scale, std::abs(static_cast<double>(ref.data()[i])));
  }
  REQUIRE(scale > 0.5);  // the reference is not trivially zero
  return diff / scale;
}

/// Top-1 agreement and mean KL(ref || got) over the rows of two logit matrices.
struct agreement {
  double top1 = 0, kl = 0;
};
agreement compare_distributions(const peft::matrix<float>& got, const peft::matrix<float>& ref) {
  agreement a;
  for (index r = 0; r < ref.rows(); ++r) {
    const float* g = got.row(r);
    const float* f = ref.row(r);
    const index n = ref.cols();
    a.top1 += (std::max_element(g, g + n) - g) == (std::max_element(f, f + n) - f) ? 1.0 : 0.0;
    const double mg = *std::max_element(g, g + n), mf = *std::max_element(f, f + n);
    double zg = 0, zf = 0;
    for (index i = 0; i < n; ++i) {
      zg += std::exp(g[i] - mg);
      zf += std::exp(f[i] - mf);
    }
    for (index i = 0; i < n; ++i) {
      const double lf = f[i] - mf - std::log(zf), lg = g[i] - mg - std::log(zg);
      a.kl += std::exp(lf) * (lf - lg);
    }
  }
  a.top1 /= static_cast<double>(ref.rows());
  a.kl /= static_cast<double>(ref.rows());
  return a;
}

peft::matrix<float> reference(const std::string& c, const std::string& key) {
  const auto f = peft::io::safetensors_file::open(data / c / "reference.safetensors");
  return f.read_matrix<float>(key);
}

TEST_CASE("GGUF models give the logits of their dequantized weights, in place", "[gguf][models]") {
  const auto ls = lines();
  for (const auto& c : cases) {
    for (const char* file : c.files) {
      DYNAMIC_SECTION(c.name << "/" << file) {
        const fs::path path = data / c.name / (std::string(file) + ".gguf");
        peft_model<float, peft::gguf_weight> pm(causal_lm<float, peft::gguf_weight>::load(path));
        // The block weights are the file's bytes (q and k are row-permuted copies).
        const auto* v = pm.model().module("model.layers.0.self_attn.v_proj");
        REQUIRE(v != nullptr);
        CHECK(v->base().in_place());
        CHECK_FALSE(pm.model().module("model.layers.0.self_attn.q_proj")->base().in_place() == (std::string(c.name) == "llama"));
        for (std::size_t l = 0; l < ls.size(); ++l) {
          const auto got = logits_of(pm, ls[l]);
          const std::string k = std::string(file) + "." + std::to_string(l);
          CHECK(relative_error(got, reference(c.name, "dequant." + k)) < 1e-4);
          // llama.cpp rounds activations to 8 bits (f16 for F16 weights): close, not equal.
          const auto a = compare_distributions(got, reference(c.name, "llama_cpp." + k));
          CHECK(a.top1 >= 0.75);
          CHECK(a.kl < 2e-3);
        }
        pm.load_adapter(data / c.name / "peft_lora");
        for (std::size_t l = 0; l < ls.size(); ++l) {
          const std::string k = std::string(file) + "." + std::to_string(l);
          // F16 weights are the checkpoint's exactly: the reference is transformers + PEFT's.
          const std::string key = std::string(file) == "f16" ? "hf_lora." + std::to_string(l) : "dequant_lora." + k;
          CHECK(relative_error(logits_of(pm, ls[l]), reference(c.name, key)) < 1e-4);
        }
      }
    }
  }
}

TEST_CASE("8-bit activations follow llama.cpp's arithmetic", "[gguf][models]") {
  // Line 1 (10 tokens) is a skinny batch: the quantized products round x to Q8_K / Q8_0 blocks.
  const auto line = lines().at(1);
  for (const char* file : {"q8_0", "q4_0", "q4_k", "q6_k", "q4_k_m"}) {
    DYNAMIC_SECTION(file) {
      const fs::path path = data / "llama" / (std::string(file) + ".gguf");
      load_options o;
      o.int8_activations = true;
      peft_model<float, peft::gguf_weight> fast(causal_lm<float, peft::gguf_weight>::load(path, o));
      peft_model<float, peft::gguf_weight> exact(causal_lm<float, peft::gguf_weight>::load(path));
      const auto got = logits_of(fast, line);
      const auto ref = reference("llama", "dequant." + std::string(file) + ".1");
      const double err = relative_error(got, ref);
      CHECK(err > 1e-6);   // the option is in effect
      CHECK(err < 5e-2);   // and close to the exact product
      CHECK(relative_error(logits_of(exact, line), ref) < 1e-4);
      const auto a = compare_distributions(got, reference("llama", "llama_cpp." + std::string(file) + ".1"));
      CHECK(a.top1 >= 0.9);
      CHECK(a.kl < 1e-3);
    }
  }
}

TEST_CASE("the GGUF config equals config.json's", "[gguf][models]") {
  for (const auto& c : cases) {
    const auto g = gguf_config(peft::io::gguf_file::open(data / c.name / "q4_k_m.gguf"));
    const auto h = lm_config::load(data / c.name / "hf");
    CHECK(g.hidden_size == h.hidden_size);
    CHECK(g.intermediate_size == h.intermediate_size);
    CHECK(g.layers == h.layers);
    CHECK(g.heads == h.heads);
    CHECK(g.kv_heads == h.kv_heads);
    CHECK(g.head_dim == h.head_dim);
    CHECK(g.vocab_size == h.vocab_size);
    CHECK(g.tie_word_embeddings == h.tie_word_embeddings);
    CHECK(g.qkv_bias == h.qkv_bias);
    CHECK(g.rope.theta == h.rope.theta);
    CHECK(g.norm_eps == Approx(h.norm_eps).epsilon(1e-6));  // stored as f32
  }
}

TEST_CASE("an adapter made by llama.cpp's convert_lora_to_gguf imports and gives PEFT's logits", "[gguf][models]") {
  const auto ls = lines();
  for (const auto& c : cases) {
    DYNAMIC_SECTION(c.name) {
      const auto cfg = lm_config::load(data / c.name / "hf");
      auto ck = import_gguf_lora(peft::io::gguf_file::open(data / c.name / "lora_by_llama_cpp.gguf"), &cfg);
      CHECK(ck.modules.size() == static_cast<std::size_t>(7 * cfg.layers));
      const fs::path dir = peft_test::process_scratch() / (std::string("gguf_model_import_") + c.name);
      fs::remove_all(dir);
      peft::io::save_peft_checkpoint(dir, ck);
      peft_model<float> pm(causal_lm<float>::load(data / c.name / "hf"));
      pm.load_adapter(dir);
      for (std::size_t l = 0; l < ls.size(); ++l) {
        CHECK(relative_error(logits_of(pm, ls[l]), reference(c.name, "hf_lora." + std::to_string(l))) < 1e-4);
      }
    }
  }
}

TEST_CASE("adapters exported for llama.cpp keep every module's scale and import back exactly", "[gguf][models]") {
  const auto ls = lines();
  struct item {
    const char* c;
    const char* adapter;
    const char* ref;
  };
  for (const item it : {item{"llama", "peft_lora", "hf_lora"}, item{"llama", "peft_lora_patterns", "hf_lora_patterns"},
                        item{"qwen2", "peft_lora", "hf_lora"}}) {
    DYNAMIC_SECTION(it.c << "/" << it.adapter) {
      const fs::path model = data / it.c / "hf";
      const auto cfg = gguf_config(peft::io::gguf_file::open(data / it.c / "f16.gguf"));
      const auto ck = peft::io::load_peft_checkpoint<double>(data / it.c / it.adapter);
      const fs::path out = peft_test::process_scratch() / (std::string("gguf_model_export_") + it.c + it.adapter + ".gguf");
      // A checkpoint that also replaces whole modules (modules_to_save) cannot be exported: refused
      // by name, nothing written.
      auto with_saved = ck;
      with_saved.saved_tensors.push_back({"lm_head.weight", peft::dtype::f32, {1}, std::vector<std::byte>(4)});
      fs::remove(out);
      CHECK_THROWS_WITH(export_gguf_lora(with_saved, cfg, out),
                        Catch::Contains("[export_gguf_lora]") && Catch::Contains("modules_to_save"));
      CHECK_FALSE(fs::exists(out));
      export_gguf_lora(ck, cfg, out);
      const auto f = peft::io::gguf_file::open(out);
      CHECK(f.string("general.architecture") == it.c);
      // The exported file without our head-count keys imports with the model's config only.
      auto back = import_gguf_lora(f);
      const fs::path dir = peft_test::process_scratch() / (std::string("gguf_model_back_") + it.c + it.adapter);
      fs::remove_all(dir);
      peft::io::save_peft_checkpoint(dir, back);
      peft_model<float> pm(causal_lm<float>::load(model));
      pm.load_adapter(dir);
      for (std::size_t l = 0; l < ls.size(); ++l) {
        CHECK(relative_error(logits_of(pm, ls[l]), reference(it.c, std::string(it.ref) + "." + std::to_string(l))) < 1e-4);
      }
      // llama.cpp ran our exported files (scripts/llama_cpp/make_gguf_references.py --peft-cli):
      // its logits with them are PEFT's, as close as its f16 activations allow.
      const std::string key = std::string("llama_cpp_our_") + (std::string(it.adapter) == "peft_lora" ? "lora" : "lora_patterns") + ".f16.0";
      if (std::string(it.c) == "llama") {
        const auto a = compare_distributions(reference(it.c, key), reference(it.c, std::string(it.ref) + ".0"));
        CHECK(a.top1 == 1.0);
        CHECK(a.kl < 1e-5);
      }
    }
  }
}

}  // namespace test_gguf_model
