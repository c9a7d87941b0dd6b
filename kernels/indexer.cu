// DSA indexer scores, fused: tensor-core dot products, ReLU, per-head weights and head sum in one pass.
//
//   I[t, s] = ks[s] * sum_h (w[t,h] * qs[t,h]) * ReLU(q[t,h,:] . k[s,:])    start[t] <= s < end[t]
//   I[t, s] = -inf                                                         every other s in [0, N)
//
// HISA's block scores use the same kernels on the pooled keys (one key per block of B positions) with
// end_div = B and force = 1: query t sees blocks [0, ceil(ends[t] / B)) (ends in positions), and block 0
// and block (ends[t] - 1) / B (its own, when ends[t] >= 1 and that block is < N) are set to +inf, in
// every row t < T, also where the row sees nothing (kernels/indexer.py:hisa_block_scores_reference).
//
// fp8 kernels: q, k are e4m3 bytes with positive per-(t,h) and per-s scales qs, ks, so ks factors out of
// the ReLU (applied after the head sum) and qs folds into w. bf16 kernels: qs = ks = 1 (not read).
// The [T, HI, N] per-head logits never leave registers.
//
// Arguments (row-major, contiguous; HI and DI are compile-time -D defines, DI in {64, 128},
// HI in {4, 8, 16, 32, 64}; DB = bytes per q/k row = DI for fp8, 2*DI for bf16):
//   q      [T, HI, DI]  e4m3 bytes (fp8) or bf16 bit patterns (bf16); 16-byte aligned
//   qs     float [T, HI]                       (fp8 only)
//   w      float [T, HI]
//   k      [N, DI]      e4m3 bytes or bf16 bits; 16-byte aligned
//   ks     float [N]                           (fp8 only)
//   starts, ends  int [T]; clamped here to [0, N], so a bad range cannot fault (the launcher checks);
//                 starts may be null (all 0)
//   out    float [T, N]; every element is written (64-bit offsets: T*N may exceed 2^31)
//   smem_bytes    the dynamic shared memory the launcher gave; the kernel traps if it is too small
//   end_div       >= 1: row t's range ends at ceil(ends[t] / end_div) (1 for DSA, B for HISA's blocks)
//   force         1: columns 0 and (ends[t] - 1) / end_div of row t are +inf (HISA's forced blocks)
//
// Launch: grid (ceil(T / QCTA), splits), block NTH threads, dynamic shared memory as computed by
// kernels/indexer.py (_layout). CTA x owns the QCTA queries of block gridDim.x-1-x (late, long
// causal rows first) and, with splits > 1, one slice of the key axis (whole BK tiles), so that a few
// queries (decode) still spread over every SM. Per CTA:
//   1. the union [lo, hi) of its rows' [start, end) ranges, cut to its key slice, in BK-key tiles;
//      columns of the slice outside those tiles get -inf straight away (causal prefill: half the work
//      skipped). A CTA writes only its own slice, so a forced (+inf) column is written, like any
//      other, by the one CTA whose slice holds it: in the -inf fill or in step 4;
//   2. a STAGES-deep cp.async ring streams k tiles into shared memory (16-byte chunks, XOR swizzle);
//   3. tensor cores compute the [keys, query-heads] logits; ReLU, weight and head sum in registers
//      (quad shuffles), per-(query, key) sums to a small shared buffer S;
//   4. the previous tile's S goes out: masked to -inf outside each row's range, times ks, forced columns
//      +inf, streaming stores.
// Two tensor-core paths with the same plan:
//   index_scores_wgmma_*  sm_90a warpgroup MMA (wgmma, real fp8 rate on Hopper). 2 warpgroups, 256
//     threads. M = 64 keys per warpgroup from the shared k tile, N = NCOL query-head columns of Q, held
//     in shared memory, K = DB bytes in 32-byte steps. Both operands K-major with the 128-byte (DB >= 128)
//     or 64-byte (DB = 64) swizzle. "prefill": NCOL = 128, the warpgroups take different queries of one
//     64-key tile, each QR Q blocks in turn (fp8 QR = 2: QCTA = 512/HI, 8 queries at HI = 64, so a k tile
//     read from L2 feeds ~1000 tensor clocks; bf16 QR = 1: QCTA = 256/HI); "_decode": NCOL = 64, one set
//     of queries, the warpgroups take the two halves of a 128-key tile (QCTA = 64/HI). The issuing
//     warpgroup waits for its MMAs before its epilogue; tensor work overlaps the CUDA-core epilogue
//     across the 2 warpgroups x 2 resident CTAs per SM. Built only for sm_90a; elsewhere they trap.
//   index_scores_mma_*    mma.sync m16n8k16 (f16 for e4m3 data, converted exactly; bf16 as is), any
//     sm_89+. NW warps, each owning 32 query-head columns with Q in registers; every warp sweeps the
//     whole 64-key tile in m16 steps with ldmatrix. "prefill" NW = 8 (QCTA = 256/HI), "_decode" NW = 2
//     (QCTA = 64/HI). When HI = 64 two warps share a query and S holds both halves. (On sm_90, fp8
//     mma.sync is itself lowered to f16 HMMA, so this is the rate of the f16 path, about half of wgmma fp8.)
//
// NVRTC-compatible: no #include, no std::, extern "C" entry points. The cp.async, swizzle and wgmma helpers
// come from kernels/hopper.cuh: nvcc finds it beside this file; for NVRTC kernels/_cuda.py:source pastes
// it in place of the #include:
#include "hopper.cuh"

