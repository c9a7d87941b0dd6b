"""Micro-benchmarks of single kernels (GPU), all timed the same way: CUDA events after warm-up, the
median over reps, launches included. torch appears here only as a reference point (torch.topk).

    python bench/kernels.py topk          # our top-k vs torch.topk, normal and indexer-like rows; short rows:
                                          # topk_short vs topk_rows
    python bench/kernels.py indexer       # index_scores, fp8/bf16, wgmma and mma.sync paths
    python bench/kernels.py splits        # index_scores over few keys (HISA's block stage): key splits swept
    python bench/kernels.py tokens        # the HISA token stage: block-major, query-major wgmma, mma.sync
    python bench/kernels.py decode        # HISA's select for a few queries: one fused launch vs four kernels,
                                          # and DSA, device time (CUDA graphs)
    python bench/kernels.py fp8gemm       # FP8 linear: prefill vs torch._scaled_mm, decode GB/s vs a device copy
    python bench/kernels.py grouped       # an MoE layer's experts: one grouped launch per product vs a loop over experts
    python bench/kernels.py mla           # sparse MLA at the released dims: fp32 kernel vs bf16 tensor-core kernel
"""
import importlib.util
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cupy as cp  # noqa: E402  (GPU-only)

from kernels._cuda import sm_count  # noqa: E402

from kernels.fp8_gemm import (_module, fp8_gemm_gpu, fp8_grouped_linear_gpu, fp8_linear_gpu, plan,  # noqa: E402
                              plan_grouped, quantize_activations_gpu)
from kernels.hisa_tokens import hisa_token_scores_gpu  # noqa: E402
from kernels.indexer import index_scores_gpu  # noqa: E402
from kernels.indexer import plan as indexer_plan  # noqa: E402
from kernels.sparse_mla import round_bf16, sparse_mla_gpu  # noqa: E402
from kernels.topk import SHORT_N, topk_gpu  # noqa: E402
from model import Config, MoE, bf16_bits, linear, swiglu, xp_to_numpy  # noqa: E402
from weights.synthetic_checkpoint import synthetic_config  # noqa: E402


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


def bench_topk(R, N, k, kind="normal", lengths=None, reps=20, path="auto", timer=None):
    """One topk_gpu call on rotating inputs; timer: time_ms (host time included) or time_ms_queued (device)."""
    lengths = None if lengths is None else cp.asarray(lengths, np.int32)
    return (timer or time_ms)(lambda x: topk_gpu(x, k, lengths, path=path),
                              row_pool(lambda r, n: topk_rows(kind, r, n), R, N), reps)


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

    print(f"\nshort rows (auto takes topk_short up to N = {SHORT_N}): ms with host time (events around the call) "
          "and device ms (launches queued behind a spinning kernel)")
    print(f"{'rows':>10} {'R':>6} {'N':>8} {'k':>5} {'short':>8} {'rows':>8} {'x':>5} {'short dev':>10} "
          f"{'rows dev':>9} {'x':>5}")
    for kind in ("normal", "relu"):
        for R, N, k in ((1024, 1024, 64), (1, 1024, 64), (1024, 4096, 256), (1024, 8192, 2048), (1, 8192, 2048)):
            ms = {p: bench_topk(R, N, k, kind, path=p) for p in ("short", "rows")}
            dev = {p: bench_topk(R, N, k, kind, path=p, timer=time_ms_queued) for p in ("short", "rows")}
            print(f"{kind:>10} {R:>6} {N:>8} {k:>5} {ms['short']:8.3f} {ms['rows']:8.3f} "
                  f"{ms['rows'] / ms['short']:5.2f} {dev['short']:10.4f} {dev['rows']:9.4f} "
                  f"{dev['rows'] / dev['short']:5.2f}")


# --- indexer scores and the HISA token stage ----------------------------------------------------------

def bench_index_scores(T, N, Hi=64, Di=128, mode="fp8", causal=False, reps=20, path=None, splits=None,
                       timer=None):
    """One index_scores_gpu call; causal: the T queries are the last T positions of N. Output allocated once.
    timer: time_ms (host time included, the default) or time_ms_queued (device time)."""
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
    return (timer or time_ms)(lambda _: index_scores_gpu(q, w, k, ends, qs, ks, starts, out=out, path=path,
                                                         splits=splits, check_ranges=False), reps=reps)


