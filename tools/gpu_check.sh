#!/usr/bin/env bash
# GPU check in one short slot (< 8 minutes): install mmsn and its pure-Python
# OpenMMLab dependencies offline, run the GPU tests, benchmark SN on the card.
#
# For a machine with Python, torch (CUDA) and triton but no network and no
# OpenMMLab packages (e.g. Python 3.12, torch 2.11, triton 3.6): the wheels
# come from .wheels/ in the repository (git-ignored; copy them from the
# shared wheel folder, see docs/gpu_check.md). Installs into the Python that
# runs the script (PYTHON, default python3): use a throw-away machine or venv.
#
# Writes to $OUT (default ./gpu_check_out), at most 8 files:
#   summary.txt        each step's status and time, the targets table
#   env.txt            card, driver, versions
#   install.log, tests_gpu.log, tests_cpu.log, benchmark.log
#   benchmark_gpu.md   the report (copy it to docs/benchmark_gpu.md): the
#                      host toll of SN vs BN and the compiled ResNet-50 step
#                      first (issue 17), then per-layer timings (issue 10)
# Every step runs under its own time limit, and the next steps run even if
# one fails; the exit status is that of the first failed step.
# MMSN_GPU_CHECK_DRY_RUN=1 runs the same steps on a machine without a GPU,
# the benchmark as a tiny CPU run of the report (to check the script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
WHEELS=${MMSN_WHEELS:-.wheels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the GPU tests must run compiled kernels, not Triton's interpreter
unset TRITON_INTERPRET
BENCH_ARGS=(--device cuda --compile-every 6 --triton-tiles 2048 4096)
if [ "${MMSN_GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    # the compiled step traced without inductor: minutes on a small CPU
    BENCH_ARGS=(--device cpu --gpu-report --shapes 2,32,4 --reps 2
        --compile-every 0 --resnet-batch 2 --resnet-reps 1 --triton-tiles 64
        --compile-backend eager)
fi
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
first_failure=0
script_start=$SECONDS

# step NAME LIMIT_SECONDS LOG COMMAND...: run with a time limit, log to
# $OUT/LOG, record the status and keep going.
# COMMAND may be a function of this script (run in a child bash).
step() {
    local name=$1 limit=$2 logname=$3 start=$SECONDS rc=0
    local log=$OUT/$3
    shift 3
    echo "=== $name (limit ${limit}s) ===" | tee -a "$log"
    if declare -F "$1" >/dev/null; then
        set -- bash -euo pipefail -c "$*"
    fi
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMED OUT after ${limit}s"
    elif [ "$rc" -ne 0 ]; then
        status="FAILED (exit $rc)"
    fi
    printf '%-40s %-24s %4ds  (%s)\n' "$name" "$status" \
        $((SECONDS - start)) "$logname" | tee -a "$SUMMARY"
    if [ "$rc" -ne 0 ] && [ "$first_failure" -eq 0 ]; then
        first_failure=$rc
    fi
    tail -n 3 "$log" | sed 's/^/    /'
    return 0
}

environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
        --format=csv || true
    "$PY" - <<'EOF'
import sys
import torch
print('python', sys.version.split()[0], sys.executable)
print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'cudnn', torch.backends.cudnn.version())
try:
    import triton
    print('triton', triton.__version__)
except ImportError as exc:
    print('triton not importable:', exc)
print('cuda available', torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print('device', props.name, props.multi_processor_count, 'SMs',
          round(props.total_memory / 2**30), 'GiB')
EOF
}

install() {
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "no wheels in $WHEELS: copy the shared wheel folder there" \
            "(docs/gpu_check.md) and carry it to the machine"
        return 1
    fi
    "$PY" -m pip install --disable-pip-version-check --no-index --no-deps \
        --no-compile -q "${wheels[@]}"
    # mmsn._C (CPU kernels) builds against the installed torch; the GPU path
    # does not need it, so a failed build falls back to an install without
    if ! MAX_JOBS=16 "$PY" -m pip install --disable-pip-version-check \
        --no-deps --no-build-isolation -q -e .; then
        echo "building mmsn._C failed: installing without it"
        export MMSN_WITH_OPS=0
        "$PY" -m pip install --disable-pip-version-check --no-deps \
            --no-build-isolation -q -e .
    fi
    "$PY" -c "import mmsn, mmsn.ops, mmpretrain, mmengine
print('mmsn', mmsn.__version__, mmsn.__file__)
print('mmsn._C built:', mmsn.ops.compiled_kernels_available())
import mmsn.ops.backends.triton as t
print('Triton backend imports; interpreted:', t.kernels_interpreted())"
}

export PY WHEELS
export -f environment install
step "environment" 60 env.txt environment
step "install (offline wheels, mmsn -e)" 240 install.log install
if ! "$PY" -c "import mmsn.ops, sys
sys.exit(not mmsn.ops.compiled_kernels_available())" 2>/dev/null; then
    export MMSN_WITH_OPS=0  # tests of mmsn._C skip instead of failing
fi
# in parallel where pytest-xdist is installed (Triton compiles each
# process's kernels, sharing its disk cache)
xdist=()
if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 8); fi
# the Triton backend and the layer methods on CUDA tensors (compiled
# kernels, run concurrently)
step "tests: Triton backend on CUDA" 120 tests_gpu.log \
    "$PY" -m pytest -q -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} \
    tests/test_triton_backend.py tests/test_triton_layer.py
if [ "${MMSN_GPU_CHECK_DRY_RUN:-0}" = 1 ]; then export TRITON_INTERPRET=1; fi
# issue 17 first: launches, dispatched ops and host syncs per layer, SN vs
# BN, and a ResNet-50 step under torch.compile(mode='reduce-overhead')
# (two compiles); the report is written as it goes
step "benchmark: host toll, compiled step" 180 benchmark.log \
    "$PY" tools/analysis/benchmark_norm.py "${BENCH_ARGS[@]}" \
    --part host-toll --output "$OUT/benchmark_gpu.md"
# the layer's tests (on the CPU: they select no CUDA device)
step "tests: SN layer and fast path" 75 tests_cpu.log \
    "$PY" -m pytest -q -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} \
    tests/test_switchable_norm.py tests/test_fast_path.py
# what is left of 8 minutes goes to the rest of the benchmark, appended to
# the report (a timeout keeps the tables done so far)
left=$((470 - (SECONDS - script_start)))
if [ "$left" -lt 30 ]; then left=30; fi
step "benchmark: per layer, ResNet-50, targets" "$left" benchmark.log \
    "$PY" tools/analysis/benchmark_norm.py "${BENCH_ARGS[@]}" \
    --part rest --output "$OUT/benchmark_gpu.md"

echo
echo "=== summary ($((SECONDS - script_start))s) ==="
cat "$SUMMARY"
if [ -f "$OUT/benchmark_gpu.md" ]; then
    # the report's targets table
    awk '/^### Targets/{on=1} /^### Triton/{on=0} on' "$OUT/benchmark_gpu.md" \
        | tee -a "$SUMMARY"
fi
exit "$first_failure"
