"""DeepSeek-V3.2 inference in numpy (CPU) or CuPy (GPU): config, building blocks, MLA with the DSA
indexer, MoE, the model, generation and the command line. The exact definition we follow is
shared/SPEC.md; section numbers below (SPEC §n) point into it.

Shape letters, used in the trailing comments:
  T  tokens in this forward          S  cache positions after it (S = start + T)
  D  hidden_size                     V  vocab_size
  H  attention heads                 C  kv_lora_rank (the latent)      Q  q_lora_rank
  N  qk_nope_head_dim                R  qk_rope_head_dim               Dv v_head_dim
  Hi index_n_heads                   Di index_head_dim                 K  index_topk
  E  routed experts                  F  an MLP's inner width           F' F padded to whole scale blocks

Weights (weights/loader.py): linear layers hold fp32 arrays dequantised at load ("dequant"), or FP8Weights,
the checkpoint's e4m3 bits and block scales ("fp8"). With several GPUs each layer lives on one of them
and the hidden state follows the layers from GPU to GPU.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

import hisa
from kernels._cuda import HAVE_GPU, device_of, is_whole, on_device, to_device, xp_of
from kernels.fp8_gemm import fp8_grouped_linear, fp8_linear, fp8_roundtrip_rows, quantize_rows
from kernels.indexer import index_scores
from kernels.sparse_mla import sparse_mla
from kernels.topk import topk
from weights.checkpoint import Checkpoint
from weights.loader import MODES as WEIGHT_MODES, load_params
from weights.safetensors import CheckpointError

INDEXERS = ("dense", "dsa", "hisa", "block")


class ConfigError(ValueError):
    """config.json lacks a field or holds a value the engine cannot use."""


class InputError(ValueError):
    """A prompt or a request the model cannot serve (too long, empty, ...)."""


# ----------------------------------------------------------------------------------------------------
# Configuration (SPEC §1): field names are the checkpoint's config.json keys

@dataclasses.dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    max_position_embeddings: int
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # yarn parameters, or None for plain RoPE
    bos_token_id: int = 0
    eos_token_id: int = 1

    MAY_BE_ZERO = ("first_k_dense_replace", "bos_token_id", "eos_token_id")  # every other count or size is >= 1

    @classmethod
    def from_dict(cls, d, where="config.json"):
        d = dict(d)
        if "rope_scaling" not in d and "rope_parameters" in d:  # newer configs use this name
            d["rope_scaling"] = d["rope_parameters"]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [n for n in required if d.get(n) is None]
        if missing:
            raise ConfigError(f"{where}: missing required field(s) {', '.join(missing)}")
        for n, f in fields.items():  # JSON gives any type: each field must hold its own
            v = d.get(n)
            if v is None:
                continue
            least = 0 if n in cls.MAY_BE_ZERO else 1
            want, ok = {bool: ("true or false", isinstance(v, bool)),
                        int: (f"a whole number >= {least}", is_whole(v, least)),
                        float: ("a finite number > 0",
                                (is_whole(v, 1) or isinstance(v, float)) and math.isfinite(v) and v > 0),
                        dict: ("an object", isinstance(v, dict))}[f.type]
            if not ok:
                raise ConfigError(f"{where}: {n} = {json.dumps(v)}: expected {want}")
        cfg = cls(**{n: d[n] for n in fields if d.get(n) is not None})
        cfg.validate(where)
        return cfg

    def validate(self, where):
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"{where}: {msg}")
        for name in ("bos_token_id", "eos_token_id"):
            need(getattr(self, name) < self.vocab_size,
                 f"{name} {getattr(self, name)} is not below vocab_size {self.vocab_size}")
        need(self.n_routed_experts % self.n_group == 0,
             f"n_routed_experts {self.n_routed_experts} is not a multiple of n_group {self.n_group}")
        need(self.topk_group <= self.n_group, f"topk_group {self.topk_group} > n_group {self.n_group}")
        need(self.n_shared_experts == 1, f"n_shared_experts {self.n_shared_experts}: the engine stacks one shared "
                                         f"expert with the routed ones (weights/loader.py), as DeepSeek-V3.2 has")
        need(self.num_experts_per_tok <= self.n_routed_experts // self.n_group * self.topk_group,
             f"num_experts_per_tok {self.num_experts_per_tok} exceeds the experts of {self.topk_group} groups")
        need(self.qk_rope_head_dim % 2 == 0 and self.qk_rope_head_dim <= self.index_head_dim,
             f"qk_rope_head_dim {self.qk_rope_head_dim} must be even and <= index_head_dim {self.index_head_dim}")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0,
             f"index_head_dim {self.index_head_dim} must be a power of two (Hadamard transform)")
        need(self.index_head_dim <= 128, f"index_head_dim {self.index_head_dim} > 128 (one FP8 scale per head)")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise ConfigError(f"{where}: rope_scaling type {kind!r} is not supported (yarn or none)")
            if kind == "yarn":
                for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
                    need(k in rs, f"rope_scaling (yarn) lacks {k}")

    @property
    def yarn(self):
        rs = self.rope_scaling
        return rs if rs and rs.get("type", rs.get("rope_type")) == "yarn" else None


# ----------------------------------------------------------------------------------------------------
# Building blocks (SPEC §3)

def rms_norm(x, w, eps):
    x = x.astype(np.float32)
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(eps))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + np.float32(eps)) * w + b


def silu(x):
    return x / (1 + np.exp(-x))


def rope_frequencies(cfg):
    """f_i = theta^(-2i/R), bent towards f_i/factor below the YaRN ramp (SPEC §3)."""
    R = cfg.qk_rope_head_dim
    f = cfg.rope_theta ** (-np.arange(0, R, 2, dtype=np.float64) / R)  # (R/2,)
    yarn = cfg.yarn
    if yarn is None:
        return f
    orig, factor = yarn["original_max_position_embeddings"], yarn["factor"]

    def d(r):  # the dimension whose wavelength fits r rotations into the original context
        return R * math.log(orig / (2 * math.pi * r)) / (2 * math.log(cfg.rope_theta))
    low = max(math.floor(d(yarn["beta_fast"])), 0)
    high = min(math.ceil(d(yarn["beta_slow"])), R - 1)
    if high == low:
        high += 0.001  # as the released code does, to avoid a zero-width ramp
    ramp = np.clip((np.arange(R // 2) - low) / (high - low), 0, 1)
    return f / factor * ramp + f * (1 - ramp)


def attention_scale(cfg):
    """(N+R)^-0.5, times m^2 with YaRN, m = 0.1 * mscale_all_dim * ln(factor) + 1 (SPEC §4)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    yarn = cfg.yarn
    if yarn is not None and yarn["factor"] > 1:
        m = 0.1 * yarn.get("mscale_all_dim", 1.0) * math.log(yarn["factor"]) + 1
        scale *= m * m
    return scale


