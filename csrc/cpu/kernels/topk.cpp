// topk_update's inner loops, compiled once per instruction-set level (see dispatch.hpp): the
// packing of corpus rows into panels, the register-tiled micro-kernel and the admission test.
// The driver (threads, per-thread heaps, the final merge) is csrc/cpu/topk.cpp.
//
// 16 or 32 records at a time (a record tile) are converted to float32 "panels" (dimension-major
// groups of PANEL records: one aligned load gives one dimension of PANEL records) and scored
// against every tile of queries (which stream from L2/L3). Each score is compared at once with
// its query's current k-th best, so no n_q x chunk score matrix exists.
//
// Every level computes each score as one FMA chain over t = 0 .. d-1, whatever its slot in the
// tile: exact duplicate records get bit-identical scores (the tie rule then orders them by index)
// and all levels return the same top-k.
//
// Rule for this file: only functions in this level's namespace (or with internal linkage), and
// no standard-library template that is not inlined away; see common.hpp on inline namespaces.
#include "common.hpp"

namespace nudgefast {
namespace NUDGEFAST_LEVEL {
namespace {

#if defined(NUDGEFAST_AVX512)
// 32 zmm registers: 12 queries x 2 panels of 16 records = 24 accumulators, the 2 panel vectors and
// a broadcast query value. Per dimension: 2 panel loads + 12 broadcasts for 24 FMAs. (14 queries
// fit in principle, but GCC 12 then spills an accumulator; no faster on a Zen 5 core.)
constexpr int64_t QT = 12;
constexpr int64_t PANEL = 16;
#else
// 16 ymm registers: 6 queries x 2 panels of 8 records = 12 accumulators, 2 panel vectors and one
// broadcast query value. The baseline keeps the same geometry.
constexpr int64_t QT = 6;
constexpr int64_t PANEL = 8;
#endif
constexpr int64_t RT = 2 * PANEL;  // records per register tile
static_assert(RT <= 64, "admission masks are one uint64_t per record tile");

// Scores (unscaled dot products) of QR <= QT queries with the RT records of two consecutive
// panels, written out[i * RT + r]. `q` is one tile of pack_queries' layout.
#if defined(NUDGEFAST_AVX512)
// Queries interleaved within a tile, q[t * QT + i]: the broadcasts of one step read one cache
// line through one pointer (12 row pointers would crowd the general registers).
template <int QR>
inline void tile_scores(const float* q, int64_t d, const float* panels, float* out) {
    const float* p0 = panels;
    const float* p1 = panels + d * PANEL;
    __m512 c0[QR], c1[QR];
#pragma GCC unroll 16
    for (int i = 0; i < QR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (int64_t t = 0; t < d; ++t) {
        __m512 b0 = _mm512_load_ps(p0 + t * PANEL), b1 = _mm512_load_ps(p1 + t * PANEL);
        // Keep both panel vectors in registers: otherwise the compiler folds the loads into
        // every FMA and the kernel becomes load-bound.
        __asm__("" : "+v"(b0), "+v"(b1));
#pragma GCC unroll 16
        for (int i = 0; i < QR; ++i) {
            const __m512 a = _mm512_set1_ps(q[t * QT + i]);
            c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < QR; ++i) {
        _mm512_store_ps(out + i * RT, c0[i]);
        _mm512_store_ps(out + i * RT + PANEL, c1[i]);
    }
}
#elif defined(NUDGEFAST_AVX2)
template <int QR>
inline void tile_scores(const float* q, int64_t d, const float* panels, float* out) {
    static_assert(QR == QT, "the AVX2 tile always computes QT rows (the padding rows are zero)");
    const float* p0 = panels;
    const float* p1 = panels + d * PANEL;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float* q0 = q;
    const float* q1 = q + d;
    const float* q2 = q + 2 * d;
    const float* q3 = q + 3 * d;
    const float* q4 = q + 4 * d;
    const float* q5 = q + 5 * d;
#pragma GCC unroll 4
    for (int64_t t = 0; t < d; ++t) {
        __m256 b0 = _mm256_load_ps(p0 + t * PANEL), b1 = _mm256_load_ps(p1 + t * PANEL);
        // Keep both panel vectors in registers: otherwise the compiler folds the loads into
        // every FMA (6 loads of each per step) and the kernel becomes load-bound.
        __asm__("" : "+x"(b0), "+x"(b1));
        __m256 a = _mm256_broadcast_ss(q0 + t);
        c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(q1 + t);
        c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(q2 + t);
        c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(q3 + t);
        c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
        a = _mm256_broadcast_ss(q4 + t);
        c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
        a = _mm256_broadcast_ss(q5 + t);
        c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    }
    _mm256_store_ps(out + 0 * RT, c00); _mm256_store_ps(out + 0 * RT + PANEL, c01);
    _mm256_store_ps(out + 1 * RT, c10); _mm256_store_ps(out + 1 * RT + PANEL, c11);
    _mm256_store_ps(out + 2 * RT, c20); _mm256_store_ps(out + 2 * RT + PANEL, c21);
    _mm256_store_ps(out + 3 * RT, c30); _mm256_store_ps(out + 3 * RT + PANEL, c31);
    _mm256_store_ps(out + 4 * RT, c40); _mm256_store_ps(out + 4 * RT + PANEL, c41);
    _mm256_store_ps(out + 5 * RT, c50); _mm256_store_ps(out + 5 * RT + PANEL, c51);
}
#else
#include "fused_fma.hpp"  // fused(): the scalar FMA, one rounding

// Baseline: the same chains, one rounding per step like the vector FMAs.
template <int QR>
inline void tile_scores(const float* q, int64_t d, const float* panels, float* out) {
    const float* p0 = panels;
    const float* p1 = panels + d * PANEL;
    for (int64_t i = 0; i < QR; ++i) {
        const float* qi = q + i * d;
        float acc[RT] = {};
        for (int64_t t = 0; t < d; ++t) {
            const float a = qi[t];
            for (int64_t r = 0; r < PANEL; ++r) acc[r] = fused(a, p0[t * PANEL + r], acc[r]);
            for (int64_t r = 0; r < PANEL; ++r) acc[PANEL + r] = fused(a, p1[t * PANEL + r], acc[PANEL + r]);
        }
        for (int64_t r = 0; r < RT; ++r) out[i * RT + r] = acc[r];
    }
}
#endif

// Queries in the layout tile_scores reads: tiles of QT queries (zero rows past n_q), each tile
// row-major (query i at q[i * d + t]) or, for AVX-512, interleaved (q[t * QT + i]).
void pack_queries(const float* queries, int64_t n_q, int64_t n_qt, int64_t d, float* out) {
    for (int64_t q0 = 0; q0 < n_qt; q0 += QT)
        for (int64_t i = 0; i < QT; ++i)
            for (int64_t t = 0; t < d; ++t) {
#if defined(NUDGEFAST_AVX512)
                float& slot = out[q0 * d + t * QT + i];
#else
                float& slot = out[(q0 + i) * d + t];
#endif
                slot = q0 + i < n_q ? queries[(q0 + i) * d + t] : 0.0f;
            }
}

// Tile of the last rows queries: a smaller register tile where the level has one, so that a
// handful of queries does not pay for QT.
inline void tile_scores_rows(int64_t rows, const float* q, int64_t d, const float* panels, float* out) {
#if defined(NUDGEFAST_AVX512)
    switch (rows) {
        case 1: return tile_scores<1>(q, d, panels, out);
        case 2: return tile_scores<2>(q, d, panels, out);
        case 3: return tile_scores<3>(q, d, panels, out);
        case 4: return tile_scores<4>(q, d, panels, out);
        case 5: return tile_scores<5>(q, d, panels, out);
        case 6: return tile_scores<6>(q, d, panels, out);
        case 7: return tile_scores<7>(q, d, panels, out);
        case 8: return tile_scores<8>(q, d, panels, out);
        case 9: return tile_scores<9>(q, d, panels, out);
        case 10: return tile_scores<10>(q, d, panels, out);
        case 11: return tile_scores<11>(q, d, panels, out);
        case 12: return tile_scores<12>(q, d, panels, out);
        default: return tile_scores<QT>(q, d, panels, out);
    }
#else
    (void)rows;  // zero padding rows: computed, never admitted (their threshold is +inf)
    tile_scores<QT>(q, d, panels, out);
#endif
}

// The admission test runs on dot * (1/norm), which can differ from the exact dot / norm by a few
// ulp; this relative slack (far above that) makes the test conservative, and the exact score
// is computed, as in the reference, only for the rows that pass.
constexpr float kSlack = 1.0f / (1 << 18);

inline void offer(TopkScratch& st, const TopkProblem& p, int64_t q, float dot, float norm, int64_t id) {
    float* hs = st.scores + q * p.k;
    int64_t* hi = st.index + q * p.k;
    if (TopKHeap<float>::push(hs, hi, p.k, dot / norm, id)) st.thresh[q] = hs[0];
}

#ifdef NUDGEFAST_AVX2
// In-register transpose: r[i] holds 8 dimensions of record i on entry, 8 records of dimension i on exit.
inline void transpose8x8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20); r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20); r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31); r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31); r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

// rows: PANEL converted rows of d floats -> panel: d x PANEL (dimension-major).
inline void rows_to_panel(const float* rows, int64_t d, float* panel) {
    int64_t t = 0;
#if defined(NUDGEFAST_AVX512)
    for (; t + 8 <= d; t += 8) {
        __m256 lo[8], hi[8];
        for (int64_t i = 0; i < 8; ++i) {
            lo[i] = _mm256_loadu_ps(rows + i * d + t);
            hi[i] = _mm256_loadu_ps(rows + (8 + i) * d + t);
        }
        transpose8x8(lo);
        transpose8x8(hi);
        for (int64_t j = 0; j < 8; ++j)
            _mm512_store_ps(panel + (t + j) * PANEL, _mm512_insertf32x8(_mm512_castps256_ps512(lo[j]), hi[j], 1));
    }
#elif defined(NUDGEFAST_AVX2)
    for (; t + PANEL <= d; t += PANEL) {
        __m256 r[PANEL];
        for (int64_t i = 0; i < PANEL; ++i) r[i] = _mm256_loadu_ps(rows + i * d + t);
        transpose8x8(r);
        for (int64_t j = 0; j < PANEL; ++j) _mm256_store_ps(panel + (t + j) * PANEL, r[j]);
    }
#endif
    for (; t < d; ++t)
        for (int64_t i = 0; i < PANEL; ++i) panel[t * PANEL + i] = rows[i * d + t];
}

// Rows are requested this far ahead of their conversion: with few queries the pass is bound by
// memory, and the hardware prefetcher alone leaves about a third of the bandwidth unused.
constexpr int64_t kPrefetchRows = 32;

template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
#if defined(__GNUC__)
    const char* bytes = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(bytes + b);
#else
    (void)row;
    (void)d;
#endif
}

