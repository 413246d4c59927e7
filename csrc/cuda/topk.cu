// topk: the masked top-k of a block of queries over a block of corpus rows, with the scores
// computed and selected in one kernel.
//
// Grid: blockIdx.x = a tile of QT queries, blockIdx.y = a split of the rows (rows_per_split, a
// multiple of RT). Each block walks its rows in tiles of RT:
//   1. scores of the QT x RT tile, accumulated in registers over d in slices of BK, the slices
//      double-buffered in shared memory (float32 corpus: FP32 FMA register tiles; float16 corpus:
//      tensor cores, mma.sync m16n8k16 with float32 accumulation);
//   2. the tile's scores go to a shared-memory tile (aliasing the slice buffers, so they never
//      reach global memory), with each row's norm, taken from the same slices;
//   3. one warp per query offers the tile's scores to the query's sorted top-k list in shared
//      memory (topk_common.cuh); a row is a candidate only if it beats the list's worst entry (or,
//      while the list is not full, the caller's k-th entry: `floor`).
// Each block writes its lists, (n_splits, n_q, k); topk_merge_pairs halves the number of lists
// until one is left and topk_merge_state merges it into the caller's running top-k.
//
// For k above KMAX the lists would not fit on chip: the `keys` kernels run steps 1-2 and write
// one sort key per (query, row) instead (the honest two-phase path), sorted by the caller.
//
// Scores follow the reference (numpy_backend.topk_update): q . x, divided by the float32 norm of
// x with `normalize`. A row whose norm is not finite (or is zero with `normalize`) is never a
// candidate, and the smallest such global row is reported through first_bad (atomicMin). Rows in
// the sorted `exclude` list are never candidates. Every (query, row) score is computed by the same
// instructions in the same order wherever the row sits in a tile, so exact duplicate rows score
// bit-identically and the tie rule orders them by index.
//
// float16 corpus: each query is scaled by a power of two (exact) and split into float16 hi + lo
// parts on the host (NF_TOPK_F16_SPLIT=1, the default), so q . x is accurate to about 2^-22
// relative instead of the 2^-11 of a float16 query; two MMAs per product. NF_TOPK_F16_SPLIT=0
// uses the hi part only (half the tensor work; scores then differ from float32 by ~1e-4).
//
// UNVERIFIED ON HARDWARE: written and compiled (PTX, sm_80/sm_90) on a machine without a GPU, and
// run only on a CPU emulation of CUDA (fibers, randomised barrier order, mma.sync emulated from the
// PTX ISA's fragment layouts for m16n8k16 .row.col). tests/test_cuda.py checks everything against
// the float64 reference on a device.
#include "topk_common.cuh"

// Launch widths. These defaults let `nvcc -ptx` compile the file alone; the values actually used
// come from the one table in nudgefast/_backends/cuda_backend.py (LAUNCH["TOPK"]) through -D.
#ifndef NF_TOPK_THREADS
#define NF_TOPK_THREADS 256
#endif
#ifndef NF_TOPK_QT
#define NF_TOPK_QT 64  // queries per block
#endif
#ifndef NF_TOPK_RT
#define NF_TOPK_RT 128  // corpus rows per tile
#endif
#ifndef NF_TOPK_BK_F32
#define NF_TOPK_BK_F32 16  // d per shared-memory slice, float32 corpus
#endif
#ifndef NF_TOPK_BK_F16
#define NF_TOPK_BK_F16 32  // d per shared-memory slice, float16 corpus (a multiple of 16)
#endif
#ifndef NF_TOPK_F16_WARPS_Q
#define NF_TOPK_F16_WARPS_Q 2  // float16: warps along the queries of the tile (the rest along rows)
#endif
#ifndef NF_TOPK_F16_SPLIT
#define NF_TOPK_F16_SPLIT 1
#endif
#ifndef NF_TOPK_KMAX
#define NF_TOPK_KMAX 128  // largest k of the fused path (the lists take QT * k * 8 bytes)
#endif
#ifndef NF_TOPK_MIN_BLOCKS
#define NF_TOPK_MIN_BLOCKS 1  // __launch_bounds__ minimum blocks per multiprocessor (caps registers)
#endif
#ifndef NF_MERGE_THREADS
#define NF_MERGE_THREADS 256
#endif

