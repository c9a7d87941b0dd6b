"""HISA token stage (SPEC section 6 step 4): exact DSA scores of the candidate slots inside the kept blocks.

Query t kept m blocks (ascending ids, -1 padded); its candidates are the m*B slots of those blocks, slot j
being position p = blocks[t, j // B] * B + j % B. Each visible candidate gets the flat DSA indexer score

    I[t, p] = sum_h w[t,h] * ReLU(qs[t,h] * ks[p] * q[t,h] . k[p])

and everything else (padding blocks, positions >= ends[t]) gets -inf. The top-k of a row is then taken over
slots and mapped back to positions with `slots_to_positions`.
"""
import functools

import numpy as np

from kernels._cuda import check, check_array, is_gpu, kernel, xp_of
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


def slots_to_positions(slots, blocks, B, ends=None):
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


# --- GPU launcher --------------------------------------------------------------------------------------

NT = 64  # slots per tile (hisa_tokens.cu)


@functools.lru_cache(maxsize=None)
def _sm_count():
    import cupy as cp
    return cp.cuda.Device().attributes["MultiProcessorCount"]


def _bits_u16(a):
    return a.view(np.uint16) if a.dtype.name == "bfloat16" else a


def hisa_token_scores_gpu(q, w, keys, blocks, B, ends, q_scale=None, key_scale=None):
    """Launcher for hisa_tokens.cu. fp8: uint8 q/keys with scales; float: bf16 bits (uint16) q/keys."""
    import cupy as cp
    q, keys = _bits_u16(q), _bits_u16(keys)
    fp8 = q.dtype == np.uint8
    check(q.ndim == 3, f"q: rank {q.ndim} (shape {q.shape}), expected [T, Hi, Di]")
    T, Hi, Di = q.shape
    check(blocks.ndim == 2, f"blocks: rank {blocks.ndim} (shape {blocks.shape}), expected [T, m]")
    m = blocks.shape[1]
    cap = keys.shape[0]
    elem = np.uint8 if fp8 else np.uint16
    check_array(q, "q", elem, ndim=3)
    check_array(keys, "keys", elem, ndim=2, shape=(None, Di))
    check_array(w, "w", np.float32, shape=(T, Hi))
    check_array(blocks, "blocks", np.int32, shape=(T, m))
    check_array(ends, "ends", np.int32, shape=(T,))
    if fp8:
        check(q_scale is not None and key_scale is not None, "hisa_token_scores: fp8 q/keys need q_scale and key_scale")
        check_array(q_scale, "q_scale", np.float32, shape=(T, Hi))
        check_array(key_scale, "key_scale", np.float32, shape=(cap,))
    else:
        check(q_scale is None and key_scale is None, "hisa_token_scores: bf16 q/keys take no scales")
    check(1 <= Hi <= 64, f"hisa_token_scores: Hi = {Hi}, the kernel holds at most 64 heads")
    row_bytes = Di * q.itemsize
    check(row_bytes % 32 == 0 and row_bytes <= 256,
          f"hisa_token_scores: Di = {Di} ({row_bytes} bytes a row); rows must be a multiple of 32 bytes, at most 256")
    check(B >= 1, f"hisa_token_scores: block size {B}")
    check(m * B < 2**31, f"hisa_token_scores: m*B = {m * B} slots overflow int32")
    for a, name in ((q, "q"), (keys, "keys")):
        check(a.data.ptr % 16 == 0, f"{name}: base address must be 16-byte aligned for cp.async")

    out = cp.full((T, m * B), np.nan, np.float32)  # NaN: an unwritten slot shows up in tests
    if T == 0 or m * B == 0:
        return out
    mt = 1 if Hi <= 16 else 2 if Hi <= 32 else 4
    stage_bytes = NT * (row_bytes + 16)
    stages = 3 if 3 * stage_bytes <= 40 * 1024 else 2
    # Split a query's slots over several CTAs when there are few queries (decode), >= 2 tiles per CTA.
    tiles = -(-m * B // NT)
    nsplit = max(1, min(-(-4 * _sm_count() // T), tiles // 2))
    tiles_per_cta = -(-tiles // nsplit)
    nsplit = -(-tiles // tiles_per_cta)
    defines = (f"HT_FP8={int(fp8)}", f"HT_DI={Di}", f"HT_MT={mt}", f"HT_STAGES={stages}")
    qs = q_scale if fp8 else w  # unused placeholders in bf16 mode
    ks = key_scale if fp8 else w
    kernel("hisa_tokens.cu", "hisa_token_scores", defines)(
        (T, nsplit), (128,),
        (q, qs, w, keys, ks, blocks, ends, out,
         np.int32(Hi), np.int32(m), np.int32(B), np.int32(cap), np.int32(tiles_per_cta * NT)))
    return out


def hisa_token_scores(q, w, keys, blocks, B, ends, q_scale=None, key_scale=None):
    """Dispatch: CuPy arrays to the kernel, numpy arrays to the reference."""
    if is_gpu(q):
        return hisa_token_scores_gpu(q, w, keys, blocks, B, ends, q_scale, key_scale)
    return hisa_token_scores_reference(q, w, keys, blocks, B, ends, q_scale, key_scale)
