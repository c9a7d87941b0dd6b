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

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    unsigned int s;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

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
            cp_async16(dst + i * D + 4 * f, src, p >= 0 ? 16 : 0);  // padding rows are zero-filled
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
        cp_async_wait_all();
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
    cp_async_wait_all();
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
