// Sparse MLA in the absorbed latent form (SPEC section 4): attention of each query over its selected
// cache rows, all heads sharing the one selected set (an MQA over the 576-wide latent keys).
//
//   score[t,h,i] = scale * (q_abs[t,h] . c_kv[idx[t,i]] + q_pe[t,h] . k_pe[idx[t,i]])   valid i only
//   o[t,h]       = sum_i softmax_i(score[t,h,:]) * c_kv[idx[t,i]]                    (fp32 throughout)
// idx[t,i] = -1 (or any value outside [0, cap)) is padding and skipped; a query with no valid index gets
// o = 0. Online softmax (running max and sum per head) over chunks of NC = 32 selected rows.
//
// Compile-time configuration (-D, picked by the launcher in sparse_mla.py):
//   SM_DC  latent width Dc (kv_lora_rank; multiple of 128)   SM_R   rope width R (multiple of 4)
//   SM_HG  heads per CTA (4, 8 or 16)                         SM_NT  threads per CTA (128 or 256)
// Arguments (float32 unless noted, C-contiguous, 16-byte aligned):
//   q_abs [T, H, Dc]   q_pe [T, H, R]   c_kv [cap, Dc]   k_pe [cap, R]   idx int [T, K]
//   out [T, H, Dc]                      (written when gridDim.z == 1)
//   part_o [T, nsplit, H, Dc], part_ml [T, nsplit, H, 2] = (running max, sum of exp)   (gridDim.z > 1)
// Launch sparse_mla_attend: grid (T, H / HG, nsplit), SM_NT threads, dynamic smem = smem_bytes() below
// (~184 KB at Dc 512, R 64, HG 16: needs the opt-in attribute). CTA (t, g, s) handles heads
// [g*HG, (g+1)*HG) over chunks [s*chunks_per_split, (s+1)*chunks_per_split) of query t's selected list.
// Per chunk: 16-byte cp.async gather of the 32 rows (c_kv || k_pe) into smem, double-buffered;
// phase S: thread (hs, rp, ds) dots SH heads x 2 rows over every 8th float4 column, 8 lanes reduced by
// shuffles; softmax: one warp per head, one lane per row; phase O: thread (ho, dq) accumulates HPT heads
// x 4 latent dims in registers. nsplit > 1 (decode: few queries) splits the selected list over CTAs,
// and sparse_mla_combine (grid T*H, Dc/4 threads) merges the partial (max, sum, o) triples.

// The cp.async helpers come from kernels/hopper.cuh: nvcc finds it beside this file; for NVRTC
// kernels/_cuda.py:source pastes it in place of the #include:
#include "hopper.cuh"

#ifndef SM_DC
#define SM_DC 512
#endif
#ifndef SM_R
#define SM_R 64
#endif
#ifndef SM_HG
#define SM_HG 16
#endif
#ifndef SM_NT
#define SM_NT 256
#endif

constexpr int DC = SM_DC, R = SM_R, HG = SM_HG, NT = SM_NT;
constexpr int D = DC + R;        // absorbed key width, in floats
constexpr int D4 = D / 4, DC4 = DC / 4;
constexpr int NC = 32;           // rows per chunk: one per lane in the softmax
constexpr int NWARPS = NT / 32;
constexpr int DS = 8, RP = NC / 2;          // phase S: 8 lanes split the columns, 16 row pairs
constexpr int SH = HG * RP * DS / NT;       // phase S: heads per thread
constexpr int DQ = DC / 4;                  // phase O: float4 columns of the latent
constexpr int NHO = NT / DQ;                // phase O: head slices
constexpr int HPT = HG / NHO;               // phase O: heads per thread
static_assert(DC % 128 == 0 && R % 4 == 0, "Dc must be a multiple of 128, R of 4");
static_assert(NT % (RP * DS) == 0 && SH >= 1 && SH * (NT / (RP * DS)) == HG, "phase S split");
static_assert(NT % DQ == 0 && HPT >= 1 && HPT * NHO == HG, "phase O split");

// Shared memory, in floats: q [HG][D], rows [2][NC][D], S [HG][NC], P [NC][HG], m/l/corr [HG], then
// positions int [3][NC]. The launcher computes the same total.
constexpr int SMEM_FLOATS = HG * D + 2 * NC * D + 2 * HG * NC + 3 * HG;
constexpr int SMEM_BYTES = SMEM_FLOATS * 4 + 3 * NC * 4;

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
    acc = fmaf(a.z, b.z, acc);
    return fmaf(a.w, b.w, acc);
}

// Cache row of selected entry k, or -1 for padding, out-of-range values, and k past this CTA's list.
__device__ __forceinline__ int row_position(const int* __restrict__ idx_t, int k, int k_end, int cap) {
    if (k >= k_end) return -1;
    const int p = idx_t[k];
    return (p >= 0 && p < cap) ? p : -1;
}

