#!/usr/bin/env python3
"""Writes tests/data/tokenizers: small HuggingFace `tokenizers` tokenizer.json files and golden outputs.

Not part of the test suite (it needs the Python package `tokenizers`; the C++ tests only read the
files written here). Run from anywhere:

    python3 scripts/make_tokenizer_references.py

It deletes and rewrites tests/data/tokenizers (and nothing else): for each family gpt2, llama3,
qwen2, llama2, mistral

    tests/data/tokenizers/<family>/tokenizer.json   a tokenizer with that family's real pipeline
                                                     (normalizer, pre-tokenizer, BPE options, decoder,
                                                     post-processor, added tokens) but a SMALL BPE
                                                     vocabulary trained here with tokenizers' BpeTrainer
    tests/data/tokenizers/<family>/golden.json       a JSON list of cases {"text", "add_special_tokens",
                                                     "ids", "decoded", "decoded_skip"} computed with the
                                                     Python `tokenizers` package from that very file
    tests/data/tokenizers/README.md                  what is there, versions, sources and licenses

Deterministic: no randomness, sorted file lists, sample selection by SHA-256; re-running with the same
`tokenizers` version and the same corpus files writes byte-identical files.

Corpora (read from the local machine, nothing is downloaded):

* Debian's fortune cookie packages (plain text, entries separated by lines holding only `%`):
  `fortunes` and `fortunes-min` (English, /usr/share/games/fortunes/*; fortune-mod, BSD-3-Clause),
  `fortunes-de` (German, /usr/share/games/fortunes/de; GPL-2+), `fortunes-es` (Spanish,
  /usr/share/games/fortunes/es; GPL-2+, the quotes themselves presumed public domain) and
  `fortunes-it` (Italian, /usr/share/games/fortunes/it; declared public domain by its authors).
  `.dat` / `.u8` files, symlinks and the `off` (offensive) folders are skipped; files are decoded as
  UTF-8 with errors="replace" and entries holding control characters other than tab/newline (the
  overstrike backspaces of some English files) or U+FFFD are dropped.
* llama.cpp (MIT), as vendored in the PyPI source package llama-cpp-python 0.3.36 that
  scripts/llama_cpp/build.sh unpacks to $LLAMA_CPP_DIR (default
  ${PEFT_CPP_CACHE:-~/.cache/peft-cpp}/llama.cpp-0.3.36): the tokenizer test inputs
  vendor/llama.cpp/models/ggml-vocab-*.gguf.inp (texts separated by a line `__ggml_vocab_test__`)
  become golden cases, and a few of its C++/Python sources are the code part of the training text.
* A few short multilingual sentences written for this script (in the source below).

Optional check, not written to the repository:

    python3 scripts/make_tokenizer_references.py --real-vocab /tmp/realvocab

builds full-vocabulary tokenizer.json files for gpt2 / llama3 / qwen2 / llama2 from llama.cpp's
vocab-only GGUF files (models/ggml-vocab-{gpt-2,llama-bpe,qwen2,llama-spm}.gguf; needs the `gguf`
package) with the same pipeline configurations as below, writes them to OUT_DIR, encodes every
`.inp` text (add_special_tokens=False, as llama.cpp's convert_hf_to_gguf_update.py did with
transformers) and compares with the ids of the matching `.out` file. That validates the pipeline
configurations used for the small tokenizers against what the real HuggingFace tokenizers produced.
Exit status 1 if any case differs.
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import unicodedata

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "tokenizers")
FORTUNES = "/usr/share/games/fortunes"
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR") or os.path.join(
    os.environ.get("PEFT_CPP_CACHE") or os.path.expanduser("~/.cache/peft-cpp"), "llama.cpp-" + LLAMA_CPP_VERSION)
LLAMA_CPP = os.path.join(LLAMA_CPP_DIR, "vendor", "llama.cpp")
GGUF_MODELS = os.path.join(LLAMA_CPP, "models")
INP_SEP = "\n__ggml_vocab_test__\n"

FAMILIES = ["gpt2", "llama3", "qwen2", "llama2", "mistral"]
# llama.cpp test input / GGUF vocab used for each family (mistral shares llama-spm's inputs)
GGUF_NAME = {"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2", "llama2": "llama-spm", "mistral": "llama-spm"}
# vocabulary sizes (model vocab, i.e. without the added tokens that are not in it)
VOCAB_SIZE = {"gpt2": 2000, "llama3": 2400, "qwen2": 2600, "llama2": 2000, "mistral": 1800}

# ---------------------------------------------------------------------------------------------
# pipeline pieces, as in the real tokenizer.json files
# ---------------------------------------------------------------------------------------------
# gpt2: ByteLevel(use_regex=True) applies GPT-2's own pattern
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPM = "\u2581"  # ▁

LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"]
                   + ["<|reserved_special_token_%d|>" % i for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"])
LLAMA3_SPECIALS_SMALL = LLAMA3_SPECIALS + ["<|reserved_special_token_%d|>" % i for i in range(5, 11)]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MISTRAL_CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
BYTE_TOKENS = ["<0x%02X>" % b for b in range(256)]


def pipeline(family, tok):
    """Sets normalizer / pre_tokenizer / decoder / post_processor of `tok` as in the real family."""
    if family == "gpt2":
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
        tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    elif family == "llama3":
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A:0",
                pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])])
    elif family == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    elif family == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPM), normalizers.Replace(" ", SPM)])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace(SPM, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
        tok.post_processor = processors.TemplateProcessing(
            single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    elif family == "mistral":
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM, prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(replacement=SPM, prepend_scheme="first", split=False)
        tok.post_processor = processors.TemplateProcessing(
            single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        raise ValueError(family)


def bpe_model(family, vocab, merges):
    merges = [tuple(m) for m in merges]
    if family in ("gpt2", "qwen2"):  # their tokenizer.json spell the affixes "" (not null)
        return models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False)
    if family == "llama3":
        return models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                          byte_fallback=False, ignore_merges=True)
    if family in ("llama2", "mistral"):
        return models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token="<unk>", fuse_unk=True,
                          byte_fallback=True, ignore_merges=False)
    raise ValueError(family)


def special(content, **kw):
    return AddedToken(content, single_word=kw.get("single_word", False), lstrip=kw.get("lstrip", False),
                      rstrip=kw.get("rstrip", False), normalized=kw.get("normalized", False), special=True)


def plain(content, **kw):
    return AddedToken(content, single_word=kw.get("single_word", False), lstrip=kw.get("lstrip", False),
                      rstrip=kw.get("rstrip", False), normalized=kw.get("normalized", False), special=False)


# ---------------------------------------------------------------------------------------------
# corpora
# ---------------------------------------------------------------------------------------------
def read_fortune_file(path):
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    entries, cur = [], []
    for line in text.split("\n"):
        if line == "%":
            entries.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    entries.append("\n".join(cur))
    out = []
    for e in entries:
        e = e.strip("\n")
        if not e.strip() or "\ufffd" in e:
            continue
        if any((ord(c) < 32 and c not in "\t\n") or ord(c) == 127 for c in e):
            continue
        out.append(e)
    return out


def fortune_files(folder):
    files = []
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if name.endswith((".dat", ".u8")) or os.path.islink(p) or not os.path.isfile(p):
            continue
        files.append(p)
    return files


def load_fortunes():
    """{lang: [(file, entry), ...]} in file order."""
    langs = {"en": FORTUNES, "de": os.path.join(FORTUNES, "de"), "es": os.path.join(FORTUNES, "es"),
             "it": os.path.join(FORTUNES, "it")}
    out = {}
    for lang, folder in langs.items():
        if not os.path.isdir(folder):
            raise SystemExit(f"missing {folder}: apt-get install fortunes fortunes-de fortunes-es fortunes-it")
        rows = []
        for p in fortune_files(folder):
            rows.extend((os.path.relpath(p, FORTUNES), e) for e in read_fortune_file(p))
        out[lang] = rows
    return out


def sha(s):
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


SAMPLES_PER_LANG = {"en": 8, "de": 8, "es": 7, "it": 7}
TRAIN_CHARS_PER_LANG = 700_000


def split_fortunes(fortunes):
    """Held-out golden samples (by SHA-256 order) and the training entries (a stride subsample)."""
    samples, train = [], []
    for lang in ["en", "de", "es", "it"]:
        rows = fortunes[lang]
        # no double-encoded UTF-8 ("Ã¶"), which some Italian files have
        cands = [r for r in rows if 60 <= len(r[1]) <= 480 and "\u00c3" not in r[1] and "\u00c2" not in r[1]]
        if lang in ("de", "es"):  # entries with non-ASCII letters (Italian files mostly write e' for è)
            cands = [r for r in cands if any(ord(c) > 127 for c in r[1])]
        picked = sorted(cands, key=lambda r: sha(lang + "\0" + r[1]))[:SAMPLES_PER_LANG[lang]]
        picked_texts = {r[1] for r in picked}
        samples.extend((lang, r[0], r[1]) for r in sorted(picked, key=lambda r: sha(lang + "\0" + r[1])))
        rest = [r[1] for r in rows if r[1] not in picked_texts]
        total = sum(len(t) for t in rest)
        stride = max(1, -(-total // TRAIN_CHARS_PER_LANG))
        train.extend(rest[::stride])
    return samples, train


CODE_FILES = ["src/llama-vocab.cpp", "src/unicode.cpp", "gguf-py/gguf/vocab.py", "gguf-py/gguf/gguf_reader.py",
              "convert_hf_to_gguf_update.py"]


def load_code():
    out = []
    for rel in CODE_FILES:
        with open(os.path.join(LLAMA_CPP, rel), encoding="utf-8") as f:
            text = f.read()
        # chunks of ~40 lines so that a "sequence" is not a whole file
        lines = text.split("\n")
        for i in range(0, len(lines), 40):
            out.append("\n".join(lines[i:i + 40]))
    return out


# Written for this script. Repeated in the training text so that these (and only these few) CJK,
# Cyrillic, Greek, Arabic, ... characters make it into the SentencePiece-style vocabularies; every
# other CJK character / emoji goes through byte fallback there.
MULTILINGUAL_TRAIN = [
    "我在学习中文。我们的工作很有意思。这是一个问题。",
    "今天我们在公园。他是我的朋友。",
    "日本語を勉強しています。これは本です。",
    "Привет, как дела? Это хороший день. Мы говорим по-русски.",
    "Καλημέρα κόσμε. Η γλώσσα είναι ωραία.",
    "مرحبا، كيف حالك؟ هذا كتاب.",
    "Ça va très bien, merci. L'été est là, où êtes-vous?",
    "Tiếng Việt có dấu. Xin chào các bạn.",
]


def training_text(fortune_train, code):
    return fortune_train + code + MULTILINGUAL_TRAIN * 12


def read_inp(family):
    path = os.path.join(GGUF_MODELS, "ggml-vocab-%s.gguf.inp" % GGUF_NAME[family])
    with open(path, encoding="utf-8", newline="") as f:
        raw = f.read()
    parts = raw.split(INP_SEP)
    if parts[-1] != "":
        raise SystemExit(f"{path}: does not end with the separator")
    return parts[:-1]


def read_out(name):
    path = os.path.join(GGUF_MODELS, "ggml-vocab-%s.gguf.out" % name)
    with open(path, encoding="utf-8") as f:
        return [[int(x) for x in line.split()] for line in f.read().split("\n")[:-1]]


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def train_bytelevel(family, texts, vocab_size):
    tok = Tokenizer(models.BPE())
    # the family's own normalizer + pre-tokenizer split the training words
    if family == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    elif family == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    elif family == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    m = json.loads(tok.to_str())["model"]
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    missing = alphabet - set(m["vocab"])
    if missing:
        raise SystemExit(f"{family}: byte alphabet not in the trained vocab: {sorted(missing)}")
    return m["vocab"], m["merges"]


# SentencePiece-like words for training: a piece never crosses a ▁ except for runs of ▁ (the run minus
# its last ▁ is one word, like sentencepiece's whitespace-only pieces), digits are single pieces
# (sentencepiece's split_digits). Only used for training; the saved tokenizers use the real pipelines.
SPM_TRAIN_SPLIT = SPM + "[^" + SPM + "]+|" + SPM + "+(?=" + SPM + "[^" + SPM + "])|" + SPM + "+|[^" + SPM + "]+"
SPM_MIN_CHAR_COUNT = 10


def train_spm(texts, vocab_size):
    # sentencepiece trains on lines; newline and tab are not in the vocabularies (byte fallback)
    lines = []
    for t in texts:
        for line in t.replace("\t", " ").split("\n"):
            if line.strip():
                lines.append(line)
    counts = {}
    for line in lines:
        for c in line:
            counts[c] = counts.get(c, 0) + 1
    rare = {ord(c): None for c, n in counts.items() if n < SPM_MIN_CHAR_COUNT}
    lines = [line.translate(rare) for line in lines]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPM), normalizers.Replace(" ", SPM)])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPM_TRAIN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.Digits(individual_digits=True)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[])
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    m = json.loads(tok.to_str())["model"]
    return m["vocab"], m["merges"]


def spm_vocab(head, trained_vocab):
    vocab = {t: i for i, t in enumerate(head + BYTE_TOKENS)}
    for t, _ in sorted(trained_vocab.items(), key=lambda kv: kv[1]):
        if t in vocab:
            raise SystemExit(f"trained piece {t!r} collides with a reserved token")
        vocab[t] = len(vocab)
    return vocab


# ---------------------------------------------------------------------------------------------
# building the small tokenizers
# ---------------------------------------------------------------------------------------------
def build_small(family, texts):
    n = VOCAB_SIZE[family]
    if family == "gpt2":
        vocab, merges = train_bytelevel(family, texts, n - 1)
        vocab = dict(vocab)
        vocab["<|endoftext|>"] = len(vocab)  # in the model vocab, last id (as in GPT-2)
        tok = Tokenizer(bpe_model(family, vocab, merges))
        tok.add_special_tokens([special("<|endoftext|>", normalized=True)])  # GPT-2 spells normalized: true
        # test addition: a non-special added token matched only as a whole word
        tok.add_tokens([plain("ipsum", single_word=True, normalized=False)])
    elif family == "llama3":
        vocab, merges = train_bytelevel(family, texts, n)
        tok = Tokenizer(bpe_model(family, vocab, merges))
        tok.add_special_tokens([special(t) for t in LLAMA3_SPECIALS_SMALL])
    elif family == "qwen2":
        vocab, merges = train_bytelevel(family, texts, n)
        tok = Tokenizer(bpe_model(family, vocab, merges))
        tok.add_special_tokens([special(t) for t in QWEN2_SPECIALS])
        # Qwen2.5-style non-special tokens, and a test addition: a non-special token matched on the
        # NFC-normalized text (so "cafe\u0301" matches too)
        tok.add_tokens([plain("<tool_call>"), plain("</tool_call>"), plain("caf\u00e9", normalized=True)])
    elif family == "llama2":
        trained, merges = train_spm(texts, n - 3 - 256)
        vocab = spm_vocab(["<unk>", "<s>", "</s>"], trained)
        tok = Tokenizer(bpe_model(family, vocab, merges))
        tok.add_special_tokens([special(t) for t in ["<unk>", "<s>", "</s>"]])
    elif family == "mistral":
        head = ["<unk>", "<s>", "</s>"] + MISTRAL_CONTROL
        trained, merges = train_spm(texts, n - len(head) - 256)
        vocab = spm_vocab(head, trained)
        tok = Tokenizer(bpe_model(family, vocab, merges))
        tok.add_special_tokens([special(t) for t in head])
        # test addition: a non-special token that swallows the whitespace around it
        tok.add_tokens([plain("<sep>", lstrip=True, rstrip=True, normalized=False)])
    else:
        raise ValueError(family)
    pipeline(family, tok)
    return tok


QWEN2_DECODER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def tokenizer_json(family, tok):
    """tokenizer.json text; gpt2 and llama2 keep the legacy "a b" merge strings of their real files."""
    doc = json.loads(tok.to_str())
    if family == "qwen2":
        # as in Qwen's file; the Python constructor of decoders.ByteLevel drops these options (the
        # ByteLevel decoder does not use them)
        doc["decoder"] = dict(QWEN2_DECODER)
    if family in ("gpt2", "llama2"):
        assert all(" " not in a and " " not in b for a, b in doc["model"]["merges"])
        doc["model"]["merges"] = [a + " " + b for a, b in doc["model"]["merges"]]
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# golden texts
# ---------------------------------------------------------------------------------------------
CODE_SNIPPETS = [
    # Python with tabs and a docstring
    'def greet(name: str) -> str:\n\t"""Say hello."""\n\tif not name:\n\t\treturn "Hello, world!"\n'
    '\treturn f"Hello, {name}!"  # two spaces before the comment\n',
    # C++ with 4-space indentation and operators
    '#include <vector>\n\nint main(int argc, char ** argv) {\n    std::vector<int> v{1, 2, 3};\n'
    '    for (auto & x : v) { x <<= 2; }\n    return v.size() != 3 ? -1 : 0;\n}\n',
    # JSON
    '{\n  "name": "peft-cpp",\n  "version": "0.1.0",\n  "tags": ["lora", "ia3"],\n  "ok": true,\n  "n": null\n}',
    # Makefile (tab-indented recipe) and shell
    'all: build\n\nbuild:\n\t$(CXX) -O2 -std=c++17 -Iinclude main.cpp -o main\n\t@echo "done"   \n',
    # CRLF line endings, trailing spaces, runs of spaces
    'line one\r\nline two   \r\n\r\n    indented\tand\ttabbed\r\n',
    # HTML / XML
    '<div class="x">&amp; <b>bold</b></div>\n<!-- comment -->',
    # Rust-ish with a lifetime and apostrophes
    "fn first<'a>(s: &'a str) -> &'a str { &s[..1] } // it's 'fine'",
    # SQL and a regex
    "SELECT id, name FROM users WHERE email LIKE '%@example.com' ORDER BY id DESC;\n"
    r"re.compile(r'^\s*(\d{1,3})\.(\d+)\s*$')",
]


def llama_cpp_snippets():
    out = []
    with open(os.path.join(LLAMA_CPP, "tests", "test-tokenizer-0.py"), encoding="utf-8") as f:
        out.append(f.read()[:700])
    with open(os.path.join(LLAMA_CPP, "tests", "test-tokenizer-0.cpp"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    start = next(i for i, l in enumerate(lines) if l.startswith("static llama_tests read_tests"))
    out.append("\n".join(lines[start:start + 30]))
    return out


COMMON_TEXTS = [
    "", " ", "  ", "\n\n\n", "\t", " \n \n", "Hello world", " Hello world", "Hello world  ", "          ",
    # emoji: plain, variation selector, ZWJ sequences, flags, skin tone, keycap
    "I \u2764\ufe0f \U0001F999 and \U0001F680!",
    "Family: \U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 and \U0001F3F3\ufe0f\u200d\U0001F308",
    "Flags: \U0001F1E9\U0001F1EA\U0001F1EA\U0001F1F8\U0001F1EE\U0001F1F9\U0001F1EF\U0001F1F5 \U0001F44D\U0001F3FD 1\ufe0f\u20e3",
    "\U0001F600\U0001F600\U0001F600 \U0001F9D1\U0001F3FB\u200d\U0001F4BB",
    # CJK (some of these characters are in the SentencePiece-style vocabularies, most are not)
    "我想在apple工作1314151天～",
    "我们的工作很有意思，但是这个问题很难解决。",
    "東京都は日本の首都です。カタカナとひらがな、漢字。",
    "안녕하세요, 세계! 한국어 텍스트입니다.",
    "全角スペース\u3000と半角 スペース",
    # RTL and other scripts
    "مرحبا بالعالم! هذا اختبار للنص العربي ١٢٣.",
    "שלום עולם",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "สวัสดีครับ ภาษาไทย",
    "Привет, мир! Ёжик в тумане.",
    "Ελληνικά: αβγ ΑΒΓ",
    # combining characters (NFC matters for qwen2)
    "e\u0301", "cafe\u0301 vs caf\u00e9", "A\u030angstro\u0308m and \u00c5ngstr\u00f6m",
    "Cu\u031b\u0309a Vie\u0323\u0302t", "\u1100\u1161\u11a8 (conjoining jamo)",
    "Z\u0351\u0337a\u0336\u0360l\u0338g\u0315o\u035c",
    # whitespace oddities and unicode spaces
    "a  b   c\t\td \r\n e", "tab\tand\u000bvertical\u000cform feed",
    "non\u00a0breaking\u00a0space and zero\u200bwidth and \ufeffBOM", "line\u2028separator\u2029paragraph",
    # numbers, contractions, punctuation
    "3.14159 1,000,000 12345678901234567890 -42 0x1F",
    "I'M sure you'RE right, we'Ve got it; they'll've done it. don't DON'T",
    "!!!!!!!!!! ??? ... --- === ~~~ ``` \"\"\" '''",
    "=" * 40,
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "https://example.com/path?query=1&lang=de#anchor user@example.org",
    "Ümlaute: äöü ÄÖÜ ß; Español: ¿Qué tal? ¡Niño!; Italiano: perché così è",
    "½ ¼ ¾ € £ ¥ © ® ™ ° ± × ÷ µ",
    "Ünïcödé  \t\n\n  mixed\n",
    # added-token lookalikes that must NOT match
    "<|im_start", "<|endoftext", "<s", "[INST", "<|begin_of_text",
]

FAMILY_TEXTS = {
    "gpt2": [
        "Hello<|endoftext|>World", "<|endoftext|><|endoftext|>", "a <|endoftext|> b", "<|endoftext|>",
        "lorem ipsum dolor", "ipsum", "ipsumipsum", "(ipsum) ipsum. ipsums lipsum ipsum",
    ],
    "llama3": [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|reserved_special_token_3|>x<|reserved_special_token_10|>", " <|eot_id|> ", "<|end_of_text|>",
    ],
    "qwen2": [
        "<|im_start|>user\nhi<|im_end|>",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n",
        "text<|endoftext|>more", "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
        "un caf\u00e9 et un cafe\u0301, CAF\u00c9, cafés", "caf\u00e9",
    ],
    "llama2": [
        "<s>[INST] Hi there [/INST] Hello!</s>", "<unk>", " <s> ", "</s>x", "a<s>b</s>c",
    ],
    "mistral": [
        "<s>[INST] What is 2+2? [/INST] 4</s>[INST] thanks [/INST]",
        "[AVAILABLE_TOOLS] [{\"type\": \"function\"}][/AVAILABLE_TOOLS][INST] hi [/INST][TOOL_CALLS]",
        "a <sep> b", "a<sep>b", "  <sep>  ", "x\n<sep>\ny", "<sep>", "<unk> </s>",
    ],
}

# texts that are also encoded with the other add_special_tokens value
BOTH_WAYS = {"", " ", "Hello world", "\n\n\n", "e\u0301"}


def golden_cases(family, tok, inp_texts, fortune_samples, snippets):
    cases = []

    def add(text, add_special):
        ids = tok.encode(text, add_special_tokens=add_special).ids
        cases.append({"text": text, "add_special_tokens": add_special, "ids": ids,
                      "decoded": tok.decode(ids, skip_special_tokens=False),
                      "decoded_skip": tok.decode(ids, skip_special_tokens=True)})

    for i, t in enumerate(inp_texts):  # as llama.cpp's .out files: no special tokens
        add(t, False)
        if i in (0, 1, 11, 28, 29, len(inp_texts) - 1):
            add(t, True)
    for _, _, t in fortune_samples:
        add(t, True)
    for t in CODE_SNIPPETS + snippets + COMMON_TEXTS + FAMILY_TEXTS[family]:
        add(t, True)
        if t in BOTH_WAYS or t in FAMILY_TEXTS[family][:2]:
            add(t, False)
    return cases


def write_golden(path, cases):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("[\n")
        for i, c in enumerate(cases):
            f.write(json.dumps(c, ensure_ascii=False, separators=(", ", ": ")))
            f.write(",\n" if i + 1 < len(cases) else "\n")
        f.write("]\n")


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------
def package_versions():
    pk = ["fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it"]
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version}\\n"] + pk, capture_output=True, text=True)
        got = dict(line.split(" ", 1) for line in r.stdout.strip().split("\n") if " " in line)
    except OSError:
        got = {}
    return ", ".join(f"{p} {got.get(p, '(unknown)')}" for p in pk)


def describe(family, tok):
    doc = json.loads(tok.to_str())
    m = doc["model"]
    flags = {k: m.get(k) for k in ["dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                                   "fuse_unk", "byte_fallback", "ignore_merges"]}
    added = []
    for a in doc["added_tokens"]:
        fl = [k for k in ["special", "normalized", "lstrip", "rstrip", "single_word"] if a[k]]
        added.append(f"{a['content']}={a['id']}" + (f" ({', '.join(fl)})" if fl else ""))
    return m, flags, added


README_HEAD = """# tests/data/tokenizers: small HuggingFace tokenizers and golden encodings

