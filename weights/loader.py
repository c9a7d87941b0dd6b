"""Loading a checkpoint folder's weights for the model: which arrays, in which form, on which device.

Two weight modes (SPEC section 2 stores linear weights as e4m3 bits with 128x128 block scales):

  dequant  every linear weight dequantised at load to fp32, W = e4m3(bits) * scale_inv: 4 bytes a
           parameter, products in fp32 (the reference numerics).
  fp8      linear weights kept as stored, e4m3 bits (uint8) and fp32 scale_inv, ~1 byte a parameter; the
           products quantise the activations to e4m3 too (kernels/fp8_gemm.py). On the CPU they stay views
           on the memory-mapped shards; on a GPU they are device arrays. The 671B release (~690 GB) fits
           one host of 8 H200s only this way.

`auto` picks dequant when the fp32 weights fit the target memory with headroom (weights/placement.py),
else fp8. In both modes kv_b_proj is dequantised: MLA splits it per head and folds it into the query and
the output in the absorbed form (W_uk, W_uv), and it is small ([H*(N+Dv), C]: 64 MB a layer in fp32 at
671B). Norms, the router gate, the indexer's weights_proj and k_norm, embeddings and lm_head are BF16
or F32 in the checkpoint and become fp32.

Arrays the model receives that are not one checkpoint tensor:
  <mlp>.gate_up_proj.weight       gate_proj's rows, then up_proj's, for one product [2F', D]; F' is F
                                  rounded up to whole 128-row scale blocks when kept fp8 (zero rows
                                  between), so each half keeps its own scales; else F' = F.
  <mlp>.experts.gate_up_proj.weight  every routed expert's gate_up stacked, then the shared expert's:
                                     [E + 1, 2F', D], the shared expert at index E; and
  <mlp>.experts.down_proj.weight     their down_proj [E + 1, D, F]: the operands of a grouped product
                                     (the shared expert is a group holding every token, model.MoE).
Each kept-fp8 array has its `.weight_scale_inv` beside it, built the same way.

Loading streams: tensor by tensor from the memory-mapped shards to the device that owns its layer (fused
and stacked arrays are allocated there first and filled piece by piece), so the host never holds more
than one tensor beyond what the page cache keeps.
"""
import dataclasses
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from kernels._cuda import on_device
from kernels.fp8 import dequant_weight
from weights.placement import GB, describe, gpu_free_memory, host_available_memory, place, plan, usable
from weights.random_checkpoint import tensor_shapes
from weights.safetensors import CheckpointError

MODES = ("auto", "fp8", "dequant")
BLOCK = 128  # weight scale block, both dims (kernels/fp8_gemm.py assumes it)


# ----------------------------------------------------------------------------------------------------
# Checking the folder against the config

def check_tensors(ckpt, cfg, folder):
    """Every tensor of the released layout is there with the shape the config implies (SPEC section 2),
    nothing else but the MTP layer. Returns name -> (shape, stored dtype tag), scales included."""
    q = ckpt.config.get("quantization_config") or {}
    block = list(q.get("weight_block_size", [BLOCK, BLOCK]))
    if block != [BLOCK, BLOCK]:
        raise CheckpointError(f"{folder}: weight_block_size {block}, the engine supports [{BLOCK}, {BLOCK}]")
    expected = tensor_shapes(ckpt.config)  # name -> (shape, kind) of the released layout
    names = set(ckpt.names())
    mtp = {n for n in names if n.startswith("model.layers.") and int(n.split(".")[2]) >= cfg.num_hidden_layers}
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected) - mtp)
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensor(s) missing, first {missing[0]!r}")
    if extra:
        raise CheckpointError(f"{folder}: {len(extra)} unexpected tensor(s), first {extra[0]!r}")
    tensors = {}
    for name, (shape, kind) in expected.items():
        dtype, got = ckpt.info(name)
        if name.endswith(".weight_scale_inv"):
            continue  # checked with its weight, if that is stored fp8
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"{folder}: tensor {name!r} has shape {list(got)}, the config implies {list(shape)}")
        if dtype not in (("F8_E4M3",) if kind == "fp8" else ()) + ("F32", "BF16", "F16", "F64"):
            raise CheckpointError(f"{folder}: tensor {name!r} has dtype {dtype}, expected a float"
                                  + (" or F8_E4M3" if kind == "fp8" else ""))
        tensors[name] = (tuple(shape), dtype)
        if dtype == "F8_E4M3":
            sname = name[: -len("weight")] + "weight_scale_inv"
            sdtype, sshape = ckpt.info(sname)
            if tuple(sshape) != _scale_shape(shape):
                raise CheckpointError(f"{folder}: tensor {sname!r} has shape {list(sshape)}, "
                                      f"expected {list(_scale_shape(shape))}")
            tensors[sname] = (tuple(sshape), sdtype)
    return tensors


