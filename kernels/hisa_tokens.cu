// HISA token stage (SPEC section 6 step 4): exact DSA scores of every candidate slot of every query,
// plus the two small maps around it (forced blocks before the block top-m, slot -> position after the
// token top-k).
//
//   slot j of query t -> position p = blocks[t, j / B] * B + j % B          (j < m*B)
//   out[t, j] = sum_h w[t,h] * ReLU(qs[t,h] * ks[p] * q[t,h] . k[p])   if blocks[t, j/B] >= 0 and p < ends[t]
//             = -inf                                                     otherwise
// Computed as ks[p] * sum_h (w[t,h] * qs[t,h]) * ReLU(q[t,h] . k[p]) (the scales are positive): the
// dot products on tensor cores, ReLU, weights and the head sum in registers.
//
// Compile-time configuration (-D, picked by the launcher in hisa_tokens.py):
//   HT_FP8     1: q, keys are e4m3 bits; 0: bf16 bits (no scales)
//   HT_DI      indexer head dim Di (row bytes Di or 2*Di must be a multiple of 32)
//   HT_MT      mma.sync kernel: head tiles of 16 (1, 2 or 4: Hi <= 16, 32, 64)
//   HT_STAGES  mma.sync kernel: cp.async pipeline depth (2 or 3)
//   HT_WSTAGES wgmma kernel: cp.async pipeline depth (2 .. 8)
//   HT_BSTAGES block-major kernel: q ring depth (2 .. 8)
//   HT_QCH     block-major kernel: most queries an item (a CTA) takes
//
// Arguments of the two query-major score kernels (1 and 2):
//   q       [T, Hi, Di]  e4m3 bits (uint8) or bf16 bits (uint16), base 16-byte aligned
//   qscale  float [T, Hi] (fp8 only; any valid pointer otherwise)
//   w       float [T, Hi]
//   keys    [cap, Di]    same element type as q, base 16-byte aligned
//   kscale  float [cap]  (fp8 only; any valid pointer otherwise)
//   blocks  int [T, m]   kept block ids, -1 = padding
//   ends    int [T]      positions >= ends[t] are out of range (-inf); positions >= cap are treated as
//                        out of range as well, so a bad end cannot fault
//   out     float [T, m*B], every element written
//   slots_per_cta        CTA (t, s) scores slots [s*slots_per_cta, min((s+1)*slots_per_cta, m*B)) of query t
//
// 1. hisa_token_scores_wgmma (sm_90a only; traps elsewhere): Hopper warpgroup MMA at the real fp8 rate.
//    Row bytes DB = 64, 128 or 256 (fp8 Di 64/128/256, bf16 Di 32/64/128), Hi <= 64.
//    Extra arguments: lgB = log2(B) when B is a power of two, else -1 (a shift instead of a division per
//    gathered row); smem_bytes = the dynamic shared memory given (the kernel traps if it is too small).
//    Launch: grid (T, nsplit), 256 threads (2 warpgroups), launch bounds for 2 CTAs an SM, dynamic shared
//    memory 64*DB + HT_WSTAGES*(128*DB + 1024) + 4*(WG_MAXT + 1) + 1024 bytes (hisa_tokens.py
//    wgmma_smem). Per CTA:
//      a. q rows of query t -> a [64 x DB] shared tile (rows >= Hi zero), the B operand of every MMA;
//         each thread keeps the 16 weights w*qs of its accumulator columns in registers;
//      b. warp 0 lists the CTA's live 128-slot tiles (some slot visible) and writes -inf over the dead
//         ones (padding blocks, blocks past ends[t]) without gathering anything;
//      c. a HT_WSTAGES-deep cp.async ring gathers the live tiles: 128 key rows (16-byte chunks, zero-filled
//         for invalid slots; for B = 128 a tile is one block, 16 KB of contiguous memory), written with
//         the 128-byte (64-byte when DB = 64) swizzle that wgmma reads, plus each row's position and k scale;
//      d. warpgroup g: D[64 keys x 64 heads] = keys[64g .. 64g+63] . q^T, m64n64k32 e4m3 (k16 bf16),
//         DB/32 steps; every warp owns 16 whole key rows, so the head sum is 16 FMAs a row in registers
//         plus 2 quad shuffles, no cross-warp reduction; times ks, -inf where invalid, streamed out.
//         fp8: Hopper's e4m3 wgmma accumulates with about 13 bits (the whole Di in one accumulation, as in
//         kernels/indexer.cu), so a score is exact to about 1e-5 of
//         sum_h |w qs| sum_i |q k| ks, not of the score itself: a score that cancels (0.0085 out of terms
//         adding up to 25 in magnitude) may be 10-30% off. The tests bound the error by that sum.
//    Preconditions (checked by the launcher): slots_per_cta a multiple of 128 and <= 128*WG_MAXT, Hi <= 64,
//    arrays C-contiguous.
// 2. hisa_token_scores (mma.sync, any sm_89+; the fallback for other row sizes or GPUs): fp8 as
//    mma.m16n8k32 e4m3 (Hopper runs it as converted f16 MMAs, several times slower than wgmma), bf16 as
//    mma.m16n8k16. Launch: grid (T, nsplit), 128 threads (4 warps, launch bounds for 5 CTAs an SM), static
//    shared memory. NT = 64 slots a tile gathered with 16-byte cp.async, HT_STAGES tiles in flight. Warp
//    (mw, nw): head tile mw (q fragments in registers), keys nw*KPW ... of each tile; heads reduced by
//    warp shuffles, head tiles through shared memory; one thread per slot writes the score.
//    Preconditions (checked by the launcher): Hi <= 16*HT_MT, slots_per_cta a multiple of 64.
//
// 3. slots_to_positions(slots int [T, K], blocks int [T, m], ends int [T], out int [T, K], n = T*K, K, m, B,
//    use_ends): out = blocks[t, s / B] * B + s % B for slot s = slots[t, i]; -1 when s < 0, s >= m*B, the
//    block is -1, or (use_ends) the position is >= ends[t]. One thread per element, any 1-D launch
//    covering n (n < 2^31).
// 4. force_blocks(J float [T, nb], ends int [T], T, nb, B): in place, J[t, 0] = +inf and
//    J[t, (ends[t] - 1) / B] = +inf (skipped when ends[t] < 1 or the block is >= nb). One thread per query.
// 5. hisa_token_scores_blocks (sm_90a, B = 128 only): the same scores computed block-major. Random queries
//    keep different blocks, so the query-major kernels gather each query's 8192 keys for that query's 64
//    heads alone. Here a CTA takes one kept block (128 keys, loaded once) and the queries that kept it, two at
//    a time: D[128 keys x 128 columns] = keys . [q of query 2u; q of query 2u+1]^T (m64n128 a warpgroup), so
//    every gathered byte (the two queries' q rows) feeds 128 keys. Its inputs come from the two kernels
//    below: items and pairs (the bucketing) and each query's q image and head weights (prepare_chunk), which
//    thread 0 fetches with one bulk copy (TMA, no tensor map) each into an HT_BSTAGES ring of mbarrier-
//    guarded stages. No CTA-wide barrier a unit: warps wait on a stage's full barrier and arrive on its
//    empty barrier; thread 0 refills a stage once all 8 warps are done with it. The epilogue sums heads
//    exactly as kernel 1 does (same heads on the same lanes, same products), so the two give the same bits.
//    Launch: grid = an upper bound on the items (CTAs past n_items[0] return), 256 threads, dynamic shared
//    memory hisa_tokens.py blocks_smem. Items of the dead bucket only write -inf.
// 6. hisa_bucket_count, hisa_bucket_scatter: the (query, block) pairs bucketed by block, and (the scatter's
//    second job) q rows as wgmma-ready images for the bulk copies of kernel 5 (see there).
//
// NVRTC-compatible: no #include, no std::, extern "C" entry points. The cp.async, swizzle and wgmma helpers
// come from kernels/hopper.cuh: nvcc finds it beside this file; for NVRTC kernels/_cuda.py:source pastes
// it in place of the #include:
#include "hopper.cuh"

