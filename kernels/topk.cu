// Per-row top-k by threshold selection (a select, not a sort), indices returned in ascending order.
//
//   out[r, :] = the column indices of the k largest valid scores[r, :L_r], ascending, then -1 padding
//
// Valid means not -inf and not NaN (+inf is valid and largest; -0.0 counts as +0.0). Among equal scores
// at the threshold the lower indices win, so the set is deterministic (SPEC section 5). A row with at
// most k valid entries returns all of them, then -1 up to k.
//
// scores   float [R, N]      row-major, contiguous
// lengths  int   [R]         row r considers columns [0, L_r), L_r = clamp(lengths[r], 0, N); the rest are
//                            invalid and not read (a float4 load may touch up to 3 of them). null: L_r = N
// out      int   [R, k]      row-major
// gcand    uint  [R, cap, 2] split mode only (G > 1): a row's candidates (key, column) from all its CTAs
// gcount   int   [R, 2]      split mode only, zero at launch and left zero: candidates published, CTAs done
// N        1 <= N <= 2^30;  k: 1 <= k <= KMAX (2048), k > N allowed
// vec      1 when every row start is 16-byte aligned (N % 4 == 0 and scores 16-byte aligned): float4 loads
// cap      candidate-buffer capacity (elements), a multiple of 4 (0 allowed: forces the exact path)
// G        CTAs per row (1: row mode); slice_groups: groups of 4 columns per CTA, G * slice_groups * 4 >= N
// blocks   int   [R, N / B]  optional (null: out holds columns). HISA's token top-k: column s of row r is the
//                            candidate slot of cache position blocks[r, s / B] * B + s % B, and out gets that
//                            position instead of s: -1 where the block is -1 or, given ends, the position is
//                            >= ends[r] (kernels/hisa_tokens.py:slots_to_positions_reference). B divides N.
// ends     int   [R]         optional, with blocks
//
// Launch: grid (R * G), block (THREADS = 512), dynamic shared memory 16704 + max(8 cap, 32768) bytes, over
// 48 KB, so `max_dynamic_shared_size_bytes` must be raised on the kernel beforehand (the launcher does, and
// sizes cap so that two CTAs share an SM: cap 12376, 115712 B, on H100/H200). Row r's CTAs are blocks
// r * G .. r * G + G - 1. ptxas (sm_90): 64 registers (the __launch_bounds__(512, 2) cap), no spills.
//
// Shared memory (dynamic, in this order):
//   hist  int[2048]      histogram of the current digit
//   sel   int[KMAX]      selected columns (fast path: unordered, then ordered; exact path: two runs)
//   wbuf  int[2][32]     per-warp totals of the block scans (double-buffered: one barrier per scan)
//   misc  int[16]        find_bin's result (0..2) and the counters named M_* below
//   ckey  uint[cap]      candidate keys    \ the sample's keys (4 SAMPLE_G of them) before the candidates
//   cidx  int[cap]       candidate columns /
//
// Keys. Each fp32 maps to an order-preserving uint32 key: negatives flip every bit, non-negatives set the
// sign bit; -inf and NaN map to 0 (invalid; every valid key is >= ALL_VALID = key(-FLT_MAX)).
//
// Fast path (one read of the row). A CTA
//   1. estimates a threshold T0 below the k-th largest key: if L > cap, from a strided sample of 8192
//      scores of the row (the sample's r-th largest key, 22 bits of it, r chosen so that about
//      1.5 k + 1024 scores of the row are expected >= T0); else T0 = ALL_VALID (every valid score);
//   2. streams its slice of the row (8 float4 loads in flight per thread) and appends every score >= T0
//      (one float compare each) as (key, column) to the shared candidate buffer, unordered, through one
//      shared atomic per warp and tile; the count goes on past cap;
//   3. split mode: publishes its candidates to gcand (a global atomic reserves the place), and the last
//      CTA of the row to finish (a global done-counter) gathers them back into its shared memory;
//   4. if C, the row's count, satisfies C <= cap and (C >= k or T0 = ALL_VALID), every score >= T0 is a
//      candidate, so the candidates hold the answer: thr = their k-th largest key (radix select on
//      key - min key, 11 bits a round), ties at thr go to the lowest columns (a second radix select on
//      the columns of the tied candidates), the k chosen columns are compacted and put in column order
//      (a bitmap of the row read back in order; rows over 64 cap columns: a bitonic sort).
// Typical rows are read once, plus the sample: 2048 float4s spread evenly over the row (at 128K columns
// one per 256 bytes, up to 1/8 more DRAM traffic unless L2 still holds them when step 2 passes).
// Exact path, when step 4's condition fails (the sample misled, or > cap scores tie at T0: adversarial
// rows such as few distinct values): one CTA re-reads the row by radix selection over the key's digits
// 31..21, 20..10, 9..0 (below), two or three reads.
//
// Exact path in detail. After each round the state is (P, pmask): the threshold's leading bits, `above`:
// the number of elements whose leading bits exceed P (all selected), and `cnt`: the number whose leading
// bits equal P (the threshold bin).
//   pass 1 (global)  histogram of bits 31..21 and the count of valid entries.
//                    valid <= k: one ordered pass writes every valid index; done.
//   later rounds     if the threshold bin already sits in the candidate buffer: histogram over it;
//                    else if cnt <= cap: one global pass that histograms the next digit AND gathers, in
//                    index order, the elements above the bin into `sel` and the bin's elements into the
//                    candidate buffer;
//                    else: a global pass that only histograms the next digit (prefix-filtered).
//   result           thr = the exact threshold key; need = k - #(key > thr) of the elements equal to thr
//                    are taken, the lowest-index ones.
//   output           gathered: the candidates are walked in index order (block scan) and the chosen ones
//                    appended to `sel` after the above-bin run; the two ascending runs are merged into
//                    the output. Not gathered: one more global pass in index order writes the selected
//                    indices directly.
// Ordered compaction: each thread holds a group of 4 consecutive elements; groups are laid out in
// thread order, so an exclusive block scan of per-thread counts gives each element's output slot.
//
// Short rows: topk_short(scores, lengths, out, N, k, blocks, ends, B), same contract and arguments as topk_rows
// without the split-mode ones. For rows of up to a few thousand columns (HISA's top-m over 1024 block scores, its
// top-k over 8192 candidates) the fast path's sample, candidate buffer and sort cost more than the row:
// one CTA per row copies the row's keys into shared memory (one read, 0 past L), counts the valid ones,
// finds thr and need by radix_select over the keys (11 bits a round, three rounds) and writes the chosen
// columns in column order by the exact path's ordered compaction (select_group), so nothing is sorted.
// Launch: grid (R), block (THREADS), dynamic shared memory 8512 + 16 ceil(N / 4) bytes (hist, wbuf, misc,
// keys; 41280 at the launcher's limit N = 8192: under 48 KB, no opt-in). ptxas (sm_90): 31 registers (launch
// bounds for four CTAs an SM), no spills.
//
// Slot map (both kernels, blocks non-null): once a CTA has written its row of out, it rewrites each chosen
// column as its position (map_slots below), saving HISA a launch; with ascending block ids (top-m's output)
// the positions stay ascending.

