"""HISA token stage: the references against naive loops (CPU), launch plans and ptxas budgets (CPU, nvcc),
and hisa_tokens.cu's kernels against the references (GPU)."""
import numpy as np
import pytest

from kernel_build import build_without_spills, needs_nvcc
from kernels._cuda import HAVE_GPU
from kernels.fp8 import E4M3_TABLE, e4m3_encode, quantize_ue8m0
from kernels import hisa_tokens as ht
from kernels.hisa_tokens import force_blocks, hisa_token_scores, indexer_scores_f64, slots_to_positions

gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU visible: hisa_tokens kernel parity runs on the GPU machine")


def make_inputs(rng, T, Hi, Di, cap, mode):
    """q, w, keys (+ scales) as the indexer produces them: fp8 bits with ue8m0 scales, bf16 bits, or float32."""
    q = rng.standard_normal((T, Hi, Di)).astype(np.float32)
    k = rng.standard_normal((cap, Di)).astype(np.float32)
    w = (rng.standard_normal((T, Hi)) * Hi**-0.5).astype(np.float32)
    if mode == "fp8":
        q8, qs = quantize_ue8m0(q, block=Di)
        k8, ks = quantize_ue8m0(k, block=Di)
        return e4m3_encode(q8), w, e4m3_encode(k8), qs[..., 0].astype(np.float32), ks[:, 0].astype(np.float32)
    if mode == "bf16":
        to_bf16 = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)
        return to_bf16(q), w, to_bf16(k), None, None
    return q, w, k, None, None


def values(x, scale):
    if scale is not None:
        return E4M3_TABLE[x].astype(np.float64) * scale[..., None]
    if x.dtype == np.uint16:
        return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


