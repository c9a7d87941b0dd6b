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
//   fp8_gemv_t8 / _t16  decode (T <= 16; and, over token tiles of 16, the mma.sync fallback for any T).
//       Memory-bound: the weight is streamed once. Units of (token tile, 32-128 weight rows, one K block), an
//       equal run of them per CTA of a one-wave grid (2 CTAs of 4 warps per SM), so every SM streams the same
//       bytes; each warp keeps 3 units (12 KB of weight) in flight in its own cp.async ring in shared memory,
//       converts e4m3 -> f16 (exact) and runs mma.sync m16n8k16 (f32 accumulate) with 32 weight rows as M and up
//       to 8 (_t8) or 16 (_t16) tokens as N, one fresh accumulator per block, then promotes. The 4 warps of a
//       CTA split the rows or K (kw = 1, 2, 4); where a run of units ends inside a key (a block of outputs), the
//       CTA stores its partial in ws and the last one to finish (an atomic ticket in counters[]) adds the pieces
//       in CTA order, so the result does not depend on timing. Grid C CTAs of 128 threads; ws float
//       [2 C, 8 NT, 128 / kw] and counters int [keys] (zero on entry and exit) serve cut keys only. Details at
//       the kernel.
//   fp8_grouped_gemm_wgmma, fp8_grouped_gemv_t8 / _t16  the same kernels over groups of rows (a mixture of
//       experts): x8 / sx rows sorted by expert, w8 [E, N, K] and sw [E, ceil(N / 128), KB] stacked, y [R, N].
//       A table of tiles int [n, 3] = (expert, first row, end of that expert's rows), built by the launcher
//       with at most 128 (wgmma) or 8 / 16 (GEMV) rows per tile and never two experts' rows in one, takes
//       the place of the token-tile index: wgmma tiles n * ceil(N / 128) (the same raster and grid rule), GEMV
//       units over all n tiles at once. Each tile offsets w8 and sw to its expert and stops at the group's end.
//
// NVRTC-compatible: no #include, no std::, extern "C" entry points. The cp.async, wgmma and mbarrier helpers
// come from kernels/hopper.cuh: nvcc finds it beside this file; for NVRTC kernels/_cuda.py:source pastes
// it in place of the #include:
#include "hopper.cuh"

#define FULL_MASK 0xffffffffu
#define E4M3_MAX 448.0f

extern __shared__ __align__(1024) u8 smem_raw[];

// ---------------------------------------------------------------------------------------------------
// Small PTX wrappers

__device__ __forceinline__ void st_shared16(u32 addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// 16 bytes global -> shared through L1 (.ca): small data that the other warps of the SM read too (x8 rows).
// src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async16_ca(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

// Small read-only data (scales): through the non-coherent path, cached in L1.
__device__ __forceinline__ float ld_nc(const float* p) {
  float r;
  asm("ld.global.nc.f32 %0, [%1];" : "=f"(r) : "l"(p));
  return r;
}
// Data written by other CTAs of this launch: from L2, never from a stale L1 line.
__device__ __forceinline__ float4 ld_cg4(const float* p) {
  float4 r;
  asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w) : "l"(p)
               : "memory");
  return r;
}

__device__ __forceinline__ uint4 zero4() {
  uint4 z;
  z.x = z.y = z.z = z.w = 0u;
  return z;
}

__device__ __forceinline__ float4 add4(float4 a, float4 b) {
  a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
  return a;
}

