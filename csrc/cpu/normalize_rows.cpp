// normalize_rows: out[r] = chunk[r] / |chunk[r]|, the pass of NudgeResult.apply over the corpus.
//
// Memory-bound: one read of the chunk and one write of out. A row is read twice (its squared
// norm, then the quotients), but the second read hits L1 (a row is a few KiB). Large outputs are
// written with non-temporal stores: an ordinary store first reads the destination line into the
// cache (a third stream of memory traffic) and then evicts the chunk's rows with lines that
// nobody reads soon. Each thread takes one contiguous range of rows (static schedule): plain
// sequential streams, which the hardware prefetcher follows at full bandwidth.
//
// Rounding: float16/float32 values and their squares are exact in double, so the squared norm
// differs from the reference's only by the order of its additions. Each value is multiplied by
// the double reciprocal of the norm and rounded once to float32: within one float32 ulp of the
// reference's x / |x| (a double division per element would make the pass compute-bound: 1.8x
// slower on a Zen 5 core).
#include <cstdint>

#include "common.hpp"

#if defined(NUDGEFAST_AVX2) && defined(NUDGEFAST_F16C)
#define NUDGEFAST_NORMALIZE_SIMD 1
#if defined(__AVX512F__)
// 16 lanes at a time where the build allows it (-march=native on an AVX-512 CPU): half the
// instructions per element, which is what the float16 pass is bound by.
#define NUDGEFAST_NORMALIZE_AVX512 1
#endif
#endif

