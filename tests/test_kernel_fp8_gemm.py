"""FP8 block-scaled linear layer and its grouped form (a mixture of experts): the references against
independent computations and the launch plans (CPU), the kernels against the references (GPU)."""
import ml_dtypes
import numpy as np
import pytest

from kernel_build import build_without_spills, needs_nvcc
from kernels._cuda import HAVE_GPU
from kernels.fp8 import E4M3_MAX, dequant_weight_reference, e4m3_decode, e4m3_encode, e4m3_round
from kernels.fp8_gemm import (DECODE_T, GM_SMEM, GM_THREADS, GM_TILE_N, GV_CTAS_PER_SM, _gemv_partition,
                              fp8_gemm_reference, fp8_grouped_gemm_reference, fp8_grouped_linear,
                              fp8_grouped_linear_reference, fp8_linear, fp8_linear_reference, group_tiles, gv_smem,
                              plan, plan_grouped, quantize_activations, quantize_activations_reference, wgmma_tile_n)

gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU visible: fp8 GEMM kernel parity runs on the GPU machine")

# (N, K) of DeepSeek-V3.2 linears: q_a_proj, q_b_proj, o_proj of a 2048-wide expert (down_proj), kv_a_proj_with_mqa,
# an expert's gate/up projection.
RELEASED = [(1536, 7168), (24576, 1536), (7168, 2048), (576, 7168), (2048, 7168)]