#ifndef HI
#define HI 64
#endif
#ifndef DI
#define DI 128
#endif

static_assert(HI == 4 || HI == 8 || HI == 16 || HI == 32 || HI == 64, "HI must be 4, 8, 16, 32 or 64");
static_assert(DI == 64 || DI == 128, "DI must be 64 or 128");

#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)
#define FULL_MASK 0xffffffffu

extern __shared__ __align__(1024) u8 smem_raw[];

// ---------------------------------------------------------------------------------------------------
// Tiles

// Rows [row0, row0 + R) of a [nrows, DB] byte matrix into a swizzled shared tile; missing rows are zeros.
template <int DB, int R, int NTH>
__device__ __forceinline__ void load_tile(u32 dst, const u8* __restrict__ src, long long row0, long long nrows,
                                          int tid) {
  constexpr int CPR = DB / 16;  // chunks per row
#pragma unroll
  for (int it = 0; it < (R * CPR + NTH - 1) / NTH; ++it) {
    const int i = tid + it * NTH;
    if ((R * CPR) % NTH != 0 && i >= R * CPR) break;
    const int r = i / CPR, x = i % CPR;
    const long long gr = row0 + r;
    const bool ok = gr < nrows;
    cp_async16(dst + tile_off<DB, R>(r, x), src + (ok ? gr : 0) * DB + x * 16, ok ? 16 : 0);
  }
}

// ---------------------------------------------------------------------------------------------------
// The CTA's plan: its rows' ranges, its key slice, the BK tiles it computes; -inf for the rest.

struct Plan {
  int t0;       // first query of the CTA
  int c0, c1;   // the CTA's key slice [c0, c1), c0 a multiple of BK
  int kt0, nt;  // tiles kt0 .. kt0+nt-1 are computed
};

// Column s of a row is forced to +inf (HISA): block 0 and the row's own block rf (-1: none).
__device__ __forceinline__ bool forced(int force, int s, int rf) { return force && (s == 0 || s == rf); }

