"""`nudgefast bench` and its workloads: a tiny end-to-end run writes the table and the plots."""
from __future__ import annotations

import os
import types

import numpy as np
import pytest

from nudgefast import benchmark, cli


def test_workload_memmap_is_read_only(tmp_path):
    w = benchmark.synthetic_workload(1000, 12, 40, 10, memmap_dir=tmp_path)
    assert isinstance(w.corpus, np.memmap) and not w.corpus.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(w.corpus, axis=1), 1.0, rtol=1e-5)
    assert len(w.train) == 40 and len(w.val) == 10


def test_measure_times_each_run_after_the_warmup(monkeypatch):
    """On a clock the runs themselves advance: the warm-up is not timed, each run is, and the
    median and spread are those of the timed runs."""
    clock = [0.0]
    durations = iter([7.0, 3.0, 1.0, 2.0, 5.0, 4.0])  # the first is the warm-up

    def run():
        clock[0] += next(durations)

    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    t = benchmark.measure(run, repeat=5, warmup=1)
    assert t.runs == [3.0, 1.0, 2.0, 5.0, 4.0]
    assert t.median == 3.0 and t.spread == (1.0, 5.0)
    assert str(t) == "3 s (1-5)"


def test_bench_cli_writes_report_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    rc = cli.main(["bench", "--sizes", "1500,3000", "--d", "16", "--train", "60", "--val", "20",
                   "--repeat", "1", "--threads", "1", "--backends", "numpy", "--peers", "",
                   "--out", str(out)])
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "| synthetic N=3000 d=16 | 3000 | fit NudgeN | numpy |" in report
    assert f"(1 of {os.cpu_count()} cores used)" in report
    for name in ("fit_time", "topk_throughput", "peak_memory", "speedup"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out
