"""Running the released checkpoint's layout at scale (issue 6): weights kept FP8 or dequantised, the MoE
as grouped products, layers placed over several GPUs, tensors streamed to their device, and a synthetic
checkpoint with the released dimensions but three layers.

CPU (always): a synthetic checkpoint scaled down (SMALL) checks the weight modes, the grouped MoE, the
placement plan, the MTP skip and the streaming writer. GPU: the same checkpoint on one and two GPUs.
Released dimensions (hidden 7168, 256 experts, ...; ~27 GB written to a temporary folder, minutes): only
with HISA_RELEASED_SCALE=1 on a GPU machine (HISA_RELEASED_DIR=folder reuses a written checkpoint).
"""
import gc
import json
import os
import subprocess
import sys
import tracemalloc
import types

import numpy as np
import pytest

import model as M
from kernels._cuda import HAVE_GPU
from kernels.fp8 import dequant_weight_reference, e4m3_decode
from weights import loader, placement
from weights.checkpoint import Checkpoint
from weights.random_checkpoint import DTYPE_OF_KIND, mtp_shapes, tensor_shapes
from weights.synthetic_checkpoint import RELEASED_CONFIG, synthetic_config, write_synthetic_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPUS = 0
if HAVE_GPU:
    import cupy as cp
    GPUS = cp.cuda.runtime.getDeviceCount()
gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU visible: GPU loading and placement run on the GPU machine")
two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"{GPUS} CUDA GPU(s) visible: the split run needs 2")
released = pytest.mark.skipif(not (HAVE_GPU and os.environ.get("HISA_RELEASED_SCALE") == "1"),
                              reason="the released-dimensions checkpoint (~27 GB, minutes) runs only with "
                                     "HISA_RELEASED_SCALE=1 on a GPU machine")

# The released config scaled down: 1 dense + 2 MoE layers, 16 experts of 192 (not a multiple of 128, so
# the fused gate_up halves need padding), 4 heads with the released head dims, an indexer that selects.
SMALL = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=192, n_routed_experts=16, n_group=4,
             topk_group=2, num_experts_per_tok=4, num_attention_heads=4, q_lora_rank=192, index_n_heads=8,
             index_topk=32, vocab_size=512, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("synthetic-small"))
    return write_synthetic_checkpoint(folder, synthetic_config(**SMALL), seed=3, shard_bytes=2 << 20)


_models = {}


def get_model(folder, device="cpu", weights="dequant", gpus=None):
    key = (folder, device, weights, gpus)
    if key not in _models:
        _models[key] = M.load(folder, device, progress=False, weights=weights, gpus=gpus)[1]
    return _models[key]