extern "C" __global__ void __launch_bounds__(NT, 1)
sparse_mla_attend(const float* __restrict__ q_abs, const float* __restrict__ q_pe,
                  const float* __restrict__ c_kv, const float* __restrict__ k_pe,
                  const int* __restrict__ idx, float* __restrict__ out,
                  float* __restrict__ part_o, float* __restrict__ part_ml,
                  int H, int K, int cap, int chunks_per_split, float scale) {
    extern __shared__ __align__(16) float smem[];
    float* s_q = smem;                     // [HG][D]
    float* s_rows = s_q + HG * D;          // [2][NC][D]
    float* s_S = s_rows + 2 * NC * D;      // [HG][NC] scaled scores, -inf on padding
    float* s_P = s_S + HG * NC;            // [NC][HG] exp(score - running max)
    float* s_m = s_P + NC * HG;            // [HG] running max
    float* s_l = s_m + HG;                 // [HG] running sum of exp
    float* s_corr = s_l + HG;              // [HG] exp(old max - new max) of the current chunk
    int* s_pos = reinterpret_cast<int*>(s_corr + HG);  // [3][NC] cache rows of chunks c, c+1, c+2

    unsigned int dyn_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_smem));
    if (dyn_smem < (unsigned int)SMEM_BYTES) __trap();  // launcher and kernel disagree on the layout

    const int t = blockIdx.x, h0 = blockIdx.y * HG, split = blockIdx.z, nsplit = gridDim.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int k_begin = split * chunks_per_split * NC;
    const int k_end = imin(K, k_begin + chunks_per_split * NC);
    const int nchunks = k_end > k_begin ? (k_end - k_begin + NC - 1) / NC : 0;
    const int* idx_t = idx + (long long)t * K;

    // q rows of this CTA's heads: [q_abs || q_pe], the same layout as a gathered [c_kv || k_pe] row.
    for (int e = tid; e < HG * D4; e += NT) {
        const int h = e / D4, f = e % D4;
        const long long th = (long long)t * H + h0 + h;
        reinterpret_cast<float4*>(s_q)[e] =
            f < DC4 ? reinterpret_cast<const float4*>(q_abs + th * DC)[f]
                    : reinterpret_cast<const float4*>(q_pe + th * R)[f - DC4];
    }
    if (tid < HG) {
        s_m[tid] = neg_inf();
        s_l[tid] = 0.0f;
    }
    if (tid < NC) {
        s_pos[tid] = row_position(idx_t, k_begin + tid, k_end, cap);
        s_pos[NC + tid] = row_position(idx_t, k_begin + NC + tid, k_end, cap);
    }
    __syncthreads();

    auto load_chunk = [&](int buf, const int* pos) {
        float* dst = s_rows + buf * NC * D;
        for (int e = tid; e < NC * D4; e += NT) {
            const int i = e / D4, f = e % D4;
            const int p = pos[i];
            const float* src = p < 0 ? c_kv
                             : f < DC4 ? c_kv + (long long)p * DC + 4 * f
                                       : k_pe + (long long)p * R + 4 * (f - DC4);
            cp_async16(smem_addr(dst + i * D + 4 * f), src, p >= 0 ? 16 : 0);  // padding rows are zero-filled
        }
    };
    if (nchunks > 0) load_chunk(0, s_pos);
    cp_async_commit();

    const int ds = tid & (DS - 1), rp = (tid / DS) % RP, hs = tid / (RP * DS);  // phase S roles
    const int dq = tid % DQ, ho = tid / DQ;                                     // phase O roles
    float o[HPT][4];
