// Shared device code of the nudgefast CUDA kernels: the tie rule, per-query sorted top-k lists
// kept in shared memory and updated by one warp, sort keys for the two-phase path, and the
// merge-path split used to merge sorted lists.
//
// The tie rule everywhere: rank by score descending, then record index ascending. It is a strict
// total order on (score, index) pairs with distinct indices, so the selected set never depends
// on the order in which candidates arrive (thread, block or chunk order), and every backend
// selects the same records from the same scores.
//
// Self-contained on purpose: no CUDA or C++ standard headers, so the file compiles under NVRTC
// (CuPy RawModule) without include paths and under `nvcc -ptx` alike. The pure functions are
// NF_HD (host and device) so a host-only test program can check them on a machine without a GPU.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define NF_HD __host__ __device__ __forceinline__
#define NF_DEV __device__ __forceinline__
#else
#define NF_HD inline
#define NF_DEV inline
#endif

namespace nf {

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// The index of an empty slot in comparisons: ranks after every real record of equal score.
// Outside the kernels an empty slot is (-inf, -1).
constexpr i64 kEmptyIndex = 0x7fffffffffffffffLL;
constexpr unsigned kFullMask = 0xffffffffu;

// Bit casts (no <cstring>, no __builtin_huge_val: NVRTC has neither).
NF_HD u32 float_bits(float f) {
    union { float f; u32 u; } v;
    v.f = f;
    return v.u;
}

NF_HD float bits_float(u32 u) {
    union { float f; u32 u; } v;
    v.u = u;
    return v.f;
}

NF_HD double bits_double(u64 u) {
    union { double f; u64 u; } v;
    v.u = u;
    return v.f;
}

NF_HD float pos_inf_f() { return bits_float(0x7f800000u); }
NF_HD float neg_inf_f() { return bits_float(0xff800000u); }
NF_HD double pos_inf_d() { return bits_double(0x7ff0000000000000ULL); }
NF_HD double neg_inf_d() { return bits_double(0xfff0000000000000ULL); }

// `a` ranks before `b` under the tie rule. NaN never ranks before anything.
template <typename S, typename I>
NF_HD bool ranks_before(S score_a, I index_a, S score_b, I index_b) {
    return score_a > score_b || (score_a == score_b && index_a < index_b);
}

// A score that may enter a top-k at all: -inf and NaN never do (both backends' rule).
NF_HD bool admissible(float score) { return score > neg_inf_f(); }
NF_HD bool admissible(double score) { return score > neg_inf_d(); }

NF_HD bool is_finite(float x) { return x > neg_inf_f() && x < pos_inf_f(); }  // false for NaN
NF_HD bool is_finite(double x) { return x > neg_inf_d() && x < pos_inf_d(); }

// ---------------------------------------------------------------------------------------------
// Sort keys for the two-phase path (k above the on-chip limit): one uint64 per (query, row) whose
// ascending order is the tie rule: high word = score mapped to an order-reversing uint32, low word
// = the row inside the scored block. Rows that are not candidates get invalid_key() (sorts last).

NF_HD constexpr u64 invalid_key() { return 0xffffffffffffffffULL; }

// Larger score -> smaller key. -0.0 is folded into +0.0 first: they compare equal as floats, so
// they must tie here too.
NF_HD u64 desc_key(float score, u32 row) {
    if (score == 0.0f) score = 0.0f;
    const u32 u = float_bits(score);
    const u32 ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (static_cast<u64>(~ascending) << 32) | row;
}

NF_HD float key_score(u64 key) {
    const u32 ascending = ~static_cast<u32>(key >> 32);
    const u32 u = (ascending & 0x80000000u) ? (ascending & 0x7fffffffu) : ~ascending;
    return bits_float(u);
}

NF_HD u32 key_row(u64 key) { return static_cast<u32>(key & 0xffffffffu); }

// ---------------------------------------------------------------------------------------------
// Merge path. A and B are sorted lists (tie rule) of lengths na, nb, where an entry with index < 0
// is an empty slot (it ranks after everything; empties only trail). Returns how many of the first
// p entries of the stable merge (A before B on equal entries) come from A.

NF_HD i64 list_key_index(i64 index) { return index < 0 ? kEmptyIndex : index; }

template <typename S>
NF_HD bool a_goes_first(S sa, i64 ia, S sb, i64 ib) {
    // A's entry is taken unless B's ranks strictly before it (stability on equal entries).
    return !ranks_before(sb, list_key_index(ib), sa, list_key_index(ia));
}

template <typename S>
NF_HD i64 merge_path_split(const S* as, const i64* ai, i64 na, const S* bs, const i64* bi, i64 nb, i64 p) {
    i64 lo = p > nb ? p - nb : 0;
    i64 hi = p < na ? p : na;
    while (lo < hi) {
        const i64 mid = (lo + hi) >> 1;      // mid < hi <= p, so p - 1 - mid >= 0
        const i64 j = p - 1 - mid;           // mid >= lo >= p - nb, so j < nb
        if (a_goes_first(as[mid], ai[mid], bs[j], bi[j]))
            lo = mid + 1;                    // A[mid] is among the first p: take more of A
        else
            hi = mid;
    }
    return lo;
}

// Entry p (0-based) of the stable merge of A and B; p < na + nb.
template <typename S>
NF_HD void merge_path_entry(const S* as, const i64* ai, i64 na, const S* bs, const i64* bi, i64 nb, i64 p,
                            S* out_s, i64* out_i) {
    const i64 i = merge_path_split(as, ai, na, bs, bi, nb, p);
    const i64 j = p - i;
    const bool take_a = i < na && (j >= nb || a_goes_first(as[i], ai[i], bs[j], bi[j]));
    *out_s = take_a ? as[i] : bs[j];
    *out_i = take_a ? ai[i] : bi[j];
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// ---------------------------------------------------------------------------------------------
// Warp primitives. Every function below is called by all 32 lanes of a warp with the same
// (warp-uniform) arguments unless a parameter says otherwise.

NF_DEV int lane_id() { return static_cast<int>(threadIdx.x & 31u); }

NF_DEV int warp_sum(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}

// ---------------------------------------------------------------------------------------------
// A per-query sorted top-k list in shared memory, maintained by one warp.
//
// ls/li hold `count` entries in rank order (best first), count <= k. The list is the state of
// the selection; the admission threshold is its worst entry once it is full, else a caller-given
// floor (the k-th entry of a previous state, so rows that cannot matter are rejected early).

// Position of (s, i) in the list: the number of entries that rank before it.
template <typename S, typename I>
NF_DEV int warp_list_position(const S* ls, const I* li, int count, S s, I i) {
    int before = 0;
    for (int j = lane_id(); j < count; j += 32) before += ranks_before(ls[j], li[j], s, i) ? 1 : 0;
    return warp_sum(before);
}

// Inserts (s, i) at its rank and returns the new count (min(count + 1, k)); the caller has checked
// that the entry beats the threshold, so its position is < k. Entries from the position on move
// one slot down, the last one falling off when the list is full. The move runs in passes of 32
// slots from the end backwards; each pass reads before it writes (separated by __syncwarp), so no
// slot is overwritten before it has been read.
template <typename S, typename I>
NF_DEV int warp_list_insert(S* ls, I* li, int count, int k, S s, I i) {
    const int lane = lane_id();
    const int pos = warp_list_position(ls, li, count, s, i);
    const int last = count < k ? count : k - 1;  // entries [pos, last) move to [pos + 1, last + 1)
    for (int hi = last; hi > pos; hi -= 32) {
        const int j = hi - 1 - lane;
        const bool moves = j >= pos;
        S vs = s;
        I vi = i;
        if (moves) {
            vs = ls[j];
            vi = li[j];
        }
        __syncwarp();
        if (moves) {
            ls[j + 1] = vs;
            li[j + 1] = vi;
        }
        __syncwarp();
    }
    // With no entry to move (pos == last) the loop above has no barrier, and slot pos was read
    // by warp_list_position (lane pos % 32) and by the caller's threshold (ls[k - 1]) with only
    // a shuffle in between: a shuffle orders no memory (racecheck on an H100 reported it).
    __syncwarp();
    if (lane == 0) {
        ls[pos] = s;
        li[pos] = i;
    }
    __syncwarp();
    return count < k ? count + 1 : k;
}

// Offers one candidate per lane (lanes with has = false offer nothing) to the list. `beats`
// decides admission against the current threshold and is re-evaluated for every candidate, since
// each insertion can tighten it: beats(s, i, count) must be warp-uniform for uniform arguments.
// Candidates are inserted in lane order; the result does not depend on that order.
template <typename S, typename I, typename Beats>
NF_DEV int warp_list_offer(S* ls, I* li, int count, int k, bool has, S s, I i, Beats beats) {
    unsigned pending = __ballot_sync(kFullMask, has);
    while (pending) {
        const int src = __ffs(pending) - 1;
        pending &= pending - 1;
        const S cs = __shfl_sync(kFullMask, s, src);
        const I ci = __shfl_sync(kFullMask, i, src);
        if (beats(cs, ci, count)) count = warp_list_insert(ls, li, count, k, cs, ci);
    }
    return count;
}

// float16 bits -> float32 (exact), without cuda_fp16.h.
NF_DEV float half_bits_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

#endif  // __CUDACC__

}  // namespace nf
