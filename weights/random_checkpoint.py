"""A DeepSeek-V3.2 checkpoint of random weights at toy size, in the released layout.

Until a trained small model exists this is what the engine loads in tests and demos. It has the
671B release's tensor names, dtypes (fp8 e4m3 linear weights with 128x128 block scales), sharded
files and index, plus an MTP layer that the loader must skip, so every loading path runs for real.

    python -m weights.random_checkpoint OUT_FOLDER [--seed N] [--shards N]
"""
import argparse
import json
import math
import os
import zlib

import ml_dtypes
import numpy as np

from kernels.fp8 import E4M3_MAX, e4m3_encode, e4m3_round
from weights.safetensors import DTYPES, write_safetensors_streaming
from weights.tokenizer import build_byte_tokenizer

# The config.json fields of every DeepSeek-V3.2 checkpoint this project writes that do not describe its size
# (FP8 weights with power-of-two 128x128 block scales, sigmoid routing with a bias, BOS 0, EOS 1).
V32_FIELDS = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
}

TINY_CONFIG = {
    **V32_FIELDS,
    "vocab_size": 320,  # >= the 262 ids of the byte tokenizer
    "hidden_size": 256,
    "intermediate_size": 384,
    "moe_intermediate_size": 96,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "q_lora_rank": 192,  # not a multiple of 128: the weight scales get ragged edge blocks
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "index_n_heads": 4,
    "index_head_dim": 64,
    "index_topk": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    # original length 256 and factor 4, so that YaRN changes the frequencies at this small size
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 256,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1, "mscale_all_dim": 1},
    "max_position_embeddings": 1024,
}

DTYPE_OF_KIND = {"fp8": "F8_E4M3", "bf16": "BF16", "f32": "F32"}


def _block(c):
    """Weight block size of an fp8 checkpoint, None for one without quantization_config (all bf16)."""
    q = c.get("quantization_config")
    return tuple(q.get("weight_block_size", (128, 128))) if q else None