def rope(x, cos, sin, interleaved):
    """Rotate pairs of the last dim by the angles in cos/sin [T, R/2]; x [T, ..., R].
    interleaved pairs (x[2i], x[2i+1]) for MLA, half-split pairs (x[i], x[i+R/2]) for the indexer."""
    xp = xp_of(x)
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    if interleaved:
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return xp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).reshape(x.shape)
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    return xp.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)


def hadamard(n):
    """Orthonormal Walsh-Hadamard matrix of size n (Sylvester order), scaled by n^-0.5."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / math.sqrt(n)).astype(np.float32)


def bf16_bits(x):
    """Round to bf16 (nearest even) and return the bit patterns as uint16: CuPy has no bf16 dtype."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class FP8Weight:
    """A linear weight as the checkpoint stores it (SPEC §2): e4m3 bits [..., out, in] (uint8) and fp32
    scale_inv [..., ceil(out/128), ceil(in/128)], W[i, j] = e4m3(bits[i, j]) * scale_inv[i // 128, j // 128].
    Stacked experts carry a leading axis E; w[e] is expert e's weight."""

    def __init__(self, bits, scale):
        self.bits, self.scale = bits, scale

    @property
    def shape(self):
        return self.bits.shape

    def __getitem__(self, e):
        return FP8Weight(self.bits[e], self.scale[e])


def weight(p, name):
    """The linear weight `name` of a layer's params: an FP8Weight where the loader kept the e4m3 bits and
    their scales (weight mode "fp8"), else the fp32 array."""
    scale = p.get(name + ".weight_scale_inv")
    return p[name + ".weight"] if scale is None else FP8Weight(p[name + ".weight"], scale)


def linear(x, w):
    """y = x W^T, w [out, in] as stored. An FP8Weight's product quantises x to e4m3 too, per token and
    block of 128 channels with power-of-two scales (kernels/fp8_gemm.py), and returns fp32."""
    if isinstance(w, FP8Weight):
        return fp8_linear(xp_of(x).ascontiguousarray(x, dtype=np.float32), w.bits, w.scale)
    return x @ w.T


# ----------------------------------------------------------------------------------------------------
# The DSA "lightning" indexer (SPEC §5)

