#!/usr/bin/env bash
# Build full mmcv (with its compiled CPU ops) once per machine and cache the
# wheel; print the wheel's path on the last line of stdout.
#
#   bash tools/build_mmcv.sh [PYTHON]     # PYTHON defaults to $MMSN_VENV/bin/python
#
# mmdet 3.3.0 and mmsegmentation 1.2.2 need mmcv 2.1.0 with `mmcv.ops`, which
# has no binary wheel on PyPI for this torch. Its sdist does not build against
# torch >= 2.10 as is: its setup.py forces -std=c++14/17 and torch's headers
# need C++20, so the flags are patched to -std=c++20. The build links against
# the given Python's torch, so the cache is keyed by mmcv, torch and Python
# versions:
#   ${MMSN_CACHE:-$HOME/.cache/mmsn}/wheels/mmcv-2.1.0-torch2.14.1+cu130-cp311/
# A cached wheel is reused as is (delete that folder to force a rebuild).
# The build takes about 11 minutes on 2 cores (MAX_JOBS, default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
MMCV_VERSION=${MMCV_VERSION:-2.1.0}
PYBIN=${1:-${MMSN_VENV:-.venv}/bin/python}
PYBIN=$(cd "$(dirname "$PYBIN")" && pwd)/$(basename "$PYBIN")
log() { echo "[build_mmcv] $*" >&2; }

read -r torch_ver pytag < <("$PYBIN" -c \
    "import sys, torch; print(torch.__version__, 'cp%d%d' % sys.version_info[:2])")
cache=${MMSN_CACHE:-$HOME/.cache/mmsn}/wheels/mmcv-$MMCV_VERSION-torch$torch_ver-$pytag
mkdir -p "$cache"

find_wheel() { find "$cache" -maxdepth 1 -name "mmcv-$MMCV_VERSION-*.whl" | head -n1; }

# One build at a time per cache folder (two set-ups started together wait).
exec 9>"$cache/.lock"
flock 9
whl=$(find_wheel)
if [ -n "$whl" ]; then
    log "cached wheel: $whl"
    echo "$whl"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/mmcv-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
log "building mmcv $MMCV_VERSION for torch $torch_ver ($pytag) in $work"

# The sdist only: its metadata step imports pkg_resources, which setuptools
# >= 80 no longer ships, so cap setuptools in pip's isolated build env.
printf 'setuptools<80\n' > "$work/constraints.txt"
PIP_CONSTRAINT="$work/constraints.txt" "$PYBIN" -m pip download -q \
    --disable-pip-version-check --no-deps --no-binary :all: \
    "mmcv==$MMCV_VERSION" -d "$work" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
src="$work/mmcv-$MMCV_VERSION"

sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$src/setup.py"
if grep -qE -- '-std=c\+\+1[47]' "$src/setup.py" || ! grep -q -- '-std=c++20' "$src/setup.py"; then
    log "patching the C++ standard in $src/setup.py failed"; exit 1
fi

# Build tools inside the target environment (no build isolation: the
# extension must compile against this environment's torch).
"$PYBIN" -m pip install -q --disable-pip-version-check 'setuptools<80' wheel ninja 2>&1 \
    | grep -v "is ignored: it is neither" >&2 || true
export PATH="$(dirname "$PYBIN"):$PATH"      # torch looks for `ninja` on PATH
(
    cd "$src"
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "$PYBIN" -m pip wheel -q --disable-pip-version-check --no-deps \
        --no-build-isolation -w "$work/dist" . >&2
)
built=$(find "$work/dist" -maxdepth 1 -name "mmcv-$MMCV_VERSION-*.whl" | head -n1)
[ -n "$built" ] || { log "no wheel was built"; exit 1; }
# Copy under a temporary name, then rename: a half-copied wheel is never seen.
cp "$built" "$cache/.partial"
mv "$cache/.partial" "$cache/$(basename "$built")"
whl=$(find_wheel)
log "built $whl in $(( $(date +%s) - start )) s"
echo "$whl"
