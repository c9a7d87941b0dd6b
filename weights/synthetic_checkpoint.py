"""A checkpoint with the released DeepSeek-V3.2's dimensions but only a few layers, random FP8 weights.

The 671B release does not fit the machines the tests run on, yet loading and running at its real sizes
(hidden 7168, 128 heads, 256 experts of 2048, indexer 64 x 128, vocabulary 129280) is what issue 6 is
about. This writes the released config (SPEC section 1) with num_hidden_layers cut to a few (default 3:
first_k_dense_replace = 1 dense layer, then 2 MoE layers) plus part of an MTP module at index
num_hidden_layers, which the loader must skip. At the default sizes that is about 27 GB in about 7
shards of ~4 GB; every dimension can be scaled down for a CPU test, and the same code then writes a few MB.

The weights are drawn for speed (22 GB of MoE weights): FP8 bits come from random bytes mapped through
a table of 256 e4m3 codes at the quantiles of a normal distribution, so every value is finite and the
whole e4m3 range is used; each 128x128 block's scale_inv makes the real weight ~N(0, 1/fan_in) (times
2^(N(0, 0.25^2)), so the scales differ between blocks as in a trained model); activations stay O(1).
Other tensors follow weights/random_checkpoint.py's rules. Files are written tensor by tensor, so memory
holds one tensor (or 256 MB of rows of a large one) at a time.

    python -m weights.synthetic_checkpoint OUT_FOLDER [--layers 3 --dense 1 --experts 256 --hidden 7168 ...]
"""
import argparse
import functools
import os
import statistics
import sys
import time
import zlib

import ml_dtypes
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.fp8 import E4M3_MAX, e4m3_decode, e4m3_encode, e4m3_round  # noqa: E402
from weights.random_checkpoint import (DTYPE_OF_KIND, V32_FIELDS, mtp_shapes, random_tensor,  # noqa: E402
                                       tensor_shapes, write_checkpoint)
from weights.safetensors import DTYPES  # noqa: E402

# config.json of the released DeepSeek-V3.2 (SPEC section 1)
RELEASED_CONFIG = {
    **V32_FIELDS,
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 163840,
}

CHUNK_BYTES = 256 << 20  # large float tensors (embeddings, lm_head) are drawn and written in row chunks
SHARD_BYTES = 4 << 30


def synthetic_config(layers=3, dense=1, **sizes):
    """The released config with `layers` layers (the first `dense` of them dense) and any field replaced
    by a keyword of the same name, e.g. synthetic_config(hidden_size=512, n_routed_experts=16)."""
    unknown = set(sizes) - set(RELEASED_CONFIG)
    if unknown:
        raise ValueError(f"synthetic_config: no config field(s) {', '.join(sorted(unknown))}")
    if not 0 <= dense <= layers:
        raise ValueError(f"synthetic_config: {dense} dense layers of {layers}")
    return dict(RELEASED_CONFIG, num_hidden_layers=layers, first_k_dense_replace=dense, **sizes)


def _gaussian_e4m3_codes():
    """256 e4m3 bit patterns at the quantiles (i + 1/2)/256 of N(0, sigma^2), sigma chosen so that the
    extreme quantile is 446 (just under e4m3's 448): a random byte through this table is a finite,
    roughly normal e4m3 value. Returns (codes uint8 [256], rms of their values)."""
    z = np.array([statistics.NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)])
    v = e4m3_round((z * (446.0 / z.max())).astype(np.float32))
    return e4m3_encode(v), float(np.sqrt(np.mean(v.astype(np.float64) ** 2)))


CODES, CODE_RMS = _gaussian_e4m3_codes()
assert E4M3_MAX >= float(np.abs(e4m3_decode(CODES)).max())


def _rng(seed, name):
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def fp8_bits(name, shape, seed=0):
    """The e4m3 bits of FP8 weight `name`: random bytes mapped through CODES (NaN patterns never occur)."""
    n = int(np.prod(shape, dtype=np.int64))
    raw = _rng(seed, name).bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n]  # 64 random bits at a time
    return CODES[raw].reshape(shape)


def fp8_scales(name, shape, in_dim, seed=0):
    """scale_inv [ceil(out/128), ceil(in/128)] of FP8 weight `name` (drawn apart from its bits, so either
    can be made alone): W = e4m3(bits) * scale_inv has std ~ in_dim^-0.5, varied by 2^(0.25 N(0, 1)) per block."""
    jitter = np.exp2(0.25 * _rng(seed, name + "#scale").standard_normal(shape))
    return (jitter / (CODE_RMS * np.sqrt(in_dim))).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _normal_quantiles():
    """N(0, 1) at the 65536 quantiles (i + 1/2) / 65536, float32: 16 random bits through it are a normal draw."""
    inv = statistics.NormalDist().inv_cdf
    return np.array([inv((i + 0.5) / 65536) for i in range(65536)], np.float32)


