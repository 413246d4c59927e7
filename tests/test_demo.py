"""`nudgefast demo`: the packaged real dataset, the verification table, other datasets."""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import REAL
from nudgefast import cli, datasets, metrics, search


def _rows(out):
    """The Markdown table rows as lists of cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]


def test_packaged_dataset_is_real_and_small():
    ds = datasets.packaged()
    assert not ds.synthetic and ds.corpus.dtype == np.float16
    files = sorted(ds.folder.iterdir())
    assert sum(f.stat().st_size for f in files) < 10 * 2**20
    assert len(ds.record_texts()) == len(ds.record_ids()) == ds.corpus.shape[0]
    assert len(ds.query_texts("test")) == len(ds.test)
    # Every answer is a row of the subset, and every split kept its queries.
    for qs in (ds.train, ds.dev, ds.test):
        assert len(qs) > 100
        assert max(max(a) for a in qs.answers) < ds.corpus.shape[0]


def test_demo_shows_real_gains_and_examples(capsys):
    assert cli.main(["demo", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "pkg-search-6k" in out and "SYNTHETIC" not in out
    rows = {r[0]: r for r in _rows(out)}
    none, m, n = rows["no fine-tuning"], rows["NUDGE-M"], rows["NUDGE-N"]
    assert float(n[3]) > float(none[3]) + 0.03 and float(m[3]) > float(none[3])
    assert float(n[1]) > 0 and float(n[4]) > 0  # gamma, fit ms
    # Three examples, each with the answer at rank 1 after tuning and not before.
    blocks = out.split("query: ")[1:]
    assert len(blocks) == 3
    for block in blocks:
        before, after = block.split("after NUDGE-N:")
        assert not re.search(r"1\. \*\* ", before) and re.search(r"1\. \*\* ", after)


def test_demo_numbers_are_the_library_numbers(capsys):
    """The table is what a user gets from the public API on the test split."""
    ds = datasets.packaged()
    base = metrics(search(ds.test.embeddings, ds.corpus, 10).indices, ds.test, 10)
    cli.main(["demo", "--repeat", "1"])
    rows = {r[0]: r for r in _rows(capsys.readouterr().out)}
    assert rows["no fine-tuning"][3] == f"{base['ndcg@10']:.4f}"


def test_demo_all_backends_agree(capsys):
    assert cli.main(["demo", "--all-backends", "--repeat", "1"]) == 0
    rows = _rows(capsys.readouterr().out)
    for variant in ("NUDGE-M", "NUDGE-N"):
        mine = [r for r in rows if r[0] == variant]
        assert len(mine) >= 2  # numpy plus at least one compiled backend
        assert len({(r[2], r[3], r[4]) for r in mine}) == 1, mine


def test_demo_synthetic_says_so(capsys):
    assert cli.main(["demo", "--synthetic", "--repeat", "1", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "no record or query texts" in out


@pytest.mark.skipif(not REAL, reason="no real dataset under ../shared/data")
def test_demo_other_dataset(capsys, tmp_path):
    small = datasets.write_subset(REAL[0], tmp_path / "mini", n_groups=60, n_records=900,
                                  neighbours=2, seed=3)
    assert cli.main(["demo", "--dataset", str(small), "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "mini: N=900 records" in out


def test_demo_bad_arguments_exit_2(capsys):
    for argv in (["demo", "--repeat", "0"], ["demo", "--k", "x"],
                 ["demo", "--synthetic", "--dataset", "x"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.skipif(not REAL, reason="no real dataset under ../shared/data")
def test_write_subset_keeps_answers_and_is_seeded(tmp_path):
    src = datasets.load(REAL[0])
    a = datasets.load(datasets.write_subset(REAL[0], tmp_path / "a", n_groups=40,
                                            n_records=700, neighbours=2, seed=1))
    b = datasets.load(datasets.write_subset(REAL[0], tmp_path / "b", n_groups=40,
                                            n_records=700, neighbours=2, seed=1))
    assert a.corpus.shape == (700, src.corpus.shape[1]) and a.corpus.dtype == src.corpus.dtype
    np.testing.assert_array_equal(a.corpus, b.corpus)
    # Answers point at the same records as in the source: same ids, same embeddings.
    src_ids, ids = src.record_ids(), a.record_ids()
    row_of = {name: i for i, name in enumerate(src_ids)}
    for ans in a.test.answers:
        for r in ans:
            np.testing.assert_array_equal(a.corpus[r], src.corpus[row_of[ids[r]]])
    with pytest.raises(ValueError, match="n_records"):
        datasets.write_subset(REAL[0], tmp_path / "c", n_groups=40, n_records=50, seed=1)
