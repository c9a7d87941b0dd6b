"""HISA's whole selection for a few queries (decode) in one launch: kernels/hisa_decode.cu.

hisa.select is four steps (SPEC section 6): block scores over the pooled keys (first and own block forced),
top-m blocks, exact scores of the tokens inside them, top-K mapped back to positions. On the GPU they are
four kernels, which is right for a prefill chunk of many queries; for one decode query each kernel has next
to nothing to do, and its launch, ramp and dependent memory round trips are the cost. hisa_decode.cu runs
all four in one launch of G CTAs a query that meet twice (a barrier after the block scores; the last CTA to
finish the token scores does the top-K). H200, device time, one query at 128K (`python bench/kernels.py
decode`, session 8): 17 us against the four kernels' 27 and DSA's 36.

select_gpu returns the selected positions int32 [T, K], ascending, -1 padded; with stages=True also its
intermediate results (block scores J [T, n], kept blocks [T, m], candidate scores [T, m*B]), so that the
tests check every stage exactly given the ones before it against select_reference, the four references
composed (which is what hisa.select computes on numpy arrays).

The fused kernel takes fp8 indexer numerics (e4m3 q and keys with scales; mma.sync e4m3, so sm_89 or later),
Hi <= 64 and Di = 32..128 (a multiple of 32); `why_not` says why a call does not fit, and
hisa.select then runs the four-kernel pipeline.
"""
import functools

import numpy as np

from kernels._cuda import (check, compute_capability, device_attr, is_gpu, module, per_device, sm_count, want,
                           with_dynamic_smem, zeroed_counters)
from kernels.hisa_tokens import hisa_token_scores_reference, slots_to_positions_reference
from kernels.indexer import hisa_block_scores_reference
from kernels.topk import topk_reference

THREADS = 512             # hisa_decode.cu's CTA (select.cuh's THREADS)
NBINS = 2048              # select.cuh's histogram
MAX_HEADS = 64            # four head tiles of 16
MAX_QUERIES = 8           # hisa.select takes the fused kernel up to this many queries (G >= 16 CTAs each; H200,
                          # 128K: 27 us at 8 queries against the four kernels' 50)
MAX_ROW = THREADS * 16    # blocks (n) and candidates (m*B) a selection holds in registers (hisa_decode.cu PER)
_U8, _I32, _F32 = (np.dtype(d) for d in (np.uint8, np.int32, np.float32))


def select_reference(q, q_scale, w, pooled_k, pooled_scale, n, keys, key_scale, ends, B, m, K):
    """The four references composed: (out [T, K], J [T, n], kept [T, m], cand [T, m*B]) in numpy."""
    J = hisa_block_scores_reference(q, w, pooled_k, ends, B, q_scale, pooled_scale, n)
    kept = topk_reference(J, m)
    cand = hisa_token_scores_reference(q, w, keys, kept, B, ends, q_scale, key_scale)
    out = slots_to_positions_reference(topk_reference(cand, K), kept, B, ends)
    return out, J, kept, cand


# --- GPU launcher -----------------------------------------------------------------------------------

