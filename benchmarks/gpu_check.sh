#!/usr/bin/env bash
# The one prepared GPU check (issue 6): throughput of WRN-40-2 -> WRN-16-2 on CIFAR-100-shaped
# random data, fp32 and bf16, with seconds per 50k-image epoch for teacher training, stage 1 and
# stage 2 (target: at most 2 s each), plus the GPU-marked tests. Run from the repository root on
# a machine with a CUDA GPU and torch installed; results are appended to benchmarks/RESULTS.md.
set -uo pipefail
python -m pytest -q -m gpu tests
python benchmarks/throughput.py --pair wrn --batch 256 --repeats 50
python benchmarks/throughput.py --pair wrn --batch 256 --repeats 50 --amp
python benchmarks/stage1_loss.py
