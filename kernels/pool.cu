// HISA stage 1: mean pooling of the cached indexer keys, one representative per block of B positions.
//
//   mean[b] = (k[b*B] + k[b*B + 1] + ... + k[e - 1]) / (e - b*B),   e = min((b + 1)*B, S)
//             fp32, summed in position order (the numpy reference does the same adds in the same order)
//   fp8 keys:   k[p] = e4m3(keys[p]) * key_scale[p]        (exact: the scale is a power of two)
//   float keys: k[p] = keys[p]                             (fp32, or bf16 bits widened exactly)
//   float out:  pooled[b] = mean
//   fp8 out:    pooled_scale[b] = max(max_j |mean_j| / 448, 1e-10)            (NOT a power of two)
//               pooled[b]       = e4m3 bits of round_nearest_even(clamp(mean / pooled_scale[b], -448, 448))
// Every rounding step is an explicit IEEE fp32 op (__fadd_rn, __fmul_rn, __fdiv_rn: no contraction, no
// fast-math), so the kernel's bits equal the reference's.
//
// keys         uint8 [cap, Di] e4m3 bits (pool_fp8) | float [cap, Di] (pool_f32) | uint16 bf16 bits (pool_bf16)
// key_scale    float [cap]                 (pool_fp8 only)
// table        float [256]                 e4m3 bits -> value (kernels/fp8.py E4M3_TABLE; pool_fp8 only)
// pooled       uint8 [nb_cap, Di] (pool_fp8) | float [nb_cap, Di] (pool_f32, pool_bf16)
// pooled_scale float [nb_cap]              (pool_fp8 only)
// Launch: grid (ceil(S/B) - first_block), block = Di rounded up to a multiple of 32 (<= 1024); CTA x pools
// block first_block + x, thread d owns dimension d and walks the block's positions one after the other.
// Preconditions (checked by the launcher): S <= cap, ceil(S/B) <= nb_cap, Di <= 1024, C-contiguous arrays.

__device__ __forceinline__ float bf16_to_float(unsigned short u) {
    return __uint_as_float((unsigned int)u << 16);
}

// e4m3 bits of x, x already clamped to [-448, 448]: round to nearest even with 3 mantissa bits below the
// leading one (subnormal step 2^-9), as kernels/fp8.py e4m3_round then e4m3_encode do.
__device__ __forceinline__ unsigned char e4m3_bits_rne(float x) {
    unsigned int u = __float_as_uint(x);
    unsigned int sign = (u >> 24) & 0x80u;
    int E = (int)((u >> 23) & 0xffu) - 127;              // |x| = 1.f * 2^E (E = -127 for zero/fp32 subnormals)
    int se = E - 3 > -9 ? E - 3 : -9;                    // exponent of the e4m3 step at this magnitude
    float inv_step = __uint_as_float((unsigned int)(127 - se) << 23);
    int n = __float2int_rn(fabsf(x) * inv_step);          // |x| / step, exact scaling; ties to even; n <= 16
    unsigned int mag = (se == -9) ? (unsigned int)n        // subnormal step: bits = n (n == 8 is 2^-6, also right)
                                  : (unsigned int)(((E + 7) << 3) + n - 8);  // n == 16 carries into the exponent
    return (unsigned char)(sign | mag);
}

// Block-wide max of v >= 0 over blockDim.x threads (a multiple of 32); every thread gets the result.
__device__ __forceinline__ float block_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    float m = red[0];
    for (int i = 1; i < nwarps; ++i) m = fmaxf(m, red[i]);
    return m;
}

// Position range of the block this CTA pools; returns false when the block is empty (never, by the launch).
__device__ __forceinline__ bool block_range(int S, int B, int first_block, long long* p0, long long* p1) {
    const long long b = (long long)first_block + blockIdx.x;
    *p0 = b * B;
    *p1 = *p0 + B < S ? *p0 + B : (long long)S;
    return *p0 < *p1;
}

// Sum of load(p) for p in [p0, p1), added strictly in position order. Loads go out 16 at a time so a
// decode step (one block, one CTA) waits for memory 8 times per 128 positions, not 128 times.
template <typename Load>
__device__ __forceinline__ float sum_in_order(long long p0, long long p1, Load load) {
    constexpr int U = 16;
    float acc = 0.0f;
    long long p = p0;
    for (; p + U <= p1; p += U) {
        float v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = load(p + u);
#pragma unroll
        for (int u = 0; u < U; ++u) acc = __fadd_rn(acc, v[u]);
    }
    for (; p < p1; ++p) acc = __fadd_rn(acc, load(p));
    return acc;
}

extern "C" __global__ void pool_fp8(const unsigned char* __restrict__ keys, const float* __restrict__ key_scale,
                                    const float* __restrict__ table, unsigned char* __restrict__ pooled,
                                    float* __restrict__ pooled_scale, int S, int B, int first_block, int Di) {
    __shared__ float s_table[256];
    __shared__ float red[32];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_table[i] = table[i];
    __syncthreads();
    long long p0, p1;
    if (!block_range(S, B, first_block, &p0, &p1)) return;
    const int d = threadIdx.x;
    const float acc = d < Di ? sum_in_order(p0, p1, [&](long long p) {
        return __fmul_rn(s_table[keys[p * Di + d]], key_scale[p]);  // exact: the scale is a power of two
    }) : 0.0f;
    const float mean = __fdiv_rn(acc, (float)(p1 - p0));
    const float amax = block_max(d < Di ? fabsf(mean) : 0.0f, red);
    const float scale = fmaxf(__fdiv_rn(amax, 448.0f), 1e-10f);
    const long long b = (long long)first_block + blockIdx.x;
    if (d < Di) {
        const float x = fminf(fmaxf(__fdiv_rn(mean, scale), -448.0f), 448.0f);
        pooled[b * Di + d] = e4m3_bits_rne(x);
    }
    if (d == 0) pooled_scale[b] = scale;
}

extern "C" __global__ void pool_f32(const float* __restrict__ keys, float* __restrict__ pooled,
                                    int S, int B, int first_block, int Di) {
    long long p0, p1;
    if (!block_range(S, B, first_block, &p0, &p1)) return;
    const int d = threadIdx.x;
    if (d >= Di) return;
    const float acc = sum_in_order(p0, p1, [&](long long p) { return keys[p * Di + d]; });
    pooled[((long long)first_block + blockIdx.x) * Di + d] = __fdiv_rn(acc, (float)(p1 - p0));
}

extern "C" __global__ void pool_bf16(const unsigned short* __restrict__ keys, float* __restrict__ pooled,
                                     int S, int B, int first_block, int Di) {
    long long p0, p1;
    if (!block_range(S, B, first_block, &p0, &p1)) return;
    const int d = threadIdx.x;
    if (d >= Di) return;
    const float acc = sum_in_order(p0, p1, [&](long long p) { return bf16_to_float(keys[p * Di + d]); });
    pooled[((long long)first_block + blockIdx.x) * Di + d] = __fdiv_rn(acc, (float)(p1 - p0));
}
