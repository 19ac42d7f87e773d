// `peft export --gguf` and `peft import --gguf`: adapters as llama.cpp's GGUF LoRA files.
//
//   peft export --gguf ADAPTER_DIR --model MODEL(.gguf | DIR) --out ADAPTER.gguf
//   peft import --gguf ADAPTER.gguf --out ADAPTER_DIR [--model MODEL(.gguf | DIR)]
//
// The model gives the architecture and head counts (llama.cpp's q/k row order); see
// include/peft/models/gguf_lora.hpp for what is exported and how.
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <peft/io/detail/file_io.hpp>
#include <peft/io/gguf.hpp>
#include <peft/io/peft_checkpoint.hpp>
#include <peft/models/causal_lm.hpp>
#include <peft/models/config.hpp>
#include <peft/models/gguf_lora.hpp>
#include <peft/models/gguf_model.hpp>

#include "cli_common.hpp"

namespace peft_cli {

namespace {

/// The config of a model directory or GGUF file.
peft::models::lm_config model_config(const std::string& model) {
  if (peft::models::is_gguf_path(model)) return peft::models::gguf_config(peft::io::gguf_file::open(model));
  return peft::models::lm_config::load(model);
}

struct gguf_args {
  std::optional<std::string> gguf, model, out;
};

gguf_args read_args(const std::vector<std::string>& args, const char* command) {
  gguf_args g;
  arg_reader r(args);
  while (r.next()) {
    const std::string& a = r.flag();
    if (a == "--gguf") {
      g.gguf = r.value();
    } else if (a == "--model") {
      g.model = r.value();
    } else if (a == "--out") {
      g.out = r.value();
    } else {
      r.unknown();
    }
  }
  if (!g.gguf) throw usage_error(std::string(command) + " needs --gguf");
  if (!g.out) throw usage_error(std::string(command) + " needs --out");
  return g;
}

}  // namespace

int export_adapter(const std::vector<std::string>& args) {
  const gguf_args g = read_args(args, "export");
  if (!g.model) throw usage_error("export --gguf needs --model (the model's directory or .gguf file)");
  auto ck = peft::io::load_peft_checkpoint<double>(*g.gguf);
  const auto cfg = model_config(*g.model);
  peft::models::export_gguf_lora(ck, cfg, *g.out);
  std::printf("exported %zu modules of %s to %s (llama.cpp LoRA, architecture %s)\n", ck.modules.size(), g.gguf->c_str(),
              g.out->c_str(), peft::models::gguf_architecture(cfg.arch).c_str());
  return 0;
}

int import_adapter(const std::vector<std::string>& args) {
  const gguf_args g = read_args(args, "import");
  std::optional<peft::models::lm_config> cfg;
  if (g.model) cfg = model_config(*g.model);
  auto ck = peft::models::import_gguf_lora(peft::io::gguf_file::open(*g.gguf), cfg ? &*cfg : nullptr);
  // The directory appears, or is replaced, whole (files it held that the adapter does not write
  // are kept): written beside its name, then swapped in with one rename.
  peft::io::detail::atomic_directory out("import", *g.out);
  peft::io::save_peft_checkpoint(out.path(), ck);
  out.commit();
  std::printf("imported %zu LoRA modules of %s into %s\n", ck.modules.size(), g.gguf->c_str(), g.out->c_str());
  return 0;
}

}  // namespace peft_cli
