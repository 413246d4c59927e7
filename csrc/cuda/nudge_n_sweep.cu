// nudge_n_sweep: for every validation query and every gamma of the NUDGE-N grid, how many of its
// top-k_val records are answers. All gammas in one launch.
//
// A touched record j scores alpha[g, j] * S[i, j] + beta[g, j] * H[i, j] (the closed form of
// v . x'_j(gamma); two rounded products and a rounded sum, as NumPy computes it); untouched records
// do not move with gamma, so their top-k_val per query is given (unt_scores / unt_index, -inf / -1
// padded). One warp per (query, gamma) keeps a sorted top-k_val list in shared memory with the tie
// rule (topk_common.cuh); -inf and NaN never enter, and only finite entries count as hits (the
// reference's isfinite), like the CPU backend. Answers are sorted and unique: binary search.
// kth gets each list's k_val-th score (-inf while it holds fewer): the tuner's dirty test.
//
// Dynamic shared memory: NF_SWEEP_WARPS * k_val * 16 bytes (the caller sizes it; a launch with
// less sets *error = 2 and writes nothing).
//
// UNVERIFIED ON HARDWARE: compiled to PTX (sm_80/sm_90) and run only on a CPU emulation of CUDA;
// tests/test_cuda.py checks it against the reference on a device.
#include "topk_common.cuh"

#ifndef NF_SWEEP_WARPS
#define NF_SWEEP_WARPS 4
#endif

using nf::i64;

namespace {

__device__ __forceinline__ unsigned dynamic_smem_bytes() {
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

__device__ __forceinline__ bool contains(const i64* sorted, i64 n, i64 v) {
    i64 lo = 0, hi = n;
    while (lo < hi) {
        const i64 mid = (lo + hi) >> 1;
        if (sorted[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return lo < n && sorted[lo] == v;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(NF_SWEEP_WARPS * 32)
    nudge_n_sweep(const double* S, const double* H, i64 n_b, i64 t, const double* alpha, const double* beta,
                  i64 n_gamma, const i64* touched, const double* unt_scores, const i64* unt_index, i64 n_unt,
                  const i64* ans_ptr, const i64* ans_index, i64 k_val, i64* hits, double* kth, int* error) {
    extern __shared__ __align__(16) unsigned char nf_dyn_smem[];
    const int k = static_cast<int>(k_val);
    if (k_val < 1 || dynamic_smem_bytes() < static_cast<unsigned>(NF_SWEEP_WARPS) * static_cast<unsigned>(k) * 16u) {
        if (threadIdx.x == 0) atomicExch(error, 2);
        return;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    double* ls = reinterpret_cast<double*>(nf_dyn_smem) + static_cast<i64>(warp) * k;
    i64* li = reinterpret_cast<i64*>(nf_dyn_smem + sizeof(double) * NF_SWEEP_WARPS * k) + static_cast<i64>(warp) * k;

    const i64 n_pairs = n_b * n_gamma;
    const i64 warps = static_cast<i64>(gridDim.x) * NF_SWEEP_WARPS;
    for (i64 pair = static_cast<i64>(blockIdx.x) * NF_SWEEP_WARPS + warp; pair < n_pairs; pair += warps) {
        const i64 i = pair / n_gamma, g = pair % n_gamma;
        const double* Si = S + i * t;
        const double* Hi = H + i * t;
        const double* a = alpha + g * t;
        const double* b = beta + g * t;
        auto beats = [&](double s, i64 idx, int count) -> bool {
            return count < k || nf::ranks_before(s, idx, ls[k - 1], li[k - 1]);
        };
        int count = 0;
        for (i64 base = 0; base < t; base += 32) {
            const i64 j = base + lane;
            double s = nf::neg_inf_d();
            i64 idx = -1;
            if (j < t) {
                s = __dadd_rn(__dmul_rn(a[j], Si[j]), __dmul_rn(b[j], Hi[j]));
                idx = touched[j];
            }
            const bool has = nf::admissible(s) && beats(s, idx, count);
            count = nf::warp_list_offer(ls, li, count, k, has, s, idx, beats);
        }
        for (i64 base = 0; base < n_unt; base += 32) {
            const i64 j = base + lane;
            double s = nf::neg_inf_d();
            i64 idx = -1;
            if (j < n_unt) {
                s = unt_scores[i * n_unt + j];
                idx = unt_index[i * n_unt + j];
            }
            const bool has = nf::admissible(s) && beats(s, idx, count);
            count = nf::warp_list_offer(ls, li, count, k, has, s, idx, beats);
        }
        const i64* ans = ans_index + ans_ptr[i];
        const i64 n_ans = ans_ptr[i + 1] - ans_ptr[i];
        int found = 0;
        for (int e = lane; e < count; e += 32) found += (nf::is_finite(ls[e]) && contains(ans, n_ans, li[e])) ? 1 : 0;
        found = nf::warp_sum(found);
        if (lane == 0) {
            hits[i * n_gamma + g] = found;
            kth[i * n_gamma + g] = count < k ? nf::neg_inf_d() : ls[k - 1];  // the k_val-th best
        }
        __syncwarp();  // the list is reused by this warp's next pair
    }
}