#ifndef HT_FP8
#define HT_FP8 1
#endif
#ifndef HT_DI
#define HT_DI 128
#endif
#ifndef HT_MT
#define HT_MT 4
#endif
#ifndef HT_STAGES
#define HT_STAGES 3
#endif
#ifndef HT_WSTAGES
#define HT_WSTAGES 5
#endif
#ifndef HT_BSTAGES
#define HT_BSTAGES 4
#endif
#ifndef HT_QCH
#define HT_QCH 32
#endif

#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)
#define FULL_MASK 0xffffffffu

constexpr int ROWB = HT_FP8 ? HT_DI : 2 * HT_DI;  // bytes of one q or key row
constexpr int KSTEPS = ROWB / 32;                   // one mma consumes 32 bytes of K (k32 e4m3, k16 bf16)
constexpr int RSW = ROWB / 4 + 4;                   // smem row stride in 32-bit words; +4 makes fragment loads
                                                    // conflict-free (RSW % 32 is 4 or 20)
constexpr int NT = 64;                              // slots per tile
constexpr int NTHREADS = 128;
constexpr int NWARPS = NTHREADS / 32;
constexpr int NW = NWARPS / HT_MT;                  // warps sharing a head tile, splitting the tile's keys
constexpr int KPW = NT / NW;                        // keys per warp per tile
constexpr int NTILE_N = KPW / 8;                    // mma n-tiles (8 keys) per warp per tile
constexpr int CPR = ROWB / 16;                      // 16-byte chunks per row
static_assert(ROWB % 32 == 0, "row bytes must be a multiple of 32");
static_assert(HT_MT == 1 || HT_MT == 2 || HT_MT == 4, "HT_MT must be 1, 2 or 4");
static_assert(NW * HT_MT == NWARPS && NTILE_N * 8 * NW == NT, "tile split");

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------------
// mma.sync kernel

