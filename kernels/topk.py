"""Per-row top-k indices, ascending, for the indexers: numpy reference and two select kernels (topk.cu):
topk_rows for long rows (a sampled threshold, rows split over CTAs when few), topk_short for rows of at most
SHORT_N columns (the row in shared memory, one CTA a row).

topk(scores [R, N] fp32, k, lengths=None) -> int32 [R, k]: the columns of each row's k largest valid
scores (valid: not -inf, not NaN; +inf counts and is largest), in ascending column order, padded with -1
when a row has fewer than k valid entries. Equal scores at the threshold go to the lower column (SPEC
section 5). lengths (int [R], optional): row r considers only columns [0, lengths[r]) (clamped to [0, N]),
as if the rest were -inf; the kernel does not read them (causal prefill: row t sees ends[t] keys).

HISA's token top-k maps its result in the same launch: topk(cand, k, blocks=blocks, B=B, ends=ends), where
column s of row t is the candidate slot of position blocks[t, s // B] * B + s % B, returns those positions
(-1 where the block is -1 or, given ends, the position is >= ends[t]): kernels/hisa_tokens.py's
slots_to_positions_reference applied to the top-k, with no second launch.
"""
import functools

import numpy as np

from kernels._cuda import check, check_array, is_gpu, is_whole, kernel, want, zeroed_counters
from kernels.hisa_tokens import slots_to_positions_reference

THREADS = 512           # per CTA, two CTAs per SM (topk.cu)
KMAX = 2048             # largest k: the size of the kernel's shared `sel` array
NBINS = 2048            # 11-bit digit histogram
SAMPLE_G = 2048         # groups of 4 scores in the threshold sample
SMEM_FIXED = 4 * (NBINS + KMAX + 64 + 16)   # hist, sel, block-scan buffers, misc (bytes)
CAND_CAP_MAX = 32768
MIN_SLICE_GROUPS = 2048  # split mode: a CTA streams at least 8192 columns
# Widest row for topk_short: its keys take 4 bytes a column of shared memory, 41 KB with the histogram at
# 8192, under the 48 KB that needs no opt-in. It covers HISA's top-m (one score a block: 1024 at 128K) and
# the unfused token top-k (m*B = 8192 candidates), where topk_rows' sample, candidate buffer (115 KB, two
# CTAs an SM) and final sort cost more than the row itself.
SHORT_N = 8192
_NULL = np.uint64(0)     # a null pointer argument (lengths, split-mode buffers, slot map absent)
_I32 = np.dtype(np.int32)
_F32 = np.dtype(np.float32)
_ATTR_SM_COUNT = 16      # cudaDevAttrMultiProcessorCount
_ATTR_SMEM_PER_SM = 81   # cudaDevAttrMaxSharedMemoryPerMultiprocessor
_ATTR_SMEM_OPTIN = 97    # cudaDevAttrMaxSharedMemoryPerBlockOptin
_ATTR_SMEM_RESERVED = 111  # cudaDevAttrReservedSharedMemoryPerBlock


def topk_reference(scores, k, lengths=None):
    """The definition: columns >= lengths[r] become -inf; stable argsort of -scores (lower index first
    among equals, NaN last), keep the first k valid entries, sort them ascending, pad with -1."""
    s = np.asarray(scores)
    check(s.ndim == 2, lambda: f"topk: scores of shape {s.shape}, expected [rows, columns]")
    R, N = s.shape
    check(is_whole(k), lambda: f"topk: k = {k}, expected a whole number >= 0")
    if lengths is not None:
        L = np.asarray(lengths.get() if is_gpu(lengths) else lengths)
        check(L.size == R and L.dtype.kind in "iu",
              lambda: f"topk: lengths of dtype {L.dtype} and shape {L.shape}, expected {R} integers (one a row)")
        L = np.clip(L.astype(np.int64).reshape(R), 0, N)
        s = np.where(np.arange(N) < L[:, None], s, s.dtype.type(-np.inf))
    valid = ~(np.isnan(s) | (s == -np.inf))
    order = np.argsort(-s, axis=-1, kind="stable")
    out = np.full((R, k), -1, np.int32)
    for r in range(R):
        chosen = order[r][valid[r][order[r]]][:k]
        out[r, : len(chosen)] = np.sort(chosen)
    return out