// rs, re, rf: per row of the CTA, its range [rs, re) and its forced own column (-1: none).
template <int QCTA, int BK, int NTH>
__device__ __forceinline__ Plan make_plan(const int* __restrict__ starts, const int* __restrict__ ends,
                                          float* __restrict__ out, int T, int N, int end_div, int force, int* rs,
                                          int* re, int* rf, int tid) {
  Plan p;
  p.t0 = (gridDim.x - 1 - blockIdx.x) * QCTA;
  const int tiles = (N + BK - 1) / BK;
  const int per_split = (tiles + gridDim.y - 1) / gridDim.y;
  p.c0 = min((int)blockIdx.y * per_split, tiles) * BK;
  p.c0 = min(p.c0, N);
  p.c1 = min(p.c0 + per_split * BK, N);
  for (int i = tid; i < QCTA; i += NTH) {
    const int t = p.t0 + i;
    int s = 0, e = 0, f = -1;  // rows past T: empty
    if (t < T) {
      const int et = ends[t];
      s = starts ? max(starts[t], 0) : 0;
      e = et > 0 ? min((et - 1) / end_div + 1, N) : 0;  // ceil(et / end_div), no overflow near 2^31
      if (force && et > 0) f = (et - 1) / end_div;     // >= N: no such column, never matched
    }
    rs[i] = s;
    re[i] = e;
    rf[i] = f;
  }
  __syncthreads();
  int lo = N, hi = 0;
  for (int i = 0; i < QCTA; ++i) {
    if (rs[i] < re[i]) {
      lo = min(lo, rs[i]);
      hi = max(hi, re[i]);
    }
  }
  lo = max(lo, p.c0);
  hi = min(hi, p.c1);
  p.kt0 = 0;
  p.nt = 0;
  if (lo < hi) {
    p.kt0 = lo / BK;
    p.nt = (hi + BK - 1) / BK - p.kt0;
  }
  // -inf for the slice's columns outside the computed tiles.
  const int fill_to = p.nt ? p.kt0 * BK : p.c1;                    // [c0, fill_to)
  const int fill_from = p.nt ? min((p.kt0 + p.nt) * BK, p.c1) : p.c1;  // [fill_from, c1)
  for (int i = 0; i < QCTA; ++i) {
    const int t = p.t0 + i;
    if (t >= T) break;
    float* row = out + (long long)t * N;
    const int f = rf[i];
    for (int s = p.c0 + tid; s < fill_to; s += NTH) st_stream(row + s, forced(force, s, f) ? POS_INF : NEG_INF);
    for (int s = fill_from + tid; s < p.c1; s += NTH) st_stream(row + s, forced(force, s, f) ? POS_INF : NEG_INF);
  }
  return p;
}

// One finished tile: S holds NPART partial head sums per (query, key); mask, scale by ks, force, store.
template <bool FP8, int QCTA, int BK, int NPART, int NTH>
__device__ __forceinline__ void write_tile(const Plan& p, int kbase, const float* S, const int* rs, const int* re,
                                           const int* rf, int force, const float* __restrict__ ks,
                                           float* __restrict__ out, int T, int N, int tid) {
#pragma unroll 4
  for (int i = tid; i < QCTA * BK; i += NTH) {
    const int ql = i / BK, c = i % BK;
    const int t = p.t0 + ql, s = kbase + c;
    if (t >= T || s >= p.c1) continue;
    const bool f = forced(force, s, rf[ql]);
    float v = f ? POS_INF : NEG_INF;
    if (!f && s >= rs[ql] && s < re[ql]) {
      v = S[i];
      if constexpr (NPART == 2) v += S[QCTA * BK + i];
      if constexpr (FP8) v *= ks[s];
    }
    st_stream(out + (long long)t * N + s, v);
  }
}

