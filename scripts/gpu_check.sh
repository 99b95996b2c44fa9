#!/usr/bin/env bash
# GPU checks for the TensorRT path, in one command, on a machine with an NVIDIA GPU:
#   scripts/gpu_check.sh            (uses $PYTHON, else .venv/bin/python, else python3)
# 1. tests/gpu: real engine builds (fp32/fp16/int8) + parity against PyTorch, timing-cache reuse, the
#    recorded environment; the runner's cuda-python buffers on the GPU. Each test is skipped with its
#    reason where TensorRT or the GPU is missing (pytest -rs lists the reasons).
# 2. a throughput table: TensorRT engines vs PyTorch CUDA at batch 1 and 8.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
echo "== python: $($PY -c 'import sys; print(sys.version.split()[0])'); TensorRT: $($PY -c 'from reidbuild.tensorrt.env import available; print(available() or "available")')"
status=0
$PY -m pytest tests/gpu -v -rs -p no:cacheprovider || status=$?
echo "== throughput"
$PY tests/gpu/throughput.py || status=$?
exit $status
