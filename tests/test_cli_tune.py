"""`nudgefast tune | update | apply`: the indexing pipeline's commands against the library.

Real data: the packaged pkg-search-6k folder (in every install) for the fast path, and one
shared dataset folder when present. Every command's output is checked against the same calls
in Python (Tuner.fit / Tuner.load + operations / Delta.apply_to); every error path exits 2
with one line and no traceback, and a failed update leaves the state file byte for byte.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REAL
from nudgefast import NudgeM, NudgeN, Tuner, cli, datasets
from nudgefast.handoff import Delta

pytestmark = pytest.mark.filterwarnings("ignore:.*have no answers and are skipped")


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def pkg():
    """The packaged dataset (in memory) and its folder."""
    return datasets.packaged()


@pytest.fixture(scope="module")
def tuned(pkg, tmp_path_factory):
    """`nudgefast tune --data <packaged>` once: the delta and state (copy before changing)."""
    out = tmp_path_factory.mktemp("tuned")
    assert cli.main(["tune", "--data", str(pkg.folder), "--out", str(out / "d.npz"),
                     "--state", str(out / "s.npz"), "--no-progress"]) == 0
    return out


def run(argv, capsys):
    """(exit status, stdout, stderr) of ``nudgefast argv`` in-process."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def python_fit(folder, variant="n"):
    ds = datasets.load(folder)
    est = (NudgeN if variant == "n" else NudgeM)(progress=False)
    tuner = Tuner(est)
    ids = ds.record_ids()
    delta = tuner.fit(ds.corpus, ds.train, ds.dev, ids=None if ids is None else np.array(ids))
    return tuner, delta


def assert_same_delta(got, want):
    """Every field but the summary (timings)."""
    assert got.variant == want.variant and got.n_records == want.n_records
    assert got.gamma == want.gamma
    assert got.previous_gamma == want.previous_gamma or (
        np.isnan(got.previous_gamma) and np.isnan(want.previous_gamma))
    for name in ("indices", "vectors", "tuned", "new", "deleted", "ids", "deleted_ids"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=name)


def assert_same_tuner(a, b):
    assert a.gamma == b.gamma and a.n_records == b.n_records
    ra, rb = a.result(), b.result()
    np.testing.assert_array_equal(ra.indices, rb.indices)
    np.testing.assert_array_equal(ra.vectors, rb.vectors)


def feedback_file(path, pkg, rows, ids_every=2):
    """Test-split queries ``rows`` as feedback lines: every ``ids_every``-th by answer_ids,
    the others by positions. Returns (embeddings float32, answer position lists)."""
    ids = pkg.record_ids()
    q = np.asarray(pkg.test.embeddings[rows], np.float32)
    answers = [[int(a) for a in pkg.test.answers[r]] for r in rows]
    with open(path, "w") as fh:
        for i, (vec, ans) in enumerate(zip(q, answers)):
            line = {"qid": f"fb-{i}", "embedding": vec.tolist()}
            if i % ids_every == 0:
                line["answer_ids"] = [ids[a] for a in ans]
            else:
                line["answers"] = ans
            fh.write(json.dumps(line) + "\n")
    return q, answers


def shared_split(folder, name, q, answers):
    """Queries in the shared format: name.npy + name.jsonl."""
    np.save(folder / f"{name}.npy", q)
    with open(folder / f"{name}.jsonl", "w") as fh:
        for i, a in enumerate(answers):
            fh.write(json.dumps({"qid": f"{name}-{i}", "answers": [int(x) for x in a],
                                 "relevance": [1.0] * len(a)}) + "\n")
    return folder / f"{name}.npy", folder / f"{name}.jsonl"


# ----------------------------------------------------------------------------------------
# tune


def test_tune_writes_the_fit_delta_and_state(pkg, tuned, capsys):
    tuner, want = python_fit(pkg.folder)
    got = Delta.load(tuned / "d.npz")
    assert_same_delta(got, want)
    assert got.ids.dtype.kind == "U" and got.summary["op"] == "fit"
    # The state reopens the memory-mapped corpus it was fitted on (no --corpus needed).
    again = Tuner.load(tuned / "s.npz", progress=False)
    assert_same_tuner(again, tuner)
    # The human summary: gamma, touched rows, where the files went.
    rc, out, err = run(["tune", "--data", pkg.folder, "--out", tuned / "again.npz",
                        "--no-progress"], capsys)
    assert rc == 0 and err == ""
    assert f"gamma {want.gamma:.6g}, {want.indices.size} touched rows" in out
    assert str(tuned / "again.npz") in out and "state ->" not in out


