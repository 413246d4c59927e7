"""The benchmark and report parts of ``bench/device_check.sh`` (issue 9, section 1).

    python bench/device_check.py env    OUT [--dry]     versions, GPU, driver, commit -> env.json
    python bench/device_check.py bench  PART OUT [--dry] one benchmark part -> bench.json (appended)
    python bench/device_check.py report OUT [--dry]     steps.tsv + env + bench + junit
                                                         -> results.json, report.md

PART: ``floors`` (dense fp16 GEMM rate, pinned host-to-device bandwidth), ``topk-cuda`` (one
top-k pass over a device-resident fp16 corpus; torch ``mm`` + ``topk`` and CuPy ``matmul`` +
``argpartition`` as peers on the same data), ``fit-cuda`` (NudgeN / NudgeM fits on the device),
``cpp`` (the same workloads on the cpp backend with every CPU core, at a smaller N),
``launch-sweep`` (the top-k pass under other launch tables, each checked first; last, if time
is left).

Corpora are generated on the device (seeded, in chunks) and never shipped; only ``cpp`` and dry
mode generate on the host. Each figure is a record with its floor and the ratio to it; a figure
that could not be measured is a record too, with its status ('failed: ...', 'skipped: ...'),
so nothing is lost silently. A part exits 1 when any of its
records failed, 77 when it was skipped as a whole; the shell script turns that into the step's
status. The step's one-line note goes to the file named by $DC_NOTE.

Sizes: fp16 corpus, d = 384, 1,000 validation queries, k = 10 (and 10,000 queries, k = 100);
N from $DC_N_TOPK (10^7), $DC_N_FIT (10^7, host corpus streamed through the public API),
$DC_N_CPP (10^6: the cpp backend on 16 cores would take minutes per pass at 10^7). Dry mode:
N = 20,000, 200 queries.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import traceback
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
D = 384
SEED = 0
#: A step whose status is one of these did not fail (the summary lists every other one).
NOT_FAILED = ("ok", "skipped", "not supported")


def _env_int(name, default):
    return int(float(os.environ.get(name, default)))


def sizes(dry):
    if dry:
        return {"n_topk": 20_000, "n_fit": 20_000, "n_cpp": 20_000, "n_val": 200, "n_train": 400,
                "n_q_big": 400, "k": 10, "k_big": 100, "repeat": 2}
    return {"n_topk": _env_int("DC_N_TOPK", 1e7), "n_fit": _env_int("DC_N_FIT", 1e7),
            "n_cpp": _env_int("DC_N_CPP", 1e6), "n_val": 1000, "n_train": 5000,
            "n_q_big": 10_000, "k": 10, "k_big": 100, "repeat": 3}


def note(text):
    """The step's one-line note for steps.tsv (the shell script reads $DC_NOTE)."""
    path = os.environ.get("DC_NOTE")
    if path:
        Path(path).write_text(str(text)[:300])


# ---- env --------------------------------------------------------------------------------------


def _run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
        return (out.stdout + out.stderr).strip()
    except Exception as exc:  # absent tool, timeout
        return f"unavailable: {type(exc).__name__}: {exc}"


