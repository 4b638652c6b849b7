#!/usr/bin/env bash
# Verify defectscope's GPU path end to end on an NVIDIA PC (TensorRT, CUDA and CPU on the same model:
# parity, engine-cache reuse and invalidation, a second process sharing the cache, images/s against
# eager PyTorch). One verdict line per check; exit status 0 when no check fails.
#
#   deploy/gpu_check.sh                      # builds its own model (needs the train extra)
#   deploy/gpu_check.sh model.onnx --images /data/samples [--ckpt model.ckpt]
#   PYTHON=/opt/defectscope/venv/bin/python deploy/gpu_check.sh model.onnx
#
# Options: deploy/gpu_check.sh --help.  Runs this checkout's code (inspect/ first on PYTHONPATH).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
export PYTHONPATH="$repo/inspect:$repo/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
