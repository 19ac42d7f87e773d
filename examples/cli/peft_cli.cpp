// peft — the command-line tool of peft-cpp.
//
//   peft inspect ADAPTER_DIR
//   peft merge --base BASE.safetensors --adapter ADAPTER_DIR --out OUT.safetensors
//              [--dtype same|f32|bf16|f16] [--quantized-base int8|q4_0|nf4|q8_0|q4_k|q6_k]
//   (--quantized-base: the adapter was trained over that frozen quantized base (QLoRA); the merged
//   weights are re-quantized to it, and the tool says so on stderr)
//   peft logits   --model MODEL_DIR [--adapter ADAPTER_DIR] --tokens FILE --out OUT.safetensors
//   peft generate --model MODEL_DIR [--adapter ADAPTER_DIR] (--tokens FILE | --prompt TEXT) --max-new-tokens N
//                 [--temperature T --top-k K --top-p P --seed S --ignore-eos]
//   peft finetune --model MODEL_DIR (--adapter INIT_DIR | --method NAME --rank R --alpha A
//                 --targets LIST|all-linear) (--tokens FILE | --text FILE | --jsonl FILE) [--val FILE]
//                 --steps N --batch B --lr LR --out DIR ...
//   (lm_commands.cpp; docs/models.md has every flag)
//
// Exit status 0 on success; 2 on bad input, with one line on stderr and no output file left.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <peft/io/merge.hpp>
#include <peft/io/peft_checkpoint.hpp>

#include "cli_common.hpp"

namespace {

using peft_cli::usage_error;

constexpr const char* usage =
    "usage: peft inspect ADAPTER_DIR\n"
    "       peft merge --base BASE.safetensors --adapter ADAPTER_DIR --out OUT.safetensors "
    "[--dtype same|f32|bf16|f16] [--quantized-base int8|q4_0|nf4|q8_0|q4_k|q6_k]\n"
    "       peft logits --model MODEL_DIR [--adapter ADAPTER_DIR] --tokens FILE --out OUT.safetensors\n"
    "                   [--quantize-base int8|q4_0|nf4|q8_0|q4_k|q6_k] [--precision f32|f64] [--threads T]\n"
    "                   [--int8-activations]   (a .gguf model: llama.cpp's 8-bit activations, faster)\n"
    "       peft generate --model MODEL_DIR [--adapter ADAPTER_DIR] (--tokens FILE | --prompt TEXT) --max-new-tokens N\n"
    "                   [--temperature T] [--top-k K] [--top-p P] [--seed S] [--ignore-eos] [--timings]\n"
    "       peft finetune --model MODEL_DIR (--adapter INIT_DIR | --method NAME --rank R --alpha A\n"
    "                   --targets LIST|all-linear [--rslora] [--lora-bias] [--sora-xi XI] [--init pissa|olora] | --full)\n"
    "                   (--tokens FILE | --text FILE | --jsonl FILE [--seq-len L]) [--val FILE [--val-every K]] --steps N\n"
    "                   --batch B --lr LR [--weight-decay WD] [--loraplus-ratio R] [--grad-accum K] [--threads T]\n"
    "                   [--quantize-base int8|q4_0|nf4|q8_0|q4_k|q6_k] [--checkpointing] [--log LOG.csv] [--seed S]\n"
    "                   [--save-every K] [--resume] [--skip-nonfinite] [--memory-budget SIZE]\n"
    "                   [--precision f32|f64] --out ADAPTER_DIR\n"
    "       peft export --gguf ADAPTER_DIR --model MODEL(.gguf|DIR) --out ADAPTER.gguf\n"
    "       peft import --gguf ADAPTER.gguf --out ADAPTER_DIR [--model MODEL(.gguf|DIR)]\n"
    "   (MODEL_DIR may also be a llama.cpp model file, MODEL.gguf: its tensors are the frozen bases)\n"
    "   (mpirun -np N peft finetune ... trains data-parallel where peft was built with MPI)\n"
    "   (methods: lora, dora, vera, loha, lokr, adalora, ia3, shira, dynamic_rank, sora — the last two\n"
    "    train their ranks (--rank: the mean rank, resp. the largest) and are saved as a LoRA; token FILE: one sequence of\n"
    "    ids per line, separated by spaces; --text, --jsonl ({\"text\"} or {\"prompt\", \"completion\"}\n"
    "    lines) and --prompt read the model directory's tokenizer.json, or --tokenizer FILE)\n";

std::string one_line(std::string s) {
  for (char& c : s) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return s;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string t;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) t += "x";
    t += std::to_string(shape[i]);
  }
  return t.empty() ? "scalar" : t;
}

