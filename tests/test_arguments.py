"""Odd arguments: each is a clear error naming the argument (or a correct result), never a
silent wrong answer; the same from every backend; the CLI answers in one line."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import awkward
from nudgefast import NudgeM, NudgeN, QuerySet, cli, metrics, search
from nudgefast.compat import NUDGEM, NUDGEN

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task():
    return awkward(n=301, d=9, seed=11, n_train=60, n_dev=20)


@pytest.mark.parametrize("name,value,error", [
    ("chunk_rows", -1, ValueError), ("chunk_rows", 0, ValueError),
    ("chunk_rows", 100.5, TypeError), ("chunk_rows", True, TypeError),
    ("val_block", 0, ValueError), ("val_block", -1, ValueError), ("val_block", None, TypeError),
    ("n_threads", -1, ValueError), ("n_threads", 0, ValueError), ("n_threads", 2**40, ValueError),
])
@pytest.mark.parametrize("cls", [NudgeM, NudgeN])
def test_estimator_size_arguments(cls, name, value, error, backend):
    with pytest.raises(error, match=name):
        cls(backend=backend, **{name: value})


@pytest.mark.parametrize("name,value,error", [
    ("query_block", -1, ValueError), ("query_block", 0, ValueError),
    ("chunk_rows", -1, ValueError), ("chunk_rows", 100.5, TypeError),
    ("n_threads", -1, ValueError), ("n_threads", 2**40, ValueError),
])
def test_search_size_arguments(task, name, value, error, backend):
    res = NudgeN(backend=backend).fit(task.corpus, task.train, task.dev)
    with pytest.raises(error, match=name):
        search(task.test.embeddings, task.corpus, 5, delta=res, backend=backend,
               **{name: value})


def test_apply_size_arguments_and_bad_rows(task, backend):
    res = NudgeN(backend=backend).fit(task.corpus, task.train, task.dev)
    with pytest.raises(ValueError, match="chunk_rows"):
        res.apply(task.corpus, chunk_rows=-1, backend=backend)
    with pytest.raises(ValueError, match="out"):
        res.apply(task.corpus, out=np.empty(task.corpus.shape, np.float32)[:, ::-1],
                  backend=backend)
    # A NaN row: fit rejects it, and so does apply (it used to write zeros there).
    bad = np.array(task.corpus)
    bad[123, 4] = np.nan
    with pytest.raises(ValueError, match="row 123"):
        NudgeN(backend=backend).fit(bad, task.train, task.dev)
    with pytest.raises(ValueError, match="row 123"):
        res.apply(bad, backend=backend, chunk_rows=50)
    zero = np.array(task.corpus)
    zero[200] = 0
    with pytest.raises(ValueError, match="row 200"):
        res.apply(zero, backend=backend, chunk_rows=64)


def test_apply_matches_the_reference_normalisation(task, backend):
    res = NudgeN(backend=backend).fit(task.corpus, task.train, task.dev)
    out = np.full(task.corpus.shape, np.nan, np.float32)  # poisoned: every row must be written
    got = res.apply(task.corpus, out=out, backend=backend, chunk_rows=77)
    assert got is out
    x = np.asarray(task.corpus, np.float64)
    want = x / np.linalg.norm(x, axis=1, keepdims=True)
    want[res.indices] = res.vectors
    np.testing.assert_allclose(out, want, atol=1e-7, rtol=0)


@pytest.mark.parametrize("gammas", [[np.nan, 0.1], [0.1, np.inf], [-0.1], [4.0], [], [[0.1]]])
def test_bad_gamma_grids(gammas):
    with pytest.raises((ValueError, TypeError), match="gammas"):
        NudgeN(gammas=gammas)


def test_compat_arguments(task, backend):
    train = {"q_embs": task.train.embeddings, "q_ans_indx": [list(a) for a in task.train.answers]}
    val = {"q_embs": task.dev.embeddings, "q_ans_indx": [list(a) for a in task.dev.answers]}
    with pytest.raises(ValueError, match="n_threads"):
        NUDGEN(backend=backend, n_threads=-1)
    with pytest.raises(ValueError, match="val_batch_size"):
        NUDGEN(backend=backend).finetune_embeddings(task.corpus, train, val, val_batch_size=0)
    with pytest.raises(ValueError, match="gamma"):
        NUDGEN(backend=backend).finetune_embeddings(task.corpus, train, val, gamma=float("nan"))
    with pytest.raises(ValueError, match="gamma"):
        NUDGEM(backend=backend).finetune_embeddings(task.corpus, train, val, gamma=-1.0)


# ---- metrics --------------------------------------------------------------------------------


def test_metrics_rejects_duplicate_and_negative_ids(backend):
    qs = QuerySet(np.eye(2, 3, dtype=np.float32), [[1], [2]])
    with pytest.raises(ValueError, match="retrieved: row 0 lists record 1 more than once"):
        metrics(np.array([[1, 1, 1], [2, 3, 4]]), qs, 3, backend=backend)
    with pytest.raises(ValueError, match="record -7"):
        metrics(np.array([[1, -7, 0], [2, 3, 4]]), qs, 3, backend=backend)
    with pytest.raises(ValueError, match="n_records=4"):
        metrics(np.array([[1, 0, 5], [2, 3, 0]]), qs, 3, backend=backend, n_records=4)
    with pytest.raises(ValueError, match="answers"):
        metrics(np.array([[1, 0, 3], [2, 3, 0]]), QuerySet(np.eye(2, 3), [[1], [9]]), 3,
                backend=backend, n_records=4)
    # -1 padding is not a duplicate; only the first k columns count.
    m = metrics(np.array([[1, -1, -1, 1], [2, 3, -1, 2]]), qs, 3, backend=backend)
    assert m["recall@3"] == 1.0 and m["ndcg@3"] == 1.0


@pytest.mark.parametrize("grades", [[[np.nan], [1.0]], [[-1.0], [1.0]], [["a"], [1.0]]])
def test_bad_relevance_grades(grades):
    with pytest.raises((ValueError, TypeError), match="relevance"):
        QuerySet(np.eye(2, 3), [[1], [2]], grades)


# ---- QuerySet: copied in, immutable ----------------------------------------------------------


def test_queryset_is_immutable_and_copied_in(task, backend):
    emb = np.array(task.train.embeddings)
    answers = [list(a) for a in task.train.answers]
    qs = QuerySet(emb, answers)
    first = NudgeN(backend=backend).fit(task.corpus, qs, task.dev)
    answers[0][0] = (answers[0][0] + 1) % task.corpus.shape[0]  # edits after construction
    emb[:] = 0
    again = NudgeN(backend=backend).fit(task.corpus, qs, task.dev)
    np.testing.assert_array_equal(first.indices, again.indices)
    np.testing.assert_array_equal(first.vectors, again.vectors)
    with pytest.raises(ValueError):
        qs.embeddings[0, 0] = 1.0
    with pytest.raises(ValueError):
        qs.answers[0][0] = 3


@pytest.mark.parametrize("answers,error,match", [
    ([3, 5], TypeError, r"answers\[0\]: is the single number 3"),
    ("35", TypeError, "str"),
    (None, TypeError, "is None"),
    ([[0], [np.uint64(2**64 - 1)]], ValueError, "18446744073709551615"),
    ([[0.5], [1]], TypeError, "integers"),
    ([[0], [1], [2]], ValueError, "3 lists for 2"),
])
def test_answer_lists_with_plain_messages(answers, error, match):
    with pytest.raises(error, match=match):
        QuerySet(np.eye(2, 3), answers)


def test_generators_are_read_once():
    qs = QuerySet(np.eye(2, 3), (a for a in [[0], [1, 2]]), (g for g in [[2.0], [1.0, 1.0]]))
    assert len(qs) == 2 and list(qs.answers[1]) == [1, 2]


def test_torch_tensors_are_accepted(task):
    torch = pytest.importorskip("torch")
    corpus = torch.tensor(np.asarray(task.corpus), requires_grad=True)
    train = QuerySet(torch.tensor(task.train.embeddings, requires_grad=True),
                     task.train.answers)
    res = NudgeN().fit(corpus, train, task.dev)
    ref = NudgeN().fit(task.corpus, task.train, task.dev)
    assert res.gamma == ref.gamma
    q16 = torch.tensor(task.test.embeddings).to(torch.bfloat16)
    hits = search(q16, corpus, 5)
    want = search(q16.float().numpy(), task.corpus, 5)
    np.testing.assert_array_equal(hits.indices, want.indices)


def test_result_repr_is_one_line(task):
    res = NudgeN().fit(task.corpus, task.train, task.dev)
    text = repr(res)
    assert "\n" not in text and len(text) < 200 and "gamma=" in text and "touched" in text


# ---- the CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["demo", "--backend", "foo"], ["demo", "--dataset", "/nope"],
                                  ["bench", "--sizes", "x"], ["bench", "--backends", "gpu"],
                                  ["demo", "--repeat", "0"], ["frobnicate"]])
def test_cli_bad_arguments_one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("nudgefast")


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "bench", "backends"):
        assert f"    {command} " in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "(default: 10000,50000)" in capsys.readouterr().out


def test_source_folder_shadowing_is_named(tmp_path):
    """Importing nudgefast inside a checkout without the compiled extension while the
    installed copy has it: `backends()` says so and how to fix it."""
    import nudgefast
    if not nudgefast.backends()["cpp"].available:
        pytest.skip("the installed package has no cpp extension to be shadowed")
    if (Path(nudgefast.__file__).resolve().parents[1] / "setup.py").is_file():
        pytest.skip("an editable install: the source folder is the installed package")
    shutil.copytree(REPO / "nudgefast", tmp_path / "nudgefast",
                    ignore=shutil.ignore_patterns("_cpu*", "__pycache__", "data"))
    shutil.copy(REPO / "setup.py", tmp_path)
    out = subprocess.run([sys.executable, "-c", "import nudgefast; "
                          "print(nudgefast.backends()['cpp'].reason)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "shadows the installed package" in out and "pip install -e ." in out