def smem_bytes(cap):
    """Dynamic shared memory of one CTA: the fixed arrays and the candidate buffer (which first holds the
    sample's 4 * SAMPLE_G keys)."""
    return SMEM_FIXED + max(8 * cap, 16 * SAMPLE_G)


def short_smem_bytes(N):
    """Dynamic shared memory of topk_short: hist, block-scan buffers and misc, then one key a column (rounded
    up to groups of 4)."""
    return 4 * (NBINS + 64 + 16) + 16 * (-(-N // 4))


def candidate_cap(smem_per_sm, reserved_per_block, optin):
    """The largest candidate buffer (a multiple of 4) with which two CTAs share an SM."""
    per_cta = min(smem_per_sm // 2 - reserved_per_block, optin)
    return min(CAND_CAP_MAX, (per_cta - SMEM_FIXED) // 8 // 4 * 4)


def slices_per_row(R, N, n_sm):
    """CTAs per row: with few rows, enough CTAs to give every SM two (each streaming MIN_SLICE_GROUPS
    groups of 4 at least); with R >= n_sm, one CTA per row."""
    groups = -(-N // 4)
    return max(1, min(2 * n_sm // max(R, 1), -(-groups // MIN_SLICE_GROUPS)))


@functools.lru_cache(maxsize=None)
def _launch_config(device_id):
    """(kernel, candidate capacity, SM count) for a device."""
    import cupy as cp
    attr = cp.cuda.runtime.deviceGetAttribute
    cap = candidate_cap(attr(_ATTR_SMEM_PER_SM, device_id), attr(_ATTR_SMEM_RESERVED, device_id),
                        attr(_ATTR_SMEM_OPTIN, device_id))
    check(cap >= 2 * KMAX, lambda: f"topk: a candidate buffer of {cap} is too small (shared memory per SM "
                                   f"{attr(_ATTR_SMEM_PER_SM, device_id)} B)")
    fn = kernel("topk.cu", "topk_rows")
    fn.max_dynamic_shared_size_bytes = smem_bytes(cap)
    fn.preferred_shared_memory_carveout = 100  # all of L1 as shared memory: room for two CTAs an SM
    return fn, cap, attr(_ATTR_SM_COUNT, device_id)


@functools.lru_cache(maxsize=None)
def _short_kernel(device_id):
    fn = kernel("topk.cu", "topk_short")
    fn.preferred_shared_memory_carveout = 100  # four CTAs of up to 41 KB an SM; the row is read once, L1 idle
    return fn


_split_candidates = {}  # (device, stream) -> the split path's candidate buffer


def _split_scratch(R, cap):
    """(gcount, gcand) of the split path: 2 R counters the kernel leaves zero after each launch, and its
    candidates' buffer."""
    import cupy as cp
    key = (cp.cuda.Device().id, cp.cuda.get_current_stream().ptr)
    gcand = _split_candidates.get(key)
    if gcand is None or gcand.size < 2 * R * cap:
        gcand = _split_candidates[key] = cp.empty(2 * R * cap, np.uint32)
    return zeroed_counters("topk_split", 2 * R), gcand


def _check_map(N, blocks, B, ends):
    """The slot map's arguments (see the module docstring): B >= 1 divides N, blocks [R, N / B]; returns B."""
    if blocks is None:
        if B is not None or ends is not None:
            raise ValueError("topk: B and ends come with blocks (the slot -> position map)")
        return 1
    B = int(B) if B is not None else 0
    if B < 1 or N % B or getattr(blocks, "ndim", 0) != 2 or blocks.shape[1] != N // B:
        raise ValueError(f"topk: rows of {N} slots need B >= 1 dividing N and blocks [R, N / B]; got B = {B}, "
                         f"blocks of shape {getattr(blocks, 'shape', None)}")
    return B


def topk_gpu(scores, k, lengths=None, *, blocks=None, B=None, ends=None, path="auto", cand_cap=None, slices=None):
    """Launcher for topk.cu. scores: CuPy fp32 [R, N] contiguous, 1 <= k <= 2048; lengths: int [R] (CuPy or
    numpy), entries clamped to [0, N]. blocks int32 [R, N / B], B, ends int32 [R] (optional, CuPy): write the
    slots' positions instead (the module docstring), for either kernel.

    path: "auto" takes topk_short for rows of N <= SHORT_N columns and topk_rows otherwise; "short" and
    "rows" force one (benchmarks, tests). topk_rows splits rows over several CTAs when they are few
    (decode); cand_cap and slices (tests only, topk_rows only) shrink its shared candidate buffer to force
    the exact path, and set the CTAs per row. Error messages are only formatted once a check has failed.
    """
    import cupy as cp
    if not (is_gpu(scores) and scores.dtype == _F32 and scores.ndim == 2 and scores.flags.c_contiguous):
        check_array(scores, "scores", np.float32, ndim=2)
    R, N = scores.shape
    if not 1 <= k <= KMAX:
        raise ValueError(f"topk: k = {k}, the kernel supports 1..{KMAX}")
    if N > 2**30:
        raise ValueError(f"topk: rows of {N} scores, the kernel indexes up to 2^30")
    if path not in ("auto", "short", "rows"):
        raise ValueError(f"topk: path {path!r}, expected auto, short or rows")
    rows_only = cand_cap is not None or slices is not None
    short = path == "short" or (path == "auto" and N <= SHORT_N and not rows_only)
    if short and (N > SHORT_N or rows_only):
        raise ValueError(f"topk: the short-row kernel takes rows of up to {SHORT_N} columns (here {N}) and no "
                         f"cand_cap/slices")
    if lengths is not None:
        if not is_gpu(lengths):
            lengths = cp.asarray(np.asarray(lengths))
        if lengths.dtype.kind not in "iu" or lengths.shape != (R,):
            raise ValueError(f"topk: lengths of dtype {lengths.dtype} and shape {lengths.shape}, expected integers "
                             f"({R},)")
        if lengths.dtype != _I32 or not lengths.flags.c_contiguous:
            lengths = cp.ascontiguousarray(lengths, np.int32)
    B = _check_map(N, blocks, B, ends)
    if blocks is not None:
        want(blocks, "blocks", _I32, (R, N // B))
        if ends is not None:
            want(ends, "ends", _I32, (R,))
    out = cp.empty((R, k), np.int32)
    if R == 0:
        return out
    if N == 0:
        out.fill(-1)
        return out
    tail = (_NULL if blocks is None else blocks, _NULL if ends is None else ends, np.int32(B))
    L = _NULL if lengths is None else lengths
    if short:
        fn = _short_kernel(cp.cuda.runtime.getDevice())
        fn((R,), (THREADS,), (scores, L, out, np.int32(N), np.int32(k)) + tail, shared_mem=short_smem_bytes(N))
        return out
    fn, cap, n_sm = _launch_config(cp.cuda.runtime.getDevice())
    if cand_cap is not None:
        check(0 <= cand_cap <= cap and cand_cap % 4 == 0,
              lambda: f"topk: cand_cap {cand_cap} must be a multiple of 4 in [0, {cap}]")
        cap = cand_cap
    G = slices_per_row(R, N, n_sm) if slices is None else slices
    if not (G >= 1 and R * G < 2**31):
        raise ValueError(f"topk: {G} CTAs per row for {R} rows")
    groups = -(-N // 4)
    slice_groups = -(-groups // G)
    gcount, gcand = _split_scratch(R, cap) if G > 1 else (_NULL, _NULL)
    vec = N % 4 == 0 and scores.data.ptr % 16 == 0
    fn((R * G,), (THREADS,), (scores, L, out, gcand, gcount, np.int32(N), np.int32(k), np.int32(vec), np.int32(cap),
                              np.int32(G), np.int32(slice_groups)) + tail,
       shared_mem=smem_bytes(cap))
    return out


def topk(scores, k, lengths=None, *, blocks=None, B=None, ends=None):
    """Top-k columns [R, k] of each row (the module docstring); with blocks, B (and ends), their positions."""
    if is_gpu(scores):
        return topk_gpu(scores, k, lengths, blocks=blocks, B=B, ends=ends)
    out = topk_reference(scores, k, lengths)  # checks scores, k and lengths
    B = _check_map(np.shape(scores)[1], blocks, B, ends)
    return out if blocks is None else slots_to_positions_reference(out, np.asarray(blocks), B,
                                                                   None if ends is None else np.asarray(ends))
