// FP8 block-scaled linear layer (DeepSeek-V3 weights): y = x W^T with both operands in e4m3.
//
//   y[t, n] = sum_b sx[t, b] * sw[n / 128, b] * sum_{k in block b} e4m3(x8[t, k]) * e4m3(w8[n, k])
//
// K is cut into KB = ceil(K / 128) blocks of 128 channels. Each block's dot is formed on its own and
// only then scaled and added to an fp32 total ("promotion", as in DeepGEMM): the weight scale changes
// every 128 channels, and Hopper's fp8 tensor cores keep only ~13 bits while they accumulate, so a
// fresh accumulator per block keeps the error at the size of one block's sum, not of the whole row.
//
// Arguments (row-major, contiguous):
//   x      float [T, K], or bf16 bit patterns uint16 [T, K]              (quantize kernels only)
//   x8     uint8 [T, KP] e4m3 bits, KP = 128 * KB; columns K..KP-1 hold zeros, so every activation
//          row is whole blocks, 16-byte aligned, and needs no bounds checks along K
//   sx     float [T, KB] power-of-two ("ue8m0") scales, one per token and block
//   w8     uint8 [N, K] e4m3 bits, as stored in the checkpoint (no padding, no copy)
//   sw     float [ceil(N / 128), KB] weight scales (the checkpoint's weight_scale_inv)
//   y      float [T, N]
//   vec    GEMM/GEMV: 1 when w8 rows are 16-byte aligned (K % 16 == 0 and an aligned base): 16-byte
//          loads; 0: byte loads (any K or base; no real layer needs them: correct but slow).
//          quantize: 1 when each lane can read its 4 channels in one load (K % 4 == 0, aligned base).
//
// Kernels (launch plans in kernels/fp8_gemm.py):
//   quantize_act_f32 / _bf16   x -> x8, sx. One warp per (token, block), 4 channels per lane: amax by
//       warp shuffles, s = 2^ceil(log2(max(amax, 1e-4) / 448)), x8 = e4m3(clamp(x / s, +-448)) (the
//       rule of kernels/fp8.py:quantize_ue8m0). Block 256 threads, grid ceil(T * KB / 8).
//   fp8_gemm_wgmma    prefill (T > 16), sm_90a only. Persistent and warp-specialised: CTA tiles of 128 tokens
//       x 128 weight rows; a producer warpgroup streams x and W tiles (128 B rows, 128-byte swizzle) into a
//       6-slot cp.async ring with mbarriers, two consumer warpgroups (64 tokens each) run 4 wgmma m64n128k32
//       e4m3 per 128-channel block into a fresh accumulator and promote it into their fp32 totals with
//       sx[token] * sw, each at its own pace. Grid min(tiles, SMs) CTAs of 384 threads walking the tiles in a
//       grouped raster, dynamic shared memory 6 * 32 KB + 1 KB + barriers. Details at the kernel.
//   fp8_gemv_t8 / _t16  decode (T <= 16; and, with grid.z token tiles of 16, the mma.sync fallback for any
//       T). Memory-bound: the weight is streamed once in 16-byte loads that skip L1. CTA = 8 warps on 64
//       weight rows: warp w takes rows 32 * (w % 2) .. +31 and every 4th K block starting at w / 2; per
//       block it converts e4m3 -> f16 (exact) in registers and runs mma.sync m16n8k16 (f32 accumulate)
//       with the weight rows as M and up to 8 (_t8) or 16 (_t16) tokens as N, then promotes. The 4 warps
//       of a row set are summed in shared memory. Few rows (decode of a narrow layer) leave SMs idle,
//       so grid.y splits K as well: each CTA stores its partial to ws[split], and the last CTA of a
//       tile (an atomic ticket in counters[]) adds the splits in split order, so the result does not
//       depend on timing, and resets its ticket for the next launch. Grid (ceil(N / 64), splits,
//       ceil(T / 16)); ws float [splits, T, N] and counters int [grid.x * grid.z] (zero on entry) are
//       only touched when splits > 1.
//   fp8_grouped_gemm_wgmma, fp8_grouped_gemv_t8 / _t16  the same kernels over groups of rows (a mixture of
//       experts): x8 / sx rows sorted by expert, w8 [E, N, K] and sw [E, ceil(N / 128), KB] stacked, y [R, N].
//       A table of tiles int [n, 3] = (expert, first row, end of that expert's rows), built by the launcher
//       with at most 128 (wgmma) or 8 / 16 (GEMV) rows per tile and never two experts' rows in one, takes
//       the place of the token-tile index: wgmma tiles n * ceil(N / 128) (the same raster and grid rule), GEMV
//       grid (ceil(N / 64), splits, n). Each CTA offsets w8 and sw to its expert and stops at the group's end.
//
// NVRTC-compatible: no #include, no std::, extern "C" entry points. The cp.async, wgmma and mbarrier helpers
// come from the prelude (kernels/hopper.cuh, pasted in by kernels/_cuda.py:source):
// prelude: hopper.cuh