// Head sum of an m16 x (NT*8) accumulator block in the mma/wgmma C layout: this thread holds rows
// g = lane/4 and g+8, columns 8j + 2t + {0,1} (t = lane%4) in acc[4j + {0,1}] and acc[4j + {2,3}].
// Column n of the block is head n % HI of query q0 + n / HI (when HI > NT*8 the block is part of one
// query). wcol: the block's weights (w*qs) in shared memory. Writes sum_h w ReLU(logit) to
// S[q * BK + row] and S[q * BK + row + 8].
template <int NT, int BK>
__device__ __forceinline__ void head_sum(const float* acc, const float* wcol, float* S, int q0, int row, int lane) {
  const int t = lane & 3;
  if constexpr (HI >= 8) {
    constexpr int TPQ = (HI / 8 < NT) ? HI / 8 : NT;  // n8 tiles per query (in this block)
#pragma unroll
    for (int qi = 0; qi < NT / TPQ; ++qi) {
      float a = 0.f, b = 0.f;
#pragma unroll
      for (int jj = 0; jj < TPQ; ++jj) {
        const int j = qi * TPQ + jj;
        const float2 wv = *reinterpret_cast<const float2*>(wcol + 8 * j + 2 * t);
        a += wv.x * fmaxf(acc[4 * j + 0], 0.f) + wv.y * fmaxf(acc[4 * j + 1], 0.f);
        b += wv.x * fmaxf(acc[4 * j + 2], 0.f) + wv.y * fmaxf(acc[4 * j + 3], 0.f);
      }
      a += __shfl_xor_sync(FULL_MASK, a, 1);
      b += __shfl_xor_sync(FULL_MASK, b, 1);
      a += __shfl_xor_sync(FULL_MASK, a, 2);
      b += __shfl_xor_sync(FULL_MASK, b, 2);
      if (t == 0) {
        S[(q0 + qi) * BK + row] = a;
        S[(q0 + qi) * BK + row + 8] = b;
      }
    }
  } else {  // HI == 4: an n8 tile holds two queries, lanes t = 0,1 the first and t = 2,3 the second
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float2 wv = *reinterpret_cast<const float2*>(wcol + 8 * j + 2 * t);
      float a = wv.x * fmaxf(acc[4 * j + 0], 0.f) + wv.y * fmaxf(acc[4 * j + 1], 0.f);
      float b = wv.x * fmaxf(acc[4 * j + 2], 0.f) + wv.y * fmaxf(acc[4 * j + 3], 0.f);
      a += __shfl_xor_sync(FULL_MASK, a, 1);
      b += __shfl_xor_sync(FULL_MASK, b, 1);
      if ((t & 1) == 0) {
        const int qq = q0 + 2 * j + (t >> 1);
        S[qq * BK + row] = a;
        S[qq * BK + row + 8] = b;
      }
    }
  }
}

// Per-column weights w * qs (0 past the last query) into shared memory.
template <bool FP8, int NTH>
__device__ __forceinline__ void load_weights(float* W, int ncols, const float* __restrict__ w,
                                             const float* __restrict__ qs, long long row0, long long nrows, int tid) {
  for (int n = tid; n < ncols; n += NTH) {
    const long long r = row0 + n;
    float v = 0.f;
    if (r < nrows) {
      v = w[r];
      if constexpr (FP8) v *= qs[r];
    }
    W[n] = v;
  }
}

#define INDEXER_PARAMS                                                                                   \
  const u8 *__restrict__ q, const float *__restrict__ qs, const float *__restrict__ w,                  \
      const u8 *__restrict__ k, const float *__restrict__ ks, const int *__restrict__ starts,           \
      const int *__restrict__ ends, float *__restrict__ out, int T, int N, int smem_bytes, int end_div, int force
#define INDEXER_ARGS q, qs, w, k, ks, starts, ends, out, T, N, smem_bytes, end_div, force

// ---------------------------------------------------------------------------------------------------
// mma.sync path (sm_89+)

__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 v16) {  // low byte -> low half
  u32 r;
  const u16 h = (u16)v16;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(h));
  return r;
}

