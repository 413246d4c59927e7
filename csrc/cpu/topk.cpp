// topk_update: merge one corpus chunk into the running top-k of every query.
//
// Fused: a register-tiled micro-kernel scores a tile of queries x records and each score is
// compared at once with its query's current k-th best, so no n_q x chunk score matrix exists.
// The micro-kernel, the packing of records into panels and the admission test are compiled once
// per instruction-set level (csrc/cpu/kernels/topk.cpp, picked at import: dispatch.hpp); this
// file is the driver. Threads take blocks of BLOCK_ROWS records. Each thread keeps a private
// top-k per query whose admission threshold starts at the caller's k-th best, so it is tight
// from the first row. The private states are merged with the caller's at the end with the tie
// rule, so the result does not depend on the thread count (nor, every level computing the same
// FMA chains, on the level).
#include "common.hpp"
#include "topk_driver.hpp"

namespace nudgefast {
namespace {

constexpr int64_t BLOCK_ROWS = 256;  // records per unit of work handed to a thread (a multiple of every RT)

// One thread's private state: the buffers behind its TopkScratch.
struct ThreadState {
    std::vector<float> scores;     // (n_q, k) heaps, worst on top
    std::vector<int64_t> index;
    std::vector<float> thresh;     // (n_qt): score of the worst kept entry; +inf on padding
    AlignedBuffer<float> panels;   // record_tile converted records: panels of (d, panel)
    AlignedBuffer<float> norm;     // per record: its float32 norm, 1 without normalize, NaN if not a candidate
    AlignedBuffer<float> inv_norm; // 1 / norm (NaN if not a candidate), for the cheap admission test
    AlignedBuffer<float> rows;     // `panel` converted rows (row-major), on their way into a panel
    TopkScratch scratch{};
    bool ready = false;            // set once the state is allocated and seeded
};

// Seeds a thread's state: every slot starts as the caller's k-th entry (empty when the caller has
// fewer than k), so a row must rank before it to matter and the heaps hold chunk rows only.
void seed_state(ThreadState& st, const TopkProblem& p, const TopkKernel& kernel, const float* best_scores,
                const int64_t* best_index) {
    const int64_t k = p.k;
    st.thresh.assign(p.n_qt, std::numeric_limits<float>::infinity());
    seed_heaps(st.scores, st.index, p.n_q, k, best_scores, best_index,
               [&](int64_t q, float floor_s) { st.thresh[q] = floor_s; });
    st.panels.resize(static_cast<std::size_t>(kernel.record_tile * p.d));
    st.norm.resize(static_cast<std::size_t>(kernel.record_tile));
    st.inv_norm.resize(static_cast<std::size_t>(kernel.record_tile));
    st.rows.resize(static_cast<std::size_t>(kernel.panel * p.d));
    st.scratch = TopkScratch{st.scores.data(), st.index.data(), st.thresh.data(), st.panels.data(),
                             st.norm.data(),   st.inv_norm.data(), st.rows.data(), -1};
    st.ready = true;
}

}  // namespace

int64_t topk_update(const float* queries, int64_t n_q, int64_t d, const void* chunk, ChunkType chunk_type,
                    int64_t m, int64_t row_stride, int64_t row_offset, const int64_t* exclude, int64_t n_exclude,
                    bool normalize, float* best_scores, int64_t* best_index, int64_t k, int n_threads) {
    if (m == 0) return -1;
    const TopkKernel& kernel = *kernels().topk;
    const int64_t RT = kernel.record_tile;
    // Queries padded to whole tiles with zero rows (their threshold is +inf: never admitted).
    const int64_t n_qt = round_up(n_q, kernel.query_tile);
    std::vector<float> packed(static_cast<std::size_t>(n_qt * d));
    kernel.pack_queries(queries, n_q, n_qt, d, packed.data());
    const TopkProblem p{packed.data(), n_q,        n_qt,    d,         k,         chunk,    chunk_type,
                        m,             row_stride, row_offset, exclude, n_exclude, normalize};

    return run_blocks_and_merge<ThreadState>(
        m, n_q, k, RT, BLOCK_ROWS, best_scores, best_index, n_threads,
        [&](ThreadState& st) { seed_state(st, p, kernel, best_scores, best_index); },
        [&](ThreadState& st, int64_t begin, int64_t end) { kernel.block(p, st.scratch, begin, end); });
}

}  // namespace nudgefast
