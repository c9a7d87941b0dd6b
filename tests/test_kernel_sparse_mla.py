"""Sparse MLA (absorbed form): the reference against a dense softmax over the gathered set, and both kernels of
sparse_mla.cu (fp32 on CUDA cores, bf16 on tensor cores) against it."""
import numpy as np
import pytest

from kernels._cuda import HAVE_GPU
from kernels.sparse_mla import round_bf16, sparse_mla

gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU visible: sparse MLA kernel parity runs on the GPU machine")


def make_inputs(rng, T, H, Dc, R, cap):
    q_abs = rng.standard_normal((T, H, Dc)).astype(np.float32)
    q_pe = rng.standard_normal((T, H, R)).astype(np.float32)
    c_kv = rng.standard_normal((cap, Dc)).astype(np.float32)
    k_pe = rng.standard_normal((cap, R)).astype(np.float32)
    return q_abs, q_pe, c_kv, k_pe


def dense_over_set(q_abs, q_pe, c_kv, k_pe, idx, scale):
    """Per query: gather the valid rows, dense softmax attention in the absorbed space, float64."""
    T, H, Dc = q_abs.shape
    out = np.zeros((T, H, Dc), np.float32)
    for t in range(T):
        sel = [int(i) for i in idx[t] if 0 <= i < len(c_kv)]
        if not sel:
            continue
        c, kp = c_kv[sel].astype(np.float64), k_pe[sel].astype(np.float64)
        for h in range(H):
            s = scale * (c @ q_abs[t, h].astype(np.float64) + kp @ q_pe[t, h].astype(np.float64))
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ c
    return out


def report(got, want, what):
    diff = np.abs(got.astype(np.float64) - want)
    where = np.unravel_index(np.argmax(diff), diff.shape)
    rel = diff.max() / max(np.abs(want).max(), 1e-30)
    return f"{what}: max-abs {diff.max():.3g}, max-rel (to max |o|) {rel:.3g} at {where}"


def test_reference_matches_dense_softmax_with_padding():
    rng = np.random.default_rng(20)
    T, H, Dc, R, cap, K = 4, 3, 16, 4, 30, 9
    q_abs, q_pe, c_kv, k_pe = make_inputs(rng, T, H, Dc, R, cap)
    idx = rng.integers(0, cap, (T, K)).astype(np.int32)
    idx[0, ::3] = -1  # padding anywhere in the list
    idx[1, 4:] = -1
    idx[2, 2] = cap + 5  # out of range counts as padding
    idx[3] = -1  # empty set
    scale = 0.3
    got = sparse_mla(q_abs, q_pe, c_kv, k_pe, idx, scale)
    want = dense_over_set(q_abs, q_pe, c_kv, k_pe, idx, scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=report(got, want, "o"))
    assert not got[3].any(), "a query with no valid index gets o = 0"


def test_full_set_is_dense_attention():
    """Selecting every cached row gives plain dense attention over the cache."""
    rng = np.random.default_rng(21)
    T, H, Dc, R, cap = 2, 2, 8, 4, 12
    q_abs, q_pe, c_kv, k_pe = make_inputs(rng, T, H, Dc, R, cap)
    idx = np.tile(np.arange(cap, dtype=np.int32)[::-1], (T, 1))  # order does not matter
    got = sparse_mla(q_abs, q_pe, c_kv, k_pe, idx, 0.5)
    s = 0.5 * (np.einsum("thd,sd->ths", q_abs, c_kv) + np.einsum("thr,sr->ths", q_pe, k_pe))
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ c_kv
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=report(got, want, "o"))


def test_no_index_at_all():
    rng = np.random.default_rng(22)
    q_abs, q_pe, c_kv, k_pe = make_inputs(rng, 2, 2, 8, 4, 5)
    for numerics in ("fp32", "bf16"):
        out = sparse_mla(q_abs, q_pe, c_kv, k_pe, np.zeros((2, 0), np.int32), 1.0, numerics)
        assert out.shape == (2, 2, 8) and not out.any()


