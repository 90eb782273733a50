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
#   ${MMSN_CACHE:-~/.cache/mmsn}/wheels/mmcv-2.1.0-torch2.14.1+cu130-cp311/
# A cached wheel is reused as is (delete that folder to force a rebuild).
# The build takes about 11 minutes on 2 cores (MAX_JOBS, default: nproc)
# and reports how many files it compiled every 30 s.
set -euo pipefail
cd "$(dirname "$0")/.."
MMCV_VERSION=${MMCV_VERSION:-2.1.0}
PYBIN=${1:-${MMSN_VENV:-.venv}/bin/python}
PYBIN=$(cd "$(dirname "$PYBIN")" && pwd)/$(basename "$PYBIN")
log() { echo "[build_mmcv] $*" >&2; }

read -r torch_ver pytag < <("$PYBIN" -c \
    "import sys, torch; print(torch.__version__, 'cp%d%d' % sys.version_info[:2])")
cache=${MMSN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmsn}/wheels/mmcv-$MMCV_VERSION-torch$torch_ver-$pytag
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
jobs=${MAX_JOBS:-$(nproc)}
log "building mmcv $MMCV_VERSION with its compiled CPU ops for torch" \
    "$torch_ver ($pytag): once per machine, about 11 minutes on 2 idle" \
    "cores (MAX_JOBS=$jobs); the wheel is then cached in $cache"

# pip's own output goes to stderr (stdout carries only the wheel's path),
# without the noise about this machine's missing local index folders; its
# exit status is kept, so a failed step stops here with pip's error.
pip() {
    "$PYBIN" -m pip --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is ignored: it is neither" || true; } >&2
    return "${PIPESTATUS[0]}"
}

# The sdist only: its metadata step imports pkg_resources, which setuptools
# >= 80 no longer ships, so cap setuptools in pip's isolated build env.
printf 'setuptools<80\n' > "$work/constraints.txt"
PIP_CONSTRAINT="$work/constraints.txt" pip download -q --no-deps \
    --no-binary :all: "mmcv==$MMCV_VERSION" -d "$work"
tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
src="$work/mmcv-$MMCV_VERSION"

sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$src/setup.py"
if grep -qE -- '-std=c\+\+1[47]' "$src/setup.py" || ! grep -q -- '-std=c++20' "$src/setup.py"; then
    log "patching the C++ standard in $src/setup.py failed"; exit 1
fi

# Build tools inside the target environment (no build isolation: the
# extension must compile against this environment's torch).
pip install -q 'setuptools<80' wheel ninja
export PATH="$(dirname "$PYBIN"):$PATH"      # torch looks for `ninja` on PATH

# The build runs in the background with its output in a log; every 30 s
# this says how far ninja got ("[compiled/total]" lines of the log).
build_log="$work/build.log"
(
    cd "$src"
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=$jobs \
        "$PYBIN" -m pip wheel -v --disable-pip-version-check --no-deps \
        --no-build-isolation -w "$work/dist" . > "$build_log" 2>&1
) &
builder=$!
trap 'kill "$builder" 2>/dev/null || true; rm -rf "$work"' EXIT
while kill -0 "$builder" 2>/dev/null; do
    for _ in $(seq 30); do
        kill -0 "$builder" 2>/dev/null || break
        sleep 1
    done
    kill -0 "$builder" 2>/dev/null || break
    step=$(grep -oE '\[[0-9]+/[0-9]+\]' "$build_log" | tail -n1 | tr -d '[]')
    if [ -n "$step" ]; then
        log "compiled ${step%/*} of ${step#*/} files" \
            "($(( $(date +%s) - start )) s so far)"
    else
        log "preparing the build ($(( $(date +%s) - start )) s so far)"
    fi
done
if ! wait "$builder"; then
    cp "$build_log" "$cache/build-failed.log"
    log "building the mmcv wheel failed; the end of pip's output" \
        "(all of it in $cache/build-failed.log):"
    tail -n 40 "$build_log" >&2
    exit 1
fi
built=$(find "$work/dist" -maxdepth 1 -name "mmcv-$MMCV_VERSION-*.whl" | head -n1)
[ -n "$built" ] || { log "no wheel was built"; exit 1; }
# Copy under a temporary name, then rename: a half-copied wheel is never seen.
cp "$built" "$cache/.partial"
mv "$cache/.partial" "$cache/$(basename "$built")"
rm -f "$cache/build-failed.log"
whl=$(find_wheel)
log "built $whl in $(( $(date +%s) - start )) s"
echo "$whl"