// THREADS (512), NBINS, the keys, the block scan and the radix select (shared with hisa_decode.cu):
#include "select.cuh"

#define KMAX 2048
#define UNROLL 4               // exact path: groups of 4 floats loaded per thread before any is processed
#define CUNROLL 8              // fast path: float4 loads in flight per thread
#define SAMPLE_G 2048          // groups of 4 scores in the threshold sample (8192 scores, 32 KB of keys)
#define TARGET_EXTRA 1024      // the sample aims at 1.5 k + TARGET_EXTRA scores >= T0
#define SORT_CHUNK 128         // bitonic sort: positions a warp sorts in registers (4 per lane)
#define IDX_TOP 30             // columns are < 2^30
#define ALL_VALID 0x00800000u  // key(-FLT_MAX), the smallest valid key: T0 taking every valid score
#define NEG_INF __uint_as_float(0xff800000u)

// misc[] slots besides find_bin's 0..2
#define M_COUNT 3  // candidates met by this CTA (may exceed cap)
#define M_BASE 4   // split mode: this CTA's place in gcand
#define M_LAST 5   // split mode: this CTA finished last
#define M_MIN 6    // smallest candidate key
#define M_MAX 7    // largest candidate key
#define M_NSEL 8   // columns compacted into sel

static_assert(NWARPS * SORT_CHUNK == KMAX, "the bitonic sort covers KMAX positions with every warp");
static_assert(SAMPLE_G % THREADS == 0, "the sample gives each thread the same number of groups");

