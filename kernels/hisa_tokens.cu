// HISA token stage (SPEC section 6 step 4): exact DSA scores of every candidate slot of every query.
//
//   slot j of query t -> position p = blocks[t, j / B] * B + j % B          (j < m*B)
//   out[t, j] = sum_h w[t,h] * ReLU(qs[t,h] * ks[p] * q[t,h] . k[p])   if blocks[t, j/B] >= 0 and p < ends[t]
//             = -inf                                                     otherwise
// Computed as ks[p] * sum_h (w[t,h] * qs[t,h]) * ReLU(q[t,h] . k[p]) (the scales are positive), with
// the dot products on tensor cores: M = heads (16 per mma, padded with zero rows), N = keys, K = Di.
//
// Compile-time configuration (-D, picked by the launcher in hisa_tokens.py):
//   HT_FP8     1: q, keys are e4m3 bits, mma.m16n8k32 e4m3; 0: bf16 bits, mma.m16n8k16 bf16 (no scales)
//   HT_DI      indexer head dim Di (row bytes Di or 2*Di must be a multiple of 32)
//   HT_MT      head tiles of 16 (1, 2 or 4: Hi <= 16, 32, 64)
//   HT_STAGES  cp.async pipeline depth (2 or 3)
// Arguments:
//   q       [T, Hi, Di]  e4m3 bits (uint8) or bf16 bits (uint16)
//   qscale  float [T, Hi] (fp8 only; any valid pointer otherwise)
//   w       float [T, Hi]
//   keys    [cap, Di]    same element type as q, base 16-byte aligned
//   kscale  float [cap]  (fp8 only; any valid pointer otherwise)
//   blocks  int [T, m]   kept block ids, -1 = padding
//   ends    int [T]      positions >= ends[t] are out of range (-inf); ends[t] <= cap is assumed, and
//                        positions >= cap are treated as out of range anyway
//   out     float [T, m*B]
// Launch: grid (T, nsplit), 128 threads (4 warps, launch bounds for 5 CTAs an SM: ~96 registers, ~28 KB
// static smem at fp8 Di 128). CTA (t, s) scores slots [s*slots_per_cta,
// min((s+1)*slots_per_cta, m*B)) of query t, NT = 64 slots per tile. Each tile's key rows are gathered
// with 16-byte cp.async (zero-filled for invalid slots) into shared memory, HT_STAGES tiles in flight.
// Warp (mw, nw): head tile mw (q fragments stay in registers for the whole CTA), keys nw*KPW ... of each
// tile. ReLU and the head weights are applied to the accumulators in registers, heads reduced by warp
// shuffles, head tiles through shared memory; one thread per slot writes the score.
// Preconditions (checked by the launcher): Hi <= 16*HT_MT, slots_per_cta a multiple of 64, arrays
// C-contiguous, keys 16-byte aligned.

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

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    unsigned int s;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// D += A * B for one 16x8 tile and 32 bytes of K. A: rows g, g+8 (a0/a2: row g, a1/a3: row g+8; a0/a1
// bytes 4*tig.., a2/a3 bytes 16+4*tig..); B: key g, bytes 4*tig.. (b0) and 16+4*tig.. (b1);
// D: c0,c1 = (row g, keys 2*tig, 2*tig+1), c2,c3 = (row g+8, same keys).
__device__ __forceinline__ void mma32(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
#if HT_FP8
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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
            cp_async16(&s_keys[stage][r * RSW + c * 4], src, p >= 0 ? 16 : 0);  // 0: zero-fill
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