namespace nudgefast {
namespace {

// Outputs at least this large go around the cache (see above); smaller ones fit in L2/L3 and the
// caller may read them while they are there.
constexpr int64_t kStreamBytes = int64_t{4} << 20;
// Below this many elements one thread does the pass: starting the team costs more.
constexpr int64_t kSerialElements = int64_t{1} << 15;

inline float widen(float x) { return x; }
inline float widen(Half h) { return half_to_float(h.bits); }

#ifdef NUDGEFAST_NORMALIZE_SIMD
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256d lo4(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi4(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
// x * s in double, rounded to float32, 8 lanes.
inline __m256 scale8(__m256 v, __m256d s) {
    const __m128 lo = _mm256_cvtpd_ps(_mm256_mul_pd(lo4(v), s));
    const __m128 hi = _mm256_cvtpd_ps(_mm256_mul_pd(hi4(v), s));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
#endif

#ifdef NUDGEFAST_NORMALIZE_AVX512
#if defined(__GNUC__) && !defined(__clang__)
// GCC's AVX-512 headers pass _mm*_undefined_*() as the unused source of the masked builtins behind
// these intrinsics, which -Wmaybe-uninitialized then reports at every call.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
constexpr std::uintptr_t kVectorBytes = 64;
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512d lo8(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
inline __m512d hi8(__m512 v) {
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
inline __m512 scale16(__m512 v, __m512d s) {
    const __m256 lo = _mm512_cvtpd_ps(_mm512_mul_pd(lo8(v), s));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_mul_pd(hi8(v), s));
    return _mm512_castpd_ps(
        _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}
#else
constexpr std::uintptr_t kVectorBytes = 32;
#endif

// Sum of squares in double. x * x is exact in double, so fused or not, each step rounds once.
template <typename T>
inline double squared_norm(const T* x, int64_t d) {
    int64_t j = 0;
    double sum = 0.0;
#ifdef NUDGEFAST_NORMALIZE_SIMD
    // Several accumulators: one would make the pass a chain of dependent additions.
    __m256d a0 = _mm256_setzero_pd(), a1 = a0;
#ifdef NUDGEFAST_NORMALIZE_AVX512
    __m512d b0 = _mm512_setzero_pd(), b1 = b0, b2 = b0, b3 = b0;
    for (; j + 32 <= d; j += 32) {
        const __m512 v0 = load16(x + j), v1 = load16(x + j + 16);
        const __m512d l0 = lo8(v0), h0 = hi8(v0), l1 = lo8(v1), h1 = hi8(v1);
        b0 = _mm512_fmadd_pd(l0, l0, b0);
        b1 = _mm512_fmadd_pd(h0, h0, b1);
        b2 = _mm512_fmadd_pd(l1, l1, b2);
        b3 = _mm512_fmadd_pd(h1, h1, b3);
    }
    const __m512d b = _mm512_add_pd(_mm512_add_pd(b0, b1), _mm512_add_pd(b2, b3));
    a0 = _mm512_castpd512_pd256(b);
    a1 = _mm512_extractf64x4_pd(b, 1);
#else
    __m256d a2 = a0, a3 = a0;
    for (; j + 16 <= d; j += 16) {
        const __m256 v0 = load8(x + j), v1 = load8(x + j + 8);
        const __m256d l0 = lo4(v0), h0 = hi4(v0), l1 = lo4(v1), h1 = hi4(v1);
        a0 = _mm256_fmadd_pd(l0, l0, a0);
        a1 = _mm256_fmadd_pd(h0, h0, a1);
        a2 = _mm256_fmadd_pd(l1, l1, a2);
        a3 = _mm256_fmadd_pd(h1, h1, a3);
    }
    a0 = _mm256_add_pd(a0, a2);
    a1 = _mm256_add_pd(a1, a3);
#endif
    for (; j + 8 <= d; j += 8) {
        const __m256 v = load8(x + j);
        const __m256d l = lo4(v), h = hi4(v);
        a0 = _mm256_fmadd_pd(l, l, a0);
        a1 = _mm256_fmadd_pd(h, h, a1);
    }
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(a0, a1));
    sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#else
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    for (; j + 4 <= d; j += 4)
        for (int u = 0; u < 4; ++u) {
            const double v = widen(x[j + u]);
            acc[u] += v * v;
        }
    sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
#endif
    for (; j < d; ++j) {
        const double v = widen(x[j]);
        sum += v * v;
    }
    return sum;
}

// out[j] = x[j] * inv_norm for one row; Stream: non-temporal stores (out is 4-byte aligned).
template <bool Stream, typename T>
inline void scale_row(const T* x, int64_t d, double inv_norm, float* out) {
    int64_t j = 0;
#ifdef NUDGEFAST_NORMALIZE_SIMD
    if (Stream)  // streaming stores need aligned addresses: the row's head goes through the cache
        for (; j < d && (reinterpret_cast<std::uintptr_t>(out + j) & (kVectorBytes - 1)) != 0; ++j)
            out[j] = static_cast<float>(static_cast<double>(widen(x[j])) * inv_norm);
#ifdef NUDGEFAST_NORMALIZE_AVX512
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

}  // namespace

template <typename T>
int64_t normalize_rows(const T* chunk, int64_t m, int64_t d, float* out, int n_threads) {
    bool stream = false;
#ifdef NUDGEFAST_NORMALIZE_SIMD
    stream = m * d * static_cast<int64_t>(sizeof(float)) >= kStreamBytes &&
             reinterpret_cast<std::uintptr_t>(out) % sizeof(float) == 0;
#endif
    const int threads = m * d < kSerialElements ? 1 : n_threads;
    int64_t first_bad = std::numeric_limits<int64_t>::max();
#pragma omp parallel num_threads(threads) reduction(min : first_bad)
    {
#pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < m; ++r) {
            const T* x = chunk + r * d;
            const double sq = squared_norm(x, d);
            // Finite values cannot overflow a double sum of squares: NaN/inf here means a NaN
            // or inf value; zero means a zero row. Such a row's out is left as it was.
            if (!std::isfinite(sq) || sq == 0.0) {
                first_bad = std::min(first_bad, r);
                continue;
            }
            const double inv_norm = 1.0 / std::sqrt(sq);
            if (stream) scale_row<true>(x, d, inv_norm, out + r * d);
            else scale_row<false>(x, d, inv_norm, out + r * d);
        }
#ifdef NUDGEFAST_NORMALIZE_SIMD
        // Non-temporal stores are weakly ordered: make them visible before the join.
        if (stream) _mm_sfence();
#endif
    }
    return first_bad == std::numeric_limits<int64_t>::max() ? -1 : first_bad;
}

template int64_t normalize_rows<float>(const float*, int64_t, int64_t, float*, int);
template int64_t normalize_rows<Half>(const Half*, int64_t, int64_t, float*, int);

}  // namespace nudgefast
