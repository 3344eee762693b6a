#!/usr/bin/env bash
# What needs a GPU but not vLLM (the device image has torch + triton): the audit fingerprint kernel, the CUDA IPC
# transport across processes, hopper_triton with served expert LoRA natively, and their benchmarks.
# usage (device, repo root): OUT=... bash scripts/gpu/round_kernels.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
echo "=== native tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/common/test_audit.py tests/common/test_transport_ipc.py \
  tests/serve/test_expert_lora.py 2>&1 | tail -12
echo "=== IPC transfer + stage/commit of one dsv4 layer"
timeout 150 python3 bench/ipc_transfer.py --repeats 5 2>&1 | tail -10
echo "=== engine layer with expert LoRA (CUDA graphs)"
timeout 150 python3 bench/lora_layer.py --tokens 16,128,1024 2>&1 | tail -8