__device__ __forceinline__ u32 word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// 16 weight bytes of one row from column `col` (a multiple of 16), one byte at a time: any K, any alignment
// (the vec = 0 paths); zeros past K.
__device__ __forceinline__ uint4 load_w16_bytes(const u8* __restrict__ row, int col, int K) {
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
//
// Memory-bound: every weight byte is read once, so the kernel is about keeping enough of the weight in flight on
// every SM (Little's law: ~4.8 TB/s x ~1 us of loaded latency / 132 SMs = ~36 KB per SM) and about every SM
// streaming the same number of bytes, whatever the shape.
//
// Work. Units: token tile z (8 NT tokens; grouped: row z of the tile table) x group g of NR weight rows x K block
// b. A key (z, g) is one block of outputs; unit u = key * KB + b, G = ceil(N / NR) groups, U = Z * G * KB units.
// CTA c of the C in the grid takes units [start(c), start(c + 1)), start(c) = floor(c * U / C): the same number of
// units (+-1) for every CTA. The launcher makes C at most 2 per SM, all resident at once, so a launch is one wave
// that ends together, and cuts a narrow layer along K so that it still reaches every SM.
//
// CTA = 4 warps = RW row sets of 32 rows x KW K phases (RW * KW = 4, NR = 32 RW; KW = 1, 2 or 4, the launcher's
// choice). Warp w is row set w / KW and phase w % KW: it takes the CTA's units start(c) + phase, + KW, + 2 KW, ..,
// and of each, weight rows g * NR + 32 (w / KW) .. + 31. KW = 1: the 4 warps read 4 row sets of one block (and
// share its x chunk through L1), for wide layers. KW = 4: they read 4 blocks of one row set; a key is then 32 rows,
// so a narrow layer's keys are cut into fewer pieces across CTAs (see the end of a key, below).
//
// Streaming. Each warp runs its own ring of GV_STAGES slots in shared memory. A slot holds one unit of the warp: its
// 32 weight rows x 128 bytes, the tile's 8 NT rows of x8 for that block (rows of 16-byte chunks, chunk x of row r
// stored at x ^ 4 (r & 1), so that the fragment loads below have no bank conflicts), then sx of those tokens and
// the weight scale. All of it comes by cp.async: the weight with .cg (read once: not kept in L1), x and the scales
// with .ca (the CTA's other warps read them too). A warp keeps GV_STAGES - 1 = 3 units (12 KB of weight) in flight
// while it computes one: 8 warps per SM, 96 KB in flight per SM, and no CTA barrier anywhere in the stream.
//
// Math per unit, as the reference's: thread (g = lane / 4, q = lane % 4) takes, of weight rows g and g + 8 of each
// m16 group and token row g of each n8 tile, the 16 bytes at 64c + 16q of the block, c = 0, 1. Word j of such a
// chunk makes one k16 step: its low two bytes fill the fragment slots k = 2q, 2q+1 and its high two bytes k = 2q+8,
// 2q+9 (m16n8k16 layout: a0/a1 rows g/g+8 at 2q.., a2/a3 at 2q+8..; b0 at 2q.., b1 at 2q+8..). A slot maps to the
// same channel 64c + 16q + 4j + {0..3} in A and in B, whatever g, so each mma sums true products; which channels go
// to which step does not change the block's sum. e4m3 -> f16 is exact and so are the products in the fp32
// accumulator: the block's dot is formed alone (8 k16 steps into a fresh accumulator), then scaled by sx * sw and
// added to the warp's fp32 totals, blocks in K order.
//
// The end of a key. When the CTA has computed the last unit of a key in its range, its phase warps' totals are
// added in shared memory (red[phase][token][row], phases in order), then
//   - the CTA had the key's whole K range: it stores y;
//   - else CTAs c0 .. c1 each hold a piece of the key. Each stores its piece in ws at (CTA, slot), slot 0 for the
//     first key of its range and 1 for the last (a key strictly inside a CTA's range is whole there, so 2 C slots
//     are enough), and takes a ticket of counters[key]; the CTA with the last ticket adds the pieces of c0, c0 + 1,
//     .., c1 in that order (so the result does not depend on timing), stores y and resets the ticket.
// ws float [2 C, 8 NT, NR] and counters int [Z * G] (zero on entry, zero again on exit) serve cut keys only.
//
// Grid C CTAs of GV_THREADS, GV_SMEM(NT) bytes of dynamic shared memory (2 CTAs fit an SM).

#define GV_WARPS 4
#define GV_THREADS (32 * GV_WARPS)
#define GV_STAGES 4                               // ring slots per warp: 3 units in flight, 1 computed
#define GV_SLOT_X 4096                            // a slot: 32 weight rows x 128 bytes, then the x rows,
#define GV_SLOT_S(NT) (GV_SLOT_X + 1024 * (NT))   // then sx[0 .. 8 NT - 1] and sw at +64,
#define GV_SLOT(NT) (GV_SLOT_S(NT) + 128)         // 16-byte aligned
#define GV_RED(NT) (8 * (NT) * 144 * 4)           // red [KW][8 NT][NR + 4] floats: 8 NT x (128 + 4 KW) at most
#define GV_SMEM(NT) (GV_WARPS * GV_STAGES * GV_SLOT(NT) + GV_RED(NT))

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

// Byte offset of 16-byte chunk x (0..7) of row r of a slot's 128-byte rows. A quarter warp's 16-byte fragment
// loads (lanes 8k .. 8k+7: chunks 4c + q of rows 2k', 2k' + 1) then cover all 32 banks once.
__device__ __forceinline__ int gv_chunk(int r, int x) { return r * 128 + ((x ^ ((r & 1) << 2)) << 4); }

// Token tile z: rows row0 .. row0 + rows - 1 of x8, sx and y, and the weight they multiply. Plain (tiles ==
// nullptr): tokens 8 NT z .. of T. Grouped: row z of the tile table (expert e, first row, end of e's rows), with
// w8 / sw offset to expert e.
struct GvTile {
  const u8* w8;
  const float* sw;
  int row0, rows;
};

template <int NT>
__device__ __forceinline__ GvTile gv_tile(int z, const int* __restrict__ tiles, const u8* __restrict__ w8,
                                          const float* __restrict__ sw, int T, int N, int K) {
  GvTile t;
  if (tiles == nullptr) {
    t.w8 = w8, t.sw = sw, t.row0 = z * 8 * NT, t.rows = min(8 * NT, T - t.row0);
  } else {
    const int* row = tiles + 3 * z;
    const long long e = row[0], KB = (K + 127) / 128, NB = (N + 127) / 128;
    t.w8 = w8 + e * N * K, t.sw = sw + e * NB * KB, t.row0 = row[1], t.rows = min(8 * NT, row[2] - row[1]);
  }
  return t;
}

// One unit into the slot at shared address `slot`: weight rows n0 .. n0 + 31 of block b (zeros past N and K), the
// tile's token rows (zeros past its end) and their scales. Lane l copies chunk l % 8 of rows l / 8 + 4i. Without
// VEC the weight goes through registers and st.shared (any K or alignment; the __syncwarp before its use orders it).
template <int NT, bool VEC>
__device__ __forceinline__ void gv_issue(u32 slot, const GvTile& t, int n0, int b, const u8* __restrict__ x8,
                                         const float* __restrict__ sx, int N, int K, int lane) {
  const int KB = (K + 127) / 128, x = lane & 7, r0 = lane >> 3, col = b * 128 + 16 * x;
  const u8* w = t.w8 + (long long)(n0 + r0) * K + col;  // row n0 + r0 + 4i at w + 4i K
#pragma unroll
  for (int i = 0; i < 8; ++i, w += 4ll * K) {
    const int r = r0 + 4 * i;
    if constexpr (VEC) {  // 16-byte aligned rows, K % 16 == 0: a chunk is wholly inside its row or past its end
      const bool ok = n0 + r < N && col < K;
      cp_async16(slot + gv_chunk(r, x), ok ? w : t.w8, ok ? 16 : 0);
    } else {
      st_shared16(slot + gv_chunk(r, x), n0 + r < N ? load_w16_bytes(w - col, col, K) : zero4());
    }
  }
  const u8* xr = x8 + (long long)(t.row0 + r0) * KB * 128 + col;  // token row r0 + 4i at xr + 4i KP
#pragma unroll
  for (int i = 0; i < 2 * NT; ++i, xr += 4ll * KB * 128) {
    const int r = r0 + 4 * i;
    cp_async16_ca(slot + GV_SLOT_X + gv_chunk(r, x), r < t.rows ? xr : x8, r < t.rows ? 16 : 0);
  }
  if (lane < 8 * NT) {
    const bool ok = lane < t.rows;
    cp_async4(slot + GV_SLOT_S(NT) + 4 * lane, sx + (ok ? (long long)(t.row0 + lane) * KB + b : 0), ok ? 4 : 0);
  }
  if (lane == 31) cp_async4(slot + GV_SLOT_S(NT) + 64, t.sw + (long long)(n0 / 128) * KB + b, 4);
}

// A warp's accumulator fragments [m16 group][n8 tile][element], zeroed.
template <int NT>
__device__ __forceinline__ void gv_zero(float (&a)[2][NT][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) a[r][nt][i] = 0.f;
}

// One unit from its slot (s: a pointer into shared memory) into the warp's totals acc[m16 group r][n8 tile nt][i];
// element i is weight row 16r + g (+8 for i >= 2), token 8nt + 2q + (i & 1).
template <int NT>
__device__ __forceinline__ void gv_compute(const u8* s, float (&acc)[2][NT][4], int lane) {
  const int g = lane >> 2, q = lane & 3;
  uint4 wv[2][2][2], xv[NT][2];  // [m16 group][row g, g + 8][c], [n8 tile][c]
#pragma unroll
  for (int c = 0; c < 2; ++c) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        wv[r][h][c] = *reinterpret_cast<const uint4*>(s + gv_chunk(16 * r + 8 * h + g, 4 * c + q));
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      xv[nt][c] = *reinterpret_cast<const uint4*>(s + GV_SLOT_X + gv_chunk(8 * nt + g, 4 * c + q));
  }
  const float* scale = reinterpret_cast<const float*>(s + GV_SLOT_S(NT));
  const float swb = scale[16];
  float m[NT][2];  // sx * sw for the accumulator columns 2q, 2q+1 of each n8 tile
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 2; ++i) m[nt][i] = scale[8 * nt + 2 * q + i] * swb;

  float d[2][NT][4];
  gv_zero(d);
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

