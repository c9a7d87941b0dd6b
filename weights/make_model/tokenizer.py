"""A byte-level BPE tokenizer for the small model, trained with `tokenizers` on the corpus.

    python -m weights.make_model.tokenizer OUT.json TEXT_FILE... [--vocab 4096]

(corpus.py calls train_tokenizer itself.) The layout follows weights/tokenizer.py's byte tokenizer:
ids 0..5 are DeepSeek's special tokens (BOS 0, EOS 1, <｜User｜>, <｜Assistant｜>, <think>, </think>),
then the 256 byte symbols, then the merges, `vocab` ids in all. Pre-tokenization splits every digit
off by itself (so numbers are one token per digit, which the synthetic pass-key documents rely on),
then applies GPT-2's byte-level regex. Deterministic: the same text gives the same file (checked by
tests/test_trained_export.py on a small text).
"""
import argparse
import json
import sys

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from weights.tokenizer import SPECIAL_TOKENS, byte_chars

# Training reads at most this many characters of each file (its first ones), so that each
# source weighs about the same in the merges whatever its size.
BYTES_PER_FILE = 4_000_000


def iterate(paths, limit=BYTES_PER_FILE, chunk=1 << 16):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read(limit)
        for i in range(0, len(text), chunk):
            yield text[i:i + chunk]


def train_tokenizer(paths, out, vocab=4096):
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=byte_chars())
    tok.train_from_iterator(iterate(paths), trainer=trainer)
    spec = json.loads(tok.to_str())
    # the trainer's byte symbols come in order of first appearance; put them in byte order after the
    # special tokens, as weights/tokenizer.py's byte tokenizer does, and keep the merges' order
    ranked = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    n = len(SPECIAL_TOKENS)
    order = SPECIAL_TOKENS + byte_chars() + [t for t, _ in ranked if t not in set(SPECIAL_TOKENS) | set(byte_chars())]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)]
    assert len(order) == vocab, f"trained {len(order)} tokens, asked for {vocab} (too little text?)"
    assert [spec["model"]["vocab"][t] for t in SPECIAL_TOKENS] == list(range(n))
    with open(out, "w", encoding="utf-8") as f:
        f.write(json.dumps(spec, ensure_ascii=False, indent=1) + "\n")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer on text files.")
    ap.add_argument("out")
    ap.add_argument("text", nargs="+")
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    train_tokenizer(args.text, args.out, args.vocab)
    print(f"wrote {args.out}", file=sys.stderr)
