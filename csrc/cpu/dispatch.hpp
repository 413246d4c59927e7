// Runtime instruction-set dispatch: the kernels' inner loops exist once per level, each compiled
// with its own flags (csrc/cpu/kernels/*.cpp, once per level: see setup.py), and the best level
// this CPU and OS support is chosen when the module is imported.
//
// Levels, lowest first:
//   baseline  x86-64 (SSE2), or whatever the compiler targets off x86 / with MSVC
//   avx2      AVX2 + FMA + F16C
//   avx512    AVX-512 F/BW/DQ/VL (+ AVX2, FMA, F16C)
//   amx       AMX tiles (AMX-TILE with BF16 or INT8) usable: the CPU has them and Linux lets this
//             process use their state (detection asks ARCH_GET_XCOMP_SUPP, without requesting
//             the grant). No kernel uses AMX yet: at this level the avx512 kernels run
//             (kernel_level() says so).
//
// Every level computes each top-k score as one fused multiply-add chain over t = 0 .. d-1 and
// every norm with the same order of additions, so all levels return bit-identical results
// (tests/test_cpu_isa.py checks this). The baseline keeps the same chain with a float32 FMA
// emulated in double (exact product, one rounding; std::fma at the rare exact midpoints and
// subnormals): correct on x86-64 CPUs without FMA (pre-2013), not fast.
//
// Everything here is plain data and function pointers, shared by the baseline-compiled driver
// and the per-level kernels: no inline function with a body, so no copy compiled with AVX-512
// instructions can be picked by the linker for baseline code.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nudgefast {

enum class ChunkType { f16, f32, f64 };

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2, amx = 3 };
constexpr int kIsaLevels = 4;

// The environment variable that forces a level (one of isa_name()'s values, at most the best one).
constexpr const char* kIsaEnv = "NUDGEFAST_CPU_ISA";

// What cpuid and the OS say (x86; all false elsewhere). Quantized-corpus kernels will key on the
// int8 / binary features the same way the float kernels key on the levels.
struct CpuFeatures {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false;
    bool avx512_vnni = false, avx512_bf16 = false, avx512_vpopcntdq = false;
    bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
    bool os_avx = false, os_avx512 = false, os_amx = false;  // XCR0 enables the register state
    bool amx_permitted = false;                             // Linux would grant the tile data state
};

// ---------------------------------------------------------------------------------------------
// Kernel interfaces (one table per compiled level)

// topk_update's problem, shared by all threads. queries: n_qt * d floats in the level's layout
// (TopkKernel::pack_queries), n_qt a multiple of the level's query_tile.
struct TopkProblem {
    const float* queries;
    int64_t n_q, n_qt, d, k;
    const void* chunk;
    ChunkType chunk_type;
    int64_t m, row_stride, row_offset;  // chunk rows, elements between rows, id of row 0
    const int64_t* exclude;             // sorted chunk-local rows
    int64_t n_exclude;
    bool normalize;
};

// One thread's scratch, allocated by the driver with the level's sizes.
struct TopkScratch {
    float* scores;      // (n_q, k) heaps, worst on top
    int64_t* index;
    float* thresh;      // (n_qt): score of the worst kept entry; +inf on padding
    float* panels;      // record_tile * d, 64-byte aligned: the packed records
    float* norm;        // record_tile: float32 norm, 1 without normalize, NaN if not a candidate
    float* inv_norm;    // record_tile: 1 / norm
    float* rows;        // panel * d, 64-byte aligned: converted rows on their way into a panel
    int64_t first_bad;  // smallest bad row id seen, or -1
    uint64_t always_offer = 0;  // record_tile bits: candidates whose 1 / norm overflows float32
                                // (norm below 2^-128): offered without the admission test
};

