#!/usr/bin/env bash
# The GPU check of a CUDA machine, in one command: tests/gpu/ with pytest, then the overhead
# benchmark on a ~350M-parameter GPT (24 layers, width 1024, 370M parameters) under bf16
# autocast, statistics every step, the forward probes at their default cadence (every 10
# steps), printing the step-time ratios and the host synchronisations per step.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# Expected environment (nothing is downloaded: the machine may have no network):
#   * a Python with a CUDA build of torch (>= 2.4), numpy, pyyaml, prometheus-client, pytest and
#     pyzmq; $PYTHON names it, else `python3`. The repository is used in place (PYTHONPATH), not
#     installed.
#   * a package missing there may travel as wheels in .whl/ at the repository root (ignored by
#     git); they are installed with pip --no-index into a temporary folder, never from a network.
#     For pyzmq on a Python 3.12 machine, here:
#       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 -d .whl pyzmq
#   * transformer_engine is optional: tests/gpu/test_te_*.py skip without it.
#   * $OUT (or --out DIR): where the logs go (gpu_tests.log, overhead.log, summary.txt);
#     default: a new temporary folder.
# Time: about 3-5 minutes on one H200; each part has its own timeout (tests 180 s, benchmark
# 300 s), so the whole stays under 9 minutes.
#
# Exit status: 0 ran and passed, or no CUDA device (it then prints "no CUDA device: gpu_check did
# not run" and runs nothing); 1 a GPU test or the benchmark failed or timed out; 2 the
# environment lacks a Python package (named); 64 usage. --dry-run prints the commands and exits 0.
set -u

usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; }

DRY_RUN=0
OUT_DIR=${OUT:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) shift; OUT_DIR=${1:?--out needs a folder} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument $1" >&2; usage >&2; exit 64 ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 64
PY=${PYTHON:-python3}
TESTS_TIMEOUT=${GPU_CHECK_TESTS_TIMEOUT:-180}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-300}

TESTS_CMD=("$PY" -m pytest -q -p no:cacheprovider -rs tests/gpu)
BENCH_CMD=("$PY" benchmarks/overhead.py --device cuda --dtype bfloat16 --gpt 350m --batch-size 8
           --rounds 4 --steps 16 --threads 8 --probes 10 --syncs 20)

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check (dry run): would run, in $ROOT, with PYTHONPATH=$ROOT:"
    echo "  $PY -c 'import torch; torch.cuda.is_available()'   # else: no CUDA device: gpu_check did not run"
    [ -d .whl ] && echo "  $PY -m pip install -q --no-index --no-deps --target <tmp> .whl/*.whl"
    echo "  timeout $TESTS_TIMEOUT ${TESTS_CMD[*]}"
    echo "  timeout $BENCH_TIMEOUT ${BENCH_CMD[*]}"
    exit 0
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# Wheels carried in .whl/ (no index: nothing is fetched).
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl; then
        export PYTHONPATH="$PYTHONPATH:$SITE"
    else
        echo "gpu_check: could not install the wheels in .whl/ (going on without them)" >&2
    fi
fi

if ! reason=$("$PY" -c '
import sys
try:
    import torch
except Exception as exc:
    sys.exit(f"torch does not import: {exc}")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
' 2>&1); then
    echo "no CUDA device: gpu_check did not run (${reason:-$PY not found})"
    exit 0
fi

missing=$("$PY" -c '
import importlib.util
names = {"zmq": "pyzmq", "yaml": "pyyaml", "numpy": "numpy", "prometheus_client": "prometheus-client", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in names.items() if importlib.util.find_spec(mod) is None))
')
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (carry their wheels in .whl/; see the head of $0)"
    exit 2
fi

[ -n "$OUT_DIR" ] || OUT_DIR=$(mktemp -d /tmp/gpu-check.XXXXXX)
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB")'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
} | tee "$SUMMARY"

echo "== tests/gpu (timeout ${TESTS_TIMEOUT}s)"
timeout "$TESTS_TIMEOUT" "${TESTS_CMD[@]}" >"$OUT_DIR/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 25 "$OUT_DIR/gpu_tests.log"

echo "== overhead benchmark (timeout ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" "${BENCH_CMD[@]}" >"$OUT_DIR/overhead.log" 2>&1
bench_rc=$?
tail -n 40 "$OUT_DIR/overhead.log"

{
    echo "== summary"
    echo "tests/gpu: rc=$tests_rc, $(grep -E '(passed|failed|skipped|error)' "$OUT_DIR/gpu_tests.log" | tail -n 1)"
    echo "overhead: rc=$bench_rc"
    grep -E '^(GPT:|overhead_ratio|callback_ratio|probes_ratio|probes_vs_sentinel|probe_step_ratio|probe_amortized_ratio|host_syncs_per_step_|host_blocking_calls_per_step_|syncs )' \
        "$OUT_DIR/overhead.log"
    echo "logs: $OUT_DIR"
} | tee -a "$SUMMARY"

[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && exit 0
[ "$tests_rc" = 124 ] && echo "gpu_check: tests/gpu timed out after ${TESTS_TIMEOUT}s"
[ "$bench_rc" = 124 ] && echo "gpu_check: the benchmark timed out after ${BENCH_TIMEOUT}s"
exit 1
