#!/usr/bin/env bash
# The CUDA kernels, checked without a GPU: every csrc/cuda/*.cu compiles to cubin for sm_80 and
# sm_90 with the -D options the runtime passes (read from cuda_backend's LAUNCH table and
# _options(), without importing CuPy), ptxas reports no spills and no more registers than
# __launch_bounds__ allows in the hot (top-k) kernels, and, where libnvrtc is installed, NVRTC
# compiles the sources exactly as the runtime hands them to CuPy (headers pasted, same options).
# Prints the per-kernel register table. Usage: bash .ci/cuda_check.sh  (NUDGEFAST_REQUIRE_NVRTC=1:
# fail when libnvrtc is missing instead of skipping that part).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "cuda_check: nvcc not found: cannot check csrc/cuda" >&2; exit 1; }
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PYTHON" - "$@" <<'PY'
import ast
import concurrent.futures as cf
import ctypes
import ctypes.util
import glob
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BACKEND = Path("nudgefast/_backends/cuda_backend.py")
SRC = Path("csrc/cuda")
ARCHS = ("sm_80", "sm_90")
HOT = re.compile(r"^topk_(select|keys)_f(16|32)(_vec)?$")  # the top-k kernels: one per corpus row tile


def runtime_pieces():
    """LAUNCH, _options and _source as cuda_backend defines them, taken from its source with ast
    (the module itself imports CuPy and needs a device): no second copy of the table to drift."""
    tree = ast.parse(BACKEND.read_text())
    wanted = {"LAUNCH", "_INCLUDE", "_options", "_source"}
    keep = []
    for node in tree.body:
        names = ({t.id for t in node.targets if isinstance(t, ast.Name)} if isinstance(node, ast.Assign)
                 else {node.target.id} if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                 else {node.name} if isinstance(node, ast.FunctionDef) else set())
        if names & wanted:
            keep.append(node)
    ns = {"re": re, "_SOURCE_DIR": SRC}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(BACKEND), "exec"), ns)
    missing = wanted - ns.keys()
    if missing:
        sys.exit(f"cuda_check: {BACKEND} no longer defines {sorted(missing)} at module level")
    return ns["LAUNCH"], ns["_options"](), ns["_source"]


def register_cap(threads: int, min_blocks: int) -> int:
    """Registers per thread that __launch_bounds__(threads, min_blocks) allows: 64K per SM over
    min_blocks blocks, warps allocated whole, per-thread counts in steps of 8, at most 255."""
    warps = -(-threads // 32)
    per_thread = 65536 // (warps * 32 * max(1, min_blocks))
    return min(255, per_thread // 8 * 8)


def ptxas(cu: Path, arch: str, options, out_dir: str):
    cmd = ["nvcc", f"-arch={arch}", "-cubin", f"-I{SRC}", *options, "-Xptxas", "-v,-warn-spills",
           "-o", os.path.join(out_dir, f"{cu.stem}.{arch}.cubin"), str(cu)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stdout + res.stderr)
        sys.exit(f"cuda_check: nvcc failed on {cu} for {arch}: {' '.join(cmd)}")
    kernels, props, name, name_for_props = {}, {}, None, None
    for line in (res.stdout + res.stderr).splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for", line):
            name = m.group(1)
            kernels[name] = {"regs": None}
        elif m := re.search(r"Function properties for (\S+)", line):
            props_name = m.group(1)
            props[props_name] = props.get(props_name, {})
            name_for_props = props_name
        elif name_for_props and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            props[name_for_props].update(stack=int(m.group(1)), spill_st=int(m.group(2)),
                                         spill_ld=int(m.group(3)))
        elif (m := re.search(r"Used (\d+) registers", line)) and name is not None:
            kernels[name]["regs"] = int(m.group(1))
    for k, v in kernels.items():
        v.update(props.get(k, {"stack": 0, "spill_st": 0, "spill_ld": 0}))
    return kernels


def find_nvrtc():
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    try:  # where `nvcc` really lives (it may be a wrapper script)
        out = subprocess.run(["nvcc", "-v", "--dryrun", "-x", "cu", "-c", "/dev/null"],
                             capture_output=True, text=True).stderr
        roots += re.findall(r"TOP=(\S+)", out)
    except OSError:
        pass
    candidates = []
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            candidates += sorted(glob.glob(os.path.join(root, sub, "libnvrtc.so*")))
    for site in sys.path:  # the nvidia-cuda-nvrtc wheel
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "lib", "libnvrtc.so*")))
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
    if found := ctypes.util.find_library("nvrtc"):
        candidates.append(found)
    for path in candidates:
        try:
            return ctypes.CDLL(path), path
        except OSError:
            continue
    return None, None