namespace nf {
namespace topk {

constexpr int THREADS = NF_TOPK_THREADS;
constexpr int NWARPS = THREADS / 32;
constexpr int QT = NF_TOPK_QT;
constexpr int RT = NF_TOPK_RT;
constexpr int KMAX = NF_TOPK_KMAX;
constexpr bool F16_SPLIT = NF_TOPK_F16_SPLIT != 0;
constexpr int SP = RT + 4;  // padded row of the score tile (floats; keeps 16-byte alignment)

static_assert(THREADS % 32 == 0, "whole warps");
static_assert(RT % 32 == 0, "the selection reads a tile row in warp-wide steps");
static_assert(THREADS >= RT && THREADS >= QT, "one thread per tile row and per tile query for the per-row work");
static_assert(QT % 16 == 0 && RT % 8 == 0, "tiles are whole MMA fragments");

enum Mode { kSelect = 0, kKeys = 1 };

// Error codes written to *error (0: none).
constexpr int kErrBadK = 1;     // k < 1 or k > KMAX in select mode
constexpr int kErrSmem = 2;     // the launch gave less dynamic shared memory than QT * k * 8 bytes

struct Problem {
    // Queries, prepared on the host and zero-padded to n_q_pad (multiple of QT) x d_pad (multiple of BK).
    const float* qT;      // float32 corpus: (d_pad, n_q_pad), transposed
    const u16* qhi;       // float16 corpus: (n_q_pad, d_pad) float16 bits, hi part of the scaled query
    const u16* qlo;       // ... lo part (unused when NF_TOPK_F16_SPLIT=0)
    const float* qscale;  // float16 corpus: (n_q_pad,) the power of two undoing the scaling; null: 1
    i64 n_q, n_q_pad, d, d_pad;
    // Corpus rows of this launch: row r (0 <= r < m) is global row row_offset + r.
    const void* x;
    i64 m, row_stride;  // elements between consecutive rows (each row contiguous)
    const i64* exclude;  // sorted; entry e excludes launch row exclude[e] - exclude_base
    i64 n_exclude, exclude_base;
    bool normalize;
    i64 row_offset, rows_per_split;
    // Select mode.
    const float* floor_s;  // (n_q,) the caller's k-th entry (-inf / kEmptyIndex when not full), or null
    const i64* floor_i;
    i64 k;
    float* out_s;  // (n_splits, n_q, k)
    i64* out_i;
    // Keys mode.
    u64* keys;  // (n_q, keys_ld), column = launch row
    i64 keys_ld;
    u64* first_bad;  // min over bad global rows; ULLONG_MAX when none
    int* error;
};

// Per-tile bookkeeping in shared memory.
struct Aux {
    float div[RT];  // per tile row: the norm (normalize) or 1
    int ok[RT];     // per tile row: 1 if the row is a candidate
    int count[QT];  // entries in each query's list
    float floor_s[QT];
    i64 floor_i[QT];
    float qscale[QT];
    i64 ex_cursor;  // first exclude entry not yet consumed
};

NF_DEV unsigned dynamic_smem_bytes() {
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

NF_DEV float load_elem(const float* x, i64 i) { return x[i]; }
NF_DEV float load_elem(const u16* x, i64 i) { return half_bits_to_float(x[i]); }

// The sum of squares of one row in double, read again from global memory: only for rows whose
// float32 sum was not a normal positive finite number (zero, overflow, underflow, NaN/inf), so the
// bad-row verdict is the reference's (a float64 norm) and not an artefact of float32 range.
template <typename T>
NF_DEV double row_sumsq_f64(const T* x, i64 row, i64 stride, i64 d) {
    double acc = 0.0;
    for (i64 c = 0; c < d; ++c) {
        const double v = load_elem(x, row * stride + c);
        acc = fma(v, v, acc);
    }
    return acc;
}

// ---------------------------------------------------------------------------------------------
// Score tiles, float32 corpus: FP32 FMA. Thread (ty, tx) owns queries ty*4 + i (i < 4) and rows
// tx*4 + j and RT/2 + tx*4 + j (j < 4); both operands are read from k-major slices as float4.

struct GemmF32 {
    typedef float T;
    static constexpr int BK = NF_TOPK_BK_F32;
    static constexpr int TX = RT / 8;
    static constexpr int TY = THREADS / TX;
    static constexpr int XP = RT + 4;  // padded k-major corpus slice row
    static_assert(TY * 4 == QT, "float32 tile: THREADS / (RT / 8) * 4 must equal QT");
    static_assert(BK % 4 == 0, "float32 slices are whole float4 along d");

    union __align__(16) Smem {
        struct {
            float q[2][BK][QT];
            float x[2][BK][XP];
        } g;
        float st[QT][SP];
    };

    // Loads per slice and per thread (the last round may leave threads idle).
    static constexpr int QN = QT * BK / 4, QV = (QN + THREADS - 1) / THREADS;  // float4 of queries
    static constexpr int XN = RT * BK, XS = (XN + THREADS - 1) / THREADS;     // corpus values
    static constexpr int XV = (XN / 4 + THREADS - 1) / THREADS;                 // float4 of corpus

    struct Stage {
        float4 q[QV];
        float x[XS > 4 * XV ? XS : 4 * XV];
    };

    float acc[4][8];

    NF_DEV GemmF32() {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    }

    // Global -> registers: slice s of the queries q0.. and of the tile rows r0.. (rows >= re and
    // columns >= d read as zero, so they add nothing).
    template <bool VEC>
    NF_DEV static void load(Stage& st, const Problem& p, i64 q0, i64 r0, i64 re, int s) {
        const int tid = threadIdx.x;
        const i64 k0 = static_cast<i64>(s) * BK;
#pragma unroll
        for (int v = 0; v < QV; ++v) {
            const int e = tid + v * THREADS;
            if (QN % THREADS != 0 && e >= QN) break;
            const int kr = e / (QT / 4), qv = e % (QT / 4);
            st.q[v] = *reinterpret_cast<const float4*>(p.qT + (k0 + kr) * p.n_q_pad + q0 + qv * 4);
        }
        const float* x = static_cast<const float*>(p.x);
        if (VEC) {  // rows 16-byte aligned and d % 4 == 0: a float4 never crosses d
#pragma unroll
            for (int v = 0; v < XV; ++v) {
                const int e = tid + v * THREADS;
                if ((XN / 4) % THREADS != 0 && e >= XN / 4) break;
                const int r = e % RT, kv = e / RT;
                const i64 row = r0 + r, c = k0 + kv * 4;
                float4 val = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (row < re && c < p.d) val = *reinterpret_cast<const float4*>(x + row * p.row_stride + c);
                st.x[v * 4 + 0] = val.x;
                st.x[v * 4 + 1] = val.y;
                st.x[v * 4 + 2] = val.z;
                st.x[v * 4 + 3] = val.w;
            }
        } else {
#pragma unroll
            for (int v = 0; v < XS; ++v) {
                const int e = tid + v * THREADS;
                if (XN % THREADS != 0 && e >= XN) break;
                const int r = e % RT, kk = e / RT;
                const i64 row = r0 + r, c = k0 + kk;
                st.x[v] = (row < re && c < p.d) ? x[row * p.row_stride + c] : 0.0f;
            }
        }
    }

    // Registers -> slice buffer `buf`, corpus transposed to k-major (lanes take consecutive rows:
    // conflict-free stores).
    template <bool VEC>
    NF_DEV static void store(const Stage& st, Smem& sm, int buf) {
        const int tid = threadIdx.x;
#pragma unroll
        for (int v = 0; v < QV; ++v) {
            const int e = tid + v * THREADS;
            if (QN % THREADS != 0 && e >= QN) break;
            const int kr = e / (QT / 4), qv = e % (QT / 4);
            *reinterpret_cast<float4*>(&sm.g.q[buf][kr][qv * 4]) = st.q[v];
        }
        if (VEC) {
#pragma unroll
            for (int v = 0; v < XV; ++v) {
                const int e = tid + v * THREADS;
                if ((XN / 4) % THREADS != 0 && e >= XN / 4) break;
                const int r = e % RT, kv = e / RT;
#pragma unroll
                for (int i = 0; i < 4; ++i) sm.g.x[buf][kv * 4 + i][r] = st.x[v * 4 + i];
            }
        } else {
#pragma unroll
            for (int v = 0; v < XS; ++v) {
                const int e = tid + v * THREADS;
                if (XN % THREADS != 0 && e >= XN) break;
                sm.g.x[buf][e / RT][e % RT] = st.x[v];
            }
        }
    }

    NF_DEV void compute(const Smem& sm, int buf) {
        const int ty = threadIdx.x / TX, tx = threadIdx.x % TX;
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const float4 a = *reinterpret_cast<const float4*>(&sm.g.q[buf][kk][ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&sm.g.x[buf][kk][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&sm.g.x[buf][kk][RT / 2 + tx * 4]);
            const float av[4] = {a.x, a.y, a.z, a.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
    }

    // Sum of squares of tile row `r` over the slice, in d order.
    NF_DEV static float sumsq(const Smem& sm, int buf, int r, float ss) {
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const float v = sm.g.x[buf][kk][r];
            ss = fmaf(v, v, ss);
        }
        return ss;
    }

    NF_DEV void store_tile(Smem& sm) const {
        const int ty = threadIdx.x / TX, tx = threadIdx.x % TX;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            *reinterpret_cast<float4*>(&sm.st[ty * 4 + i][tx * 4]) =
                make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
            *reinterpret_cast<float4*>(&sm.st[ty * 4 + i][RT / 2 + tx * 4]) =
                make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
        }
    }
};

// ---------------------------------------------------------------------------------------------
// Score tiles, float16 corpus: tensor cores. Warp (wq, wr) owns an MQ x MR block of the tile as
// FQ x FR fragments of mma.m16n8k16 (A = queries, row-major; B = corpus rows, i.e. column-major
// B^T; float32 accumulators). Fragment layouts, PTX ISA "Matrix Fragments for mma.m16n8k16":
// with g = lane / 4, t = lane % 4,
//   A (16 x 16): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16 x 8):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16 x 8):  c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1)
// Pairs of float16 along k are one 32-bit load (little-endian: the lower k in the low half).

NF_DEV void mma_16816(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    // m16n8k16 needs sm_80; the Python side never launches the float16 kernels on older devices
    // (it converts float16 chunks to float32 there), so reaching this is a bug: fail loudly.
    __trap();
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

struct GemmF16 {
    typedef u16 T;
    static constexpr int BK = NF_TOPK_BK_F16;
    static constexpr int BP = BK + 8;  // padded slice row (halves): fragment loads conflict-free
    static constexpr int WQ = NF_TOPK_F16_WARPS_Q;
    static constexpr int WR = NWARPS / WQ;
    static constexpr int MQ = QT / WQ, MR = RT / WR;
    static constexpr int FQ = MQ / 16, FR = MR / 8;
    static_assert(BK % 16 == 0, "float16 slices are whole k16 steps");
    static_assert(NWARPS % WQ == 0 && QT % (WQ * 16) == 0 && RT % (WR * 8) == 0, "float16 warp grid must tile QT x RT");


    union __align__(16) Smem {
        struct {
            u16 qh[2][QT][BP];
            u16 ql[2][F16_SPLIT ? QT : 1][BP];
            u16 x[2][RT][BP];
        } g;
        float st[QT][SP];
    };

    // Loads per slice and per thread (the last round may leave threads idle).
    static constexpr int QN = QT * BK / 8, QV = (QN + THREADS - 1) / THREADS;  // 16 bytes of queries (each part)
    static constexpr int XN = RT * BK, XS = (XN + THREADS - 1) / THREADS;     // corpus values
    static constexpr int XV = (XN / 8 + THREADS - 1) / THREADS;                 // 16 bytes of corpus

    struct Stage {
        uint4 qh[QV];
        uint4 ql[QV];
        uint4 xv[XV];
        u16 xs[XS];
    };

    float acc[FQ][FR][4];

    NF_DEV GemmF16() {
#pragma unroll
        for (int i = 0; i < FQ; ++i)
#pragma unroll
            for (int j = 0; j < FR; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;
    }

    template <bool VEC>
    NF_DEV static void load(Stage& st, const Problem& p, i64 q0, i64 r0, i64 re, int s) {
        const int tid = threadIdx.x;
        const i64 k0 = static_cast<i64>(s) * BK;
#pragma unroll
        for (int v = 0; v < QV; ++v) {
            const int e = tid + v * THREADS;
            if (QN % THREADS != 0 && e >= QN) break;
            const int row = e / (BK / 8), kv = e % (BK / 8);
            const i64 off = (q0 + row) * p.d_pad + k0 + kv * 8;
            st.qh[v] = *reinterpret_cast<const uint4*>(p.qhi + off);
            if (F16_SPLIT) st.ql[v] = *reinterpret_cast<const uint4*>(p.qlo + off);
        }
        const u16* x = static_cast<const u16*>(p.x);
        if (VEC) {  // rows 16-byte aligned and d % 8 == 0
#pragma unroll
            for (int v = 0; v < XV; ++v) {
                const int e = tid + v * THREADS;
                if ((XN / 8) % THREADS != 0 && e >= XN / 8) break;
                const int r = e / (BK / 8), kv = e % (BK / 8);
                const i64 row = r0 + r, c = k0 + kv * 8;
                uint4 val = make_uint4(0u, 0u, 0u, 0u);
                if (row < re && c < p.d) val = *reinterpret_cast<const uint4*>(x + row * p.row_stride + c);
                st.xv[v] = val;
            }
        } else {
#pragma unroll
            for (int v = 0; v < XS; ++v) {
                const int e = tid + v * THREADS;
                if (XN % THREADS != 0 && e >= XN) break;
                const int r = e / BK, kk = e % BK;
                const i64 row = r0 + r, c = k0 + kk;
                st.xs[v] = (row < re && c < p.d) ? x[row * p.row_stride + c] : static_cast<u16>(0);
            }
        }
    }

    template <bool VEC>
    NF_DEV static void store(const Stage& st, Smem& sm, int buf) {
        const int tid = threadIdx.x;
#pragma unroll
        for (int v = 0; v < QV; ++v) {
            const int e = tid + v * THREADS;
            if (QN % THREADS != 0 && e >= QN) break;
            const int row = e / (BK / 8), kv = e % (BK / 8);
            *reinterpret_cast<uint4*>(&sm.g.qh[buf][row][kv * 8]) = st.qh[v];
            if (F16_SPLIT) *reinterpret_cast<uint4*>(&sm.g.ql[buf][row][kv * 8]) = st.ql[v];
        }
        if (VEC) {
#pragma unroll
            for (int v = 0; v < XV; ++v) {
                const int e = tid + v * THREADS;
                if ((XN / 8) % THREADS != 0 && e >= XN / 8) break;
                *reinterpret_cast<uint4*>(&sm.g.x[buf][e / (BK / 8)][(e % (BK / 8)) * 8]) = st.xv[v];
            }
        } else {
#pragma unroll
            for (int v = 0; v < XS; ++v) {
                const int e = tid + v * THREADS;
                if (XN % THREADS != 0 && e >= XN) break;
                sm.g.x[buf][e / BK][e % BK] = st.xs[v];
            }
        }
    }

    NF_DEV static u32 pair(const u16* row, int c) { return *reinterpret_cast<const u32*>(row + c); }

    NF_DEV void compute(const Smem& sm, int buf) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const int wq = warp / WR, wr = warp % WR;
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            u32 ah[FQ][4], al[FQ][4], b[FR][2];
#pragma unroll
            for (int fq = 0; fq < FQ; ++fq) {
                const int q = wq * MQ + fq * 16 + g;
                ah[fq][0] = pair(sm.g.qh[buf][q], kk + 2 * t);
                ah[fq][1] = pair(sm.g.qh[buf][q + 8], kk + 2 * t);
                ah[fq][2] = pair(sm.g.qh[buf][q], kk + 2 * t + 8);
                ah[fq][3] = pair(sm.g.qh[buf][q + 8], kk + 2 * t + 8);
                if (F16_SPLIT) {
                    al[fq][0] = pair(sm.g.ql[buf][q], kk + 2 * t);
                    al[fq][1] = pair(sm.g.ql[buf][q + 8], kk + 2 * t);
                    al[fq][2] = pair(sm.g.ql[buf][q], kk + 2 * t + 8);
                    al[fq][3] = pair(sm.g.ql[buf][q + 8], kk + 2 * t + 8);
                }
            }
#pragma unroll
            for (int fr = 0; fr < FR; ++fr) {
                const int n = wr * MR + fr * 8 + g;
                b[fr][0] = pair(sm.g.x[buf][n], kk + 2 * t);
                b[fr][1] = pair(sm.g.x[buf][n], kk + 2 * t + 8);
            }
#pragma unroll
            for (int fq = 0; fq < FQ; ++fq)
#pragma unroll
                for (int fr = 0; fr < FR; ++fr) {
                    mma_16816(acc[fq][fr], ah[fq], b[fr]);
                    if (F16_SPLIT) mma_16816(acc[fq][fr], al[fq], b[fr]);
                }
        }
    }

    NF_DEV static float sumsq(const Smem& sm, int buf, int r, float ss) {
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const float v = half_bits_to_float(sm.g.x[buf][r][kk]);
            ss = fmaf(v, v, ss);
        }
        return ss;
    }

    NF_DEV void store_tile(Smem& sm) const {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const int wq = warp / WR, wr = warp % WR;
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int fq = 0; fq < FQ; ++fq)
#pragma unroll
            for (int fr = 0; fr < FR; ++fr) {
                const int q = wq * MQ + fq * 16 + g;
                const int r = wr * MR + fr * 8 + 2 * t;
                *reinterpret_cast<float2*>(&sm.st[q][r]) = make_float2(acc[fq][fr][0], acc[fq][fr][1]);
                *reinterpret_cast<float2*>(&sm.st[q + 8][r]) = make_float2(acc[fq][fr][2], acc[fq][fr][3]);
            }
    }
};

// ---------------------------------------------------------------------------------------------
// The parts shared by both corpus types.

// Marks the tile's excluded rows (aux.ok = 0), consuming the sorted exclude list from
// aux.ex_cursor. Each round looks at the next THREADS entries; those below the tile's end form a
// prefix (the list is sorted), so their count advances the cursor. Repeated entries are fine.
// Called by the whole block; ends with a barrier.
NF_DEV void mark_excluded(const Problem& p, Aux& aux, i64 r0) {
    const i64 tile_end = r0 + RT;
    for (;;) {
        const i64 c = aux.ex_cursor;
        const i64 e = c + threadIdx.x;
        bool in_tile = false;
        if (e < p.n_exclude) {
            const i64 r = p.exclude[e] - p.exclude_base;
            in_tile = r < tile_end;
            if (in_tile && r >= r0) aux.ok[r - r0] = 0;
        }
        const int n = __syncthreads_count(in_tile);
        if (threadIdx.x == 0) aux.ex_cursor = c + n;
        __syncthreads();
        if (n < THREADS) break;
    }
}

// The score of (tile query ql, tile row t), as the reference computes it; -inf when the row is not
// a candidate.
template <typename Smem>
NF_DEV float tile_score(const Smem& sm, const Aux& aux, int ql, int t) {
    if (!aux.ok[t]) return neg_inf_f();
    return __fdiv_rn(sm.st[ql][t] * aux.qscale[ql], aux.div[t]);
}

// One warp per query: offer the tile's rows to the query's list.
template <typename Smem>
NF_DEV void select_tile(const Problem& p, const Smem& sm, Aux& aux, float* list_s, int* list_i, int k, i64 r0,
                        int n_qv) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int ql = warp; ql < n_qv; ql += NWARPS) {
        float* ls = list_s + ql * k;
        int* li = list_i + ql * k;
        const float fs = aux.floor_s[ql];
        const i64 fi = aux.floor_i[ql];
        const i64 row_offset = p.row_offset;
        // Admission: beat the worst entry of a full list, else the caller's k-th entry (which every
        // listed entry already beats). List indices are launch rows (int); the floor is global.
        auto beats = [&](float s, int r, int count) -> bool {
            if (count < k) return ranks_before(s, row_offset + static_cast<i64>(r), fs, fi);
            return ranks_before(s, r, ls[k - 1], li[k - 1]);
        };
        int count = aux.count[ql];
#pragma unroll 1
        for (int c = 0; c < RT / 32; ++c) {
            const int t = c * 32 + lane;
            const int r = static_cast<int>(r0) + t;
            const float s = tile_score(sm, aux, ql, t);
            const bool has = admissible(s) && beats(s, r, count);
            count = warp_list_offer(ls, li, count, k, has, s, r, beats);
        }
        __syncwarp();  // every lane read aux.count[ql] above; with no insertion nothing ordered it
        if (lane == 0) aux.count[ql] = count;
    }
}

