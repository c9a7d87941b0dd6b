// HISA's whole selection for a few queries (decode) in one launch (SPEC section 6).
//
// hisa.select runs four kernels: block scores, top-m blocks, token scores in the kept blocks, top-K. With
// one query each has next to nothing to do (1024 block means, 8192 candidates at 128K), so each kernel's
// launch, ramp and dependent memory round trips are the cost: ~27 us on an H200 whatever the context. Here
// one launch of G CTAs a query does all four stages, meeting twice:
//
//   A. block scores   CTA g scores its share of the query's n pooled blocks into J (global):
//                       J[b] = pks[b] * sum_h (w[h] qs[h]) ReLU(q[h] . pk[b])    b < ceil(end / B)
//                     -inf past that, then +inf at block 0 and at the query's own block (end - 1) / B
//      -- barrier: every CTA of the query has written its part of J (a counter in global memory) --
//   B. top-m          every CTA reads all of J and finds the same m blocks (select.cuh's select_registers:
//                     the row in registers, linear bins, the threshold bin ranked, ballot compaction; ties to
//                     the lower block), ascending, -1 padded;
//   C. token scores   CTA g scores the kept blocks of rank g, g + G, ...: slot j of rank r is position
//                     p = kept[r] * B + j, cand[r * B + j] = ks[p] * sum_h (w[h] qs[h]) ReLU(q[h] . k[p])
//                     for p < min(end, cap), else -inf;
//      -- the last CTA of the query to finish C (another counter) goes on alone --
//   D. top-K          over the m * B candidates (ties to the lower slot = the lower position), chosen slots
//                     mapped to positions, ascending, -1 padded, into out.
// J and cand are products computed under CuPy's -ftz=true (subnormal results flush to zero), so they hold
// no subnormal values, as select_registers' float comparisons require.
//
// The scores use mma.sync m16n8k32 e4m3 (sm_89 and later): a warp takes all 64 heads (their q fragments
// staged once in shared memory) against 8 keys a tile, so the head sum is register FMAs and three shuffles.
// The work is tiny (about 1 MFLOP a CTA): what counts is latency, so every stage issues all its loads before
// it uses any (a key computed as each load arrives serialised 16 L2 round trips: 3 us of phase D), and the
// barriers are one thread's release/acquire atomics, not fences by every thread.
//
// The barrier needs every CTA of the query resident at once: the launcher keeps the grid (G x T) within
// the SM count and the kernel within one CTA an SM (launch bounds, shared memory), so on an otherwise idle
// GPU (or one whose other work finishes) every CTA gets an SM. The two counters of a query are zero at
// launch and the last CTA zeroes them again at the end (every CTA has left the barrier by then), so one
// array serves every launch on a stream; the launcher keeps one per stream.
//
// Arguments (one query a grid row: blockIdx.y = t, G = gridDim.x CTAs each):
//   q      uint8 [T, Hi, HD_DI] e4m3 bits      qs  float [T, Hi]       w  float [T, Hi]
//   pk     uint8 [>= n, HD_DI]  pooled keys     pks float [>= n]        n  blocks in the cache (>= 1)
//   keys   uint8 [cap, HD_DI]   the key cache   ks  float [cap]         cap
//   ends   int [T]              query t sees positions [0, ends[t])
//   lgB    log2(B) when B is a power of two, else -1
//   J      float [T, n]         block scores (stage A's output, kept for the tests)
//   kept   int [T, m]           kept block ids (stage B's, written by CTA 0)
//   cand   float [T, m * B]     candidate scores (stage C's)
//   out    int [T, K]           the selected positions
//   sync   int [T, 2]           zero at launch, left zero
//   Hi <= 64, B >= 1, m >= 1, K >= 1; HD_DI a multiple of 32 up to 128 (at 256 the fragments spill).
// Launch: grid (G, T), THREADS (512) threads, dynamic shared memory hisa_decode.py:smem_bytes(m, HD_DI):
//   sq uint4[MT KSTEPS 32] | sw float[64] | hist int[NBINS] | wbuf int[64] | misc int[16] | kept int[m]
// n and m B are at most THREADS PER (8192): the selections hold their rows in registers.
//
// NVRTC-compatible: no #include but kernels/select.cuh and kernels/hopper.cuh, which kernels/_cuda.py:source
// pastes in. THREADS (512), NWARPS, row_index, select_registers; u8, mma_e4m3_16832:
#include "select.cuh"
#include "hopper.cuh"