#define FULL_MASK 0xffffffffu
#define E4M3_MAX 448.0f

extern __shared__ __align__(1024) u8 smem_raw[];

// ---------------------------------------------------------------------------------------------------
// Small PTX wrappers

__device__ __forceinline__ void st_shared16(u32 addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// Weight bytes are read exactly once per launch: do not let them evict anything from L1.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// Small read-only data (x8, scales): through the non-coherent path, cached in L1.
__device__ __forceinline__ uint4 ld_nc16(const void* p) {
  uint4 r;
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ float ld_nc(const float* p) {
  float r;
  asm("ld.global.nc.f32 %0, [%1];" : "=f"(r) : "l"(p));
  return r;
}
// Data written by other CTAs of this launch: from L2, never from a stale L1 line.
__device__ __forceinline__ float ld_cg(const float* p) {
  float r;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(r) : "l"(p) : "memory");
  return r;
}

__device__ __forceinline__ uint4 zero4() {
  uint4 z;
  z.x = z.y = z.z = z.w = 0u;
  return z;
}

__device__ __forceinline__ u32 word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// 16 weight bytes of one row from column `col` (a multiple of 16); zeros past K. With VEC the row is
// 16-byte aligned and K % 16 == 0, so a chunk is either wholly inside the row or wholly past its end.
template <bool VEC>
__device__ __forceinline__ uint4 load_w16(const u8* __restrict__ row, int col, int K) {
  if constexpr (VEC) return col < K ? ld_stream16(row + col) : zero4();
  u32 w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (col + i < K) w[i / 4] |= (u32)row[col + i] << (8 * (i % 4));
  uint4 v;
  v.x = w[0], v.y = w[1], v.z = w[2], v.w = w[3];
  return v;
}

// 2^ceil(log2 r) for a positive normal float, exactly (r a power of two stays itself).
__device__ __forceinline__ float ceil_pow2(float r) {
  const u32 u = __float_as_uint(r);
  return (u & 0x7FFFFFu) ? __uint_as_float(((u >> 23) + 1) << 23) : r;
}

// ---------------------------------------------------------------------------------------------------
// Activation quantisation: x -> (x8, sx)

// e4m3 of two floats already within +-448, round to nearest even; lo goes to the low byte.
__device__ __forceinline__ u32 e4m3x2(float lo, float hi) {
  u16 r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float((u32)b << 16); }

template <bool BF16>
__device__ __forceinline__ void quantize_body(const void* __restrict__ xin, u8* __restrict__ x8,
                                              float* __restrict__ sx, int T, int K, int vec) {
  const int lane = threadIdx.x & 31;
  const long long job = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int KB = (K + 127) / 128;
  if (job >= (long long)T * KB) return;
  const int t = (int)(job / KB), b = (int)(job % KB);
  const int k0 = b * 128 + 4 * lane;
  float v[4];
  if constexpr (BF16) {
    const u16* row = reinterpret_cast<const u16*>(xin) + (long long)t * K;
    if (vec && k0 + 4 <= K) {
      const uint2 p = *reinterpret_cast<const uint2*>(row + k0);
      v[0] = bf16_to_f32((u16)p.x), v[1] = bf16_to_f32((u16)(p.x >> 16));
      v[2] = bf16_to_f32((u16)p.y), v[3] = bf16_to_f32((u16)(p.y >> 16));
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = k0 + i < K ? bf16_to_f32(row[k0 + i]) : 0.f;
    }
  } else {
    const float* row = reinterpret_cast<const float*>(xin) + (long long)t * K;
    if (vec && k0 + 4 <= K) {
      const float4 p = *reinterpret_cast<const float4*>(row + k0);
      v[0] = p.x, v[1] = p.y, v[2] = p.z, v[3] = p.w;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = k0 + i < K ? row[k0 + i] : 0.f;
    }
  }
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, o));
  // The same float32 steps as the numpy reference: amax / 448 rounded once, then up to a power of two.
  const float s = ceil_pow2(fmaxf(amax, 1e-4f) / E4M3_MAX);
  const float inv = 1.0f / s;  // exact: s is a power of two, so v * inv == v / s
  float q[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) q[i] = fminf(fmaxf(v[i] * inv, -E4M3_MAX), E4M3_MAX);
  const u32 packed = e4m3x2(q[0], q[1]) | (e4m3x2(q[2], q[3]) << 16);
  *reinterpret_cast<u32*>(x8 + (long long)t * KB * 128 + k0) = packed;  // padding lanes write zeros
  if (lane == 0) sx[(long long)t * KB + b] = s;
}

