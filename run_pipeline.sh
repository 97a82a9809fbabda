#!/usr/bin/env bash
# The whole pipeline: stage 1, pseudo-masks, stage 2 and its test, then one summary table.
# With the released dataset in datasets/ (see datasets/README.md) this is the reference's run
# (full-size models from init_weights/, its hyper-parameters, the GPU when there is one);
# without it, the embedded synthetic dataset is generated and a reduced configuration runs on
# the CPU in minutes. Everything goes to one run folder under runs/.
# Extra arguments go to tool/pipeline/runner.py, e.g. --out runs/mine, --config reduced,
# --stage2_args="--epochs 5" (python -m tool.pipeline --help lists them).
set -e
source "$(dirname "${BASH_SOURCE[0]}")/tool/venv.sh"
cd "$ROOT"

## Choose the dataset here, as in the reference's run_pipeline.sh (or: DATASET=bcss bash run_pipeline.sh).
## luad: datasets/LUAD-HistoSeg (synthetic stand-in datasets/SYNTH-LUAD)
## bcss: datasets/BCSS-WSSS     (synthetic stand-in datasets/SYNTH-BCSS)
DATASET="${DATASET:-luad}"
# DATASET=bcss

exec "$PY" -m tool.pipeline --dataset "$DATASET" "$@"