#pragma unroll
    for (int hh = 0; hh < HPT; ++hh) o[hh][0] = o[hh][1] = o[hh][2] = o[hh][3] = 0.0f;

    for (int c = 0; c < nchunks; ++c) {
        cp_async_wait<0>();
        __syncthreads();  // chunk c is in smem; chunk c-1's buffer and S/P are free again
        if (c + 1 < nchunks) load_chunk((c + 1) & 1, s_pos + ((c + 1) % 3) * NC);
        cp_async_commit();
        const int pos_next2 = tid < NC ? row_position(idx_t, k_begin + (c + 2) * NC + tid, k_end, cap) : -1;
        const float* rows = s_rows + (c & 1) * NC * D;
        const int* pos = s_pos + (c % 3) * NC;

        // Phase S: score[h][i] for heads hs*SH.., rows 2rp, 2rp+1, this lane's columns ds, ds+8, ...
        {
            float acc[SH][2];
#pragma unroll
            for (int hh = 0; hh < SH; ++hh) acc[hh][0] = acc[hh][1] = 0.0f;
            const float4* r0 = reinterpret_cast<const float4*>(rows + (2 * rp) * D);
            const float4* r1 = r0 + D4;
            const float4* qh = reinterpret_cast<const float4*>(s_q + hs * SH * D);
#pragma unroll 2
            for (int j = 0; j < (D4 + DS - 1) / DS; ++j) {
                const int f = ds + DS * j;
                if (D4 % DS == 0 || f < D4) {
                    const float4 a = r0[f], b = r1[f];
#pragma unroll
                    for (int hh = 0; hh < SH; ++hh) {
                        const float4 qv = qh[hh * D4 + f];
                        acc[hh][0] = dot4(qv, a, acc[hh][0]);
                        acc[hh][1] = dot4(qv, b, acc[hh][1]);
                    }
                }
            }
#pragma unroll
            for (int hh = 0; hh < SH; ++hh)
#pragma unroll
                for (int r = 0; r < 2; ++r)
#pragma unroll
                    for (int x = 1; x < DS; x <<= 1) acc[hh][r] += __shfl_xor_sync(0xffffffffu, acc[hh][r], x);
            if (ds == 0) {
#pragma unroll
                for (int hh = 0; hh < SH; ++hh)
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const int i = 2 * rp + r;
                        s_S[(hs * SH + hh) * NC + i] = pos[i] >= 0 ? acc[hh][r] * scale : neg_inf();
                    }
            }
        }
        __syncthreads();

        // Online softmax: one warp per head, lane = row of the chunk.
        for (int h = warp; h < HG; h += NWARPS) {
            const float s = s_S[h * NC + lane];
            float mx = s;
#pragma unroll
            for (int x = 16; x > 0; x >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
            const float m_old = s_m[h];
            const float m_new = fmaxf(m_old, mx);
            const bool none = m_new == neg_inf();  // no valid row so far: keep everything at zero
            const float p = none ? 0.0f : expf(s - m_new);
            const float corr = none ? 1.0f : expf(m_old - m_new);
            float sum = p;
#pragma unroll
            for (int x = 16; x > 0; x >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, x);
            s_P[lane * HG + h] = p;
            if (lane == 0) {
                s_m[h] = m_new;
                s_l[h] = s_l[h] * corr + sum;
                s_corr[h] = corr;
            }
        }
        __syncthreads();

        // Phase O: o[h][4dq..4dq+3] = o * corr + sum_i P[i][h] * c_kv row i.
#pragma unroll
        for (int hh = 0; hh < HPT; ++hh) {
            const float cr = s_corr[ho * HPT + hh];
            o[hh][0] *= cr; o[hh][1] *= cr; o[hh][2] *= cr; o[hh][3] *= cr;
        }
#pragma unroll 4
        for (int i = 0; i < NC; ++i) {
            const float4 cv = reinterpret_cast<const float4*>(rows + i * D)[dq];
            const float* p = s_P + i * HG + ho * HPT;
#pragma unroll
            for (int hh = 0; hh < HPT; ++hh) {
                const float ph = p[hh];
                o[hh][0] = fmaf(ph, cv.x, o[hh][0]);
                o[hh][1] = fmaf(ph, cv.y, o[hh][1]);
                o[hh][2] = fmaf(ph, cv.z, o[hh][2]);
                o[hh][3] = fmaf(ph, cv.w, o[hh][3]);
            }
        }
        if (tid < NC) s_pos[((c + 2) % 3) * NC + tid] = pos_next2;  // read after the next barrier
    }
    cp_async_wait<0>();
    __syncthreads();  // s_m, s_l final (also when nchunks == 0)

#pragma unroll
    for (int hh = 0; hh < HPT; ++hh) {
        const int h = ho * HPT + hh;
        const long long th = (long long)t * H + h0 + h;
        if (nsplit == 1) {
            const float l = s_l[h];
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            reinterpret_cast<float4*>(out + th * DC)[dq] = make_float4(o[hh][0] * inv, o[hh][1] * inv,
                                                                       o[hh][2] * inv, o[hh][3] * inv);
        } else {
            const long long ps = ((long long)t * nsplit + split) * H + h0 + h;
            reinterpret_cast<float4*>(part_o + ps * DC)[dq] = make_float4(o[hh][0], o[hh][1], o[hh][2], o[hh][3]);
        }
    }
    if (nsplit > 1 && tid < HG) {
        const long long ps = ((long long)t * nsplit + split) * H + h0 + tid;
        part_ml[ps * 2] = s_m[tid];
        part_ml[ps * 2 + 1] = s_l[tid];
    }
}

