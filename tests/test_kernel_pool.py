"""Block mean pooling (HISA stage 1): the numpy reference against a naive loop, and pool.cu against it."""
import numpy as np
import pytest

from kernels._cuda import HAVE_GPU
from kernels.fp8 import E4M3_TABLE, e4m3_encode, quantize_ue8m0
from kernels.pool import pool_blocks, pool_blocks_reference

gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU visible: pool kernel parity runs on the GPU machine")


def make_keys(rng, cap, Di, fp8):
    """Indexer keys as cached: fp8 bits + one power-of-two scale per key, or float32."""
    k = rng.standard_normal((cap, Di)).astype(np.float32) * rng.uniform(0.1, 3.0, (cap, 1)).astype(np.float32)
    if not fp8:
        return k, None
    k8, s = quantize_ue8m0(k, block=Di)  # Di <= 128: one scale per key
    return e4m3_encode(k8), s[:, 0].astype(np.float32)


def naive_pool(keys, key_scale, S, B):
    """Plain loops: float32 running sum in position order, divide by the count, fp8 re-quantise."""
    Di = keys.shape[1]
    nb = -(-S // B)
    means = np.zeros((nb, Di), np.float32)
    for b in range(nb):
        ps = range(b * B, min((b + 1) * B, S))
        for d in range(Di):
            acc = np.float32(0)
            for p in ps:
                v = E4M3_TABLE[keys[p, d]] * key_scale[p] if key_scale is not None else keys[p, d]
                acc = np.float32(acc + np.float32(v))
            means[b, d] = acc / np.float32(len(ps))
    if key_scale is None:
        return means, None
    scale = np.maximum(np.abs(means).max(axis=1) / np.float32(448), np.float32(1e-10)).astype(np.float32)
    x = np.clip(means / scale[:, None], -448, 448)
    # nearest e4m3 value by brute force over the table (ties: the even code, i.e. the one with bit 0 clear)
    finite = np.nonzero(np.isfinite(E4M3_TABLE))[0]
    bits = np.zeros(x.shape, np.uint8)
    for idx in np.ndindex(x.shape):
        err = np.abs(E4M3_TABLE[finite] - x[idx])
        cands = finite[err == err.min()]
        even = [c for c in cands if c % 2 == 0] or list(cands)
        pick = [c for c in even if np.signbit(E4M3_TABLE[c]) == np.signbit(x[idx])] or even
        bits[idx] = pick[0]
    return bits, scale


def report(got, want, what):
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    where = np.unravel_index(np.argmax(diff), diff.shape) if diff.size else ()
    rel = diff / np.maximum(np.abs(want.astype(np.float64)), 1e-30)
    return f"{what}: max-abs {diff.max() if diff.size else 0:.3g}, max-rel {rel.max() if rel.size else 0:.3g} at {where}"


@pytest.mark.parametrize("fp8", [False, True])
def test_reference_matches_naive_loop_ragged(fp8):
    rng = np.random.default_rng(1)
    cap, Di, B, S = 40, 8, 6, 23  # 4 blocks, the last holding 5 positions
    keys, ks = make_keys(rng, cap, Di, fp8)
    pooled = np.zeros((8, Di), np.uint8 if fp8 else np.float32)
    pscale = np.zeros(8, np.float32) if fp8 else None
    pool_blocks(keys, ks, S, B, 0, pooled, pscale)
    want, want_scale = naive_pool(keys, ks, S, B)
    nb = 4
    if fp8:
        np.testing.assert_array_equal(pscale[:nb], want_scale)
        bad = np.nonzero(pooled[:nb] != want)
        assert bad[0].size == 0, f"fp8 bits differ at {list(zip(*bad))[:5]}: got {pooled[bad][:5]}, want {want[bad][:5]}"
    else:
        np.testing.assert_array_equal(pooled[:nb], want, err_msg=report(pooled[:nb], want, "means"))
    assert not pooled[nb:].any(), "blocks past ceil(S/B) must stay untouched"


@pytest.mark.parametrize("fp8", [False, True])
def test_incremental_equals_full_repool(fp8):
    """Decode: append one key at a time, refreshing from first_block = old_S // B, equals pooling from 0."""
    rng = np.random.default_rng(2)
    cap, Di, B = 64, 16, 8
    keys, ks = make_keys(rng, cap, Di, fp8)
    dt = np.uint8 if fp8 else np.float32
    inc, inc_s = np.zeros((8, Di), dt), (np.zeros(8, np.float32) if fp8 else None)
    S = 13
    pool_blocks(keys, ks, S, B, 0, inc, inc_s)  # prefill
    for new in (1, 1, 1, 5, 1, 9, 1):  # decode steps and a chunk crossing block boundaries
        old, S = S, S + new
        pool_blocks(keys, ks, S, B, old // B, inc, inc_s)
        full, full_s = np.zeros((8, Di), dt), (np.zeros(8, np.float32) if fp8 else None)
        pool_blocks(keys, ks, S, B, 0, full, full_s)
        np.testing.assert_array_equal(inc, full)
        if fp8:
            np.testing.assert_array_equal(inc_s, full_s)


def test_fp8_scale_rule():
    rng = np.random.default_rng(3)
    Di, B = 32, 4
    keys, ks = make_keys(rng, 12, Di, True)
    keys[8:12] = 0  # block 2 is all zeros
    pooled, pscale = np.zeros((3, Di), np.uint8), np.zeros(3, np.float32)
    pool_blocks(keys, ks, 12, B, 0, pooled, pscale)
    means = (E4M3_TABLE[keys] * ks[:, None]).reshape(3, B, Di).mean(axis=1)
    amax = np.abs(means).max(axis=1)
    np.testing.assert_allclose(pscale[:2], amax[:2] / 448, rtol=1e-6)
    assert pscale[2] == np.float32(1e-10) and not pooled[2].any()
    m, e = np.frexp(pscale[:2])
    assert np.all(m != 0.5), "pooled scales are amax/448, not powers of two"
    back = E4M3_TABLE[pooled[:2]] * pscale[:2, None]
    np.testing.assert_allclose(back, means[:2], rtol=2**-4, atol=2**-9 * pscale[:2, None].max())
    assert np.abs(E4M3_TABLE[pooled[:2]]).max() == 448  # the largest |mean| maps to the top of the range


def test_bf16_keys_widen_exactly():
    rng = np.random.default_rng(4)
    k = rng.standard_normal((20, 8)).astype(np.float32)
    bits = (k.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16
    kf = (bits.astype(np.uint32) << 16).view(np.float32)
    a, b = np.zeros((4, 8), np.float32), np.zeros((4, 8), np.float32)
    pool_blocks(bits, None, 20, 6, 0, a)
    pool_blocks(kf, None, 20, 6, 0, b)
    np.testing.assert_array_equal(a, b)


def test_first_block_past_end_is_a_no_op():
    keys = np.ones((8, 4), np.float32)
    pooled = np.full((4, 4), 7.0, np.float32)
    pool_blocks_reference(keys, None, 8, 4, 2, pooled)
    assert (pooled == 7.0).all()


# --- GPU parity ----------------------------------------------------------------------------------------

def check_gpu_against_reference(keys, ks, S, B, first_block, nb_cap, fp8, state=None):
    import cupy as cp
    Di = keys.shape[1]
    dt = np.uint8 if fp8 else np.float32
    want = np.zeros((nb_cap, Di), dt) if state is None else state[0].copy()
    want_s = (np.zeros(nb_cap, np.float32) if state is None else state[1].copy()) if fp8 else None
    pool_blocks(keys, ks, S, B, first_block, want, want_s)
    got = cp.asarray(np.zeros((nb_cap, Di), dt) if state is None else state[0])
    got_s = cp.asarray(np.zeros(nb_cap, np.float32) if state is None else state[1]) if fp8 else None
    nb = -(-S // B)
    if state is None:  # NaN-fill the rows the kernel must write, to catch unwritten elements
        if fp8:
            got[first_block:nb] = 0x7F  # e4m3 NaN
            got_s[first_block:nb] = np.nan
        else:
            got[first_block:nb] = np.nan
    pool_blocks(cp.asarray(keys), None if ks is None else cp.asarray(ks), S, B, first_block, got, got_s)
    got = got.get()
    if fp8:
        got_s = got_s.get()
        np.testing.assert_allclose(got_s, want_s, rtol=1e-6, err_msg=report(got_s, want_s, "pooled_scale"))
        g, w = E4M3_TABLE[got], E4M3_TABLE[want]
        ulp = np.where(w == 0, 2.0**-9, np.ldexp(1.0, np.maximum(np.frexp(np.abs(w))[1] - 4, -9)))  # one e4m3 step
        n_diff = int((got != want).sum())
        assert np.all(np.abs(g - w) <= ulp), report(g, w, f"pooled e4m3 values ({n_diff} codes differ)")
        if n_diff:
            print(f"note: {n_diff} pooled codes differ by one e4m3 ulp (expected 0: same add order)")
        return got, got_s
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=report(got, want, "pooled means"))
    return got, None


@gpu
@pytest.mark.parametrize("fp8", [True, False])
def test_gpu_released_dims_prefill_and_decode(fp8):
    rng = np.random.default_rng(5)
    Di, B, cap = 128, 128, 128 * 40
    keys, ks = make_keys(rng, cap, Di, fp8)
    nb_cap = cap // B
    S = 128 * 37 + 5  # ragged last block
    state = check_gpu_against_reference(keys, ks, S, B, 0, nb_cap, fp8)
    for new in (1, 1, 122, 1, 200):  # decode steps, then chunks crossing block boundaries
        old, S = S, S + new
        state = check_gpu_against_reference(keys, ks, S, B, old // B, nb_cap, fp8, state)


@gpu
@pytest.mark.parametrize("fp8,Di,B,S", [(True, 64, 16, 1), (True, 64, 7, 50), (False, 64, 5, 33), (True, 128, 128, 100),
                                        (False, 100, 3, 10)])
def test_gpu_ragged_small(fp8, Di, B, S):
    rng = np.random.default_rng(6)
    keys, ks = make_keys(rng, S + 11, Di, fp8)
    check_gpu_against_reference(keys, ks, S, B, 0, -(-S // B) + 2, fp8)


@gpu
def test_gpu_bf16_keys():
    import cupy as cp
    rng = np.random.default_rng(7)
    k = rng.standard_normal((300, 128)).astype(np.float32)
    bits = (k.view(np.uint32) >> 16).astype(np.uint16)
    want = np.zeros((3, 128), np.float32)
    pool_blocks(bits, None, 300, 128, 0, want)
    got = cp.full((3, 128), np.nan, np.float32)
    pool_blocks(cp.asarray(bits), None, 300, 128, 0, got)
    np.testing.assert_allclose(got.get(), want, rtol=1e-6, err_msg=report(got.get(), want, "bf16 pooled"))
