#!/usr/bin/env bash
# The CPU demo: set up the classification stack (torch, mmengine,
# mmpretrain, mmcv-lite; not mmdet/mmseg, which only the tests need), train a
# small ResNet with Switchable Normalization on scikit-learn's bundled
# handwritten digits, evaluate it on the held-out split and plot the learned
# IN/LN/BN importance shares. No data is downloaded; a few minutes on 2 CPU
# cores, set-up included.
#   bash tools/run_demo.sh            # results under work_dirs/demo_digits
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=${MMSN_VENV:-.venv}/bin/python
CONFIG=configs/demo/resnet_sn_digits.py
WORK_DIR=${WORK_DIR:-work_dirs/demo_digits}

echo "[demo] training $CONFIG (logs in $WORK_DIR)"
"$PY" tools/train.py "$CONFIG" --work-dir "$WORK_DIR"
CKPT=$(cat "$WORK_DIR/last_checkpoint")

echo "[demo] evaluating $CKPT on the held-out split"
if ! "$PY" tools/test.py "$CONFIG" "$CKPT" --work-dir "$WORK_DIR" \
        > "$WORK_DIR/test.log" 2>&1; then
    cat "$WORK_DIR/test.log"
    exit 1
fi
grep -E "Epoch\(test\)" "$WORK_DIR/test.log"

echo "[demo] plotting the learned importance shares"
"$PY" tools/analysis/plot_importance.py "$CONFIG" "$CKPT" \
    --out "$WORK_DIR/sn_importance.png" --title "SN on digits: $(basename "$CKPT")"
