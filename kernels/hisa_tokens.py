"""HISA token stage (SPEC section 6 step 4): exact DSA scores of the candidate slots inside the kept blocks.

Query t kept m blocks (ascending ids, -1 padded); its candidates are the m*B slots of those blocks, slot j
being position p = blocks[t, j // B] * B + j % B. Each visible candidate gets the flat DSA indexer score

    I[t, p] = sum_h w[t,h] * ReLU(qs[t,h] * ks[p] * q[t,h] . k[p])

and everything else (padding blocks, positions >= ends[t]) gets -inf. The top-k of a row is then taken over
slots and mapped back to positions with `slots_to_positions`. `force_blocks` is the step before the block
top-m: the first block and each query's own block get +inf.

hisa_token_scores, slots_to_positions and force_blocks dispatch on where their first array lives: CuPy
arrays go to kernels/hisa_tokens.cu, numpy arrays to the reference (the oracle of the GPU tests).

On the GPU the scores have two orders. Query-major (one CTA a query's slots) suits a few queries (decode).
With many queries and B = 128 the launcher goes block-major: the (query, block) pairs are bucketed by block
and a CTA scores one block's 128 keys for the queries that kept it, so a gathered q row serves 128 keys
instead of a gathered key serving one query's 64 heads (hisa_tokens.cu kernel 5; bench/kernels.py tokens
times both). Both give the same bits.
"""
import functools
from typing import Any, NamedTuple

import numpy as np

from kernels._cuda import (check, is_gpu, kernel, module_sm90a, per_device, sm_count, want, with_dynamic_smem, xp_of,
                           zeroed_counters)
from kernels.fp8 import E4M3_TABLE


def _is_bf16(a):
    return a.dtype == np.uint16 or a.dtype.name == "bfloat16"


def _as_f64(x, scale=None):
    """Indexer q or k rows as float64 values: e4m3 bits times their scale, bf16 bits, or floats."""
    xp = xp_of(x)
    if scale is not None:
        return xp.asarray(E4M3_TABLE)[x].astype(np.float64) * scale[..., None].astype(np.float64)
    if _is_bf16(x):
        x = (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float64)


def indexer_scores_f64(q, w, k):
    """sum_h w[h] * ReLU(q[h] . k[n]) for one query: q f64 [Hi, Di], w f64 [Hi], k f64 [n, Di] -> f64 [n].

    For fp8 (and bf16) inputs every product and partial sum of q . k is exact in float64, so the dot does
    not depend on the summation order; the head sum runs in a fixed order. The flat DSA reference computing
    its rows with this same function gets bit-identical scores for the same (t, p).
    """
    s = q @ k.T  # (Hi, n)
    xp = xp_of(s)
    acc = xp.zeros(s.shape[1], np.float64)
    for h in range(s.shape[0]):
        acc += w[h] * xp.maximum(s[h], 0.0)
    return acc


