// topk_update: merge one corpus chunk into the running top-k of every query.
//
// Fused: a register-tiled micro-kernel scores a tile of queries x records and each score is
// compared at once with its query's current k-th best, so no n_q x chunk score matrix exists.
// Threads take sub-blocks of SUB_ROWS records (small enough to stay in L2 next to the tile of
// queries in L1), convert them to zero-padded float32, and keep a private top-k per query whose
// admission threshold starts at the caller's k-th best, so it is tight from the first row. The
// private states are merged with the caller's at the end with the tie rule, so the result does
// not depend on the thread count.
#include "common.hpp"

namespace nudgefast {
namespace {

constexpr int64_t QB = 4;        // queries per register tile (one 4-lane result per record)
#ifndef NF_RB
#define NF_RB 3
#endif
#ifndef NF_SUB
#define NF_SUB 192
#endif
constexpr int64_t RB = NF_RB;        // records per register tile: 12 accumulators + 3 record + 1 query register
constexpr int64_t LANES = 8;     // floats per AVX register; rows are zero-padded to a multiple
constexpr int64_t SUB_ROWS = NF_SUB;  // 192 x 384 float32 = 288 KiB: one sub-block fits a Zen 3 L2 (512 KiB)

#ifdef NUDGEFAST_AVX2
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

// Dot products of QB packed queries with RB packed records, written out[r * QB + q].
// Every (query, record) pair is summed in the same order whatever its position in the tile, so
// exact duplicate records get bit-identical scores (the tie rule then orders them by index).
inline void tile_dot(const float* q, const float* x, int64_t dp, float* out) {
#ifdef NUDGEFAST_AVX2
    static_assert(QB == 4 && RB == 3, "the AVX2 micro-kernel is written for 4 x 3 tiles");
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
    const float* x0 = x;
    const float* x1 = x + dp;
    const float* x2 = x + 2 * dp;
    const float* q0 = q;
    const float* q1 = q + dp;
    const float* q2 = q + 2 * dp;
    const float* q3 = q + 3 * dp;
    for (int64_t t = 0; t < dp; t += LANES) {
        // 12 accumulators + 3 records + 1 query = all 16 registers. The empty asm pins each load
        // in a register: otherwise the compiler folds a load into every FMA (16 loads per 12
        // FMAs) and the kernel becomes load-bound.
        __m256 r0 = _mm256_load_ps(x0 + t), r1 = _mm256_load_ps(x1 + t), r2 = _mm256_load_ps(x2 + t);
        __asm__("" : "+x"(r0), "+x"(r1), "+x"(r2));
        __m256 v = _mm256_load_ps(q0 + t);
        __asm__("" : "+x"(v));
        a00 = _mm256_fmadd_ps(v, r0, a00); a01 = _mm256_fmadd_ps(v, r1, a01); a02 = _mm256_fmadd_ps(v, r2, a02);
        v = _mm256_load_ps(q1 + t);
        __asm__("" : "+x"(v));
        a10 = _mm256_fmadd_ps(v, r0, a10); a11 = _mm256_fmadd_ps(v, r1, a11); a12 = _mm256_fmadd_ps(v, r2, a12);
        v = _mm256_load_ps(q2 + t);
        __asm__("" : "+x"(v));
        a20 = _mm256_fmadd_ps(v, r0, a20); a21 = _mm256_fmadd_ps(v, r1, a21); a22 = _mm256_fmadd_ps(v, r2, a22);
        v = _mm256_load_ps(q3 + t);
        __asm__("" : "+x"(v));
        a30 = _mm256_fmadd_ps(v, r0, a30); a31 = _mm256_fmadd_ps(v, r1, a31); a32 = _mm256_fmadd_ps(v, r2, a32);
    }
    // Horizontal sums: the 4 query accumulators of one record into one 4-lane vector. The same
    // reduction for every tile slot, so exact duplicate records get bit-identical scores.
    _mm_storeu_ps(out + 0 * QB, hsum4(a00, a10, a20, a30));
    _mm_storeu_ps(out + 1 * QB, hsum4(a01, a11, a21, a31));
    _mm_storeu_ps(out + 2 * QB, hsum4(a02, a12, a22, a32));
#else
    for (int r = 0; r < RB; ++r)
        for (int i = 0; i < QB; ++i) {
            float lane[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t t = 0; t < dp; t += LANES)
                for (int l = 0; l < LANES; ++l) lane[l] += q[i * dp + t + l] * x[r * dp + t + l];
            out[r * QB + i] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
        }
#endif
}

// One thread's private state: a top-k heap and its admission threshold per query.
struct ThreadState {
    std::vector<float> scores;    // (n_q, k) heaps, worst on top
    std::vector<int64_t> index;
    AlignedBuffer<float> thresh;  // (n_q padded to QB): score of the worst kept entry; +inf on padding
    AlignedBuffer<float> rows;    // (SUB_ROWS padded to RB, dp) converted records
    AlignedBuffer<float> divisor; // per record: its norm, 1 without normalize, NaN when not a candidate
    int64_t first_bad = -1;
    bool ready = false;           // set once the state is allocated and seeded
};

struct Problem {
    const float* queries;  // (n_q4, dp) packed, zero-padded
    int64_t n_q, n_q4, d, dp, k;
    const void* chunk;
    int64_t m, row_stride;  // chunk rows, elements between consecutive rows
    int64_t row_offset;
    const int64_t* exclude;
    int64_t n_exclude;
    bool normalize;
};

// Admits the 4 scores of one record (global index `id`) for queries q0..q0+3.
inline void offer(ThreadState& st, const Problem& p, int64_t q0, const float* s4, int64_t id) {
    for (int64_t l = 0; l < QB; ++l) {
        const int64_t q = q0 + l;
        if (q >= p.n_q) break;
        float* hs = st.scores.data() + q * p.k;
        int64_t* hi = st.index.data() + q * p.k;
        if (TopKHeap<float>::push(hs, hi, p.k, s4[l], id)) st.thresh[q] = hs[0];
    }
}

template <typename T>
void process_block(ThreadState& st, const Problem& p, int64_t begin, int64_t end) {
    const T* base = static_cast<const T*>(p.chunk);
    const int64_t mb = end - begin;
    const int64_t mb_pad = round_up(mb, RB);
    float* rows = st.rows.data();
    float* divisor = st.divisor.data();
    const float not_candidate = std::numeric_limits<float>::quiet_NaN();  // NaN score: never admitted

    for (int64_t r = 0; r < mb; ++r) {
        const double norm = load_row_padded(base + (begin + r) * p.row_stride, p.d, p.dp, rows + r * p.dp);
        const bool bad = !std::isfinite(norm) || (p.normalize && norm == 0.0);
        const int64_t id = p.row_offset + begin + r;
        if (bad && (st.first_bad < 0 || id < st.first_bad)) st.first_bad = id;
        divisor[r] = bad ? not_candidate : (p.normalize ? static_cast<float>(norm) : 1.0f);
    }
    for (int64_t r = mb; r < mb_pad; ++r) {
        std::fill(rows + r * p.dp, rows + (r + 1) * p.dp, 0.0f);
        divisor[r] = not_candidate;
    }
    const int64_t* ex = std::lower_bound(p.exclude, p.exclude + p.n_exclude, begin);
    for (; ex != p.exclude + p.n_exclude && *ex < end; ++ex) divisor[*ex - begin] = not_candidate;

    alignas(32) float tile[RB * QB];
    for (int64_t q0 = 0; q0 < p.n_q4; q0 += QB) {
        const float* qp = p.queries + q0 * p.dp;
#ifdef NUDGEFAST_AVX2
        __m128 thr = _mm_load_ps(st.thresh.data() + q0);
#endif
        for (int64_t r0 = 0; r0 < mb_pad; r0 += RB) {
            tile_dot(qp, rows + r0 * p.dp, p.dp, tile);
            for (int64_t r = 0; r < RB; ++r) {
                float* s4 = tile + r * QB;
#ifdef NUDGEFAST_AVX2
                // Same division as the reference (score / float32 norm); NaN divisor -> NaN -> rejected.
                const __m128 s = _mm_div_ps(_mm_load_ps(s4), _mm_set1_ps(divisor[r0 + r]));
                if (_mm_movemask_ps(_mm_cmp_ps(s, thr, _CMP_GE_OQ)) == 0) continue;
                _mm_store_ps(s4, s);
                offer(st, p, q0, s4, p.row_offset + begin + r0 + r);
                thr = _mm_load_ps(st.thresh.data() + q0);
#else
                bool any = false;
                for (int64_t l = 0; l < QB; ++l) {
                    s4[l] /= divisor[r0 + r];
                    any |= s4[l] >= st.thresh[q0 + l];
                }
                if (any) offer(st, p, q0, s4, p.row_offset + begin + r0 + r);
#endif
            }
        }
    }
}

}  // namespace

int64_t topk_update(const float* queries, int64_t n_q, int64_t d, const void* chunk, ChunkType chunk_type,
                    int64_t m, int64_t row_stride, int64_t row_offset, const int64_t* exclude, int64_t n_exclude,
                    bool normalize, float* best_scores, int64_t* best_index, int64_t k, int n_threads) {
    if (m == 0) return -1;
    const int64_t dp = round_up(std::max<int64_t>(d, 1), LANES);
    const int64_t n_q4 = round_up(n_q, QB);

    // Pack the queries once: float32, d padded with zeros (zeros add nothing to a dot product).
    AlignedBuffer<float> packed(static_cast<std::size_t>(n_q4 * dp));
    std::fill(packed.data(), packed.data() + n_q4 * dp, 0.0f);
    for (int64_t i = 0; i < n_q; ++i) std::memcpy(packed.data() + i * dp, queries + i * d, sizeof(float) * d);

    Problem p{packed.data(), n_q, n_q4, d, dp, k, chunk, m, row_stride, row_offset, exclude, n_exclude, normalize};

    // Sub-blocks: at most SUB_ROWS, but small chunks are split so every thread gets work.
    const int threads = std::max(1, std::min<int>(n_threads, static_cast<int>((m + RB - 1) / RB)));
    const int64_t sub = std::min<int64_t>(SUB_ROWS, round_up((m + 4 * threads - 1) / (4 * threads), RB));
    const int64_t n_blocks = (m + sub - 1) / sub;

    std::vector<ThreadState> states(threads);
    WorkerErrors errors;
#pragma omp parallel num_threads(threads)
    {
        ThreadState& st = states[thread_id()];
        errors.run([&] {
            st.scores.resize(n_q * k);
            st.index.resize(n_q * k);
            st.thresh.resize(n_q4);
            for (int64_t q = 0; q < n_q; ++q) {
                // Every slot starts as the caller's k-th entry (empty when the caller has fewer
                // than k): a row must rank before it to matter, so the threshold is tight from the
                // first row, and the private heaps hold chunk rows only.
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
                st.thresh[q] = k > 0 ? floor_s : std::numeric_limits<float>::infinity();
            }
            for (int64_t q = n_q; q < n_q4; ++q) st.thresh[q] = std::numeric_limits<float>::infinity();
            st.rows.resize(static_cast<std::size_t>(round_up(sub, RB) * dp));
            st.divisor.resize(static_cast<std::size_t>(round_up(sub, RB)));
            st.ready = true;
        });
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < n_blocks; ++b) {
            if (!st.ready) continue;
            errors.run([&] {
                const int64_t begin = b * sub, end = std::min(m, begin + sub);
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

    // Merge the private states into the caller's (score desc, index asc).
#pragma omp parallel num_threads(threads)
    {
        std::vector<std::pair<float, int64_t>> cand;
        errors.run([&] { cand.reserve(static_cast<std::size_t>(k * (threads + 1))); });
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
