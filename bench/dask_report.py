"""Dask corpora against one process (issue 13 §3): search and NudgeN.fit over the same rows,
read by the single-process path (a ``.npy`` memmap, 2 threads) and by a 2-worker x 1-thread
``LocalCluster`` of processes (``.npy`` shards through ``nudgefast._dask.npy_corpus``, and an
uncompressed Zarr array), with the bytes that cross between processes.

    PYTHONPATH=. python bench/dask_report.py --out bench/results/<date>_<machine>_dask-2M
    PYTHONPATH=. python bench/dask_report.py --sizes 20000 --repeats 1 --out /tmp/d  # a look

(``PYTHONPATH=.`` in a checkout: a script under ``bench/`` would import an installed nudgefast
first; the script checks that it and the workers import the same one.)

Per corpus size N: ``benchmark.synthetic_workload(N, memmap_dir=...)`` writes the float32
(N, 384) corpus (unit rows) with 5000 train / 1000 validation queries; the corpus is copied to
``--shards`` ``.npy`` shards and to a Zarr array (chunks of ``--block-rows`` rows, no
compressor: the comparison is of the distribution, not of a codec). The searches take the
1000 validation queries, k = 10. Every timing is the best of ``--repeats`` runs after one
warm-up (all files are in the page cache by then). The answers of every dask run are checked
against the single process's (search indices and scores, gamma and tuned vectors: equal).

Bytes between processes, per operation (one timed run): (1) the data the workers send on
request (``Worker.get_data``: to the other worker, to the scheduler and to the client), as the
wire bytes ``comm.write`` reports in each worker's ``transfer_outgoing_log`` ("compressed";
``transfer_outgoing_bytes_total`` counts dask's ``sizeof`` estimates, which take a block's
(1, 1) object array of lists for 8 bytes); (2) the scheduler's batched stream to each worker
(task specs: the queries and exclusions travel in them) and (3) each worker's batched stream to
the scheduler (``BatchedSend.byte_count``). The scheduler runs in this process (LocalCluster),
so client <-> scheduler traffic does not cross processes and is not counted; neither are the
heartbeats (RPCs, time-based). The per-worker scan rate comes from the task stream
(``distributed.get_task_stream``): the rows of the ``_block_topk`` tasks a worker ran over the
seconds they ran.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

import nudgefast as nf
from nudgefast import _dask, benchmark

log = logging.getLogger("dask_report")


def _settle(cluster):
    """Wait until the scheduler has released every key of the previous run: a run submitted
    before the release is processed would find the same keys (same tokens) still in memory
    and reuse them instead of computing."""
    if cluster is None:
        return
    deadline = time.monotonic() + 30
    while cluster.scheduler.tasks and time.monotonic() < deadline:
        time.sleep(0.01)
    if cluster.scheduler.tasks:
        raise RuntimeError(f"{len(cluster.scheduler.tasks)} keys still held by the scheduler")


def _best(fn, repeats, cluster=None):
    """(best seconds, every time, last result) of ``repeats`` timed runs after one warm-up."""
    _settle(cluster)
    fn()
    times, out = [], None
    for _ in range(repeats):
        _settle(cluster)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, out


def _write_sources(wl, root, shards, block_rows):
    """``shards`` .npy files and a Zarr array (chunks of ``block_rows`` rows, uncompressed)
    holding the workload's corpus."""
    import zarr

    n, d = wl.corpus.shape
    cuts = np.linspace(0, n, shards + 1).astype(np.int64)
    paths = []
    for s in range(shards):
        paths.append(root / f"shard{s}.npy")
        np.save(paths[-1], wl.corpus[cuts[s]:cuts[s + 1]])
    z = zarr.create_array(str(root / "corpus.zarr"), shape=(n, d), chunks=(block_rows, d),
                          dtype="float32", compressors=None, overwrite=True)
    for s in range(0, n, block_rows):
        z[s:s + block_rows] = wl.corpus[s:s + block_rows]
    return paths, str(root / "corpus.zarr")