// D += A * B for one 16x8 tile and 32 bytes of K (e4m3: hopper.cuh's mma_e4m3_16832; bf16: m16n8k16). A: rows
// g, g+8 (a0/a2: row g, a1/a3: row g+8; a0/a1 bytes 4*tig.., a2/a3 bytes 16+4*tig..); B: key g, bytes 4*tig..
// (b0) and 16+4*tig.. (b1); D: c0,c1 = (row g, keys 2*tig, 2*tig+1), c2,c3 = (row g+8, same keys).
__device__ __forceinline__ void mma32(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
#if HT_FP8
    mma_e4m3_16832(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Position of slot j, or -1 when the slot is padding or out of range.
__device__ __forceinline__ int slot_position(const int* __restrict__ blk_t, int j, int B, int limit) {
    const int bi = j / B;
    const int b = blk_t[bi];
    if (b < 0) return -1;
    const long long p = (long long)b * B + (j - bi * B);
    return p < limit ? (int)p : -1;
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 5)
hisa_token_scores(const unsigned char* __restrict__ q, const float* __restrict__ qscale,
                  const float* __restrict__ w, const unsigned char* __restrict__ keys,
                  const float* __restrict__ kscale, const int* __restrict__ blocks,
                  const int* __restrict__ ends, float* __restrict__ out,
                  int Hi, int m, int B, int cap, int slots_per_cta) {
    __shared__ __align__(16) unsigned int s_keys[HT_STAGES][NT * RSW];
    __shared__ float s_red[HT_MT][NT];

    const int t = blockIdx.x;
    const int mB = m * B;
    const int j_begin = blockIdx.y * slots_per_cta;
    const int j_end = imin(mB, j_begin + slots_per_cta);
    if (j_begin >= j_end) return;  // uniform over the CTA
    const int ntiles = (j_end - j_begin + NT - 1) / NT;
    const int limit = imin(ends[t], cap);
    const int* blk_t = blocks + (long long)t * m;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int mw = warp % HT_MT, nw = warp / HT_MT;

    // q fragments of this warp's 16 heads, all of K, kept in registers; padded heads are zero.
    unsigned int a[KSTEPS][4];
    const unsigned char* q_t = q + (long long)t * Hi * ROWB;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int h = mw * 16 + g + 8 * (r & 1);
            const int word = ks * 8 + tig + 4 * (r >> 1);
            a[ks][r] = h < Hi ? *reinterpret_cast<const unsigned int*>(q_t + h * ROWB + word * 4) : 0u;
        }
    // Head weights of rows g and g+8 (q scale folded in); zero for padded heads.
    float w_lo = 0.0f, w_hi = 0.0f;
    {
        const int h0 = mw * 16 + g, h1 = h0 + 8;
        const long long base = (long long)t * Hi;
        if (h0 < Hi) w_lo = w[base + h0] * (HT_FP8 ? qscale[base + h0] : 1.0f);
        if (h1 < Hi) w_hi = w[base + h1] * (HT_FP8 ? qscale[base + h1] : 1.0f);
    }

    auto load_tile = [&](int stage, int tile) {
        const int j0 = j_begin + tile * NT;
        for (int i = tid; i < NT * CPR; i += NTHREADS) {
            const int r = i / CPR, c = i % CPR;
            const int j = j0 + r;
            const int p = j < j_end ? slot_position(blk_t, j, B, limit) : -1;
            const unsigned char* src = p >= 0 ? keys + (long long)p * ROWB + c * 16 : keys;
            cp_async16(smem_addr(&s_keys[stage][r * RSW + c * 4]), src, p >= 0 ? 16 : 0);  // 0: zero-fill
        }
    };

#pragma unroll
    for (int s = 0; s < HT_STAGES - 1; ++s) {
        if (s < ntiles) load_tile(s, s);
        cp_async_commit();  // empty groups keep the count uniform
    }

    for (int it = 0; it < ntiles; ++it) {
        cp_async_wait<HT_STAGES - 2>();
        __syncthreads();  // tile `it` is in smem for everyone; tile it-1's stage is free again
        {
            const int nxt = it + HT_STAGES - 1;
            if (nxt < ntiles) load_tile(nxt % HT_STAGES, nxt);
            cp_async_commit();
        }

        const unsigned int* sk = s_keys[it % HT_STAGES];
        float acc[NTILE_N][4];
#pragma unroll
        for (int n = 0; n < NTILE_N; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks)
#pragma unroll
            for (int n = 0; n < NTILE_N; ++n) {
                const unsigned int* row = sk + (nw * KPW + n * 8 + g) * RSW + ks * 8 + tig;
                mma32(acc[n], a[ks], row[0], row[4]);
            }

        // ReLU, head weights, sum over this warp's 16 heads (lanes sharing tig hold the same two keys).
#pragma unroll
        for (int n = 0; n < NTILE_N; ++n) {
            float v0 = w_lo * fmaxf(acc[n][0], 0.0f) + w_hi * fmaxf(acc[n][2], 0.0f);
            float v1 = w_lo * fmaxf(acc[n][1], 0.0f) + w_hi * fmaxf(acc[n][3], 0.0f);
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) {
                v0 += __shfl_xor_sync(0xffffffffu, v0, o);
                v1 += __shfl_xor_sync(0xffffffffu, v1, o);
            }
            if (g == 0) {
                const int col = nw * KPW + n * 8 + 2 * tig;
                s_red[mw][col] = v0;
                s_red[mw][col + 1] = v1;
            }
        }
        __syncthreads();

        if (tid < NT) {
            const int j = j_begin + it * NT + tid;
            if (j < j_end) {
                const int p = slot_position(blk_t, j, B, limit);
                float s = s_red[0][tid];
#pragma unroll
                for (int i = 1; i < HT_MT; ++i) s += s_red[i][tid];
#if HT_FP8
                if (p >= 0) s *= kscale[p];
#endif
                out[(long long)t * mB + j] = p >= 0 ? s : __int_as_float(0xff800000);  // -inf
            }
        }
    }
    cp_async_wait<0>();  // nothing should be in flight at exit (only empty groups remain)
}

// ---------------------------------------------------------------------------------------------------
// wgmma kernel (sm_90a)

constexpr int WG_NTH = 256;   // threads: 2 warpgroups

// The row sizes the swizzled layouts below handle.
#if (HT_FP8 && (HT_DI == 64 || HT_DI == 128 || HT_DI == 256)) || (!HT_FP8 && (HT_DI == 32 || HT_DI == 64 || HT_DI == 128))
#define HT_WGMMA_ROWS 1
#else
#define HT_WGMMA_ROWS 0
#endif

extern __shared__ __align__(1024) u8 smem_raw[];

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && HT_WGMMA_ROWS

constexpr int WG_NT = 128;    // slots per tile: 2 warpgroups x 64 key rows
constexpr int WG_NH = 64;     // head columns of every MMA (Hi <= 64; missing heads are zero rows of q)
constexpr int WG_MAXT = 256;  // tiles a CTA can list (slots_per_cta <= 128 * WG_MAXT)

// The tile layouts, descriptors and MMAs (hopper.cuh) are those of kernels/indexer.cu's wgmma path: its
// "_decode" configuration is this one (128-key tiles, 64 columns, one warpgroup per 64 keys).

// Position of slot j (< m*B), or -1 when its block is padding or the position is >= limit.
__device__ __forceinline__ int slot_pos(const int* __restrict__ blk_t, int j, int B, int lgB, int limit) {
    const int bi = lgB >= 0 ? j >> lgB : j / B;
    const int b = blk_t[bi];
    if (b < 0) return -1;
    const long long p = (long long)b * B + (j - bi * B);
    return p < limit ? (int)p : -1;
}

// Tile [j0, j1) of slots holds a visible one: some block it touches is kept and the tile's first slot
// in that block (the block's smallest position inside the tile) is < limit.
__device__ __forceinline__ bool tile_live(const int* __restrict__ blk_t, int j0, int j1, int B, int limit) {
    for (int bi = j0 / B; (long long)bi * B < j1; ++bi) {
        const int b = blk_t[bi];
        const int first = j0 > bi * B ? j0 - bi * B : 0;  // 0 when block bi starts inside the tile
        if (b >= 0 && (long long)b * B + first < limit) return true;
    }
    return false;
}

