"""One layer of DeepSeek-V3.2 at the released dimensions, FP8 weights, on one GPU: prefill and decode speed.

A dense layer (SwiGLU of 18432) and an MoE layer (256 experts of 2048, 8 routed + 1 shared), each with
its MLA attention and the indexer (DSA or HISA), as model.Block runs them. The weights are random FP8
(drawn on the GPU, never written to disk) and loaded through weights/loader.py exactly as a checkpoint's
would be. The cache holds a synthetic context of L positions; a prefill chunk of T new tokens then sits
at its end (positions L-T .. L-1), a decode step at position L-1.

Columns: ms per call (median over CUDA events after warm-up), tokens/s, and the achieved rates against
a model of the work: FLOPs of the linear layers (2 x tokens x active parameters), the attention over the
selected keys, and the indexer's scores (DSA: every visible key; HISA: the block means plus its m*B
candidates); bytes of the weights touched (fp8, plus kv_b_proj in fp32, the routed experts that receive
tokens) and of the cache rows read (latent rows of the selected keys, indexer keys scored), each counted
once. Estimates: they say how far from the machine's rates the layer runs, not where the time goes.

    python bench/released.py [--contexts 32768,131072] [--chunk 1024] [--reps 5] [--out bench]
    python bench/released.py --profile [--contexts 131072]   # where one call of each layer spends its time
"""
import argparse
import collections
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy as cp  # noqa: E402  (GPU-only)

import hisa  # noqa: E402
import model as M  # noqa: E402
from bench.kernels import time_ms  # noqa: E402
from kernels.fp8 import e4m3_encode, fp8_roundtrip, quantize_ue8m0  # noqa: E402
from weights.loader import load_params  # noqa: E402
from weights.random_checkpoint import DTYPE_OF_KIND, tensor_shapes  # noqa: E402
from weights.synthetic_checkpoint import CODES, fp8_scales, synthetic_config  # noqa: E402

HISA_B, HISA_M = 128, 64  # the paper's block size and blocks kept (m*B = 8192)


class RandomWeights:
    """Stands in for weights.checkpoint.Checkpoint: the tensors of `config`, drawn on the GPU when read."""

    def __init__(self, config):
        self.config = config
        self.shapes = tensor_shapes(config)
        self.codes = cp.asarray(CODES)

    def names(self):
        return list(self.shapes)

    def info(self, name):
        shape, kind = self.shapes[name]
        return DTYPE_OF_KIND[kind], tuple(shape)

    def nbytes_of(self, name):
        shape, kind = self.shapes[name]
        return int(np.prod(shape)) * (1 if kind == "fp8" else 4 if kind == "f32" else 2)

    def get(self, name):
        shape, kind = self.shapes[name]
        if name.endswith("_scale_inv"):
            return cp.asarray(fp8_scales(name[:-10], shape, self.shapes[name[:-10]][0][1]))
        if kind == "fp8":
            return self.codes[cp.random.randint(0, 256, shape, dtype=np.uint8)]
        if name.endswith("norm.weight"):
            return cp.ones(shape, np.float32)
        return cp.random.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)