struct TopkKernel {
    int64_t query_tile;   // queries per register tile (n_qt is padded to a multiple)
    int64_t record_tile;  // records per register tile (blocks are multiples of it)
    int64_t panel;        // records per panel
    // The (n_q, d) queries in the layout the micro-kernel reads, zero-padded to n_qt: n_qt * d floats.
    void (*pack_queries)(const float* queries, int64_t n_q, int64_t n_qt, int64_t d, float* out);
    // Merges chunk rows [begin, end) into the thread's heaps (begin a multiple of record_tile).
    void (*block)(const TopkProblem& p, TopkScratch& s, int64_t begin, int64_t end);
};

struct NormalizeKernel {
    // out[r] = row r / |row r| for r in [begin, end) of the (m, d) float32 or float16 chunk;
    // stream: non-temporal stores (followed by a fence). Returns the first row of norm zero or
    // not finite (its out row untouched), or -1.
    int64_t (*rows)(const void* chunk, bool f16, int64_t begin, int64_t end, int64_t d, float* out, bool stream);
};

struct Dot64Kernel {
    static constexpr int64_t kMaxRows = 8, kMaxCols = 16;
    int64_t rows, cols;  // the register tile: rows of A x columns (rows of B)
    // acc[r * cols + c] = FMA chain over k of a[r][k] * panel[k * cols + c].
    void (*tile)(const double* const* a, const double* panel, int64_t d, double* acc);
};

struct SweepKernel {
    // out[j] = a[j] * s[j] + b[j] * h[j] (two products rounded, then the sum), j < len; returns
    // the largest out[j] (-inf when len == 0 or every value is NaN).
    double (*scores)(const double* a, const double* b, const double* s, const double* h, int64_t len,
                     double* out);
};

// qtopk_int8 / qtopk_hamming: top-k over quantized corpora (driver csrc/cpu/qtopk.cpp, inner loops
// csrc/cpu/kernels/qtopk.cpp). Both score integer sums (exact on every level) and share one
// problem/scratch layout; `d` is the dimension count for int8 codes and the bytes per row (w) for
// packed bits.
struct QTopkProblem {
    const void* queries;        // the kernel's packed layout (QTopkKernel::pack_queries)
    int64_t n_q, n_qt, d, k;    // n_qt: n_q rounded up to the kernel's query_tile
    const uint8_t* codes;       // chunk rows, row_stride bytes apart (int8 codes read as bytes)
    int64_t m, row_stride, row_offset;
    const int64_t* exclude;     // sorted chunk-local rows
    int64_t n_exclude;
    // qtopk_int8 only
    const float* qscale;        // n_q
    const float* qoffset;       // n_q
    bool signed_codes;          // u = code + 128 (the top bit flipped), else u = code
    bool normalize;             // divide by |low + step * u| (float64, one order on every level)
    const double* low;          // round_up(d, 8) values, zero past d
    const double* step;
    // qtopk_hamming only
    int64_t n_bits;
};

struct QTopkScratch {
    float* scores;      // (n_q, k) heaps, worst on top
    int64_t* index;
    float* thresh;      // n_q: score of the worst kept entry
    int64_t* max_dist;  // n_q (hamming): the largest Hamming distance that can still be admitted
    void* tile;         // tile_bytes(d), 64-byte aligned: the packed record tile
    float* divisor;     // record_tile: the float32 norm (1 without normalize)
    int64_t first_bad;  // smallest bad row id seen, or -1
};

struct QTopkKernel {
    const char* name;     // the path, as reported by nudgefast._cpu.qtopk_paths()
    int64_t query_tile;   // queries per register tile (n_qt is padded to a multiple)
    int64_t record_tile;  // records per register tile (blocks are multiples of it)
    // Bytes of the packed queries, and the packing ((n_q, d) int8 qcodes or (n_q, w) bytes).
    int64_t (*query_bytes)(int64_t n_qt, int64_t d);
    void (*pack_queries)(const void* queries, int64_t n_q, int64_t n_qt, int64_t d, void* out);
    int64_t (*tile_bytes)(int64_t d);
    // Merges chunk rows [begin, end) into the thread's heaps (begin a multiple of record_tile).
    void (*block)(const QTopkProblem& p, QTopkScratch& s, int64_t begin, int64_t end);
};

