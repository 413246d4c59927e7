// The part of a top-k driver that is the same for float chunks (topk.cpp) and quantized chunks
// (qtopk.cpp): threads take blocks of rows from the chunk, each runs the level's kernel into its
// private heaps (seeded with the caller's k-th entry), and the heaps are merged with the caller's
// state by the tie rule (score desc, index asc). Included by the baseline drivers only (never by
// a per-level kernel file: see dispatch.hpp on inline bodies).
#pragma once

#include <algorithm>
#include <vector>

#include "common.hpp"

namespace nudgefast {

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