def fill_context(cfg, cache, L, precision="fp8"):
    """A synthetic context in a layer's cache, positions [0, L): latents and indexer keys as the model
    caches them (RMS-normed latent rounded through fp8, e4m3 keys with power-of-two scales)."""
    c_kv = cp.random.standard_normal((L, cfg.kv_lora_rank), dtype=np.float32)
    cache["c_kv"][:L] = fp8_roundtrip(c_kv, 128)
    cache["k_pe"][:L] = cp.random.standard_normal((L, cfg.qk_rope_head_dim), dtype=np.float32)
    k = cp.random.standard_normal((L, cfg.index_head_dim), dtype=np.float32)
    k += cp.repeat(cp.random.standard_normal((-(-L // 64), cfg.index_head_dim), dtype=np.float32), 64, axis=0)[:L]
    k8, scale = quantize_ue8m0(k)
    cache["index"]["k"][:L] = e4m3_encode(k8)
    cache["index"]["k_scale"][:L] = scale[:, 0]


def layer_work(cfg, moe, T, L, mode, experts_touched):
    """(FLOPs, bytes) of one call of a layer on T tokens ending at position L (see the module docstring)."""
    D, H, Q, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    N, Dv, Hi, Di, K = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    attn_params = Q * D + H * (N + R) * Q + (C + R) * D + D * H * Dv + Hi * Di * Q + Di * D + Hi * D
    F = cfg.moe_intermediate_size
    if moe:
        active = (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * D * F + cfg.n_routed_experts * D
        ffn_bytes = (experts_touched + cfg.n_shared_experts) * 3 * D * F
    else:
        active = ffn_bytes = 3 * D * cfg.intermediate_size
    flops = 2 * T * (attn_params + active)
    keys = np.arange(L - T + 1, L + 1, dtype=np.float64)           # keys each query sees
    selected = np.minimum(keys, K)
    flops += 2 * H * (N * C + Dv * C) * T                           # absorb W_uk into q, W_uv after
    flops += 2 * H * (2 * C + R) * selected.sum()                   # scores and weighted sum, latent form
    scored = keys if mode == "dsa" else np.minimum(keys, np.ceil(keys / HISA_B) + HISA_M * HISA_B)
    flops += 2 * Hi * Di * scored.sum()
    weight_bytes = attn_params + 4 * H * (N + Dv) * C + ffn_bytes   # kv_b_proj is fp32
    latent_rows = min(L, T * K)                                     # each cache row counted once
    index_rows = L if mode == "dsa" else min(L, L / HISA_B + T * HISA_M * HISA_B)
    return flops, weight_bytes + 4 * (C + R) * latent_rows + (Di + 4) * index_rows


# What --profile times: each entry's calls are wrapped to synchronise the GPU before and after, so a row is the
# wall time (GPU work and host time) spent inside it, nested rows included in their parents.
PROFILED = [(M.Block, "__call__", "layer"), (M.MLA, "__call__", "attention (MLA)"),
            (M, "linear", "linear (fp8 products)"), (M.Selector, "__call__", "indexer: selection"),
            (M.Indexer, "__call__", "indexer: q, w, keys"), (M.Indexer, "scores", "indexer: DSA scores"),
            (M, "topk", "indexer: DSA top-k"), (hisa, "select", "indexer: HISA select"),
            (M.MLA, "absorbed", "attention core (absorbed)"), (M, "sparse_mla", "sparse MLA kernel"),
            (cp, "einsum", "einsum (W_uk, W_uv)"), (M.MLP, "__call__", "dense MLP"), (M.MoE, "route", "MoE: route"),
            (M.MoE, "mix", "MoE: experts"), (M, "rms_norm", "rms_norm"), (M, "rope", "rope"),
            (M, "fp8_roundtrip_rows", "fp8 round trip (latent)"),
            (M, "quantize_rows", "fp8 quantise (indexer q, k)")]


class Profile:
    """Synchronised wall time per entry of PROFILED while active (a profile of one layer call, not a benchmark)."""

    def __init__(self):
        self.ms, self.calls, self.saved = collections.defaultdict(float), collections.Counter(), []

    def __enter__(self):
        for owner, attr, label in PROFILED:
            fn = getattr(owner, attr)
            self.saved.append((owner, attr, fn))
            setattr(owner, attr, self.timed(fn, label))
        return self

    def __exit__(self, *exc):
        for owner, attr, fn in reversed(self.saved):
            setattr(owner, attr, fn)
        self.saved = []

    def timed(self, fn, label):
        def run(*a, **k):
            cp.cuda.Device().synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            cp.cuda.Device().synchronize()
            self.ms[label] += (time.perf_counter() - t0) * 1e3
            self.calls[label] += 1
            return out
        return run

    def table(self, title, reps):
        lines = [title, f"{'':<28} {'ms/call':>9} {'calls':>6}"]
        for _, _, label in PROFILED:
            if self.calls[label]:
                lines.append(f"{label:<28} {self.ms[label] / reps:>9.3f} {self.calls[label] // reps:>6}")
        return "\n".join(lines)


def profile_layers(model, cfg, cache, L, chunk, reps=3):
    """One prefill chunk and one decode step of each layer at context L, timed per part (see PROFILED)."""
    for mode in ("dsa", "hisa"):
        sel = M.Selector(cfg, mode, HISA_B, HISA_M)
        for i, name in ((0, "dense"), (1, "moe")):
            layer, lc = model.layers[i], cache.layers[i]
            for phase, T in (("prefill", chunk), ("decode", 1)):
                start = L - T
                h = cp.random.standard_normal((T, cfg.hidden_size), dtype=np.float32)
                cos, sin = (a[start:L] for a in model.rope[layer.device])
                layer(h, cos, sin, lc, start, sel, "auto")  # warm-up: kernels compiled, memory pool filled
                with Profile() as prof:
                    for _ in range(reps):
                        layer(h, cos, sin, lc, start, sel, "auto")
                print(prof.table(f"\n{name} layer, {mode}, {phase} ({T} tokens) at context {L}", reps), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill tokens per call")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--profile", action="store_true", help="time the parts of each layer call instead (synchronised)")
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    card = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    # two layers at the released sizes (0 dense, 1 MoE); a small vocabulary: embeddings are not timed
    config = synthetic_config(layers=2, dense=1, vocab_size=1024, max_position_embeddings=max(contexts))
    cfg = M.Config.from_dict(config)
    params, _ = load_params(RandomWeights(config), cfg, "random weights", cp, "fp8", gpus=1, progress=True)
    model = M.Transformer(cfg, params, "fp8")
    print(f"card: {card}; weights on the GPU: {cp.get_default_memory_pool().used_bytes() / 1e9:.1f} GB", flush=True)

    rows = []
    for L in contexts:
        cache = model.new_cache(L)
        for lc in cache.layers:
            fill_context(cfg, lc, L)
        for lc in cache.layers:  # HISA's block means of the synthetic context, as the model keeps them
            lc["index"]["pooled"] = hisa.PooledKeys(lc["index"], HISA_B)
            lc["index"]["pooled"].update(0, L)
        if args.profile:
            profile_layers(model, cfg, cache, L, args.chunk)
            continue
        for mode in ("dsa", "hisa"):
            sel = M.Selector(cfg, mode, HISA_B, HISA_M)
            for i, name in ((0, "dense"), (1, "moe")):
                layer, lc = model.layers[i], cache.layers[i]
                for phase, T in (("prefill", args.chunk), ("decode", 1)):
                    start = L - T
                    h = cp.random.standard_normal((T, cfg.hidden_size), dtype=np.float32)
                    cos, sin = (a[start:L] for a in model.rope[layer.device])
                    ms = time_ms(lambda _: layer(h, cos, sin, lc, start, sel, "auto"), reps=args.reps, warmup=2)
                    touched = cfg.n_routed_experts
                    if name == "moe":
                        x = M.rms_norm(h, layer.post_attention_layernorm, cfg.rms_norm_eps)
                        touched = len(np.unique(cp.asnumpy(layer.mlp.route(x)[0])))
                    flops, nbytes = layer_work(cfg, name == "moe", T, L, mode, touched)
                    row = {"layer": name, "context": L, "indexer": mode, "phase": phase, "tokens": T, "ms": ms,
                           "tok_s": T / ms * 1e3, "tflops": flops / ms / 1e9, "gb_s": nbytes / ms / 1e6,
                           "experts_touched": touched if name == "moe" else None}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        del cache
        cp.get_default_memory_pool().free_all_blocks()

    if args.profile:
        return
    print(f"\n{card}: one layer at the released dimensions, FP8 weights; prefill = {args.chunk} tokens at the end "
          f"of the context, decode = 1 token")
    print(f"{'layer':>5} {'context':>7} {'indexer':>7} {'phase':>7} {'ms':>9} {'tok/s':>9} {'TFLOP/s':>8} {'GB/s':>7}")
    for r in rows:
        print(f"{r['layer']:>5} {r['context']:>7} {r['indexer']:>7} {r['phase']:>7} {r['ms']:>9.3f} "
              f"{r['tok_s']:>9.0f} {r['tflops']:>8.1f} {r['gb_s']:>7.0f}")
    path = os.path.join(args.out, "released_" + card.replace(" ", "_") + ".json")
    with open(path, "w") as f:
        json.dump({"card": card, "chunk": args.chunk, "hisa": {"B": HISA_B, "m": HISA_M}, "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
