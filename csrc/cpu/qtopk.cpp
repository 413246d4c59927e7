// qtopk_int8 / qtopk_hamming: merge one chunk of a quantized corpus (int8/uint8 codes, or packed
// sign bits) into the running top-k of every query.
//
// The same architecture as topk_update (topk.cpp): the inner loops (record tiles packed into the
// layout the micro-kernel reads, integer scores of a tile of queries x a tile of records, and
// the admission test against each query's current k-th best) are compiled once per instruction-
// set level (csrc/cpu/kernels/qtopk.cpp), with sub-paths for AVX512-VNNI and AVX512-VPOPCNTDQ
// picked at run time (dispatch.hpp); this file is the driver. Threads take blocks of BLOCK_ROWS
// records and keep private heaps seeded with the caller's k-th entry; the heaps are merged with
// the caller's state at the end with the tie rule (score desc, index asc). The sums are integers
// and the float epilogue is the same sequence of float32 operations on every level, so results
// do not depend on the level or the thread count.
#include "common.hpp"
#include "topk_driver.hpp"

namespace nudgefast {
namespace {

constexpr int64_t BLOCK_ROWS = 256;  // records per unit of work handed to a thread (a multiple of every tile)

struct ThreadState {
    std::vector<float> scores;  // (n_q, k) heaps, worst on top
    std::vector<int64_t> index;
    std::vector<float> thresh;  // n_q
    std::vector<int64_t> max_dist;
    AlignedBuffer<uint8_t> tile;
    AlignedBuffer<float> divisor;
    QTopkScratch scratch{};
    bool ready = false;
};

// Every slot starts as the caller's k-th entry (empty when the caller has fewer than k), so a row
// must rank before it to matter and the heaps hold chunk rows only.
void seed_state(ThreadState& st, const QTopkProblem& p, const QTopkKernel& kernel, const float* best_scores,
                const int64_t* best_index) {
    const int64_t k = p.k;
    st.thresh.assign(p.n_q, std::numeric_limits<float>::infinity());
    st.max_dist.assign(p.n_q, -1);
    seed_heaps(st.scores, st.index, p.n_q, k, best_scores, best_index, [&](int64_t q, float floor_s) {
        st.thresh[q] = floor_s;
        st.max_dist[q] = hamming_max_dist(floor_s, p.n_bits);
    });
    st.tile.resize(static_cast<std::size_t>(kernel.tile_bytes(p.d)));
    st.divisor.resize(static_cast<std::size_t>(kernel.record_tile));
    st.scratch = QTopkScratch{st.scores.data(), st.index.data(), st.thresh.data(), st.max_dist.data(),
                              st.tile.data(),   st.divisor.data(), -1};
    st.ready = true;
}

// Runs the kernel over the chunk and merges; returns the first bad row or -1. `queries` is the
// raw query array: it is packed here into the kernel's layout.
int64_t run(const QTopkKernel& kernel, QTopkProblem p, const void* queries, float* best_scores,
            int64_t* best_index, int n_threads) {
    if (p.m == 0) return -1;
    const int64_t RT = kernel.record_tile;
    p.n_qt = round_up(p.n_q, kernel.query_tile);
    AlignedBuffer<uint8_t> packed(static_cast<std::size_t>(kernel.query_bytes(p.n_qt, p.d)));
    kernel.pack_queries(queries, p.n_q, p.n_qt, p.d, packed.data());
    p.queries = packed.data();
    return run_blocks_and_merge<ThreadState>(
        p.m, p.n_q, p.k, RT, BLOCK_ROWS, best_scores, best_index, n_threads,
        [&](ThreadState& st) { seed_state(st, p, kernel, best_scores, best_index); },
        [&](ThreadState& st, int64_t begin, int64_t end) { kernel.block(p, st.scratch, begin, end); });
}

// The fields both ops fill alike: the queries' count and width (d bytes, or w words' bytes), k,
// the chunk of codes and its rows' global numbering and exclusions.
QTopkProblem chunk_problem(int64_t n_q, int64_t d, int64_t k, const uint8_t* codes, int64_t m, int64_t row_stride,
                           int64_t row_offset, const int64_t* exclude, int64_t n_exclude) {
    QTopkProblem p{};
    p.n_q = n_q;
    p.d = d;
    p.k = k;
    p.codes = codes;
    p.m = m;
    p.row_stride = row_stride;
    p.row_offset = row_offset;
    p.exclude = exclude;
    p.n_exclude = n_exclude;
    return p;
}

}  // namespace

int64_t qtopk_int8(const int8_t* qcodes, const float* qscale, const float* qoffset, int64_t n_q, int64_t d,
                   const uint8_t* codes, int64_t m, int64_t row_stride, int64_t row_offset, const int64_t* exclude,
                   int64_t n_exclude, bool signed_codes, const float* low, const float* step, bool normalize,
                   float* best_scores, int64_t* best_index, int64_t k, int n_threads) {
    if (m == 0) return -1;
    // low / step in float64, zero past d: a padding dimension is 0 + 0 * u = 0 and adds +0 to the norm.
    std::vector<double> low64(static_cast<std::size_t>(round_up(d, 8)), 0.0), step64(low64.size(), 0.0);
    if (normalize)
        for (int64_t j = 0; j < d; ++j) low64[j] = low[j], step64[j] = step[j];
    QTopkProblem p = chunk_problem(n_q, d, k, codes, m, row_stride, row_offset, exclude, n_exclude);
    p.qscale = qscale;
    p.qoffset = qoffset;
    p.signed_codes = signed_codes;
    p.normalize = normalize;
    p.low = low64.data();
    p.step = step64.data();
    return run(qtopk_int8_kernel(), p, qcodes, best_scores, best_index, n_threads);
}

int64_t qtopk_hamming(const uint8_t* qbits, int64_t n_q, int64_t w, const uint8_t* codes, int64_t m,
                      int64_t row_stride, int64_t row_offset, const int64_t* exclude, int64_t n_exclude,
                      int64_t n_bits, float* best_scores, int64_t* best_index, int64_t k, int n_threads) {
    if (m == 0) return -1;
    QTopkProblem p = chunk_problem(n_q, w, k, codes, m, row_stride, row_offset, exclude, n_exclude);
    p.n_bits = n_bits;
    run(qtopk_hamming_kernel(), p, qbits, best_scores, best_index, n_threads);
    return -1;
}

}  // namespace nudgefast