template <int DB, int S>
__device__ __forceinline__ void wgmma_body(const u8* __restrict__ q, const float* __restrict__ qscale,
                                           const float* __restrict__ w, const u8* __restrict__ keys,
                                           const float* __restrict__ kscale, const int* __restrict__ blocks,
                                           const int* __restrict__ ends, float* __restrict__ out, int Hi, int m,
                                           int B, int lgB, int cap, int slots_per_cta, int smem_bytes) {
    static_assert(DB == 64 || DB == 128 || DB == 256, "wgmma rows are 64, 128 or 256 bytes");
    static_assert(S >= 2 && S <= 8, "HT_WSTAGES must be 2 .. 8");
    constexpr int CPR_ = DB / 16;                  // 16-byte chunks a row
    constexpr int CH_PER_THREAD = WG_NT * CPR_ / WG_NTH;
    static_assert(CH_PER_THREAD * WG_NTH == WG_NT * CPR_, "chunks split evenly over the threads");
    constexpr int Q_BYTES = WG_NH * DB;            // multiples of 1024: the swizzle atoms stay aligned
    constexpr int K_BYTES = WG_NT * DB;
    constexpr int OFF_K = Q_BYTES;
    constexpr int OFF_KS = OFF_K + S * K_BYTES;    // float [S][128]: k scale of each row
    constexpr int OFF_POS = OFF_KS + S * WG_NT * 4; // int [S][128]: position of each row, -1 invalid
    constexpr int OFF_LIST = OFF_POS + S * WG_NT * 4; // int [WG_MAXT]: live tiles, then their count
    constexpr int SMEM = OFF_LIST + (WG_MAXT + 1) * 4 + 1024;  // + worst-case alignment of the base
    if (smem_bytes < SMEM) trap();

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = tid >> 7, wv = warp & 3;
    const u32 raw = smem_addr(smem_raw);
    const u32 pad = (1024 - (raw & 1023)) & 1023;
    u8* sm = smem_raw + pad;
    const u32 base = raw + pad;
    float* s_ks = reinterpret_cast<float*>(sm + OFF_KS);
    int* s_pos = reinterpret_cast<int*>(sm + OFF_POS);
    int* s_list = reinterpret_cast<int*>(sm + OFF_LIST);

    const int t = blockIdx.x;
    const int mB = m * B;
    const int j_begin = blockIdx.y * slots_per_cta;
    const int j_end = min(mB, j_begin + slots_per_cta);
    if (j_begin >= j_end) return;  // uniform over the CTA
    const int ntiles = (j_end - j_begin + WG_NT - 1) / WG_NT;
    if (ntiles > WG_MAXT) trap();  // the launcher keeps slots_per_cta <= 128 * WG_MAXT
    const int limit = min(ends[t], cap);
    const int* blk_t = blocks + (long long)t * m;
    float* out_t = out + (long long)t * mB;

    // a. q rows of query t (rows >= Hi zero): cp.async group 0, together with the first key tile.
    {
        const u8* q_t = q + (long long)t * Hi * DB;
        for (int i = tid; i < WG_NH * CPR_; i += WG_NTH) {
            const int r = i / CPR_, x = i % CPR_;
            const bool ok = r < Hi;
            cp_async16(base + tile_off<DB, WG_NH>(r, x), q_t + (ok ? r : 0) * DB + x * 16, ok ? 16 : 0);
        }
    }
    // This thread's accumulator columns are heads 8j + 2(lane%4) + {0,1}: their weights w * qs.
    float wr[8][2];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int h = 8 * j + 2 * (lane & 3) + e;
            float v = 0.0f;
            if (h < Hi) {
                v = w[(long long)t * Hi + h];
                if (HT_FP8) v *= qscale[(long long)t * Hi + h];
            }
            wr[j][e] = v;
        }

    // b. Live tiles into s_list (in order), -inf over the dead ones.
    if (warp == 0) {
        int n_live = 0;
        for (int c0 = 0; c0 < ntiles; c0 += 32) {
            const int n = c0 + lane;
            bool live = false;
            if (n < ntiles) live = tile_live(blk_t, j_begin + n * WG_NT, min(j_begin + (n + 1) * WG_NT, j_end), B, limit);
            const u32 live_mask = __ballot_sync(FULL_MASK, live);
            if (live) s_list[n_live + __popc(live_mask & ((1u << lane) - 1u))] = n;
            n_live += __popc(live_mask);
            u32 dead = __ballot_sync(FULL_MASK, n < ntiles && !live);
            while (dead) {
                const int d = __ffs(dead) - 1;
                dead &= dead - 1;
                const int d0 = j_begin + (c0 + d) * WG_NT, d1 = min(d0 + WG_NT, j_end);
                for (int j = d0 + lane; j < d1; j += 32) st_stream(out_t + j, NEG_INF);
            }
        }
        if (lane == 0) s_list[WG_MAXT] = n_live;
    }
    __syncthreads();
    const int n_live = s_list[WG_MAXT];

    // c. Gather live tile n into stage `stage`: key rows (swizzled), their positions and k scales.
    auto load_tile = [&](int stage, int n) {
        const int j0 = j_begin + s_list[n] * WG_NT;
        const u32 dst = base + OFF_K + stage * K_BYTES;
#pragma unroll
        for (int k = 0; k < CH_PER_THREAD; ++k) {
            const int i = tid + k * WG_NTH;
            const int r = i / CPR_, x = i % CPR_;  // consecutive threads: consecutive chunks of a row
            const int j = j0 + r;
            const int p = j < j_end ? slot_pos(blk_t, j, B, lgB, limit) : -1;
            cp_async16(dst + tile_off<DB, WG_NT>(r, x), keys + (p >= 0 ? (long long)p * DB + x * 16 : 0),
                       p >= 0 ? 16 : 0);
            if (x == 0) {
                s_pos[stage * WG_NT + r] = p;
                if (HT_FP8) cp_async4(base + OFF_KS + (stage * WG_NT + r) * 4, kscale + (p >= 0 ? p : 0),
                                      p >= 0 ? 4 : 0);
            }
        }
    };

