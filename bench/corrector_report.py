"""After a model change (issue 14 §3): the corrector on the shared model-change datasets, and
the cost of correcting inside the pass. One run.

    PYTHONPATH=. python bench/corrector_report.py --out bench/results/<date>_<machine>_corrector
    PYTHONPATH=. python bench/corrector_report.py --budgets 0.1 --kinds ridge --rows 200000 \\
        --out /tmp/c   # a quick look

Quality, per dataset folder with ``stale_corpus.npy`` (``pkg-search-20k-ft``, ``-e5``), test
queries, k = 10: the old model end to end (old queries on the stale corpus); the new model,
fully re-embedded (and + NUDGE-N); the new queries on the uncorrected stale corpus (same d
only); the corrected corpus for each corrector kind (``ridge``: the pairs, closed form;
``mlp``: the residual MLP (hidden 1024) learning from the train queries too, early-stopped on
dev; ``linear``: the same training with hidden 0) at each budget b of re-embedded records, sampled uniformly and query-aware (train answers
first, then the records the old model's train queries retrieve most); each + NUDGE-N fitted on
the corrected corpus (train queries, dev for gamma), corrected inside the pass. Recall@10,
NDCG@10 and, for the NDCG goal, the share of the gap between the old model and full
re-embedding that is closed; the corrector's fit seconds, its apply seconds (the corrected
corpus written to memory), and its dev check against the old model (warned or not).

Cost: a search pass of n_q queries (k = 10) over a synthetic float16 ``.npy`` memmap of
``--rows`` x 384, plain against the same pass with the corrector applied inside it (ridge, and
the MLP with hidden 1024: its weights do not change the cost), medians of ``--repeat`` runs
after a warm-up, with the extra floating-point work of the map as the floor of the ratio.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np

import nudgefast as nf
from nudgefast import benchmark, datasets
from nudgefast.queryset import QuerySet

log = logging.getLogger("corrector_report")
#: The report's corrector kinds: the closed-form ridge map (pairs), the residual MLP (hidden
#: 1024) and a linear map (hidden 0) trained like it, on the pairs and the train queries.
KINDS = {"ridge": dict(kind="ridge"), "mlp": dict(kind="mlp", hidden=1024),
         "linear": dict(kind="mlp", hidden=0)}
HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"


def _scores(retrieved, qs):
    m = nf.metrics(retrieved, qs, 10)
    return round(m["recall@10"], 4), round(m["ndcg@10"], 4)


def _nudge(corpus, train, dev, test, corrector=None):
    res = nf.NudgeN(progress=False).fit(corpus, train, dev, corrector=corrector)
    got = nf.search(test.embeddings, corpus, 10, delta=res, corrector=corrector, progress=False)
    return _scores(got.indices, test), float(res.gamma)


def quality(folder: Path, kinds, budgets, seed):
    ds = datasets.load(folder)
    stale = np.load(folder / "stale_corpus.npy", mmap_mode="r")
    fresh = ds.corpus
    train, dev, test = ds.train, ds.dev, ds.test
    old = {s: QuerySet(np.load(folder / f"stale_queries_{s}.npy"), q.answers, q.relevance)
           for s, q in (("train", train), ("dev", dev), ("test", test))}
    rows = []

    def row(name, corpus_note, scores, nudge=None, **extra):
        r = {"dataset": folder.name, "row": name, "corpus": corpus_note,
             "recall@10": scores[0], "ndcg@10": scores[1]}
        if nudge is not None:
            r.update({"nudge_recall@10": nudge[0][0], "nudge_ndcg@10": nudge[0][1],
                      "nudge_gamma": nudge[1]})
        r.update(extra)
        rows.append(r)
        log.info("%s", r)
        return r

    base = row("old model end to end", "stale", _scores(
        nf.search(old["test"].embeddings, stale, 10, progress=False).indices, test),
        _nudge(stale, old["train"], old["dev"], old["test"]))
    full = row("new model, fully re-embedded", "fresh", _scores(
        nf.search(test.embeddings, fresh, 10, progress=False).indices, test),
        _nudge(fresh, train, dev, test))
    if stale.shape[1] == fresh.shape[1]:
        row("new queries, stale corpus uncorrected", "stale", _scores(
            nf.search(test.embeddings, stale, 10, progress=False).indices, test))
    gap = full["ndcg@10"] - base["ndcg@10"]
    n = stale.shape[0]
    for b in budgets:
        for strategy in ("uniform", "query-aware"):
            sample = nf.choose_sample(n, b, strategy, train=train, old_queries=old["train"].embeddings,
                                      corpus=stale, seed=seed)
            for kind in kinds:
                c = nf.Corrector(**KINDS[kind], old_model="all-MiniLM-L6-v2",
                                 new_model=folder.name, seed=seed)
                kw = dict(train=train, corpus=stale, dev=dev) if c.kind == "mlp" else {}
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()
                    c.fit(stale[sample], fresh[sample], index=sample, **kw)
                    fit_s = time.perf_counter() - t0
                    c.check(stale, dev, old["dev"])
                warned = any("makes retrieval worse" in str(w.message) for w in caught)
                t0 = time.perf_counter()
                c.apply(stale)
                apply_s = time.perf_counter() - t0
                got = nf.search(test.embeddings, stale, 10, corrector=c, progress=False)
                r = row(f"corrected ({kind})", f"b={b:g} {strategy}", _scores(got.indices, test),
                        _nudge(stale, train, dev, test, c), budget=b, strategy=strategy,
                        kind=kind, fit_s=round(fit_s, 2), apply_s=round(apply_s, 3),
                        dev_old_model=round(c.dev_scores["old_model"], 4),
                        dev_corrected=round(c.dev_scores["corrected"], 4), warned=warned,
                        epochs=c.info.get("epochs"), best_epoch=c.info.get("best_epoch"))
                r["gap_closed"] = round((r["ndcg@10"] - base["ndcg@10"]) / gap, 3) if gap else None
    return rows


def cost(rows, n_queries, repeat, tmp):
    w = benchmark.synthetic_workload(rows, memmap_dir=tmp, dtype=np.float16, n_train=10,
                                     n_val=10)
    rng = np.random.default_rng(0)
    x = np.asarray(w.corpus[:4000], np.float32)
    y = x @ rng.standard_normal((384, 384)).astype(np.float32)
    correctors = {"ridge": nf.Corrector().fit(x, y),
                  "mlp (hidden 1024)": nf.Corrector("mlp", epochs=1).fit(x, y)}
    out = []
    for nq in n_queries:
        q = rng.standard_normal((nq, 384)).astype(np.float32)
        runs = {}
        for name, c in [("plain", None)] + list(correctors.items()):
            nf.search(q[:16], w.corpus, 10, corrector=c, progress=False)  # warm-up
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                nf.search(q, w.corpus, 10, corrector=c, progress=False)
                times.append(time.perf_counter() - t0)
            runs[name] = float(np.median(times))
        for name, c in correctors.items():
            map_flops = 384 * 384 + (2 * 384 * 1024 if c.W1 is not None else 0)
            out.append({"rows": rows, "queries": nq, "corrector": name,
                        "plain_s": round(runs["plain"], 3), "corrected_s": round(runs[name], 3),
                        "ratio": round(runs[name] / runs["plain"], 3),
                        "flop_floor": round(1 + map_flops / (nq * 384), 3)})
            log.info("%s", out[-1])
    if w.path is not None:
        os.remove(w.path)
    return out


def _machine():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                      if ln.startswith("Model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(SHARED))
    p.add_argument("--kinds", nargs="+", default=["ridge", "mlp"], choices=sorted(KINDS))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.25])
    p.add_argument("--rows", type=int, default=2_000_000, help="the cost pass's corpus rows")
    p.add_argument("--queries", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = [f for f in datasets.find(args.data) if (f / "stale_corpus.npy").exists()]
    folders.sort(key=lambda f: (not f.name.endswith("-ft"), f.name))  # the goals' dataset first
    result = {"date": datetime.date.today().isoformat(), "machine": _machine(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip(),
              "backends": nf.backends(), "args": vars(args), "quality": [], "cost": []}
    t0 = time.perf_counter()
    if not args.skip_quality:
        for f in folders:
            result["quality"] += quality(f, args.kinds, args.budgets, args.seed)
            (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    if not args.skip_cost:
        result["cost"] = cost(args.rows, args.queries, args.repeat, args.tmp)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "report.md").write_text(render(result))
    print(render(result))


def render(r):
    lines = [f"# Corrector after a model change (issue 14 §3), {r['date']}", "",
             f"command: `PYTHONPATH=. python bench/corrector_report.py "
             f"{' '.join(_argv(r['args']))}`", "",
             f"commit {r['commit']}; machine: {r['machine']}; backends {r['backends']}", ""]
    if r["quality"]:
        lines += ["## Quality (test queries, k = 10)", "",
                  "| dataset | row | corpus | recall@10 | NDCG@10 | gap closed | + NUDGE-N "
                  "recall@10 | + NUDGE-N NDCG@10 | NUDGE gamma | fit s | apply s | dev: old "
                  "model / corrected | warned |",
                  "|" + "---|" * 13]
        for q in r["quality"]:
            lines.append("| " + " | ".join(str(x) for x in (
                q["dataset"], q["row"], q["corpus"], q["recall@10"], q["ndcg@10"],
                q.get("gap_closed", ""), q.get("nudge_recall@10", ""),
                q.get("nudge_ndcg@10", ""), q.get("nudge_gamma", ""), q.get("fit_s", ""),
                q.get("apply_s", ""),
                f"{q['dev_old_model']} / {q['dev_corrected']}" if "dev_old_model" in q else "",
                q.get("warned", ""))) + " |")
        lines.append("")
    if r["cost"]:
        lines += ["## Cost of correcting inside the pass", "",
                  "| rows | queries | corrector | plain pass s | corrected pass s | ratio | "
                  "flop floor |", "|---|---|---|---|---|---|---|"]
        for c in r["cost"]:
            lines.append(f"| {c['rows']:,} | {c['queries']} | {c['corrector']} | "
                         f"{c['plain_s']} | {c['corrected_s']} | {c['ratio']}x | "
                         f"{c['flop_floor']}x |")
        lines.append("")
    return "\n".join(lines)


def _argv(args):
    out = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out += [flag] if v else []
        elif isinstance(v, list):
            out += [flag] + [str(x) for x in v]
        else:
            out += [flag, str(v)]
    return out


if __name__ == "__main__":
    main()
