// Per-row top-k by radix selection (a select, not a sort), indices returned in ascending order.
//
//   out[r, :] = the column indices of the k largest valid scores[r, :], ascending, then -1 padding
//
// Valid means not -inf and not NaN (+inf is valid and largest; -0.0 counts as +0.0). Among equal scores
// at the threshold the lower indices win, so the set is deterministic (SPEC section 5). A row with at
// most k valid entries returns all of them, then -1 up to k.
//
// scores  float [R, N]  row-major, contiguous
// out     int   [R, k]  row-major
// N       1 <= N <= 2^30;  k: 1 <= k <= KMAX (2048), k > N allowed
// vec     1 when every row start is 16-byte aligned (N % 4 == 0 and scores 16-byte aligned): float4 loads
// cap     candidate-buffer capacity (elements), a multiple of 4; 0 disables the buffer (slow path only)
//
// Launch: grid (R), block (THREADS = 1024), dynamic shared memory 16672 + 8 * cap bytes, over 48 KB, so
// `max_dynamic_shared_size_bytes` must be raised on the kernel beforehand (the launcher does, and sizes
// cap from the opt-in limit: 26972 on H100/H200, 227 KB in all). ptxas (sm_90): 64 registers, no spills.
// One CTA per row, one CTA per SM; a row is never split across CTAs (a row of 256K floats, 1 MB, is read
// twice by one SM: with a single row, as in decode, the SM's own bandwidth bounds it).
//
// Shared memory (dynamic, in this order):
//   hist  int[2048]      histogram of the current 11-bit digit
//   sel   int[KMAX]      the selected indices in two ascending runs (above the threshold bin, and from
//                        the candidates) before the final merge
//   wbuf  int[2][32]     per-warp totals of the block scans (double-buffered: one barrier per scan)
//   misc  int[8]         result of find_bin
//   ckey  uint[cap]      candidate keys  \ elements of the threshold bin, in index order
//   cidx  int[cap]       candidate index /
//
// Method. Each fp32 maps to an order-preserving uint32 key: negatives flip every bit, non-negatives set
// the sign bit; -inf and NaN map to 0 (invalid; every valid key is >= 0x00800000). The threshold key,
// i.e. the k-th largest, is found digit by digit over bits 31..21, 20..10, 9..0 (three rounds of
// histograms in shared memory). After each round the state is (P, pmask): the threshold's leading bits,
// `above`: the number of elements whose leading bits exceed P (all selected), and `cnt`: the number
// whose leading bits equal P (the threshold bin).
//   pass 1 (global)  histogram of bits 31..21 and the count of valid entries.
//                    valid <= k: one ordered pass writes every valid index; done.
//   later rounds     if the threshold bin already sits in the candidate buffer: histogram over it;
//                    else if cnt <= cap: one global pass that histograms the next digit AND gathers, in
//                    index order, the elements above the bin into `sel` and the bin's elements into the
//                    candidate buffer;
//                    else: a global pass that only histograms the next digit (prefix-filtered).
//   result           thr = the exact threshold key; need = k - #(key > thr) of the elements equal to thr
//                    are taken, the lowest-index ones. Selected: key > thr, or key == thr and fewer than
//                    `need` equal keys come before it in index order.
//   output           gathered: the candidates are walked in index order (block scan) and the chosen ones
//                    appended to `sel` after the above-bin run; the two ascending runs are merged into
//                    the output. Not gathered (adversarial rows, e.g. > cap equal values): one more
//                    global pass in index order writes the selected indices directly.
// Typical rows read the data twice (pass 1 and the gathering pass); never is a candidate dropped.
// Ordered compaction: each thread holds a group of 4 consecutive elements; groups are laid out in
// thread order, so an exclusive block scan of per-thread counts gives each element's output slot.

#define THREADS 1024
#define NWARPS (THREADS / 32)
#define NBINS 2048
#define KMAX 2048
#define UNROLL 4  // groups of 4 floats loaded per thread before any is processed (loads in flight)
#define FULL_MASK 0xffffffffu

