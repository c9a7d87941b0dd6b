// Block-wide selection pieces shared by kernels/topk.cu and kernels/hisa_decode.cu: one CTA of THREADS
// threads finds the k largest of n keys (an 11-bit radix select) and writes the chosen indices in index
// order (a block scan), so nothing is sorted. The file that includes this one launches THREADS threads a
// CTA and gives the pieces their shared memory: hist int[NBINS], wbuf int[2][32] (the block scans'
// alternating buffers), misc int[3] (find_bin's result; select_registers uses misc int[8], leaving misc[3]).
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

// The k largest of a row of up to THREADS * PER fp32 values held in registers, warp-contiguous: lane l of warp w
// holds indices w 32 J + 32 j + l (j < J) as v[j], J = ceil(row / (32 NWARPS)) <= PER (past J or past the row:
// -inf), so a warp's loads of a row are coalesced, every warp holds a share of a short row, and index order is
// (warp, j, lane) order. Valid values: all but -inf and NaN (order_key's). emit(slot, index) is called once for
// each chosen index, slot = its place among the chosen in index order (0 .. k-1); ties at the threshold go to
// the lower indices. Returns the number of valid values (a row with at most k of them has them all chosen; the
// caller pads slots [min(valid, k), k)).
//
// One CTA does this alone, so its instructions, not memory, are the cost: each pass over the values is a
// handful of instructions a value, and the threshold takes one round of bins in the usual case.
//  1. The valid count and the range [lo, hi] of the finite values (a block reduction).
//  2. Threshold: one round of NBINS bins laid out linearly over [lo, hi] (+inf has the top bin to itself). A
//     bin's number is monotone in the value (a subtraction and a multiplication, each rounded once, then a
//     truncation), so every value of a higher bin is larger than every value of a lower one. Scores spread
//     over their range, so the bin holding the k-th largest holds a few values: they are gathered and ranked
//     exactly (each against the others), which gives thr, the k-th largest value, `need` (how many of the
//     values equal to thr are chosen) and how many there are. A bin holding more than RANK_MAX values (a far
//     outlier squeezes the rest into a few bins, or many values tie) falls back to radix rounds over the order
//     keys, 11 bits a round from the top, stopping once the threshold bin is taken whole.
//  3. Placement. When every value equal to thr is chosen (no tie is split: the usual case), the chosen are the
//     values >= thr: each warp counts its own by ballots, one block scan of the warp totals, then each warp
//     walks its values in order, a ballot prefix count giving each chosen value its slot. A split tie takes
//     the exact walk over order keys: the values above thr, and the first `need` equal to it.
// Values are compared as fp32 numbers, and CuPy builds every RawModule with -ftz=true, under which a subnormal
// compares as zero: a row must hold no subnormal values (hisa_decode's are products computed under the same
// flag, which flushes subnormal results to zero), or two of them may be ranked as a tie.
// Block-uniform; clobbers hist, misc[0..2] and misc[4..7] (not misc[3]) and wbuf (a barrier must separate the
// caller's last use of wbuf from this call); ends after a barrier.
__device__ __forceinline__ int row_index(int j, int J) {
    return (threadIdx.x >> 5) * 32 * J + 32 * j + (threadIdx.x & 31);
}

#define RANK_MAX 128  // the most values of the threshold bin ranked exactly (each against all the others)
#define F_NEG_INF __uint_as_float(0xff800000u)
#define F_POS_INF __uint_as_float(0x7f800000u)

