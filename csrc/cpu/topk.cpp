// topk_update: merge one corpus chunk into the running top-k of every query.
//
// Fused: a register-tiled micro-kernel scores a tile of queries x records and each score is
// compared at once with its query's current k-th best, so no n_q x chunk score matrix exists.
// Threads take blocks of BLOCK_ROWS records. 16 records at a time are converted to two float32
// "panels" (dimension-major groups of 8 records: one aligned load gives one dimension of 8
// records; 24 KiB at d = 384, so they stay in L1) and scored against every tile of queries
// (which stream from L2/L3). Each thread keeps a private top-k per query whose
// admission threshold starts at the caller's k-th best, so it is tight from the first row. The
// private states are merged with the caller's at the end with the tie rule, so the result does
// not depend on the thread count.
#include "common.hpp"

namespace nudgefast {
namespace {

constexpr int64_t QT = 6;          // queries per register tile
constexpr int64_t PANEL = 8;       // records per panel: one AVX register of scores
constexpr int64_t RT = 2 * PANEL;  // records per register tile: 6 x 2 accumulators + 2 panel + 1 query register
constexpr int64_t BLOCK_ROWS = 256;  // records per unit of work handed to a thread (a multiple of RT)

// Scores (unscaled dot products) of QT queries (rows of `q`, stride d) with the RT records of two
// consecutive panels, written out[i * RT + r]. Each score is one FMA chain over t = 0..d-1
// whatever its slot in the tile, so exact duplicate records get bit-identical scores and the
// tie rule then orders them by index.
inline void tile_scores(const float* q, int64_t d, const float* panels, float* out) {
    const float* p0 = panels;
    const float* p1 = panels + d * PANEL;
#ifdef NUDGEFAST_AVX2
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
#elif defined(__GNUC__)
    // Portable SIMD: GCC/Clang 4-lane vector extensions (SSE, NEON), two queries at a time so the
    // 8 accumulators and 4 record vectors fit in 16 registers.
    typedef float v4 __attribute__((vector_size(16)));
    for (int64_t i = 0; i < QT; i += 2) {
        v4 c0[4] = {}, c1[4] = {};
        for (int64_t t = 0; t < d; ++t) {
            v4 b[4];
            std::memcpy(&b[0], p0 + t * PANEL, 2 * sizeof(v4));
            std::memcpy(&b[2], p1 + t * PANEL, 2 * sizeof(v4));
            const float a0 = q[i * d + t], a1 = q[(i + 1) * d + t];
            for (int j = 0; j < 4; ++j) {
                c0[j] += a0 * b[j];
                c1[j] += a1 * b[j];
            }
        }
        std::memcpy(out + i * RT, c0, sizeof c0);
        std::memcpy(out + (i + 1) * RT, c1, sizeof c1);
    }
#else
    for (int64_t i = 0; i < QT; ++i) {
        const float* qi = q + i * d;
        float acc[RT] = {};
        for (int64_t t = 0; t < d; ++t)
            for (int64_t r = 0; r < PANEL; ++r) {
                acc[r] += qi[t] * p0[t * PANEL + r];
                acc[PANEL + r] += qi[t] * p1[t * PANEL + r];
            }
        for (int64_t r = 0; r < RT; ++r) out[i * RT + r] = acc[r];
    }
#endif
}

// One thread's private state.
struct ThreadState {
    std::vector<float> scores;     // (n_q, k) heaps, worst on top
    std::vector<int64_t> index;
    std::vector<float> thresh;     // (n_q padded to QT): score of the worst kept entry; +inf on padding
    AlignedBuffer<float> panels;   // RT converted records: 2 panels of (d, PANEL)
    AlignedBuffer<float> norm;     // per record: its float32 norm, 1 without normalize, NaN if not a candidate
    AlignedBuffer<float> inv_norm; // 1 / norm (NaN if not a candidate), for the cheap admission test
    AlignedBuffer<float> rows;     // PANEL converted rows (row-major), on their way into a panel
    int64_t first_bad = -1;
    bool ready = false;            // set once the state is allocated and seeded
};

struct Problem {
    const float* queries;  // (n_qt, d) float32, zero rows past n_q
    int64_t n_q, n_qt, d, k;
    const void* chunk;
    int64_t m, row_stride;  // chunk rows, elements between consecutive rows
    int64_t row_offset;
    const int64_t* exclude;
    int64_t n_exclude;
    bool normalize;
};

// The admission test runs on dot * (1/norm), which can differ from the exact dot / norm by a few
// ulp; this relative slack (far above that) makes the test conservative, and the exact score
// is computed, as in the reference, only for the rows that pass.
constexpr float kSlack = 1.0f / (1 << 18);

inline void offer(ThreadState& st, const Problem& p, int64_t q, float dot, float norm, int64_t id) {
    float* hs = st.scores.data() + q * p.k;
    int64_t* hi = st.index.data() + q * p.k;
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
#ifdef NUDGEFAST_AVX2
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
void pack_tile(ThreadState& st, const Problem& p, int64_t r0, int64_t n, const int64_t*& ex) {
    const T* base = static_cast<const T*>(p.chunk);
    const float not_candidate = std::numeric_limits<float>::quiet_NaN();
    float* rows = st.rows.data();
    for (int64_t h = 0; h < RT; h += PANEL) {
        for (int64_t i = 0; i < PANEL; ++i) {
            const int64_t r = h + i;
            float* row = rows + i * p.d;
            if (r >= n) {
                std::fill(row, row + p.d, 0.0f);
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
        }
        rows_to_panel(rows, p.d, st.panels.data() + h * p.d);
    }
    for (; ex != p.exclude + p.n_exclude && *ex < r0 + n; ++ex)
        st.norm[*ex - r0] = st.inv_norm[*ex - r0] = not_candidate;
}

// Scores the packed records (chunk rows r0..r0+RT-1) against every query tile and offers the
// scores that pass the admission test to the heaps.
void score_tile(ThreadState& st, const Problem& p, int64_t r0) {
    alignas(32) float tile[QT * RT];
    const float* norm = st.norm.data();
    const float* inv = st.inv_norm.data();
    const int64_t id0 = p.row_offset + r0;
#ifdef NUDGEFAST_AVX2
    const __m256 inv0 = _mm256_load_ps(inv), inv1 = _mm256_load_ps(inv + PANEL);
    const __m256 slack = _mm256_set1_ps(kSlack);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
#endif
    for (int64_t q0 = 0; q0 < p.n_qt; q0 += QT) {
        tile_scores(p.queries + q0 * p.d, p.d, st.panels.data(), tile);
#ifdef NUDGEFAST_AVX2
        for (int64_t i = 0; i < QT; ++i) {
            const __m256 thr = _mm256_set1_ps(st.thresh[q0 + i]);
            const __m256 s0 = _mm256_mul_ps(_mm256_load_ps(tile + i * RT), inv0);
            const __m256 s1 = _mm256_mul_ps(_mm256_load_ps(tile + i * RT + PANEL), inv1);
            const __m256 u0 = _mm256_fmadd_ps(_mm256_and_ps(s0, abs_mask), slack, s0);
            const __m256 u1 = _mm256_fmadd_ps(_mm256_and_ps(s1, abs_mask), slack, s1);
            unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(u0, thr, _CMP_GE_OQ))) |
                            static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(u1, thr, _CMP_GE_OQ))) << PANEL;
            while (mask) {
                const int r = __builtin_ctz(mask);
                mask &= mask - 1;
                offer(st, p, q0 + i, tile[i * RT + r], norm[r], id0 + r);
            }
        }
#else
        for (int64_t i = 0; i < QT; ++i)
            for (int64_t r = 0; r < RT; ++r) {
                const float s = tile[i * RT + r] * inv[r];
                if (s + std::fabs(s) * kSlack >= st.thresh[q0 + i])
                    offer(st, p, q0 + i, tile[i * RT + r], norm[r], id0 + r);
            }
#endif
    }
}

