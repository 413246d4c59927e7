"""`nudgefast bench` and its workloads: a tiny end-to-end run writes the table and the plots."""
from __future__ import annotations

import numpy as np
import pytest

from nudgefast import benchmark, cli


def test_workload_memmap_is_read_only(tmp_path):
    w = benchmark.synthetic_workload(1000, 12, 40, 10, memmap_dir=tmp_path)
    assert isinstance(w.corpus, np.memmap) and not w.corpus.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(w.corpus, axis=1), 1.0, rtol=1e-5)
    assert len(w.train) == 40 and len(w.val) == 10


def test_measure_reports_median_and_spread():
    t = benchmark.measure(lambda: sum(range(1000)), repeat=5, warmup=1)
    assert len(t.runs) == 5 and t.spread[0] <= t.median <= t.spread[1]


def test_bench_cli_writes_report_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    rc = cli.main(["bench", "--sizes", "1500,3000", "--d", "16", "--train", "60", "--val", "20",
                   "--repeat", "1", "--backends", "numpy", "--peers", "", "--out", str(out)])
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "| synthetic N=3000 d=16 | 3000 | fit NudgeN | numpy |" in report
    assert "2 of 2 cores" in report or "cores used" in report
    for name in ("fit_time", "topk_throughput", "peak_memory", "speedup"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out
