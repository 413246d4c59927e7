// dot64: out[i, j] = sum over k of A[i, k] * B[j, k], in double, each element one fused
// multiply-add chain over k = 0 .. d-1 in order (__fma_rn): the same value for the same two rows
// whatever the shapes (and the same bits as the CPU kernel's chain). The tuner's exactness
// against a fresh fit relies on it. One thread per output element: these products are small
// (validation queries x touched records), the corpus pass is elsewhere.
//
// UNVERIFIED ON HARDWARE: compiled to PTX (sm_80/sm_90) and run only on a CPU emulation of CUDA;
// tests/test_cuda.py checks it against the reference on a device.
#include "topk_common.cuh"

#ifndef NF_DOT64_THREADS
#define NF_DOT64_THREADS 256
#endif

using nf::i64;

extern "C" __global__ void __launch_bounds__(NF_DOT64_THREADS)
    dot64(const double* A, const double* B, i64 n, i64 m, i64 d, double* out) {
    const i64 total = n * m;
    for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<i64>(gridDim.x) * blockDim.x) {
        const double* a = A + (e / m) * d;
        const double* b = B + (e % m) * d;
        double acc = 0.0;
        for (i64 k = 0; k < d; ++k) acc = __fma_rn(a[k], b[k], acc);
        out[e] = acc;
    }
}