// The end of key `key` in this CTA's range of units, which starts at s (all threads; see the top of the section).
template <int NT>
__device__ __forceinline__ void gv_key_end(const float (&acc)[2][NT][4], long long key, long long s, long long U,
                                           const int* __restrict__ tiles, const u8* __restrict__ w8,
                                           const float* __restrict__ sw, float* __restrict__ y,
                                           float* __restrict__ ws, int* __restrict__ counters, int T, int N, int K,
                                           int kw, int* last) {
  constexpr int TT = 8 * NT;  // token rows of a tile
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
  const int NR = 32 * (GV_WARPS / kw), RS = NR + 4, phase = warp % kw, rset = warp / kw;
  const int KB = (K + 127) / 128, G = (N + NR - 1) / NR;
  const long long C = gridDim.x, c = blockIdx.x;
  const int n0 = (int)(key % G) * NR;  // the key's first weight row
  const GvTile t = gv_tile<NT>((int)(key / G), tiles, w8, sw, T, N, K);

  // red[phase][token][row]: a row stride of NR + 4 floats makes the fragment stores below conflict-free (token
  // 2q + .. moves 8 banks, row g one) and keeps each token's rows 16-byte aligned for the float4 reads.
  float* red = reinterpret_cast<float*>(smem_raw + GV_WARPS * GV_STAGES * GV_SLOT(NT));
  __syncthreads();  // every warp is done with the key, and with red for the last one
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        red[(phase * TT + 8 * nt + 2 * q + (i & 1)) * RS + 32 * rset + 16 * r + 8 * (i >> 1) + g] = acc[r][nt][i];
  __syncthreads();

  // Outputs of the key: the tile's t.rows tokens x NR rows, taken 4 rows at a time (i -> token i / (NR / 4)).
  const int quads = t.rows * (NR / 4);
  auto phases = [&](int tl, int r4) {  // the phase warps' totals, added in phase order
    float4 v = *reinterpret_cast<const float4*>(red + tl * RS + r4);
    for (int p = 1; p < kw; ++p) v = add4(v, *reinterpret_cast<const float4*>(red + (p * TT + tl) * RS + r4));
    return v;
  };
  auto store_y = [&](int tl, int r4, float4 v) {  // rows past N are not stored
    float* out = y + (long long)(t.row0 + tl) * N + n0 + r4;
    const int left = N - n0 - r4;
    if (left > 0) out[0] = v.x;
    if (left > 1) out[1] = v.y;
    if (left > 2) out[2] = v.z;
    if (left > 3) out[3] = v.w;
  };

  const long long k0 = key * KB;
  const long long c0 = ((k0 + 1) * C - 1) / U, c1 = ((k0 + KB) * C - 1) / U;  // the CTAs holding units k0, k0 + KB - 1
  if (c0 == c1) {  // the whole key is this CTA's
    for (int i = tid; i < quads; i += GV_THREADS) {
      const int tl = i / (NR / 4), r4 = 4 * (i % (NR / 4));
      store_y(tl, r4, phases(tl, r4));
    }
    return;
  }
  const long long piece = (long long)TT * NR;  // floats of one ws slot
  float* mine = ws + (2 * c + (key == s / KB ? 0 : 1)) * piece;
  for (int i = tid; i < quads; i += GV_THREADS) {
    const int tl = i / (NR / 4), r4 = 4 * (i % (NR / 4));
    *reinterpret_cast<float4*>(mine + tl * NR + r4) = phases(tl, r4);
  }
  __threadfence();  // this CTA's piece is visible device-wide before its ticket is taken
  __syncthreads();
  if (tid == 0) *last = atomicAdd(counters + key, 1) == (int)(c1 - c0);
  __syncthreads();
  if (!*last) return;
  __threadfence();
  // c0's piece is in its slot 0 if the key is the first of its range (it starts at k0), else in slot 1; every
  // later CTA's range starts inside the key: slot 0.
  const long long first = 2 * c0 + (c0 * U / C == k0 ? 0 : 1);
  for (int i = tid; i < quads; i += GV_THREADS) {
    const int tl = i / (NR / 4), r4 = 4 * (i % (NR / 4));
    const float* at = ws + tl * NR + r4;
    float4 v = ld_cg4(at + first * piece);
    for (long long cc = c0 + 1; cc <= c1; cc += 8) {  // 8 loads in flight (a narrow layer's 9 pieces: one round
      float4 p[8];                                     // trip), added in CTA order
#pragma unroll
      for (int k = 0; k < 8; ++k) p[k] = cc + k <= c1 ? ld_cg4(at + 2 * (cc + k) * piece) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (cc + k <= c1) v = add4(v, p[k]);
    }
    store_y(tl, r4, v);
  }
  if (tid == 0) counters[key] = 0;  // ready for the next launch (kernel boundaries order it)
}