#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < n_live) load_tile(s, s);
        cp_async_commit();  // empty groups keep the count uniform
    }

    const int row = wg * 64 + wv * 16 + (lane >> 2);  // this thread's first key row of a tile; second: +8
    const int my_row = row + 8 * (lane & 1);          // written by lane%4 = 0 (row) and 1 (row + 8)
    float acc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = 0.0f;

    for (int it = 0; it < n_live; ++it) {
        cp_async_wait<S - 2>();
        fence_proxy_async();
        __syncthreads();  // tile it landed for all; tile it-1's stage is free again
        if (it + S - 1 < n_live) load_tile((it + S - 1) % S, it + S - 1);
        cp_async_commit();

        // d. D[64 keys x 64 heads] of this warpgroup's half of the tile.
        const int stage = it % S;
        wgmma_rows<HT_FP8 != 0, DB, WG_NT, WG_NH, WG_NH>(acc, base + OFF_K + stage * K_BYTES, wg * 64, base);
        wgmma_wait0();
        fence_regs<32>(acc);

        // sum_h w ReLU(logit) for rows `row` (lo) and `row + 8` (hi): 16 columns here, 4 lanes a row.
        float lo = 0.0f, hi = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            lo = fmaf(wr[j][0], fmaxf(acc[4 * j + 0], 0.0f), lo);
            lo = fmaf(wr[j][1], fmaxf(acc[4 * j + 1], 0.0f), lo);
            hi = fmaf(wr[j][0], fmaxf(acc[4 * j + 2], 0.0f), hi);
            hi = fmaf(wr[j][1], fmaxf(acc[4 * j + 3], 0.0f), hi);
        }
        lo += __shfl_xor_sync(FULL_MASK, lo, 1);
        hi += __shfl_xor_sync(FULL_MASK, hi, 1);
        lo += __shfl_xor_sync(FULL_MASK, lo, 2);
        hi += __shfl_xor_sync(FULL_MASK, hi, 2);
        if ((lane & 3) < 2) {
            const int j = j_begin + s_list[it] * WG_NT + my_row;
            if (j < j_end) {
                const int p = s_pos[stage * WG_NT + my_row];
                float v = (lane & 1) ? hi : lo;
                if (HT_FP8) v *= s_ks[stage * WG_NT + my_row];
                st_stream(out_t + j, p >= 0 ? v : NEG_INF);
            }
        }
    }
    cp_async_wait<0>();  // nothing in flight at exit (q when no tile was live; else only empty groups)
}


// ---------------------------------------------------------------------------------------------------
// Block-major wgmma kernel (sm_90a, B = 128): one CTA a (kept block, up to qch queries that kept it) item

constexpr int BM_B = 128;        // block size this kernel serves: one block = one 128-row key tile
constexpr int BM_QG = 2;         // queries a unit: the MMA's n = 64 * BM_QG columns (q rows of 2 queries)
constexpr int BM_NCOL = 64 * BM_QG;
constexpr int BM_QCH = HT_QCH;   // most queries an item holds (hisa_tokens.py BLOCK_QCH)

template <int DB, int S>
__device__ __forceinline__ void blocks_body(const u8* __restrict__ q_sw, const float* __restrict__ wq,
                                            const u8* __restrict__ keys, const float* __restrict__ kscale,
                                            const int* __restrict__ ends, float* __restrict__ out,
                                            const int* __restrict__ pairs, const int4* __restrict__ items,
                                            const int* __restrict__ n_items, int m, int cap, int smem_bytes) {
    static_assert(DB == 64 || DB == 128 || DB == 256, "wgmma rows are 64, 128 or 256 bytes");
    static_assert(S >= 2 && S <= 8, "HT_BSTAGES must be 2 .. 8");
    static_assert(BM_QG == 2, "a unit is two queries");
    constexpr int CPR_ = DB / 16;                      // 16-byte chunks a row
    constexpr int K_BYTES = BM_B * DB;                 // the block's key tile (multiples of 1024 bytes)
    constexpr int Q_BYTES = BM_NCOL * DB;              // one unit's q tile: two queries' images
    constexpr int IMG = 64 * DB;                       // one query's image (prepare_chunk)
    constexpr int CB = DB >= 128 ? 128 : DB;           // bytes of a row in one swizzle column block
    constexpr int PIECES = DB / CB;                    // bulk copies an image: one per column block
    constexpr int KCH = BM_B * CPR_ / WG_NTH;          // 16-byte chunks a thread, key tile
    static_assert(KCH * WG_NTH == BM_B * CPR_, "chunks split evenly");
    constexpr int OFF_Q = K_BYTES;
    constexpr int OFF_KS = OFF_Q + S * Q_BYTES;        // float [128]: k scale of each key row
    constexpr int OFF_W = OFF_KS + BM_B * 4;           // float [S][BM_NCOL]: w * q scale of each column
    constexpr int OFF_META = OFF_W + S * BM_NCOL * 4;  // int [BM_QCH][4]: t, first slot, limit, - a query
    constexpr int OFF_BAR = OFF_META + BM_QCH * 16;    // u64 [S] full: unit landed (transaction count);
                                                       // u64 [S] empty: its 8 warps are done with it
    constexpr int SMEM = OFF_BAR + 2 * S * 8 + 1024;   // + worst-case alignment of the base
    if (smem_bytes < SMEM) trap();

    const int item = blockIdx.x;
    if (item >= *n_items) return;  // the grid is an upper bound on the item count
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = tid >> 7, wv = warp & 3;
    const int mB = m * BM_B;
    const int4 it = items[item];
    const int b = it.x, p0 = it.y, cnt = it.z;
    if (cnt > BM_QCH) trap();  // the launcher's BLOCK_QCH is this file's BM_QCH

    if (b < 0) {  // the dead item: its pairs see nothing of their block (padding, past ends or cap): -inf
        for (int i = tid; i < cnt * BM_B; i += WG_NTH) {
            const int e = pairs[p0 + i / BM_B];
            const int t = e / m;
            st_stream(out + (long long)t * mB + (long long)(e - t * m) * BM_B + i % BM_B, NEG_INF);
        }
        return;
    }

    const u32 raw = smem_addr(smem_raw);
    const u32 pad = (1024 - (raw & 1023)) & 1023;
    u8* sm = smem_raw + pad;
    const u32 base = raw + pad;
    const float* s_ks = reinterpret_cast<const float*>(sm + OFF_KS);
    const float* s_w = reinterpret_cast<const float*>(sm + OFF_W);
    int* s_meta = reinterpret_cast<int*>(sm + OFF_META);
    const u32 full = base + OFF_BAR, empty = full + 8 * S;

    // Each query of the item: (t, its first slot of this block, its limit), read once.
    if (tid < cnt) {
        const int e = pairs[p0 + tid];
        const int t = e / m;
        s_meta[4 * tid] = t;
        s_meta[4 * tid + 1] = (e - t * m) * BM_B;
        s_meta[4 * tid + 2] = min(ends[t], cap);
    }
    if (tid == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(full + 8 * s, 1);              // the producer's expect_tx arrival (+ the bytes)
            mbar_init(empty + 8 * s, WG_NTH / 32);   // one arrival a warp
        }
        mbar_init_fence();
    }
    __syncthreads();

    // The block's 128 key rows (positions >= cap zero) and their k scales: cp.async by every thread, once.
