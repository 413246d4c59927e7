// qtopk_int8 / qtopk_hamming's inner loops, compiled once per instruction-set level (see
// dispatch.hpp); the driver (threads, per-thread heaps, the final merge) is csrc/cpu/qtopk.cpp.
//
// Both ops score a tile of records against every query while the tile sits in L1: the records
// are re-laid out ("packed") once per tile so that one aligned vector load feeds one instruction
// per query, each score is compared at once with its query's current k-th best, and the rare
// rows that pass are pushed into the thread's heap. No n_q x chunk score matrix exists.
//
// int8: the sum over j of qcodes[i, j] * u[r, j] (u = code, or code + 128 for signed codes: the
// top bit flipped) is exact in int32 on every level:
//   avx512 + AVX512-VNNI  tiles of 32 records laid out [d/4][32][4 bytes]: one 64-byte load is 16
//                         records x 4 dimensions, and one vpdpbusd (u8 x s8 -> int32, exactly the
//                         product here) per query with the query's 4 bytes broadcast; 12 queries x
//                         2 vectors of records = 24 accumulators in registers.
//   avx512 (no VNNI)      the same tile with u and the queries widened to int16, [d/2][32][2]:
//   avx2                  vpmaddwd + vpaddd (exact; vpmaddubsw would saturate int16 at
//                         255 * 127 * 2). avx2: 6 queries x 2 vectors of 8 records.
//   baseline              scalar loops over the 4-byte layout.
// The float epilogue is the same float32 operations on every level: float(acc) * qscale, then
// + qoffset (two roundings, as the reference), then / norm with `normalize`. The norm of the
// dequantized row low + step * u is accumulated in float64 in one order on every level (value j
// into partial sum j % 8, products and sums rounded separately, a fixed reduction tree), so the
// scores, hence the results, are bit-identical across levels.
//
// hamming: dist = popcount(q ^ row) over w bytes, score = n_bits - 2 * dist. Records are packed
// as 64-bit word columns, [W][RT] (W = ceil(w / 8), the tail word zero-padded on both sides):
//   avx512 + VPOPCNTDQ    32 records = 4 zmm per word, query word broadcast, xor / vpopcntq / add.
//   avx512 (no VPOPCNTDQ) the same with a vpshufb nibble-table popcount (byte counts summed with
//   avx2                  vpsadbw every 31 words); avx2: 16 records = 4 ymm per word.
//   baseline              __builtin_popcountll per word.
// The admission test is in integers: dist <= max_dist[q] (hamming_max_dist of the k-th score).
//
// Rule for this file: only functions in this level's namespace (or with internal linkage), and
// no standard-library template that is not inlined away; see common.hpp on inline namespaces.
#include "common.hpp"

namespace nudgefast {
namespace NUDGEFAST_LEVEL {
namespace {

#if defined(NUDGEFAST_AVX512)
#define NUDGEFAST_VNNI_FN __attribute__((target("avx512vnni")))
#define NUDGEFAST_VPOPCNT_FN __attribute__((target("avx512vpopcntdq")))
#endif

inline int lowest_bit(uint64_t mask) {
#if defined(__GNUC__)
    return __builtin_ctzll(mask);
#else
    int r = 0;
    while (!(mask & 1)) mask >>= 1, ++r;
    return r;
#endif
}

inline uint32_t load_u32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline uint64_t load_u64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// The first excluded row >= begin (the list is sorted): a binary search.
inline const int64_t* first_excluded(const QTopkProblem& p, int64_t begin) {
    const int64_t* ex = p.exclude;
    for (int64_t n = p.n_exclude; n > 0;) {
        const int64_t half = n / 2;
        if (ex[half] < begin) ex += half + 1, n -= half + 1;
        else n = half;
    }
    return ex;
}

// Bits of the n rows of the tile at r0 that are candidates as far as the exclude list goes.
inline uint64_t tile_candidates(const QTopkProblem& p, int64_t r0, int64_t n, const int64_t*& ex) {
    uint64_t valid = n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
    for (; ex != p.exclude + p.n_exclude && *ex < r0 + n; ++ex) valid &= ~(uint64_t{1} << (*ex - r0));
    return valid;
}

// Pushes (score, id) into query q's heap; returns whether the heap changed.
inline bool offer(QTopkScratch& st, const QTopkProblem& p, int64_t q, float score, int64_t id) {
    float* hs = st.scores + q * p.k;
    int64_t* hi = st.index + q * p.k;
    if (!TopKHeap<float>::push(hs, hi, p.k, score, id)) return false;
    st.thresh[q] = hs[0];
    return true;
}

// =============================================================================================
// int8

#if defined(NUDGEFAST_AVX512)
constexpr int64_t I8_QT = 12;   // queries per register tile
constexpr int64_t I8_V = 16;    // records per vector
#elif defined(NUDGEFAST_AVX2)
constexpr int64_t I8_QT = 6;
constexpr int64_t I8_V = 8;
#else
constexpr int64_t I8_QT = 4;
constexpr int64_t I8_V = 8;
#endif
constexpr int64_t I8_RT = 2 * I8_V;  // records per tile: two vectors
static_assert(I8_RT <= 64, "candidate masks are one uint64_t per record tile");

// Norm of the dequantized row x_j = low_j + step_j * u_j in float64, in one order on every level:
// x_j (step * u is exact in double, so one rounding whether fused or not), x_j^2 rounded, added to
// partial sum j % 8 (d padded with zero values to a multiple of 8: low = step = 0 there), then
// t_l = s_l + s_{l+4}, (t_0 + t_2) + (t_1 + t_3), and the square root.
inline double dequantized_norm(const uint8_t* row, int64_t d, uint64_t flip, const double* low,
                               const double* step) {
    const int64_t full = d / 8 * 8;
    uint8_t tail[8] = {};
    if (full < d) std::memcpy(tail, row + full, static_cast<std::size_t>(d - full));
    double t[4];
#if defined(NUDGEFAST_AVX512)
    __m512d acc = _mm512_setzero_pd();
    for (int64_t j = 0; j < d; j += 8) {
        const uint64_t bytes = (j < full ? load_u64(row + j) : load_u64(tail)) ^ flip;
        const __m512d u = _mm512_cvtepi32_pd(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes))));
        const __m512d x = _mm512_fmadd_pd(_mm512_loadu_pd(step + j), u, _mm512_loadu_pd(low + j));
        acc = _mm512_add_pd(acc, _mm512_mul_pd(x, x));
    }
    _mm256_storeu_pd(t, _mm256_add_pd(_mm512_castpd512_pd256(acc), _mm512_extractf64x4_pd(acc, 1)));
#elif defined(NUDGEFAST_AVX2)
    __m256d lo = _mm256_setzero_pd(), hi = lo;
    for (int64_t j = 0; j < d; j += 8) {
        const uint64_t bytes = (j < full ? load_u64(row + j) : load_u64(tail)) ^ flip;
        const __m128i b = _mm_cvtsi64_si128(static_cast<long long>(bytes));
        const __m256d u0 = _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(b));
        const __m256d u1 = _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_srli_si128(b, 4)));
        const __m256d x0 = _mm256_fmadd_pd(_mm256_loadu_pd(step + j), u0, _mm256_loadu_pd(low + j));
        const __m256d x1 = _mm256_fmadd_pd(_mm256_loadu_pd(step + j + 4), u1, _mm256_loadu_pd(low + j + 4));
        lo = _mm256_add_pd(lo, _mm256_mul_pd(x0, x0));
        hi = _mm256_add_pd(hi, _mm256_mul_pd(x1, x1));
    }
    _mm256_storeu_pd(t, _mm256_add_pd(lo, hi));
