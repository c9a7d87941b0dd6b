"""HISA's fused decode select (kernels/hisa_decode.cu): its plan and ptxas budget (CPU, nvcc), and every stage
of the kernel against the references on the GPU: the block scores and candidate scores within the fp8
tolerance of kernels/hisa_tokens' tests, and the kept blocks and the selected positions exactly what the
reference top-m / top-K give on the kernel's own scores (so rounding cannot flip a near-tie between the two)."""
import numpy as np
import pytest

import hisa
from kernels._cuda import HAVE_GPU
from kernels import hisa_decode as hd
from kernels.fp8 import e4m3_encode, quantize_ue8m0
from kernels.hisa_tokens import hisa_token_scores_reference, slots_to_positions_reference
from kernels.indexer import hisa_block_scores_reference
from kernels.topk import topk_reference
from kernel_build import build_without_spills, needs_nvcc
from test_kernel_hisa_tokens import check_scores, score_magnitudes, slot_visibility

gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU visible: hisa_decode kernel parity runs on the GPU machine")


def make_case(rng, T, Hi, Di, B, cap, n=None):
    """fp8 q (ue8m0 scales a head), head weights, a key cache of cap rows and its block means (hisa.PooledKeys,
    numpy), pooled over the first n * B positions (default all)."""
    q8, qs = quantize_ue8m0(rng.standard_normal((T, Hi, Di)).astype(np.float32), block=Di)
    k = rng.standard_normal((cap, Di)).astype(np.float32)
    k += 0.8 * np.repeat(rng.standard_normal((cap // B + 1, Di)), B, axis=0)[:cap]  # a block-level signal
    k8, ks = quantize_ue8m0(k, block=Di)
    w = (rng.standard_normal((T, Hi)) * Hi**-0.5).astype(np.float32)
    cache = {"k": e4m3_encode(k8), "k_scale": ks[:, 0].astype(np.float32)}
    pooled = hisa.PooledKeys(cache, B)
    L = cap if n is None else min(cap, n * B)
    pooled.update(0, L)
    return e4m3_encode(q8), qs[..., 0].astype(np.float32), w, cache, pooled


# --- CPU -------------------------------------------------------------------------------------------------

def test_reference_is_hisa_select():
    """select_reference composes the same four references hisa.select runs on numpy arrays."""
    rng = np.random.default_rng(0)
    q, qs, w, cache, pooled = make_case(rng, 5, 8, 64, 16, 700)
    ends = np.int32([1, 16, 17, 300, 700])
    n = -(-pooled.length // pooled.B)
    got = hd.select_reference(q, qs, w, pooled.k, pooled.k_scale, n, cache["k"], cache["k_scale"], ends, 16, 6, 40)[0]
    assert np.array_equal(got, hisa.select(q, qs, w, cache, pooled, ends, 40, 6))
    assert ((got >= 0).sum(axis=1) == np.minimum(40, ends)).all()


def test_plan():
    """Released dims (m = 64, Di = 128): 17 KB of shared memory, one CTA a kept block for a lone query; with
    more queries every CTA of the grid still fits the SMs at once."""
    assert hd.smem_bytes(64, 128) == 8192 + 256 + 8512 + 4 * 64
    assert hd.ctas_per_query(1, 64, 132) == 64
    for T in range(1, 133):
        G = hd.ctas_per_query(T, 64, 132)
        assert 1 <= G <= 64 and T * G <= 132
    assert hd.ctas_per_query(3, 5, 132) == 5


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
@pytest.mark.parametrize("Di", [32, 64, 96, 128])
def test_kernel_compiles_without_spills(arch, Di, tmp_path):
    """Every HD_DI the launcher can ask for builds with no warning and no spill within one CTA of 512 threads."""
    build_without_spills("hisa_decode.cu", arch, tmp_path, (f"HD_DI={Di}",))


# --- GPU -------------------------------------------------------------------------------------------------

def run_stages(q, qs, w, cache, pooled, ends, m, K, G=None):
    """The kernel with its scratch poisoned (NaN scores, -7 ids): every element must be written."""
    import cupy as cp
    g = cp.asarray
    T = len(ends)
    n = -(-pooled.length // pooled.B)
    return [a.get() for a in hd.select_gpu(g(q), g(qs), g(w), g(pooled.k), g(pooled.k_scale), n, g(cache["k"]),
                                           g(cache["k_scale"]), g(ends), pooled.B, m, K, G=G, stages=True,
                                           scratch=poisoned(T, n, m, pooled.B, K))]


def poisoned(T, n, m, B, K):
    import cupy as cp
    s = cp.full(T * (n + m + m * B + K), -7, np.int32)
    s[:T * n].view(np.float32)[:] = np.nan
    s[T * (n + m):T * (n + m + m * B)].view(np.float32)[:] = np.nan
    return s


def check_case(q, qs, w, cache, pooled, ends, m, K, what, G=None):
    """Each stage against the reference given the kernel's previous stage; returns the positions."""
    B = pooled.B
    n = -(-pooled.length // B)
    out, J, kept, cand = run_stages(q, qs, w, cache, pooled, ends, m, K, G)
    # A: block scores. Forced blocks +inf, invisible ones -inf, the rest within the fp8 tolerance.
    want_J = hisa_block_scores_reference(q, w, pooled.k, ends, B, qs, pooled.k_scale, n)
    assert not np.isnan(J).any(), f"{what}: block scores not written at {np.argwhere(np.isnan(J))[:5].tolist()}"
    forced = np.isposinf(want_J)
    assert np.array_equal(np.isposinf(J), forced), f"{what}: forced blocks differ"
    ident = np.tile(np.arange(n, dtype=np.int32), (len(ends), 1))
    bends = np.minimum(n, -(-ends.astype(np.int64) // B)).astype(np.int32)
    vis = slot_visibility(ident, 1, bends)[0] & ~forced
    mag = score_magnitudes(q, w, pooled.k[:n], ident, 1, bends, qs, pooled.k_scale[:n])
    check_scores(np.where(forced, -np.inf, J), np.where(forced, -np.inf, want_J), mag, vis, "fp8", "mma",
                 f"{what}: block scores")
    # B: the kept blocks are the reference top-m of the kernel's block scores.
    assert np.array_equal(kept, topk_reference(J, m)), f"{what}: kept blocks"
    # C: the candidates' scores.
    want_c = hisa_token_scores_reference(q, w, cache["k"], kept, B, ends, qs, cache["k_scale"])
    check_scores(cand, want_c, score_magnitudes(q, w, cache["k"], kept, B, ends, qs, cache["k_scale"]),
                 slot_visibility(kept, B, ends)[0], "fp8", "mma", f"{what}: candidate scores")
    # D: the positions are the reference top-K of the kernel's candidates, mapped.
    want = slots_to_positions_reference(topk_reference(cand, K), kept, B, ends)
    assert np.array_equal(out, want), f"{what}: positions differ in rows {np.nonzero((out != want).any(1))[0]}"
    n_vis = slot_visibility(kept, B, ends)[0].sum(axis=1)  # visible candidates: min(end, m*B) or fewer
    assert ((out >= 0).sum(axis=1) == np.minimum(K, n_vis)).all(), f"{what}: a query got too few positions"
    return out


@gpu
@pytest.mark.parametrize("T", [1, 2, 8])
def test_gpu_released_dims(T):
    """Hi=64, Di=128, B=128, m=64, K=2048 over a 128K cache (1024 blocks); ends full, ragged, within m*B
    (every block kept: HISA's set is DSA's), one block and a bit, one position."""
    rng = np.random.default_rng(T)
    cap = 128 * 1024
    q, qs, w, cache, pooled = make_case(rng, T, 64, 128, 128, cap)
    ends = np.int32([cap, cap - 77, 8192, 129, 1, 5000, 100000, 70001][:T])
    check_case(q, qs, w, cache, pooled, ends, 64, 2048, f"released T={T}")


@gpu
@pytest.mark.parametrize("Hi,Di,B,m,K,cap", [
    (8, 64, 16, 8, 64, 3000),      # hisa.select's GPU test sizes
    (5, 32, 7, 6, 50, 1000),       # heads not a multiple of 16, B not of 8, one k step
    (64, 96, 128, 4, 2048, 2000),  # K > m*B: every visible candidate; three k steps
    (16, 128, 64, 40, 300, 640),   # m > blocks (10): padding blocks
    (33, 128, 1, 64, 16, 500),     # B = 1: block scores are token scores
])
def test_gpu_ragged(Hi, Di, B, m, K, cap):
    rng = np.random.default_rng(Hi + Di + B)
    ends = np.int32([1, B, B + 1, cap // 2 + 3, cap])
    q, qs, w, cache, pooled = make_case(rng, len(ends), Hi, Di, B, cap)
    check_case(q, qs, w, cache, pooled, ends, m, K, f"Hi={Hi} Di={Di} B={B} m={m} K={K}")


@gpu
@pytest.mark.parametrize("rows,blocks,outlier", [
    (2000, 300, False),  # each score a few times over: exact ties inside the threshold bin, which is ranked
    (50, 5, False),      # ~160 copies of each candidate, ~200 of each block score: too many to rank, radix rounds
    (None, None, True),  # one key 2^40 times the rest: every other score in the bottom bin, radix rounds
])
def test_gpu_ties_and_outliers(rows, blocks, outlier):
    """Both selections (top-m blocks, top-K candidates) on rows built to take each of select.cuh's paths: exact
    ties go to the lower block and the lower position, as in the reference."""
    rng = np.random.default_rng(11)
    cap, B = 128 * 1024, 128
    q, qs, w, cache, _ = make_case(rng, 2, 64, 128, B, cap)
    pos = np.arange(cap)
    if rows:     # each key row one of `rows` (the candidates' scores repeat)
        pick = rng.integers(0, rows, cap)
        cache = {"k": cache["k"][pick], "k_scale": cache["k_scale"][pick]}
    if blocks:   # block b a copy of block b % blocks (the block means, so the block scores, repeat)
        pick = (pos // B % blocks) * B + pos % B
        cache = {"k": cache["k"][pick], "k_scale": cache["k_scale"][pick]}
    if outlier:
        cache["k_scale"][77777] *= np.float32(2.0**40)
    pooled = hisa.PooledKeys(cache, B)
    pooled.update(0, cap)
    check_case(q, qs, w, cache, pooled, np.int32([cap, cap - 77]), 64, 2048, f"rows={rows} blocks={blocks}")


@gpu
def test_gpu_ctas_and_repeats():
    """Any number of CTAs a query gives the same bits (the scores do not depend on which CTA computes them), and
    launch after launch on one stream, or on another stream, too (the barrier counters are left zero)."""
    import cupy as cp
    rng = np.random.default_rng(7)
    q, qs, w, cache, pooled = make_case(rng, 3, 64, 128, 128, 20000)
    ends = np.int32([20000, 9001, 300])
    first = check_case(q, qs, w, cache, pooled, ends, 64, 2048, "default G")
    for G in (1, 3, 7, 44):
        assert np.array_equal(run_stages(q, qs, w, cache, pooled, ends, 64, 2048, G)[0], first), f"G={G}"
    for _ in range(3):
        assert np.array_equal(run_stages(q, qs, w, cache, pooled, ends, 64, 2048)[0], first)
    with cp.cuda.Stream(non_blocking=True):
        assert np.array_equal(run_stages(q, qs, w, cache, pooled, ends, 64, 2048)[0], first)


@gpu
def test_gpu_hisa_select_takes_the_fused_kernel():
    """hisa.select on the GPU: the fused kernel for a few fp8 queries, the four kernels past MAX_QUERIES."""
    import cupy as cp
    rng = np.random.default_rng(3)
    T = hd.MAX_QUERIES + 1
    q, qs, w, cache, pooled = make_case(rng, T, 64, 128, 128, 30000)
    ends = rng.integers(1, 30001, T).astype(np.int32)
    g = {k: cp.asarray(v) for k, v in cache.items()}
    gp = hisa.PooledKeys(g, 128)
    gp.update(0, 30000)
    few = hisa.select(cp.asarray(q[:2]), cp.asarray(qs[:2]), cp.asarray(w[:2]), g, gp, cp.asarray(ends[:2]), 2048, 64)
    fused = hd.select_gpu(cp.asarray(q[:2]), cp.asarray(qs[:2]), cp.asarray(w[:2]), gp.k, gp.k_scale, -(-gp.length // 128),
                          g["k"], g["k_scale"], cp.asarray(ends[:2]), 128, 64, 2048)
    assert cp.array_equal(few, fused)
    many = hisa.select(cp.asarray(q), cp.asarray(qs), cp.asarray(w), g, gp, cp.asarray(ends), 2048, 64).get()
    assert ((many >= 0).sum(axis=1) == np.minimum(2048, ends)).all()


@gpu
def test_gpu_errors():
    import cupy as cp
    rng = np.random.default_rng(1)
    q, qs, w, cache, pooled = make_case(rng, 1, 64, 128, 128, 1024)
    g = cp.asarray
    args = [g(q), g(qs), g(w), g(pooled.k), g(pooled.k_scale), 8, g(cache["k"]), g(cache["k_scale"]), g(np.int32([5]))]
    with pytest.raises(ValueError, match="q_scale"):
        hd.select_gpu(args[0], g(qs[:, :3]), *args[2:], 128, 64, 2048)
    with pytest.raises(ValueError, match="n = 9 blocks"):
        hd.select_gpu(*args[:5], 9, *args[6:], 128, 64, 2048)
    with pytest.raises(ValueError, match="heads"):
        hd.select_gpu(g(np.zeros((1, 65, 128), np.uint8)), g(np.ones((1, 65), np.float32)),
                      g(np.ones((1, 65), np.float32)), *args[3:], 128, 64, 2048)
    assert hd.why_not(1, 64, 128, False, 8, 64, 128, 2048) == "needs fp8 q and keys (e4m3 with scales)"
