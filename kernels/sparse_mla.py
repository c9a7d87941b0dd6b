"""Sparse MLA in the absorbed latent form (kernels/sparse_mla.cu beside its reference).

Each query t attends over its selected cache rows only, and every head uses the same selected set:

    score[t,h,i] = scale * (q_abs[t,h] . c_kv[idx[t,i]] + q_pe[t,h] . k_pe[idx[t,i]])
    o[t,h]       = sum_i softmax_i(score[t,h,:]) c_kv[idx[t,i]]                       # [Dc], the latent

The caller applies W_uv (and o_proj) to o. idx[t,i] = -1 is padding; so is any value outside [0, cap).
A query with no valid index gets o = 0 (an empty softmax contributes nothing).

Two numerics, chosen by the caller:
  "fp32"  the math above in fp32 (the reference in float64): sparse_mla_attend on CUDA cores, the exact path.
  "bf16"  what FlashMLA's sparse kernel and the deployment compute: q_abs, q_pe, c_kv and k_pe rounded to
          bf16 (nearest even) before the scores, fp32 softmax and accumulation: sparse_mla_attend_tc on
          tensor cores. In the model's "fp8" precision the cached c_kv are e4m3 values times power-of-two
          scales, exact in bf16, so only the queries and the rope key part are rounded. The kernel also
          rounds the unnormalised probabilities exp(s - m) to bf16 before P V (and sums the rounded values);
          the reference keeps them exact: the kernel tests' tolerance covers that rounding.
"""

import numpy as np

from kernels._cuda import check, check_array, device_attr, is_gpu, kernel, xp_of

NC = 32  # selected rows per chunk in sparse_mla.cu (both kernels)
NUMERICS = ("fp32", "bf16")


