"""make eval: how closely HISA follows DSA on a trained model, and what each sparse mode costs in quality.

On a checkpoint folder (default weights/dsv32-small: config.json, *.safetensors, tokenizer.json and
heldout.npz, one uint16 array of held-out token ids per training source) it measures:

  1. selection overlap. At every layer, from the same queries and keys, while the model attends with
     DSA's selection, HISA's and the block-sparse baseline's sets are computed too, and per query
         IoU(A, D) = |A ∩ D| / |A ∪ D|,   D = DSA's top-K, A = the other's set.
     Queries are grouped by their context length n (the keys they see): bin L holds n in (previous L, L].
     Mean and minimum per layer and bin (the paper: mean > 99%). Every DSA forward below feeds it.
  2. needle in a haystack: the pass-key documents of weights/make_model/corpus.py (held-out text around
     a 5-digit key placed at a given depth, asked for at the end) over context length x depth; a
     document passes when the argmax at each of the key's positions, given the right digits before it
     (teacher forcing), is the key's digit: exactly what greedy decoding returns. Dense attention, DSA,
     HISA and block-sparse at DSA's token budget (K/B blocks of B), on the same documents.
  3. perplexity exp(mean -log p(next token)) on held-out windows (BOS + L-1 ids) of each source.
  4. HISA's sensitivity to the block size at a fixed candidate budget m*B: B = K/32, K/16, K/8 with
     m = budget/B: overlap, perplexity beyond the budget, pass key at one length.

Writes results.json, results.md and, when matplotlib imports, niah.png and overlap.png to --out
(bench/eval/<card>/, or <card>-quick/ with --quick).

    python bench/eval.py [--ckpt weights/dsv32-small] [--device auto|cpu|gpu] [--quick] [--out DIR]
    python bench/eval.py --replot DIR              # the plots of an earlier DIR/results.json
    python bench/eval.py --stand-in DIR --quick    # write a random-weights stand-in at DIR, evaluate it

--quick is the reduced grid (two lengths around HISA's budget, 3 depths, 1 document a cell): minutes on
a CPU; tests/test_eval.py runs it on a stand-in.
"""
import argparse
import dataclasses
import datetime
import glob
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hisa  # noqa: E402
import model as M  # noqa: E402
from kernels._cuda import xp_of  # noqa: E402
from kernels.topk import topk  # noqa: E402
from weights.make_model import corpus  # noqa: E402
from weights.random_checkpoint import TINY_CONFIG, write_random_checkpoint  # noqa: E402
from weights.safetensors import CheckpointError  # noqa: E402

DEFAULT_CKPT = os.path.join(ROOT, "weights", "dsv32-small")
SOURCES = ("wiki", "shakespeare", "pydoc", "pycode")          # the keys of heldout.npz
MODES = M.INDEXERS                                             # dense, dsa, hisa, block


# ----------------------------------------------------------------------------------------------------
# What to measure

@dataclasses.dataclass
class Grid:
    lengths: list        # pass-key context lengths
    depths: list         # needle depths (share of the filler before it)
    docs: int            # documents per (length, depth) cell
    ppl_lengths: list    # held-out window lengths
    windows: int         # windows per source and length
    sens_length: int     # pass-key length of the sensitivity study
    chunk: int           # prefill chunk (tokens per forward)
    seed: int = 0