extern "C" __global__ void quantize_act_f32(const float* __restrict__ x, u8* __restrict__ x8,
                                            float* __restrict__ sx, int T, int K, int vec) {
  quantize_body<false>(x, x8, sx, T, K, vec);
}
extern "C" __global__ void quantize_act_bf16(const u16* __restrict__ x, u8* __restrict__ x8,
                                             float* __restrict__ sx, int T, int K, int vec) {
  quantize_body<true>(x, x8, sx, T, K, vec);
}

// ---------------------------------------------------------------------------------------------------
// Decode GEMV (and the mma.sync fallback): weight rows x up to 16 tokens on mma.sync

#define GV_THREADS 256
#define GV_ROWS 64   // weight rows per CTA (two sets of 32)
#define GV_PHASES 4  // warps per row set, taking every 4th K block

__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 v16) {  // low byte -> low half; exact
  u32 r;
  const u16 h = (u16)v16;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(h));
  return r;
}

__device__ __forceinline__ void mma_16816(float* c, const u32* a, const u32* b) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// K-order bookkeeping. Thread (g = lane/4, q = lane%4) loads, for each of its rows (weight rows g and
// g+8 of an m16 group; token g of an n8 tile), the 16 bytes at 64c + 16q of the block, c = 0, 1: each
// 64-byte half of a 128-byte block row is read whole by one instruction. Word j of such a chunk makes
// one k16 step: its low two bytes fill the fragment slots k = 2q, 2q+1 and its high two bytes k = 2q+8,
// 2q+9 (m16n8k16 layout: a0/a1 rows g/g+8 at 2q.., a2/a3 at 2q+8..; b0 at 2q.., b1 at 2q+8..). A slot
// maps to the same channel 64c + 16q + 4j + {0..3} in A and in B, independently of g, so each mma sums
// true products; which channels go to which step is irrelevant to the block's sum.
//
// The CTA computes tokens tok0 .. min(tok0 + 8 * NT, T) - 1 (T: the end of its tokens, exclusive) against
// weight rows 64 * blockIdx.x ..; y and ws have R rows (the plain kernels: tok0 = 16 * blockIdx.z, T = R).
template <int NT, bool VEC>
__device__ __forceinline__ void gemv_body(const u8* __restrict__ x8, const float* __restrict__ sx,
                                          const u8* __restrict__ w8, const float* __restrict__ sw,
                                          float* __restrict__ y, float* __restrict__ ws, int* __restrict__ counters,
                                          int tok0, int T, int R, int N, int K, float (*red)[GV_ROWS][16],
                                          int* last) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int rset = warp % 2, phase = warp / 2;
  const int KB = (K + 127) / 128, KP = KB * 128;
  const int row0 = blockIdx.x * GV_ROWS;             // CTA's first weight row; all 64 share one scale row
  const int n0 = row0 + rset * 32;                   // this warp's first row
  const int split = blockIdx.y, nsplit = gridDim.y;
  const int kb0 = (int)((long long)split * KB / nsplit), kb1 = (int)((long long)(split + 1) * KB / nsplit);
  const float* swrow = sw + (long long)(row0 / 128) * KB;

  float acc[2][NT][4];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][nt][i] = 0.f;

  // Rows past N and tokens past T re-read the last real one: an mma output (row, token) depends only on
  // that row and that token, and those outputs are never stored, so no predicates are needed.
  const u8* wrow[2][2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) wrow[r][h] = w8 + (long long)min(n0 + 16 * r + 8 * h + g, N - 1) * K;
  const u8* xrow[NT];
  int tcol[NT][2];  // the tokens of accumulator columns 2q, 2q+1
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    xrow[nt] = x8 + (long long)min(tok0 + 8 * nt + g, T - 1) * KP;
    tcol[nt][0] = min(tok0 + 8 * nt + 2 * q, T - 1);
    tcol[nt][1] = min(tok0 + 8 * nt + 2 * q + 1, T - 1);
  }

  for (int b = kb0 + phase; b < kb1; b += GV_PHASES) {
    // Issue every load of the block before the first use, so ~128 bytes per thread are in flight.
    uint4 wv[2][2][2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          wv[r][h][c] = load_w16<VEC>(wrow[r][h], b * 128 + 64 * c + 16 * q, K);
    uint4 xv[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c)
        xv[nt][c] = ld_nc16(xrow[nt] + b * 128 + 64 * c + 16 * q);
    const float swb = ld_nc(swrow + b);
    float m[NT][2];  // sx * sw for the accumulator columns 2q, 2q+1 of each n8 tile
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 2; ++i) m[nt][i] = ld_nc(sx + (long long)tcol[nt][i] * KB + b) * swb;

    float d[2][NT][4];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) d[r][nt][i] = 0.f;
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        u32 bf[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const u32 xw = word(xv[nt][c], j);
          bf[nt][0] = e4m3x2_to_f16x2(xw);
          bf[nt][1] = e4m3x2_to_f16x2(xw >> 16);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const u32 w0 = word(wv[r][0][c], j), w1 = word(wv[r][1][c], j);
          const u32 a[4] = {e4m3x2_to_f16x2(w0), e4m3x2_to_f16x2(w1), e4m3x2_to_f16x2(w0 >> 16),
                            e4m3x2_to_f16x2(w1 >> 16)};
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_16816(d[r][nt], a, bf[nt]);
        }
      }
    // Promotion: accumulator element i is row g (+8 for i >= 2), column (token) 2q + (i & 1).
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[r][nt][i] += d[r][nt][i] * m[nt][i & 1];
  }

  // Sum the 4 phase warps of each row set: red[phase][row][token], then one thread per output.
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        red[phase][rset * 32 + 16 * r + 8 * (i >> 1) + g][8 * nt + 2 * q + (i & 1)] = acc[r][nt][i];
  __syncthreads();
  constexpr int TT = 8 * NT;  // tokens per CTA
  const long long TN = (long long)R * N;  // one split's partials in ws
  // Output (token, row) pairs, rows fastest so that stores to y[t, :] are coalesced.
  for (int i = tid; i < TT * GV_ROWS; i += GV_THREADS) {
    const int tl = i / GV_ROWS, rl = i % GV_ROWS;
    const int t = tok0 + tl, n = row0 + rl;
    if (t >= T || n >= N) continue;
    const float v = (red[0][rl][tl] + red[1][rl][tl]) + (red[2][rl][tl] + red[3][rl][tl]);
    if (nsplit == 1)
      y[(long long)t * N + n] = v;
    else
      ws[split * TN + (long long)t * N + n] = v;
  }
  if (nsplit == 1) return;

  // Split K: the last CTA of this (row tile, token tile) to finish adds the partials in split order.
  __threadfence();  // this CTA's partials are visible device-wide before its ticket is taken
  __syncthreads();
  const int tile = blockIdx.z * gridDim.x + blockIdx.x;
  if (tid == 0) *last = atomicAdd(counters + tile, 1) == nsplit - 1;
  __syncthreads();
  if (!*last) return;
  __threadfence();
  for (int i = tid; i < TT * GV_ROWS; i += GV_THREADS) {
    const int tl = i / GV_ROWS, rl = i % GV_ROWS;
    const int t = tok0 + tl, n = row0 + rl;
    if (t >= T || n >= N) continue;
    float v = 0.f;
    for (int s = 0; s < nsplit; ++s) v += ld_cg(ws + s * TN + (long long)t * N + n);
    y[(long long)t * N + n] = v;
  }
  if (tid == 0) counters[tile] = 0;  // ready for the next launch (kernel boundaries order it)
}