#else
    double s[8] = {};
    for (int64_t j = 0; j < d; j += 8) {
        const uint64_t bytes = (j < full ? load_u64(row + j) : load_u64(tail)) ^ flip;
        for (int l = 0; l < 8; ++l) {
            const double u = static_cast<double>((bytes >> (8 * l)) & 0xffu);
            const double x = low[j + l] + step[j + l] * u;  // step * u exact: one rounding
            s[l] += x * x;
        }
    }
    for (int l = 0; l < 4; ++l) t[l] = s[l] + s[l + 4];
#endif
    return std::sqrt((t[0] + t[2]) + (t[1] + t[3]));
}

// Packs the n <= I8_RT rows at chunk row r0 into st.tile (zero columns past n) as 32-bit words
// [step][I8_RT]: DPS = 4 bytes u[4s .. 4s+3] (VNNI, baseline) or DPS = 2 int16 u[2s], u[2s+1]
// (vpmaddwd). Sets the divisors and returns the candidate bits (bad and excluded rows cleared).
template <int DPS>
uint64_t pack_int8_tile(QTopkScratch& st, const QTopkProblem& p, int64_t r0, int64_t n, const int64_t*& ex) {
    const int64_t d = p.d;
    const int64_t steps = (d + DPS - 1) / DPS;
    uint32_t* tile = static_cast<uint32_t*>(st.tile);
    const uint32_t flip32 = p.signed_codes ? 0x80808080u : 0u;
    const uint64_t flip64 = p.signed_codes ? 0x8080808080808080ull : 0u;
    uint64_t valid = tile_candidates(p, r0, n, ex);
    for (int64_t r = 0; r < I8_RT; ++r) {
        if (r >= n) {
            for (int64_t s = 0; s < steps; ++s) tile[s * I8_RT + r] = 0;
            st.divisor[r] = 1.0f;
            continue;
        }
        const uint8_t* row = p.codes + (r0 + r) * p.row_stride;
        if (DPS == 4) {
            const int64_t full = d / 4;
            for (int64_t s = 0; s < full; ++s) tile[s * I8_RT + r] = load_u32(row + 4 * s) ^ flip32;
            if (full < steps) {
                uint8_t b[4] = {};
                std::memcpy(b, row + 4 * full, static_cast<std::size_t>(d - 4 * full));
                tile[full * I8_RT + r] = load_u32(b) ^ flip32;  // padding bytes meet zero query bytes
            }
        } else {
            const uint32_t f = flip32 & 0xffu;
            const int64_t full = d / 2;
            for (int64_t s = 0; s < full; ++s)
                tile[s * I8_RT + r] = (row[2 * s] ^ f) | static_cast<uint32_t>(row[2 * s + 1] ^ f) << 16;
            if (full < steps) tile[full * I8_RT + r] = row[2 * full] ^ f;
        }
        float divisor = 1.0f;
        if (p.normalize) {
            const double norm = dequantized_norm(row, d, flip64, p.low, p.step);
            if (norm == 0.0) {
                const int64_t id = p.row_offset + r0 + r;
                if (st.first_bad < 0 || id < st.first_bad) st.first_bad = id;
                valid &= ~(uint64_t{1} << r);
            }
            divisor = static_cast<float>(norm);  // the reference divides by the float32 norm
        }
        st.divisor[r] = divisor;
    }
    return valid;
}