// Converts the n <= RT rows starting at chunk row r0 into the two panels of st.panels (padding
// with zero records) and sets their norms; bad, excluded and padding records get NaN, which
// makes every score of theirs fail the admission test. `ex` walks the sorted exclude list.
template <typename T>
void pack_tile(TopkScratch& st, const TopkProblem& p, int64_t r0, int64_t n, const int64_t*& ex) {
    const T* base = static_cast<const T*>(p.chunk);
    const float not_candidate = std::numeric_limits<float>::quiet_NaN();
    float* rows = st.rows;
    st.always_offer = 0;
    for (int64_t h = 0; h < RT; h += PANEL) {
        for (int64_t i = 0; i < PANEL; ++i) {
            const int64_t r = h + i;
            float* row = rows + i * p.d;
            if (r >= n) {
                for (int64_t j = 0; j < p.d; ++j) row[j] = 0.0f;
                st.norm[r] = st.inv_norm[r] = not_candidate;
                continue;
            }
            if (r0 + r + kPrefetchRows < p.m) prefetch_row(base + (r0 + r + kPrefetchRows) * p.row_stride, p.d);
            const double norm = load_row_norm(base + (r0 + r) * p.row_stride, p.d, row);
            const bool bad = !std::isfinite(norm) || (p.normalize && norm == 0.0);
            const int64_t id = p.row_offset + r0 + r;
            if (bad && (st.first_bad < 0 || id < st.first_bad)) st.first_bad = id;
            // The reference divides by the float32 norm.
            const float nf = p.normalize ? static_cast<float>(norm) : 1.0f;
            st.norm[r] = bad ? not_candidate : nf;
            st.inv_norm[r] = bad ? not_candidate : 1.0f / nf;
            // A norm below 2^-128 (a finite, nonzero row of tiny values) overflows 1 / norm: the
            // admission test would see inf or NaN, but the exact score dot / norm is finite.
            if (!bad && !(st.inv_norm[r] <= std::numeric_limits<float>::max()))
                st.always_offer |= uint64_t{1} << r;
        }
        rows_to_panel(rows, p.d, st.panels + h * p.d);
    }
    for (; ex != p.exclude + p.n_exclude && *ex < r0 + n; ++ex) {
        st.norm[*ex - r0] = st.inv_norm[*ex - r0] = not_candidate;
        st.always_offer &= ~(uint64_t{1} << (*ex - r0));
    }
}