def test_bf16_reference_is_fp32_on_rounded_inputs():
    """numerics "bf16" = the fp32 math on q_abs, q_pe, c_kv, k_pe rounded to bf16 (nearest even)."""
    rng = np.random.default_rng(25)
    q_abs, q_pe, c_kv, k_pe = make_inputs(rng, 3, 4, 16, 8, 20)
    idx = rng.integers(-1, 20, (3, 11)).astype(np.int32)
    got = sparse_mla(q_abs, q_pe, c_kv, k_pe, idx, 0.4, "bf16")
    want = dense_over_set(*(round_bf16(a) for a in (q_abs, q_pe, c_kv, k_pe)), idx, 0.4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=report(got, want, "o"))
    assert round_bf16(np.float32([1 + 2 ** -8, 1 + 3 * 2 ** -8, -3.0])).tolist() == [1.0, 1 + 2 ** -6, -3.0]  # ties to even
    with pytest.raises(ValueError, match="numerics"):
        sparse_mla(q_abs, q_pe, c_kv, k_pe, idx, 0.4, "fp16")


# --- GPU parity ----------------------------------------------------------------------------------------

# Tolerance, relative to max |o|, for both kernels against the float64 reference of their numerics. fp32
# kernel: fp32 sums of ~600 products (relative error ~1e-6 each way). bf16 kernel on the same (rounded)
# inputs: every bf16 product is exact in fp32 and the sums are fp32 as above; p enters P V as bf16 hi + lo,
# |p - hi - lo| <= 2^-18 p, so sum p c / sum p moves by <= 2 * 2^-18 max|c| ~ 8e-6 max|c|; max|o| is a
# few times smaller than max|c| here (a softmax average of N(0, 1) rows), so 1e-4 holds with a margin.
# (Rounding P itself to bf16, as FlashMLA does, would move o by up to ~2^-9 ~ 2e-3 of max|c|.)
TOL = {"fp32": 1e-4, "bf16": 1e-4}


