"""FP8 e4m3 arithmetic in numpy/CuPy (the same code runs on either), and block dequantisation.

e4m3 ("fn" flavour, as in the checkpoints): 1 sign, 4 exponent (bias 7), 3 mantissa bits; largest
finite value 448, smallest normal 2^-6, subnormal step 2^-9, no infinities, 0x7f/0xff are NaN.
FP8 data is held as uint8 bit patterns (CuPy has no fp8 dtype).
"""
import numpy as np

from kernels._cuda import check, check_array, is_gpu, kernel, xp_of

E4M3_MAX = 448.0


def _decode_table():
    table = np.zeros(256, np.float32)
    for b in range(256):
        e, m = (b >> 3) & 15, b & 7
        v = m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        table[b] = -v if b & 0x80 else v
    table[0x7F] = table[0xFF] = np.nan
    return table


E4M3_TABLE = _decode_table()  # bits -> float32


def e4m3_round(x):
    """Round to the nearest e4m3 value (ties to even), saturating at +-448; result in x's float dtype."""
    xp = xp_of(x)
    _, e = xp.frexp(xp.abs(x))  # |x| = f * 2^e, f in [0.5, 1): the leading bit is 2^(e-1)
    step = xp.ldexp(xp.ones_like(x), xp.maximum(e - 4, -9))  # 3 mantissa bits below it; subnormals 2^-9
    return xp.clip(xp.rint(x / step) * step, -E4M3_MAX, E4M3_MAX)


def e4m3_encode(v):
    """Bit patterns (uint8) of values that are already exact e4m3 numbers (e.g. from e4m3_round)."""
    xp = xp_of(v)
    a = xp.abs(v).astype(np.float32)
    _, e = xp.frexp(a)
    e = e - 1  # a = 1.m * 2^e
    normal = a >= 2.0**-6
    exp_field = xp.where(normal, e + 7, 0)
    mant = xp.where(normal, xp.ldexp(a, -e) * 8 - 8, a * 2.0**9)
    bits = (xp.signbit(v).astype(np.int32) << 7) | (exp_field.astype(np.int32) << 3) | mant.astype(np.int32)
    return bits.astype(np.uint8)


def e4m3_decode(bits):
    xp = xp_of(bits)
    return xp.asarray(E4M3_TABLE)[bits]


def ceil_pow2(x):
    """2^ceil(log2 x) for x > 0, exactly (the 'ue8m0' scale format)."""
    xp = xp_of(x)
    f, e = xp.frexp(x)
    return xp.ldexp(xp.ones_like(x), xp.where(f == 0.5, e - 1, e))


def quantize_ue8m0(v, block=128):
    """Released FP8 numerics for activations: per `block` trailing values, a power-of-two scale.

    amax = max(max|v|, 1e-4); s = 2^ceil(log2(amax / 448)); v8 = e4m3(clamp(v / s, -448, 448)).
    Returns (v8 as float values, s) with s of shape v.shape[:-1] + (n_blocks,); v ~= v8 * s.
    """
    xp = xp_of(v)
    n = v.shape[-1]
    block = min(block, n)
    check(n % block == 0, lambda: f"quantize_ue8m0: last dim {n} is not a multiple of the block {block}")
    vb = v.reshape(v.shape[:-1] + (n // block, block)).astype(np.float32)
    amax = xp.maximum(xp.abs(vb).max(axis=-1), np.float32(1e-4))
    s = ceil_pow2(amax / np.float32(E4M3_MAX))
    v8 = e4m3_round(xp.clip(vb / s[..., None], -E4M3_MAX, E4M3_MAX))
    return v8.reshape(v.shape), s


def fp8_roundtrip(v, block=128):
    """v rounded through e4m3 with ue8m0 block scales and back (what an FP8 cache holds)."""
    v8, s = quantize_ue8m0(v, block)
    n = v.shape[-1]
    block = min(block, n)
    return (v8.reshape(v.shape[:-1] + (n // block, block)) * s[..., None]).reshape(v.shape)


# --- Weight dequantisation: W[i, j] = W8[i, j] * scale_inv[i // 128, j // 128] ---------------------

def dequant_weight_reference(w8, scale_inv, block=128):
    """w8: uint8 e4m3 bits [O, I]; scale_inv: fp32 [ceil(O/128), ceil(I/128)] -> fp32 [O, I]."""
    xp = xp_of(w8)
    w = e4m3_decode(w8)
    s = xp.repeat(xp.repeat(scale_inv.astype(np.float32), block, axis=0), block, axis=1)
    return w * s[: w.shape[0], : w.shape[1]]


def dequant_weight_gpu(w8, scale_inv, out_dtype=np.float32, block=128):
    """Launcher for fp8.cu:dequant_fp8_block. Same math as the reference; out fp32 or bf16 (as uint16)."""
    import cupy as cp
    O, I = w8.shape
    check_array(w8, "w8", np.uint8, ndim=2)
    check_array(scale_inv, "scale_inv", np.float32, shape=(-(-O // block), -(-I // block)))
    check(block == 128, lambda: f"dequant_weight_gpu: block {block}, the kernel assumes 128")
    bf16 = np.dtype(out_dtype) != np.float32
    out = cp.empty((O, I), np.uint16 if bf16 else np.float32)
    table = cp.asarray(E4M3_TABLE)
    n = O * I
    threads = 256
    kernel("fp8.cu", "dequant_fp8_block_bf16" if bf16 else "dequant_fp8_block_f32")(
        ((n + threads - 1) // threads,), (threads,),
        (w8, scale_inv, table, out, np.int32(O), np.int32(I)))
    return out


def dequant_weight(w8, scale_inv):
    if is_gpu(w8):
        return dequant_weight_gpu(w8, scale_inv)
    return dequant_weight_reference(w8, scale_inv)
