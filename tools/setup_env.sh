#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the tested stack
# (requirements/constraints.txt) and mmsn installed in editable mode, its
# compiled CPU kernels (mmsn._C) built in place.
#
#   bash tools/setup_env.sh          # classification: torch, mmengine,
#                                    # mmpretrain, mmcv-lite (what the demo
#                                    # needs; ~2 min on a fresh machine)
#   bash tools/setup_env.sh --all    # + full mmcv with compiled ops, mmdet,
#                                    # mmseg, pytest (what the tests need)
#
# Safe to run again: a stamp per stage, keyed by the requirement files and
# the kernel sources, skips work that is already done. Two set-ups started
# at once on one environment take turns (a lock beside it). MMSN_VENV picks
# the environment's folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MMSN_VENV:-.venv}
PY=${PYTHON:-python3}
STAGE=core
case "${1:-}" in
    --all) STAGE=all ;;
    "") ;;
    *) echo "usage: $0 [--all]" >&2; exit 2 ;;
esac

log() { echo "[setup] $*" >&2; }
key_of() { cat "$@" | sha256sum | cut -c1-16; }
core_key=$(key_of requirements/runtime.txt requirements/demo.txt \
    requirements/constraints.txt setup.cfg setup.py pyproject.toml \
    mmsn/ops/csrc/*)
all_key=$(key_of requirements/tests.txt requirements/downstream.txt \
    tools/build_mmcv.sh <(echo "$core_key"))
core_stamp="$VENV/.mmsn-setup-core-$core_key"
all_stamp="$VENV/.mmsn-setup-all-$all_key"
done_already() {
    [ -f "$core_stamp" ] && { [ "$STAGE" = core ] || [ -f "$all_stamp" ]; }
}
if done_already; then
    log "$VENV is up to date ($STAGE)"
    exit 0
fi

# One set-up at a time per environment: a second one waits, then finds the
# stamps of the first.
mkdir -p "$(dirname "$VENV")"
exec 8>"${VENV%/}.lock"
if ! flock -n 8; then
    log "another set-up of $VENV is running; waiting for it"
    flock 8
fi
if done_already; then
    log "$VENV is up to date ($STAGE)"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip, without the noise about this machine's missing local index folders;
# its own output and exit status are kept, so a failed install stops the
# set-up with pip's error.
pip() {
    "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
has_module() {
    "$VENV/bin/python" -c "import importlib.util as u, sys
sys.exit(u.find_spec('$1') is None)" 2>/dev/null
}
C=(-c requirements/constraints.txt)

if [ ! -f "$core_stamp" ]; then
    start=$(date +%s)
    log "installing torch, mmengine, mmpretrain and mmcv-lite into $VENV" \
        "(about 2 minutes on a fresh machine, most of it torch)"
    pip install -q "${C[@]}" 'setuptools<80' wheel ninja
    pip install -q "${C[@]}" -r requirements/runtime.txt \
        -r requirements/demo.txt
    # mmcv-lite unless full mmcv (from --all) is already there: both
    # install the same `mmcv` package.
    has_module mmcv || pip install -q "${C[@]}" mmcv-lite
    log "installing mmsn (editable) and compiling its CPU kernels (~40 s)"
    # --no-build-isolation: mmsn._C compiles against the torch above
    pip install -q --no-deps --no-build-isolation -e .
    "$VENV/bin/python" -c "import os, mmsn, mmpretrain
assert mmsn.ops.compiled_kernels_available() or \\
    os.environ.get('MMSN_WITH_OPS') == '0', 'mmsn._C was not built'"
    rm -f "$VENV"/.mmsn-setup-core-*
    touch "$core_stamp"
    log "classification stack ready in $(( $(date +%s) - start )) s"
fi

if [ "$STAGE" = all ] && [ ! -f "$all_stamp" ]; then
    start=$(date +%s)
    pip install -q "${C[@]}" -r requirements/tests.txt
    # Full mmcv 2.1.0 (compiled ops, for mmdet/mmseg) from a wheel that
    # tools/build_mmcv.sh builds once per machine (~11 min on 2 idle cores)
    # and caches. It replaces mmcv-lite: both install the same package.
    mmcv_wheel=$(bash tools/build_mmcv.sh "$VENV/bin/python")
    if ! has_module mmcv._ext; then
        pip uninstall -y -q mmcv-lite mmcv
        pip install -q "${C[@]}" "$mmcv_wheel"
    fi
    pip install -q "${C[@]}" -r requirements/downstream.txt
    "$VENV/bin/python" -c "import mmcv.ops, mmdet, mmseg"
    rm -f "$VENV"/.mmsn-setup-all-*
    touch "$all_stamp"
    log "downstream stack ready in $(( $(date +%s) - start )) s"
fi
log "mmsn ready in $VENV ($STAGE)"