def make_grid(cfg, budget, quick, gpu, args):
    """The full grid: lengths 1K, 2K, ... up to max_position_embeddings (2x the training length of the
    embedded model), 5 depths, 10 documents a cell. Quick: HISA's budget m*B and twice it (below the
    budget HISA must equal DSA, above it it prunes), 3 depths, 1 document a cell. Chunks of 4096 on a
    GPU: this model is small enough that a forward's cost is mostly its fixed launch overhead."""
    top = cfg.max_position_embeddings
    if quick:
        lengths = [n for n in (budget, 2 * budget) if n <= top] or [top]
        g = Grid(lengths, [0.1, 0.5, 0.9], 1, list(lengths), 1, lengths[-1], 4096 if gpu else 512)
    else:
        lengths = [1024 << i for i in range(8) if 1024 << i <= top] or [top]
        sens = max([n for n in lengths if n <= top // 2] or lengths[:1])  # the training length, for dsv32-small
        g = Grid(lengths, [0.1, 0.3, 0.5, 0.7, 0.9], 10, [512] + lengths, 2, sens, 4096 if gpu else 512)
    for field, least in (("docs", 1), ("windows", 1), ("chunk", 1), ("seed", 0), ("sens_length", 2)):
        v = getattr(args, field, None)
        if v is not None:
            if v < least:
                raise M.InputError(f"--{field.replace('_', '-')} {v}: at least {least}")
            setattr(g, field, v)
    for field, conv, what in (("lengths", int, "whole numbers"), ("depths", float, "numbers in [0, 1]"),
                              ("ppl_lengths", int, "whole numbers")):
        text = getattr(args, field, None)
        if text:
            try:
                setattr(g, field, [conv(v) for v in text.split(",")])
            except ValueError:
                raise M.InputError(f"--{field.replace('_', '-')} {text!r}: comma-separated {what}") from None
    if not all(0 <= d <= 1 for d in g.depths):
        raise M.InputError(f"--depths {g.depths}: each in [0, 1] (the share of the filler before the needle)")
    too_short = [n for n in g.lengths + g.ppl_lengths if n < 2]
    if too_short:
        raise M.InputError(f"lengths {too_short}: at least 2 tokens")
    too_long = [n for n in g.lengths + g.ppl_lengths + [g.sens_length] if n > top]
    if too_long:
        raise M.InputError(f"lengths {too_long} exceed max_position_embeddings {top}")
    return g


def sensitivity_configs(K, budget):
    """(B, m) with B = K/32, K/16, K/8 and m*B = budget."""
    out = []
    for B in (K // 32, K // 16, K // 8):
        B = max(1, B)
        if (B, budget // B) not in out:
            out.append((B, budget // B))
    return out


# ----------------------------------------------------------------------------------------------------
# Selection overlap: a DSA selector that also runs HISA and block-sparse on the same queries and keys

def overlap(a, d, S):
    """IoU = |A ∩ D| / |A ∪ D| per query of two position lists (T, *) padded with -1, positions < S."""
    xp = xp_of(a)
    in_a = M.selection_mask(a, S)                                                # (T, S)
    inter = (xp.take_along_axis(in_a, xp.maximum(d, 0), 1) & (d >= 0)).sum(1)   # (T,)
    union = (a >= 0).sum(1) + (d >= 0).sum(1) - inter
    return inter / xp.maximum(union, 1)


class Probe(M.Selector):
    """Attends with DSA's top-K, exactly as Selector(cfg, "dsa"). At each layer it also selects with
    every HISA (B, m) of `variants` and with the block-sparse baseline, from the same indexer queries
    and the same key cache, and keeps each one's per-query IoU with DSA's set, binned by context length.

    Call start(cache) before a new sequence's forwards, flush() after them."""

    def __init__(self, cfg, variants, block_B, bins):
        super().__init__(cfg, "dsa")
        self.variants = dict(variants)                     # name -> (B, m)
        self.block_B = block_B
        self.names = list(self.variants) + ["block"]
        self.bins = np.asarray(bins)                       # bin i holds n in (edges[i], edges[i+1]]
        self.edges = np.concatenate([[bins[0] // 2], bins])
        shape = (len(self.names), cfg.num_hidden_layers, len(bins))
        self.sum, self.rows, self.min = np.zeros(shape), np.zeros(shape, np.int64), np.ones(shape)
        self.pending, self.layer_of = [], {}

    def start(self, cache):
        self.layer_of = {id(lc["index"]): i for i, lc in enumerate(cache.layers)}

    def __call__(self, indexer, x, c_q, cos, sin, cache, start):
        q, q_scale, w = indexer(x, c_q, cos, sin, cache, start)
        xp, T = xp_of(q), x.shape[0]
        S = start + T
        ends = (start + 1 + xp.arange(T)).astype(np.int32)                      # query t sees s < ends[t]
        dsa = topk(indexer.scores(q, q_scale, w, cache, S, ends), self.K, lengths=ends)  # (T, K)
        for B in {B for B, _ in self.variants.values()} | {self.block_B}:
            key = f"pooled_B{B}"
            if key not in cache:
                cache[key] = hisa.PooledKeys(cache, B)
            cache[key].update(start, S)
        layer = self.layer_of[id(cache)]
        for name, (B, m) in self.variants.items():
            chosen = hisa.select(q, q_scale, w, cache, cache[f"pooled_B{B}"], ends, self.K, m)
            self.pending.append((name, layer, start, overlap(chosen, dsa, S)))
        chosen = hisa.block_select(q, q_scale, w, cache[f"pooled_B{self.block_B}"], ends, self.K)
        self.pending.append(("block", layer, start, overlap(chosen, dsa, S)))
        return dsa

    def flush(self):
        """Bin the IoUs of the forwards since the last flush (one device-to-host copy each)."""
        for name, layer, start, iou in self.pending:
            iou = M.xp_to_numpy(iou).astype(np.float64)
            n = start + 1 + np.arange(len(iou))                                 # keys each query sees
            b = np.searchsorted(self.edges, n, side="left") - 1
            keep = (b >= 0) & (b < len(self.bins))
            v, b = self.names.index(name), b[keep]
            self.sum[v, layer] += np.bincount(b, iou[keep], len(self.bins))
            self.rows[v, layer] += np.bincount(b, minlength=len(self.bins))
            np.minimum.at(self.min[v, layer], b, iou[keep])
        self.pending = []

    def results(self):
        out = {}
        for v, name in enumerate(self.names):
            rows = self.rows[v]
            mean = np.where(rows > 0, self.sum[v] / np.maximum(rows, 1), np.nan)
            low = np.where(rows > 0, self.min[v], np.nan)
            pooled = np.where(rows[0] > 0, self.sum[v].sum(0) / np.maximum(rows.sum(0), 1), np.nan)
            lowest = np.where(rows[0] > 0, self.min[v].min(0), np.nan)  # every layer sees the same queries
            B, m = self.variants.get(name, (self.block_B, self.K // self.block_B))
            out[name] = {"B": B, "m": m, "lengths": self.bins.tolist(), "rows": rows[0].tolist(),
                         "mean": _nan_to_none(pooled), "min": _nan_to_none(lowest),
                         "layer_mean": [_nan_to_none(r) for r in mean], "layer_min": [_nan_to_none(r) for r in low]}
        return out


def _nan_to_none(a):
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(a, np.float64)]


# ----------------------------------------------------------------------------------------------------
# Scoring: pass keys (teacher-forced argmax) and perplexity

def passkey_predictions(model, ids, answer, selector, chunk):
    """Argmax ids at the key's positions ids[a:b], each given the true ids before it: ids[:b-1] run
    forward by forward, logits kept from the forwards that hold rows a-1 .. b-2 (no extra forward)."""
    a, b = answer
    n, rows = b - 1, []
    cache = model.new_cache(n)
    probe = selector if isinstance(selector, Probe) else None
    if probe is not None:
        probe.start(cache)
    for i in range(0, n, chunk):
        x = ids[i:min(i + chunk, n)]
        keep = i + len(x) > a - 1
        logits = model.forward(x, cache, selector, all_logits=keep)                 # (T, V) or (1, V)
        if keep:
            rows.append(logits[max(a - 1 - i, 0):])
    if probe is not None:
        probe.flush()
    return M.xp_to_numpy(model.xp.concatenate(rows).argmax(-1))                     # (b-a,): predicts ids[a:b]


def nll(model, ids, selector, chunk):
    """(sum over t of -log p(ids[t+1] | ids[:t+1]), number of predictions), forward by forward."""
    xp, n = model.xp, len(ids) - 1
    cache = model.new_cache(n)
    probe = selector if isinstance(selector, Probe) else None
    if probe is not None:
        probe.start(cache)
    total = 0.0
    for i in range(0, n, chunk):
        x = ids[i:min(i + chunk, n)]
        logits = model.forward(x, cache, selector, all_logits=True)              # (T, V)
        y = xp.asarray(ids[i + 1:i + 1 + len(x)])
        top = logits.max(-1, keepdims=True)
        lse = top[:, 0] + xp.log(xp.exp(logits - top).sum(-1))                   # log sum_v exp(logit_v)
        total += float((lse - logits[xp.arange(len(x)), y]).astype(np.float64).sum())
    if probe is not None:
        probe.flush()
    return total, n


def passkey_docs(streams, pieces, L, depths, docs, seed):
    """docs[depth index][i] = (ids, (a, b)), the same for every mode: seeded by (seed, L, depth, i)."""
    out = []
    for j, d in enumerate(depths):
        row = []
        for i in range(docs):
            ids, [ans] = corpus.passkey_doc(np.random.default_rng([seed, L, j, i]), streams, pieces, L, corpus.FILLER, depth=d)
            row.append((ids, ans))
        out.append(row)
    return out


def heldout_windows(streams, L, windows, seed):
    """{source: [BOS + L-1 held-out ids, ...]}, seeded by (seed, 1, L, source, window)."""
    out = {}
    for k, s in enumerate(SOURCES):
        rngs = [np.random.default_rng([seed, 1, L, k, i]) for i in range(windows)]
        out[s] = [np.concatenate([[corpus.BOS], streams.window(rng, L - 1, {s: 1.0})]).astype(np.int32) for rng in rngs]
    return out


# ----------------------------------------------------------------------------------------------------
# The evaluation

class Clock:
    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def say(self, msg):
        dt = time.perf_counter() - self.t0
        print(f"[{dt:7.1f} s, {self.tokens / 1e6:5.2f}M tok] {msg}", flush=True)


def evaluate(model, tok_path, heldout, grid, clock=None):
    """Every measurement of the module docstring; returns the results dict (without timings)."""
    from weights.tokenizer import Tokenizer
    cfg, K = model.cfg, model.cfg.index_topk
    clock = clock or Clock()
    default = M.Selector(cfg, "hisa")
    B, m, budget = default.B, default.m, default.B * default.m
    block = M.Selector(cfg, "block")
    sens = sensitivity_configs(K, budget)
    variants = {f"hisa B={b} m={mm}": (b, mm) for b, mm in sens}
    variants.setdefault(f"hisa B={B} m={m}", (B, m))
    bins = sorted(set(grid.lengths) | set(grid.ppl_lengths))
    probe = Probe(cfg, variants, block.B, bins)
    selectors = {"dense": M.Selector(cfg, "dense"), "dsa": probe, "hisa": default, "block": block}
    streams = corpus.TokenStream.from_arrays(heldout)
    pieces = corpus.Pieces.build(Tokenizer(tok_path))
    for L in sorted(set(grid.lengths) | {grid.sens_length}):  # every pass-key length holds a document: say so now
        try:
            corpus.passkey_doc(np.random.default_rng(0), streams, pieces, L, corpus.FILLER)
        except ValueError as e:
            if "too short for a pass-key document" not in str(e):  # passkey_doc's own check; anything else is a bug
                raise
            raise M.InputError(f"pass-key length: {e}") from None

    # 2. needle in a haystack (its DSA forwards feed 1.)
    acc = {mode: np.zeros((len(grid.lengths), len(grid.depths))) for mode in MODES}
    digits = {mode: np.zeros((len(grid.lengths), len(grid.depths))) for mode in MODES}

    def niah(L, sel, docs=None):
        a, dg = np.zeros(len(grid.depths)), np.zeros(len(grid.depths))
        for j, row in enumerate(docs or passkey_docs(streams, pieces, L, grid.depths, grid.docs, grid.seed)):
            for ids, (s, e) in row:
                right = passkey_predictions(model, ids, (s, e), sel, grid.chunk) == ids[s:e]
                a[j] += right.all() / grid.docs
                dg[j] += right.mean() / grid.docs
                clock.tokens += e - 1
        return a, dg

    for i, L in enumerate(grid.lengths):
        docs = passkey_docs(streams, pieces, L, grid.depths, grid.docs, grid.seed)
        for mode in MODES:
            acc[mode][i], digits[mode][i] = niah(L, selectors[mode], docs)
        clock.say(f"pass key L={L}: " + "  ".join(f"{mode} {acc[mode][i].mean():.2f}" for mode in MODES))

    # 3. perplexity (its DSA forwards feed 1.)
    ppl = {mode: [] for mode in MODES}
    by_source = {mode: {s: [] for s in SOURCES} for mode in MODES}

    def perplexity(L, sel):
        total, count, per = 0.0, 0, {}
        for s, wins in heldout_windows(streams, L, grid.windows, grid.seed).items():
            got = [nll(model, ids, sel, grid.chunk) for ids in wins]
            per[s] = math.exp(sum(g[0] for g in got) / sum(g[1] for g in got))
            total, count = total + sum(g[0] for g in got), count + sum(g[1] for g in got)
            clock.tokens += sum(g[1] for g in got)
        return math.exp(total / count), per

    for L in grid.ppl_lengths:
        for mode in MODES:
            p, per = perplexity(L, selectors[mode])
            ppl[mode].append(p)
            for s in SOURCES:
                by_source[mode][s].append(per[s])
        clock.say(f"perplexity L={L}: " + "  ".join(f"{mode} {ppl[mode][-1]:.2f}" for mode in MODES))

    # 4. sensitivity to B at m*B = budget: the default (B, m) is the "hisa" mode above
    ov = probe.results()
    rows = []
    j_sens = grid.lengths.index(grid.sens_length) if grid.sens_length in grid.lengths else None
    for b, mm in sens:
        name = f"hisa B={b} m={mm}"
        r = {"B": b, "m": mm, "overlap_mean": ov[name]["mean"], "overlap_min": ov[name]["min"]}
        beyond = [L for L in grid.ppl_lengths if L > budget]
        if (b, mm) == (B, m):
            r["ppl"] = [ppl["hisa"][grid.ppl_lengths.index(L)] for L in beyond]
            r["niah"] = (acc["hisa"][j_sens] if j_sens is not None else niah(grid.sens_length, default)[0]).tolist()
        else:
            sel = M.Selector(cfg, "hisa", b, mm)
            r["ppl"] = [perplexity(L, sel)[0] for L in beyond]
            r["niah"] = niah(grid.sens_length, sel)[0].tolist()
        r["ppl_lengths"] = beyond
        rows.append(r)
        clock.say(f"sensitivity B={b} m={mm}: IoU at {bins[-1]} {_fmt(r['overlap_mean'][-1], 4)}, "
                  f"pass key at {grid.sens_length} {np.mean(r['niah']):.2f}"
                  + (f", ppl at {beyond[-1]} {r['ppl'][-1]:.2f}" if beyond else ""))

    return {
        "settings": {"K": K, "hisa": {"B": B, "m": m, "budget": budget}, "block": {"B": block.B, "blocks": K // block.B},
                     "precision": model.precision, **dataclasses.asdict(grid)},
        "overlap": ov,
        "niah": {"lengths": grid.lengths, "depths": grid.depths, "docs": grid.docs,
                 "accuracy": {k: v.tolist() for k, v in acc.items()},
                 "digit_accuracy": {k: v.tolist() for k, v in digits.items()}},
        "perplexity": {"lengths": grid.ppl_lengths, "windows_per_source": grid.windows, "ppl": ppl, "by_source": by_source},
        "sensitivity": {"budget": budget, "niah_length": grid.sens_length, "configs": rows},
    }


# ----------------------------------------------------------------------------------------------------
# Reports: results.md and the plots

def _fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def _k(n):
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown(r):
    s, ov, nh, pp = r["settings"], r["overlap"], r["niah"], r["perplexity"]
    hisa_name = f"hisa B={s['hisa']['B']} m={s['hisa']['m']}"
    out = [f"# make eval: {r['checkpoint']} on {r['card']}", "",
           f"{r['date']}; precision {s['precision']}; K = {s['K']}; HISA B = {s['hisa']['B']}, m = {s['hisa']['m']} "
           f"(m·B = {s['hisa']['budget']}); block-sparse {s['block']['blocks']} blocks of {s['block']['B']}; "
           f"{'quick grid; ' if r['quick'] else ''}{r['seconds']:.0f} s, {r['tokens'] / 1e6:.2f}M tokens "
           f"({r['tokens'] / r['seconds']:.0f} tokens/s).", ""]

    lengths = ov[hisa_name]["lengths"]
    head = "| layer | " + " | ".join(f"n ≤ {_k(n)}" for n in lengths) + " |"
    sep = "|---" * (len(lengths) + 1) + "|"
    out += ["## 1. Selection overlap with DSA", "",
            "IoU of the selected sets per query, computed at each layer from the same queries and keys while the "
            "model attends with DSA (every DSA forward of 2. and 3.); queries grouped by how many keys they see "
            f"(bin n ≤ L: above the previous bin); mean / min. Rows per bin: {ov[hisa_name]['rows']}.", ""]
    for name in [hisa_name, "block"]:
        o = ov[name]
        title = f"block-sparse ({o['m']} blocks of {o['B']})" if name == "block" else f"HISA (B = {o['B']}, m = {o['m']})"
        out += [f"**{title}**", "", head, sep]
        for layer, (mean, low) in enumerate(zip(o["layer_mean"], o["layer_min"])):
            out.append(f"| {layer} | " + " | ".join(f"{_fmt(a, 4)} / {_fmt(b, 4)}" for a, b in zip(mean, low)) + " |")
        out += ["| all | " + " | ".join(f"**{_fmt(a, 4)}** / {_fmt(b, 4)}" for a, b in zip(o["mean"], o["min"])) + " |", ""]

    out += ["## 2. Needle in a haystack (pass key)", "",
            f"Share of documents whose 5-digit key is read back exactly (teacher-forced argmax = greedy decoding), "
            f"{nh['docs']} document(s) per cell, the same documents for every mode.", "",
            "| mode | " + " | ".join(_k(n) for n in nh["lengths"]) + " | mean |", "|---" * (len(nh["lengths"]) + 2) + "|"]
    for mode in MODES:
        a = np.asarray(nh["accuracy"][mode])
        out.append(f"| {mode} | " + " | ".join(f"{x:.2f}" for x in a.mean(1)) + f" | {a.mean():.2f} |")
    out.append("")
    for mode in MODES:
        a = np.asarray(nh["accuracy"][mode])
        out += [f"{mode}, by depth:", "", "| L | " + " | ".join(f"{d:g}" for d in nh["depths"]) + " |",
                "|---" * (len(nh["depths"]) + 1) + "|"]
        out += [f"| {_k(n)} | " + " | ".join(f"{x:.2f}" for x in row) + " |" for n, row in zip(nh["lengths"], a)]
        out.append("")

    out += ["## 3. Perplexity on held-out text", "",
            f"Windows of BOS + L-1 held-out ids, {pp['windows_per_source']} per source ({', '.join(SOURCES)}), "
            "exp of the mean negative log-likelihood over all their predictions.", "",
            "| mode | " + " | ".join(_k(n) for n in pp["lengths"]) + " |", "|---" * (len(pp["lengths"]) + 1) + "|"]
    out += [f"| {mode} | " + " | ".join(f"{x:.3f}" for x in pp["ppl"][mode]) + " |" for mode in MODES]
    out.append("")

    sn = r["sensitivity"]
    beyond = sn["configs"][0]["ppl_lengths"] if sn["configs"] else []
    out += ["## 4. HISA's sensitivity to the block size at m·B = " + str(sn["budget"]), "",
            "| B | m | " + " | ".join(f"IoU n ≤ {_k(n)}" for n in lengths) + " | min IoU | "
            + " | ".join(f"ppl {_k(n)}" for n in beyond) + f" | pass key {_k(sn['niah_length'])} |",
            "|---" * (len(lengths) + len(beyond) + 4) + "|"]
    for c in sn["configs"]:
        lows = [x for x in c["overlap_min"] if x is not None]
        out.append(f"| {c['B']} | {c['m']} | " + " | ".join(_fmt(x, 4) for x in c["overlap_mean"])
                   + f" | {_fmt(min(lows) if lows else None, 4)} | " + " | ".join(f"{x:.3f}" for x in c["ppl"])
                   + (" | " if beyond else "") + f"{np.mean(c['niah']):.2f} |")
    out.append("")
    return "\n".join(out)


def plot(r, folder):
    """niah.png (accuracy heatmaps, one per mode) and overlap.png (IoU against context length); returns
    the paths written, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    nh, ov, s = r["niah"], r["overlap"], r["settings"]
    fig, axes = plt.subplots(1, len(MODES), figsize=(3.2 * len(MODES) + 1, 0.45 * len(nh["lengths"]) + 2.2),
                             sharey=True, constrained_layout=True)
    for ax, mode in zip(axes, MODES):
        a = np.asarray(nh["accuracy"][mode])
        im = ax.imshow(a, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for (i, j), x in np.ndenumerate(a):
            ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if x < 0.25 or x > 0.85 else "black")
        ax.set_xticks(range(len(nh["depths"])), [f"{d:g}" for d in nh["depths"]])
        ax.set_yticks(range(len(nh["lengths"])), [_k(n) for n in nh["lengths"]])
        ax.set_title(f"{mode} (mean {a.mean():.2f})")
        ax.set_xlabel("needle depth")
    axes[0].set_ylabel("context length")
    fig.colorbar(im, ax=axes, shrink=0.8, label="pass-key accuracy")
    fig.suptitle(f"needle in a haystack: {r['checkpoint']} on {r['card']}, {nh['docs']} document(s) per cell")
    paths = [os.path.join(folder, "niah.png")]
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    hisa_name = f"hisa B={s['hisa']['B']} m={s['hisa']['m']}"
    for ax, names, title in ((axes[0], [hisa_name, "block"], "per layer (thin) and all layers"),
                             (axes[1], [n for n in ov if n != "block"], f"HISA at m·B = {s['hisa']['budget']}")):
        for name in names:
            o = ov[name]
            x = o["lengths"]
            y = [np.nan if v is None else v for v in o["mean"]]
            label = f"block-sparse B={o['B']}" if name == "block" else f"HISA B={o['B']} m={o['m']}"
            line, = ax.plot(x, y, marker="o", label=label)
            if ax is axes[0]:
                for lm in o["layer_mean"]:
                    ax.plot(x, [np.nan if v is None else v for v in lm], color=line.get_color(), lw=0.6, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [_k(n) for n in x])
        ax.axvline(s["hisa"]["budget"], color="grey", ls=":", lw=1)
        ax.set_xlabel("keys the query sees (bin upper edge)")
        ax.set_ylabel("mean IoU with DSA's selection")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"selection overlap with DSA: {r['checkpoint']} on {r['card']}")
    paths.append(os.path.join(folder, "overlap.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_reports(r, folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(markdown(r))
    paths = plot(r, folder)
    print(f"wrote {folder}/results.json, results.md" + (
        ", " + ", ".join(os.path.basename(p) for p in paths) if paths else
        "; plots skipped: matplotlib does not import here (python bench/eval.py --replot DIR where it does)"))


# ----------------------------------------------------------------------------------------------------
# A stand-in checkpoint: random weights in the embedded model's layout, for the test and development

STAND_IN_CONFIG = {  # the trained model's shape (plain RoPE, first layer dense), small enough for a CPU test
    **TINY_CONFIG,
    "num_hidden_layers": 2, "num_attention_heads": 4, "index_topk": 32, "max_position_embeddings": 512,
    "rope_scaling": None, "routed_scaling_factor": 1.0,
}


def write_stand_in(folder, config=STAND_IN_CONFIG, seed=0):
    """config.json, model-00001-of-00001.safetensors (+ index), the byte tokenizer and heldout.npz: the
    bytes of this repository's .py and .md files as byte-token ids (6 + byte), cut into the four sources."""
    write_random_checkpoint(folder, config, seed=seed, shards=1, mtp_layer=False)
    text = b""
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))
                       + glob.glob(os.path.join(ROOT, "*.md"))):
        with open(path, "rb") as f:
            text += f.read()
    ids = np.frombuffer(text, np.uint8).astype(np.uint16) + 6
    n = min(len(ids) // len(SOURCES), 1 << 16)
    np.savez(os.path.join(folder, "heldout.npz"), **{s: ids[i * n:(i + 1) * n] for i, s in enumerate(SOURCES)})
    return folder


# ----------------------------------------------------------------------------------------------------
# Command line

def card_name(xp):
    if xp is np:
        return "cpu"
    return xp.cuda.runtime.getDeviceProperties(0)["name"].decode()


def load_heldout(folder):
    path = os.path.join(folder, "heldout.npz")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing (held-out token ids per source: {', '.join(SOURCES)})")
    with np.load(path) as z:
        missing = [s for s in SOURCES if s not in z.files]
        if missing:
            raise CheckpointError(f"{path}: lacks {', '.join(missing)} (has {', '.join(z.files)})")
        return {s: np.asarray(z[s]) for s in SOURCES}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Selection overlap, needle in a haystack, perplexity and block-size "
                                             "sensitivity of dense, DSA, HISA and block-sparse attention.")
    ap.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint folder with heldout.npz")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    ap.add_argument("--precision", default="fp8", choices=("fp8", "float"), help="indexer and latent-cache numerics")
    ap.add_argument("--quick", action="store_true", help="the reduced grid (minutes on a CPU)")
    ap.add_argument("--out", default=None, help="results folder (default bench/eval/<card>[-quick])")
    ap.add_argument("--lengths", help="pass-key context lengths, comma-separated")
    ap.add_argument("--depths", help="needle depths in [0, 1], comma-separated")
    ap.add_argument("--docs", type=int, help="documents per (length, depth) cell")
    ap.add_argument("--ppl-lengths", dest="ppl_lengths", help="held-out window lengths, comma-separated")
    ap.add_argument("--windows", type=int, help="held-out windows per source and length")
    ap.add_argument("--sens-length", dest="sens_length", type=int, help="pass-key length of the sensitivity study")
    ap.add_argument("--chunk", type=int, help="prefill chunk (default 4096 on a GPU, 512 on a CPU)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--replot", metavar="DIR", help="only draw the plots of DIR/results.json")
    ap.add_argument("--stand-in", dest="stand_in", metavar="DIR",
                    help="write a random-weights stand-in checkpoint at DIR (if absent) and evaluate it")
    args = ap.parse_args(argv)
    if args.replot:
        path = os.path.join(args.replot, "results.json")
        if not os.path.isfile(path):
            print(f"error: --replot {args.replot}: no results.json there (a folder that make eval wrote)",
                  file=sys.stderr)
            return 2
        with open(path) as f:
            paths = plot(json.load(f), args.replot)
        print("wrote " + ", ".join(paths) if paths else "matplotlib does not import here: no plots")
        return 0 if paths else 1
    try:
        if args.stand_in:
            if not os.path.exists(os.path.join(args.stand_in, "config.json")):
                write_stand_in(args.stand_in)
            args.ckpt = args.stand_in
        if not os.path.exists(os.path.join(args.ckpt, "config.json")):
            raise CheckpointError(f"{args.ckpt}: no config.json (the embedded model, or --stand-in DIR for a test run)")
        clock = Clock()
        heldout = load_heldout(args.ckpt)
        cfg, model, ckpt = M.load(args.ckpt, args.device, args.precision, progress=False)
        card = card_name(model.xp)
        budget = M.Selector(cfg, "hisa").B * M.Selector(cfg, "hisa").m
        grid = make_grid(cfg, budget, args.quick, model.xp is not np, args)
        print(f"{card}: {args.ckpt}, K={cfg.index_topk}, lengths {grid.lengths}, depths {grid.depths}, "
              f"{grid.docs} docs a cell, perplexity at {grid.ppl_lengths}", flush=True)
        r = evaluate(model, ckpt.tokenizer_path, heldout, grid, clock)
    except (CheckpointError, M.ConfigError, M.InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - clock.t0
    r = {"card": card, "checkpoint": os.path.basename(os.path.normpath(args.ckpt)), "quick": args.quick,
         "date": datetime.date.today().isoformat(), "seconds": seconds, "tokens": clock.tokens, **r}
    folder = args.out or os.path.join(ROOT, "bench", "eval", card.replace(" ", "_") + ("-quick" if args.quick else ""))
    write_reports(r, folder)
    o = r["overlap"][f"hisa B={r['settings']['hisa']['B']} m={r['settings']['hisa']['m']}"]
    print("mean IoU(HISA, DSA) by context length: " + ", ".join(f"{_k(n)} {_fmt(x, 4)}" for n, x in zip(o["lengths"], o["mean"])))
    print(f"total {seconds:.1f} s ({clock.tokens / 1e6:.2f}M tokens, {clock.tokens / seconds:.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