// Merge the nsplit partial softmaxes of each (t, h): M = max m_s, L = sum l_s e^(m_s - M),
// o = sum e^(m_s - M) o_s / L (0 when L == 0). Grid T*H, Dc/4 threads (one float4 column each).
extern "C" __global__ void sparse_mla_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                              float* __restrict__ out, int H, int nsplit) {
    const long long th = blockIdx.x;
    const long long t = th / H, h = th % H;
    const int dq = threadIdx.x;
    float M = neg_inf();
    for (int s = 0; s < nsplit; ++s) M = fmaxf(M, part_ml[((t * nsplit + s) * H + h) * 2]);
    float L = 0.0f;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int s = 0; s < nsplit; ++s) {
        const long long ps = (t * nsplit + s) * H + h;
        const float ms = part_ml[ps * 2];
        const float wgt = ms == neg_inf() ? 0.0f : expf(ms - M);
        L += part_ml[ps * 2 + 1] * wgt;
        const float4 v = reinterpret_cast<const float4*>(part_o + ps * DC)[dq];
        acc.x += wgt * v.x; acc.y += wgt * v.y; acc.z += wgt * v.z; acc.w += wgt * v.w;
    }
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    reinterpret_cast<float4*>(out + th * DC)[dq] = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
}

// ====================================================================================================
// Tensor-core variant, numerics "bf16": sparse_mla_attend_tc
// ====================================================================================================
// Same contract, arguments and outputs as sparse_mla_attend (out, or part_o / part_ml for
// sparse_mla_combine; padding skipped, an empty query gets o = 0), other numerics: q_abs, q_pe, c_kv and
// k_pe are rounded to bf16 (nearest even) as they enter shared memory, and both products run on
// mma.sync m16n8k16 (bf16 in, fp32 accumulate); the softmax (max, rescale, sum) is fp32.
// P is NOT rounded to bf16 (FlashMLA does round it): each unnormalised probability p = exp(s - m) goes
// in as two bf16 parts, hi = bf16(p) and lo = bf16(p - hi), two mma with the same V fragment, so P V
// carries p to ~2^-17 relative. Reason: in the model's fp8 precision every linear layer re-quantises its
// input to e4m3, which turns a 1e-3 change of the attention output into percent-level logit changes;
// bf16 P alone moved the small test model's logits by 8% from the reference (CPU emulation), while with
// the split this kernel, the fp32 kernel and the numpy reference agree at fp32 level on bf16 inputs.
//
// Compile-time: SM_DC, SM_R as above (the launcher asks Dc % 128 == 0, (Dc + R) % 16 == 0, R % 4 == 0),
//   SM_TC_HG heads per CTA (16, 32, 48 or 64); TC_NT = 4 * SM_TC_HG threads.
// Launch sparse_mla_attend_tc: grid (T, ceil(H / TC_HG), nsplit), TC_NT threads, dynamic smem
// TC_SMEM_BYTES (191,232 B at Dc 512, R 64, HG 64). Head rows past H are zero queries, never stored.
//
// Work split. The CTA's heads form TC_HG/16 m16 tiles; each tile belongs to a pair of warps (mt, j), j = 0, 1.
// Per chunk of TC_NC = 32 selected rows, warp (mt, j)
//   S  scores its 16 heads against keys 16j .. 16j+15 of the chunk: 2 n8 tiles, (Dc+R)/16 k16 steps;
//   O  accumulates its 16 heads x latent columns [j*Dc/2, (j+1)*Dc/2) over all 32 keys of the chunk.
// So no score is computed twice, and O takes 16 x Dc/2 fp32 = Dc/4 registers a thread (128 at Dc 512; a
// warp holding all 512 columns would need 256). The pair swaps per-head maxima, then partial sums and
// its P fragments (16 heads x 16 keys, bf16 hi and lo) through shared memory, with two named barriers
// (bar.sync 1 + mt, 64 threads) per chunk; both warps then hold the same running max m and sum l.
// FA2-style: a warp's S accumulator fragments are, once converted, exactly the A fragments of P for its
// 16 keys (m16n8k16 C and A layouts line up), so its own P never leaves registers.
//
// Pipeline per chunk c:  wait for chunk c's cp.async (fp32 rows c_kv || k_pe into the staging buffer) |
// __syncthreads | convert staging -> bf16 key tile | __syncthreads | cp.async chunk c+1 into the staging
// buffer | S, softmax, P V from the bf16 tile (the gather of c+1 overlaps the math of c).
// Shared memory: q bf16 [TC_HG][TC_DP], key tile bf16 [TC_NC][TC_DP], staging f32 [TC_NC][D], P fragments
// uint4 [TC_HG/16][2 halves][hi, lo][32 lanes], max and sum f32 [TC_HG/16][2][16] each, positions int [2][TC_NC]. The bf16 row
// pitch TC_DP = D + 8 is an odd number of 16-byte units, so the 8 row addresses of an ldmatrix (8
// consecutive rows, same column) fall in 8 different 16-byte bank groups: no bank conflicts.

#ifndef SM_TC_HG
#define SM_TC_HG 64
#endif

