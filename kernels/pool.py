"""HISA stage 1: block mean pooling of the cached indexer keys (kernels/pool.cu beside its reference).

Block b covers positions [b*B, min((b+1)*B, S)); its representative is the mean of the dequantised keys
that exist there (a partial last block is divided by its real count). The engine calls `pool_blocks` after
appending keys to the cache with first_block = old_S // B, so prefill pools every block it touched and
decode refreshes only the partial last block: the prefix is never re-pooled.
"""

import numpy as np

from kernels._cuda import check, check_array, is_gpu, kernel, per_device, xp_of
from kernels.fp8 import E4M3_MAX, E4M3_TABLE, e4m3_encode, e4m3_round

POOLED_SCALE_FLOOR = 1e-10  # pooled fp8 scale = max(amax / 448, floor): not a power of two


def _is_bf16(a):
    return a.dtype == np.uint16 or a.dtype.name == "bfloat16"


def _keys_f32(keys, key_scale):
    """Cached keys as float32 (exact): fp8 bits * per-key scale, bf16 bits widened, or float32 as is."""
    xp = xp_of(keys)
    if key_scale is not None:
        return xp.asarray(E4M3_TABLE)[keys] * key_scale[:, None]
    if _is_bf16(keys):
        return (keys.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return keys.astype(np.float32, copy=False)


def pool_blocks_reference(keys, key_scale, S, B, first_block, pooled, pooled_scale=None):
    """Pool blocks [first_block, ceil(S/B)) of keys[:S] into pooled (and pooled_scale in fp8 mode), in place.

    fp8:   keys uint8 [cap, Di], key_scale f32 [cap] -> pooled uint8 [nb_cap, Di], pooled_scale f32 [nb_cap]
    float: keys f32 (or bf16 bits as uint16) [cap, Di], key_scale None -> pooled f32 [nb_cap, Di]
    mean_b = (sum of k[p] over the block, fp32, in position order) / count
    fp8:   pooled_scale[b] = max(max|mean_b| / 448, 1e-10); pooled[b] = e4m3(clamp(mean_b / scale, +-448))
    Works on numpy or cupy arrays (the kernel adds in the same order, so its bits match).
    """
    xp = xp_of(keys)
    nb = -(-S // B)
    if first_block >= nb:
        return
    Di = keys.shape[1]
    p0 = first_block * B
    n_blk = nb - first_block
    k = xp.zeros((n_blk * B, Di), np.float32)  # zero rows past S: adding +0.0 leaves every sum unchanged
    k[: S - p0] = _keys_f32(keys[p0:S], None if key_scale is None else key_scale[p0:S])
    k = k.reshape(n_blk, B, Di)
    acc = xp.zeros((n_blk, Di), np.float32)
    for i in range(B):  # one add per position, in position order, as each kernel thread does
        acc += k[:, i]
    count = xp.full(n_blk, B, np.float32)
    count[-1] = S - (nb - 1) * B
    mean = acc / count[:, None]  # (n_blk, Di)
    if key_scale is None:
        pooled[first_block:nb] = mean
        return
    amax = xp.abs(mean).max(axis=1)
    scale = xp.maximum(amax / np.float32(E4M3_MAX), np.float32(POOLED_SCALE_FLOOR))  # (n_blk,)
    x = xp.clip(mean / scale[:, None], -E4M3_MAX, E4M3_MAX)
    pooled[first_block:nb] = e4m3_encode(e4m3_round(x))
    pooled_scale[first_block:nb] = scale


@per_device
def _table_gpu():
    import cupy as cp
    return cp.asarray(E4M3_TABLE)


def pool_blocks_gpu(keys, key_scale, S, B, first_block, pooled, pooled_scale=None):
    """Launcher for pool.cu (pool_fp8 / pool_f32 / pool_bf16); same arguments and math as the reference."""
    check(keys.ndim == 2, lambda: f"keys: rank {keys.ndim} (shape {keys.shape}), expected [cap, Di]")
    cap, Di = keys.shape
    nb = -(-S // B)
    check(B >= 1, lambda: f"pool_blocks: block size {B}")
    check(0 <= S <= cap, lambda: f"pool_blocks: S = {S} positions, the key cache holds {cap}")
    check(0 <= first_block, lambda: f"pool_blocks: first_block {first_block}")
    check(1 <= Di <= 1024, lambda: f"pool_blocks: Di = {Di}, one thread per dim allows at most 1024")
    fp8 = key_scale is not None
    if fp8:
        check_array(keys, "keys", np.uint8, ndim=2)
        check_array(key_scale, "key_scale", np.float32, shape=(cap,))
        check_array(pooled, "pooled", np.uint8, ndim=2, shape=(None, Di))
        check(pooled_scale is not None, "pool_blocks: fp8 keys need pooled_scale")
        check_array(pooled_scale, "pooled_scale", np.float32, shape=(pooled.shape[0],))
    else:
        if keys.dtype.name == "bfloat16":
            keys = keys.view(np.uint16)
        check_array(keys, "keys", np.uint16 if keys.dtype == np.uint16 else np.float32, ndim=2)
        check_array(pooled, "pooled", np.float32, ndim=2, shape=(None, Di))
        check(pooled_scale is None, "pool_blocks: float keys have no pooled_scale")
    check(nb <= pooled.shape[0],
          lambda: f"pool_blocks: {nb} blocks for S = {S}, B = {B}; pooled holds {pooled.shape[0]}")
    if first_block >= nb:
        return
    grid = (nb - first_block,)
    block = (-(-Di // 32) * 32,)
    ints = (np.int32(S), np.int32(B), np.int32(first_block), np.int32(Di))
    if fp8:
        kernel("pool.cu", "pool_fp8")(grid, block, (keys, key_scale, _table_gpu(), pooled, pooled_scale) + ints)
    else:
        name = "pool_bf16" if keys.dtype == np.uint16 else "pool_f32"
        kernel("pool.cu", name)(grid, block, (keys, pooled) + ints)


def pool_blocks(keys, key_scale, S, B, first_block, pooled, pooled_scale=None):
    """Dispatch: CuPy arrays to the kernel, numpy arrays to the reference. Updates pooled in place."""
    if is_gpu(keys):
        return pool_blocks_gpu(keys, key_scale, S, B, first_block, pooled, pooled_scale)
    return pool_blocks_reference(keys, key_scale, S, B, first_block, pooled, pooled_scale)