template <typename Smem>
NF_DEV void write_keys(const Problem& p, const Smem& sm, const Aux& aux, i64 q0, int n_qv, i64 r0, i64 re) {
    for (int e = threadIdx.x; e < QT * RT; e += THREADS) {
        const int ql = e / RT, t = e % RT;
        const i64 row = r0 + t;
        if (ql >= n_qv || row >= re) continue;
        const float s = tile_score(sm, aux, ql, t);
        p.keys[(q0 + ql) * p.keys_ld + row] = admissible(s) ? desc_key(s, static_cast<u32>(row)) : nf::invalid_key();
    }
}

template <typename G, int MODE, bool VEC>
NF_DEV void topk_body(const Problem& p, typename G::Smem& sm, Aux& aux, unsigned char* dyn) {
    typedef typename G::T T;
    const int tid = threadIdx.x;
    const i64 q0 = static_cast<i64>(blockIdx.x) * QT;
    const int n_qv = static_cast<int>(p.n_q - q0 < QT ? p.n_q - q0 : QT);
    const i64 rb = static_cast<i64>(blockIdx.y) * p.rows_per_split;
    const i64 re = rb + p.rows_per_split < p.m ? rb + p.rows_per_split : p.m;
    const int k = static_cast<int>(p.k);

    if (MODE == kSelect) {
        // Uniform over the block, before any barrier.
        if (p.k < 1 || p.k > KMAX) {
            if (tid == 0) atomicExch(p.error, kErrBadK);
            return;
        }
        if (dynamic_smem_bytes() < static_cast<unsigned>(QT) * static_cast<unsigned>(k) * 8u) {
            if (tid == 0) atomicExch(p.error, kErrSmem);
            return;
        }
    }
    float* list_s = reinterpret_cast<float*>(dyn);
    int* list_i = reinterpret_cast<int*>(dyn + sizeof(float) * QT * (MODE == kSelect ? k : 0));

    if (tid < QT) {
        const i64 q = q0 + tid;
        aux.count[tid] = 0;
        const bool has_floor = MODE == kSelect && p.floor_s != nullptr && q < p.n_q;
        aux.floor_s[tid] = has_floor ? p.floor_s[q] : neg_inf_f();
        aux.floor_i[tid] = has_floor ? p.floor_i[q] : kEmptyIndex;
        aux.qscale[tid] = p.qscale != nullptr ? p.qscale[q] : 1.0f;  // qscale is padded to n_q_pad
    }
    if (tid == 0) {  // first exclude entry at or after this block's first row
        i64 lo = 0, hi = p.n_exclude;
        while (lo < hi) {
            const i64 mid = (lo + hi) >> 1;
            if (p.exclude[mid] - p.exclude_base < rb) lo = mid + 1;
            else hi = mid;
        }
        aux.ex_cursor = lo;
    }
    __syncthreads();

    const T* x = static_cast<const T*>(p.x);
    const int n_slices = static_cast<int>(p.d_pad / G::BK);
    const bool reports_bad = blockIdx.x == 0;  // every query tile sees the same rows: report once
    const float flt_min_normal = bits_float(0x00800000u);

    for (i64 r0 = rb; r0 < re; r0 += RT) {
        G gemm;
        typename G::Stage stage;
        float ss = 0.0f;  // thread tid < RT: sum of squares of tile row tid, in d order
        G::template load<VEC>(stage, p, q0, r0, re, 0);
        G::template store<VEC>(stage, sm, 0);
        __syncthreads();
        for (int s = 0; s < n_slices; ++s) {
            const int buf = s & 1;
            if (s + 1 < n_slices) G::template load<VEC>(stage, p, q0, r0, re, s + 1);
            gemm.compute(sm, buf);
            if (tid < RT) ss = G::sumsq(sm, buf, tid, ss);
            // buf ^ 1 was last read in iteration s - 1, which every thread finished (barrier below).
            if (s + 1 < n_slices) G::template store<VEC>(stage, sm, buf ^ 1);
            __syncthreads();
        }
        gemm.store_tile(sm);  // the score tile aliases the slice buffers: all reads ended at the barrier

        if (tid < RT) {
            const i64 row = r0 + tid;
            float div = 1.0f;
            int ok = 0;
            if (row < re) {
                float norm;
                bool bad;
                if (ss >= flt_min_normal && ss < pos_inf_f()) {
                    norm = __fsqrt_rn(ss);
                    bad = false;
                } else {
                    const double acc = row_sumsq_f64(x, row, p.row_stride, p.d);
                    bad = !is_finite(acc) || (p.normalize && acc == 0.0);
                    norm = static_cast<float>(sqrt(acc));
                }
                if (bad && reports_bad) atomicMin(p.first_bad, static_cast<u64>(p.row_offset + row));
                ok = bad ? 0 : 1;
                div = p.normalize ? norm : 1.0f;
            }
            aux.div[tid] = div;
            aux.ok[tid] = ok;
        }
        __syncthreads();
        mark_excluded(p, aux, r0);  // ends with a barrier: st, div and ok are complete
        if (MODE == kSelect) select_tile(p, sm, aux, list_s, list_i, k, r0, n_qv);
        else write_keys(p, sm, aux, q0, n_qv, r0, re);
        __syncthreads();  // st and aux are rewritten by the next tile
    }

    if (MODE == kSelect) {
        const int warp = tid >> 5, lane = tid & 31;
        for (int ql = warp; ql < n_qv; ql += NWARPS) {
            const int count = aux.count[ql];
            const i64 base = (static_cast<i64>(blockIdx.y) * p.n_q + q0 + ql) * p.k;
            for (int j = lane; j < k; j += 32) {
                const bool has = j < count;
                p.out_s[base + j] = has ? list_s[ql * k + j] : neg_inf_f();
                p.out_i[base + j] = has ? p.row_offset + list_i[ql * k + j] : -1;
            }
        }
    }
}

}  // namespace topk
}  // namespace nf