def env(out, dry):
    info = {"date": date.today().isoformat(), "dry": dry, "python": sys.version.split()[0],
            "platform": platform.platform(), "numpy": np.__version__, "cores": os.cpu_count()}
    commit = _run(["git", "rev-parse", "HEAD"])
    info["commit"] = commit if len(commit) == 40 and " " not in commit else "absent (no git here)"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    info["dirty"] = None if info["commit"].startswith("absent") else bool(dirty)
    # The device tool ships the working tree with the session's *first* .git snapshot, so git
    # there names a stale commit (2026-11-26: three H100 runs all said 1ae1a71). The caller
    # states what it sends: DC_COMMIT=<sha of a clean, committed tree>.
    claimed = os.environ.get("DC_COMMIT", "").strip()
    if claimed:
        info["git_on_device"] = {"commit": info["commit"], "dirty": info["dirty"]}
        info["commit"], info["dirty"] = claimed, None
        info["commit_source"] = "DC_COMMIT, given by the caller (git on the device is a stale snapshot)"
    for mod in ("torch", "cupy", "numba", "pybind11", "pytest"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:
            info[mod] = f"absent ({type(exc).__name__})"
    info["gpu"] = None
    if not dry:
        with contextlib.suppress(Exception):
            import cupy as cp
            props = cp.cuda.runtime.getDeviceProperties(0)
            name = props["name"]
            info["gpu"] = name.decode() if isinstance(name, bytes) else name
            info["gpu_sms"] = int(props["multiProcessorCount"])
            info["gpu_memory_bytes"] = int(props["totalGlobalMem"])
            info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
            info["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
            info["nvrtc"] = ".".join(map(str, cp.cuda.nvrtc.getVersion()))
    smi = _run(["nvidia-smi"])
    info["nvidia_smi"] = smi
    info["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["nvcc"] = _run(["nvcc", "--version"]).splitlines()[-1:]
    info["compute_sanitizer"] = _run(["compute-sanitizer", "--version"]).splitlines()[-1:]
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    (out / "env.json").write_text(json.dumps(info, indent=1))
    note(f"gpu={info['gpu']} cupy={info['cupy']} torch={info['torch']} commit={info['commit'][:12]}")
    print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}, indent=1))
    print(smi)
    return 0


# ---- measurement helpers ----------------------------------------------------------------------


class Bench:
    """Records of one part, appended to bench.json as each lands (a cut run keeps them)."""

    def __init__(self, out, part, dry):
        self.path, self.part, self.dry = out / "bench.json", part, dry
        self.failed = 0

    def add(self, what, who, *, status="ok", timing=None, n=None, n_q=None, k=None, floor_s=None,
            floor_what="", note_="", value=None):
        rec = {"part": self.part, "what": what, "who": who, "status": status, "n": n, "d": D,
               "n_q": n_q, "k": k, "floor_s": floor_s, "floor_what": floor_what, "note": note_,
               "value": value}
        if timing is not None:
            runs = [float(r) for r in timing]
            med = float(np.median(runs))
            rec.update(median_s=med, min_s=min(runs), max_s=max(runs), runs=runs)
            if n and n_q:
                rec["record_queries_per_s"] = n * n_q / med
            if floor_s:
                rec["ratio_to_floor"] = med / floor_s
        if status.startswith("failed"):
            self.failed += 1
        recs = json.loads(self.path.read_text()) if self.path.exists() else []
        recs.append(rec)
        self.path.write_text(json.dumps(recs, indent=1))
        print(f"[{self.part}] {what} / {who}: {status} "
              + (f"{rec['median_s']:.4g} s" if timing is not None else ""), flush=True)
        return rec

    def attempt(self, what, who, fn, **kw):
        """Run ``fn`` (returns timings, or (timings, extra kwargs)); a crash is a 'failed' record."""
        try:
            got = fn()
            extra = {}
            if isinstance(got, tuple):
                got, extra = got
            return self.add(what, who, timing=got, **{**kw, **extra})
        except Exception as exc:
            traceback.print_exc()
            return self.add(what, who, status=f"failed: {type(exc).__name__}: {exc}"[:400], **kw)

    def floors(self):
        recs = json.loads(self.path.read_text()) if self.path.exists() else []
        return {r["what"]: r for r in recs if r["part"] == "floors" and r["status"] == "ok"}


def timed(fn, repeat, warmup=1, gpu=False):
    from nudgefast.benchmark import measure
    return measure(fn, repeat=repeat, warmup=warmup, gpu=gpu).runs


