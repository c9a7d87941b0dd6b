// FP8 block dequantisation of linear weights.
//
//   out[i, j] = e4m3(w8[i, j]) * scale_inv[i / 128, j / 128]
//
// w8        uint8 [O, I]                  e4m3 bit patterns, row-major
// scale_inv float [ceil(O/128), ceil(I/128)]
// table     float [256]                   e4m3 bits -> value (NaN for 0x7f/0xff)
// out       float [O, I]  (f32 kernel) or uint16 bf16 bits [O, I] (bf16 kernel, round to nearest even)
// Launch: 1-D grid, any block size, one thread per element. Memory-bound: 1 byte in, 2-4 bytes out.

__device__ __forceinline__ float dequant_one(const unsigned char* w8, const float* scale_inv,
                                             const float* table, int O, int I, long long idx) {
    int i = (int)(idx / I), j = (int)(idx % I);
    int sb = (I + 127) / 128;
    return table[w8[idx]] * scale_inv[(i / 128) * sb + j / 128];
}

extern "C" __global__ void dequant_fp8_block_f32(const unsigned char* __restrict__ w8,
                                                  const float* __restrict__ scale_inv,
                                                  const float* __restrict__ table,
                                                  float* __restrict__ out, int O, int I) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)O * I) return;
    out[idx] = dequant_one(w8, scale_inv, table, O, I, idx);
}

extern "C" __global__ void dequant_fp8_block_bf16(const unsigned char* __restrict__ w8,
                                                   const float* __restrict__ scale_inv,
                                                   const float* __restrict__ table,
                                                   unsigned short* __restrict__ out, int O, int I) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)O * I) return;
    float v = dequant_one(w8, scale_inv, table, O, I, idx);
    unsigned int u = __float_as_uint(v);
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even (no NaN can reach here from finite scales)
    out[idx] = (unsigned short)(u >> 16);
}
