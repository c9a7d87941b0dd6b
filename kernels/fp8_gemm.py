"""FP8 linear layer with DeepSeek-V3's block scales, y = x W^T, both operands in e4m3.

The weight stays as stored (SPEC section 2): w8 uint8 e4m3 bits [N, K] and w_scale fp32 [ceil(N/128), ceil(K/128)],
real W[n, k] = e4m3(w8[n, k]) * w_scale[n // 128, k // 128]. The activations x [T, K] are quantised per token
and per block of 128 channels with power-of-two scales, the indexer's rule (kernels/fp8.py, quantize_ue8m0):

    x8[t, k] = e4m3(clamp(x[t, k] / sx[t, b], +-448)),  sx[t, b] = 2^ceil(log2(max(amax_b |x[t]|, 1e-4) / 448))
    y[t, n]  = sum_b sx[t, b] * w_scale[n // 128, b] * sum_{k in block b} e4m3(x8[t, k]) * e4m3(w8[n, k])

Each block's dot is formed alone, then scaled and added (the weight scale changes every 128 channels). KB =
ceil(K/128) blocks; x8 has KP = 128 * KB columns, zeros past K, so a ragged last block needs no special case.

fp8_linear, quantize_activations and fp8_gemm dispatch on where their first array lives: numpy arrays go to
the reference (also the GPU tests' oracle), CuPy arrays to kernels/fp8_gemm.cu. On the GPU, x is float32 or
bf16 (uint16 bit patterns, or an ml_dtypes bfloat16 array); y is always float32. The reference takes any
float dtype or bf16 bits and quantises from float32, as the kernels do.

GPU kernels: T <= 16 (decode) a weight-streaming mma.sync GEMV; larger T a persistent, warp-specialised
wgmma GEMM on Hopper (sm_90a) over tiles of 128 tokens x 128 weight rows (96 where that takes no more waves:
wgmma_tile_n), and elsewhere, or with path="mma", the GEMV kernel over tiles of 16 tokens.
The GEMV cuts the product into units of 32-128 weight rows x one 128-channel block and gives every CTA of a
one-wave grid (2 per SM) an equal run of them, cutting K where a layer is too narrow to reach every SM;
each warp keeps 3 units in flight through a cp.async ring. bench/kernels.py fp8gemm times them.

fp8_grouped_linear is the same product for a mixture of experts: rows sorted by expert, the experts' weights
stacked [E, N, K], group e = rows offsets[e] .. offsets[e+1] - 1 multiplied by expert e's weight:

    y[offsets[e]:offsets[e+1]] = fp8_linear(x[offsets[e]:offsets[e+1]], w8[e], w_scale[e])

On the GPU the activations are quantised once for all rows, then one launch runs every group: the kernels
above with a table of (expert, first row, group end) tiles in place of their token-tile index, the GEMV when
no group has more than 16 rows (decode: each used expert's weight streamed once), else the wgmma GEMM.
bench/kernels.py grouped times it against a loop over experts.
"""

import functools
from collections import namedtuple

import numpy as np

from kernels._cuda import (check, check_array, is_gpu, module_sm90a, per_device, sm_count, want, with_dynamic_smem,
                           xp_of, zeroed_counters)
from kernels.fp8 import e4m3_decode, e4m3_encode, fp8_roundtrip, quantize_ue8m0

BLOCK = 128       # channels per scale block, both operands
DECODE_T = 16     # up to this many tokens the GEMV kernel runs (it is memory-bound there)
GV_WARPS = 4      # warps per GEMV CTA                (fp8_gemm.cu GV_WARPS)
GV_STAGES = 4     # cp.async ring slots per warp      (fp8_gemm.cu GV_STAGES)
GV_CTAS_PER_SM = 2  # GEMV CTAs an SM holds: 2 x (gv_smem + 1 KB static + 1 KB reserved) <= 228 KB
GM_TILE = 128     # tokens per wgmma CTA tile, and its weight rows unless plan() takes 96
GM_TILE_N = {128: "fp8_gemm_wgmma", 96: "fp8_gemm_wgmma_n96"}  # weight rows of a tile -> its kernel
GM_STAGES = 6     # ring slots of x and W tiles        (fp8_gemm.cu GM_STAGES)
GM_THREADS = 384  # 2 consumer + 1 producer warpgroup  (fp8_gemm.cu GM_THREADS)
GM_SMEM = 2 * GM_STAGES * 128 * 128 + 2 * GM_STAGES * 8 + 1024  # tiles, mbarriers, alignment (fp8_gemm.cu GM_SMEM)
# "auto": wgmma on sm_90 (Hopper) for T > DECODE_T; "mma" forces the GEMV kernel for every T.
DEFAULT_PATH = "auto"
_U8, _F32 = np.dtype(np.uint8), np.dtype(np.float32)  # for want(), the launchers' quick argument test