def _wire(client, cluster):
    """Cumulative bytes sent between processes so far (see the module docstring)."""
    got = client.run(lambda dask_worker: (
        sum(e.get("compressed") or 0 for e in dask_worker.transfer_outgoing_log),
        len(dask_worker.transfer_outgoing_log), dask_worker.batched_stream.byte_count))
    sched = sum(b.byte_count for b in cluster.scheduler.stream_comms.values())
    return {"get_data": sum(g[0] for g in got.values()),
            "get_data_count": sum(g[1] for g in got.values()),
            "worker_to_scheduler": sum(g[2] for g in got.values()),
            "scheduler_to_workers": sched}


def _measured(client, cluster, fn):
    """One run of ``fn`` with the bytes it moved and its task stream: (result, seconds,
    bytes dict, per-worker scan {worker: (rows, busy seconds)})."""
    import distributed

    _settle(cluster)
    client.run(lambda dask_worker: dask_worker.transfer_outgoing_log.clear())
    before = _wire(client, cluster)
    with distributed.get_task_stream(client) as ts:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    after = _wire(client, cluster)
    moved = {k: after[k] - before[k] for k in ("worker_to_scheduler", "scheduler_to_workers")}
    moved["get_data"] = after["get_data"]  # the logs were cleared
    moved["get_data_count"] = after["get_data_count"]
    moved["total"] = moved["get_data"] + moved["worker_to_scheduler"] + \
        moved["scheduler_to_workers"]
    scan = {}
    for task in ts.data:
        if "block_topk" not in str(task["key"]):
            continue
        busy = sum(s["stop"] - s["start"] for s in task["startstops"] if s["action"] == "compute")
        scan[task["worker"]] = scan.get(task["worker"], 0.0) + busy
    return out, wall, moved, scan


def _same_search(a, b):
    return bool(np.array_equal(a.indices, b.indices) and np.array_equal(a.scores, b.scores))


def _same_fit(a, b):
    return bool(a.gamma == b.gamma and np.array_equal(a.indices, b.indices)
                and np.array_equal(a.vectors, b.vectors))


def run_size(n, args, client, cluster):
    root = Path(args.dir) / f"n{n}"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wl = benchmark.synthetic_workload(n, memmap_dir=root)
    paths, zpath = _write_sources(wl, root, args.shards, args.block_rows)
    log.info("N=%d: data written in %.1f s", n, time.perf_counter() - t0)
    q = np.ascontiguousarray(wl.val.embeddings, dtype=np.float32)[:args.queries]
    import dask.array as da

    sources = {"npy": _dask.npy_corpus(paths, block_rows=args.block_rows),
               "zarr": da.from_zarr(zpath)}
    rows = {}
    single = {
        "search": lambda: nf.search(q, wl.corpus, args.k, backend="cpp", n_threads=2),
        "fit": lambda: nf.NudgeN(backend="cpp", n_threads=2).fit(wl.corpus, wl.train, wl.val),
    }
    ref = {}
    for op, fn in single.items():
        best, times, ref[op] = _best(fn, args.repeats)
        rows[("single", op)] = {"best_s": best, "times_s": times}
        log.info("N=%d single %s: best %.3f s %s", n, op, best, np.round(times, 3))
    for src, x in sources.items():
        blocks = len(x.chunks[0])
        ops = {"search": lambda x=x: nf.search(q, x, args.k),
               "fit": lambda x=x: nf.NudgeN().fit(x, wl.train, wl.val)}
        for op, fn in ops.items():
            best, times, out = _best(fn, args.repeats, cluster)
            same = _same_search(out, ref[op]) if op == "search" else _same_fit(out, ref[op])
            out, wall, moved, scan = _measured(client, cluster, fn)
            block_rows = np.asarray(x.chunks[0])
            rows[(src, op)] = {"best_s": best, "times_s": times, "identical": same,
                               "blocks": blocks, "bytes": moved, "measured_run_s": wall,
                               "scan": {w: {"busy_s": s} for w, s in scan.items()},
                               "rows_per_block_mean": float(block_rows.mean())}
            log.info("N=%d %s %s: best %.3f s %s ratio %.3f identical %s bytes %s", n, src, op,
                     best, np.round(times, 3), best / rows[("single", op)]["best_s"], same,
                     moved)
    # Per-worker scan rate: a search's pass; its block_topk tasks scan the N rows once.
    for src in sources:
        busy = [v["busy_s"] for v in rows[(src, "search")]["scan"].values()]
        rows[(src, "search")]["worker_rate_rows_s"] = n / sum(busy) if busy else None
        rows[(src, "search")]["workers_busy_s"] = busy
    shutil.rmtree(root) if args.cleanup else None
    return {f"{a}/{b}": v for (a, b), v in rows.items()}


