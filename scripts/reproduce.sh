#!/usr/bin/env bash
# The reproduction behind benchmarks/reproduce.md: every method on SST-2, then on CoLA, with
# the paper's 1000 training examples and 3 seeds. Compute is tight (2 shared CPU cores), so:
# 1 epoch, max length 64, dev capped at a seeded sample of 500, GEM's calibration over 8
# batches, and each method's default lr (no grid). Run from the repository root:
#   nohup scripts/reproduce.sh > runs/reproduce.log 2>&1 &
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/reproduce}
COMMON=(--method gem id3 grad-magnitude random full bitfit lora --seeds 0 1 2
        --train-examples 1000 --epochs 1 --batch-size 32 --max-length 64 --eval-examples 500
        --calibration-batches 8)

$PY -m gem_kernels.finetune --task-dir ../shared/data/glue/SST-2 "${COMMON[@]}" --out "$OUT"
cp "$OUT/results-SST-2.json" benchmarks/results/reproduce-SST-2.json
$PY -m gem_kernels.finetune --task-dir ../shared/data/glue/CoLA "${COMMON[@]}" --out "$OUT"
cp "$OUT/results-CoLA.json" benchmarks/results/reproduce-CoLA.json
