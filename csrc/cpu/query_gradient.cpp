// query_gradient: c_j = sum of the train queries that have record j among their answers.
//
// A segmented sum in double over the rows `order[seg_ptr[j]:seg_ptr[j+1]]`, added in the given
// order so the result is deterministic and equal for any thread count. Parallel over segments.
#include "common.hpp"

namespace nudgefast {

template <typename T>
void query_gradient(const T* queries, int64_t d, const int64_t* order, const int64_t* seg_ptr, int64_t t,
                    double* out, int n_threads) {
    // Segment lengths vary (popular answers collect many queries): hand them out dynamically.
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 16)
    for (int64_t j = 0; j < t; ++j) {
        double* row = out + j * d;
        std::fill(row, row + d, 0.0);
        for (int64_t p = seg_ptr[j]; p < seg_ptr[j + 1]; ++p) {
            const T* q = queries + order[p] * d;
            for (int64_t c = 0; c < d; ++c) row[c] += static_cast<double>(q[c]);
        }
    }
}

template void query_gradient<float>(const float*, int64_t, const int64_t*, const int64_t*, int64_t, double*, int);
template void query_gradient<double>(const double*, int64_t, const int64_t*, const int64_t*, int64_t, double*, int);

}  // namespace nudgefast