// One block of chunk rows: RT records at a time are packed (the corpus is read once, at an even
// pace the hardware prefetcher follows) and scored against all queries while they sit in L1.
template <typename T>
void process_block(ThreadState& st, const Problem& p, int64_t begin, int64_t end) {
    const int64_t* ex = std::lower_bound(p.exclude, p.exclude + p.n_exclude, begin);
    for (int64_t r0 = begin; r0 < end; r0 += RT) {
        pack_tile<T>(st, p, r0, std::min(RT, end - r0), ex);
        score_tile(st, p, r0);
    }
}

// Seeds a thread's state: every slot starts as the caller's k-th entry (empty when the caller has
// fewer than k), so a row must rank before it to matter and the heaps hold chunk rows only.
void seed_state(ThreadState& st, const Problem& p, const float* best_scores, const int64_t* best_index) {
    const int64_t k = p.k;
    st.scores.resize(p.n_q * k);
    st.index.resize(p.n_q * k);
    st.thresh.assign(p.n_qt, std::numeric_limits<float>::infinity());
    for (int64_t q = 0; q < p.n_q; ++q) {
        const float* cs = best_scores + q * k;
        const int64_t* ci = best_index + q * k;
        float floor_s = -std::numeric_limits<float>::infinity();
        int64_t floor_i = kEmptyIndex;
        if (k > 0 && std::all_of(ci, ci + k, [](int64_t v) { return v >= 0; })) {
            floor_s = cs[0];
            floor_i = ci[0];
            for (int64_t j = 1; j < k; ++j)
                if (ranks_before(floor_s, floor_i, cs[j], ci[j])) floor_s = cs[j], floor_i = ci[j];
        }
        std::fill(st.scores.begin() + q * k, st.scores.begin() + (q + 1) * k, floor_s);
        std::fill(st.index.begin() + q * k, st.index.begin() + (q + 1) * k, floor_i);
        if (k > 0) st.thresh[q] = floor_s;
    }
    st.panels.resize(static_cast<std::size_t>(RT * p.d));
    st.norm.resize(static_cast<std::size_t>(RT));
    st.inv_norm.resize(static_cast<std::size_t>(RT));
    st.rows.resize(static_cast<std::size_t>(PANEL * p.d));
    st.ready = true;
}

}  // namespace