def to_np(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def prompt(n, seed=0, vocab=512):
    return [0] + [int(t) for t in np.random.default_rng(seed).integers(6, vocab, n - 1)]


def rel_err(got, want):
    """(max |got - want| / max |want|, rms(got - want) / rms(want), where the worst entry is)."""
    got, want = to_np(got).astype(np.float64), to_np(want).astype(np.float64)
    err = np.abs(got - want)
    return (err.max() / np.abs(want).max(), np.sqrt((err ** 2).mean() / (want ** 2).mean()),
            np.unravel_index(err.argmax(), err.shape))


def run_logits(m, ids, decode=2, mode="dsa"):
    """Logits of a chunked prefill (every position) followed by `decode` one-token steps."""
    sel = M.Selector(m.cfg, mode)
    cache = m.new_cache(len(ids) + decode)
    out = [to_np(m.prefill(ids, cache, sel, chunk=max(1, len(ids) // 2), all_logits=True))]
    for t in prompt(decode + 1, seed=99, vocab=m.cfg.vocab_size)[1:]:
        out.append(to_np(m.forward([t], cache, sel)))
    return np.concatenate(out)


# --- the synthetic checkpoint -----------------------------------------------------------------------

def test_synthetic_checkpoint_has_the_released_layout(small):
    ckpt = Checkpoint(small)
    cfg = ckpt.config
    assert cfg["num_hidden_layers"] == 3 and cfg["first_k_dense_replace"] == 1
    assert cfg["kv_lora_rank"] == RELEASED_CONFIG["kv_lora_rank"] and cfg["index_head_dim"] == 128
    shapes = tensor_shapes(cfg)
    shapes.update(mtp_shapes(cfg))
    assert set(ckpt.names()) == set(shapes)
    for name, (shape, kind) in shapes.items():
        assert ckpt.info(name) == (DTYPE_OF_KIND[kind], tuple(shape)), name
    index = json.load(open(os.path.join(small, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) == len(ckpt.files) >= 3
    assert index["metadata"]["total_size"] == ckpt.nbytes
    # fp8 weights: finite e4m3 (no NaN bit patterns) whose real values are ~N(0, 1/fan_in)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.experts.5.gate_proj.weight"):
        bits = np.asarray(ckpt.get(name))
        assert not np.isin(bits, [0x7F, 0xFF]).any()
        w = dequant_weight_reference(bits, np.asarray(ckpt.get(name + "_scale_inv")))
        assert 0.8 < w.std() * np.sqrt(w.shape[1]) < 1.25, name
        assert np.isfinite(e4m3_decode(bits)).all()


def test_synthetic_writer_is_deterministic(small, tmp_path):
    again = write_synthetic_checkpoint(str(tmp_path), synthetic_config(**SMALL), seed=3, shard_bytes=2 << 20)
    for f in sorted(os.listdir(small)):
        assert open(os.path.join(small, f), "rb").read() == open(os.path.join(again, f), "rb").read(), f


def test_synthetic_writer_streams(tmp_path):
    """Memory holds one tensor at a time, not a shard, let alone the checkpoint: the peak of traced
    allocations stays a small multiple of the largest tensor while ~110 MB are written."""
    config = synthetic_config(hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
                              n_routed_experts=64, num_attention_heads=4, q_lora_rank=192, index_n_heads=8,
                              vocab_size=2048)
    largest = max(4 * int(np.prod(shape)) for shape, _ in tensor_shapes(config).values())  # as float32
    tracemalloc.start()
    try:
        write_synthetic_checkpoint(str(tmp_path), config, shard_bytes=16 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    ckpt = Checkpoint(str(tmp_path))
    assert len(ckpt.files) >= 6
    assert peak < 3 * largest + (4 << 20) < ckpt.nbytes / 4, \
        f"peak {peak / 1e6:.1f} MB writing {ckpt.nbytes / 1e6:.0f} MB (largest tensor {largest / 1e6:.1f} MB as float32)"


def test_mtp_layer_is_skipped(small):
    ckpt = Checkpoint(small)
    cfg = M.Config.from_dict(ckpt.config)
    mtp = [n for n in ckpt.names() if n.startswith(f"model.layers.{cfg.num_hidden_layers}.")]
    assert mtp, "the synthetic checkpoint should carry an MTP part"
    params, _ = loader.load_params(ckpt, cfg, small, np, "fp8", progress=False)
    assert not [n for n in params if n.startswith(f"model.layers.{cfg.num_hidden_layers}.")]
    assert len(get_model(small).layers) == cfg.num_hidden_layers


# --- weight modes -----------------------------------------------------------------------------------

def test_layout_fuses_and_stacks(small):
    """gate and up share one array (each half padded to whole 128-row scale blocks when kept FP8); the
    routed experts are stacked, the shared expert after them; scales follow their weights; kv_b_proj is
    fp32 in both modes."""
    ckpt = Checkpoint(small)
    cfg = M.Config.from_dict(ckpt.config)
    params, mode = loader.load_params(ckpt, cfg, small, np, "fp8", progress=False)
    E, F, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size  # F = 192 -> halves of 256
    p = "model.layers.1.mlp."
    assert params[p + "experts.gate_up_proj.weight"].shape == (E + 1, 2 * 256, D)
    assert params[p + "experts.gate_up_proj.weight_scale_inv"].shape == (E + 1, 4, D // 128)
    assert params[p + "experts.down_proj.weight"].shape == (E + 1, D, F)
    assert params[p + "experts.down_proj.weight_scale_inv"].shape == (E + 1, D // 128, 2)
    assert not [n for n in params if "shared_experts" in n]
    assert params["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * cfg.intermediate_size, D)
    assert params["model.layers.0.self_attn.kv_b_proj.weight"].dtype == np.float32
    assert params["model.layers.0.self_attn.q_b_proj.weight"].dtype == np.uint8
    # expert 5's up_proj sits in the second half, rows 256..447; 448..511 are zero padding
    up = "model.layers.1.mlp.experts.5.up_proj.weight"
    stacked = params[p + "experts.gate_up_proj.weight"][5]
    np.testing.assert_array_equal(stacked[256:256 + F], ckpt.get(up))
    assert not stacked[256 + F:].any() and not stacked[F:256].any()
    np.testing.assert_array_equal(params[p + "experts.gate_up_proj.weight_scale_inv"][5][2:4],
                                  ckpt.get(up + "_scale_inv"))
    # the shared expert is index E: gate rows 0..191, up rows 256..447, down as stored
    shared = p + "shared_experts."
    np.testing.assert_array_equal(params[p + "experts.gate_up_proj.weight"][E][:F], ckpt.get(shared + "gate_proj.weight"))
    np.testing.assert_array_equal(params[p + "experts.gate_up_proj.weight"][E][256:256 + F],
                                  ckpt.get(shared + "up_proj.weight"))
    np.testing.assert_array_equal(params[p + "experts.down_proj.weight"][E], ckpt.get(shared + "down_proj.weight"))
    np.testing.assert_array_equal(params[p + "experts.down_proj.weight_scale_inv"][E],
                                  ckpt.get(shared + "down_proj.weight_scale_inv"))
    # fp8 weights that stand alone stay views on the mapped shard: no copy in host memory
    assert isinstance(params["model.layers.0.self_attn.o_proj.weight"], np.memmap)
    dq, _ = loader.load_params(ckpt, cfg, small, np, "dequant", progress=False)
    assert dq[p + "experts.gate_up_proj.weight"].shape == (E + 1, 2 * F, D)
    assert not [n for n in dq if n.endswith("_scale_inv")]


def test_layout_refuses_experts_stored_unlike(small):
    """The stacked arrays take one dtype: a shared expert stored BF16 beside FP8 routed experts is refused
    with the names, not silently cast."""
    config = Checkpoint(small).config
    cfg = M.Config.from_dict(config)
    tensors = {n: (tuple(shape), DTYPE_OF_KIND[kind]) for n, (shape, kind) in tensor_shapes(config).items()}
    loader.layout(cfg, tensors, "fp8")  # as written: every expert FP8
    name = "model.layers.1.mlp.shared_experts.up_proj.weight"
    tensors[name] = (tensors[name][0], "BF16")
    with pytest.raises(M.CheckpointError, match=r"shared_experts.up_proj.weight goes into "
                                                r"model.layers.1.mlp.experts.gate_up_proj.weight \[17, 512, 512\] uint8"):
        loader.layout(cfg, tensors, "fp8")
    loader.layout(cfg, tensors, "dequant")  # all fp32 then


def old_moe(moe, x, expert_weights):
    """The MoE before issue 6: a loop over experts, gate, up and down as three separate products."""
    experts, weights = moe.route(x)
    gate, up, down = expert_weights("shared")
    y = M.linear(M.silu(M.linear(x, gate)) * M.linear(x, up), down)
    for e in range(moe.cfg.n_routed_experts):
        t, slot = np.nonzero(experts == e)
        if len(t):
            gate, up, down = expert_weights(e)
            h = M.silu(M.linear(x[t], gate)) * M.linear(x[t], up)
            y[t] += weights[t, slot][:, None] * M.linear(h, down)
    return y


@pytest.mark.parametrize("weights", ["dequant", "fp8"])
def test_grouped_moe_equals_the_per_expert_loop(small, weights):
    ckpt = Checkpoint(small)
    m = get_model(small, weights=weights)

    def expert_weights(e):  # read from the checkpoint, not from the stacked arrays under test
        out = []
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = (f"model.layers.2.mlp.shared_experts.{proj}.weight" if e == "shared" else
                    f"model.layers.2.mlp.experts.{e}.{proj}.weight")
            bits, scale = np.asarray(ckpt.get(name)), np.asarray(ckpt.get(name + "_scale_inv"))
            out.append(M.FP8Weight(bits, scale) if weights == "fp8" else dequant_weight_reference(bits, scale))
        return out
    x = np.random.default_rng(4).standard_normal((37, m.cfg.hidden_size)).astype(np.float32)
    moe = m.layers[2].mlp
    got, want = moe(x), old_moe(moe, x, expert_weights)
    err, _, where = rel_err(got, want)
    # same products, only the order of the final sum over experts differs (float32 rounding)
    assert err < 1e-5, f"{weights}: max-rel {err:.2e} at {where}"


def previous_grouped_moe(moe, x):
    """MoE.__call__ before the grouped kernel (commit 7b05171): one product per expert that received tokens,
    on the same stacked arrays, and the shared expert as its own MLP."""
    experts, weights = moe.route(x)
    T, k = experts.shape
    order = np.argsort(experts.reshape(-1), kind="stable")
    counts = np.bincount(experts.reshape(-1), minlength=moe.cfg.n_routed_experts)
    ends = np.cumsum(counts)

    def per_expert(rows, w):
        y = np.empty((rows.shape[0], w.shape[-2]), np.float32)
        for e in np.flatnonzero(counts):
            lo, hi = ends[e] - counts[e], ends[e]
            y[lo:hi] = M.linear(rows[lo:hi], w[e])
        return y
    out = per_expert(M.swiglu(per_expert(x[order // k], moe.gate_up), moe.down.shape[-1]), moe.down)
    out *= weights.reshape(-1)[order][:, None]
    routed = np.empty_like(out)
    routed[order] = out
    return moe.shared(x) + routed.reshape(T, k, -1).sum(1)


def test_grouped_moe_equals_the_previous_code_exactly(small):
    """fp8 on the CPU: the grouped products, with the shared expert as one more group, change no bit (each
    group is fp8_linear of its rows, as before). T = 1: every group one row; 37: ragged groups."""
    moe = get_model(small, weights="fp8").layers[2].mlp
    for T in (1, 5, 37):
        x = np.random.default_rng(T).standard_normal((T, moe.cfg.hidden_size)).astype(np.float32)
        got, want = moe(x), previous_grouped_moe(moe, x)
        assert np.array_equal(got, want), f"T={T}: max-abs {np.abs(got - want).max():.3e}"


def test_fp8_weights_hold_the_checkpoint_exactly(small, monkeypatch):
    """With the activations left unquantised (fp8_linear and fp8_grouped_linear replaced by dequantise-then-
    multiply), fp8 mode computes what dequant mode does: the kept bits, scales, padding and stacking lose nothing."""
    want = run_logits(get_model(small, weights="dequant"), prompt(40, seed=1))
    fp8 = M.load(small, "cpu", progress=False, weights="fp8")[1]
    dequant = lambda w8, s: dequant_weight_reference(np.asarray(w8), s)  # noqa: E731
    monkeypatch.setattr(M, "fp8_linear", lambda x, w8, s: x @ dequant(w8, s).T)
    monkeypatch.setattr(M, "fp8_grouped_linear", lambda x, w8, s, offsets: M.grouped_linear(
        x, np.stack([dequant(w8[e], s[e]) for e in range(len(w8))]), offsets))
    got = run_logits(fp8, prompt(40, seed=1))
    err, _, where = rel_err(got, want)
    assert err < 1e-5, f"max-rel {err:.2e} at {where}"


# fp8 mode against dequant mode, end to end. Quantising an activation to e4m3 (3 mantissa bits, power-of-
# two scales per 128 channels) moves it by up to 1/16 of its value, ~2.7% rms, and so each FP8 product by
# about as much (measured: 2.7% for one linear, 4.5% for an MLP, 6-8% for an attention block, whose
# query, key and value products compound). Over three layers the hidden state's error grows to ~10% rms of
# the logits where no discrete decision depends on it (SMOOTH: every expert always chosen, the indexer keeps
# every key); measured 9.9-10.5% over six prompts, 10-13% max-rel. Where routing and top-k selections are
# live (SMALL: 4 of 16 experts), ~10% of the expert choices flip on these random weights, whose routing
# margins are thin, and the error reaches 19-30% rms (the trained dsv32-small: 10%). The bounds are 1.5x
# what was measured. The FP8 weights themselves are exact (the test above), and the kernels match the
# reference (tests/test_kernel_fp8_gemm.py, and on the GPU, test_gpu_fp8_matches_cpu below).
SMOOTH = dict(SMALL, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=8, index_topk=64)


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("synthetic-smooth"))
    return write_synthetic_checkpoint(folder, synthetic_config(**SMOOTH), seed=3, shard_bytes=2 << 20)


@pytest.mark.parametrize("which, rms_tol, max_tol, agree_tol", [("smooth", 0.16, 0.22, 0.7),
                                                                 ("small", 0.45, 0.9, 0.35)])
def test_fp8_mode_close_to_dequant(request, which, rms_tol, max_tol, agree_tol):
    folder = request.getfixturevalue(which)
    ids = prompt(40, seed=2)
    want = run_logits(get_model(folder, weights="dequant"), ids)
    got = run_logits(get_model(folder, weights="fp8"), ids)
    err, rms, where = rel_err(got, want)
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    assert 0 < rms < rms_tol and err < max_tol and agree >= agree_tol, \
        f"{which}: rms-rel {rms:.3f}, max-rel {err:.3f} at {where}, top-1 agreement {agree:.2f}"


def test_auto_chooses_by_memory(small, monkeypatch, capsys):
    ckpt = Checkpoint(small)
    cfg = M.Config.from_dict(ckpt.config)
    fp32 = sum(loader.stage_bytes(loader.layout(cfg, loader.check_tensors(ckpt, cfg, small), "dequant"),
                                  cfg.num_hidden_layers))
    monkeypatch.setattr(loader, "host_available_memory", lambda: 1e12)
    assert loader.load_params(ckpt, cfg, small, np, "auto")[1] == "dequant"
    assert "weights: dequant (auto" in capsys.readouterr().err
    monkeypatch.setattr(loader, "host_available_memory", lambda: placement.HEADROOM_MIN + fp32 / 2)
    assert loader.load_params(ckpt, cfg, small, np, "auto")[1] == "fp8"
    assert "weights: fp8 (auto" in capsys.readouterr().err


def test_cli_weights_flag(small):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), "--ckpt", small, "--device", "cpu",
                        "--weights", "fp8", "--prompt", "Hello", "--max-new-tokens", "3", "--temperature", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "weights: fp8 (asked for)" in r.stderr and "weights fp8, prompt" in r.stderr


# --- placement --------------------------------------------------------------------------------------

def test_plan_keeps_everything_on_one_device_when_there_is_one():
    assert placement.plan([5, 10, 10, 5], [100]) == [0, 0, 0, 0]
    assert placement.plan([5, 10, 10, 5], [20]) is None


def test_plan_splits_consecutive_runs_in_proportion():
    sizes = [2] + [10] * 8 + [2]  # embeddings, 8 layers, norm + lm_head
    where = placement.plan(sizes, [100, 100])
    assert where == sorted(where) and where[0] == 0 and where[-1] == 1  # consecutive; embed first, head last
    loads = [sum(s for s, d in zip(sizes, where) if d == g) for g in (0, 1)]
    assert loads == [42, 42]
    where = placement.plan(sizes, [150, 50])  # a GPU with 3x the room takes ~3x the layers
    loads = [sum(s for s, d in zip(sizes, where) if d == g) for g in (0, 1)]
    assert loads[0] > 2.5 * loads[1] and max(l / c for l, c in zip(loads, (150, 50))) < 0.6
    # a layer too large for the first device skips it rather than failing
    assert placement.plan([30, 5], [20, 40]) == [1, 1]


def test_place_refuses_with_the_numbers():
    GB = 1e9
    with pytest.raises(placement.PlacementError) as e:
        placement.place([30 * GB, 50 * GB], [80 * GB], "the fp8 weights")
    msg = str(e.value)
    assert "the fp8 weights need 80.0 GB" in msg and "80.0 GB free" in msg and "72.0 GB usable" in msg
    assert "\n" not in msg
    with pytest.raises(placement.PlacementError) as e:
        placement.place([100 * GB] * 3, [80 * GB, 80 * GB], "the weights")
    assert "need 300.0 GB" in str(e.value) and "72.0 + 72.0 = 144.0 GB usable" in str(e.value)
    with pytest.raises(placement.PlacementError) as e:  # enough in total, but one layer fits no GPU
        placement.place([10 * GB, 75 * GB], [80 * GB, 80 * GB], "the weights")
    assert "largest layer takes 75.0 GB" in str(e.value)
    assert placement.usable(10 * GB) == 8 * GB and placement.usable(100 * GB) == 90 * GB


def test_placement_table():
    table = placement.describe([0, 0, 1, 1], [1e9, 2e9, 2e9, 1e9], [80e9, 79e9],
                               loader.stage_names(2))
    lines = table.splitlines()
    assert "embed .. layer 0" in lines[1] and "3.0" in lines[1] and "80.0" in lines[1]
    assert "layer 1 .. norm, lm_head" in lines[2]


def test_kernel_caches_are_per_device(monkeypatch):
    """A compiled module or function belongs to one GPU: the launchers' caches keep one per device."""
    from kernels import _cuda
    current = types.SimpleNamespace(id=0)
    monkeypatch.setattr(_cuda, "cp", types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: current)))
    made = []
    make = _cuda.per_device(lambda name: made.append(name) or object())
    first = make("kernel")
    assert make("kernel") is first
    current.id = 1
    second = make("kernel")
    assert second is not first and make("kernel") is second and made == ["kernel", "kernel"]


# --- GPU: the small synthetic checkpoint --------------------------------------------------------------

def fp8_weights(m):
    """(name, FP8Weight) of every linear weight the model keeps in e4m3; stacked experts: the first and last."""
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        for n in ("q_a_proj", "q_b_proj", "kv_a_proj", "o_proj"):
            yield f"{i}.{n}", getattr(a, n)
        yield f"{i}.indexer.wq_b", a.indexer.wq_b
        yield f"{i}.indexer.wk", a.indexer.wk
        mlp = layer.mlp
        if isinstance(mlp, M.MoE):
            for e in (0, m.cfg.n_routed_experts - 1):
                yield f"{i}.experts.{e}.gate_up", mlp.gate_up[e]
                yield f"{i}.experts.{e}.down", mlp.down[e]
            mlp = mlp.shared
        yield f"{i}.mlp.gate_up", mlp.gate_up
        yield f"{i}.mlp.down", mlp.down


# GPU fp8 against CPU fp8. Layer by layer, on the same input, the GPU model's weights must be the CPU's bit
# for bit and its products the reference's (the kernels' tolerance, tests/test_kernel_fp8_gemm.py). End to
# end no close match exists: the two paths differ by ~1e-4 in their float operations (dequant mode, measured
# on an H200: 1.4e-4 - 2.7e-3 rms-rel), and rounding activations to 3 mantissa bits amplifies a difference
# d to ~sqrt(d * ulp) at every product, so after a few layers the two fp8 runs differ by e4m3's own
# rounding noise. Measured on an H200 (SMOOTH, two prompts): 8.3-8.6% rms-rel, top-1 agreement 0.83-0.88,
# the size of fp8 against dequant (10%); the bound below is 1.5x that, far below a broken weight's O(1).
@gpu
def test_gpu_fp8_matches_cpu(small, smooth):
    cpu, dev = get_model(small, "cpu", "fp8"), get_model(small, "gpu", "fp8", gpus=1)
    assert dev.weights == "fp8" and isinstance(dev.layers[1].self_attn.q_a_proj, M.FP8Weight)
    rng = np.random.default_rng(0)
    for (name, w), (_, wg) in zip(fp8_weights(cpu), fp8_weights(dev)):
        assert np.array_equal(to_np(wg.bits), w.bits) and np.array_equal(to_np(wg.scale), w.scale), name
        for T in (3, 40):  # the decode GEMV and the prefill GEMM
            x = rng.standard_normal((T, w.shape[-1])).astype(np.float32)
            want, got = M.linear(x, w), to_np(M.linear(cp.asarray(x), wg))
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err < 5e-3, f"{name} T={T}: max-rel {err:.2e}"
    ids = prompt(40, seed=5)
    want = run_logits(get_model(smooth, "cpu", "fp8"), ids)
    assert_within_fp8_noise(run_logits(get_model(smooth, "gpu", "fp8", gpus=1), ids), want)


def assert_within_fp8_noise(got, want):
    """GPU fp8 logits against CPU fp8 logits: within e4m3's rounding noise (see above), not equal."""
    err, rms, where = rel_err(got, want)
    agree = (to_np(got).argmax(-1) == to_np(want).argmax(-1)).mean()
    print(f"fp8 GPU vs CPU: rms-rel {rms:.3f}, max-rel {err:.3f}, top-1 agreement {agree:.2f}")
    assert rms < 0.13 and agree >= 0.7, f"rms-rel {rms:.3f}, max-rel {err:.3f} at {where}, top-1 agreement {agree:.2f}"


# The MoE on the GPU (two grouped launches, the shared expert a group of every token) against the CPU's on the
# same input and the same routing (mix() takes the CPU's choice, so that no expert choice can flip). Each
# grouped product is within its kernel's tolerance of the reference (tests/test_kernel_fp8_gemm.py); between
# the two, h is re-quantised to e4m3, where an error of ~1e-4 flips a value's rounding now and then (one step
# is 1/16 of it), each flip moving an output by ~1/16 / sqrt(F) of its size. Estimated, not yet measured:
# rms-rel ~1e-3; the bounds leave room, and a wrong group, expert, weight or a missing shared expert is O(1).
@gpu
def test_gpu_grouped_moe_matches_cpu(small):
    cpu, dev = get_model(small, "cpu", "fp8"), get_model(small, "gpu", "fp8", gpus=1)
    moe_c, moe_g = cpu.layers[2].mlp, dev.layers[2].mlp
    rng = np.random.default_rng(8)
    for T in (1, 12, 40):  # the largest group (the shared expert's T rows) picks GEMV t8, t16, then wgmma
        x = rng.standard_normal((T, cpu.cfg.hidden_size)).astype(np.float32)
        experts, weights = moe_c.route(x)
        want = moe_c.mix(x, experts, weights)
        got = moe_g.mix(cp.asarray(x), cp.asarray(experts), cp.asarray(weights))
        err, rms, where = rel_err(got, want)
        assert rms < 1e-2 and err < 5e-2, f"T={T}: rms-rel {rms:.2e}, max-rel {err:.2e} at {where}"


@gpu
def test_gpu_refuses_before_allocating(small, monkeypatch):
    pool = cp.get_default_memory_pool()
    gc.collect()  # earlier tests' garbage freed now, not during the load (used bytes would drop)
    before = pool.used_bytes()
    monkeypatch.setattr(loader, "gpu_free_memory", lambda n=None: [placement.HEADROOM_MIN + 1e6])
    with pytest.raises(placement.PlacementError, match=r"need .* GB; GPU 0 has .* GB free"):
        M.load(small, "gpu", progress=False, weights="fp8", gpus=1)
    assert pool.used_bytes() == before


@two_gpus
def test_two_gpus_equal_one(small):
    ids = prompt(40, seed=6)
    one = get_model(small, "gpu", "fp8", gpus=1)
    two = get_model(small, "gpu", "fp8", gpus=2)
    assert {layer.device for layer in one.layers} == {0}
    assert {layer.device for layer in two.layers} == {0, 1}
    assert two.embed_tokens.device.id == 0 and two.lm_head.device.id == 1
    err, _, where = rel_err(run_logits(two, ids, mode="hisa"), run_logits(one, ids, mode="hisa"))
    assert err < 1e-6, f"max-rel {err:.2e} at {where}"


# --- GPU: the released dimensions --------------------------------------------------------------------

@pytest.fixture(scope="module")
def released_ckpt(tmp_path_factory):
    folder = os.environ.get("HISA_RELEASED_DIR")
    if folder and os.path.exists(os.path.join(folder, "config.json")):
        return folder
    folder = folder or str(tmp_path_factory.mktemp("synthetic-released"))
    return write_synthetic_checkpoint(folder, synthetic_config(), progress=True)


@pytest.fixture(scope="module")
def released_cpu_logits(released_ckpt):
    """The numpy path (fp8 weights, the fp8_linear reference) on a short prompt: prefill and 2 decode steps."""
    m = M.load(released_ckpt, "cpu", progress=False, weights="fp8")[1]
    logits = run_logits(m, prompt(12, seed=7, vocab=262))
    del m
    return logits


def released_gpu_run(folder, gpus):
    m = M.load(folder, "gpu", progress=True, weights="fp8", gpus=gpus)[1]
    devices = {layer.device for layer in m.layers}
    logits = run_logits(m, prompt(12, seed=7, vocab=262))
    del m
    for device in range(gpus):
        with cp.cuda.Device(device):
            cp.get_default_memory_pool().free_all_blocks()
    return logits, devices


@pytest.fixture(scope="module")
def released_one_gpu(released_ckpt):
    return released_gpu_run(released_ckpt, 1)


# The same noise bound as test_gpu_fp8_matches_cpu: measured here on an H200, rms-rel 0.078, max-rel 0.17.
@released
def test_released_dims_one_gpu(released_ckpt, released_one_gpu, released_cpu_logits):
    """Loads on one GPU with FP8 weights (~31 GB), prefill and decode match the numpy path (fp8 noise)."""
    assert Checkpoint(released_ckpt).config["hidden_size"] == 7168
    got, devices = released_one_gpu
    assert devices == {0}
    assert_within_fp8_noise(got, released_cpu_logits)


@released
@two_gpus
def test_released_dims_two_gpus(released_ckpt, released_one_gpu):
    """Split over two GPUs, the logits are the one-GPU run's."""
    got, devices = released_gpu_run(released_ckpt, 2)
    assert devices == {0, 1}
    err, rms, where = rel_err(got, released_one_gpu[0])
    assert err < 1e-6, f"max-rel {err:.2e} (rms {rms:.2e}) at {where}"
