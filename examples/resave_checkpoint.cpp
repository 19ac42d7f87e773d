// resave_checkpoint — load PEFT checkpoints with peft-cpp and save them again in PEFT's layout.
//
//   resave_checkpoint IN_DIR OUT_DIR [IN_DIR OUT_DIR ...]
//
// scripts/check_with_peft.py uses it to show that PEFT loads what peft-cpp writes.
#include <cstdio>
#include <exception>

#include <peft/io/peft_checkpoint.hpp>

int main(int argc, char** argv) {
  if (argc < 3 || argc % 2 == 0) {
    std::fputs("usage: resave_checkpoint IN_DIR OUT_DIR [IN_DIR OUT_DIR ...]\n", stderr);
    return 2;
  }
  try {
    for (int i = 1; i + 1 < argc; i += 2) {
      auto ck = peft::io::load_peft_checkpoint<double>(argv[i]);
      peft::io::save_peft_checkpoint(argv[i + 1], ck);
      std::printf("%s -> %s (%zu modules, %s)\n", argv[i], argv[i + 1], ck.modules.size() + ck.embeddings.lora.size(),
                  ck.modules.empty() ? "lora" : std::string(ck.modules.front().adapter.active_method()).c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "resave_checkpoint: %s\n", e.what());
    return 2;
  }
  return 0;
}