constexpr int TC_HG = SM_TC_HG;         // heads per CTA
constexpr int TC_MT = TC_HG / 16;       // m16 head tiles = warp pairs
constexpr int TC_NT = 64 * TC_MT;       // threads
constexpr int TC_NC = 32;               // selected rows per chunk
constexpr int TC_DP = D + 8;            // bf16 row pitch of the q and key tiles, in elements
constexpr int TC_DV = DC / 2;           // latent columns of O per warp
constexpr int TC_NO = TC_DV / 8;        // n8 tiles of O per warp
static_assert(TC_HG % 16 == 0 && TC_HG >= 16 && TC_HG <= 64, "TC_HG: 16, 32, 48 or 64 heads");
static_assert(D % 16 == 0 && TC_DV % 16 == 0, "Dc + R must be a multiple of 16, Dc of 32");
static_assert((TC_DP * 2 / 16) % 2 == 1, "row pitch: an odd number of 16-byte units");

constexpr int TC_Q_BYTES = TC_HG * TC_DP * 2;
constexpr int TC_KV_BYTES = TC_NC * TC_DP * 2;
constexpr int TC_STAGE_BYTES = TC_NC * D * 4;
constexpr int TC_P_BYTES = TC_MT * 2 * 2 * 32 * 16;
constexpr int TC_RED_BYTES = TC_MT * 2 * 16 * 4;  // one of max, sum
constexpr int TC_SMEM_BYTES = TC_Q_BYTES + TC_KV_BYTES + TC_STAGE_BYTES + TC_P_BYTES + 2 * TC_RED_BYTES + 2 * TC_NC * 4;

typedef unsigned short bf16_t;  // bf16 bit pattern

// (lo, hi) -> bf16x2, each rounded to nearest even: lo in bits 0..15 (the lower-index element of a
// fragment pair), hi in bits 16..31.
__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float bf16_lo(unsigned int v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int v) { return __uint_as_float(v & 0xffff0000u); }

// (p0, p1) as bf16x2 hi + lo: hi = bf16(p), lo = bf16(p - hi) (p - hi is exact in fp32); |p - hi - lo|
// <= 2^-9 |p - hi| <= 2^-18 |p|.
__device__ __forceinline__ void split_bf16(float p0, float p1, unsigned int& hi, unsigned int& lo) {
    hi = pack_bf16(p0, p1);
    lo = pack_bf16(p0 - bf16_lo(hi), p1 - bf16_hi(hi));
}

