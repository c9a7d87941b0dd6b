"""Top-k: the numpy reference on hand-made rows; the kernel against it, exactly, on the GPU."""
import re

import numpy as np
import pytest

from kernel_build import build_without_spills, needs_nvcc
from kernels._cuda import HAVE_GPU
from kernels.topk import SAMPLE_G, SHORT_N, candidate_cap, short_smem_bytes, slices_per_row, smem_bytes, topk, \
    topk_reference

gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU visible: top-k kernel parity runs on the GPU machine")
inf, nan = np.inf, np.nan


def ref1(row, k):
    return topk_reference(np.asarray([row], np.float32), k)[0].tolist()


# --- Reference (CPU) ----------------------------------------------------------------------------------

def test_reference_ties_go_to_lower_index():
    assert ref1([1, 3, 3, 2, 3], 2) == [1, 2]
    assert ref1([5, 5, 5, 5], 3) == [0, 1, 2]
    assert ref1([-0.0, 0.0, -1.0], 1) == [0]  # -0.0 == +0.0: a tie, the lower index wins
    assert ref1([0.0, -0.0, -1.0], 1) == [0]


def test_reference_invalid_never_selected_and_padding():
    assert ref1([-inf, nan, 1.0, -inf], 3) == [2, -1, -1]
    assert ref1([nan, nan], 1) == [-1]
    assert ref1([-inf] * 5, 2) == [-1, -1]


def test_reference_inf_and_k_beyond_n():
    assert ref1([0.0, inf, 5.0, inf], 2) == [1, 3]
    assert ref1([inf, inf, inf], 2) == [0, 1]
    assert ref1([2.0, 1.0], 4) == [0, 1, -1, -1]


def test_reference_order_details():
    assert ref1([-1.0, -3.0, -2.0], 2) == [0, 2]
    one = np.float32(1.0)
    assert ref1([one, np.nextafter(one, np.float32(2)), one], 1) == [1]
    assert ref1([3.0, 1.0, 2.0, 4.0], 2) == [0, 3]  # ascending by index, not by value


def test_reference_lengths():
    x = np.float32([[5, 4, 3, 2, 1]] * 5)
    assert topk_reference(x, 2, [0, 1, 3, 5, 9]).tolist() == [[-1, -1], [0, -1], [0, 1], [0, 1], [0, 1]]
    assert topk_reference(np.float32([[1, 2, 9, inf]]), 2, [2]).tolist() == [[0, 1]]  # past the length: unseen
    assert topk_reference(np.float32([[1, 2]]), 1, [-3]).tolist() == [[-1]]  # clamped to 0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 50)).astype(np.float32)
    L = [10, 50, 0, 33]
    got = topk_reference(x, 8, L)
    for r in range(4):  # the same as the reference on the row cut to its length
        want = topk_reference(x[r:r + 1, :L[r]], 8)[0] if L[r] else np.full(8, -1)
        assert got[r].tolist() == want.tolist()


def test_dispatch_numpy():
    x = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32)
    np.testing.assert_array_equal(topk(x, 10), topk_reference(x, 10))
    np.testing.assert_array_equal(topk(x, 10, [0, 7, 100]), topk_reference(x, 10, [0, 7, 100]))


def test_reference_slot_map():
    """topk(..., blocks, B, ends) = slots_to_positions_reference of the top-k: position blocks[slot // B] * B +
    slot % B, -1 for padding, a -1 block, or a position >= ends (reachable only by a finite score there)."""
    x = np.float32([[1, 9, 3, 8, 7, 2, 6, 5],
                    [4, -inf, 9, 8, 1, 2, -inf, -inf]])
    blocks = np.int32([[3, 5, 6, 9], [0, 2, -1, -1]])  # B = 2
    got = topk(x, 4, blocks=blocks, B=2)
    assert got.tolist() == [[7, 11, 12, 18], [0, 4, 5, -1]]  # slots [1, 3, 4, 6] and [0, 2, 3, 5] (block -1)
    assert topk(x, 4, blocks=blocks, B=2, ends=np.int32([12, 5])).tolist() == [[7, 11, -1, -1], [0, 4, -1, -1]]
    assert topk(x, 2, [3, 8], blocks=blocks, B=2).tolist() == [[7, 10], [4, 5]]  # lengths apply to the slots