#define GEMV_PARAMS                                                                                       \
  const u8 *__restrict__ x8, const float *__restrict__ sx, const u8 *__restrict__ w8,                    \
      const float *__restrict__ sw, float *__restrict__ y, float *__restrict__ ws, int *__restrict__ counters, \
      int T, int N, int K, int vec

// vec is uniform: choose the load path once, so the weight loads of a block issue back to back.
template <int NT>
__device__ __forceinline__ void gemv_entry(const u8* __restrict__ x8, const float* __restrict__ sx,
                                           const u8* __restrict__ w8, const float* __restrict__ sw,
                                           float* __restrict__ y, float* __restrict__ ws, int* __restrict__ counters,
                                           int tok0, int T, int R, int N, int K, int vec) {
  __shared__ float red[GV_PHASES][GV_ROWS][16];
  __shared__ int last;
  if (vec)
    gemv_body<NT, true>(x8, sx, w8, sw, y, ws, counters, tok0, T, R, N, K, red, &last);
  else
    gemv_body<NT, false>(x8, sx, w8, sw, y, ws, counters, tok0, T, R, N, K, red, &last);
}

extern "C" __global__ void __launch_bounds__(GV_THREADS, 2) fp8_gemv_t8(GEMV_PARAMS) {
  gemv_entry<1>(x8, sx, w8, sw, y, ws, counters, blockIdx.z * 16, T, T, N, K, vec);
}
extern "C" __global__ void __launch_bounds__(GV_THREADS, 2) fp8_gemv_t16(GEMV_PARAMS) {
  gemv_entry<2>(x8, sx, w8, sw, y, ws, counters, blockIdx.z * 16, T, T, N, K, vec);
}