def float_rows(name, shape, dtype, seed=0):
    """A bf16/f32 tensor: random_tensor's values when small; a large one (embeddings, lm_head) with the
    same magnitudes, in row chunks of CHUNK_BYTES, from 16 random bits per value through a quantile table
    (normal draws cost ~10x more, and 2 x 0.9G values are to be drawn at the released size)."""
    rows = max(1, CHUNK_BYTES // (4 * int(np.prod(shape[1:], dtype=np.int64)))) if len(shape) > 1 else shape[0]
    if len(shape) < 2 or shape[0] <= rows:
        yield random_tensor(name, shape, seed).astype(dtype)
        return
    std = 1.0 if name == "model.embed_tokens.weight" else shape[-1] ** -0.5  # random_tensor's rule
    table = (_normal_quantiles() * np.float32(std)).astype(dtype)
    rng = _rng(seed, name)
    for lo in range(0, shape[0], rows):
        chunk = (min(rows, shape[0] - lo),) + tuple(shape[1:])
        n = int(np.prod(chunk, dtype=np.int64))
        yield table[rng.bit_generator.random_raw(-(-n // 4)).view(np.uint16)[:n]].reshape(chunk)


def make_tensor(name, shapes, seed=0):
    """The data stored for `name` (an array or row chunks), in the dtype DTYPE_OF_KIND gives its kind."""
    shape, kind = shapes[name]
    if name.endswith(".weight_scale_inv"):
        weight_shape = shapes[name[: -len("_scale_inv")]][0]
        return fp8_scales(name[: -len("_scale_inv")], shape, weight_shape[1], seed)
    if kind == "fp8":
        return fp8_bits(name, shape, seed)
    return float_rows(name, shape, ml_dtypes.bfloat16 if kind == "bf16" else np.float32, seed)


def nbytes(shapes, name):
    shape, kind = shapes[name]
    return DTYPES[DTYPE_OF_KIND[kind]].itemsize * int(np.prod(shape, dtype=np.int64))


def write_synthetic_checkpoint(folder, config=None, seed=0, shard_bytes=SHARD_BYTES, mtp_layer=True, progress=False):
    """Write `config` (default synthetic_config()) as a checkpoint folder: config.json, tokenizer.json
    (byte-level: it covers the first 262 ids of the vocabulary), shards of about shard_bytes with
    model.safetensors.index.json. Deterministic: the same arguments give the same bytes."""
    config = config or synthetic_config()
    shapes = tensor_shapes(config)
    if mtp_layer:
        shapes.update(mtp_shapes(config))
    shards, size = [[]], 0
    for name in shapes:  # consecutive tensors, layer by layer, cut when a shard would pass shard_bytes
        n = nbytes(shapes, name)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    total = sum(nbytes(shapes, n) for n in shapes)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {os.path.basename(os.path.normpath(folder))}")

    def make(name):
        data = make_tensor(name, shapes, seed)
        if bar is not None:
            bar.update(nbytes(shapes, name))
        return data
    write_checkpoint(folder, config, shapes, make, shards)
    if bar is not None:
        bar.close()
    return folder


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a checkpoint with the released DeepSeek-V3.2 dimensions, "
                                             "a few layers and random FP8 weights.")
    ap.add_argument("folder")
    ap.add_argument("--layers", type=int, default=3, help="num_hidden_layers (the MTP part goes at this index)")
    ap.add_argument("--dense", type=int, default=1, help="first_k_dense_replace: how many leading layers are dense")
    ap.add_argument("--hidden", type=int, help="hidden_size (7168)")
    ap.add_argument("--experts", type=int, help="n_routed_experts (256)")
    ap.add_argument("--moe-inter", type=int, help="moe_intermediate_size (2048)")
    ap.add_argument("--inter", type=int, help="intermediate_size of the dense layers (18432)")
    ap.add_argument("--heads", type=int, help="num_attention_heads (128)")
    ap.add_argument("--vocab", type=int, help="vocab_size (129280)")
    ap.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 2**30, help="shard size in GiB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = {k: v for k, v in (("hidden_size", args.hidden), ("n_routed_experts", args.experts),
                               ("moe_intermediate_size", args.moe_inter), ("intermediate_size", args.inter),
                               ("num_attention_heads", args.heads), ("vocab_size", args.vocab)) if v is not None}
    config = synthetic_config(args.layers, args.dense, **sizes)
    t0 = time.perf_counter()
    write_synthetic_checkpoint(args.folder, config, args.seed, int(args.shard_gb * 2**30), progress=True)
    size = sum(os.path.getsize(os.path.join(args.folder, f)) for f in os.listdir(args.folder))
    print(f"wrote {args.folder}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s "
          f"({config['num_hidden_layers']} layers + MTP part, seed {args.seed})")


if __name__ == "__main__":
    main()
