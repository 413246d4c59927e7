// Shared helpers of the CPU kernels: thread count, worker-exception capture, the top-k state
// with the tie rule, and loading of float16/float32/float64 corpus rows into float32.
//
// This header is compiled into the baseline driver files and into each level's kernels
// (csrc/cpu/kernels/, see dispatch.hpp) with that level's flags. Its inline functions therefore
// live in an inline namespace named after the level: each level's copies are distinct symbols,
// so the linker can never hand AVX-512 code to a caller on a CPU without it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>

#include "dispatch.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef _MSC_VER
#include <malloc.h>  // _aligned_malloc
#endif

// The build defines NUDGEFAST_LEVEL for the kernels of one level; everything else is baseline.
#ifndef NUDGEFAST_LEVEL
#define NUDGEFAST_LEVEL baseline
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NUDGEFAST_AVX2 1
#endif
#if defined(__F16C__)
#include <immintrin.h>
#define NUDGEFAST_F16C 1
#endif
#if defined(NUDGEFAST_AVX2) && defined(NUDGEFAST_F16C) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512DQ__) && defined(__AVX512VL__)
#define NUDGEFAST_AVX512 1
#if defined(__GNUC__) && !defined(__clang__)
// GCC's AVX-512 headers pass _mm*_undefined_*() as the unused source of the masked builtins behind
// many intrinsics, which -Wmaybe-uninitialized then reports at every call.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// The avx512 level's feature sub-paths (AVX512-VNNI, AVX512-VPOPCNTDQ; dispatch.hpp's
// QTopkKernel) are compiled with function target attributes, which GCC >= 9 and Clang >= 8 take.
#if (defined(__clang__) && __clang_major__ >= 8) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 9)
#define NUDGEFAST_AVX512_SUBPATHS 1
#endif
#endif