// Queries as 32-bit words in the layout the tiles read: tiles of I8_QT queries (zero rows past
// n_q), each interleaved word by word: out[q0 * steps + s * I8_QT + i] holds query q0 + i's
// values for step s (DPS int8 bytes, or 2 int16).
template <int DPS>
int64_t int8_query_bytes(int64_t n_qt, int64_t d) {
    return n_qt * ((d + DPS - 1) / DPS) * 4;
}

template <int DPS>
void pack_int8_queries(const void* queries, int64_t n_q, int64_t n_qt, int64_t d, void* out) {
    const int8_t* q = static_cast<const int8_t*>(queries);
    uint32_t* o = static_cast<uint32_t*>(out);
    const int64_t steps = (d + DPS - 1) / DPS;
    for (int64_t q0 = 0; q0 < n_qt; q0 += I8_QT)
        for (int64_t s = 0; s < steps; ++s)
            for (int64_t i = 0; i < I8_QT; ++i) {
                uint32_t word = 0;
                if (q0 + i < n_q)
                    for (int64_t b = 0; b < DPS && s * DPS + b < d; ++b) {
                        const int8_t v = q[(q0 + i) * d + s * DPS + b];
                        word |= DPS == 4 ? static_cast<uint32_t>(static_cast<uint8_t>(v)) << (8 * b)
                                         : static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(v)))
                                               << (16 * b);
                    }
                o[q0 * steps + s * I8_QT + i] = word;
            }
}

template <int DPS>
int64_t int8_tile_bytes(int64_t d) {
    return ((d + DPS - 1) / DPS) * I8_RT * 4;
}