__device__ __forceinline__ void ldmatrix_x4(u32* r, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

template <bool FP8>
__device__ __forceinline__ void mma_16816(float* c, const u32* a, const u32* b) {
  if constexpr (FP8) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// K-order bookkeeping: a 32-byte chunk c of a row holds k = 32c..32c+31 (fp8) or 16c..16c+15 (bf16).
// ldmatrix.x4 of rows m..m+15 x chunk c gives each thread (g = lane/4, t = lane%4) the 4-byte words
// r0 = (row g, bytes 4t..), r1 = (row g+8, bytes 4t..), r2 = (row g, bytes 16+4t..), r3 = (row g+8,
// bytes 16+4t..): exactly the m16n8k16 A fragment for bf16. For e4m3 each word holds 4 values; its low
// two (converted to f16x2) form one k16 step and its high two a second one. The dot product does not
// care in which order k is summed, so Q's B fragment only has to use the same split: per column
// (row g of Q) the words at bytes 4t and 16+4t of chunk c, low halves for step 2c, high for 2c+1.
template <bool FP8, int NW>
__device__ __forceinline__ void mma_body(INDEXER_PARAMS) {
  constexpr int DB = FP8 ? DI : 2 * DI;
  constexpr int NTH = NW * 32;
  constexpr int COLS = NW * 32;                   // query-head columns of the CTA
  static_assert(COLS % HI == 0, "a CTA holds whole queries");
  constexpr int QCTA = COLS / HI;
  constexpr int NPART = HI > 32 ? HI / 32 : 1;    // warps per query
  constexpr int BK = 64, STAGES = 4;
  constexpr int CHUNKS = DB / 32, KSTEPS = DI / 16;
  constexpr int K_BYTES = BK * DB;
  constexpr int OFF_S = STAGES * K_BYTES;
  constexpr int S_FLOATS = NPART * QCTA * BK;     // one buffer
  constexpr int OFF_W = OFF_S + 2 * S_FLOATS * 4;
  constexpr int OFF_R = OFF_W + COLS * 4;
  constexpr int SMEM = OFF_R + 3 * QCTA * 4;
  if (smem_bytes < SMEM) trap();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3;
  u8* sm = smem_raw;
  const u32 k_s = smem_addr(sm);
  float* S = reinterpret_cast<float*>(sm + OFF_S);
  float* W = reinterpret_cast<float*>(sm + OFF_W);
  int* rs = reinterpret_cast<int*>(sm + OFF_R);
  int* re = rs + QCTA;
  int* rf = re + QCTA;

  const Plan p = make_plan<QCTA, BK, NTH>(starts, ends, out, T, N, end_div, force, rs, re, rf, tid);
  if (p.nt == 0) return;

  const long long qrows = (long long)T * HI, row0 = (long long)p.t0 * HI;
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < p.nt) load_tile<DB, BK, NTH>(k_s + s * K_BYTES, k, (long long)(p.kt0 + s) * BK, N, tid);
    cp_async_commit();
  }
  load_weights<FP8, NTH>(W, COLS, w, qs, row0, qrows, tid);

  // This warp's 32 columns of Q as B fragments, straight from global memory.
  u32 qf[4][KSTEPS][2];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const long long r = row0 + warp * 32 + 8 * j + g;
    const bool ok = r < qrows;
    const u8* qp = q + (ok ? r : 0) * DB;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const u32 w0 = ok ? *reinterpret_cast<const u32*>(qp + 32 * c + 4 * tq) : 0u;
      const u32 w1 = ok ? *reinterpret_cast<const u32*>(qp + 32 * c + 16 + 4 * tq) : 0u;
      if constexpr (FP8) {
        qf[j][2 * c][0] = e4m3x2_to_f16x2(w0);
        qf[j][2 * c][1] = e4m3x2_to_f16x2(w1);
        qf[j][2 * c + 1][0] = e4m3x2_to_f16x2(w0 >> 16);
        qf[j][2 * c + 1][1] = e4m3x2_to_f16x2(w1 >> 16);
      } else {
        qf[j][c][0] = w0;
        qf[j][c][1] = w1;
      }
    }
  }
  const int q0 = warp * 32 / HI, part = NPART > 1 ? warp % NPART : 0;
  const float* wcol = W + warp * 32;
  // ldmatrix source row/chunk of this lane within an m16 x 32-byte block
  const int lrow = (lane & 7) + ((lane >> 3) & 1) * 8, lchunk = lane >> 4;

  for (int it = 0; it < p.nt; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile it landed for all; tile it-1's stage and S buffer are free again
    if (it + STAGES - 1 < p.nt)
      load_tile<DB, BK, NTH>(k_s + ((it + STAGES - 1) % STAGES) * K_BYTES, k,
                             (long long)(p.kt0 + it + STAGES - 1) * BK, N, tid);
    cp_async_commit();

    const u32 stage = k_s + (it % STAGES) * K_BYTES;
    float* Sb = S + (it & 1) * S_FLOATS + part * QCTA * BK;
#pragma unroll 1
    for (int m = 0; m < BK / 16; ++m) {
      float acc[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) acc[i] = 0.f;
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        u32 a[4];
        ldmatrix_x4(a, stage + tile_off<DB, BK>(m * 16 + lrow, 2 * c + lchunk));
        if constexpr (FP8) {
          u32 lo[4], hi[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            lo[i] = e4m3x2_to_f16x2(a[i]);
            hi[i] = e4m3x2_to_f16x2(a[i] >> 16);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) mma_16816<true>(acc + 4 * j, lo, qf[j][2 * c]);
#pragma unroll
          for (int j = 0; j < 4; ++j) mma_16816<true>(acc + 4 * j, hi, qf[j][2 * c + 1]);
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) mma_16816<false>(acc + 4 * j, a, qf[j][c]);
        }
      }
      head_sum<4, BK>(acc, wcol, Sb, q0, m * 16 + g, lane);
    }
    if (it > 0)
      write_tile<FP8, QCTA, BK, NPART, NTH>(p, (p.kt0 + it - 1) * BK, S + ((it - 1) & 1) * S_FLOATS, rs, re, rf,
                                            force, ks, out, T, N, tid);
  }
  __syncthreads();
  write_tile<FP8, QCTA, BK, NPART, NTH>(p, (p.kt0 + p.nt - 1) * BK, S + ((p.nt - 1) & 1) * S_FLOATS, rs, re, rf,
                                        force, ks, out, T, N, tid);
}

