// metrics: per query recall@k, ndcg@k (graded relevance) and mrr@k of a retrieved list.
//
// Answers are sorted and unique, so membership is a binary search. Queries without answers get
// NaN (the API skips them). Parallel over queries.
#include "common.hpp"

namespace nudgefast {

void metrics(const int64_t* retrieved, int64_t n, int64_t width, const int64_t* ans_ptr, const int64_t* ans_index,
             const double* ans_rel, int64_t k, double* out, int n_threads) {
    const int64_t k_used = std::min(k, width);  // columns actually looked at
    std::vector<double> discount(static_cast<std::size_t>(std::max<int64_t>(k, 0)));
    for (int64_t r = 0; r < k; ++r) discount[r] = 1.0 / std::log2(static_cast<double>(r) + 2.0);

    WorkerErrors errors;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<double> ideal;
#pragma omp for schedule(dynamic, 64)
        for (int64_t i = 0; i < n; ++i) {
            errors.run([&] {
                double* o = out + i * 3;
                const int64_t n_ans = ans_ptr[i + 1] - ans_ptr[i];
                if (n_ans == 0) {
                    o[0] = o[1] = o[2] = std::numeric_limits<double>::quiet_NaN();
                    return;
                }
                const int64_t* answers = ans_index + ans_ptr[i];
                const double* rel = ans_rel + ans_ptr[i];
                const int64_t* top = retrieved + i * width;
                int64_t n_hit = 0, first = -1;
                double dcg = 0.0;
                for (int64_t r = 0; r < k_used; ++r) {
                    if (top[r] < 0) continue;
                    const int64_t* pos = std::lower_bound(answers, answers + n_ans, top[r]);
                    if (pos == answers + n_ans || *pos != top[r]) continue;
                    ++n_hit;
                    if (first < 0) first = r;
                    dcg += rel[pos - answers] * discount[r];
                }
                ideal.assign(rel, rel + n_ans);
                std::sort(ideal.begin(), ideal.end(), std::greater<double>());
                double idcg = 0.0;
                for (int64_t r = 0; r < std::min(n_ans, k); ++r) idcg += ideal[r] * discount[r];
                o[0] = static_cast<double>(n_hit) / static_cast<double>(std::min(n_ans, k));
                o[1] = idcg > 0 ? dcg / idcg : 0.0;
                o[2] = first >= 0 ? 1.0 / static_cast<double>(first + 1) : 0.0;
            });
        }
    }
    errors.rethrow();
}

}  // namespace nudgefast