// The micro-kernels: acc[i * I8_RT + r] = integer sum for query i of the tile and record r.
#if defined(NUDGEFAST_AVX512)
template <int QR>
inline void int8_tile_madd(const uint32_t* q, int64_t steps, const uint32_t* tile, int32_t* out) {
    __m512i c0[QR], c1[QR];
#pragma GCC unroll 16
    for (int i = 0; i < QR; ++i) c0[i] = c1[i] = _mm512_setzero_si512();
    for (int64_t s = 0; s < steps; ++s) {
        __m512i b0 = _mm512_load_si512(tile + s * I8_RT), b1 = _mm512_load_si512(tile + s * I8_RT + I8_V);
        __asm__("" : "+v"(b0), "+v"(b1));
#pragma GCC unroll 16
        for (int i = 0; i < QR; ++i) {
            const __m512i a = _mm512_set1_epi32(static_cast<int>(q[s * I8_QT + i]));
            c0[i] = _mm512_add_epi32(c0[i], _mm512_madd_epi16(b0, a));
            c1[i] = _mm512_add_epi32(c1[i], _mm512_madd_epi16(b1, a));
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < QR; ++i) {
        _mm512_store_si512(out + i * I8_RT, c0[i]);
        _mm512_store_si512(out + i * I8_RT + I8_V, c1[i]);
    }
}

#if defined(NUDGEFAST_AVX512_SUBPATHS)
template <int QR>
NUDGEFAST_VNNI_FN inline void int8_tile_vnni(const uint32_t* q, int64_t steps, const uint32_t* tile, int32_t* out) {
    __m512i c0[QR], c1[QR];
#pragma GCC unroll 16
    for (int i = 0; i < QR; ++i) c0[i] = c1[i] = _mm512_setzero_si512();
#pragma GCC unroll 2
    for (int64_t s = 0; s < steps; ++s) {
        __m512i b0 = _mm512_load_si512(tile + s * I8_RT), b1 = _mm512_load_si512(tile + s * I8_RT + I8_V);
        __asm__("" : "+v"(b0), "+v"(b1));
#pragma GCC unroll 16
        for (int i = 0; i < QR; ++i) {
            const __m512i a = _mm512_set1_epi32(static_cast<int>(q[s * I8_QT + i]));
            c0[i] = _mm512_dpbusd_epi32(c0[i], b0, a);
            c1[i] = _mm512_dpbusd_epi32(c1[i], b1, a);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < QR; ++i) {
        _mm512_store_si512(out + i * I8_RT, c0[i]);
        _mm512_store_si512(out + i * I8_RT + I8_V, c1[i]);
    }
}

NUDGEFAST_VNNI_FN void int8_tile_vnni_rows(int64_t rows, const uint32_t* q, int64_t steps, const uint32_t* tile,
                                           int32_t* out) {
    switch (rows) {
        case 1: return int8_tile_vnni<1>(q, steps, tile, out);
        case 2: return int8_tile_vnni<2>(q, steps, tile, out);
        case 3: return int8_tile_vnni<3>(q, steps, tile, out);
        case 4: return int8_tile_vnni<4>(q, steps, tile, out);
        case 5: return int8_tile_vnni<5>(q, steps, tile, out);
        case 6: return int8_tile_vnni<6>(q, steps, tile, out);
        case 7: return int8_tile_vnni<7>(q, steps, tile, out);
        case 8: return int8_tile_vnni<8>(q, steps, tile, out);
        case 9: return int8_tile_vnni<9>(q, steps, tile, out);
        case 10: return int8_tile_vnni<10>(q, steps, tile, out);
        case 11: return int8_tile_vnni<11>(q, steps, tile, out);
        default: return int8_tile_vnni<I8_QT>(q, steps, tile, out);
    }
}
#endif

void int8_tile_madd_rows(int64_t rows, const uint32_t* q, int64_t steps, const uint32_t* tile, int32_t* out) {
    switch (rows) {
        case 1: return int8_tile_madd<1>(q, steps, tile, out);
        case 2: return int8_tile_madd<2>(q, steps, tile, out);
        case 3: return int8_tile_madd<3>(q, steps, tile, out);
        case 4: return int8_tile_madd<4>(q, steps, tile, out);
        case 5: return int8_tile_madd<5>(q, steps, tile, out);
        case 6: return int8_tile_madd<6>(q, steps, tile, out);
        case 7: return int8_tile_madd<7>(q, steps, tile, out);
        case 8: return int8_tile_madd<8>(q, steps, tile, out);
        case 9: return int8_tile_madd<9>(q, steps, tile, out);
        case 10: return int8_tile_madd<10>(q, steps, tile, out);
        case 11: return int8_tile_madd<11>(q, steps, tile, out);
        default: return int8_tile_madd<I8_QT>(q, steps, tile, out);
    }
}
#elif defined(NUDGEFAST_AVX2)
// Always the full I8_QT queries (padding queries are zero: computed, never offered).
void int8_tile_madd_rows(int64_t, const uint32_t* q, int64_t steps, const uint32_t* tile, int32_t* out) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const int* qi = reinterpret_cast<const int*>(q);
#pragma GCC unroll 2
    for (int64_t s = 0; s < steps; ++s) {
        __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(tile + s * I8_RT));
        __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(tile + s * I8_RT + I8_V));
        __asm__("" : "+x"(b0), "+x"(b1));
        const int* qs = qi + s * I8_QT;
        __m256i a = _mm256_set1_epi32(qs[0]);
        c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(b0, a)); c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(b1, a));
        a = _mm256_set1_epi32(qs[1]);
        c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(b0, a)); c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(b1, a));
        a = _mm256_set1_epi32(qs[2]);
        c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(b0, a)); c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(b1, a));
        a = _mm256_set1_epi32(qs[3]);
        c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(b0, a)); c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(b1, a));
        a = _mm256_set1_epi32(qs[4]);
        c40 = _mm256_add_epi32(c40, _mm256_madd_epi16(b0, a)); c41 = _mm256_add_epi32(c41, _mm256_madd_epi16(b1, a));
        a = _mm256_set1_epi32(qs[5]);
        c50 = _mm256_add_epi32(c50, _mm256_madd_epi16(b0, a)); c51 = _mm256_add_epi32(c51, _mm256_madd_epi16(b1, a));
    }
    __m256i* o = reinterpret_cast<__m256i*>(out);
    _mm256_store_si256(o + 0, c00); _mm256_store_si256(o + 1, c01);
    _mm256_store_si256(o + 2, c10); _mm256_store_si256(o + 3, c11);
    _mm256_store_si256(o + 4, c20); _mm256_store_si256(o + 5, c21);
    _mm256_store_si256(o + 6, c30); _mm256_store_si256(o + 7, c31);
    _mm256_store_si256(o + 8, c40); _mm256_store_si256(o + 9, c41);
    _mm256_store_si256(o + 10, c50); _mm256_store_si256(o + 11, c51);
}
#else
// Baseline: the 4-byte layout, scalar.
void int8_tile_bytes_rows(int64_t rows, const uint32_t* q, int64_t steps, const uint32_t* tile, int32_t* out) {
    for (int64_t i = 0; i < rows; ++i) {
        int32_t acc[I8_RT] = {};
        for (int64_t s = 0; s < steps; ++s) {
            const uint32_t qw = q[s * I8_QT + i];
            const int32_t q0 = static_cast<int8_t>(qw & 0xff), q1 = static_cast<int8_t>((qw >> 8) & 0xff);
            const int32_t q2 = static_cast<int8_t>((qw >> 16) & 0xff), q3 = static_cast<int8_t>(qw >> 24);
            const uint32_t* t = tile + s * I8_RT;
            for (int64_t r = 0; r < I8_RT; ++r) {
                const uint32_t u = t[r];
                acc[r] += static_cast<int32_t>(u & 0xff) * q0 + static_cast<int32_t>((u >> 8) & 0xff) * q1 +
                          static_cast<int32_t>((u >> 16) & 0xff) * q2 + static_cast<int32_t>(u >> 24) * q3;
            }
        }
        for (int64_t r = 0; r < I8_RT; ++r) out[i * I8_RT + r] = acc[r];
    }
}
#endif

// The float epilogue and the admission test for query q against the I8_RT sums `acc`:
// s = float(acc) * qscale, s = s + qoffset, s = s / divisor (normalize), offered when s >= the
// query's k-th best and the record is a candidate. The same float32 operations on every level.
inline void int8_admit(QTopkScratch& st, const QTopkProblem& p, int64_t q, const int32_t* acc, uint64_t valid,
                       int64_t id0) {
    const float scale = p.qscale[q], offset = p.qoffset[q];
    alignas(64) float s[I8_RT];
#if defined(NUDGEFAST_AVX512)
    const __m512 sc = _mm512_set1_ps(scale), of = _mm512_set1_ps(offset), thr = _mm512_set1_ps(st.thresh[q]);
    __m512 s0 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc)), sc), of);
    __m512 s1 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc + I8_V)), sc), of);
    if (p.normalize) {
        s0 = _mm512_div_ps(s0, _mm512_loadu_ps(st.divisor));
        s1 = _mm512_div_ps(s1, _mm512_loadu_ps(st.divisor + I8_V));
    }
    uint64_t mask = (static_cast<uint64_t>(_mm512_cmp_ps_mask(s0, thr, _CMP_GE_OQ)) |
                     static_cast<uint64_t>(_mm512_cmp_ps_mask(s1, thr, _CMP_GE_OQ)) << I8_V) & valid;
    if (!mask) return;
    _mm512_store_ps(s, s0);
    _mm512_store_ps(s + I8_V, s1);
