"""DSA indexer scores: I[t, s] = sum_h w[t,h] * ReLU(qs[t,h] * ks[s] * q[t,h,:] . k[s,:]), -inf off range.

Shapes: T queries, N keys, Hi indexer heads, Di head dim. Query t sees keys starts[t] <= s < ends[t]
(causal prefill: starts = 0, ends = position + 1); every other entry of the [T, N] result is -inf.
fp8 mode: q, k are e4m3 bit patterns (uint8) with positive scales q_scale [T, Hi], k_scale [N], and the
dot is over the decoded values. Float mode: no scales; the GPU computes in bf16 (products exact, fp32 sums).

HISA's block scores (SPEC section 6 step 2) are the same kernel over the pooled keys, one per block of B
positions, with the block range [0, ceil(ends[t] / B)) and the forced blocks (+inf) worked out in the kernel:
hisa_block_scores, one launch.

index_scores_reference (hisa_block_scores_reference) is the oracle and the CPU path; index_scores_gpu
(hisa_block_scores_gpu) launches kernels/indexer.cu; index_scores (hisa_block_scores) picks one by where q
lives. bench/kernels.py times the kernel, bench/stages.py HISA's stages.
"""
import functools

import numpy as np

from kernels._cuda import check, is_gpu, module_sm90a, per_device, sm_count, want, with_dynamic_smem, xp_of
from kernels.fp8 import e4m3_decode
from kernels.hisa_tokens import force_blocks_reference

HEADS = (4, 8, 16, 32, 64)  # Hi the kernels are built for
HEAD_DIMS = (64, 128)       # Di
# "auto": wgmma on sm_90 (Hopper), mma.sync elsewhere; "mma" forces the mma.sync kernels everywhere.
DEFAULT_PATH = "auto"


# --- Reference (numpy or CuPy) ----------------------------------------------------------------------

def _as_float64(a):
    """Float values of a float array, or of bf16 bit patterns held as uint16."""
    xp = xp_of(a)
    if a.dtype == np.uint16:
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return xp.asarray(a).astype(np.float64)


