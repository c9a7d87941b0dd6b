"""The command line: bad input gives one line naming the problem and exit status 2, never a traceback."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from weights.random_checkpoint import write_random_checkpoint
from weights.safetensors import SafetensorsFile, write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "ckpt"
    write_random_checkpoint(str(folder), seed=2)
    return folder


def cli(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), "--device", "cpu", *args],
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def edit_tensors(folder, change):
    """Rewrite the shards after change(name -> (dtype, array)) has edited the dict in place."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        f = SafetensorsFile(str(folder / shard))
        tensors = {n: (f.info(n)[0], f.get(n).copy()) for n in f.names()}
        del f
        change(tensors, shard)
        write_safetensors(str(folder / shard), {n: (d, a) if d == "F8_E4M3" else a for n, (d, a) in tensors.items()})
        index["weight_map"] = {n: s for n, s in index["weight_map"].items() if s != shard} | {n: shard for n in tensors}
    index_path.write_text(json.dumps(index))


def broken(base, tmp_path, how):
    folder = tmp_path / "broken"
    shutil.copytree(base, folder)
    how(folder)
    return str(folder)


def expect_error(code, out, err, *needles):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2, f"exit {code}, stderr: {err[-2000:]}"
    assert "Traceback" not in err, err
    assert lines[-1].startswith("error: "), err
    for n in needles:
        assert n in lines[-1], f"{n!r} not in {lines[-1]!r}"


def test_generates(base):
    code, out, err = cli("--ckpt", str(base), "--prompt", "Hello", "--max-new-tokens", "5", "--indexer", "hisa")
    assert code == 0, err
    assert out.startswith("Hello") and "tok/s" in err.splitlines()[-1]


def test_missing_tensor(base, tmp_path):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    def drop(t, shard):
        t.pop(name, None)
    expect_error(*cli("--ckpt", broken(base, tmp_path, lambda f: edit_tensors(f, drop)), "--prompt", "hi"), "missing", name)


def test_extra_tensor(base, tmp_path):
    import numpy as np
    def add(t, shard):
        if shard.startswith("model-00001"):
            t["model.layers.0.self_attn.bogus.weight"] = ("F32", np.zeros(3, np.float32))
    expect_error(*cli("--ckpt", broken(base, tmp_path, lambda f: edit_tensors(f, add)), "--prompt", "hi"),
                 "unexpected", "bogus")


def test_misshaped_tensor(base, tmp_path):
    import numpy as np
    def grow(t, shard):
        if "model.norm.weight" in t:
            t["model.norm.weight"] = ("F32", np.ones(257, np.float32))
    expect_error(*cli("--ckpt", broken(base, tmp_path, lambda f: edit_tensors(f, grow)), "--prompt", "hi"),
                 "model.norm.weight", "257", "256")


def test_truncated_shard(base, tmp_path):
    def cut(folder):
        p = folder / "model-00002-of-00002.safetensors"
        p.write_bytes(p.read_bytes()[:-100])
    expect_error(*cli("--ckpt", broken(base, tmp_path, cut), "--prompt", "hi"), "model-00002-of-00002.safetensors")


def test_index_outside_folder(base, tmp_path):
    def escape(folder):
        p = folder / "model.safetensors.index.json"
        index = json.loads(p.read_text())
        index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
        p.write_text(json.dumps(index))
    expect_error(*cli("--ckpt", broken(base, tmp_path, escape), "--prompt", "hi"), "elsewhere.safetensors")


def test_config_missing_field(base, tmp_path):
    def strip(folder):
        p = folder / "config.json"
        cfg = json.loads(p.read_text())
        del cfg["kv_lora_rank"]
        p.write_text(json.dumps(cfg))
    expect_error(*cli("--ckpt", broken(base, tmp_path, strip), "--prompt", "hi"), "kv_lora_rank")


def test_prompt_too_long(base):
    code, out, err = cli("--ckpt", str(base), "--prompt", "x" * 1100)
    expect_error(code, out, err, "1101", "1024")
    assert out == "", "the prompt is echoed only once the request is known to fit"


@pytest.mark.parametrize("args,needles", [
    (("--temperature", "-1"), ("temperature -1.0", ">= 0")),
    (("--temperature", "nan"), ("temperature nan",)),
    (("--top-p", "0"), ("top-p 0.0", "(0, 1]")),
    (("--top-p", "1.5"), ("top-p 1.5",)),
    (("--seed", "-1"), ("seed -1",)),
    (("--indexer", "hisa", "--hisa-block", "0"), ("HISA block size 0",)),
    (("--indexer", "hisa", "--hisa-blocks", "-2"), ("HISA blocks kept -2",)),
    (("--gpus", "2"), ("--gpus 2", "--device cpu")),
])
def test_bad_request(base, args, needles):
    """Sampling and HISA settings out of range, or GPUs asked of the CPU path: one line, before any output."""
    code, out, err = cli("--ckpt", str(base), "--prompt", "hi", "--max-new-tokens", "2", *args)
    expect_error(code, out, err, *needles)
    assert out == ""


def test_empty_prompt(base):
    expect_error(*cli("--ckpt", str(base), "--prompt", ""), "empty")


def test_missing_folder(tmp_path):
    expect_error(*cli("--ckpt", str(tmp_path / "nowhere"), "--prompt", "hi"), "nowhere")


def test_default_model_writes_text():
    """`make run` with nothing else: the shipped trained model, sampled, writes words after the prompt."""
    if not os.path.exists(os.path.join(ROOT, "weights", "dsv32-small", "config.json")):
        pytest.skip("weights/dsv32-small is not in this checkout")
    code, out, err = cli("--prompt", "The history of the", "--max-new-tokens", "24", "--seed", "1")
    assert code == 0, err
    assert "dsv32-small" in err and "[CPU, indexer dsa (fp8)" in err
    assert out.startswith("The history of the")
    words = out[len("The history of the"):].split()
    assert len(words) >= 3 and sum(w.strip(".,;:").isalpha() for w in words) >= len(words) // 2, out