#ifndef HD_DI
#define HD_DI 128
#endif

constexpr int KSTEPS = HD_DI / 32;  // one mma consumes 32 bytes of a row
constexpr int MT = 4;               // head tiles of 16: Hi <= 64
constexpr int PER = 16;             // values a thread holds in the selections: rows of up to THREADS PER = 8192
static_assert(HD_DI % 32 == 0 && HD_DI <= 128, "HD_DI must be a multiple of 32, at most 128 (registers)");

#define NEG_INF __uint_as_float(0xff800000u)
#define POS_INF __uint_as_float(0x7f800000u)

__device__ __forceinline__ unsigned ld_u32(const u8* p) { return __ldg(reinterpret_cast<const unsigned*>(p)); }

__device__ __forceinline__ int ld_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// atomicAdd with release and acquire semantics at GPU scope: what this thread saw before (its CTA's writes,
// through the barrier before it) is published, and what the other arrivals published is visible after.
__device__ __forceinline__ int atomic_add_acq_rel(int* p, int v) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

// One query's q as A fragments in shared memory, sq[(mt KSTEPS + ks) 32 + lane] = the four registers lane
// passes for head tile mt and k step ks (rows >= Hi zero), so a warp reads a fragment with one conflict-free
// 16-byte load a lane; and sw[h] = w[h] qs[h] (0 for h >= Hi). One entry of sq a thread (THREADS = MT
// KSTEPS 32 when HD_DI = 128; a loop otherwise). Ends with a barrier.
__device__ __forceinline__ void stage_query(uint4* sq, float* sw, const u8* __restrict__ q,
                                            const float* __restrict__ qs, const float* __restrict__ w, int Hi) {
    for (int e = threadIdx.x; e < MT * KSTEPS * 32; e += THREADS) {
        const int lane = e & 31, g = lane >> 2, tig = lane & 3, mt = e / (KSTEPS * 32), ks = (e >> 5) % KSTEPS;
        unsigned a[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int h = mt * 16 + g + 8 * (r & 1);
            a[r] = h < Hi ? ld_u32(q + h * HD_DI + ks * 32 + 4 * tig + 16 * (r >> 1)) : 0u;
        }
        sq[e] = make_uint4(a[0], a[1], a[2], a[3]);
    }
    if (threadIdx.x < 16 * MT) {
        const int h = threadIdx.x;
        sw[h] = h < Hi ? w[h] * qs[h] : 0.0f;
    }
    __syncthreads();
}

// The B fragments of 8 keys (a tile), key g of the tile at `row` (null: a zero key): two 4-byte loads a
// k step, issued together.
__device__ __forceinline__ void load_b(unsigned (&b)[KSTEPS][2], const u8* __restrict__ row) {
    const int tig = threadIdx.x & 3;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
        b[ks][0] = row ? ld_u32(row + ks * 32 + 4 * tig) : 0u;
        b[ks][1] = row ? ld_u32(row + ks * 32 + 16 + 4 * tig) : 0u;
    }
}

// sum_h (w qs)[h] ReLU(q[h] . key) for the 8 keys of a tile (B fragments b). Every lane returns the sums of
// keys 2 tig and 2 tig + 1 (before the key scale).
__device__ __forceinline__ float2 tile_scores(const uint4* sq, const float* sw, const unsigned (&b)[KSTEPS][2]) {
    const int lane = threadIdx.x & 31, g = lane >> 2;
    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const uint4 f = sq[(mt * KSTEPS + ks) * 32 + lane];
            const unsigned a[4] = {f.x, f.y, f.z, f.w};
            mma_e4m3_16832(acc[mt], a, b[ks][0], b[ks][1]);  // hopper.cuh
        }
    float v0 = 0.0f, v1 = 0.0f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const float wlo = sw[mt * 16 + g], whi = sw[mt * 16 + g + 8];
        v0 += wlo * fmaxf(acc[mt][0], 0.0f) + whi * fmaxf(acc[mt][2], 0.0f);
        v1 += wlo * fmaxf(acc[mt][1], 0.0f) + whi * fmaxf(acc[mt][3], 0.0f);
    }
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {  // over g: the lanes holding the other head rows of the same keys
        v0 += __shfl_xor_sync(FULL_MASK, v0, o);
        v1 += __shfl_xor_sync(FULL_MASK, v1, o);
    }
    return make_float2(v0, v1);
}

