#!/usr/bin/env bash
# One stop's GPU work in three device calls after the vLLM 0.25 bundle install (calls 1-3, /tmp/site) and the peer
# wheels (install_peers.sh, /tmp/peers). usage (device, repo root): OUT=... bash scripts/gpu/round_session.sh A|B|C
#   A  functional, in parallel: DeepSeek-V4 engine probe (default + mxfp4_rl), TRL GRPO example colocated over IPC
#      (carry .devbundle/trl), native kernel tests (audit, IPC, expert LoRA, fused QAT, backends)
#   B  timings: refit through a real engine (phases), engine layer with expert LoRA
#   C  timings: fused fake-QAT step vs bf16, every Hopper peer MoE backend
#   R  after the bundle: layout conversion, refit through a real engine, LoRA layer vs none and vs Marlin
#   D  after the bundle and the DeepSeek-V4 kernel packages (see D below): the probe of the plugin mode
#   P  after the bundle: the dense prefill path's native tests, its parts, and the peers table with it
#   T  after the bundle: the LoRA layer against Marlin, then the refit (seventh round)
#   U  after the bundle: the LoRA layer (A2 projection fused or apart) against Marlin, then the refit (eighth round)
#   V  no vLLM (beside the bundle's chunks 1-2): native tests of the eighth round's kernels, the delta of one layer
#   W  no vLLM (beside the bundle's chunk 1): native tests of the ninth round's block kernels
#   W2 after the bundle: the delta of one layer (block kernels vs torch), the refit with layers batched per call
#   X  after the bundle: the engine layer's W4A8 emulation against ours, Marlin and bf16 (bench/peers.py)
#   K  no vLLM (no bundle needed), one short call: native expert-LoRA / QAT / audit / IPC tests, the engine layer
#      with expert LoRA, the fused fake-QAT step
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 \
  PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1 VLLM_WORKER_MULTIPROC_METHOD=spawn
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
refit_bench() {  # refit_bench TIMEOUT_S LAYERS: colocated refit through a real engine, dsv4 expert shape
  echo "=== colocated refit bench (dsv4 expert shape, $2 layers)"
  timeout "$1" python3 bench/refit.py --layers "$2" --repeats 3 --no-old-path --json "$OUT/refit_bench.json" \
    > "$OUT/bench.log" 2> "$OUT/bench.err"; echo "bench rc=$?"
  grep -v "^INFO\|^(EngineCore" "$OUT/bench.log" | tail -24
  grep -E "Error|error" "$OUT/bench.err" | grep -v "^\s*File" | sort -u | tail -10
}
case "${1:-}" in
A)
  (timeout 400 python3 scripts/gpu/deepseek_v4_engine.py default mxfp4_rl > "$OUT/dsv4.log" 2>&1) &
  (OUT=$OUT bash scripts/gpu/trl_gpu.sh > "$OUT/trl_round.log" 2>&1) &
  timeout 420 python3 -m pytest -q -p no:cacheprovider tests/common/test_audit.py tests/common/test_transport_ipc.py \
    tests/serve/test_expert_lora.py tests/common/test_grouped_lora.py tests/train/test_qat_fused.py \
    tests/train/test_grouped_triton.py tests/common/test_silu_clamp.py tests/serve/test_backends.py \
    -k "not reference_runs_inside" > "$OUT/native.log" 2>&1
  echo "=== native tests"; tail -15 "$OUT/native.log"
  wait
  echo "=== DeepSeek-V4 probe"; grep -E "^(DSV4|VERDICT)|Error" "$OUT/dsv4.log" | tail -30
  echo "=== TRL"; cat "$OUT/trl_round.log" | tail -25
  ;;
B)
  refit_bench 330 2
  echo "=== engine layer with expert LoRA (CUDA graphs): old vs new, projection tiles swept"
  timeout 200 python3 bench/lora_layer.py --tokens 16,128,1024 --project-tiles 64x4,256x3,256x4 2>&1 | tail -10
  ;;
C)
  echo "=== fake-QAT step vs bf16 torch._grouped_mm step with weight gradients"
  timeout 200 python3 bench/qat_step.py --tokens 16,256,1024,4096 --out "$OUT" 2>&1 | tail -14
  echo "=== Hopper peers"
  PYTHONPATH=/tmp/site:. timeout 360 python3 bench/peers.py --budget-s 280 --out "$OUT" > "$OUT/peers.log" 2>&1
  echo "peers rc=$?"; tail -45 "$OUT/peers.log"
  ;;
K)
  echo "=== native tests"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/serve/test_expert_lora.py tests/common/test_grouped_lora.py \
    tests/train/test_qat_fused.py tests/common/test_audit.py tests/common/test_transport_ipc.py 2>&1 | tail -12
  echo "=== engine layer with expert LoRA (CUDA graphs): old vs new"
  timeout 100 python3 bench/lora_layer.py --tokens 16,128,1024 2>&1 | tail -10
  echo "=== fake-QAT step vs bf16 torch._grouped_mm step with weight gradients"
  timeout 120 python3 bench/qat_step.py --tokens 256,1024,4096 --out "$OUT" 2>&1 | tail -14
  ;;