inline int lowest_bit(uint64_t mask) {
#if defined(__GNUC__)
    return __builtin_ctzll(mask);
#else
    int r = 0;
    while (!(mask & 1)) mask >>= 1, ++r;
    return r;
#endif
}

// Scores the packed records (chunk rows r0..r0+RT-1) against every query tile and offers the
// scores that pass the admission test to the heaps.
void score_tile(TopkScratch& st, const TopkProblem& p, int64_t r0) {
    alignas(64) float tile[QT * RT];
    const float* norm = st.norm;
    const float* inv = st.inv_norm;
    const int64_t id0 = p.row_offset + r0;
#if defined(NUDGEFAST_AVX512)
    const __m512 inv0 = _mm512_loadu_ps(inv), inv1 = _mm512_loadu_ps(inv + PANEL);
    const __m512 slack = _mm512_set1_ps(kSlack);
#elif defined(NUDGEFAST_AVX2)
    const __m256 inv0 = _mm256_loadu_ps(inv), inv1 = _mm256_loadu_ps(inv + PANEL);
    const __m256 slack = _mm256_set1_ps(kSlack);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
#endif
    for (int64_t q0 = 0; q0 < p.n_qt; q0 += QT) {
        const int64_t rows = p.n_q - q0 < QT ? p.n_q - q0 : QT;
        tile_scores_rows(rows, p.queries + q0 * p.d, p.d, st.panels, tile);
        for (int64_t i = 0; i < rows; ++i) {
#if defined(NUDGEFAST_AVX512)
            const __m512 thr = _mm512_set1_ps(st.thresh[q0 + i]);
            const __m512 s0 = _mm512_mul_ps(_mm512_load_ps(tile + i * RT), inv0);
            const __m512 s1 = _mm512_mul_ps(_mm512_load_ps(tile + i * RT + PANEL), inv1);
            const __m512 u0 = _mm512_fmadd_ps(_mm512_abs_ps(s0), slack, s0);
            const __m512 u1 = _mm512_fmadd_ps(_mm512_abs_ps(s1), slack, s1);
            uint64_t mask = static_cast<uint64_t>(_mm512_cmp_ps_mask(u0, thr, _CMP_GE_OQ)) |
                            static_cast<uint64_t>(_mm512_cmp_ps_mask(u1, thr, _CMP_GE_OQ)) << PANEL;
#elif defined(NUDGEFAST_AVX2)
            const __m256 thr = _mm256_set1_ps(st.thresh[q0 + i]);
            const __m256 s0 = _mm256_mul_ps(_mm256_load_ps(tile + i * RT), inv0);
            const __m256 s1 = _mm256_mul_ps(_mm256_load_ps(tile + i * RT + PANEL), inv1);
            const __m256 u0 = _mm256_fmadd_ps(_mm256_and_ps(s0, abs_mask), slack, s0);
            const __m256 u1 = _mm256_fmadd_ps(_mm256_and_ps(s1, abs_mask), slack, s1);
            uint64_t mask = static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(u0, thr, _CMP_GE_OQ))) |
                            static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(u1, thr, _CMP_GE_OQ))) << PANEL;