def hisa_token_scores_reference(q, w, keys, blocks, B, ends, q_scale=None, key_scale=None):
    """Scores of every candidate slot; float64 accumulation, float32 result [T, m*B] (-inf off range).

    fp8: q uint8 [T, Hi, Di] with q_scale f32 [T, Hi], keys uint8 [cap, Di] with key_scale f32 [cap].
    float: q, keys float32 (or bf16 bits as uint16), no scales. w f32 [T, Hi]; blocks int32 [T, m]; ends int32 [T].
    """
    xp = xp_of(q)
    T, Hi, Di = q.shape
    m = blocks.shape[1]
    j = xp.arange(m * B)
    blk = blocks[:, j // B].astype(np.int64)  # (T, m*B)
    pos = blk * B + j % B
    valid = (blk >= 0) & (pos < ends[:, None])
    out = xp.full((T, m * B), -np.inf, np.float32)
    for t in range(T):  # one query at a time: its candidate set is its own
        sel = xp.nonzero(valid[t])[0]
        if sel.size == 0:
            continue
        p = pos[t, sel]
        qf = _as_f64(q[t], None if q_scale is None else q_scale[t])  # (Hi, Di)
        kf = _as_f64(keys[p], None if key_scale is None else key_scale[p])  # (n, Di)
        out[t, sel] = indexer_scores_f64(qf, w[t].astype(np.float64), kf).astype(np.float32)
    return out


def slots_to_positions_reference(slots, blocks, B, ends=None):
    """Map top-k slots [T, k] (-1 padded) to cache positions: blocks[t, slot // B] * B + slot % B.

    A slot stays -1 when it is padding, falls in a padding block, or (given ends [T]) lies at or beyond
    ends[t]: a top-k that had to take -inf candidates never hands an invisible position downstream.
    """
    xp = xp_of(slots)
    s = xp.maximum(slots, 0)
    blk = xp.take_along_axis(blocks, s // B, axis=1)
    pos = blk * B + s % B
    keep = (slots >= 0) & (blk >= 0)
    if ends is not None:
        keep &= pos < ends[:, None]
    return xp.where(keep, pos, -1).astype(np.int32)


def force_blocks_reference(J, ends, B):
    """In place on block scores J [T, nb]: J[t, 0] = +inf and J[t, (ends[t] - 1) // B] = +inf, the block
    holding query t's own position (skipped when ends[t] < 1 or that block is not a column of J). Returns J."""
    xp = xp_of(J)
    T, nb = J.shape
    if nb == 0:
        return J
    J[:, 0] = np.inf
    own = (xp.asarray(ends).astype(np.int64) - 1) // B                            # (T,)
    rows = xp.nonzero((own >= 0) & (own < nb))[0]
    J[rows, own[rows]] = np.inf
    return J


# --- GPU launchers --------------------------------------------------------------------------------------

TILE = 128                   # slots per tile of the wgmma kernel (hisa_tokens.cu WG_NT)
MAX_TILES = 256              # tiles one CTA of the wgmma kernel can take (WG_MAXT)
NT = 64                      # slots per tile of the mma.sync kernel
WGMMA_ROWS = (64, 128, 256)  # q/key row bytes the wgmma kernel's swizzled layouts handle
BLOCK_B = 128                # the block-major kernel's block size (hisa_tokens.cu BM_B)
BLOCK_QCH = 32               # most queries an item of the block-major kernel (one CTA) takes (-D HT_QCH;
                             # H200, 1024 queries, bench/kernels.py tokens: 8 -> 0.30 ms, 16 -> 0.27-0.28,
                             # 32 -> 0.26)
BLOCK_MIN_T = 512            # below this many queries "auto" keeps the query-major kernel (H200: equal at
                             # 256 queries, where the bucketing's launches cost as much as they save; 1.5x at 1024)
MAX_BUCKETS = 1 << 20        # blocks of the cache the bucketing scan takes (1024 threads, <= 1025 buckets each)
BUCKET_THREADS, BUCKET_PAIRS = 1024, 4  # hisa_tokens.cu BK_THREADS, BK_PAIRS
# "auto": on sm_90 (Hopper) the block-major wgmma kernel when B = 128 and there are >= BLOCK_MIN_T queries,
# else the query-major wgmma kernel where the row size allows, else the mma.sync kernel. "blocks", "wgmma"
# and "mma" force one kernel (and refuse to fall back).
DEFAULT_PATH = "auto"

_U8, _U16, _I32, _F32 = (np.dtype(d) for d in (np.uint8, np.uint16, np.int32, np.float32))


def _what(a):
    return f"{type(a).__name__} {getattr(a, 'shape', '')}"


def _bits_u16(a):
    """bf16 arrays as their bit patterns (uint16); anything else unchanged (dtype.name is slow: asked last)."""
    d = a.dtype
    if d == _U8 or d == _U16:
        return a
    return a.view(np.uint16) if d.name == "bfloat16" else a


def wgmma_stages(row_bytes):
    """Depth of the wgmma kernel's gather ring: the deepest (2..5) that keeps a CTA near 100 KB of shared
    memory, so that two CTAs (16 warps, 6-8 key tiles in flight) share an SM."""
    return max(2, min(5, (100 * 1024 - 64 * row_bytes - 2048) // (128 * row_bytes + 1024)))


def wgmma_smem(row_bytes, stages):
    """Dynamic shared memory of the wgmma kernel (wgmma_body's SMEM): the q tile, `stages` key tiles with a
    position and a k scale a row, the live-tile list and its count, 1024 bytes of alignment slack."""
    return 64 * row_bytes + stages * (128 * row_bytes + 1024) + 4 * (MAX_TILES + 1) + 1024


def blocks_smem(row_bytes, stages):
    """Dynamic shared memory of the block-major kernel (blocks_body's SMEM): the block's key tile, `stages`
    q tiles of 2 queries with their head weights and two barriers each, the k scales, (t, slot, limit) of each
    query of the item, 1024 bytes of alignment slack."""
    return 128 * row_bytes + stages * (128 * row_bytes + 128 * 4 + 16) + 128 * 4 + BLOCK_QCH * 16 + 1024


def blocks_stages(row_bytes):
    """Depth of the block-major kernel's q ring: the deepest (2..5) within ~110 KB, two CTAs an SM (~220 KB
    and one CTA for 256-byte rows, whose registers allow only one: hisa_tokens.cu's launch bounds)."""
    budget = (110 if row_bytes <= 128 else 220) * 1024
    stages = 5
    while stages > 2 and blocks_smem(row_bytes, stages) > budget:
        stages -= 1
    return stages


def defines(fp8, Di, Hi):
    """hisa_tokens.cu's -D set for one (mode, Di, Hi); every score kernel compiles from it."""
    row_bytes = Di * (1 if fp8 else 2)
    mt = 1 if Hi <= 16 else 2 if Hi <= 32 else 4
    stages = 3 if 3 * NT * (row_bytes + 16) <= 40 * 1024 else 2
    return (f"HT_FP8={int(fp8)}", f"HT_DI={Di}", f"HT_MT={mt}", f"HT_STAGES={stages}",
            f"HT_WSTAGES={wgmma_stages(row_bytes)}", f"HT_BSTAGES={blocks_stages(row_bytes)}", f"HT_QCH={BLOCK_QCH}")


def blocks_items(T, m, nbk, qch):
    """Upper bound on the block-major kernel's items (its grid) with items of at most qch queries: every
    bucket's last item may be partial, and at most min(nbk + 1, T*m) buckets (the cache's blocks and the dead
    one) hold pairs. hisa_bucket_count traps rather than write more."""
    return -(-T * m // qch) + min(nbk + 1, T * m)


def plan(T, Hi, Di, fp8, m, B, wgmma, num_sms=132, splits=None):
    """Kernel name, grid, block, dynamic shared memory and slots per CTA for one call (mirrors hisa_tokens.cu).

    A query's m*B slots are cut over `splits` CTAs (grid.y) when there are few queries (decode), so the
    work still spreads over every SM: by default about 4 waves of resident CTAs.
    """
    check(m * B >= 1, lambda: f"hisa_token_scores: m*B = {m * B}, nothing to plan")
    row_bytes = Di * (1 if fp8 else 2)
    if wgmma:
        name, threads, tile, smem = "hisa_token_scores_wgmma", 256, TILE, wgmma_smem(row_bytes, wgmma_stages(row_bytes))
    else:
        name, threads, tile, smem = "hisa_token_scores", 128, NT, 0
    tiles = -(-m * B // tile)
    if splits is None:
        if wgmma:  # 2 CTAs an SM
            splits = -(-8 * num_sms // T)
        else:      # the mma.sync kernel keeps >= 2 tiles a CTA for its pipeline
            splits = min(-(-4 * num_sms // T), tiles // 2)
    nsplit = max(1, min(int(splits), tiles))
    if wgmma:
        nsplit = max(nsplit, -(-tiles // MAX_TILES))
    per_cta = -(-tiles // nsplit)
    nsplit = -(-tiles // per_cta)  # no empty CTAs
    check(nsplit <= 65535,
          lambda: f"hisa_token_scores: {tiles} tiles a query need {nsplit} CTAs, the grid allows 65535")
    return name, (T, nsplit), (threads,), smem, per_cta * tile


def _module(defs):
    """hisa_tokens.cu built for one -D set: (module, has_wgmma); see _cuda.module_sm90a."""
    return module_sm90a("hisa_tokens.cu", defs)


@per_device
def _function(defs, name, smem):
    """A score kernel, opted into `smem` bytes of dynamic shared memory."""
    f = _module(defs)[0].get_function(name)
    return with_dynamic_smem(f, smem) if smem > 0 else f


@functools.lru_cache(maxsize=256)
def _launch(device, T, Hi, Di, fp8, m, B, cap, path, splits):
    """(kernel, grid, block, shared memory, trailing scalar arguments) for one call shape on one GPU (the
    kernel belongs to that device), checked once."""
    check(1 <= Hi <= 64, lambda: f"hisa_token_scores: Hi = {Hi}, the kernels hold 1 to 64 heads")
    row_bytes = Di * (1 if fp8 else 2)
    check(row_bytes % 32 == 0 and row_bytes <= 256,
          lambda: f"hisa_token_scores: Di = {Di} ({row_bytes} bytes a row); rows must be a multiple of 32 bytes, "
                  "at most 256")
    check(m * B + TILE < 2**31, lambda: f"hisa_token_scores: m*B = {m * B} slots overflow int32")
    check(path in ("auto", "wgmma", "mma"),
          lambda: f"hisa_token_scores: path {path!r}, expected auto, blocks, wgmma or mma")
    defs = defines(fp8, Di, Hi)
    wgmma = path != "mma" and row_bytes in WGMMA_ROWS and _module(defs)[1]
    check(path != "wgmma" or wgmma,
          lambda: f"hisa_token_scores: the wgmma kernel needs an sm_90 GPU (sm_90a build) and "
                  f"rows of {WGMMA_ROWS} bytes (here {row_bytes})")
    name, grid, block, smem, per_cta = plan(T, Hi, Di, fp8, m, B, wgmma, sm_count(), splits)
    i32 = np.int32
    if wgmma:
        lgB = B.bit_length() - 1 if B & (B - 1) == 0 else -1  # shift instead of divide for power-of-two B
        tail = (i32(Hi), i32(m), i32(B), i32(lgB), i32(cap), i32(per_cta), i32(smem))
    else:
        tail = (i32(Hi), i32(m), i32(B), i32(cap), i32(per_cta))
    return _function(defs, name, smem), grid, block, smem, tail


class BlocksLaunch(NamedTuple):
    """The block-major path's kernels for one call shape (see _blocks_launch)."""
    count: Any      # hisa_bucket_count
    scatter: Any    # hisa_bucket_scatter (and the q images)
    scores: Any     # hisa_token_scores_blocks
    n_max: int      # items bound: the score kernel's grid
    smem: int       # the score kernel's dynamic shared memory
    nbk: int        # blocks of the cache (buckets besides the dead one)


@functools.lru_cache(maxsize=256)
def _blocks_launch(device, T, Hi, Di, fp8, m, B, cap, path):
    """The block-major path's BlocksLaunch for one call shape, or None where "auto" keeps the query-major
    kernels; a forced path="blocks" that cannot run raises instead."""
    if path not in ("auto", "blocks"):
        return None
    row_bytes = Di * (1 if fp8 else 2)
    nbk = -(-cap // B)
    why = ("needs B = 128" if B != BLOCK_B else
           f"needs rows of {WGMMA_ROWS} bytes (here {row_bytes})" if row_bytes not in WGMMA_ROWS else
           f"holds at most {MAX_BUCKETS} blocks of cache (here {nbk})" if nbk > MAX_BUCKETS else
           f"needs T*m < 2^31 - 4096 (here {T * m})" if T * m >= 2**31 - 4096 else
           f"holds 1 to 64 heads (here {Hi})" if not 1 <= Hi <= 64 else None)
    defs = defines(fp8, Di, Hi)
    if why is None and not _module(defs)[1]:
        why = "needs an sm_90 GPU (sm_90a build)"
    if path == "blocks":
        check(why is None, lambda: f"hisa_token_scores: the block-major kernel {why}")
    elif why is not None or T < BLOCK_MIN_T:
        return None
    smem = blocks_smem(row_bytes, blocks_stages(row_bytes))
    return BlocksLaunch(_function(defs, "hisa_bucket_count", 0), _function(defs, "hisa_bucket_scatter", 0),
                        _function(defs, "hisa_token_scores_blocks", smem), blocks_items(T, m, nbk, BLOCK_QCH), smem,
                        nbk)


def bucket_pairs(launch, blocks, ends, T, m, B, cap, q=None, qs=None, w=None):
    """hisa_bucket_count + hisa_bucket_scatter -> (items int32 [n_max, 4], pairs int32 [T*m], n_items int32 [1]),
    all on the device (n_items[0] <= n_max items are valid); given q [T, Hi, Di] with qs and w, the scatter
    launch also lays them out for the score kernel, and (q_sw uint8 [T*64*row bytes], wq fp32 [T*64]) follow."""
    import cupy as cp
    n_max, nbk = launch.n_max, launch.nbk
    img = 0 if q is None else 64 * q.shape[2] * q.itemsize  # bytes of one query's q image
    # one allocation: q images, head weights, then int32 items (int4: 16-byte aligned), pairs, fill, n_items;
    # every element written by the kernels
    ints = 4 * n_max + T * m + nbk + 2
    scratch = cp.empty(T * (img + 256) + 4 * ints, np.uint8)
    q_sw, wq = scratch[:T * img], scratch[T * img:T * (img + 256)].view(np.float32)
    rest = scratch[T * (img + 256):].view(np.int32)
    o1, o2 = 4 * n_max, 4 * n_max + T * m
    items, pairs, fill, n_items = rest[:o1], rest[o1:o2], rest[o2:-1], rest[-1:]
    i32 = np.int32
    per_cta = BUCKET_THREADS * BUCKET_PAIRS
    shape = (blocks, ends, i32(T), i32(m), i32(B), i32(nbk), i32(cap))
    counters = zeroed_counters("hisa_bucket", MAX_BUCKETS + 2)
    launch.count((-(-T * m // per_cta),), (BUCKET_THREADS,),
                 shape + (i32(BLOCK_QCH), counters, fill, items, i32(n_max), n_items))
    chunks = T * img // 16
    grid = max(-(-T * m // per_cta), -(-chunks // BUCKET_THREADS))
    q_args = (blocks, blocks, blocks, i32(1)) if q is None else (q, qs, w, i32(q.shape[1]))
    launch.scatter((grid,), (BUCKET_THREADS,), shape + (fill, pairs) + q_args + (q_sw, wq, i32(q is not None)))
    out = (items.reshape(n_max, 4), pairs, n_items)
    return out if q is None else out + (q_sw, wq)


def _token_scores_blocks(launch, q, qs, w, keys, ks, blocks, B, ends, out, T, m, cap):
    """Bucket the (query, block) pairs by block and lay q out for bulk copies, then one CTA an item scores a
    block for its queries."""
    items, pairs, n_items, q_sw, wq = bucket_pairs(launch, blocks, ends, T, m, B, cap, q, qs, w)
    i32 = np.int32
    launch.scores((launch.n_max,), (256,), (q_sw, wq, keys, ks, ends, out, pairs, items, n_items, i32(m), i32(cap),
                                            i32(launch.smem)), shared_mem=launch.smem)
    return out


def hisa_token_scores_gpu(q, w, keys, blocks, B, ends, q_scale=None, key_scale=None, *, out=None, path=None,
                          splits=None):
    """Launcher for hisa_tokens.cu -> fp32 [T, m*B], every element written (no device sync, no host copy).

    fp8: q uint8 [T, Hi, Di] and keys uint8 [cap, Di] (e4m3 bits) with q_scale fp32 [T, Hi], key_scale fp32
    [cap]; float: bf16 bits (uint16 or bfloat16), no scales. w fp32 [T, Hi], blocks int32 [T, m], ends int32
    [T]. out: fp32 [T, m*B] to write into instead of a new array; path: "auto" / "blocks" / "wgmma" / "mma"
    (DEFAULT_PATH); splits: CTAs a query of the query-major kernels (default from plan; the block-major
    kernel has no such choice and ignores it).
    """
    import cupy as cp
    q, keys = _bits_u16(q), _bits_u16(keys)
    if not (is_gpu(q) and q.ndim == 3 and is_gpu(keys) and keys.ndim == 2 and is_gpu(blocks) and blocks.ndim == 2):
        raise ValueError(f"hisa_token_scores: expected CuPy q [T, Hi, Di], keys [cap, Di], blocks [T, m]; got "
                         f"q {_what(q)}, keys {_what(keys)}, blocks {_what(blocks)}")
    fp8 = q.dtype == _U8
    T, Hi, Di = q.shape
    m, cap = blocks.shape[1], keys.shape[0]
    elem = _U8 if fp8 else _U16
    want(q, "q", elem, (T, Hi, Di))
    want(keys, "keys", elem, (cap, Di))
    want(w, "w", _F32, (T, Hi))
    want(blocks, "blocks", _I32, (T, m))
    want(ends, "ends", _I32, (T,))
    if fp8:
        if q_scale is None or key_scale is None:
            raise ValueError("hisa_token_scores: fp8 q/keys need q_scale and key_scale")
        want(q_scale, "q_scale", _F32, (T, Hi))
        want(key_scale, "key_scale", _F32, (cap,))
        qs, ks = q_scale, key_scale
    else:
        if q_scale is not None or key_scale is not None:
            raise ValueError("hisa_token_scores: bf16 q/keys take no scales")
        qs = ks = w  # placeholders: the bf16 kernels never read them
    if q.data.ptr % 16 or keys.data.ptr % 16:
        raise ValueError(f"hisa_token_scores: q and keys must be 16-byte aligned for cp.async "
                         f"(q at {q.data.ptr:#x}, keys at {keys.data.ptr:#x})")
    B = int(B)
    if B < 1:
        raise ValueError(f"hisa_token_scores: block size {B}")
    if out is None:
        out = cp.empty((T, m * B), np.float32)
    else:
        want(out, "out", _F32, (T, m * B))
    if T == 0 or m == 0:
        return out
    device = cp.cuda.Device().id
    blocks_launch = _blocks_launch(device, T, Hi, Di, bool(fp8), m, B, cap, path or DEFAULT_PATH)
    if blocks_launch is not None:
        return _token_scores_blocks(blocks_launch, q, qs, w, keys, ks, blocks, B, ends, out, T, m, cap)
    fn, grid, block, smem, tail = _launch(device, T, Hi, Di, bool(fp8), m, B, cap, path or DEFAULT_PATH,
                                          None if splits is None else int(splits))
    fn(grid, block, (q, qs, w, keys, ks, blocks, ends, out) + tail, shared_mem=smem)
    return out


@per_device
def _map_kernel(name):
    return kernel("hisa_tokens.cu", name)


def slots_to_positions_gpu(slots, blocks, B, ends=None):
    """Launcher for hisa_tokens.cu:slots_to_positions: slots int32 [T, K], blocks int32 [T, m], ends int32
    [T] or None -> int32 [T, K], one thread an element (the reference's semantics; slots >= m*B give -1)."""
    import cupy as cp
    if not (is_gpu(slots) and slots.ndim == 2 and is_gpu(blocks) and blocks.ndim == 2):
        raise ValueError(f"slots_to_positions: expected CuPy slots [T, K], blocks [T, m]; got "
                         f"slots {_what(slots)}, blocks {_what(blocks)}")
    T, K = slots.shape
    m = blocks.shape[1]
    want(slots, "slots", _I32, (T, K))
    want(blocks, "blocks", _I32, (T, m))
    if ends is not None:
        want(ends, "ends", _I32, (T,))
    B = int(B)
    n = T * K
    if B < 1 or n >= 2**31:
        raise ValueError(f"slots_to_positions: B = {B} (must be >= 1), T*K = {n} (must be < 2^31)")
    out = cp.empty((T, K), np.int32)
    if n == 0:
        return out
    _map_kernel("slots_to_positions")(
        ((n + 255) // 256,), (256,),
        (slots, blocks, blocks if ends is None else ends, out, np.int32(n), np.int32(K), np.int32(m), np.int32(B),
         np.int32(ends is not None)))
    return out


def force_blocks_gpu(J, ends, B):
    """Launcher for hisa_tokens.cu:force_blocks: in place on fp32 J [T, nb] (C-contiguous), ends int32 [T]."""
    if not (is_gpu(J) and J.ndim == 2):
        raise ValueError(f"force_blocks: expected a CuPy J [T, nb], got {_what(J)}")
    T, nb = J.shape
    want(J, "J", _F32, (T, nb))
    want(ends, "ends", _I32, (T,))
    B = int(B)
    if B < 1:
        raise ValueError(f"force_blocks: block size {B}")
    if T and nb:
        _map_kernel("force_blocks")(((T + 127) // 128,), (128,), (J, ends, np.int32(T), np.int32(nb), np.int32(B)))
    return J


# --- Dispatch ---------------------------------------------------------------------------------------------

def hisa_token_scores(q, w, keys, blocks, B, ends, q_scale=None, key_scale=None):
    """Dispatch: CuPy arrays to the kernel, numpy arrays to the reference."""
    if is_gpu(q):
        return hisa_token_scores_gpu(q, w, keys, blocks, B, ends, q_scale, key_scale)
    return hisa_token_scores_reference(q, w, keys, blocks, B, ends, q_scale, key_scale)


def slots_to_positions(slots, blocks, B, ends=None):
    """Top-k slots [T, k] (-1 padded) -> positions blocks[t, slot // B] * B + slot % B, -1 where invisible."""
    if is_gpu(slots):
        return slots_to_positions_gpu(slots, blocks, B, ends)
    return slots_to_positions_reference(slots, blocks, B, ends)


def force_blocks(J, ends, B):
    """In place: the first block and the block holding each query's position get +inf in J [T, nb]."""
    if is_gpu(J):
        return force_blocks_gpu(J, ends, B)
    return force_blocks_reference(J, ends, B)