class Indexer:
    """Scores every visible key for each query with a few small ReLU heads (the Selector keeps the top K).

    The key cache it owns holds, per position, the key as the scores use it: in "fp8" precision the
    e4m3 bits of the Hadamard-rotated key and its power-of-two scale (Di + 4 bytes), in "float"
    precision the key itself (fp32 on the CPU, bf16 on the GPU, where the kernels read bf16). HISA
    (hisa.py) reads the same cache and keeps its block means beside it.
    """

    def __init__(self, cfg, p, precision):
        self.cfg, self.precision = cfg, precision
        self.wq_b, self.wk = weight(p, "wq_b"), weight(p, "wk")               # (Hi*Di, Q), (Di, D)
        self.k_norm_w, self.k_norm_b = p["k_norm.weight"], p["k_norm.bias"]  # (Di,)
        self.weights_proj = p["weights_proj.weight"]                         # (Hi, D)
        xp = xp_of(self.weights_proj)
        self.hadamard = xp.asarray(hadamard(cfg.index_head_dim))

    def new_cache(self, xp, capacity):
        Di = self.cfg.index_head_dim
        if self.precision == "fp8":
            return {"k": xp.zeros((capacity, Di), np.uint8), "k_scale": xp.zeros(capacity, np.float32)}
        # float precision: fp32 keys on the CPU; bf16 bit patterns on the GPU, which the kernels read
        return {"k": xp.zeros((capacity, Di), np.float32 if xp is np else np.uint16), "k_scale": None}

    def queries_and_keys(self, x, c_q, cos, sin):
        """q [T, Hi, Di], w [T, Hi] and k [T, Di], in the form the scores use (SPEC §5)."""
        cfg, T = self.cfg, x.shape[0]
        Hi, Di, R = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        q = linear(c_q, self.wq_b).reshape(T, Hi, Di)                             # (T, Hi, Di)
        k = layer_norm(linear(x, self.wk), self.k_norm_w, self.k_norm_b, cfg.rms_norm_eps)  # (T, Di)
        xp = xp_of(q)
        # the FIRST R dims carry position, rotated in half-split pairs (unlike MLA)
        q = xp.concatenate([rope(q[..., :R], cos, sin, interleaved=False), q[..., R:]], axis=-1)
        k = xp.concatenate([rope(k[:, :R], cos, sin, interleaved=False), k[:, R:]], axis=-1)
        w = linear(x, self.weights_proj) * np.float32(Hi ** -0.5 * Di ** -0.5)      # (T, Hi)
        return q, w.astype(np.float32), k

    def __call__(self, x, c_q, cos, sin, cache, start):
        """Append this chunk's keys to the cache; return (q, q_scale, w) for scoring against it."""
        q, w, k = self.queries_and_keys(x, c_q, cos, sin)
        S = start + x.shape[0]
        if self.precision == "fp8":
            # rotate by H (q.k unchanged in exact arithmetic; it spreads outliers before FP8)
            q8, q_scale = quantize_rows(q @ self.hadamard)                          # (T, Hi, Di), (T, Hi)
            cache["k"][start:S], cache["k_scale"][start:S] = quantize_rows(k @ self.hadamard)  # (T, Di), (T,)
            return q8, q_scale, w
        if xp_of(q) is np:
            cache["k"][start:S] = k
            return q.astype(np.float32), None, w
        cache["k"][start:S] = bf16_bits(k)
        return bf16_bits(q), None, w

    def scores(self, q, q_scale, w, cache, S, ends):
        """I[t, s] = sum_j w[t,j] ReLU(q[t,j] . k[s]) for s < ends[t], -inf after."""
        return index_scores(q, w, cache["k"][:S], ends, q_scale=q_scale,
                            k_scale=None if q_scale is None else cache["k_scale"][:S])  # (T, S)


# ----------------------------------------------------------------------------------------------------
# Multi-head latent attention (SPEC §4)

