"""The model on a small random checkpoint in the released layout: numerics, cache consistency, indexer modes.

Runs on the CPU (numpy) always and on the GPU (CuPy) when one is visible.
"""
import math
import re

import numpy as np
import pytest

import hisa
import model as M
from kernels._cuda import HAVE_GPU
from kernels.fp8 import e4m3_encode, e4m3_round, quantize_ue8m0
from kernels.indexer import index_scores
from kernels.topk import topk
from weights.random_checkpoint import TINY_CONFIG, write_random_checkpoint

DEVICES = ["cpu"] + (["gpu"] if HAVE_GPU else [])


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(str(folder), seed=1)
    return str(folder)


_models = {}


def get_model(ckpt_dir, device, precision="fp8"):
    key = (ckpt_dir, device, precision)
    if key not in _models:
        _models[key] = M.load(ckpt_dir, device, precision, progress=False)[1]
    return _models[key]


def to_np(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def prompt(n, seed=0, vocab=262):
    return [0] + list(np.random.default_rng(seed).integers(6, vocab, n - 1))


def assert_close(got, want, rtol, what):
    got, want = to_np(got).astype(np.float64), to_np(want).astype(np.float64)
    err = np.abs(got - want)
    scale = np.abs(want).max()
    worst = np.unravel_index(err.argmax(), err.shape)
    assert err.max() <= rtol * scale, (f"{what}: max-abs {err.max():.3g}, max-rel {err.max() / scale:.3g} "
                                       f"(of the largest |value| {scale:.3g}) at {worst}")


# --- building blocks --------------------------------------------------------------------------------

def test_fp8_hand_values():
    # ties to even, saturation, subnormal step 2^-9
    x = np.array([1.0625, 1.1875, 449.0, -1000.0, 2.0**-10, 3 * 2.0**-10, 0.3], np.float32)
    assert e4m3_round(x).tolist() == [1.0, 1.25, 448.0, -448.0, 0.0, 2 * 2.0**-9, 0.3125]
    # amax 500 -> 500/448 = 1.116 -> scale 2^ceil(log2 1.116) = 2; 250 rounds to 256 (step 16 in [128, 256))
    v8, s = quantize_ue8m0(np.array([1.0, -3.0, 500.0, 0.1], np.float32))
    assert s.tolist() == [2.0] and v8.tolist() == [0.5, -1.5, 256.0, 0.05078125]
    # an all-zero block: amax floors at 1e-4, scale 2^ceil(log2(1e-4/448)) = 2^-22
    assert quantize_ue8m0(np.zeros(64, np.float32))[1].tolist() == [2.0**-22]
    # e4m3 bits: 1.0 = 0 0111 000, -448 = 1 1111 110, smallest subnormal 2^-9 = 0 0000 001
    assert e4m3_encode(np.array([1.0, -448.0, 2.0**-9], np.float32)).tolist() == [0x38, 0xFE, 0x01]


def test_hadamard_orthonormal():
    for n in (1, 2, 64, 128):
        h = M.hadamard(n)
        np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    h = M.hadamard(128)
    q, k = np.random.default_rng(0).standard_normal((2, 128)).astype(np.float32)
    assert abs((q @ h) @ (k @ h) - q @ k) < 1e-4


def test_yarn_frequencies_formula():
    for rs in (TINY_CONFIG["rope_scaling"],
               {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                "beta_slow": 1, "mscale": 1, "mscale_all_dim": 1}):
        cfg = M.Config.from_dict(dict(TINY_CONFIG, qk_rope_head_dim=64, rope_scaling=rs))
        R, theta, orig, factor = 64, cfg.rope_theta, rs["original_max_position_embeddings"], rs["factor"]
        d = lambda r: R * math.log(orig / (2 * math.pi * r)) / (2 * math.log(theta))
        low, high = max(math.floor(d(32)), 0), min(math.ceil(d(1)), R - 1)
        want = []
        for i in range(R // 2):
            f = theta ** (-2 * i / R)
            ramp = min(max((i - low) / (high - low), 0), 1)
            want.append(f / factor * ramp + f * (1 - ramp))
        np.testing.assert_allclose(M.rope_frequencies(cfg), want, rtol=1e-12)
    plain = M.Config.from_dict(dict(TINY_CONFIG, rope_scaling=None))
    np.testing.assert_allclose(M.rope_frequencies(plain), 10000.0 ** (-np.arange(0, 16, 2) / 16))
    assert M.attention_scale(plain) == 48 ** -0.5


def test_rope_layouts():
    cos, sin = np.cos([[0.3, 1.1]]).astype(np.float32), np.sin([[0.3, 1.1]]).astype(np.float32)
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    c, s = cos[0], sin[0]
    inter = [1 * c[0] - 2 * s[0], 1 * s[0] + 2 * c[0], 3 * c[1] - 4 * s[1], 3 * s[1] + 4 * c[1]]
    half = [1 * c[0] - 3 * s[0], 2 * c[1] - 4 * s[1], 1 * s[0] + 3 * c[0], 2 * s[1] + 4 * c[1]]
    np.testing.assert_allclose(M.rope(x, cos, sin, interleaved=True)[0], inter, rtol=1e-6)
    np.testing.assert_allclose(M.rope(x, cos, sin, interleaved=False)[0], half, rtol=1e-6)


def test_moe_routing_matches_a_plain_loop(ckpt_dir):
    m = get_model(ckpt_dir, "cpu")
    moe = m.layers[-1].mlp
    cfg = m.cfg
    x = np.random.default_rng(3).standard_normal((40, cfg.hidden_size)).astype(np.float32)
    experts, weights = moe.route(x)
    E, G = cfg.n_routed_experts, cfg.n_group
    for t in range(len(x)):
        s = [1 / (1 + math.exp(-float(x[t] @ moe.gate[e]))) for e in range(E)]
        b = [s[e] + float(moe.bias[e]) for e in range(E)]
        per = E // G
        gscore = [sum(sorted(b[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(G)]
        groups = sorted(range(G), key=lambda g: (-gscore[g], g))[: cfg.topk_group]
        cand = [e for e in range(E) if e // per in groups]
        chosen = sorted(cand, key=lambda e: (-b[e], e))[: cfg.num_experts_per_tok]
        w = [s[e] for e in chosen]
        w = [v / sum(w) * cfg.routed_scaling_factor for v in w]
        assert list(experts[t]) == chosen, f"token {t}"
        np.testing.assert_allclose(weights[t], w, rtol=1e-5)


# --- whole model -----------------------------------------------------------------------------------

def test_load_round_trip(ckpt_dir):
    from weights.checkpoint import Checkpoint
    from kernels.fp8 import dequant_weight_reference
    m = get_model(ckpt_dir, "cpu")
    ck = Checkpoint(ckpt_dir)
    np.testing.assert_array_equal(m.embed_tokens, np.asarray(ck.get("model.embed_tokens.weight"), np.float32))
    name = "model.layers.1.self_attn.q_b_proj.weight"
    want = dequant_weight_reference(np.asarray(ck.get(name)), np.asarray(ck.get(name + "_scale_inv")))
    np.testing.assert_array_equal(m.layers[1].self_attn.q_b_proj, want)
    assert len(m.layers) == m.cfg.num_hidden_layers  # the MTP layer was skipped


SELECTORS = {
    "dense": dict(mode="dense"),
    "dsa": dict(mode="dsa"),
    "hisa": dict(mode="hisa", block_size=4, blocks=12),  # m*B = 48 > K = 32: prunes beyond 48 keys
    "block": dict(mode="block", block_size=4),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp8", "float"])
@pytest.mark.parametrize("mode", list(SELECTORS))
def test_prefill_equals_decode(ckpt_dir, device, precision, mode):
    """Chunked prefill (chunks starting at positions > 0) gives the logits of token-by-token decode."""
    m = get_model(ckpt_dir, device, precision)
    sel = M.Selector(m.cfg, **SELECTORS[mode])
    ids = prompt(90, seed=5)
    c1 = m.new_cache(len(ids))
    pre = m.prefill(ids, c1, sel, chunk=37, all_logits=True)
    c2 = m.new_cache(len(ids))
    dec = m.xp.concatenate([m.forward([t], c2, sel) for t in ids])
    assert_close(pre, dec, 2e-3 if precision == "fp8" else 1e-4, f"{mode}/{precision}/{device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["dense", "dsa", "hisa"])
def test_expanded_equals_absorbed(ckpt_dir, device, mode):
    m = get_model(ckpt_dir, device, "float")
    sel = M.Selector(m.cfg, **SELECTORS[mode])
    ids = prompt(70, seed=6)
    out = {}
    for form in ("expanded", "absorbed"):
        out[form] = m.prefill(ids, m.new_cache(len(ids)), sel, chunk=30, form=form, all_logits=True)
    assert_close(out["expanded"], out["absorbed"], 1e-4, f"{mode}/{device}")


@pytest.mark.parametrize("device", DEVICES)
def test_dsa_equals_dense_within_topk(ckpt_dir, device):
    m = get_model(ckpt_dir, device)
    ids = prompt(m.cfg.index_topk, seed=7)  # every query sees at most index_topk keys
    logits = {mode: m.prefill(ids, m.new_cache(len(ids)), M.Selector(m.cfg, mode), all_logits=True)
              for mode in ("dense", "dsa")}
    # same computation on the CPU; on the GPU dense prefill takes the expanded form, DSA the sparse kernel
    assert_close(logits["dsa"], logits["dense"], 1e-6 if device == "cpu" else 1e-4, device)


@pytest.mark.parametrize("device", DEVICES)
def test_hisa_equals_dsa_within_budget(ckpt_dir, device):
    """Default HISA (B = K/16 = 2, m = 64: m*B = 128) on a 120-token prompt keeps every block."""
    m = get_model(ckpt_dir, device)
    ids = prompt(120, seed=8)
    logits = {mode: m.prefill(ids, m.new_cache(len(ids)), M.Selector(m.cfg, mode), chunk=50, all_logits=True)
              for mode in ("dsa", "hisa")}
    assert_close(logits["hisa"], logits["dsa"], 1e-6, device)


def random_index_cache(xp, S, Hi=4, Di=64, seed=0):
    """Indexer queries/keys as the model caches them (fp8 bits and scales), with some structure."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((S, Di)).astype(np.float32)
    k += 0.8 * np.repeat(rng.standard_normal((S // 16 + 1, Di)), 16, axis=0)[:S]  # block-level signal
    q = rng.standard_normal((S, Hi, Di)).astype(np.float32)
    k8, ks = quantize_ue8m0(k)
    q8, qs = quantize_ue8m0(q)
    w = rng.standard_normal((S, Hi)).astype(np.float32) * 0.2
    cache = {"k": xp.asarray(e4m3_encode(k8)), "k_scale": xp.asarray(ks[:, 0])}
    return xp.asarray(e4m3_encode(q8)), xp.asarray(qs[..., 0]), xp.asarray(w), cache


@pytest.mark.parametrize("device", DEVICES)
def test_hisa_sets(device):
    """Exactly DSA's set while a query sees <= m*B keys; beyond, only tokens of the kept blocks."""
    xp = np if device == "cpu" else __import__("cupy")
    S, K, B, m = 700, 32, 8, 10
    q, qs, w, cache = random_index_cache(xp, S)
    ends = xp.arange(1, S + 1, dtype=np.int32)
    pooled = hisa.PooledKeys(cache, B)
    pooled.update(0, S)
    dsa = to_np(topk(index_scores(q, w, cache["k"], ends, q_scale=qs, k_scale=cache["k_scale"]), K))
    got = to_np(hisa.select(q, qs, w, cache, pooled, ends, K, m))
    blocks = to_np(topk(hisa.block_scores(q, qs, w, pooled, ends), m))
    n_within = m * B
    for t in range(S):
        a, b = set(dsa[t][dsa[t] >= 0]), set(got[t][got[t] >= 0])
        if t + 1 <= n_within:
            assert a == b, f"query {t} sees {t + 1} <= m*B = {n_within} keys, yet HISA != DSA"
        else:
            assert len(b) == K and {p // B for p in b} <= set(blocks[t][blocks[t] >= 0]), f"query {t}"
            assert {0, t // B} <= set(blocks[t]), f"query {t}: first or own block not kept"
    overlap = np.mean([len(set(dsa[t]) & set(got[t])) / K for t in range(n_within, S)])
    assert overlap > 0.5, f"HISA keeps only {overlap:.2f} of DSA's selections beyond m*B"  # not a bound, a sanity check


def test_hisa_arguments():
    """hisa's API names a bad argument: a block size or counts below 1, an update that would leave blocks
    unpooled or run past the cache, ends past what was pooled (numpy; on the GPU the kernels clamp, no sync)."""
    S = 100
    q, qs, w, cache = random_index_cache(np, S)
    with pytest.raises(ValueError, match="block size 0"):
        hisa.PooledKeys(cache, 0)
    pooled = hisa.PooledKeys(cache, 8)
    with pytest.raises(ValueError, match=r"keys \[16, 40\) with 0 pooled so far"):
        pooled.update(16, 40)  # blocks 0 and 1 would never be pooled
    with pytest.raises(ValueError, match="start <= S <= 100"):
        pooled.update(0, S + 1)
    pooled.update(0, 60)
    pooled.update(60, 61)
    ends = np.int32([10, 61])
    with pytest.raises(ValueError, match="m = 0 blocks"):
        hisa.select(q[:2], qs[:2], w[:2], cache, pooled, ends, 8, 0)
    with pytest.raises(ValueError, match="ends reach 80, past the 61 positions pooled"):
        hisa.select(q[:2], qs[:2], w[:2], cache, pooled, np.int32([10, 80]), 8, 4)
    assert hisa.select(q[:2], qs[:2], w[:2], cache, pooled, ends, 8, 4).shape == (2, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_block_sparse_selects_whole_blocks(device):
    xp = np if device == "cpu" else __import__("cupy")
    S, K, B = 300, 32, 8
    q, qs, w, cache = random_index_cache(xp, S, seed=2)
    ends = xp.arange(1, S + 1, dtype=np.int32)
    pooled = hisa.PooledKeys(cache, B)
    pooled.update(0, S)
    got = to_np(hisa.block_select(q, qs, w, pooled, ends, K))
    for t in (0, 5, 40, 299):
        sel = got[t][got[t] >= 0]
        blocks = set(sel // B)
        assert 0 in blocks and t // B in blocks and len(blocks) <= K // B
        want = {p for b in blocks for p in range(b * B, min((b + 1) * B, t + 1))}
        assert set(sel) == want, f"query {t}"


@pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU visible: GPU-vs-CPU model parity runs on the GPU machine")
@pytest.mark.parametrize("mode", ["dense", "dsa", "hisa"])
def test_gpu_matches_cpu(ckpt_dir, mode):
    ids = prompt(80, seed=9)
    out = []
    for device in ("cpu", "gpu"):
        m = get_model(ckpt_dir, device, "fp8")
        out.append(m.prefill(ids, m.new_cache(len(ids)), M.Selector(m.cfg, **SELECTORS[mode]), all_logits=True))
    assert_close(out[1], out[0], 1e-2, mode)


def test_generate_greedy_and_sampled(ckpt_dir):
    m = get_model(ckpt_dir, "cpu")
    sel = M.Selector(m.cfg, "hisa")
    ids = prompt(20)
    a, st = M.generate(m, ids, 8, sel)
    b, _ = M.generate(m, ids, 8, sel)
    assert a == b and len(a) == 8 and st["prefill_tokens"] == 20 and st["decode_tokens"] == 7
    c, _ = M.generate(m, ids, 8, sel, temperature=0.8, top_p=0.9, seed=3)
    d, _ = M.generate(m, ids, 8, sel, temperature=0.8, top_p=0.9, seed=3)
    assert c == d
    # greedy decode equals the argmax of a full forward over prompt + generated tokens
    logits = m.prefill(ids + a[:-1], m.new_cache(len(ids) + 7), sel, all_logits=True)
    assert list(np.argmax(to_np(logits[len(ids) - 1:]), -1)) == a


@pytest.mark.parametrize("kwargs,needle", [
    ({"max_new_tokens": 0}, "max new tokens 0"),
    ({"temperature": -0.5}, "temperature -0.5"),
    ({"temperature": float("inf")}, "temperature inf"),
    ({"top_p": 0.0}, "top-p 0.0"),
    ({"top_p": float("nan")}, "top-p nan"),
    ({"seed": -3}, "seed -3"),
    ({"seed": 1.5}, "seed 1.5"),
])
def test_generate_rejects_bad_requests(ckpt_dir, kwargs, needle):
    """generate() names the bad argument before any work (it once ran a token for max_new_tokens = 0, decoded
    greedily at a negative temperature and failed inside numpy on a negative seed)."""
    m = get_model(ckpt_dir, "cpu")
    args = {"max_new_tokens": 4} | kwargs
    with pytest.raises(M.InputError, match=re.escape(needle)):
        M.generate(m, prompt(5), args.pop("max_new_tokens"), M.Selector(m.cfg, "dsa"), **args)


@pytest.mark.parametrize("kwargs,needle", [({"block_size": 0}, "HISA block size 0"),
                                           ({"blocks": -1}, "HISA blocks kept -1"),
                                           ({"block_size": 2.5}, "HISA block size 2.5")])
def test_selector_rejects_bad_hisa_sizes(ckpt_dir, kwargs, needle):
    with pytest.raises(M.InputError, match=re.escape(needle)):
        M.Selector(get_model(ckpt_dir, "cpu").cfg, "hisa", **kwargs)


@pytest.mark.parametrize("field,value,needle", [
    ("hidden_size", "big", 'hidden_size = "big": expected a whole number >= 1'),
    ("num_hidden_layers", 0, "num_hidden_layers = 0: expected a whole number >= 1"),
    ("num_hidden_layers", True, "num_hidden_layers = true"),
    ("index_topk", 2.5, "index_topk = 2.5"),
    ("first_k_dense_replace", -1, "first_k_dense_replace = -1: expected a whole number >= 0"),
    ("norm_topk_prob", 1, "norm_topk_prob = 1: expected true or false"),
    ("rms_norm_eps", 0, "rms_norm_eps = 0: expected a finite number > 0"),
    ("rope_scaling", [1], "rope_scaling = [1]: expected an object"),
    ("eos_token_id", 10 ** 6, "eos_token_id 1000000 is not below vocab_size"),
])
def test_config_field_types(field, value, needle):
    """config.json comes from anywhere: a field of the wrong type or out of range is named with its file
    (a string size once ended in a TypeError deep in the model's construction)."""
    with pytest.raises(M.ConfigError, match=re.escape(f"cfg.json: {needle}")):
        M.Config.from_dict(dict(TINY_CONFIG, **{field: value}), where="cfg.json")
    M.Config.from_dict(TINY_CONFIG, where="cfg.json")  # the unedited config loads
