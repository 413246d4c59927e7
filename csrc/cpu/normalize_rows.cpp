// normalize_rows: out[r] = chunk[r] / |chunk[r]|, the pass of NudgeResult.apply over the corpus.
//
// Memory-bound: one read of the chunk and one write of out. A row is read twice (its squared
// norm, then the quotients), but the second read hits L1 (a row is a few KiB). Large outputs are
// written with non-temporal stores: an ordinary store first reads the destination line into the
// cache (a third stream of memory traffic) and then evicts the chunk's rows with lines that
// nobody reads soon. Each thread takes one contiguous range of rows: plain sequential streams,
// which the hardware prefetcher follows at full bandwidth. The per-row work is compiled once per
// instruction-set level (csrc/cpu/kernels/normalize_rows.cpp; rounding is described there).
#include <cstdint>

#include "common.hpp"

namespace nudgefast {
namespace {

// Outputs at least this large go around the cache (see above); smaller ones fit in L2/L3 and the
// caller may read them while they are there.
constexpr int64_t kStreamBytes = int64_t{4} << 20;
// Below this many elements one thread does the pass: starting the team costs more.
constexpr int64_t kSerialElements = int64_t{1} << 15;

}  // namespace

template <typename T>
int64_t normalize_rows(const T* chunk, int64_t m, int64_t d, float* out, int n_threads) {
    const NormalizeKernel& kernel = *kernels().normalize;
    const bool f16 = std::is_same<T, Half>::value;
    const bool stream = m * d * static_cast<int64_t>(sizeof(float)) >= kStreamBytes &&
                        reinterpret_cast<std::uintptr_t>(out) % sizeof(float) == 0;
    const int threads = m * d < kSerialElements ? 1 : n_threads;
    int64_t first_bad = std::numeric_limits<int64_t>::max();
#pragma omp parallel num_threads(threads) reduction(min : first_bad)
    {
#ifdef _OPENMP
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
#else
        const int64_t team = 1, me = 0;
#endif
        const int64_t begin = m * me / team, end = m * (me + 1) / team;
        const int64_t bad = kernel.rows(chunk, f16, begin, end, d, out, stream);
        if (bad >= 0) first_bad = std::min(first_bad, bad);
    }
    return first_bad == std::numeric_limits<int64_t>::max() ? -1 : first_bad;
}

template int64_t normalize_rows<float>(const float*, int64_t, int64_t, float*, int);
template int64_t normalize_rows<Half>(const Half*, int64_t, int64_t, float*, int);

}  // namespace nudgefast
