"""Where HISA's time goes: each stage timed alone at the released dimensions (GPU), host time included (CUDA
events around each call, so a stage whose launches outlast its kernels shows its host cost). The fused stages
hisa.select uses (block scores in one launch, the top-K writing positions) beside what they replaced.

    python bench/stages.py [--lengths 32768,131072] [--queries 1024]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cupy as cp  # noqa: E402

import hisa  # noqa: E402
from bench.bench import B, K, M, make_inputs, timeit  # noqa: E402
from kernels.hisa_tokens import force_blocks, hisa_token_scores, slots_to_positions  # noqa: E402
from kernels.indexer import index_scores  # noqa: E402
from kernels.topk import topk  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--queries", default="1024,1")
    args = ap.parse_args()
    for L in map(int, args.lengths.split(",")):
        for Q in map(int, args.queries.split(",")):
            q, qs, w, cache, _ = make_inputs(L, Q)
            ends = cp.asarray(np.arange(L - Q + 1, L + 1, dtype=np.int32))
            pooled = hisa.PooledKeys(cache, B)
            pooled.update(0, L)
            J = hisa.block_scores(q, qs, w, pooled, ends)
            nb = -(-L // B)
            blocks = topk(J, M)
            cand = hisa_token_scores(q, w, cache["k"], blocks, B, ends, q_scale=qs, key_scale=cache["k_scale"])
            slots = topk(cand, K)
            I = index_scores(q, w, cache["k"], ends, q_scale=qs, k_scale=cache["k_scale"])

            def unfused_block_scores():  # what hisa.block_scores did before it became one launch
                bends = (ends + np.int32(B - 1)) // np.int32(B)
                J = index_scores(q, w, pooled.k[:nb], bends, q_scale=qs, k_scale=pooled.k_scale[:nb])
                return force_blocks(J, ends, B)

            t = {
                "dsa scores": timeit(lambda: index_scores(q, w, cache["k"], ends, q_scale=qs, k_scale=cache["k_scale"])),
                "dsa top-k": timeit(lambda: topk(I, K)),
                "hisa block scores (1 launch)": timeit(lambda: hisa.block_scores(q, qs, w, pooled, ends)),
                "  unfused: block ends + index_scores + force_blocks": timeit(unfused_block_scores),
                "  of which force_blocks": timeit(lambda: force_blocks(J, ends, B)),
                "hisa top-m": timeit(lambda: topk(J, M)),
                "hisa token scores": timeit(lambda: hisa_token_scores(q, w, cache["k"], blocks, B, ends, q_scale=qs,
                                                                      key_scale=cache["k_scale"])),
                "hisa top-k -> positions (1 launch)": timeit(lambda: topk(cand, K, blocks=blocks, B=B, ends=ends)),
                "  top-k alone": timeit(lambda: topk(cand, K)),
                "  slots->pos alone (unfused)": timeit(lambda: slots_to_positions(slots, blocks, B)),
                "hisa select (all)": timeit(lambda: hisa.select(q, qs, w, cache, pooled, ends, K, M)),
                "empty launch": timeit(lambda: cp.empty(1)),
            }
            print(f"L={L} queries={Q}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()), flush=True)


if __name__ == "__main__":
    main()
