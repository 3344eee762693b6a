"""GPU end-to-end check of the mxfp4_rl plugin inside a real vLLM engine (vLLM 0.25 on the lent H100/H200).

Builds a tiny Qwen3-MoE, quantizes it with the codec, serves it with `quantization="mxfp4_rl"` (eager, then with CUDA
graphs when the selected backend supports them), and checks: the served expert bytes equal the checkpoint's
(torch.equal), greedy tokens and log-probs against the fp32 transformers reference with dequantized experts.
Prints one JSON line per mode and writes them to $OUT/vllm_e2e.json.

Modes prefill_fused / prefill_dense / prefill_auto (MXFP4_RL_HOPPER_PREFILL) add one 3840-token prompt, so that
the MoE layer runs 960 rows per expert (auto takes common/grouped_gemm/dense.py from 704), with CUDA graphs for
the decode steps; "dense_calls" counts the layer calls that took the dense path, and the last line compares the
dense and fused engines' log-probs token for token.

usage (device, after the vLLM bundle is installed): PYTHONPATH=/tmp/site python3 scripts/gpu/vllm_e2e.py [modes...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

PROMPTS = [[1, 5, 9, 17, 33], [2, 200, 7], [100, 101, 102, 103, 104, 105]]
LONG = 3840  # + 256 = the tiny config's max_position_embeddings


def prompts(mode: str) -> list[list[int]]:
    if not mode.startswith("prefill"):
        return PROMPTS
    import torch

    g = torch.Generator().manual_seed(7)
    return [torch.randint(2, 256, (LONG,), generator=g).tolist(), *PROMPTS]


def serve(model: str, mode: str) -> dict:
    from vllm import LLM, SamplingParams

    import common.grouped_gemm.dense as dense
    from mxfp4_serve.introspect import packed_expert_params

    calls = {"dense": 0}
    dense_forward = dense.moe_layer_forward_dense

    def counted(*a, **kw):  # mlp.moe_layer_forward looks the function up on the module at each call
        calls["dense"] += 1
        return dense_forward(*a, **kw)

    dense.moe_layer_forward_dense = counted
    long = mode.startswith("prefill")
    kwargs = dict(model=model, quantization="mxfp4_rl", dtype="bfloat16", skip_tokenizer_init=True,
                  gpu_memory_utilization=0.3, max_model_len=LONG + 256 if long else 256, max_num_seqs=4, seed=0,
                  attention_config={"backend": "TRITON_ATTN"})
    if long:
        kwargs["max_num_batched_tokens"] = LONG + 256
    if mode == "eager":
        kwargs["enforce_eager"] = True
    else:
        kwargs["compilation_config"] = {"cudagraph_capture_sizes": [1, 2, 4, 8]}
    t0 = time.time()
    llm = LLM(**kwargs)
    start_s = time.time() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts(mode)], sp, use_tqdm=False)
    result = {"outputs": [{"prompt": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
                           "logprobs": [{str(t): float(lp.logprob) for t, lp in s.items()}
                                        for s in o.outputs[0].logprobs]} for o in outs]}
    (params,) = llm.apply_model(packed_expert_params)
    params = {k: v.cpu() for k, v in params.items()}
    del llm
    return {"start_s": round(start_s, 1), "result": result, "params": params, "dense_calls": calls["dense"]}


def serve_in_child(model: str, mode: str, work: Path) -> dict:
    """One engine per process: vLLM's start-up memory profiling fails when an earlier engine of the same process
    is still releasing GPU memory."""
    import subprocess

    import torch
    from safetensors.torch import load_file

    out = work / f"serve_{mode}"
    out.mkdir(exist_ok=True)
    env = dict(os.environ)
    if mode.startswith("prefill_"):
        env["MXFP4_RL_HOPPER_PREFILL"] = mode.removeprefix("prefill_")
    proc = subprocess.run([sys.executable, __file__, "--serve", model, mode, str(out)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"engine ({mode}) failed:\n{proc.stderr[-3000:]}")
    meta = json.loads((out / "result.json").read_text())
    return {**meta, "params": load_file(str(out / "params.safetensors"))}


def child(model: str, mode: str, out: Path) -> None:
    from safetensors.torch import save_file

    got = serve(model, mode)
    save_file({k: v.contiguous() for k, v in got.pop("params").items()}, str(out / "params.safetensors"))
    (out / "result.json").write_text(json.dumps(got))


def main(modes: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch

    from common.checkpoint import quantize_checkpoint
    from common.checkpoint.tiny import write_tiny_checkpoint
    from tests.serve.reference import (
        assert_same_bytes,
        dequantized_experts,
        engine_logprob_diff,
        hf_model_with_experts,
        max_logprob_error,
        packed_vllm_params,
    )

    work = Path(tempfile.mkdtemp())
    src = write_tiny_checkpoint(work / "bf16", arch="qwen3_moe", seed=0)
    dst = quantize_checkpoint(src, work / "mxfp4", profile="flashinfer", progress=False)
    ref_model = hf_model_with_experts(src, dequantized_experts(dst))
    wrong_model = hf_model_with_experts(src, dequantized_experts(
        quantize_checkpoint(src, work / "ocp", profile="ocp", progress=False)))
    expected = packed_vllm_params(dst)
    rows, results = [], {}
    for mode in modes:
        row = {"mode": mode, "device": torch.cuda.get_device_name(0)}
        try:
            got = serve_in_child(str(dst), mode, work)
            assert_same_bytes(got["params"], expected)
            row["bytes_identical"] = True
            row["max_logprob_err"], row["greedy_flips"] = max_logprob_error(got["result"], ref_model)
            row["max_logprob_err_wrong_profile"], row["greedy_flips_wrong_profile"] = max_logprob_error(
                got["result"], wrong_model)
            row["start_s"] = got["start_s"]
            row["dense_calls"] = got["dense_calls"]
            results[mode] = got["result"]
            row["tokens"] = [o["tokens"] for o in got["result"]["outputs"]]
            row["ok"] = True
        except Exception as exc:  # report every mode, even after one fails
            row["ok"] = False
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        print("E2E", json.dumps(row), flush=True)
        rows.append(row)
    if "prefill_dense" in results and "prefill_fused" in results:
        print("E2E", json.dumps({"dense_vs_fused": engine_logprob_diff(results["prefill_dense"],
                                                                        results["prefill_fused"])}))
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vllm_e2e.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        child(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
        sys.exit(0)
    sys.exit(main(sys.argv[1:] or ["eager", "cudagraph"]))