// ---------------------------------------------------------------------------------------------------
// wgmma path (sm_90a only)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// QG query groups x KS key halves = 2 warpgroups. Warpgroup wg takes key rows (KS == 2 ? wg : 0) * 64
// .. +63 of the BK = 64*KS key tile and, one after the other (QR rounds, reusing the accumulators), the
// Q blocks (QG == 2 ? wg : 0) * QR .. +QR-1 of NCOL columns each. More rounds = more queries per k tile
// = less L2 traffic per FLOP (at the fp8 rate a 64-key tile feeds 8 queries in ~1000 tensor clocks).
template <bool FP8, int NCOL, int QG, int KS, int QR>
__device__ __forceinline__ void wgmma_body(INDEXER_PARAMS) {
  static_assert(QG * KS == 2, "two warpgroups");
  constexpr int DB = FP8 ? DI : 2 * DI;
  constexpr int NTH = 256, BK = 64 * KS, STAGES = 4;
  static_assert(NCOL % HI == 0, "a warpgroup holds whole queries");
  constexpr int QB = QG * QR;  // Q blocks of NCOL columns
  constexpr int QCTA = QB * NCOL / HI;
  constexpr int Q_BLK = NCOL * DB, K_BYTES = BK * DB;  // multiples of 1024: swizzle atoms stay aligned
  constexpr int OFF_K = QB * Q_BLK;
  constexpr int OFF_S = OFF_K + STAGES * K_BYTES;
  constexpr int S_FLOATS = QCTA * BK;
  constexpr int OFF_W = OFF_S + 2 * S_FLOATS * 4;
  constexpr int OFF_R = OFF_W + QB * NCOL * 4;
  constexpr int SMEM = OFF_R + 3 * QCTA * 4 + 1024;  // + worst-case alignment of the base to 1024
  if (smem_bytes < SMEM) trap();

  const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, wv = (tid >> 5) & 3;
  const u32 raw = smem_addr(smem_raw);
  const u32 pad = (1024 - (raw & 1023)) & 1023;
  u8* sm = smem_raw + pad;
  const u32 base = raw + pad;
  const u32 q_s = base, k_s = base + OFF_K;
  float* S = reinterpret_cast<float*>(sm + OFF_S);
  float* W = reinterpret_cast<float*>(sm + OFF_W);
  int* rs = reinterpret_cast<int*>(sm + OFF_R);
  int* re = rs + QCTA;
  int* rf = re + QCTA;

  const Plan p = make_plan<QCTA, BK, NTH>(starts, ends, out, T, N, end_div, force, rs, re, rf, tid);
  if (p.nt == 0) return;

  const long long qrows = (long long)T * HI, row0 = (long long)p.t0 * HI;
#pragma unroll
  for (int b = 0; b < QB; ++b) load_tile<DB, NCOL, NTH>(q_s + b * Q_BLK, q, row0 + b * NCOL, qrows, tid);
  for (int s = 0; s < STAGES - 1; ++s) {  // Q rides in group 0 with the first k tile
    if (s < p.nt) load_tile<DB, BK, NTH>(k_s + s * K_BYTES, k, (long long)(p.kt0 + s) * BK, N, tid);
    cp_async_commit();
  }
  load_weights<FP8, NTH>(W, QB * NCOL, w, qs, row0, qrows, tid);

  const int b0 = (QG == 2 ? wg : 0) * QR, kh = KS == 2 ? wg : 0;
  const int row = kh * 64 + wv * 16 + (lane >> 2);  // this thread's first key row in the tile
  float acc[NCOL / 2];

  for (int it = 0; it < p.nt; ++it) {
    cp_async_wait<STAGES - 2>();
    fence_proxy_async();
    __syncthreads();  // tile it landed for all; tile it-1's stage and S buffer are free again
    if (it + STAGES - 1 < p.nt)
      load_tile<DB, BK, NTH>(k_s + ((it + STAGES - 1) % STAGES) * K_BYTES, k,
                             (long long)(p.kt0 + it + STAGES - 1) * BK, N, tid);
    cp_async_commit();

    const u32 stage = k_s + (it % STAGES) * K_BYTES;
#pragma unroll
    for (int r = 0; r < QR; ++r) {
      const int b = b0 + r;
      wgmma_rows<FP8, DB, BK, NCOL, NCOL>(acc, stage, kh * 64, q_s + b * Q_BLK);
      wgmma_wait0();
      fence_regs<NCOL / 2>(acc);
      head_sum<NCOL / 8, BK>(acc, W + b * NCOL, S + (it & 1) * S_FLOATS, b * (NCOL / HI), row, lane);
    }
    if (it > 0)
      write_tile<FP8, QCTA, BK, 1, NTH>(p, (p.kt0 + it - 1) * BK, S + ((it - 1) & 1) * S_FLOATS, rs, re, rf,
                                        force, ks, out, T, N, tid);
  }
  __syncthreads();
  write_tile<FP8, QCTA, BK, 1, NTH>(p, (p.kt0 + p.nt - 1) * BK, S + ((p.nt - 1) & 1) * S_FLOATS, rs, re, rf,
                                    force, ks, out, T, N, tid);
}