def test_slot_map_arguments():
    x = np.zeros((2, 12), np.float32)
    with pytest.raises(ValueError, match="dividing N"):
        topk(x, 4, blocks=np.zeros((2, 2), np.int32), B=5)
    with pytest.raises(ValueError, match="dividing N"):
        topk(x, 4, blocks=np.zeros((2, 3), np.int32), B=3)  # 12 slots are 4 blocks of 3
    with pytest.raises(ValueError, match="come with blocks"):
        topk(x, 4, B=3)


def test_reference_arguments():
    """The numpy path names a bad argument (it once failed inside numpy: a negative k, one row as a vector,
    lengths for another number of rows)."""
    x = np.zeros((3, 10), np.float32)
    with pytest.raises(ValueError, match="k = -1"):
        topk(x, -1)
    with pytest.raises(ValueError, match=r"scores of shape \(10,\)"):
        topk(x[0], 2)
    with pytest.raises(ValueError, match="expected 3 integers"):
        topk(x, 2, np.int32([4, 5]))
    with pytest.raises(ValueError, match="dtype float32"):
        topk(x, 2, np.float32([4, 5, 6]))


def test_launch_policy():
    """Few rows are split over CTAs to fill the GPU (two CTAs an SM), many rows take one CTA each; the
    candidate buffer lets two CTAs share an SM (H100/H200 numbers)."""
    assert slices_per_row(1, 131072, 132) == 16
    assert slices_per_row(1, 1 << 20, 132) == 128
    assert slices_per_row(64, 131072, 132) == 4
    assert slices_per_row(1, 8192, 132) == 1 and slices_per_row(1024, 131072, 132) == 1
    cap = candidate_cap(233472, 1024, 232448)
    assert cap % 4 == 0 and cap >= 8192 and 2 * (smem_bytes(cap) + 1024) <= 233472
    assert short_smem_bytes(SHORT_N) <= 48 * 1024  # topk_short needs no shared-memory opt-in
    assert 4 * (short_smem_bytes(SHORT_N) + 1024) <= 233472  # and four CTAs share an SM


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_90a"])
def test_kernel_compiles_without_spills(arch, tmp_path):
    report = build_without_spills("topk.cu", arch, tmp_path)
    assert len(re.findall(r"bytes spill stores", report)) == 2, report  # topk_rows and topk_short both built


# --- Kernel (GPU) against the reference ---------------------------------------------------------------

