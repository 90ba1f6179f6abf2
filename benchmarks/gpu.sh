#!/usr/bin/env bash
# Training throughput of iresnet50 on one CUDA GPU: bf16 autocast, channels_last, batch 256,
# 112 px faces, ArcFace over 10k identities; femb's fit against a bare PyTorch loop
# (benchmarks/throughput.py). Goal on an H100/H200: >= 2500 img/s for femb, overhead <= 5 %.
# Takes about a minute. Usage: bash benchmarks/gpu.sh [extra throughput.py flags, e.g. --compile]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$PYTHON" benchmarks/throughput.py \
  --device cuda \
  --backbones iresnet50 \
  --batch-size 256 \
  --image-size 112 \
  --precision bf16 \
  --channels-last \
  --classes 10000 \
  --warmup 10 \
  --steps 40 \
  --repeats 2 \
  "$@"
