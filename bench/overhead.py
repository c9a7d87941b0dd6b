"""Host-side cost of one decode step's indexer calls (GPU): cProfile of repeated calls, top entries."""
import cProfile
import os
import pstats
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cupy as cp  # noqa: E402

import hisa  # noqa: E402
from bench.bench import B, K, M, make_inputs  # noqa: E402
from kernels.indexer import index_scores  # noqa: E402
from kernels.topk import topk  # noqa: E402

L = 131072
q, qs, w, cache, _ = make_inputs(L, 1)
ends = cp.asarray(np.array([L], np.int32))
pooled = hisa.PooledKeys(cache, B)
pooled.update(0, L)


def step():
    topk(index_scores(q, w, cache["k"], ends, q_scale=qs, k_scale=cache["k_scale"]), K)
    hisa.select(q, qs, w, cache, pooled, ends, K, M)


for _ in range(20):
    step()
cp.cuda.Device().synchronize()
pr = cProfile.Profile()
pr.enable()
for _ in range(200):
    step()
cp.cuda.Device().synchronize()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