def gpu_case(rng, T, H, Dc, R, cap, K, n_pad=0, empty_rows=(), numerics="fp32", n_valid=None):
    """n_valid: per query, keep only this many valid entries (the rest of the K slots become padding)."""
    import cupy as cp
    q_abs, q_pe, c_kv, k_pe = make_inputs(rng, T, H, Dc, R, cap)
    q_abs *= 0.5  # keeps the softmax neither flat nor one-hot at these widths
    idx = np.stack([rng.choice(cap, K, replace=False) if K <= cap else rng.integers(0, cap, K) for _ in range(T)])
    idx = idx.astype(np.int32)
    if n_pad:
        for t in range(T):
            idx[t, rng.choice(K, n_pad, replace=False)] = -1
    if n_valid is not None:
        idx[:, n_valid:] = -1
    for t in empty_rows:
        idx[t] = -1
    scale = (Dc // 4 + R) ** -0.5
    want = sparse_mla(q_abs, q_pe, c_kv, k_pe, idx, scale, numerics)
    g = cp.asarray
    args = (g(q_abs), g(q_pe), g(c_kv), g(k_pe), g(idx), scale, numerics)
    got = sparse_mla(*args).get()
    assert not np.isnan(got).any(), f"{numerics}: {np.isnan(got).sum()} outputs never written"
    err = np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= TOL[numerics], report(got, want, f"o ({numerics})")
    for t in empty_rows:
        assert not got[t].any(), f"{numerics}: query {t} has no valid index, o must be 0"
    return args, got


@gpu
@pytest.mark.parametrize("T", [1, 3, 17])  # 1, 3: selected list split over CTAs and merged; 17: one CTA a head group
def test_gpu_released_dims(T):
    rng = np.random.default_rng(23)
    gpu_case(rng, T, 128, 512, 64, 4096, 2048, n_pad=100)


@gpu
@pytest.mark.parametrize("T", [1, 7, 64])  # 1, 7: split over CTAs and merged; 64: 128 CTAs, no split
def test_gpu_bf16_released_dims(T):
    rng = np.random.default_rng(26)
    gpu_case(rng, T, 128, 512, 64, 4096, 2048, n_pad=100, empty_rows=(T - 1,) if T > 1 else (), numerics="bf16")
    gpu_case(rng, T, 128, 512, 64, 4096, 2048, n_valid=1500, numerics="bf16")  # the last 548 slots padding: whole chunks of it


@gpu
@pytest.mark.parametrize("T,H,Dc,R,cap,K,n_pad,empty", [
    (1, 4, 128, 16, 50, 37, 5, ()),      # 4 heads in one m16 tile (rows 4-15 zero queries), K not a multiple of 32
    (5, 4, 128, 16, 20, 64, 0, (2,)),    # fewer cached rows than K (repeats), an empty query
    (3, 16, 512, 64, 100, 33, 3, (0,)),  # one chunk and one row
    (2, 40, 512, 64, 3000, 700, 20, ()),  # H = 40: one CTA of 3 m16 tiles, head rows 40-47 zero queries
    (4, 32, 128, 64, 1000, 1, 0, ()),    # a single selected row
    (200, 16, 128, 16, 300, 100, 10, (7, 150)),  # many CTAs, no split
])
def test_gpu_bf16_ragged_small(T, H, Dc, R, cap, K, n_pad, empty):
    rng = np.random.default_rng(27)
    gpu_case(rng, T, H, Dc, R, cap, K, n_pad, empty, numerics="bf16")


@gpu
@pytest.mark.parametrize("T", [1, 64])
def test_gpu_bf16_repeats_bit_identical(T):
    """No races: the same launch twice gives the same bits (split and merged at T = 1)."""
    args, first = gpu_case(np.random.default_rng(28), T, 128, 512, 64, 4096, 2048, n_pad=50, numerics="bf16")
    for _ in range(3):
        again = sparse_mla(*args).get()
        assert np.array_equal(again, first), f"max-abs {np.abs(again - first).max():.3g} between identical launches"


@gpu
def test_gpu_bf16_kernel_equals_fp32_kernel_on_bf16_inputs():
    """On inputs already exact in bf16 (what the model passes in fp8 precision) the two kernels agree."""
    import cupy as cp
    rng = np.random.default_rng(29)
    q_abs, q_pe, c_kv, k_pe = (round_bf16(a) for a in make_inputs(rng, 9, 128, 512, 64, 3000))
    idx = cp.asarray(np.stack([rng.choice(3000, 2048, replace=False) for _ in range(9)]).astype(np.int32))
    g = cp.asarray
    a = sparse_mla(g(q_abs * 0.5), g(q_pe), g(c_kv), g(k_pe), idx, 0.07, "fp32").get()
    b = sparse_mla(g(q_abs * 0.5), g(q_pe), g(c_kv), g(k_pe), idx, 0.07, "bf16").get()
    err = np.abs(a.astype(np.float64) - b).max() / np.abs(a).max()
    assert err <= 1e-4, report(b, a.astype(np.float64), "bf16 kernel vs fp32 kernel")


@gpu
@pytest.mark.parametrize("T,H,Dc,R,cap,K,n_pad,empty", [
    (1, 4, 128, 16, 50, 37, 5, ()),      # small model, decode, K not a multiple of the chunk
    (5, 4, 128, 16, 20, 64, 0, (2,)),    # fewer cached rows than K (repeats), an empty query
    (2, 8, 128, 16, 300, 100, 10, ()),
    (3, 16, 512, 64, 100, 33, 3, (0,)),
    (1, 12, 512, 64, 5000, 2100, 0, ()),  # H a multiple of 4 only; K past 2048
    (4, 32, 128, 64, 1000, 1, 0, ()),    # a single selected row
])
def test_gpu_ragged_small(T, H, Dc, R, cap, K, n_pad, empty):
    rng = np.random.default_rng(24)
    gpu_case(rng, T, H, Dc, R, cap, K, n_pad, empty)