def gemm_rate(dry):
    """Dense matmul rate in flop/s: fp16 on the GPU (torch, else CuPy); fp32 on the CPU in dry."""
    if dry:
        import torch
        a = torch.randn(1024, 1024)
        runs = timed(lambda: a @ a, 3)
        return 2 * 1024 ** 3 / float(np.median(runs)), runs, "torch CPU fp32 1024^3 (dry)"
    n = 8192
    try:
        import torch
        a = torch.randn(n, n, device="cuda", dtype=torch.float16)
        b = torch.randn(n, n, device="cuda", dtype=torch.float16)
        runs = timed(lambda: torch.mm(a, b), 10, warmup=3, gpu=True)
        who = "torch.mm fp16 8192^3"
    except Exception:
        import cupy as cp
        a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
        runs = timed(lambda: a @ a, 10, warmup=3, gpu=True)
        who = "cupy matmul fp16 8192^3"
    return 2 * n ** 3 / float(np.median(runs)), runs, who


def part_floors(b: Bench, s):
    try:
        rate, runs, who = gemm_rate(b.dry)
        b.add("gemm_flops", who, timing=runs, note_=f"{rate / 1e12:.1f} TFLOP/s", value=rate)
    except Exception as exc:
        traceback.print_exc()
        b.add("gemm_flops", "fp16 GEMM", status=f"failed: {type(exc).__name__}: {exc}"[:400])
    if b.dry:
        b.add("h2d_bytes_per_s", "cupy pinned", status="skipped: no CuPy/GPU (dry)")
        return
    try:
        import cupy as cp
        nbytes = 1 << 30
        host = cp.cuda.alloc_pinned_memory(nbytes)
        src = np.frombuffer(host, np.uint8, nbytes)
        src[:] = 1
        dst = cp.empty(nbytes, cp.uint8)
        runs = timed(lambda: dst.set(src), 5, warmup=2, gpu=True)
        bw = nbytes / float(np.median(runs))
        b.add("h2d_bytes_per_s", "cupy pinned 1 GiB", timing=runs, note_=f"{bw / 1e9:.1f} GB/s",
              value=bw)
    except Exception as exc:
        traceback.print_exc()
        b.add("h2d_bytes_per_s", "cupy pinned", status=f"failed: {type(exc).__name__}: {exc}"[:400])


# ---- data -------------------------------------------------------------------------------------


def device_corpus(n, chunk=1 << 20):
    """(n, D) float16 unit rows on the device, seeded, generated chunk by chunk."""
    import cupy as cp
    out = cp.empty((n, D), cp.float16)
    rs = cp.random.RandomState(SEED)
    for s in range(0, n, chunk):
        x = rs.standard_normal((min(chunk, n - s), D), dtype=cp.float32)
        x /= cp.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + chunk] = x.astype(cp.float16)
        del x
    return out


def host_corpus(n, chunk=200_000):
    out = np.empty((n, D), np.float16)
    rng = np.random.default_rng(SEED)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), D), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + chunk] = x
    return out


def query_sets(corpus, n_train, n_val, seed=SEED + 1):
    """Train / validation QuerySets near 1-3 answer rows each (rows gathered from ``corpus``,
    host or device)."""
    from nudgefast import QuerySet
    rng = np.random.default_rng(seed)
    n = corpus.shape[0]

    def make(m):
        answers = [rng.choice(n, int(rng.integers(1, 4)), replace=False) for _ in range(m)]
        flat = np.concatenate(answers)
        rows = corpus[flat]
        rows = rows.get() if hasattr(rows, "get") else np.asarray(rows)
        rows = rows.astype(np.float64)
        ends = np.cumsum([len(a) for a in answers])
        emb = np.add.reduceat(rows, np.r_[0, ends[:-1]], axis=0) / np.diff(np.r_[0, ends])[:, None]
        emb += 0.08 * rng.standard_normal(emb.shape)
        return QuerySet(emb.astype(np.float32), [a.tolist() for a in answers])
    return make(n_train), make(n_val)


def topk_floor(b: Bench, n, n_q):
    f = b.floors().get("gemm_flops")
    if not f:
        return None, ""
    return 2.0 * n * D * n_q / f["value"], f"2*N*d*Q at {f['value'] / 1e12:.1f} TFLOP/s ({f['who']})"


def stream_floor(b: Bench, nbytes):
    f = b.floors().get("h2d_bytes_per_s")
    if not f:
        return None, ""
    return nbytes / f["value"], f"{nbytes / 1e9:.2f} GB at {f['value'] / 1e9:.1f} GB/s H2D"