def rows(rng, kind, R, N):
    """Adversarial and ordinary rows, float32 [R, N]."""
    if kind == "normal":
        return rng.standard_normal((R, N)).astype(np.float32)
    if kind == "uniform":
        return rng.random((R, N), dtype=np.float32)
    if kind == "five_values":
        return rng.choice(np.float32([-1.5, 0.25, 2.0, 3.0, 7.0]), (R, N))
    if kind == "all_equal":
        return np.full((R, N), 0.75, np.float32)
    if kind == "mostly_neginf":
        x = np.full((R, N), -inf, np.float32)
        for r in range(R):
            n_valid = [3, 2047, 2048, 2049, 5000][r % 5]
            pos = rng.choice(N, min(n_valid, N), replace=False)
            x[r, pos] = rng.standard_normal(len(pos))
        return x
    if kind == "nan":
        x = rng.standard_normal((R, N)).astype(np.float32)
        x[rng.random((R, N)) < 0.3] = nan
        x[rng.random((R, N)) < 0.05] = -nan
        return x
    if kind == "negative":
        return -rng.random((R, N), dtype=np.float32) * 100 - 1
    if kind == "posinf":
        x = rng.standard_normal((R, N)).astype(np.float32)
        x[rng.random((R, N)) < 0.02] = inf
        x[rng.random((R, N)) < 0.02] = -inf
        return x
    if kind == "many_posinf":  # more +inf than k: the lowest-index ones win
        x = rng.standard_normal((R, N)).astype(np.float32)
        x[rng.random((R, N)) < 0.5] = inf
        return x
    if kind == "last_bit":  # keys 1.0 .. 1.0 + 63 ulp: everything shares the first two digits
        return (np.uint32(0x3F800000) + rng.integers(0, 64, (R, N)).astype(np.uint32)).view(np.float32)
    if kind == "signed_zero":
        return rng.choice(np.float32([0.0, -0.0, -1.0, 1e-30, -1e-30]), (R, N))
    if kind == "relu":  # indexer-like logits: sum over 8 heads of w_h ReLU(q_h . k), positive and skewed
        w = np.abs(rng.standard_normal(8)).astype(np.float32)
        return sum(w[h] * np.maximum(rng.standard_normal((R, N)).astype(np.float32), 0) for h in range(8))
    if kind == "sample_trap":  # the kernel's strided sample sees only the boosted groups: T0 comes out too high
        x = rng.standard_normal((R, N)).astype(np.float32)
        groups = -(-N // 4)
        q = (np.arange(SAMPLE_G) * groups // SAMPLE_G) * 4
        for j in range(4):
            x[:, np.minimum(q + j, N - 1)] += 10
        return x
    raise ValueError(kind)


def assert_same(got, want, label):
    if np.array_equal(got, want):
        return
    r = int(np.nonzero((got != want).any(axis=1))[0][0])
    c = int(np.nonzero(got[r] != want[r])[0][0])
    bad_rows = int((got != want).any(axis=1).sum())
    gs, ws = set(got[r].tolist()), set(want[r].tolist())
    pytest.fail(f"{label}: {bad_rows} of {got.shape[0]} rows differ; first row {r}, column {c}: "
                f"got {got[r, max(0, c - 3):c + 4].tolist()} want {want[r, max(0, c - 3):c + 4].tolist()}; "
                f"missing {sorted(ws - gs)[:10]} extra {sorted(gs - ws)[:10]}")


def run_kernel(x, k, lengths=None, **kw):
    import cupy as cp
    from kernels.topk import topk_gpu
    return cp.asnumpy(topk_gpu(cp.asarray(x), k, lengths, **kw))


# How a row reaches its answer: the launch's own choice, one CTA a row, seven CTAs a row; a candidate
# buffer of 0 or 64 forces the exact (re-reading) path in either mode.
PATHS = {"auto": {}, "row": dict(slices=1), "split": dict(slices=7), "row_exact": dict(slices=1, cand_cap=0),
         "split_exact": dict(slices=7, cand_cap=64)}
KINDS = ["five_values", "all_equal", "mostly_neginf", "nan", "negative", "posinf", "many_posinf", "last_bit",
         "signed_zero", "relu", "sample_trap"]


@gpu
@pytest.mark.parametrize("R,N,k", [(64, 131072, 2048), (3, 262144, 2048), (1, 300000, 2048),
                                   (2, 1 << 20, 2048), (16, 8192, 2048), (32, 1024, 64)])
def test_kernel_random(R, N, k):
    rng = np.random.default_rng(N + R)
    for kind in ("normal", "uniform", "relu"):
        x = rows(rng, kind, R, N)
        want = topk_reference(x, k)
        for slices in (None, 1):
            assert_same(run_kernel(x, k, slices=slices), want, f"{kind} R={R} N={N} k={k} slices={slices}")


@gpu
def test_kernel_ragged_small():
    rng = np.random.default_rng(1)
    for N in [1, 2, 3, 4, 5, 7, 63, 64, 65, 1000, 2047, 2048, 2049, 4095, 4097, 5000] + \
             rng.integers(1, 5001, 12).tolist():
        for k in (1, 7, 64, 2048):
            x = rows(rng, "normal", 4, N)
            assert_same(run_kernel(x, k), topk_reference(x, k), f"ragged N={N} k={k}")


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("N", [777, 5000, 131072, 262144])
def test_kernel_adversarial(kind, N):
    rng = np.random.default_rng(N)
    x = rows(rng, kind, 5, N)
    for k in (1, 64, 2048):
        want = topk_reference(x, k)
        for path, kw in PATHS.items():
            assert_same(run_kernel(x, k, **kw), want, f"{kind} N={N} k={k} path={path}")


@gpu
@pytest.mark.parametrize("path", list(PATHS))
def test_kernel_lengths(path):
    """Lengths 0, 1, < k, = k, > cap, = N (and beyond N, clamped); columns past a length hold +inf, which
    must not be selected."""
    import cupy as cp
    rng = np.random.default_rng(11)
    N = 20000
    L = np.int32([0, 1, 5, 2047, 2048, 2049, 4096, 9999, 12377, 19999, N, N + 5])
    for kind in ("normal", "five_values", "mostly_neginf", "nan", "relu"):
        x = rows(rng, kind, len(L), N)
        x[np.arange(N)[None, :] >= L[:, None]] = inf
        for k in (1, 64, 2048):
            want = topk_reference(x, k, L)
            assert_same(run_kernel(x, k, L, **PATHS[path]), want, f"{kind} k={k} path={path}")
        assert_same(run_kernel(x, 64, cp.asarray(L, np.int64), **PATHS[path]), topk_reference(x, 64, L),
                    f"{kind} int64 lengths path={path}")


@gpu
@pytest.mark.parametrize("R,N", [(1, 8192), (2, 8192), (3, 131072), (1, 300000), (2, 300000), (1, 1 << 20)])
def test_kernel_split_rows(R, N):
    """Decode-like shapes: few long rows split over several CTAs, against one CTA a row, with and
    without lengths."""
    rng = np.random.default_rng(R * N)
    for kind in ("normal", "uniform", "relu", "five_values", "nan", "mostly_neginf", "sample_trap"):
        x = rows(rng, kind, R, N)
        L = rng.integers(0, N + 1, R).astype(np.int32)
        for k in (64, 2048):
            want = topk_reference(x, k)
            for slices in (None, 1, 5):
                assert_same(run_kernel(x, k, slices=slices), want, f"{kind} R={R} N={N} k={k} slices={slices}")
            assert_same(run_kernel(x, k, L), topk_reference(x, k, L), f"{kind} R={R} N={N} k={k} L={L}")


@gpu
def test_kernel_split_buffers_reused():
    """The split path's counters are left zero by each launch: calls of varying R, and another stream."""
    import cupy as cp
    rng = np.random.default_rng(12)
    for R in (3, 1, 5, 2):
        x = rows(rng, "normal", R, 50000)
        assert_same(run_kernel(x, 2048, slices=4), topk_reference(x, 2048), f"R={R}")
    with cp.cuda.Stream():
        x = rows(rng, "relu", 2, 50000)
        assert_same(run_kernel(x, 2048, slices=4), topk_reference(x, 2048), "side stream")


@gpu
@pytest.mark.parametrize("cap", [0, 4, 64, 1024, 4096])
@pytest.mark.parametrize("kind", ["normal", "five_values", "last_bit", "mostly_neginf"])
def test_kernel_small_candidate_buffer(kind, cap):
    """A small buffer forces the exact path's global re-scan rounds and its final ordered pass."""
    rng = np.random.default_rng(cap)
    x = rows(rng, kind, 4, 50000)
    for k in (1, 100, 2048):
        for slices in (1, 3):
            assert_same(run_kernel(x, k, cand_cap=cap, slices=slices), topk_reference(x, k),
                        f"{kind} cap={cap} k={k} slices={slices}")


@gpu
def test_kernel_unaligned_rows_and_dispatch():
    import cupy as cp
    rng = np.random.default_rng(5)
    for N in (4096, 4099, 40000):  # row starts 4 bytes off a 16-byte boundary: the scalar-load path
        x = rows(rng, "normal", 3, N)
        buf = cp.empty(3 * N + 1, np.float32)
        xd = buf[1:].reshape(3, N)
        xd[...] = cp.asarray(x)
        assert_same(cp.asnumpy(topk(xd, 2048)), topk_reference(x, 2048), f"unaligned N={N}")
        L = np.int32([N - 1, N // 2, 3])
        assert_same(cp.asnumpy(topk(xd, 2048, L)), topk_reference(x, 2048, L), f"unaligned N={N} lengths")


# --- The short-row kernel (topk_short) ---------------------------------------------------------------

SHORT_KINDS = ["normal", "five_values", "all_equal", "mostly_neginf", "nan", "many_posinf", "last_bit",
               "signed_zero", "relu"]


@gpu
@pytest.mark.parametrize("N", [1, 7, 64, 255, 1024, 4096, SHORT_N])
def test_short_kernel(N):
    """Widths from 1 to SHORT_N, k from 1 to beyond the width, ties (few distinct values: the lower column
    wins), -inf and NaN, +inf, lengths shorter than the width (0, 1, half; beyond N is clamped)."""
    rng = np.random.default_rng(N)
    L = np.int32([N, 0, 1, N // 2, max(N - 3, 0), N + 5])
    for kind in SHORT_KINDS:
        x = rows(rng, kind, len(L), N)
        for k in sorted({1, 8, 64, 256, min(N, 2048), min(N + 3, 2048)}):
            assert_same(run_kernel(x, k, path="short"), topk_reference(x, k), f"{kind} N={N} k={k}")
            assert_same(run_kernel(x, k, L, path="short"), topk_reference(x, k, L), f"{kind} N={N} k={k} lengths")


@gpu
@pytest.mark.parametrize("R,N,k", [(1024, 1024, 64), (1, 1024, 64), (1024, 8192, 2048), (1, 8192, 2048),
                                   (1024, 4096, 256)])
def test_short_kernel_many_rows(R, N, k):
    """HISA-like shapes: block scores with the first and own blocks forced to +inf and -inf past each row's
    causal end (as index_scores writes them), and the same rows cut by lengths instead; the auto path."""
    rng = np.random.default_rng(R + N + k)
    x = rows(rng, "relu", R, N)
    ends = np.linspace(N // 2, N, R).astype(np.int32)
    x[np.arange(N)[None, :] >= ends[:, None]] = -inf
    x[:, 0] = inf
    x[np.arange(R), ends - 1] = inf
    want = topk_reference(x, k)
    assert_same(run_kernel(x, k, path="short"), want, f"R={R} N={N} k={k}")
    assert_same(run_kernel(x, k), want, f"R={R} N={N} k={k} auto")
    assert_same(run_kernel(x, k, ends, path="short"), topk_reference(x, k, ends), f"R={R} N={N} k={k} lengths")


@gpu
def test_short_kernel_refuses_wide_rows():
    with pytest.raises(ValueError, match="short-row kernel"):
        run_kernel(np.zeros((1, SHORT_N + 1), np.float32), 8, path="short")


@gpu
def test_kernel_empty_shapes():
    import cupy as cp
    from kernels.topk import topk_gpu
    assert topk_gpu(cp.zeros((0, 10), np.float32), 5).shape == (0, 5)
    assert cp.asnumpy(topk_gpu(cp.zeros((2, 0), np.float32), 3)).tolist() == [[-1] * 3] * 2


# --- The slot map (HISA's token top-k writes positions) ----------------------------------------------

def hisa_candidates(rng, R, m, B, nb, kind="relu", n_pad=3, finite=False):
    """Rows of m*B candidate scores as the token stage writes them: kept blocks ascending (the last n_pad of a
    row -1, fewer than m kept when nb < m), -inf on padding blocks and at positions >= ends; finite: no -inf
    there either (never from the token stage: such slots must come out as -1, and past ends only with ends)."""
    blocks = np.full((R, m), -1, np.int32)
    for r in range(R):
        keep = min(m - n_pad, nb)
        blocks[r, :keep] = np.sort(rng.choice(nb, keep, replace=False))
    ends = rng.integers(1, nb * B + 1, R).astype(np.int32)
    ends[0] = nb * B
    x = rows(rng, kind, R, m * B)
    s = np.arange(m * B)
    blk = blocks[:, s // B]
    pad = blk < 0
    if not finite:
        x[pad | (blk.astype(np.int64) * B + s % B >= ends[:, None])] = -inf
    return x, blocks, ends


@gpu
@pytest.mark.parametrize("path", list(PATHS) + ["short"])
@pytest.mark.parametrize("R,m,B,k", [(1024, 64, 128, 2048), (1, 64, 128, 2048), (3, 5, 7, 16), (2, 3, 16, 2048),
                                     (5, 64, 128, 64), (4, 9, 100, 300)])
def test_kernel_slot_map(R, m, B, k, path):
    """topk_gpu(..., blocks, B, ends) against the reference (topk, then slots_to_positions_reference), exactly:
    the released token top-k (m*B = 8192 slots, k = 2048, one query or 1024), ragged B, rows with fewer valid
    candidates than k and fewer blocks than m, with and without ends, on every kernel path."""
    import cupy as cp
    from kernels.hisa_tokens import slots_to_positions_reference
    from kernels.topk import topk_gpu
    if path == "short" and m * B > SHORT_N:
        pytest.skip("wider than the short-row kernel")
    kw = dict(path="short") if path == "short" else PATHS[path]
    rng = np.random.default_rng(R * m + B + k)
    cases = [(3 * m, "relu", False), (max(1, m // 2), "five_values", False), (2 * m, "normal", True)]
    for nb, kind, finite in cases:
        x, blocks, ends = hisa_candidates(rng, R, m, B, nb, kind, n_pad=min(3, m - 1), finite=finite)
        slots = topk_reference(x, k)
        for e in (None, ends):
            want = slots_to_positions_reference(slots, blocks, B, e)
            got = cp.asnumpy(topk_gpu(cp.asarray(x), k, blocks=cp.asarray(blocks), B=B,
                                      ends=None if e is None else cp.asarray(e), **kw))
            assert_same(got, want, f"slot map R={R} m={m} B={B} k={k} nb={nb} {kind} ends={e is not None}")


@gpu
def test_slot_map_in_hisa_select():
    """hisa.select's four-kernel pipeline on the GPU ends in the fused top-K: exactly the reference top-K and slot
    map applied to the GPU's own block ids and candidate scores (so fp8 rounding cannot flip a near-tie between
    the two)."""
    import cupy as cp
    import hisa
    from kernels.fp8 import e4m3_encode, quantize_ue8m0
    from kernels.hisa_tokens import hisa_token_scores, slots_to_positions_reference
    rng = np.random.default_rng(30)
    L, T, Hi, Di, B, m, K = 3000, 6, 8, 64, 16, 8, 64
    k8, ks = quantize_ue8m0(rng.standard_normal((L, Di)).astype(np.float32))
    q8, qs = quantize_ue8m0(rng.standard_normal((T, Hi, Di)).astype(np.float32))
    q, qs = cp.asarray(e4m3_encode(q8)), cp.asarray(qs[..., 0])
    w = cp.asarray((rng.standard_normal((T, Hi)) * 0.1).astype(np.float32))
    ends = cp.asarray(np.int32([1, 17, 128, 129, 2000, 3000]))
    cache = {"k": cp.asarray(e4m3_encode(k8)), "k_scale": cp.asarray(ks[:, 0])}
    pooled = hisa.PooledKeys(cache, B)
    pooled.update(0, L)
    got = hisa.select(q, qs, w, cache, pooled, ends, K, m, fused=False).get()  # the four-kernel pipeline
    blocks = topk(hisa.block_scores(q, qs, w, pooled, ends), m)
    cand = hisa_token_scores(q, w, cache["k"], blocks, B, ends, q_scale=qs, key_scale=cache["k_scale"])
    want = slots_to_positions_reference(topk_reference(cand.get(), K), blocks.get(), B, ends.get())
    assert_same(got, want, "hisa.select")
    assert ((got >= 0).sum(axis=1) == np.minimum(K, ends.get())).all()