Written by `scripts/make_tokenizer_references.py` (do not edit by hand; this README is generated too).
Regenerate from the repository root with

    python3 scripts/make_tokenizer_references.py

(needs only the Python package `tokenizers`, the Debian fortune packages listed below and llama.cpp's
source as unpacked by `scripts/llama_cpp/build.sh`; a few seconds; deletes and rewrites this folder
only). Deterministic: re-running with the same versions and corpus files writes byte-identical files.

Versions used: tokenizers {tokenizers}, Python {python}; {packages}; llama.cpp from llama-cpp-python
{llama_cpp}.

## Layout

    <family>/tokenizer.json   tokenizer in HuggingFace `tokenizers` format (loadable with
                              tokenizers.Tokenizer.from_file / transformers PreTrainedTokenizerFast)
    <family>/golden.json      JSON list of cases, one per line:
                              {{"text", "add_special_tokens", "ids", "decoded", "decoded_skip"}}
                              ids = tokenizer.encode(text, add_special_tokens=...).ids,
                              decoded = tokenizer.decode(ids, skip_special_tokens=False),
                              decoded_skip = tokenizer.decode(ids, skip_special_tokens=True)

Each tokenizer has the pipeline of the real model family (normalizer, pre-tokenizer, BPE options,
decoder, post-processor, added tokens and their flags) but a small BPE vocabulary trained by this
script with `tokenizers.trainers.BpeTrainer` (min_frequency 2) on a mix of fortune cookies (English,
German, Spanish, Italian), llama.cpp source code and a few multilingual sentences. Byte-level
families start from `ByteLevel.alphabet()` (all 256 bytes are tokens). The SentencePiece-style
families (llama2, mistral) have `<0x00>`..`<0xFF>` byte tokens; their training text holds only a
handful of CJK characters and no emoji, newline or tab, so those go through byte fallback. For them
the words used for training never cross a `▁` except in runs of `▁` and digits are single pieces, as
with sentencepiece; the saved tokenizers use the real (legacy-normalizer / Metaspace) pipelines.
gpt2 and llama2 write their merges in the legacy `"a b"` string form (as their real files do), the
others as `["a", "b"]` pairs.