def round_bf16(x):
    """float32 values rounded to the nearest bf16 (ties to even), still as float32; numpy or cupy."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)


def sparse_mla_reference(q_abs, q_pe, c_kv, k_pe, idx, scale, numerics="fp32"):
    """q_abs f32 [T, H, Dc], q_pe f32 [T, H, R], c_kv f32 [cap, Dc], k_pe f32 [cap, R], idx int32 [T, K]
    -> o f32 [T, H, Dc]. float64 accumulation; works on numpy or cupy arrays. numerics "bf16" rounds
    q_abs, q_pe and the gathered c_kv, k_pe rows to bf16 first (module docstring)."""
    check(numerics in NUMERICS, lambda: f"sparse_mla: numerics {numerics!r}, expected one of {NUMERICS}")
    xp = xp_of(q_abs)
    rnd = round_bf16 if numerics == "bf16" else (lambda a: a)
    q_abs, q_pe = rnd(q_abs), rnd(q_pe)
    T, H, Dc = q_abs.shape
    R = q_pe.shape[2]
    cap = c_kv.shape[0]
    K = idx.shape[1]
    out = xp.zeros((T, H, Dc), np.float32)
    if K == 0:
        return out
    valid = (idx >= 0) & (idx < cap)  # (T, K)
    safe = xp.where(valid, idx, 0)
    step = max(1, (64 << 20) // (K * (Dc + R) * 8))  # queries per batch: ~64 MB of gathered rows
    for t0 in range(0, T, step):
        b = slice(t0, t0 + step)
        c = rnd(c_kv[safe[b]]).astype(np.float64)  # (Tb, K, Dc)
        kp = rnd(k_pe[safe[b]]).astype(np.float64)  # (Tb, K, R)
        s = q_abs[b].astype(np.float64) @ c.transpose(0, 2, 1)  # (Tb, H, K)
        s += q_pe[b].astype(np.float64) @ kp.transpose(0, 2, 1)
        s = xp.where(valid[b, None, :], s * scale, -np.inf)
        mx = s.max(axis=2, keepdims=True)
        mx = xp.where(xp.isfinite(mx), mx, 0.0)  # no valid index: every p is exp(-inf) = 0
        p = xp.exp(s - mx)
        l = p.sum(axis=2, keepdims=True)
        p /= xp.where(l > 0, l, 1.0)
        out[b] = (p @ c).astype(np.float32)  # (Tb, H, Dc)
    return out


# --- GPU launcher --------------------------------------------------------------------------------------

_configured = set()  # (device, kernel defines) whose dynamic shared memory limit was raised


def smem_bytes(Dc, R, HG):
    """Dynamic shared memory of sparse_mla_attend (must match SMEM_BYTES in sparse_mla.cu)."""
    D = Dc + R
    return 4 * (HG * D + 2 * NC * D + 2 * HG * NC + 3 * HG) + 4 * 3 * NC


def smem_bytes_tc(Dc, R, HG):
    """Dynamic shared memory of sparse_mla_attend_tc (must match TC_SMEM_BYTES in sparse_mla.cu): q and key
    tiles in bf16 with rows padded by 8 elements, the fp32 staging rows, P fragments, max/sum, positions."""
    D, MT = Dc + R, HG // 16
    return 2 * HG * (D + 8) + 2 * NC * (D + 8) + 4 * NC * D + MT * 2 * 2 * 32 * 16 + 2 * MT * 2 * 16 * 4 + 2 * NC * 4


def tc_heads_per_cta(H):
    """Heads per CTA of the tensor-core kernel: 64, or H rounded up to m16 tiles when smaller."""
    return min(64, 16 * -(-H // 16))


def sparse_mla_gpu(q_abs, q_pe, c_kv, k_pe, idx, scale, numerics="fp32"):
    """Launcher for sparse_mla.cu: same arguments and math as the reference. numerics "fp32":
    sparse_mla_attend (fp32 on CUDA cores; H a multiple of 4); "bf16": sparse_mla_attend_tc (bf16
    mma.sync, fp32 softmax; any H, padded to whole m16 tiles). Both need Dc % 128 == 0 and R % 4 == 0,
    "bf16" also (Dc + R) % 16 == 0. Few queries (decode): the selected list is split over CTAs and the
    partial softmaxes merged by sparse_mla_combine."""
    import cupy as cp
    check(numerics in NUMERICS, lambda: f"sparse_mla: numerics {numerics!r}, expected one of {NUMERICS}")
    check(q_abs.ndim == 3, lambda: f"q_abs: rank {q_abs.ndim} (shape {q_abs.shape}), expected [T, H, Dc]")
    T, H, Dc = q_abs.shape
    check(q_pe.ndim == 3, lambda: f"q_pe: rank {q_pe.ndim} (shape {q_pe.shape}), expected [T, H, R]")
    R = q_pe.shape[2]
    check(c_kv.ndim == 2 and idx.ndim == 2, lambda: f"c_kv {c_kv.shape} must be [cap, Dc], idx {idx.shape} [T, K]")
    cap, K = c_kv.shape[0], idx.shape[1]
    check_array(q_abs, "q_abs", np.float32, ndim=3)
    check_array(q_pe, "q_pe", np.float32, shape=(T, H, R))
    check_array(c_kv, "c_kv", np.float32, shape=(cap, Dc))
    check_array(k_pe, "k_pe", np.float32, shape=(cap, R))
    check_array(idx, "idx", np.int32, shape=(T, K))
    for a, name in ((q_abs, "q_abs"), (q_pe, "q_pe"), (c_kv, "c_kv"), (k_pe, "k_pe")):
        check(a.data.ptr % 16 == 0, lambda: f"{name}: base address must be 16-byte aligned (float4 and cp.async)")
    check(Dc % 128 == 0, lambda: f"sparse_mla: Dc = {Dc}, the kernel needs a multiple of 128")
    check(R % 4 == 0, lambda: f"sparse_mla: R = {R}, the kernel needs a multiple of 4")
    if numerics == "bf16":
        check((Dc + R) % 16 == 0,
              lambda: f"sparse_mla bf16: Dc + R = {Dc + R}, the kernel needs a multiple of 16 (k16 steps)")
        HG = tc_heads_per_cta(max(H, 1))
        NT = 4 * HG  # two warps per 16 heads
        smem = smem_bytes_tc(Dc, R, HG)
        defines = (f"SM_DC={Dc}", f"SM_R={R}", f"SM_TC_HG={HG}")
        name = "sparse_mla_attend_tc"
    else:
        HG = next((g for g in (16, 8, 4) if H % g == 0), None)
        check(HG is not None, lambda: f"sparse_mla: H = {H} heads, the kernel needs a multiple of 4")
        NT = min(256, HG * Dc // 4)  # phase O: one thread per (head slice, float4 column of the latent)
        smem = smem_bytes(Dc, R, HG)
        defines = (f"SM_DC={Dc}", f"SM_R={R}", f"SM_HG={HG}", f"SM_NT={NT}")
        name = "sparse_mla_attend"
    limit = device_attr("MaxSharedMemoryPerBlockOptin")
    check(smem <= limit,
          lambda: f"sparse_mla: needs {smem} bytes of shared memory (Dc {Dc}, R {R}), the GPU allows {limit}")

    out = cp.full((T, H, Dc), np.nan, np.float32)  # NaN: an unwritten element shows up in tests
    if T == 0 or H == 0:
        return out
    # Few CTAs (decode): split each query's selected list over several CTAs, then merge.
    groups = -(-H // HG)
    chunks = -(-K // NC)
    base = T * groups
    sm = device_attr("MultiProcessorCount")
    nsplit = 1 if chunks <= 1 or base >= sm else min(sm // base, chunks)
    per_split = max(1, -(-chunks // nsplit))
    nsplit = max(1, -(-chunks // per_split))
    attend = kernel("sparse_mla.cu", name, defines)
    if (cp.cuda.Device().id, name, defines) not in _configured:
        attend.max_dynamic_shared_size_bytes = smem
        _configured.add((cp.cuda.Device().id, name, defines))
    if nsplit > 1:
        part_o = cp.empty((T, nsplit, H, Dc), np.float32)
        part_ml = cp.empty((T, nsplit, H, 2), np.float32)
    else:
        part_o = part_ml = out  # unused
    attend((T, groups, nsplit), (NT,),
           (q_abs, q_pe, c_kv, k_pe, idx, out, part_o, part_ml,
            np.int32(H), np.int32(K), np.int32(cap), np.int32(per_split), np.float32(scale)),
           shared_mem=smem)
    if nsplit > 1:
        kernel("sparse_mla.cu", "sparse_mla_combine", defines)(
            (T * H,), (Dc // 4,), (part_o, part_ml, out, np.int32(H), np.int32(nsplit)))
    return out


def sparse_mla(q_abs, q_pe, c_kv, k_pe, idx, scale, numerics="fp32"):
    """Dispatch: CuPy arrays to the kernel of these numerics, numpy arrays to the reference.
    Returns o f32 [T, H, Dc]."""
    if is_gpu(q_abs):
        return sparse_mla_gpu(q_abs, q_pe, c_kv, k_pe, idx, scale, numerics)
    return sparse_mla_reference(q_abs, q_pe, c_kv, k_pe, idx, scale, numerics)
