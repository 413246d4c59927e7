// correct_rows' inner loops, compiled once per instruction-set level (see dispatch.hpp); the
// driver (weight packing, row tiles, threads) is csrc/cpu/correct_rows.cpp.
//
// The product C = A B of a row tile (A: up to `tile` rows, row-major, in cache) with a packed
// weight matrix B is blocked like a GotoBLAS kernel:
//   - register tile: kRows rows x up to kPanel columns (avx512: 8 rows x 3 zmm = 48 columns, 24
//     accumulators; avx2: 6 x 2 ymm = 16 columns, 12 accumulators). Per k: kPanel / kLanes panel
//     loads and kRows broadcasts (one per row pointer) feed kRows * kPanel / kLanes FMAs;
//   - B is packed [panel][k][column] (CorrectKernel::pack_weights), so one (kKc x panel) block is
//     contiguous: 128 x 48 floats = 24 KiB, which stays in L1 while every register tile of the
//     row tile passes over it (A's rows stream from L2);
//   - the accumulators start from the bias (first k block) or from C (later blocks) and relu is
//     applied in registers after the last block, so C is written once per k block.
// Every output element is therefore one fused multiply-add chain: bias, then k = 0 .. K-1 in
// order (the hidden layer's chain continues the first layer's). The baseline emulates the
// float32 FMA (fused() below), so every level returns the same bits.
#include "common.hpp"

