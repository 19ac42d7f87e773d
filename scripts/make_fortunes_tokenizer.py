#!/usr/bin/env python3
"""Trains the byte-level BPE tokenizer of the fortunes example (examples/fortunes.cpp).

    python3 scripts/make_fortunes_tokenizer.py [--vocab 2048] [--out examples/data/fortunes/tokenizer.json]

Reads the English fortunes (Debian package `fortunes`) and the Italian ones (`fortunes-it`) from
/usr/share/games/fortunes, the same files the example reads, and trains one byte-level BPE
(GPT-2's pre-tokenizer, <s> = 0 as BOS added to every text, </s> = 1 as EOS) on both with the
`tokenizers` package. The result is committed; the example and its build never run this script.
"""
import argparse
import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = pathlib.Path("/usr/share/games/fortunes")
# The English corpus: every plain fortune file of the `fortunes` package except ascii-art
# (drawings); symbolic links (the Italian files linked into the top directory) are skipped.
ENGLISH_SKIP = {"ascii-art"}


def fortune_files(directory, skip=()):
    for p in sorted(directory.iterdir()):
        if p.is_symlink() or not p.is_file() or p.suffix in (".dat", ".u8") or p.name in skip:
            continue
        yield p


def fortunes(path):
    text = path.read_text(encoding="utf-8")
    for part in text.split("\n%\n"):
        part = part.strip("\n%")
        if part.strip():
            yield part


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--out", default="examples/data/fortunes/tokenizer.json")
    a = ap.parse_args()
    texts = []
    for p in fortune_files(ROOT, ENGLISH_SKIP):
        texts.extend(fortunes(p))
    for p in fortune_files(ROOT / "it"):
        texts.extend(fortunes(p))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=a.vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(a.out)
    n = sum(len(tok.encode(t).ids) for t in texts)
    print(f"{a.out}: vocab {tok.get_vocab_size()}, {len(texts)} fortunes, {n} tokens")


if __name__ == "__main__":
    main()