#elif defined(NUDGEFAST_AVX2)
    const __m256 sc = _mm256_set1_ps(scale), of = _mm256_set1_ps(offset), thr = _mm256_set1_ps(st.thresh[q]);
    const __m256i* a = reinterpret_cast<const __m256i*>(acc);
    __m256 s0 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256(a)), sc), of);
    __m256 s1 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256(a + 1)), sc), of);
    if (p.normalize) {
        s0 = _mm256_div_ps(s0, _mm256_loadu_ps(st.divisor));
        s1 = _mm256_div_ps(s1, _mm256_loadu_ps(st.divisor + I8_V));
    }
    uint64_t mask = (static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(s0, thr, _CMP_GE_OQ))) |
                     static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(s1, thr, _CMP_GE_OQ))) << I8_V) & valid;
    if (!mask) return;
    _mm256_store_ps(s, s0);
    _mm256_store_ps(s + I8_V, s1);
#else
    const float thr = st.thresh[q];
    uint64_t mask = 0;
    for (int64_t r = 0; r < I8_RT; ++r) {
        float v = static_cast<float>(acc[r]) * scale;
        v = v + offset;
        if (p.normalize) v = v / st.divisor[r];
        s[r] = v;
        if (v >= thr) mask |= uint64_t{1} << r;
    }
    mask &= valid;
#endif
    while (mask) {
        const int r = lowest_bit(mask);
        mask &= mask - 1;
        offer(st, p, q, s[r], id0 + r);
    }
}

using Int8TileFn = void (*)(int64_t rows, const uint32_t* q, int64_t steps, const uint32_t* tile, int32_t* out);

template <int DPS, Int8TileFn TILE>
void int8_block(const QTopkProblem& p, QTopkScratch& st, int64_t begin, int64_t end) {
    const int64_t* ex = first_excluded(p, begin);
    const int64_t steps = (p.d + DPS - 1) / DPS;
    const uint32_t* queries = static_cast<const uint32_t*>(p.queries);
    alignas(64) int32_t acc[I8_QT * I8_RT];
    for (int64_t r0 = begin; r0 < end; r0 += I8_RT) {
        const int64_t n = end - r0 < I8_RT ? end - r0 : I8_RT;
        const uint64_t valid = pack_int8_tile<DPS>(st, p, r0, n, ex);
        if (!valid) continue;
        const uint32_t* tile = static_cast<const uint32_t*>(st.tile);
        for (int64_t q0 = 0; q0 < p.n_qt; q0 += I8_QT) {
            const int64_t rows = p.n_q - q0 < I8_QT ? p.n_q - q0 : I8_QT;
            TILE(rows, queries + q0 * steps, steps, tile, acc);
            for (int64_t i = 0; i < rows; ++i) int8_admit(st, p, q0 + i, acc + i * I8_RT, valid, p.row_offset + r0);
        }
    }
}

// =============================================================================================
// hamming

#if defined(NUDGEFAST_AVX512)
constexpr int64_t HM_RT = 32;  // 4 zmm of 8 words
#else
constexpr int64_t HM_RT = 16;  // avx2: 4 ymm of 4 words; baseline: the same tile
#endif
static_assert(HM_RT <= 64, "candidate masks are one uint64_t per record tile");

inline int64_t words_of(int64_t w) { return (w + 7) / 8; }

int64_t hamming_query_bytes(int64_t n_qt, int64_t w) { return n_qt * words_of(w) * 8; }

// Queries as rows of W little-endian 64-bit words, the tail word zero-padded.
void pack_hamming_queries(const void* queries, int64_t n_q, int64_t, int64_t w, void* out) {
    const uint8_t* q = static_cast<const uint8_t*>(queries);
    uint8_t* o = static_cast<uint8_t*>(out);
    const int64_t W = words_of(w);
    for (int64_t i = 0; i < n_q; ++i) {
        std::memset(o + i * W * 8, 0, static_cast<std::size_t>(W * 8));
        std::memcpy(o + i * W * 8, q + i * w, static_cast<std::size_t>(w));
    }
}

int64_t hamming_tile_bytes(int64_t w) { return words_of(w) * HM_RT * 8; }

// Packs the n <= HM_RT rows at chunk row r0 as word columns [W][HM_RT] (zero past n, and past w
// bytes in the tail word); returns the candidate bits.
uint64_t pack_hamming_tile(QTopkScratch& st, const QTopkProblem& p, int64_t r0, int64_t n, const int64_t*& ex) {
    const int64_t w = p.d, W = words_of(w), full = w / 8;
    uint64_t* tile = static_cast<uint64_t*>(st.tile);
    for (int64_t r = 0; r < HM_RT; ++r) {
        if (r >= n) {
            for (int64_t j = 0; j < W; ++j) tile[j * HM_RT + r] = 0;
            continue;
        }
        const uint8_t* row = p.codes + (r0 + r) * p.row_stride;
        for (int64_t j = 0; j < full; ++j) tile[j * HM_RT + r] = load_u64(row + 8 * j);
        if (full < W) {
            uint8_t b[8] = {};
            std::memcpy(b, row + 8 * full, static_cast<std::size_t>(w - 8 * full));
            tile[full * HM_RT + r] = load_u64(b);
        }
    }
    return tile_candidates(p, r0, n, ex);
}