K2)  # K cut to about 4 minutes: the LoRA layer's verdict first, then the QAT step at the sizes of its target
  echo "=== engine layer with expert LoRA (CUDA graphs): old vs new"
  timeout 80 python3 bench/lora_layer.py --tokens 16,128 2>&1 | tail -8
  echo "=== native: hopper_triton with expert LoRA == reference"
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/serve/test_expert_lora.py 2>&1 | tail -4
  echo "=== fake-QAT step vs bf16 torch._grouped_mm step with weight gradients"
  timeout 80 python3 bench/qat_step.py --tokens 1024,4096 --out "$OUT" 2>&1 | tail -12
  ;;
R)  # the refit end to end with the one-pass layout kernel (its own bench: bench/layout_convert.py), the LoRA layer against Marlin in the same run (bundle
    # installed, DeepGEMM NOT unpacked: with it the engine's start took past the bench's limit)
  refit_bench 280 6  # 6 layers (2.6 GB): the engine's fixed pause/resume cost spread as over a real shard
  echo "=== engine layer with expert LoRA vs none and vs Marlin (one-multiply decode, as hopper_triton serves these)"
  timeout 150 python3 bench/lora_layer.py --one-mul --tokens 16,128,1024 --project-tiles 128x3 2>&1 | tail -8
  ;;
S)  # where the served adapters' time goes at decode sizes (each launch alone), Marlin in the same run; then the
    # refit with sparse block deltas and served-form commits, each kind timed after one untimed sync (bundle installed)
  echo "=== engine layer with expert LoRA vs none and vs Marlin, and its launches one by one (one-multiply decode)"
  timeout 150 python3 bench/lora_layer.py --one-mul --tokens 16,128 --parts 2>&1 | grep -E "^\||^Each|^NVIDIA"
  refit_bench 300 6
  ;;
T)  # seventh round (bundle installed): the LoRA layer with split-K projections against none and against Marlin in one
    # process (PDL as MXFP4_PDL says), then the refit with the delta's lane kernel, each kind after one untimed sync
  echo "=== engine layer with expert LoRA vs none and vs Marlin (one-multiply decode), MXFP4_PDL=${MXFP4_PDL:-off}"
  timeout 150 python3 bench/lora_layer.py --one-mul --tokens 16,128 2>&1 | grep -E "^\||^NVIDIA|Error"
  refit_bench 330 6
  ;;
V)  # eighth round, no vLLM needed (beside the bundle's first chunks): native tests of the fused A2 projection and
    # the learner's block-diff kernels, then the delta of one dsv4 layer, kernels and torch composition in one run
  echo "=== native: grouped LoRA (fused A2 projection), expert LoRA, block diff, audit, W4A8 (learner and engine)"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/common/test_grouped_lora.py tests/serve/test_expert_lora.py \
    tests/train/test_block_diff_kernel.py tests/serve/test_delta_stage_kernel.py tests/common/test_audit.py \
    tests/train/test_grouped_triton.py tests/serve/test_backends.py 2>&1 | tail -4
  echo "=== block delta of one dsv4 layer (1%)"
  (cd bench && PYTHONPATH=..:. timeout 150 python3 delta_profile.py --repeat 7 2>&1 | grep -E "^\||changed blocks|host reads")
  ;;
U)  # eighth round (bundle installed): the LoRA layer with the A2 projection fused into the gated GEMM, apart, none
    # and Marlin, three rounds in turn in one process; then the refit, each kind after one untimed sync
  echo "=== engine layer with expert LoRA: fused A2 / apart / none / Marlin (one-multiply decode), MXFP4_PDL=${MXFP4_PDL:-loop}"
  timeout 200 python3 bench/lora_layer.py --one-mul --tokens 16,128 --rounds 3 2>&1 | grep -E "^\||^NVIDIA|Error"
  refit_bench 330 6
  ;;
W)  # ninth round, beside the bundle's first chunk (no vLLM): the block-write and delta-stage kernels natively
  echo "=== native: block write, delta stage"
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/serve/test_block_write_kernel.py \
    tests/serve/test_delta_stage_kernel.py 2>&1 | tail -3
  ;;
W2)  # ninth round (bundle installed): one dsv4 layer's delta (stage and commit kernels vs torch), then the refit
     # with whole layers batched per update_weights call (4 layers: the session's device time was short)
  echo "=== block delta of one dsv4 layer (1%)"
  (cd bench && PYTHONPATH=..:. timeout 90 python3 delta_profile.py --repeat 5 --rows 1 > "$OUT/delta.log" 2>&1)
  grep -E "^\||changed blocks|host reads" "$OUT/delta.log"
  refit_bench 240 4
  ;;
X)  # ninth round (bundle installed): the engine layer's W4A8 emulation against ours, Marlin and bf16 in one process
  PYTHONPATH=/tmp/site:. timeout 300 python3 bench/peers.py --budget-s 260 --out "$OUT" \
    --tokens 16,128,1024,4096 --backends ours,ours_w4a8,marlin,bf16 > "$OUT/peers.log" 2>&1
  echo "peers rc=$?"; grep "^|" "$OUT/peers.log" | tail -40
  ;;