static_assert(NBINS == 2 * THREADS, "find_bin gives each thread two bins");
static_assert(NWARPS == 32, "the block scan reduces one warp total per lane");

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// Order-preserving key; 0 for the invalid values (-inf, NaN).
__device__ __forceinline__ unsigned order_key(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u || u == 0xff800000u) return 0u;
    if (u == 0x80000000u) u = 0u;  // -0.0 ties with +0.0, as in float comparison
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive scan of c over the block in thread order; *total gets the block sum. Block-uniform call.
// wbuf holds two 32-int buffers used alternately (par flips each call): a buffer is rewritten two
// calls later, after every thread has passed the barrier of the call in between.
__device__ __forceinline__ int block_excl_scan(int c, int* wbuf, int& par, int& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int incl = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(FULL_MASK, incl, o);
        if (lane >= o) incl += y;
    }
    int* buf = wbuf + 32 * par;
    par ^= 1;
    if (lane == 31) buf[warp] = incl;
    __syncthreads();
    const int wt = buf[lane];
    int wincl = wt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(FULL_MASK, wincl, o);
        if (lane >= o) wincl += y;
    }
    total = __shfl_sync(FULL_MASK, wincl, 31);
    return __shfl_sync(FULL_MASK, wincl - wt, warp) + incl - c;
}

// Keys of elements 4q .. 4q+3 of a row (0 past the end).
__device__ __forceinline__ void load_group(const float* __restrict__ x, int N, bool vec, int q,
                                           unsigned (&key)[4]) {
    const int i = 4 * q;
    if (vec) {
        if (i < N) {
            const float4 v = reinterpret_cast<const float4*>(x)[q];
            key[0] = order_key(v.x); key[1] = order_key(v.y);
            key[2] = order_key(v.z); key[3] = order_key(v.w);
        } else {
            key[0] = key[1] = key[2] = key[3] = 0u;
        }
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) key[j] = i + j < N ? order_key(x[i + j]) : 0u;
    }
}

// Calls f(key[4], i0) for every group of the row, groups in index order across the block: a tile is
// THREADS * UNROLL groups, group g0 + u * THREADS + tid. The loop bound is block-uniform, so f may
// contain barriers.
template <class F>
__device__ __forceinline__ void for_each_group(const float* __restrict__ x, int N, bool vec, F f) {
    const int G = (N + 3) >> 2;
    for (int g0 = 0; g0 < G; g0 += THREADS * UNROLL) {
        unsigned key[UNROLL][4];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) load_group(x, N, vec, g0 + u * THREADS + threadIdx.x, key[u]);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) f(key[u], 4 * (g0 + u * THREADS + (int)threadIdx.x));
    }
}

// Histogram of digit (key >> hs) & hm over the valid keys whose masked leading bits equal P.
// Returns how many keys of the group matched.
__device__ __forceinline__ int hist_group(const unsigned (&key)[4], unsigned pmask, unsigned P, int hs,
                                          unsigned hm, int* hist) {
    int m = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if (key[j] != 0u && (key[j] & pmask) == P) {
            atomicAdd(&hist[(key[j] >> hs) & hm], 1);
            ++m;
        }
    }
    return m;
}

// One block-wide step of the gathering pass: histogram as hist_group, and ordered compaction of the
// elements above the prefix into sel[run_a ..] and of those matching it into the candidate buffer.
__device__ __forceinline__ void gather_group(const unsigned (&key)[4], int i0, unsigned pmask, unsigned P,
                                             int hs, unsigned hm, int* hist, int* sel, unsigned* ckey,
                                             int* cidx, int cap, int& run_a, int& run_m, int* wbuf,
                                             int& par) {
    int a = 0, m = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const unsigned lead = key[j] & pmask;
        if (key[j] != 0u && lead > P) ++a;
        if (key[j] != 0u && lead == P) {
            ++m;
            atomicAdd(&hist[(key[j] >> hs) & hm], 1);
        }
    }
    int total;
    const int excl = block_excl_scan(a | (m << 16), wbuf, par, total);  // each field < 2^13 per step
    int ao = run_a + (excl & 0xffff), mo = run_m + (excl >> 16);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const unsigned lead = key[j] & pmask;
        if (key[j] != 0u && lead > P) {
            if (ao < KMAX) sel[ao] = i0 + j;
            ++ao;
        } else if (key[j] != 0u && lead == P) {
            if (mo < cap) { ckey[mo] = key[j]; cidx[mo] = i0 + j; }
            ++mo;
        }
    }
    run_a += total & 0xffff;
    run_m += total >> 16;
}

