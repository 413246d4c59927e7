// nudge_m_intervals: per validation pair, the closed interval of gamma >= 0 on which its answer
// x is the top-1 record under NUDGE-M (x'_j = e_j + gamma * c_j/|c_j|).
//
// Each competitor j gives gamma * D >= s_dif with D = g_x - g_j and s_dif = s_j - s_x, and
// alpha = s_dif / (D + eps): D > 0 bounds gamma from below, D < 0 from above, D == 0 demands
// s_dif <= 0. The competitors are every touched record (x itself included: D = 0, s_dif = 0)
// and the best untouched record other than x (g = 0). The arithmetic and its NaN propagation
// are those of the NumPy reference, so low/high are bit-identical. Parallel over pairs.
#include "common.hpp"

namespace nudgefast {
namespace {

// np.max / np.min propagate NaN; so do these.
inline double nan_max(double acc, double v) {
    return (std::isnan(acc) || std::isnan(v)) ? std::numeric_limits<double>::quiet_NaN() : std::max(acc, v);
}
inline double nan_min(double acc, double v) {
    return (std::isnan(acc) || std::isnan(v)) ? std::numeric_limits<double>::quiet_NaN() : std::min(acc, v);
}

struct Bounds {
    double low = 0.0, high;
    bool tie_block = false;
    double eps;
    Bounds(double eps_, double large) : high(large), eps(eps_) {}
    void add(double D, double s_dif) {
        const double alpha = s_dif / (D + eps);
        if (D > 0) low = nan_max(low, alpha);
        else if (D < 0) high = nan_min(high, alpha);
        else if (D == 0 && s_dif > 0) tie_block = true;
    }
};

}  // namespace

void nudge_m_intervals(const double* S, const double* G, int64_t t, const int64_t* pair_query, const double* s_x,
                       const double* g_x, const double* u_score, int64_t n_pairs, double eps, double* low,
                       double* high, bool* feasible, int n_threads) {
    // Unbounded above: 1/eps, the reference's "large" (inf when eps == 0).
    const double large = eps == 0 ? std::numeric_limits<double>::infinity() : 1.0 / eps;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 64)
    for (int64_t p = 0; p < n_pairs; ++p) {
        const double* Si = S + pair_query[p] * t;
        const double* Gi = G + pair_query[p] * t;
        Bounds b(eps, large);
        for (int64_t j = 0; j < t; ++j) b.add(g_x[p] - Gi[j], Si[j] - s_x[p]);
        b.add(g_x[p], u_score[p] - s_x[p]);  // the untouched competitor (u_score = -inf never beats x)
        low[p] = nan_max(b.low, 0.0);
        high[p] = b.high;
        feasible[p] = !b.tie_block && (b.high >= low[p]);
    }
}

}  // namespace nudgefast
