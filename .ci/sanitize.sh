#!/usr/bin/env bash
# The compiled CPU backend under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# Builds nudgefast._cpu once more with -fsanitize=address,undefined -O1 -g into a separate tree
# (build/sanitize/lib: a copy of the Python package with the sanitized module; the normal install
# and the in-place module are not touched) and runs the compiled-op tests against it:
# tests/test_cpp_ops.py, tests/test_cpp_safety.py and tests/test_cpu_isa.py (every instruction-set
# level this machine has). Any heap overflow or undefined behaviour in
# a kernel or the binding aborts the run with a report. The op tests over every backend
# (tests/ops, when present) run too, for the cpp backend only (-k cpp). Extra arguments go to
# pytest (e.g. -x; a -k of its own replaces the cpp / cpu_isa filter).
#
# Python itself is not instrumented, so libasan is preloaded (it must come first in the process),
# and libstdc++ with it: ASan binds its __cxa_throw interceptor when it starts, and Python does
# not load libstdc++ by itself, so without it the first C++ exception (every ValueError of the
# binding) aborts in a failed CHECK. Leak detection is off (the interpreter keeps its objects
# alive at exit by design).
#
#   bash .ci/sanitize.sh            # in an environment with numpy, pytest, pybind11 (or pip)
#   NUDGEFAST_SANITIZE_DIR=/tmp/x   # build somewhere else
#
# Uses the active `python`; installs pybind11 with pip if it is missing, and gcc's sanitizer
# runtimes with apt-get if they are missing and this runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
work="${NUDGEFAST_SANITIZE_DIR:-$root/build/sanitize}"
cxx="${CXX:-g++}"
start=$SECONDS

# gcc's ASan runtime: `-print-file-name` answers the bare name when it finds nothing, and the
# libasan.so symlink (from libgcc-N-dev) dangles until the runtime package is installed.
libasan="$("$cxx" -print-file-name=libasan.so)"
if [[ ! -e "$libasan" ]]; then
    major="$("$cxx" -dumpversion | cut -d. -f1)"
    if [[ "$(id -u)" != 0 ]]; then
        echo "sanitize: libasan for $cxx (gcc $major) not found; install it: apt-get install -y libgcc-$major-dev" >&2
        exit 1
    fi
    echo "sanitize: installing gcc $major's sanitizer runtimes (libgcc-$major-dev: libasan, libubsan)"
    apt-get update -qq && apt-get install -y -qq "libgcc-$major-dev" >/dev/null
    libasan="$("$cxx" -print-file-name=libasan.so)"
    [[ -e "$libasan" ]] || { echo "sanitize: still no libasan.so after installing libgcc-$major-dev" >&2; exit 1; }
fi
python -c "import pybind11" 2>/dev/null || python -m pip install -q "pybind11>=2.12"

# A package tree of its own: the sources as they are, without any built module.
rm -rf "$work/lib" "$work/tmp" "$work/cxx"  # only what this script made: the folder may be shared
mkdir -p "$work/lib"
tar -C "$root" --exclude='__pycache__' --exclude='*.so' --exclude='*.pyd' -cf - nudgefast | tar -C "$work/lib" -xf -

# setup.py picks the optimisation, SIMD and OpenMP flags (as for the normal build) and puts them
# last on the command line; this wrapper appends the sanitizer flags after them, so -O1 -g win
# over -O3 -g0. It compiles and links (the linker must see -fsanitize too).
cat >"$work/cxx" <<EOF
#!/bin/sh
exec $cxx "\$@" -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
EOF
chmod +x "$work/cxx"
echo "sanitize: building nudgefast._cpu with ASan + UBSan into $work/lib"
CC="$work/cxx" CXX="$work/cxx" python setup.py -q build_ext --parallel "$(nproc)" \
    --build-lib "$work/lib" --build-temp "$work/tmp" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log" >&2; echo "sanitize: build failed" >&2; exit 1; }
module="$(ls "$work"/lib/nudgefast/_cpu*.so)"
libstdcxx="$("$cxx" -print-file-name=libstdc++.so)"
[[ "$(nm -D "$module")" == *__asan_* ]] || { echo "sanitize: $module is not instrumented" >&2; exit 1; }
echo "sanitize: built in $((SECONDS - start)) s"

# Run from $work (not the checkout, whose nudgefast/ would shadow the copy) with the copy first
# on the path, and check in the test process itself which module it imported.
cd "$work"
export PYTHONPATH="$work/lib${PYTHONPATH:+:$PYTHONPATH}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:symbolize=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}"
LD_PRELOAD="$libasan:$libstdcxx${LD_PRELOAD:+:$LD_PRELOAD}" python - "$work/lib" "$root" "$@" <<'EOF'
import os
import sys

import pytest

import nudgefast._cpu

lib, root, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
if not nudgefast._cpu.__file__.startswith(lib):
    sys.exit(f"sanitize: imported {nudgefast._cpu.__file__}, not the sanitized module under {lib}")
print(f"sanitize: testing {nudgefast._cpu.__file__}", flush=True)
tests = [f"{root}/tests/test_cpp_ops.py", f"{root}/tests/test_cpp_safety.py", f"{root}/tests/test_cpu_isa.py"]
if os.path.isdir(f"{root}/tests/ops"):
    tests.append(f"{root}/tests/ops")  # every test id there names its backend
# --capture=sys: the sanitizers write their report to file descriptor 2 and then abort, so pytest
# must not hold that descriptor in a capture file. No faulthandler: it would take SIGSEGV from
# ASan, whose report names the bad access.
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:faulthandler", "--capture=sys",
                      "--rootdir", root, "-c", f"{root}/pyproject.toml", "-k", "cpp or cpu_isa", *tests, *extra]))
EOF
echo "sanitize: done in $((SECONDS - start)) s"