def _machine():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return (f"{info.get('Model name', '?')} (family {info.get('CPU family', '?')} model "
                f"{info.get('Model', '?')}), {info.get('CPU(s)', '?')} cores, "
                f"{platform.system()} {platform.machine()}")
    except OSError:
        return platform.processor()


def report(results, args, command, commit, machine):
    lines = [f"# Dask corpora against one process (issue 13 §3), "
             f"{datetime.date.today().isoformat()}", "",
             f"command: `{command}`", "", f"commit {commit}", "",
             f"machine: {machine}; nudgefast backend cpp on the client and on each worker "
             f"(`auto` resolved per worker)", "",
             f"one process: `nf.search` / `NudgeN(backend='cpp', n_threads=2).fit` on a "
             f"`.npy` memmap; cluster: `LocalCluster(n_workers=2, threads_per_worker=1, "
             f"processes=True)` reading {args.shards} `.npy` shards (`npy_corpus`, blocks of "
             f"{args.block_rows} rows) or an uncompressed Zarr array (chunks of "
             f"{args.block_rows} rows); {args.queries} queries, k = {args.k}; the fit: "
             f"5000 train / 1000 validation queries. Best of {args.repeats} after a warm-up.",
             "", "| N | source | operation | best (s) | runs (s) | vs one process | "
             "identical | blocks | bytes between processes | of which get_data | "
             "sched->workers | workers->sched |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, res in results.items():
        for key, r in res.items():
            src, op = key.split("/")
            ratio = "" if src == "single" else f"{r['best_s'] / res['single/' + op]['best_s']:.3f}x"
            b = r.get("bytes")
            cells = [f"{int(n):,}", src, op, f"{r['best_s']:.3f}",
                     ", ".join(f"{t:.3f}" for t in r["times_s"]), ratio,
                     "" if src == "single" else ("yes" if r["identical"] else "NO"),
                     str(r.get("blocks", "")),
                     f"{b['total']:,}" if b else "", f"{b['get_data']:,} ({b['get_data_count']})"
                     if b else "", f"{b['scheduler_to_workers']:,}" if b else "",
                     f"{b['worker_to_scheduler']:,}" if b else ""]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-worker scan rate (search, from the task stream: rows of the "
              "`_block_topk` tasks over their compute seconds, both workers together):", ""]
    for n, res in results.items():
        for src in ("npy", "zarr"):
            r = res.get(f"{src}/search")
            if r and r.get("worker_rate_rows_s"):
                lines.append(f"- N={int(n):,} {src}: {r['worker_rate_rows_s']:,.0f} rows/s per "
                             f"worker; workers busy {', '.join(f'{s:.2f}' for s in r['workers_busy_s'])}"
                             f" s in a {r['measured_run_s']:.2f} s search")
    return "\n".join(lines) + "\n"


def main(argv=None):
    import distributed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200_000, 2_000_000])
    p.add_argument("--dir", default="/tmp/nudgefast_dask_bench", help="where the data goes")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--block-rows", type=int, default=None,
                   help="rows per block (default: N / 16, so 8 per worker)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cleanup", action="store_true", help="delete each size's data after it")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    command = "python bench/dask_report.py " + " ".join(argv if argv is not None
                                                         else os.sys.argv[1:])
    results = {}
    block_rows_arg = args.block_rows
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        where = set(client.run(lambda: __import__("nudgefast").__file__).values())
        if where != {nf.__file__}:
            raise RuntimeError(f"the workers import {where}, this process {nf.__file__}; run "
                               f"with PYTHONPATH=<checkout> so that both import the same")
        log.info("nudgefast: %s", nf.__file__)
        used = client.run(lambda: __import__("nudgefast._backends")._backends.resolve("auto"))
        log.info("worker backends (auto): %s; OMP_NUM_THREADS on workers: %s", used,
                 client.run(lambda: os.environ.get("OMP_NUM_THREADS")))
        for n in args.sizes:
            args.block_rows = block_rows_arg or -(-n // 16)
            results[str(n)] = run_size(n, args, client, cluster)
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    args.block_rows = f"{block_rows_arg:,}" if block_rows_arg else "N/16"
    text = report(results, args, command, commit, _machine())
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