__device__ __forceinline__ unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
__device__ __forceinline__ unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }

// The float of a key >= ALL_VALID (no larger than key(+inf)): for every score v, order_key(v) >= key
// exactly when v >= key_float(key) (false for NaN and -inf; -0.0 and +0.0 compare equal in both).
__device__ __forceinline__ float key_float(unsigned key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Scores 4q .. 4q+3 of a row of L, -inf past column L and for q >= qend (a float4 load when vec).
// Issues the loads only: callers load a whole tile before reading any of it (mask_tail reads).
__device__ __forceinline__ float4 load_raw(const float* __restrict__ x, int L, bool vec, int q, int qend) {
    const int i = 4 * q;
    float4 f;
    f.x = f.y = f.z = f.w = NEG_INF;
    if (q < qend && i < L) {
        if (vec) {
            f = reinterpret_cast<const float4*>(x)[q];
        } else {
            f.x = x[i];
            if (i + 1 < L) f.y = x[i + 1];
            if (i + 2 < L) f.z = x[i + 2];
            if (i + 3 < L) f.w = x[i + 3];
        }
    }
    return f;
}

// The scores of load_raw's group q with the float4's columns >= L masked to -inf.
__device__ __forceinline__ void mask_tail(const float4& f, int L, int q, float (&v)[4]) {
    const int i = 4 * q;
    v[0] = f.x;
    v[1] = i + 1 < L ? f.y : NEG_INF;
    v[2] = i + 2 < L ? f.z : NEG_INF;
    v[3] = i + 3 < L ? f.w : NEG_INF;
}

// Groups q0 + u * THREADS + tid (u < U) of a row of L: v[u] = its 4 scores, -inf past column L and for
// groups >= qend. All U loads are in flight before any is used. Block-uniform q0.
template <int U>
__device__ __forceinline__ void load_tile(const float* __restrict__ x, int L, bool vec, int q0, int qend,
                                          float (&v)[U][4]) {
    const int q = q0 + (int)threadIdx.x;
    if (vec && q0 + U * THREADS <= qend && 4 * (q0 + U * THREADS) <= L) {  // the whole tile lies inside
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const float4 f = reinterpret_cast<const float4*>(x)[q + u * THREADS];
            v[u][0] = f.x; v[u][1] = f.y; v[u][2] = f.z; v[u][3] = f.w;
        }
    } else {
        float4 f[U];
#pragma unroll
        for (int u = 0; u < U; ++u) f[u] = load_raw(x, L, vec, q + u * THREADS, qend);
#pragma unroll
        for (int u = 0; u < U; ++u) mask_tail(f[u], L, q + u * THREADS, v[u]);
    }
}

