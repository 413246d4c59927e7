// project: the new vectors of the touched records, alpha[j] * E[j] + beta[j] * C[j].
//
// Both NUDGE variants reduce to this form (NUDGE-M: alpha = 1, beta = gamma/|c|; NUDGE-N: the
// plane of e_j and c_j). Computed in double, rounded once to float32. Parallel over records.
#include "common.hpp"

namespace nudgefast {

template <typename TE, typename TC>
void project(const TE* E, const TC* C, const double* alpha, const double* beta, int64_t t, int64_t d, float* out,
             int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t j = 0; j < t; ++j) {
        for (int64_t c = 0; c < d; ++c) {
            const double a_e = alpha[j] * static_cast<double>(E[j * d + c]);  // no fused multiply-add: as in NumPy
            const double b_c = beta[j] * static_cast<double>(C[j * d + c]);
            out[j * d + c] = static_cast<float>(a_e + b_c);
        }
    }
}

#define NUDGEFAST_PROJECT(TE, TC) \
    template void project<TE, TC>(const TE*, const TC*, const double*, const double*, int64_t, int64_t, float*, int);
NUDGEFAST_PROJECT(float, float)
NUDGEFAST_PROJECT(float, double)
NUDGEFAST_PROJECT(double, float)
NUDGEFAST_PROJECT(double, double)
#undef NUDGEFAST_PROJECT

}  // namespace nudgefast