using nf::i64;
using nf::u16;
using nf::u64;
using namespace nf::topk;

// ---------------------------------------------------------------------------------------------
// Entry points: {select, keys} x {f32, f16} x {element loads, _vec: 16-byte loads}. The _vec
// kernels need rows 16-byte aligned and d a multiple of the 16-byte width (4 floats, 8 halves);
// separate kernels so each loader gets its own register allocation.

#define NF_TOPK_PARAMS                                                                                     \
    const float *qT, const u16 *qhi, const u16 *qlo, const float *qscale, i64 n_q, i64 n_q_pad, i64 d,    \
        i64 d_pad, const void *x, i64 m, i64 row_stride, const i64 *exclude, i64 n_exclude,               \
        i64 exclude_base, i64 normalize, i64 row_offset, i64 rows_per_split, const float *floor_s,         \
        const i64 *floor_i, i64 k, float *out_s, i64 *out_i, u64 *keys, i64 keys_ld, u64 *first_bad,       \
        int *error

#define NF_TOPK_KERNEL(NAME, GEMM, MODE, VEC)                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS, NF_TOPK_MIN_BLOCKS) NAME(NF_TOPK_PARAMS) {  \
        __shared__ GEMM::Smem sm;                                                                     \
        __shared__ Aux aux;                                                                           \
        extern __shared__ __align__(16) unsigned char nf_dyn_smem[];                                  \
        const Problem p{qT,      qhi,       qlo,          qscale,         n_q,        n_q_pad,        \
                        d,       d_pad,     x,            m,              row_stride, exclude,        \
                        n_exclude, exclude_base, normalize != 0, row_offset, rows_per_split,          \
                        floor_s, floor_i,   k,            out_s,          out_i,      keys,           \
                        keys_ld, first_bad, error};                                                   \
        nf::topk::topk_body<GEMM, MODE, VEC>(p, sm, aux, nf_dyn_smem);                                \
    }