def nvrtc_compile(lib, name: str, source: str, options, arch: str):
    """Compiles `source` to cubin as CuPy's RawModule would (same options; -arch chosen here).
    Returns None on success, else the log."""
    prog = ctypes.c_void_p()
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    def check(code, what):
        if code:
            raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(code).decode()}")
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
          "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in (*options, f"--gpu-architecture={arch}")]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        log = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        return (log.value.decode(errors="replace") or f"NVRTC error {rc}") if rc else None
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def main():
    launch, options, source = runtime_pieces()
    topk = launch["TOPK"]
    cap = register_cap(topk["THREADS"], topk["MIN_BLOCKS"])
    print("cuda_check: runtime options:", " ".join(options))
    cus = sorted(SRC.glob("*.cu"))
    failures = []
    with tempfile.TemporaryDirectory() as out_dir, cf.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        jobs = {(cu, arch): pool.submit(ptxas, cu, arch, options, out_dir) for cu in cus for arch in ARCHS}
        print(f"{'kernel':28} {'arch':6} {'regs':>4} {'cap':>4} {'stack':>5} {'spill st/ld':>11}")
        for (cu, arch), job in jobs.items():
            for kname, v in sorted(job.result().items()):
                hot = bool(HOT.match(kname))
                mark = ""
                if hot and (v["spill_st"] or v["spill_ld"]):
                    failures.append(f"{kname} ({arch}) spills {v['spill_st']}/{v['spill_ld']} bytes")
                    mark = "  <- SPILLS"
                if hot and (v["regs"] is None or v["regs"] > cap):
                    failures.append(f"{kname} ({arch}) uses {v['regs']} registers, "
                                    f"__launch_bounds__({topk['THREADS']}, {topk['MIN_BLOCKS']}) allows {cap}")
                    mark += "  <- OVER CAP"
                print(f"{kname:28} {arch:6} {v['regs']!s:>4} {(cap if hot else '-')!s:>4} {v['stack']:>5} "
                      f"{v['spill_st']:>5}/{v['spill_ld']:<5}{mark}")
    print(f"cuda_check: {len(cus)} sources compiled to cubin for {', '.join(ARCHS)} with the runtime's options")

    lib, path = find_nvrtc()
    if lib is None:
        msg = ("cuda_check: NVRTC check skipped: no libnvrtc in this CUDA install (nvcc/ptxas only; "
               "pip install nvidia-cuda-nvrtc, or a full toolkit, provides it)")
        if os.environ.get("NUDGEFAST_REQUIRE_NVRTC") == "1":
            failures.append(msg)
        else:
            print(msg)
    else:
        for cu in cus:
            for arch in ARCHS:
                err = nvrtc_compile(lib, cu.name, source(cu.name), options, arch)
                if err:
                    failures.append(f"NVRTC ({path}) failed on {cu.name} for {arch}:\n{err}")
        print(f"cuda_check: NVRTC ({path}) compiled {len(cus)} sources as the runtime does")
    if failures:
        print("cuda_check: FAILED\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)
    print("cuda_check: passed")


main()
PY
