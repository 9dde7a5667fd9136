#!/usr/bin/env bash
# The reproduction behind benchmarks/reproduce.md: every method on SST-2, then on CoLA.
# SST-2 picks each method's lr from a 3-value grid on seed 0 (by dev accuracy); CoLA reuses
# those lrs (compute is too tight for a second grid). Run from the repository root:
#   nohup scripts/reproduce.sh > reproduce.log 2>&1 &
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/reproduce}
COMMON=(--method gem id3 grad-magnitude random full bitfit lora --seeds 0 1 2
        --train-examples 1000 --epochs 2 --batch-size 32 --max-length 64 --eval-examples 500)

$PY -m gem_kernels.finetune --task-dir ../shared/data/glue/SST-2 "${COMMON[@]}" --out "$OUT" \
    --lr full=2e-5,5e-5,1e-4 bitfit=3e-4,1e-3,3e-3 lora=3e-4,1e-3,3e-3 \
         gem=1e-3,3e-3,1e-2 id3=1e-3,3e-3,1e-2 grad-magnitude=1e-3,3e-3,1e-2 random=1e-3,3e-3,1e-2
cp "$OUT/results-SST-2.json" benchmarks/results/reproduce-SST-2.json

# The lr each method chose on SST-2, as METHOD=LR items.
CHOSEN=$($PY -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']; print(' '.join(f'{m}={v[\"lr\"]:g}' for m, v in s.items()))" "$OUT/results-SST-2.json")
echo "CoLA uses the SST-2 lrs: $CHOSEN"
$PY -m gem_kernels.finetune --task-dir ../shared/data/glue/CoLA "${COMMON[@]}" --out "$OUT" \
    --select-metric mcc --lr $CHOSEN
cp "$OUT/results-CoLA.json" benchmarks/results/reproduce-CoLA.json
