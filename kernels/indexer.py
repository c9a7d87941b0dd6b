"""DSA indexer scores: I[t, s] = sum_h w[t,h] * ReLU(qs[t,h] * ks[s] * q[t,h,:] . k[s,:]), -inf off range.

Shapes: T queries, N keys, Hi indexer heads, Di head dim. Query t sees keys starts[t] <= s < ends[t]
(causal prefill: starts = 0, ends = position + 1); every other entry of the [T, N] result is -inf.
fp8 mode: q, k are e4m3 bit patterns (uint8) with positive scales q_scale [T, Hi], k_scale [N], and the
dot is over the decoded values. Float mode: no scales; the GPU computes in bf16 (products exact, fp32 sums).

index_scores_reference is the oracle and the CPU path; index_scores_gpu launches kernels/indexer.cu;
index_scores picks one by where q lives. bench/kernels.py times the kernel.
"""

import numpy as np

from kernels._cuda import check, check_array, is_gpu, module_sm90a, per_device, with_dynamic_smem, xp_of
from kernels.fp8 import e4m3_decode

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
    check(k.shape == (N, Di), f"index_scores: k has shape {k.shape}, expected ({N}, {Di})")
    check(w.shape == (T, Hi), f"index_scores: w has shape {w.shape}, expected ({T}, {Hi})")
    ends = xp.asarray(ends).astype(np.int64).reshape(T)
    starts = xp.zeros(T, np.int64) if starts is None else xp.asarray(starts).astype(np.int64).reshape(T)
    check(T == 0 or int(ends.max()) <= N, f"index_scores: ends reach {int(ends.max()) if T else 0}, past N = {N}")
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


# --- GPU launcher ---------------------------------------------------------------------------------

def _module(Hi, Di):
    """indexer.cu built for (Hi, Di): (module, has_wgmma); see _cuda.module_sm90a."""
    return module_sm90a("indexer.cu", (f"HI={Hi}", f"DI={Di}"))


@per_device
def _function(Hi, Di, name, smem):
    """The kernel, opted into `smem` bytes of dynamic shared memory."""
    return with_dynamic_smem(_module(Hi, Di)[0].get_function(name), smem)


@per_device
def _num_sms():
    import cupy as cp
    return cp.cuda.Device().attributes["MultiProcessorCount"]


def _check_dims(Hi, Di):
    check(Hi in HEADS, f"index_scores: Hi = {Hi} heads, the kernels support {HEADS}")
    check(Di in HEAD_DIMS, f"index_scores: Di = {Di}, the kernels support {HEAD_DIMS}")


def wgmma_config(fp8, decode):
    """(NCOL, QG, KS, QR) of the wgmma entry point, as instantiated at the bottom of indexer.cu."""
    if decode:
        return 64, 1, 2, 1
    return (128, 2, 1, 2) if fp8 else (128, 2, 1, 1)


