// normalize_rows' per-row work, compiled once per instruction-set level (see dispatch.hpp); the
// driver (threads, the streaming decision) is csrc/cpu/normalize_rows.cpp.
//
// Rounding: float16/float32 values and their squares are exact in double, and every level sums
// the squares in squared_norm's order (common.hpp), so every level gets the same norm; each
// value is multiplied by the double reciprocal of the norm and rounded once to float32: within
// one float32 ulp of the reference's x / |x| (a double division per element would make the pass
// compute-bound: 1.8x slower on a Zen 5 core), and the same bits on every level.
#include "common.hpp"

namespace nudgefast {
namespace NUDGEFAST_LEVEL {
namespace {

#if defined(NUDGEFAST_AVX512)
constexpr std::uintptr_t kVectorBytes = 64;
inline __m512 scale16(__m512 v, __m512d s) {
    const __m256 lo = _mm512_cvtpd_ps(_mm512_mul_pd(lo8(v), s));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_mul_pd(hi8(v), s));
    return _mm512_castpd_ps(
        _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}
#elif defined(NUDGEFAST_AVX2)
constexpr std::uintptr_t kVectorBytes = 32;
#endif

#ifdef NUDGEFAST_AVX2
// x * s in double, rounded to float32, 8 lanes.
inline __m256 scale8(__m256 v, __m256d s) {
    const __m128 lo = _mm256_cvtpd_ps(_mm256_mul_pd(lo4(v), s));
    const __m128 hi = _mm256_cvtpd_ps(_mm256_mul_pd(hi4(v), s));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
#endif

// out[j] = x[j] * inv_norm for one row; Stream: non-temporal stores (out is 4-byte aligned).
template <bool Stream, typename T>
inline void scale_row(const T* x, int64_t d, double inv_norm, float* out) {
    int64_t j = 0;
#ifdef NUDGEFAST_AVX2
    if (Stream)  // streaming stores need aligned addresses: the row's head goes through the cache
        for (; j < d && (reinterpret_cast<std::uintptr_t>(out + j) & (kVectorBytes - 1)) != 0; ++j)
            out[j] = static_cast<float>(static_cast<double>(widen(x[j])) * inv_norm);
#ifdef NUDGEFAST_AVX512
    const __m512d s16 = _mm512_set1_pd(inv_norm);
    for (; j + 16 <= d; j += 16) {
        const __m512 y = scale16(load16(x + j), s16);
        if (Stream) _mm512_stream_ps(out + j, y);
        else _mm512_storeu_ps(out + j, y);
    }
#endif
    const __m256d s8 = _mm256_set1_pd(inv_norm);
    for (; j + 8 <= d; j += 8) {
        const __m256 y = scale8(load8(x + j), s8);
        if (Stream && kVectorBytes == 32) _mm256_stream_ps(out + j, y);
        else _mm256_storeu_ps(out + j, y);
    }
#endif
    for (; j < d; ++j) out[j] = static_cast<float>(static_cast<double>(widen(x[j])) * inv_norm);
}

template <typename T>
int64_t rows_of(const T* chunk, int64_t begin, int64_t end, int64_t d, float* out, bool stream) {
    int64_t first_bad = -1;
    for (int64_t r = begin; r < end; ++r) {
        const T* x = chunk + r * d;
        const double sq = squared_norm(x, d);
        // Finite values cannot overflow a double sum of squares: NaN/inf here means a NaN
        // or inf value; zero means a zero row. Such a row's out is left as it was.
        if (!std::isfinite(sq) || sq == 0.0) {
            if (first_bad < 0) first_bad = r;
            continue;
        }
        const double inv_norm = 1.0 / std::sqrt(sq);
        if (stream) scale_row<true>(x, d, inv_norm, out + r * d);
        else scale_row<false>(x, d, inv_norm, out + r * d);
    }
#ifdef NUDGEFAST_AVX2
    // Non-temporal stores are weakly ordered: make them visible before the caller's join.
    if (stream) _mm_sfence();
#endif
    return first_bad;
}

int64_t normalize_range(const void* chunk, bool f16, int64_t begin, int64_t end, int64_t d, float* out,
                        bool stream) {
#ifndef NUDGEFAST_AVX2
    stream = false;  // the scalar path has no streaming stores
#endif
    if (f16) return rows_of(static_cast<const Half*>(chunk), begin, end, d, out, stream);
    return rows_of(static_cast<const float*>(chunk), begin, end, d, out, stream);
}

}  // namespace

extern const NormalizeKernel normalize_kernel = {&normalize_range};

}  // namespace NUDGEFAST_LEVEL
}  // namespace nudgefast