// The whole GEMV, plain (tiles == nullptr: Z token tiles of T rows) or grouped (Z rows of the tile table).
template <int NT, bool VEC>
__device__ __forceinline__ void gemv_body(const u8* __restrict__ x8, const float* __restrict__ sx,
                                          const u8* __restrict__ w8, const float* __restrict__ sw,
                                          float* __restrict__ y, float* __restrict__ ws, int* __restrict__ counters,
                                          const int* __restrict__ tiles, int Z, int T, int N, int K, int kw,
                                          int* last) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int NR = 32 * (GV_WARPS / kw), phase = warp % kw, rset = warp / kw;
  const int KB = (K + 127) / 128, G = (N + NR - 1) / NR;
  const long long U = (long long)Z * G * KB, C = gridDim.x, c = blockIdx.x;
  const long long s = c * U / C, e = (c + 1) * U / C;  // this CTA's units
  const u32 ring = smem_addr(smem_raw) + warp * GV_STAGES * GV_SLOT(NT);
  const u8* ring_p = smem_raw + warp * GV_STAGES * GV_SLOT(NT);

  // This warp's units are s + phase + kw i, i < n. The copies run GV_STAGES - 1 units ahead of the math; (pz, pg,
  // pb) is the (tile, row group, block) of the next unit to copy, pt the tile tz it is in.
  const long long n = e - s > phase ? (e - s - phase + kw - 1) / kw : 0;
  int pz = 0, pg = 0, pb = 0, tz = -1;
  if (n > 0) {
    const long long u = s + phase, key = u / KB;
    pz = (int)(key / G), pg = (int)(key % G), pb = (int)(u % KB);
  }
  GvTile pt = {};
  auto issue = [&](int slot) {
    if (pz != tz) pt = gv_tile<NT>(pz, tiles, w8, sw, T, N, K), tz = pz;
    gv_issue<NT, VEC>(ring + slot * GV_SLOT(NT), pt, pg * NR + 32 * rset, pb, x8, sx, N, K, lane);
    for (pb += kw; pb >= KB; pb -= KB)  // the next unit of the warp, kw blocks on, maybe in a later key
      if (++pg == G) pg = 0, ++pz;
  };
  for (int i = 0; i < GV_STAGES - 1; ++i) {  // one commit group per unit, empty past the warp's last
    if (i < n) issue(i);
    cp_async_commit();
  }

  float acc[2][NT][4];
  long long u = s + phase, i = 0;  // the next unit to compute, and its index among the warp's
  int slot = 0;
  for (long long key = s / KB; key * KB < e; ++key) {  // every key the CTA's range meets, in order
    const long long key_end = e < (key + 1) * KB ? e : (key + 1) * KB;
    gv_zero(acc);
    for (; u < key_end; u += kw, ++i) {
      if (i + GV_STAGES - 1 < n) issue(slot == 0 ? GV_STAGES - 1 : slot - 1);  // refill the slot computed last
      cp_async_commit();
      cp_async_wait<GV_STAGES - 1>();  // this lane's copies of unit i have landed (group i),
      __syncwarp();                    // and every lane's
      gv_compute<NT>(ring_p + slot * GV_SLOT(NT), acc, lane);
      __syncwarp();  // every lane is done reading the slot before the next iteration refills it
      slot = slot == GV_STAGES - 1 ? 0 : slot + 1;
    }
    gv_key_end<NT>(acc, key, s, U, tiles, w8, sw, y, ws, counters, T, N, K, kw, last);
  }
}