// Calls f(key[4], i0) for every group of the row, groups in index order across the block: a tile is
// THREADS * UNROLL groups, group g0 + u * THREADS + tid. The loop bound is block-uniform, so f may
// contain barriers.
template <class F>
__device__ __forceinline__ void for_each_group(const float* __restrict__ x, int L, bool vec, F f) {
    const int G = (L + 3) >> 2;
    for (int g0 = 0; g0 < G; g0 += THREADS * UNROLL) {
        float v[UNROLL][4];
        load_tile<UNROLL>(x, L, vec, g0, G, v);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const unsigned key[4] = {order_key(v[u][0]), order_key(v[u][1]), order_key(v[u][2]),
                                     order_key(v[u][3])};
            f(key, 4 * (g0 + u * THREADS + (int)threadIdx.x));
        }
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
    const int excl = block_excl_scan(a | (m << 16), wbuf, par, total);  // fields <= 4 THREADS < 2^16
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

__device__ __forceinline__ int lower_bound(const int* a, int n, int v) {  // #(a[i] < v), a ascending
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (a[mid] < v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// ---- Exact path: radix selection over the key's digits, re-reading the row (one CTA) ----------------

// par: the block scans' buffer parity at the call.
__device__ __forceinline__ void exact_row(const float* __restrict__ x, int L, bool vec, int k,
                                          int* __restrict__ o, int* hist, int* sel, int* wbuf, int* misc,
                                          unsigned* ckey, int* cidx, int cap, int par) {
    const int tid = threadIdx.x;

    // Pass 1: histogram of bits 31..21 over the valid keys, and their count.
    for (int i = tid; i < NBINS; i += THREADS) hist[i] = 0;
    __syncthreads();
    int my_valid = 0;
    for_each_group(x, L, vec, [&](const unsigned (&key)[4], int) {
        my_valid += hist_group(key, 0u, 0u, 21, 0x7ffu, hist);
    });
    int valid;
    block_excl_scan(my_valid, wbuf, par, valid);  // its barrier also completes the histogram

    if (valid <= k) {  // everything valid is selected: thr = 0 (every valid key is above), need = 0
        int run_gt = 0, run_eq = 0;
        for_each_group(x, L, vec, [&](const unsigned (&key)[4], int i0) {
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
            for_each_group(x, L, vec, [&](const unsigned (&key)[4], int i0) {
                gather_group(key, i0, pmask, P, hs, hm, hist, sel, ckey, cidx, cap, run_a, run_m, wbuf, par);
            });
            C = imin(run_m, cap);
            nA = imin(run_a, KMAX);
        } else {
            for_each_group(x, L, vec, [&](const unsigned (&key)[4], int) {
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
        for_each_group(x, L, vec, [&](const unsigned (&key)[4], int i0) {
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

// ---- Fast path pieces ------------------------------------------------------------------------------

// T0 for a row of L > cap scores. The sample is groups j * GL / SAMPLE_G (j < SAMPLE_G) of the row's GL
// groups of 4, spread over the whole row. The r-th largest of its S = 4 SAMPLE_G keys stands above
// about r L / S scores of the row; r is chosen for 1.5 k + TARGET_EXTRA of them, comfortably above k
// (the count's relative spread is about 1/sqrt(r); at L = 2^20, r = 32 for k = 2048, and r is smaller
// only where the target is several times k) and well below cap. T0 keeps 22 bits
// of that key (two rounds), so it is <= it; ALL_VALID when the sample holds fewer than r valid keys.
// skey: the candidate buffer, free at this point. Block-uniform; ends after a barrier.
__device__ unsigned sample_threshold(const float* __restrict__ x, int L, bool vec, int k, unsigned* skey,
                                     int* hist, int* misc, int* wbuf, int& par) {
    const int GL = (L + 3) >> 2;
    constexpr int U = SAMPLE_G / THREADS;
    float4 f[U];
    int q[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        q[u] = (int)((long long)(u * THREADS + (int)threadIdx.x) * GL / SAMPLE_G);
        f[u] = load_raw(x, L, vec, q[u], GL);
    }
    int nvalid = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        float v[4];
        mask_tail(f[u], L, q[u], v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const unsigned key = order_key(v[j]);
            skey[4 * (u * THREADS + (int)threadIdx.x) + j] = key;
            nvalid += key != 0u;
        }
    }
    int valid;
    block_excl_scan(nvalid, wbuf, par, valid);  // its barrier also publishes skey
    constexpr int S = 4 * SAMPLE_G;
    const long long target = k + k / 2 + TARGET_EXTRA;
    const long long r_want = (target * S + L - 1) / L;
    const int r = r_want < S ? (int)r_want : S;
    if (valid < r) return ALL_VALID;
    int above, cnt;
    return radix_select([&](int i, unsigned& v) { v = skey[i]; return true; }, S, r, 32, 10, hist, misc, wbuf,
                        par, above, cnt);
}

// Appends (key, column) of every score >= f0 in groups [qlo, qhi) of the row to the candidate buffer, in
// no particular order; *count (shared) grows by how many there were, including those past cap (dropped).
// Per tile, each warp reserves its run with one shared atomic. Block-uniform (warp shuffles).
__device__ __forceinline__ void collect(const float* __restrict__ x, int L, bool vec, int qlo, int qhi,
                                        float f0, unsigned* ckey, int* cidx, int cap, int* count) {
    const int lane = threadIdx.x & 31;
    for (int q0 = qlo; q0 < qhi; q0 += THREADS * CUNROLL) {
        float v[CUNROLL][4];
        load_tile<CUNROLL>(x, L, vec, q0, qhi, v);
        int c = 0;
#pragma unroll
        for (int u = 0; u < CUNROLL; ++u)
#pragma unroll
            for (int j = 0; j < 4; ++j) c += v[u][j] >= f0;
        int incl = c;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(FULL_MASK, incl, o);
            if (lane >= o) incl += y;
        }
        int base = 0;
        if (lane == 31 && incl > 0) base = atomicAdd(count, incl);
        base = __shfl_sync(FULL_MASK, base, 31) + incl - c;
        if (c > 0) {
#pragma unroll
            for (int u = 0; u < CUNROLL; ++u) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    if (v[u][j] >= f0) {
                        if (base < cap) {
                            ckey[base] = order_key(v[u][j]);
                            cidx[base] = 4 * (q0 + u * THREADS + (int)threadIdx.x) + j;
                        }
                        ++base;
                    }
                }
            }
        }
    }
}

__device__ __forceinline__ void cmp_swap(int& a, int& b, bool asc) {  // a sits at the lower position
    if ((a > b) == asc) {
        const int t = a;
        a = b;
        b = t;
    }
}

// Bitonic merge steps `stride`, stride/2, .., 1 (stride < SORT_CHUNK) for blocks of `size`, inside a
// warp: lane l holds positions p0 + 32 m (m = 0..3, p0 = warp * SORT_CHUNK + l) in v[m]. Strides 64
// and 32 pair a lane's own registers, smaller ones pair lanes (shuffles). Ascending where p & size == 0.
__device__ __forceinline__ void warp_merge(int (&v)[4], int p0, int lane, int size, int stride) {
    for (; stride > 0; stride >>= 1) {
        if (stride == 64) {
            cmp_swap(v[0], v[2], (p0 & size) == 0);
            cmp_swap(v[1], v[3], ((p0 + 32) & size) == 0);
        } else if (stride == 32) {
            cmp_swap(v[0], v[1], (p0 & size) == 0);
            cmp_swap(v[2], v[3], ((p0 + 64) & size) == 0);
        } else {
            const bool lower = (lane & stride) == 0;
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                const int other = __shfl_xor_sync(FULL_MASK, v[m], stride);
                const bool asc = ((p0 + 32 * m) & size) == 0;
                v[m] = lower == asc ? imin(v[m], other) : imax(v[m], other);
            }
        }
    }
}

// Sorts a[0, SN) ascending; SN a power of two, SORT_CHUNK <= SN <= KMAX. Blocks up to SORT_CHUNK are
// sorted in registers by the warps that own them; each larger merge does its strides >= SORT_CHUNK in
// shared memory (one barrier each) and the rest in registers. Block-uniform; starts and ends with a barrier.
__device__ void bitonic_sort(int* a, int SN) {
    const int lane = threadIdx.x & 31;
    const int p0 = (int)(threadIdx.x >> 5) * SORT_CHUNK + lane;
    const bool active = p0 - lane < SN;  // warp-uniform
    int v[4];
    __syncthreads();
    if (active) {
#pragma unroll
        for (int m = 0; m < 4; ++m) v[m] = a[p0 + 32 * m];
        for (int size = 2; size <= SORT_CHUNK; size <<= 1) warp_merge(v, p0, lane, size, size >> 1);
#pragma unroll
        for (int m = 0; m < 4; ++m) a[p0 + 32 * m] = v[m];
    }
    __syncthreads();
    for (int size = 2 * SORT_CHUNK; size <= SN; size <<= 1) {
        for (int stride = size >> 1; stride >= SORT_CHUNK; stride >>= 1) {
            for (int t = threadIdx.x; t < SN / 2; t += THREADS) {
                const int i = 2 * t - (t & (stride - 1)), j = i + stride;
                int ai = a[i], aj = a[j];
                cmp_swap(ai, aj, (i & size) == 0);
                a[i] = ai;
                a[j] = aj;
            }
            __syncthreads();
        }
        if (active) {
#pragma unroll
            for (int m = 0; m < 4; ++m) v[m] = a[p0 + 32 * m];
            warp_merge(v, p0, lane, size, SORT_CHUNK >> 1);
#pragma unroll
            for (int m = 0; m < 4; ++m) a[p0 + 32 * m] = v[m];
        }
        __syncthreads();
    }
}

// Writes the n distinct columns sel[0, n) (each < 32 * words) to o[0, n) in ascending order through the bitmap
// bits[0, words): every column sets its bit, then thread t reads back words [t wpt, (t + 1) wpt) in order,
// its place in o given by a block scan of the bits below. The bitmap costs a few shared-memory passes where a
// bitonic sort of 2048 columns takes ~15K cycles (measured per row on an H200, as much as the selection itself).
// Block-uniform; starts with a barrier (sel and the buffer's last use are complete).
__device__ void ordered_from_bitmap(const int* sel, int n, unsigned* bits, int words, int* __restrict__ o,
                                    int* wbuf, int& par) {
    __syncthreads();
    for (int i = threadIdx.x; i < words; i += THREADS) bits[i] = 0u;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += THREADS) atomicOr(&bits[sel[i] >> 5], 1u << (sel[i] & 31));
    __syncthreads();
    const int wpt = (words + THREADS - 1) / THREADS;
    const int w0 = imin(words, (int)threadIdx.x * wpt), w1 = imin(words, w0 + wpt);
    int c = 0;
    for (int i = w0; i < w1; ++i) c += __popc(bits[i]);
    int total;
    int at = block_excl_scan(c, wbuf, par, total);
    for (int i = w0; i < w1; ++i) {
        for (unsigned b = bits[i]; b != 0u; b &= b - 1u) o[at++] = (i << 5) + __ffs(b) - 1;
    }
}

// Fast path, C > k candidates all >= T0 (so they hold every score >= the k-th largest): writes the k
// chosen columns to sel[0, k), unordered. Block-uniform.
__device__ void choose_candidates(const unsigned* ckey, const int* cidx, int C, int k, int* sel, int* hist,
                                  int* misc, int* wbuf, int& par) {
    const int lane = threadIdx.x & 31;
    // v = key - kmin spans `top` bits: the first digit spreads the candidates over the histogram.
    unsigned mn = 0xffffffffu, mx = 0u;
    for (int i = threadIdx.x; i < C; i += THREADS) {
        const unsigned kk = ckey[i];
        mn = umin(mn, kk);
        mx = umax(mx, kk);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        mn = umin(mn, __shfl_xor_sync(FULL_MASK, mn, o));
        mx = umax(mx, __shfl_xor_sync(FULL_MASK, mx, o));
    }
    if (lane == 0) {
        atomicMin(reinterpret_cast<unsigned*>(misc + M_MIN), mn);
        atomicMax(reinterpret_cast<unsigned*>(misc + M_MAX), mx);
    }
    __syncthreads();
    const unsigned kmin = (unsigned)misc[M_MIN], span = (unsigned)misc[M_MAX] - kmin;
    const int top = span ? 32 - __clz(span) : 0;
    int above, eq;
    const unsigned thr = kmin + radix_select([&](int i, unsigned& v) { v = ckey[i] - kmin; return true; },
                                             C, k, top, 0, hist, misc, wbuf, par, above, eq);
    const int need = k - above;  // 1 <= need <= eq: how many keys equal to thr are taken
    // Ties: the need lowest columns among the keys equal to thr, i.e. those <= `last`.
    int last = 0x7fffffff;
    if (eq > need) {
        const unsigned cmax = (1u << IDX_TOP) - 1u;
        int a2, e2;
        const auto tied = [&](int i, unsigned& v) { v = cmax - (unsigned)cidx[i]; return ckey[i] == thr; };
        last = (int)(cmax - radix_select(tied, C, need, IDX_TOP, 0, hist, misc, wbuf, par, a2, e2));
    }
    for (int i0 = 0; i0 < C; i0 += THREADS) {  // block-uniform bound: the ballot needs every lane
        const int i = i0 + (int)threadIdx.x;
        bool take = false;
        int col = 0;
        if (i < C) {
            const unsigned kk = ckey[i];
            col = cidx[i];
            take = kk > thr || (kk == thr && col <= last);
        }
        const unsigned b = __ballot_sync(FULL_MASK, take);
        int base = 0;
        if (lane == 0 && b != 0u) base = atomicAdd(misc + M_NSEL, __popc(b));
        base = __shfl_sync(FULL_MASK, base, 0);
        if (take) {
            const int p = base + __popc(b & ((1u << lane) - 1u));
            if (p < KMAX) sel[p] = col;
        }
    }
}

// The slot map (see the top of the file) over o = out's row r, in place. Block-uniform; the barrier makes
// every thread's writes to o visible before any is read back.
__device__ __forceinline__ void map_slots(int* __restrict__ o, int k, int r, int N, const int* __restrict__ blocks,
                                          const int* __restrict__ ends, int B) {
    if (blocks == nullptr) return;
    __syncthreads();
    const int* blk = blocks + (long long)r * (N / B);
    const int end = ends ? ends[r] : 0x7fffffff;
    for (int i = threadIdx.x; i < k; i += THREADS) {
        const int s = o[i];
        if (s < 0) continue;  // padding stays -1
        const int b = blk[s / B], p = b * B + s % B;
        o[i] = b < 0 || p >= end ? -1 : p;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
topk_rows(const float* __restrict__ scores, const int* __restrict__ lengths, int* __restrict__ out,
          unsigned* __restrict__ gcand, int* __restrict__ gcount, int N, int k, int vec_flag, int cap, int G,
          int slice_groups, const int* __restrict__ blocks, const int* __restrict__ ends, int B) {
    extern __shared__ int4 smem4[];
    int* hist = reinterpret_cast<int*>(smem4);
    int* sel = hist + NBINS;
    int* wbuf = sel + KMAX;
    int* misc = wbuf + 64;
    unsigned* ckey = reinterpret_cast<unsigned*>(misc + 16);
    int* cidx = reinterpret_cast<int*>(ckey + cap);

    const int tid = threadIdx.x;
    const int row = blockIdx.x / G, slice = blockIdx.x - row * G;
    const float* x = scores + (long long)row * N;
    int* o = out + (long long)row * k;
    const int L = lengths ? imin(imax(lengths[row], 0), N) : N;
    const bool vec = vec_flag != 0;
    int par = 0;

    if (tid < 16) misc[tid] = tid == M_MIN ? -1 : 0;  // M_MIN starts at 0xffffffff, the other counters at 0

    // 1-2. T0 (the same in every CTA of the row), then this CTA's candidates.
    const unsigned T0 = L > cap ? sample_threshold(x, L, vec, k, ckey, hist, misc, wbuf, par) : ALL_VALID;
    __syncthreads();  // misc initialised; the sample's keys read
    const int GL = (L + 3) >> 2;
    const int qlo = slice * slice_groups, qhi = imin(GL, qlo + slice_groups);
    collect(x, L, vec, qlo, qhi, key_float(T0), ckey, cidx, cap, misc + M_COUNT);
    __syncthreads();
    int C = misc[M_COUNT];

    // 3. Split mode: publish the candidates; the row's last CTA gathers them all and goes on alone.
    if (G > 1) {
        int* cnt = gcount + 2 * (long long)row;
        unsigned* gc = gcand + 2 * (long long)row * cap;
        if (tid == 0) misc[M_BASE] = atomicAdd(cnt, C);
        __syncthreads();
        const int base = misc[M_BASE], stored = imin(C, cap);
        for (int i = tid; i < stored && base + i < cap; i += THREADS) {
            gc[2 * (base + i)] = ckey[i];
            gc[2 * (base + i) + 1] = (unsigned)cidx[i];
        }
        __threadfence();  // every writer's candidates before the done-count below
        __syncthreads();
        if (tid == 0) misc[M_LAST] = atomicAdd(cnt + 1, 1) == G - 1;
        __syncthreads();
        if (!misc[M_LAST]) return;
        __threadfence();
        C = *(volatile const int*)cnt;  // the row's count: every CTA has added to it
        if (C <= cap) {
            const volatile unsigned* g = gc;
            for (int i = tid; i < C; i += THREADS) {
                ckey[i] = g[2 * i];
                cidx[i] = (int)g[2 * i + 1];
            }
        }
        __syncthreads();  // every thread has read cnt: reset it for the next launch
        if (tid == 0) {
            cnt[0] = 0;
            cnt[1] = 0;
        }
    }

    // 4. The candidates hold the answer unless some score >= T0 was dropped (C > cap) or fewer than k
    //    scores reach T0 while T0 excluded some valid ones: then the exact path.
    if (C > cap || (C < k && T0 != ALL_VALID)) {
        exact_row(x, L, vec, k, o, hist, sel, wbuf, misc, ckey, cidx, cap, par);
        map_slots(o, k, row, N, blocks, ends, B);
        return;
    }
    int nsel;
    if (C <= k) {  // every candidate (every valid score of the row) is taken
        for (int i = tid; i < C; i += THREADS) sel[i] = cidx[i];
        nsel = C;
    } else {
        choose_candidates(ckey, cidx, C, k, sel, hist, misc, wbuf, par);
        nsel = k;
    }
    // 5. The chosen columns in ascending order: marked in a bitmap of the row (in the candidate buffer, free
    //    now) and read back in order, for rows of up to 64 cap columns (792K on H100/H200); a sort otherwise.
    const int words = (L + 31) >> 5;
    if (words <= 2 * cap) {
        ordered_from_bitmap(sel, nsel, ckey, words, o, wbuf, par);
    } else {
        int SN = SORT_CHUNK;
        while (SN < nsel) SN <<= 1;
        for (int i = nsel + tid; i < SN; i += THREADS) sel[i] = 0x7fffffff;
        bitonic_sort(sel, SN);
        for (int i = tid; i < nsel; i += THREADS) o[i] = sel[i];
    }
    for (int i = nsel + tid; i < k; i += THREADS) o[i] = -1;
    map_slots(o, k, row, N, blocks, ends, B);
}

// Short rows (see the top of the file): the whole row's keys sit in shared memory, so no sample, no
// candidate buffer and no sort. The dynamic shared memory holds hist, wbuf, misc, then keys[4 ceil(L / 4)].
extern "C" __global__ void __launch_bounds__(THREADS, 4)
topk_short(const float* __restrict__ scores, const int* __restrict__ lengths, int* __restrict__ out, int N,
           int k, const int* __restrict__ blocks, const int* __restrict__ ends, int B) {
    extern __shared__ int4 smem4[];
    int* hist = reinterpret_cast<int*>(smem4);
    int* wbuf = hist + NBINS;
    int* misc = wbuf + 64;
    unsigned* skey = reinterpret_cast<unsigned*>(misc + 16);  // 16-byte aligned: read as uint4 below

    const int tid = threadIdx.x;
    const float* x = scores + (long long)blockIdx.x * N;
    int* o = out + (long long)blockIdx.x * k;
    const int L = lengths ? imin(imax(lengths[blockIdx.x], 0), N) : N;
    const int G = (L + 3) >> 2;
    int par = 0;

    // The keys, 0 (invalid) from L to the end of the last group of 4, and how many are valid.
    int my_valid = 0;
    for (int i = tid; i < 4 * G; i += THREADS) {
        const unsigned key = i < L ? order_key(x[i]) : 0u;
        skey[i] = key;
        my_valid += key != 0u;
    }
    int valid;
    block_excl_scan(my_valid, wbuf, par, valid);  // its barrier also publishes skey

    // thr = the k-th largest key, of whose equals the `need` lowest columns are taken. At most k valid keys:
    // thr = 0 and need = 0 take every valid key (each is > 0).
    unsigned thr = 0u;
    int need = 0;
    if (valid > k) {
        int above, cnt;
        thr = radix_select([&](int i, unsigned& v) { v = skey[i]; return v != 0u; }, L, k, 32, 0, hist, misc,
                           wbuf, par, above, cnt);
        need = k - above;
    }

    // Column order: thread tid holds group g0 + tid, so a block scan places every chosen column.
    int run_gt = 0, run_eq = 0;
    for (int g0 = 0; g0 < G; g0 += THREADS) {  // block-uniform bound: select_group has a barrier
        const int g = g0 + tid;
        const uint4 q = g < G ? reinterpret_cast<const uint4*>(skey)[g] : make_uint4(0u, 0u, 0u, 0u);
        const unsigned key[4] = {q.x, q.y, q.z, q.w};
        const int idx[4] = {4 * g, 4 * g + 1, 4 * g + 2, 4 * g + 3};
        select_group(key, idx, thr, need, o, k, run_gt, run_eq, wbuf, par);
    }
    for (int i = imin(valid, k) + tid; i < k; i += THREADS) o[i] = -1;
    map_slots(o, k, blockIdx.x, N, blocks, ends, B);
}
