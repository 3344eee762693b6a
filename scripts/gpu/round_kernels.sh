#!/usr/bin/env bash
# What needs a GPU but not vLLM (the device image has torch + triton): the audit fingerprint kernel, the CUDA IPC
# transport across processes, hopper_triton with served expert LoRA natively, and their benchmarks.
# usage (device, repo root): OUT=... bash scripts/gpu/round_kernels.sh [all|lora]
#   lora: the expert-LoRA tests and benchmarks only (fits one 10-minute device call on its own)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ONLY=${1:-all}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$ONLY" = all ]; then
  echo "=== native tests"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/common/test_audit.py tests/common/test_transport_ipc.py \
    2>&1 | tail -12
fi
echo "=== native LoRA: hopper_triton with adapters == reference, projections (gathered == copied rows), engine layer"
echo "    == the composition it replaced (bit for bit on kb-major codes)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/serve/test_expert_lora.py tests/common/test_grouped_lora.py \
  2>&1 | tail -8
if [ "$ONLY" = all ]; then
  echo "=== IPC transfer + stage/commit of one dsv4 layer"
  timeout 150 python3 bench/ipc_transfer.py --repeats 5 2>&1 | tail -10
fi
echo "=== engine layer with expert LoRA (CUDA graphs): old vs new in one run, projection tiles swept"
timeout 240 python3 bench/lora_layer.py --tokens 16,128,1024 --project-tiles 64x4,256x3,256x4 2>&1 | tail -8
echo "=== the same with the one-multiply decode hopper_triton serves these scale bytes with"
timeout 120 python3 bench/lora_layer.py --tokens 16,128 --one-mul 2>&1 | tail -6

# ---- fake-QAT on the fused path (issue 24): appended block, runs with "all" or alone with "qat" ------------------
# (with "qat" the expert-LoRA blocks above still run; for the QAT round alone see bench/qat_step.py's command)
if [ "$ONLY" = all ] || [ "$ONLY" = qat ]; then
  echo "=== native QAT: fused fake-QAT step == reference step / float64 oracle, W4A8, wgrad kernel vs _grouped_mm"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/train/test_qat_fused.py 2>&1 | tail -8
  echo "=== fake-QAT step (quantize masters, fwd, dX, dW) vs bf16 torch._grouped_mm step with weight gradients"
  timeout 420 python3 bench/qat_step.py --tokens 16,256,1024,4096 2>&1 | tail -12
fi