#define GEMV_PARAMS                                                                                       \
  const u8 *__restrict__ x8, const float *__restrict__ sx, const u8 *__restrict__ w8,                    \
      const float *__restrict__ sw, float *__restrict__ y, float *__restrict__ ws, int *__restrict__ counters, \
      int T, int N, int K, int vec, int kw, int smem_bytes

// vec and kw are uniform: the load path is chosen once, outside the stream.
template <int NT>
__device__ __forceinline__ void gemv_entry(const u8* __restrict__ x8, const float* __restrict__ sx,
                                           const u8* __restrict__ w8, const float* __restrict__ sw,
                                           float* __restrict__ y, float* __restrict__ ws, int* __restrict__ counters,
                                           const int* __restrict__ tiles, int Z, int T, int N, int K, int vec, int kw,
                                           int smem_bytes) {
  __shared__ int last;
  if (smem_bytes < GV_SMEM(NT) || blockDim.x != GV_THREADS || (kw != 1 && kw != 2 && kw != 4)) trap();
  if (vec)
    gemv_body<NT, true>(x8, sx, w8, sw, y, ws, counters, tiles, Z, T, N, K, kw, &last);
  else
    gemv_body<NT, false>(x8, sx, w8, sw, y, ws, counters, tiles, Z, T, N, K, kw, &last);
}