#else
            uint64_t mask = 0;
            for (int64_t r = 0; r < RT; ++r) {
                const float s = tile[i * RT + r] * inv[r];
                if (s + std::fabs(s) * kSlack >= st.thresh[q0 + i]) mask |= uint64_t{1} << r;
            }
#endif
            mask |= st.always_offer;
            while (mask) {
                const int r = lowest_bit(mask);
                mask &= mask - 1;
                offer(st, p, q0 + i, tile[i * RT + r], norm[r], id0 + r);
            }
        }
    }
}

// One block of chunk rows: RT records at a time are packed (the corpus is read once, at an even
// pace the hardware prefetcher follows) and scored against all queries while they sit in L1/L2.
template <typename T>
void process_block(TopkScratch& st, const TopkProblem& p, int64_t begin, int64_t end) {
    // First excluded row >= begin (the list is sorted): a binary search.
    const int64_t* ex = p.exclude;
    for (int64_t n = p.n_exclude; n > 0;) {
        const int64_t half = n / 2;
        if (ex[half] < begin) ex += half + 1, n -= half + 1;
        else n = half;
    }
    for (int64_t r0 = begin; r0 < end; r0 += RT) {
        pack_tile<T>(st, p, r0, end - r0 < RT ? end - r0 : RT, ex);
        score_tile(st, p, r0);
    }
}

void topk_block(const TopkProblem& p, TopkScratch& st, int64_t begin, int64_t end) {
    switch (p.chunk_type) {
        case ChunkType::f16: process_block<Half>(st, p, begin, end); break;
        case ChunkType::f32: process_block<float>(st, p, begin, end); break;
        case ChunkType::f64: process_block<double>(st, p, begin, end); break;
    }
}

}  // namespace

extern const TopkKernel topk_kernel = {QT, RT, PANEL, &pack_queries, &topk_block};

}  // namespace NUDGEFAST_LEVEL
}  // namespace nudgefast