def random_weight(xp, rng, N, K):
    """A realistic FP8 weight: normal values, one scale per 128 x 128 block = the block's amax / 448 (not a
    power of two, as in the checkpoints). Works with numpy or CuPy (rng from that module)."""
    w = rng.standard_normal((N, K), dtype=np.float32) * np.float32(0.02)
    NB, KB = -(-N // 128), -(-K // 128)
    pad = xp.zeros((NB * 128, KB * 128), np.float32)
    pad[:N, :K] = w
    blocks = pad.reshape(NB, 128, KB, 128)
    scale = (xp.maximum(xp.abs(blocks).max(axis=(1, 3)), np.float32(1e-12)) / np.float32(E4M3_MAX)).astype(np.float32)
    w8 = e4m3_encode(e4m3_round(blocks / scale[:, None, :, None])).reshape(NB * 128, KB * 128)[:N, :K]
    return xp.ascontiguousarray(w8), scale


def random_activations(rng, T, K, xp=np):
    """Activations with a realistic spread: a few large channels, and tokens of different sizes."""
    x = rng.standard_normal((T, K), dtype=np.float32)
    x *= xp.exp(rng.standard_normal((1, K), dtype=np.float32))  # channel outliers
    x *= xp.exp(rng.standard_normal((T, 1), dtype=np.float32))
    return x


def magnitude(x8, sx, w8, w_scale):
    """mag[t, n] = sum_k |x[t, k] W[n, k]| of the quantised operands (sign bits cleared): every summation
    order's rounding error is bounded by a multiple of it."""
    return fp8_gemm_reference(x8 & np.uint8(0x7F), sx, w8 & np.uint8(0x7F), w_scale).astype(np.float64)


def assert_close(got, want, mag, mtol, what):
    """|got - want| <= mtol * mag (+ a denormal floor); the message names the worst entry."""
    got, want, mag = (np.asarray(a, np.float64) for a in (got, want, mag))
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite at {np.argwhere(~np.isfinite(got))[:5].tolist()}"
    err = np.abs(got - want)
    ratio = err / (mag + 1e-30)
    i = np.unravel_index(np.argmax(ratio), ratio.shape)
    rel = err / (np.abs(want) + 1e-30)
    msg = (f"{what}: max-abs {err.max():.3e}, max-rel {rel.max():.3e}, worst {ratio[i]:.3e} of mag at (t, n) = "
           f"{tuple(int(v) for v in i)}: got {got[i]:.7g}, want {want[i]:.7g}, mag {mag[i]:.3g}")
    print(msg)
    assert (err <= mtol * mag + 1e-30).all(), msg


# --- CPU: quantisation by hand -------------------------------------------------------------------------

def test_quantize_hand_values():
    x = np.zeros((2, 300), np.float32)
    x[0, :3] = [1.0, -2.0, 0.5]           # amax 2: s = 2^ceil(log2(2/448)) = 2^-7
    x[0, 128:131] = [448.0, 3.3, 3.375]   # amax 448: s = 1 exactly; 3.3 -> 3.25, 3.375 ties to even -> 3.5
    x[1, 256] = -1e-6                     # amax floored at 1e-4: s = 2^-22; -1e-6 / s = -4.19 -> -4
    x8, sx = quantize_activations(x)
    assert x8.dtype == np.uint8 and x8.shape == (2, 384) and sx.dtype == np.float32 and sx.shape == (2, 3)
    assert sx[0].tolist() == [2.0**-7, 1.0, 2.0**-22]          # an all-zero block gets the floor's scale
    assert sx[1].tolist() == [2.0**-22, 2.0**-22, 2.0**-22]
    assert x8[0, :3].tolist() == [0x70, 0xF8, 0x68]             # 128 = 2^7, -256 = -2^8, 64 = 2^6
    assert x8[0, 128:131].tolist() == [0x7E, 0x45, 0x46]        # 448, 3.25 = 1.625 * 2, 3.5 = 1.75 * 2
    assert x8[1, 256] == 0xC8                                   # -4 = -1.0 * 2^2
    values = e4m3_decode(x8)
    assert (values[:, 300:] == 0).all()                         # padding past K is zero
    assert (np.abs(values) <= E4M3_MAX).all()


def test_quantize_bf16_bits_equal_float_input():
    rng = np.random.default_rng(0)
    xb = random_activations(rng, 5, 260).astype(ml_dtypes.bfloat16)
    a8, asx = quantize_activations_reference(xb.view(np.uint16))
    b8, bsx = quantize_activations_reference(xb.astype(np.float32))
    c8, csx = quantize_activations_reference(xb)
    assert np.array_equal(a8, b8) and np.array_equal(asx, bsx)
    assert np.array_equal(a8, c8) and np.array_equal(asx, csx)


def test_quantize_roundtrip_error_within_half_an_e4m3_step():
    rng = np.random.default_rng(1)
    x = random_activations(rng, 9, 1000)
    x8, sx = quantize_activations(x)
    back = (e4m3_decode(x8).reshape(9, -1, 128) * sx[..., None]).reshape(9, -1)[:, :1000]
    amax = np.repeat(sx * E4M3_MAX, 128, axis=1)[:, :1000]
    # 3 mantissa bits: relative error <= 2^-4 for normals; subnormals round to 2^-10 * s steps
    assert (np.abs(back - x) <= np.maximum(np.abs(x) * 2.0**-4, amax / E4M3_MAX * 2.0**-10) * 1.0001).all()
    assert (sx == 2.0 ** np.round(np.log2(sx))).all()


# --- CPU: the reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("T,N,K", [(1, 8, 16), (3, 256, 384), (5, 200, 300), (4, 129, 130), (2, 1, 1)])
def test_reference_equals_dequantise_then_matmul(T, N, K):
    """y = (x8 * sx) @ (w8 * w_scale)^T, the dequantised operands multiplied in float64."""
    rng = np.random.default_rng(T * 1000 + N)
    w8, ws = random_weight(np, rng, N, K)
    x8, sx = quantize_activations(random_activations(rng, T, K))
    got = fp8_gemm_reference(x8, sx, w8, ws)
    assert got.dtype == np.float32 and got.shape == (T, N)
    xd = (e4m3_decode(x8).astype(np.float64).reshape(T, -1, 128) * sx[..., None]).reshape(T, -1)[:, :K]
    wd = dequant_weight_reference(w8, ws).astype(np.float64)  # fp32 products: rounded once each
    want = xd @ wd.T
    assert_close(got, want, np.abs(xd) @ np.abs(wd).T, 1e-6, f"reference T={T} N={N} K={K}")


def test_linear_close_to_unquantised_product():
    """End to end, fp8 activations move y by at most the e4m3 rounding of x: 2^-4 of the magnitude."""
    rng = np.random.default_rng(2)
    T, N, K = 6, 300, 520
    w8, ws = random_weight(np, rng, N, K)
    x = random_activations(rng, T, K)
    wd = dequant_weight_reference(w8, ws).astype(np.float64)
    y = fp8_linear(x, w8, ws)
    want = x.astype(np.float64) @ wd.T
    mag = np.abs(x).astype(np.float64) @ np.abs(wd).T
    assert (np.abs(y - want) <= 2.0**-4 * mag).all()
    assert np.median(np.abs(y - want) / np.abs(want)) < 0.05  # and typically far closer


def test_linear_leading_dims_and_out():
    rng = np.random.default_rng(3)
    w8, ws = random_weight(np, rng, 40, 200)
    x = random_activations(rng, 6, 200).reshape(2, 3, 200)
    y = fp8_linear(x, w8, ws)
    assert y.shape == (2, 3, 40) and isinstance(y, np.ndarray)
    assert np.array_equal(y.reshape(6, 40), fp8_linear_reference(x.reshape(6, 200), w8, ws))
    out = np.empty((2, 3, 40), np.float32)
    assert fp8_linear(x, w8, ws, out=out) is out and np.array_equal(out, y)


def test_bad_inputs_name_the_tensor():
    rng = np.random.default_rng(4)
    w8, ws = random_weight(np, rng, 200, 300)
    x = random_activations(rng, 3, 300)
    x8, sx = quantize_activations(x)
    with pytest.raises(ValueError, match=r"w8: dtype float32, expected uint8"):
        fp8_linear(x, w8.astype(np.float32), ws)
    with pytest.raises(ValueError, match=r"w8: expected a 2-D"):
        fp8_linear(x, w8.reshape(-1), ws)
    with pytest.raises(ValueError, match=r"w_scale: shape \(2, 2\), expected \(2, 3\)"):
        fp8_linear(x, w8, ws[:, :2])
    with pytest.raises(ValueError, match=r"x: shape \(3, 299\), its last dim should be K = 300"):
        fp8_linear(x[:, :299], w8, ws)
    with pytest.raises(ValueError, match=r"x8: shape \(3, 300\), expected 384 columns"):
        fp8_gemm_reference(x8[:, :300], sx, w8, ws)
    with pytest.raises(ValueError, match=r"sx: shape \(3, 2\), expected \(3, 3\)"):
        fp8_gemm_reference(x8, sx[:, :2], w8, ws)
    with pytest.raises(ValueError, match=r"out: shape \(3, 7\)"):
        fp8_linear(x, w8, ws, out=np.empty((3, 7), np.float32))
    with pytest.raises(ValueError, match=r"x: dtype int32"):
        quantize_activations(np.ones((2, 4), np.int32))


# --- CPU: launch plans and the kernel source --------------------------------------------------------------

@pytest.mark.parametrize("wgmma", [False, True])
def test_plans(wgmma):
    for T in (1, 7, 8, 9, 16, 17, 128, 1000, 4096):
        for N, K in RELEASED + [(200, 300), (1, 1), (18432, 7168), (7168, 18432)]:
            p = plan(T, N, K, wgmma)
            KB = -(-K // 128)
            if wgmma and T > DECODE_T:  # persistent: one CTA per SM at most, never more CTAs than tiles
                bn = wgmma_tile_n(T, N, 132)
                assert p.kernel == GM_TILE_N[bn] and p.smem == GM_SMEM <= 227 * 1024 and p.block == (GM_THREADS,)
                assert p.grid == (min(-(-N // bn) * -(-T // 128), 132), 1, 1) and p.pieces == 1
            else:
                nt = 1 if T <= 8 else 2
                assert p.kernel == f"fp8_gemv_t{8 * nt}" and p.block == (128,) and p.smem == gv_smem(nt)
                # GV_CTAS_PER_SM fit an SM's 228 KB: dynamic + 1 KB static (smem_raw's 1024-byte alignment) + 1 KB
                # that CUDA reserves per CTA
                assert GV_CTAS_PER_SM * (p.smem + 2048) <= 228 * 1024
                units = -(-T // (8 * nt)) * -(-N // (128 // p.k_warps)) * KB
                assert p.k_warps in (1, 2, 4) and p.grid[1:] == (1, 1)
                assert 1 <= p.grid[0] <= min(units, GV_CTAS_PER_SM * 132) and 1 <= p.pieces <= KB
    # decode: a wide layer takes 2 CTAs per SM, cutting each key's K range into few pieces; a narrow one still
    # reaches every SM, its keys of 32 rows (the 4 warps of a CTA split K)
    wide, narrow = plan(1, 18432, 7168, False), plan(1, 576, 7168, False)
    assert wide.grid[0] == 264 and wide.k_warps == 1 and wide.pieces <= 4
    assert narrow.grid[0] == 132 and narrow.k_warps == 4 and 1 < narrow.pieces <= 9
    # prefill: tiles of 96 weight rows only where they take no more waves of 132 CTAs than tiles of 128
    assert [wgmma_tile_n(4096, N, 132) for N, _ in RELEASED] == [128, 128, 128, 96, 128]
    assert wgmma_tile_n(4096, 18432, 132) == 128 and wgmma_tile_n(128, 1536, 132) == 96  # one wave either way
    assert plan(4096, 576, 7168, True, tile_n=128).kernel == "fp8_gemm_wgmma"
    with pytest.raises(ValueError, match="tile_n = 64"):
        plan(4096, 576, 7168, True, tile_n=64)
    forced = plan(3, 200, 300, False, ctas=5, k_warps=2)
    assert forced.grid[0] == 5 and forced.k_warps == 2
    assert plan(3, 200, 300, False, ctas=10**6, k_warps=1).grid[0] == 2 * 3  # at most one CTA per unit


def cta_of(u, C, U):
    """fp8_gemm.cu gv_key_end: the CTA whose run of units [c U / C, (c + 1) U / C) holds unit u."""
    return ((u + 1) * C - 1) // U


@pytest.mark.parametrize("Z,N,KB", [(1, 576, 56), (1, 18432, 56), (1, 7168, 144), (1, 24576, 12), (9, 4096, 56),
                                    (65, 7168, 16), (3, 200, 3), (2, 129, 2), (1, 1, 1), (4, 40, 1)])
@pytest.mark.parametrize("ctas", [None, 1, 2, 7, 133, 10**6])
@pytest.mark.parametrize("k_warps", [None, 1, 2, 4])
def test_gemv_partition_formulas(Z, N, KB, ctas, k_warps):
    """The GEMV kernel's integer bookkeeping, run here in Python: the CTAs' runs cover every unit once; the
    c0 / c1 formula finds the CTA holding a unit; a key meets at most plan's `pieces` CTAs; each CTA writes at most
    one partial per ws slot and the last CTA reads it from the slot it was written to; a warp's incremental
    (tile, row group, block) cursor agrees with division."""
    C, kw, pieces = _gemv_partition(Z, N, KB, 132, ctas, k_warps)
    NR = 128 // kw
    G = -(-N // NR)
    U = Z * G * KB
    start = [c * U // C for c in range(C + 1)]
    assert start[0] == 0 and start[-1] == U and all(b > a for a, b in zip(start, start[1:]))
    holder = np.repeat(np.arange(C), np.diff(start))
    assert (cta_of(np.arange(U), C, U) == holder).all()

    written = {}
    for key in range(Z * G):
        k0 = key * KB
        c0, c1 = cta_of(k0, C, U), cta_of(k0 + KB - 1, C, U)
        assert c1 - c0 + 1 <= pieces, (key, c0, c1)
        if c0 == c1:
            continue
        for c in range(c0, c1 + 1):
            slot = 0 if key == start[c] // KB else 1                # the writer's slot (gv_key_end: key == s / KB)
            assert slot == (0 if c > c0 or start[c0] == k0 else 1)  # where the last CTA looks for it
            assert (c, slot) not in written, f"CTA {c} slot {slot}: keys {written[(c, slot)]} and {key}"
            written[(c, slot)] = key

    for c in sorted({0, C // 2, C - 1}):
        for phase in range(kw):
            s, e = start[c], start[c + 1]
            u = s + phase
            if u >= e:
                continue
            key = u // KB
            pz, pg, pb = key // G, key % G, u % KB
            for u in range(u, e, kw):  # gemv_body's issue(): pb += kw, carried into pg and pz
                assert (pz, pg, pb) == (u // KB // G, u // KB % G, u % KB)
                pb += kw
                while pb >= KB:
                    pb -= KB
                    pg += 1
                    if pg == G:
                        pg, pz = 0, pz + 1


# --- CPU: grouped products (a mixture of experts) -------------------------------------------------------

# DeepSeek-V3.2's experts: E routed + 1 shared (model.MoE stacks it last, a group of every token), top-8.
# (N, K): an expert's fused gate_up (2 x 2048 rows) and its down_proj.
E_ROUTED, TOP_K = 256, 8
EXPERT_SHAPES = [(4096, 7168), (7168, 2048)]


def routing_counts(T, E=E_ROUTED, k=TOP_K, seed=0):
    """Rows per expert when T tokens each pick k distinct of E experts, the experts unequally popular
    (log-normal, sigma 0.5: the hottest takes ~3x the mean), then the shared expert's T rows: counts [E + 1]."""
    rng = np.random.default_rng(seed)
    keys = rng.gumbel(size=(T, E)) + 0.5 * rng.standard_normal(E)  # Gumbel top-k: draws without replacement
    chosen = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    return np.append(np.bincount(chosen.reshape(-1), minlength=E), T)


def offsets_of(counts):
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def random_stacked(rng, E, N, K):
    w = [random_weight(np, rng, N, K) for _ in range(E)]
    return np.stack([a for a, _ in w]), np.stack([b for _, b in w])


# Empty groups first, last and between; one-row groups; a group of 17 (two GEMV tiles of 16), of 128 and 129.
RAGGED_COUNTS = [[0, 1, 0, 3, 17, 0, 1, 0], [2, 0, 0, 0], [0, 0, 5], [128, 1, 129, 0, 2], [1]]


@pytest.mark.parametrize("N,K", [(8, 16), (200, 300), (129, 130), (1, 1), (256, 384)])
@pytest.mark.parametrize("counts", RAGGED_COUNTS, ids=str)
def test_grouped_reference_equals_per_expert_linear(counts, N, K):
    """Each group's rows are exactly fp8_linear of those rows with its expert's weight."""
    rng = np.random.default_rng(N + K + len(counts))
    E, R = len(counts), sum(counts)
    w8, ws = random_stacked(rng, E, N, K)
    x = random_activations(rng, R, K)
    offsets = offsets_of(counts)
    y = fp8_grouped_linear(x, w8, ws, offsets)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (R, N)
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            assert np.array_equal(y[lo:hi], fp8_linear(x[lo:hi], w8[e], ws[e])), f"expert {e}, rows {lo}:{hi}"
    x8, sx = quantize_activations(x)  # quantising all rows at once is quantising each group: rows are independent
    assert np.array_equal(fp8_grouped_gemm_reference(x8, sx, w8, ws, offsets), y)
    out = np.full((R, N), np.nan, np.float32)
    assert fp8_grouped_linear(x, w8, ws, offsets, out=out) is out and np.array_equal(out, y)


def test_grouped_no_rows():
    rng = np.random.default_rng(0)
    w8, ws = random_stacked(rng, 3, 40, 200)
    y = fp8_grouped_linear(np.zeros((0, 200), np.float32), w8, ws, [0, 0, 0, 0])
    assert y.shape == (0, 40) and y.dtype == np.float32


def test_grouped_bad_inputs_name_the_tensor():
    rng = np.random.default_rng(1)
    w8, ws = random_stacked(rng, 3, 200, 300)
    x = random_activations(rng, 5, 300)
    with pytest.raises(ValueError, match=r"offsets must not decrease: offsets\[1\] = 3 > offsets\[2\] = 2"):
        fp8_grouped_linear(x, w8, ws, [0, 3, 2, 5])
    with pytest.raises(ValueError, match=r"offsets\[-1\] = 4, expected R = 5"):
        fp8_grouped_linear(x, w8, ws, [0, 1, 2, 4])
    with pytest.raises(ValueError, match=r"offsets\[0\] = 1, expected 0"):
        fp8_grouped_linear(x, w8, ws, [1, 1, 2, 5])
    with pytest.raises(ValueError, match=r"offsets: shape \(3,\), expected \(4,\) = \(E \+ 1,\) for 3 experts"):
        fp8_grouped_linear(x, w8, ws, [0, 2, 5])
    with pytest.raises(ValueError, match=r"offsets: dtype float64, expected integers"):
        fp8_grouped_linear(x, w8, ws, np.array([0, 1, 2, 5], np.float64))
    with pytest.raises(ValueError, match=r"w8: expected a 3-D \[E, N, K\]"):
        fp8_grouped_linear(x, w8[0], ws[0], [0, 5])
    with pytest.raises(ValueError, match=r"w_scale: shape \(3, 2, 2\), expected \(3, 2, 3\)"):
        fp8_grouped_linear(x, w8, ws[:, :, :2], [0, 1, 2, 5])
    with pytest.raises(ValueError, match=r"x: shape \(5, 299\), expected \[R, K = 300\]"):
        fp8_grouped_linear(x[:, :299], w8, ws, [0, 1, 2, 5])


def check_tiles(tiles, offsets, rows):
    """The tile table covers every group's rows once, in order, at most `rows` a tile, none across groups."""
    assert tiles.dtype == np.int32 and tiles.ndim == 2 and tiles.shape[1] == 3
    covered = np.zeros(offsets[-1], int)
    for e, r0, end in tiles.tolist():
        assert end == offsets[e + 1] and offsets[e] <= r0 < end, (e, r0, end)
        covered[r0:min(r0 + rows, end)] += 1
    assert (covered == 1).all()
    assert (np.diff(tiles[:, 0]) >= 0).all() and (np.diff(tiles[:, 1]) > 0).all()  # experts and rows in order


@pytest.mark.parametrize("rows", [8, 16, 128])
@pytest.mark.parametrize("counts", RAGGED_COUNTS + [[0, 0, 0]], ids=str)
def test_group_tiles(counts, rows):
    offsets = offsets_of(counts)
    tiles = group_tiles(offsets, rows)
    assert len(tiles) == sum(-(-c // rows) for c in counts)
    check_tiles(tiles, offsets, rows)


@pytest.mark.parametrize("wgmma", [False, True])
@pytest.mark.parametrize("T", [1, 8, 16, 512, 4096])
def test_grouped_plans(T, wgmma):
    """At the released sizes: GEMV tiles while every group fits DECODE_T rows (T <= 16 tokens, whose shared
    group has T rows), else wgmma tiles of 128; grids within CUDA's limits; the tile table exact."""
    offsets = offsets_of(routing_counts(T))
    G = int(np.diff(offsets).max())
    for N, K in EXPERT_SHAPES:
        p = plan_grouped(offsets, N, K, wgmma)
        if wgmma and G > DECODE_T:
            assert p.kernel == "fp8_grouped_gemm_wgmma" and p.smem == GM_SMEM and p.pieces == 1
            assert p.block == (GM_THREADS,) and p.grid == (min(len(p.tiles) * -(-N // 128), 132), 1, 1)
            check_tiles(p.tiles, offsets, 128)
        else:
            rows = 8 if G <= 8 else 16
            assert p.kernel == f"fp8_grouped_gemv_t{rows}" and p.smem == gv_smem(rows // 8) and p.block == (128,)
            units = len(p.tiles) * -(-N // (128 // p.k_warps)) * -(-K // 128)
            assert 1 <= p.grid[0] <= min(units, GV_CTAS_PER_SM * 132) and p.grid[1:] == (1, 1)
            assert 1 <= p.pieces <= -(-K // 128)
            check_tiles(p.tiles, offsets, rows)
    if T <= 8:
        assert G <= 8  # decode: the shared expert's T rows are the largest group
    if T == 1:  # one token: its 8 experts and the shared one, one row each, every weight streamed once
        assert plan_grouped(offsets, 4096, 7168, True).tiles.shape == (9, 3)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_90a"])
def test_kernel_compiles_without_spills(arch, tmp_path):
    build_without_spills("fp8_gemm.cu", arch, tmp_path)


# --- GPU: the kernels against the reference -----------------------------------------------------------------

# |error| <= MTOL * mag (see magnitude()). The GEMV (mma.sync on exactly converted f16 values) sums exact products
# in fp32: per block 8 k16 steps and the promotion, then the pieces of a row's K range (phase warps, CTAs): along any
# path n = K/16 + K/128 + (up to 4 + 9) roundings, each at most 2^-24 * mag, 3.1e-5 at K = 7168 if all had one sign
# and size; independent roundings add like a random walk, sqrt(n) * 2^-24 * mag = 1.4e-6 there, so 2e-5.
# Hopper's fp8 wgmma keeps only ~13 bits of the running sum while it accumulates: within one 128-wide block the
# four chained k32 instructions can each lose up to 2^-13 of the block's magnitude (4 * 1.2e-4 = 4.9e-4), and the
# promotion to fp32 after every block stops it from growing further. Measured on an H200 (2026-11-28): at most
# 2.65e-4 of mag over the shapes below, so 5e-4. A real bug (wrong block, scale or row) is off by a fraction of
# |y| ~ mag / sqrt(K), i.e. >= 1e-2 * mag at these K.
MTOL = {"mma": 2e-5, "wgmma": 5e-4}


def gpu_paths():
    if not HAVE_GPU:
        return ["mma", "wgmma"]
    import cupy as cp
    return ["mma", "wgmma"] if cp.cuda.Device().compute_capability == "90" else ["mma"]


def gpu_case(T, N, K, seed, bf16=False):
    """GPU operands and the reference computed from them (the reference runs on CuPy: float64 cuBLAS)."""
    import cupy as cp
    rng = cp.random.default_rng(seed)
    w8, ws = random_weight(cp, rng, N, K)
    x = random_activations(rng, T, K, cp)
    if bf16:
        u = x.view(np.uint32)
        x = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    x8, sx = quantize_activations_reference(x)
    return x, w8, ws, x8, sx, fp8_gemm_reference(x8, sx, w8, ws), magnitude(x8, sx, w8, ws)


def run_gemm(T, N, K, path, seed=0, ctas=None, k_warps=None, tile_n=None):
    import cupy as cp
    from kernels.fp8_gemm import fp8_gemm_gpu
    _, w8, ws, x8, sx, ref, mag = gpu_case(T, N, K, seed)
    out = cp.full((T, N), np.nan, np.float32)  # poison: every element must be written
    got = fp8_gemm_gpu(x8, sx, w8, ws, out=out, path=path, ctas=ctas, k_warps=k_warps, tile_n=tile_n)
    assert got is out
    assert_close(cp.asnumpy(got), cp.asnumpy(ref), cp.asnumpy(mag), MTOL[path if T > DECODE_T else "mma"],
                 f"{path} T={T} N={N} K={K} ctas={ctas} k_warps={k_warps} tile_n={tile_n}")
    return got


@gpu
@pytest.mark.parametrize("N,K", RELEASED)
@pytest.mark.parametrize("T", [1, 7, 16])
def test_decode_released_shapes(T, N, K):
    run_gemm(T, N, K, "auto", seed=T)


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("N,K", RELEASED)
@pytest.mark.parametrize("T", [128, 1000])
def test_prefill_released_shapes(T, N, K, path):
    if path == "mma" and T == 1000 and N * K > 2048 * 7168:
        pytest.skip("the mma.sync fallback re-streams the weight per 16 tokens: covered at T = 128")
    run_gemm(T, N, K, path, seed=T + N)


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("T", [1, 5, 9, 16, 17, 130])
@pytest.mark.parametrize("N,K", [(200, 300), (200, 304), (1, 1), (129, 130), (64, 2048)])
def test_ragged_shapes(N, K, T, path):
    """K not a multiple of 128 (304: 16-byte loads, ragged last block; 300, 130, 1: byte loads), N not of 128."""
    run_gemm(T, N, K, path, seed=N + K + T)


@gpu
@pytest.mark.parametrize("ctas,k_warps", [(None, None), (1, 1), (2, 4), (3, 2), (14, 4), (132, 1), (500, 4), (10**6, 2)],
                         ids=str)
@pytest.mark.parametrize("T", [1, 8, 16])
@pytest.mark.parametrize("N,K", [(576, 7168), (1000, 2048), (200, 304), (129, 130)])
def test_decode_partitions(N, K, T, ctas, k_warps):
    """The GEMV at forced partitions: one CTA with everything (no key cut), a few CTAs (keys cut mid-range, in
    slots 0 and 1), many (keys cut into many pieces; 10**6 is clamped to one CTA per unit), with 1, 2 or 4 warps
    splitting K. Narrow N (576), N not a multiple of 32 (1000, 200, 129), K not of 128 (304: 16-byte loads and a
    ragged last block; 130: byte loads). Bit-identical when repeated: the tickets were reset and the pieces are
    added in CTA order, whatever the timing."""
    import cupy as cp
    a = run_gemm(T, N, K, "mma", seed=T + N, ctas=ctas, k_warps=k_warps)
    b = run_gemm(T, N, K, "mma", seed=T + N, ctas=ctas, k_warps=k_warps)
    assert cp.array_equal(a, b)


@gpu
@pytest.mark.parametrize("tile_n", [128, 96])
@pytest.mark.parametrize("T,N,K", [(4096, 576, 7168), (300, 1000, 2048), (130, 129, 130), (17, 200, 304),
                                   (200, 96, 256), (40, 300, 7168)])
def test_wgmma_tile_rows(T, N, K, tile_n):
    """The wgmma kernel at either tile: 96-row tiles straddle weight-scale rows (rows 96..191 take scale rows 0
    and 1; 576 = 6 x 96, 1000 and 300 ragged, 96 one tile, 129 / 200 a partial second), with 16-byte and byte
    loads (K = 130). Against the reference, then bit-identical when repeated."""
    if "wgmma" not in gpu_paths():
        pytest.skip("needs an sm_90 GPU")
    import cupy as cp
    first = run_gemm(T, N, K, "wgmma", seed=T + N + K, tile_n=tile_n)
    assert cp.array_equal(run_gemm(T, N, K, "wgmma", seed=T + N + K, tile_n=tile_n), first)


@gpu
@pytest.mark.parametrize("path", gpu_paths())
def test_repeated_runs_bit_identical(path):
    import cupy as cp
    from kernels.fp8_gemm import fp8_gemm_gpu
    _, w8, ws, x8, sx, _, _ = gpu_case(700, 2048, 7168, 6)
    first = fp8_gemm_gpu(x8, sx, w8, ws, path=path)
    for _ in range(3):
        assert cp.array_equal(fp8_gemm_gpu(x8, sx, w8, ws, path=path), first)


@gpu
@pytest.mark.parametrize("T,N,K", [(4096, 7168, 2048), (1000, 24576, 1536), (2000, 4096, 256), (300, 20000, 300)])
def test_wgmma_many_tiles_per_cta(T, N, K):
    """The wgmma kernel is persistent (grid = SMs): each CTA runs many tiles, so its ring of 6 slots and their
    mbarrier phases wrap across tile boundaries, at 16, 12, 2 and 3 K blocks per tile (K = 300: the byte-load
    producer). Against the reference, then bit-identical over repeated launches (a pipeline race would differ)."""
    if "wgmma" not in gpu_paths():
        pytest.skip("needs an sm_90 GPU")
    import cupy as cp
    from kernels.fp8_gemm import fp8_gemm_gpu
    _, w8, ws, x8, sx, ref, mag = gpu_case(T, N, K, T + K)
    first = fp8_gemm_gpu(x8, sx, w8, ws, out=cp.full((T, N), np.nan, np.float32), path="wgmma")
    assert_close(cp.asnumpy(first), cp.asnumpy(ref), cp.asnumpy(mag), MTOL["wgmma"], f"wgmma T={T} N={N} K={K}")
    for _ in range(3):
        assert cp.array_equal(fp8_gemm_gpu(x8, sx, w8, ws, path="wgmma"), first)


@gpu
def test_unaligned_weight_base_uses_byte_loads():
    """A weight view that starts off a 16-byte boundary (K % 16 == 0 but the base is not) must still work."""
    import cupy as cp
    from kernels.fp8_gemm import fp8_gemm_gpu
    _, w8, ws, x8, sx, ref, mag = gpu_case(20, 130, 256, 7)
    buf = cp.zeros(w8.size + 1, np.uint8)
    shifted = buf[1:].reshape(w8.shape)
    shifted[...] = w8
    for path in gpu_paths():
        for T in (3, 20):
            got = fp8_gemm_gpu(x8[:T], sx[:T], shifted, ws, path=path)
            assert_close(cp.asnumpy(got), cp.asnumpy(ref[:T]), cp.asnumpy(mag[:T]), MTOL["wgmma"], f"shifted {path} T={T}")


@gpu
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("T,K", [(1, 7168), (37, 1536), (300, 301), (4, 130), (1000, 2048)])
def test_quantize_kernel_matches_reference(T, K, bf16):
    """Same scales bit for bit, same e4m3 values (+0 and -0 may differ in the sign bit)."""
    import cupy as cp
    from kernels.fp8_gemm import quantize_activations_gpu
    x, *_ = gpu_case(T, 8, K, T + K, bf16=bf16)
    want8, wantsx = quantize_activations_reference(x)
    x8 = cp.full((T, want8.shape[1]), 0x7F, np.uint8)  # poison, NaN code
    got8, gotsx = quantize_activations_gpu(x, x8=x8)
    assert cp.array_equal(gotsx, wantsx), f"sx differs at {cp.argwhere(gotsx != wantsx)[:5].tolist()}"
    diff = e4m3_decode(got8) != e4m3_decode(want8)
    assert not diff.any(), f"x8 differs at {cp.argwhere(diff)[:5].tolist()}"


@gpu
@pytest.mark.parametrize("shape", [(1, 64, 128), (37, 128), (5, 8, 64), (3, 100)])
def test_quantize_rows_and_roundtrip_match_the_numpy_chain(shape):
    """The model's indexer q/k quantisation and latent round trip on the GPU give the numpy chain's values."""
    import cupy as cp
    from kernels.fp8 import fp8_roundtrip
    from kernels.fp8_gemm import fp8_roundtrip_rows, quantize_rows
    v = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32) * 3
    v[0, ..., :5] = 0.0  # zeros and a tiny row-part stay exact
    want8, want_s = quantize_rows(v)
    got8, got_s = quantize_rows(cp.asarray(v))
    assert got8.shape == want8.shape and got_s.shape == want_s.shape
    assert np.array_equal(cp.asnumpy(got_s), want_s)
    assert np.array_equal(cp.asnumpy(e4m3_decode(got8)), e4m3_decode(want8))
    rows = v.reshape(-1, v.shape[-1])
    assert np.array_equal(cp.asnumpy(fp8_roundtrip_rows(cp.asarray(rows))), fp8_roundtrip(rows, 128))


@gpu
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("T", [1, 200])
def test_linear_dispatch_end_to_end(T, bf16):
    import cupy as cp
    x, w8, ws, x8, sx, ref, mag = gpu_case(T, 1536, 7168, 9, bf16=bf16)
    y = fp8_linear(x, w8, ws)
    assert isinstance(y, cp.ndarray) and y.shape == (T, 1536) and y.dtype == np.float32
    assert_close(cp.asnumpy(y), cp.asnumpy(ref), cp.asnumpy(mag), MTOL["wgmma"], f"fp8_linear T={T} bf16={bf16}")
    # leading dims
    y3 = fp8_linear(x.reshape(1, T, 7168), w8, ws)
    assert y3.shape == (1, T, 1536) and cp.array_equal(y3[0], y)


@gpu
def test_gpu_bad_inputs():
    import cupy as cp
    from kernels.fp8_gemm import fp8_gemm_gpu
    x, w8, ws, x8, sx, _, _ = gpu_case(4, 200, 300, 10)
    with pytest.raises(ValueError, match="x: dtype float64"):
        fp8_linear(x.astype(np.float64), w8, ws)
    with pytest.raises(ValueError, match="w8: expected a CuPy array"):
        fp8_linear(x, cp.asnumpy(w8), cp.asnumpy(ws))
    with pytest.raises(ValueError, match="w_scale: dtype float64"):
        fp8_linear(x, w8, ws.astype(np.float64))
    with pytest.raises(ValueError, match="sx: must be C-contiguous"):
        fp8_gemm_gpu(x8, cp.asfortranarray(sx), w8, ws)  # sx is [4, 3]
    with pytest.raises(ValueError, match="out: shape"):
        fp8_gemm_gpu(x8, sx, w8, ws, out=cp.empty((4, 199), np.float32))
    with pytest.raises(ValueError, match="path 'fast'"):
        fp8_gemm_gpu(x8, sx, w8, ws, path="fast")


# --- GPU: the grouped kernels against the reference ---------------------------------------------------------

@pytest.fixture(scope="module")
def released_experts():
    """(N, K) -> (w8, w_scale) of E_ROUTED + 1 stacked experts on the GPU, made once (7.5 GB and 3.8 GB)."""
    made = {}

    def get(N, K):
        if (N, K) not in made:
            import cupy as cp
            rng = cp.random.default_rng(N + K)
            w8 = cp.empty((E_ROUTED + 1, N, K), np.uint8)
            ws = cp.empty((E_ROUTED + 1, -(-N // 128), -(-K // 128)), np.float32)
            for e in range(E_ROUTED + 1):
                w8[e], ws[e] = random_weight(cp, rng, N, K)
            made[(N, K)] = w8, ws
        return made[(N, K)]
    yield get
    made.clear()
    if HAVE_GPU:
        import cupy as cp
        cp.get_default_memory_pool().free_all_blocks()


def grouped_magnitude(x8, sx, w8, ws, offsets):
    """magnitude() of each group's rows (as the grouped reference, group by group)."""
    import cupy as cp
    mag = cp.zeros((x8.shape[0], w8.shape[1]), np.float64)
    for e in np.flatnonzero(np.diff(offsets)):
        lo, hi = offsets[e], offsets[e + 1]
        mag[lo:hi] = magnitude(x8[lo:hi], sx[lo:hi], w8[e], ws[e])
    return mag


def run_grouped(x8, sx, w8, ws, offsets, path, ctas=None, k_warps=None, what=""):
    """The grouped launch into a NaN-poisoned output (every element must be written), checked against the
    grouped reference with the tolerance of the kernel the plan picks. Returns (y, kernel name)."""
    import cupy as cp
    from kernels._cuda import sm_count
    from kernels.fp8_gemm import _module, fp8_grouped_gemm_gpu
    R, N = x8.shape[0], w8.shape[1]
    name = plan_grouped(offsets, N, w8.shape[2], _module()[1] and path != "mma", sm_count(), ctas, k_warps).kernel
    out = cp.full((R, N), np.nan, np.float32)
    got = fp8_grouped_gemm_gpu(x8, sx, w8, ws, offsets, out=out, path=path, ctas=ctas, k_warps=k_warps)
    assert got is out
    ref = fp8_grouped_gemm_reference(x8, sx, w8, ws, offsets)
    mag = grouped_magnitude(x8, sx, w8, ws, offsets)
    assert_close(cp.asnumpy(got), cp.asnumpy(ref), cp.asnumpy(mag), MTOL["wgmma" if name.endswith("wgmma") else "mma"],
                 f"{name} ({path}) {what}")
    return got, name


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("N,K", EXPERT_SHAPES)
@pytest.mark.parametrize("T", [1, 8, 512, 4096])
def test_grouped_released_shapes(T, N, K, path, released_experts):
    """256 routed experts + the shared one, T tokens x top-8 (routing_counts): the GEMV for T <= 8, wgmma beyond
    (on an sm_90 GPU; the mma path runs the GEMV over 16-row tiles at every T)."""
    if path == "mma" and T == 4096:
        pytest.skip("the mma.sync fallback re-streams each weight per 16 rows: covered at T = 512")
    import cupy as cp
    w8, ws = released_experts(N, K)
    offsets = offsets_of(routing_counts(T, seed=T))
    R = int(offsets[-1])
    rng = cp.random.default_rng(T + N)
    x8, sx = quantize_activations_reference(random_activations(rng, R, K, cp))
    _, name = run_grouped(x8, sx, w8, ws, offsets, path, what=f"T={T} R={R} N={N} K={K}")
    assert name.endswith("wgmma") == (path != "mma" and T > DECODE_T)


@gpu
@pytest.mark.parametrize("path", gpu_paths())
@pytest.mark.parametrize("N,K", [(200, 300), (200, 304), (1, 1), (129, 130), (64, 2048)])
@pytest.mark.parametrize("counts", RAGGED_COUNTS + [[0, 9, 0, 4, 16], [40, 0, 3, 0, 300, 17]], ids=str)
def test_grouped_ragged_shapes(counts, N, K, path):
    """Empty groups, one-row groups, groups ending inside a tile; K and N not multiples of 128 (byte loads at
    K = 300, 130, 1). The largest group picks the kernel: <= 8 rows t8, <= 16 t16, else wgmma (or t16 tiles)."""
    import cupy as cp
    rng = cp.random.default_rng(N + K + sum(counts))
    E, R = len(counts), sum(counts)
    w = [random_weight(cp, rng, N, K) for _ in range(E)]
    w8, ws = cp.stack([a for a, _ in w]), cp.stack([b for _, b in w])
    x8, sx = quantize_activations_reference(random_activations(rng, R, K, cp))
    run_grouped(x8, sx, w8, ws, offsets_of(counts), path, what=f"counts={counts} N={N} K={K}")


@gpu
@pytest.mark.parametrize("ctas,k_warps", [(None, None), (1, 4), (3, 1), (14, 2), (1000, 4)], ids=str)
@pytest.mark.parametrize("counts", [[1, 0, 3, 2, 0, 1], [0, 9, 0, 4, 16]], ids=str)
@pytest.mark.parametrize("N,K", [(576, 7168), (129, 130)])
def test_grouped_gemv_partitions(N, K, counts, ctas, k_warps):
    """The grouped GEMV at forced partitions: a CTA's run of units crosses from one expert's weight to the next,
    its cut keys' pieces land in ws by CTA, whatever the group; t8 tiles (groups <= 8 rows) and t16. Bit-identical
    when repeated."""
    import cupy as cp
    rng = cp.random.default_rng(11)
    w = [random_weight(cp, rng, N, K) for _ in counts]
    w8, ws = cp.stack([a for a, _ in w]), cp.stack([b for _, b in w])
    x8, sx = quantize_activations_reference(random_activations(rng, sum(counts), K, cp))
    what = f"N={N} K={K} counts={counts} ctas={ctas} k_warps={k_warps}"
    a, _ = run_grouped(x8, sx, w8, ws, offsets_of(counts), "mma", ctas, k_warps, what=what)
    b, _ = run_grouped(x8, sx, w8, ws, offsets_of(counts), "mma", ctas, k_warps, what=what + " again")
    assert cp.array_equal(a, b)


@gpu
@pytest.mark.parametrize("T", [8, 512])
@pytest.mark.parametrize("path", gpu_paths())
def test_grouped_repeated_runs_bit_identical(path, T, released_experts):
    import cupy as cp
    from kernels.fp8_gemm import fp8_grouped_gemm_gpu
    w8, ws = released_experts(7168, 2048)
    offsets = offsets_of(routing_counts(T, seed=1))
    x8, sx = quantize_activations_reference(random_activations(cp.random.default_rng(3), int(offsets[-1]), 2048, cp))
    first = fp8_grouped_gemm_gpu(x8, sx, w8, ws, offsets, path=path)
    for _ in range(3):
        assert cp.array_equal(fp8_grouped_gemm_gpu(x8, sx, w8, ws, offsets, path=path), first)


@gpu
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("counts", [[1, 0, 2, 1], [0, 40, 3, 200]], ids=str)
def test_grouped_linear_dispatch_end_to_end(counts, bf16):
    """fp8_grouped_linear on CuPy x: one quantisation of all rows, then the grouped launch; offsets on the host
    or the device; equal to fp8_linear group by group up to the kernels' tolerance."""
    import cupy as cp
    rng = cp.random.default_rng(12)
    N, K = 1536, 7168
    w = [random_weight(cp, rng, N, K) for _ in counts]
    w8, ws = cp.stack([a for a, _ in w]), cp.stack([b for _, b in w])
    x = random_activations(rng, sum(counts), K, cp)
    if bf16:
        u = x.view(np.uint32)
        x = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    offsets = offsets_of(counts)
    y = fp8_grouped_linear(x, w8, ws, offsets)
    assert isinstance(y, cp.ndarray) and y.shape == (sum(counts), N) and y.dtype == np.float32
    assert cp.array_equal(fp8_grouped_linear(x, w8, ws, cp.asarray(offsets)), y)
    x8, sx = quantize_activations_reference(x)
    want = fp8_grouped_linear_reference(x, w8, ws, offsets)
    assert_close(cp.asnumpy(y), cp.asnumpy(want), cp.asnumpy(grouped_magnitude(x8, sx, w8, ws, offsets)),
                 MTOL["wgmma"], f"fp8_grouped_linear counts={counts} bf16={bf16}")


@gpu
def test_grouped_gpu_bad_inputs():
    import cupy as cp
    from kernels.fp8_gemm import fp8_grouped_gemm_gpu
    rng = cp.random.default_rng(13)
    w8, ws = (cp.stack([a, a]) for a in random_weight(cp, rng, 200, 300))
    x = random_activations(rng, 4, 300, cp)
    x8, sx = quantize_activations_reference(x)
    with pytest.raises(ValueError, match="w8: expected a CuPy array"):
        fp8_grouped_linear(x, cp.asnumpy(w8), cp.asnumpy(ws), [0, 1, 4])
    with pytest.raises(ValueError, match=r"offsets\[-1\] = 3, expected R = 4"):
        fp8_grouped_linear(x, w8, ws, [0, 1, 3])
    with pytest.raises(ValueError, match="w_scale: dtype float64"):
        fp8_grouped_gemm_gpu(x8, sx, w8, ws.astype(np.float64), [0, 1, 4])
    with pytest.raises(ValueError, match="out: shape"):
        fp8_grouped_gemm_gpu(x8, sx, w8, ws, [0, 1, 4], out=cp.empty((4, 199), np.float32))
    with pytest.raises(ValueError, match="path 'fast'"):
        fp8_grouped_gemm_gpu(x8, sx, w8, ws, [0, 1, 4], path="fast")


@gpu
def test_gemv_tickets_per_stream():
    """Each stream has its own GEMV tickets (kernels._cuda.zeroed_counters), left zero by every launch: a GEMV
    whose keys are cut (576 x 7168 at one token: 9 pieces a key) on a side stream, then on the current one."""
    import cupy as cp
    from kernels._cuda import zeroed_counters
    with cp.cuda.Stream():
        a = run_gemm(1, 576, 7168, "mma", seed=3)
        side = zeroed_counters("gemv_tickets", 1)
        cp.cuda.get_current_stream().synchronize()
    b = run_gemm(1, 576, 7168, "mma", seed=3)
    assert side is not zeroed_counters("gemv_tickets", 1)
    assert cp.array_equal(a, b) and not cp.any(side) and not cp.any(zeroed_counters("gemv_tickets", 1))