// Offers the records of `mask` with their distances dist[r] to query q.
inline void hamming_offer(QTopkScratch& st, const QTopkProblem& p, int64_t q, uint64_t mask, const uint64_t* dist,
                          int64_t id0) {
    while (mask) {
        const int r = lowest_bit(mask);
        mask &= mask - 1;
        const float score = static_cast<float>(p.n_bits - 2 * static_cast<int64_t>(dist[r]));
        if (offer(st, p, q, score, id0 + r)) st.max_dist[q] = hamming_max_dist(st.thresh[q], p.n_bits);
    }
}

#if defined(NUDGEFAST_AVX512)
// Byte-wise popcount through a nibble table (AVX512-BW vpshufb).
inline __m512i popcount_bytes(__m512i x) {
    const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4));
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i lo = _mm512_and_si512(x, low), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);
    return _mm512_add_epi8(_mm512_shuffle_epi8(lut, lo), _mm512_shuffle_epi8(lut, hi));
}

void hamming_block_bw(const QTopkProblem& p, QTopkScratch& st, int64_t begin, int64_t end) {
    const int64_t* ex = first_excluded(p, begin);
    const int64_t W = words_of(p.d);
    const uint64_t* queries = static_cast<const uint64_t*>(p.queries);
    alignas(64) uint64_t dist[HM_RT];
    for (int64_t r0 = begin; r0 < end; r0 += HM_RT) {
        const int64_t n = end - r0 < HM_RT ? end - r0 : HM_RT;
        const uint64_t valid = pack_hamming_tile(st, p, r0, n, ex);
        if (!valid) continue;
        const __m512i* tile = static_cast<const __m512i*>(st.tile);
        for (int64_t q = 0; q < p.n_q; ++q) {
            const uint64_t* qw = queries + q * W;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t j0 = 0; j0 < W; j0 += 31) {  // byte counts <= 8 per word: 31 words fit a byte
                __m512i b0 = _mm512_setzero_si512(), b1 = b0, b2 = b0, b3 = b0;
                const int64_t j1 = j0 + 31 < W ? j0 + 31 : W;
                for (int64_t j = j0; j < j1; ++j) {
                    const __m512i b = _mm512_set1_epi64(static_cast<long long>(qw[j]));
                    b0 = _mm512_add_epi8(b0, popcount_bytes(_mm512_xor_si512(_mm512_load_si512(tile + 4 * j), b)));
                    b1 = _mm512_add_epi8(b1, popcount_bytes(_mm512_xor_si512(_mm512_load_si512(tile + 4 * j + 1), b)));
                    b2 = _mm512_add_epi8(b2, popcount_bytes(_mm512_xor_si512(_mm512_load_si512(tile + 4 * j + 2), b)));
                    b3 = _mm512_add_epi8(b3, popcount_bytes(_mm512_xor_si512(_mm512_load_si512(tile + 4 * j + 3), b)));
                }
                const __m512i z = _mm512_setzero_si512();
                a0 = _mm512_add_epi64(a0, _mm512_sad_epu8(b0, z));
                a1 = _mm512_add_epi64(a1, _mm512_sad_epu8(b1, z));
                a2 = _mm512_add_epi64(a2, _mm512_sad_epu8(b2, z));
                a3 = _mm512_add_epi64(a3, _mm512_sad_epu8(b3, z));
            }
            const __m512i lim = _mm512_set1_epi64(st.max_dist[q]);
            const uint64_t mask = (static_cast<uint64_t>(_mm512_cmple_epi64_mask(a0, lim)) |
                                   static_cast<uint64_t>(_mm512_cmple_epi64_mask(a1, lim)) << 8 |
                                   static_cast<uint64_t>(_mm512_cmple_epi64_mask(a2, lim)) << 16 |
                                   static_cast<uint64_t>(_mm512_cmple_epi64_mask(a3, lim)) << 24) & valid;
            if (!mask) continue;
            _mm512_store_si512(dist, a0);
            _mm512_store_si512(dist + 8, a1);
            _mm512_store_si512(dist + 16, a2);
            _mm512_store_si512(dist + 24, a3);
            hamming_offer(st, p, q, mask, dist, p.row_offset + r0);
        }
    }
}