int inspect(const std::vector<std::string>& args) {
  if (args.size() != 1) throw usage_error("inspect takes exactly one argument, the adapter directory");
  auto ck = peft::io::load_peft_checkpoint<double>(args[0]);
  const auto& cfg = ck.config;
  std::string method(ck.modules.empty() ? "lora" : ck.modules.front().adapter.active_method());
  if (cfg.use_rslora) method += " (rsLoRA)";
  std::printf("adapter     %s\n", args[0].c_str());
  std::printf("method      %s  [peft_type %s]\n", method.c_str(), cfg.peft_type.c_str());
  std::printf("targets     %s\n", cfg.targets_string().c_str());
  std::printf("modules     %zu\n", ck.modules.size());
  std::printf("dtype       %s\n", std::string(peft::safetensors_name(ck.stored_dtype)).c_str());
  std::printf("parameters  %zu\n\n", ck.parameter_count());
  std::printf("%-44s %-12s %9s  %s\n", "base weight", "out x in", "params", "tensors");
  std::vector<std::string> shared;
  for (auto& m : ck.modules) {
    std::size_t n = 0;
    std::string tensors;
    for (const auto& p : m.adapter.parameters()) {
      const std::string item = p.name + " " + shape_text(p.shape);
      if (p.shared) {
        if (std::find(shared.begin(), shared.end(), item) == shared.end()) shared.push_back(item);
        continue;
      }
      n += static_cast<std::size_t>(p.value.size());
      if (!tensors.empty()) tensors += ", ";
      tensors += item;
    }
    const std::string shape =
        std::to_string(m.adapter.out_features()) + " x " + std::to_string(m.adapter.in_features());
    std::printf("%-44s %-12s %9zu  %s\n", m.weight_name.c_str(), shape.c_str(), n, tensors.c_str());
    m.adapter.visit([&](const auto& a) {
      if constexpr (requires { a.rank(); a.scale(); }) {
        std::string extra;
        if constexpr (requires { a.has_bias(); }) {
          if (a.has_bias()) extra = ", lora_bias";
        }
        std::printf("%-44s rank %td, scale %g%s\n", "", static_cast<std::ptrdiff_t>(a.rank()),
                    static_cast<double>(a.scale()), extra.c_str());
      }
    });
  }
  for (const auto& e : ck.embeddings.lora) {
    const std::string shape = std::to_string(e.num_embeddings()) + " x " + std::to_string(e.embedding_dim());
    std::printf("%-44s %-12s %9zu  lora_embedding_A %s, lora_embedding_B %s\n", (e.path + ".weight").c_str(),
                shape.c_str(), static_cast<std::size_t>(e.a.size() + e.b.size()),
                shape_text({e.a.rows(), e.a.cols()}).c_str(), shape_text({e.b.rows(), e.b.cols()}).c_str());
    std::printf("%-44s rank %td, scale %g (embedding)%s\n", "", static_cast<std::ptrdiff_t>(e.rank()), e.scale,
                e.base_weight ? ", base table saved beside" : "");
  }
  for (const auto& t : ck.embeddings.tokens) {
    std::printf("%-44s trainable tokens: %zu rows replaced\n", (t.path + ".weight").c_str(), t.indices.size());
  }
  for (const auto& s : shared) std::printf("shared: %s\n", s.c_str());
  for (const auto& s : ck.saved_tensors) {
    std::printf("%-44s saved whole (modules_to_save), %s\n", s.name.c_str(),
                std::string(peft::safetensors_name(s.type)).c_str());
  }
  return 0;
}

int merge(const std::vector<std::string>& args) {
  std::optional<std::string> base, adapter, out;
  peft::io::merge_options opt;
  std::string dtype_name = "same";
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) throw usage_error(a + " needs a value");
      return args[++i];
    };
    if (a == "--base") {
      base = value();
    } else if (a == "--adapter") {
      adapter = value();
    } else if (a == "--out") {
      out = value();
    } else if (a == "--dtype") {
      dtype_name = value();
      if (dtype_name == "same") {
        opt.out_dtype.reset();
      } else if (dtype_name == "f32") {
        opt.out_dtype = peft::dtype::f32;
      } else if (dtype_name == "bf16") {
        opt.out_dtype = peft::dtype::bf16;
      } else if (dtype_name == "f16") {
        opt.out_dtype = peft::dtype::f16;
      } else {
        throw usage_error("--dtype must be same, f32, bf16 or f16, not '" + dtype_name + "'");
      }
    } else if (a == "--quantized-base") {
      const std::string q = value();
      if (!peft::quantized_format_index(q)) {
        throw usage_error("--quantized-base must be one of " + peft::quantized_format_names() + ", not '" + q + "'");
      }
      opt.quantized_base = q;
    } else {
      throw usage_error("unknown argument '" + a + "'");
    }
  }
  if (!base || !adapter || !out) throw usage_error("merge needs --base, --adapter and --out");
  const auto report = peft::io::merge_model(*base, *adapter, *out, opt);
  std::printf("merged %zu tensors (%zu replaced by modules_to_save) of %zu into %s, dtype %s\n",
              report.merged.size(), report.replaced.size(), report.tensors, out->c_str(),
              dtype_name.c_str());
  if (report.requantized) {
    std::fprintf(stderr,
                 "peft: note: merged into a %s base: the merged weights were re-quantized to %s "
                 "(max change %.3g from W + dW); the output holds their dequantized values\n",
                 report.requantized->c_str(), report.requantized->c_str(),
                 report.max_requantization_error);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> all(argv + 1, argv + argc);
  try {
    if (all.empty()) throw usage_error("missing command: inspect, merge, logits, generate, finetune, export or import");
    if (all[0] == "-h" || all[0] == "--help") {
      std::fputs(usage, stdout);
      return 0;
    }
    const std::vector<std::string> rest(all.begin() + 1, all.end());
    if (all[0] == "inspect") return inspect(rest);
    if (all[0] == "merge") return merge(rest);
    if (all[0] == "logits") return peft_cli::lm_logits(rest);
    if (all[0] == "generate") return peft_cli::lm_generate(rest);
    if (all[0] == "finetune") return peft_cli::lm_finetune(rest);
    if (all[0] == "export") return peft_cli::export_adapter(rest);
    if (all[0] == "import") return peft_cli::import_adapter(rest);
    throw usage_error("unknown command '" + all[0] + "'");
  } catch (const usage_error& e) {
    std::cerr << "peft: " << one_line(e.what()) << " (peft --help for usage)\n";
  } catch (const std::exception& e) {
    std::cerr << "peft: error: " << one_line(e.what()) << "\n";
  }
  return 2;
}
