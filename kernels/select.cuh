// Block-wide selection pieces shared by kernels/topk.cu and kernels/hisa_decode.cu: one CTA of THREADS
// threads finds the k largest of n keys (an 11-bit radix select) and writes the chosen indices in index
// order (a block scan), so nothing is sorted. The file that includes this one launches THREADS threads a
// CTA and gives the pieces their shared memory: hist int[NBINS], wbuf int[2][32] (the block scans'
// alternating buffers), misc int[3] (find_bin's result).
//
// Keys. Each fp32 maps to an order-preserving uint32 key: negatives flip every bit, non-negatives set the
// sign bit; -inf and NaN map to 0 (invalid: every valid key is larger).
//
// NVRTC-compatible: no #include; kernels/_cuda.py:source pastes this file in place of its #include line.

#define THREADS 512
#define NWARPS (THREADS / 32)
#define NBINS 2048
#define BPT (NBINS / THREADS)  // histogram bins per thread in find_bin
#define FULL_MASK 0xffffffffu

static_assert(NBINS % THREADS == 0, "find_bin gives each thread BPT bins");
static_assert(NWARPS <= 32, "the block scan reduces one warp total per lane");

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

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
    const int wt = lane < NWARPS ? buf[lane] : 0;
    int wincl = wt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(FULL_MASK, wincl, o);
        if (lane >= o) wincl += y;
    }
    total = __shfl_sync(FULL_MASK, wincl, 31);
    return __shfl_sync(FULL_MASK, wincl - wt, warp) + incl - c;
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
    const int excl = block_excl_scan(g | (e << 16), wbuf, par, total);  // fields <= 4 THREADS < 2^16
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
// barrier, after which hist may be cleared. Thread t owns bins NBINS-1-BPT*t down to NBINS-BPT*(t+1).
__device__ __forceinline__ void find_bin(const int* hist, int k_rem, int* misc, int* wbuf, int& par) {
    const int b0 = NBINS - 1 - BPT * (int)threadIdx.x;
    int c[BPT], sum = 0;
#pragma unroll
    for (int j = 0; j < BPT; ++j) {
        c[j] = hist[b0 - j];
        sum += c[j];
    }
    int total;
    int run = block_excl_scan(sum, wbuf, par, total);
#pragma unroll
    for (int j = 0; j < BPT; ++j) {
        if (run < k_rem && k_rem <= run + c[j]) {
            misc[0] = b0 - j; misc[1] = run; misc[2] = c[j];
        }
        run += c[j];
    }
    __syncthreads();
}

// Radix select over elements i in [0, n): val(i, v) says whether i takes part and sets its value v
// (< 2^top). Finds the kth largest value digit by digit, 11 bits a round from bit `top` down to bit
// `stop`; returns it with the bits below `stop` cleared (P). above = #(v >> stop > P >> stop), cnt =
// #(v >> stop == P >> stop) (cnt = n when top <= stop: no round, every element must take part then).
// Requires 1 <= kth <= #(taking part). Block-uniform; clobbers hist and misc[0..2]; ends after a barrier.
template <class V>
__device__ __forceinline__ unsigned radix_select(V val, int n, int kth, int top, int stop, int* hist,
                                                 int* misc, int* wbuf, int& par, int& above, int& cnt) {
    unsigned P = 0u;
    above = 0;
    cnt = n;
    while (top > stop) {
        const int w = imin(11, top - stop), sh = top - w;
        const unsigned fixed = top >= 32 ? 0u : ~0u << top;  // bits already decided, P's
        const unsigned dm = (1u << w) - 1u;
        for (int i = threadIdx.x; i < NBINS; i += THREADS) hist[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += THREADS) {
            unsigned v;
            if (val(i, v) && (v & fixed) == P) atomicAdd(&hist[(v >> sh) & dm], 1);
        }
        __syncthreads();
        find_bin(hist, kth - above, misc, wbuf, par);
        P |= (unsigned)misc[0] << sh;
        above += misc[1];
        cnt = misc[2];
        top = sh;
    }
    return P;
}

