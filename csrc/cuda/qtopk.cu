// qtopk: top-k over quantized corpora (numpy_backend.qtopk_int8 / qtopk_hamming are the spec).
//
// Three steps per launch block of corpus rows (cuda_backend._qtopk_pass drives them):
//   1. qtopk_int8_norms (int8 with `normalize` only): per row, the norm of the dequantized row
//      low + step * u accumulated in float64 (one warp per row), rounded once to float32, and
//      whether the row is bad (zero norm: never a candidate; the smallest bad global row goes to
//      *first_bad through atomicMin, excluded rows included, as in the reference).
//   2. qtopk_int8_scores / qtopk_hamming_scores: the (n_q, rows) float32 score matrix, -inf where
//      the row is not a candidate (ok[r] == 0: bad or excluded). Register-tiled integer GEMM: a
//      block of THREADS = TY x 16 threads owns QT = 4 TY queries x RT = 64 rows; the d axis is
//      walked in slices of KW 32-bit words (4 bytes of d each) staged in shared memory; each
//      thread keeps 4 x 4 int32 accumulators (queries ty + TY i, rows tx + 16 j).
//   3. selection from the score matrix: qtopk_select (k <= KMAX) keeps one sorted list per
//      (query, row split) in shared memory with the warp-list machinery of topk_common.cuh
//      (the same admission rule and floor as topk.cu's select_tile); the per-split lists are
//      merged by topk.cu's topk_merge_pairs and merged into the state by topk_merge_state.
//      k > KMAX: qtopk_keys writes topk_common's sort keys, the caller sorts each query's keys
//      (CuPy) and topk.cu's topk_keys_decode takes the first k. Both follow the tie rule exactly
//      (score descending, index ascending).
//
// int8 arithmetic. The query codes are signed bytes qc in [-127, 127]; the corpus value is
// u = code + 128 for int8 codes (`signed`) and u = code for uint8 codes, u in [0, 255]. u fits an
// unsigned byte, so every product is taken by the mixed-sign PTX `dp4a.s32.u32` (a: 4 signed
// bytes, b: 4 unsigned bytes, 32-bit signed accumulate), with u's byte computed from the code's
// byte b as
//   uint8 codes: u = b;
//   int8 codes:  u = b ^ 0x80. (c = code in [-128, 127], b = c & 0xff. c >= 0: b = c < 128 and
//                b ^ 0x80 = c + 128. c < 0: b = c + 256 >= 128 and b ^ 0x80 = c + 256 - 128 =
//                c + 128. Either way u = c + 128.)
// so sum_j qc_j u_j comes out of the instruction directly, with no correction term. (With the
// signed x signed __dp4a one would instead use sum qc (c + 128) = dp4a(qc, code) + 128 sum(qc)
// for int8 codes, and code ^ 0x80 read as int8 = u - 128 for uint8 codes.) |qc u| <= 127 * 255,
// so the int32 sum is exact for d < 66,000 (every partial sum is bounded by the same), e.g.
// d = 4096 at most 132,648,960 < 2^31. The score is then computed exactly as the reference's
// float32 path does: float(acc) (round to nearest), times qscale, plus qoffset, each rounded
// (__fmul_rn / __fadd_rn: no contraction into an FMA, so the score is bit-identical to the
// reference's; the contract allows one FMA, we do not take it), divided (__fdiv_rn) by the
// float32-rounded float64 norm with `normalize`. Pad bytes (d not a multiple of 4, the end of a
// slice) are 0 in the query words, so whatever the code word holds there adds nothing.
//
// Hamming: 32-bit words of the packed rows, score n_bits - 2 popcount(q ^ x) converted from a
// 64-bit integer (exact for |score| <= 2^24). Pad bytes are 0 on both sides (loaded as 0).
//
// Rows are C-contiguous with a stride of `ncols` bytes (d or w), so a row is 4-byte aligned only
// when ncols % 4 == 0 (and the base is): those launches read 32-bit words (`word_loads`), the
// others assemble each word from byte loads (tails included).
//
// A faster design (not done: correctness first, and no GPU to measure on): keep the per-query
// lists on chip and select straight from the score tile as topk.cu does (no (n_q, rows) matrix
// in global memory), double-buffer the slices with cp.async, and for int8 use the tensor cores'
// integer MMA (mma.sync m16n8k32 .s8.u8, 4x the dp4a rate on sm_80/sm_90) or, for Hamming,
// 64-bit words with __popcll and wider register tiles (the score tile is then bound by the
// popcount/xor issue rate, not by memory).
//
// UNVERIFIED ON HARDWARE: written on a machine without a GPU; compiled by NVRTC/nvcc only.
// tests/test_cuda_qtopk.py checks it against the reference on a device.
#include "topk_common.cuh"