def _linear(shapes, name, out_dim, in_dim, block):
    """A linear layer's weight [out, in]; if fp8, its F32 weight_scale_inv [ceil(out/bo), ceil(in/bi)] too."""
    if block is None:
        shapes[name + ".weight"] = ((out_dim, in_dim), "bf16")
        return
    shapes[name + ".weight"] = ((out_dim, in_dim), "fp8")
    shapes[name + ".weight_scale_inv"] = ((-(-out_dim // block[0]), -(-in_dim // block[1])), "f32")


def tensor_shapes(config):
    """Every tensor of the released layout (SPEC section 2): name -> (shape, kind), kind "fp8" (stored
    F8_E4M3), "bf16" or "f32" (see DTYPE_OF_KIND). The MTP layer (index num_hidden_layers) is not
    listed. `config` is the config.json dict or an object with the same field names."""
    c = config if isinstance(config, dict) else vars(config)
    D, V, L, H = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    q_lora, kv_lora = c["q_lora_rank"], c["kv_lora_rank"]
    Hi, Di, E = c["index_n_heads"], c["index_head_dim"], c["n_routed_experts"]
    block = _block(c)

    shapes = {"model.embed_tokens.weight": ((V, D), "bf16")}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = ((D,), "bf16")
        shapes[p + "post_attention_layernorm.weight"] = ((D,), "bf16")
        a = p + "self_attn."
        _linear(shapes, a + "q_a_proj", q_lora, D, block)
        shapes[a + "q_a_layernorm.weight"] = ((q_lora,), "bf16")
        _linear(shapes, a + "q_b_proj", H * (nope + rope), q_lora, block)
        _linear(shapes, a + "kv_a_proj_with_mqa", kv_lora + rope, D, block)
        shapes[a + "kv_a_layernorm.weight"] = ((kv_lora,), "bf16")
        _linear(shapes, a + "kv_b_proj", H * (nope + v), kv_lora, block)
        _linear(shapes, a + "o_proj", D, H * v, block)
        _linear(shapes, a + "indexer.wq_b", Hi * Di, q_lora, block)
        _linear(shapes, a + "indexer.wk", Di, D, block)
        shapes[a + "indexer.k_norm.weight"] = ((Di,), "bf16")
        shapes[a + "indexer.k_norm.bias"] = ((Di,), "bf16")
        shapes[a + "indexer.weights_proj.weight"] = ((Hi, D), "bf16")

        # SwiGLU blocks: dense MLP below first_k_dense_replace, else routed experts + shared experts
        if i < c["first_k_dense_replace"]:
            mlps = [(p + "mlp.", c["intermediate_size"])]
        else:
            shapes[p + "mlp.gate.weight"] = ((E, D), "bf16")
            shapes[p + "mlp.gate.e_score_correction_bias"] = ((E,), "f32")
            mlps = [(p + f"mlp.experts.{e}.", c["moe_intermediate_size"]) for e in range(E)]
            mlps.append((p + "mlp.shared_experts.", c["n_shared_experts"] * c["moe_intermediate_size"]))
        for m, width in mlps:
            _linear(shapes, m + "gate_proj", width, D, block)
            _linear(shapes, m + "up_proj", width, D, block)
            _linear(shapes, m + "down_proj", D, width, block)
    shapes["model.norm.weight"] = ((D,), "bf16")
    shapes["lm_head.weight"] = ((V, D), "bf16")
    return shapes


def mtp_shapes(config):
    """Part of a multi-token-prediction module, at layer index num_hidden_layers as in the release:
    enough for the loader to prove it skips it."""
    c = config if isinstance(config, dict) else vars(config)
    D, p = c["hidden_size"], f"model.layers.{c['num_hidden_layers']}."
    shapes = {p + n: ((D,), "bf16") for n in ("enorm.weight", "hnorm.weight", "input_layernorm.weight",
                                              "post_attention_layernorm.weight", "shared_head.norm.weight")}
    shapes[p + "eh_proj.weight"] = ((D, 2 * D), "bf16")
    _linear(shapes, p + "self_attn.q_a_proj", c["q_lora_rank"], D, _block(c))
    return shapes


def random_tensor(name, shape, seed=0):
    """The float32 value drawn for tensor `name`, before rounding to its stored dtype. Each tensor has
    its own generator, seeded by (seed, name), so any one can be drawn again alone (as the tests do).
    Magnitudes keep activations O(1): matrices N(0, 1/fan_in), norm weights 1 + 0.1 N(0, 1)."""
    x = np.random.default_rng([seed, zlib.crc32(name.encode())]).standard_normal(shape, dtype=np.float32)
    if name.endswith("norm.weight"):
        return 1 + 0.1 * x
    if name.endswith(("norm.bias", "e_score_correction_bias")):
        return 0.1 * x
    if name == "model.embed_tokens.weight":
        return x  # rows are looked up, not multiplied: the first RMSNorm rescales them anyway
    return x / np.float32(np.sqrt(shape[-1]))


def quantize_fp8_blocks(w, block=(128, 128)):
    """w [O, I] float32 -> (e4m3 bits uint8 [O, I], scale_inv float32 [ceil(O/bo), ceil(I/bi)]).

    scale_inv = amax(|w| over the block) / 448, so each block spans the whole e4m3 range, and
    W[i, j] ~= e4m3(bits[i, j]) * scale_inv[i // bo, j // bi]."""
    (O, I), (bo, bi) = w.shape, block
    padded = np.zeros((-(-O // bo) * bo, -(-I // bi) * bi), np.float32)  # zeros change no amax
    padded[:O, :I] = w
    amax = np.abs(padded.reshape(padded.shape[0] // bo, bo, -1, bi)).max(axis=(1, 3))
    scale_inv = (np.maximum(amax, 1e-12) / np.float32(E4M3_MAX)).astype(np.float32)
    s = np.repeat(np.repeat(scale_inv, bo, axis=0), bi, axis=1)[:O, :I]
    return e4m3_encode(e4m3_round(w / s)), scale_inv


def _make(name, shapes, seed, block):
    """The array stored for `name`: F8_E4M3 bits (uint8), scales, bf16 or f32 values."""
    shape, kind = shapes[name]
    if name.endswith(".weight_scale_inv"):
        weight = name[: -len("_scale_inv")]
        return quantize_fp8_blocks(random_tensor(weight, shapes[weight][0], seed), block)[1]
    w = random_tensor(name, shape, seed)
    if kind == "fp8":
        return quantize_fp8_blocks(w, block)[0]
    return w.astype(ml_dtypes.bfloat16 if kind == "bf16" else np.float32)


def write_checkpoint(folder, config, shapes, make, shards, tokenizer=True):
    """Write a checkpoint folder: config.json, tokenizer.json, the tensors of `shapes` (name -> (shape,
    kind)) in the shard files listed by `shards` (one list of names per file) and their index.

    make(name) returns a tensor's data, stored with DTYPE_OF_KIND[kind]; the files are written tensor by
    tensor (weights/safetensors.py, write_safetensors_streaming), so memory holds one tensor at a time."""
    os.makedirs(folder, exist_ok=True)
    weight_map, total = {}, 0
    for k, part in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = {n: (DTYPE_OF_KIND[shapes[n][1]], shapes[n][0]) for n in part}
        write_safetensors_streaming(os.path.join(folder, file), entries, make, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(DTYPES[tag].itemsize * math.prod(shape) for tag, shape in entries.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer:
        build_byte_tokenizer(os.path.join(folder, "tokenizer.json"))
    return folder


def write_random_checkpoint(folder, config=TINY_CONFIG, seed=0, shards=2, mtp_layer=True):
    """Write config.json, tokenizer.json, `shards` safetensors files and their index. Deterministic:
    the same arguments give the same bytes."""
    shapes = tensor_shapes(config)
    if mtp_layer:
        shapes.update(mtp_shapes(config))
    names, block = list(shapes), _block(config)
    # consecutive runs of names, layer by layer, of about equal count
    parts = [names[k * len(names) // shards:(k + 1) * len(names) // shards] for k in range(shards)]
    return write_checkpoint(folder, config, shapes, lambda n: _make(n, shapes, seed, block), parts)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Write a random-weights DeepSeek-V3.2 checkpoint (TINY_CONFIG).")
    ap.add_argument("folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()
    write_random_checkpoint(args.folder, seed=args.seed, shards=args.shards)
    print(f"wrote {args.folder}: {len(tensor_shapes(TINY_CONFIG))} tensors plus an MTP layer, "
          f"{args.shards} shards, seed {args.seed}")
