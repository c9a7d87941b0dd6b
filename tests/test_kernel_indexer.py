"""DSA indexer scores: the reference against a naive loop (CPU), the kernels against the reference (GPU)."""
import ml_dtypes
import numpy as np
import pytest

from kernel_build import build_without_spills, needs_nvcc
from kernels._cuda import HAVE_GPU
from kernels.fp8 import e4m3_decode, e4m3_encode, quantize_ue8m0
from kernels.indexer import HEAD_DIMS, HEADS, hisa_block_scores, hisa_block_scores_reference, index_scores_reference, \
    key_splits, plan

gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU visible: indexer kernel parity runs on the GPU machine")


def naive(q, w, k, starts, ends, qs=None, ks=None):
    """I[t, s] = sum_h w[t,h] * ReLU(qs[t,h] * ks[s] * q[t,h] . k[s]) on float64 values, one entry at a time."""
    T, Hi, Di = q.shape
    N = k.shape[0]
    out = np.full((T, N), -np.inf)
    for t in range(T):
        for s in range(starts[t], ends[t]):
            total = 0.0
            for h in range(Hi):
                scale = 1.0 if qs is None else float(qs[t, h]) * float(ks[s])
                total += float(w[t, h]) * max(scale * float(np.dot(q[t, h], k[s])), 0.0)
            out[t, s] = total
    return out


def random_inputs(rng, T, N, Hi, Di, fp8):
    """Realistic inputs: float q, k; in fp8 mode quantised with ue8m0 block scales to e4m3 bits."""
    q = rng.standard_normal((T, Hi, Di)).astype(np.float32)
    k = rng.standard_normal((N, Di)).astype(np.float32)
    w = (rng.standard_normal((T, Hi)) * (Hi * Di) ** -0.5).astype(np.float32)
    if not fp8:
        return q, w, k, None, None
    q8, qs = quantize_ue8m0(q)
    k8, ks = quantize_ue8m0(k)
    return e4m3_encode(q8), w, e4m3_encode(k8), qs.reshape(T, Hi), ks.reshape(N)


def random_ranges(rng, T, N):
    a, b = rng.integers(0, N + 1, T), rng.integers(0, N + 1, T)
    starts, ends = np.minimum(a, b).astype(np.int32), np.maximum(a, b).astype(np.int32)
    if T > 1:
        starts[1], ends[1] = 0, 0  # an empty row
    return starts, ends


