"""The device check's dry mode (bench/device_check.sh OUT --dry) end to end on the CPU, so the
script cannot rot between device windows: every step gets a recorded status, none fails, and the
report, results.json and the other output files are written with the structure the lead commits."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "build", "tests", "floors", "topk-cuda", "fit-cuda", "cpp", "san-probe",
         "memcheck", "racecheck", "initcheck", "launch-sweep"]

pytestmark = pytest.mark.skipif(
    os.environ.get("NUDGEFAST_DEVICE_CHECK") == "1",
    reason="inside a real device check run: its dry mode is checked in CI")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_dry_run_records_every_step_and_writes_the_report(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("DC_ONLY", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), str(out), "--dry"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert files <= {"report.md", "results.json", "bench.json", "env.json", "steps.tsv",
                     "junit.xml", "log.txt"}, files  # the device tool returns at most 8 files
    res = json.loads((out / "results.json").read_text())
    statuses = {s["step"]: s["status"] for s in res["steps"]}
    assert list(statuses) == STEPS
    log = (out / "log.txt").read_text()
    # A crash is 'failed' (or 'timeout'); dry mode must have none.
    assert res["failed_steps"] == [], log[-4000:]
    assert all(s in ("ok", "skipped") for s in statuses.values()), statuses
    for name in ("topk-cuda", "fit-cuda", "san-probe", "memcheck", "racecheck", "initcheck", "launch-sweep"):
        assert statuses[name] == "skipped", name
    for name in ("env", "build", "tests", "floors", "cpp"):
        assert statuses[name] == "ok", name
    assert res["dry"] is True and res["complete"] is True
    assert res["tests"]["tests"] > 0 and res["tests"]["failures"] == 0
    # The dry run's subset includes the GPU-only files; without a GPU they skip, and say so.
    gpu_files = res["tests"]["gpu_files"]
    assert set(gpu_files) == {"test_cuda", "test_cuda_qtopk"}, gpu_files
    assert all(t["skipped"] >= 1 and t["failed"] == 0 for t in gpu_files.values()), gpu_files
    figs = res["figures"]
    ok = [f for f in figs if f["status"] == "ok"]
    assert {f["who"].split(" (")[0] for f in ok} >= {"cpp", "torch CPU mm+topk"}
    assert all(f["median_s"] > 0 and f["record_queries_per_s"] > 0 for f in ok if f["n"])
    assert not [f for f in figs if f["status"].startswith("failed")], figs
    report = (out / "report.md").read_text()
    for heading in ("## Summary", "## Tests", "## Figures", "no step failed", "tests/test_cuda_qtopk.py: "):
        assert heading in report
    for name in STEPS:
        assert f"| {name} |" in report
    assert res["commit_to"].startswith("bench/results/") and res["commit_to"].endswith("_device-check")


def test_report_marks_a_crashed_step_failed(tmp_path):
    """The summary cannot pass a crash: a non-zero step is 'failed' and listed."""
    (tmp_path / "steps.tsv").write_text("env\tok\t0\t1\t15\t\ntests\tfailed\t2\t3\t130\texit 2\n")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import device_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    device_check.report(tmp_path, dry=True)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["failed_steps"] == ["tests"]
    assert "**failed steps: tests**" in (tmp_path / "report.md").read_text()


def test_report_tallies_the_gpu_test_files(tmp_path):
    """The report says per GPU-only file how many cases passed, failed and skipped (a device
    check that skipped tests/test_cuda_qtopk.py checked nothing of it), from collected cases
    and from a module skipped whole at collection."""
    (tmp_path / "steps.tsv").write_text("tests\tfailed\t1\t3\t170\texit 1\n")
    (tmp_path / "junit.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" '
        'failures="1" skipped="2" tests="5">'
        '<testcase classname="tests.test_cuda_qtopk" name="test_a[1]"/>'
        '<testcase classname="tests.test_cuda_qtopk" name="test_a[2]"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_cuda_qtopk" name="test_b"><skipped message="s"/></testcase>'
        '<testcase classname="" name="tests.test_cuda"><skipped message="collection skipped"/></testcase>'
        '<testcase classname="tests.ops.test_project" name="test_c"/>'
        '</testsuite></testsuites>')
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import device_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    device_check.report(tmp_path, dry=False)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["tests"]["gpu_files"] == {
        "test_cuda_qtopk": {"run": 3, "passed": 1, "failed": 1, "skipped": 1},
        "test_cuda": {"run": 1, "passed": 0, "failed": 0, "skipped": 1}}
    report = (tmp_path / "report.md").read_text()
    assert "- tests/test_cuda_qtopk.py: 1 passed, 1 failed, 1 skipped" in report
    assert "- tests/test_cuda.py: 0 passed, 0 failed, 1 skipped" in report