extern "C" __global__ void __launch_bounds__(GV_THREADS, 2) fp8_gemv_t8(GEMV_PARAMS) {
  gemv_entry<1>(x8, sx, w8, sw, y, ws, counters, nullptr, (T + 7) / 8, T, N, K, vec, kw, smem_bytes);
}
extern "C" __global__ void __launch_bounds__(GV_THREADS, 2) fp8_gemv_t16(GEMV_PARAMS) {
  gemv_entry<2>(x8, sx, w8, sw, y, ws, counters, nullptr, (T + 15) / 16, T, N, K, vec, kw, smem_bytes);
}

// Grouped: rows of x8 sorted by expert, w8 [E, N, K] and sw [E, NB, KB] stacked, and n_tiles token tiles
// tiles[z] = (expert e, first row r0, end of e's rows): tile z is rows r0 .. min(r0 + 8 NT, end) - 1 against expert
// e's weight. Rows from `end` on are the next expert's and are never read.
#define GROUPED_GEMV_PARAMS                                                                               \
  const u8 *__restrict__ x8, const float *__restrict__ sx, const u8 *__restrict__ w8,                    \
      const float *__restrict__ sw, float *__restrict__ y, float *__restrict__ ws, int *__restrict__ counters, \
      const int *__restrict__ tiles, int n_tiles, int N, int K, int vec, int kw, int smem_bytes

extern "C" __global__ void __launch_bounds__(GV_THREADS, 2) fp8_grouped_gemv_t8(GROUPED_GEMV_PARAMS) {
  gemv_entry<1>(x8, sx, w8, sw, y, ws, counters, tiles, n_tiles, 0, N, K, vec, kw, smem_bytes);
}
extern "C" __global__ void __launch_bounds__(GV_THREADS, 2) fp8_grouped_gemv_t16(GROUPED_GEMV_PARAMS) {
  gemv_entry<2>(x8, sx, w8, sw, y, ws, counters, tiles, n_tiles, 0, N, K, vec, kw, smem_bytes);
}

// ---------------------------------------------------------------------------------------------------
// Prefill GEMM on wgmma (sm_90a only): warp-specialised and persistent
//
// Tiling. A CTA tile is 128 tokens x BN weight rows, K in steps of one 128-channel block. One K block of a tile
// is two operand tiles of 128-byte rows in the wgmma 128-byte swizzle: A = x8[m0 .. m0 + 127, 128 kb ..] (16 KB)
// and B = w8[n0 .. n0 + BN - 1, 128 kb ..]. BN is 128 (one weight-scale row a tile), or 96 where that fills the
// SMs better (plan(): 576 rows make 5 tiles of 128, the last half empty, against 6 full ones of 96). A tile of
// 96 rows may straddle two weight-scale rows: its columns from 128 - n0 % 128 on take the second.
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

