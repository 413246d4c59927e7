// The part of a top-k driver that is the same for float chunks (topk.cpp) and quantized chunks
// (qtopk.cpp): threads take blocks of rows from the chunk, each runs the level's kernel into its
// private heaps (seeded with the caller's k-th entry), and the heaps are merged with the caller's
// state by the tie rule (score desc, index asc). Included by the baseline drivers only (never by
// a per-level kernel file: see dispatch.hpp on inline bodies).
#pragma once

#include <algorithm>
#include <limits>
#include <vector>

#include "common.hpp"

namespace nudgefast {

// Fills a thread's (n_q, k) heaps: every slot of query q starts as the caller's k-th entry of q
// (empty when the caller has fewer than k), so a chunk row must rank before it to matter and the
// heaps end up holding chunk rows only; on_floor(q, score) hears each query's floor (k > 0).
template <class OnFloor>
void seed_heaps(std::vector<float>& scores, std::vector<int64_t>& index, int64_t n_q, int64_t k,
                const float* best_scores, const int64_t* best_index, OnFloor on_floor) {
    scores.resize(n_q * k);
    index.resize(n_q * k);
    for (int64_t q = 0; q < n_q; ++q) {
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
        std::fill(scores.begin() + q * k, scores.begin() + (q + 1) * k, floor_s);
        std::fill(index.begin() + q * k, index.begin() + (q + 1) * k, floor_i);
        if (k > 0) on_floor(q, floor_s);
    }
}

// State: a thread's heaps (`scores`, `index`: n_q x k), its kernel `scratch` (with `first_bad`)
// and `ready` (set by `seed`). seed(State&) fills one; block(State&, begin, end) runs the kernel
// over chunk rows [begin, end). Returns the first bad row any thread saw, or -1.
template <class State, class Seed, class Block>
int64_t run_blocks_and_merge(int64_t m, int64_t n_q, int64_t k, int64_t record_tile, int64_t block_rows,
                             float* best_scores, int64_t* best_index, int n_threads, Seed seed, Block block) {
    // Blocks: at most block_rows, but small chunks are split so every thread gets work.
    const int64_t RT = record_tile;
    const int threads = std::max(1, std::min<int>(n_threads, static_cast<int>((m + RT - 1) / RT)));
    const int64_t rows = std::min<int64_t>(block_rows, round_up((m + 4 * threads - 1) / (4 * threads), RT));
    const int64_t n_blocks = (m + rows - 1) / rows;

    std::vector<State> states(threads);
    WorkerErrors errors;
#pragma omp parallel num_threads(threads)
    {
        State& st = states[thread_id()];
        errors.run([&] { seed(st); });
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < n_blocks; ++b) {
            if (!st.ready) continue;  // allocation failed: reported after the join
            errors.run([&] {
                const int64_t begin = b * rows, end = std::min(m, begin + rows);
                block(st, begin, end);
            });
        }
    }
    errors.rethrow();

    int64_t first_bad = -1;
    for (const auto& st : states)
        if (st.ready && st.scratch.first_bad >= 0 && (first_bad < 0 || st.scratch.first_bad < first_bad))
            first_bad = st.scratch.first_bad;

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
