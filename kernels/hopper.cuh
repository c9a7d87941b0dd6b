// Hopper device helpers shared by the kernel files: inline-PTX wrappers for cp.async, the 128/64-byte
// swizzled shared tiles that wgmma reads, wgmma itself (m64nNk32 e4m3, m64nNk16 bf16) and mbarriers.
//
// A kernel file has the line
//   #include "hopper.cuh"
// which nvcc resolves beside it, and which kernels/_cuda.py:source() replaces with this text for NVRTC at run
// time (it cannot resolve includes on the GPU machine) and for the CPU compile tests. Users: indexer.cu,
// hisa_tokens.cu and fp8_gemm.cu (cp.async, tiles, wgmma, mbarriers, bulk copies), sparse_mla.cu (smem_addr,
// cp.async), hisa_tokens.cu and hisa_decode.cu (the e4m3 mma.sync: sm_89+). The wgmma, mbarrier and bulk-copy
// parts exist only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); the rest is sm_80+ PTX (fence.proxy.async: sm_90),
// emitted only where a kernel calls it.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// ---------------------------------------------------------------------------------------------------
// Shared addresses, cp.async, stores

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// 16 bytes global -> shared, bypassing L1; src_bytes < 16 zero-fills the rest (0: all zeros, for rows past
// the end).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// 4 bytes global -> shared, through L1 (.ca: 4-byte copies cannot bypass it); src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
// Until every cp.async this thread issued has landed, committed to a group or not.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Make this thread's generic-proxy shared-memory writes (cp.async, st.shared) visible to wgmma.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Output written once and not re-read by this kernel: evict-first, keep L2 for the operands.
__device__ __forceinline__ void st_stream(float* p, float v) {
  asm volatile("st.global.cs.f32 [%0], %1;" ::"l"(p), "f"(v) : "memory");
}

__device__ __forceinline__ void trap() { asm volatile("trap;"); }

// ---------------------------------------------------------------------------------------------------
// mma.sync (sm_89+)

