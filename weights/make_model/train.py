"""Train the small DeepSeek-V3.2 model: the engine's architecture and numerics in torch, the indexer's
KL recipe (SPEC section 11), a copy-first curriculum, checkpoints that resume across device calls.

    python -m weights.make_model.train --smoke                   # tiny model, ~50 steps on the CPU
    python -m weights.make_model.train --bench                   # GPU: time a few steps of each stage
    python -m weights.make_model.train --run weights/make_model/runs/main --time-budget 540 [--copy-to $OUT]

Torch is used here only: the engine (model.py) never imports it. The module layout and attribute
names equal the checkpoint's tensor names (model.layers.{i}.self_attn.q_a_proj.weight, ...), so
export.py maps state_dict() to the released layout one to one. What must equal the engine is marked
"engine:"; the test tests/test_trained_export.py holds the two to the same logits.

Sections: configuration and recipe | fp8 numerics | the model | data | evaluation | checkpoints |
training loop | command line.
"""
import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

T0 = time.time()  # the time budget of a device call counts from here

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import model as engine  # noqa: E402  (numpy only: Config, rope_frequencies, attention_scale, hadamard)
from weights.make_model import corpus  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Configuration and recipe

# The model of `make run` (config.json fields; export.py adds the rest). Sized by the carry limit as
# much as by the time: see README.md ("The model").
MODEL_CONFIG = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 1024,      # the dense first layer's SwiGLU
    "moe_intermediate_size": 192,   # each routed expert and the shared one
    "num_hidden_layers": 6,
    "first_k_dense_replace": 1,
    "num_attention_heads": 8,
    "q_lora_rank": 192,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 1.0,   # 2.5 in the 671B model, which picks 8 of 256; here 2 of 8
    "norm_topk_prob": True,
    "index_n_heads": 4,
    "index_head_dim": 64,
    "index_topk": 128,              # 1/32 of the 4096-token training length
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,           # plain RoPE: trained at 4096, no extension needed to use 4096
    "bos_token_id": 0,
    "eos_token_id": 1,
}

SMOKE_CONFIG = dict(MODEL_CONFIG, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=2, q_lora_rank=48, kv_lora_rank=32,
                    qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                    n_group=2, topk_group=1, index_n_heads=2, index_head_dim=32, index_topk=16,
                    max_position_embeddings=1024)


@dataclasses.dataclass
class Stage:
    name: str
    steps: int                  # optimizer steps (at most: see until)
    seq_len: int
    batch: int                  # sequences per optimizer step
    micro: int                  # sequences per forward/backward (gradient accumulation)
    mix: dict                   # kind of sequence -> share: text, repeat, copy, passkey, kv
    lr: float                   # peak learning rate; the last stage decays it linearly to lr * FINAL_LR
    sparse: bool = False        # attention over the indexer's top-k only (else dense causal)
    fp8: bool = False           # the engine's fp8 numerics: weights fake-quantised, c_kv and indexer in e4m3
    kl_rows: int = 64           # query rows per sequence for the indexer's KL loss
    until: tuple = None         # (metric, threshold): end the stage once an evaluation reaches it,
    min_steps: int = 0          # after at least min_steps; the later stages get the time left
    copy_gap: tuple = (0, 64)   # text between a span and its repeat (tokens)
    copy_spans: dict = dataclasses.field(default_factory=lambda: dict(corpus.SPANS))  # see corpus.copy_doc
    repeat_spans: dict = dataclasses.field(default_factory=lambda: {"uniform": 0.5, "shuffled": 0.5})
    kv_facts: int = 4

    @property
    def tokens(self):
        return self.steps * self.batch * self.seq_len


TEXT = {"wiki": 0.35, "shakespeare": 0.25, "pydoc": 0.2, "pycode": 0.2}  # ordinary training text
WARMUP = 100        # steps of linear learning-rate warm-up at the start
REWARMUP = 20       # after a resume from the compact checkpoint (Adam's first moment restarts at 0)
FINAL_LR = 0.1      # of the peak, at the end of the last stage
TIE_INIT = True     # lm_head starts as a copy of embed_tokens (README: "What the CPU showed")
BIAS_RATE = 1e-3    # aux-loss-free balancing: bias += rate * sign(mean load - load) after each step

# Copy first (SPEC section 11: copying appears as a phase change that wants large, copy-dense batches),
# at a short length where it is cheap: "repeat" documents say each random span 2-4 times in a row,
# the densest copying signal there is. Then longer dense stages with text, then sparse attention.
RECIPE = [
    Stage("copy-512", steps=600, seq_len=512, batch=256, micro=64, lr=1.5e-3,
          mix={"repeat": 0.4, "copy": 0.2, "passkey": 0.2, "kv": 0.1, "text": 0.1},
          until=("copy_uniform_acc", 0.9), min_steps=150),
    Stage("dense-1k", steps=300, seq_len=1024, batch=128, micro=32, lr=1.5e-3,
          mix={"text": 0.5, "repeat": 0.05, "copy": 0.15, "passkey": 0.2, "kv": 0.1}, copy_gap=(0, 256), kv_facts=8),
    Stage("dense-4k", steps=500, seq_len=4096, batch=32, micro=8, lr=1.5e-3,
          mix={"text": 0.5, "repeat": 0.05, "copy": 0.15, "passkey": 0.2, "kv": 0.1}, copy_gap=(0, 1024), kv_facts=16),
    Stage("sparse-4k", steps=500, seq_len=4096, batch=32, micro=8, lr=1.5e-3, sparse=True, fp8=True,
          mix={"text": 0.5, "repeat": 0.05, "copy": 0.15, "passkey": 0.2, "kv": 0.1}, copy_gap=(0, 1024), kv_facts=16),
]

SMOKE_RECIPE = [
    Stage("copy-128", steps=20, seq_len=128, batch=8, micro=4, lr=3e-3, kl_rows=16,
          mix={"repeat": 0.25, "copy": 0.25, "passkey": 0.25, "kv": 0.25}, copy_gap=(0, 16), kv_facts=2),
    Stage("dense-256", steps=15, seq_len=256, batch=4, micro=4, lr=3e-3, kl_rows=16,
          mix={"text": 0.5, "passkey": 0.5}, kv_facts=4),
    Stage("sparse-256", steps=15, seq_len=256, batch=4, micro=4, lr=3e-3, kl_rows=16, sparse=True, fp8=True,
          mix={"text": 0.5, "passkey": 0.5}, kv_facts=4),
]


