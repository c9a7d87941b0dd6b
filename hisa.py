"""HISA: Hierarchical Indexed Sparse Attention, a drop-in for the DSA indexer's flat top-K (SPEC §6).

DSA scores every earlier key for every query (O(L^2) per layer). HISA scores in two stages:

  1. block stage: cut the keys into blocks of B positions, represent each block by the mean of its
     (cached) indexer keys, score the means with the same queries and head weights as DSA,
         J[t, b] = sum_j w[t,j] * ReLU(q[t,j] . k_mean[b]),
     force the first block and the query's own block in (+inf), and keep the m best blocks;
  2. token stage: the exact DSA score I[t, s] for every visible s inside the kept blocks only, and the
     top K of those candidates become the selected set.

While a query sees at most m*B keys every block is kept, so HISA returns exactly DSA's set; beyond that
it reads (L/B + m*B) keys per query instead of L. The block-sparse baseline stops after stage 1 with
m' = K/B blocks and attends to every token in them.

The pooled keys live beside the indexer's key cache and grow with it: appending tokens re-pools only the
blocks they touch (decode refreshes just the partial last block).
"""
import numpy as np

from kernels import hisa_decode
from kernels._cuda import is_gpu, is_whole, xp_of
from kernels.hisa_tokens import hisa_token_scores
from kernels.indexer import hisa_block_scores
from kernels.pool import pool_blocks
from kernels.topk import topk


class PooledKeys:
    """Block means of one layer's indexer key cache: fp8 bits with one scale per block, or fp32."""

    def __init__(self, index_cache, B):
        if not is_whole(B, 1):
            raise ValueError(f"PooledKeys: block size {B}, expected a whole number >= 1")
        keys = index_cache["k"]
        xp = xp_of(keys)
        capacity, Di = keys.shape
        n_blocks = -(-capacity // B)
        self.index_cache, self.B, self.length = index_cache, B, 0
        fp8 = index_cache["k_scale"] is not None
        self.k = xp.zeros((n_blocks, Di), np.uint8 if fp8 else np.float32)       # (capacity/B, Di)
        self.k_scale = xp.zeros(n_blocks, np.float32) if fp8 else None

    def update(self, start, S):
        """Keys [start, S) were just appended: re-pool the blocks they touch. start <= the length pooled so far
        (a gap would leave blocks never pooled) and S <= the cache's capacity."""
        capacity = self.index_cache["k"].shape[0]
        if not 0 <= start <= min(self.length, S) or S > capacity:
            raise ValueError(f"PooledKeys.update: keys [{start}, {S}) with {self.length} pooled so far and a "
                             f"cache of {capacity}: need 0 <= start <= {self.length}, start <= S <= {capacity}")
        pool_blocks(self.index_cache["k"], self.index_cache["k_scale"], S, self.B, start // self.B, self.k, self.k_scale)
        self.length = S


def block_scores(q, q_scale, w, pooled, ends):
    """J[t, b] over the blocks a query can see, b < ceil(ends[t] / B); first and own block +inf, future blocks
    -inf. One kernel launch on the GPU: the block range and the forcing are worked out inside it."""
    n_blocks = -(-pooled.length // pooled.B)  # ends never pass the pooled length
    return hisa_block_scores(q, w, pooled.k, ends, pooled.B, q_scale=q_scale,
                             k_scale=None if q_scale is None else pooled.k_scale, n=n_blocks)  # (T, n_blocks)


def select(q, q_scale, w, index_cache, pooled, ends, K, m, fused=None):
    """HISA's selected positions (T, K), ascending, -1 padded: top-m blocks, then exact top-K inside.

    On the GPU a few fp8 queries (decode: up to hisa_decode.MAX_QUERIES) take one fused launch
    (kernels/hisa_decode.cu); otherwise the four steps below run as four kernels (or as the numpy
    references). fused=False always takes the four steps (tests, benchmarks)."""
    if not (K >= 1 and m >= 1):
        raise ValueError(f"hisa.select: K = {K} positions and m = {m} blocks, both must be >= 1")
    if not is_gpu(ends) and len(ends) and int(np.max(ends)) > pooled.length:  # on the GPU the kernels clamp
        raise ValueError(f"hisa.select: ends reach {int(np.max(ends))}, past the {pooled.length} positions pooled "
                         f"(PooledKeys.update first)")
    if is_gpu(q) and fused is not False and len(ends) <= hisa_decode.MAX_QUERIES:
        n_blocks = -(-pooled.length // pooled.B)
        if hisa_decode.why_not(len(ends), q.shape[1], q.shape[2], q_scale is not None, n_blocks, m, pooled.B,
                               K) is None:
            return hisa_decode.select_gpu(q, q_scale, w, pooled.k, pooled.k_scale, n_blocks, index_cache["k"],
                                          index_cache["k_scale"], ends, pooled.B, m, K)
    blocks = topk(block_scores(q, q_scale, w, pooled, ends), m)                  # (T, m) ascending block ids
    cand = hisa_token_scores(q, w, index_cache["k"], blocks, pooled.B, ends, q_scale=q_scale,
                             key_scale=index_cache["k_scale"])                    # (T, m*B)
    # blocks ascending and slots ascending keep candidates in position order, so ties still go to the
    # lower position, exactly as in DSA's flat top-K; the top-K writes positions blocks[t, slot // B] * B +
    # slot % B straight away (-1 past ends[t], which only a -inf candidate could reach)
    return topk(cand, K, blocks=blocks, B=pooled.B, ends=ends)                    # (T, K)


def block_select(q, q_scale, w, pooled, ends, K):
    """Block-sparse baseline: the best K/B blocks (first and own forced), every visible token in them."""
    xp = xp_of(q)
    B = pooled.B
    blocks = topk(block_scores(q, q_scale, w, pooled, ends), max(1, K // B))      # (T, K/B)
    pos = blocks[:, :, None] * B + xp.arange(B, dtype=np.int32)                   # (T, K/B, B)
    valid = (blocks[:, :, None] >= 0) & (pos < ends[:, None, None])
    return xp.where(valid, pos, -1).reshape(len(ends), -1).astype(np.int32)       # (T, K)