// One block-wide step of the final ordered selection. Selected: key > thr, or key == thr (valid) with
// fewer than `need` equal keys before it. An element's slot is #(earlier key > thr) + min(#(earlier
// equal), need), so one scan of the packed (gt, eq) counts places everything.
__device__ __forceinline__ void select_group(const unsigned (&key)[4], const int (&idx)[4], unsigned thr,
                                             int need, int* dst, int dst_n, int& run_gt, int& run_eq,
                                             int* wbuf, int& par) {
    int g = 0, e = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        g += key[j] > thr;
        e += key[j] == thr && key[j] != 0u;
    }
    int total;
    const int excl = block_excl_scan(g | (e << 16), wbuf, par, total);  // each field < 2^13 per step
    int gt = run_gt + (excl & 0xffff), eq = run_eq + (excl >> 16);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if (key[j] > thr) {
            const int p = gt + imin(eq, need);
            if (p < dst_n) dst[p] = idx[j];
            ++gt;
        } else if (key[j] == thr && key[j] != 0u) {
            if (eq < need && gt + eq < dst_n) dst[gt + eq] = idx[j];
            ++eq;
        }
    }
    run_gt += total & 0xffff;
    run_eq += total >> 16;
}

// Bin b of hist (scanned from the top) with #(above b) < k_rem <= #(above b) + hist[b]; requires
// sum(hist) >= k_rem >= 1. Writes misc[0] = b, misc[1] = #(above b), misc[2] = hist[b]; ends with a
// barrier, after which hist may be cleared.
__device__ __forceinline__ void find_bin(const int* hist, int k_rem, int* misc, int* wbuf, int& par) {
    const int b0 = NBINS - 1 - 2 * (int)threadIdx.x, b1 = b0 - 1;
    const int c0 = hist[b0], c1 = hist[b1];
    int total;
    const int excl = block_excl_scan(c0 + c1, wbuf, par, total);
    if (excl < k_rem && k_rem <= excl + c0) {
        misc[0] = b0; misc[1] = excl; misc[2] = c0;
    } else if (excl + c0 < k_rem && k_rem <= excl + c0 + c1) {
        misc[0] = b1; misc[1] = excl + c0; misc[2] = c1;
    }
    __syncthreads();
}