#define WGMMA_BODY(...) wgmma_body<__VA_ARGS__>(INDEXER_ARGS)
#else
#define WGMMA_BODY(...) trap()  // wgmma needs sm_90a: launching these elsewhere is a bug
#endif

// ---------------------------------------------------------------------------------------------------
// Entry points

extern "C" __global__ void __launch_bounds__(256, 2) index_scores_wgmma_fp8(INDEXER_PARAMS) {
  WGMMA_BODY(true, 128, 2, 1, 2);
}
extern "C" __global__ void __launch_bounds__(256, 2) index_scores_wgmma_fp8_decode(INDEXER_PARAMS) {
  WGMMA_BODY(true, 64, 1, 2, 1);
}
extern "C" __global__ void __launch_bounds__(256, 1) index_scores_wgmma_bf16(INDEXER_PARAMS) {
  WGMMA_BODY(false, 128, 2, 1, 1);
}
extern "C" __global__ void __launch_bounds__(256, 2) index_scores_wgmma_bf16_decode(INDEXER_PARAMS) {
  WGMMA_BODY(false, 64, 1, 2, 1);
}
extern "C" __global__ void __launch_bounds__(256, 2) index_scores_mma_fp8(INDEXER_PARAMS) {
  mma_body<true, 8>(INDEXER_ARGS);
}
extern "C" __global__ void __launch_bounds__(64, 4) index_scores_mma_fp8_decode(INDEXER_PARAMS) {
  mma_body<true, 2>(INDEXER_ARGS);
}
extern "C" __global__ void __launch_bounds__(256, 2) index_scores_mma_bf16(INDEXER_PARAMS) {
  mma_body<false, 8>(INDEXER_ARGS);
}
extern "C" __global__ void __launch_bounds__(64, 4) index_scores_mma_bf16_decode(INDEXER_PARAMS) {
  mma_body<false, 2>(INDEXER_ARGS);
}