NF_TOPK_KERNEL(topk_select_f32, GemmF32, kSelect, false)
NF_TOPK_KERNEL(topk_select_f32_vec, GemmF32, kSelect, true)
NF_TOPK_KERNEL(topk_select_f16, GemmF16, kSelect, false)
NF_TOPK_KERNEL(topk_select_f16_vec, GemmF16, kSelect, true)
NF_TOPK_KERNEL(topk_keys_f32, GemmF32, kKeys, false)
NF_TOPK_KERNEL(topk_keys_f32_vec, GemmF32, kKeys, true)
NF_TOPK_KERNEL(topk_keys_f16, GemmF16, kKeys, false)
NF_TOPK_KERNEL(topk_keys_f16_vec, GemmF16, kKeys, true)

// Merges sorted lists pairwise: list j of the output (n_lists + 1) / 2 lists is the top-k of
// input lists 2j and 2j + 1 (list 2j alone when it has no partner). Lists are (n_lists, n_q, k),
// disjoint in records. One thread per output entry (merge path: O(log k) each).
extern "C" __global__ void __launch_bounds__(NF_MERGE_THREADS)
    topk_merge_pairs(const float* in_s, const i64* in_i, i64 n_lists, i64 n_q, i64 k, float* out_s, i64* out_i) {
    const i64 n_out = (n_lists + 1) / 2;
    const i64 total = n_out * n_q * k;
    for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<i64>(gridDim.x) * blockDim.x) {
        const i64 pos = e % k, q = (e / k) % n_q, j = e / (k * n_q);
        const i64 a = ((2 * j) * n_q + q) * k;
        float s;
        i64 i;
        if (2 * j + 1 < n_lists) {
            const i64 b = ((2 * j + 1) * n_q + q) * k;
            nf::merge_path_entry(in_s + a, in_i + a, k, in_s + b, in_i + b, k, pos, &s, &i);
        } else {
            s = in_s[a + pos];
            i = in_i[a + pos];
        }
        out_s[e] = s;
        out_i[e] = i;
    }
}