__device__ __forceinline__ int lower_bound(const int* a, int n, int v) {  // #(a[i] < v), a ascending
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (a[mid] < v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
topk_rows(const float* __restrict__ scores, int* __restrict__ out, int N, int k, int vec_flag, int cap) {
    extern __shared__ int4 smem4[];
    int* hist = reinterpret_cast<int*>(smem4);
    int* sel = hist + NBINS;
    int* wbuf = sel + KMAX;
    int* misc = wbuf + 64;
    unsigned* ckey = reinterpret_cast<unsigned*>(misc + 8);
    int* cidx = reinterpret_cast<int*>(ckey + cap);

    const float* x = scores + (long long)blockIdx.x * N;
    int* o = out + (long long)blockIdx.x * k;
    const bool vec = vec_flag != 0;
    const int tid = threadIdx.x;
    int par = 0;

    // Pass 1: histogram of bits 31..21 over the valid keys, and their count.
    for (int i = tid; i < NBINS; i += THREADS) hist[i] = 0;
    __syncthreads();
    int my_valid = 0;
    for_each_group(x, N, vec, [&](const unsigned (&key)[4], int) {
        my_valid += hist_group(key, 0u, 0u, 21, 0x7ffu, hist);
    });
    int valid;
    block_excl_scan(my_valid, wbuf, par, valid);  // its barrier also completes the histogram

    if (valid <= k) {  // everything valid is selected: thr = 0 (every valid key is above), need = 0
        int run_gt = 0, run_eq = 0;
        for_each_group(x, N, vec, [&](const unsigned (&key)[4], int i0) {
            const int idx[4] = {i0, i0 + 1, i0 + 2, i0 + 3};
            select_group(key, idx, 0u, 0, o, k, run_gt, run_eq, wbuf, par);
        });
        for (int i = valid + tid; i < k; i += THREADS) o[i] = -1;
        return;
    }

    find_bin(hist, k, misc, wbuf, par);
    unsigned P = (unsigned)misc[0] << 21, pmask = 0xffe00000u;
    int above = misc[1], cnt = misc[2];
    int C = -1, nA = 0;  // C: candidates gathered (-1: none yet); nA: indices in sel before them

    for (int r = 1; r <= 2; ++r) {
        const int hs = r == 1 ? 10 : 0;
        const unsigned hm = r == 1 ? 0x7ffu : 0x3ffu;
        for (int i = tid; i < NBINS; i += THREADS) hist[i] = 0;
        __syncthreads();
        if (C >= 0) {
            for (int i = tid; i < C; i += THREADS) {
                const unsigned key = ckey[i];
                if ((key & pmask) == P) atomicAdd(&hist[(key >> hs) & hm], 1);
            }
        } else if (cnt <= cap) {
            int run_a = 0, run_m = 0;
            for_each_group(x, N, vec, [&](const unsigned (&key)[4], int i0) {
                gather_group(key, i0, pmask, P, hs, hm, hist, sel, ckey, cidx, cap, run_a, run_m, wbuf, par);
            });
            C = imin(run_m, cap);
            nA = imin(run_a, KMAX);
        } else {
            for_each_group(x, N, vec, [&](const unsigned (&key)[4], int) {
                hist_group(key, pmask, P, hs, hm, hist);
            });
        }
        __syncthreads();
        find_bin(hist, k - above, misc, wbuf, par);
        P |= (unsigned)misc[0] << hs;
        pmask = r == 1 ? 0xfffffc00u : 0xffffffffu;
        above += misc[1];
        cnt = misc[2];
    }
    const unsigned thr = P;       // the k-th largest key
    const int need = k - above;   // 1 <= need <= cnt: how many keys equal to thr are taken

    if (C < 0) {  // never gathered: one more ordered pass over the row
        int run_gt = 0, run_eq = 0;
        for_each_group(x, N, vec, [&](const unsigned (&key)[4], int i0) {
            const int idx[4] = {i0, i0 + 1, i0 + 2, i0 + 3};
            select_group(key, idx, thr, need, o, k, run_gt, run_eq, wbuf, par);
        });
        return;
    }

    // Candidates are in index order: choose among them into sel[nA .. k), also in index order.
    int run_gt = 0, run_eq = 0;
    const int GC = (C + 3) >> 2;
    for (int q0 = 0; q0 < GC; q0 += THREADS) {
        const int i = 4 * (q0 + tid);
        unsigned key[4];
        int idx[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            key[j] = i + j < C ? ckey[i + j] : 0u;
            idx[j] = i + j < C ? cidx[i + j] : -1;
        }
        select_group(key, idx, thr, need, sel + nA, k - nA, run_gt, run_eq, wbuf, par);
    }
    __syncthreads();

    // Merge the ascending runs sel[0, nA) and sel[nA, k) (disjoint indices) into the output.
    const int nB = k - nA;
    for (int i = tid; i < k; i += THREADS) {
        const int v = sel[i];
        const int pos = i < nA ? i + lower_bound(sel + nA, nB, v) : (i - nA) + lower_bound(sel, nA, v);
        o[pos] = v;
    }
}
