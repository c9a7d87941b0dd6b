"""Top-k: the numpy reference on hand-made rows; the kernel against it, exactly, on the GPU."""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from kernels._cuda import HAVE_GPU, KERNEL_DIR
from kernels.topk import topk, topk_reference

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


def test_dispatch_numpy():
    x = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32)
    np.testing.assert_array_equal(topk(x, 10), topk_reference(x, 10))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernel_compiles_without_spills(tmp_path):
    res = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-Xptxas", "-v", "-o", str(tmp_path / "topk.cubin"),
                          os.path.join(KERNEL_DIR, "topk.cu")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert re.search(r"0 bytes spill stores, 0 bytes spill loads", res.stderr), res.stderr


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


def run_kernel(x, k, **kw):
    import cupy as cp
    from kernels.topk import topk_gpu
    return cp.asnumpy(topk_gpu(cp.asarray(x), k, **kw))


@gpu
@pytest.mark.parametrize("R,N,k", [(64, 131072, 2048), (3, 262144, 2048), (1, 300000, 2048),
                                   (2, 1 << 20, 2048), (16, 8192, 2048), (32, 1024, 64)])
def test_kernel_random(R, N, k):
    rng = np.random.default_rng(N + R)
    for kind in ("normal", "uniform"):
        x = rows(rng, kind, R, N)
        assert_same(run_kernel(x, k), topk_reference(x, k), f"{kind} R={R} N={N} k={k}")


@gpu
def test_kernel_ragged_small():
    rng = np.random.default_rng(1)
    for N in [1, 2, 3, 4, 5, 7, 63, 64, 65, 1000, 2047, 2048, 2049, 4095, 4097, 5000] + \
             rng.integers(1, 5001, 12).tolist():
        for k in (1, 7, 64, 2048):
            x = rows(rng, "normal", 4, N)
            assert_same(run_kernel(x, k), topk_reference(x, k), f"ragged N={N} k={k}")


@gpu
@pytest.mark.parametrize("kind", ["five_values", "all_equal", "mostly_neginf", "nan", "negative", "posinf",
                                  "many_posinf", "last_bit", "signed_zero"])
@pytest.mark.parametrize("N", [777, 5000, 131072, 262144])
def test_kernel_adversarial(kind, N):
    rng = np.random.default_rng(N)
    x = rows(rng, kind, 5, N)
    for k in (1, 64, 2048):
        assert_same(run_kernel(x, k), topk_reference(x, k), f"{kind} N={N} k={k}")


@gpu
@pytest.mark.parametrize("cap", [0, 4, 64, 1024])
@pytest.mark.parametrize("kind", ["normal", "five_values", "last_bit", "mostly_neginf"])
def test_kernel_small_candidate_buffer(kind, cap):
    """A tiny buffer forces the global re-scan rounds and the final ordered pass."""
    rng = np.random.default_rng(cap)
    x = rows(rng, kind, 4, 50000)
    for k in (1, 100, 2048):
        assert_same(run_kernel(x, k, cand_cap=cap), topk_reference(x, k), f"{kind} cap={cap} k={k}")


@gpu
def test_kernel_unaligned_rows_and_dispatch():
    import cupy as cp
    rng = np.random.default_rng(5)
    for N in (4096, 4099):  # row starts 4 bytes off a 16-byte boundary: the scalar-load path
        x = rows(rng, "normal", 3, N)
        buf = cp.empty(3 * N + 1, np.float32)
        xd = buf[1:].reshape(3, N)
        xd[...] = cp.asarray(x)
        assert_same(cp.asnumpy(topk(xd, 2048)), topk_reference(x, 2048), f"unaligned N={N}")


@gpu
def test_kernel_empty_shapes():
    import cupy as cp
    from kernels.topk import topk_gpu
    assert topk_gpu(cp.zeros((0, 10), np.float32), 5).shape == (0, 5)
    assert cp.asnumpy(topk_gpu(cp.zeros((2, 0), np.float32), 3)).tolist() == [[-1] * 3] * 2
