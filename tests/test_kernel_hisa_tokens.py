"""HISA token stage: the reference against naive loops, slot -> position mapping, and hisa_tokens.cu parity."""
import numpy as np
import pytest

from kernels._cuda import HAVE_GPU
from kernels.fp8 import E4M3_TABLE, e4m3_encode, quantize_ue8m0
from kernels.hisa_tokens import hisa_token_scores, indexer_scores_f64, slots_to_positions

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


# --- GPU parity ----------------------------------------------------------------------------------------

def gpu_case(rng, T, Hi, Di, B, m, cap, mode, n_pad=0, ends=None):
    import cupy as cp
    q, w, keys, qs, ks = make_inputs(rng, T, Hi, Di, cap, mode)
    blocks = random_blocks(rng, T, m, cap // B, n_pad)
    if ends is None:
        ends = rng.integers(1, cap + 1, T).astype(np.int32)
    want = hisa_token_scores(q, w, keys, blocks, B, ends, qs, ks)
    g = lambda a: None if a is None else cp.asarray(a)
    got = hisa_token_scores(g(q), g(w), g(keys), g(blocks), B, g(ends), g(qs), g(ks)).get()
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} slots never written"
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg="-inf patterns differ")
    assert np.all(got[np.isinf(got)] < 0)
    fin = np.isfinite(want)
    if fin.any():
        rowmax = np.array([np.abs(want[i][fin[i]]).max() if fin[i].any() else 1.0 for i in range(T)])
        err = np.zeros(want.shape)
        err[fin] = np.abs(got[fin].astype(np.float64) - want[fin])
        err /= np.maximum(rowmax[:, None], 1e-30)
        assert err.max() <= 1e-3, report(got, want, f"{mode} scores")


@gpu
@pytest.mark.parametrize("mode", ["fp8", "bf16"])
@pytest.mark.parametrize("T", [1, 5])
def test_gpu_released_dims(mode, T):
    rng = np.random.default_rng(12)
    # Hi=64, Di=128, B=128, m=64: 8192 candidates a query out of 128 blocks; padding and ragged ends
    cap = 128 * 128
    ends = np.array([cap, cap - 77, 9000, 130, 1][:T], np.int32)
    gpu_case(rng, T, 64, 128, 128, 64, cap, mode, n_pad=3, ends=ends)


@gpu
@pytest.mark.parametrize("mode,Hi,Di,B,m,cap,T", [
    ("fp8", 4, 64, 16, 3, 100, 1),     # small model shape, decode
    ("fp8", 8, 64, 7, 5, 90, 6),       # B not a multiple of 8: tiles straddle blocks
    ("fp8", 16, 128, 32, 9, 500, 3),
    ("fp8", 32, 128, 20, 13, 400, 2),  # two head tiles
    ("fp8", 48, 64, 128, 2, 300, 2),   # padded head tile
    ("bf16", 4, 64, 16, 3, 100, 1),
    ("bf16", 32, 128, 9, 11, 200, 4),
])
def test_gpu_ragged_small(mode, Hi, Di, B, m, cap, T):
    rng = np.random.default_rng(13)
    gpu_case(rng, T, Hi, Di, B, m, cap, mode, n_pad=1)
