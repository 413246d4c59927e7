// nudge_n_sweep's inner loop, compiled once per instruction-set level (see dispatch.hpp); the
// driver (groups of queries, heaps, threads) is csrc/cpu/nudge_n_sweep.cpp. out[j] = a[j] * s[j]
// + b[j] * h[j] with two roundings and then the sum (no contraction: the build passes
// -ffp-contract=off), as NumPy computes it, so every level gives the same bits; returns the
// largest out[j] (-inf for len == 0; a NaN is never the largest).
#include "common.hpp"

namespace nudgefast {
namespace NUDGEFAST_LEVEL {
namespace {

double scores(const double* a, const double* b, const double* s, const double* h, int64_t len, double* out) {
    constexpr double kNegInf = -std::numeric_limits<double>::infinity();
    int64_t j = 0;
#if defined(NUDGEFAST_AVX512)
    __m512d m0 = _mm512_set1_pd(kNegInf), m1 = m0;
    for (; j + 16 <= len; j += 16) {
        const __m512d v0 = _mm512_add_pd(_mm512_mul_pd(_mm512_loadu_pd(a + j), _mm512_loadu_pd(s + j)),
                                         _mm512_mul_pd(_mm512_loadu_pd(b + j), _mm512_loadu_pd(h + j)));
        const __m512d v1 = _mm512_add_pd(_mm512_mul_pd(_mm512_loadu_pd(a + j + 8), _mm512_loadu_pd(s + j + 8)),
                                         _mm512_mul_pd(_mm512_loadu_pd(b + j + 8), _mm512_loadu_pd(h + j + 8)));
        _mm512_storeu_pd(out + j, v0);
        _mm512_storeu_pd(out + j + 8, v1);
        // max(x, m) keeps m when x is NaN (the second operand is returned on unordered).
        m0 = _mm512_max_pd(v0, m0);
        m1 = _mm512_max_pd(v1, m1);
    }
    double best = _mm512_reduce_max_pd(_mm512_max_pd(m0, m1));
#elif defined(NUDGEFAST_AVX2)
    __m256d m0 = _mm256_set1_pd(kNegInf), m1 = m0;
    for (; j + 8 <= len; j += 8) {
        const __m256d v0 = _mm256_add_pd(_mm256_mul_pd(_mm256_loadu_pd(a + j), _mm256_loadu_pd(s + j)),
                                         _mm256_mul_pd(_mm256_loadu_pd(b + j), _mm256_loadu_pd(h + j)));
        const __m256d v1 = _mm256_add_pd(_mm256_mul_pd(_mm256_loadu_pd(a + j + 4), _mm256_loadu_pd(s + j + 4)),
                                         _mm256_mul_pd(_mm256_loadu_pd(b + j + 4), _mm256_loadu_pd(h + j + 4)));
        _mm256_storeu_pd(out + j, v0);
        _mm256_storeu_pd(out + j + 4, v1);
        m0 = _mm256_max_pd(v0, m0);
        m1 = _mm256_max_pd(v1, m1);
    }
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_max_pd(m0, m1));
    double best = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
#else
    double best = kNegInf;
#endif
    for (; j < len; ++j) {
        const double a_s = a[j] * s[j];
        const double b_h = b[j] * h[j];
        out[j] = a_s + b_h;
        best = out[j] > best ? out[j] : best;
    }
    return best;
}

}  // namespace

extern const SweepKernel sweep_kernel = {scores};

}  // namespace NUDGEFAST_LEVEL
}  // namespace nudgefast
