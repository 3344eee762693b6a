#!/usr/bin/env bash
# TRL GRPO example (examples/trl_grpo.py) on a lent GPU, colocated learner + vLLM 0.25 engine (bundle in /tmp/site),
# sync over CUDA IPC. trl/datasets (absent from the image) come as wheels carried in .devbundle/trl.
# usage (device, repo root, after the bundle install): OUT=... bash scripts/gpu/trl_gpu.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --target /tmp/trl .devbundle/trl/*.whl > "$OUT/trl_pip.log" 2>&1 \
  || { tail -5 "$OUT/trl_pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:/tmp/trl:. VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  VLLM_NO_USAGE_STATS=1 VLLM_WORKER_MULTIPROC_METHOD=spawn
python3 -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)"
timeout 420 python3 examples/trl_grpo.py --modes qat,lora --steps 2 --transport ipc --attention-backend TRITON_ATTN --json "$OUT/trl.json" \
  > "$OUT/trl.log" 2> "$OUT/trl.err"
echo "trl rc=$?"
cat "$OUT/trl.log" | tail -20
grep -E "Error|error" "$OUT/trl.err" | grep -v "^\s*File" | sort -u | tail -15