// Grouped: rows of x8 sorted by expert, w8 [E, N, K] and sw [E, NB, KB] stacked, and per grid.z one entry
// tiles[z] = (expert e, first row r0, end of e's rows): the CTA runs rows r0 .. min(r0 + 8 * NT, end) - 1
// against expert e's weight. Rows past `end` are the next expert's and are never read.
#define GROUPED_GEMV_PARAMS                                                                               \
  const u8 *__restrict__ x8, const float *__restrict__ sx, const u8 *__restrict__ w8,                    \
      const float *__restrict__ sw, float *__restrict__ y, float *__restrict__ ws, int *__restrict__ counters, \
      const int *__restrict__ tiles, int R, int N, int K, int vec

// The row arrays are offset to r0 here, so that the body sees tok0 = 0 (a constant: this kernel needs the
// register it saves to stay within 128 without spilling).
template <int NT>
__device__ __forceinline__ void grouped_gemv_entry(GROUPED_GEMV_PARAMS) {
  const int* tile = tiles + 3 * blockIdx.z;
  const int e = tile[0], r0 = tile[1], end = tile[2];
  const long long KB = (K + 127) / 128, NB = (N + 127) / 128, rN = (long long)r0 * N;
  gemv_entry<NT>(x8 + r0 * KB * 128, sx + r0 * KB, w8 + e * (long long)N * K, sw + e * NB * KB, y + rN, ws + rN,
                 counters, 0, end - r0, R, N, K, vec);
}

extern "C" __global__ void __launch_bounds__(GV_THREADS, 2) fp8_grouped_gemv_t8(GROUPED_GEMV_PARAMS) {
  grouped_gemv_entry<1>(x8, sx, w8, sw, y, ws, counters, tiles, R, N, K, vec);
}
extern "C" __global__ void __launch_bounds__(GV_THREADS, 2) fp8_grouped_gemv_t16(GROUPED_GEMV_PARAMS) {
  grouped_gemv_entry<2>(x8, sx, w8, sw, y, ws, counters, tiles, R, N, K, vec);
}

// ---------------------------------------------------------------------------------------------------
// Prefill GEMM on wgmma (sm_90a only): warp-specialised and persistent
//
// Tiling. A CTA tile is 128 tokens x 128 weight rows (so one weight-scale row), K in steps of one 128-channel
// block. One K block of a tile is two 16 KB operand tiles, 128 rows of 128 bytes each in the wgmma 128-byte
// swizzle: A = x8[m0 .. m0 + 127, 128 kb ..] and B = w8[n0 .. n0 + 127, 128 kb ..].
//
// Roles: 384 threads, 1 CTA per SM.
//   producer, warpgroup 2 (threads 256..383): fills a ring of GM_STAGES slots, each one K block's A and B
//     tiles (32 KB), with cp.async: 16 copies of 16 bytes per thread per slot.
//   consumers, warpgroups 0 and 1 (threads 0..255): warpgroup c owns tokens m0 + 64c .. + 63. Per K block it
//     issues 4 wgmma m64n128k32 (the 32-byte k steps of the block) into a fresh accumulator d, waits for
//     them, frees the slot, then promotes d into its fp32 total acc.
//   No setmaxnreg: a consumer thread needs ~150 registers (acc and d are 64 each), within the 168 that every
//   thread of a 384-thread CTA gets, and the producer's cut would make its address arithmetic spill.
// Persistent: grid = min(tiles, SMs); CTA b runs tiles b, b + grid, b + 2 grid, ... of the grouped raster, and
// all three warpgroups walk that same sequence, so the producer is already fetching the next tile's first
// blocks while the consumers finish the current one and store it.
//
// Pipeline. Slot s has two mbarriers, after the tiles in shared memory:
//   full[s]  init count 128: each producer thread's cp.async.mbarrier.arrive.noinc arrives once its copies
//            into the slot have landed. The consumers wait on it.
//   empty[s] init count 8: lane 0 of each consumer warp arrives after wgmma.wait_group 0, when the MMAs that
//            read the slot are done. The producer waits on it before refilling the slot.
//   Producer and consumers step through slots 0, 1, .., GM_STAGES - 1, 0, .. and flip `phase` at each wrap,
//   so on the n-th use of a slot phase = n & 1: the consumers wait for full's n-th completion (parity n & 1),
//   the producer for empty's (n-1)-th (parity (n & 1) ^ 1, which a fresh barrier reports complete at once,
//   so the first GM_STAGES fills do not wait). A slot is refilled only after both consumer warpgroups freed
//   it, so neither barrier ever runs a phase ahead of its waiters and one parity bit is unambiguous.
//
// Promotion. The two consumer warpgroups share the ring but no per-block barrier, so while one scales and
// adds its 64 x 128 block result (acc += d * sx[token, kb] * sw[n / 128, kb]), the tensor cores run the
// other's wgmma; its scale loads are issued before its wait on the slot. Numerics as the reference's: a fresh
// dot per 128-channel block, scaled and added to the fp32 total in K order.
//
// Shared memory: GM_STAGES x 32 KB of tiles + 2 x GM_STAGES mbarriers + up to 1 KB to align the ring to the
// 1024-byte swizzle atom: 193 KB at 6 stages (a CTA may have 227 KB).