def splits_table():
    """index_scores over few keys with many queries, as in HISA's block stage (T = 1024 over L / 128 pooled
    keys at L = 32K and 128K), for a sweep of key splits: which one the plan takes now (*), which one the rule
    before key_splits took (old: ceil(4 SMs / query blocks), at most tiles / 2), and the flat DSA shapes
    (1024 queries over L keys), where both rules agree. Every query sees every key, as at the end of the
    context."""
    sms = sm_count()
    print(f"index_scores fp8, Hi = 64, Di = 128; ms with host time / device ms; {sms} SMs")
    for T, N in ((1024, 256), (1024, 1024), (1024, 32768), (1024, 131072)):
        name, (qblocks, planned), _, _ = indexer_plan(T, N, 64, 128, True, True, sms)
        tiles = -(-N // 64)
        old = 1 if qblocks >= 4 * sms else min(-(-4 * sms // qblocks), max(1, tiles // 2))
        old = -(-tiles // -(-tiles // old))  # the CTAs that had work
        cells = []
        for s in sorted({1, 2, 3, 4, 5, planned, old}):
            host = bench_index_scores(T, N, splits=s)
            dev = bench_index_scores(T, N, splits=s, timer=time_ms_queued)
            mark = ("*" if s == planned else "") + ("old" if s == old else "")
            cells.append(f"{s}{mark}: {host:.4f} / {dev:.4f}")
        print(f"T={T} N={N} ({qblocks} query blocks x {tiles} tiles): " + ", ".join(cells))


def token_inputs(T, L, Hi=64, Di=128, B=128, m=64):
    """(q, w, keys, blocks, ends, qs, ks): T fp8 queries at the end of L keys, each keeping m random blocks."""
    rng = cp.random.default_rng(0)
    q, keys = fp8_bits(rng, (T, Hi, Di)), fp8_bits(rng, (L, Di))
    qs, ks = cp.ones((T, Hi), np.float32), cp.ones(L, np.float32)
    w = rng.standard_normal((T, Hi), dtype=np.float32)
    blocks = cp.sort(cp.argsort(rng.random((T, -(-L // B))), axis=1)[:, :m], axis=1).astype(np.int32)
    ends = cp.arange(L - T + 1, L + 1, dtype=np.int32)
    return q, w, keys, blocks, ends, qs, ks


def bench_bucket(T, L, B=128, m=64, reps=20):
    """The block-major path's bucketing alone (hisa_bucket_count + hisa_bucket_scatter)."""
    from kernels.hisa_tokens import _blocks_launch, bucket_pairs
    q, w, keys, blocks, ends, qs, ks = token_inputs(T, L, B=B, m=m)
    launch = _blocks_launch(cp.cuda.Device().id, T, 64, 128, True, m, B, L, "blocks")
    return time_ms(lambda _: bucket_pairs(launch, blocks, ends, T, m, B, L), reps=reps)


def bench_token_scores(T, L, B=128, m=64, path=None, splits=None, reps=20):
    """One hisa_token_scores_gpu call (token_inputs)."""
    q, w, keys, blocks, ends, qs, ks = token_inputs(T, L, B=B, m=m)
    out = cp.empty((T, m * B), np.float32)
    return time_ms(lambda _: hisa_token_scores_gpu(q, w, keys, blocks, B, ends, qs, ks, out=out, path=path,
                                                   splits=splits), reps=reps)


# --- FP8 linear layer (kernels/fp8_gemm.py) -------------------------------------------------------------

FP8_SHAPES = [(1536, 7168), (24576, 1536), (7168, 2048), (576, 7168), (2048, 7168)]  # (N, K) of V3.2 linears
FP8_BIG = [(18432, 7168), (7168, 18432)]  # the dense MLP: large enough that launch gaps do not matter

_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
}"""


def decode_table(lengths=(8192, 32768, 131072), queries=(1, 2, 4, 8, 16), layers=8):
    """HISA's select at the end of L for T queries: kernels/hisa_decode.cu (one launch) against the four-kernel
    pipeline, with DSA beside them; device ms a call from CUDA graphs cycling through `layers` caches (as
    bench.py's setting c), plus the overlap of the two HISA paths' sets (they differ only on near-ties)."""
    import hisa
    from bench.bench import make_inputs, run_dsa
    K, m, B = 2048, 64, 128
    print(f"{'L':>7} {'T':>3} {'fused':>8} {'4 kernels':>10} {'DSA':>8} {'4k/fused':>9} {'DSA/fused':>10} {'same':>6}")
    for L in lengths:
        for T in queries:
            host_ends = np.arange(L - T + 1, L + 1, dtype=np.int32)
            ends = cp.asarray(host_ends)
            caches = []
            for seed in range(layers):
                q, qs, w, cache, _ = make_inputs(L, T, seed)
                pooled = hisa.PooledKeys(cache, B)
                pooled.update(0, L)
                caches.append((q, qs, w, cache, pooled))
            sel = lambda f: [hisa.select(q, qs, w, c, p, ends, K, m, fused=f) for q, qs, w, c, p in caches]
            fused = time_ms_graph(lambda: sel(None)) / layers
            four = time_ms_graph(lambda: sel(False)) / layers
            dsa = time_ms_graph(lambda: [run_dsa(q, qs, w, c, ends, T, host_ends) for q, qs, w, c, _ in caches]) / layers
            a, b = (cp.asnumpy(x[0]) for x in (sel(None), sel(False)))
            same = np.mean([len(set(a[t]) & set(b[t])) / max(1, (b[t] >= 0).sum()) for t in range(T)])
            print(f"{L:>7} {T:>3} {fused:8.4f} {four:10.4f} {dsa:8.4f} {four / fused:8.2f}x {dsa / fused:9.2f}x "
                  f"{same:6.4f}", flush=True)
            caches.clear()  # the lambdas above still name the list: empty it rather than delete it
            cp.get_default_memory_pool().free_all_blocks()


def time_ms_queued(fn, inputs=(None,), reps=50, warmup=3):
    """Device ms per fn(x) for kernels shorter than their host-side launch cost: a spinning kernel holds the
    stream while all reps launches are queued behind it, so the events time the GPU, not Python."""
    spin = cp.RawKernel(_SPIN, "spin")
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    start, end = cp.cuda.Event(), cp.cuda.Event()
    spin((1,), (1,), (np.int64(40_000_000),))  # 20-40 ms of clocks: time enough to queue every launch
    start.record()
    for i in range(reps):
        fn(inputs[(i + warmup) % len(inputs)])
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / reps


def time_ms_graph(fn, reps=20, replays=20, warmup=3):
    """Device ms per fn() replayed as a CUDA graph, the way serving engines run decode: fn's launches are
    captured once on a private stream (after warm-up on that stream, so CuPy's pool and the launchers'
    per-stream scratch already hold every buffer and the capture allocates nothing new), then the graph is
    replayed `replays` times between two events; the median over reps. The host's launch cost is gone, so
    this times the kernels and the gaps between them only. fn must not synchronise (a capture forbids it)."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(warmup):
            fn()
        stream.synchronize()
        stream.begin_capture()
        try:
            keep = fn()  # noqa: F841  (its outputs stay allocated while the graph writes them)
        finally:
            graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        times = []
        start, end = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(reps):
            start.record(stream)
            for _ in range(replays):
                graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) / replays)
    return float(np.median(times))


def fp8_weight_pool(N, K, min_bytes=256 << 20):
    """Copies of one random FP8 weight shape totalling >= min_bytes, used in turn so that L2 (50-60 MB) does
    not hold the one being read. Scales are 1: speed does not depend on values."""
    rng = cp.random.default_rng(0)
    n = max(1, -(-min_bytes // (N * K)))
    scale = cp.ones((-(-N // 128), -(-K // 128)), np.float32)
    return [(fp8_bits(rng, (N, K)), scale) for _ in range(n)]


def copy_gbps(nbytes=1 << 30):
    """Device-to-device copy bandwidth, counting bytes read + written (the usual 'copy' figure); device time."""
    src, dst = cp.ones(nbytes // 4, np.float32), cp.empty(nbytes // 4, np.float32)
    ms = time_ms_queued(lambda _: cp.copyto(dst, src), reps=20)
    return 2 * nbytes / ms / 1e6


def torch_fp8_reference(T, N, K):
    """((ms of torch._scaled_mm with CUDA events, its device ms with launches queued, scaling used), ms of bf16
    torch.matmul) at [T, K] x [N, K]^T; None without torch.

    _scaled_mm takes no 128x128 block scales in every torch version: rowwise scales (one per token, one per
    output channel) are the reference rate, per-tensor scales if rowwise is refused. Both skip our per-block
    promotion, so they bound what the block-scaled product can reach."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch
    a = torch.randn(T, K, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn)
    events = dict(new_event=lambda: torch.cuda.Event(enable_timing=True), elapsed=lambda s, e: s.elapsed_time(e))
    scaled = (float("nan"), float("nan"), "refused")
    for kind, sa, sb in (("rowwise", torch.ones(T, 1, device="cuda"), torch.ones(1, N, device="cuda")),
                         ("per-tensor", torch.ones((), device="cuda"), torch.ones((), device="cuda"))):
        try:
            torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        except (RuntimeError, TypeError):
            continue
        def product(_):
            return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        scaled = (time_ms(product, **events), time_ms_queued(product, reps=20), kind)  # both on the default stream
        break
    xa, wb = torch.randn(T, K, device="cuda", dtype=torch.bfloat16), torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    bf16 = time_ms(lambda _: xa @ wb.t(), **events)
    return scaled, bf16


def fp8gemm_tables(T_prefill=4096):
    print(f"prefill, T = {T_prefill}: y fp32 = x W^T with 128x128 weight blocks and per-token 128-channel x blocks")
    print("wgmma: ours (per-128 promotion), CUDA events around each call as for _scaled_mm (host launch cost")
    print("included in both); 'dev ms': the same with launches queued behind a spinning kernel (device time only);")
    print("ratio = our rate / _scaled_mm's, from the event timings and from the device times (issue 6 target: >= 0.60)")
    print(f"{'N':>6} {'K':>6} {'quant ms':>9} {'wgmma ms':>9} {'TFLOP/s':>8} {'dev ms':>7} {'mma ms':>8} "
          f"{'_scaled_mm ms':>14} {'TFLOP/s':>8} {'dev ms':>7} {'ratio':>6} {'dev ratio':>9} {'scales':>10} {'bf16 ms':>8}")
    rng = cp.random.default_rng(1)
    for N, K in FP8_SHAPES:
        x = rng.standard_normal((T_prefill, K), dtype=np.float32)
        x8, sx = quantize_activations_gpu(x)
        w8, ws = fp8_weight_pool(N, K, 0)[0]
        out = cp.empty((T_prefill, N), np.float32)
        flop = 2 * T_prefill * N * K
        q = time_ms(lambda _: quantize_activations_gpu(x, x8=x8, sx=sx))
        g = time_ms(lambda _: fp8_gemm_gpu(x8, sx, w8, ws, out=out, path="wgmma"))
        gq = time_ms_queued(lambda _: fp8_gemm_gpu(x8, sx, w8, ws, out=out, path="wgmma"), reps=20)
        m = time_ms(lambda _: fp8_gemm_gpu(x8, sx, w8, ws, out=out, path="mma"), reps=5)
        ref = torch_fp8_reference(T_prefill, N, K)
        if ref is None:
            tail = f"{'-':>14} {'-':>8} {'-':>7} {'-':>6} {'-':>9} {'no torch':>10} {'-':>8}"
        else:
            (sms, sq, kind), bms = ref
            tail = (f"{sms:14.3f} {flop / sms / 1e9:8.0f} {sq:7.3f} {sms / g:6.2f} {sq / gq:9.2f} {kind:>10} "
                    f"{bms:8.3f}")
        print(f"{N:>6} {K:>6} {q:9.3f} {g:9.3f} {flop / g / 1e9:8.0f} {gq:7.3f} {m:8.3f} {tail}")

    copy = copy_gbps()
    print(f"\ndecode: the weight streamed once per call; device copy {copy:.0f} GB/s (read + write) in this run")
    print("GEMV ms is device time with launches queued (time_ms_queued); GB/s = weight bytes / GEMV ms (issue 6")
    print("target: >= 0.70 of copy); 'linear ms' is one fp8_linear call (quantise + GEMV), host time included.")
    print("plan: CTAs, warps of a CTA splitting K, most CTAs one output's K range is cut into (fp8_gemm.plan)")
    print(f"{'N':>6} {'K':>6} {'T':>3} {'kernel':>13} {'CTAs':>5} {'k_warps':>7} {'pieces':>6} {'GEMV ms':>8} "
          f"{'GB/s':>6} {'of copy':>7} {'linear ms':>9}")
    for N, K in FP8_SHAPES + FP8_BIG:
        pool = fp8_weight_pool(N, K)
        for T in (1, 8, 16):
            x = rng.standard_normal((T, K), dtype=np.float32)
            x8, sx = quantize_activations_gpu(x)
            out = cp.empty((T, N), np.float32)
            ms = time_ms_queued(lambda w: fp8_gemm_gpu(x8, sx, w[0], w[1], out=out), pool)
            lin = time_ms(lambda w: fp8_linear_gpu(x, w[0], w[1], out=out), pool)
            p = plan(T, N, K, False, sm_count())
            gbps = N * K / ms / 1e6
            print(f"{N:>6} {K:>6} {T:>3} {p.kernel:>13} {p.grid[0]:>5} {p.k_warps:>7} {p.pieces:>6} {ms:8.4f} "
                  f"{gbps:6.0f} {gbps / copy:7.2f} {lin:9.4f}")


# --- Grouped FP8 products: an MoE layer's experts (kernels/fp8_gemm.py fp8_grouped_linear, model.MoE) ----------

def time_device_ms(fn, inputs=(None,), reps=10, warmup=2):
    """(device ms per fn(x), queued) for calls made of many launches: as time_ms_queued, with the spinning
    kernel sized from the measured host time of one call. queued is False where the host was still launching
    when the spin ended (e.g. more launches than the driver queues): the figure then includes host gaps."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    fn(inputs[0])
    cp.cuda.Device().synchronize()
    spin_ms = 1.5 * (time.perf_counter() - t0) * 1e3 * reps + 5
    spin = cp.RawKernel(_SPIN, "spin")
    before, start, end = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event()
    before.record()
    spin((1,), (1,), (np.int64(spin_ms * cp.cuda.Device().attributes["ClockRate"]),))  # kHz: cycles per ms
    start.record()
    t0 = time.perf_counter()
    for i in range(reps):
        fn(inputs[(i + warmup) % len(inputs)])
    launched_ms = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / reps, launched_ms < cp.cuda.get_elapsed_time(before, start)


def route_tokens(T, E=256, k=8, seed=0):
    """Expert ids [T, k] (k distinct of E per token; the experts unequally popular, log-normal sigma 0.5, as
    tests/test_kernel_fp8_gemm.py routing_counts) and weights [T, k] (1/k), on the GPU."""
    rng = np.random.default_rng(seed)
    keys = rng.gumbel(size=(T, E)) + 0.5 * rng.standard_normal(E)
    experts = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    return cp.asarray(experts), cp.full((T, k), 1.0 / k, np.float32)


def released_moe():
    """model.MoE at the released dims (256 experts of 2048 on 7168, top-8) with random FP8 experts stacked as
    weights/loader.py stacks them (the shared one last, 11.3 GB) and unit scales: speed does not depend on values."""
    cfg = Config.from_dict(synthetic_config())
    E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    rng = cp.random.default_rng(0)
    gate_up, down = cp.empty((E + 1, 2 * F, D), np.uint8), cp.empty((E + 1, D, F), np.uint8)
    for e in range(E + 1):  # one expert at a time: fp8_bits draws int32 first
        gate_up[e], down[e] = fp8_bits(rng, (2 * F, D)), fp8_bits(rng, (D, F))
    p = {"gate.weight": cp.zeros((E, D), np.float32), "gate.e_score_correction_bias": cp.zeros(E, np.float32),
         "experts.gate_up_proj.weight": gate_up, "experts.down_proj.weight": down,
         "experts.gate_up_proj.weight_scale_inv": cp.ones((E + 1, 2 * F // 128, D // 128), np.float32),
         "experts.down_proj.weight_scale_inv": cp.ones((E + 1, D // 128, F // 128), np.float32)}
    return MoE(cfg, p)


def per_expert_mix(moe, x, experts, weights):
    """MoE.mix as it was before the grouped kernel: one fp8_linear per expert that received tokens, then the
    shared expert's MLP on its own (two more products)."""
    T, k = experts.shape
    order = cp.argsort(experts.reshape(-1), kind="stable")
    counts = np.bincount(xp_to_numpy(experts).reshape(-1), minlength=moe.cfg.n_routed_experts)
    ends = np.cumsum(counts)

    def per_expert(rows, w):
        y = cp.empty((rows.shape[0], w.shape[-2]), np.float32)
        for e in np.flatnonzero(counts):
            y[ends[e] - counts[e]:ends[e]] = linear(rows[ends[e] - counts[e]:ends[e]], w[e])
        return y
    out = per_expert(swiglu(per_expert(x[order // k], moe.gate_up), moe.down.shape[-1]), moe.down)
    out *= weights.reshape(-1)[order][:, None]
    routed = cp.empty_like(out)
    routed[order] = out
    return moe.shared(x) + routed.reshape(T, k, -1).sum(1)


def expert_rows(moe, x, experts):
    """The rows MoE.mix hands to its products: (pairs sorted by expert then every token again [T*k + T, D],
    offsets [E + 2] on the host)."""
    T, k = experts.shape
    E = moe.cfg.n_routed_experts
    counts = np.bincount(xp_to_numpy(experts).reshape(-1), minlength=E + 1)
    counts[E] = T
    order = cp.argsort(experts.reshape(-1), kind="stable")
    return cp.concatenate([x[order // k], x]), np.concatenate([[0], np.cumsum(counts)])


def grouped_products(moe, xs, offsets):
    h = fp8_grouped_linear_gpu(xs, moe.gate_up.bits, moe.gate_up.scale, offsets)
    return fp8_grouped_linear_gpu(swiglu(h, moe.down.shape[-1]), moe.down.bits, moe.down.scale, offsets)


def looped_products(moe, xs, offsets):
    """The same products, one fp8_linear per group (the shared expert is group E here too), each written in
    place (out=): two launches per expert and product."""
    groups = [(e, offsets[e], offsets[e + 1]) for e in np.flatnonzero(np.diff(offsets))]
    h = cp.empty((xs.shape[0], moe.gate_up.shape[1]), np.float32)
    for e, lo, hi in groups:
        fp8_linear_gpu(xs[lo:hi], moe.gate_up.bits[e], moe.gate_up.scale[e], out=h[lo:hi])
    a = swiglu(h, moe.down.shape[-1])
    y = cp.empty((xs.shape[0], moe.down.shape[1]), np.float32)
    for e, lo, hi in groups:
        fp8_linear_gpu(a[lo:hi], moe.down.bits[e], moe.down.scale[e], out=y[lo:hi])
    return y


def grouped_table(token_counts=(1, 8, 512, 4096), routings=4):
    moe = released_moe()
    E, D, F = moe.cfg.n_routed_experts, moe.cfg.hidden_size, moe.cfg.moe_intermediate_size
    expert_bytes = 3 * D * F  # gate_up + down of one expert, fp8 (scales: 1/16384 of it)
    copy = copy_gbps()
    print(f"MoE experts at the released dims: E = {E} routed + 1 shared, top-{moe.cfg.num_experts_per_tok}, D = {D}, "
          f"F = {F}; FP8 weights, "
          f"{(E + 1) * expert_bytes / 1e9:.1f} GB per layer")
    print("layer ms: MoE.mix (sort, gather, both products, SwiGLU, weighted sum; host time included, CUDA events)")
    print("  grouped = this code (two grouped launches); loop = one fp8_linear per expert + the shared MLP (before)")
    print("products ms: device time of the two products alone, launches queued behind a spinning kernel")
    print("  (* = the host could not queue them all in time: includes host gaps, an upper bound)")
    print(f"GB/s: the used experts' weights read once per call / grouped products ms; device copy {copy:.0f} GB/s "
          "(read + write) in this run")
    print(f"{'T':>5} {'rows':>6} {'used':>4} {'max':>4} {'kernel (gate_up)':>22} {'layer grouped':>13} "
          f"{'layer loop':>10} {'x':>5} {'prod grouped':>12} {'prod loop':>10} {'x':>5} {'GB/s':>6} {'of copy':>7} "
          f"{'TFLOP/s':>7}")
    has_wgmma = _module()[1]
    for T in token_counts:
        rng = cp.random.default_rng(T)
        cases = []
        for r in range(routings):
            experts, weights = route_tokens(T, E, moe.cfg.num_experts_per_tok, seed=100 * T + r)
            x = rng.standard_normal((T, D), dtype=np.float32)
            cases.append((x, experts, weights) + expert_rows(moe, x, experts))
        counts = np.stack([np.diff(c[4]) for c in cases])
        rows, G = int(cases[0][4][-1]), int(counts.max())
        used = (counts > 0).sum(1).mean()  # experts whose weights a call reads, mean over the routings
        name = plan_grouped(cases[0][4], 2 * F, D, has_wgmma, sm_count()).kernel.replace("fp8_grouped_", "")
        reps = 10 if T <= 512 else 3
        lg = time_ms(lambda c: moe.mix(c[0], c[1], c[2]), cases, reps=reps)
        ll = time_ms(lambda c: per_expert_mix(moe, c[0], c[1], c[2]), cases, reps=reps)
        pg, qg = time_device_ms(lambda c: grouped_products(moe, c[3], c[4]), cases, reps=reps)
        pl, ql = time_device_ms(lambda c: looped_products(moe, c[3], c[4]), cases, reps=max(2, reps // 2))
        gbps = used * expert_bytes / pg / 1e6
        tflops = 2 * rows * expert_bytes / pg / 1e9
        mark = lambda q: " " if q else "*"  # noqa: E731
        print(f"{T:>5} {rows:>6} {used:4.0f} {G:>4} {name:>22} {lg:13.3f} {ll:10.3f} {ll / lg:5.1f} "
              f"{pg:11.3f}{mark(qg)} {pl:9.3f}{mark(ql)} {pl / pg:5.1f} {gbps:6.0f} {gbps / copy:7.2f} {tflops:7.0f}")


# --- sparse MLA ----------------------------------------------------------------------------------------

def bench_sparse_mla(T, numerics, H=128, Dc=512, R=64, K=2048, cap=131072, reps=20):
    """ms of one sparse_mla_gpu call: T queries, each over K distinct random rows of a cap-row cache
    (random rows: the gather hits L2 about as a long context would). Inputs are exact in bf16, as the
    model passes them in fp8 precision."""
    rng = cp.random.RandomState(0)
    q_abs = round_bf16(rng.standard_normal((T, H, Dc), dtype=np.float32) * 0.05)
    q_pe = round_bf16(rng.standard_normal((T, H, R), dtype=np.float32))
    c_kv = round_bf16(rng.standard_normal((cap, Dc), dtype=np.float32))
    k_pe = round_bf16(rng.standard_normal((cap, R), dtype=np.float32))
    idx = cp.asarray(np.stack([np.random.default_rng(t).choice(cap, K, replace=False) for t in range(T)])
                     .astype(np.int32))
    scale = (128 + R) ** -0.5
    return time_ms(lambda _: sparse_mla_gpu(q_abs, q_pe, c_kv, k_pe, idx, scale, numerics), reps=reps)


def mla_table(H=128, Dc=512, R=64, K=2048):
    """fp32 kernel vs bf16 tensor-core kernel; TFLOP/s counts the scores (Dc + R) and P V (Dc) products
    (the bf16 kernel runs P V twice, hi and lo parts of P, which is not counted)."""
    print(f"sparse MLA, H={H} Dc={Dc} R={R} K={K} ({cp.cuda.runtime.getDeviceProperties(0)['name'].decode()})")
    print(f"{'T':>5} {'numerics':>8} {'ms':>9} {'TFLOP/s':>8}")
    for T in (1024, 1):
        for numerics in ("fp32", "bf16"):
            ms = bench_sparse_mla(T, numerics, H, Dc, R, K)
            flop = 2.0 * T * H * K * (Dc + R + Dc)
            print(f"{T:>5} {numerics:>8} {ms:9.3f} {flop / ms / 1e9:8.1f}")


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
    elif what == "splits":
        splits_table()
    elif what == "tokens":
        for L in (32768, 131072):
            for T in (1024, 256, 64, 16, 1):
                paths = ("blocks", "wgmma", "mma") if T >= 16 else ("wgmma", "mma")
                bucket = f" (its bucketing {bench_bucket(T, L):.3f})" if T >= 16 else ""
                print(f"scores T={T} L={L}: " + ", ".join(
                    f"{p} {bench_token_scores(T, L, path=p):.3f}" for p in paths) + f" ms{bucket}", flush=True)
    elif what == "decode":
        decode_table()
    elif what == "fp8gemm":
        fp8gemm_tables()
    elif what == "grouped":
        grouped_table()
    elif what == "mla":
        mla_table()
    else:
        sys.exit("usage: python bench/kernels.py [topk|indexer|splits|tokens|decode|fp8gemm|grouped|mla]")


if __name__ == "__main__":
    main()