namespace nudgefast {
inline namespace NUDGEFAST_LEVEL {

// ---------------------------------------------------------------------------------------------
// Threads

// More threads than this is a mistake, not a request (nudgefast._validate.MAX_THREADS agrees);
// the bindings refuse it before OpenMP tries to start them.
constexpr int64_t kMaxThreads = 1 << 12;

// n_threads <= 0 means "all cores" (the OpenMP default), the meaning of n_threads=None in Python.
inline int resolve_threads(int64_t n_threads) {
#ifdef _OPENMP
    if (n_threads <= 0) return omp_get_max_threads();
    return static_cast<int>(n_threads);
#else
    (void)n_threads;
    return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// An exception must not escape an OpenMP region (that terminates the process): workers record
// the first one here and the caller rethrows it after the join.
class WorkerErrors {
public:
    template <typename F>
    void run(F&& body) noexcept {
        try {
            body();
        } catch (...) {
            std::lock_guard<std::mutex> lock(mutex_);
            if (!first_) first_ = std::current_exception();
        }
    }
    void rethrow() const {
        if (first_) std::rethrow_exception(first_);
    }

private:
    std::exception_ptr first_;
    std::mutex mutex_;
};

// ---------------------------------------------------------------------------------------------
// Scratch aligned to a cache line (64 bytes), so aligned AVX loads never split one.

template <typename T>
class AlignedBuffer {
public:
    AlignedBuffer() = default;
    explicit AlignedBuffer(std::size_t n) { resize(n); }
    void resize(std::size_t n) {
        std::size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
        if (bytes == 0) bytes = 64;
#ifdef _MSC_VER
        void* p = _aligned_malloc(bytes, 64);
#else
        void* p = std::aligned_alloc(64, bytes);
#endif
        if (!p) throw std::bad_alloc();
        ptr_.reset(static_cast<T*>(p));
        size_ = n;
    }
    T* data() { return ptr_.get(); }
    const T* data() const { return ptr_.get(); }
    std::size_t size() const { return size_; }
    T& operator[](std::size_t i) { return ptr_.get()[i]; }

private:
    struct Free {
#ifdef _MSC_VER
        void operator()(T* p) const { _aligned_free(p); }
#else
        void operator()(T* p) const { std::free(p); }
#endif
    };
    std::unique_ptr<T, Free> ptr_;
    std::size_t size_ = 0;
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Top-k state with the tie rule: rank by score descending, then record index ascending.
//
// One query's state is a binary heap of exactly k slots with the *worst* entry on top, so the
// admission test is one comparison with slot 0. Empty slots hold (-inf, kEmptyIndex): every real
// candidate ranks before them. A strict total order on (score, index) makes the selected set
// independent of the order in which candidates arrive, hence of the thread count.

constexpr int64_t kEmptyIndex = std::numeric_limits<int64_t>::max();

template <typename S>
inline bool ranks_before(S score_a, int64_t index_a, S score_b, int64_t index_b) {
    return score_a > score_b || (score_a == score_b && index_a < index_b);
}

template <typename S>
struct TopKHeap {
    static void clear(S* scores, int64_t* index, int64_t k) {
        std::fill(scores, scores + k, -std::numeric_limits<S>::infinity());
        std::fill(index, index + k, kEmptyIndex);
    }

    // Admits (score, id) if it ranks before the current worst; -inf and NaN never enter.
    static bool push(S* scores, int64_t* index, int64_t k, S score, int64_t id) {
        if (k == 0 || !ranks_before(score, id, scores[0], index[0])) return false;
        if (!(score > -std::numeric_limits<S>::infinity())) return false;
        int64_t pos = 0;
        for (;;) {
            int64_t child = 2 * pos + 1;
            if (child >= k) break;
            // Follow the worse child: it must move up to keep the worst on top.
            if (child + 1 < k && ranks_before(scores[child], index[child], scores[child + 1], index[child + 1]))
                ++child;
            if (!ranks_before(score, id, scores[child], index[child])) break;  // new entry is worse: stop
            scores[pos] = scores[child];
            index[pos] = index[child];
            pos = child;
        }
        scores[pos] = score;
        index[pos] = id;
        return true;
    }
};

// Writes the best k of `cand` (deduplicated by index: the same entry may come from several
// threads) in rank order, padding with (-inf, -1).
template <typename S, typename OutS>
inline void write_ranked(std::vector<std::pair<S, int64_t>>& cand, int64_t k, OutS* out_scores, int64_t* out_index) {
    std::sort(cand.begin(), cand.end(), [](const std::pair<S, int64_t>& a, const std::pair<S, int64_t>& b) {
        return ranks_before(a.first, a.second, b.first, b.second);
    });
    int64_t n = 0;
    int64_t last = -1;
    for (const auto& c : cand) {
        if (n == k) break;
        if (c.second == kEmptyIndex) break;  // only empty slots follow
        if (c.second == last) continue;
        last = c.second;
        out_scores[n] = static_cast<OutS>(c.first);
        out_index[n] = c.second;
        ++n;
    }
    for (; n < k; ++n) {
        out_scores[n] = -std::numeric_limits<OutS>::infinity();
        out_index[n] = -1;
    }
}

// ---------------------------------------------------------------------------------------------
// Row loading: any supported corpus dtype -> float32, zero-padded to a multiple of 8 lanes.

// IEEE binary16 stored as raw bits (NumPy's float16).
struct Half {
    uint16_t bits;
};

inline float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;  // signed zero
    } else {
        // Subnormal half: renormalise.
        int e = -1;
        do {
            ++e;
            mant <<= 1;
        } while ((mant & 0x400u) == 0);
        bits = sign | ((112u - static_cast<uint32_t>(e)) << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline void load_row(const float* src, int64_t d, float* dst) { std::memcpy(dst, src, sizeof(float) * d); }

inline void load_row(const double* src, int64_t d, float* dst) {
    for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<float>(src[j]);
}

inline void load_row(const Half* src, int64_t d, float* dst) {
    int64_t j = 0;
#ifdef NUDGEFAST_AVX512
    for (; j + 16 <= d; j += 16)
        _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
#endif
#ifdef NUDGEFAST_F16C
    for (; j + 8 <= d; j += 8) {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
    }
#endif
    for (; j < d; ++j) dst[j] = half_to_float(src[j].bits);
}

inline float widen(float x) { return x; }
inline float widen(Half h) { return half_to_float(h.bits); }

#ifdef NUDGEFAST_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256d lo4(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi4(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
#endif
#ifdef NUDGEFAST_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512d lo8(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
inline __m512d hi8(__m512 v) {
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#endif

// Sum of squares of a float32 / float16 row in double, in one order of additions on every level
// (so that every level gets the same norms, hence the same scores):
//   1. 32 partial sums: value j goes to sum j % 32, for the leading multiple of 32 values;
//   2. 8 sums: c[l] = (s[l] + s[8 + l]) + (s[16 + l] + s[24 + l]);
//   3. then 8 values at a time: c[l] += x[j + l]^2;
//   4. e[l] = c[l] + c[4 + l]; sum = (e[0] + e[1]) + (e[2] + e[3]);
//   5. the last d % 8 values added in order.
// x * x is exact in double, so a fused multiply-add and a multiply + add round the same.
template <typename T>
inline double squared_norm(const T* x, int64_t d) {
    int64_t j = 0;
    double e[4];
#if defined(NUDGEFAST_AVX512)
    __m512d b0 = _mm512_setzero_pd(), b1 = b0, b2 = b0, b3 = b0;
    for (; j + 32 <= d; j += 32) {
        const __m512 v0 = load16(x + j), v1 = load16(x + j + 16);
        const __m512d l0 = lo8(v0), h0 = hi8(v0), l1 = lo8(v1), h1 = hi8(v1);
        b0 = _mm512_fmadd_pd(l0, l0, b0);
        b1 = _mm512_fmadd_pd(h0, h0, b1);
        b2 = _mm512_fmadd_pd(l1, l1, b2);
        b3 = _mm512_fmadd_pd(h1, h1, b3);
    }
    __m512d c = _mm512_add_pd(_mm512_add_pd(b0, b1), _mm512_add_pd(b2, b3));
    for (; j + 8 <= d; j += 8) {
        const __m512d v = _mm512_cvtps_pd(load8(x + j));
        c = _mm512_fmadd_pd(v, v, c);
    }
    _mm256_storeu_pd(e, _mm256_add_pd(_mm512_castpd512_pd256(c), _mm512_extractf64x4_pd(c, 1)));
#elif defined(NUDGEFAST_AVX2)
    __m256d a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_pd();
    for (; j + 32 <= d; j += 32)
        for (int i = 0; i < 4; ++i) {
            const __m256 v = load8(x + j + 8 * i);
            const __m256d l = lo4(v), h = hi4(v);
            a[2 * i] = _mm256_fmadd_pd(l, l, a[2 * i]);
            a[2 * i + 1] = _mm256_fmadd_pd(h, h, a[2 * i + 1]);
        }
    __m256d clo = _mm256_add_pd(_mm256_add_pd(a[0], a[2]), _mm256_add_pd(a[4], a[6]));
    __m256d chi = _mm256_add_pd(_mm256_add_pd(a[1], a[3]), _mm256_add_pd(a[5], a[7]));
    for (; j + 8 <= d; j += 8) {
        const __m256 v = load8(x + j);
        const __m256d l = lo4(v), h = hi4(v);
        clo = _mm256_fmadd_pd(l, l, clo);
        chi = _mm256_fmadd_pd(h, h, chi);
    }
    _mm256_storeu_pd(e, _mm256_add_pd(clo, chi));
#else
    double s[32] = {};
    for (; j + 32 <= d; j += 32)
        for (int l = 0; l < 32; ++l) {
            const double v = widen(x[j + l]);
            s[l] += v * v;
        }
    double c[8];
    for (int l = 0; l < 8; ++l) c[l] = (s[l] + s[8 + l]) + (s[16 + l] + s[24 + l]);
    for (; j + 8 <= d; j += 8)
        for (int l = 0; l < 8; ++l) {
            const double v = widen(x[j + l]);
            c[l] += v * v;
        }
    for (int l = 0; l < 4; ++l) e[l] = c[l] + c[4 + l];
#endif
    double sum = (e[0] + e[1]) + (e[2] + e[3]);
    for (; j < d; ++j) {
        const double v = widen(x[j]);
        sum += v * v;
    }
    return sum;
}

// Converts row `src` (d values) into `dst` (d floats) and returns the Euclidean norm of the
// converted values (what the kernel multiplies with), accumulated in double (squared_norm's order).
template <typename T>
inline double load_row_norm(const T* src, int64_t d, float* dst) {
    load_row(src, d, dst);
    return std::sqrt(squared_norm(dst, d));
}

// qtopk_hamming's admission test in integers: score = n_bits - 2 * dist ranks at or above
// `thresh` exactly when dist <= the returned value (-1: no distance can; both sides exact in
// double). An empty slot (-inf) admits everything.
inline int64_t hamming_max_dist(float thresh, int64_t n_bits) {
    constexpr int64_t kAll = int64_t{1} << 60;
    if (!(thresh > -std::numeric_limits<float>::infinity())) return kAll;
    const double v = std::floor((static_cast<double>(n_bits) - static_cast<double>(thresh)) / 2.0);
    if (v < 0.0) return -1;
    if (v >= static_cast<double>(kAll)) return kAll;
    return static_cast<int64_t>(v);
}

}  // inline namespace NUDGEFAST_LEVEL

// ---------------------------------------------------------------------------------------------
// Op entry points, one .cpp each. Arrays are C-contiguous unless a stride is given; the
// bindings check dtypes and shapes, the kernels trust them. n_threads >= 1.

template <typename T>
void query_gradient(const T* queries, int64_t d, const int64_t* order, const int64_t* seg_ptr, int64_t t,
                    double* out, int n_threads);

int64_t topk_update(const float* queries, int64_t n_q, int64_t d, const void* chunk, ChunkType chunk_type,
                    int64_t m, int64_t row_stride, int64_t row_offset, const int64_t* exclude, int64_t n_exclude,
                    bool normalize, float* best_scores, int64_t* best_index, int64_t k, int n_threads);

// Quantized corpora (csrc/cpu/qtopk.cpp). codes: m rows of d (int8) or w (hamming) bytes,
// row_stride bytes apart; queries C-contiguous. low/step: d float32 values.
int64_t qtopk_int8(const int8_t* qcodes, const float* qscale, const float* qoffset, int64_t n_q, int64_t d,
                   const uint8_t* codes, int64_t m, int64_t row_stride, int64_t row_offset, const int64_t* exclude,
                   int64_t n_exclude, bool signed_codes, const float* low, const float* step, bool normalize,
                   float* best_scores, int64_t* best_index, int64_t k, int n_threads);

int64_t qtopk_hamming(const uint8_t* qbits, int64_t n_q, int64_t w, const uint8_t* codes, int64_t m,
                      int64_t row_stride, int64_t row_offset, const int64_t* exclude, int64_t n_exclude,
                      int64_t n_bits, float* best_scores, int64_t* best_index, int64_t k, int n_threads);

void nudge_m_intervals(const double* S, const double* G, int64_t t, const int64_t* pair_query, const double* s_x,
                       const double* g_x, const double* u_score, int64_t n_pairs, double eps, double* low,
                       double* high, bool* feasible, int n_threads);

void dot64(const double* A, const double* B, int64_t n, int64_t m, int64_t d, double* out, int n_threads);

void nudge_n_sweep(const double* S, const double* H, int64_t n_b, int64_t t, const double* alpha,
                   const double* beta, int64_t n_gamma, const int64_t* touched, const double* unt_scores,
                   const int64_t* unt_index, int64_t n_unt, const int64_t* ans_ptr, const int64_t* ans_index,
                   int64_t k_val, int64_t* hits, double* kth, int n_threads);

template <typename TE, typename TC>
void project(const TE* E, const TC* C, const double* alpha, const double* beta, int64_t t, int64_t d, float* out,
             int n_threads);

void metrics(const int64_t* retrieved, int64_t n, int64_t width, const int64_t* ans_ptr, const int64_t* ans_index,
             const double* ans_rel, int64_t k, double* out, int n_threads);

// codes: m rows of d int8/uint8 bytes, row_stride bytes apart; out (m, d) float32 C-contiguous.
void dequantize_rows(const uint8_t* codes, int64_t m, int64_t d, int64_t row_stride, bool is_signed,
                     const float* low, const float* step, float* out, int n_threads);

// T = float or Half; chunk and out are (m, d) C-contiguous. Returns the first row whose norm is
// not finite or is zero (its out row is left as it was), else -1.
template <typename T>
int64_t normalize_rows(const T* chunk, int64_t m, int64_t d, float* out, int n_threads);

// T = float or Half; x (m, d_old), W0 (d_old, d_new), b0 (d_new), W1 (d_old, h), b1 (h), W2
// (h, d_new) and out (m, d_new) C-contiguous; W1 = b1 = W2 = null (and h = 0) for the linear map.
// out[r] = unit(unit(x[r]) W0 + b0 [+ relu(unit(x[r]) W1 + b1) W2]); NaN rows where a norm is zero
// or not finite.
template <typename T>
void correct_rows(const T* x, int64_t m, int64_t d_old, int64_t d_new, int64_t h, const float* W0, const float* b0,
                  const float* W1, const float* b1, const float* W2, float* out, int n_threads);

}  // namespace nudgefast
