#!/usr/bin/env bash
# Set up the environment (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
VENV=${MMSN_VENV:-.venv}
exec "$VENV/bin/python" -m pytest tests "$@"