namespace nudgefast {
namespace NUDGEFAST_LEVEL {
namespace {

// Columns of B per k block: kKc * kPanel floats of B stay in L1 (24 KiB at avx512).
constexpr int64_t kKc = 128;

#if defined(NUDGEFAST_AVX512)
using Vec = __m512;
constexpr int64_t kLanes = 16;
constexpr int64_t kRows = 8;
constexpr int64_t kVecs = 3;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vset1(float a) { return _mm512_set1_ps(a); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vrelu(Vec v) { return _mm512_max_ps(v, _mm512_setzero_ps()); }
#elif defined(NUDGEFAST_AVX2)
using Vec = __m256;
constexpr int64_t kLanes = 8;
constexpr int64_t kRows = 6;
constexpr int64_t kVecs = 2;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vset1(float a) { return _mm256_set1_ps(a); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vrelu(Vec v) { return _mm256_max_ps(v, _mm256_setzero_ps()); }
#else
#include "fused_fma.hpp"  // fused(): the scalar FMA, one rounding
// Four scalar lanes: the same tile geometry code, one rounding per step like the vector FMAs.
struct Vec {
    float v[4];
};
constexpr int64_t kLanes = 4;
constexpr int64_t kRows = 4;
constexpr int64_t kVecs = 2;
inline Vec vload(const float* p) { return Vec{{p[0], p[1], p[2], p[3]}}; }
inline void vstore(float* p, Vec v) { std::memcpy(p, v.v, sizeof v.v); }
inline Vec vset1(float a) { return Vec{{a, a, a, a}}; }
inline Vec vfma(Vec a, Vec b, Vec c) {
    for (int l = 0; l < 4; ++l) c.v[l] = fused(a.v[l], b.v[l], c.v[l]);
    return c;
}
// max(v, 0) with NaN -> 0, as the vector max instructions (a NaN row is overwritten anyway).
inline Vec vrelu(Vec v) {
    for (float& f : v.v) f = f > 0.0f ? f : 0.0f;
    return v;
}
#endif
constexpr int64_t kPanel = kLanes * kVecs;

// The register tile: c[r][0 .. NV*kLanes) over rows r < rows of a (stride lda, already at the
// block's first k) for k in [0, kc); a short tile repeats its last row (computed, not stored).
// init: the bias (first block) or null (continue from c). The row pointers live in here, not in
// the caller: an array there, live across a call, gets an unwinding cleanup in a sanitizer build
// (-O1, the tile not inlined), whose weak personality reference setup.py's symbol check refuses.
template <int NV>
inline void tile(const float* a, int64_t lda, int64_t kc, const float* b, float* c, int64_t ldc, int64_t rows,
                 const float* init, bool relu) {
    constexpr int64_t W = NV * kLanes;
    Vec acc[kRows][NV];
#pragma GCC unroll 8
    for (int64_t r = 0; r < kRows; ++r) {
        const float* from = init ? init : c + (r < rows ? r : rows - 1) * ldc;
#pragma GCC unroll 3
        for (int v = 0; v < NV; ++v) acc[r][v] = vload(from + v * kLanes);
    }
    const float* p[kRows];
    for (int64_t r = 0; r < kRows; ++r) p[r] = a + (r < rows ? r : rows - 1) * lda;
#pragma GCC unroll 2
    for (int64_t k = 0; k < kc; ++k) {
        Vec bv[NV];
#pragma GCC unroll 3
        for (int v = 0; v < NV; ++v) {
            bv[v] = vload(b + k * W + v * kLanes);
#if defined(NUDGEFAST_AVX2) && (defined(__GNUC__) || defined(__clang__))
            // Keep the panel vectors in registers: otherwise the compiler folds the loads into
            // every FMA and the tile becomes load-bound (as in topk's tile).
            __asm__("" : "+v"(bv[v]));
#endif
        }
#pragma GCC unroll 8
        for (int64_t r = 0; r < kRows; ++r) {
            const Vec x = vset1(p[r][k]);
#pragma GCC unroll 3
            for (int v = 0; v < NV; ++v) acc[r][v] = vfma(x, bv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < kRows; ++r) {
        if (r >= rows) break;
#pragma GCC unroll 3
        for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * kLanes, relu ? vrelu(acc[r][v]) : acc[r][v]);
    }
}

// C (rows x n_pad, stride ldc) = init + A (rows x K, stride lda) B, B packed by pack_weights for
// n_pad columns; init: bias (n_pad values) or null (C += A B). relu: max(C, 0) at the end.
void gemm(const float* a, int64_t lda, int64_t rows, int64_t K, const float* b, int64_t n_pad, const float* bias,
          bool relu, float* c, int64_t ldc) {
    if (K == 0) {  // no k block runs: C = init (relu'd)
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < n_pad; ++j) {
                const float v = bias ? bias[j] : c[r * ldc + j];
                c[r * ldc + j] = relu ? (v > 0.0f ? v : 0.0f) : v;
            }
        return;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kc = std::min(kKc, K - k0);
        const bool last = k0 + kc == K;
        for (int64_t j0 = 0; j0 < n_pad; j0 += kPanel) {
            const int64_t w = std::min(kPanel, n_pad - j0);  // a multiple of kLanes
            const float* block = b + j0 * K + k0 * w;          // panel j0 / kPanel, row k0
            const float* init = k0 == 0 ? bias : nullptr;
            for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
                const int64_t tr = std::min(kRows, rows - i0);
                const float* at = a + i0 * lda + k0;
                float* ct = c + i0 * ldc + j0;
                const float* it = init ? init + j0 : nullptr;
                const bool rl = relu && last;
                switch (w / kLanes) {
                    case 1: tile<1>(at, lda, kc, block, ct, ldc, tr, it, rl); break;
                    case 2: tile<(kVecs >= 2 ? 2 : 1)>(at, lda, kc, block, ct, ldc, tr, it, rl); break;
                    default: tile<kVecs>(at, lda, kc, block, ct, ldc, tr, it, rl); break;
                }
            }
        }
    }
}

// x * s in double, rounded once to float32 (the reference's float64 quotient, within an ulp).
inline float scaled(float x, double s) { return static_cast<float>(static_cast<double>(x) * s); }

#if defined(NUDGEFAST_AVX512)
inline __m512 scale16(__m512 v, __m512d s) {
    const __m256 lo = _mm512_cvtpd_ps(_mm512_mul_pd(lo8(v), s));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_mul_pd(hi8(v), s));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}
#endif
#if defined(NUDGEFAST_AVX2)
inline __m256 scale8(__m256 v, __m256d s) {
    const __m128 lo = _mm256_cvtpd_ps(_mm256_mul_pd(lo4(v), s));
    const __m128 hi = _mm256_cvtpd_ps(_mm256_mul_pd(hi4(v), s));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
#endif

// dst[j] = float32(x[j] * s), j < d.
template <typename T>
inline void scale_row(const T* x, int64_t d, double s, float* dst) {
    int64_t j = 0;
#if defined(NUDGEFAST_AVX512)
    const __m512d s16 = _mm512_set1_pd(s);
    for (; j + 16 <= d; j += 16) _mm512_storeu_ps(dst + j, scale16(load16(x + j), s16));
#endif
#if defined(NUDGEFAST_AVX2)
    const __m256d s8 = _mm256_set1_pd(s);
    for (; j + 8 <= d; j += 8) _mm256_storeu_ps(dst + j, scale8(load8(x + j), s8));
#endif
    for (; j < d; ++j) dst[j] = scaled(widen(x[j]), s);
}

// The reciprocal of the norm of a row (squared_norm's order, in double), or NaN when the norm is
// zero or not finite.
template <typename T>
inline double inverse_norm(const T* x, int64_t d) {
    const double sq = squared_norm(x, d);
    if (!std::isfinite(sq) || sq == 0.0) return std::numeric_limits<double>::quiet_NaN();
    return 1.0 / std::sqrt(sq);
}

template <typename T>
void unit_rows_of(const T* x, int64_t rows, int64_t d, float* a, int64_t lda, uint8_t* bad) {
    for (int64_t r = 0; r < rows; ++r) {
        const double s = inverse_norm(x + r * d, d);
        bad[r] = std::isnan(s);
        if (bad[r]) std::fill(a + r * lda, a + r * lda + d, 0.0f);  // its output is NaN anyway
        else scale_row(x + r * d, d, s, a + r * lda);
    }
}

void unit_rows(const void* x, bool f16, int64_t rows, int64_t d, float* a, int64_t lda, uint8_t* bad) {
    if (f16) unit_rows_of(static_cast<const Half*>(x), rows, d, a, lda, bad);
    else unit_rows_of(static_cast<const float*>(x), rows, d, a, lda, bad);
}

void unit_out(const float* c, int64_t ldc, int64_t rows, int64_t n, const uint8_t* bad, float* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* y = c + r * ldc;
        float* o = out + r * n;
        const double s = bad[r] ? std::numeric_limits<double>::quiet_NaN() : inverse_norm(y, n);
        if (std::isnan(s)) std::fill(o, o + n, std::numeric_limits<float>::quiet_NaN());
        else scale_row(y, n, s, o);
    }
}

}  // namespace

extern const CorrectKernel correct_kernel = {kRows, kLanes, kPanel, kKc, &unit_rows, &gemm, &unit_out};

}  // namespace NUDGEFAST_LEVEL
}  // namespace nudgefast