def gv_smem(nt):
    """Dynamic shared memory of a GEMV CTA over token tiles of 8 nt rows (fp8_gemm.cu GV_SMEM): per warp
    GV_STAGES slots of 32 weight rows x 128 B + 8 nt x rows x 128 B + 128 B of scales, then red."""
    return GV_WARPS * GV_STAGES * (4096 + 1024 * nt + 128) + 8 * nt * 144 * 4


# One launch's plan. k_warps (GEMV only): warps of a CTA that split K (1, 2, 4; the other 4 / k_warps split the
# rows); pieces: the most CTAs one output's K range is cut into (1: none is cut, no partial sums).
Plan = namedtuple("Plan", "kernel grid block smem k_warps pieces")
GroupedPlan = namedtuple("GroupedPlan", Plan._fields + ("tiles",))


# --- Shapes shared by the reference and the launchers ------------------------------------------------

def _weight_dims(w8, w_scale):
    """(N, K, KB) of an FP8 weight after checking that its scales match it."""
    check(getattr(w8, "ndim", None) == 2,
          lambda: f"w8: expected a 2-D [N, K] array of e4m3 bits, got shape {getattr(w8, 'shape', None)}")
    check(w8.dtype == np.uint8, lambda: f"w8: dtype {w8.dtype}, expected uint8 (e4m3 bit patterns)")
    N, K = w8.shape
    check(N >= 1 and K >= 1, lambda: f"w8: shape {w8.shape}, both dims must be >= 1")
    KB, NB = -(-K // BLOCK), -(-N // BLOCK)
    check(getattr(w_scale, "shape", None) is not None and tuple(w_scale.shape) == (NB, KB),
          lambda: f"w_scale: shape {getattr(w_scale, 'shape', None)}, expected ({NB}, {KB}) = "
                  f"(ceil(N/128), ceil(K/128)) for w8 of shape {w8.shape}")
    return N, K, KB


def _check_quantised(x8, sx, K, KB):
    check(getattr(x8, "ndim", None) == 2,
          lambda: f"x8: expected a 2-D [T, KP] array, got shape {getattr(x8, 'shape', None)}")
    check(x8.dtype == np.uint8, lambda: f"x8: dtype {x8.dtype}, expected uint8 (e4m3 bit patterns)")
    T = x8.shape[0]
    check(x8.shape[1] == KB * BLOCK,
          lambda: f"x8: shape {x8.shape}, expected {KB * BLOCK} columns: K = {K} padded to whole "
                  f"blocks of {BLOCK} (quantize_activations makes it)")
    check(tuple(sx.shape) == (T, KB), lambda: f"sx: shape {sx.shape}, expected ({T}, {KB}) = (T, ceil(K/128))")
    return T


def _flat_tokens(x, K, name="x"):
    """x [..., K] -> [T, K] (a view), and the leading shape to restore."""
    check(getattr(x, "ndim", 0) >= 1, lambda: f"{name}: expected an array [..., K], got {type(x).__name__}")
    check(x.shape[-1] == K,
          lambda: f"{name}: shape {x.shape}, its last dim should be K = {K} (the weight's input size)")
    return x.reshape(-1, K), x.shape[:-1]


def _bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


# --- Reference (numpy or CuPy) ----------------------------------------------------------------------

def quantize_activations_reference(x):
    """x float [T, K] (or bf16 bits uint16) -> x8 uint8 e4m3 bits [T, KP], sx fp32 [T, KB]."""
    xp = xp_of(x)
    check(getattr(x, "ndim", None) == 2,
          lambda: f"x: expected a 2-D [T, K] array, got shape {getattr(x, 'shape', None)}")
    T, K = x.shape
    check(K >= 1, lambda: f"x: shape {x.shape}, K must be >= 1")
    if x.dtype == np.uint16 or x.dtype.name == "bfloat16":
        x = _bf16_to_f32(x.view(np.uint16))
    check(x.dtype.kind == "f", lambda: f"x: dtype {x.dtype}, expected a float dtype or bf16 bits (uint16)")
    KB = -(-K // BLOCK)
    xpad = xp.zeros((T, KB * BLOCK), np.float32)  # zeros do not change a block's amax (it is >= 1e-4)
    xpad[:, :K] = x
    v8, sx = quantize_ue8m0(xpad, BLOCK)
    return e4m3_encode(v8), sx.astype(np.float32)


def fp8_gemm_reference(x8, sx, w8, w_scale):
    """y fp32 [T, N] from quantised activations (x8 [T, KP], sx [T, KB]) and an FP8 weight.

    Every block's dot is exact in float64 (products of e4m3 values have <= 8 significant bits and 128 of
    them span < 53), so the only roundings are the scale multiplications and the block sum in float64."""
    xp = xp_of(x8)
    N, K, KB = _weight_dims(w8, w_scale)
    T = _check_quantised(x8, sx, K, KB)
    xv = e4m3_decode(x8).astype(np.float64)
    sxf = sx.astype(np.float64)
    sw_rows = xp.repeat(w_scale.astype(np.float64), BLOCK, axis=0)[:N]  # [N, KB]: each row's scale row
    y = xp.zeros((T, N), np.float64)
    for b in range(KB):
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, K)
        dot = xv[:, lo:hi] @ e4m3_decode(w8[:, lo:hi]).astype(np.float64).T  # (T, N), exact
        y += dot * sxf[:, b:b + 1] * sw_rows[None, :, b]
    return y.astype(np.float32)


def fp8_linear_reference(x, w8, w_scale):
    N, K, _ = _weight_dims(w8, w_scale)
    x2, lead = _flat_tokens(x, K)
    x8, sx = quantize_activations_reference(x2)
    return fp8_gemm_reference(x8, sx, w8, w_scale).reshape(lead + (N,))


# --- GPU launchers ----------------------------------------------------------------------------------

def _module():
    """fp8_gemm.cu: (module, has_wgmma); see _cuda.module_sm90a."""
    return module_sm90a("fp8_gemm.cu")


@per_device
def _function(name):
    f = _module()[0].get_function(name)
    if "gemm_wgmma" in name:
        return with_dynamic_smem(f, GM_SMEM)
    if "gemv" in name:  # the plan counts on GV_CTAS_PER_SM CTAs per SM: ask for all the shared memory there is
        return with_dynamic_smem(f, gv_smem(2 if name.endswith("t16") else 1), carveout=100)
    return f


def _tickets(n):
    """A ticket for each of n keys: each GEMV launch's last CTA of a cut key resets its ticket."""
    return zeroed_counters("gemv_tickets", max(n, 4096))


@functools.lru_cache(maxsize=4096)  # a pure function of its integers, asked on every launch
def plan(T, N, K, wgmma, num_sms=132, ctas=None, k_warps=None, tile_n=None):
    """Plan of one fp8_gemm call on the GPU. ctas, k_warps: force the GEMV's partition; tile_n: the wgmma tile's
    weight rows, 128 or 96 (tests, benchmarks)."""
    check(T >= 1 and N >= 1 and K >= 1, lambda: f"fp8_gemm: T = {T}, N = {N}, K = {K}, all must be >= 1")
    KB = -(-K // BLOCK)
    if wgmma and T > DECODE_T:  # persistent: at most one CTA per SM, each loops over tiles
        BN = tile_n or wgmma_tile_n(T, N, num_sms)
        check(BN in GM_TILE_N, lambda: f"fp8_gemm: tile_n = {BN}, expected one of {sorted(GM_TILE_N)}")
        tiles = -(-N // BN) * -(-T // GM_TILE)
        return Plan(GM_TILE_N[BN], (min(tiles, num_sms), 1, 1), (GM_THREADS,), GM_SMEM, 0, 1)
    nt = 1 if T <= 8 else 2
    C, kw, pieces = _gemv_partition(-(-T // (8 * nt)), N, KB, num_sms, ctas, k_warps)
    return Plan(f"fp8_gemv_t{8 * nt}", (C, 1, 1), (32 * GV_WARPS,), gv_smem(nt), kw, pieces)


def wgmma_tile_n(T, N, num_sms):
    """Weight rows of the wgmma tile, 128 or 96: 96 where its tiles take no more waves of num_sms CTAs than 128's.
    A 96-row tile then costs less: ~0.93 of a 128-row one's time (H200; its x tile and per-block steps do not
    shrink), so more waves of them lose. At T = 4096 on 132 SMs, of the released shapes only N = 576 takes 96:
    6 x 32 = 192 tiles against 5 x 32 = 160, two waves each, the 128-row tiles' last one half empty."""
    def waves(bn):
        return -(-(-(-N // bn) * -(-T // GM_TILE)) // num_sms)
    return 96 if waves(96) <= waves(128) else 128


def _gemv_partition(Z, N, KB, num_sms, ctas=None, k_warps=None):
    """(CTAs C, k_warps kw, pieces) of a GEMV launch over Z token tiles (fp8_gemm.cu, "Decode GEMV").

    Units are 128 / kw weight rows x one K block; a key is 128 / kw rows of one tile, all its KB blocks. Every CTA
    takes U / C units (+-1), so every SM streams the same bytes. C: GV_CTAS_PER_SM per SM (one wave, all resident),
    but where the whole product is small, no more than leaves each warp 2 units (ring depth 3: a CTA then has all
    its units in flight at once, and keys are cut into fewer pieces), and never fewer than one per SM. kw: the first
    of 1, 2, 4 (wide rows first: the 4 warps share x) whose keys are cut into at most 4 pieces, else the one that
    cuts least. What the released decode shapes get on 132 SMs, at any T <= 16 (a unit is 4 KB of weight per warp;
    a warp has 3 in flight, so a CTA up to 48 KB and an SM up to 96 KB: where a CTA's share is smaller, all of it
    is requested at once):

        N x K          MB    k_warps  keys  units  CTAs  KB per CTA  pieces
        18432 x 7168   132   1         144   8064   264   500         3
        7168 x 18432   132   2         112  16128   264   500         4
        24576 x 1536   37.7  1         192   2304   264   143         3
        4096 x 7168    29.4  4         128   7168   264   111         4     (an expert's gate_up, one tile)
        7168 x 2048    14.7  2         112   1792   264    56         4
        2048 x 7168    14.7  4          64   3584   264    56         6
        1536 x 7168    11.0  4          48   2688   264    42         7
        576 x 7168     4.1   4          18   1008   132    31         9
    """
    cap = GV_CTAS_PER_SM * num_sms

    def option(kw):
        check(kw in (1, 2, 4), lambda: f"fp8_gemm: k_warps = {kw}, expected 1, 2 or 4")
        keys = Z * -(-N // (128 // kw))
        U = keys * KB
        C = ctas if ctas is not None else min(cap, max(num_sms, -(-U // (2 * kw))))
        C = max(1, min(C, U))
        check(keys < 2**31 and C * U < 2**62,
              lambda: f"fp8_gemm: {keys} keys x {KB} blocks over {C} CTAs is beyond the "
                       "kernel's integer ranges")
        return C, kw, _pieces(U, C, KB)
    if k_warps is not None:
        return option(k_warps)
    options = [option(kw) for kw in (1, 2, 4)]
    return next((o for o in options if o[2] <= 4), min(options, key=lambda o: o[2]))


def _pieces(U, C, KB):
    """The most CTAs that one key (KB consecutive units) meets when C CTAs share U units in equal runs: each run
    has m >= U // C units, so a key meets its first and last CTA (>= 1 unit each) and at most (KB - 2) // m between."""
    if KB == 1:
        return 1
    return min(KB, C, 2 + (KB - 2) // (U // C))


def _activation_bits(x):
    """float32 passes; bf16 (uint16 bits or ml_dtypes bfloat16) becomes uint16 bits; anything else is refused."""
    if x.dtype == np.float32:  # the common case first: a dtype's name costs microseconds
        return x
    if x.dtype.name == "bfloat16":
        return x.view(np.uint16)
    check(x.dtype in (np.float32, np.uint16),
          lambda: f"x: dtype {x.dtype}, the GPU path takes float32 or bf16 (uint16 bits / bfloat16); convert it first")
    return x


def quantize_activations_gpu(x, *, x8=None, sx=None):
    """Launcher for fp8_gemm.cu:quantize_act_*. x float32 or bf16 bits [T, K] -> x8 uint8 [T, KP], sx fp32 [T, KB]."""
    import cupy as cp
    check(is_gpu(x) and x.ndim == 2,
          lambda: f"x: expected a CuPy array [T, K], got {type(x).__name__} {getattr(x, 'shape', '')}")
    x = _activation_bits(x)
    T, K = x.shape
    check(K >= 1, lambda: f"x: shape {x.shape}, K must be >= 1")
    want(x, "x", x.dtype, (T, K))
    KB = -(-K // BLOCK)
    if x8 is None:
        x8 = cp.empty((T, KB * BLOCK), np.uint8)
    if sx is None:
        sx = cp.empty((T, KB), np.float32)
    want(x8, "x8", _U8, (T, KB * BLOCK))
    want(sx, "sx", _F32, (T, KB))
    check(x8.data.ptr % 4 == 0, "x8: must be 4-byte aligned")
    if T == 0:
        return x8, sx
    vec = K % 4 == 0 and x.data.ptr % 16 == 0  # 4 channels per lane in one load
    warps = T * KB  # one per (token, block)
    name = "quantize_act_bf16" if x.dtype == np.uint16 else "quantize_act_f32"
    _function(name)((-(-warps // 8),), (256,), (x, x8, sx, np.int32(T), np.int32(K), np.int32(vec)))
    return x8, sx


def fp8_gemm_gpu(x8, sx, w8, w_scale, *, out=None, path=None, ctas=None, k_warps=None, tile_n=None):
    """Launcher for fp8_gemm.cu's GEMM/GEMV. x8 uint8 [T, KP], sx fp32 [T, KB], w8 uint8 [N, K],
    w_scale fp32 [ceil(N/128), KB] -> y fp32 [T, N]. path: "auto" / "wgmma" / "mma" (None: DEFAULT_PATH);
    ctas, k_warps: force the GEMV's partition, tile_n the wgmma tile's weight rows (None: plan()'s choice)."""
    import cupy as cp
    N, K, KB = _weight_dims(w8, w_scale)
    want(w8, "w8", _U8, (N, K))
    T = _check_quantised(x8, sx, K, KB)
    want(x8, "x8", _U8, (T, KB * BLOCK))
    want(sx, "sx", _F32, (T, KB))
    want(w_scale, "w_scale", _F32, (-(-N // BLOCK), KB))
    check(x8.data.ptr % 16 == 0, "x8: must be 16-byte aligned (its rows are read in 16-byte pieces)")
    if out is None:
        out = cp.empty((T, N), np.float32)
    want(out, "out", _F32, (T, N))
    if T == 0:
        return out

    path = path or DEFAULT_PATH
    check(path in ("auto", "wgmma", "mma"), lambda: f"fp8_gemm: path {path!r}, expected auto, wgmma or mma")
    has_wgmma = _module()[1]
    check(path != "wgmma" or has_wgmma, "fp8_gemm: the wgmma kernel needs an sm_90 GPU (sm_90a build)")
    p = plan(T, N, K, has_wgmma and path != "mma", sm_count(), ctas, k_warps, tile_n)
    vec = np.int32(K % 16 == 0 and w8.data.ptr % 16 == 0)  # else byte loads: correct, slow, never a real layer
    if p.kernel in GM_TILE_N.values():
        _function(p.kernel)(p.grid, p.block, (x8, sx, w8, w_scale, out, np.int32(T), np.int32(N), np.int32(K), vec,
                                              np.int32(p.smem)), shared_mem=p.smem)
        return out
    ws, tickets = _gemv_buffers(p, -(-T // (8 if T <= 8 else 16)), N, out)
    _function(p.kernel)(p.grid, p.block, (x8, sx, w8, w_scale, out, ws, tickets, np.int32(T), np.int32(N),
                                          np.int32(K), vec, np.int32(p.k_warps), np.int32(p.smem)),
                        shared_mem=p.smem)
    return out


def _gemv_buffers(p, Z, N, out):
    """(ws, tickets) of a GEMV launch over Z token tiles: 2 partial-sum slots of 8 nt tokens x 128 / k_warps rows
    per CTA and a ticket per key, where the plan cuts some key (else out and one ticket, never touched)."""
    if p.pieces == 1:
        return out, _tickets(1)
    import cupy as cp
    rows = 128 // p.k_warps
    tokens = 8 if p.kernel.endswith("t8") else 16
    return cp.empty(2 * p.grid[0] * tokens * rows, np.float32), _tickets(Z * -(-N // rows))


def fp8_linear_gpu(x, w8, w_scale, *, out=None, path=None):
    """quantize_activations_gpu then fp8_gemm_gpu (which checks w8 and w_scale are CuPy arrays). x [..., K] float32
    or bf16 -> y fp32 [..., N]."""
    N, K, _ = _weight_dims(w8, w_scale)
    check(is_gpu(x), lambda: f"x: expected a CuPy array (w8 is one), got {type(x).__name__}")
    x2, lead = _flat_tokens(x, K)
    if out is not None:
        check(tuple(out.shape) == lead + (N,), lambda: f"out: shape {out.shape}, expected {lead + (N,)}")
        out = out.reshape(-1, N)
    x8, sx = quantize_activations_gpu(x2)
    return fp8_gemm_gpu(x8, sx, w8, w_scale, out=out, path=path).reshape(lead + (N,))


# --- Grouped products: rows sorted by expert, one weight per expert ------------------------------------

def _stacked_dims(w8, w_scale):
    """(E, N, K, KB) of stacked FP8 weights after checking that their scales match them."""
    check(getattr(w8, "ndim", None) == 3,
          lambda: f"w8: expected a 3-D [E, N, K] array of e4m3 bits (the experts stacked), got shape "
                  f"{getattr(w8, 'shape', None)}")
    check(w8.dtype == np.uint8, lambda: f"w8: dtype {w8.dtype}, expected uint8 (e4m3 bit patterns)")
    E, N, K = w8.shape
    check(E >= 1 and N >= 1 and K >= 1, lambda: f"w8: shape {w8.shape}, every dim must be >= 1")
    KB, NB = -(-K // BLOCK), -(-N // BLOCK)
    check(getattr(w_scale, "shape", None) is not None and tuple(w_scale.shape) == (E, NB, KB),
          lambda: f"w_scale: shape {getattr(w_scale, 'shape', None)}, expected ({E}, {NB}, {KB}) = (E, ceil(N/128), "
                  f"ceil(K/128)) for w8 of shape {w8.shape}")
    return E, N, K, KB


def group_offsets(offsets, E, R):
    """The group offsets as a host int64 array [E + 1], checked: 0 first, never decreasing, R last."""
    o = offsets.get() if is_gpu(offsets) else np.asarray(offsets)
    check(o.ndim == 1 and o.shape[0] == E + 1,
          lambda: f"offsets: shape {o.shape}, expected ({E + 1},) = (E + 1,) for {E} experts")
    check(o.dtype.kind in "iu", lambda: f"offsets: dtype {o.dtype}, expected integers")
    o = o.astype(np.int64)
    check(o[0] == 0, lambda: f"offsets[0] = {o[0]}, expected 0 (group 0 starts at row 0)")
    down = np.flatnonzero(np.diff(o) < 0)
    if down.size:
        i = int(down[0])
        raise ValueError(f"offsets must not decrease: offsets[{i}] = {o[i]} > offsets[{i + 1}] = {o[i + 1]}")
    check(o[-1] == R, lambda: f"offsets[-1] = {o[-1]}, expected R = {R}, the rows of x")
    return o


def group_tiles(offsets, rows):
    """int32 [n, 3], one row per tile of at most `rows` rows of a group: (expert e, the tile's first row,
    offsets[e + 1] = the end of e's rows). Experts in order, an expert's tiles in row order, none for an empty
    group; no tile holds two experts' rows."""
    offsets = np.asarray(offsets, np.int64)
    counts = np.diff(offsets)
    per = -(-counts // rows)                                      # tiles of each expert
    expert = np.repeat(np.arange(len(counts)), per)
    first = np.repeat(np.cumsum(per) - per, per)                  # index of the expert's first tile
    r0 = offsets[expert] + (np.arange(len(expert)) - first) * rows
    return np.stack([expert, r0, offsets[expert + 1]], axis=1).astype(np.int32)


def plan_grouped(offsets, N, K, wgmma, num_sms=132, ctas=None, k_warps=None):
    """GroupedPlan (a Plan and its tile table) of one grouped call on the GPU.

    As plan() picks by T, this picks by the largest group: wgmma tiles of 128 rows when one has more than
    DECODE_T rows (and wgmma is there), else GEMV tiles of 8 rows (every group <= 8) or 16, the GEMV's units
    spread over all the tiles' weights at once (each used expert's weight is streamed once)."""
    offsets = np.asarray(offsets, np.int64)
    G = int(np.diff(offsets).max())
    check(G >= 1 and N >= 1 and K >= 1,
          lambda: f"fp8_grouped_gemm: largest group {G} rows, N = {N}, K = {K}, all must be >= 1")
    KB = -(-K // BLOCK)
    if wgmma and G > DECODE_T:
        tiles = group_tiles(offsets, GM_TILE)
        n_tiles = len(tiles) * -(-N // GM_TILE)  # CTA tiles, run by a persistent grid of at most one CTA per SM
        check(n_tiles < 2**31,
              lambda: f"fp8_grouped_gemm: {n_tiles} CTA tiles, more than the kernel's int indices hold")
        return GroupedPlan("fp8_grouped_gemm_wgmma", (min(n_tiles, num_sms), 1, 1), (GM_THREADS,), GM_SMEM, 0, 1,
                           tiles)
    nt = 1 if G <= 8 else 2
    tiles = group_tiles(offsets, 8 * nt)
    C, kw, pieces = _gemv_partition(len(tiles), N, KB, num_sms, ctas, k_warps)
    return GroupedPlan(f"fp8_grouped_gemv_t{8 * nt}", (C, 1, 1), (32 * GV_WARPS,), gv_smem(nt), kw, pieces, tiles)


def fp8_grouped_gemm_reference(x8, sx, w8, w_scale, offsets):
    """y fp32 [R, N] from quantised rows (x8 [R, KP], sx [R, KB]): fp8_gemm_reference on each group."""
    xp = xp_of(x8)
    E, N, K, KB = _stacked_dims(w8, w_scale)
    R = _check_quantised(x8, sx, K, KB)
    offsets = group_offsets(offsets, E, R)
    y = xp.zeros((R, N), np.float32)
    for e in np.flatnonzero(np.diff(offsets)):
        lo, hi = offsets[e], offsets[e + 1]
        y[lo:hi] = fp8_gemm_reference(x8[lo:hi], sx[lo:hi], w8[e], w_scale[e])
    return y


def fp8_grouped_linear_reference(x, w8, w_scale, offsets):
    """y fp32 [R, N], y[offsets[e]:offsets[e+1]] = fp8_linear_reference of those rows with expert e's weight."""
    xp = xp_of(x)
    E, N, K, _ = _stacked_dims(w8, w_scale)
    check(getattr(x, "ndim", None) == 2 and x.shape[1] == K,
          lambda: f"x: shape {getattr(x, 'shape', None)}, expected [R, K = {K}] (K: the weights' input size)")
    offsets = group_offsets(offsets, E, x.shape[0])
    y = xp.zeros((x.shape[0], N), np.float32)
    for e in np.flatnonzero(np.diff(offsets)):
        lo, hi = offsets[e], offsets[e + 1]
        y[lo:hi] = fp8_linear_reference(x[lo:hi], w8[e], w_scale[e])
    return y


def fp8_grouped_gemm_gpu(x8, sx, w8, w_scale, offsets, *, out=None, path=None, ctas=None, k_warps=None):
    """Launcher for fp8_gemm.cu's grouped kernels. x8 uint8 [R, KP], sx fp32 [R, KB] (rows sorted by expert),
    w8 uint8 [E, N, K], w_scale fp32 [E, ceil(N/128), KB], offsets ints [E + 1] (host or device) -> y fp32
    [R, N]. path, ctas and k_warps as fp8_gemm_gpu's."""
    import cupy as cp
    check_array(w8, "w8", np.uint8, ndim=3)
    E, N, K, KB = _stacked_dims(w8, w_scale)
    check_array(x8, "x8", np.uint8, ndim=2)
    R = _check_quantised(x8, sx, K, KB)
    check_array(sx, "sx", np.float32, shape=(R, KB))
    check_array(w_scale, "w_scale", np.float32, shape=(E, -(-N // BLOCK), KB))
    check(x8.data.ptr % 16 == 0, "x8: must be 16-byte aligned (its rows are read in 16-byte pieces)")
    check(R < 2**31, lambda: f"x8: {R} rows, the kernels index rows with 32-bit ints")
    offsets = group_offsets(offsets, E, R)
    if out is None:
        out = cp.empty((R, N), np.float32)
    check_array(out, "out", np.float32, shape=(R, N))
    if R == 0:
        return out

    path = path or DEFAULT_PATH
    check(path in ("auto", "wgmma", "mma"), lambda: f"fp8_grouped_gemm: path {path!r}, expected auto, wgmma or mma")
    has_wgmma = _module()[1]
    check(path != "wgmma" or has_wgmma, "fp8_grouped_gemm: the wgmma kernel needs an sm_90 GPU (sm_90a build)")
    p = plan_grouped(offsets, N, K, has_wgmma and path != "mma", sm_count(), ctas, k_warps)
    tiles = cp.asarray(p.tiles)  # a few KB from the host; freed to CuPy's pool, reused only after this launch
    n_tiles = np.int32(len(tiles))
    vec = np.int32(K % 16 == 0 and w8.data.ptr % 16 == 0)  # then every expert's rows are 16-byte aligned too
    if p.kernel == "fp8_grouped_gemm_wgmma":
        _function(p.kernel)(p.grid, p.block, (x8, sx, w8, w_scale, out, tiles, n_tiles, np.int32(N), np.int32(K),
                                              vec, np.int32(p.smem)), shared_mem=p.smem)
        return out
    ws, tickets = _gemv_buffers(p, len(tiles), N, out)
    _function(p.kernel)(p.grid, p.block, (x8, sx, w8, w_scale, out, ws, tickets, tiles, n_tiles, np.int32(N),
                                          np.int32(K), vec, np.int32(p.k_warps), np.int32(p.smem)),
                        shared_mem=p.smem)
    return out


def fp8_grouped_linear_gpu(x, w8, w_scale, offsets, *, out=None, path=None):
    """quantize_activations_gpu over all R rows, then fp8_grouped_gemm_gpu. x [R, K] float32 or bf16 -> y fp32 [R, N]."""
    check_array(w8, "w8", np.uint8, ndim=3)
    E, N, K, _ = _stacked_dims(w8, w_scale)
    check(is_gpu(x), lambda: f"x: expected a CuPy array (w8 is one), got {type(x).__name__}")
    check(x.ndim == 2 and x.shape[1] == K,
          lambda: f"x: shape {x.shape}, expected [R, K = {K}] (K: the weights' input size)")
    offsets = group_offsets(offsets, E, x.shape[0])
    x8, sx = quantize_activations_gpu(x)
    return fp8_grouped_gemm_gpu(x8, sx, w8, w_scale, offsets, out=out, path=path)


# --- Dispatch ---------------------------------------------------------------------------------------

def quantize_activations(x):
    """x [T, K] -> (x8 uint8 e4m3 bits [T, KP], sx fp32 [T, KB]): the kernel for CuPy x, the reference otherwise."""
    if is_gpu(x):
        return quantize_activations_gpu(x)
    return quantize_activations_reference(x)


def quantize_rows(v):
    """The indexer's q and k in released FP8 numerics: one ue8m0 scale per row of n <= 128 values (v [..., n])
    -> (e4m3 bits [..., n], scales [...]). The values of kernels/fp8.py's quantize_ue8m0 + e4m3_encode (the
    scales bit for bit; a zero may differ in its sign bit), in one launch on the GPU (a row shorter than 128 is
    zero-padded there, which leaves its amax unchanged)."""
    n = v.shape[-1]
    check(n <= BLOCK, lambda: f"quantize_rows: rows of {n} values, one scale covers at most {BLOCK}")
    if not is_gpu(v):
        v8, s = quantize_ue8m0(v)
        return e4m3_encode(v8), s[..., 0]
    import cupy as cp
    x8, sx = quantize_activations_gpu(v.reshape(-1, n).astype(np.float32, copy=False))
    return cp.ascontiguousarray(x8[:, :n]).reshape(v.shape), cp.ascontiguousarray(sx[:, 0]).reshape(v.shape[:-1])


def fp8_roundtrip_rows(v):
    """kernels/fp8.py's fp8_roundtrip(v, 128) for v [T, n] (the latent cache's rounding): the same values, from
    one quantisation launch and a decode on the GPU instead of a chain of elementwise operations."""
    T, n = v.shape
    if not is_gpu(v) or (n > BLOCK and n % BLOCK):  # the reference's blocks are min(128, n) wide
        return fp8_roundtrip(v, BLOCK)
    x8, sx = quantize_activations_gpu(v.astype(np.float32, copy=False))
    KB = sx.shape[1]
    y = e4m3_decode(x8).reshape(T, KB, BLOCK) * sx[..., None]
    return y.reshape(T, KB * BLOCK)[:, :n]


def fp8_gemm(x8, sx, w8, w_scale, out=None):
    """y fp32 [T, N] from quantised activations; kernel for CuPy x8, reference otherwise."""
    if is_gpu(x8):
        return fp8_gemm_gpu(x8, sx, w8, w_scale, out=out)
    y = fp8_gemm_reference(x8, sx, w8, w_scale)
    return _into(out, y)


def fp8_linear(x, w8, w_scale, out=None):
    """y = x W^T fp32 [..., N] for x [..., K] and the FP8 weight (w8 [N, K], w_scale [ceil(N/128), ceil(K/128)]):
    the kernels for CuPy x, the numpy reference otherwise."""
    if is_gpu(x):
        return fp8_linear_gpu(x, w8, w_scale, out=out)
    check(not is_gpu(w8), "w8: a CuPy array, but x is not: keep both on one device")
    return _into(out, fp8_linear_reference(x, w8, w_scale))


def fp8_grouped_linear(x, w8, w_scale, offsets, out=None):
    """y fp32 [R, N] for x [R, K] (rows sorted by expert), stacked FP8 weights w8 [E, N, K] and w_scale
    [E, ceil(N/128), ceil(K/128)], and offsets [E + 1]: rows offsets[e] .. offsets[e+1] - 1 (maybe none) times
    expert e's weight, as fp8_linear computes them. One launch for CuPy x, the numpy reference otherwise."""
    if is_gpu(x):
        return fp8_grouped_linear_gpu(x, w8, w_scale, offsets, out=out)
    check(not is_gpu(w8), "w8: a CuPy array, but x is not: keep both on one device")
    return _into(out, fp8_grouped_linear_reference(x, w8, w_scale, offsets))


def _into(out, y):
    if out is None:
        return y
    check(out.shape == y.shape and out.dtype == np.float32,
          lambda: f"out: shape {out.shape} dtype {out.dtype}, expected {y.shape} float32")
    out[...] = y
    return out