E)  # the dense prefill path inside vLLM 0.25 (bundle installed): a 3840-token prompt, fused / dense / auto
  PYTHONPATH=/tmp/site:. timeout 540 python3 scripts/gpu/vllm_e2e.py prefill_fused prefill_dense prefill_auto \
    > "$OUT/e2e.log" 2>&1; echo "e2e rc=$?"
  grep "^E2E" "$OUT/e2e.log" | cut -c1-1500; grep -E "Error" "$OUT/e2e.log" | sort -u | tail -8
  ;;
P)  # the dense prefill path (bundle installed): native tests, where its time goes, every peer that runs without
    # carried wheels in one process (ours as served = auto, and both paths forced)
  echo "=== native: dense prefill path, combine, grouped GEMM layer"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/common/test_dense_prefill.py tests/common/test_combine.py \
    2>&1 | tail -4
  echo "=== dense path parts (dsv4)"
  timeout 90 python3 bench/dense_parts.py --shape dsv4 2>&1 | tail -16
  echo "=== peers with the dense path"
  PYTHONPATH=/tmp/site:. timeout 330 python3 bench/peers.py --budget-s 290 --out "$OUT" \
    --tokens 16,1024,2048,4096,8192 --backends ours,ours_fused,ours_dense,bf16,marlin,oai > "$OUT/peers.log" 2>&1
  echo "peers rc=$?"; grep "^|" "$OUT/peers.log" | tail -80
  ;;
D)  # DeepSeek-V4 through vLLM's own model code, after the bundle and the kernel packages: calls
    #   PEERS_IN=/tmp/dsv4_in bash scripts/gpu/install_peers.sh recv .devbundle/dsv4/pN   (N = 1..3, carry that folder)
    # then this one (carry .devbundle/dsv4/p4, .devbundle/dg and .devbundle/tvmffi; scripts/gpu/pack_dsv4_deps.sh,
    # pack_deep_gemm.sh, and for V in 0.1.9 .. 0.1.12: pip download --no-deps --only-binary=:all:
    # --python-version 3.12 --platform manylinux_2_28_x86_64 -d .devbundle/tvmffi apache-tvm-ffi==$V)
  PEERS_IN=/tmp/dsv4_in bash scripts/gpu/install_peers.sh recv .devbundle/dsv4/p4 || exit 3
  PEERS_IN=/tmp/dsv4_in PEERS_SITE=/tmp/dsv4site PEERS_MODULES="tilelang cutlass quack z3" \
    bash scripts/gpu/install_peers.sh install || exit 3
  tar xJf .devbundle/dg/deep_gemm.tar.xz -C /tmp/site || exit 3
  # tilelang 0.1.9 breaks on the bundle's apache-tvm-ffi 0.1.15 ("attribute '__dict__' of 'type' objects is not
  # writable") and imports on the 0.1.9 vLLM pins, but vLLM's engine start imports xgrammar, which needs >= 0.1.10
  # ("load_lib_module() got an unexpected keyword argument 'extra_lib_paths'"). The carried .devbundle/tvmffi holds
  # 0.1.9..0.1.12 (0.1.13 and 0.1.14 are yanked): the first under which both import is put first on the path.
  # CuTe-DSL's `cutlass` module sits under nvidia_cutlass_dsl/python_packages, which its .pth adds in a site dir
  # only (pip --target installs are not site dirs).
  TVM=""
  for w in $(ls .devbundle/tvmffi/*.whl | sort -V); do
    v=$(basename "$w" | cut -d- -f2); d=/tmp/tvm_$v
    python3 -m pip install -q --no-deps --target $d "$w" > /dev/null 2>&1 || continue
    if PYTHONPATH=$d:/tmp/site:/tmp/dsv4site:/tmp/dsv4site/nvidia_cutlass_dsl/python_packages \
        python3 -c "import tilelang, xgrammar" > /tmp/tvm_$v.log 2>&1; then TVM=$d; echo "tvm-ffi $v: tilelang and xgrammar import"; break
    else echo "tvm-ffi $v: $(grep -E 'Error' /tmp/tvm_$v.log | tail -1 | cut -c1-160)"; fi
  done
  [ -n "$TVM" ] || TVM=/tmp/tvm_0.1.9
  DSV4_PATH=$TVM:/tmp/site:/tmp/dsv4site:/tmp/dsv4site/nvidia_cutlass_dsl/python_packages
  PYTHONPATH=$DSV4_PATH DSV4_CHILD_TIMEOUT_S=${DSV4_CHILD_TIMEOUT_S:-500} VLLM_DEEP_GEMM_WARMUP=skip \
    timeout $(( ${DSV4_CHILD_TIMEOUT_S:-500} + 60 )) python3 scripts/gpu/deepseek_v4_engine.py mxfp4_rl > "$OUT/dsv4.log" 2>&1
  grep -E "^(DSV4|VERDICT)" "$OUT/dsv4.log" | cut -c1-2000
  ;;
*) echo "usage: round_session.sh A|B|C|K|K2|R|D|P|S|T|U|V|W|W2|X|E"; exit 2 ;;
esac
