#!/usr/bin/env python3
"""Run llama.cpp's convert_hf_to_gguf.py on the tiny test models of tests/data/gguf.

The converter identifies a BPE pre-tokenizer by hashing how the tokenizer splits a fixed text and
refuses hashes it does not know. The test models use a small byte-level BPE trained here (see
make_gguf_references.py), whose hash no released model has, so this wrapper makes
TextModel.get_vocab_base_pre answer "gpt-2" (GPT-2's byte-level pre-tokenizer, which is what the
test tokenizer uses). Nothing else is changed. The tokenizer does not matter to the references:
they feed token ids, never text.

  python3 convert_hf_to_gguf_wrapper.py LLAMA_CPP_SRC_DIR  <convert_hf_to_gguf.py arguments...>
"""
import sys
from pathlib import Path

if len(sys.argv) < 2:
    sys.exit(__doc__)
src = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(src))
sys.path.insert(1, str(src / "gguf-py"))

import conversion.base as base  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"

import convert_hf_to_gguf  # noqa: E402

sys.argv = [str(src / "convert_hf_to_gguf.py")] + sys.argv[2:]
convert_hf_to_gguf.main()