#define GM_BM 128     // tokens per CTA tile (2 consumer warpgroups x 64)
#define GM_BN 128     // weight rows per CTA tile: one weight scale row
#define GM_STAGES 6   // ring slots (K blocks in flight)
#define GM_GROUP 8    // token tiles per raster group
#define GM_TILE (128 * 128)  // bytes of one 128-row x 128-byte operand tile
#define GM_CONSUMERS 256     // threads 0..255: two consumer warpgroups
#define GM_PRODUCERS 128     // threads 256..383: one producer warpgroup
#define GM_THREADS (GM_CONSUMERS + GM_PRODUCERS)
#define GM_SMEM (2 * GM_STAGES * GM_TILE + 2 * GM_STAGES * 8 + 1024)  // tiles, mbarriers, alignment slack

// Grouped raster: consecutive tiles walk GM_GROUP token tiles x every weight tile, so the CTAs working at
// one time read a few x tiles and a slice of W, each many times, from L2 (row-major order would stream the
// whole weight once per token tile). Tile `bid` of tiles_m * tiles_n -> (tile_m, tile_n).
__device__ __forceinline__ void raster(int bid, int tiles_m, int tiles_n, int* tile_m, int* tile_n) {
  const int group = bid / (GM_GROUP * tiles_n), in_group = bid % (GM_GROUP * tiles_n);
  const int group_m = min(tiles_m - group * GM_GROUP, GM_GROUP);
  *tile_m = group * GM_GROUP + in_group % group_m;
  *tile_n = in_group / group_m;
}

// Block kb of rows [row0, row0 + 128) of x8 [T, KP] into a swizzled tile; rows past T are zeros. Run by the
// GM_PRODUCERS threads, ptid = 0 .. GM_PRODUCERS - 1; 8 consecutive threads copy one 128-byte row.
__device__ __forceinline__ void load_x_tile(u32 dst, const u8* __restrict__ x8, int row0, int T, int KP, int kb,
                                            int ptid) {
#pragma unroll
  for (int it = 0; it < 128 * 8 / GM_PRODUCERS; ++it) {
    const int i = ptid + it * GM_PRODUCERS, r = i / 8, x = i % 8;
    const bool ok = row0 + r < T;
    cp_async16(dst + swizzle128_off(r, x), x8 + (ok ? (long long)(row0 + r) * KP + kb * 128 + x * 16 : 0), ok ? 16 : 0);
  }
}

// Block kb of weight rows [row0, row0 + 128) into a swizzled tile; rows past N and columns past K are zeros.
// VEC: cp.async only. Else plain loads and st.shared, which the caller must make visible to wgmma itself.
template <bool VEC>
__device__ __forceinline__ void load_w_tile(u32 dst, const u8* __restrict__ w8, int row0, int N, int K, int kb,
                                            int ptid) {
#pragma unroll
  for (int it = 0; it < 128 * 8 / GM_PRODUCERS; ++it) {
    const int i = ptid + it * GM_PRODUCERS, r = i / 8, x = i % 8;
    const int col = kb * 128 + x * 16;
    if constexpr (VEC) {
      const bool ok = row0 + r < N && col < K;
      cp_async16(dst + swizzle128_off(r, x), w8 + (ok ? (long long)(row0 + r) * K + col : 0), ok ? 16 : 0);
    } else {
      const uint4 v = row0 + r < N ? load_w16<false>(w8 + (long long)(row0 + r) * K, col, K) : zero4();
      st_shared16(dst + swizzle128_off(r, x), v);
    }
  }
}

// Where tile i of the raster reads and writes: token rows m0 .. min(m0 + 128, end) - 1 (rows of x8, sx and y
// from `end` on are neither read nor written) times weight rows 128 * tile_n .. + 127 of w8 / sw. Without a
// tile table, token tile m of a plain product; with one (grouped), its row m = (expert e, first row, end of
// e's rows), and w8 / sw offset to expert e.
struct GmTile {
  const u8* w8;
  const float* sw;
  int m0, end, tile_n;
};

