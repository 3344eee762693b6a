#!/usr/bin/env bash
# `mxfp4-rl demo` and the engine byte check on a lent H100/H200 with the slim vLLM 0.25 bundle installed in
# /tmp/site (../shared/vllm_device/README.md, calls 1-3). The bundle has no FlashAttention, hence TRITON_ATTN.
# usage (device, repo root): OUT=... bash scripts/gpu/demo_gpu.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 \
  PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
echo "=== mxfp4-rl demo"
timeout 420 python3 -m common.cli demo --out "$OUT/demo" --engine-kwargs '{"attention_config": {"backend": "TRITON_ATTN"}}' \
  --json "$OUT/demo.json" > "$OUT/demo.log" 2> "$OUT/demo.err"; echo "demo rc=$?"
cat "$OUT/demo.log"
grep -E "mxfp4_rl|hopper_triton|Error|error" "$OUT/demo.err" | grep -v "^\s*File" | sort -u | head -20