# ----------------------------------------------------------------------------------------------------
# FP8 numerics, as kernels/fp8.py computes them (engine: the same roundings, in torch)

E4M3_MAX = 448.0


def f32(t):
    """At least fp32: bf16 (autocast) goes up, a float64 reference stays."""
    return t if t.dtype == torch.float64 else t.float()


def e4m3_round(x):
    """Nearest e4m3 value, ties to even, saturating at +-448 (kernels/fp8.py:e4m3_round)."""
    _, e = torch.frexp(x.abs())
    step = torch.ldexp(torch.ones_like(x), torch.clamp(e - 4, min=-9))
    return torch.clamp(torch.round(x / step) * step, -E4M3_MAX, E4M3_MAX)


def ceil_pow2(x):
    f, e = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), torch.where(f == 0.5, e - 1, e))


def fp8_roundtrip(v, block=128):
    """v through e4m3 with a power-of-two scale per `block` trailing values (kernels/fp8.py:fp8_roundtrip)."""
    v = f32(v)
    n = v.shape[-1]
    block = min(block, n)
    vb = v.reshape(v.shape[:-1] + (n // block, block))
    amax = torch.clamp(vb.abs().amax(-1, keepdim=True), min=1e-4)
    s = ceil_pow2(amax / E4M3_MAX)
    return (e4m3_round(torch.clamp(vb / s, -E4M3_MAX, E4M3_MAX)) * s).reshape(v.shape)


def fp8_weight_roundtrip(w, block=128):
    """A linear weight [O, I] as stored: e4m3 with scale amax/448 per 128x128 block
    (weights/random_checkpoint.py:quantize_fp8_blocks), then dequantised."""
    O, I = w.shape
    wp = F.pad(w, (0, -I % block, 0, -O % block))
    wb = wp.reshape(wp.shape[0] // block, block, wp.shape[1] // block, block)
    s = torch.clamp(wb.abs().amax(dim=(1, 3), keepdim=True), min=1e-12) / E4M3_MAX
    return (e4m3_round(wb / s) * s).reshape(wp.shape)[:O, :I]


def straight_through(x, y):
    """y in the forward pass, the identity's gradient in the backward pass."""
    return x + (y - x).detach()


# ----------------------------------------------------------------------------------------------------
# The model (engine: model.py, SPEC sections 3-8)

@dataclasses.dataclass
class Numerics:
    """How one forward computes. sparse: attention over the indexer's top-k. fp8: the engine's "fp8"
    precision (c_kv and indexer q, k through e4m3) and, while training, weights fake-quantised as
    export.py stores them. exact: ties in top-k go to the lower position (stable sort), as the engine."""
    sparse: bool = False
    fp8: bool = False
    fp8_weights: bool = False
    exact: bool = False
    kl_rows: torch.Tensor = None   # (B, Rs) query positions whose indexer KL loss is wanted
    kl: list = dataclasses.field(default_factory=list)
    loads: list = dataclasses.field(default_factory=list)
    selected: list = dataclasses.field(default_factory=list)  # exact mode: each layer's selection (B, T, T)
    recall_rows: torch.Tensor = None  # (B, Rs) rows at which to measure the indexer's recall (dense attention)
    recall: list = dataclasses.field(default_factory=list)


class Linear(nn.Linear):
    """A linear layer stored as fp8 in the release; while training fp8-aware, the forward uses the
    weight as stored (fake-quantised) and the gradient flows to the full-precision weight."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)
        self.num = None  # set by Transformer: the Numerics of the current forward

    def forward(self, x):
        w = self.weight
        if self.num is not None and self.num.fp8_weights:
            w = straight_through(w, fp8_weight_roundtrip(f32(w)).to(w.dtype))
        return F.linear(x, w)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps) in fp32 (engine: rms_norm)."""

    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        x = f32(x)
        return f32(self.weight) * x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps)


def rope(x, cos, sin, interleaved):
    """Rotate pairs of x's last dim (engine: rope); cos/sin broadcast against x[..., :R/2].
    Interleaved pairs (x[2i], x[2i+1]) in MLA, half-split pairs (x[i], x[i+R/2]) in the indexer."""
    if interleaved:
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)
    x0, x1 = x.chunk(2, -1)
    return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)