// Block kb of weight rows [row0, row0 + BN) into a swizzled tile; rows past N and columns past K are zeros.
// VEC: cp.async only. Else plain loads and st.shared, which the caller must make visible to wgmma itself.
template <bool VEC, int BN>
__device__ __forceinline__ void load_w_tile(u32 dst, const u8* __restrict__ w8, int row0, int N, int K, int kb,
                                            int ptid) {
#pragma unroll
  for (int it = 0; it < BN * 8 / GM_PRODUCERS; ++it) {
    const int i = ptid + it * GM_PRODUCERS, r = i / 8, x = i % 8;
    const int col = kb * 128 + x * 16;
    if constexpr (VEC) {
      const bool ok = row0 + r < N && col < K;
      cp_async16(dst + swizzle128_off(r, x), w8 + (ok ? (long long)(row0 + r) * K + col : 0), ok ? 16 : 0);
    } else {
      const uint4 v = row0 + r < N ? load_w16_bytes(w8 + (long long)(row0 + r) * K, col, K) : zero4();
      st_shared16(dst + swizzle128_off(r, x), v);
    }
  }
}

// Where tile i of the raster reads and writes: token rows m0 .. min(m0 + 128, end) - 1 (rows of x8, sx and y
// from `end` on are neither read nor written) times weight rows BN * tile_n .. + BN - 1 of w8 / sw. Without a
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
template <bool VEC, int BN>
__device__ __forceinline__ void gemm_producer(const GmRing& ring, const u8* __restrict__ x8,
                                              const u8* __restrict__ w8, const float* __restrict__ sw,
                                              const int* __restrict__ tiles, int tiles_m, int T, int N, int K) {
  const int ptid = threadIdx.x - GM_CONSUMERS;
  const int KB = (K + 127) / 128, KP = KB * 128, tiles_n = (N + BN - 1) / BN;
  int s = 0;
  u32 phase = 0;
  for (int i = blockIdx.x; i < tiles_m * tiles_n; i += gridDim.x) {
    const GmTile t = gm_tile(i, tiles, tiles_m, tiles_n, w8, sw, T, N, K);
    for (int kb = 0; kb < KB; ++kb) {
      mbar_wait(ring.empty_bar(s), phase ^ 1);  // both consumer warpgroups are done with the slot's last use
      load_x_tile(ring.a_slot(s), x8, t.m0, t.end, KP, kb, ptid);
      load_w_tile<VEC, BN>(ring.b_slot(s), t.w8, t.tile_n * BN, N, K, kb, ptid);
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

// acc (a wgmma D layout, BN columns) -> y rows tA, tB (those < end), columns n0 + 8j + 2(lane%4) + {0,1} (< N).
template <int BN>
__device__ __forceinline__ void store_tile(float* __restrict__ y, const float* acc, int tA, int tB, int end, int n0,
                                           int N, int lane) {
  const bool pairs = (N % 2) == 0;  // then (t * N + n) is even for even n: float2 stores are aligned
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
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
template <int BN>
__device__ __forceinline__ void gemm_consumer(const GmRing& ring, const float* __restrict__ sx,
                                              const u8* __restrict__ w8, const float* __restrict__ sw,
                                              float* __restrict__ y, const int* __restrict__ tiles, int tiles_m,
                                              int T, int N, int K) {
  const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, wv = (tid >> 5) & 3;
  const int KB = (K + 127) / 128, tiles_n = (N + BN - 1) / BN;
  int s = 0;
  u32 phase = 0;
  float acc[BN / 2], d[BN / 2];
  for (int i = blockIdx.x; i < tiles_m * tiles_n; i += gridDim.x) {
    const GmTile t = gm_tile(i, tiles, tiles_m, tiles_n, w8, sw, T, N, K);
    // This thread's accumulator rows (tokens), and the weight-scale rows of the tile's weight rows: sw0's, and
    // from column `split` on (BN < 128 only) the next one's.
    const int tA = t.m0 + wg * 64 + wv * 16 + (lane >> 2), tB = tA + 8;
    const float* sxA = sx + (long long)(tA < t.end ? tA : 0) * KB;
    const float* sxB = sx + (long long)(tB < t.end ? tB : 0) * KB;
    const int n0 = t.tile_n * BN, split = 128 - n0 % 128;
    const float* sw0 = t.sw + (long long)(n0 / 128) * KB;
    const float* sw1 = sw0 + (split < BN && n0 + split < N ? KB : 0);
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) acc[j] = 0.f;

    for (int kb = 0; kb < KB; ++kb) {
      mbar_wait(ring.full_bar(s), phase);
      // The slot was written through the generic proxy (cp.async) and wgmma reads it through the async one.
      fence_proxy_async();
      // The scales are loaded before the MMAs are issued, and used after them: the MMAs hide their latency.
      const float sw0b = ld_nc(sw0 + kb), sw1b = BN < 128 ? ld_nc(sw1 + kb) : sw0b;
      const float xA = ld_nc(sxA + kb), xB = ld_nc(sxB + kb);
      const u32 a_tile = ring.a_slot(s) + wg * 64 * 128, b_tile = ring.b_slot(s);
      fence_regs<BN / 2>(d);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < 4; ++c)  // the 32-byte k steps; the hardware applies the swizzle to +32c
        wgmma_step<true, BN>(d, make_desc<128>(a_tile + 32 * c), make_desc<128>(b_tile + 32 * c), c > 0);
      wgmma_commit();
      wgmma_wait0();
      fence_regs<BN / 2>(d);
      if (lane == 0) mbar_arrive(ring.empty_bar(s));  // this warp's reads of the slot are done
      if (++s == GM_STAGES) s = 0, phase ^= 1;
      const float mA0 = xA * sw0b, mB0 = xB * sw0b, mA1 = xA * sw1b, mB1 = xB * sw1b;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {  // columns 8j ..: a multiple of 8, as split is
        const float mA = 8 * j < split ? mA0 : mA1, mB = 8 * j < split ? mB0 : mB1;
        acc[4 * j + 0] += d[4 * j + 0] * mA;
        acc[4 * j + 1] += d[4 * j + 1] * mA;
        acc[4 * j + 2] += d[4 * j + 2] * mB;
        acc[4 * j + 3] += d[4 * j + 3] * mB;
      }
    }
    store_tile<BN>(y, acc, tA, tB, t.end, n0, N, lane);
  }
}

// The whole prefill kernel, plain (tiles == nullptr: token tiles of T rows) or grouped (tiles_m rows of the
// tile table), tiles of BN weight rows; a trap where wgmma was not built.
template <int BN>
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
      gemm_producer<true, BN>(ring, x8, w8, sw, tiles, tiles_m, T, N, K);
    else
      gemm_producer<false, BN>(ring, x8, w8, sw, tiles, tiles_m, T, N, K);
  } else {
    gemm_consumer<BN>(ring, sx, w8, sw, y, tiles, tiles_m, T, N, K);
  }
}
#else
template <int BN>
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
  gemm_wgmma<128>(x8, sx, w8, sw, y, nullptr, (T + GM_BM - 1) / GM_BM, T, N, K, vec, smem_bytes);
}