# ---- parts ------------------------------------------------------------------------------------


def _skip_without_cuda(b: Bench, what: str):
    """``(77, why)`` after recording ``what`` as skipped when there is no usable cuda backend
    (dry mode, or CuPy/device missing), else None."""
    why = None
    if b.dry:
        why = "skipped: no CuPy/GPU (dry)"
    else:
        from nudgefast import _backends
        info = _backends.backends()["cuda"]
        if not info.available:
            why = f"skipped: cuda backend unavailable: {info.reason}"
    if why:
        b.add(what, "cuda", status=why)
        return 77, why
    return None


def part_topk_cuda(b: Bench, s):
    skip = _skip_without_cuda(b, "topk")
    if skip:
        return skip
    import cupy as cp
    from nudgefast._backends import cuda_backend
    from nudgefast.search import topk_pass
    n = s["n_topk"]
    corpus = device_corpus(n)
    for n_q, k in ((s["n_val"], s["k"]), (s["n_q_big"], s["k_big"])):
        q = np.random.default_rng(SEED + 2).standard_normal((n_q, D)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        floor_s, floor_what = topk_floor(b, n, n_q)
        kw = dict(n=n, n_q=n_q, k=k, floor_s=floor_s, floor_what=floor_what)
        what = f"topk resident fp16 Q={n_q} k={k}"
        rep = s["repeat"] if n_q == s["n_val"] else 1  # the 10k-query pass is 10x longer
        # The backend's own pass (no validation, no result conversion): the kernel's figure.
        b.attempt(what, "cuda (topk_pass, device corpus)", lambda: timed(
            lambda: topk_pass(cuda_backend, q, corpus, k, progress=False), rep, gpu=True),
            note_="backend-level topk_pass", **kw)
        qd16 = cp.asarray(q, cp.float16)
        rows = max(1 << 14, min(n, (1 << 31) // (n_q * 2)))  # ~2 GiB of fp16 scores per chunk

        def cupy_pass():
            best = []
            for st in range(0, n, rows):
                sc = qd16 @ corpus[st:st + rows].T
                part = cp.argpartition(-sc, k - 1, axis=1)[:, :k]
                best.append((cp.take_along_axis(sc, part, 1), part + st))
                del sc
            s_ = cp.concatenate([x for x, _ in best], 1)
            i_ = cp.concatenate([y for _, y in best], 1)
            top = cp.argsort(-s_, axis=1)[:, :k]
            return cp.take_along_axis(i_, top, 1)
        try:
            import torch
            tc = torch.from_dlpack(corpus)
            tq = torch.from_dlpack(qd16)

            def torch_pass():
                vals, idx = [], []
                for st in range(0, n, rows):
                    v, i = torch.topk(tq @ tc[st:st + rows].T, k, dim=1)
                    vals.append(v)
                    idx.append(i + st)
                v, i = torch.topk(torch.cat(vals, 1), k, dim=1)
                return torch.gather(torch.cat(idx, 1), 1, i)
            b.attempt(what, "torch mm+topk", lambda: timed(torch_pass, rep, gpu=True),
                      note_=f"chunks of {rows} rows, fp16 scores", **kw)
        except ImportError as exc:
            b.add(what, "torch mm+topk", status=f"skipped: {exc}", **kw)
        # Last and unwarmed at 10k queries: argpartition over 10^11 scores took 15.7 s a run on an
        # H100 (2026-11-26), and its warm-up run pushed the step past its timeout.
        b.attempt(what, "cupy matmul+argpartition",
                  lambda: timed(cupy_pass, rep, warmup=1 if rep > 1 else 0, gpu=True),
                  note_=f"chunks of {rows} rows, fp16 scores", **kw)
    return 0, ""


def _fit_records(b: Bench, s, corpus, train, val, backend, who, n, extra_note="", where="host corpus",
                 floor=None):
    """topk pass (the fit's floor in passes) and both fits on ``corpus`` through the public API.
    floor: (seconds, what) of the pass; default: the corpus bytes over the H2D bandwidth (a host
    corpus streamed to the GPU), none on the CPU."""
    from nudgefast import NudgeM, NudgeN, search
    gpu = backend == "cuda"
    q = val.embeddings
    nbytes = corpus.shape[0] * D * corpus.dtype.itemsize
    # cpp: no CPU floor is measured here (bench/results' FAISS runs give one).
    if floor is not None:
        floor_s, floor_what = floor
    else:
        floor_s, floor_what = stream_floor(b, nbytes) if gpu else (None, "")
    kw = dict(n=n, n_q=len(val), k=s["k"])
    search_rec = b.attempt(f"search pass (public API, {where})", who, lambda: timed(
        lambda: search(q, corpus, s["k"], backend=backend, progress=False), s["repeat"], gpu=gpu),
        floor_s=floor_s, floor_what=floor_what, note_=extra_note, **kw)
    for cls in (NudgeN, NudgeM):
        est = cls(backend=backend, progress=False)
        last = {}

        def fit():
            last["result"] = est.fit(corpus, train, val)
        rec = b.attempt(f"fit {cls.__name__} ({where})", who, lambda: timed(
            fit, min(s["repeat"], 2), gpu=gpu),
            floor_s=floor_s, floor_what=floor_what, note_=extra_note, **kw)
        changed = False
        if "result" in last:  # where a fit's time goes beyond its pass: the stages, seconds
            rec["fit_stages_s"] = {k: round(float(v), 4) for k, v in last["result"].timings.items()}
            rec["note"] = (rec.get("note") or "") + "; stages (last run): " + ", ".join(
                f"{k} {v:.3g}" for k, v in rec["fit_stages_s"].items())
            changed = True
        if rec.get("median_s") and search_rec.get("median_s"):
            rec["fit_over_search_pass"] = rec["median_s"] / search_rec["median_s"]
            changed = True
        if changed:
            recs = json.loads(b.path.read_text())
            recs[-1] = rec
            b.path.write_text(json.dumps(recs, indent=1))


def part_fit_cuda(b: Bench, s):
    skip = _skip_without_cuda(b, "fit")
    if skip:
        return skip
    import cupy as cp
    from nudgefast import NudgeN
    n = s["n_fit"]
    dev = device_corpus(n)
    train, val = query_sets(dev, s["n_train"], s["n_val"])
    # A device corpus through the public API (issue 9 §2): resident, so the floor is compute.
    try:
        NudgeN(backend="cuda", progress=False).fit(dev, train, val)
    except (TypeError, ValueError) as exc:
        traceback.print_exc()
        b.add("fit NudgeN (device corpus)", "cuda", n=n,
              status=f"failed: the public API refused a device corpus: {type(exc).__name__}: {exc}"[:300])
    else:
        _fit_records(b, s, dev, train, val, "cuda", "cuda (device corpus)", n,
                     "resident corpus through the public API", where="device corpus",
                     floor=topk_floor(b, n, len(val.embeddings)))
    host = cp.cuda.alloc_pinned_memory(n * D * 2)
    corpus = np.frombuffer(host, np.float16, n * D).reshape(n, D)
    dev.get(out=corpus)
    del dev
    cp.get_default_memory_pool().free_all_blocks()
    _fit_records(b, s, corpus, train, val, "cuda", "cuda (pinned host corpus)", n,
                 "host corpus streamed through the public API (pinned)")
    return 0, ""


def part_cpp(b: Bench, s):
    from nudgefast import _backends
    if not _backends.backends()["cpp"].available:
        why = f"skipped: cpp unavailable: {_backends.backends()['cpp'].reason}"
        b.add("fit", "cpp", status=why)
        return 77, why
    n = s["n_cpp"]
    corpus = host_corpus(n)
    train, val = query_sets(corpus, s["n_train"], s["n_val"])
    _fit_records(b, s, corpus, train, val, "cpp", f"cpp ({os.cpu_count()} threads)", n,
                 f"N={n}: the cpp backend runs at a smaller N than cuda (time budget); "
                 "compare throughput per record")
    if b.dry:  # the torch peer on the CPU keeps its code path alive between device windows
        import torch
        tc = torch.from_numpy(corpus.astype(np.float32))
        tq = torch.from_numpy(val.embeddings)
        b.attempt(f"topk fp32 Q={len(val)} k={s['k']}", "torch CPU mm+topk (dry)", lambda: timed(
            lambda: torch.topk(tq @ tc.T, s["k"], dim=1), s["repeat"]), n=n, n_q=len(val), k=s["k"])
    return 0, ""


#: Launch-table variants the sweep times (each must satisfy topk.cu's static_asserts and fit the
#: 48 KiB of static shared memory; .ci/cuda_check.sh-style cubin builds of each were checked
#: with nvcc on the CPU machine). The first is the shipped table.
LAUNCH_VARIANTS = [
    ("shipped", {}),
    ("f16 warps along q: 4", {"F16_WARPS_Q": 4}),
    ("f16 warps along q: 1", {"F16_WARPS_Q": 1}),
    ("128 threads, QT 32", {"THREADS": 128, "QT": 32}),
    ("2 blocks/SM (register cap 128)", {"MIN_BLOCKS": 2}),
    ("no lo split (scores ~1e-4 off)", {"F16_SPLIT": 0}),
]

_SWEEP_CHILD = r"""
import json, sys, time
import numpy as np, cupy as cp
from nudgefast._backends import cuda_backend as cb
from nudgefast._backends import numpy_backend as ref
from nudgefast.search import topk_pass
cb.LAUNCH["TOPK"].update(json.loads(sys.argv[1]))
n, d, n_q, k = int(sys.argv[2]), 384, 1000, 10
rs = cp.random.RandomState(0)
# Correctness first, on a small problem against the float64 reference: a fast wrong variant
# must not win.
xs = rs.standard_normal((20011, d), dtype=cp.float32).astype(cp.float16)
qs = np.random.default_rng(1).standard_normal((97, d)).astype(np.float32)
s_got, i_got = topk_pass(cb, qs, xs, k, progress=False)
s_ref = np.full((97, k), -np.inf); i_ref = np.full((97, k), -1, np.int64)
ref.topk_update(qs.astype(np.float64), xs.get().astype(np.float64), 0, np.zeros(0, np.int64), True, s_ref, i_ref)
same = float((i_got == i_ref).mean()); err = float(np.abs(s_got - s_ref).max())
sys.path.insert(0, sys.argv[3])
from device_check import device_corpus  # the corpus every top-k figure of the report uses
x = device_corpus(n)
q = np.random.default_rng(2).standard_normal((n_q, d)).astype(np.float32)
topk_pass(cb, q, x, k, progress=False); cp.cuda.Device().synchronize()
runs = []
for _ in range(3):
    t = time.perf_counter(); topk_pass(cb, q, x, k, progress=False); cp.cuda.Device().synchronize()
    runs.append(time.perf_counter() - t)
print(json.dumps({"runs": runs, "same_index": same, "max_score_err": err}))
"""


def part_launch_sweep(b: Bench, s):
    """Top-k pass time per launch-table variant (a subprocess each: the table is read once per
    process, at the first compile), each checked against the reference first. For the next
    session's kernel work: which way the shipped table should move."""
    skip = _skip_without_cuda(b, "launch sweep")
    if skip:
        return skip
    n = _env_int("DC_N_SWEEP", 1e7)
    floor_s, floor_what = topk_floor(b, n, 1000)
    for label, change in LAUNCH_VARIANTS:
        kw = dict(n=n, n_q=1000, k=10, floor_s=floor_s, floor_what=floor_what)

        def run(change=change):
            res = subprocess.run([sys.executable, "-c", _SWEEP_CHILD, json.dumps(change), str(n),
                                  str(ROOT / "bench")],
                                 capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "PYTHONPATH": os.environ.get("PKG_ROOT", str(ROOT))})
            if res.returncode:
                raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed")
            got = json.loads(res.stdout.strip().splitlines()[-1])
            note_ = (f"{json.dumps(change)}; vs reference (20011 rows, 97 queries): "
                     f"{got['same_index']:.4f} of indices equal, max |score diff| {got['max_score_err']:.2g}")
            return got["runs"], {"note_": note_}
        b.attempt(f"launch sweep: {label}", "cuda (topk_pass, device corpus)", run, **kw)
    return 0, ""


PARTS = {"floors": part_floors, "topk-cuda": part_topk_cuda, "fit-cuda": part_fit_cuda,
         "cpp": part_cpp, "launch-sweep": part_launch_sweep}


def bench(part, out, dry):
    b = Bench(out, part, dry)
    s = sizes(dry)
    got = PARTS[part](b, s)
    rc, why = got if isinstance(got, tuple) else (0, "")
    if b.failed:
        note(f"{b.failed} figure(s) failed (see bench.json / log.txt)")
        return 1
    note(why or "ok")
    return rc


# ---- report -----------------------------------------------------------------------------------


def _read_steps(out):
    steps = []
    path = out / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            f = line.split("\t")
            if len(f) >= 6:
                steps.append({"step": f[0], "status": f[1], "rc": int(f[2]), "seconds": int(f[3]),
                              "timeout_s": int(f[4]), "note": f[5]})
    return steps


#: The test files that only a GPU runs (tests/<name>.py; they skip without one): the report tallies
#: each, so a device check that skipped them shows it.
GPU_TEST_FILES = ("test_cuda", "test_cuda_qtopk")


def _junit(out):
    path = out / "junit.xml"
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable junit.xml: {exc}"}
    suites = root.findall("testsuite") if root.tag == "testsuites" else [root]
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skip_reasons = [], {}
    for suite in suites:
        for key in tot:
            tot[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            sk = case.find("skipped")
            if sk is not None:
                reason = (sk.get("message") or "")[:160]
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    tot["failed_tests"] = failed[:200]
    tot["skip_reasons"] = skip_reasons
    tot["cuda_cases"] = sum(1 for s in suites for c in s.iter("testcase")
                            if "cuda" in (c.get("name", "") + c.get("classname", "")))
    # The GPU-only files, tallied apiece: a file whose cases all skipped did not check anything.
    per_file = {}
    for suite in suites:
        for case in suite.iter("testcase"):
            # A collected case: classname tests.test_x; a whole module skipped at collection:
            # classname "" and name tests.test_x.
            module = (case.get("classname") or case.get("name") or "").split(".")[-1]
            if module not in GPU_TEST_FILES:
                continue
            t = per_file.setdefault(module, {"run": 0, "passed": 0, "failed": 0, "skipped": 0})
            t["run"] += 1
            if case.find("failure") is not None or case.find("error") is not None:
                t["failed"] += 1
            elif case.find("skipped") is not None:
                t["skipped"] += 1
            else:
                t["passed"] += 1
    tot["gpu_files"] = per_file
    return tot


def _fmt(x, unit="s"):
    return "" if x is None else f"{x:.4g} {unit}".strip()


def report(out, dry):
    info = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    recs = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else []
    steps = _read_steps(out)
    tests = _junit(out)
    failed = [s["step"] for s in steps if s["status"] not in NOT_FAILED]
    gpu = info.get("gpu") or "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    folder = f"bench/results/{info.get('date', date.today().isoformat())}_{slug}_device-check"
    results = {"dry": dry, "complete": any(s["step"] == "report-final" for s in steps)
               or (out / ".complete").exists(), "failed_steps": failed, "steps": steps,
               "env": info, "tests": tests, "figures": recs, "commit_to": folder}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    L = [f"# nudgefast device check{' (DRY: CPU rehearsal, no GPU figures)' if dry else ''}", "",
         f"- device: {info.get('gpu') or 'no GPU'}; CPU {info.get('cpu', '?')} ({info.get('cores')} cores)",
         f"- driver {info.get('driver', '?')}; CUDA runtime {info.get('cuda_runtime', '-')}, "
         f"driver API {info.get('cuda_driver', '-')}; CuPy {info.get('cupy')}; torch {info.get('torch')}; "
         f"numpy {info.get('numpy')}; Python {info.get('python')}",
         f"- commit {info.get('commit', '?')}" + (" (dirty tree)" if info.get("dirty") else "")
         + (" (stated by the caller: DC_COMMIT)" if info.get("commit_source") else ""),
         f"- commit these files under `{folder}/`", "",
         "## Summary", "",
         ("**failed steps: " + ", ".join(failed) + "**") if failed else "no step failed", "",
         "| step | status | seconds | timeout (s) | note |", "|---|---|---|---|---|"]
    L += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['timeout_s']} | {s['note']} |"
          for s in steps]
    if tests:
        L += ["", "## Tests (junit.xml)", ""]
        if "error" in tests:
            L.append(tests["error"])
        else:
            L.append(f"{tests['tests']} tests, {tests['failures']} failures, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped; {tests['cuda_cases']} cases name cuda")
            L += [f"- tests/{name}.py: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                  for name, t in sorted(tests.get("gpu_files", {}).items())]
            L += [f"- FAILED {n}" for n in tests["failed_tests"][:40]]
            L += [f"- skipped x{c}: {r}" for r, c in sorted(tests["skip_reasons"].items(),
                                                            key=lambda x: -x[1])[:12]]
    L += ["", "## Figures", "",
          "Throughput = N x Q / median time (record-queries per second), so ratios across "
          "backends run at different N are per record. Floor: top-k = 2·N·d·Q flops at the measured "
          "dense rate; streamed fit = corpus bytes over the measured pinned H2D bandwidth.", "",
          "| part | what | who | N | Q | k | status | median (min-max) | record-queries/s | floor | "
          "time / floor | fit / search pass | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        t = (f"{r['median_s']:.4g} s ({r['min_s']:.3g}-{r['max_s']:.3g})" if "median_s" in r else "-")
        thr = f"{r['record_queries_per_s']:.3g}" if "record_queries_per_s" in r else ""
        fl = f"{r['floor_s']:.3g} s: {r['floor_what']}" if r.get("floor_s") else ""
        ratio = f"{r['ratio_to_floor']:.2f}" if "ratio_to_floor" in r else ""
        fs = f"{r['fit_over_search_pass']:.2f}" if "fit_over_search_pass" in r else ""
        L.append(f"| {r['part']} | {r['what']} | {r['who']} | {r.get('n') or ''} | {r.get('n_q') or ''} "
                 f"| {r.get('k') or ''} | {r['status']} | {t} | {thr} | {fl} | {ratio} | {fs} | {r['note']} |")
    by = {}
    for r in recs:
        if "record_queries_per_s" in r:
            by.setdefault(r["what"].split(" (")[0], {})[r["who"]] = r["record_queries_per_s"]
    L += ["", "## Notes", "",
          "- Resident-corpus top-k: `search.topk_pass(cuda_backend, ...)`, the backend's own pass "
          "(the kernel's figure). Searches and fits go through the public API twice: with the "
          "corpus resident on the device (floor: compute) and with a pinned host corpus streamed "
          "(floor: H2D bandwidth).",
          "- Peers (torch, CuPy) score raw dot products of unit rows; nudgefast also computes norms.",
          "- Files: report.md, results.json (every figure and status), bench.json, env.json "
          "(nvidia-smi in it), steps.tsv, junit.xml, log.txt (each step's output, capped)."]
    if info.get("nvidia_smi"):
        L += ["", "## nvidia-smi", "", "```", info["nvidia_smi"], "```"]
    (out / "report.md").write_text("\n".join(L) + "\n")
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry" in argv
    argv = [a for a in argv if a != "--dry"]
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    # The package under test: the checkout (built in place), or the dry run's built copy.
    sys.path.insert(0, os.environ.get("PKG_ROOT", str(ROOT)))
    if cmd == "env":
        return env(Path(rest[0]), dry)
    if cmd == "bench":
        return bench(rest[0], Path(rest[1]), dry)
    if cmd == "report":
        return report(Path(rest[0]), dry)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
