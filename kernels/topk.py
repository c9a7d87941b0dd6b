"""Per-row top-k indices, ascending, for the indexers: numpy reference and a radix-select kernel.

topk(scores [R, N] fp32, k) -> int32 [R, k]: the columns of each row's k largest valid scores (valid:
not -inf, not NaN; +inf counts and is largest), in ascending column order, padded with -1 when a row has
fewer than k valid entries. Equal scores at the threshold go to the lower column (SPEC section 5).
"""
import functools

import numpy as np

from kernels._cuda import check, check_array, is_gpu, kernel

THREADS = 1024      # one CTA per row (topk.cu)
KMAX = 2048         # largest k: the size of the kernel's shared `sel` run
NBINS = 2048        # 11-bit digit histogram
SMEM_FIXED = 4 * (NBINS + KMAX + 64 + 8)   # hist, sel, block-scan buffers, misc (bytes)
CAND_CAP_MAX = 32768
_ATTR_SMEM_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin


def topk_reference(scores, k):
    """The definition: stable argsort of -scores (lower index first among equals, NaN last), keep the
    first k valid entries, sort them ascending, pad with -1."""
    s = np.asarray(scores)
    R, N = s.shape
    valid = ~(np.isnan(s) | (s == -np.inf))
    order = np.argsort(-s, axis=-1, kind="stable")
    out = np.full((R, k), -1, np.int32)
    for r in range(R):
        chosen = order[r][valid[r][order[r]]][:k]
        out[r, : len(chosen)] = np.sort(chosen)
    return out


@functools.lru_cache(maxsize=None)
def _launch_config(device_id):
    """(kernel, candidate capacity) for a device: the buffer takes what opt-in shared memory allows."""
    import cupy as cp
    optin = cp.cuda.runtime.deviceGetAttribute(_ATTR_SMEM_OPTIN, device_id)
    cap = min(CAND_CAP_MAX, (optin - SMEM_FIXED) // 8 // 4 * 4)
    check(cap >= 1024, f"topk: only {optin} B of shared memory per block, the kernel wants "
                       f"{SMEM_FIXED + 8 * 1024} B at least")
    fn = kernel("topk.cu", "topk_rows")
    fn.max_dynamic_shared_size_bytes = SMEM_FIXED + 8 * cap
    return fn, cap


def topk_gpu(scores, k, *, cand_cap=None):
    """Launcher for topk.cu:topk_rows. scores: CuPy fp32 [R, N] contiguous, 1 <= k <= 2048.

    cand_cap (tests only) shrinks the shared candidate buffer to force the kernel's re-scan paths.
    """
    import cupy as cp
    check_array(scores, "scores", np.float32, ndim=2)
    R, N = scores.shape
    check(1 <= k <= KMAX, f"topk: k = {k}, the kernel supports 1..{KMAX}")
    check(N <= 2**30, f"topk: rows of {N} scores, the kernel indexes up to 2^30")
    out = cp.empty((R, k), np.int32)
    if R == 0:
        return out
    if N == 0:
        out.fill(-1)
        return out
    fn, cap = _launch_config(cp.cuda.Device().id)
    if cand_cap is not None:
        check(0 <= cand_cap <= cap and cand_cap % 4 == 0,
              f"topk: cand_cap {cand_cap} must be a multiple of 4 in [0, {cap}]")
        cap = cand_cap
    vec = N % 4 == 0 and scores.data.ptr % 16 == 0
    fn((R,), (THREADS,), (scores, out, np.int32(N), np.int32(k), np.int32(vec), np.int32(cap)),
       shared_mem=SMEM_FIXED + 8 * cap)
    return out


def topk(scores, k):
    if is_gpu(scores):
        return topk_gpu(scores, k)
    return topk_reference(scores, k)


# --- Benchmarks (not tests): CUDA events after warm-up, median over reps ---------------------------

def _input_pool(xp_randn, R, N):
    """Random [R, N] fp32 inputs, 256 MB at least in all: the first ones, used first, are out of L2."""
    nbuf = max(1, -(-(256 << 20) // (R * N * 4)))
    pool = xp_randn(nbuf * R, N)
    return [pool[i * R:(i + 1) * R] for i in range(nbuf)]


def bench_topk(R, N, k, reps=20):
    """Median ms of one topk_gpu call (launch included) on standard-normal rows."""
    import cupy as cp
    pool = _input_pool(lambda r, n: cp.random.standard_normal((r, n), dtype=cp.float32), R, N)
    for i in range(3):
        topk_gpu(pool[i % len(pool)], k)
    times = []
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for i in range(reps):
        x = pool[(i + 3) % len(pool)]
        start.record()
        topk_gpu(x, k)
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def bench_torch_topk(R, N, k, reps=20):
    """The same timing for torch.topk(x, k, dim=-1, sorted=False) (values and indices, unsorted by
    index): a reference point only; torch is imported here and is no dependency of hisa."""
    import torch
    pool = _input_pool(lambda r, n: torch.randn(r, n, device="cuda", dtype=torch.float32), R, N)
    for i in range(3):
        torch.topk(pool[i % len(pool)], k, dim=-1, sorted=False)
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(reps):
        x = pool[(i + 3) % len(pool)]
        start.record()
        torch.topk(x, k, dim=-1, sorted=False)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


if __name__ == "__main__":
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    print(f"{'R':>6} {'N':>8} {'k':>5} {'topk ms':>9} {'GB/s (1 read)':>14} {'torch ms':>9}")
    for R, N, k in [(1, 8192, 2048), (1, 131072, 2048), (1, 262144, 2048), (64, 131072, 2048),
                    (1024, 8192, 2048), (1024, 131072, 2048), (1024, 1024, 64)]:
        ms = bench_topk(R, N, k)
        t = f"{bench_torch_topk(R, N, k):9.3f}" if have_torch else f"{'-':>9}"
        print(f"{R:>6} {N:>8} {k:>5} {ms:9.3f} {R * N * 4 / ms / 1e6:14.0f} {t}")
