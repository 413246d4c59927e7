// correct_rows: a fitted Corrector applied to a chunk of stale corpus rows inside the streaming
// passes (issue 14):
//   out[r] = unit(unit(x[r]) W0 + b0 [+ relu(unit(x[r]) W1 + b1) W2]),   unit(v) = v / |v|.
//
// Compute-bound (2 (d_old d_new + h (d_old + d_new)) flops per row against d_old + d_new
// values read and written), so the work is a register-blocked GEMM per row tile
// (csrc/cpu/kernels/correct_rows.cpp, once per instruction-set level), with everything else fused
// around it while the tile is in L2:
//   1. the weights are packed once per call into the kernel's panel layout (shared, read-only);
//   2. each thread takes tiles of `tile` rows (sized so that the unit rows, the hidden layer and
//      the output tile fit in ~384 KiB of L2) and, per tile: the unit rows (float16 converted
//      there), [H = relu(A W1 + b1)], Y = A W0 + b0 [+ H W2], out = unit(Y);
//   3. a row whose norm (of x, or of y) is zero or not finite gives a NaN row: the caller's top-k
//      kernel flags it; nothing is raised here.
// Rounding: norms accumulated in double in squared_norm's order, the unit rows and the output are
// float32 of the float64 products, each element of Y / H one float32 FMA chain (the bias, then k
// in order): every level returns the same bits, whatever the thread count or tile.
#include <cstdint>

#include "common.hpp"

namespace nudgefast {
namespace {

// Bytes of L2 one row tile's buffers may take (Zen 4/5 and recent Intel cores have >= 1 MiB).
constexpr int64_t kTileBytes = int64_t{384} << 10;
constexpr int64_t kMaxTileRows = 256;

// W (K, N) row-major -> [panel][k][column] for n_pad columns (zero past N).
void pack_weights(const float* W, int64_t K, int64_t N, int64_t n_pad, int64_t panel, float* out) {
#pragma omp for schedule(static)
    for (int64_t j0 = 0; j0 < n_pad; j0 += panel) {
        const int64_t w = std::min(panel, n_pad - j0);
        float* dst = out + j0 * K;
        for (int64_t k = 0; k < K; ++k)
            for (int64_t c = 0; c < w; ++c) dst[k * w + c] = j0 + c < N ? W[k * N + j0 + c] : 0.0f;
    }
}

}  // namespace

template <typename T>
void correct_rows(const T* x, int64_t m, int64_t d_old, int64_t d_new, int64_t h, const float* W0, const float* b0,
                  const float* W1, const float* b1, const float* W2, float* out, int n_threads) {
    if (m == 0) return;
    const CorrectKernel& kernel = *kernels().correct;
    const bool mlp = W1 != nullptr && h > 0;
    const int64_t n_pad = round_up(std::max<int64_t>(d_new, 1), kernel.lanes);
    const int64_t h_pad = mlp ? round_up(h, kernel.lanes) : 0;
    const int64_t lda = round_up(std::max<int64_t>(d_old, 1), 16);  // rows start on cache lines
    const int64_t per_row = 4 * (lda + h_pad + n_pad);
    const int64_t tile = std::max(kernel.rows, std::min(kMaxTileRows, kTileBytes / per_row) / kernel.rows * kernel.rows);
    const int64_t n_tiles = (m + tile - 1) / tile;
    const int threads = static_cast<int>(std::min<int64_t>(n_threads, n_tiles));

    // Shared: the packed weights and the zero-padded biases (allocated before the team starts).
    AlignedBuffer<float> w0(d_old * n_pad), bias0(n_pad), w1(mlp ? d_old * h_pad : 0), bias1(h_pad),
        w2(mlp ? h * n_pad : 0);
    std::fill(bias0.data(), bias0.data() + n_pad, 0.0f);
    std::copy(b0, b0 + d_new, bias0.data());
    if (mlp) {
        std::fill(bias1.data(), bias1.data() + h_pad, 0.0f);
        std::copy(b1, b1 + h, bias1.data());
    }
    const bool f16 = std::is_same<T, Half>::value;
    WorkerErrors errors;
#pragma omp parallel num_threads(threads)
    {
        pack_weights(W0, d_old, d_new, n_pad, kernel.panel, w0.data());
        if (mlp) {
            pack_weights(W1, d_old, h, h_pad, kernel.panel, w1.data());
            pack_weights(W2, h, d_new, n_pad, kernel.panel, w2.data());
        }  // (the implied barriers: packing is complete before any tile starts)
        AlignedBuffer<float> a, hid, y;
        AlignedBuffer<uint8_t> bad;
        bool ready = false;
        errors.run([&] {
            a.resize(tile * lda);
            hid.resize(tile * h_pad);
            y.resize(tile * n_pad);
            bad.resize(tile);
            ready = true;
        });
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_tiles; ++t) {
            if (!ready) continue;  // allocation failed: reported below
            const int64_t r0 = t * tile, rows = std::min(tile, m - r0);
            kernel.unit_rows(x + r0 * d_old, f16, rows, d_old, a.data(), lda, bad.data());
            kernel.gemm(a.data(), lda, rows, d_old, w0.data(), n_pad, bias0.data(), false, y.data(), n_pad);
            if (mlp) {
                kernel.gemm(a.data(), lda, rows, d_old, w1.data(), h_pad, bias1.data(), true, hid.data(), h_pad);
                kernel.gemm(hid.data(), h_pad, rows, h, w2.data(), n_pad, nullptr, false, y.data(), n_pad);
            }
            kernel.unit_out(y.data(), n_pad, rows, d_new, bad.data(), out + r0 * d_new);
        }
    }
    errors.rethrow();
}

template void correct_rows<float>(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                                  const float*, const float*, const float*, float*, int);
template void correct_rows<Half>(const Half*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                                 const float*, const float*, const float*, float*, int);

}  // namespace nudgefast