// D += A * B for one 16x8 tile and 32 bytes of K, fp8 e4m3 in, fp32 accumulators. A: rows g, g+8 (a0/a2:
// row g, a1/a3: row g+8; a0/a1 bytes 4 tig.., a2/a3 bytes 16 + 4 tig..); B: column g, bytes 4 tig.. (b0)
// and 16 + 4 tig.. (b1); D: c0, c1 = (row g, columns 2 tig, 2 tig + 1), c2, c3 = (row g + 8, same columns).
__device__ __forceinline__ void mma_e4m3_16832(float* c, const u32* a, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------------
// Swizzled shared tiles (the layouts wgmma reads; ldmatrix reads them without bank conflicts)

// Byte offset of 16-byte chunk x (0..7) of row r in a tile of 128-byte rows with the wgmma 128-byte
// swizzle: chunk x of row r stored at x ^ (r mod 8), 1024-byte atoms of 8 rows.
__device__ __forceinline__ int swizzle128_off(int r, int x) { return r * 128 + ((x ^ (r & 7)) << 4); }

// Byte offset of 16-byte chunk x of row r in a shared tile of R rows of DB bytes. DB >= 128: DB/128
// blocks of [R][128 B], each swizzled as above. DB = 64: [R][64 B] with chunk x of row r stored at
// x ^ (r/2 mod 4) (the 64-byte swizzle, 512-byte atoms). Either way the 8 rows of one ldmatrix 8x16B
// matrix fall in 8 different bank groups.
template <int DB, int R>
__device__ __forceinline__ int tile_off(int r, int x) {
  if constexpr (DB >= 128) {
    return (x >> 3) * (R * 128) + swizzle128_off(r, x & 7);
  } else {
    return r * 64 + ((x ^ ((r >> 1) & 3)) << 4);
  }
}

// Byte offset, inside a swizzled tile of R rows, of the 32-byte k step c for rows starting at row0
// (row0 a multiple of 8): the hardware applies the XOR swizzle to the final address, so stepping k
// inside a 128-byte (64-byte) row is a plain +32 bytes on the start address.
template <int DB, int R>
__device__ __forceinline__ int kstep_off(int row0, int c) {
  if constexpr (DB >= 128) {
    return (c >> 2) * (R * 128) + row0 * 128 + (c & 3) * 32;
  } else {
    return row0 * 64 + c * 32;
  }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// ---------------------------------------------------------------------------------------------------
// wgmma (sm_90a)

// Shared-memory matrix descriptor, K-major operand with a swizzle: start address, leading byte offset
// (unused by swizzled K-major layouts; 16), stride byte offset = bytes between 8-row core-matrix groups,
// swizzle mode in bits 62-63 (1: 128-byte, 2: 64-byte). Address fields are in 16-byte units.
template <int DB>
__device__ __forceinline__ u64 make_desc(u32 addr) {
  constexpr u64 SBO = DB >= 128 ? 1024 : 512;
  constexpr u64 SWZ = DB >= 128 ? 1 : 2;
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((SBO >> 4) << 32) | (SWZ << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Keep the compiler from moving accumulator reads or writes across the async MMA's issue and wait.
template <int NR>
__device__ __forceinline__ void fence_regs(float* d) {
#pragma unroll
  for (int i = 0; i < NR; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The accumulator registers of an m64n64 (32 a thread), an m64n96 (48) and an m64n128 (64) product: their
// place holders in the instruction, %0 .. %31 (.. %47, .. %63), and the matching "+f" operands of float d[].
#define WGMMA_D32_REGS "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WGMMA_D48_REGS WGMMA_D32_REGS ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
#define WGMMA_D64_REGS WGMMA_D48_REGS ", %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WGMMA_D32(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define WGMMA_D48(d) WGMMA_D32(d), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
#define WGMMA_D64(d) WGMMA_D48(d), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// D[64 x n] (+)= A[64 x k] * B[n x k]^T, A and B K-major in shared memory (descriptors); accumulate = 0
// overwrites D. One call consumes 32 bytes of each row: k = 32 e4m3 or 16 bf16. D layout: warp v of the
// warpgroup holds rows 16v + lane/4 (+8); d[4j + {0,1}] are columns 8j + 2(lane%4) + {0,1} of the first
// row, d[4j + {2,3}] of the second.
// One wrapper: NAME(d, da, db, accumulate) issues INSTR with D's registers (REGS / OPS, NR of them) and the
// descriptors and the accumulate predicate as operands %NR, %NR+1, %NR+2 (spelled out: A, B, P). TAIL: the
// immediates after the predicate's (the two scales, and for bf16 the two transposes).
#define WGMMA_WRAPPER(NAME, INSTR, REGS, OPS, A, B, P, TAIL)                                            \
  __device__ __forceinline__ void NAME(float* d, u64 da, u64 db, int accumulate) {                      \
    asm volatile("{ .reg .pred p; setp.ne.b32 p, " P ", 0;\n" INSTR " {" REGS "}, " A ", " B ", p" TAIL "; }" \
                 : OPS(d) : "l"(da), "l"(db), "r"(accumulate));                                        \
  }

WGMMA_WRAPPER(wgmma_fp8_n64, "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3", WGMMA_D32_REGS, WGMMA_D32,
              "%32", "%33", "%34", ", 1, 1")
WGMMA_WRAPPER(wgmma_fp8_n96, "wgmma.mma_async.sync.aligned.m64n96k32.f32.e4m3.e4m3", WGMMA_D48_REGS, WGMMA_D48,
              "%48", "%49", "%50", ", 1, 1")
WGMMA_WRAPPER(wgmma_fp8_n128, "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3", WGMMA_D64_REGS, WGMMA_D64,
              "%64", "%65", "%66", ", 1, 1")
// bf16 takes two more immediates: neither operand transposed (both K-major).
WGMMA_WRAPPER(wgmma_bf16_n64, "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16", WGMMA_D32_REGS, WGMMA_D32,
              "%32", "%33", "%34", ", 1, 1, 0, 0")
WGMMA_WRAPPER(wgmma_bf16_n128, "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16", WGMMA_D64_REGS, WGMMA_D64,
              "%64", "%65", "%66", ", 1, 1, 0, 0")

// The wrapper for an operand type and an n: one 32-byte k step of the 64 x NCOL product.
template <bool FP8, int NCOL>
__device__ __forceinline__ void wgmma_step(float* d, u64 da, u64 db, int accumulate) {
  static_assert(NCOL == 64 || NCOL == 128 || (FP8 && NCOL == 96), "wrappers exist for n = 64, 128 and fp8 96");
  if constexpr (FP8 && NCOL == 64) wgmma_fp8_n64(d, da, db, accumulate);
  if constexpr (FP8 && NCOL == 96) wgmma_fp8_n96(d, da, db, accumulate);
  if constexpr (FP8 && NCOL == 128) wgmma_fp8_n128(d, da, db, accumulate);
  if constexpr (!FP8 && NCOL == 64) wgmma_bf16_n64(d, da, db, accumulate);
  if constexpr (!FP8 && NCOL == 128) wgmma_bf16_n128(d, da, db, accumulate);
}

// D[64 x NCOL] (+)= A . B^T over whole rows of DB bytes (DB/32 k steps), issued as one committed wgmma group:
// A = rows a_row0 .. a_row0+63 of a swizzled tile of RA rows at a_tile, B = rows 0 .. NCOL-1 of one of RB rows
// at b_tile (shared-window addresses; tile_off layouts). The first step overwrites D. The caller waits
// (wgmma_wait0) and then fences the accumulators (fence_regs<NCOL / 2>) before reading them.
template <bool FP8, int DB, int RA, int RB, int NCOL>
__device__ __forceinline__ void wgmma_rows(float* d, u32 a_tile, int a_row0, u32 b_tile) {
  fence_regs<NCOL / 2>(d);
  wgmma_fence();
#pragma unroll
  for (int c = 0; c < DB / 32; ++c)
    wgmma_step<FP8, NCOL>(d, make_desc<DB>(a_tile + kstep_off<DB, RA>(a_row0, c)),
                          make_desc<DB>(b_tile + kstep_off<DB, RB>(0, c)), c > 0);
  wgmma_commit();
}

// ---------------------------------------------------------------------------------------------------
// mbarriers (64-bit words in shared memory, addressed by their shared-window address)

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// Make the initialised barriers visible to every thread (and to the async proxy) before the __syncthreads.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// One arrival on bar that also expects `bytes` more of asynchronous copies (cp.async.bulk complete_tx) in
// this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// Bulk copy (the TMA unit, no tensor map) of `bytes` contiguous bytes global -> shared, counted on bar's
// transaction count. dst, src and bytes multiples of 16.
__device__ __forceinline__ void bulk_copy_g2s(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// One arrival on bar once every cp.async this thread issued before has landed (.noinc: it counts towards the
// barrier's init count like an ordinary arrival). Needs no commit group.
__device__ __forceinline__ void cp_async_mbar_arrive(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(u32 bar, u32 parity) {
  u32 done;
  asm volatile(
      "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ u64 globaltimer_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// Until the phase of parity `parity` has completed. A pipeline bug would otherwise hang the GPU silently: a
// wait of 10 s (no tile takes a millisecond) traps instead.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  if (mbar_try_wait(bar, parity)) return;
  const u64 t0 = globaltimer_ns();
  while (!mbar_try_wait(bar, parity))
    if (globaltimer_ns() - t0 > 10000000000ull) trap();
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
