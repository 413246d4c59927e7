// dot64: out[i, j] = sum over k of A[i, k] * B[j, k], in double, each element one fused
// multiply-add chain over k = 0 .. d-1 in order.
//
// The same value for the same two rows whatever the shapes around them. A BLAS product's sums
// depend on its blocking (the row block, the column's place in a tile, gemv for one column),
// so the validation products of a fit and of the tuner's updates, computed in other shapes,
// would differ in the last bits, and ties would break differently; this kernel makes them equal.
//
// Layout: B's columns are packed k-major in groups of kCols (zero-padded), so that the kCols
// lanes of one row of A advance together: kRows x kCols accumulators, one FMA per lane per k.
// Every lane runs the same chain, so neither the lane nor the tile (whose size is the level's)
// changes a result.
// The register tile is compiled once per instruction-set level: csrc/cpu/kernels/dot64.cpp.
#include "common.hpp"

namespace nudgefast {

void dot64(const double* A, const double* B, int64_t n, int64_t m, int64_t d, double* out, int n_threads) {
    const Dot64Kernel& kernel = *kernels().dot64;
    const auto tile = kernel.tile;
    const int64_t kRows = kernel.rows, kCols = kernel.cols;
    const int64_t groups = (m + kCols - 1) / kCols;
    WorkerErrors errors;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<double> panel;
        bool ready = false;
        errors.run([&] {
            panel.resize(static_cast<std::size_t>(d * kCols));
            ready = true;
        });
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < groups; ++g) {
            if (!ready) continue;  // allocation failed: reported below
            const int64_t j0 = g * kCols;
            const int64_t w = std::min<int64_t>(kCols, m - j0);
            for (int64_t k = 0; k < d; ++k)
                for (int64_t c = 0; c < kCols; ++c) panel[k * kCols + c] = c < w ? B[(j0 + c) * d + k] : 0.0;
            for (int64_t i0 = 0; i0 < n; i0 += kRows) {
                const int64_t rows = std::min<int64_t>(kRows, n - i0);
                const double* a[Dot64Kernel::kMaxRows];
                for (int64_t r = 0; r < kRows; ++r) a[r] = A + (i0 + std::min(r, rows - 1)) * d;
                alignas(64) double acc[Dot64Kernel::kMaxRows * Dot64Kernel::kMaxCols];
                tile(a, panel.data(), d, acc);
                for (int64_t r = 0; r < rows; ++r)
                    for (int64_t c = 0; c < w; ++c) out[(i0 + r) * m + j0 + c] = acc[r * kCols + c];
            }
        }
    }
    errors.rethrow();
}

}  // namespace nudgefast
