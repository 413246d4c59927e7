// nudge_m_intervals: per validation pair, the closed interval of gamma >= 0 on which its answer x
// is the top-1 record under NUDGE-M (x'_j = e_j + gamma * c_j/|c_j|).
//
// Each competitor j gives gamma * D >= s_dif with D = g_x - g_j and s_dif = s_j - s_x, and
// alpha = s_dif / (D + eps): D > 0 bounds gamma from below, D < 0 from above, D == 0 demands
// s_dif <= 0. The competitors are every touched record (x itself included: D = 0, s_dif = 0 bounds
// nothing) and the best untouched record other than x (g = 0). The arithmetic is the reference's,
// operation by operation (__dsub_rn/__dadd_rn/__ddiv_rn: IEEE, no contraction), and max/min
// propagate NaN like np.max/np.min. Max and min are exact and order-free, so the warp reduction
// gives the reference's bits whatever order the lanes combine in. One warp per pair, lanes over
// the competitors (coalesced reads of the query's row of S and G).
//
// UNVERIFIED ON HARDWARE: compiled to PTX (sm_80/sm_90) and run only on a CPU emulation of CUDA;
// tests/test_cuda.py checks it against the reference on a device, bit for bit.
#include "topk_common.cuh"

#ifndef NF_NUDGE_M_THREADS
#define NF_NUDGE_M_THREADS 256
#endif

using nf::i64;

namespace {

__device__ __forceinline__ bool is_nan(double v) { return v != v; }

// np.max / np.min semantics: NaN wins; otherwise std::max / std::min (keep `acc` on equality).
__device__ __forceinline__ double nan_max(double acc, double v) {
    if (is_nan(acc) || is_nan(v)) return __longlong_as_double(0x7ff8000000000000LL);
    return acc < v ? v : acc;
}
__device__ __forceinline__ double nan_min(double acc, double v) {
    if (is_nan(acc) || is_nan(v)) return __longlong_as_double(0x7ff8000000000000LL);
    return v < acc ? v : acc;
}

struct Bounds {
    double low, high;
    bool tie_block;
    __device__ __forceinline__ void add(double D, double s_dif, double eps) {
        const double alpha = __ddiv_rn(s_dif, __dadd_rn(D, eps));
        if (D > 0) low = nan_max(low, alpha);
        else if (D < 0) high = nan_min(high, alpha);
        else if (D == 0 && s_dif > 0) tie_block = true;
    }
};

}  // namespace

extern "C" __global__ void __launch_bounds__(NF_NUDGE_M_THREADS)
    nudge_m_intervals(const double* S, const double* G, i64 t, const i64* pair_query, const double* s_x,
                      const double* g_x, const double* u_score, i64 n_pairs, double eps, double* low, double* high,
                      unsigned char* feasible) {
    // Unbounded above: 1/eps, the reference's "large" (inf when eps == 0).
    const double large = eps == 0 ? nf::pos_inf_d() : __ddiv_rn(1.0, eps);
    const int lane = threadIdx.x & 31;
    const i64 warps = static_cast<i64>(gridDim.x) * (blockDim.x >> 5);
    for (i64 p = (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; p < n_pairs; p += warps) {
        const double* Si = S + pair_query[p] * t;
        const double* Gi = G + pair_query[p] * t;
        const double sx = s_x[p], gx = g_x[p];
        Bounds b{0.0, large, false};
        for (i64 j = lane; j < t; j += 32) b.add(__dsub_rn(gx, Gi[j]), __dsub_rn(Si[j], sx), eps);
        // The untouched competitor (u_score = -inf never beats x).
        if (lane == 0) b.add(gx, __dsub_rn(u_score[p], sx), eps);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            b.low = nan_max(b.low, __shfl_xor_sync(nf::kFullMask, b.low, o));
            b.high = nan_min(b.high, __shfl_xor_sync(nf::kFullMask, b.high, o));
        }
        const bool tie_block = __any_sync(nf::kFullMask, b.tie_block);
        if (lane == 0) {
            const double lo = nan_max(b.low, 0.0);
            low[p] = lo;
            high[p] = b.high;
            feasible[p] = (!tie_block && b.high >= lo) ? 1 : 0;
        }
    }
}
