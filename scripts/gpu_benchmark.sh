#!/usr/bin/env bash
# The GPU check of docs/performance.md#on-a-gpu as one command, for a machine with one CUDA GPU and pgseg's
# dependencies importable: the ceilings; the paper model's training step in bf16 at the paper's per-GPU batch (1024;
# a quarter of it if that does not fit), eager and compiled side by side: images/s per GPU and the fraction of the
# measured bf16 peak; zero-shot evaluation crops/s in fp32 and bf16 against two passes; then the targets' table.
# About 10 minutes on an H100-class GPU. Everything lands in $OUT_DIR as the benchmark's JSON files.
#
#   bash scripts/gpu_benchmark.sh                       # OUT_DIR=runs/benchmark_gpu BATCH=1024 PYTHON=python3
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-runs/benchmark_gpu}
BATCH=${BATCH:-1024}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
bench() { "$PYTHON" scripts/benchmark.py "$@" --device cuda --out-dir "$OUT_DIR"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' \
    || { echo 'gpu_benchmark: no CUDA device visible to torch' >&2; exit 1; }
bench peak || exit 1
if ! bench train --batch "$BATCH" --steps 5 --warmup 3 --precisions bf16 --compile both; then
    echo "gpu_benchmark: batch $BATCH failed (out of memory?); again at $((BATCH / 4))" >&2
    bench train --batch $((BATCH / 4)) --steps 5 --warmup 3 --precisions bf16 --compile both || exit 1
fi
bench eval --images 20 --precision both || exit 1
bench targets
