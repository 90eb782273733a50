#!/usr/bin/env bash
# Set up the whole stack (idempotent; the first time on a machine this
# builds full mmcv, ~11 min, then cached) and run the test suite.
# Set MMSN_REQUIRE_DOWNSTREAM=1 (as .ci/run does) to fail instead of skip
# the mmdet/mmseg tests when those packages are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh --all
VENV=${MMSN_VENV:-.venv}
exec "$VENV/bin/python" -m pytest tests "$@"
