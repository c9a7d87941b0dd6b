"""Checkpoint folders: the random checkpoint in the released layout, and a CheckpointError for every
broken folder (bad config, an index pointing outside the folder, missing shards or tensors)."""
import dataclasses
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from kernels.fp8 import dequant_weight_reference
from weights.checkpoint import Checkpoint
from weights.random_checkpoint import (DTYPE_OF_KIND, TINY_CONFIG, mtp_shapes, random_tensor, tensor_shapes,
                                       write_random_checkpoint)
from weights.safetensors import CheckpointError, write_safetensors
from weights.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("tiny")))


def test_random_checkpoint_is_deterministic(tiny, tmp_path):
    # a second writer, through the command line
    subprocess.run([sys.executable, "-m", "weights.random_checkpoint", str(tmp_path), "--seed", "0"],
                   cwd=REPO, check=True, capture_output=True)
    assert sorted(os.listdir(tiny)) == sorted(os.listdir(tmp_path))
    for name in os.listdir(tiny):
        with open(os.path.join(tiny, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name


def test_random_checkpoint_has_the_released_layout(tiny):
    ckpt = Checkpoint(tiny)
    shapes = tensor_shapes(ckpt.config)
    assert ckpt.config == TINY_CONFIG
    assert set(ckpt.names()) == set(shapes) | set(mtp_shapes(TINY_CONFIG))
    assert all(name.startswith("model.layers.3.") for name in set(ckpt.names()) - set(shapes))
    for name, (shape, kind) in shapes.items():
        assert ckpt.info(name) == (DTYPE_OF_KIND[kind], shape), name
        assert ckpt.get(name).shape == shape
    assert len(ckpt.files) == 2 and ckpt.tokenizer_path == os.path.join(tiny, "tokenizer.json")
    with open(os.path.join(tiny, "model.safetensors.index.json")) as f:
        assert ckpt.nbytes == json.load(f)["metadata"]["total_size"]
    assert Tokenizer(ckpt.tokenizer_path).vocab_size == 262 <= TINY_CONFIG["vocab_size"]


def test_tensor_names_follow_the_release(tiny):
    shapes = tensor_shapes(TINY_CONFIG)
    D, E, L = 256, 8, 3
    assert shapes["model.layers.0.mlp.down_proj.weight"] == ((D, 384), "fp8")
    assert "model.layers.0.mlp.gate.weight" not in shapes  # layer 0 is dense (first_k_dense_replace 1)
    assert shapes["model.layers.1.mlp.gate.weight"] == ((E, D), "bf16")
    assert shapes["model.layers.2.mlp.gate.e_score_correction_bias"] == ((E,), "f32")
    assert shapes["model.layers.2.mlp.experts.7.up_proj.weight"] == ((96, D), "fp8")
    assert shapes["model.layers.2.mlp.shared_experts.down_proj.weight"] == ((D, 96), "fp8")
    assert shapes["model.layers.1.self_attn.q_a_proj.weight_scale_inv"] == ((2, 2), "f32")  # 192 rows: ragged
    assert shapes["model.layers.1.self_attn.indexer.wq_b.weight"] == ((4 * 64, 192), "fp8")
    assert shapes["model.layers.1.self_attn.indexer.k_norm.bias"] == ((64,), "bf16")
    # per layer: 4 norms, 3 bf16 indexer tensors, 7 attention linears (each an fp8 weight and its scale),
    # then 3 dense linears, or the gate, its bias and 3 linears for each of E routed + 1 shared experts
    common = 4 + 3 + 2 * 7
    assert len(shapes) == 3 + (common + 2 * 3) + (L - 1) * (common + 2 + 2 * 3 * (E + 1))


def test_tensor_shapes_at_671b():
    @dataclasses.dataclass
    class Config:  # tensor_shapes also takes an object whose fields are the config.json keys
        pass
    c = Config()
    vars(c).update(TINY_CONFIG, vocab_size=129280, hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3,
                   intermediate_size=18432, moe_intermediate_size=2048, num_attention_heads=128, q_lora_rank=1536,
                   kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                   n_routed_experts=256, index_n_heads=64, index_head_dim=128)
    shapes = tensor_shapes(c)
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == ((128 * 192, 1536), "fp8")
    assert shapes["model.layers.0.self_attn.q_b_proj.weight_scale_inv"] == ((192, 12), "f32")
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == ((5, 56), "f32")  # 576 rows
    assert shapes["model.layers.60.mlp.experts.255.down_proj.weight"] == ((7168, 2048), "fp8")
    assert "model.layers.61.eh_proj.weight" not in shapes


def test_unquantised_config_has_bf16_linears():
    config = {k: v for k, v in TINY_CONFIG.items() if k != "quantization_config"}
    shapes = tensor_shapes(config)
    assert not any(name.endswith("scale_inv") for name in shapes)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == ((256, 128), "bf16")


def test_random_weights_dequantise_to_their_draw(tiny):
    ckpt = Checkpoint(tiny)
    for name, (shape, kind) in tensor_shapes(ckpt.config).items():
        if name.endswith("_scale_inv"):
            continue  # checked with its weight
        want = random_tensor(name, shape)
        if kind == "fp8":
            scale = ckpt.get(name + "_scale_inv")
            got = dequant_weight_reference(ckpt.get(name), scale)
            # e4m3 keeps 3 mantissa bits (error <= 2^-4 relative); subnormals step by 2^-9 of the scale
            step = np.repeat(np.repeat(scale, 128, 0), 128, 1)[: shape[0], : shape[1]] * 2.0**-9
            assert np.all(np.abs(got - want) <= np.maximum(np.abs(want) * 2.0**-4, step)), name
            assert np.abs(got).max() == pytest.approx(np.abs(want).max(), rel=1e-6)  # each block spans e4m3
        elif kind == "bf16":
            assert np.array_equal(ckpt.get(name), want.astype(ml_dtypes.bfloat16)), name
        else:
            assert np.array_equal(ckpt.get(name), want), name
    # sane magnitudes: unit embeddings, and a linear layer keeps a unit input at unit scale
    assert 0.9 < ckpt.get("model.embed_tokens.weight").astype(np.float32).std() < 1.1
    w = dequant_weight_reference(ckpt.get("model.layers.0.mlp.up_proj.weight"),
                                 ckpt.get("model.layers.0.mlp.up_proj.weight_scale_inv"))
    assert 0.9 < (w @ np.ones(256, np.float32)).std() < 1.1


# --- broken folders ---------------------------------------------------------------------------------

def folder(tmp_path, shards, index=None, config=b'{"model_type": "deepseek_v32"}'):
    """A checkpoint folder: shards is file name -> {tensor name: array}; index is a weight_map."""
    if config is not None:
        (tmp_path / "config.json").write_bytes(config)
    for file, tensors in shards.items():
        write_safetensors(tmp_path / file, tensors)
    if index is not None:
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return tmp_path


def error(path):
    with pytest.raises(CheckpointError) as e:
        Checkpoint(path)
    assert "\n" not in str(e.value)
    return str(e.value)


W = {"w": np.zeros(4, np.float32)}


def test_single_file_without_index(tmp_path):
    ckpt = Checkpoint(folder(tmp_path, {"model.safetensors": {"b": np.ones(3, np.float32), **W}}))
    assert ckpt.names() == ["b", "w"] and "b" in ckpt and ckpt.nbytes == 28
    assert np.array_equal(ckpt.get("b"), np.ones(3))
    with pytest.raises(CheckpointError, match="no tensor 'lm_head.weight'"):
        ckpt.get("lm_head.weight")


def test_missing_or_bad_config(tmp_path):
    assert "config.json: cannot read" in error(folder(tmp_path, {"m.safetensors": W}, config=None))
    assert "config.json: not valid JSON" in error(folder(tmp_path, {"m.safetensors": W}, config=b"{oops"))
    assert "config.json: a JSON list, not an object" in error(folder(tmp_path, {"m.safetensors": W}, config=b"[]"))


def test_index_pointing_outside_the_folder(tmp_path):
    assert "tensor 'w' maps to file '../x.safetensors', which is not a plain file name" in error(
        folder(tmp_path, {"m.safetensors": W}, index={"w": "../x.safetensors"}))
    for file in ("/etc/x.safetensors", "sub/m.safetensors", ".."):
        assert f"tensor 'w' maps to file '{file}'" in error(folder(tmp_path, {}, index={"w": file}))


def test_index_naming_a_missing_shard(tmp_path):
    message = error(folder(tmp_path, {"m1.safetensors": W}, index={"w": "m1.safetensors", "v": "m2.safetensors"}))
    assert "index.json: tensor 'v' maps to shard 'm2.safetensors', which does not exist" in message


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    message = error(folder(tmp_path, {"m1.safetensors": W}, index={"w": "m1.safetensors", "v": "m1.safetensors"}))
    assert "tensor 'v' is not in its shard 'm1.safetensors'" in message


def test_tensor_in_two_shards(tmp_path):
    message = error(folder(tmp_path, {"m1.safetensors": W, "m2.safetensors": {"v": W["w"], **W}}))
    assert "tensor 'w' is in both 'm1.safetensors' and 'm2.safetensors'" in message


def test_no_shards(tmp_path):
    assert "no *.safetensors files" in error(folder(tmp_path, {}))


def test_bad_shard_is_reported_with_its_file(tmp_path):
    folder(tmp_path, {"m.safetensors": W})
    (tmp_path / "m.safetensors").write_bytes(b"\0" * 4)
    assert "m.safetensors: file has 4 bytes" in error(tmp_path)
