// dot64: out[i, j] = sum over k of A[i, k] * B[j, k], in double, each element one fused
// multiply-add chain over k = 0 .. d-1 in order.
//
// The same value for the same two rows whatever the shapes around them. A BLAS product's sums
// depend on its blocking (the row block, the column's place in a tile, gemv for one column),
// so the validation products of a fit and of the tuner's updates, computed in other shapes,
// would differ in the last bits, and ties would break differently; this kernel makes them equal.
//
// Layout: B's columns are packed k-major in groups of kCols (zero-padded), so that the kCols
// lanes of one row of A advance together: kRows x kCols accumulators, one FMA per lane per k.
// Every lane runs the same chain, so neither the lane nor the tile changes a result.
#include "common.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace nudgefast {

namespace {

constexpr int64_t kCols = 8;
constexpr int64_t kRows = 6;

// acc[r][c] = fma chains over k of a[r][k] * panel[k * kCols + c]. The vector path and the
// scalar one give the same bits: a fused multiply-add rounds once either way.
inline void tile(const double* const* a, const double* panel, int64_t d, double (*acc)[kCols]) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256d s[kRows][2];
    for (int64_t r = 0; r < kRows; ++r) s[r][0] = s[r][1] = _mm256_setzero_pd();
    for (int64_t k = 0; k < d; ++k) {
        const __m256d p0 = _mm256_loadu_pd(panel + k * kCols);
        const __m256d p1 = _mm256_loadu_pd(panel + k * kCols + 4);
        for (int64_t r = 0; r < kRows; ++r) {
            const __m256d x = _mm256_broadcast_sd(a[r] + k);
            s[r][0] = _mm256_fmadd_pd(x, p0, s[r][0]);
            s[r][1] = _mm256_fmadd_pd(x, p1, s[r][1]);
        }
    }
    for (int64_t r = 0; r < kRows; ++r) {
        _mm256_storeu_pd(acc[r], s[r][0]);
        _mm256_storeu_pd(acc[r] + 4, s[r][1]);
    }
#else
    for (int64_t k = 0; k < d; ++k)
        for (int64_t r = 0; r < kRows; ++r)
            for (int64_t c = 0; c < kCols; ++c) acc[r][c] = std::fma(a[r][k], panel[k * kCols + c], acc[r][c]);
#endif
}

}  // namespace

void dot64(const double* A, const double* B, int64_t n, int64_t m, int64_t d, double* out, int n_threads) {
    const int64_t groups = (m + kCols - 1) / kCols;
    WorkerErrors errors;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<double> panel;
        bool ready = false;
        errors.run([&] {
            panel.resize(static_cast<std::size_t>(d * kCols));
            ready = true;
        });
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < groups; ++g) {
            if (!ready) continue;  // allocation failed: reported below
            const int64_t j0 = g * kCols;
            const int64_t w = std::min<int64_t>(kCols, m - j0);
            for (int64_t k = 0; k < d; ++k)
                for (int64_t c = 0; c < kCols; ++c) panel[k * kCols + c] = c < w ? B[(j0 + c) * d + k] : 0.0;
            for (int64_t i0 = 0; i0 < n; i0 += kRows) {
                const int64_t rows = std::min<int64_t>(kRows, n - i0);
                const double* a[kRows];
                for (int64_t r = 0; r < kRows; ++r) a[r] = A + (i0 + std::min(r, rows - 1)) * d;
                alignas(64) double acc[kRows][kCols] = {};
                tile(a, panel.data(), d, acc);
                for (int64_t r = 0; r < rows; ++r)
                    for (int64_t c = 0; c < w; ++c) out[(i0 + r) * m + j0 + c] = acc[r][c];
            }
        }
    }
    errors.rethrow();
}

}  // namespace nudgefast
