// project: the new vectors of the touched records, alpha[j] * E[j] + beta[j] * C[j].
//
// Both NUDGE variants reduce to this form (NUDGE-M: alpha = 1, beta = gamma/|c|; NUDGE-N: the
// plane of e_j and c_j). Computed in double with two rounded products and a rounded sum (explicit
// __dmul_rn/__dadd_rn, so no fused multiply-add: the reference's NumPy rounding), then rounded once
// to float32: bit-identical to the reference. E and C arrive as float64 (float32 inputs are
// widened exactly on the way in). One thread per output element.
//
// UNVERIFIED ON HARDWARE: compiled to PTX (sm_80/sm_90) and run only on a CPU emulation of CUDA;
// tests/test_cuda.py checks it against the reference on a device.
#include "topk_common.cuh"

#ifndef NF_PROJECT_THREADS
#define NF_PROJECT_THREADS 256
#endif

using nf::i64;

extern "C" __global__ void __launch_bounds__(NF_PROJECT_THREADS)
    project(const double* E, const double* C, const double* alpha, const double* beta, i64 t, i64 d, float* out) {
    const i64 total = t * d;
    for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<i64>(gridDim.x) * blockDim.x) {
        const i64 j = e / d;
        const double a_e = __dmul_rn(alpha[j], E[e]);
        const double b_c = __dmul_rn(beta[j], C[e]);
        out[e] = __double2float_rn(__dadd_rn(a_e, b_c));
    }
}