// Fragment layouts of mma.m16n8k16 (bf16), lane = 4g + q:
//   A 16x16 row-major:  a[0] = A[g][2q, 2q+1]    a[1] = A[g+8][2q, 2q+1]
//                       a[2] = A[g][2q+8, 2q+9]  a[3] = A[g+8][2q+8, 2q+9]
//   B 16x8 (k x n):     b0 = B[2q, 2q+1][g]      b1 = B[2q+8, 2q+9][g]
//   C/D 16x8 fp32:      d[0], d[1] = D[g][2q, 2q+1]    d[2], d[3] = D[g+8][2q, 2q+1]
// (lower element index in the low 16 bits of each register.)
__device__ __forceinline__ void mma_bf16(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ldmatrix x4: lane l gives the shared address of row (l & 7) of 8x8 bf16 matrix (l >> 3) (16 contiguous
// bytes); register i receives matrix i as: lane 4g + q holds row g, columns 2q, 2q+1. With .trans the
// matrix is transposed first: lane 4g + q holds rows 2q, 2q+1 of column g.
__device__ __forceinline__ void ldsm_x4(unsigned int* r, unsigned int addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned int* r, unsigned int addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// The two warps of head tile mt meet (named barrier 1 + mt; 0 is __syncthreads).
__device__ __forceinline__ void pair_sync(int mt) {
    asm volatile("bar.sync %0, 64;" ::"r"(1 + mt) : "memory");
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// exp2(s - m), 0 while no valid key has been seen (m = -inf).
__device__ __forceinline__ float prob(float s, float m) { return m == neg_inf() ? 0.0f : exp2f(s - m); }

extern "C" __global__ void __launch_bounds__(TC_NT, 1)
sparse_mla_attend_tc(const float* __restrict__ q_abs, const float* __restrict__ q_pe,
                     const float* __restrict__ c_kv, const float* __restrict__ k_pe,
                     const int* __restrict__ idx, float* __restrict__ out,
                     float* __restrict__ part_o, float* __restrict__ part_ml,
                     int H, int K, int cap, int chunks_per_split, float scale) {
    extern __shared__ __align__(16) unsigned char smem_tc[];
    bf16_t* s_q = reinterpret_cast<bf16_t*>(smem_tc);                                 // [TC_HG][TC_DP]
    bf16_t* s_kv = reinterpret_cast<bf16_t*>(smem_tc + TC_Q_BYTES);                   // [TC_NC][TC_DP]
    float* s_stage = reinterpret_cast<float*>(smem_tc + TC_Q_BYTES + TC_KV_BYTES);    // [TC_NC][D]
    uint4* s_P = reinterpret_cast<uint4*>(smem_tc + TC_Q_BYTES + TC_KV_BYTES + TC_STAGE_BYTES);  // [MT][2][2][32]
    float* s_max = reinterpret_cast<float*>(s_P + TC_MT * 2 * 2 * 32);               // [MT][2][16]
    float* s_sum = s_max + TC_MT * 2 * 16;                                            // [MT][2][16]
    int* s_pos = reinterpret_cast<int*>(s_sum + TC_MT * 2 * 16);                      // [2][TC_NC]

    unsigned int dyn_smem;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_smem));
    if (dyn_smem < (unsigned int)TC_SMEM_BYTES) __trap();  // launcher and kernel disagree on the layout

    const int t = blockIdx.x, h0 = blockIdx.y * TC_HG, split = blockIdx.z, nsplit = gridDim.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, q = lane & 3;       // fragment coordinates
    const int mt = warp >> 1, j = warp & 1;      // head tile, half (keys in S, latent columns in O)
    const int k_begin = split * chunks_per_split * TC_NC;
    const int k_end = imin(K, k_begin + chunks_per_split * TC_NC);
    const int nchunks = k_end > k_begin ? (k_end - k_begin + TC_NC - 1) / TC_NC : 0;
    const int* idx_t = idx + (long long)t * K;
    const float scale_log2 = scale * 1.4426950408889634f;  // p = 2^(s log2 e - m): exp2 is one instruction

    // q rows [q_abs || q_pe] as bf16, zero past head H; 4 floats -> 8 bytes per step.
    for (int e = tid; e < TC_HG * D4; e += TC_NT) {
        const int h = e / D4, f = e % D4;
        const long long th = (long long)t * H + h0 + h;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (h0 + h < H)
            v = f < DC4 ? reinterpret_cast<const float4*>(q_abs + th * DC)[f]
                        : reinterpret_cast<const float4*>(q_pe + th * R)[f - DC4];
        *reinterpret_cast<uint2*>(s_q + h * TC_DP + 4 * f) = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
    }
    if (tid < TC_NC) s_pos[tid] = row_position(idx_t, k_begin + tid, k_end, cap);
    int pos_ahead = tid < TC_NC ? row_position(idx_t, k_begin + TC_NC + tid, k_end, cap) : -1;  // chunk c+1
    __syncthreads();

    // Gather of the chunk whose positions are pos: fp32 rows into the staging buffer, padding zero-filled.
    auto load_chunk = [&](const int* pos) {
        for (int e = tid; e < TC_NC * D4; e += TC_NT) {
            const int i = e / D4, f = e % D4;
            const int p = pos[i];
            const float* src = p < 0 ? c_kv
                             : f < DC4 ? c_kv + (long long)p * DC + 4 * f
                                       : k_pe + (long long)p * R + 4 * (f - DC4);
            cp_async16(smem_addr(s_stage + i * D + 4 * f), src, p >= 0 ? 16 : 0);
        }
    };
    if (nchunks > 0) load_chunk(s_pos);
    cp_async_commit();

    // Per-lane ldmatrix row addresses (see the fragment layouts above); r8 = row within an 8x8 matrix,
    // mi = which of the four matrices this lane addresses.
    const int r8 = lane & 7, mi = lane >> 3;
    // A = q tile mt: matrices (heads 0-7, k 0-7), (heads 8-15, k 0-7), (0-7, k 8-15), (8-15, k 8-15).
    const unsigned int a_addr = smem_addr(s_q + (16 * mt + r8 + 8 * (mi & 1)) * TC_DP + 8 * (mi >> 1));
    // S's B = K^T for keys 16j..: matrices (keys 0-7, dims 0-7) = b0 and (keys 0-7, dims 8-15) = b1 of the
    // first n8 tile, (keys 8-15, dims 0-7), (keys 8-15, dims 8-15) of the second; rows = keys, no transpose.
    const unsigned int bs_addr = smem_addr(s_kv + (16 * j + r8 + 8 * (mi >> 1)) * TC_DP + 8 * (mi & 1));
    // O's B = V (keys x latent columns), transposed on load: matrices (keys 0-7, cols 0-7) = b0 and
    // (keys 8-15, cols 0-7) = b1 of the first n8 tile, (keys 0-7, cols 8-15), (keys 8-15, cols 8-15) of
    // the second. v_own covers the keys this warp scored, v_other its partner's.
    const int v_off = (r8 + 8 * (mi & 1)) * TC_DP + j * TC_DV + 8 * (mi >> 1);
    const unsigned int v_own = smem_addr(s_kv + 16 * j * TC_DP + v_off);
    const unsigned int v_other = smem_addr(s_kv + 16 * (1 - j) * TC_DP + v_off);

    float o[TC_NO][4];
#pragma unroll
    for (int n = 0; n < TC_NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_g = neg_inf(), m_g8 = neg_inf();  // running max (log2 domain) of heads g and g+8 of tile mt
    float l_g = 0.0f, l_g8 = 0.0f;            // running sum of p

    float* red_max = s_max + mt * 32;          // [2][16]: per half, the maximum of each head
    float* red_sum = s_sum + mt * 32;

    for (int c = 0; c < nchunks; ++c) {
        cp_async_wait<0>();
        __syncthreads();  // chunk c is staged; every warp is done with the key tile of chunk c-1
        for (int e = tid; e < TC_NC * D4; e += TC_NT) {
            const int i = e / D4, f = e % D4;
            const float4 v = reinterpret_cast<const float4*>(s_stage)[e];
            *reinterpret_cast<uint2*>(s_kv + i * TC_DP + 4 * f) = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
        }
        if (tid < TC_NC) s_pos[((c + 1) & 1) * TC_NC + tid] = pos_ahead;  // chunk c-1's slot: read before the barrier above
        __syncthreads();  // key tile of chunk c ready, staging buffer free, positions of chunk c+1 ready
        if (c + 1 < nchunks) load_chunk(s_pos + ((c + 1) & 1) * TC_NC);
        cp_async_commit();
        pos_ahead = tid < TC_NC ? row_position(idx_t, k_begin + (c + 2) * TC_NC + tid, k_end, cap) : -1;
        const int* pos = s_pos + (c & 1) * TC_NC;

        // S = q K^T: 16 heads x 16 keys; even and odd k steps in separate accumulators (two more
        // independent mma chains to hide latency).
        float acc[2][2][4];
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
            for (int n = 0; n < 2; ++n) acc[u][n][0] = acc[u][n][1] = acc[u][n][2] = acc[u][n][3] = 0.0f;
#pragma unroll 2
        for (int ks = 0; ks < D / 16; ++ks) {
            unsigned int a[4], b[4];
            ldsm_x4(a, a_addr + ks * 32);
            ldsm_x4(b, bs_addr + ks * 32);
            mma_bf16(acc[ks & 1][0], a, b[0], b[1]);
            mma_bf16(acc[ks & 1][1], a, b[2], b[3]);
        }
        // Scaled scores; a padding key (column 2q+e of n8 tile n) is -inf for both heads g and g+8.
        float sc[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const bool valid = pos[16 * j + 8 * n + 2 * q + e] >= 0;
                sc[n][e] = valid ? (acc[0][n][e] + acc[1][n][e]) * scale_log2 : neg_inf();
                sc[n][2 + e] = valid ? (acc[0][n][2 + e] + acc[1][n][2 + e]) * scale_log2 : neg_inf();
            }

        // Online softmax over the pair's 32 keys: the new max of heads g and g+8.
        const float mx_g = quad_max(fmaxf(fmaxf(sc[0][0], sc[0][1]), fmaxf(sc[1][0], sc[1][1])));
        const float mx_g8 = quad_max(fmaxf(fmaxf(sc[0][2], sc[0][3]), fmaxf(sc[1][2], sc[1][3])));
        if (q == 0) {
            red_max[16 * j + g] = mx_g;
            red_max[16 * j + g + 8] = mx_g8;
        }
        pair_sync(mt);
        const float mn_g = fmaxf(m_g, fmaxf(red_max[g], red_max[16 + g]));
        const float mn_g8 = fmaxf(m_g8, fmaxf(red_max[g + 8], red_max[16 + g + 8]));
        const float corr_g = mn_g == neg_inf() ? 1.0f : exp2f(m_g - mn_g);
        const float corr_g8 = mn_g8 == neg_inf() ? 1.0f : exp2f(m_g8 - mn_g8);
        m_g = mn_g;
        m_g8 = mn_g8;

        // P as the A fragments (hi and lo parts) of this warp's 16 keys: the C layout of its two n8 tiles.
        float p[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            p[n][0] = prob(sc[n][0], mn_g), p[n][1] = prob(sc[n][1], mn_g);
            p[n][2] = prob(sc[n][2], mn_g8), p[n][3] = prob(sc[n][3], mn_g8);
        }
        unsigned int pa_hi[4], pa_lo[4];
        split_bf16(p[0][0], p[0][1], pa_hi[0], pa_lo[0]);  // heads g,   keys 2q, 2q+1
        split_bf16(p[0][2], p[0][3], pa_hi[1], pa_lo[1]);  // heads g+8, keys 2q, 2q+1
        split_bf16(p[1][0], p[1][1], pa_hi[2], pa_lo[2]);  // heads g,   keys 2q+8, 2q+9
        split_bf16(p[1][2], p[1][3], pa_hi[3], pa_lo[3]);  // heads g+8, keys 2q+8, 2q+9
        const float sum_g = quad_sum((p[0][0] + p[0][1]) + (p[1][0] + p[1][1]));
        const float sum_g8 = quad_sum((p[0][2] + p[0][3]) + (p[1][2] + p[1][3]));
        if (q == 0) {
            red_sum[16 * j + g] = sum_g;
            red_sum[16 * j + g + 8] = sum_g8;
        }
        uint4* P_own = s_P + (mt * 2 + j) * 64;
        const uint4* P_other = s_P + (mt * 2 + 1 - j) * 64;
        P_own[lane] = make_uint4(pa_hi[0], pa_hi[1], pa_hi[2], pa_hi[3]);
        P_own[32 + lane] = make_uint4(pa_lo[0], pa_lo[1], pa_lo[2], pa_lo[3]);
        pair_sync(mt);
        l_g = l_g * corr_g + (red_sum[g] + red_sum[16 + g]);  // half 0 first in both warps: same l
        l_g8 = l_g8 * corr_g8 + (red_sum[g + 8] + red_sum[16 + g + 8]);
        const uint4 ph = P_other[lane], pl = P_other[32 + lane];
        const unsigned int pb_hi[4] = {ph.x, ph.y, ph.z, ph.w}, pb_lo[4] = {pl.x, pl.y, pl.z, pl.w};

        // O = O * corr + P V over this warp's latent columns: own keys (pa), then the partner's (pb);
        // each V fragment serves the hi and the lo part of P.
#pragma unroll
        for (int n = 0; n < TC_NO; ++n) {
            o[n][0] *= corr_g; o[n][1] *= corr_g;
            o[n][2] *= corr_g8; o[n][3] *= corr_g8;
        }
#pragma unroll
        for (int n2 = 0; n2 < TC_NO / 2; ++n2) {
            unsigned int b[4];
            ldsm_x4_trans(b, v_own + n2 * 32);
            mma_bf16(o[2 * n2], pa_hi, b[0], b[1]);
            mma_bf16(o[2 * n2 + 1], pa_hi, b[2], b[3]);
            mma_bf16(o[2 * n2], pa_lo, b[0], b[1]);
            mma_bf16(o[2 * n2 + 1], pa_lo, b[2], b[3]);
            ldsm_x4_trans(b, v_other + n2 * 32);
            mma_bf16(o[2 * n2], pb_hi, b[0], b[1]);
            mma_bf16(o[2 * n2 + 1], pb_hi, b[2], b[3]);
            mma_bf16(o[2 * n2], pb_lo, b[0], b[1]);
            mma_bf16(o[2 * n2 + 1], pb_lo, b[2], b[3]);
        }
    }
    cp_async_wait<0>();

    // Heads g and g+8 of tile mt, latent columns j*Dc/2 + 8n + 2q, 2q+1.
    const int hg = h0 + 16 * mt + g, hg8 = hg + 8;
    const int col = j * TC_DV + 2 * q;
    if (nsplit == 1) {
        const float inv_g = l_g > 0.0f ? 1.0f / l_g : 0.0f, inv_g8 = l_g8 > 0.0f ? 1.0f / l_g8 : 0.0f;
        float* out_g = out + ((long long)t * H + hg) * DC + col;
        float* out_g8 = out + ((long long)t * H + hg8) * DC + col;
#pragma unroll
        for (int n = 0; n < TC_NO; ++n) {
            if (hg < H) *reinterpret_cast<float2*>(out_g + 8 * n) = make_float2(o[n][0] * inv_g, o[n][1] * inv_g);
            if (hg8 < H) *reinterpret_cast<float2*>(out_g8 + 8 * n) = make_float2(o[n][2] * inv_g8, o[n][3] * inv_g8);
        }
    } else {
        const long long ps = ((long long)t * nsplit + split) * H;
        float* po_g = part_o + (ps + hg) * DC + col;
        float* po_g8 = part_o + (ps + hg8) * DC + col;
#pragma unroll
        for (int n = 0; n < TC_NO; ++n) {
            if (hg < H) *reinterpret_cast<float2*>(po_g + 8 * n) = make_float2(o[n][0], o[n][1]);
            if (hg8 < H) *reinterpret_cast<float2*>(po_g8 + 8 * n) = make_float2(o[n][2], o[n][3]);
        }
        // (max, sum) in sparse_mla_combine's units: the max back from the log2 domain to natural log.
        const float ln2 = 0.6931471805599453f;
        if (j == 0 && q == 0) {
            if (hg < H) {
                part_ml[(ps + hg) * 2] = m_g == neg_inf() ? m_g : m_g * ln2;
                part_ml[(ps + hg) * 2 + 1] = l_g;
            }
            if (hg8 < H) {
                part_ml[(ps + hg8) * 2] = m_g8 == neg_inf() ? m_g8 : m_g8 * ln2;
                part_ml[(ps + hg8) * 2 + 1] = l_g8;
            }
        }
    }
}
