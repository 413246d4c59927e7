"""NUDGE fit time per backend, side by side with nudge-ft (torch CPU) on the same data.

Floor: one top-k pass of the validation queries (bench_topk.py); a fit adds the touched-records
work (O(n_val t d)), which should stay a small fraction of it.
"""
import pytest

from conftest import run
from nudgefast import NudgeM, NudgeN
from nudgefast import benchmark as nfb


@pytest.mark.parametrize("cls", [NudgeN, NudgeM], ids=["NudgeN", "NudgeM"])
def test_fit_nudgefast(benchmark, workload, backend, cls):
    w = workload
    est = cls(backend=backend, progress=False)
    benchmark.extra_info.update(n=w.n, d=w.corpus.shape[1], train=len(w.train), val=len(w.val))
    run(benchmark, lambda: est.fit(w.corpus, w.train, w.val))


@pytest.mark.parametrize("variant", ["NudgeN", "NudgeM"])
def test_fit_nudge_ft(benchmark, workload, variant):
    pytest.importorskip("torch")
    pytest.importorskip("nudge")
    w = workload
    need = nfb.REFERENCE_BYTES_PER_RECORD_QUERY * w.n * len(w.val)
    if need > nfb._available_memory() // 2:
        pytest.skip(f"nudge-ft needs ~{need / 2**30:.0f} GiB at this size")
    benchmark.pedantic(nfb.reference_fit(variant, w.corpus, w.train, w.val), rounds=1,
                       iterations=1, warmup_rounds=0)
