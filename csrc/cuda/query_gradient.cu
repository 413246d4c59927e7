// query_gradient: c_j = sum of the train queries that have record j among their answers.
//
// A segmented sum in double: row j is the sum of queries[order[p]] for p in
// [seg_ptr[j], seg_ptr[j+1]), added in that order starting from the first term: the CPU backend's
// order, so the two agree bit for bit. An empty segment (begin == end) sums to 0 and reads nothing:
// order[begin] may lie past the end of `order` (the last segment) or belong to the next segment. NumPy's reduceat (the reference)
// associates differently (first term added last), so it agrees to rounding only. One thread per
// output element (segment, column): consecutive threads read consecutive columns of the same query
// row (coalesced). Only additions: no contraction can change rounding.
//
// UNVERIFIED ON HARDWARE: compiled to PTX (sm_80/sm_90) and run only on a CPU emulation of CUDA;
// tests/test_cuda.py checks it against the reference on a device.
#include "topk_common.cuh"

#ifndef NF_QG_THREADS
#define NF_QG_THREADS 128
#endif

using nf::i64;

template <typename T>
__device__ __forceinline__ void query_gradient_body(const T* queries, i64 d, const i64* order, const i64* seg_ptr,
                                                    i64 t, double* out) {
    const i64 total = t * d;
    for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<i64>(gridDim.x) * blockDim.x) {
        const i64 j = e / d, c = e % d;
        const i64 begin = seg_ptr[j], end = seg_ptr[j + 1];
        if (begin >= end) {
            out[e] = 0.0;
            continue;
        }
        double acc = static_cast<double>(queries[order[begin] * d + c]);
        for (i64 p = begin + 1; p < end; ++p) acc = __dadd_rn(acc, static_cast<double>(queries[order[p] * d + c]));
        out[e] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(NF_QG_THREADS)
    query_gradient_f32(const float* queries, i64 d, const i64* order, const i64* seg_ptr, i64 t, double* out) {
    query_gradient_body(queries, d, order, seg_ptr, t, out);
}

extern "C" __global__ void __launch_bounds__(NF_QG_THREADS)
    query_gradient_f64(const double* queries, i64 d, const i64* order, const i64* seg_ptr, i64 t, double* out) {
    query_gradient_body(queries, d, order, seg_ptr, t, out);
}