def _scale_shape(shape):
    return (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))


# ----------------------------------------------------------------------------------------------------
# Which arrays the model gets

@dataclasses.dataclass
class Array:
    """One array of the loaded model, made of one checkpoint tensor or filled from several."""
    shape: tuple
    dtype: type   # np.uint8 (e4m3 bits) or np.float32
    stage: int    # 0 the embeddings, 1 + i layer i, L + 1 the final norm and lm_head (placement unit)
    parts: list   # (checkpoint tensor, how, index into this array): how is "raw", "float" or "dequant"

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def stage_of(name, L):
    if name.startswith("model.layers."):
        return 1 + int(name.split(".")[2])
    return 0 if name == "model.embed_tokens.weight" else L + 1


def stage_names(L):
    return ["embed"] + [f"layer {i}" for i in range(L)] + ["norm, lm_head"]


def _mlp_target(name, E):
    """For an MLP's gate/up/down weight: (model array name, index in the stacked experts or None, which);
    else None. Routed expert e goes to index e, the shared expert to E (after the E routed ones)."""
    for which in ("gate", "up", "down"):
        suffix = f"{which}_proj.weight"
        if ".mlp." in name and name.endswith(suffix):
            mlp = name[: -len(suffix)]  # "model.layers.3.mlp." / "...mlp.shared_experts." / "...mlp.experts.17."
            expert = None
            if mlp.endswith(".shared_experts."):
                mlp, expert = mlp[: -len("shared_experts.")] + "experts.", E
            else:
                head, sep, tail = mlp.rpartition(".experts.")  # (".experts." is not in "shared_experts.")
                if sep:
                    mlp, expert = head + ".experts.", int(tail[:-1])
            if which == "down" and expert is None:
                return None  # one tensor as stored
            return mlp + ("down_proj" if which == "down" else "gate_up_proj") + ".weight", expert, which
    return None