// The caller's running top-k `a` merged with a chunk's top-k `b` (both (n_q, k), sorted) into
// `out`. The same record on both sides (equal score and index: a chunk merged twice) is kept once,
// as in the CPU backend. -inf entries are empty slots: (-inf, -1). One thread per query.
extern "C" __global__ void __launch_bounds__(NF_MERGE_THREADS)
    topk_merge_state(const float* a_s, const i64* a_i, const float* b_s, const i64* b_i, i64 n_q, i64 k,
                     float* out_s, i64* out_i) {
    for (i64 q = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; q < n_q;
         q += static_cast<i64>(gridDim.x) * blockDim.x) {
        const float* as = a_s + q * k;
        const i64* ai = a_i + q * k;
        const float* bs = b_s + q * k;
        const i64* bi = b_i + q * k;
        float* os = out_s + q * k;
        i64* oi = out_i + q * k;
        i64 ia = 0, ib = 0, n = 0, last = -1;
        while (n < k) {
            const bool va = ia < k && ai[ia] >= 0 && nf::admissible(as[ia]);
            const bool vb = ib < k && bi[ib] >= 0 && nf::admissible(bs[ib]);
            if (!va && !vb) break;
            const bool take_a = va && (!vb || !nf::ranks_before(bs[ib], bi[ib], as[ia], ai[ia]));
            const float s = take_a ? as[ia] : bs[ib];
            const i64 i = take_a ? ai[ia] : bi[ib];
            if (take_a) ++ia;
            else ++ib;
            if (i == last) continue;
            os[n] = s;
            oi[n] = i;
            last = i;
            ++n;
        }
        for (; n < k; ++n) {
            os[n] = nf::neg_inf_f();
            oi[n] = -1;
        }
    }
}

// Two-phase path: the first `width` columns of each query's sorted keys (n_q, ld) as a top-k
// (n_q, k); launch row r is global row row_offset + r.
extern "C" __global__ void __launch_bounds__(NF_MERGE_THREADS)
    topk_keys_decode(const u64* keys, i64 n_q, i64 ld, i64 width, i64 k, i64 row_offset, float* out_s, i64* out_i) {
    const i64 total = n_q * k;
    for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<i64>(gridDim.x) * blockDim.x) {
        const i64 q = e / k, j = e % k;
        const u64 key = j < width ? keys[q * ld + j] : nf::invalid_key();
        const bool has = key != nf::invalid_key();
        out_s[e] = has ? nf::key_score(key) : nf::neg_inf_f();
        out_i[e] = has ? row_offset + static_cast<i64>(nf::key_row(key)) : -1;
    }
}