def plan(T, N, Hi, Di, fp8, wgmma, num_sms=132, splits=None):
    """Kernel name, grid, block and dynamic shared memory for one call (mirrors indexer.cu's layout)."""
    _check_dims(Hi, Di)
    DB = Di if fp8 else 2 * Di  # bytes per q/k row
    small = T * Hi <= 64        # decode: all queries fit one 64-column block
    mode = "fp8" if fp8 else "bf16"
    if wgmma:
        ncol, qg, ks, qr = wgmma_config(fp8, small)
        qb = qg * qr  # Q blocks of ncol query-head columns
        bk, qcta, threads = 64 * ks, qb * ncol // Hi, 256
        smem = qb * ncol * DB + 4 * bk * DB + 2 * qcta * bk * 4 + qb * ncol * 4 + 2 * qcta * 4 + 1024
        name = f"index_scores_wgmma_{mode}" + ("_decode" if small else "")
    else:
        nw = 2 if small else 8
        cols, bk, threads = nw * 32, 64, nw * 32
        qcta, npart = cols // Hi, max(1, Hi // 32)
        smem = 4 * bk * DB + 2 * npart * qcta * bk * 4 + cols * 4 + 2 * qcta * 4
        name = f"index_scores_mma_{mode}" + ("_decode" if small else "")
    qblocks = -(-T // qcta)
    tiles = -(-N // bk)
    if splits is None:
        splits = key_splits(qblocks, tiles, q_bytes=qcta * Hi * DB, tile_bytes=bk * DB, num_sms=num_sms)
    splits = int(max(1, min(splits, tiles, 65535)))
    splits = -(-tiles // -(-tiles // splits))  # as make_plan cuts: ceil(tiles / splits) tiles a slice, none empty
    return name, (qblocks, splits), (threads,), smem


def key_splits(qblocks, tiles, q_bytes, tile_bytes, num_sms):
    """CTAs along the key axis: enough to give the GPU about 4 CTAs an SM (two waves at two CTAs an SM) when
    there are few query blocks, but never so many that a CTA streams fewer key bytes than its q block.

    Every split re-reads the q block (qcta queries x Hi heads x DB bytes), so a CTA should take at least
    ceil(q_bytes / tile_bytes) key tiles (q traffic at most doubles the k traffic) and at least 2 (the
    cp.async ring). At the released dims (Hi = 64, Di = 128, fp8, wgmma):
      prefill blocks: q 4 x 128 columns x 128 B = 64 KB, k tile 64 x 128 B = 8 KB -> >= 8 tiles a CTA
        HISA block stage at 128K, T = 1024 over N = 1024 pooled keys: 128 query blocks x 16 tiles -> 2
          splits, 256 CTAs of 8 tiles, one wave at two CTAs an SM. (The 4-CTAs-an-SM target alone would cut
          528 / 128 -> 5 splits, in fact 4 slices of 4 tiles: 512 CTAs, each loading 64 KB of q for 32 KB of k.)
        HISA block stage at 32K: N = 256, 4 tiles -> 1 split (128 CTAs of 4 tiles).
        DSA, T = 1024 over N = 32K..128K: 512..2048 tiles -> 5 splits (100+ tiles a CTA), as before.
        Full causal prefill: T / 8 >= 528 query blocks -> 1 split, as before.
      decode blocks (T * Hi <= 64): q 64 columns x 128 B = 8 KB, k tile 128 x 128 B = 16 KB -> >= 2 tiles
        DSA decode, N = 128K: 1024 tiles -> 512 splits; HISA decode, N = 1024 blocks: 8 tiles -> 4 splits.
    """
    want = 4 * num_sms
    if qblocks >= want:
        return 1
    min_tiles = max(2, -(-q_bytes // tile_bytes))
    return max(1, min(-(-want // qblocks), tiles // min_tiles))


def _bf16_bits(a, name):
    """bf16 bit patterns (uint16) of a CuPy array: uint16 and bfloat16 pass through, floats round to nearest even."""
    import cupy as cp
    if a.dtype == np.uint16:
        return a
    if a.dtype.name == "bfloat16":
        return a.view(np.uint16)
    check(a.dtype.kind == "f", f"{name}: dtype {a.dtype}, expected a float dtype or bf16 bits (uint16)")
    u = cp.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def index_scores_gpu(q, w, k, ends, q_scale=None, k_scale=None, starts=None, *, out=None, path=None,
                     splits=None, check_ranges=True):
    """Launcher for indexer.cu. q [T, Hi, Di], w fp32 [T, Hi], k [N, Di], ends/starts int32 [T] -> fp32 [T, N].

    fp8: q, k uint8 e4m3 bits, q_scale fp32 [T, Hi], k_scale fp32 [N]. Float: q, k bf16 bits (uint16),
    bfloat16, or float (rounded to bf16 here). check_ranges costs one device sync (starts >= 0, ends <= N);
    the kernel clamps the ranges anyway. path: "wgmma" / "mma" / None (DEFAULT_PATH).
    """
    import cupy as cp
    fp8 = q_scale is not None
    check(fp8 == (k_scale is not None), "index_scores: give both q_scale and k_scale (fp8) or neither")
    check(is_gpu(q) and q.ndim == 3, f"q: expected a CuPy array [T, Hi, Di], got {type(q).__name__} {getattr(q, 'shape', '')}")
    T, Hi, Di = q.shape
    check(k.ndim == 2, f"k: shape {k.shape}, expected [N, {Di}]")
    N = k.shape[0]
    check(T >= 1 and N >= 1, f"index_scores: T = {T}, N = {N}, both must be >= 1")
    check(N < 2**30, f"index_scores: N = {N} keys, the kernel's int32 positions allow < 2^30")
    _check_dims(Hi, Di)
    if fp8:
        check_array(q, "q", np.uint8, shape=(T, Hi, Di))
        check_array(k, "k", np.uint8, shape=(N, Di))
        if q_scale.size == T * Hi:
            q_scale = q_scale.reshape(T, Hi)
        if k_scale.size == N:
            k_scale = k_scale.reshape(N)
        check_array(q_scale, "q_scale", np.float32, shape=(T, Hi))
        check_array(k_scale, "k_scale", np.float32, shape=(N,))
    else:
        q = _bf16_bits(q, "q")
        k = _bf16_bits(k, "k")
        check_array(q, "q", np.uint16, shape=(T, Hi, Di))
        check_array(k, "k", np.uint16, shape=(N, Di))
        q_scale = k_scale = w  # placeholders: the bf16 kernels never read them
    check_array(w, "w", np.float32, shape=(T, Hi))
    check_array(ends, "ends", np.int32, shape=(T,))
    if starts is None:
        starts = cp.zeros(T, np.int32)
    check_array(starts, "starts", np.int32, shape=(T,))
    check(q.data.ptr % 16 == 0 and k.data.ptr % 16 == 0, "index_scores: q and k must be 16-byte aligned")
    if check_ranges:
        worst = int(cp.maximum(ends.max() - N, -starts.min()))
        check(worst <= 0, f"index_scores: ends must be <= N = {N} and starts >= 0 "
                          f"(max end {int(ends.max())}, min start {int(starts.min())})")
    if out is None:
        out = cp.empty((T, N), np.float32)
    check_array(out, "out", np.float32, shape=(T, N))

    path = path or DEFAULT_PATH
    check(path in ("auto", "wgmma", "mma"), f"index_scores: path {path!r}, expected auto, wgmma or mma")
    _, has_wgmma = _module(Hi, Di)
    check(path != "wgmma" or has_wgmma, "index_scores: the wgmma kernels need an sm_90 GPU (sm_90a build)")
    wgmma = has_wgmma and path != "mma"
    name, grid, block, smem = plan(T, N, Hi, Di, fp8, wgmma, _num_sms(), splits)
    _function(Hi, Di, name, smem)(grid, block, (q, q_scale, w, k, k_scale, starts, ends, out,
                                                np.int32(T), np.int32(N), np.int32(smem)), shared_mem=smem)
    return out


def index_scores(q, w, k, ends, q_scale=None, k_scale=None, starts=None):
    """I [T, N] fp32: the GPU kernel for CuPy inputs, the numpy reference otherwise."""
    if is_gpu(q):
        # the kernel clamps every row's range to [0, N), so the model skips the range check's device sync
        return index_scores_gpu(q, w, k, ends, q_scale, k_scale, starts, check_ranges=False)
    return index_scores_reference(q, w, k, ends, q_scale, k_scale, starts)
