"""Micro-benchmarks of single kernels (GPU), all timed the same way: CUDA events after warm-up, the
median over reps, launches included. torch appears here only as a reference point (torch.topk).

    python bench/kernels.py topk          # our top-k vs torch.topk, normal and indexer-like rows
    python bench/kernels.py indexer       # index_scores, fp8/bf16, wgmma and mma.sync paths
    python bench/kernels.py tokens        # the HISA token stage, wgmma and mma.sync paths
"""
import importlib.util
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cupy as cp  # noqa: E402  (GPU-only)

from kernels.hisa_tokens import hisa_token_scores_gpu  # noqa: E402
from kernels.indexer import index_scores_gpu  # noqa: E402
from kernels.topk import topk_gpu  # noqa: E402
from model import bf16_bits  # noqa: E402


def time_ms(fn, inputs=(None,), reps=20, warmup=3, new_event=cp.cuda.Event, elapsed=cp.cuda.get_elapsed_time):
    """Median ms of fn(x) between two events, x cycling through `inputs` (rotate them so L2 does not flatter)."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    start, end = new_event(), new_event()
    for i in range(reps):
        start.record()
        fn(inputs[(i + warmup) % len(inputs)])
        end.record()
        end.synchronize()
        times.append(elapsed(start, end))
    return float(np.median(times))


def fp8_bits(rng, shape):
    """Random e4m3 bit patterns without the NaN codes (speed does not depend on the values)."""
    b = rng.integers(0, 256, size=shape, dtype=np.int32).astype(np.uint8)
    return cp.where((b & 0x7F) == 0x7F, np.uint8(0), b)


# --- top-k -------------------------------------------------------------------------------------------

def topk_rows(kind, R, N, seed=0):
    """float32 [R, N]. normal: standard normal. relu: indexer-like, a weighted sum over 8 heads of
    ReLU'd normals (positive, right-skewed, a few exact zeros)."""
    rs = cp.random.RandomState(seed)
    if kind == "normal":
        return rs.standard_normal((R, N), dtype=np.float32)
    w = np.abs(np.random.default_rng(seed).standard_normal(8)).astype(np.float32)
    x = cp.zeros((R, N), np.float32)
    for h in range(8):
        x += cp.maximum(rs.standard_normal((R, N), dtype=np.float32), 0) * w[h]
    return x