#if defined(NUDGEFAST_AVX512_SUBPATHS)
// Distances of one query to the 32 records of the tile, W known at compile time (0: at run time);
// returns the candidate records within max_dist (their distances in `out`).
template <int W>
NUDGEFAST_VPOPCNT_FN inline uint64_t hamming_query_vpopcnt(const __m512i* tile, int64_t w_words, const uint64_t* qw,
                                                         int64_t max_dist, uint64_t valid, __m512i out[4]) {
    const int64_t nw = W ? W : w_words;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 16
    for (int64_t j = 0; j < nw; ++j) {
        const __m512i b = _mm512_set1_epi64(static_cast<long long>(qw[j]));
        a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_load_si512(tile + 4 * j), b)));
        a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_load_si512(tile + 4 * j + 1), b)));
        a2 = _mm512_add_epi64(a2, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_load_si512(tile + 4 * j + 2), b)));
        a3 = _mm512_add_epi64(a3, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_load_si512(tile + 4 * j + 3), b)));
    }
    // The masks go through general registers (shifts and ORs there are off the vector ports).
    const __m512i lim = _mm512_set1_epi64(max_dist);
    const uint64_t mask = (static_cast<uint64_t>(_mm512_cmple_epi64_mask(a0, lim)) |
                           static_cast<uint64_t>(_mm512_cmple_epi64_mask(a1, lim)) << 8 |
                           static_cast<uint64_t>(_mm512_cmple_epi64_mask(a2, lim)) << 16 |
                           static_cast<uint64_t>(_mm512_cmple_epi64_mask(a3, lim)) << 24) & valid;
    if (mask) {
        out[0] = a0;
        out[1] = a1;
        out[2] = a2;
        out[3] = a3;
    }
    return mask;
}

// (Blocking the queries for L1, 128 at a time against 8 packed tiles, measured slower here.)
template <int W>
NUDGEFAST_VPOPCNT_FN void hamming_tile_vpopcnt(QTopkScratch& st, const QTopkProblem& p, uint64_t valid,
                                               int64_t id0) {
    const int64_t nw = words_of(p.d);
    const __m512i* tile = static_cast<const __m512i*>(st.tile);
    const uint64_t* queries = static_cast<const uint64_t*>(p.queries);
    alignas(64) __m512i dist[4];
    for (int64_t q = 0; q < p.n_q; ++q) {
        const uint64_t mask = hamming_query_vpopcnt<W>(tile, nw, queries + q * nw, st.max_dist[q], valid, dist);
        if (mask) hamming_offer(st, p, q, mask, reinterpret_cast<const uint64_t*>(dist), id0);
    }
}

void hamming_block_vpopcnt(const QTopkProblem& p, QTopkScratch& st, int64_t begin, int64_t end) {
    const int64_t* ex = first_excluded(p, begin);
    const int64_t W = words_of(p.d);
    for (int64_t r0 = begin; r0 < end; r0 += HM_RT) {
        const int64_t n = end - r0 < HM_RT ? end - r0 : HM_RT;
        const uint64_t valid = pack_hamming_tile(st, p, r0, n, ex);
        if (!valid) continue;
        const int64_t id0 = p.row_offset + r0;
        switch (W) {  // the common code sizes with the word loop unrolled
            case 1: hamming_tile_vpopcnt<1>(st, p, valid, id0); break;
            case 2: hamming_tile_vpopcnt<2>(st, p, valid, id0); break;
            case 3: hamming_tile_vpopcnt<3>(st, p, valid, id0); break;
            case 4: hamming_tile_vpopcnt<4>(st, p, valid, id0); break;
            case 5: hamming_tile_vpopcnt<5>(st, p, valid, id0); break;
            case 6: hamming_tile_vpopcnt<6>(st, p, valid, id0); break;
            case 8: hamming_tile_vpopcnt<8>(st, p, valid, id0); break;
            case 12: hamming_tile_vpopcnt<12>(st, p, valid, id0); break;
            case 16: hamming_tile_vpopcnt<16>(st, p, valid, id0); break;
            default: hamming_tile_vpopcnt<0>(st, p, valid, id0); break;
        }
    }
}
#endif
#elif defined(NUDGEFAST_AVX2)
inline __m256i popcount_bytes(__m256i x) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(x, low), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

inline uint64_t cmple_mask(__m256i a, __m256i lim) {  // lanes a <= lim (signed; distances are small)
    return static_cast<uint64_t>(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(a, lim)))) ^ 0xfu;
}

void hamming_block_avx2(const QTopkProblem& p, QTopkScratch& st, int64_t begin, int64_t end) {
    const int64_t* ex = first_excluded(p, begin);
    const int64_t W = words_of(p.d);
    const uint64_t* queries = static_cast<const uint64_t*>(p.queries);
    alignas(64) uint64_t dist[HM_RT];
    for (int64_t r0 = begin; r0 < end; r0 += HM_RT) {
        const int64_t n = end - r0 < HM_RT ? end - r0 : HM_RT;
        const uint64_t valid = pack_hamming_tile(st, p, r0, n, ex);
        if (!valid) continue;
        const __m256i* tile = static_cast<const __m256i*>(st.tile);
        for (int64_t q = 0; q < p.n_q; ++q) {
            const uint64_t* qw = queries + q * W;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t j0 = 0; j0 < W; j0 += 31) {  // byte counts <= 8 per word: 31 words fit a byte
                __m256i b0 = _mm256_setzero_si256(), b1 = b0, b2 = b0, b3 = b0;
                const int64_t j1 = j0 + 31 < W ? j0 + 31 : W;
                for (int64_t j = j0; j < j1; ++j) {
                    const __m256i b = _mm256_set1_epi64x(static_cast<long long>(qw[j]));
                    b0 = _mm256_add_epi8(b0, popcount_bytes(_mm256_xor_si256(_mm256_load_si256(tile + 4 * j), b)));
                    b1 = _mm256_add_epi8(b1, popcount_bytes(_mm256_xor_si256(_mm256_load_si256(tile + 4 * j + 1), b)));
                    b2 = _mm256_add_epi8(b2, popcount_bytes(_mm256_xor_si256(_mm256_load_si256(tile + 4 * j + 2), b)));
                    b3 = _mm256_add_epi8(b3, popcount_bytes(_mm256_xor_si256(_mm256_load_si256(tile + 4 * j + 3), b)));
                }
                const __m256i z = _mm256_setzero_si256();
                a0 = _mm256_add_epi64(a0, _mm256_sad_epu8(b0, z));
                a1 = _mm256_add_epi64(a1, _mm256_sad_epu8(b1, z));
                a2 = _mm256_add_epi64(a2, _mm256_sad_epu8(b2, z));
                a3 = _mm256_add_epi64(a3, _mm256_sad_epu8(b3, z));
            }
            const __m256i lim = _mm256_set1_epi64x(st.max_dist[q]);
            const uint64_t mask = (cmple_mask(a0, lim) | cmple_mask(a1, lim) << 4 | cmple_mask(a2, lim) << 8 |
                                   cmple_mask(a3, lim) << 12) & valid;
            if (!mask) continue;
            __m256i* d = reinterpret_cast<__m256i*>(dist);
            _mm256_store_si256(d, a0);
            _mm256_store_si256(d + 1, a1);
            _mm256_store_si256(d + 2, a2);
            _mm256_store_si256(d + 3, a3);
            hamming_offer(st, p, q, mask, dist, p.row_offset + r0);
        }
    }
}
#else
inline uint64_t popcount64(uint64_t x) {
#if defined(__GNUC__)
    return static_cast<uint64_t>(__builtin_popcountll(x));
#else
    x = x - ((x >> 1) & 0x5555555555555555ull);
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return (x * 0x0101010101010101ull) >> 56;
#endif
}