class MLA:
    def __init__(self, cfg, p, precision):
        self.cfg, self.precision = cfg, precision
        self.q_a_proj, self.q_a_layernorm = weight(p, "q_a_proj"), p["q_a_layernorm.weight"]
        self.q_b_proj = weight(p, "q_b_proj")                                    # (H*(N+R), Q)
        self.kv_a_proj = weight(p, "kv_a_proj_with_mqa")                         # (C+R, D)
        self.kv_a_layernorm = p["kv_a_layernorm.weight"]
        self.kv_b_proj = p["kv_b_proj.weight"]  # (H*(N+Dv), C) fp32 in every weight mode: split per head below
        self.o_proj = weight(p, "o_proj")                                        # (D, H*Dv)
        H, N, Dv, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        w = self.kv_b_proj.reshape(H, N + Dv, C)
        self.w_uk, self.w_uv = w[:, :N], w[:, N:]                                 # (H, N, C), (H, Dv, C)
        self.scale = attention_scale(cfg)
        self.indexer = Indexer(cfg, {k[8:]: v for k, v in p.items() if k.startswith("indexer.")}, precision)

    def new_cache(self, xp, capacity):
        cfg = self.cfg
        return {"c_kv": xp.zeros((capacity, cfg.kv_lora_rank), np.float32),
                "k_pe": xp.zeros((capacity, cfg.qk_rope_head_dim), np.float32),
                "index": self.indexer.new_cache(xp, capacity)}

    def __call__(self, x, cos, sin, cache, start, selector, form):
        cfg, T = self.cfg, x.shape[0]
        H, N, R, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        S = start + T
        xp = xp_of(x)
        c_q = rms_norm(linear(x, self.q_a_proj), self.q_a_layernorm, cfg.rms_norm_eps)    # (T, Q)
        q = linear(c_q, self.q_b_proj).reshape(T, H, N + R)
        q_nope, q_pe = q[..., :N], rope(q[..., N:], cos, sin, interleaved=True)           # (T, H, N), (T, H, R)
        kv = linear(x, self.kv_a_proj)                                                    # (T, C+R)
        c_kv = rms_norm(kv[:, :C], self.kv_a_layernorm, cfg.rms_norm_eps)                 # (T, C)
        if self.precision == "fp8":
            c_kv = fp8_roundtrip_rows(c_kv)  # what the deployed FP8 latent cache holds
        cache["c_kv"][start:S] = c_kv
        cache["k_pe"][start:S] = rope(kv[:, C:], cos, sin, interleaved=True)              # (T, R)

        # which cached positions each query attends to: None means all causal ones (dense)
        selected = selector(self.indexer, x, c_q, cos, sin, cache["index"], start)        # (T, K') or None
        if form == "auto":
            form = "absorbed" if (T == 1 or (selected is not None and xp is not np)) else "expanded"
        if form == "expanded":
            o = self.expanded(q_nope, q_pe, cache, start, selected)
        else:
            o = self.absorbed(q_nope, q_pe, cache, start, selected)
        return linear(o.reshape(T, -1), self.o_proj)                                      # (T, D)

    def expanded(self, q_nope, q_pe, cache, start, selected):
        """Prefill form: up-project every cached latent to per-head keys and values."""
        cfg = self.cfg
        T, H, N = q_nope.shape
        S = start + T
        xp = xp_of(q_nope)
        kv = linear(cache["c_kv"][:S], self.kv_b_proj).reshape(S, H, N + cfg.v_head_dim)
        k_nope, v = kv[..., :N], kv[..., N:]                                              # (S, H, N), (S, H, Dv)
        score = (xp.einsum("thn,shn->hts", q_nope, k_nope)
                 + xp.einsum("thr,sr->hts", q_pe, cache["k_pe"][:S])) * np.float32(self.scale)  # (H, T, S)
        visible = xp.arange(S)[None, :] <= (start + xp.arange(T))[:, None]               # (T, S) causal
        if selected is not None:
            visible &= selection_mask(selected, S)
        score = xp.where(visible[None], score, -np.inf)
        p = softmax(score)
        return xp.einsum("hts,shv->thv", p, v)                                            # (T, H, Dv)

    def absorbed(self, q_nope, q_pe, cache, start, selected):
        """Decode form: fold W_uk into the query and W_uv after the sum; attend in the latent space."""
        T = q_nope.shape[0]
        xp = xp_of(q_nope)
        q_abs = xp.einsum("thn,hnc->thc", q_nope, self.w_uk)                              # (T, H, C)
        if selected is None:  # dense: every causal position, -1 marks the future
            pos = xp.arange(start + T, dtype=np.int32)[None, :]
            selected = xp.where(pos <= (start + xp.arange(T, dtype=np.int32))[:, None], pos, -1)
        o_latent = sparse_mla(xp.ascontiguousarray(q_abs), xp.ascontiguousarray(q_pe), cache["c_kv"], cache["k_pe"],
                              selected.astype(np.int32), self.scale)                      # (T, H, C)
        return xp.einsum("thc,hvc->thv", o_latent, self.w_uv)                             # (T, H, Dv)


def softmax(x):
    xp = xp_of(x)
    m = x.max(-1, keepdims=True)
    e = xp.exp(x - xp.where(xp.isfinite(m), m, 0))
    return e / e.sum(-1, keepdims=True)


def selection_mask(selected, S):
    """Boolean (T, S) mask from per-query position lists padded with -1."""
    xp = xp_of(selected)
    T = selected.shape[0]
    mask = xp.zeros((T, S + 1), bool)
    mask[xp.arange(T)[:, None], xp.where(selected >= 0, selected, S)] = True  # -1 lands in the spare column
    return mask[:, :S]


# ----------------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU MLP and the DeepSeekMoE layer (SPEC §3, §7)

def swiglu(h, F):
    """silu(gate) * up from a fused gate_up product h [T, 2F']: gate is h[:, :F], up starts at F'."""
    half = h.shape[-1] // 2
    return silu(h[:, :F]) * h[:, half:half + F]                                      # (T, F)


class MLP:
    """down(silu(gate(x)) * up(x)), gate and up in one product: gate_up is their weights stacked row-wise,
    [2F', D] (weights/loader.py)."""

    def __init__(self, gate_up, down):
        self.gate_up, self.down = gate_up, down                                      # (2F', D), (D, F)

    def __call__(self, x):
        return linear(swiglu(linear(x, self.gate_up), self.down.shape[-1]), self.down)  # (T, D)