class Indexer(nn.Module):
    """The DSA lightning indexer: I[t, s] = sum_j w[t,j] ReLU(q[t,j] . k[s]) (SPEC section 5)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        Hi, Di = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = Linear(cfg.q_lora_rank, Hi * Di)
        self.wk = Linear(cfg.hidden_size, Di)
        self.k_norm = nn.LayerNorm(Di, eps=cfg.rms_norm_eps)
        self.weights_proj = nn.Linear(cfg.hidden_size, Hi, bias=False)  # stored bf16, not fp8
        self.register_buffer("hadamard", torch.from_numpy(engine.hadamard(Di)), persistent=False)

    def queries_keys(self, x, c_q, cos, sin, fp8):
        """q (B, T, Hi, Di), w (B, T, Hi) and k (B, T, Di) in fp32 (engine: Indexer.queries_and_keys)."""
        cfg = self.cfg
        B, T, _ = x.shape
        Hi, Di, R = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        q = f32(self.wq_b(c_q)).view(B, T, Hi, Di)
        k = self.k_norm(f32(self.wk(x)))
        # the FIRST R dims carry position, rotated in half-split pairs (MLA: the last, interleaved)
        q = torch.cat([rope(q[..., :R], cos[:, None], sin[:, None], False), q[..., R:]], -1)
        k = torch.cat([rope(k[..., :R], cos, sin, False), k[..., R:]], -1)
        if fp8:  # the released numerics: Hadamard-rotated, e4m3 with a power-of-two scale per head
            with torch.autocast(x.device.type, enabled=False):  # the rotation in fp32, as the engine
                hd = self.hadamard.to(q.dtype)
                q, k = fp8_roundtrip(q @ hd, 128), fp8_roundtrip(k @ hd, 128)
        w = f32(self.weights_proj(x)) * (Hi ** -0.5 * Di ** -0.5)
        return q, w, k

    @staticmethod
    def scores(q, w, k):
        """(B, t, Hi, Di), (B, t, Hi), (B, S, Di) -> I (B, t, S), no mask."""
        return (torch.einsum("bthd,bsd->bths", q, k).relu() * w[..., None]).sum(2)

    @torch.no_grad()
    def select(self, x, c_q, cos, sin, num, chunk=512):
        """Which keys each query attends to: the top index_topk of I among the causal ones, as a
        (B, 1, T, T) bool mask. Rows that see fewer keys get all of them (exactly dense)."""
        B, T, _ = x.shape
        K = self.cfg.index_topk
        q, w, k = self.queries_keys(x, c_q, cos, sin, num.fp8)
        pos = torch.arange(T, device=x.device)
        keep = torch.zeros(B, T, T, dtype=torch.bool, device=x.device)
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            future = pos[None, :] > pos[a:b, None]                                   # (t, S)
            I = f32(self.scores(q[:, a:b], w[:, a:b], k)).masked_fill(future, -math.inf)
            if num.exact:  # the engine's tie rule: the lower position first
                idx = torch.sort(I, dim=-1, descending=True, stable=True).indices[..., :K]
            else:
                idx = I.topk(min(K, T), -1).indices
            keep[:, a:b].scatter_(-1, idx, True)
            keep[:, a:b] &= ~future
        if num.exact:
            num.selected.append(keep)
        return keep[:, None]

    @staticmethod
    @torch.no_grad()
    def attention_target(q_mla, k_mla, scale, rows, visible):
        """p (B, Rs, T): the main attention's probabilities at query rows, summed over heads and
        L1-normalised (SPEC section 11)."""
        B, H, T, dq = q_mla.shape
        qr = q_mla.gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], dq))
        logits = (f32(qr) @ f32(k_mla).transpose(-1, -2)) * scale                          # (B, H, Rs, T)
        p = logits.masked_fill(~visible[:, None], -math.inf).softmax(-1).sum(1)
        return p / p.sum(-1, keepdim=True)

    def row_scores(self, x, c_q, cos, sin, rows, fp8):
        """I (B, Rs, T) at query rows, no mask."""
        B, Rs = rows.shape
        q, w, k = self.queries_keys(x, c_q, cos, sin, fp8)
        qr = q.gather(1, rows[:, :, None, None].expand(B, Rs, *q.shape[2:]))
        wr = w.gather(1, rows[:, :, None].expand(B, Rs, w.shape[2]))
        return f32(self.scores(qr, wr, k))

    def kl_loss(self, x, c_q, q_mla, k_mla, keep, scale, cos, sin, rows):
        """SPEC section 11: at sampled query rows, KL(p || softmax(I)) where p is the main attention's
        probabilities summed over heads and L1-normalised. x and c_q come detached: the indexer learns
        from this loss only. With sparse attention both distributions live on the selected keys."""
        B, Rs, T = rows.shape[0], rows.shape[1], x.shape[1]
        visible = torch.arange(T, device=x.device)[None, None, :] <= rows[:, :, None]  # (B, Rs, T)
        if keep is not None:
            visible &= keep[:, 0].gather(1, rows[:, :, None].expand(B, Rs, T))
        p = self.attention_target(q_mla, k_mla, scale, rows, visible)
        log_q = self.row_scores(x, c_q, cos, sin, rows, fp8=False).masked_fill(~visible, -math.inf).log_softmax(-1)
        kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q), 0.0).sum(-1)
        return kl.mean()

    @torch.no_grad()
    def recall(self, x, c_q, q_mla, k_mla, scale, cos, sin, rows, fp8):
        """Share of the dense attention's mass (summed over heads) that the indexer's top-k keeps, at
        query rows: 1 is a perfect indexer for this attention."""
        T = x.shape[1]
        visible = torch.arange(T, device=x.device)[None, None, :] <= rows[:, :, None]
        p = self.attention_target(q_mla, k_mla, scale, rows, visible)
        I = self.row_scores(x, c_q, cos, sin, rows, fp8).masked_fill(~visible, -math.inf)
        top = I.topk(min(self.cfg.index_topk, T), -1).indices
        return p.gather(-1, top).sum(-1).mean()


class MLA(nn.Module):
    """Multi-head latent attention, expanded form (SPEC section 4; engine: MLA.expanded)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, N, R, Dv, C = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                          cfg.v_head_dim, cfg.kv_lora_rank)
        self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = Linear(cfg.q_lora_rank, H * (N + R))
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, C + R)
        self.kv_a_layernorm = RMSNorm(C, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(C, H * (N + Dv))
        self.o_proj = Linear(H * Dv, cfg.hidden_size)
        self.indexer = Indexer(cfg)
        self.scale = engine.attention_scale(cfg)

    def forward(self, x, cos, sin, num):
        cfg = self.cfg
        B, T, _ = x.shape
        H, N, R, Dv, C = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                          cfg.v_head_dim, cfg.kv_lora_rank)
        c_q = self.q_a_layernorm(self.q_a_proj(x))                                   # (B, T, Q)
        q = self.q_b_proj(c_q).view(B, T, H, N + R)
        q_pe = rope(q[..., N:], cos[:, None], sin[:, None], True).to(q.dtype)        # (B, T, H, R)
        q = torch.cat([q[..., :N], q_pe], -1)
        kv = self.kv_a_proj_with_mqa(x)                                              # (B, T, C+R)
        c_kv = self.kv_a_layernorm(kv[..., :C])                                      # (B, T, C)
        if num.fp8:  # what the deployed FP8 latent cache holds
            c_kv = straight_through(c_kv, fp8_roundtrip(c_kv, 128))
        k_pe = rope(kv[..., C:], cos, sin, True)                                     # (B, T, R), one for all heads
        kv = self.kv_b_proj(c_kv).view(B, T, H, N + Dv)
        k = torch.cat([kv[..., :N], k_pe[:, :, None].expand(B, T, H, R).to(kv.dtype)], -1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), kv[..., N:].transpose(1, 2)  # (B, H, T, .)

        keep = self.indexer.select(x, c_q, cos, sin, num) if num.sparse else None    # (B, 1, T, T)
        o = attend(q, k.to(q.dtype), v.to(q.dtype), self.scale, keep)                # (B, H, T, Dv)
        if num.kl_rows is not None:
            num.kl.append(self.indexer.kl_loss(x.detach(), c_q.detach(), q.detach(), k.detach(), keep,
                                               self.scale, cos, sin, num.kl_rows))
        if num.recall_rows is not None:
            num.recall.append(self.indexer.recall(x, c_q, q, k, self.scale, cos, sin, num.recall_rows, num.fp8))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * Dv))