// Every CTA of the query has arrived (and what each wrote before arriving is visible to global reads
// that bypass L1, __ldcg, after it: thread 0 releases and acquires, the CTA barriers order the rest).
__device__ __forceinline__ void query_barrier(int* counter, int G) {
    __syncthreads();
    if (threadIdx.x == 0) {
        atomic_add_acq_rel(counter, 1);
        while (ld_acquire(counter) < G) asm volatile("nanosleep.u32 32;");
    }
    __syncthreads();
}

// Row [0, N) of scores (fp32 in global memory, written by other CTAs) as this thread's values of
// select_registers (-inf past N); returns J. Every load in flight at once (none waits for another's value),
// from L2, each warp's coalesced.
__device__ __forceinline__ int load_values(float (&v)[PER], const float* row, int N) {
    const int J = (N + 32 * NWARPS - 1) / (32 * NWARPS);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int i = row_index(j, J);
        v[j] = j < J && i < N ? __ldcg(row + i) : NEG_INF;
    }
    return J;
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
hisa_decode_select(const u8* __restrict__ q, const float* __restrict__ qs, const float* __restrict__ w,
                   const u8* __restrict__ pk, const float* __restrict__ pks, int n,
                   const u8* __restrict__ keys, const float* __restrict__ ks, int cap,
                   const int* __restrict__ ends, int Hi, int B, int lgB, int m, int K,
                   float* __restrict__ J, int* __restrict__ kept, float* __restrict__ cand, int* __restrict__ out,
                   int* __restrict__ sync) {
    extern __shared__ int4 smem4[];
    uint4* sq = reinterpret_cast<uint4*>(smem4);
    float* sw = reinterpret_cast<float*>(sq + MT * KSTEPS * 32);
    int* hist = reinterpret_cast<int*>(sw + 16 * MT);
    int* wbuf = hist + NBINS;
    int* misc = wbuf + 64;
    int* s_kept = misc + 16;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const int t = blockIdx.y, G = gridDim.x, cta = blockIdx.x;
    const int mB = m * B;
    const int end = ends[t];
    const int limit = imin(end, cap);                                                // positions < limit are visible
    const int nb_t = imin(n, end > 0 ? (int)((end + (long long)B - 1) / B) : 0);  // blocks the query sees
    const int own = end >= 1 ? (end - 1) / B : -1;
    float* J_t = J + (long long)t * n;
    float* cand_t = cand + (long long)t * mB;
    int par = 0;

    // A. Block scores: CTA cta takes blocks [b0, b1) of the n, 8 a warp tile; the keys of each warp's first
    //    tile are on their way before q is staged.
    const int per = (n + G - 1) / G, b0 = cta * per, b1 = imin(n, b0 + per), bv = imin(b1, nb_t);
    auto block_row = [&](int tile) {  // row g of a tile of blocks, null when not visible (a zero key)
        const int r = b0 + 8 * tile + g;
        return r < bv ? pk + (long long)r * HD_DI : nullptr;
    };
    unsigned b[KSTEPS][2];
    float s0, s1;  // the scales of the two blocks whose scores this lane writes (lanes g == 0)
    auto load_tile = [&](int tile) {  // the key fragments and the scales, all in flight together
        load_b(b, block_row(tile));
        const int c = b0 + 8 * tile + 2 * tig;
        s0 = g == 0 && c < bv ? __ldg(pks + c) : 0.0f;
        s1 = g == 0 && c + 1 < bv ? __ldg(pks + c + 1) : 0.0f;
    };
    load_tile(warp);
    stage_query(sq, sw, q + (long long)t * Hi * HD_DI, qs + (long long)t * Hi, w + (long long)t * Hi, Hi);
    for (int tile = warp; b0 + 8 * tile < b1; tile += NWARPS) {
        const int c0 = b0 + 8 * tile;
        if (tile != warp) load_tile(tile);
        if (c0 < nb_t) {  // warp-uniform: a tile with a visible block runs the MMAs
            const float2 v = tile_scores(sq, sw, b);
            if (g == 0) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = c0 + 2 * tig + e;
                    if (c < b1)
                        J_t[c] = c == 0 || c == own ? POS_INF : c < nb_t ? (e ? s1 : s0) * (e ? v.y : v.x) : NEG_INF;
                }
            }
        } else if (g == 0) {
            for (int c = c0 + 2 * tig; c < imin(b1, c0 + 2 * tig + 2); ++c) J_t[c] = c == 0 || c == own ? POS_INF : NEG_INF;
        }
    }
    query_barrier(sync + 2 * t, G);

    // B. The m best blocks, every CTA alike, ascending into s_kept (CTA 0 also publishes them).
    {
        float vals[PER];
        const int Jn = load_values(vals, J_t, n);
        const int valid = select_registers(vals, Jn, m, hist, wbuf, misc, par,
                                           [&](int slot, int i) { s_kept[slot] = i; });
        for (int i = imin(valid, m) + tid; i < m; i += THREADS) s_kept[i] = -1;
        __syncthreads();
        if (cta == 0)
            for (int i = tid; i < m; i += THREADS) kept[(long long)t * m + i] = s_kept[i];
    }

    // C. Token scores of the kept blocks of rank cta, cta + G, ...
    for (int r = cta; r < m; r += G) {
        const int blk = s_kept[r];
        for (int tile = warp; 8 * tile < B; tile += NWARPS) {
            const int j0 = 8 * tile;
            if (blk >= 0 && (long long)blk * B + j0 < limit) {  // warp-uniform: some slot of the tile is visible
                const long long p = (long long)blk * B + j0 + g, pe = (long long)blk * B + j0 + 2 * tig;
                load_b(b, j0 + g < B && p < limit ? keys + p * HD_DI : nullptr);
                s0 = g == 0 && j0 + 2 * tig < B && pe < limit ? __ldg(ks + pe) : 0.0f;  // with the keys, not after
                s1 = g == 0 && j0 + 2 * tig + 1 < B && pe + 1 < limit ? __ldg(ks + pe + 1) : 0.0f;
                const float2 v = tile_scores(sq, sw, b);
                if (g == 0) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int j = j0 + 2 * tig + e;
                        if (j < B) cand_t[r * B + j] = pe + e < limit ? (e ? s1 : s0) * (e ? v.y : v.x) : NEG_INF;
                    }
                }
            } else if (g == 0) {
                for (int j = j0 + 2 * tig; j < imin(B, j0 + 2 * tig + 2); ++j) cand_t[r * B + j] = NEG_INF;
            }
        }
    }

    // The last CTA of the query to get here has every candidate; the others are done.
    __syncthreads();
    if (tid == 0) misc[3] = atomic_add_acq_rel(sync + 2 * t + 1, 1) == G - 1;
    __syncthreads();
    if (!misc[3]) return;

    // D. Top-K over the candidates, each chosen slot written as its position.
    float vals[PER];
    const int Jc = load_values(vals, cand_t, mB);
    int* out_t = out + (long long)t * K;
    const int valid = select_registers(vals, Jc, K, hist, wbuf, misc, par, [&](int slot, int s) {
        const int r = lgB >= 0 ? s >> lgB : s / B;  // a shift for power-of-two B
        const int blk = s_kept[r];
        const int p = blk * B + (s - r * B);       // < cap < 2^31: a chosen candidate is visible
        out_t[slot] = blk < 0 || p >= end ? -1 : p;
    });
    for (int i = imin(valid, K) + tid; i < K; i += THREADS) out_t[i] = -1;
    if (tid == 0) {  // every CTA of the query has left the barrier (each arrived here after it)
        sync[2 * t] = 0;
        sync[2 * t + 1] = 0;
    }
}