def test_tune_files_one_by_one_json_and_int_ids(pkg, tmp_path, capsys):
    """--corpus ... --val-qrels equals --data; an all-integer ids file gives int ids."""
    f = pkg.folder
    n = pkg.corpus.shape[0]
    (tmp_path / "ids.txt").write_text("".join(f"{1000 + 3 * p}\n" for p in range(n)))
    rc, out, err = run(["tune", "--corpus", f / "corpus.npy", "--train", f / "queries_train.npy",
                        "--train-qrels", f / "qrels_train.jsonl", "--val", f / "queries_dev.npy",
                        "--val-qrels", f / "qrels_dev.jsonl", "--ids", tmp_path / "ids.txt",
                        "--method", "m", "--margin", "8", "--threads", "2", "--out",
                        tmp_path / "m.npz", "--state", tmp_path / "m_state.npz", "--json"],
                       capsys)
    assert rc == 0, err
    summary = json.loads(out)  # one JSON object, nothing else on stdout
    _, want = python_fit(f, "m")
    got = Delta.load(tmp_path / "m.npz")
    assert got.ids.dtype == np.int64
    np.testing.assert_array_equal(got.ids, 1000 + 3 * want.indices)
    got.ids = got.deleted_ids = want.ids = want.deleted_ids = None
    assert_same_delta(got, want)
    assert summary["command"] == "tune" and summary["variant"] == "nudge-m"
    assert summary["gamma"] == want.gamma and summary["rows"] == want.indices.size
    assert summary["touched"] == want.indices.size and summary["ids"] is True
    assert summary["out"] == str(tmp_path / "m.npz")
    assert summary["state"] == str(tmp_path / "m_state.npz")
    assert Tuner.load(tmp_path / "m_state.npz").margin == 8