__device__ __forceinline__ GmTile gm_tile(int i, const int* __restrict__ tiles, int tiles_m, int tiles_n,
                                          const u8* __restrict__ w8, const float* __restrict__ sw, int T, int N,
                                          int K) {
  int tile_m;
  GmTile t;
  raster(i, tiles_m, tiles_n, &tile_m, &t.tile_n);
  if (tiles == nullptr) {
    t.w8 = w8, t.sw = sw, t.m0 = tile_m * GM_BM, t.end = T;
  } else {
    const int* row = tiles + 3 * tile_m;
    const long long e = row[0], KB = (K + 127) / 128, NB = (N + 127) / 128;
    t.w8 = w8 + e * N * K, t.sw = sw + e * NB * KB, t.m0 = row[1], t.end = row[2];
  }
  return t;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The ring in shared memory: GM_STAGES x-tile slots, GM_STAGES weight-tile slots, full[], empty[].
struct GmRing {
  u32 a, b, full, empty;
  __device__ __forceinline__ u32 a_slot(int s) const { return a + s * GM_TILE; }
  __device__ __forceinline__ u32 b_slot(int s) const { return b + s * GM_TILE; }
  __device__ __forceinline__ u32 full_bar(int s) const { return full + 8 * s; }
  __device__ __forceinline__ u32 empty_bar(int s) const { return empty + 8 * s; }
};

// Producer warpgroup: every K block of every tile of this CTA, in order, into the ring.
template <bool VEC>
__device__ __forceinline__ void gemm_producer(const GmRing& ring, const u8* __restrict__ x8,
                                              const u8* __restrict__ w8, const float* __restrict__ sw,
                                              const int* __restrict__ tiles, int tiles_m, int T, int N, int K) {
  const int ptid = threadIdx.x - GM_CONSUMERS;
  const int KB = (K + 127) / 128, KP = KB * 128, tiles_n = (N + GM_BN - 1) / GM_BN;
  int s = 0;
  u32 phase = 0;
  for (int i = blockIdx.x; i < tiles_m * tiles_n; i += gridDim.x) {
    const GmTile t = gm_tile(i, tiles, tiles_m, tiles_n, w8, sw, T, N, K);
    for (int kb = 0; kb < KB; ++kb) {
      mbar_wait(ring.empty_bar(s), phase ^ 1);  // both consumer warpgroups are done with the slot's last use
      load_x_tile(ring.a_slot(s), x8, t.m0, t.end, KP, kb, ptid);
      load_w_tile<VEC>(ring.b_slot(s), t.w8, t.tile_n * GM_BN, N, K, kb, ptid);
      if constexpr (VEC) {
        cp_async_mbar_arrive(ring.full_bar(s));
      } else {  // the weight went through st.shared: land the x copies too, then fence both for wgmma
        cp_async_wait_all();
        fence_proxy_async();
        mbar_arrive(ring.full_bar(s));
      }
      if (++s == GM_STAGES) s = 0, phase ^= 1;
    }
  }
  cp_async_wait_all();  // no copy outlives its thread
}

// acc (wgmma_fp8_n128's D layout) -> y rows tA, tB (those < end), columns n0 + 8j + 2(lane%4) + {0,1} (< N).
__device__ __forceinline__ void store_tile(float* __restrict__ y, const float* acc, int tA, int tB, int end, int n0,
                                           int N, int lane) {
  const bool pairs = (N % 2) == 0;  // then (t * N + n) is even for even n: float2 stores are aligned
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int n = n0 + 8 * j + 2 * (lane & 3);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int t = h ? tB : tA;
      if (t >= end) continue;
      float* p = y + (long long)t * N + n;
      const float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
      if (pairs && n + 1 < N) {
        float2 v;
        v.x = v0, v.y = v1;
        *reinterpret_cast<float2*>(p) = v;
      } else {
        if (n < N) p[0] = v0;
        if (n + 1 < N) p[1] = v1;
      }
    }
  }
}

// Consumer warpgroups: the MMAs and promotion of tokens m0 + 64 wg .. + 63 of every tile of this CTA.
__device__ __forceinline__ void gemm_consumer(const GmRing& ring, const float* __restrict__ sx,
                                              const u8* __restrict__ w8, const float* __restrict__ sw,
                                              float* __restrict__ y, const int* __restrict__ tiles, int tiles_m,
                                              int T, int N, int K) {
  const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, wv = (tid >> 5) & 3;
  const int KB = (K + 127) / 128, tiles_n = (N + GM_BN - 1) / GM_BN;
  int s = 0;
  u32 phase = 0;
  float acc[64], d[64];
  for (int i = blockIdx.x; i < tiles_m * tiles_n; i += gridDim.x) {
    const GmTile t = gm_tile(i, tiles, tiles_m, tiles_n, w8, sw, T, N, K);
    // This thread's accumulator rows (tokens) and the weight-scale row of the tile's 128 weight rows.
    const int tA = t.m0 + wg * 64 + wv * 16 + (lane >> 2), tB = tA + 8;
    const float* sxA = sx + (long long)(tA < t.end ? tA : 0) * KB;
    const float* sxB = sx + (long long)(tB < t.end ? tB : 0) * KB;
    const float* swrow = t.sw + (long long)t.tile_n * KB;
#pragma unroll
    for (int j = 0; j < 64; ++j) acc[j] = 0.f;

    for (int kb = 0; kb < KB; ++kb) {
      mbar_wait(ring.full_bar(s), phase);
      // The slot was written through the generic proxy (cp.async) and wgmma reads it through the async one.
      fence_proxy_async();
      // The scales are loaded before the MMAs are issued, and used after them: the MMAs hide their latency.
      const float swb = ld_nc(swrow + kb);
      const float mA = ld_nc(sxA + kb) * swb, mB = ld_nc(sxB + kb) * swb;
      const u32 a_tile = ring.a_slot(s) + wg * 64 * 128, b_tile = ring.b_slot(s);
      fence_regs<64>(d);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < 4; ++c)  // the 32-byte k steps; the hardware applies the swizzle to +32c
        wgmma_fp8_n128(d, make_desc<128>(a_tile + 32 * c), make_desc<128>(b_tile + 32 * c), c > 0);
      wgmma_commit();
      wgmma_wait0();
      fence_regs<64>(d);
      if (lane == 0) mbar_arrive(ring.empty_bar(s));  // this warp's reads of the slot are done
      if (++s == GM_STAGES) s = 0, phase ^= 1;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        acc[4 * j + 0] += d[4 * j + 0] * mA;
        acc[4 * j + 1] += d[4 * j + 1] * mA;
        acc[4 * j + 2] += d[4 * j + 2] * mB;
        acc[4 * j + 3] += d[4 * j + 3] * mB;
      }
    }
    store_tile(y, acc, tA, tB, t.end, t.tile_n * GM_BN, N, lane);
  }
}

