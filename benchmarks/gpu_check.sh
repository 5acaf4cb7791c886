#!/bin/sh
# pretune on one NVIDIA GPU in under 10 minutes: the device and its peak, DDP / FSDP against one process
# (PASS/FAIL), tokens/s and MFU against the Hugging Face Trainer.  benchmarks/gpu_check.py says what each
# part checks and how.  From anywhere, after the README's setup:
#
#     sh benchmarks/gpu_check.sh                 # the GPU check (exit 1: no GPU, 2: a correctness check failed)
#     sh benchmarks/gpu_check.sh --dry-run-cpu   # the same flow on the CPU at tiny sizes (tests the script)
set -e
cd "$(dirname "$0")/.."
# one GPU: the Trainer would otherwise spread its batch over every visible GPU (nn.DataParallel), pretune would not
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" benchmarks/gpu_check.py "$@"