#ifndef NF_QTOPK_THREADS
#define NF_QTOPK_THREADS 256  // score kernels: TY x 16 threads, QT = 4 TY queries x 64 rows per block
#endif
#ifndef NF_QTOPK_KW
#define NF_QTOPK_KW 16  // 32-bit words of d (4 bytes each) per shared-memory slice
#endif
#ifndef NF_QTOPK_SEL_WARPS
#define NF_QTOPK_SEL_WARPS 4  // qtopk_select: warps per block (one query each)
#endif
#ifndef NF_QTOPK_KMAX
#define NF_QTOPK_KMAX 1024  // largest k of qtopk_select (lists: SEL_WARPS * k * 8 bytes)
#endif
#ifndef NF_QTOPK_NORM_THREADS
#define NF_QTOPK_NORM_THREADS 256  // qtopk_int8_norms: one warp per row
#endif

namespace nf {
namespace qtopk {

constexpr int THREADS = NF_QTOPK_THREADS;
constexpr int TX = 16;            // threads along the rows
constexpr int TY = THREADS / TX;  // threads along the queries
constexpr int QT = 4 * TY;        // queries per block
constexpr int RT = 4 * TX;        // rows per block
constexpr int KW = NF_QTOPK_KW;
constexpr int SEL_WARPS = NF_QTOPK_SEL_WARPS;
constexpr int KMAX = NF_QTOPK_KMAX;

static_assert(THREADS % 32 == 0 && THREADS % TX == 0 && THREADS <= 1024, "whole warps, whole rows of TX");
static_assert(KW >= 1, "at least one word per slice");
static_assert(SEL_WARPS >= 1 && SEL_WARPS <= 32, "qtopk_select: 1..32 warps");
static_assert(KMAX >= 1, "KMAX >= 1");

// Error codes written to *error (cuda_backend._KERNEL_ERRORS).
constexpr int kErrBadK = 1;  // k outside 1..KMAX reached qtopk_select
constexpr int kErrSmem = 2;  // less dynamic shared memory than SEL_WARPS * k * 8 bytes

enum Kind { kInt8 = 0, kHamming = 1 };

NF_DEV unsigned dynamic_smem_bytes() {
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// c + sum over the 4 bytes of a (signed) times b (unsigned).
NF_DEV int dp4a_su(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

template <int KIND>
NF_DEV int word_step(u32 q, u32 x, int acc) {
    if (KIND == kInt8) return dp4a_su(q, x, acc);
    return acc + __popc(q ^ x);
}

// The 32-bit word of row r holding bytes c .. c + 3 (bytes at or past ncols read as 0), before
// the int8 flip. Caller guarantees c < ncols.
NF_DEV u32 load_word(const unsigned char* x, i64 r, i64 ncols, i64 c, bool word_loads) {
    const unsigned char* p = x + r * ncols + c;
    if (word_loads) return *reinterpret_cast<const u32*>(p);  // ncols % 4 == 0, base aligned
    u32 v = p[0];
    if (c + 1 < ncols) v |= static_cast<u32>(p[1]) << 8;
    if (c + 2 < ncols) v |= static_cast<u32>(p[2]) << 16;
    if (c + 3 < ncols) v |= static_cast<u32>(p[3]) << 24;
    return v;
}

struct ScoreArgs {
    const u32* qw;   // (n_q, n_words): query bytes as little-endian words, zero-padded past d
    i64 n_q, n_words;
    const unsigned char* x;  // (rows, ncols) C-contiguous codes of this launch block
    i64 rows, ncols;
    u32 flip;        // int8 codes: 0x80808080 (u = b ^ 0x80); uint8 codes and Hamming: 0
    bool word_loads;
    const float* qscale;   // int8: (n_q,)
    const float* qoffset;  // int8: (n_q,)
    const float* div;      // int8 with normalize: (rows,) float32 norms; else unused
    bool normalize;
    i64 n_bits;            // Hamming
    const unsigned char* ok;  // (rows,) 1: a candidate
    float* out;            // (n_q, ld)
    i64 ld;
};

template <int KIND>
NF_DEV void scores_body(const ScoreArgs& a) {
    __shared__ u32 sq[KW][QT + 1];
    __shared__ u32 sx[KW][RT + 1];
    const int tid = threadIdx.x;
    const int ty = tid / TX, tx = tid % TX;
    const i64 r0 = static_cast<i64>(blockIdx.x) * RT;
    const i64 n_qtiles = (a.n_q + QT - 1) / QT;
    const i64 n_slices = (a.n_words + KW - 1) / KW;

    // Uniform over the block: every thread runs the same trips, so the barriers are safe.
    for (i64 qt = blockIdx.y; qt < n_qtiles; qt += gridDim.y) {
        const i64 q0 = qt * QT;
        int acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0;

        for (i64 s = 0; s < n_slices; ++s) {
            const i64 w0 = s * KW;
            // Lanes take consecutive words of one query / row: contiguous global reads.
            for (int e = tid; e < QT * KW; e += THREADS) {
                const int kw = e % KW, qq = e / KW;
                const i64 q = q0 + qq, w = w0 + kw;
                sq[kw][qq] = (q < a.n_q && w < a.n_words) ? a.qw[q * a.n_words + w] : 0u;
            }
            for (int e = tid; e < RT * KW; e += THREADS) {
                const int kw = e % KW, rr = e / KW;
                const i64 r = r0 + rr, c = (w0 + kw) * 4;
                u32 v = 0u;
                if (r < a.rows && c < a.ncols) v = load_word(a.x, r, a.ncols, c, a.word_loads) ^ a.flip;
                sx[kw][rr] = v;
            }
            __syncthreads();
#pragma unroll 4
            for (int kw = 0; kw < KW; ++kw) {
                u32 qv[4], xv[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) qv[i] = sq[kw][ty + TY * i];
#pragma unroll
                for (int j = 0; j < 4; ++j) xv[j] = sx[kw][tx + TX * j];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = word_step<KIND>(qv[i], xv[j], acc[i][j]);
            }
            __syncthreads();  // the slice buffers are rewritten next
        }

#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const i64 q = q0 + ty + TY * i;
            if (q >= a.n_q) continue;
            float qs = 0.0f, qo = 0.0f;
            if (KIND == kInt8) {
                qs = a.qscale[q];
                qo = a.qoffset[q];
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const i64 r = r0 + tx + TX * j;
                if (r >= a.rows) continue;
                float score;
                if (!a.ok[r]) {
                    score = neg_inf_f();
                } else if (KIND == kInt8) {
                    score = __fadd_rn(__fmul_rn(__int2float_rn(acc[i][j]), qs), qo);
                    if (a.normalize) score = __fdiv_rn(score, a.div[r]);
                } else {
                    score = __ll2float_rn(a.n_bits - 2LL * static_cast<i64>(acc[i][j]));
                }
                a.out[q * a.ld + r] = score;
            }
        }
    }
}

}  // namespace qtopk
}  // namespace nf

using nf::i64;
using nf::u32;
using nf::u64;
using namespace nf::qtopk;

#define NF_QTOPK_SCORE_PARAMS                                                                        \
    const u32 *qw, i64 n_q, i64 n_words, const unsigned char *x, i64 rows, i64 ncols, u32 flip,     \
        i64 word_loads, const float *qscale, const float *qoffset, const float *div, i64 normalize, \
        i64 n_bits, const unsigned char *ok, float *out, i64 ld

#define NF_QTOPK_SCORE_ARGS                                                                            \
    ScoreArgs {                                                                                        \
        qw, n_q, n_words, x, rows, ncols, flip, word_loads != 0, qscale, qoffset, div, normalize != 0, \
            n_bits, ok, out, ld                                                                        \
    }

// Grid: x = row tiles of RT (rows of this launch block), y = query tiles (grid-stride).
extern "C" __global__ void __launch_bounds__(THREADS) qtopk_int8_scores(NF_QTOPK_SCORE_PARAMS) {
    scores_body<kInt8>(NF_QTOPK_SCORE_ARGS);
}

extern "C" __global__ void __launch_bounds__(THREADS) qtopk_hamming_scores(NF_QTOPK_SCORE_PARAMS) {
    scores_body<kHamming>(NF_QTOPK_SCORE_ARGS);
}

// Per row of the launch block (one warp per row, grid-stride): the norm of low + step * u in
// float64 (each term as the reference forms it: step * u, then + low, both rounded in double, no
// contraction), div[r] = that norm rounded to float32, ok[r] = 0 for a zero norm (the reference's
// bad row), which is also reported through first_bad (global row row_base + r).
extern "C" __global__ void __launch_bounds__(NF_QTOPK_NORM_THREADS)
    qtopk_int8_norms(const unsigned char* x, i64 rows, i64 ncols, i64 signed_codes, const float* low,
                     const float* step, i64 row_base, float* div, unsigned char* ok, u64* first_bad) {
    const int lane = threadIdx.x & 31;
    const i64 warps = static_cast<i64>(gridDim.x) * (blockDim.x >> 5);
    for (i64 r = static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
        double acc = 0.0;
        for (i64 c = lane; c < ncols; c += 32) {
            const unsigned char b = x[r * ncols + c];
            const int u = signed_codes ? static_cast<int>(static_cast<signed char>(b)) + 128 : static_cast<int>(b);
            const double v = __dadd_rn(static_cast<double>(low[c]),
                                       __dmul_rn(static_cast<double>(step[c]), static_cast<double>(u)));
            acc = __fma_rn(v, v, acc);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(nf::kFullMask, acc, o);
        if (lane == 0) {
            const bool bad = acc == 0.0;  // a sum of squares is 0 only when every term is
            div[r] = __double2float_rn(sqrt(acc));
            ok[r] = bad ? 0 : 1;
            if (bad) atomicMin(first_bad, static_cast<u64>(row_base + r));
        }
    }
}

// Selection from a (n_q, ld) score matrix over its first `rows` columns: block (bx, split) has
// SEL_WARPS warps, warp w keeping the sorted top-k of query bx * SEL_WARPS + w over the rows
// [split * rows_per_split, ...) in shared memory (list indices: launch rows). A row enters only if
// it beats the list's worst entry once the list is full, else the caller's floor (the state's
// k-th entry, global index): select_tile's rule in topk.cu. Writes (n_splits, n_q, k) lists,
// global indices (row_offset + launch row), empties (-inf, -1).
extern "C" __global__ void __launch_bounds__(SEL_WARPS * 32)
    qtopk_select(const float* scores, i64 n_q, i64 ld, i64 rows, i64 rows_per_split, i64 row_offset,
                 const float* floor_s, const i64* floor_i, i64 k, float* out_s, i64* out_i, int* error) {
    extern __shared__ __align__(16) unsigned char nf_dyn_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (k < 1 || k > KMAX) {  // uniform over the block
        if (threadIdx.x == 0) atomicExch(error, kErrBadK);
        return;
    }
    if (dynamic_smem_bytes() < static_cast<unsigned>(SEL_WARPS) * static_cast<unsigned>(k) * 8u) {
        if (threadIdx.x == 0) atomicExch(error, kErrSmem);
        return;
    }
    const int kk = static_cast<int>(k);
    float* ls = reinterpret_cast<float*>(nf_dyn_smem) + warp * kk;
    int* li = reinterpret_cast<int*>(nf_dyn_smem + sizeof(float) * SEL_WARPS * kk) + warp * kk;
    const i64 q = static_cast<i64>(blockIdx.x) * SEL_WARPS + warp;
    if (q >= n_q) return;  // whole warps; no block-wide barrier follows
    const i64 rb = static_cast<i64>(blockIdx.y) * rows_per_split;
    const i64 re = rb + rows_per_split < rows ? rb + rows_per_split : rows;
    const float fs = floor_s[q];
    const i64 fi = floor_i[q];
    auto beats = [&](float s, int r, int count) -> bool {
        if (count < kk) return nf::ranks_before(s, row_offset + static_cast<i64>(r), fs, fi);
        return nf::ranks_before(s, r, ls[kk - 1], li[kk - 1]);
    };
    const float* row = scores + q * ld;
    int count = 0;
#pragma unroll 1
    for (i64 base = rb; base < re; base += 32) {
        const i64 r = base + lane;
        const float s = r < re ? row[r] : nf::neg_inf_f();
        const bool has = nf::admissible(s) && beats(s, static_cast<int>(r), count);
        count = nf::warp_list_offer(ls, li, count, kk, has, s, static_cast<int>(r), beats);
    }
    __syncwarp();  // the lists were last written by lane 0 of warp_list_insert (which ends synced)
    const i64 out = (static_cast<i64>(blockIdx.y) * n_q + q) * k;
    for (int j = lane; j < kk; j += 32) {
        const bool has = j < count;
        out_s[out + j] = has ? ls[j] : nf::neg_inf_f();
        out_i[out + j] = has ? row_offset + static_cast<i64>(li[j]) : -1;
    }
}

// k > KMAX: one sort key per (query, launch row) of the score matrix (n_q, ld), ld == rows;
// ascending keys are the tie rule, non-candidates (-inf) get the invalid key (sorts last).
extern "C" __global__ void __launch_bounds__(256)
    qtopk_keys(const float* scores, i64 n_q, i64 ld, u64* keys) {
    const i64 total = n_q * ld;
    for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<i64>(gridDim.x) * blockDim.x) {
        const float s = scores[e];
        keys[e] = nf::admissible(s) ? nf::desc_key(s, static_cast<u32>(e % ld)) : nf::invalid_key();
    }
}
