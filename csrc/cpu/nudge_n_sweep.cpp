// nudge_n_sweep: for every validation query and every gamma of the NUDGE-N grid, how many of
// its top-k_val records are answers.
//
// A touched record j scores alpha[g, j] * S[i, j] + beta[g, j] * H[i, j] (the closed form of
// v . x'_j(gamma)); untouched records do not move with gamma, so their top-k_val per query is
// given. Selection uses the shared top-k heap (score desc, index asc); only the set matters, so
// it is never sorted.
//
// Memory order: alpha/beta (n_gamma x t) are the large operand, so a thread takes a group of
// queries and walks the touched records in blocks, reading each alpha/beta block once for the
// whole group (kGroup x fewer reads than one query at a time). Each (query, gamma) keeps its
// own heap, seeded with the untouched candidates so that almost every touched score is rejected
// by one comparison with a vectorised block maximum. `kth` (optional) gets every heap's root:
// the k_val-th best score (-inf while fewer candidates).
#include "common.hpp"

namespace nudgefast {

void nudge_n_sweep(const double* S, const double* H, int64_t n_b, int64_t t, const double* alpha,
                   const double* beta, int64_t n_gamma, const int64_t* touched, const double* unt_scores,
                   const int64_t* unt_index, int64_t n_unt, const int64_t* ans_ptr, const int64_t* ans_index,
                   int64_t k_val, int64_t* hits, double* kth, int n_threads) {
    constexpr int64_t kGroup = 8;
    constexpr int64_t kBlock = 256;
    const int64_t n_groups = (n_b + kGroup - 1) / kGroup;
    const SweepKernel& sweep = *kernels().sweep;
    WorkerErrors errors;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<double> heap_s;
        std::vector<int64_t> heap_i;
        bool ready = false;
        errors.run([&] {
            heap_s.resize(static_cast<std::size_t>(kGroup * n_gamma * k_val));
            heap_i.resize(static_cast<std::size_t>(kGroup * n_gamma * k_val));
            ready = true;
        });
        double block[kBlock];
#pragma omp for schedule(dynamic, 1)
        for (int64_t grp = 0; grp < n_groups; ++grp) {
            if (!ready) continue;  // allocation failed: reported below
            const int64_t i0 = grp * kGroup;
            const int64_t m = std::min<int64_t>(kGroup, n_b - i0);
            auto hs_of = [&](int64_t q, int64_t g) { return heap_s.data() + (q * n_gamma + g) * k_val; };
            auto hi_of = [&](int64_t q, int64_t g) { return heap_i.data() + (q * n_gamma + g) * k_val; };
            for (int64_t q = 0; q < m; ++q) {
                const int64_t i = i0 + q;
                for (int64_t g = 0; g < n_gamma; ++g) {
                    double* hs = hs_of(q, g);
                    int64_t* hi = hi_of(q, g);
                    TopKHeap<double>::clear(hs, hi, k_val);
                    for (int64_t j = 0; j < n_unt; ++j)
                        TopKHeap<double>::push(hs, hi, k_val, unt_scores[i * n_unt + j], unt_index[i * n_unt + j]);
                }
            }
            for (int64_t j0 = 0; j0 < t; j0 += kBlock) {
                const int64_t len = std::min<int64_t>(kBlock, t - j0);
                for (int64_t g = 0; g < n_gamma; ++g) {
                    const double* a = alpha + g * t + j0;
                    const double* b = beta + g * t + j0;
                    for (int64_t q = 0; q < m; ++q) {
                        const double* Si = S + (i0 + q) * t + j0;
                        const double* Hi = H + (i0 + q) * t + j0;
                        double* hs = hs_of(q, g);
                        // The scores and their maximum: the instruction-set level's kernel.
                        const double best = sweep.scores(a, b, Si, Hi, len, block);
                        // '>=': a tie with the worst entry may still win on the lower index.
                        if (!(best >= hs[0])) continue;
                        int64_t* hi = hi_of(q, g);
                        for (int64_t j = 0; j < len; ++j)
                            if (block[j] >= hs[0]) TopKHeap<double>::push(hs, hi, k_val, block[j], touched[j0 + j]);
                    }
                }
            }
            for (int64_t q = 0; q < m; ++q) {
                const int64_t i = i0 + q;
                const int64_t* ans_begin = ans_index + ans_ptr[i];
                const int64_t* ans_end = ans_index + ans_ptr[i + 1];
                for (int64_t g = 0; g < n_gamma; ++g) {
                    const double* hs = hs_of(q, g);
                    const int64_t* hi = hi_of(q, g);
                    int64_t count = 0;
                    for (int64_t j = 0; j < k_val; ++j)
                        if (std::isfinite(hs[j]) && std::binary_search(ans_begin, ans_end, hi[j])) ++count;
                    hits[i * n_gamma + g] = count;
                    if (kth) kth[i * n_gamma + g] = hs[0];  // the heap's root: its k_val-th best
                }
            }
        }
    }
    errors.rethrow();
}

}  // namespace nudgefast