// The same with tiles of 96 weight rows.
extern "C" __global__ void __launch_bounds__(GM_THREADS, 1)
    fp8_gemm_wgmma_n96(const u8* __restrict__ x8, const float* __restrict__ sx, const u8* __restrict__ w8,
                       const float* __restrict__ sw, float* __restrict__ y, int T, int N, int K, int vec,
                       int smem_bytes) {
  gemm_wgmma<96>(x8, sx, w8, sw, y, nullptr, (T + GM_BM - 1) / GM_BM, T, N, K, vec, smem_bytes);
}

// Grouped: rows of x8 sorted by expert, w8 [E, N, K] and sw [E, NB, KB] stacked, and n_mtiles token tiles
// tiles[i] = (expert e, first row r0, end of e's rows): a tile runs rows r0 .. min(r0 + 128, end) - 1, never
// two experts'. The same raster over n_mtiles x ceil(N / 128): an expert's token tiles sit side by side, so
// where it has several, their CTAs share its weight tiles through L2.
extern "C" __global__ void __launch_bounds__(GM_THREADS, 1)
    fp8_grouped_gemm_wgmma(const u8* __restrict__ x8, const float* __restrict__ sx, const u8* __restrict__ w8,
                           const float* __restrict__ sw, float* __restrict__ y, const int* __restrict__ tiles,
                           int n_mtiles, int N, int K, int vec, int smem_bytes) {
  gemm_wgmma<128>(x8, sx, w8, sw, y, tiles, n_mtiles, 0, N, K, vec, smem_bytes);
}