def index_scores_reference(q, w, k, ends, q_scale=None, k_scale=None, starts=None):
    """Float64 accumulation, float32 result [T, N]; the same numbers whatever the batching."""
    xp = xp_of(q)
    T, Hi, Di = q.shape
    N = k.shape[0]
    fp8 = q_scale is not None
    check(fp8 == (k_scale is not None), "index_scores: give both q_scale and k_scale (fp8) or neither")
    check(k.shape == (N, Di), lambda: f"index_scores: k has shape {k.shape}, expected ({N}, {Di})")
    check(w.shape == (T, Hi), lambda: f"index_scores: w has shape {w.shape}, expected ({T}, {Hi})")
    for name, a in (("ends", ends), ("starts", starts)):
        check(a is None or xp.asarray(a).size == T,
              lambda: f"index_scores: {name} of shape {xp.asarray(a).shape}, expected ({T},): one a query")
    ends = xp.asarray(ends).astype(np.int64).reshape(T)
    starts = xp.zeros(T, np.int64) if starts is None else xp.asarray(starts).astype(np.int64).reshape(T)
    check(T == 0 or int(ends.max()) <= N,
          lambda: f"index_scores: ends reach {int(ends.max()) if T else 0}, past N = {N}")
    check(T == 0 or int(starts.min()) >= 0, "index_scores: starts must be >= 0")

    wf = w.astype(np.float64)
    if fp8:
        check(q.dtype == np.uint8 and k.dtype == np.uint8, "index_scores: fp8 mode takes e4m3 bits as uint8")
        qf = e4m3_decode(q).astype(np.float64)
        kf = e4m3_decode(k).astype(np.float64)
        wf = wf * q_scale.reshape(T, Hi).astype(np.float64)  # scales > 0: qs moves out of the ReLU
        ksf = k_scale.reshape(N).astype(np.float64)
    else:
        qf, kf, ksf = _as_float64(q), _as_float64(k), None

    out = xp.full((T, N), -np.inf, np.float32)
    chunk = max(1, (1 << 22) // (Hi * max(N, 1)))  # about 32 MB of float64 logits at a time
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        lo, hi = int(starts[a:b].min()), int(ends[a:b].max())
        if lo >= hi:
            continue
        logits = (qf[a:b].reshape(-1, Di) @ kf[lo:hi].T).reshape(b - a, Hi, hi - lo)  # (t, h, s)
        score = (xp.maximum(logits, 0) * wf[a:b, :, None]).sum(axis=1)                  # (t, s)
        if fp8:
            score = score * ksf[None, lo:hi]
        s = xp.arange(lo, hi)[None, :]
        visible = (s >= starts[a:b, None]) & (s < ends[a:b, None])
        out[a:b, lo:hi] = xp.where(visible, score, -np.inf).astype(np.float32)
    return out


def hisa_block_scores_reference(q, w, k, ends, B, q_scale=None, k_scale=None, n=None):
    """HISA's block scores J [T, n] on pooled keys: index_scores_reference over the blocks query t can see,
    [0, ceil(ends[t] / B)) (ends in positions), then block 0 and the block holding position ends[t] - 1 set to
    +inf (force_blocks_reference). k [>= n, Di] (k_scale [>= n]): the first n rows are the blocks (default all)."""
    xp = xp_of(q)
    n = k.shape[0] if n is None else int(n)
    block_ends = -(-xp.asarray(ends).astype(np.int64) // B)  # (T,) ceil(ends / B)
    J = index_scores_reference(q, w, k[:n], block_ends, q_scale, None if k_scale is None else k_scale.reshape(-1)[:n])
    return force_blocks_reference(J, ends, B)


# --- GPU launchers --------------------------------------------------------------------------------

_U8, _U16, _I32, _F32 = (np.dtype(d) for d in (np.uint8, np.uint16, np.int32, np.float32))
_NULL = np.uint64(0)  # a null pointer argument (starts absent: all 0)


def _module(Hi, Di):
    """indexer.cu built for (Hi, Di): (module, has_wgmma); see _cuda.module_sm90a."""
    return module_sm90a("indexer.cu", (f"HI={Hi}", f"DI={Di}"))


@per_device
def _function(Hi, Di, name, smem):
    """The kernel, opted into `smem` bytes of dynamic shared memory."""
    return with_dynamic_smem(_module(Hi, Di)[0].get_function(name), smem)


def _check_dims(Hi, Di):
    check(Hi in HEADS, lambda: f"index_scores: Hi = {Hi} heads, the kernels support {HEADS}")
    check(Di in HEAD_DIMS, lambda: f"index_scores: Di = {Di}, the kernels support {HEAD_DIMS}")


def wgmma_config(fp8, decode):
    """(NCOL, QG, KS, QR) of the wgmma entry point, as instantiated at the bottom of indexer.cu."""
    if decode:
        return 64, 1, 2, 1
    return (128, 2, 1, 2) if fp8 else (128, 2, 1, 1)


def _layout(Hi, Di, fp8, wgmma, small):
    """One entry point of indexer.cu: (name, threads, dynamic shared memory, queries a CTA, keys a tile, q bytes
    a CTA, bytes a key tile, CTAs an SM as its launch bounds promise). small: the decode kernels (all queries
    fit one 64-column block)."""
    _check_dims(Hi, Di)
    DB = Di if fp8 else 2 * Di  # bytes per q/k row
    mode = "fp8" if fp8 else "bf16"
    if wgmma:
        ncol, qg, ks, qr = wgmma_config(fp8, small)
        qb = qg * qr  # Q blocks of ncol query-head columns
        bk, qcta, threads = 64 * ks, qb * ncol // Hi, 256
        smem = qb * ncol * DB + 4 * bk * DB + 2 * qcta * bk * 4 + qb * ncol * 4 + 3 * qcta * 4 + 1024
        name = f"index_scores_wgmma_{mode}" + ("_decode" if small else "")
        ctas = 2 if fp8 or small else 1
    else:
        nw = 2 if small else 8
        cols, bk, threads = nw * 32, 64, nw * 32
        qcta, npart = cols // Hi, max(1, Hi // 32)
        smem = 4 * bk * DB + 2 * npart * qcta * bk * 4 + cols * 4 + 3 * qcta * 4
        name = f"index_scores_mma_{mode}" + ("_decode" if small else "")
        ctas = 4 if small else 2
    return name, threads, smem, qcta, bk, qcta * Hi * DB, bk * DB, ctas


def _grid(T, N, qcta, bk, q_bytes, tile_bytes, ctas, num_sms, splits):
    """(query blocks, key splits) for T queries over N keys (mirrors make_plan's cut of the key axis)."""
    qblocks = -(-T // qcta)
    tiles = -(-N // bk)
    if splits is None:
        splits = key_splits(qblocks, tiles, q_bytes, tile_bytes, num_sms, ctas)
    splits = int(max(1, min(splits, tiles, 65535)))
    return qblocks, -(-tiles // -(-tiles // splits))  # as make_plan cuts: ceil(tiles / splits) a slice, none empty


def plan(T, N, Hi, Di, fp8, wgmma, num_sms=132, splits=None):
    """Kernel name, grid, block and dynamic shared memory for one call (mirrors indexer.cu's layout)."""
    name, threads, smem, qcta, bk, q_bytes, tile_bytes, ctas = _layout(Hi, Di, fp8, wgmma, T * Hi <= 64)
    return name, _grid(T, N, qcta, bk, q_bytes, tile_bytes, ctas, num_sms, splits), (threads,), smem


def key_splits(qblocks, tiles, q_bytes, tile_bytes, num_sms, ctas_per_sm=2):
    """CTAs along the key axis when there are few query blocks (with qblocks >= 4 CTAs an SM: 1).

    Every split re-reads the q block (qcta queries x Hi heads x DB bytes), so a CTA should take at least
    ceil(q_bytes / tile_bytes) key tiles (q traffic at most doubles the k traffic) and at least 2 (the
    cp.async ring). Within that, up to twice the splits that give about 4 CTAs an SM, the count is chosen by
    waves: a grid of qblocks x s CTAs runs in ceil(qblocks s / (ctas_per_sm num_sms)) waves of ceil(tiles / s)
    tiles each, and the product (the time, to first order) is minimised, the most splits among equals (the
    finer the last wave, the less an uneven CTA holds it up). A count that leaves the last wave mostly empty
    loses: measured on an H200 for 1024 queries over 32K / 128K keys, 5 splits (2.4 waves) 0.738 / 2.94 ms,
    3 (1.5 waves) 0.79 / 3.20, 8 (3.9 waves) 0.708 / 2.72.
    At the released dims (Hi = 64, Di = 128, fp8, wgmma; 132 SMs, 2 CTAs an SM):
      prefill blocks: q 4 x 128 columns x 128 B = 64 KB, k tile 64 x 128 B = 8 KB -> >= 8 tiles a CTA
        DSA, T = 1024 over N = 32K..128K: 128 query blocks x 512..2048 tiles -> 8 splits (4 waves).
        HISA block stage at 128K, T = 1024 over N = 1024 pooled keys: 16 tiles -> 2 splits, one wave of 256
          CTAs of 8 tiles. At 32K: N = 256, 4 tiles -> 1 split.
        Full causal prefill: T / 8 >= 528 query blocks -> 1 split.
      decode blocks (T * Hi <= 64): q 64 columns x 128 B = 8 KB, k tile 128 x 128 B = 16 KB -> >= 2 tiles
        DSA decode, N = 128K: 1024 tiles -> 512 splits; HISA decode, N = 1024 blocks: 8 tiles -> 4 splits.
    """
    want = 4 * num_sms
    if qblocks >= want:
        return 1
    min_tiles = max(2, -(-q_bytes // tile_bytes))
    most = max(1, min(2 * -(-want // qblocks), tiles // min_tiles))
    slots = ctas_per_sm * num_sms

    def waves_x_tiles(s):  # s cuts into slices of ceil(tiles / s) tiles: that many CTAs, none empty (as _grid)
        per = -(-tiles // s)
        return -(-qblocks * -(-tiles // per) // slots) * per, -(-tiles // per)

    # Within a number of waves w the most splits, floor(w slots / qblocks), have the fewest tiles a CTA, so only
    # those are tried (at most 16 / ctas_per_sm of them: this runs on every launch, and a decode over 128K keys
    # may cut into 512). The least waves x tiles wins, and among equals the most slices.
    waves = -(-qblocks * most // slots)
    tries = {most} | {min(most, w * slots // qblocks) for w in range(1, waves + 1)} - {0}
    return max((-cost, n) for cost, n in map(waves_x_tiles, tries))[1]


def _bf16_bits(a, name):
    """bf16 bit patterns (uint16) of a CuPy array: uint16 and bfloat16 pass through, floats round to nearest even."""
    import cupy as cp
    if a.dtype == _U16:
        return a
    if a.dtype.name == "bfloat16":
        return a.view(np.uint16)
    check(a.dtype.kind == "f", lambda: f"{name}: dtype {a.dtype}, expected a float dtype or bf16 bits (uint16)")
    u = cp.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def _what(a):
    return f"{type(a).__name__} {getattr(a, 'shape', '')}"


@functools.lru_cache(maxsize=None)
def _launch_config(device, Hi, Di, fp8, small, path):
    """(kernel, block, smem, smem as np.int32, queries a CTA, keys a tile, q bytes, tile bytes, CTAs an SM, SMs):
    everything of a launch but its grid, for one entry point on GPU `device` (the current one; the kernel
    belongs to it), made and checked once."""
    _check_dims(Hi, Di)
    check(path in ("auto", "wgmma", "mma"), lambda: f"index_scores: path {path!r}, expected auto, wgmma or mma")
    _, has_wgmma = _module(Hi, Di)
    check(path != "wgmma" or has_wgmma, "index_scores: the wgmma kernels need an sm_90 GPU (sm_90a build)")
    name, threads, smem, qcta, bk, q_bytes, tile_bytes, ctas = _layout(Hi, Di, fp8, has_wgmma and path != "mma",
                                                                       small)
    return (_function(Hi, Di, name, smem), (threads,), smem, np.int32(smem), qcta, bk, q_bytes, tile_bytes, ctas,
            sm_count())


def _scores_gpu(who, q, w, k, n, ends, q_scale, k_scale, starts, out, path, splits, check_ranges, end_div, force):
    """index_scores_gpu and hisa_block_scores_gpu: check, then one launch over the first n rows of k (None: all).

    The hot path runs no CuPy operation but the output's allocation and the launch; error messages are only
    formatted once a check has failed."""
    import cupy as cp
    if not (is_gpu(q) and q.ndim == 3 and is_gpu(k) and k.ndim == 2):
        raise ValueError(f"{who}: expected CuPy q [T, Hi, Di] and k [N, Di], got q {_what(q)}, k {_what(k)}")
    T, Hi, Di = q.shape
    rows = k.shape[0]
    N = rows if n is None else int(n)
    if not (T >= 1 and 1 <= N <= rows and N < 2**30):
        raise ValueError(f"{who}: T = {T}, N = {N} keys of k's {rows} rows: T and N must be >= 1, N <= {rows} "
                         f"and < 2^30 (the kernel's int32 positions)")
    fp8 = q_scale is not None
    if fp8 != (k_scale is not None):
        raise ValueError(f"{who}: give both q_scale and k_scale (fp8) or neither")
    fn, block, smem, smem32, qcta, bk, q_bytes, tile_bytes, ctas, num_sms = _launch_config(
        cp.cuda.runtime.getDevice(), Hi, Di, fp8, T * Hi <= 64, path or DEFAULT_PATH)
    if fp8:
        if q_scale.shape != (T, Hi) and q_scale.size == T * Hi:
            q_scale = q_scale.reshape(T, Hi)
        if k_scale.shape != (rows,) and k_scale.size == rows:
            k_scale = k_scale.reshape(rows)
        want(q, "q", _U8, (T, Hi, Di))
        want(k, "k", _U8, (rows, Di))
        want(q_scale, "q_scale", _F32, (T, Hi))
        want(k_scale, "k_scale", _F32, (rows,))
    else:
        if k.dtype != _U16 and N < rows:
            k = k[:N]  # float keys are rounded to bf16 here: only the rows used
        q = _bf16_bits(q, "q")
        k = _bf16_bits(k, "k")
        want(q, "q", _U16, (T, Hi, Di))
        want(k, "k", _U16, (k.shape[0], Di))
        q_scale = k_scale = w  # placeholders: the bf16 kernels never read them
    want(w, "w", _F32, (T, Hi))
    want(ends, "ends", _I32, (T,))
    if starts is not None:
        want(starts, "starts", _I32, (T,))
    if q.data.ptr % 16 or k.data.ptr % 16:
        raise ValueError(f"{who}: q and k must be 16-byte aligned (q at {q.data.ptr:#x}, k at {k.data.ptr:#x})")
    if check_ranges:  # one device sync
        max_end = N * end_div
        worst = int(ends.max() - max_end) if starts is None else int(cp.maximum(ends.max() - max_end, -starts.min()))
        if worst > 0:
            raise ValueError(f"{who}: ends must be <= N = {max_end} and starts >= 0 (max end {int(ends.max())}, "
                             f"min start {0 if starts is None else int(starts.min())})")
    if out is None:
        out = cp.empty((T, N), np.float32)
    else:
        want(out, "out", _F32, (T, N))
    grid = _grid(T, N, qcta, bk, q_bytes, tile_bytes, ctas, num_sms, splits)
    fn(grid, block, (q, q_scale, w, k, k_scale, _NULL if starts is None else starts, ends, out, np.int32(T),
                     np.int32(N), smem32, np.int32(end_div), np.int32(force)), shared_mem=smem)
    return out


def index_scores_gpu(q, w, k, ends, q_scale=None, k_scale=None, starts=None, *, out=None, path=None,
                     splits=None, check_ranges=True):
    """Launcher for indexer.cu. q [T, Hi, Di], w fp32 [T, Hi], k [N, Di], ends/starts int32 [T] -> fp32 [T, N].

    fp8: q, k uint8 e4m3 bits, q_scale fp32 [T, Hi], k_scale fp32 [N]. Float: q, k bf16 bits (uint16),
    bfloat16, or float (rounded to bf16 here). check_ranges costs one device sync (starts >= 0, ends <= N);
    the kernel clamps the ranges anyway. path: "wgmma" / "mma" / None (DEFAULT_PATH).
    """
    return _scores_gpu("index_scores", q, w, k, None, ends, q_scale, k_scale, starts, out, path, splits,
                       check_ranges, 1, False)


def hisa_block_scores_gpu(q, w, k, ends, B, q_scale=None, k_scale=None, *, n=None, out=None, path=None,
                          splits=None, check_ranges=True):
    """HISA's block scores in one launch of indexer.cu: J fp32 [T, n] over the first n rows (default all) of the
    pooled keys k [>= n, Di] (k_scale fp32 [>= n], the pooled cache as allocated: no slicing needed), row t's
    blocks [0, ceil(ends[t] / B)) scored, block 0 and block (ends[t] - 1) // B forced to +inf, the rest -inf.
    ends int32 [T] in positions. check_ranges: one device sync (ends <= n * B); the kernel clamps anyway.
    """
    B = int(B)
    if B < 1:
        raise ValueError(f"hisa_block_scores: block size {B}")
    return _scores_gpu("hisa_block_scores", q, w, k, n, ends, q_scale, k_scale, None, out, path, splits,
                       check_ranges, B, True)


def index_scores(q, w, k, ends, q_scale=None, k_scale=None, starts=None):
    """I [T, N] fp32: the GPU kernel for CuPy inputs, the numpy reference otherwise."""
    if is_gpu(q):
        # the kernel clamps every row's range to [0, N), so the model skips the range check's device sync
        return index_scores_gpu(q, w, k, ends, q_scale, k_scale, starts, check_ranges=False)
    return index_scores_reference(q, w, k, ends, q_scale, k_scale, starts)


def hisa_block_scores(q, w, k, ends, B, q_scale=None, k_scale=None, n=None):
    """J [T, n] fp32 (HISA's block stage before top-m): the GPU kernel for CuPy inputs, the reference otherwise."""
    if is_gpu(q):
        return hisa_block_scores_gpu(q, w, k, ends, B, q_scale, k_scale, n=n, check_ranges=False)
    return hisa_block_scores_reference(q, w, k, ends, B, q_scale, k_scale, n)
