#!/usr/bin/env bash
# The reproduction behind benchmarks/reproduce.md: every method on SST-2 and on CoLA, with
# the paper's 1000 training examples and 3 seeds. Compute is tight (2 shared CPU cores), so:
# 1 epoch, max length 64, dev capped at a seeded sample of 500, GEM's calibration over 8
# batches (256 examples), each method's default lr (no grid), and the two tasks run side by
# side with one thread each. Run from the repository root:
#   nohup scripts/reproduce.sh > runs/reproduce.log 2>&1 &
# Each results JSON is rewritten after every method, so a stopped run keeps what it finished.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/reproduce}
COMMON=(--method gem full lora bitfit id3 grad-magnitude random --seeds 0 1 2
        --train-examples 1000 --epochs 1 --batch-size 32 --max-length 64 --eval-examples 500
        --calibration-batches 8 --out "$OUT")

OMP_NUM_THREADS=1 $PY -m gem_finetune --task-dir ../shared/data/glue/SST-2 "${COMMON[@]}" \
    > "$OUT-SST-2.log" 2>&1 &
OMP_NUM_THREADS=1 $PY -m gem_finetune --task-dir ../shared/data/glue/CoLA "${COMMON[@]}" \
    --select-metric mcc > "$OUT-CoLA.log" 2>&1 &
wait
cp "$OUT/results-SST-2.json" benchmarks/results/reproduce-SST-2.json
cp "$OUT/results-CoLA.json" benchmarks/results/reproduce-CoLA.json

# An lr probe on SST-2, seed 0 only: two more lrs for GEM and for each dense baseline, to see
# whether the defaults above hold any method back (compare with seed 0 of the main run).
$PY -m gem_finetune --task-dir ../shared/data/glue/SST-2 --method gem full lora bitfit --seeds 0 \
    --train-examples 1000 --epochs 1 --batch-size 32 --max-length 64 --eval-examples 500 \
    --calibration-batches 8 --out "$OUT-lr-probe" \
    --lr gem=3e-3,1e-2 full=1e-4,2e-4 lora=2e-3,5e-3 bitfit=3e-3,1e-2 > "$OUT-lr-probe.log" 2>&1
cp "$OUT-lr-probe/results-SST-2.json" benchmarks/results/reproduce-SST-2-lr-probe.json