def smem_bytes(m, Di):
    """hisa_decode.cu's dynamic shared memory: staged q fragments and head weights, the selections' histogram,
    scan buffers and counters, the kept blocks (the keys being selected live in registers)."""
    return 16 * 4 * (Di // 32) * 32 + 4 * MAX_HEADS + 4 * (NBINS + 64 + 16) + 4 * m


def ctas_per_query(T, m, n_sm):
    """G: one CTA a kept block up to m, and every CTA of the grid resident at once (T G <= SMs, one CTA an SM)."""
    return max(1, min(m, n_sm // max(T, 1)))


def why_not(T, Hi, Di, fp8, n, m, B, K):
    """None when the fused kernel takes this call on the current GPU, else the reason it does not."""
    n_sm, optin, cc = sm_count(), device_attr("MaxSharedMemoryPerBlockOptin"), compute_capability()
    smem = smem_bytes(m, Di)
    return ("needs fp8 q and keys (e4m3 with scales)" if not fp8 else
            f"needs sm_89 or later for e4m3 mma.sync (this GPU: sm_{cc})" if cc < 89 else
            f"holds 1 to {MAX_HEADS} heads (here {Hi})" if not 1 <= Hi <= MAX_HEADS else
            f"needs Di a multiple of 32 up to 128 (here {Di})" if Di % 32 or not 32 <= Di <= 128 else
            f"needs B, m, K >= 1 (here {B}, {m}, {K})" if min(B, m, K) < 1 else
            f"takes 1 to {n_sm} queries, every CTA resident at once (here {T})" if not 1 <= T <= n_sm else
            f"selects among at most {MAX_ROW} blocks and candidates (here n = {n}, m*B = {m * B})"
            if max(n, m * B) > MAX_ROW else
            f"needs {smem} bytes of shared memory, the GPU allows {optin}" if smem > optin else None)


@per_device
def _kernel(Di):
    """The kernel for rows of Di bytes, opted into all the shared memory a CTA may have: the size a call needs
    varies with its shape, and the opt-in belongs to the function, not to one launch."""
    f = module("hisa_decode.cu", (f"HD_DI={Di}",)).get_function("hisa_decode_select")
    return with_dynamic_smem(f, device_attr("MaxSharedMemoryPerBlockOptin"))


@functools.lru_cache(maxsize=256)
def _plan(device, T, Hi, Di, n, m, B, K):
    """(kernel, grid, shared memory) for one call shape on one GPU, checked once."""
    reason = why_not(T, Hi, Di, True, n, m, B, K)
    check(reason is None, lambda: f"hisa_decode_select: the fused kernel {reason}")
    smem = smem_bytes(m, Di)
    return _kernel(Di), (ctas_per_query(T, m, sm_count()), T), smem


def select_gpu(q, q_scale, w, pooled_k, pooled_scale, n, keys, key_scale, ends, B, m, K, *, G=None, stages=False,
               scratch=None):
    """Launcher for hisa_decode.cu -> positions int32 [T, K] (no device sync, no host copy).

    q uint8 [T, Hi, Di] (e4m3 bits) with q_scale fp32 [T, Hi]; w fp32 [T, Hi]; pooled_k uint8 [>= n, Di] with
    pooled_scale fp32 [>= n] (hisa.PooledKeys as allocated; the first n rows are the blocks); keys uint8
    [cap, Di] with key_scale fp32 [cap] (the indexer's key cache); ends int32 [T]. G: CTAs a query (tests; the
    default is ctas_per_query). stages: also return J [T, n], kept [T, m], cand [T, m*B]. scratch: int32
    [T * (n + m + m*B + K)] to hold J, kept, cand and the positions (tests poison it) instead of a new array.
    """
    import cupy as cp
    if not (is_gpu(q) and q.ndim == 3 and is_gpu(pooled_k) and pooled_k.ndim == 2 and is_gpu(keys)
            and keys.ndim == 2):
        raise ValueError(f"hisa_decode_select: expected CuPy q [T, Hi, Di], pooled_k [>= n, Di], keys [cap, Di]; "
                         f"got q {getattr(q, 'shape', type(q).__name__)}, pooled_k "
                         f"{getattr(pooled_k, 'shape', type(pooled_k).__name__)}, keys "
                         f"{getattr(keys, 'shape', type(keys).__name__)}")
    T, Hi, Di = q.shape
    nbc, cap = pooled_k.shape[0], keys.shape[0]
    n, B, m, K = int(n), int(B), int(m), int(K)
    want(q, "q", _U8, (T, Hi, Di))
    want(q_scale, "q_scale", _F32, (T, Hi))
    want(w, "w", _F32, (T, Hi))
    want(pooled_k, "pooled_k", _U8, (nbc, Di))
    want(pooled_scale, "pooled_scale", _F32, (nbc,))
    want(keys, "keys", _U8, (cap, Di))
    want(key_scale, "key_scale", _F32, (cap,))
    want(ends, "ends", _I32, (T,))
    check(0 <= n <= nbc, lambda: f"hisa_decode_select: n = {n} blocks, the pooled keys hold {nbc}")
    mB = m * B
    size = T * (n + m + mB + K)
    if scratch is None:
        scratch = cp.empty(size, np.int32)  # J, kept, cand, out: every element written
    else:
        want(scratch, "scratch", _I32, (size,))
    J = scratch[:T * n].view(np.float32).reshape(T, n)
    kept = scratch[T * n:T * (n + m)].reshape(T, m)
    cand = scratch[T * (n + m):T * (n + m + mB)].view(np.float32).reshape(T, mB)
    out = scratch[T * (n + m + mB):].reshape(T, K)
    if T and n == 0:  # no keys at all: nothing is visible
        out.fill(-1)
        kept.fill(-1)
        cand.fill(-np.inf)
    elif T:
        fn, grid, smem = _plan(cp.cuda.Device().id, T, Hi, Di, n, m, B, K)
        if G is not None:
            check(G >= 1 and T * G <= sm_count(),
                  lambda: f"hisa_decode_select: G = {G} CTAs a query, at most {sm_count() // T} resident")
            grid = (int(G), T)
        i32 = np.int32
        lgB = B.bit_length() - 1 if B & (B - 1) == 0 else -1
        sync = zeroed_counters("hisa_decode", 2 * T)  # the kernel's two meetings a query
        fn(grid, (THREADS,), (q, q_scale, w, pooled_k, pooled_scale, i32(n), keys, key_scale, i32(cap), ends,
                              i32(Hi), i32(B), i32(lgB), i32(m), i32(K), J, kept, cand, out, sync),
           shared_mem=smem)
    return (out, J, kept, cand) if stages else out

