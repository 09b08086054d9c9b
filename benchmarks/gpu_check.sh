#!/usr/bin/env bash
# The one prepared GPU check (issues 6 and 15), for a machine with a CUDA GPU and torch installed;
# run it from the repository root: bash benchmarks/gpu_check.sh
#
#  1. the GPU-marked tests (tests/test_gpu.py, test_core's CUDA test): a whole run with bf16,
#     compile and channels_last; teacher logits and KL terms in fp32 under bf16; no host sync in
#     a stage-1 or stage-2 step; predict of a compiled network never recompiles;
#  2. throughput of WRN-40-2 -> WRN-16-2 on CIFAR-shaped data, batch 256, for fp32 / bf16 x
#     compile off / on: seconds per 50k-image epoch of teacher training, stage 1 and stage 2,
#     and the ratio to (student CE step + teacher forward), target <= 1.10;
#  3. stage-1 mining + tuple loss at B = 2048 (10 classes, 128-d): time and peak GPU memory.
#
# Prints one table and appends it to benchmarks/RESULTS.md (with the GPU tests' summary line).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
tests=$(python -m pytest -q -m gpu tests 2>&1 | tail -n 1)
echo "GPU tests: $tests"
python benchmarks/throughput.py --pair wrn --batch 256 --repeats 30 --grid --note "GPU tests: $tests"
