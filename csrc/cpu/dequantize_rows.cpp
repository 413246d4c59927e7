// dequantize_rows: out[r, j] = low[j] + step[j] * u[r, j] in float32 (u = code + 128 for int8
// codes, the code itself for uint8), the chunk step of the exact pass over a quantized corpus.
//
// The same two float32 roundings as NumPy's `u.astype(float32) * step + low` (the extension is
// built with -ffp-contract=off, so no fused multiply-add), so the rows equal those of
// nudgefast._quantized.DequantizedRows bit for bit. Memory-bound: one read of the codes, one
// write of out; compiled at the baseline level (the compiler vectorises it), each thread a
// contiguous range of rows.
#include <cstdint>

#include "common.hpp"

namespace nudgefast {

void dequantize_rows(const uint8_t* codes, int64_t m, int64_t d, int64_t row_stride, bool is_signed,
                     const float* low, const float* step, float* out, int n_threads) {
    const int threads = m * d < (int64_t{1} << 15) ? 1 : n_threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < m; ++r) {
        const uint8_t* row = codes + r * row_stride;
        float* o = out + r * d;
        if (is_signed) {
            // int8 code c: u = c + 128 = the byte with its top bit flipped, read unsigned.
            for (int64_t j = 0; j < d; ++j) o[j] = static_cast<float>(row[j] ^ 0x80u) * step[j] + low[j];
        } else {
            for (int64_t j = 0; j < d; ++j) o[j] = static_cast<float>(row[j]) * step[j] + low[j];
        }
    }
}

}  // namespace nudgefast