def grouped_linear(x, w, offsets):
    """y[lo:hi] = x[lo:hi] @ w[e]^T for every group e, lo, hi = offsets[e], offsets[e+1]: x's rows sorted by
    expert, w stacked [E, N, K], offsets host ints [E + 1] (a group may be empty).

    FP8 weights: one grouped product (kernels/fp8_gemm.py:fp8_grouped_linear). On the GPU the rows are
    quantised once and one kernel launch runs every expert that has rows; on the CPU the reference runs
    expert by expert. fp32 weights (dequant mode): one matmul per expert that has rows."""
    if isinstance(w, FP8Weight):
        return fp8_grouped_linear(xp_of(x).ascontiguousarray(x, dtype=np.float32), w.bits, w.scale, offsets)
    y = xp_of(x).empty((x.shape[0], w.shape[-2]), np.float32)                        # (rows, N)
    for e in np.flatnonzero(np.diff(offsets)):
        lo, hi = offsets[e], offsets[e + 1]
        y[lo:hi] = x[lo:hi] @ w[e].T
    return y


class MoE:
    """y = sum_j weights_j * Expert_{experts_j}(x) + Shared(x) per token: its top-k routed experts and the
    shared expert, each a SwiGLU MLP of width F.

    The loader stacks the shared expert after the routed ones, as slot E of gate_up and down, so that two
    grouped products (gate_up, then down) run every expert a batch needs: the shared expert is one more
    group, holding every token, with weight 1. At decode this saves the shared expert's own two products (on
    the GPU each is two launches and ~0.15-0.2 ms of host time, bench/NOTES.md); in prefill it costs nothing."""

    def __init__(self, cfg, p):
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.gate = p["gate.weight"]                                              # (E, D)
        self.bias = p["gate.e_score_correction_bias"]                             # (E,)
        self.gate_up = weight(p, "experts.gate_up_proj")                          # (E+1, 2F', D) routed, then shared
        self.down = weight(p, "experts.down_proj")                                # (E+1, D, F)
        self.shared = MLP(self.gate_up[E], self.down[E])                          # the shared expert alone (views)

    def route(self, x):
        """Group-limited sigmoid routing: (expert ids (T, k), weights (T, k))."""
        cfg = self.cfg
        xp = xp_of(x)
        T, E, G = x.shape[0], cfg.n_routed_experts, cfg.n_group
        s = 1 / (1 + xp.exp(-linear(x, self.gate).astype(np.float32)))           # (T, E) affinities
        s_sel = s + self.bias                                                    # the bias only steers the choice
        top2 = -xp.sort(-s_sel.reshape(T, G, E // G), axis=-1)[..., :2]
        group_score = top2.sum(-1)                                               # (T, G)
        groups = xp.argsort(-group_score, axis=-1, kind="stable")[:, : cfg.topk_group]
        keep = xp.zeros((T, G), bool)
        keep[xp.arange(T)[:, None], groups] = True
        s_sel = xp.where(xp.repeat(keep, E // G, axis=1), s_sel, -np.inf)
        experts = xp.argsort(-s_sel, axis=-1, kind="stable")[:, : cfg.num_experts_per_tok]  # (T, k)
        weights = xp.take_along_axis(s, experts, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdims=True)
        return experts, weights * np.float32(cfg.routed_scaling_factor)

    def __call__(self, x):
        experts, weights = self.route(x)                                          # (T, k), (T, k)
        return self.mix(x, experts, weights)

    def mix(self, x, experts, weights):
        """The experts' outputs for routed (token, expert) pairs, weighted and summed, plus the shared expert's."""
        xp = xp_of(x)
        T, k = experts.shape
        E = self.cfg.n_routed_experts
        # rows: the T*k (token, expert) pairs sorted by expert, then every token again for the shared expert
        # (slot E); each expert's rows are one contiguous group, rows offsets[e] .. offsets[e+1] - 1
        order = xp.argsort(experts.reshape(-1), kind="stable")                    # (T*k,)
        counts = np.bincount(xp_to_numpy(experts).reshape(-1), minlength=E + 1)   # (E+1,) on the host
        counts[E] = T
        offsets = np.concatenate([[0], np.cumsum(counts)])                        # (E+2,)
        xs = xp.concatenate([x[order // k], x])                                   # (T*k + T, D)
        h = grouped_linear(xs, self.gate_up, offsets)                             # (T*k + T, 2F')
        out = grouped_linear(swiglu(h, self.down.shape[-1]), self.down, offsets)  # (T*k + T, D)
        routed = xp.empty((T * k, out.shape[1]), np.float32)
        routed[order] = out[:T * k] * weights.reshape(-1)[order][:, None]         # back to (token, slot) order
        return out[T * k:] + routed.reshape(T, k, -1).sum(1)                      # (T, D)


def xp_to_numpy(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


# ----------------------------------------------------------------------------------------------------
# The model

class Block:
    def __init__(self, cfg, i, p, precision):
        self.input_layernorm, self.post_attention_layernorm = p["input_layernorm.weight"], p["post_attention_layernorm.weight"]
        self.device = device_of(self.input_layernorm)  # the GPU holding this layer's weights and cache (None: CPU)
        self.self_attn = MLA(cfg, {k[10:]: v for k, v in p.items() if k.startswith("self_attn.")}, precision)
        mlp = {k[4:]: v for k, v in p.items() if k.startswith("mlp.")}
        self.mlp = (MLP(weight(mlp, "gate_up_proj"), weight(mlp, "down_proj")) if i < cfg.first_k_dense_replace
                    else MoE(cfg, mlp))
        self.eps = cfg.rms_norm_eps

    def __call__(self, h, cos, sin, cache, start, selector, form):
        h = h + self.self_attn(rms_norm(h, self.input_layernorm, self.eps), cos, sin, cache, start, selector, form)
        return h + self.mlp(rms_norm(h, self.post_attention_layernorm, self.eps))


class Selector:
    """Which keys each query of a layer attends to: none chosen (dense), DSA's top-K, HISA, or blocks."""

    def __init__(self, cfg, mode, block_size=None, blocks=None):
        if mode not in INDEXERS:
            raise InputError(f"indexer {mode!r} is not one of {', '.join(INDEXERS)}")
        for what, v in (("HISA block size", block_size), ("HISA blocks kept", blocks)):
            if v is not None and not is_whole(v, 1):
                raise InputError(f"{what} {v}: a whole number, at least 1")
        K = cfg.index_topk
        self.mode, self.K = mode, K
        self.B = max(1, K // 16) if block_size is None else int(block_size)  # the paper's ratios: B = K/16,
        self.m = 64 if blocks is None else int(blocks)                       # m = 64 (m*B = 4K)
        if mode == "block" and self.B > K:
            raise InputError(f"block size {self.B} exceeds index_topk {K}: block-sparse would keep no block")

    def __call__(self, indexer, x, c_q, cos, sin, cache, start):
        if self.mode == "dense":
            return None
        q, q_scale, w = indexer(x, c_q, cos, sin, cache, start)
        xp = xp_of(q)
        T = x.shape[0]
        S = start + T
        ends = (start + 1 + xp.arange(T)).astype(np.int32)                       # query t sees s < ends[t]
        if self.mode == "dsa":
            return topk(indexer.scores(q, q_scale, w, cache, S, ends), self.K, lengths=ends)  # (T, K)
        if "pooled" not in cache:
            cache["pooled"] = hisa.PooledKeys(cache, self.B)
        pooled = cache["pooled"]
        pooled.update(start, S)
        if self.mode == "hisa":
            return hisa.select(q, q_scale, w, cache, pooled, ends, self.K, self.m)
        return hisa.block_select(q, q_scale, w, pooled, ends, self.K)


class Transformer:
    def __init__(self, cfg, params, precision="fp8"):
        if precision not in ("fp8", "float"):
            raise InputError(f"indexer precision {precision!r} is not fp8 or float")
        self.cfg, self.precision = cfg, precision
        self.weights = "fp8" if any(k.endswith("_scale_inv") for k in params) else "dequant"
        self.embed_tokens = params["model.embed_tokens.weight"]                  # (V, D)
        self.norm, self.lm_head = params["model.norm.weight"], params["lm_head.weight"]
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            pre = f"model.layers.{i}."
            p = {k[len(pre):]: v for k, v in params.items() if k.startswith(pre)}
            with on_device(device_of(p["input_layernorm.weight"])):  # where its small arrays are made too
                self.layers.append(Block(cfg, i, p, precision))
        angles = np.arange(cfg.max_position_embeddings)[:, None] * rope_frequencies(cfg)[None, :]
        self.rope = {}  # device -> (cos, sin) (max positions, R/2), a copy on every GPU that holds layers
        for device in {layer.device for layer in self.layers}:
            with on_device(device):
                self.rope[device] = self.xp.asarray(np.cos(angles), np.float32), self.xp.asarray(np.sin(angles), np.float32)

    @property
    def xp(self):
        return xp_of(self.embed_tokens)

    def new_cache(self, capacity):
        if capacity > self.cfg.max_position_embeddings:
            raise InputError(f"cache of {capacity} tokens exceeds max_position_embeddings {self.cfg.max_position_embeddings}")
        layers = []
        for layer in self.layers:  # each layer's cache beside its weights
            with on_device(layer.device):
                layers.append(layer.self_attn.new_cache(self.xp, capacity))
        return Cache(layers, capacity)

    def forward(self, ids, cache, selector, form="auto", all_logits=False):
        """Run tokens ids (T,) at positions cache.length .. +T; returns logits (T, V) or (1, V)."""
        xp, T, start = self.xp, len(ids), cache.length
        if start + T > cache.capacity:
            raise InputError(f"{start + T} tokens exceed the cache capacity {cache.capacity}")
        with on_device(device_of(self.embed_tokens)):
            h = self.embed_tokens[xp.asarray(ids)].astype(np.float32)            # (T, D)
        for layer, lc in zip(self.layers, cache.layers):
            with on_device(layer.device):
                h = to_device(h, layer.device)  # the hidden state follows the layers from GPU to GPU
                cos, sin = (a[start:start + T] for a in self.rope[layer.device])
                h = layer(h, cos, sin, lc, start, selector, form)
        cache.length += T
        if not all_logits:
            h = h[-1:]
        with on_device(device_of(self.lm_head)):
            h = to_device(h, device_of(self.lm_head))
            return linear(rms_norm(h, self.norm, self.cfg.rms_norm_eps), self.lm_head)  # (T, V)

    def prefill(self, ids, cache, selector, chunk=512, form="auto", all_logits=False):
        """Prefill in chunks of `chunk` tokens, each attending to the cache so far."""
        out = [self.forward(ids[i:i + chunk], cache, selector, form, all_logits) for i in range(0, len(ids), chunk)]
        with on_device(device_of(self.lm_head)):
            return self.xp.concatenate(out) if all_logits else out[-1]


class Cache:
    """Per-layer latent cache (c_kv, k_pe), indexer key cache and HISA's pooled keys."""

    def __init__(self, layers, capacity):
        self.layers, self.capacity, self.length = layers, capacity, 0


# ----------------------------------------------------------------------------------------------------
# Loading a checkpoint folder (SPEC §2)

def load(folder, device="auto", precision="fp8", progress=True, weights="auto", gpus=None):
    """Open a checkpoint folder, validate every tensor against the config and load the weights
    (weights/loader.py): fp32 ("dequant") or FP8 as stored ("fp8"), on the CPU or placed over the first
    `gpus` GPUs (default all). "auto" keeps FP8 only where fp32 would not fit. Returns (cfg, model, ckpt);
    model.weights says which mode was used."""
    if weights not in WEIGHT_MODES:
        raise InputError(f"--weights {weights!r} is not one of {', '.join(WEIGHT_MODES)}")
    if gpus is not None and gpus < 1:
        raise InputError(f"--gpus {gpus}: at least 1")
    ckpt = Checkpoint(folder)
    cfg = Config.from_dict(ckpt.config, where=os.path.join(folder, "config.json"))
    xp = select_device(device)
    if xp is np and gpus is not None:
        raise InputError(f"--gpus {gpus}: the model runs on the CPU here "
                         f"({'--device cpu' if device == 'cpu' else 'no CUDA GPU is visible to CuPy'})")
    if xp is not np and gpus is not None and gpus > xp.cuda.runtime.getDeviceCount():
        raise InputError(f"--gpus {gpus}: {xp.cuda.runtime.getDeviceCount()} GPU(s) are visible")
    params, _ = load_params(ckpt, cfg, folder, xp, weights, gpus, progress)
    return cfg, Transformer(cfg, params, precision), ckpt


def select_device(device):
    if device == "gpu" or (device == "auto" and HAVE_GPU):
        if not HAVE_GPU:
            raise InputError("--device gpu: no CUDA GPU is visible to CuPy")
        import cupy
        return cupy
    if device not in ("auto", "cpu", "gpu"):
        raise InputError(f"--device {device!r} is not auto, cpu or gpu")
    return np


# ----------------------------------------------------------------------------------------------------
# Generation

def check_request(max_new_tokens, temperature, top_p, seed):
    """InputError unless at least one token is asked for, temperature >= 0 (0: greedy), 0 < top_p <= 1 (1: no
    cut) and seed is an integer >= 0: what can be checked before the model is loaded."""
    if max_new_tokens < 1:
        raise InputError(f"max new tokens {max_new_tokens}: at least 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature {temperature}: a finite number >= 0 (0 decodes greedily)")
    if not 0 < top_p <= 1:  # false for NaN too
        raise InputError(f"top-p {top_p}: in (0, 1] (1 keeps every token)")
    if not is_whole(seed):
        raise InputError(f"seed {seed}: a whole number >= 0")


def check_length(cfg, n, max_new_tokens):
    """InputError unless the prompt has tokens and prompt plus new tokens fit the model's positions."""
    if n == 0:
        raise InputError("the prompt is empty (0 tokens)")
    if n + max_new_tokens > cfg.max_position_embeddings:
        raise InputError(f"prompt has {n} tokens and {max_new_tokens} more were asked for: "
                         f"{n + max_new_tokens} > max_position_embeddings {cfg.max_position_embeddings}")


def sample(logits, temperature, top_p, rng):
    """Greedy at temperature 0 (lowest id on ties), else softmax(logits / T) cut to the top-p mass."""
    logits = xp_to_numpy(logits).astype(np.float64).reshape(-1)
    if temperature <= 0:
        return int(np.argmax(logits))
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def generate(model, prompt_ids, max_new_tokens, selector, temperature=0.0, top_p=1.0, seed=0,
             chunk=512, on_token=None, stop_ids=()):
    """Prefill the prompt, then decode one token at a time. Returns (new ids, stats)."""
    cfg = model.cfg
    n = len(prompt_ids)
    check_request(max_new_tokens, temperature, top_p, seed)
    check_length(cfg, n, max_new_tokens)
    rng = np.random.default_rng(seed)
    cache = model.new_cache(n + max_new_tokens)
    t0 = time.perf_counter()
    logits = model.prefill(list(prompt_ids), cache, selector, chunk)
    next_id = sample(logits, temperature, top_p, rng)  # reads the logits back: prefill has finished
    t1 = time.perf_counter()
    out = []
    while True:
        out.append(next_id)
        if on_token:
            on_token(next_id)
        if next_id in stop_ids or len(out) >= max_new_tokens:
            break
        next_id = sample(model.forward([next_id], cache, selector), temperature, top_p, rng)
    t2 = time.perf_counter()
    return out, {"prefill_tokens": n, "prefill_s": t1 - t0, "decode_tokens": len(out) - 1, "decode_s": t2 - t1}


# ----------------------------------------------------------------------------------------------------
# Command line

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEFAULT_CHECKPOINT = os.path.join(WEIGHTS, "dsv32-small")  # trained by weights/make_model (its README.md)
RANDOM_CHECKPOINT = os.path.join(WEIGHTS, "random-tiny")   # random weights, written when first asked for


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate text with a DeepSeek-V3.2 checkpoint folder.")
    ap.add_argument("--ckpt", default=DEFAULT_CHECKPOINT, help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--indexer", default="dsa", choices=INDEXERS, help="which keys attention sees")
    ap.add_argument("--precision", default="fp8", choices=("fp8", "float"), help="indexer and latent-cache numerics")
    ap.add_argument("--hisa-block", type=int, default=None, help="HISA block size B (default index_topk/16)")
    ap.add_argument("--hisa-blocks", type=int, default=None, help="HISA blocks kept m (default 64)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7, help=">= 0; 0 for greedy decoding")
    ap.add_argument("--top-p", type=float, default=0.9, help="in (0, 1]: sample from the most likely tokens "
                    "holding this much probability; 1 keeps every token")
    ap.add_argument("--seed", type=int, default=0, help=">= 0")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the V3.2 chat encoding")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk size in tokens")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    ap.add_argument("--weights", default="auto", choices=WEIGHT_MODES,
                    help="linear weights kept FP8 as stored, or dequantised to fp32 at load; auto: fp8 only if fp32 does not fit")
    ap.add_argument("--gpus", type=int, default=None, help="spread the layers over the first N GPUs (default: all visible)")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args):
    from weights.tokenizer import StreamDecoder, Tokenizer
    if os.path.abspath(args.ckpt) == RANDOM_CHECKPOINT and not os.path.exists(os.path.join(args.ckpt, "config.json")):
        from weights.random_checkpoint import write_random_checkpoint
        print(f"writing the random-weights demo checkpoint to {args.ckpt}", file=sys.stderr)
        write_random_checkpoint(args.ckpt)
    if args.chunk < 1:
        raise InputError(f"--chunk {args.chunk}: at least 1")
    if not args.prompt:
        raise InputError("the prompt is empty (0 characters)")
    check_request(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    cfg, model, ckpt = load(args.ckpt, args.device, args.precision, weights=args.weights, gpus=args.gpus)
    tok = Tokenizer(ckpt.tokenizer_path)
    if args.chat:
        ids = tok.encode_chat(args.prompt, bos_id=cfg.bos_token_id)
    else:
        ids = [cfg.bos_token_id] + tok.encode(args.prompt)
    check_length(cfg, len(ids), args.max_new_tokens)  # before the prompt is echoed
    selector = Selector(cfg, args.indexer, args.hisa_block, args.hisa_blocks)
    stream = StreamDecoder(tok)
    gpus = len({layer.device for layer in model.layers})
    device = "CPU" if model.xp is np else "GPU" if gpus == 1 else f"{gpus} GPUs"
    print(f"[{device}, indexer {args.indexer} ({args.precision}), weights {model.weights}, prompt {len(ids)} tokens]",
          file=sys.stderr)
    sys.stdout.write(args.prompt if not args.chat else "")
    sys.stdout.flush()

    def show(token):
        if token != cfg.eos_token_id:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()
    _, st = generate(model, ids, args.max_new_tokens, selector, args.temperature, args.top_p, args.seed,
                     args.chunk, show, stop_ids=(cfg.eos_token_id,))
    print()
    rate = lambda n, s: f"{n / s:.1f}" if s > 0 and n else "-"
    print(f"prefill {st['prefill_tokens']} tokens in {st['prefill_s']:.3f} s ({rate(st['prefill_tokens'], st['prefill_s'])} tok/s), "
          f"decode {st['decode_tokens']} tokens in {st['decode_s']:.3f} s ({rate(st['decode_tokens'], st['decode_s'])} tok/s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
