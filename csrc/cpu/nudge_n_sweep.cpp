// nudge_n_sweep: for every validation query and every gamma of the NUDGE-N grid, how many of
// its top-k_val records are answers.
//
// A touched record j scores alpha[g, j] * S[i, j] + beta[g, j] * H[i, j] (the closed form of
// v . x'_j(gamma)); untouched records do not move with gamma, so their top-k_val per query is
// given. Selection uses the shared top-k heap (score desc, index asc); only the set matters, so
// it is never sorted. Parallel over queries; each (query, gamma) is independent.
#include "common.hpp"

namespace nudgefast {

void nudge_n_sweep(const double* S, const double* H, int64_t n_b, int64_t t, const double* alpha,
                   const double* beta, int64_t n_gamma, const int64_t* touched, const double* unt_scores,
                   const int64_t* unt_index, int64_t n_unt, const int64_t* ans_ptr, const int64_t* ans_index,
                   int64_t k_val, int64_t* hits, int n_threads) {
    WorkerErrors errors;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<double> heap_s;
        std::vector<int64_t> heap_i;
        errors.run([&] {
            heap_s.resize(static_cast<std::size_t>(k_val));
            heap_i.resize(static_cast<std::size_t>(k_val));
        });
#pragma omp for schedule(dynamic, 4)
        for (int64_t i = 0; i < n_b; ++i) {
            if (static_cast<int64_t>(heap_s.size()) != k_val) continue;  // allocation failed: reported below
            const double* Si = S + i * t;
            const double* Hi = H + i * t;
            const int64_t* ans_begin = ans_index + ans_ptr[i];
            const int64_t* ans_end = ans_index + ans_ptr[i + 1];
            for (int64_t g = 0; g < n_gamma; ++g) {
                double* hs = heap_s.data();
                int64_t* hi = heap_i.data();
                TopKHeap<double>::clear(hs, hi, k_val);
                const double* a = alpha + g * t;
                const double* b = beta + g * t;
                for (int64_t j = 0; j < t; ++j) {
                    const double a_s = a[j] * Si[j];  // two roundings, then the sum: as in NumPy
                    const double b_h = b[j] * Hi[j];
                    TopKHeap<double>::push(hs, hi, k_val, a_s + b_h, touched[j]);
                }
                for (int64_t j = 0; j < n_unt; ++j)
                    TopKHeap<double>::push(hs, hi, k_val, unt_scores[i * n_unt + j], unt_index[i * n_unt + j]);
                int64_t count = 0;
                for (int64_t j = 0; j < k_val; ++j)
                    if (std::isfinite(hs[j]) && std::binary_search(ans_begin, ans_end, hi[j])) ++count;
                hits[i * n_gamma + g] = count;
            }
        }
    }
    errors.rethrow();
}

}  // namespace nudgefast