def row_pool(make, R, N):
    """At least 256 MB of [R, N] inputs, made at once and used in turn: the first ones are out of L2."""
    n = max(1, -(-(256 << 20) // (R * N * 4)))
    pool = make(n * R, N)
    return [pool[i * R:(i + 1) * R] for i in range(n)]


def bench_topk(R, N, k, kind="normal", lengths=None, reps=20):
    lengths = None if lengths is None else cp.asarray(lengths, np.int32)
    return time_ms(lambda x: topk_gpu(x, k, lengths), row_pool(lambda r, n: topk_rows(kind, r, n), R, N), reps)


def bench_torch_topk(R, N, k, reps=20):
    import torch
    pool = row_pool(lambda r, n: torch.randn(r, n, device="cuda", dtype=torch.float32), R, N)
    return time_ms(lambda x: torch.topk(x, k, dim=-1, sorted=False), pool, reps,
                   new_event=lambda: torch.cuda.Event(enable_timing=True), elapsed=lambda s, e: s.elapsed_time(e))


def topk_table():
    have_torch = importlib.util.find_spec("torch") is not None
    cases = [(1, 8192, 2048), (1, 131072, 2048), (1, 262144, 2048), (8, 131072, 2048), (64, 131072, 2048),
             (1024, 8192, 2048), (1024, 131072, 2048), (1024, 1024, 64)]
    print(f"{'rows':>10} {'R':>6} {'N':>8} {'k':>5} {'topk ms':>9} {'GB/s read':>10} {'torch ms':>9}")
    for kind in ("normal", "relu"):
        for R, N, k in cases:
            ms = bench_topk(R, N, k, kind)
            t = f"{bench_torch_topk(R, N, k):9.3f}" if have_torch and kind == "normal" else f"{'-':>9}"
            print(f"{kind:>10} {R:>6} {N:>8} {k:>5} {ms:9.3f} {R * N * 4 / ms / 1e6:10.0f} {t}")
    R, N, k = 1024, 131072, 2048
    lengths = np.linspace(N // 2, N, R).astype(np.int32)  # causal prefill: row t sees its own keys only
    for kind in ("normal", "relu"):
        ms = bench_topk(R, N, k, kind, lengths)
        print(f"{kind + '+len':>10} {R:>6} {N:>8} {k:>5} {ms:9.3f} {int(lengths.sum()) * 4 / ms / 1e6:10.0f} {'-':>9}")


# --- indexer scores and the HISA token stage ----------------------------------------------------------

def bench_index_scores(T, N, Hi=64, Di=128, mode="fp8", causal=False, reps=20, path=None, splits=None):
    """One index_scores_gpu call; causal: the T queries are the last T positions of N. Output allocated once."""
    rng = cp.random.default_rng(0)
    if mode == "fp8":
        q, k = fp8_bits(rng, (T, Hi, Di)), fp8_bits(rng, (N, Di))
        qs, ks = cp.ones((T, Hi), np.float32), cp.ones(N, np.float32)
    else:
        q, k = bf16_bits(rng.standard_normal((T, Hi, Di), dtype=np.float32)), bf16_bits(rng.standard_normal((N, Di), dtype=np.float32))
        qs = ks = None
    w = rng.standard_normal((T, Hi), dtype=np.float32)
    ends = (cp.arange(N - T + 1, N + 1) if causal else cp.full(T, N)).astype(np.int32)
    starts, out = cp.zeros(T, np.int32), cp.empty((T, N), np.float32)
    return time_ms(lambda _: index_scores_gpu(q, w, k, ends, qs, ks, starts, out=out, path=path, splits=splits,
                                              check_ranges=False), reps=reps)


def bench_token_scores(T, L, Hi=64, Di=128, B=128, m=64, path=None, splits=None, reps=20):
    """One hisa_token_scores_gpu call: T queries at the end of L keys, each keeping m random blocks."""
    rng = cp.random.default_rng(0)
    q, keys = fp8_bits(rng, (T, Hi, Di)), fp8_bits(rng, (L, Di))
    qs, ks = cp.ones((T, Hi), np.float32), cp.ones(L, np.float32)
    w = rng.standard_normal((T, Hi), dtype=np.float32)
    blocks = cp.sort(cp.argsort(rng.random((T, -(-L // B))), axis=1)[:, :m], axis=1).astype(np.int32)
    ends = cp.arange(L - T + 1, L + 1, dtype=np.int32)
    out = cp.empty((T, m * B), np.float32)
    return time_ms(lambda _: hisa_token_scores_gpu(q, w, keys, blocks, B, ends, qs, ks, out=out, path=path,
                                                   splits=splits), reps=reps)


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "topk"
    if what == "topk":
        topk_table()
    elif what == "indexer":
        for T, N, causal in ((1024, 131072, False), (1, 131072, False), (8192, 32768, True)):
            for mode in ("fp8", "bf16"):
                for path in ("wgmma", "mma"):
                    print(f"T={T} N={N} causal={causal} {mode} {path}: "
                          f"{bench_index_scores(T, N, mode=mode, causal=causal, path=path):.3f} ms")
    elif what == "tokens":
        for T in (1024, 1):
            for path in ("wgmma", "mma"):
                print(f"T={T} L=131072 {path}: {bench_token_scores(T, 131072, path=path):.3f} ms")
    else:
        sys.exit("usage: python bench/kernels.py [topk|indexer|tokens]")


if __name__ == "__main__":
    main()
