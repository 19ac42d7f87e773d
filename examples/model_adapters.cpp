// Adapters for a model on disk: frozen bases read from its safetensors, LoRA on every
// projection, a few training steps, the adapters saved as a PEFT checkpoint, loaded back, and
// merged into the model file offline. The README shows the part between the [readme] marks.
//
//   model_adapters [WORK_DIR]     (default: ./model_adapters_demo; it writes a small model there)
//
// Exits 0 when the checkpoint reloads with the same outputs and the merged model's layer equals
// the adapted layer's output; 1 otherwise.
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <map>
#include <string>

#include <peft/adapters/lora.hpp>
#include <peft/base/dense.hpp>
#include <peft/io/merge.hpp>
#include <peft/io/model_bases.hpp>
#include <peft/io/peft_checkpoint.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/layer/adapted_linear.hpp>

namespace {

/// A two-block model in PyTorch's naming: q_proj and v_proj (64 -> 64) per block, plus an
/// embedding that no adapter targets.
void write_model(const std::filesystem::path& file) {
  peft::rng gen(7);
  peft::io::safetensors_writer w;
  auto add = [&](const std::string& name, peft::index rows, peft::index cols) {
    std::vector<float> v(static_cast<std::size_t>(rows * cols));
    for (auto& e : v) e = static_cast<float>(gen.normal(0.0, 0.1));
    w.add(name, {rows, cols}, std::span<const float>(v));
  };
  add("model.embed_tokens.weight", 100, 64);
  for (int l = 0; l < 2; ++l) {
    add("model.layers." + std::to_string(l) + ".self_attn.q_proj.weight", 64, 64);
    add("model.layers." + std::to_string(l) + ".self_attn.v_proj.weight", 64, 64);
  }
  w.write(file);
}

double max_abs_diff(const peft::matrix<float>& a, const peft::matrix<float>& b) {
  double d = 0;
  for (std::size_t i = 0; i < a.storage().size(); ++i) d = std::max(d, std::abs(double(a.storage()[i]) - b.storage()[i]));
  return d;
}

}  // namespace

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  const fs::path dir = argc > 1 ? fs::path(argv[1]) : fs::path("model_adapters_demo");
  try {
    fs::create_directories(dir);
    const fs::path model_dir = dir / "model", adapter_dir = dir / "my-adapter";
    fs::create_directories(model_dir);
    write_model(model_dir / "model.safetensors");

    // [readme]
    // Frozen bases straight from a model's weights (model.safetensors, a sharded index, or the
    // directory): weight name -> base. peft::q4_0, peft::nf4, ... quantize them on load (QLoRA).
    const auto model = peft::io::model_files::open(model_dir);
    auto bases = peft::io::load_bases<peft::dense<float>>(
        model, [](const std::string& module) { return module.ends_with("_proj"); });

    // One adapted layer per base, each with a fresh LoRA sized from its base.
    using layer_type = peft::adapted_linear<peft::dense<float>, peft::lora<float>>;
    std::map<std::string, layer_type> layers;
    for (auto& [weight, base] : bases) {
      auto& layer = layers.emplace(weight, layer_type(std::move(base))).first->second;
      layer.add_adapter("default", peft::lora_options{.rank = 8, .alpha = 16, .seed = 1});
    }

    // ... train: forward / backward through each layer, step parameters() with an optimizer ...

    // Save what you trained as a PEFT checkpoint (PeftModel.from_pretrained loads it), load it
    // back (any method: the config decides), or merge it into the model file offline.
    peft::io::peft_checkpoint<float> ck;
    for (auto& [weight, layer] : layers) ck.add(weight, layer.adapter("default"));
    peft::io::save_peft_checkpoint(adapter_dir, ck);
    auto loaded = peft::io::load_peft_checkpoint<float>(adapter_dir);
    peft::io::merge_model(model_dir, adapter_dir, dir / "merged.safetensors", {});
    // [/readme]

    // Check with a non-trivial adapter (a fresh LoRA is a no-op): move every B, save and merge
    // again, and compare the reloaded adapter and the merged weight with the layer itself.
    if (loaded.modules.size() != layers.size() || loaded.modules.front().adapter.active_method() != "lora") return 1;
    peft::rng gen(3);
    peft::io::peft_checkpoint<float> moved;
    for (auto& [weight, layer] : layers) {
      auto b = layer.adapter("default").B();
      for (peft::index i = 0; i < b.rows(); ++i)
        for (peft::index j = 0; j < b.cols(); ++j) b(i, j) = static_cast<float>(gen.normal(0.0, 0.05));
      moved.add(weight, layer.adapter("default"));
    }
    peft::io::save_peft_checkpoint(dir / "moved", moved);
    peft::io::merge_model(model_dir, dir / "moved", dir / "merged.safetensors", {});
    const auto reloaded = peft::io::load_peft_checkpoint<float>(dir / "moved");
    const auto merged = peft::io::model_files::open(dir / "merged.safetensors");
    peft::matrix<float> x(4, 64);
    for (auto& v : x.storage()) v = static_cast<float>(gen.normal());
    double worst = 0;
    for (auto& [weight, layer] : layers) {
      peft::matrix<float> y(4, 64), y_loaded(4, 64), y_merged(4, 64);
      layer.forward(x, y);
      peft::any_adapter<float>::cache_type cache;
      reloaded.find(weight)->adapter.forward(layer.base(), x.view(), y_loaded.view(), cache);
      peft::io::load_base<peft::dense<float>>(merged, weight.substr(0, weight.size() - 7)).matmul(x.view(), y_merged.view());
      worst = std::max({worst, max_abs_diff(y, y_loaded), max_abs_diff(y, y_merged)});
    }
    std::printf("model_adapters: %zu layers adapted, saved, reloaded and merged; largest difference %.2e\n",
                layers.size(), worst);
    return worst < 1e-5 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "model_adapters: %s\n", e.what());
    return 2;
  }
}