def test_progress_bars_on_a_terminal_only(pkg, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["tune", "--data", pkg.folder, "--out", tmp_path / "d.npz"]
    rc, _, err = run(argv, capsys)
    assert rc == 0 and "NUDGE corpus pass" in err
    rc, _, err = run(argv + ["--no-progress"], capsys)
    assert rc == 0 and err == ""


@pytest.mark.skipif(not REAL, reason="no real dataset under ../shared/data")
def test_tune_and_update_on_a_shared_dataset(tmp_path, capsys):
    folder = next((p for p in REAL if p.name == "pkg-search-20k-ft"), REAL[0])
    ds = datasets.load(folder)
    rc, out, err = run(["tune", "--data", folder, "--method", "n", "--k-val", "3", "--state",
                        tmp_path / "s.npz", "--json", "--no-progress"], capsys)
    assert rc == 0, err
    summary = json.loads(out)
    tuner = Tuner(NudgeN(k_val=3, progress=False))
    tuner.fit(ds.corpus, ds.train, ds.dev, ids=np.array(ds.record_ids()))
    assert summary["gamma"] == tuner.gamma and summary["out"] is None
    # Feedback in the shared format: the first 200 test queries.
    q = np.asarray(ds.test.embeddings[:200], np.float32)
    answers = [list(a) for a in ds.test.answers[:200]]
    qpath, rpath = shared_split(tmp_path, "fb", q, answers)
    rc, out, err = run(["update", "--state", tmp_path / "s.npz", "--feedback-queries", qpath,
                        "--feedback-qrels", rpath, "--out", tmp_path / "u.npz", "--json",
                        "--no-progress"], capsys)
    assert rc == 0, err
    want = tuner.add_feedback(q, answers)
    assert_same_delta(Delta.load(tmp_path / "u.npz"), want)
    assert_same_tuner(Tuner.load(tmp_path / "s.npz"), tuner)
    assert json.loads(out)["operations"][0]["feedback_ids"] == want.summary["feedback_ids"]


def test_entry_point(pkg, tmp_path):
    """`python -m nudgefast tune`: the real entry point, outside this process."""
    proc = subprocess.run([sys.executable, "-m", "nudgefast", "tune", "--data", str(pkg.folder),
                           "--out", "d.npz", "--json"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["out"] == str(tmp_path / "d.npz") and summary["rows"] > 0
    assert "NUDGE corpus pass" not in proc.stderr  # not a terminal: no bars
    assert Delta.load(tmp_path / "d.npz").indices.size == summary["rows"]


# ----------------------------------------------------------------------------------------
# update


def test_update_feedback_equals_the_same_calls_in_python(pkg, tuned, tmp_path, capsys):
    shutil.copy(tuned / "s.npz", tmp_path / "s.npz")
    q, answers = feedback_file(tmp_path / "fb.jsonl", pkg, range(0, 24))
    rc, out, err = run(["update", "--state", tmp_path / "s.npz", "--feedback",
                        tmp_path / "fb.jsonl", "--out", tmp_path / "u.npz", "--json"], capsys)
    assert rc == 0, err
    py = Tuner.load(tuned / "s.npz", progress=False)
    want = py.add_feedback(q, answers)
    assert_same_delta(Delta.load(tmp_path / "u.npz"), want)
    assert_same_tuner(Tuner.load(tmp_path / "s.npz"), py)
    summary = json.loads(out)
    op = summary["operations"][0]
    assert op["flag"] == "--feedback" and op["op"] == "add_feedback"
    assert op["feedback_ids"] == want.summary["feedback_ids"]
    assert summary["gamma"] == py.gamma and summary["rows"] == want.indices.size
    assert summary["state"] == str(tmp_path / "s.npz")
    # Human output, into --state-out: the new feedback ids are printed for --remove-feedback.
    rc, out, err = run(["update", "--state", tmp_path / "s.npz", "--state-out",
                        tmp_path / "s2.npz", "--remove-feedback",
                        ",".join(map(str, op["feedback_ids"][:3]))], capsys)
    assert rc == 0, err
    first = op["feedback_ids"][0]
    assert f"removed {first}-{first + 2}" in out and "not written: no --out" in out
    py.remove_feedback(op["feedback_ids"][:3])
    assert_same_tuner(Tuner.load(tmp_path / "s2.npz"), py)


def test_update_every_operation_in_one_call(pkg, tuned, tmp_path, capsys):
    """All seven operations in one update: the same state as the same calls in Python, and
    one delta equal to Delta.combine of theirs; writing it equals writing them one by one."""
    shutil.copy(tuned / "s.npz", tmp_path / "s.npz")
    ids = pkg.record_ids()
    q_fb, a_fb = feedback_file(tmp_path / "fb.jsonl", pkg, range(0, 20))
    q_sf = np.asarray(pkg.test.embeddings[20:50], np.float32)
    a_sf = [list(a) for a in pkg.test.answers[20:50]]
    sf_q, sf_r = shared_split(tmp_path, "more_feedback", q_sf, a_sf)
    q_val = np.asarray(pkg.test.embeddings[50:120], np.float32)
    a_val = [list(a) for a in pkg.test.answers[50:120]]
    val_q, val_r = shared_split(tmp_path, "more_val", q_val, a_val)
    rows = (np.asarray(pkg.corpus[[a[0] for a in a_val[:6]]], np.float32)
            + 0.01 * q_val[:6]).astype(np.float16)
    np.save(tmp_path / "rows.npy", rows)
    new_ids = [f"new-{i}" for i in range(6)]
    (tmp_path / "rows.txt").write_text("\n".join(new_ids) + "\n")
    py = Tuner.load(tuned / "s.npz", progress=False)
    gone_tuned = int(py.touched[3])  # a tuned row written by the fit, then deleted
    deltas = [py.add_feedback(q_fb, a_fb), py.add_feedback(q_sf, a_sf),
              py.remove_feedback([5, 9, 1690]), py.add_validation(q_val, a_val),
              py.add_records(rows, ids=new_ids), py.delete_records([6001, 17]),
              py.delete_records(ids=[ids[gone_tuned], "new-4"])]
    rc, out, err = run(["update", "--state", tmp_path / "s.npz",
                        "--feedback", tmp_path / "fb.jsonl",
                        "--feedback-queries", sf_q, "--feedback-qrels", sf_r,
                        "--remove-feedback", "5,9,1690",
                        "--add-validation", val_q, "--add-validation-qrels", val_r,
                        "--add-records", tmp_path / "rows.npy",
                        "--record-ids", tmp_path / "rows.txt",
                        "--delete-records", "6001,17", "--delete-ids", f"{ids[gone_tuned]},new-4",
                        "--out", tmp_path / "u.npz", "--json"], capsys)
    assert rc == 0, err
    got = Delta.load(tmp_path / "u.npz")
    assert_same_delta(got, Delta.combine(deltas))
    assert_same_tuner(Tuner.load(tmp_path / "s.npz"), py)
    summary = json.loads(out)
    assert [o["flag"] for o in summary["operations"]] == [
        "--feedback", "--feedback-queries", "--remove-feedback", "--add-validation",
        "--add-records", "--delete-records", "--delete-ids"]
    assert [o["op"] for o in summary["operations"]] == [d.summary["op"] for d in deltas]
    assert summary["deleted"] == 4 and summary["n_records"] == 6006
    assert gone_tuned in got.deleted and gone_tuned not in got.indices
    assert got.new.sum() == 4 and got.previous_gamma == deltas[0].previous_gamma
    # Into a served array: the combined delta gives what the seven deltas give in turn (but
    # at deleted positions, which a position-keyed target leaves to the caller's id map).
    served = np.zeros((6006, rows.shape[1]), np.float32)
    served[:6000] = unit(pkg.corpus)
    one_by_one = served.copy()
    for d in deltas:
        d.apply_to(one_by_one)
    got.apply_to(served)
    live = ~np.isin(np.arange(6006), got.deleted)
    np.testing.assert_array_equal(served[live], one_by_one[live])


# ----------------------------------------------------------------------------------------
# Delta.combine


def small_delta(indices, value, *, tuned=True, new=(), deleted=(), n=20, gamma=0.2,
                previous=0.1, ids=True, d=3):
    indices = np.asarray(indices, np.int64)
    deleted = np.asarray(deleted, np.int64)
    name = (lambda p: np.array([f"r{x}" for x in p], dtype=str)) if ids else (lambda p: None)
    return Delta("nudge-n", gamma, indices, np.full((indices.size, d), value, np.float32),
                 np.full(indices.size, tuned, bool), np.isin(indices, new), deleted, n,
                 previous_gamma=previous, ids=name(indices), deleted_ids=name(deleted),
                 summary={"op": f"op{value}", "rescanned": 1, "seconds": 0.5})


def test_combine_later_rows_win_and_new_stays_new():
    a = small_delta([1, 2, 20], 1.0, new=[20], n=21, gamma=0.2, previous=0.1)
    b = small_delta([2, 3, 20], 2.0, tuned=False, n=21, gamma=0.3, previous=0.2)
    c = Delta.combine([a, b])
    np.testing.assert_array_equal(c.indices, [1, 2, 3, 20])
    np.testing.assert_array_equal(c.vectors[:, 0], [1, 2, 2, 2])
    np.testing.assert_array_equal(c.tuned, [True, False, False, False])
    np.testing.assert_array_equal(c.new, [False, False, False, True])
    np.testing.assert_array_equal(c.ids, ["r1", "r2", "r3", "r20"])
    assert (c.gamma, c.previous_gamma, c.n_records) == (0.3, 0.1, 21)
    assert c.summary["ops"] == ["op1.0", "op2.0"] and c.summary["rescanned"] == 2
    assert c.summary["reverted"] == 2 and c.summary["new"] == 1
    assert [s["op"] for s in c.summary["operations"]] == ["op1.0", "op2.0"]


def test_combine_deletions_accumulate_and_drop_earlier_writes():
    a = small_delta([4, 6], 1.0, deleted=[9])
    b = small_delta([7], 2.0, deleted=[4, 5])
    c = Delta.combine([a, b])
    np.testing.assert_array_equal(c.indices, [6, 7])
    np.testing.assert_array_equal(c.deleted, [4, 5, 9])
    np.testing.assert_array_equal(c.deleted_ids, ["r4", "r5", "r9"])
    # Sequential and combined agree on an IndexIDMap2 too (where a kept write of 4 would
    # bring the deleted record back).
    faiss = pytest.importorskip("faiss")
    keys = np.arange(20, dtype=np.int64) + 100
    one, both = (faiss.IndexIDMap2(faiss.IndexFlatIP(3)) for _ in range(2))
    for index in (one, both):
        index.add_with_ids(np.ones((20, 3), np.float32), keys)
    for d in (a, b):
        d.apply_to(one, ids=keys)
    c.apply_to(both, ids=keys)
    assert one.ntotal == both.ntotal == 17
    for k in keys[~np.isin(np.arange(20), [4, 5, 9])]:
        np.testing.assert_array_equal(one.reconstruct(int(k)), both.reconstruct(int(k)))


def test_combine_refuses_what_cannot_be_combined():
    with pytest.raises(ValueError, match="nothing to combine"):
        Delta.combine([])
    with pytest.raises(ValueError, match="writes position 4, which an earlier delta deleted"):
        Delta.combine([small_delta([1], 1.0, deleted=[4]), small_delta([4], 2.0)])
    with pytest.raises(ValueError, match="some carry record ids"):
        Delta.combine([small_delta([1], 1.0), small_delta([2], 2.0, ids=False)])
    one = small_delta([1, 2], 1.0, ids=False)
    c = Delta.combine([one])
    assert c.ids is None and c.deleted_ids is None
    np.testing.assert_array_equal(c.vectors, one.vectors)


# ----------------------------------------------------------------------------------------
# apply


@pytest.fixture()
def served(pkg, tmp_path):
    """The untuned served vectors (normalised base rows, float32) as a .npy file."""
    path = tmp_path / "served.npy"
    np.save(path, unit(pkg.corpus))
    return path


def test_apply_to_npy(tuned, served, capsys):
    base = np.load(served)
    delta = Delta.load(tuned / "d.npz")
    rc, out, err = run(["apply", tuned / "d.npz", "--to", served], capsys)
    assert rc == 0, err
    assert f"wrote {delta.indices.size} rows" in out
    after = np.load(served)
    np.testing.assert_array_equal(after[delta.indices], delta.vectors)
    keep = np.setdiff1d(np.arange(base.shape[0]), delta.indices)
    np.testing.assert_array_equal(after[keep], base[keep])


def test_apply_to_parquet(pkg, tuned, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    base = unit(pkg.corpus)
    n, d = base.shape
    path = tmp_path / "served.parquet"
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(base.ravel()), d)
    pq.write_table(pa.table({"id": pkg.record_ids(), "vector": vectors}), path)
    rc, out, err = run(["apply", tuned / "d.npz", "--to", path, "--json"], capsys)
    assert rc == 0, err
    summary = json.loads(out)
    delta = Delta.load(tuned / "d.npz")
    assert summary["kind"] == "parquet" and summary["rows"] == delta.indices.size
    table = pq.read_table(path)
    got = np.asarray(table["vector"].combine_chunks().flatten().to_numpy()).reshape(n, d)
    assert table["id"].to_pylist() == pkg.record_ids()
    np.testing.assert_array_equal(got[delta.indices], delta.vectors)
    assert sorted(os.listdir(tmp_path)) == ["served.parquet"]


def test_apply_to_faiss_idmap2(pkg, tuned, tmp_path, capsys):
    """A fit then an update with deletions into an IndexIDMap2 file, by --ids."""
    faiss = pytest.importorskip("faiss")
    base = unit(pkg.corpus)
    n, d = base.shape
    keys = 7 * np.arange(n, dtype=np.int64) + 11
    (tmp_path / "keys.txt").write_text("\n".join(map(str, keys)) + "\n")
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    index.add_with_ids(base, keys)
    path = tmp_path / "served.faiss"
    faiss.write_index(index, str(path))
    fit = Delta.load(tuned / "d.npz")
    rc, out, err = run(["apply", tuned / "d.npz", "--to", path, "--ids", tmp_path / "keys.txt"],
                       capsys)
    assert rc == 0, err
    assert f"wrote {fit.indices.size} rows" in out
    shutil.copy(tuned / "s.npz", tmp_path / "s.npz")
    rc, _, err = run(["update", "--state", tmp_path / "s.npz", "--delete-records", "3,10,40",
                      "--out", tmp_path / "u.npz"], capsys)
    assert rc == 0, err
    rc, _, err = run(["apply", tmp_path / "u.npz", "--to", path, "--ids", tmp_path / "keys.txt"],
                     capsys)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["keys.txt", "s.npz", "served.faiss", "u.npz"]
    index = faiss.read_index(str(path))
    assert isinstance(index, faiss.IndexIDMap2) and index.ntotal == n - 3
    want = base.copy()
    fit.apply_to(want)
    Delta.load(tmp_path / "u.npz").apply_to(want)
    for p in np.r_[fit.indices[::50], [0, 1, n - 1]]:
        if p not in (3, 10, 40):
            np.testing.assert_array_equal(index.reconstruct(int(keys[p])), want[p])
    with pytest.raises(RuntimeError):
        index.reconstruct(int(keys[10]))


def test_apply_int_ids_from_tune_key_faiss_directly(pkg, tmp_path, capsys):
    """tune --ids with integer ids: the delta keys an IndexIDMap2 without --ids."""
    faiss = pytest.importorskip("faiss")
    f = pkg.folder
    base = unit(pkg.corpus)
    keys = np.arange(base.shape[0], dtype=np.int64) * 2
    (tmp_path / "ids.txt").write_text("\n".join(map(str, keys)) + "\n")
    rc, _, err = run(["tune", "--corpus", f / "corpus.npy", "--train", f / "queries_train.npy",
                      "--train-qrels", f / "qrels_train.jsonl", "--val", f / "queries_dev.npy",
                      "--val-qrels", f / "qrels_dev.jsonl", "--ids", tmp_path / "ids.txt",
                      "--out", tmp_path / "d.npz"], capsys)
    assert rc == 0, err
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(base.shape[1]))
    index.add_with_ids(base, keys)
    faiss.write_index(index, str(tmp_path / "served.index"))
    rc, _, err = run(["apply", tmp_path / "d.npz", "--to", tmp_path / "served.index"], capsys)
    assert rc == 0, err
    delta = Delta.load(tmp_path / "d.npz")
    index = faiss.read_index(str(tmp_path / "served.index"))
    p = int(delta.indices[0])
    np.testing.assert_array_equal(index.reconstruct(int(keys[p])), delta.vectors[0])


# ----------------------------------------------------------------------------------------
# Errors: exit status 2, one line on stderr, no traceback


@pytest.fixture(scope="module")
def bad(pkg, tuned, tmp_path_factory):
    """Files for the error cases (paths by name), built once."""
    t = tmp_path_factory.mktemp("bad")
    f = pkg.folder
    n, d = pkg.corpus.shape
    files = {"pkg": f, "state": tuned / "s.npz", "delta": tuned / "d.npz", "t": t}
    (t / "empty").mkdir()
    (t / "text.npy").write_text("not an array\n")
    np.save(t / "flat.npy", np.zeros(10, np.float32))
    np.save(t / "d10.npy", np.zeros((5, 10), np.float32))
    np.save(t / "q3.npy", np.asarray(pkg.train.embeddings[:3], np.float32))
    (t / "q3_two.jsonl").write_text('{"answers": [1]}\n{"answers": [2]}\n')
    (t / "q3_badjson.jsonl").write_text('{"answers": [1]}\n{"answers": [2\n{"answers": [3]}\n')
    (t / "q3_strs.jsonl").write_text('{"answers": ["a"]}\n{"answers": [2]}\n{"answers": [3]}\n')
    (t / "q3_far.jsonl").write_text('{"answers": [1]}\n{"answers": [99999]}\n{"answers": [3]}\n')
    (t / "q3_ok.jsonl").write_text('{"answers": [1]}\n{"answers": [2]}\n{"answers": [3]}\n')
    (t / "ids_short.txt").write_text("a\nb\n")
    (t / "ids_int.txt").write_text("".join(f"{p}\n" for p in range(n)))
    other = np.array(pkg.corpus)
    other[::7] = other[::-7][:other[::7].shape[0]]
    np.save(t / "other.npy", other)
    np.save(t / "other_shape.npy", np.asarray(pkg.corpus)[:-1])
    (t / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    emb = json.dumps(np.asarray(pkg.test.embeddings[0], np.float32).tolist())
    lines = {
        "fb_badjson": f'{{"embedding": {emb}, "answers": [1]}}\n{{"embedding": [1,\n',
        "fb_noemb": '{"answers": [1]}\n',
        "fb_short": '{"embedding": [0.1, 0.2, 0.3], "answers": [1]}\n',
        "fb_nan": '{"embedding": [NaN' + ", 0.0" * (d - 1) + '], "answers": [1]}\n',
        "fb_both": f'{{"embedding": {emb}, "answers": [1], "answer_ids": ["0ad"]}}\n',
        "fb_neither": f'{{"embedding": {emb}}}\n',
        "fb_unknown_id": f'\n{{"embedding": {emb}, "answer_ids": ["no-such-package"]}}\n',
        "fb_int_id": f'{{"embedding": {emb}, "answer_ids": [3]}}\n',
        "fb_far": f'{{"embedding": {emb}, "answers": [{n}]}}\n',
        "fb_empty_answers": f'{{"embedding": {emb}, "answers": []}}\n',
        "fb_list": "[1, 2, 3]\n",
        "fb_blank": "\n\n",
        "fb_ok": f'{{"embedding": {emb}, "answers": [1]}}\n',
    }
    for name, text in lines.items():
        (t / f"{name}.jsonl").write_text(text)
    # A state fitted on an in-memory corpus: load needs --corpus.
    tuner = Tuner(NudgeN(progress=False))
    tuner.fit(np.asarray(pkg.corpus), pkg.train, pkg.dev)
    tuner.save(t / "in_memory_state.npz")
    np.save(t / "served_d10.npy", np.zeros((n, 10), np.float32))
    np.save(t / "served.npy", unit(pkg.corpus))
    (t / "served.faiss").write_bytes(b"not an index")
    (t / "served.csv").write_text("1,2\n")
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    index.add_with_ids(unit(pkg.corpus), np.arange(n, dtype=np.int64))
    faiss.write_index(index, str(t / "idmap.faiss"))
    return files


def _tune_files(f, **swap):
    """--corpus ... --val-qrels of the packaged folder, some swapped."""
    files = {"--corpus": f / "corpus.npy", "--train": f / "queries_train.npy",
             "--train-qrels": f / "qrels_train.jsonl", "--val": f / "queries_dev.npy",
             "--val-qrels": f / "qrels_dev.jsonl"}
    files.update({"--" + k.replace("_", "-"): v for k, v in swap.items()})
    return [x for kv in files.items() for x in kv]


ERRORS = {
    # name: (argv from the files of ``bad``, message expected on the line)
    "tune: no such folder": (lambda b: ["tune", "--data", b["t"] / "nope", "--out",
                                        b["t"] / "x.npz"], "is not a folder"),
    "tune: not a dataset folder": (lambda b: ["tune", "--data", b["t"] / "empty", "--out",
                                              b["t"] / "x.npz"], "(missing corpus.npy, queries_train.npy"),
    "tune: no such val split": (lambda b: ["tune", "--data", b["pkg"], "--val-split", "nope",
                                           "--out", b["t"] / "x.npz"], "queries_nope.npy"),
    "tune: --data and --corpus": (lambda b: ["tune", "--data", b["pkg"], "--corpus", "x.npy"],
                                  "not allowed with argument --data"),
    "tune: --data with --train": (lambda b: ["tune", "--data", b["pkg"], "--train", "q.npy",
                                             "--out", b["t"] / "x.npz"], "--train: not with"),
    "tune: --corpus alone": (lambda b: ["tune", "--corpus", b["pkg"] / "corpus.npy", "--out",
                                        b["t"] / "x.npz"], "required with --corpus"),
    "tune: no source": (lambda b: ["tune", "--out", "x.npz"], "one of the arguments"),
    "tune: unknown option": (lambda b: ["tune", "--data", b["pkg"], "--out", "x.npz",
                                        "--bogus"], "unrecognized arguments: --bogus"),
    "tune: unknown method": (lambda b: ["tune", "--data", b["pkg"], "--method", "q"],
                             "invalid choice: 'q'"),
    "tune: margin 0": (lambda b: ["tune", "--data", b["pkg"], "--margin", "0"], "must be >= 1"),
    "tune: unknown backend": (lambda b: ["tune", "--data", b["pkg"], "--backend", "tpu"],
                              "unknown backend 'tpu'"),
    "tune: no output": (lambda b: ["tune", "--data", b["pkg"]], "give at least one"),
    "tune: same output twice": (lambda b: ["tune", "--data", b["pkg"], "--out",
                                           b["t"] / "x.npz", "--state", b["t"] / "x.npz"],
                                "give two files"),
    "tune: output folder missing": (lambda b: ["tune", "--data", b["pkg"], "--out",
                                               b["t"] / "no" / "x.npz"], "create it first"),
    "tune: --k-val with NUDGE-M": (lambda b: ["tune", "--data", b["pkg"], "--method", "m",
                                              "--k-val", "3", "--out", b["t"] / "x.npz"],
                                   "NUDGE-M has no k_val"),
    "tune: corpus not a .npy": (lambda b: ["tune", *_tune_files(b["pkg"], corpus=b["t"] /
                                                                "text.npy"),
                                           "--out", b["t"] / "x.npz"], "is not a .npy file (no NumPy header)"),
    "tune: corpus 1-D": (lambda b: ["tune", *_tune_files(b["pkg"], corpus=b["t"] / "flat.npy"),
                                    "--out", b["t"] / "x.npz"], "expected a 2-D array"),
    "tune: queries of another d": (lambda b: ["tune", *_tune_files(b["pkg"], train=b["t"] /
                                                                   "d10.npy"),
                                              "--out", b["t"] / "x.npz"], "shape (n, 384)"),
    "tune: missing qrels": (lambda b: ["tune", *_tune_files(b["pkg"], train_qrels=b["t"] /
                                                            "nope.jsonl"),
                                       "--out", b["t"] / "x.npz"], "does not exist"),
    "tune: qrels line count": (lambda b: ["tune", *_tune_files(
        b["pkg"], train=b["t"] / "q3.npy", train_qrels=b["t"] / "q3_two.jsonl"), "--out",
        b["t"] / "x.npz"], "has 2 query lines but"),
    "tune: qrels bad JSON": (lambda b: ["tune", *_tune_files(
        b["pkg"], train=b["t"] / "q3.npy", train_qrels=b["t"] / "q3_badjson.jsonl"), "--out",
        b["t"] / "x.npz"], "line 2: not valid JSON"),
    "tune: qrels answers not ints": (lambda b: ["tune", *_tune_files(
        b["pkg"], train=b["t"] / "q3.npy", train_qrels=b["t"] / "q3_strs.jsonl"), "--out",
        b["t"] / "x.npz"], 'line 1: "answers" must be a list of record positions'),
    "tune: answer beyond the corpus": (lambda b: ["tune", *_tune_files(
        b["pkg"], train=b["t"] / "q3.npy", train_qrels=b["t"] / "q3_far.jsonl"), "--out",
        b["t"] / "x.npz"], "99999"),
    "tune: ids count": (lambda b: ["tune", *_tune_files(b["pkg"]), "--ids",
                                   b["t"] / "ids_short.txt", "--out", b["t"] / "x.npz"],
                        "has 2 lines for 6000 records"),
    "update: no such state": (lambda b: ["update", "--state", b["t"] / "nope.npz",
                                         "--remove-feedback", "1"], "does not exist"),
    "update: corrupt state": (lambda b: ["update", "--state", b["t"] / "garbage.npz",
                                         "--remove-feedback", "1"], "not a readable tuner state"),
    "update: state for another corpus": (lambda b: ["update", "--state", b["state"], "--corpus",
                                                    b["t"] / "other.npy", "--remove-feedback",
                                                    "1"], "differs from the one the state"),
    "update: corpus of another shape": (lambda b: ["update", "--state", b["state"], "--corpus",
                                                   b["t"] / "other_shape.npy",
                                                   "--remove-feedback", "1"],
                                        "was saved for a float16 corpus of shape (6000, 384)"),
    "update: in-memory state, no --corpus": (lambda b: ["update", "--state",
                                                        b["t"] / "in_memory_state.npz",
                                                        "--remove-feedback", "1"],
                                             "give --corpus X.npy"),
    "update: --out is the state": (lambda b: ["update", "--state", b["state"], "--out",
                                              b["state"], "--remove-feedback", "1"],
                                   "is also where the state goes"),
    "update: no operation": (lambda b: ["update", "--state", b["state"]],
                             "give at least one operation"),
    "update: queries without qrels": (lambda b: ["update", "--state", b["state"],
                                                 "--feedback-queries", b["t"] / "q3.npy"],
                                      "give both"),
    "update: --record-ids alone": (lambda b: ["update", "--state", b["state"], "--record-ids",
                                              b["t"] / "ids_short.txt"], "only with --add-records"),
    "update: bad --remove-feedback": (lambda b: ["update", "--state", b["state"],
                                                 "--remove-feedback", "3,x"],
                                      "comma-separated integers"),
    "update: feedback id out of range": (lambda b: ["update", "--state", b["state"],
                                                    "--remove-feedback", "999999"],
                                         "--remove-feedback: ids: 999999 is out of range"),
    "update: delete twice": (lambda b: ["update", "--state", b["state"], "--delete-records", "0",
                                        "--delete-ids", "0ad"], "was already deleted"),
    "update: unknown id to delete": (lambda b: ["update", "--state", b["state"], "--delete-ids",
                                                "no-such"], "is not a record id"),
    "update: records of another d": (lambda b: ["update", "--state", b["state"],
                                                "--add-records", b["t"] / "d10.npy"],
                                     "expected (m, 384) rows"),
    "update: records without ids": (lambda b: ["update", "--state", b["state"],
                                               "--add-records", b["t"] / "q3.npy"],
                                    "the corpus has ids, give one per new row"),
    "update: feedback missing": (lambda b: ["update", "--state", b["state"], "--feedback",
                                            b["t"] / "nope.jsonl"], "does not exist"),
    "update: feedback bad JSON": (lambda b: ["update", "--state", b["state"], "--feedback",
                                             b["t"] / "fb_badjson.jsonl"],
                                  "line 2: not valid JSON"),
    "update: feedback without embedding": (lambda b: ["update", "--state", b["state"],
                                                      "--feedback", b["t"] / "fb_noemb.jsonl"],
                                           'line 1: "embedding" must be a list of 384 numbers'),
    "update: feedback of another d": (lambda b: ["update", "--state", b["state"], "--feedback",
                                                 b["t"] / "fb_short.jsonl"],
                                      'line 1: "embedding" has 3 values; the corpus has d=384'),
    "update: feedback NaN": (lambda b: ["update", "--state", b["state"], "--feedback",
                                        b["t"] / "fb_nan.jsonl"], "not a finite number"),
    "update: feedback both answer kinds": (lambda b: ["update", "--state", b["state"],
                                                      "--feedback", b["t"] / "fb_both.jsonl"],
                                           "exactly one"),
    "update: feedback no answers": (lambda b: ["update", "--state", b["state"], "--feedback",
                                               b["t"] / "fb_neither.jsonl"], "exactly one"),
    "update: feedback unknown id": (lambda b: ["update", "--state", b["state"], "--feedback",
                                               b["t"] / "fb_unknown_id.jsonl"],
                                    'line 2: "answer_ids": "no-such-package" is not a record id'),
    "update: feedback int id for str ids": (lambda b: ["update", "--state", b["state"],
                                                       "--feedback", b["t"] / "fb_int_id.jsonl"],
                                            "record ids are strings"),
    "update: feedback position too far": (lambda b: ["update", "--state", b["state"],
                                                     "--feedback", b["t"] / "fb_far.jsonl"],
                                          '"answers": 6000 is not a record position'),
    "update: feedback empty answers": (lambda b: ["update", "--state", b["state"], "--feedback",
                                                  b["t"] / "fb_empty_answers.jsonl"],
                                       "must be a non-empty list"),
    "update: feedback not an object": (lambda b: ["update", "--state", b["state"], "--feedback",
                                                  b["t"] / "fb_list.jsonl"],
                                       "line 1: expected a JSON object"),
    "update: feedback empty file": (lambda b: ["update", "--state", b["state"], "--feedback",
                                               b["t"] / "fb_blank.jsonl"], "no feedback lines"),
    "apply: no such delta": (lambda b: ["apply", b["t"] / "nope.npz", "--to",
                                        b["t"] / "served.npy"], "does not exist"),
    "apply: not a delta": (lambda b: ["apply", b["state"], "--to", b["t"] / "served.npy"],
                           "not a nudgefast delta"),
    "apply: damaged delta": (lambda b: ["apply", b["t"] / "garbage.npz", "--to",
                                        b["t"] / "served.npy"], "not a readable delta file"),
    "apply: no --to": (lambda b: ["apply", b["delta"]], "required: --to"),
    "apply: unknown target kind": (lambda b: ["apply", b["delta"], "--to",
                                              b["t"] / "served.csv"], "expected a .npy file"),
    "apply: no such target": (lambda b: ["apply", b["delta"], "--to", b["t"] / "nope.npy"],
                              "does not exist"),
    "apply: target of another d": (lambda b: ["apply", b["delta"], "--to",
                                              b["t"] / "served_d10.npy"], "has d=10"),
    "apply: --ids for a .npy": (lambda b: ["apply", b["delta"], "--to", b["t"] / "served.npy",
                                           "--ids", b["t"] / "ids_short.txt"],
                                "written by position"),
    "apply: string ids into FAISS": (lambda b: ["apply", b["delta"], "--to",
                                                b["t"] / "idmap.faiss"],
                                     "FAISS needs int64 ids, the delta's ids are"),
    "apply: string --ids into FAISS": (lambda b: ["apply", b["delta"], "--to",
                                                  b["t"] / "idmap.faiss", "--ids",
                                                  b["t"] / "ids_short.txt"],
                                       "one id per corpus position"),
    "apply: not a FAISS index": (lambda b: ["apply", b["delta"], "--to",
                                            b["t"] / "served.faiss", "--ids",
                                            b["t"] / "ids_int.txt"],
                                 "not a readable FAISS index"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_exit_2_with_one_line(case, bad, capsys):
    build, message = ERRORS[case]
    argv = build(bad)
    protected = {p: Path(p).read_bytes() for p in map(str, argv) if os.path.isfile(p)}
    rc, out, err = run(argv, capsys)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"nudgefast {argv[0]}: error: "), lines[0]
    assert message in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    for path, data in protected.items():  # inputs and targets untouched
        assert Path(path).read_bytes() == data, path


def test_failed_update_leaves_the_state_alone(pkg, tuned, tmp_path, capsys):
    """Feedback applied, then a deletion out of range: nothing is written."""
    shutil.copy(tuned / "s.npz", tmp_path / "s.npz")
    before = (tmp_path / "s.npz").read_bytes()
    feedback_file(tmp_path / "fb.jsonl", pkg, range(0, 10))
    np.save(tmp_path / "rows.npy", np.asarray(pkg.corpus[:4]))
    (tmp_path / "rows.txt").write_text("n0\nn1\nn2\nn3\n")
    rc, out, err = run(["update", "--state", tmp_path / "s.npz", "--feedback",
                        tmp_path / "fb.jsonl", "--add-records", tmp_path / "rows.npy",
                        "--record-ids", tmp_path / "rows.txt", "--delete-records", "999999",
                        "--out", tmp_path / "u.npz"], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "--delete-records: positions: 999999 is out of range" in err
    assert (tmp_path / "s.npz").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["fb.jsonl", "rows.npy", "rows.txt", "s.npz"]


def test_existing_commands_still_listed(capsys):
    assert cli.main(["backends"]) == 0
    assert "numpy" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "bench", "backends", "tune", "update", "apply"):
        assert command in out


def test_update_writes_both_files_or_neither(pkg, tuned, tmp_path, capsys, monkeypatch):
    """The state cannot be written (disk full, say) after the delta could: the old --out and
    the old state both stay, no temporary is left."""
    shutil.copy(tuned / "s.npz", tmp_path / "s.npz")
    (tmp_path / "u.npz").write_bytes(b"the previous delta")
    before = (tmp_path / "s.npz").read_bytes()
    feedback_file(tmp_path / "fb.jsonl", pkg, range(0, 5))

    def full_disk(self, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Tuner, "save", full_disk)
    rc, out, err = run(["update", "--state", tmp_path / "s.npz", "--feedback",
                        tmp_path / "fb.jsonl", "--out", tmp_path / "u.npz"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--state: cannot write" in err
    assert (tmp_path / "s.npz").read_bytes() == before
    assert (tmp_path / "u.npz").read_bytes() == b"the previous delta"
    assert sorted(os.listdir(tmp_path)) == ["fb.jsonl", "s.npz", "u.npz"]


def test_ids_beyond_int64_are_strings_or_refused(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(str(2 ** 63 + i) for i in range(3)) + "\n")
    assert cli._read_ids("--ids", str(path)).dtype.kind == "U"
    with pytest.raises(ValueError, match="beyond int64"):
        cli._read_ids("--ids", str(path), kind="i")