#pragma unroll
    for (int k = 0; k < KCH; ++k) {
        const int i = tid + k * WG_NTH;
        const int r = i / CPR_, x = i % CPR_;
        const long long p = (long long)b * BM_B + r;
        const bool ok = p < cap;
        cp_async16(base + tile_off<DB, BM_B>(r, x), keys + (ok ? p * DB + x * 16 : 0), ok ? 16 : 0);
        if (HT_FP8 && x == 0) cp_async4(base + OFF_KS + r * 4, kscale + (ok ? p : 0), ok ? 4 : 0);
    }
    // Unit u (thread 0): the pre-swizzled images and head weights of the item's queries 2u and 2u+1, by bulk
    // copies on the stage's barrier. A missing second query is not copied: its columns hold stale data that
    // only its own (unwritten) scores would read.
    auto load_unit = [&](int stage, int u) {
        const int ng = min(BM_QG, cnt - u * BM_QG);
        const u32 bs = full + 8 * stage;
        mbar_arrive_expect_tx(bs, ng * (IMG + 64 * 4));
        for (int g = 0; g < ng; ++g) {
            const long long t = s_meta[4 * (u * BM_QG + g)];
#pragma unroll
            for (int c = 0; c < PIECES; ++c)
                bulk_copy_g2s(base + OFF_Q + stage * Q_BYTES + c * (BM_NCOL * CB) + g * (64 * CB),
                              q_sw + t * IMG + c * (64 * CB), 64 * CB, bs);
            bulk_copy_g2s(base + OFF_W + (stage * BM_NCOL + 64 * g) * 4, wq + t * 64, 64 * 4, bs);
        }
    };

    const int units = (cnt + BM_QG - 1) / BM_QG;
    if (tid == 0)
        for (int s = 0; s < S && s < units; ++s) load_unit(s, s);
    cp_async_wait_all();
    fence_proxy_async();  // the key tile (cp.async, generic proxy) is read by wgmma after the barrier
    __syncthreads();

    const int row = wg * 64 + wv * 16 + (lane >> 2);  // this thread's first key row; second: +8
    const int my_row = row + 8 * (lane & 1);          // written by lane%4 = 0 (row) and 1 (row + 8)
    const long long my_pos = (long long)b * BM_B + my_row;
    float acc[2 * BM_NCOL / 4];
#pragma unroll
    for (int i = 0; i < 2 * BM_NCOL / 4; ++i) acc[i] = 0.0f;

    // No CTA-wide barrier a unit: warps wait for their unit's data (full), thread 0 waits until every warp
    // is done with a stage (empty) before refilling it, so the two warpgroups' MMAs and epilogues interleave.
    for (int u = 0; u < units; ++u) {
        const int stage = u % S;
        mbar_wait(full + 8 * stage, (u / S) & 1);  // unit u landed

        // D[64 keys x 128 columns] of this warpgroup's half of the block: columns 64g + h = head h of query g.
        wgmma_rows<HT_FP8 != 0, DB, BM_B, BM_NCOL, BM_NCOL>(acc, base, wg * 64, base + OFF_Q + stage * Q_BYTES);
        if (tid == 0 && u >= 1 && u - 1 + S < units) {  // while the MMA runs: unit u-1's stage <- unit u-1+S
            const int prev = (u - 1) % S;
            mbar_wait(empty + 8 * prev, ((u - 1) / S) & 1);
            fence_proxy_async();  // the warps' reads of it before the bulk copies overwrite it
            load_unit(prev, u - 1 + S);
        }
        wgmma_wait0();
        fence_regs<2 * BM_NCOL / 4>(acc);

        // Per query g: sum_h w ReLU(logit) for rows `row` (lo) and `row + 8` (hi), in wgmma_body's order (the
        // same heads on the same lanes, the same w * q scale products), so both kernels give the same bits.
        const float* ws = s_w + stage * BM_NCOL;
#pragma unroll
        for (int g = 0; g < BM_QG; ++g) {
            if (u * BM_QG + g >= cnt) continue;  // the missing second query of an odd item (uniform)
            const int* meta = s_meta + 4 * (u * BM_QG + g);
            const int t = meta[0];
            float lo = 0.0f, hi = 0.0f;
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) {
                const int j = 8 * g + jj;
                const float2 w2 = *reinterpret_cast<const float2*>(ws + 64 * g + 8 * jj + 2 * (lane & 3));
                lo = fmaf(w2.x, fmaxf(acc[4 * j + 0], 0.0f), lo);
                lo = fmaf(w2.y, fmaxf(acc[4 * j + 1], 0.0f), lo);
                hi = fmaf(w2.x, fmaxf(acc[4 * j + 2], 0.0f), hi);
                hi = fmaf(w2.y, fmaxf(acc[4 * j + 3], 0.0f), hi);
            }
            lo += __shfl_xor_sync(FULL_MASK, lo, 1);
            hi += __shfl_xor_sync(FULL_MASK, hi, 1);
            lo += __shfl_xor_sync(FULL_MASK, lo, 2);
            hi += __shfl_xor_sync(FULL_MASK, hi, 2);
            if ((lane & 3) < 2) {
                float v = (lane & 1) ? hi : lo;
                if (HT_FP8) v *= s_ks[my_row];
                st_stream(out + (long long)t * mB + meta[1] + my_row, my_pos < meta[2] ? v : NEG_INF);
            }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + 8 * stage);  // this warp is done with unit u's stage
    }
}