Not real vocabularies: ids differ from the real models. `scripts/make_tokenizer_references.py
--real-vocab OUT_DIR` builds full-vocabulary tokenizers with the same pipelines from llama.cpp's
vocab-only GGUF files and checks them against llama.cpp's expected ids (written with transformers);
nothing of that is stored here.

## Families
"""

README_TAIL = """
## Cases

Per family: every test text of llama.cpp's `models/ggml-vocab-<name>.gguf.inp` (gpt2: gpt-2,
llama3: llama-bpe, qwen2: qwen2, llama2 and mistral: llama-spm) with add_special_tokens=false (as in
the `.out` files) and a few of them also with true; {n_fortunes} fortune cookies held out of the
training text (picked by SHA-256 among entries of 60-480 characters without double-encoded
UTF-8; for de/es only entries with non-ASCII letters); code snippets (tabs, CRLF, runs of spaces,
two excerpts of llama.cpp's tests/test-tokenizer-0.*); emoji (ZWJ sequences, flags, skin tones, keycaps), CJK, Arabic, Hebrew,
Devanagari, Thai, Cyrillic, Greek, decomposed combining characters (NFC matters for qwen2), Unicode
spaces, the empty string, a lone space, "\\n\\n\\n"; texts with the family's special/added tokens and
near-misses of them. All with add_special_tokens=true unless stated; a few also with false.

| family | cases |
|---|---|
{case_rows}

## Sources and licenses

- Debian fortune packages, read from /usr/share/games/fortunes: `fortunes` and `fortunes-min`
  (English; fortune-mod, BSD-3-Clause, The Regents of the University of California and contributors),
  `fortunes-de` (German, subfolder de/; GPL-2+, Andreas Tille), `fortunes-es` (Spanish, es/; GPL-2+
  for the package, the quotes "presumed to be in the public domain"), `fortunes-it` (Italian, it/;
  declared public domain/freeware by fortune-it). Quotes from these files are in golden.json, and the
  trained vocabularies are derived from them. Files from the `off` folders and entries with control
  characters other than tab/newline are not used.
- llama.cpp (MIT License, Copyright (c) 2023-2026 The ggml authors), vendored in llama-cpp-python
  {llama_cpp}: the test inputs `models/ggml-vocab-*.gguf.inp` (written by its
  convert_hf_to_gguf_update.py), training code from {code_files}, and the excerpts of
  tests/test-tokenizer-0.py and tests/test-tokenizer-0.cpp in the golden cases.
- The other sample texts and the multilingual training sentences are written for this script.
"""


def write_readme(toks, counts, n_fortunes):
    parts = [README_HEAD.format(tokenizers=tokenizers.__version__, python=platform.python_version(),
                                packages=package_versions(), llama_cpp=LLAMA_CPP_VERSION)]
    for family in FAMILIES:
        tok = toks[family]
        doc = json.loads(tok.to_str())
        m, flags, added = describe(family, tok)
        parts.append(f"\n### {family}\n\n")
        parts.append(f"- model vocab {len(m['vocab'])}, merges {len(m['merges'])}, "
                     f"total with added tokens {tok.get_vocab_size(with_added_tokens=True)}\n")
        parts.append(f"- normalizer: `{json.dumps(doc['normalizer'], ensure_ascii=False)}`\n")
        parts.append(f"- pre_tokenizer: `{json.dumps(doc['pre_tokenizer'], ensure_ascii=False)}`\n")
        parts.append(f"- model: BPE `{json.dumps(flags, ensure_ascii=False)}`\n")
        parts.append(f"- decoder: `{json.dumps(doc['decoder'], ensure_ascii=False)}`\n")
        parts.append(f"- post_processor: `{json.dumps(doc['post_processor'], ensure_ascii=False)}`\n")
        parts.append(f"- added tokens: {'; '.join(added)}\n")
    parts.append("\nTest additions (not in the real models): gpt2 `ipsum` (non-special, single_word), qwen2 "
                 "`café` (non-special, normalized: matched on the NFC text), mistral `<sep>` (non-special, "
                 "lstrip + rstrip). llama3 has reserved special tokens 0..10 only. mistral: the control "
                 "tokens of Mistral v0.3 `[INST]`..`[/TOOL_RESULTS]` sit at ids 3..9, before the byte tokens; "
                 "its decoder is `Metaspace` (so byte-fallback pieces decode as the literal `<0xXX>` text), "
                 "where llama2 uses the Replace/ByteFallback/Fuse/Strip sequence.\n")
    rows = "\n".join(f"| {f} | {counts[f]} |" for f in FAMILIES)
    parts.append(README_TAIL.format(n_fortunes=n_fortunes, case_rows=rows, llama_cpp=LLAMA_CPP_VERSION,
                                    code_files=", ".join(CODE_FILES)))
    with open(os.path.join(OUT, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(parts))


# ---------------------------------------------------------------------------------------------
# main: the small tokenizers
# ---------------------------------------------------------------------------------------------
def make_references():
    fortunes = load_fortunes()
    samples, fortune_train = split_fortunes(fortunes)
    texts = training_text(fortune_train, load_code())
    snippets = llama_cpp_snippets()
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    toks, counts = {}, {}
    for family in FAMILIES:
        tok = build_small(family, texts)
        d = os.path.join(OUT, family)
        os.makedirs(d)
        path = os.path.join(d, "tokenizer.json")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(tokenizer_json(family, tok))
        tok = Tokenizer.from_file(path)  # goldens from the file as written
        toks[family] = tok
        cases = golden_cases(family, tok, read_inp(family), samples, snippets)
        write_golden(os.path.join(d, "golden.json"), cases)
        counts[family] = len(cases)
        nbytes = 0
        if family in ("llama2", "mistral"):
            lo = tok.token_to_id("<0x00>")
            nbytes = sum(sum(1 for i in c["ids"] if lo <= i < lo + 256) for c in cases)
        print(f"{family}: {len(cases)} cases, tokenizer.json {os.path.getsize(path)} B, golden.json "
              f"{os.path.getsize(os.path.join(d, 'golden.json'))} B" + (f", byte-fallback ids {nbytes}" if nbytes else ""))
    write_readme(toks, counts, len(samples))


# ---------------------------------------------------------------------------------------------
# optional: full vocabularies from llama.cpp's vocab-only GGUF files
# ---------------------------------------------------------------------------------------------
def gguf_vocab(name):
    from gguf import GGUFReader
    r = GGUFReader(os.path.join(GGUF_MODELS, "ggml-vocab-%s.gguf" % name))
    f = r.fields
    get = lambda k: f[k].contents() if k in f else None
    return get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type"), get("tokenizer.ggml.merges"), \
        get("tokenizer.ggml.scores")


def spm_merges(tokens, scores):
    """Merges from a sentencepiece vocabulary, as transformers' SentencePieceExtractor (by score)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = []
        for k in range(1, len(piece)):
            l, r = piece[:k], piece[k:]
            if l in vocab and r in vocab:
                local.append((l, r, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: x[2], reverse=True)
    return [(l, r) for l, r, _ in merges]


def build_real(family):
    name = GGUF_NAME[family]
    tokens, types, merges, scores = gguf_vocab(name)
    CONTROL = 3
    if family == "gpt2":
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(bpe_model(family, vocab, [m.split(" ") for m in merges]))
        tok.add_special_tokens([special("<|endoftext|>", normalized=True)])
    elif family in ("llama3", "qwen2"):
        first = next(i for i, t in enumerate(types) if t == CONTROL)
        vocab = {t: i for i, t in enumerate(tokens[:first])}
        tok = Tokenizer(bpe_model(family, vocab, [m.split(" ") for m in merges]))
        ctrl = [t for t, ty in zip(tokens[first:], types[first:]) if ty == CONTROL]
        tok.add_special_tokens([special(t) for t in ctrl])
        for i, t in enumerate(ctrl):
            assert tok.token_to_id(t) == first + i, t
    elif family == "llama2":
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(bpe_model(family, vocab, spm_merges(tokens, scores)))
        tok.add_special_tokens([special(t) for t in ["<unk>", "<s>", "</s>"]])
    else:
        raise ValueError(family)
    pipeline(family, tok)
    return tok


def check_real(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    all_ok = True
    for family in ["gpt2", "llama3", "qwen2", "llama2"]:
        tok = build_real(family)
        d = os.path.join(out_dir, family)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "tokenizer.json")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(tokenizer_json(family, tok))
        tok = Tokenizer.from_file(path)
        texts, expected = read_inp(family), read_out(GGUF_NAME[family])
        assert len(texts) == len(expected), (family, len(texts), len(expected))
        bad = []
        for t, e in zip(texts, expected):
            got = tok.encode(t, add_special_tokens=False).ids
            if got != e:
                bad.append((t, e, got))
        roundtrip = sum(1 for t in texts if tok.decode(tok.encode(t, add_special_tokens=False).ids) ==
                        (t if family != "qwen2" else unicodedata.normalize("NFC", t)))
        print(f"{family} ({GGUF_NAME[family]}): {len(texts) - len(bad)}/{len(texts)} .inp texts match the .out ids; "
              f"decode(encode(text)) == text for {roundtrip}/{len(texts)}; {path}")
        for t, e, g in bad:
            all_ok = False
            print(f"  MISMATCH {t!r}\n    expected {e}\n    got      {g}")
    return all_ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real-vocab", metavar="OUT_DIR",
                    help="only build full-vocabulary tokenizers from llama.cpp's GGUF vocab files into OUT_DIR "
                         "and check them against the .out ids (writes nothing to the repository)")
    args = ap.parse_args()
    if args.real_vocab:
        sys.exit(0 if check_real(args.real_vocab) else 1)
    make_references()


if __name__ == "__main__":
    main()
