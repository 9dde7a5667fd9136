#!/usr/bin/env bash
# The tuned comparison's missing runs on a lent GPU, time-boxed, its files copied where the call
# returns them (docs/gpu.md, "The tuned comparison on a GPU"). Run from the repository root:
#
#   RESULTS=$OUT TUNED_SECONDS=200 bash scripts/tuned_gpu.sh    # on the lent machine (make tuned-gpu too)
#
# Settings, from the environment: RESULTS (where the files go; default benchmarks/results/tuned-cuda-call),
# TUNED_SECONDS (no job starts, and the running ones stop, after this many seconds; default 360),
# TUNED_LANES (default 4), TUNED_OUT (the results folder; default benchmarks/results/tuned-cuda),
# GPU_PYTHON (default python3), DEVICE (default cuda; cpu with QUICK=1 checks the call here).
# torchao (the NF4 rows) comes from the carried wheel where the machine has none, as in gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results/tuned-cuda-call}
TUNED_SECONDS=${TUNED_SECONDS:-360}
TUNED_OUT=${TUNED_OUT:-benchmarks/results/tuned-cuda}
GPU_PYTHON=${GPU_PYTHON:-python3}
mkdir -p "$RESULTS" build
if ! "$GPU_PYTHON" -c "import torchao" 2>/dev/null; then
    wheel=$(ls device_carry/wheels/torchao-*.whl 2>/dev/null | tail -1)
    [[ -n $wheel ]] || { echo "tuned_gpu: no torchao here and no wheel in device_carry/wheels (prepare_device_carry.py)" >&2; exit 2; }
    "$GPU_PYTHON" -m pip install --quiet --no-deps --target build/torchao "$wheel" || exit 2
fi
PYTHONPATH=$PWD:$PWD/build/torchao${PYTHONPATH:+:$PYTHONPATH} PY=$GPU_PYTHON DEVICE=${DEVICE:-cuda} \
    LANES=${TUNED_LANES:-4} STOP_AFTER=$TUNED_SECONDS DATA=device_carry/data/glue MODEL=device_carry/minilm-fp16 \
    OUT=$TUNED_OUT scripts/reproduce.sh 2>&1 | tee "$RESULTS/tuned-console.log"
status=$?
for f in "$TUNED_OUT"/results-*.jsonl "$TUNED_OUT"/tuned.md; do [[ ! -e $f ]] || cp "$f" "$RESULTS/"; done
for f in "$TUNED_OUT"/nf4/results-*.jsonl; do [[ ! -e $f ]] || cp "$f" "$RESULTS/nf4-$(basename "$f")"; done
exit "$status"