#endif  // sm_90a and a supported row size

extern "C" __global__ void __launch_bounds__(WG_NTH, 2)
hisa_token_scores_wgmma(const u8* __restrict__ q, const float* __restrict__ qscale, const float* __restrict__ w,
                        const u8* __restrict__ keys, const float* __restrict__ kscale,
                        const int* __restrict__ blocks, const int* __restrict__ ends, float* __restrict__ out,
                        int Hi, int m, int B, int lgB, int cap, int slots_per_cta, int smem_bytes) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && HT_WGMMA_ROWS
    wgmma_body<ROWB, HT_WSTAGES>(q, qscale, w, keys, kscale, blocks, ends, out, Hi, m, B, lgB, cap, slots_per_cta,
                                 smem_bytes);
#else
    trap();  // wgmma needs sm_90a and a 64/128/256-byte row: launching it otherwise is a launcher bug
#endif
}

// Two CTAs an SM (128 registers a thread) for rows up to 128 bytes; 256-byte rows need more registers.
extern "C" __global__ void __launch_bounds__(WG_NTH, ROWB > 128 ? 1 : 2)
hisa_token_scores_blocks(const u8* __restrict__ q_sw, const float* __restrict__ wq, const u8* __restrict__ keys,
                         const float* __restrict__ kscale, const int* __restrict__ ends, float* __restrict__ out,
                         const int* __restrict__ pairs, const int4* __restrict__ items,
                         const int* __restrict__ n_items, int m, int cap, int smem_bytes) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && HT_WGMMA_ROWS
    blocks_body<ROWB, HT_BSTAGES>(q_sw, wq, keys, kscale, ends, out, pairs, items, n_items, m, cap, smem_bytes);
#else
    trap();  // wgmma needs sm_90a and a 64/128/256-byte row: launching it otherwise is a launcher bug
#endif
}

// ---------------------------------------------------------------------------------------------------
// The maps around the token stage

extern "C" __global__ void slots_to_positions(const int* __restrict__ slots, const int* __restrict__ blocks,
                                              const int* __restrict__ ends, int* __restrict__ out, int n, int K,
                                              int m, int B, int use_ends) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int t = i / K;
    const int s = slots[i];
    int pos = -1;
    if (s >= 0) {
        const int bi = s / B;
        if (bi < m) {
            const int b = blocks[(long long)t * m + bi];
            if (b >= 0) {
                const long long p = (long long)b * B + (s - bi * B);
                if (p < 0x7fffffffLL && (!use_ends || p < ends[t])) pos = (int)p;
            }
        }
    }
    out[i] = pos;
}

extern "C" __global__ void force_blocks(float* __restrict__ J, const int* __restrict__ ends, int T, int nb, int B) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T || nb <= 0) return;
    float* row = J + (long long)t * nb;
    row[0] = POS_INF;  // the first block
    const int e = ends[t];
    if (e >= 1) {
        const int own = (e - 1) / B;  // the block holding the query's own position
        if (own < nb) row[own] = POS_INF;
    }
}

// Bucketing the (query, kept block) pairs by block for hisa_token_scores_blocks: pair e = t*m + i (block
// blocks[e] kept by query t as its i-th) belongs to bucket blocks[e], or to the dead bucket nbk when that
// block is padding (< 0), past the cache (>= nbk) or wholly at or past the query's end
// (block * B >= min(ends[t], cap)). Two launches over the same grid of 1024-thread CTAs, BK_PAIRS pairs a
// thread (the loads of a thread's pairs are all issued before its atomics):
//   hisa_bucket_count: counts the pairs of each bucket in cnt[0 .. nbk] (global atomics; cnt[nbk + 1] the
//     CTAs' done counter). The last CTA to finish scans the counts: bucket k's pairs start at fill[k], and
//     are cut into items of at most qch, items[n] = (k, or -1 for the dead bucket; first pair; pair count;
//     0), at most max_items of them (more traps); n_items[0] = the number of items. It then zeroes cnt[0 .. nbk + 1] again: the launcher keeps one
//     zeroed cnt a device and stream order does the rest (no memset a call).
//   hisa_bucket_scatter: every pair to its bucket's next free place in `pairs` (atomics on fill).
// The order inside a bucket depends on the atomics, the scores do not: each pair is computed alone.
constexpr int BK_THREADS = 1024;
constexpr int BK_PAIRS = 4;  // pairs a thread: grid = ceil(T*m / 4096)

__device__ __forceinline__ void bucket_keys(int* key, const int* __restrict__ blocks, const int* __restrict__ ends,
                                            int n, int m, int B, int nbk, int cap) {
#pragma unroll
    for (int i = 0; i < BK_PAIRS; ++i) {
        const int e = (blockIdx.x * BK_PAIRS + i) * BK_THREADS + threadIdx.x;
        key[i] = -1;
        if (e < n) {
            const int t = e / m, b = blocks[e];
            const int limit = min(ends[t], cap);
            key[i] = (b < 0 || b >= nbk || (long long)b * B >= limit) ? nbk : b;
        }
    }
}