def attend(q, k, v, scale, keep):
    """softmax(scale q.k + mask) v, causal (keep None) or over a bool mask; fused when the device has a
    kernel for it. Flash attention wants equal head dims, so v is padded with zeros to q's."""
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    if keep is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    return o[..., :dv]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = Linear(d, f), Linear(d, f), Linear(f, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        # steers the choice of experts only; moved by the balancing rule, not by gradients
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))


class MoE(nn.Module):
    """DeepSeekMoE: group-limited sigmoid routing with a bias, plus a shared expert (SPEC section 7)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)

    def route(self, x):
        """(experts (n, k), weights (n, k)) for x (n, D) (engine: MoE.route)."""
        cfg = self.cfg
        n, E, G = x.shape[0], cfg.n_routed_experts, cfg.n_group
        with torch.autocast(x.device.type, enabled=False):  # routing in fp32, as the engine
            s = torch.sigmoid(F.linear(f32(x), f32(self.gate.weight)))             # (n, E) affinities
        with torch.no_grad():
            s_sel = s + self.gate.e_score_correction_bias                          # the bias only steers
            top2 = s_sel.view(n, G, E // G).topk(min(2, E // G), -1).values.sum(-1)  # (n, G)
            groups = torch.sort(top2, dim=-1, descending=True, stable=True).indices[:, :cfg.topk_group]
            keep = torch.zeros(n, G, dtype=torch.bool, device=x.device).scatter_(1, groups, True)
            s_sel = s_sel.masked_fill(~keep.repeat_interleave(E // G, 1), -math.inf)
            experts = torch.sort(s_sel, dim=-1, descending=True, stable=True).indices[:, :cfg.num_experts_per_tok]
        weights = s.gather(1, experts)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return experts, weights * cfg.routed_scaling_factor

    def forward(self, x, num):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        experts, weights = self.route(x)
        y = f32(self.shared_experts(x))
        # tokens grouped by expert: one product per expert
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.cfg.n_routed_experts)
        num.loads.append(counts)
        k = experts.shape[1]
        first = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                rows = order[first:first + c]
                t = rows // k
                y = y.index_add(0, t, weights.flatten()[rows, None] * f32(self.experts[e](x[t])))
                first += c
        return y.view(shape)


class Block(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.dense = i < cfg.first_k_dense_replace
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size) if self.dense else MoE(cfg)

    def forward(self, h, cos, sin, num):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, num)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x) if self.dense else self.mlp(x, num))


class Body(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """state_dict() names are the checkpoint's: model.embed_tokens.weight, model.layers.{i}..., lm_head.weight."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # stored bf16, not fp8
        # engine: angles in float64, cos/sin rounded to fp32
        angles = np.arange(cfg.max_position_embeddings)[:, None] * engine.rope_frequencies(cfg)[None, :]
        self.register_buffer("cos", torch.from_numpy(np.cos(angles).astype(np.float32)), persistent=False)
        self.register_buffer("sin", torch.from_numpy(np.sin(angles).astype(np.float32)), persistent=False)

    def forward(self, ids, num):
        """ids (B, T) from position 0 -> logits (B, T, V)."""
        T = ids.shape[1]
        for m in self.modules():
            if isinstance(m, Linear):
                m.num = num
        cos, sin = self.cos[:T], self.sin[:T]
        if self.cos.dtype != torch.float32:  # a float64 reference keeps the fp32-rounded angles
            cos, sin = cos.to(self.cos.dtype), sin.to(self.sin.dtype)
        h = f32(self.model.embed_tokens(ids))                                        # (B, T, D)
        for layer in self.model.layers:
            h = layer(h, cos, sin, num)
        return self.lm_head(self.model.norm(h))                                      # (B, T, V)


def build_model(cfg, seed=0, tie_init=False):
    """Initialised as GPT-2: N(0, 0.02), residual-branch outputs scaled by (2 L)^-0.5; norms 1.
    tie_init: lm_head starts equal to embed_tokens (they stay separate tensors and train apart)."""
    torch.manual_seed(seed)
    m = Transformer(cfg)
    for name, p in m.named_parameters():
        if name.endswith(("norm.weight", "layernorm.weight")):
            nn.init.ones_(p)
        elif name.endswith("k_norm.bias"):
            nn.init.zeros_(p)
        else:
            std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            nn.init.normal_(p, std=std)
    if tie_init:
        with torch.no_grad():
            m.lm_head.weight.copy_(m.model.embed_tokens.weight)
    return m


def config_of(d):
    return engine.Config.from_dict(d, where="train.py config")


# ----------------------------------------------------------------------------------------------------
# Data: batches drawn from (seed, step) alone, so a resumed run sees the same data