// The whole prefill kernel, plain (tiles == nullptr: token tiles of T rows) or grouped (tiles_m rows of the
// tile table); a trap where wgmma was not built.
__device__ __forceinline__ void gemm_wgmma(const u8* __restrict__ x8, const float* __restrict__ sx,
                                           const u8* __restrict__ w8, const float* __restrict__ sw,
                                           float* __restrict__ y, const int* __restrict__ tiles, int tiles_m, int T,
                                           int N, int K, int vec, int smem_bytes) {
  if (smem_bytes < GM_SMEM || blockDim.x != GM_THREADS) trap();
  const u32 raw = smem_addr(smem_raw);
  const u32 base = raw + ((1024 - (raw & 1023)) & 1023);
  GmRing ring;
  ring.a = base, ring.b = base + GM_STAGES * GM_TILE;
  ring.full = base + 2 * GM_STAGES * GM_TILE, ring.empty = ring.full + 8 * GM_STAGES;
  if (threadIdx.x == 0) {
    for (int s = 0; s < GM_STAGES; ++s) {
      mbar_init(ring.full_bar(s), GM_PRODUCERS);
      mbar_init(ring.empty_bar(s), GM_CONSUMERS / 32);
    }
    mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x >= GM_CONSUMERS) {
    if (vec)
      gemm_producer<true>(ring, x8, w8, sw, tiles, tiles_m, T, N, K);
    else
      gemm_producer<false>(ring, x8, w8, sw, tiles, tiles_m, T, N, K);
  } else {
    gemm_consumer(ring, sx, w8, sw, y, tiles, tiles_m, T, N, K);
  }
}
#else
__device__ __forceinline__ void gemm_wgmma(const u8*, const float*, const u8*, const float*, float*, const int*, int,
                                           int, int, int, int, int) {
  trap();  // wgmma needs sm_90a: launching this elsewhere is a bug
}
#endif

// Grid min(tiles, SMs) x GM_THREADS threads, GM_SMEM bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(GM_THREADS, 1)
    fp8_gemm_wgmma(const u8* __restrict__ x8, const float* __restrict__ sx, const u8* __restrict__ w8,
                   const float* __restrict__ sw, float* __restrict__ y, int T, int N, int K, int vec,
                   int smem_bytes) {
  gemm_wgmma(x8, sx, w8, sw, y, nullptr, (T + GM_BM - 1) / GM_BM, T, N, K, vec, smem_bytes);
}

// Grouped: rows of x8 sorted by expert, w8 [E, N, K] and sw [E, NB, KB] stacked, and n_mtiles token tiles
// tiles[i] = (expert e, first row r0, end of e's rows): a tile runs rows r0 .. min(r0 + 128, end) - 1, never
// two experts'. The same raster over n_mtiles x ceil(N / 128): an expert's token tiles sit side by side, so
// where it has several, their CTAs share its weight tiles through L2.
extern "C" __global__ void __launch_bounds__(GM_THREADS, 1)
    fp8_grouped_gemm_wgmma(const u8* __restrict__ x8, const float* __restrict__ sx, const u8* __restrict__ w8,
                           const float* __restrict__ sw, float* __restrict__ y, const int* __restrict__ tiles,
                           int n_mtiles, int N, int K, int vec, int smem_bytes) {
  gemm_wgmma(x8, sx, w8, sw, y, tiles, n_mtiles, 0, N, K, vec, smem_bytes);
}
