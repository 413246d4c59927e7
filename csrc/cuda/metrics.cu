// metrics: per query recall@k, ndcg@k (graded relevance) and mrr@k of a retrieved list.
//
// Mirrors the CPU backend's loop: answers are sorted and unique (binary search), sums run in rank
// order with rounded products and sums (__dmul_rn/__dadd_rn, no contraction). The discount table
// 1/log2(r + 2) and each query's relevances sorted descending (for the ideal DCG) come from the
// caller, computed with NumPy, so no device log2 can differ from the reference's in the last bit.
// Queries without answers get NaN. One thread per query.
//
// UNVERIFIED ON HARDWARE: compiled to PTX (sm_80/sm_90) and run only on a CPU emulation of CUDA;
// tests/test_cuda.py checks it against the reference on a device.
#include "topk_common.cuh"

#ifndef NF_METRICS_THREADS
#define NF_METRICS_THREADS 128
#endif

using nf::i64;

extern "C" __global__ void __launch_bounds__(NF_METRICS_THREADS)
    metrics(const i64* retrieved, i64 n, i64 width, const i64* ans_ptr, const i64* ans_index, const double* ans_rel,
            const double* ideal_rel, const double* discount, i64 k, double* out) {
    const i64 k_used = k < width ? k : width;  // columns actually looked at
    for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<i64>(gridDim.x) * blockDim.x) {
        double* o = out + i * 3;
        const i64 n_ans = ans_ptr[i + 1] - ans_ptr[i];
        if (n_ans == 0) {
            const double nan = __longlong_as_double(0x7ff8000000000000LL);
            o[0] = o[1] = o[2] = nan;
            continue;
        }
        const i64* answers = ans_index + ans_ptr[i];
        const double* rel = ans_rel + ans_ptr[i];
        const double* ideal = ideal_rel + ans_ptr[i];
        const i64* top = retrieved + i * width;
        i64 n_hit = 0, first = -1;
        double dcg = 0.0;
        for (i64 r = 0; r < k_used; ++r) {
            const i64 v = top[r];
            if (v < 0) continue;
            i64 lo = 0, hi = n_ans;
            while (lo < hi) {
                const i64 mid = (lo + hi) >> 1;
                if (answers[mid] < v) lo = mid + 1;
                else hi = mid;
            }
            if (lo == n_ans || answers[lo] != v) continue;
            ++n_hit;
            if (first < 0) first = r;
            dcg = __dadd_rn(dcg, __dmul_rn(rel[lo], discount[r]));
        }
        const i64 n_ideal = n_ans < k ? n_ans : k;
        double idcg = 0.0;
        for (i64 r = 0; r < n_ideal; ++r) idcg = __dadd_rn(idcg, __dmul_rn(ideal[r], discount[r]));
        o[0] = __ddiv_rn(static_cast<double>(n_hit), static_cast<double>(n_ideal));
        o[1] = idcg > 0 ? __ddiv_rn(dcg, idcg) : 0.0;
        o[2] = first >= 0 ? __ddiv_rn(1.0, static_cast<double>(first + 1)) : 0.0;
    }
}