def layout(cfg, tensors, mode):
    """name -> Array for every array the model gets in weight mode "fp8" or "dequant", in stage order."""
    arrays = {}

    def add(name, shape, dtype, stage, part):
        a = arrays.setdefault(name, Array(tuple(shape), dtype, stage, []))
        if (a.shape, a.dtype) != (tuple(shape), dtype):  # stacked pieces: every expert stored alike
            raise CheckpointError(f"{part[0]} goes into {name} {list(a.shape)} {np.dtype(a.dtype).name} as "
                                  f"{list(shape)} {np.dtype(dtype).name}: the tensors stacked there must agree")
        a.parts.append(part)

    for src, (shape, dtype) in tensors.items():
        if src.endswith(".weight_scale_inv"):
            continue  # placed with its weight
        stage = stage_of(src, cfg.num_hidden_layers)
        fp8 = dtype == "F8_E4M3"
        keep = fp8 and mode == "fp8" and not src.endswith("kv_b_proj.weight")
        how = "raw" if keep else "dequant" if fp8 else "float"
        kind = np.uint8 if keep else np.float32
        sshape, scale = _scale_shape(shape) if fp8 else None, src + "_scale_inv"
        target = _mlp_target(src, cfg.n_routed_experts)
        if target is None:  # an array as stored (or converted)
            add(src, shape, kind, stage, (src, how, ()))
            if keep:
                add(scale, sshape, np.float32, stage, (scale, "float", ()))
            continue
        name, expert, which = target
        lead, at = ((), ()) if expert is None else ((cfg.n_routed_experts + 1,), (expert,))
        if which == "down":  # routed experts' down_proj, stacked
            add(name, lead + shape, kind, stage, (src, how, at))
            if keep:
                add(name + "_scale_inv", lead + sshape, np.float32, stage, (scale, "float", at))
            continue
        F, D = shape
        half = -(-F // BLOCK) * BLOCK if keep else F   # rows of each half of gate_up
        row = 0 if which == "gate" else half
        add(name, lead + (2 * half, D), kind, stage, (src, how, at + (slice(row, row + F),)))
        if keep:
            add(name + "_scale_inv", lead + (2 * half // BLOCK, sshape[1]), np.float32, stage,
                (scale, "float", at + (slice(row // BLOCK, row // BLOCK + sshape[0]),)))
    return arrays


def stage_bytes(arrays, L):
    sizes = [0] * (L + 2)
    for a in arrays.values():
        sizes[a.stage] += a.nbytes
    return sizes


# ----------------------------------------------------------------------------------------------------
# Choosing the mode and the devices, then streaming

def load_params(ckpt, cfg, folder, xp, weights="auto", gpus=None, progress=True):
    """Check the tensors, choose the weight mode, place the layers, stream the tensors.

    Returns (params: name -> array, mode). On GPUs each stage's arrays live on the GPU the plan gave it
    (model.py reads the device from them); nothing is allocated before the plan has been found to fit."""
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    tensors = check_tensors(ckpt, cfg, folder)
    L = cfg.num_hidden_layers
    fp32_sizes = stage_bytes(layout(cfg, tensors, "dequant"), L)
    if xp is np:
        room = usable(host_available_memory())
        fits, where = sum(fp32_sizes) <= room, f"the {room / GB:.1f} GB of usable host memory"
    else:
        free = gpu_free_memory(gpus)
        fits = plan(fp32_sizes, [usable(f) for f in free]) is not None
        where = f"{len(free)} GPU(s) with {sum(usable(f) for f in free) / GB:.1f} GB usable"
    mode = weights if weights != "auto" else "dequant" if fits else "fp8"
    say(f"weights: {mode} (" + ("asked for" if weights != "auto" else f"auto: dequantised to fp32 they take "
        f"{sum(fp32_sizes) / GB:.2f} GB, which {'fit' if fits else 'do not fit'} {where}") + ")")
    devices = [None] * (L + 2)
    if xp is not np:
        sizes = stage_bytes(layout(cfg, tensors, mode), L)
        devices = place(sizes, free, f"{folder}: the {mode} weights")  # raises, with the numbers, if they do not fit
        say(f"placement of {sum(sizes) / GB:.1f} GB of weights on {len(free)} GPU(s):\n"
            + describe(devices, sizes, free, stage_names(L)))

    arrays = layout(cfg, tensors, mode)
    total = sum(_read_bytes(ckpt, src, how) for a in arrays.values() for src, how, _ in a.parts)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, disable=not progress, leave=False,
               desc=f"loading {os.path.basename(os.path.normpath(folder))} ({mode})")
    t0 = time.perf_counter()
    params = {}
    for name, a in arrays.items():
        whole = len(a.parts) == 1 and a.parts[0][2] == ()
        with on_device(devices[a.stage]):
            if not whole:  # fused or stacked: allocated on its device, then filled piece by piece
                params[name] = xp.zeros(a.shape, a.dtype)
            for src, how, index in a.parts:
                if whole:
                    params[name] = _read(ckpt, xp, src, how)
                else:
                    params[name][index] = _read(ckpt, xp, src, how)
                bar.update(_read_bytes(ckpt, src, how))
    bar.close()
    seconds = time.perf_counter() - t0
    say(f"{os.path.basename(os.path.normpath(folder))}: read {total / GB:.2f} GB in {seconds:.1f} s "
        f"({total / GB / max(seconds, 1e-9):.2f} GB/s)")
    return params, mode


def _read_bytes(ckpt, src, how):
    return ckpt.nbytes_of(src) + (ckpt.nbytes_of(src + "_scale_inv") if how == "dequant" else 0)


def _read(ckpt, xp, src, how):
    """Checkpoint tensor `src` on the current device: "raw" as stored (on the CPU the view on the mapped
    shard itself), "float" as fp32, "dequant" an fp8 weight times its block scales, fp32."""
    a = ckpt.get(src)  # a read-only view on the memory-mapped shard
    if how == "raw":
        return a if xp is np else xp.asarray(a)
    if how == "dequant":
        return dequant_weight(xp.asarray(a), xp.asarray(ckpt.get(src + "_scale_inv"), np.float32))
    if xp is np:
        return np.asarray(a, np.float32)
    if a.dtype.name == "bfloat16":  # upload the 2-byte bits, widen on the GPU: bf16 is an fp32's top half
        return (xp.asarray(a.view(np.uint16)).astype(np.uint32) << 16).view(np.float32)
    return xp.asarray(a).astype(np.float32, copy=False)
