// dot64's register tile, compiled once per instruction-set level (see dispatch.hpp); the driver
// (packing, threads) is csrc/cpu/dot64.cpp. acc[r][c] = FMA chains over k of a[r][k] *
// panel[k * kCols + c]: the vector path and the scalar one give the same bits (a fused
// multiply-add rounds once either way), whatever the tile's size.
#include "common.hpp"

namespace nudgefast {
namespace NUDGEFAST_LEVEL {
namespace {

#if defined(NUDGEFAST_AVX512)
// 8 rows x 16 columns: 16 zmm accumulators (8 independent chains per FMA pipe cover its latency).
constexpr int64_t kRows = 8;
constexpr int64_t kCols = 16;
#else
constexpr int64_t kRows = 6;
constexpr int64_t kCols = 8;
#endif
static_assert(kRows <= Dot64Kernel::kMaxRows && kCols <= Dot64Kernel::kMaxCols, "tile too large");

void tile(const double* const* a, const double* panel, int64_t d, double* acc) {
#if defined(NUDGEFAST_AVX512)
    __m512d s0[kRows], s1[kRows];
    for (int64_t r = 0; r < kRows; ++r) s0[r] = s1[r] = _mm512_setzero_pd();
    for (int64_t k = 0; k < d; ++k) {
        const __m512d p0 = _mm512_loadu_pd(panel + k * kCols);
        const __m512d p1 = _mm512_loadu_pd(panel + k * kCols + 8);
        for (int64_t r = 0; r < kRows; ++r) {
            const __m512d x = _mm512_set1_pd(a[r][k]);
            s0[r] = _mm512_fmadd_pd(x, p0, s0[r]);
            s1[r] = _mm512_fmadd_pd(x, p1, s1[r]);
        }
    }
    for (int64_t r = 0; r < kRows; ++r) {
        _mm512_storeu_pd(acc + r * kCols, s0[r]);
        _mm512_storeu_pd(acc + r * kCols + 8, s1[r]);
    }
#elif defined(NUDGEFAST_AVX2)
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
        _mm256_storeu_pd(acc + r * kCols, s[r][0]);
        _mm256_storeu_pd(acc + r * kCols + 4, s[r][1]);
    }
#else
    for (int64_t i = 0; i < kRows * kCols; ++i) acc[i] = 0.0;
    for (int64_t k = 0; k < d; ++k)
        for (int64_t r = 0; r < kRows; ++r)
            for (int64_t c = 0; c < kCols; ++c)
                acc[r * kCols + c] = std::fma(a[r][k], panel[k * kCols + c], acc[r * kCols + c]);
#endif
}

}  // namespace

extern const Dot64Kernel dot64_kernel = {kRows, kCols, &tile};

}  // namespace NUDGEFAST_LEVEL
}  // namespace nudgefast