def assert_scores_close(got, ref, rtol, what):
    """Same -inf pattern; finite entries within rtol of the row's largest |value|. Prints where on failure."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} vs {ref.shape}"
    assert not np.isnan(got).any(), f"{what}: NaN at {np.argwhere(np.isnan(got))[:5].tolist()}"
    fin = np.isfinite(ref)
    diff = np.isfinite(got) != fin
    assert not diff.any(), f"{what}: -inf pattern differs at (t, s) {np.argwhere(diff)[:5].tolist()}"
    assert (got[~fin] == -np.inf).all(), f"{what}: masked entries must be -inf"
    g, r = np.where(fin, got, 0).astype(np.float64), np.where(fin, ref, 0).astype(np.float64)
    rowmax = np.abs(r).max(axis=1, keepdims=True) + 1e-30
    rel = np.abs(g - r) / rowmax
    i = np.unravel_index(np.argmax(rel), rel.shape)
    msg = (f"{what}: max-abs {np.abs(g - r).max():.3e}, max-rel (to row max) {rel.max():.3e} "
           f"at (t, s) = {tuple(int(x) for x in i)}: got {g[i]:.6g}, want {r[i]:.6g}")
    print(msg)
    assert rel.max() <= rtol, msg


# --- CPU: the reference --------------------------------------------------------------------------

@pytest.mark.parametrize("fp8", [False, True])
def test_reference_matches_naive_loop(fp8):
    rng = np.random.default_rng(0)
    T, N, Hi, Di = 5, 11, 4, 8
    q, w, k, qs, ks = random_inputs(rng, T, N, Hi, Di, fp8)
    starts = np.array([0, 3, 0, 7, 2], np.int32)
    ends = np.array([1, 3, 11, 9, 6], np.int32)  # row 1 empty, row 2 sees everything
    got = index_scores_reference(q, w, k, ends, qs, ks, starts)
    qv, kv = (e4m3_decode(q), e4m3_decode(k)) if fp8 else (q, k)
    want = naive(qv.astype(np.float64), w, kv.astype(np.float64), starts, ends, qs, ks)
    assert got.dtype == np.float32
    assert_scores_close(got, want, 1e-6, "reference vs naive")
    assert np.isneginf(got[1]).all() and np.isfinite(got[2]).all()


def test_reference_starts_default_to_zero():
    rng = np.random.default_rng(1)
    q, w, k, _, _ = random_inputs(rng, 3, 6, 4, 8, False)
    ends = np.array([1, 4, 6], np.int32)
    a = index_scores_reference(q, w, k, ends)
    b = index_scores_reference(q, w, k, ends, starts=np.zeros(3, np.int32))
    assert np.array_equal(a, b)
    assert np.isneginf(a[0, 1:]).all() and np.isfinite(a[0, 0])


def test_reference_fp8_equals_dequantised_float64():
    """fp8 mode = the float formula on dequantised values v8 * s (the scales fold out of the ReLU exactly)."""
    rng = np.random.default_rng(2)
    T, N, Hi, Di = 6, 40, 8, 64
    q, w, k, qs, ks = random_inputs(rng, T, N, Hi, Di, True)
    ends = np.arange(N - T + 1, N + 1).astype(np.int32)
    got = index_scores_reference(q, w, k, ends, qs, ks)
    qd = e4m3_decode(q).astype(np.float64) * qs[..., None]
    kd = e4m3_decode(k).astype(np.float64) * ks[:, None]
    want = index_scores_reference(qd, w, kd, ends)
    assert_scores_close(got, want, 1e-6, "fp8 vs dequantised")


def test_reference_rejects_bad_ranges():
    rng = np.random.default_rng(3)
    q, w, k, _, _ = random_inputs(rng, 2, 5, 4, 8, False)
    with pytest.raises(ValueError, match="past N"):
        index_scores_reference(q, w, k, np.array([3, 6], np.int32))
    with pytest.raises(ValueError, match=r"ends of shape \(3,\), expected \(2,\)"):
        index_scores_reference(q, w, k, np.array([3, 4, 5], np.int32))
    with pytest.raises(ValueError, match=r"starts of shape \(1,\)"):
        index_scores_reference(q, w, k, np.array([3, 4], np.int32), starts=np.array([0], np.int32))


def test_reference_batches_do_not_change_results():
    """Rows computed alone equal rows computed together (float64 accumulation)."""
    rng = np.random.default_rng(4)
    T, N, Hi, Di = 9, 50, 4, 16
    q, w, k, qs, ks = random_inputs(rng, T, N, Hi, Di, True)
    starts, ends = random_ranges(rng, T, N)
    full = index_scores_reference(q, w, k, ends, qs, ks, starts)
    for t in (0, 4, 8):
        one = index_scores_reference(q[t:t + 1], w[t:t + 1], k, ends[t:t + 1], qs[t:t + 1], ks, starts[t:t + 1])
        assert np.array_equal(one[0], full[t])


def naive_block_scores(q, w, k, ends, B, qs=None, ks=None):
    """HISA's J[t, b] one entry at a time: the DSA formula on block keys b < ceil(ends[t] / B), -inf beyond, then
    block 0 and block (ends[t] - 1) // B (when ends[t] >= 1 and it exists) +inf, whatever the row sees."""
    T, nb = q.shape[0], k.shape[0]
    block_ends = np.array([min(-(-int(e) // B), nb) for e in ends])
    J = naive(q, w, k, np.zeros(T, int), block_ends, qs, ks)
    for t in range(T):
        J[t, 0] = np.inf
        if ends[t] >= 1 and (ends[t] - 1) // B < nb:
            J[t, (ends[t] - 1) // B] = np.inf
    return J


@pytest.mark.parametrize("fp8", [False, True])
def test_block_scores_reference_matches_naive_loop(fp8):
    """Ends inside, at the end of and past the last of 6 blocks of B = 5; a query that sees nothing (ends 0)
    still gets block 0 forced, as force_blocks does."""
    rng = np.random.default_rng(5)
    T, nb, Hi, Di, B = 8, 6, 4, 8, 5
    q, w, k, qs, ks = random_inputs(rng, T, nb, Hi, Di, fp8)
    ends = np.array([1, 5, 6, 12, 30, 0, 29, 11], np.int32)
    got = hisa_block_scores(q, w, k, ends, B, qs, ks)  # the dispatcher: the reference for numpy arrays
    qv, kv = (e4m3_decode(q), e4m3_decode(k)) if fp8 else (q, k)
    want = naive_block_scores(qv.astype(np.float64), w, kv.astype(np.float64), ends, B, qs, ks)
    assert got.dtype == np.float32 and got.shape == (T, nb)
    assert np.array_equal(np.isposinf(got), np.isposinf(want)), np.argwhere(np.isposinf(got) != np.isposinf(want))
    fin = ~np.isposinf(want)
    assert_scores_close(np.where(fin, got, -np.inf), np.where(fin, want, -np.inf), 1e-6, "block scores vs naive")
    assert np.isposinf(got[5, 0]) and np.isneginf(got[5, 1:]).all()  # ends 0: only the forced block 0


def test_block_scores_reference_first_n_rows():
    """n blocks of a larger pooled cache (spare capacity, as PooledKeys allocates it) = the cache cut to n."""
    rng = np.random.default_rng(6)
    q, w, k, qs, ks = random_inputs(rng, 4, 20, 4, 16, True)
    ends = np.array([3, 40, 41, 56], np.int32)  # B = 8: 7 blocks
    a = hisa_block_scores_reference(q, w, k, ends, 8, qs, ks, n=7)
    b = hisa_block_scores_reference(q, w, k[:7], ends, 8, qs, ks[:7])
    assert a.shape == (4, 7) and np.array_equal(a, b)


# --- CPU: launch plans and the kernel source ------------------------------------------------------

@pytest.mark.parametrize("wgmma", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_plans_fit_shared_memory(fp8, wgmma):
    for Hi in HEADS:
        for Di in HEAD_DIMS:
            for T, N in [(1, 70000), (3, 10), (300, 5000), (131072, 131072)]:
                name, grid, block, smem = plan(T, N, Hi, Di, fp8, wgmma)
                assert smem <= 227 * 1024, (name, Hi, Di, smem)
                assert grid[0] >= 1 and 1 <= grid[1] <= 65535 and grid[0] * 1 < 2**31
                assert ("wgmma" in name) == wgmma and ("fp8" in name) == fp8


def test_plan_key_splits():
    """The key axis is cut to fill an H100/H200 (132 SMs, 2 CTAs an SM) in whole waves when query blocks are few,
    but a CTA keeps at least as many key bytes as q bytes to stream (8 tiles for the fp8 wgmma prefill blocks, 2
    for decode)."""
    splits = lambda T, N, wgmma=True: plan(T, N, 64, 128, True, wgmma, num_sms=132)[1][1]  # noqa: E731
    assert splits(1024, 1024) == 2            # HISA block stage at 128K: 256 CTAs of 8 tiles (was 5 splits)
    assert splits(1024, 256) == 1             # at 32K: 4 tiles a query block, not worth re-reading q for
    assert splits(1024, 32768) == splits(1024, 131072) == 8  # DSA, 1024 queries: 1024 CTAs, 3.9 waves of 264
    assert key_splits(128, 512, 65536, 8192, 132) == 8       # 5 would leave 2.4 waves, 3 1.5 waves
    assert key_splits(128, 512, 65536, 8192, 132, ctas_per_sm=1) == 8  # 1024 CTAs, 7.8 waves of 132
    assert splits(131072, 131072) == 1 and splits(8192, 32768) == 1  # prefill: query blocks are enough
    assert splits(1, 131072) == 512 and splits(1, 1024) == 4       # decode: 2 tiles of 128 keys a CTA
    assert splits(1024, 1024, wgmma=False) == 4  # mma.sync: 32 KB of q, 4 tiles a CTA at least; 4 whole waves
    # key_splits tries only the most splits of each wave count; an exhaustive search agrees
    for qblocks in (1, 3, 50, 128, 300, 527):
        for tiles in (1, 7, 100, 1024, 2048, 4999):
            for q_bytes, tile_bytes, ctas in ((65536, 8192, 2), (8192, 16384, 2), (32768, 8192, 1), (8192, 8192, 4)):
                want = 4 * 132
                most = max(1, min(2 * -(-want // qblocks), tiles // max(2, -(-q_bytes // tile_bytes))))
                cost = {}
                for s_ in range(1, most + 1):
                    per = -(-tiles // s_)
                    n = -(-tiles // per)
                    cost.setdefault(-(-qblocks * n // (ctas * 132)) * per, set()).add(n)
                best = max(cost[min(cost)]) if qblocks < want else 1
                assert key_splits(qblocks, tiles, q_bytes, tile_bytes, 132, ctas) == best, (qblocks, tiles, ctas)
    for T, N in [(1024, 1000), (300, 5000), (5, 70000), (1024, 8192)]:
        name, (qblocks, s), _, _ = plan(T, N, 64, 128, True, True, num_sms=132)
        tiles = -(-N // 64)
        assert s == 1 or -(-tiles // s) >= 8, (T, N, s)  # every CTA of a split streams >= 8 tiles
        assert -(-tiles // -(-tiles // s)) == s, (T, N, s)  # no CTA without a key tile


def test_plan_rejects_unsupported_dims():
    with pytest.raises(ValueError, match="Hi = 12"):
        plan(4, 100, 12, 128, True, False)
    with pytest.raises(ValueError, match="Di = 96"):
        plan(4, 100, 64, 96, True, False)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_90a"])
def test_kernel_compiles_without_spills(arch, tmp_path):
    for Hi, Di in [(64, 128), (4, 64)]:
        build_without_spills("indexer.cu", arch, tmp_path, (f"HI={Hi}", f"DI={Di}"))


# --- GPU: the kernels against the reference --------------------------------------------------------

RTOL = {("fp8", "mma"): 1e-3,    # exact products, fp32 sums in another order
        ("fp8", "wgmma"): 2e-3,  # Hopper's fp8 wgmma accumulates with fewer than fp32's bits
        ("bf16", "mma"): 1e-2, ("bf16", "wgmma"): 1e-2}


def gpu_paths():
    if not HAVE_GPU:
        return ["mma", "wgmma"]
    import cupy as cp
    return ["mma", "wgmma"] if cp.cuda.Device().compute_capability == "90" else ["mma"]


def run_case(rng, T, N, Hi, Di, mode, path, starts, ends, bits=False):
    import cupy as cp
    from kernels.indexer import index_scores_gpu
    fp8 = mode == "fp8"
    q, w, k, qs, ks = random_inputs(rng, T, N, Hi, Di, fp8)
    if fp8:
        ref = index_scores_reference(q, w, k, ends, qs, ks, starts)
        args = [cp.asarray(q), cp.asarray(w), cp.asarray(k), cp.asarray(ends), cp.asarray(qs), cp.asarray(ks)]
    else:
        qb, kb = q.astype(ml_dtypes.bfloat16), k.astype(ml_dtypes.bfloat16)  # round to nearest even
        ref = index_scores_reference(qb, w, kb, ends, starts=starts)
        qg, kg = (qb.view(np.uint16), kb.view(np.uint16)) if bits else (q, k)  # bits, or fp32 rounded by the launcher
        args = [cp.asarray(qg), cp.asarray(w), cp.asarray(kg), cp.asarray(ends), None, None]
    out = cp.full((T, N), np.nan, np.float32)  # poison: every element must be written
    got = index_scores_gpu(*args, starts=None if starts is None else cp.asarray(starts), out=out, path=path)
    assert_scores_close(cp.asnumpy(got), ref, RTOL[mode, path], f"{mode}/{path} T={T} N={N} Hi={Hi} Di={Di}")


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("mode", ["fp8", "bf16"])
def test_kernel_released_dims_causal_prefill(mode, path):
    rng = np.random.default_rng(10)
    T, N = 300, 5000
    ends = np.arange(N - T + 1, N + 1).astype(np.int32)  # a prefill chunk at the end of the cache
    run_case(rng, T, N, 64, 128, mode, path, None, ends)


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("mode", ["fp8", "bf16"])
def test_kernel_released_dims_decode(mode, path):
    rng = np.random.default_rng(11)
    N = 70000
    run_case(rng, 1, N, 64, 128, mode, path, None, np.array([N], np.int32), bits=True)
    run_case(rng, 1, N, 64, 128, mode, path, np.array([123], np.int32), np.array([N - 77], np.int32))


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("mode", ["fp8", "bf16"])
def test_kernel_ragged_small(mode, path):
    rng = np.random.default_rng(12)
    sizes = [(1, 1), (1, 333), (2, 65), (5, 64), (7, 129), (16, 200), (17, 1), (33, 257), (37, 333)]
    for T, N in sizes:
        starts, ends = random_ranges(rng, T, N)
        run_case(rng, T, N, 4, 64, mode, path, starts, ends, bits=(T % 2 == 1))


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("mode", ["fp8", "bf16"])
def test_kernel_other_head_counts(mode, path):
    rng = np.random.default_rng(13)
    for Hi, Di, T, N in [(8, 128, 23, 300), (16, 64, 9, 1000), (32, 128, 70, 513), (64, 64, 5, 77)]:
        starts, ends = random_ranges(rng, T, N)
        run_case(rng, T, N, Hi, Di, mode, path, starts, ends)


@gpu
def test_dispatcher_and_range_check():
    import cupy as cp
    from kernels.indexer import index_scores, index_scores_gpu
    rng = np.random.default_rng(14)
    q, w, k, qs, ks = random_inputs(rng, 3, 50, 4, 64, True)
    ends = np.array([10, 50, 20], np.int32)
    got = index_scores(cp.asarray(q), cp.asarray(w), cp.asarray(k), cp.asarray(ends), cp.asarray(qs), cp.asarray(ks))
    assert isinstance(got, cp.ndarray)
    assert_scores_close(cp.asnumpy(got), index_scores(q, w, k, ends, qs, ks), 2e-3, "dispatcher")
    # the launcher's range check (one device sync; the model's dispatcher skips it: it builds ends itself)
    with pytest.raises(ValueError, match="ends must be <= N"):
        index_scores_gpu(cp.asarray(q), cp.asarray(w), cp.asarray(k), cp.asarray(np.array([10, 51, 20], np.int32)),
                         cp.asarray(qs), cp.asarray(ks), check_ranges=True)


# --- GPU: HISA's block scores in one launch --------------------------------------------------------

def run_block_case(rng, T, nb, Hi, Di, B, mode, path, ends, capacity=None, splits=None):
    """hisa_block_scores_gpu on the first nb rows of a pooled cache of `capacity` rows against the reference:
    +inf exactly where the reference forces, the rest as index_scores (every element written: NaN poison)."""
    import cupy as cp
    from kernels.indexer import hisa_block_scores_gpu
    fp8 = mode == "fp8"
    capacity = capacity or nb
    q, w, k, qs, ks = random_inputs(rng, T, capacity, Hi, Di, fp8)
    if not fp8:
        q, k = (x.astype(ml_dtypes.bfloat16).view(np.uint16) for x in (q, k))
    ref = hisa_block_scores_reference(q, w, k, ends, B, qs, ks, n=nb)
    dev = [cp.asarray(a) for a in (q, w, k, ends)] + [None if qs is None else cp.asarray(a) for a in (qs, ks)]
    out = cp.full((T, nb), np.nan, np.float32)
    got = cp.asnumpy(hisa_block_scores_gpu(dev[0], dev[1], dev[2], dev[3], B, dev[4], dev[5], n=nb, out=out,
                                           path=path, splits=splits))
    what = f"{mode}/{path} T={T} nb={nb} (of {capacity}) Hi={Hi} Di={Di} B={B} splits={splits}"
    forced = np.isposinf(ref)
    bad = np.argwhere(np.isposinf(got) != forced)
    assert not len(bad), f"{what}: +inf pattern differs at (t, b) {bad[:5].tolist()}"
    assert_scores_close(np.where(forced, -np.inf, got), np.where(forced, -np.inf, ref), RTOL[mode, path], what)


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("mode", ["fp8", "bf16"])
def test_block_scores_kernel_released_dims(mode, path):
    """Hi = 64, Di = 128, B = 128 at 128K: 256 queries at the end of the context (prefill kernels, the key
    axis split), one decode query (decode kernels, 4 splits), ends not multiples of B, spare cache rows."""
    rng = np.random.default_rng(20)
    L, B = 131072 - 77, 128
    nb = -(-L // B)
    run_block_case(rng, 256, nb, 64, 128, B, mode, path, np.arange(L - 255, L + 1).astype(np.int32), capacity=nb + 3)
    run_block_case(rng, 1, nb, 64, 128, B, mode, path, np.array([L], np.int32), capacity=1024 + 5)
    run_block_case(rng, 1, 1024, 64, 128, B, mode, path, np.array([131072], np.int32))


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("mode", ["fp8", "bf16"])
def test_block_scores_kernel_ragged_small(mode, path):
    """Ragged shapes with B = 1 (plain scores plus forcing), odd B, one query, ends 0 and 1, ends at a block's
    end, and forced key splits (each CTA writes only its slice: the forced columns must land in the right one)."""
    rng = np.random.default_rng(21)
    for T, nb, B, splits in [(1, 1, 128, None), (1, 3, 7, 3), (5, 9, 16, None), (37, 300, 5, 3), (2, 257, 3, 4),
                             (17, 129, 1, None), (64, 200, 128, 2)]:
        ends = rng.integers(0, nb * B + 1, T).astype(np.int32)
        ends[0] = nb * B
        if T > 2:
            ends[1], ends[2] = 0, 1
        if T > 4:
            ends[3], ends[4] = B, B + 1  # the last position of block 0, the first of block 1
        run_block_case(rng, T, nb, 4, 64, B, mode, path, ends, capacity=nb + T % 3, splits=splits)


@gpu
def test_block_scores_dispatcher_and_hisa():
    """hisa.block_scores (one launch on the GPU) against its CPU path, and the launcher's argument checks."""
    import cupy as cp
    import hisa
    from kernels.indexer import hisa_block_scores_gpu
    rng = np.random.default_rng(22)
    L, B, T = 1000, 16, 9
    q, w, k, qs, ks = random_inputs(rng, T, L, 8, 64, True)
    ends = np.linspace(1, L, T).astype(np.int32)
    got = {}
    for xp in (np, cp):
        cache = {"k": xp.asarray(k), "k_scale": xp.asarray(ks)}
        pooled = hisa.PooledKeys(cache, B)
        pooled.update(0, L)
        J = hisa.block_scores(xp.asarray(q), xp.asarray(qs), xp.asarray(w), pooled, xp.asarray(ends))
        got[xp.__name__] = J.get() if xp is cp else J
    a, b = got["numpy"], got["cupy"]
    assert np.array_equal(np.isinf(a), np.isinf(b)) and np.array_equal(a[np.isinf(a)], b[np.isinf(b)])
    fin = np.isfinite(a)
    assert np.abs(a[fin] - b[fin]).max() <= 2e-3 * np.abs(a[fin]).max()
    args = [cp.asarray(x) for x in (q, w, k[:70], ends, qs, ks[:70])]
    with pytest.raises(ValueError, match="ends must be <= N"):
        hisa_block_scores_gpu(*args[:4], B, *args[4:], n=60)  # ends reach 1000 > 60 blocks of 16
    with pytest.raises(ValueError, match="N = 71"):
        hisa_block_scores_gpu(*args[:4], B, *args[4:], n=71, check_ranges=False)  # more blocks than rows
    with pytest.raises(ValueError, match="block size"):
        hisa_block_scores_gpu(*args[:4], 0, *args[4:])
    with pytest.raises(ValueError, match="ends: dtype int64"):
        hisa_block_scores_gpu(*args[:3], args[3].astype(np.int64), B, *args[4:])