int64_t topk_update(const float* queries, int64_t n_q, int64_t d, const void* chunk, ChunkType chunk_type,
                    int64_t m, int64_t row_stride, int64_t row_offset, const int64_t* exclude, int64_t n_exclude,
                    bool normalize, float* best_scores, int64_t* best_index, int64_t k, int n_threads) {
    if (m == 0) return -1;
    // Queries padded to whole tiles with zero rows (their threshold is +inf: never admitted).
    const int64_t n_qt = round_up(n_q, QT);
    std::vector<float> packed(static_cast<std::size_t>(n_qt * d), 0.0f);
    std::copy(queries, queries + n_q * d, packed.begin());
    Problem p{packed.data(), n_q, n_qt, d, k, chunk, m, row_stride, row_offset, exclude, n_exclude, normalize};

    // Blocks: at most BLOCK_ROWS, but small chunks are split so every thread gets work.
    const int threads = std::max(1, std::min<int>(n_threads, static_cast<int>((m + RT - 1) / RT)));
    const int64_t block = std::min<int64_t>(BLOCK_ROWS, round_up((m + 4 * threads - 1) / (4 * threads), RT));
    const int64_t n_blocks = (m + block - 1) / block;

    std::vector<ThreadState> states(threads);
    WorkerErrors errors;
#pragma omp parallel num_threads(threads)
    {
        ThreadState& st = states[thread_id()];
        errors.run([&] { seed_state(st, p, best_scores, best_index); });
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < n_blocks; ++b) {
            if (!st.ready) continue;  // allocation failed: reported after the join
            errors.run([&] {
                const int64_t begin = b * block, end = std::min(m, begin + block);
                switch (chunk_type) {
                    case ChunkType::f16: process_block<Half>(st, p, begin, end); break;
                    case ChunkType::f32: process_block<float>(st, p, begin, end); break;
                    case ChunkType::f64: process_block<double>(st, p, begin, end); break;
                }
            });
        }
    }
    errors.rethrow();

    int64_t first_bad = -1;
    for (const auto& st : states)
        if (st.first_bad >= 0 && (first_bad < 0 || st.first_bad < first_bad)) first_bad = st.first_bad;

    // Merge the caller's state and the private ones (score desc, index asc; deduplicated by index).
#pragma omp parallel num_threads(threads)
    {
        std::vector<std::pair<float, int64_t>> cand;
#pragma omp for schedule(static)
        for (int64_t q = 0; q < n_q; ++q) {
            errors.run([&] {
                cand.clear();
                for (int64_t j = 0; j < k; ++j) {
                    const int64_t id = best_index[q * k + j];
                    cand.emplace_back(best_scores[q * k + j], id >= 0 ? id : kEmptyIndex);
                }
                for (const auto& st : states) {
                    if (!st.ready) continue;  // the runtime may start fewer threads than asked
                    for (int64_t j = 0; j < k; ++j) cand.emplace_back(st.scores[q * k + j], st.index[q * k + j]);
                }
                write_ranked(cand, k, best_scores + q * k, best_index + q * k);
            });
        }
    }
    errors.rethrow();
    return first_bad;
}

}  // namespace nudgefast