extern "C" __global__ void __launch_bounds__(BK_THREADS)
hisa_bucket_count(const int* __restrict__ blocks, const int* __restrict__ ends, int T, int m, int B, int nbk,
                  int cap, int qch, int* __restrict__ cnt, int* __restrict__ fill, int4* __restrict__ items,
                  int max_items, int* __restrict__ n_items) {
    __shared__ int wsum[32][2];  // per-warp sums of the scan (pairs, items)
    __shared__ int last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int key[BK_PAIRS];
    bucket_keys(key, blocks, ends, T * m, m, B, nbk, cap);
#pragma unroll
    for (int i = 0; i < BK_PAIRS; ++i)
        if (key[i] >= 0) atomicAdd(&cnt[key[i]], 1);
    __threadfence();  // this CTA's counts are visible before its done ticket
    __syncthreads();
    if (tid == 0) last = atomicAdd(&cnt[nbk + 1], 1) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();

    // The last CTA: thread tid scans buckets [k0, k1), then an exclusive scan of the threads' sums.
    const int NB = nbk + 1;
    const int per = (NB + BK_THREADS - 1) / BK_THREADS;
    const int k0 = min(NB, tid * per), k1 = min(NB, k0 + per);
    int sp = 0, si = 0;
    for (int k = k0; k < k1; ++k) {
        const int c = __ldcg(cnt + k);  // from L2, where the atomics landed
        sp += c;
        si += (c + qch - 1) / qch;
    }
    int ip = sp, ii = si;  // inclusive scans inside the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int a = __shfl_up_sync(FULL_MASK, ip, o), c = __shfl_up_sync(FULL_MASK, ii, o);
        if (lane >= o) {
            ip += a;
            ii += c;
        }
    }
    if (lane == 31) {
        wsum[warp][0] = ip;
        wsum[warp][1] = ii;
    }
    __syncthreads();
    int op = ip - sp, oi = ii - si;  // exclusive: this thread's first pair and first item
    int total = 0;                   // items of all buckets
    for (int v = 0; v < BK_THREADS / 32; ++v) {
        if (v < warp) {
            op += wsum[v][0];
            oi += wsum[v][1];
        }
        total += wsum[v][1];
    }
    if (total > max_items) trap();  // the launcher's bound (blocks_items) is wrong: never write past items
    for (int k = k0; k < k1; ++k) {
        const int c = __ldcg(cnt + k);
        for (int j = 0; j * qch < c; ++j) items[oi++] = make_int4(k == nbk ? -1 : k, op + j * qch, min(qch, c - j * qch), 0);
        fill[k] = op;
        op += c;
    }
    if (tid == BK_THREADS - 1) *n_items = oi;  // the last thread's end is the total
    __syncthreads();  // every count read before any is cleared
    for (int k = tid; k <= nbk + 1; k += BK_THREADS) cnt[k] = 0;
}

// The block-major kernel's q operand, laid out so that one bulk copy lands it in shared memory ready for
// wgmma: q_sw[t] = the 64 x ROWB image of query t's q rows in tile_off<ROWB, 64> order (the 128/64-byte
// swizzle; rows >= Hi zero), and wq[t, h] = w[t, h] * qscale[t, h] (fp8; w alone for bf16), 0 for h >= Hi:
// the same products wgmma_body forms. Chunk i (< T * 64 * ROWB / 16) is 16 bytes of one image.
__device__ __forceinline__ void prepare_chunk(long long i, const u8* __restrict__ q, const float* __restrict__ qscale,
                                              const float* __restrict__ w, int Hi, u8* __restrict__ q_sw,
                                              float* __restrict__ wq) {
#if HT_WGMMA_ROWS
    constexpr int CPR_ = ROWB / 16;
    const int t = (int)(i / (64 * CPR_)), r = (int)(i / CPR_ % 64), x = (int)(i % CPR_);
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < Hi) v = *reinterpret_cast<const uint4*>(q + ((long long)t * Hi + r) * ROWB + x * 16);
    *reinterpret_cast<uint4*>(q_sw + (long long)t * 64 * ROWB + tile_off<ROWB, 64>(r, x)) = v;
    if (x == 0) {
        float s = 0.0f;
        if (r < Hi) {
            s = w[(long long)t * Hi + r];
            if (HT_FP8) s *= qscale[(long long)t * Hi + r];
        }
        wq[(long long)t * 64 + r] = s;
    }
#else
    trap();  // only the wgmma row sizes have an image layout
#endif
}

// Two independent jobs in one launch (one launch less of host time before the score kernel): CTAs below
// ceil(T*m / (BK_PAIRS * BK_THREADS)) scatter their pairs; with `prepare`, thread i of the grid also lays out
// q chunk i (prepare_chunk). Grid: enough CTAs for both.
extern "C" __global__ void __launch_bounds__(BK_THREADS)
hisa_bucket_scatter(const int* __restrict__ blocks, const int* __restrict__ ends, int T, int m, int B, int nbk,
                    int cap, int* __restrict__ fill, int* __restrict__ pairs, const u8* __restrict__ q,
                    const float* __restrict__ qscale, const float* __restrict__ w, int Hi, u8* __restrict__ q_sw,
                    float* __restrict__ wq, int prepare) {
    if ((long long)blockIdx.x * BK_PAIRS * BK_THREADS < (long long)T * m) {  // uniform over the CTA
        int key[BK_PAIRS];
        bucket_keys(key, blocks, ends, T * m, m, B, nbk, cap);
#pragma unroll
        for (int i = 0; i < BK_PAIRS; ++i)
            if (key[i] >= 0) pairs[atomicAdd(&fill[key[i]], 1)] = (blockIdx.x * BK_PAIRS + i) * BK_THREADS + threadIdx.x;
    }
    const long long i = (long long)blockIdx.x * BK_THREADS + threadIdx.x;
    if (prepare && i < (long long)T * 64 * (ROWB / 16)) prepare_chunk(i, q, qscale, w, Hi, q_sw, wq);
}