// The k largest of a row of up to THREADS * PER keys held in registers, warp-contiguous: lane l of warp w holds
// indices w 32 J + 32 j + l (j < J) as key[j], J = ceil(row / (32 NWARPS)) <= PER (keys past J or past the row:
// 0, invalid), so a warp's loads of a row are coalesced, every warp holds a share of a short row, and index
// order is (warp, j, lane) order. emit(slot, index) is called once for each chosen index,
// slot = its place among the chosen in index order (0 .. k-1); ties at the threshold go to the lower indices.
// Returns the number of valid keys (a row with at most k of them has them all chosen; the caller pads slots
// [min(valid, k), k)).
// The threshold comes from radix_select's rounds run on the registers (11 bits a round from the top), stopping
// once the threshold bin is taken whole. Placement: each warp counts its keys above and at the threshold by
// ballots, one block scan of the warp totals, then each warp walks its keys in order with ballot prefix counts.
// Block-uniform; clobbers hist, misc[0..2]; ends after the scan's barrier.
__device__ __forceinline__ int row_index(int j, int J) {
    return (threadIdx.x >> 5) * 32 * J + 32 * j + (threadIdx.x & 31);
}

template <int PER, class Emit>
__device__ __forceinline__ int select_registers(const unsigned (&key)[PER], int J, int k, int* hist, int* wbuf,
                                                int* misc, int& par, Emit emit) {
    static_assert(PER * THREADS < 65536, "the packed (above, equal) counts of the scan hold 16 bits each");
    const int lane = threadIdx.x & 31;
    int mine = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) {  // every loop over the keys stops at J (block-uniform): short rows are cheap
        if (j >= J) break;
        mine += key[j] != 0u;
    }
    int valid;
    block_excl_scan(mine, wbuf, par, valid);
    unsigned thr = 0u;  // at most k valid: thr = 0 and need = 0 take every valid key
    int need = 0;
    if (valid > k) {
        unsigned P = 0u;
        int above = 0, top = 32;
        need = -1;
        while (top > 0 && need < 0) {
            const int w = imin(11, top), sh = top - w;
            const unsigned fixed = top >= 32 ? 0u : ~0u << top, dm = (1u << w) - 1u;
            for (int i = threadIdx.x; i < NBINS; i += THREADS) hist[i] = 0;
            __syncthreads();
#pragma unroll
            for (int j = 0; j < PER; ++j) {
                if (j >= J) break;
                if (key[j] != 0u && (key[j] & fixed) == P) atomicAdd(&hist[(key[j] >> sh) & dm], 1);
            }
            __syncthreads();
            find_bin(hist, k - above, misc, wbuf, par);
            P |= (unsigned)misc[0] << sh;
            above += misc[1];
            top = sh;
            if (misc[2] == k - above) {  // the whole bin is taken: every key >= P (P's low bits are 0)
                thr = P - 1u;            // > 0: valid keys are >= 2^23
                need = 0;
            }
        }
        if (need < 0) {  // all 32 bits decided: thr is the k-th largest key, `need` of its equals are taken
            thr = P;
            need = k - above;
        }
    }
    // This warp's keys above and at thr (lane 0 of the scan gets the warp's totals; the others add 0); the
    // ballots are taken again below rather than kept (registers).
    int g = 0, e = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        if (j >= J) break;
        g += __popc(__ballot_sync(FULL_MASK, key[j] > thr));
        e += __popc(__ballot_sync(FULL_MASK, key[j] == thr && key[j] != 0u));
    }
    int total;
    const int excl = block_excl_scan(lane == 0 ? g | (e << 16) : 0, wbuf, par, total);
    const int first = __shfl_sync(FULL_MASK, excl, 0);  // lane 0's prefix: the warps before this one
    int gt = first & 0xffff, eq = first >> 16;
    const unsigned below = (1u << lane) - 1u;  // lanes before this one
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        if (j >= J) break;
        const bool above_thr = key[j] > thr, at_thr = key[j] == thr && key[j] != 0u;
        const unsigned gm = __ballot_sync(FULL_MASK, above_thr), em = __ballot_sync(FULL_MASK, at_thr);
        const int gb = gt + __popc(gm & below), eb = eq + __popc(em & below);
        const int slot = above_thr ? gb + imin(eb, need) : gb + eb;
        if ((above_thr || (at_thr && eb < need)) && slot < k) emit(slot, row_index(j, J));
        gt += __popc(gm);
        eq += __popc(em);
    }
    return valid;
}