void hamming_block_scalar(const QTopkProblem& p, QTopkScratch& st, int64_t begin, int64_t end) {
    const int64_t* ex = first_excluded(p, begin);
    const int64_t W = words_of(p.d);
    const uint64_t* queries = static_cast<const uint64_t*>(p.queries);
    uint64_t dist[HM_RT];
    for (int64_t r0 = begin; r0 < end; r0 += HM_RT) {
        const int64_t n = end - r0 < HM_RT ? end - r0 : HM_RT;
        const uint64_t valid = pack_hamming_tile(st, p, r0, n, ex);
        if (!valid) continue;
        const uint64_t* tile = static_cast<const uint64_t*>(st.tile);
        for (int64_t q = 0; q < p.n_q; ++q) {
            const uint64_t* qw = queries + q * W;
            for (int64_t r = 0; r < HM_RT; ++r) dist[r] = 0;
            for (int64_t j = 0; j < W; ++j)
                for (int64_t r = 0; r < HM_RT; ++r) dist[r] += popcount64(tile[j * HM_RT + r] ^ qw[j]);
            const int64_t lim = st.max_dist[q];
            uint64_t mask = 0;
            for (int64_t r = 0; r < HM_RT; ++r)
                if (static_cast<int64_t>(dist[r]) <= lim) mask |= uint64_t{1} << r;
            mask &= valid;
            if (mask) hamming_offer(st, p, q, mask, dist, p.row_offset + r0);
        }
    }
}
#endif

}  // namespace

#if defined(NUDGEFAST_AVX512)
extern const QTopkKernel qtopk_int8_kernel = {"avx512", I8_QT, I8_RT, &int8_query_bytes<2>, &pack_int8_queries<2>,
                                              &int8_tile_bytes<2>, &int8_block<2, &int8_tile_madd_rows>};
extern const QTopkKernel qtopk_hamming_kernel = {"avx512", 1, HM_RT, &hamming_query_bytes, &pack_hamming_queries,
                                                 &hamming_tile_bytes, &hamming_block_bw};
#if defined(NUDGEFAST_AVX512_SUBPATHS)
extern const QTopkKernel qtopk_int8_vnni_kernel = {"avx512-vnni", I8_QT, I8_RT, &int8_query_bytes<4>,
                                                   &pack_int8_queries<4>, &int8_tile_bytes<4>,
                                                   &int8_block<4, &int8_tile_vnni_rows>};
extern const QTopkKernel qtopk_hamming_vpopcnt_kernel = {"avx512-vpopcntdq", 1, HM_RT, &hamming_query_bytes,
                                                         &pack_hamming_queries, &hamming_tile_bytes,
                                                         &hamming_block_vpopcnt};
#endif
#elif defined(NUDGEFAST_AVX2)
extern const QTopkKernel qtopk_int8_kernel = {"avx2", I8_QT, I8_RT, &int8_query_bytes<2>, &pack_int8_queries<2>,
                                              &int8_tile_bytes<2>, &int8_block<2, &int8_tile_madd_rows>};
extern const QTopkKernel qtopk_hamming_kernel = {"avx2", 1, HM_RT, &hamming_query_bytes, &pack_hamming_queries,
                                                 &hamming_tile_bytes, &hamming_block_avx2};
#else
extern const QTopkKernel qtopk_int8_kernel = {"baseline", I8_QT, I8_RT, &int8_query_bytes<4>, &pack_int8_queries<4>,
                                              &int8_tile_bytes<4>, &int8_block<4, &int8_tile_bytes_rows>};
extern const QTopkKernel qtopk_hamming_kernel = {"baseline", 1, HM_RT, &hamming_query_bytes, &pack_hamming_queries,
                                                 &hamming_tile_bytes, &hamming_block_scalar};
#endif

}  // namespace NUDGEFAST_LEVEL
}  // namespace nudgefast
