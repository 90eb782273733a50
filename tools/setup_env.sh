#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the tested stack and
# mmsn installed in editable mode, its compiled CPU kernels (mmsn._C) built
# in place. Safe to run again: a stamp keyed by the requirement files and the
# kernel sources skips work that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MMSN_VENV:-.venv}
PY=${PYTHON:-python3}

key=$(cat requirements/*.txt setup.cfg setup.py mmsn/ops/csrc/* | sha256sum | cut -c1-16)
stamp="$VENV/.mmsn-setup-$key"
if [ -f "$stamp" ]; then
    echo "[setup] $VENV is up to date ($key)"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip, without the noise about this machine's missing local index folders;
# its own exit status is kept, so a failed install stops the set-up.
pip() {
    "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
echo "[setup] installing the pinned stack into $VENV"
pip install -q 'setuptools<80' wheel
pip install -q -r requirements/runtime.txt -r requirements/tests.txt
# Full mmcv 2.1.0 (compiled ops, for mmdet/mmseg) from a wheel that
# tools/build_mmcv.sh builds once per machine (~11 min on 2 idle cores)
# and caches. It replaces mmcv-lite: both install the same `mmcv` package.
mmcv_wheel=$(bash tools/build_mmcv.sh "$VENV/bin/python")
pip uninstall -y -q mmcv-lite mmcv
pip install -q "$mmcv_wheel"
pip install -q -r requirements/downstream.txt
# --no-build-isolation: mmsn._C compiles against the torch installed above
pip install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import os, mmsn, mmpretrain, mmcv.ops, mmdet, mmseg
assert mmsn.ops.compiled_kernels_available() or \\
    os.environ.get('MMSN_WITH_OPS') == '0', 'mmsn._C was not built'
print('[setup] mmsn', mmsn.__version__, 'ready')"
rm -f "$VENV"/.mmsn-setup-*
touch "$stamp"