template <int PER, class Emit>
__device__ __forceinline__ int select_registers(const float (&v)[PER], int J, int k, int* hist, int* wbuf,
                                                int* misc, int& par, Emit emit) {
    static_assert(PER * THREADS < 65536, "the packed (above, equal) counts of the scan hold 16 bits each");
    static_assert(3 * NWARPS <= 64, "wbuf holds each warp's valid count and finite range");
    static_assert(RANK_MAX <= THREADS && RANK_MAX <= NBINS, "a thread a ranked value, the values held in hist");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // 1. Valid count and finite range (a warp's, then the block's through wbuf).
    int valid = 0;
    float lo = F_POS_INF, hi = F_NEG_INF;
#pragma unroll
    for (int j = 0; j < PER; ++j) {  // every loop over the values stops at J (block-uniform): short rows are cheap
        if (j >= J) break;
        const float x = v[j];
        valid += x > F_NEG_INF;     // false for -inf and NaN
        if (fabsf(x) < F_POS_INF) {  // finite
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        valid += __shfl_xor_sync(FULL_MASK, valid, o);
        lo = fminf(lo, __shfl_xor_sync(FULL_MASK, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(FULL_MASK, hi, o));
    }
    for (int i = threadIdx.x; i < NBINS; i += THREADS) hist[i] = 0;
    if (lane == 0) {
        wbuf[warp] = valid;
        wbuf[NWARPS + warp] = __float_as_int(lo);
        wbuf[2 * NWARPS + warp] = __float_as_int(hi);
    }
    if (threadIdx.x == 0) misc[4] = 0;  // the threshold bin's gathered count
    __syncthreads();
    valid = lane < NWARPS ? wbuf[lane] : 0;
    lo = lane < NWARPS ? __int_as_float(wbuf[NWARPS + lane]) : F_POS_INF;
    hi = lane < NWARPS ? __int_as_float(wbuf[2 * NWARPS + lane]) : F_NEG_INF;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        valid += __shfl_xor_sync(FULL_MASK, valid, o);
        lo = fminf(lo, __shfl_xor_sync(FULL_MASK, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(FULL_MASK, hi, o));
    }
    // 2. The threshold. fast: the chosen are the values >= thr (at most k valid: every valid value, thr -inf
    //    excluded by the > test below). Otherwise key_thr and need drive the exact walk.
    bool fast = true;
    float thr = F_NEG_INF;
    unsigned key_thr = 0u;
    int need = 0;
    if (valid > k) {
        // Bins 0 .. NBINS-2 over [lo, hi] for the finite values (all in bin 0 when lo = hi or when hi - lo
        // overflows), NBINS-1 for +inf.
        const float span = lo <= hi ? hi - lo : 0.0f;
        float scale = span > 0.0f ? (NBINS - 2) / span : 0.0f;
        if (!(scale < 3.0e38f)) scale = 0.0f;  // a subnormal span: no finite scale
        auto bin_of = [&](float x) {           // x valid
            return x == F_POS_INF ? NBINS - 1 : imin(NBINS - 2, (int)__fmul_rn(__fsub_rn(x, lo), scale));
        };
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            if (j >= J) break;
            const float x = v[j];
            if (x > F_NEG_INF) atomicAdd(&hist[bin_of(x)], 1);
        }
        __syncthreads();
        find_bin(hist, k, misc, wbuf, par);  // ends with a barrier: hist is free again
        const int b = misc[0], above = misc[1], cnt = misc[2];
        if (cnt <= RANK_MAX) {  // block-uniform. Bin b's values into hist[0, cnt), then ranked.
#pragma unroll
            for (int j = 0; j < PER; ++j) {
                if (j >= J) break;
                const float x = v[j];
                if (x > F_NEG_INF && bin_of(x) == b) hist[atomicAdd(&misc[4], 1)] = __float_as_int(x);
            }
            __syncthreads();
            if ((int)threadIdx.x < cnt) {  // the value with gt < rem <= gt + eq is the rem-th largest
                const float x = __int_as_float(hist[threadIdx.x]);
                int gt = 0, eq = 0;
                for (int i = 0; i < cnt; ++i) {
                    const float o = __int_as_float(hist[i]);
                    gt += o > x;
                    eq += o == x;  // -0.0 == +0.0, as order_key has them
                }
                const int rem = k - above;
                if (gt < rem && rem <= gt + eq) {  // every thread holding that value writes the same words
                    misc[5] = __float_as_int(x);
                    misc[6] = rem - gt;
                    misc[7] = eq;
                }
            }
            __syncthreads();
            thr = __int_as_float(misc[5]);
            need = misc[6];
            fast = need == misc[7];  // every value equal to thr is chosen
            key_thr = order_key(thr);
        } else {  // radix rounds over the order keys
            fast = false;
            unsigned P = 0u;
            int above_r = 0, top = 32;
            need = -1;
            while (top > 0 && need < 0) {
                const int w = imin(11, top), sh = top - w;
                const unsigned fixed = top >= 32 ? 0u : ~0u << top, dm = (1u << w) - 1u;
                for (int i = threadIdx.x; i < NBINS; i += THREADS) hist[i] = 0;
                __syncthreads();
#pragma unroll
                for (int j = 0; j < PER; ++j) {
                    if (j >= J) break;
                    const unsigned kj = order_key(v[j]);
                    if (kj != 0u && (kj & fixed) == P) atomicAdd(&hist[(kj >> sh) & dm], 1);
                }
                __syncthreads();
                find_bin(hist, k - above_r, misc, wbuf, par);
                P |= (unsigned)misc[0] << sh;
                above_r += misc[1];
                top = sh;
                if (misc[2] == k - above_r) {  // the whole bin is taken: every key >= P (P's low bits are 0)
                    key_thr = P - 1u;          // > 0: valid keys are >= 2^23
                    need = 0;
                }
            }
            if (need < 0) {  // all 32 bits decided: key_thr is the k-th largest key, `need` of its equals taken
                key_thr = P;
                need = k - above_r;
            }
        }
    }
    // 3. Placement. This warp's chosen count (fast) or its keys above and at key_thr (lane 0 of the scan gets
    //    the warp's totals; the others add 0); the ballots are taken again below rather than kept (registers).
    const unsigned below = (1u << lane) - 1u;  // lanes before this one
    if (valid <= k) __syncthreads();  // the scan below rewrites wbuf: every thread has read step 1's totals
    if (fast) {
        int c = 0;
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            if (j >= J) break;
            const float x = v[j];
            c += __popc(__ballot_sync(FULL_MASK, x >= thr && x > F_NEG_INF));
        }
        int total;
        const int excl = block_excl_scan(lane == 0 ? c : 0, wbuf, par, total);
        int run = __shfl_sync(FULL_MASK, excl, 0);  // lane 0's prefix: the warps before this one
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            if (j >= J) break;
            const float x = v[j];
            const bool chosen = x >= thr && x > F_NEG_INF;
            const unsigned cm = __ballot_sync(FULL_MASK, chosen);
            if (chosen) emit(run + __popc(cm & below), row_index(j, J));  // at most k chosen: slots < k
            run += __popc(cm);
        }
        return valid;
    }
    int g = 0, e = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        if (j >= J) break;
        const unsigned kj = order_key(v[j]);
        g += __popc(__ballot_sync(FULL_MASK, kj > key_thr));
        e += __popc(__ballot_sync(FULL_MASK, kj == key_thr && kj != 0u));
    }
    int total;
    const int excl = block_excl_scan(lane == 0 ? g | (e << 16) : 0, wbuf, par, total);
    const int first = __shfl_sync(FULL_MASK, excl, 0);
    int gt = first & 0xffff, eq = first >> 16;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        if (j >= J) break;
        const unsigned kj = order_key(v[j]);
        const bool above_thr = kj > key_thr, at_thr = kj == key_thr && kj != 0u;
        const unsigned gm = __ballot_sync(FULL_MASK, above_thr), em = __ballot_sync(FULL_MASK, at_thr);
        const int gb = gt + __popc(gm & below), eb = eq + __popc(em & below);
        const int slot = above_thr ? gb + imin(eb, need) : gb + eb;
        if ((above_thr || (at_thr && eb < need)) && slot < k) emit(slot, row_index(j, J));
        gt += __popc(gm);
        eq += __popc(em);
    }
    return valid;
}