class Data:
    def __init__(self, folder=None, vocab=None, fake_seed=None):
        if folder is not None:
            self.train = corpus.TokenStream(os.path.join(folder), "train")
            self.val = corpus.TokenStream(os.path.join(folder), "val")
            self.pieces = corpus.Pieces.load(folder)
            self.text, self.filler = TEXT, corpus.FILLER
        else:  # random "text" and made-up sentences: the smoke run and the tests work without a corpus
            rng = np.random.default_rng(fake_seed)
            zipf = np.minimum(rng.zipf(1.3, 400_000), vocab - 7) + 5
            self.train = corpus.TokenStream.from_arrays({"text": zipf.astype(np.uint16)})
            self.val = corpus.TokenStream.from_arrays({"text": zipf[::-1].copy().astype(np.uint16)})
            parts = {k: [list(map(int, rng.integers(6, vocab, len(p.split()) + 1))) for p in v]
                     for k, v in corpus.Pieces.TEXT.items()}
            self.pieces = corpus.Pieces({"digits": list(range(6, 16)), "parts": parts,
                                         "names": [list(map(int, rng.integers(16, vocab, 2))) for _ in range(40)]})
            self.text = self.filler = {"text": 1.0}
        self.vocab = vocab

    def document(self, rng, kind, length, stage, stream=None):
        """(ids (length,), answers [(start, end)]) of one sequence of the given kind."""
        stream = stream or self.train
        if kind == "text":
            return np.concatenate([[corpus.BOS], stream.window(rng, length - 1, self.text)]).astype(np.int32), []
        if kind == "repeat":
            return corpus.repeat_doc(rng, stream, length, self.filler, spans=stage.repeat_spans, vocab=self.vocab)
        if kind == "copy":
            return corpus.copy_doc(rng, stream, length, self.filler, gap=stage.copy_gap, spans=stage.copy_spans,
                                   vocab=self.vocab)
        if kind == "passkey":
            return corpus.passkey_doc(rng, stream, self.pieces, length, self.filler)
        if kind == "kv":
            return corpus.kv_doc(rng, stream, self.pieces, length, self.filler, n_facts=stage.kv_facts)
        raise ValueError(kind)

    def batch(self, seed, step, stage, micro):
        """Micro-batch `micro` of optimizer step `step`: ids (b, T+1) int32 and KL rows (b, Rs) int64."""
        rng = np.random.default_rng([seed, step, micro])
        kinds, p = list(stage.mix), np.array(list(stage.mix.values()), np.float64)
        ids, rows = [], []
        T = stage.seq_len
        for _ in range(stage.micro):
            kind = kinds[rng.choice(len(kinds), p=p / p.sum())]
            doc, answers = self.document(rng, kind, T + 1, stage)
            ids.append(doc)
            # KL rows: the positions that predict answers (retrieval is what the indexer must find),
            # then uniform ones from the later part of the sequence, where top-k is a real choice
            must = [q - 1 for a, b in answers for q in range(a, b)][: stage.kl_rows // 2]
            lo = min(T // 2, 128)
            rest = rng.choice(np.setdiff1d(np.arange(lo, T), must), stage.kl_rows - len(must), replace=False)
            rows.append(np.sort(np.concatenate([must, rest]).astype(np.int64)))
        return np.stack(ids).astype(np.int32), np.stack(rows)


_worker_data = None


def _worker_init(folder, vocab, seed):
    global _worker_data
    _worker_data = Data(folder, vocab) if folder else Data(None, vocab, fake_seed=seed)


def _worker_batch(seed, step, stage, micro):
    return _worker_data.batch(seed, step, stage, micro)


class Batches:
    """The micro-batches of the coming steps, built ahead in worker processes: a step of the copy
    stage is 256 short documents, about a CPU-second in one process, as long as a GPU step. With
    workers=0 they are built when asked for (the CPU smoke run, the tests)."""

    def __init__(self, data, folder, vocab, seed, workers, ahead=2):
        self.data, self.seed, self.ahead, self.pending = data, seed, ahead, {}
        self.pool = None
        if workers > 0:
            import multiprocessing
            self.pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("fork"),
                initializer=_worker_init, initargs=(folder, vocab, seed))
            self.pool.submit(int).result()  # fork the workers now, before CUDA starts in this process

    def get(self, step, stage, upcoming=()):
        """The micro-batches of `step`; `upcoming` lists (step, stage) to start building now."""
        n = stage.batch // stage.micro
        if self.pool is None:
            return [self.data.batch(self.seed, step, stage, m) for m in range(n)]
        for s, st in [(step, stage), *upcoming][: self.ahead + 1]:
            if (s, st.name) not in self.pending:
                self.pending[s, st.name] = [self.pool.submit(_worker_batch, self.seed, s, st, m)
                                            for m in range(st.batch // st.micro)]
        futures = self.pending.pop((step, stage.name))
        for key in [k for k in self.pending if k[0] <= step]:  # a stage ended early: drop its batches
            del self.pending[key]
        return [f.result() for f in futures]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------------------------------
# Evaluation: copying and retrieval measured directly (SPEC section 11)

def answer_accuracy(model, ids, answers, num, device):
    """Teacher-forced argmax at the answer positions: (share of documents whose every answer token is
    right, which is what greedy decoding gets; share of answer tokens right)."""
    x = torch.from_numpy(np.stack(ids).astype(np.int64)).to(device)
    with torch.no_grad(), autocast(device):
        pred = model(x[:, :-1], num).argmax(-1).cpu().numpy()
    docs, hit, total = [], 0, 0
    for i, spans in enumerate(answers):
        ok = True
        for a, b in spans:
            right = pred[i, a - 1:b - 1] == ids[i][a:b]
            hit, total, ok = hit + right.sum(), total + right.size, ok and bool(right.all())
        docs.append(ok)
    return float(np.mean(docs)), float(hit / max(total, 1))


def evaluate(model, data, stage, device, lengths, n=16, seed=1234):
    """Fixed documents (seed 1234): copy of random spans at 512, pass key at each length (dense and
    DSA), key-value facts and validation text loss at the stage's length."""
    model.eval()
    out = {}
    fp8 = stage.fp8
    rng = np.random.default_rng(seed)
    L = min(512, stage.seq_len) + 1
    for kind in ("shuffled", "uniform"):  # copy_acc: spans of shuffled text; copy_uniform_acc: of uniform ids
        docs = [corpus.copy_doc(rng, data.val, L, data.filler, gap=(0, 64), spans={kind: 1.0}, vocab=data.vocab)
                for _ in range(n)]
        out["copy_acc" if kind == "shuffled" else "copy_uniform_acc"] = answer_accuracy(
            model, [d[0] for d in docs], [d[1] for d in docs], Numerics(fp8=fp8), device)[1]
    docs = [corpus.repeat_doc(rng, data.val, L, data.filler, spans={"uniform": 1.0}, vocab=data.vocab) for _ in range(n)]
    out["repeat_acc"] = answer_accuracy(model, [d[0] for d in docs], [d[1] for d in docs], Numerics(fp8=fp8), device)[1]
    for L in lengths:
        rng = np.random.default_rng([seed, L])
        docs = [corpus.passkey_doc(rng, data.val, data.pieces, L + 1, data.filler, depth=i / max(n - 1, 1))
                for i in range(n)]
        for mode in ("dense", "dsa"):
            num = Numerics(sparse=mode == "dsa", fp8=fp8)
            if mode == "dense" and L == max(lengths):  # the indexer's recall over the last 32 rows
                num.recall_rows = torch.arange(L - 32, L, device=device)[None].expand(n, 32)
            out[f"passkey_{mode}_{L}"] = answer_accuracy(model, [d[0] for d in docs], [d[1] for d in docs], num, device)[0]
            if num.recall:
                out[f"recall_{L}"] = torch.stack(num.recall).mean().item()
    rng = np.random.default_rng([seed, 7])
    docs = [corpus.kv_doc(rng, data.val, data.pieces, stage.seq_len + 1, data.filler, n_facts=stage.kv_facts)
            for _ in range(n)]
    out["kv_acc"] = answer_accuracy(model, [d[0] for d in docs], [d[1] for d in docs],
                                    Numerics(sparse=stage.sparse, fp8=fp8), device)[0]
    rng = np.random.default_rng([seed, 8])
    x = torch.from_numpy(np.stack([data.document(rng, "text", stage.seq_len + 1, stage, data.val)[0]
                                   for _ in range(max(2, n // 4))]).astype(np.int64)).to(device)
    with torch.no_grad(), autocast(device):
        logits = model(x[:, :-1], Numerics(sparse=stage.sparse, fp8=fp8))
        out["val_loss"] = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).item()
    model.train()
    return out


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
#
# full.pt (next to the run's log, never carried): fp32 weights, the whole AdamW state, the step. It
#   survives between device calls while the machine stays warm.
# compact/ (carried back and forth): weights bf16 (1-d tensors fp32), Adam's second moment as one
#   byte per value on a log scale, no first moment; shards of at most 15 MiB. About 3 bytes per
#   parameter: 34.1 MiB for the 11.85M parameters, which with the 19.4 MiB of tokens fits the 64 MiB
#   that travels. Resuming from it restarts the first moment at 0 and re-warms the learning rate
#   over REWARMUP steps.

SHARD_BYTES = 15 << 20


def encode_log8(v):
    """v >= 0 -> (uint8 codes, lo, hi): 0 for v = 0, else 1 + round(254 (log2 v - lo) / (hi - lo))."""
    pos = v > 0
    if not pos.any():
        return torch.zeros_like(v, dtype=torch.uint8), 0.0, 0.0
    lv = torch.log2(torch.where(pos, v, 1.0))
    lo, hi = lv[pos].min().item(), lv[pos].max().item()
    code = 1 + torch.round((lv - lo) / max(hi - lo, 1e-12) * 254)
    return torch.where(pos, code, 0).to(torch.uint8), lo, hi


def decode_log8(code, lo, hi):
    v = torch.exp2(lo + (code.float() - 1) / 254 * (hi - lo))
    return torch.where(code > 0, v, 0.0)


def save_checkpoint(run, model, opt, state, compact=True):
    os.makedirs(run, exist_ok=True)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "state": state},
               os.path.join(run, "full.pt.tmp"))
    os.replace(os.path.join(run, "full.pt.tmp"), os.path.join(run, "full.pt"))
    if not compact:
        return
    tensors = {}
    for name, t in model.state_dict().items():
        tensors["w." + name] = t.float().cpu() if t.dim() < 2 else t.to(torch.bfloat16).cpu()
    names = dict(model.named_parameters())
    for name, p in names.items():
        st = opt.state.get(p, {})
        if "exp_avg_sq" in st:
            code, lo, hi = encode_log8(st["exp_avg_sq"].float())
            tensors["v." + name] = code.cpu()
            tensors["vrange." + name] = torch.tensor([lo, hi], dtype=torch.float64)
    folder = os.path.join(run, "compact")
    tmp = folder + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    shards, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    for i, s in enumerate(shards):
        torch.save(s, os.path.join(tmp, f"shard-{i:02d}.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(dict(state, shards=len(shards), adam_step=adam_step(opt)), f, indent=1)
    if os.path.exists(folder):
        for f in os.listdir(folder):
            os.remove(os.path.join(folder, f))
        os.rmdir(folder)
    os.replace(tmp, folder)


def adam_step(opt):
    for st in opt.state.values():
        if "step" in st:
            return float(st["step"])
    return 0.0


def load_checkpoint(run, model, opt, device):
    """Resume from whichever of full.pt and compact/ holds the later step; returns (state, cold)
    where cold says that the compact form was used. (None, False) if neither exists."""
    full, compact = os.path.join(run, "full.pt"), os.path.join(run, "compact", "state.json")
    c_state = json.load(open(compact)) if os.path.exists(compact) else None
    if os.path.exists(full):
        ck = torch.load(full, map_location=device, weights_only=False)
        if c_state is None or ck["state"]["step"] >= c_state["step"]:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optim"])
            return ck["state"], False
    if c_state is None:
        return None, False
    tensors = {}
    for i in range(c_state["shards"]):
        tensors.update(torch.load(os.path.join(run, "compact", f"shard-{i:02d}.pt"), map_location="cpu"))
    model.load_state_dict({k[2:]: v.float() for k, v in tensors.items() if k.startswith("w.")})
    for name, p in model.named_parameters():
        if "v." + name in tensors:
            lo, hi = tensors["vrange." + name].tolist()
            opt.state[p] = {"step": torch.tensor(c_state["adam_step"]),
                            "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": decode_log8(tensors["v." + name], lo, hi).to(device)}
    return c_state, True


# ----------------------------------------------------------------------------------------------------
# Training loop

def learning_rate(step, stage, stage_start, last, resumed_at, warmup=WARMUP):
    lr = stage.lr * min(1.0, (step + 1) / warmup)
    if last:  # the final stage decays linearly to FINAL_LR of the peak
        lr *= 1 - (1 - FINAL_LR) * (step - stage_start) / max(stage.steps, 1)
    if resumed_at is not None:
        lr *= min(1.0, (step - resumed_at + 1) / REWARMUP)
    return lr


def make_optimizer(model, lr):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(model, opt, batches, stage, lr, device):
    """One optimizer step over the micro-batches of stage.batch sequences; returns (lm loss, kl loss,
    expert load imbalance: the most loaded expert's share over the mean, worst layer)."""
    for g in opt.param_groups:
        g["lr"] = lr
    n_micro = stage.batch // stage.micro
    lm_sum = kl_sum = 0.0
    loads = None
    for ids, rows in batches:
        ids = torch.from_numpy(ids).to(device, torch.int64, non_blocking=True)
        rows = torch.from_numpy(rows).to(device, non_blocking=True)
        num = Numerics(sparse=stage.sparse, fp8=stage.fp8, fp8_weights=stage.fp8, kl_rows=rows)
        with autocast(device):
            logits = model(ids[:, :-1], num)
            lm = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            kl = torch.stack(num.kl).mean()
        ((lm + kl) / n_micro).backward()
        lm_sum, kl_sum = lm_sum + lm.item() / n_micro, kl_sum + kl.item() / n_micro
        step_loads = torch.stack(num.loads)                                          # (MoE layers, E)
        loads = step_loads if loads is None else loads + step_loads
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    # aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts, lower the others'
    moes = [b.mlp for b in model.model.layers if not b.dense]
    with torch.no_grad():
        for moe, load in zip(moes, loads.float()):
            moe.gate.e_score_correction_bias += BIAS_RATE * torch.sign(load.mean() - load)
    imbalance = (loads.float().max(1).values / loads.float().mean(1)).max().item() if moes else 1.0
    return lm_sum, kl_sum, imbalance


def stage_at(recipe, stage_starts, step):
    """(index, start step) of the stage that step belongs to. stage_starts lists the starts known so
    far (a stage may end early, see Stage.until) and grows as stages begin."""
    i = len(stage_starts) - 1
    while i + 1 < len(recipe) and step >= stage_starts[i] + recipe[i].steps:
        stage_starts.append(stage_starts[i] + recipe[i].steps)
        i += 1
    return i, stage_starts[i]


def total_steps(recipe, stage_starts):
    i = len(stage_starts) - 1
    return stage_starts[i] + sum(s.steps for s in recipe[i:])


def measure(cfg, recipe, batches, device, steps=3):
    """Seconds per optimizer step of each stage: the median of `steps` after one warm-up step, on a
    throwaway model (the run's own model is built from the seed afterwards)."""
    model = build_model(cfg, 12345).to(device)
    opt = make_optimizer(model, 1e-4)
    times = []
    for stage in recipe:
        t = []
        for s in range(1 + steps):
            t0 = time.time()
            train_step(model, opt, batches.get(s, stage, [(s + 1, stage)]), stage, 1e-4, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t.append(time.time() - t0)
        times.append(float(np.median(t[1:])))
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times


def end_early(recipe, state, i, start, step):
    """Stage i ends at `step`. With measured step times (--minutes) the later stages are lengthened
    by one factor to use the time it leaves; without, the run just ends earlier."""
    state["stage_starts"].append(step)
    times = state.get("seconds_per_step")
    if not times:
        return recipe
    left = (start + recipe[i].steps - step) * times[i]
    later = sum(s.steps * t for s, t in zip(recipe[i + 1:], times[i + 1:]))
    grow = 1 + left / later
    return recipe[:i + 1] + [dataclasses.replace(s, steps=round(s.steps * grow)) for s in recipe[i + 1:]]


def fit(recipe, times, minutes):
    """The recipe with every stage's steps scaled by one factor so that its steps take `minutes`."""
    scale = minutes * 60 / sum(s.steps * t for s, t in zip(recipe, times))
    return [dataclasses.replace(s, steps=max(1, round(s.steps * scale)), min_steps=round(s.min_steps * scale))
            for s in recipe]


def train(args, recipe, cfg_dict):
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = config_of(cfg_dict)
    data = Data(args.data, cfg.vocab_size) if args.data else Data(None, cfg.vocab_size, fake_seed=args.seed)
    batches = Batches(data, args.data, cfg.vocab_size, args.seed, getattr(args, "workers", 0))
    model = build_model(cfg, args.seed, TIE_INIT).to(device)
    opt = make_optimizer(model, recipe[0].lr)
    state, cold = load_checkpoint(args.run, model, opt, device)
    settings = getattr(args, "set", [])
    if state is None:
        recipe = override(recipe, settings)
        if getattr(args, "minutes", None):
            times = measure(cfg, recipe, batches, device)
            recipe = fit(recipe, times, args.minutes)
            print("measured s/step " + ", ".join(f"{s.name} {t:.3f}" for s, t in zip(recipe, times))
                  + f"; steps for {args.minutes} min: " + ", ".join(f"{s.name} {s.steps}" for s in recipe),
                  file=sys.stderr)
        state = {"step": 0, "stage_starts": [0], "seed": args.seed, "config": cfg_dict, "tie_init": TIE_INIT}
        if getattr(args, "minutes", None):
            state["seconds_per_step"] = times
        print(f"new run in {args.run}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{sum(s.steps for s in recipe)} steps, {sum(s.tokens for s in recipe) / 1e6:.0f}M tokens", file=sys.stderr)
    else:
        print(f"resumed {args.run} at step {state['step']} from {'compact/ (cold)' if cold else 'full.pt'}",
              file=sys.stderr)
        if state["config"] != cfg_dict:
            raise SystemExit(f"{args.run}: the checkpoint's config differs from this run's")
        # the recipe fixed when the run began (measured, scaled, --set) holds, changed only by this call's --set
        recipe = override([Stage(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
                           for d in state["recipe"]], settings)
    state["recipe"] = [dataclasses.asdict(s) for s in recipe]
    resumed_at = state["step"] if cold else None
    warmup = min(WARMUP, max(1, sum(s.steps for s in recipe) // 10))
    os.makedirs(args.run, exist_ok=True)
    log = open(os.path.join(args.run, "metrics.jsonl"), "a")

    def upcoming(step, n=2):
        starts = list(state["stage_starts"])
        return [(s, recipe[stage_at(recipe, starts, s)[0]]) for s in range(step + 1, step + 1 + n)
                if s < total_steps(recipe, starts)]

    step, step_times, done_steps = state["step"], [], 0
    while step < total_steps(recipe, state["stage_starts"]):
        i, start = stage_at(recipe, state["stage_starts"], step)
        stage = recipe[i]
        avg = np.mean(step_times[-10:]) if step_times else 0.0
        if args.time_budget and time.time() - T0 + 2 * avg + args.reserve > args.time_budget:
            print(f"time budget: stopping before step {step}", file=sys.stderr)
            break
        if args.max_steps is not None and done_steps >= args.max_steps:
            break
        lr = learning_rate(step, stage, start, i == len(recipe) - 1, resumed_at, warmup)
        t0 = time.time()
        lm, kl, imb = train_step(model, opt, batches.get(step, stage, upcoming(step)), stage, lr, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.time() - t0)
        step += 1
        done_steps += 1
        state["step"] = step
        rec = {"step": step, "stage": stage.name, "lm": round(lm, 4), "kl": round(kl, 4), "lr": lr,
               "imbalance": round(imb, 2), "tok_s": round(stage.batch * stage.seq_len / step_times[-1])}
        end_of_stage = step == start + stage.steps
        if step % args.eval_every == 0 or end_of_stage:
            lengths = sorted({min(512, stage.seq_len), stage.seq_len})
            t_eval = time.time()
            rec.update({k: round(v, 4) for k, v in evaluate(model, data, stage, device, lengths).items()})
            rec["eval_s"] = round(time.time() - t_eval, 1)
            if stage.until and step - start >= stage.min_steps and rec[stage.until[0]] >= stage.until[1] \
                    and not end_of_stage and i + 1 < len(recipe):
                # e.g. copying has appeared: move on, and give the later stages the time left
                recipe = end_early(recipe, state, i, start, step)
                state["recipe"] = [dataclasses.asdict(s) for s in recipe]
                print(f"{stage.until[0]} {rec[stage.until[0]]:.3f} >= {stage.until[1]}: ending {stage.name} at step "
                      f"{step}; later stages now " + ", ".join(f"{s.name} {s.steps}" for s in recipe[i + 1:]),
                      file=sys.stderr)
        if step % args.log_every == 0 or "copy_acc" in rec:
            print(json.dumps(rec), file=sys.stderr)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(args.run, model, opt, state, compact=False)
    batches.close()
    save_checkpoint(args.run, model, opt, state)
    log.close()
    total = total_steps(recipe, state["stage_starts"])
    if args.copy_to:  # the compact checkpoint while there is more to train (a finished run exports instead)
        import shutil
        os.makedirs(args.copy_to, exist_ok=True)
        if step < total:
            for f in sorted(os.listdir(os.path.join(args.run, "compact"))):
                shutil.copy(os.path.join(args.run, "compact", f), args.copy_to)
        shutil.copy(os.path.join(args.run, "metrics.jsonl"), args.copy_to)
    print(f"saved step {step} of {total} in {args.run} ({time.time() - T0:.0f} s since start"
          f"{', finished' if step >= total else ''})", file=sys.stderr)
    return model, state


def bench(args, recipe, cfg_dict):
    """Time each stage's step on a fresh model; project the recipe's time."""
    device = torch.device(args.device)
    cfg = config_of(cfg_dict)
    data = Data(args.data, cfg.vocab_size) if args.data else Data(None, cfg.vocab_size, fake_seed=args.seed)
    batches = Batches(data, args.data, cfg.vocab_size, args.seed, args.workers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = measure(cfg, recipe, batches, device)
    batches.close()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"{'stage':<12} {'tokens/step':>11} {'s/step':>8} {'tokens/s':>10} {'steps':>6} {'minutes':>8}")
    for stage, dt in zip(recipe, times):
        print(f"{stage.name:<12} {stage.batch * stage.seq_len:>11} {dt:>8.3f} {stage.batch * stage.seq_len / dt:>10.0f} "
              f"{stage.steps:>6} {dt * stage.steps / 60:>8.1f}")
    print(f"recipe: {sum(s.steps * t for s, t in zip(recipe, times)) / 60:.1f} min of steps (evaluation and saving "
          f"not counted); peak GPU memory {peak:.1f} GiB")


# ----------------------------------------------------------------------------------------------------
# Command line

def override(recipe, settings):
    """The recipe with STAGE.FIELD=VALUE settings applied (VALUE read as JSON, else as a string)."""
    recipe = list(recipe)
    for item in settings:
        key, _, value = item.partition("=")
        name, _, field = key.rpartition(".")
        at = [i for i, s in enumerate(recipe) if s.name == name]
        if not at or field not in {f.name for f in dataclasses.fields(Stage)}:
            raise SystemExit(f"--set {item}: no stage {name!r} with a field {field!r} "
                             f"(stages: {', '.join(s.name for s in recipe)})")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        recipe[at[0]] = dataclasses.replace(recipe[at[0]], **{field: tuple(value) if isinstance(value, list) else value})
    return recipe


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the small DeepSeek-V3.2 model (see README.md).")
    ap.add_argument("--run", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", "main"),
                    help="run folder: full.pt, compact/, metrics.jsonl (resumed if present)")
    ap.add_argument("--data", default=os.path.join(corpus.DEFAULT_DATA, "tokens"),
                    help="token folder from corpus.py; 'none' for random tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=540, help="seconds this call may take, saving included")
    ap.add_argument("--reserve", type=float, default=45, help="seconds kept for the last evaluation and saving")
    ap.add_argument("--max-steps", type=int, default=None, help="optimizer steps this call at most")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save-every", type=int, default=200, help="steps between full.pt saves (0: only at the end)")
    ap.add_argument("--copy-to", default=None,
                    help="copy metrics.jsonl and, unless the run has finished, compact/ here at the end (e.g. $OUT)")
    ap.add_argument("--export-to", default=None,
                    help="when the run has finished, export it there (export.py, from full.pt's fp32 weights)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count (new runs)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="new runs: time each stage's step first, then scale all step counts to this many "
                         "minutes of steps (evaluation and saving come on top)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes building batches ahead (default: 8 on a GPU, 0 on the CPU)")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                    help="change the recipe of a new run, e.g. --set copy-512.batch=512 --set copy-512.lr=3e-3 "
                         "--set 'dense-4k.mix={\"text\": 0.4, \"copy\": 0.2, \"passkey\": 0.3, \"kv\": 0.1}'")
    ap.add_argument("--no-tie-init", action="store_true", help="new runs: lm_head starts independent of embed_tokens")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (one is fastest at smoke size; more threads stall on a busy 2-core machine)")
    ap.add_argument("--smoke", action="store_true", help="tiny model and recipe (CPU, under a minute)")
    ap.add_argument("--bench", action="store_true", help="time each stage and exit")
    args = ap.parse_args(argv)
    recipe, cfg_dict = (SMOKE_RECIPE, SMOKE_CONFIG) if args.smoke else (RECIPE, MODEL_CONFIG)
    if args.no_tie_init:
        global TIE_INIT
        TIE_INIT = False
    if args.scale != 1.0:
        recipe = [dataclasses.replace(s, steps=max(1, round(s.steps * args.scale)),
                                      min_steps=round(s.min_steps * args.scale)) for s in recipe]
    if args.data == "none" or (args.smoke and not os.path.exists(os.path.join(args.data, "pieces.json"))):
        args.data = None
    if args.smoke and args.run == ap.get_default("run"):
        args.run = os.path.join(os.path.dirname(args.run), "smoke")
    if args.workers is None:
        args.workers = 0 if args.device == "cpu" else min(8, max(1, (os.cpu_count() or 2) - 4))
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.bench:
        return bench(args, recipe, cfg_dict)
    if args.export_to:
        args.reserve += 30  # the export's own time
    _, state = train(args, recipe, cfg_dict)
    recipe = [Stage(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}) for d in state["recipe"]]
    if args.export_to and state["step"] >= total_steps(recipe, state["stage_starts"]):
        from weights.make_model import export
        export.main(["--run", args.run, "--out", args.export_to, "--data", args.data or "", "--no-check"])


if __name__ == "__main__":
    main()
