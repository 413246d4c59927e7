"""Top-k throughput: one search of the validation queries over the corpus, per backend and FAISS.

Floor: 2 * n_val * N * d flops at the machine's matrix rate (FAISS IndexFlatIP runs BLAS sgemm,
the best this CPU does), or N * d * 4 bytes over memory bandwidth when the corpus is not cached.
"""
import pytest

from conftest import run
from nudgefast import benchmark as nfb
from nudgefast import search


def test_topk_nudgefast(benchmark, workload, backend):
    w = workload
    benchmark.extra_info.update(n=w.n, d=w.corpus.shape[1], n_queries=len(w.val), k=10)
    run(benchmark, lambda: search(w.val.embeddings, w.corpus, 10, backend=backend,
                                  progress=False))


def test_topk_faiss_flat(benchmark, workload):
    pytest.importorskip("faiss")
    w = workload
    benchmark.extra_info.update(n=w.n, d=w.corpus.shape[1], n_queries=len(w.val), k=10)
    run(benchmark, nfb.faiss_search(w.corpus, w.val.embeddings, 10))


@pytest.mark.parametrize("k", [10, 1_000, 10_000, 100_000])
def test_topk_large_k(benchmark, workload, backend, k):
    """Few queries, large k (a re-ranking candidate list): selection, not the GEMM, dominates.
    The fallback backend (numba) must stay within 3x of cpp up to k = 10^4."""
    w = workload
    if k > w.n:
        pytest.skip(f"k={k} > N={w.n}")
    q = w.val.embeddings[:10]
    benchmark.extra_info.update(n=w.n, d=w.corpus.shape[1], n_queries=10, k=k)
    run(benchmark, lambda: search(q, w.corpus, k, backend=backend, progress=False))