def naive_scores(q, w, keys, blocks, B, ends, qs, ks):
    T, Hi, _ = q.shape
    m = blocks.shape[1]
    out = np.full((T, m * B), -np.inf, np.float32)
    for t in range(T):
        qt = values(q[t], None if qs is None else qs[t])
        for j in range(m * B):
            b = blocks[t, j // B]
            p = b * B + j % B
            if b < 0 or p >= ends[t]:
                continue
            kp = values(keys[p], None if ks is None else ks[p])
            out[t, j] = sum(w[t, h] * max(float(qt[h] @ kp), 0.0) for h in range(Hi))
    return out


def random_blocks(rng, T, m, n_blocks, n_pad):
    """Kept block ids per query, ascending, the last n_pad entries -1."""
    blocks = np.full((T, m), -1, np.int32)
    for t in range(T):
        keep = min(m - n_pad, n_blocks)
        blocks[t, :keep] = np.sort(rng.choice(n_blocks, keep, replace=False))
    return blocks


def report(got, want, what):
    fin = np.isfinite(want) & np.isfinite(got)
    diff = np.zeros(want.shape)
    diff[fin] = np.abs(got[fin].astype(np.float64) - want[fin])
    scale = np.array([np.abs(want[i][fin[i]]).max() if fin[i].any() else 1.0 for i in range(len(want))])
    rel = diff / np.maximum(scale[:, None], 1e-30)
    where = np.unravel_index(np.argmax(rel), rel.shape)
    return f"{what}: max-abs {diff.max():.3g}, max-rel (to row max) {rel.max():.3g} at {where}"


@pytest.mark.parametrize("mode", ["fp8", "bf16", "f32"])
def test_reference_matches_naive_loop(mode):
    rng = np.random.default_rng(10)
    T, Hi, Di, B, m, cap = 4, 3, 32, 5, 3, 40  # ragged B, odd Hi
    q, w, keys, qs, ks = make_inputs(rng, T, Hi, Di, cap, mode)
    blocks = random_blocks(rng, T, m, cap // B, n_pad=1)
    blocks[2] = -1  # a query with no kept block at all
    ends = np.array([40, 17, 3, 23], np.int32)  # 17, 23: inside a block
    got = hisa_token_scores(q, w, keys, blocks, B, ends, qs, ks)
    want = naive_scores(q, w, keys, blocks, B, ends, qs, ks)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=report(got, want, "scores"))
    assert np.all(got[2] == -np.inf)


def test_all_blocks_kept_equals_flat_dsa():
    """Keeping every block, the candidates' scores are exactly the flat DSA row (same float64 formula)."""
    rng = np.random.default_rng(11)
    T, Hi, Di, B, cap = 3, 4, 64, 8, 45
    q, w, keys, qs, ks = make_inputs(rng, T, Hi, Di, cap, "fp8")
    nb = -(-cap // B)
    blocks = np.tile(np.arange(nb, dtype=np.int32), (T, 1))
    ends = np.array([45, 30, 1], np.int32)
    got = hisa_token_scores(q, w, keys, blocks, B, ends, qs, ks)
    for t in range(T):
        flat = indexer_scores_f64(values(q[t], qs[t]), w[t].astype(np.float64), values(keys[:ends[t]], ks[:ends[t]]))
        np.testing.assert_array_equal(got[t, : ends[t]], flat.astype(np.float32))
        assert np.all(got[t, ends[t]:] == -np.inf)


@pytest.mark.parametrize("mode", ["fp8", "bf16"])
def test_all_blocks_kept_equals_dsa_reference(mode):
    """The same, against the flat DSA indexer's own reference (kernels/indexer.py): HISA must return DSA's set."""
    indexer = pytest.importorskip("kernels.indexer")
    rng = np.random.default_rng(14)
    T, Hi, Di, B, cap = 4, 8, 64, 16, 100
    q, w, keys, qs, ks = make_inputs(rng, T, Hi, Di, cap, mode)
    blocks = np.tile(np.arange(-(-cap // B), dtype=np.int32), (T, 1))
    ends = np.array([100, 57, 16, 1], np.int32)
    got = hisa_token_scores(q, w, keys, blocks, B, ends, qs, ks)
    flat = indexer.index_scores_reference(q, w, keys, ends, qs, ks)
    np.testing.assert_array_equal(got[:, :cap], flat)


def test_slots_to_positions():
    B = 4
    blocks = np.array([[0, 5, 9, -1], [2, 3, -1, -1]], np.int32)
    slots = np.array([[0, 5, 11, 13, -1], [7, 1, 8, -1, 3]], np.int32)
    want = np.array([[0, 21, 39, -1, -1], [15, 9, -1, -1, 11]], np.int32)
    np.testing.assert_array_equal(slots_to_positions(slots, blocks, B), want)
    ends = np.array([30, 12], np.int32)  # positions >= ends become -1
    want_e = np.array([[0, 21, -1, -1, -1], [-1, 9, -1, -1, 11]], np.int32)
    np.testing.assert_array_equal(slots_to_positions(slots, blocks, B, ends), want_e)


def test_empty_sizes():
    q = np.zeros((0, 4, 32), np.float32)
    out = hisa_token_scores(q, np.zeros((0, 4), np.float32), np.zeros((8, 32), np.float32),
                            np.zeros((0, 2), np.int32), 4, np.zeros(0, np.int32))
    assert out.shape == (0, 8)


def naive_force(J, ends, B):
    J = J.copy()
    for t in range(J.shape[0]):
        J[t, 0] = np.inf
        own = (int(ends[t]) - 1) // B
        if ends[t] >= 1 and own < J.shape[1]:
            J[t, own] = np.inf
    return J


def test_force_blocks():
    rng = np.random.default_rng(15)
    B, nb = 16, 9
    ends = np.array([1, 16, 17, 144, 143, 0, 200, 40], np.int32)  # block edges; 0: no own block; 200: past J
    J = rng.standard_normal((len(ends), nb)).astype(np.float32)
    got = J.copy()
    assert force_blocks(got, ends, B) is got  # in place
    np.testing.assert_array_equal(got, naive_force(J, ends, B))
    assert force_blocks(np.zeros((3, 0), np.float32), ends[:3], B).shape == (3, 0)


# --- CPU: launch plans and ptxas budgets --------------------------------------------------------------

@pytest.mark.parametrize("fp8,Di", [(True, 128), (True, 64), (True, 256), (False, 128), (False, 64), (False, 32)])
def test_wgmma_plans(fp8, Di):
    for T, m, B in [(1, 64, 128), (7, 64, 128), (1024, 64, 128), (3, 5, 7), (2, 13, 20), (1, 40000, 128)]:
        name, grid, block, smem, per_cta = ht.plan(T, 64, Di, fp8, m, B, True)
        assert name == "hisa_token_scores_wgmma" and block == (256,)
        assert 2 * (smem + 1024) <= 228 * 1024, f"{smem} B: two CTAs must fit an SM"
        assert per_cta % ht.TILE == 0 and per_cta <= ht.TILE * ht.MAX_TILES
        assert grid[0] == T and 1 <= grid[1] <= 65535
        assert grid[1] * per_cta >= m * B > (grid[1] - 1) * per_cta, "every slot covered, no empty CTA"
    # released dims: decode spreads one query over 64 CTAs of one tile, 1024 queries take 2 CTAs each
    assert ht.plan(1, 64, 128, True, 64, 128, True)[1] == (1, 64)
    assert ht.plan(1024, 64, 128, True, 64, 128, True)[1] == (1024, 2)


def test_mma_plans():
    for T, m, B in [(1, 64, 128), (1024, 64, 128), (3, 5, 7)]:
        name, grid, block, smem, per_cta = ht.plan(T, 64, 128, True, m, B, False)
        assert name == "hisa_token_scores" and block == (128,) and smem == 0
        assert per_cta % ht.NT == 0 and grid[1] * per_cta >= m * B > (grid[1] - 1) * per_cta


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_90a"])
@pytest.mark.parametrize("fp8,Di,Hi", [(True, 128, 64), (True, 64, 4), (True, 256, 8), (False, 128, 64),
                                       (False, 64, 32), (False, 32, 16), (True, 96, 16)])
def test_kernels_compile_without_spills(arch, fp8, Di, Hi, tmp_path):
    """Every -D set the launcher can ask for builds with no warning and no spill (registers within the
    launch bounds: 2 CTAs of 256 threads for wgmma, 5 of 128 for mma.sync)."""
    build_without_spills("hisa_tokens.cu", arch, tmp_path, ht.defines(fp8, Di, Hi))


# --- GPU: the kernels against the references ------------------------------------------------------------

# A score is a sum of signed terms w[h] * ReLU(q[h] . k[p]) that can cancel: a row whose only visible slot
# scores 0.0085 out of terms whose magnitudes add up to 25.6 (test_gpu_released_dims[7-fp8], query 4 with
# ends = 1) asks 1e-5 of a row-max-relative precision. So each finite score must be within
#     max(RTOL * (row's largest |score|), MTOL * mag[t, j]),   mag[t, j] = sum_h |w qs|[h] * sum_i |q[h, i] k[p, i]| ks[p],
# mag bounding the rounding of any summation order (every partial sum of a dot is <= sum_i |q k|, ReLU is
# 1-Lipschitz). Hopper's fp8 wgmma keeps about 13 bits when it accumulates (emulated: error <= 2.3e-5 * mag
# at 12 bits, 1e-5 at 13; 2.2e-6 observed at that slot); fp32 accumulation of exact products stays within
# (Di + Hi) * 2^-24 * mag = 1.1e-5 * mag. A real bug (wrong key row, stale data, wrong k scale) is off by about
# |score| itself, typically 1e-2 * mag.
RTOL = {("fp8", "mma"): 1e-3,    # exact products, fp32 sums in another order
        ("fp8", "wgmma"): 2e-3,  # Hopper's fp8 wgmma accumulates with fewer than fp32's bits
        ("bf16", "mma"): 1e-3, ("bf16", "wgmma"): 1e-3}
MTOL = {("fp8", "mma"): 2e-5, ("fp8", "wgmma"): 1e-4, ("bf16", "mma"): 2e-5, ("bf16", "wgmma"): 2e-5}
for _mode in ("fp8", "bf16"):  # the block-major kernel runs the same MMAs (and sums) as the wgmma one
    RTOL[_mode, "blocks"], MTOL[_mode, "blocks"] = RTOL[_mode, "wgmma"], MTOL[_mode, "wgmma"]


def gpu_paths():
    if not HAVE_GPU:
        return ["mma", "wgmma", "blocks"]
    import cupy as cp
    return ["mma", "wgmma", "blocks"] if cp.cuda.Device().compute_capability == "90" else ["mma"]


def slot_visibility(blocks, B, ends):
    m = blocks.shape[1]
    j = np.arange(m * B)
    blk = blocks[:, j // B].astype(np.int64)
    pos = blk * B + j % B
    return (blk >= 0) & (pos < ends[:, None]), pos


def score_magnitudes(q, w, keys, blocks, B, ends, qs, ks):
    """mag[t, j] = sum_h |w[t,h]| * sum_i |q[t,h,i] k[p,i]| (scales included) at the visible slots, 0 elsewhere:
    the size of the terms a score adds up, whatever their signs (the rounding scale of any summation order)."""
    visible, pos = slot_visibility(blocks, B, ends)
    mag = np.zeros(visible.shape)
    for t in range(q.shape[0]):
        sel = np.nonzero(visible[t])[0]
        if sel.size == 0:
            continue
        p = pos[t, sel]
        u = np.abs(w[t]).astype(np.float64) @ np.abs(values(q[t], None if qs is None else qs[t]))  # (Di,)
        mag[t, sel] = np.abs(values(keys[p], None if ks is None else ks[p])) @ u
    return mag


def check_scores(got, want, mag, visible, mode, path, what):
    """got (kernel) against want (reference) at rows given in full: nothing left unwritten (NaN poison), -inf
    exactly at the invisible slots, every finite score within max(RTOL * row max, MTOL * mag)."""
    assert not np.isnan(got).any(), f"{what}: {np.isnan(got).sum()} slots never written, e.g. {np.argwhere(np.isnan(got))[:5].tolist()}"
    bad = np.isfinite(got) != visible
    assert not bad.any(), f"{what}: -inf pattern differs at (t, j) {np.argwhere(bad)[:5].tolist()}"
    assert np.all(got[~visible] == -np.inf)
    fin = np.isfinite(want)
    if not fin.any():
        return
    rowmax = np.array([np.abs(want[i][fin[i]]).max() if fin[i].any() else 1.0 for i in range(len(want))])
    err = np.zeros(want.shape)
    err[fin] = np.abs(got[fin].astype(np.float64) - want[fin])
    tol = np.maximum(RTOL[mode, path] * rowmax[:, None], MTOL[mode, path] * mag)
    if (err <= tol).all():
        return
    t, j = np.unravel_index(np.argmax(err / np.maximum(tol, 1e-300)), err.shape)
    raise AssertionError(f"{what}: {(err > tol).sum()} scores off, worst at (t, j) = ({t}, {j}): got {got[t, j]!r}, "
                         f"want {want[t, j]!r}, err {err[t, j]:.3g} = {err[t, j] / rowmax[t]:.3g} of the row max "
                         f"{rowmax[t]:.3g}, {err[t, j] / max(mag[t, j], 1e-300):.3g} of mag {mag[t, j]:.3g}")


def gpu_case(rng, T, Hi, Di, B, m, cap, mode, path, n_pad=0, ends=None, rows=None, splits=None):
    """One kernel call into a NaN-poisoned out: -inf exactly at the invisible slots of every row, the scores
    of `rows` (default all) within check_scores' tolerance of the reference."""
    import cupy as cp
    q, w, keys, qs, ks = make_inputs(rng, T, Hi, Di, cap, mode)
    blocks = random_blocks(rng, T, m, cap // B, n_pad)
    if ends is None:
        ends = rng.integers(1, cap + 1, T).astype(np.int32)
    g = lambda a: None if a is None else cp.asarray(a)
    out = cp.full((T, m * B), np.nan, np.float32)  # poison: every element must be written
    got = ht.hisa_token_scores_gpu(g(q), g(w), g(keys), g(blocks), B, g(ends), g(qs), g(ks), out=out, path=path,
                                   splits=splits).get()
    what = f"{mode}/{path} T={T} Hi={Hi} Di={Di} B={B} m={m} splits={splits}"
    visible, _ = slot_visibility(blocks, B, ends)
    assert not np.isnan(got).any(), f"{what}: {np.isnan(got).sum()} slots never written, e.g. {np.argwhere(np.isnan(got))[:5].tolist()}"
    bad = np.isfinite(got) != visible
    assert not bad.any(), f"{what}: -inf pattern differs at (t, j) {np.argwhere(bad)[:5].tolist()}"
    rows = np.arange(T) if rows is None else np.asarray(rows)
    sub = lambda a: None if a is None else a[rows]
    args = (q[rows], w[rows], keys, blocks[rows], B, ends[rows], sub(qs), ks)
    check_scores(got[rows], hisa_token_scores(*args), score_magnitudes(*args), visible[rows], mode, path, what)


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("mode", ["fp8", "bf16"])
@pytest.mark.parametrize("T", [1, 5, 7])
def test_gpu_released_dims(mode, T, path):
    rng = np.random.default_rng(12)
    # Hi=64, Di=128, B=128, m=64: 8192 candidates a query out of 128 blocks; padding and ragged ends
    # (128: exactly block 0; 129: one slot of the next block; 1: a single visible slot)
    cap = 128 * 128
    ends = np.array([cap, cap - 77, 9000, 130, 1, 128, 129][:T], np.int32)
    gpu_case(rng, T, 64, 128, 128, 64, cap, mode, path, n_pad=3, ends=ends)


def test_tolerance_covers_cancellation():
    """The released-dims T=7 case (seed 12) on the CPU. Query 4 (ends = 1) keeps block 0, so its row holds one
    visible score, 0.0085, made of terms adding up to 25.6 in magnitude (mag 462): 0.121 of it off (what
    Hopper's fp8 accumulation gave there) must pass. Such a score is below what fp8 resolves at all; at an
    ordinary slot (query 3) a wrong key scale (x2) or a 1% error must fail."""
    rng = np.random.default_rng(12)
    T, cap = 7, 128 * 128
    ends = np.array([cap, cap - 77, 9000, 130, 1, 128, 129], np.int32)
    q, w, keys, qs, ks = make_inputs(rng, T, 64, 128, cap, "fp8")
    blocks = random_blocks(rng, T, 64, cap // 128, 3)
    args = (q[3:5], w[3:5], keys, blocks[3:5], 128, ends[3:5], qs[3:5], ks)
    want = hisa_token_scores(*args)
    mag = score_magnitudes(*args)
    visible, _ = slot_visibility(blocks[3:5], 128, ends[3:5])
    assert visible[1].sum() == 1 and visible[1, 0] and abs(want[1, 0]) < 1e-4 * mag[1, 0]
    got = want.copy()
    got[1, 0] *= 1.121
    check_scores(got, want, mag, visible, "fp8", "wgmma", "fp8 accumulation error")
    j = int(np.argmax(np.abs(np.where(visible[0], want[0], 0))))
    for f in (2.0, 1.01):
        bad = got.copy()
        bad[0, j] *= f
        with pytest.raises(AssertionError, match="scores off"):
            check_scores(bad, want, mag, visible, "fp8", "wgmma", "a wrong score")


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("mode", ["fp8", "bf16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gpu_released_dims_stress(seed, mode, path):
    """Released dims (Hi=64, Di=128, B=128, m=64) for every T in 1..16, each with the default plan (one tile a
    CTA here) and with 1, 3 and 7 CTAs a query (64, 22 and 10 tiles a CTA: the cp.async ring wraps, live and
    dead tiles mixed), each call twice: the two outputs must be bit-identical (the kernels have no atomics,
    so a difference is a race) and match the reference. Ragged ends (1, 128, 129, 130, ...) and queries that
    keep block 0, so rows with a single visible slot occur."""
    import cupy as cp
    rng = np.random.default_rng(1000 + seed)
    Tmax, Hi, Di, B, m, cap = 16, 64, 128, 128, 64, 128 * 128
    q, w, keys, qs, ks = make_inputs(rng, Tmax, Hi, Di, cap, mode)
    blocks = random_blocks(rng, Tmax, m, cap // B, n_pad=3)
    ends = np.array([1, 128, 129, 130, cap, cap - 77, 9000, 2, 127, 256, 257, 1, 5000, 128 * 40 + 1, cap - 1, 64],
                    np.int32)
    ends[5 + seed] = 1
    for t in range(Tmax):  # block 0 kept by every third query and by those whose rows see at most 2 slots
        if t % 3 == 0 or ends[t] <= 2:
            kept = np.union1d(blocks[t][blocks[t] >= 0], [0]).astype(np.int32)  # ascending, <= 62 ids
            blocks[t] = -1
            blocks[t, :kept.size] = kept
    args = (q, w, keys, blocks, B, ends, qs, ks)
    want, mag = hisa_token_scores(*args), score_magnitudes(*args)
    visible, _ = slot_visibility(blocks, B, ends)
    g = lambda a: None if a is None else cp.asarray(a)
    dq, dw, dk, dqs, dks, db, de = (g(a) for a in (q, w, keys, qs, ks, blocks, ends))
    for T in range(1, Tmax + 1):
        for splits in (None, 1, 3, 7):
            outs = []
            for poison in (np.nan, 1.5):  # the second run also starts from another poison
                out = cp.full((T, m * B), poison, np.float32)
                ht.hisa_token_scores_gpu(dq[:T], dw[:T], dk, db[:T], B, de[:T], None if dqs is None else dqs[:T], dks,
                                         out=out, path=path, splits=splits)
                outs.append(out.get())
            what = f"{mode}/{path} seed={seed} T={T} splits={splits}"
            check_scores(outs[0], want[:T], mag[:T], visible[:T], mode, path, what)
            diff = outs[0].view(np.uint32) != outs[1].view(np.uint32)
            assert not diff.any(), f"{what}: two runs differ at (t, j) {np.argwhere(diff)[:5].tolist()} (a race)"


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("mode", ["fp8", "bf16"])
def test_gpu_released_dims_1024_queries(mode, path):
    """The benchmark's setting: the last 1024 queries of a context, 64 kept blocks each (rows sampled)."""
    rng = np.random.default_rng(16)
    T, cap = 1024, 256 * 128
    ends = np.arange(cap - T + 1, cap + 1, dtype=np.int32)
    rows = np.concatenate([[0, 1, T - 1], rng.choice(np.arange(2, T - 1), 29, replace=False)])
    gpu_case(rng, T, 64, 128, 128, 64, cap, mode, path, ends=ends, rows=rows)


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("mode,Hi,Di,B,m,cap,T", [
    ("fp8", 4, 64, 16, 3, 100, 1),     # small model shape, decode
    ("fp8", 8, 64, 7, 5, 90, 6),       # B not a multiple of 8: tiles straddle blocks
    ("fp8", 16, 128, 32, 9, 500, 3),
    ("fp8", 32, 128, 20, 13, 400, 2),  # two head tiles
    ("fp8", 48, 64, 128, 2, 300, 2),   # padded head tile
    ("fp8", 8, 256, 16, 4, 200, 2),    # 256-byte fp8 rows
    ("fp8", 64, 128, 96, 7, 960, 4),   # B = 96: 128-slot tiles straddle blocks
    ("fp8", 64, 128, 1, 300, 400, 3),  # B = 1: a tile spans 128 blocks
    ("fp8", 64, 128, 128, 20, 5120, 300),  # several tiles a CTA, live and dead ones mixed
    ("bf16", 4, 64, 16, 3, 100, 1),
    ("bf16", 32, 128, 9, 11, 200, 4),
    ("bf16", 16, 32, 8, 20, 400, 5),   # 64-byte bf16 rows (64-byte swizzle)
    ("bf16", 64, 128, 128, 8, 2048, 3),  # 256-byte bf16 rows
])
def test_gpu_ragged_small(mode, Hi, Di, B, m, cap, T, path):
    if path == "blocks" and B != ht.BLOCK_B:
        pytest.skip(f"the block-major kernel serves B = {ht.BLOCK_B} only (here {B})")
    rng = np.random.default_rng(13)
    gpu_case(rng, T, Hi, Di, B, m, cap, mode, path, n_pad=1)


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("splits", [1, 3, 64])
def test_gpu_splits(splits, path):
    """A query's slots over 1 CTA (64 tiles: two rounds of warp 0's live list), 3 uneven CTAs, or 64."""
    rng = np.random.default_rng(18)
    cap = 160 * 128
    ends = np.array([cap, 5000, 128 * 70 + 3], np.int32)
    gpu_case(rng, 3, 64, 128, 128, 64, cap, "fp8", path, n_pad=5, ends=ends, splits=splits)


@gpu
def test_gpu_dispatcher_and_checks():
    import cupy as cp
    rng = np.random.default_rng(19)
    T, Hi, Di, B, m, cap = 3, 64, 128, 128, 4, 1024
    q, w, keys, qs, ks = make_inputs(rng, T, Hi, Di, cap, "fp8")
    blocks = random_blocks(rng, T, m, cap // B, 1)
    ends = np.array([1024, 300, 1], np.int32)
    want = hisa_token_scores(q, w, keys, blocks, B, ends, qs, ks)
    got = hisa_token_scores(*(cp.asarray(a) for a in (q, w, keys, blocks)), B, cp.asarray(ends), cp.asarray(qs),
                            cp.asarray(ks)).get()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=0, atol=2e-3 * np.abs(want[np.isfinite(want)]).max())
    empty = hisa_token_scores(cp.asarray(q[:0]), cp.asarray(w[:0]), cp.asarray(keys), cp.asarray(blocks[:0]), B,
                              cp.asarray(ends[:0]), cp.asarray(qs[:0]), cp.asarray(ks))
    assert empty.shape == (0, m * B)
    with pytest.raises(ValueError, match="blocks"):
        hisa_token_scores(cp.asarray(q), cp.asarray(w), cp.asarray(keys), cp.asarray(blocks.astype(np.int64)), B,
                          cp.asarray(ends), cp.asarray(qs), cp.asarray(ks))
    with pytest.raises(ValueError, match="q_scale"):
        hisa_token_scores(cp.asarray(q), cp.asarray(w), cp.asarray(keys), cp.asarray(blocks), B, cp.asarray(ends))


@gpu
def test_gpu_slots_to_positions():
    import cupy as cp
    rng = np.random.default_rng(17)
    for T, m, B, K, nb in [(37, 9, 16, 50, 40), (1024, 64, 128, 2048, 1024), (2, 3, 7, 5, 4)]:
        blocks = random_blocks(rng, T, m, nb, n_pad=2)
        slots = rng.integers(-1, m * B, (T, K)).astype(np.int32)
        slots[:, -3:] = -1  # top-k padding
        ends = rng.integers(1, nb * B + 1, T).astype(np.int32)
        for e in (None, ends):
            want = slots_to_positions(slots, blocks, B, e)
            got = slots_to_positions(cp.asarray(slots), cp.asarray(blocks), B, None if e is None else cp.asarray(e))
            assert got.dtype == np.int32 and got.shape == (T, K)
            np.testing.assert_array_equal(got.get(), want, err_msg=f"T={T} m={m} B={B} ends={e is not None}")


@gpu
def test_gpu_force_blocks():
    import cupy as cp
    rng = np.random.default_rng(20)
    for T, nb, B in [(8, 9, 16), (1024, 1024, 128), (1, 1, 5)]:
        ends = rng.integers(1, nb * B + 1, T).astype(np.int32)
        ends[0] = 1
        if T > 2:
            ends[1], ends[2] = B, B + 1  # last slot of block 0, first of block 1
        J = rng.standard_normal((T, nb)).astype(np.float32)
        want = force_blocks(J.copy(), ends, B)
        Jg = cp.asarray(J)
        assert force_blocks(Jg, cp.asarray(ends), B) is Jg
        np.testing.assert_array_equal(Jg.get(), want)


@gpu
@pytest.mark.parametrize("mode", ["fp8", "bf16"])
def test_gpu_blocks_equals_wgmma_bitwise(mode):
    """The block-major kernel multiplies the same key rows by the same q rows and sums heads in the same order
    on the same lanes as the query-major wgmma kernel: the two outputs must be the same bits. Ragged ends, padding
    blocks, blocks past the end, queries sharing blocks (block 0 in every row) and an odd query count."""
    import cupy as cp
    if "blocks" not in gpu_paths():
        pytest.skip("the block-major kernel needs an sm_90 GPU")
    rng = np.random.default_rng(21)
    T, Hi, Di, B, m, cap = 301, 64, 128, 128, 16, 64 * 128
    q, w, keys, qs, ks = make_inputs(rng, T, Hi, Di, cap, mode)
    blocks = random_blocks(rng, T, m, cap // B, n_pad=2)
    blocks[:, 0] = 0
    blocks = np.sort(np.where(blocks < 0, 10**6, blocks), axis=1)
    blocks[blocks == 10**6] = -1
    ends = rng.integers(1, cap + 1, T).astype(np.int32)
    ends[:4] = [1, 128, 129, cap]
    args = [cp.asarray(a) if a is not None else None for a in (q, w, keys, blocks)]
    tail = (cp.asarray(ends), None if qs is None else cp.asarray(qs), None if ks is None else cp.asarray(ks))
    got = {p: ht.hisa_token_scores_gpu(*args, B, *tail, out=cp.full((T, m * B), np.nan, np.float32), path=p).get()
           for p in ("blocks", "wgmma")}
    diff = got["blocks"].view(np.uint32) != got["wgmma"].view(np.uint32)
    assert not diff.any(), f"{mode}: blocks and wgmma differ at (t, j) {np.argwhere(diff)[:5].tolist()}"


@gpu
def test_gpu_bucket_invariants():
    """The bucketing alone (hisa_bucket_count, hisa_bucket_scatter): pairs is a permutation of 0 .. T*m-1
    grouped by bucket; the items cover every pair once, each within one bucket and at most BLOCK_QCH long; the
    dead item holds exactly the invisible pairs."""
    import cupy as cp
    if "blocks" not in gpu_paths():
        pytest.skip("the block-major kernel needs an sm_90 GPU")
    rng = np.random.default_rng(22)
    for T, m, cap in [(1, 4, 1000), (37, 64, 256 * 128), (1024, 64, 1024 * 128), (300, 64, 20000 * 128)]:
        nbk = -(-cap // 128)
        blocks = random_blocks(rng, T, m, nbk, n_pad=3)
        ends = rng.integers(-1, cap + 1, T).astype(np.int32)
        launch = ht._blocks_launch(cp.cuda.Device().id, T, 64, 128, True, m, 128, cap, "blocks")
        n_max = launch.n_max
        items, pairs, n_items = ht.bucket_pairs(launch, cp.asarray(blocks), cp.asarray(ends), T, m, 128, cap)
        n = int(n_items.get()[0])
        items, pairs = items.get()[:n], pairs.get()
        assert 1 <= n <= n_max and np.array_equal(np.sort(pairs), np.arange(T * m))
        b = blocks.reshape(-1)
        t = np.arange(T * m) // m
        dead = (b < 0) | (b >= nbk) | (b.astype(np.int64) * 128 >= np.minimum(ends[t], cap))
        covered = np.zeros(T * m, np.int64)
        for blk, start, count, _ in items:
            assert 1 <= count <= ht.BLOCK_QCH
            e = pairs[start:start + count]
            covered[e] += 1
            if blk < 0:
                assert dead[e].all()
            else:
                assert (~dead[e]).all() and (b[e] == blk).all()
        assert (covered == 1).all()


@gpu
def test_gpu_blocks_path_refuses_what_it_cannot_run():
    import cupy as cp
    rng = np.random.default_rng(23)
    q, w, keys, qs, ks = make_inputs(rng, 2, 64, 128, 640, "fp8")
    blocks = cp.asarray(random_blocks(rng, 2, 4, 10, 0))
    with pytest.raises(ValueError, match="B = 128"):
        ht.hisa_token_scores_gpu(cp.asarray(q), cp.asarray(w), cp.asarray(keys), blocks, 64,
                                 cp.asarray(np.array([640, 5], np.int32)), cp.asarray(qs), cp.asarray(ks), path="blocks")