// correct_rows (driver csrc/cpu/correct_rows.cpp, inner loops csrc/cpu/kernels/correct_rows.cpp).
// A weight matrix (K, N) is packed [panel][k][column]: panels of `panel` columns (the last one
// narrower: N rounded up to `lanes`), each K x width floats, zero past N.
struct CorrectKernel {
    int64_t rows;   // rows per register tile
    int64_t lanes;  // columns are padded to a multiple of this
    int64_t panel;  // columns per packed panel (a multiple of lanes)
    int64_t kc;     // k per block (B's block stays in L1)
    // a[r] = x[r] / |x[r]| (float32 of the float64 quotient, |x| accumulated in double) for the
    // (rows, d) float16/float32 rows x; bad[r] = 1 (and a[r] = 0) where |x[r]| is zero or not finite.
    void (*unit_rows)(const void* x, bool f16, int64_t rows, int64_t d, float* a, int64_t lda, uint8_t* bad);
    // c = init + a b over (rows, n_pad) with a (rows, K) and b packed for n_pad columns; init: the
    // bias (n_pad floats) or null (c += a b); relu: max(c, 0) at the end.
    void (*gemm)(const float* a, int64_t lda, int64_t rows, int64_t K, const float* b, int64_t n_pad,
                 const float* bias, bool relu, float* c, int64_t ldc);
    // out[r] = c[r] / |c[r]| over n columns (|c| in double), NaN rows where bad[r] or the norm is zero
    // or not finite; out (rows, n) C-contiguous.
    void (*unit_out)(const float* c, int64_t ldc, int64_t rows, int64_t n, const uint8_t* bad, float* out);
};

// Pointers, not copies: each level's table is then a constant, initialised before any code runs.
struct KernelTable {
    Isa level;  // the level these kernels were compiled for
    const TopkKernel* topk;
    const NormalizeKernel* normalize;
    const Dot64Kernel* dot64;
    const SweepKernel* sweep;
    const QTopkKernel* qtopk_int8;
    const QTopkKernel* qtopk_hamming;
    // Sub-paths of a level that need one more CPU feature (null where the level has none): int8
    // dot products with AVX512-VNNI (vpdpbusd), popcounts with AVX512-VPOPCNTDQ. Picked at run time
    // by qtopk_int8_kernel() / qtopk_hamming_kernel() when cpu_features() has the feature.
    const QTopkKernel* qtopk_int8_vnni;
    const QTopkKernel* qtopk_hamming_vpopcnt;
    const CorrectKernel* correct;
};

// ---------------------------------------------------------------------------------------------
// Selection

const char* isa_name(Isa level);
const CpuFeatures& cpu_features();
// Levels this build has kernels for and this CPU + OS can run, lowest first.
std::vector<Isa> supported_isas();
Isa best_isa();
// The level in use: chosen by init_isa() (the best, or NUDGEFAST_CPU_ISA), or by set_isa().
Isa active_isa();
// The level of the kernels that run for active_isa() (avx512 for amx: no AMX kernel yet).
Isa kernel_isa();
const KernelTable& kernels();
// The quantized top-k kernels of the active level, with its feature sub-path where the CPU has it.
const QTopkKernel& qtopk_int8_kernel();
const QTopkKernel& qtopk_hamming_kernel();
// Allows (the default) or forbids the feature sub-paths, so that tests can run the avx512 level's
// plain kernels on a CPU that has the features (not thread-safe against running kernels).
void set_qtopk_subpaths(bool allowed);
// Reads NUDGEFAST_CPU_ISA; throws std::invalid_argument naming the variable and the allowed
// values when it is unknown or above what this CPU supports.
void init_isa();
// Switches the level (tests compare levels in one process; not thread-safe against running
// kernels). Throws std::invalid_argument for an unknown or unsupported level.
void set_isa(const std::string& name);

}  // namespace nudgefast
