#!/usr/bin/env bash
# Refit / expert-LoRA checks on a lent H100/H200 with the slim vLLM 0.25 bundle installed in /tmp/site (calls 1-3 of
# the bundle recipe). usage (device, repo root): OUT=... bash scripts/gpu/round_refit.sh [tests|e2e|bench|all]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=${1:-all}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 \
  PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
if [[ $what == tests || $what == all ]]; then
  echo "=== native tests"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/common/test_audit.py tests/common/test_transport_ipc.py \
    tests/serve/test_expert_lora.py tests/serve/test_backends.py -k "not reference_runs_inside" 2>&1 | tail -15
fi
if [[ $what == e2e || $what == all ]]; then
  echo "=== colocated refit, vLLM 0.25, CUDA graphs, hopper_triton, transport ipc"
  timeout 420 python3 scripts/gpu/refit_gpu.py "$OUT/refit.json" --steps 2 > "$OUT/refit.log" 2> "$OUT/refit.err"
  echo "refit rc=$?"
  grep -E "^\[|REFIT|engine up" "$OUT/refit.log"
  grep -E "Error|error|mxfp4_rl|hopper_triton" "$OUT/refit.err" | grep -v "^\s*File" | sort -u | tail -25
fi
if [[ $what == bench || $what == all ]]; then
  if [[ -z ${SKIP_LORA_BENCH:-} ]]; then
    echo "=== engine layer with expert LoRA (CUDA graphs)"
    timeout 200 python3 bench/lora_layer.py --tokens 16,128,1024 2>&1 | tail -8
  fi
  echo "=== colocated refit bench (dsv4 expert shape)"
  timeout 400 python3 bench/refit.py --layers 4 --repeats 3 --json "$OUT/refit_bench.json" > "$OUT/bench.log" \
    2> "$OUT/bench.err"; echo "bench rc=$?"
  grep -v "^INFO\|^(EngineCore" "$OUT/bench.log" | tail -28
  grep -E "Error|error" "$OUT/bench.err" | grep -v "^\s*File" | sort -u | tail -15
fi
